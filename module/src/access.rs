//! Roles, grants and row-level security.
//!
//! SpacetimeDB 1.x modules cannot read JWT claims, so Khala keeps token scopes as rows:
//! a global role (`admin`, `publisher`) per identity, per-stream grants with the scopes
//! `subscribe` and `ack`, and publish grants on one stream or a stream-id prefix, each
//! with a lease (`expires_at`). Reducers check them on every call; the RLS rules make
//! clients see only the rows their grants allow (docs/SECURITY.md). The database owner
//! bypasses RLS.
//!
//! Leases end on time for reads too: every grant schedules a one-shot `expire_grant` at
//! its `expires_at` (RLS rules cannot compare with the clock), and a sweep once a minute
//! backs it up.

use crate::streams::{stream, validate_stream_id};
use crate::{fail, ReducerResult};
use khala_proto::ErrorCode;
use spacetimedb::{client_visibility_filter, reducer, table, Filter, Identity, ReducerContext, ScheduleAt, Table, TimeDuration, Timestamp};
use std::time::Duration;

/// The longest lease one grant may carry.
pub const MAX_GRANT_TTL_SECS: u64 = 366 * 24 * 3600;

/// How often the backstop sweep removes expired grants. Each grant also schedules its own
/// removal at `expires_at` ([`expire_grant`]); reducers check `expires_at` directly. The
/// sweep reads every grant (about 0.5 µs each in the database's one thread: 10 ms at
/// 20,000 grants, measured), so it runs rarely: it only catches what a lost schedule
/// would leave behind.
pub const GRANT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A stream pattern ending in this is a prefix: `runtime.run.*` covers every stream id
/// that starts with `runtime.run.`; `*` alone covers every stream.
pub const PREFIX_WILDCARD: char = '*';

/// Most scopes one `grant` call may name (there are three).
const MAX_SCOPES: usize = 8;

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

/// May publish to `pattern`: one exact stream id, or every stream id starting with it
/// (`prefix`). Holding one also needs the `publisher` role.
#[table(name = publish_grant, public)]
#[derive(Clone)]
pub struct PublishGrant {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub grantee: Identity,
    /// A stream id, or a stream-id prefix when `prefix` (possibly empty: every stream).
    pub pattern: String,
    pub prefix: bool,
    pub expires_at: Timestamp,
    pub issued_by: Identity,
    pub issued_at: Timestamp,
}

impl PublishGrant {
    /// Whether this grant, by prefix, reaches `stream_id` at `now`.
    fn covers_by_prefix(&self, stream_id: &str, now: Timestamp) -> bool {
        self.prefix && self.expires_at > now && stream_id.starts_with(self.pattern.as_str())
    }
}

/// A publisher sees only its own publish grants.
#[client_visibility_filter]
const PUBLISH_GRANT_VISIBILITY: Filter = Filter::Sql("SELECT * FROM publish_grant WHERE grantee = :sender");

/// One stream a publish grant reaches: exact grants have one row, prefix grants one per
/// matching stream (added when either the grant or the stream appears). RLS rules can only
/// join on equal columns, so this is how a publisher gets to read the heads, head hashes
/// and segments of exactly the streams it may publish (the mirror's reconciliation).
#[table(name = stream_publisher, public)]
pub struct StreamPublisher {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub grantee: Identity,
    /// Indexed (single column) for the stream and segment RLS joins and the publish check.
    #[index(btree)]
    pub stream_id: String,
    /// The `publish_grant` this row comes from; it goes with it.
    #[index(btree)]
    pub grant_id: u64,
    pub expires_at: Timestamp,
}

/// A publisher sees only its own reach rows.
#[client_visibility_filter]
const STREAM_PUBLISHER_VISIBILITY: Filter = Filter::Sql("SELECT * FROM stream_publisher WHERE grantee = :sender");

/// One grant's removal at the moment its lease ends.
#[table(name = grant_expiry_schedule, scheduled(expire_grant))]
pub struct GrantExpirySchedule {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
    /// The `stream_grant` or `publish_grant` row (by `publish`).
    pub grant_id: u64,
    pub publish: bool,
}

/// Scheduled removal of expired grants.
#[table(name = grant_sweep_schedule, scheduled(sweep_grants))]
pub struct GrantSweepSchedule {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
}

