//! Roles, grants and row-level security.
//!
//! SpacetimeDB 1.x modules cannot read JWT claims, so Khala keeps token scopes as rows:
//! a global role (`admin`, `publisher`) per identity, and per-stream grants with the
//! scopes `subscribe` and `ack` and a lease (`expires_at`). Reducers check them on every
//! call; the RLS rules below make clients see only the rows their grants allow
//! (docs/SECURITY.md). The database owner bypasses RLS.

use crate::streams::validate_stream_id;
use crate::{fail, ReducerResult};
use khala_proto::ErrorCode;
use spacetimedb::{client_visibility_filter, reducer, table, Filter, Identity, ReducerContext, ScheduleAt, Table, TimeDuration, Timestamp};
use std::time::Duration;

/// The longest lease one grant may carry.
pub const MAX_GRANT_TTL_SECS: u64 = 366 * 24 * 3600;

/// How often expired grants are removed (RLS cannot compare with the clock, so a lease
/// ends for reads when this sweep deletes the row; reducers check `expires_at` directly).
pub const GRANT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Publisher,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Publisher => "publisher",
        }
    }

    fn parse(name: &str) -> Result<Role, String> {
        match name {
            "admin" => Ok(Role::Admin),
            "publisher" => Ok(Role::Publisher),
            other => Err(fail(ErrorCode::InvalidArgument, format!("unknown role {other:?}; roles are admin and publisher"))),
        }
    }
}

/// One role held by one identity (an identity with two roles has two rows).
#[table(name = identity_role, public)]
pub struct IdentityRole {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub identity: Identity,
    /// `admin` or `publisher`. Indexed because the presence RLS rule joins on it.
    #[index(btree)]
    pub role: String,
    pub granted_by: Identity,
    pub granted_at: Timestamp,
}

/// A client sees only its own roles.
#[client_visibility_filter]
const ROLE_VISIBILITY: Filter = Filter::Sql("SELECT * FROM identity_role WHERE identity = :sender");

/// What one identity may do on one stream, until `expires_at`.
#[table(name = stream_grant, public)]
#[derive(Clone)]
pub struct StreamGrant {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub grantee: Identity,
    /// Indexed (single column) because the stream and segment RLS rules join on it.
    #[index(btree)]
    pub stream_id: String,
    /// May see the stream's rows and segments.
    pub subscribe: bool,
    /// May call `ack` on the stream.
    pub ack: bool,
    pub expires_at: Timestamp,
    pub issued_by: Identity,
    pub issued_at: Timestamp,
}

/// A client sees only its own grants.
#[client_visibility_filter]
const GRANT_VISIBILITY: Filter = Filter::Sql("SELECT * FROM stream_grant WHERE grantee = :sender");

/// Scheduled removal of expired grants.
#[table(name = grant_sweep_schedule, scheduled(sweep_grants))]
pub struct GrantSweepSchedule {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
}

pub fn schedule_grant_sweep(ctx: &ReducerContext) {
    ctx.db.grant_sweep_schedule().insert(GrantSweepSchedule {
        scheduled_id: 0,
        scheduled_at: ScheduleAt::Interval(TimeDuration::from_duration(GRANT_SWEEP_INTERVAL)),
    });
}

pub fn has_role(ctx: &ReducerContext, who: Identity, role: Role) -> bool {
    ctx.db.identity_role().identity().filter(who).any(|r| r.role == role.name())
}

pub fn add_role(ctx: &ReducerContext, who: Identity, role: Role) {
    if !has_role(ctx, who, role) {
        ctx.db.identity_role().insert(IdentityRole {
            id: 0,
            identity: who,
            role: role.name().into(),
            granted_by: ctx.sender,
            granted_at: ctx.timestamp,
        });
    }
}

pub fn require_admin(ctx: &ReducerContext) -> ReducerResult {
    if has_role(ctx, ctx.sender, Role::Admin) {
        Ok(())
    } else {
        Err(fail(ErrorCode::Unauthorized, "this call needs the admin role"))
    }
}

pub fn require_publisher(ctx: &ReducerContext) -> ReducerResult {
    if has_role(ctx, ctx.sender, Role::Publisher) {
        Ok(())
    } else {
        Err(fail(ErrorCode::Unauthorized, "publish needs the publisher role"))
    }
}

