-- Khala mirror: `created_at` on an outbox made by hand before `--migrate` (0001 keeps such
-- a table as it is, and adds only its triggers). The backlog gauges read it: the age of
-- the oldest row waiting. A no-op on an outbox 0001 made. `now()` is stable, so adding the
-- column does not rewrite the table; rows already there get the time of the migration.
ALTER TABLE khala_outbox ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