/// When the backstop sweep last read the grants. Private. Databases made before the
/// sweep ran once a minute keep their 1 s schedule row; their runs in between find this
/// row recent and return.
#[table(name = grant_sweep_state)]
pub struct GrantSweepState {
    #[primary_key]
    pub id: u8,
    pub last_sweep: Timestamp,
}

pub fn schedule_grant_sweep(ctx: &ReducerContext) {
    ctx.db.grant_sweep_schedule().insert(GrantSweepSchedule {
        scheduled_id: 0,
        scheduled_at: ScheduleAt::Interval(TimeDuration::from_duration(GRANT_SWEEP_INTERVAL)),
    });
    // A new database has no grant to sweep: its first run is due an interval from now.
    ctx.db.grant_sweep_state().insert(GrantSweepState { id: 0, last_sweep: ctx.timestamp });
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

/// Checks that the caller may publish to `stream_id`: it holds the `publisher` role and
/// a live publish grant that reaches the stream. Runs before anything else in `publish`,
/// so a caller outside its scope learns nothing about the stream (not even whether it
/// exists): every refusal reads the same.
pub fn require_publish(ctx: &ReducerContext, stream_id: &str) -> ReducerResult {
    let forbidden = || Err(fail(ErrorCode::ForbiddenStream, format!("no live publish grant on stream {stream_id}")));
    if !has_role(ctx, ctx.sender, Role::Publisher) {
        return forbidden();
    }
    let reached = ctx.db.stream_publisher().stream_id().filter(stream_id).any(|r| r.grantee == ctx.sender && r.expires_at > ctx.timestamp);
    if reached {
        return Ok(());
    }
    // A prefix grant reaches a stream the publisher has not published to yet.
    let by_prefix = ctx
        .db
        .publish_grant()
        .grantee()
        .filter(ctx.sender)
        .find(|g| g.covers_by_prefix(stream_id, ctx.timestamp));
    match by_prefix {
        Some(g) => {
            reach(ctx, &g, stream_id);
            Ok(())
        }
        None => forbidden(),
    }
}

/// Adds the reach row of grant `g` on `stream_id` unless it is there.
fn reach(ctx: &ReducerContext, g: &PublishGrant, stream_id: &str) {
    if !ctx.db.stream_publisher().stream_id().filter(stream_id).any(|r| r.grant_id == g.id) {
        ctx.db.stream_publisher().insert(StreamPublisher { id: 0, grantee: g.grantee, stream_id: stream_id.into(), grant_id: g.id, expires_at: g.expires_at });
    }
}

/// A new stream: every live prefix grant that covers it reaches it (so those publishers
/// read its head before they first publish to it).
pub fn on_stream_created(ctx: &ReducerContext, stream_id: &str) {
    let covering: Vec<PublishGrant> = ctx
        .db
        .publish_grant()
        .iter()
        .filter(|g| g.covers_by_prefix(stream_id, ctx.timestamp))
        .collect();
    for g in covering {
        reach(ctx, &g, stream_id);
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
/// own admin role, so a database never loses its last admin by accident. Taking the
/// `publisher` role back also revokes the identity's publish grants.
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
    if role == Role::Publisher {
        // Publish grants also let their holder read the streams they reach; without the
        // role they would keep that read access, so they go with it.
        let grants: Vec<u64> = ctx.db.publish_grant().grantee().filter(identity).map(|g| g.id).collect();
        for id in grants {
            delete_publish_grant(ctx, id);
        }
    }
    Ok(())
}

/// The scopes one `grant` call names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Scopes {
    subscribe: bool,
    ack: bool,
    publish: bool,
}

fn parse_scopes(scopes: &[String]) -> Result<Scopes, String> {
    if scopes.len() > MAX_SCOPES {
        return Err(fail(ErrorCode::InvalidArgument, format!("{} scopes named; the scopes are subscribe, ack and publish", scopes.len())));
    }
    let mut out = Scopes::default();
    for scope in scopes {
        match scope.as_str() {
            "subscribe" => out.subscribe = true,
            "ack" => out.ack = true,
            "publish" => out.publish = true,
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(fail(ErrorCode::InvalidArgument, format!("unknown scope {shown:?}; scopes are subscribe, ack and publish")));
            }
        }
    }
    if out == Scopes::default() {
        return Err(fail(ErrorCode::InvalidArgument, "a grant needs at least one scope (subscribe, ack, publish)"));
    }
    Ok(out)
}

