//! Presence: who is connected. Each client sees only its own `connection` rows; admins
//! see the connected count.

use spacetimedb::{client_visibility_filter, reducer, table, ConnectionId, Filter, Identity, ReducerContext, Table, Timestamp};

/// One live connection. Keyed by row id, not by `ConnectionId` alone: the Rust SDK uses
/// one `ConnectionId` per process, so two identities connected from one process share it.
#[table(name = connection, public)]
pub struct Connection {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub connection_id: ConnectionId,
    #[index(btree)]
    pub identity: Identity,
    pub connected_at: Timestamp,
    /// Filled in by `hello`.
    pub client_build: String,
    pub protocol_version: u32,
}

/// A client sees only its own connections.
#[client_visibility_filter]
const CONNECTION_VISIBILITY: Filter = Filter::Sql("SELECT * FROM connection WHERE identity = :sender");

/// The connected count; one row, `audience = "admin"`.
#[table(name = presence, public)]
pub struct Presence {
    #[primary_key]
    pub id: u8,
    /// The role that may see this row; indexed for the RLS join.
    #[index(btree)]
    pub audience: String,
    pub connected: u64,
    pub updated_at: Timestamp,
}

/// Only identities holding the `admin` role see the count.
#[client_visibility_filter]
const PRESENCE_VISIBILITY: Filter = Filter::Sql(
    "SELECT presence.* FROM identity_role JOIN presence ON identity_role.role = presence.audience \
     WHERE identity_role.identity = :sender",
);

fn recount(ctx: &ReducerContext) {
    let row = Presence { id: 0, audience: "admin".into(), connected: ctx.db.connection().count(), updated_at: ctx.timestamp };
    if ctx.db.presence().id().find(0).is_some() {
        ctx.db.presence().id().update(row);
    } else {
        ctx.db.presence().insert(row);
    }
}

#[reducer(client_connected)]
pub fn client_connected(ctx: &ReducerContext) {
    if let Some(connection_id) = ctx.connection_id {
        ctx.db.connection().insert(Connection {
            id: 0,
            connection_id,
            identity: ctx.sender,
            connected_at: ctx.timestamp,
            client_build: String::new(),
            protocol_version: 0,
        });
        recount(ctx);
    }
}

/// The caller's own row for this connection.
fn own_row(ctx: &ReducerContext, connection_id: ConnectionId) -> Option<Connection> {
    ctx.db.connection().connection_id().filter(connection_id).find(|c| c.identity == ctx.sender)
}

#[reducer(client_disconnected)]
pub fn client_disconnected(ctx: &ReducerContext) {
    if let Some(row) = ctx.connection_id.and_then(|id| own_row(ctx, id)) {
        ctx.db.connection().id().delete(row.id);
        recount(ctx);
    }
    // Windows are per identity; they go when its last connection does.
    if ctx.db.connection().identity().filter(ctx.sender).next().is_none() {
        crate::windows::close_all_of(ctx, ctx.sender);
    }
}

/// Records what `hello` was told on the caller's connection row.
pub fn record_hello(ctx: &ReducerContext, protocol_version: u32, client_build: String) {
    if let Some(mut row) = ctx.connection_id.and_then(|id| own_row(ctx, id)) {
        row.client_build = client_build;
        row.protocol_version = protocol_version;
        ctx.db.connection().id().update(row);
    }
}
