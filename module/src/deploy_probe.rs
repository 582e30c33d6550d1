//! A deploy probe, compiled only into the `khala-module-next` fixture
//! (`bench/module-next`, feature `deploy-probe`): one extra public table and one reducer,
//! the smallest additive schema change, so that `khala deploy`'s tests can publish a
//! module that differs from Khala's by exactly that. Never part of Khala's own module.

use crate::{access, ReducerResult};
use spacetimedb::{reducer, table, ReducerContext, Table, Timestamp};

/// Notes an admin left through [`deploy_probe_note`]; public, and holds nothing else.
#[table(name = deploy_probe, public)]
pub struct DeployProbe {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    pub note: String,
    pub at: Timestamp,
}

/// Records one note (admins only, like every write in the module).
#[reducer]
pub fn deploy_probe_note(ctx: &ReducerContext, note: String) -> ReducerResult {
    access::require_admin(ctx)?;
    ctx.db.deploy_probe().insert(DeployProbe { id: 0, note, at: ctx.timestamp });
    Ok(())
}