/// A grant's target: one stream id, or a prefix (`runtime.run.*`, or `*` for all).
fn parse_pattern(stream: &str) -> Result<(String, bool), String> {
    match stream.strip_suffix(PREFIX_WILDCARD) {
        Some("") => Ok((String::new(), true)),
        Some(prefix) => {
            validate_stream_id(prefix)?;
            Ok((prefix.to_string(), true))
        }
        None => {
            validate_stream_id(stream)?;
            Ok((stream.to_string(), false))
        }
    }
}

fn schedule_expiry(ctx: &ReducerContext, grant_id: u64, publish: bool, expires_at: Timestamp) {
    ctx.db.grant_expiry_schedule().insert(GrantExpirySchedule { scheduled_id: 0, scheduled_at: ScheduleAt::Time(expires_at), grant_id, publish });
}

/// Grants `scopes` (`subscribe`, `ack`, `publish`) on `stream_id` for `ttl_secs`. A
/// stream id ending in `*` is a prefix and takes only the `publish` scope. Granting again
/// replaces the scopes (a scope left out is taken back) and renews the lease: that is how
/// a lease is refreshed. `publish` needs the grantee to hold the `publisher` role.
#[reducer]
pub fn grant(ctx: &ReducerContext, grantee: Identity, stream_id: String, scopes: Vec<String>, ttl_secs: u64) -> ReducerResult {
    require_admin(ctx)?;
    let (pattern, prefix) = parse_pattern(&stream_id)?;
    if ttl_secs == 0 || ttl_secs > MAX_GRANT_TTL_SECS {
        return Err(fail(ErrorCode::InvalidArgument, format!("ttl_secs must be 1..={MAX_GRANT_TTL_SECS}, got {ttl_secs}")));
    }
    let scopes = parse_scopes(&scopes)?;
    if prefix && (scopes.subscribe || scopes.ack) {
        return Err(fail(ErrorCode::InvalidArgument, format!("{stream_id} is a prefix; a prefix grant carries only the publish scope")));
    }
    if scopes.publish && !has_role(ctx, grantee, Role::Publisher) {
        return Err(fail(ErrorCode::InvalidArgument, "the publish scope needs the grantee to hold the publisher role (set_role first)"));
    }
    let expires_at = ctx.timestamp + Duration::from_secs(ttl_secs);
    if !prefix {
        set_stream_grant(ctx, grantee, &pattern, scopes, expires_at);
    }
    if scopes.publish {
        set_publish_grant(ctx, grantee, pattern, prefix, expires_at);
    } else {
        drop_publish_grants(ctx, grantee, &pattern, prefix);
    }
    Ok(())
}

/// Writes (or, without subscribe and ack, removes) the subscribe/ack grant.
fn set_stream_grant(ctx: &ReducerContext, grantee: Identity, stream_id: &str, scopes: Scopes, expires_at: Timestamp) {
    let existing = ctx.db.stream_grant().grantee().filter(grantee).find(|g| g.stream_id == stream_id);
    if !scopes.subscribe {
        crate::windows::close_all(ctx, grantee, stream_id);
    }
    if !scopes.subscribe && !scopes.ack {
        if let Some(old) = existing {
            ctx.db.stream_grant().id().delete(old.id);
        }
        return;
    }
    let row = StreamGrant {
        id: existing.as_ref().map_or(0, |g| g.id),
        grantee,
        stream_id: stream_id.into(),
        subscribe: scopes.subscribe,
        ack: scopes.ack,
        expires_at,
        issued_by: ctx.sender,
        issued_at: ctx.timestamp,
    };
    let id = match existing {
        Some(_) => ctx.db.stream_grant().id().update(row).id,
        None => ctx.db.stream_grant().insert(row).id,
    };
    schedule_expiry(ctx, id, false, expires_at);
}

