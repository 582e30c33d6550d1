//! Replay windows: which buckets of which streams a client currently wants to see.
//!
//! SpacetimeDB 1.2 cannot plan a client subscription that filters a table whose RLS rule
//! is a join (`SELECT * FROM stream_segment WHERE stream_id = ..` fails with
//! "Subscriptions require indexes on join columns"), so a client cannot bound its replay
//! with a `WHERE` clause. Instead it subscribes to `stream_segment` unfiltered and opens
//! windows here: the segment RLS rule joins on `client_window`, so a client sees exactly
//! the segments of the buckets it opened, and only of streams it holds a live subscribe
//! grant on (checked when a window opens; revoking or expiring the grant closes them).
//! Memory on the client is thereby bounded by the windows it keeps open.

use crate::access;
use crate::streams::validate_stream_id;
use crate::{fail, ReducerResult};
use khala_proto::hash::window_key;
use khala_proto::ErrorCode;
use spacetimedb::{client_visibility_filter, reducer, table, Filter, Identity, ReducerContext, Table, Timestamp};

/// Most windows one identity may hold open on one stream.
pub const MAX_WINDOWS_PER_STREAM: usize = 8;

/// Window churn per identity: each open or close that changes something takes a token;
/// the bucket holds [`CHURN_BURST`] and refills at [`CHURN_PER_SEC`]. Every open or close
/// re-evaluates the segment RLS rule for the caller's subscriptions, so unbounded churn
/// would make the server re-send whole buckets in a loop. An honest client replaying
/// 1M events at 600k events/s opens about 75 windows a second.
pub const CHURN_BURST: u64 = 512;
pub const CHURN_PER_SEC: u64 = 128;

/// One identity's window-churn token bucket. Private.
#[table(name = window_churn)]
pub struct WindowChurn {
    #[primary_key]
    pub identity: Identity,
    /// Tokens left at `refilled_at`, in thousandths (so partial refills are kept).
    pub milli_tokens: u64,
    pub refilled_at: Timestamp,
}

/// Takes one churn token from the caller, or fails with `rate_limited retry_after_ms=..`.
fn take_churn_token(ctx: &ReducerContext) -> ReducerResult {
    let full = CHURN_BURST * 1000;
    let row = ctx.db.window_churn().identity().find(ctx.sender);
    let tokens = match &row {
        None => full,
        Some(r) => {
            let elapsed_ms = ctx.timestamp.duration_since(r.refilled_at).map_or(0, |d| d.as_millis() as u64);
            r.milli_tokens.saturating_add(elapsed_ms.saturating_mul(CHURN_PER_SEC)).min(full)
        }
    };
    if tokens < 1000 {
        let retry_after_ms = (1000 - tokens).div_ceil(CHURN_PER_SEC);
        return Err(fail(
            ErrorCode::RateLimited,
            format!("window churn above {CHURN_PER_SEC}/s (burst {CHURN_BURST}) retry_after_ms={retry_after_ms}"),
        ));
    }
    let next = WindowChurn { identity: ctx.sender, milli_tokens: tokens - 1000, refilled_at: ctx.timestamp };
    if row.is_some() {
        ctx.db.window_churn().identity().update(next);
    } else {
        ctx.db.window_churn().insert(next);
    }
    Ok(())
}

/// One open window: `grantee` sees the segments of `stream_id` whose
/// `first_seq / WINDOW_EVENTS == bucket`.
#[table(name = client_window, public)]
pub struct ClientWindow {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub grantee: Identity,
    /// `khala_proto::hash::window_key(stream_id, bucket)`; the segment RLS rule joins on it.
    #[index(btree)]
    pub window_key: u128,
    pub stream_id: String,
    pub bucket: u64,
    pub opened_at: Timestamp,
}

/// A client sees only its own windows.
#[client_visibility_filter]
const WINDOW_VISIBILITY: Filter = Filter::Sql("SELECT * FROM client_window WHERE grantee = :sender");

fn windows_of(ctx: &ReducerContext, who: Identity, stream_id: &str) -> Vec<ClientWindow> {
    ctx.db.client_window().grantee().filter(who).filter(|w| w.stream_id == stream_id).collect()
}

/// Opens the caller's window on `bucket` of `stream_id`. Needs a live subscribe grant.
/// Opening a window that is already open is not an error.
#[reducer]
pub fn open_window(ctx: &ReducerContext, stream_id: String, bucket: u64) -> ReducerResult {
    validate_stream_id(&stream_id)?;
    match access::live_grant(ctx, ctx.sender, &stream_id) {
        Some(g) if g.subscribe => {}
        _ => return Err(fail(ErrorCode::ForbiddenStream, format!("no live subscribe grant on stream {stream_id}"))),
    }
    let open = windows_of(ctx, ctx.sender, &stream_id);
    if open.iter().any(|w| w.bucket == bucket) {
        return Ok(());
    }
    if open.len() >= MAX_WINDOWS_PER_STREAM {
        return Err(fail(ErrorCode::RateLimited, format!("at most {MAX_WINDOWS_PER_STREAM} windows per stream; close one first")));
    }
    take_churn_token(ctx)?;
    ctx.db.client_window().insert(ClientWindow {
        id: 0,
        grantee: ctx.sender,
        window_key: window_key(&stream_id, bucket),
        stream_id,
        bucket,
        opened_at: ctx.timestamp,
    });
    Ok(())
}

/// Closes the caller's window on `bucket` of `stream_id` (a no-op if it is not open).
/// Closing takes a churn token too, so open/close loops are bounded either way.
#[reducer]
pub fn close_window(ctx: &ReducerContext, stream_id: String, bucket: u64) -> ReducerResult {
    validate_stream_id(&stream_id)?;
    let closing: Vec<ClientWindow> = windows_of(ctx, ctx.sender, &stream_id).into_iter().filter(|w| w.bucket == bucket).collect();
    if closing.is_empty() {
        return Ok(());
    }
    take_churn_token(ctx)?;
    for w in closing {
        ctx.db.client_window().id().delete(w.id);
    }
    Ok(())
}

/// Closes every window `who` holds on `stream_id` (on revoke and lease expiry).
pub fn close_all(ctx: &ReducerContext, who: Identity, stream_id: &str) {
    for w in windows_of(ctx, who, stream_id) {
        ctx.db.client_window().id().delete(w.id);
    }
}

/// Closes every window of `who` (when its last connection goes).
pub fn close_all_of(ctx: &ReducerContext, who: Identity) {
    let ids: Vec<u64> = ctx.db.client_window().grantee().filter(who).map(|w| w.id).collect();
    for id in ids {
        ctx.db.client_window().id().delete(id);
    }
}