/// The caller's unexpired grant on `stream_id`, if any.
pub fn live_grant(ctx: &ReducerContext, who: Identity, stream_id: &str) -> Option<StreamGrant> {
    ctx.db
        .stream_grant()
        .grantee()
        .filter(who)
        .find(|g| g.stream_id == stream_id && g.expires_at > ctx.timestamp)
}

/// Gives (`enabled = true`) or takes back a role. Admin only; an admin cannot drop its
/// own admin role, so a database never loses its last admin by accident.
#[reducer]
pub fn set_role(ctx: &ReducerContext, identity: Identity, role: String, enabled: bool) -> ReducerResult {
    require_admin(ctx)?;
    let role = Role::parse(&role)?;
    if enabled {
        add_role(ctx, identity, role);
        return Ok(());
    }
    if identity == ctx.sender && role == Role::Admin {
        return Err(fail(ErrorCode::InvalidArgument, "an admin cannot remove its own admin role"));
    }
    for row in ctx.db.identity_role().identity().filter(identity).filter(|r| r.role == role.name()) {
        ctx.db.identity_role().id().delete(row.id);
    }
    Ok(())
}

/// Grants `scopes` (`subscribe`, `ack`) on one exact stream id for `ttl_secs`. Granting
/// again replaces the scopes and renews the lease: that is how a lease is refreshed.
#[reducer]
pub fn grant(ctx: &ReducerContext, grantee: Identity, stream_id: String, scopes: Vec<String>, ttl_secs: u64) -> ReducerResult {
    require_admin(ctx)?;
    validate_stream_id(&stream_id)?;
    if ttl_secs == 0 || ttl_secs > MAX_GRANT_TTL_SECS {
        return Err(fail(ErrorCode::InvalidArgument, format!("ttl_secs must be 1..={MAX_GRANT_TTL_SECS}, got {ttl_secs}")));
    }
    let (mut subscribe, mut ack) = (false, false);
    for scope in &scopes {
        match scope.as_str() {
            "subscribe" => subscribe = true,
            "ack" => ack = true,
            other => return Err(fail(ErrorCode::InvalidArgument, format!("unknown scope {other:?}; scopes are subscribe and ack"))),
        }
    }
    if !subscribe && !ack {
        return Err(fail(ErrorCode::InvalidArgument, "a grant needs at least one scope (subscribe, ack)"));
    }
    let expires_at = ctx.timestamp + Duration::from_secs(ttl_secs);
    let row = StreamGrant { id: 0, grantee, stream_id, subscribe, ack, expires_at, issued_by: ctx.sender, issued_at: ctx.timestamp };
    match ctx.db.stream_grant().grantee().filter(grantee).find(|g| g.stream_id == row.stream_id) {
        Some(existing) => {
            if !row.subscribe {
                crate::windows::close_all(ctx, grantee, &row.stream_id);
            }
            ctx.db.stream_grant().id().update(StreamGrant { id: existing.id, ..row });
        }
        None => {
            ctx.db.stream_grant().insert(row);
        }
    }
    Ok(())
}

/// Takes a grant back. Revoking a grant that does not exist is not an error.
#[reducer]
pub fn revoke(ctx: &ReducerContext, grantee: Identity, stream_id: String) -> ReducerResult {
    require_admin(ctx)?;
    validate_stream_id(&stream_id)?;
    let ids: Vec<u64> = ctx.db.stream_grant().grantee().filter(grantee).filter(|g| g.stream_id == stream_id).map(|g| g.id).collect();
    for id in ids {
        ctx.db.stream_grant().id().delete(id);
    }
    crate::windows::close_all(ctx, grantee, &stream_id);
    Ok(())
}

/// Deletes grants whose lease has ended. Only the scheduler may call it.
#[reducer]
pub fn sweep_grants(ctx: &ReducerContext, _schedule: GrantSweepSchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "sweep_grants is run by the scheduler only"));
    }
    let expired: Vec<StreamGrant> = ctx.db.stream_grant().iter().filter(|g| g.expires_at <= ctx.timestamp).collect();
    for g in expired {
        ctx.db.stream_grant().id().delete(g.id);
        crate::windows::close_all(ctx, g.grantee, &g.stream_id);
    }
    Ok(())
}
