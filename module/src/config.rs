//! The settings row, module initialisation, and the client compatibility check.

use crate::access::{self, Role};
use crate::{fail, retention, ReducerResult};
use khala_proto::ErrorCode;
use spacetimedb::{reducer, table, ReducerContext, Table};

/// Module-wide settings. A single row with `id = 0`; private (clients never read it).
#[table(name = khala_config)]
#[derive(Clone)]
pub struct KhalaConfig {
    #[primary_key]
    pub id: u8,
    /// Largest payload of one event, in bytes.
    pub max_payload_bytes: u32,
    /// Most events in one `publish` call.
    pub max_batch_events: u32,
    /// Most payload bytes in one `publish` call.
    pub max_batch_bytes: u32,
    /// Protocol versions `hello` accepts: `protocol_min..=protocol_max`.
    pub protocol_min: u32,
    pub protocol_max: u32,
    /// Oldest client build (dotted numbers) that `hello` accepts.
    pub min_client_build: String,
    /// Most segments one retention sweep deletes, so that a sweep stays short.
    pub retention_chunk_segments: u32,
    /// Segments younger than this are not compacted (live clients have them by then).
    pub compact_min_age_secs: u64,
}

impl KhalaConfig {
    fn defaults() -> Self {
        KhalaConfig {
            id: 0,
            max_payload_bytes: khala_proto::limits::DEFAULT_MAX_PAYLOAD_BYTES,
            max_batch_events: 8_192,
            max_batch_bytes: 16 * 1024 * 1024,
            protocol_min: khala_proto::PROTOCOL_VERSION,
            protocol_max: khala_proto::PROTOCOL_VERSION,
            min_client_build: "0.1.0".into(),
            retention_chunk_segments: 256,
            compact_min_age_secs: 10,
        }
    }
}

/// The settings row (the defaults if `init` has not written it, which cannot happen
/// after a publish, but keeps every reducer panic-free).
pub fn config(ctx: &ReducerContext) -> KhalaConfig {
    ctx.db.khala_config().id().find(0).unwrap_or_else(KhalaConfig::defaults)
}

/// The publishing identity becomes admin and publisher; the sweeps are scheduled.
#[reducer(init)]
pub fn init(ctx: &ReducerContext) {
    ctx.db.khala_config().insert(KhalaConfig::defaults());
    access::add_role(ctx, ctx.sender, Role::Admin);
    access::add_role(ctx, ctx.sender, Role::Publisher);
    retention::schedule(ctx);
    crate::compaction::schedule(ctx);
    crate::sweep::init(ctx);
    crate::stream_view::init(ctx);
    access::schedule_grant_sweep(ctx);
}

/// Sets the publish limits (admin only). Zero means "keep the current value".
#[reducer]
pub fn set_limits(ctx: &ReducerContext, max_payload_bytes: u32, max_batch_events: u32, max_batch_bytes: u32) -> ReducerResult {
    access::require_admin(ctx)?;
    let mut cfg = config(ctx);
    if max_payload_bytes > 0 {
        cfg.max_payload_bytes = max_payload_bytes;
    }
    if max_batch_events as u64 > khala_proto::hash::WINDOW_EVENTS {
        return Err(fail(
            ErrorCode::InvalidArgument,
            format!("max_batch_events {max_batch_events} is above the window size {}", khala_proto::hash::WINDOW_EVENTS),
        ));
    }
    if max_batch_events > 0 {
        cfg.max_batch_events = max_batch_events;
    }
    if max_batch_bytes > 0 {
        cfg.max_batch_bytes = max_batch_bytes;
    }
    ctx.db.khala_config().id().update(cfg);
    Ok(())
}

/// Sets how old a small segment must be before compaction merges it (admin only). A
/// shorter age has the next compaction run look at every stream once: wake-ups set under
/// the old age may be due sooner now.
#[reducer]
pub fn set_compaction(ctx: &ReducerContext, min_age_secs: u64) -> ReducerResult {
    access::require_admin(ctx)?;
    let mut cfg = config(ctx);
    let shorter = min_age_secs < cfg.compact_min_age_secs;
    cfg.compact_min_age_secs = min_age_secs;
    ctx.db.khala_config().id().update(cfg);
    if shorter {
        crate::sweep::reseed_compaction(ctx);
    }
    Ok(())
}

/// Sets the window of protocol versions and the oldest client build `hello` accepts.
#[reducer]
pub fn set_protocol_window(ctx: &ReducerContext, protocol_min: u32, protocol_max: u32, min_client_build: String) -> ReducerResult {
    access::require_admin(ctx)?;
    if protocol_min > protocol_max {
        return Err(fail(ErrorCode::InvalidArgument, format!("protocol_min {protocol_min} is above protocol_max {protocol_max}")));
    }
    check_build_len("min_client_build", &min_client_build)?;
    parse_build(&min_client_build)?;
    let mut cfg = config(ctx);
    cfg.protocol_min = protocol_min;
    cfg.protocol_max = protocol_max;
    cfg.min_client_build = min_client_build;
    ctx.db.khala_config().id().update(cfg);
    Ok(())
}

/// Longest `client_build` that `hello` stores, in bytes.
pub const MAX_CLIENT_BUILD_LEN: usize = 64;

/// Refuses a build string longer than [`MAX_CLIENT_BUILD_LEN`]; `what` names the argument.
fn check_build_len(what: &str, build: &str) -> ReducerResult {
    if build.len() > MAX_CLIENT_BUILD_LEN {
        return Err(fail(ErrorCode::InvalidArgument, format!("{what} is {} bytes; the limit is {MAX_CLIENT_BUILD_LEN}", build.len())));
    }
    Ok(())
}

/// Parses a build id such as `1.4.2` or `1.4.2-beta+abc` into its numeric parts.
pub fn parse_build(build: &str) -> Result<Vec<u64>, String> {
    let core = build.split(['-', '+']).next().unwrap_or("");
    let parts: Option<Vec<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    match parts {
        Some(parts) if !core.is_empty() && parts.len() <= 4 => Ok(parts),
        _ => Err(fail(ErrorCode::InvalidArgument, format!("client build {build:?} is not a dotted version like 1.2.3"))),
    }
}

/// Checks the caller's protocol version and build, in the order clients rely on:
/// missing build, protocol outside the window, build below the minimum.
/// Records both on the caller's `connection` row.
#[reducer]
pub fn hello(ctx: &ReducerContext, protocol_version: u32, client_build: String) -> ReducerResult {
    let cfg = config(ctx);
    if client_build.trim().is_empty() {
        return Err(fail(ErrorCode::InvalidArgument, "client_build is required"));
    }
    check_build_len("client_build", &client_build)?;
    if protocol_version < cfg.protocol_min || protocol_version > cfg.protocol_max {
        return Err(fail(
            ErrorCode::UnsupportedProtocolVersion,
            format!("protocol {protocol_version} is outside the supported window {}..={}", cfg.protocol_min, cfg.protocol_max),
        ));
    }
    if parse_build(&client_build)? < parse_build(&cfg.min_client_build)? {
        return Err(fail(
            ErrorCode::UpgradeRequired,
            format!("client build {client_build} is below the minimum {}", cfg.min_client_build),
        ));
    }
    crate::presence::record_hello(ctx, protocol_version, client_build);
    Ok(())
}