/// Writes the publish grant and its reach rows (all matching streams for a prefix).
fn set_publish_grant(ctx: &ReducerContext, grantee: Identity, pattern: String, prefix: bool, expires_at: Timestamp) {
    let existing = ctx.db.publish_grant().grantee().filter(grantee).find(|g| g.pattern == pattern && g.prefix == prefix);
    let row = PublishGrant { id: existing.as_ref().map_or(0, |g| g.id), grantee, pattern, prefix, expires_at, issued_by: ctx.sender, issued_at: ctx.timestamp };
    let row = match existing {
        Some(_) => ctx.db.publish_grant().id().update(row),
        None => ctx.db.publish_grant().insert(row),
    };
    for mut r in ctx.db.stream_publisher().grant_id().filter(row.id).collect::<Vec<_>>() {
        r.expires_at = expires_at;
        ctx.db.stream_publisher().id().update(r);
    }
    if prefix {
        let streams: Vec<String> =
            ctx.db.stream().iter().filter(|s| s.stream_id.starts_with(row.pattern.as_str())).map(|s| s.stream_id).collect();
        for s in streams {
            reach(ctx, &row, &s);
        }
    } else {
        reach(ctx, &row, &row.pattern);
    }
    schedule_expiry(ctx, row.id, true, expires_at);
}

fn delete_publish_grant(ctx: &ReducerContext, id: u64) {
    ctx.db.stream_publisher().grant_id().delete(id);
    ctx.db.publish_grant().id().delete(id);
}

fn drop_publish_grants(ctx: &ReducerContext, grantee: Identity, pattern: &str, prefix: bool) {
    let ids: Vec<u64> = ctx.db.publish_grant().grantee().filter(grantee).filter(|g| g.pattern == pattern && g.prefix == prefix).map(|g| g.id).collect();
    for id in ids {
        delete_publish_grant(ctx, id);
    }
}

fn delete_stream_grant(ctx: &ReducerContext, g: &StreamGrant) {
    ctx.db.stream_grant().id().delete(g.id);
    crate::windows::close_all(ctx, g.grantee, &g.stream_id);
}

/// Takes a grant back, all its scopes (`stream_id` may be a `prefix*`). Revoking a
/// grant that does not exist is not an error.
#[reducer]
pub fn revoke(ctx: &ReducerContext, grantee: Identity, stream_id: String) -> ReducerResult {
    require_admin(ctx)?;
    let (pattern, prefix) = parse_pattern(&stream_id)?;
    if !prefix {
        let ids: Vec<u64> = ctx.db.stream_grant().grantee().filter(grantee).filter(|g| g.stream_id == pattern).map(|g| g.id).collect();
        for id in ids {
            ctx.db.stream_grant().id().delete(id);
        }
        crate::windows::close_all(ctx, grantee, &pattern);
    }
    drop_publish_grants(ctx, grantee, &pattern, prefix);
    Ok(())
}

/// Ends one grant's lease on time (scheduled at its `expires_at`). A renewed grant has a
/// later `expires_at` by then, and this does nothing. Only the scheduler may call it.
#[reducer]
pub fn expire_grant(ctx: &ReducerContext, schedule: GrantExpirySchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "expire_grant is run by the scheduler only"));
    }
    if schedule.publish {
        if ctx.db.publish_grant().id().find(schedule.grant_id).is_some_and(|g| g.expires_at <= ctx.timestamp) {
            delete_publish_grant(ctx, schedule.grant_id);
        }
    } else if let Some(g) = ctx.db.stream_grant().id().find(schedule.grant_id).filter(|g| g.expires_at <= ctx.timestamp) {
        delete_stream_grant(ctx, &g);
    }
    Ok(())
}

/// Deletes grants whose lease has ended, as a backstop to [`expire_grant`]. Only the
/// scheduler may call it.
#[reducer]
pub fn sweep_grants(ctx: &ReducerContext, _schedule: GrantSweepSchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "sweep_grants is run by the scheduler only"));
    }
    let last = ctx.db.grant_sweep_state().id().find(0);
    if last.as_ref().and_then(|l| l.last_sweep.checked_add_duration(GRANT_SWEEP_INTERVAL)).is_some_and(|due| ctx.timestamp < due) {
        return Ok(());
    }
    let state = GrantSweepState { id: 0, last_sweep: ctx.timestamp };
    match last {
        Some(_) => ctx.db.grant_sweep_state().id().update(state),
        None => ctx.db.grant_sweep_state().insert(state),
    };
    let expired: Vec<StreamGrant> = ctx.db.stream_grant().iter().filter(|g| g.expires_at <= ctx.timestamp).collect();
    for g in &expired {
        delete_stream_grant(ctx, g);
    }
    let expired: Vec<u64> = ctx.db.publish_grant().iter().filter(|g| g.expires_at <= ctx.timestamp).map(|g| g.id).collect();
    for id in expired {
        delete_publish_grant(ctx, id);
    }
    Ok(())
}
