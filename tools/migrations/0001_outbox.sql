-- Khala mirror: the Postgres outbox the runtime writes and `khala mirror --postgres` reads
-- (docs/MIRROR.md). Applied by `khala mirror --postgres URL --migrate`; safe to apply again.

-- One row per authority event. The mirror reads it in id order (keyset on id) and never
-- changes or deletes rows; the runtime prunes rows below the mirror's cursor.
CREATE TABLE IF NOT EXISTS khala_outbox (
    id          bigserial   PRIMARY KEY,
    topic       text        NOT NULL,
    seq         bigint      NOT NULL,
    kind        text        NOT NULL,
    payload     jsonb       NOT NULL,
    occurred_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The mirror's durable position: every row with id <= last_id is durable in the module.
CREATE TABLE IF NOT EXISTS khala_mirror_cursor (
    name       text        PRIMARY KEY,
    last_id    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Ids must become visible in id order, or a keyset reader that has moved past id 11 never
-- sees an id 10 whose transaction commits later. So each inserting transaction takes one
-- transaction-scoped advisory lock before it draws its ids: a later transaction draws
-- higher ids only after the earlier one has committed or rolled back. This serialises the
-- outbox-writing transactions (from their first outbox insert to their commit).
CREATE OR REPLACE FUNCTION khala_outbox_assign_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7104202501);
    NEW.id := nextval('khala_outbox_id_seq');
    RETURN NEW;
END
$$;

-- Wakes a listening mirror at commit (`LISTEN khala_outbox`); it also polls, so a lost
-- notification only delays it.
CREATE OR REPLACE FUNCTION khala_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('khala_outbox', '');
    RETURN NULL;
END
$$;

-- The trigger draws every id; a column default would draw one before the lock is held
-- (and waste it).
ALTER TABLE khala_outbox ALTER COLUMN id DROP DEFAULT;

DROP TRIGGER IF EXISTS khala_outbox_assign_id ON khala_outbox;
CREATE TRIGGER khala_outbox_assign_id BEFORE INSERT ON khala_outbox
    FOR EACH ROW EXECUTE FUNCTION khala_outbox_assign_id();

DROP TRIGGER IF EXISTS khala_outbox_notify ON khala_outbox;
CREATE TRIGGER khala_outbox_notify AFTER INSERT ON khala_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION khala_outbox_notify();
