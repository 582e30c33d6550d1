//! Replay windows: which buckets of a stream's segments this client keeps open on the
//! server (see `module/src/windows.rs` for why windows exist at all).

use super::StreamState;
use crate::module_bindings::{close_window as _, open_window as _, DbConnection};
use khala_proto::hash::bucket;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Window buckets kept open ahead of the one holding the cursor.
const PREFETCH_BUCKETS: u64 = 1;
/// How long events may wait behind a missing seq before the windows are reopened.
const GAP_PATIENCE: Duration = Duration::from_secs(2);

/// Keeps each stream's windows around its cursor: the bucket holding the next seq, the
/// one before (it may hold the segment that starts before it) and [`PREFETCH_BUCKETS`]
/// after it, so replay rarely waits on a round trip, and memory stays bounded by
/// `PREFETCH_BUCKETS + 2` buckets of events.
/// Windows are opened before old ones are closed; a gap that does not fill within
/// [`GAP_PATIENCE`] reopens the windows so their rows are delivered again.
pub(super) fn maintain_windows(id: &str, state: &mut StreamState, conn: &DbConnection) {
    if !state.windows_usable || state.granted != Some(true) {
        return;
    }
    if state.gap_since.is_some_and(|t| t.elapsed() > GAP_PATIENCE) {
        log::warn!("{id}: a gap after {} did not fill; reopening the windows", state.engine.applied());
        state.reset_windows = true;
        state.gap_since = None;
    }
    if state.reset_windows {
        // Close and reopen (in that order on the one connection) so that the rows of
        // every bucket are delivered again; another process's windows are left alone
        // and simply reopened as ours.
        for b in state.open.iter().chain(state.opening.iter()) {
            let _ = conn.reducers.close_window(id.to_string(), *b);
        }
        state.open.clear();
        state.opening.clear();
        state.mine.clear();
        state.reset_windows = false;
    }
    if state.window_retry_at.is_some_and(|t| t > Instant::now()) {
        return;
    }
    let b0 = bucket(state.engine.fetch_after() + 1);
    let want: BTreeSet<u64> = (b0.saturating_sub(1)..=b0 + PREFETCH_BUCKETS).collect();
    for b in &want {
        if !state.open.contains(b) && !state.opening.contains(b) && conn.reducers.open_window(id.to_string(), *b).is_ok() {
            state.opening.insert(*b);
            state.mine.insert(*b);
        }
    }
    for b in state.mine.clone() {
        if !want.contains(&b) && state.open.contains(&b) && !state.closing.contains(&b) && conn.reducers.close_window(id.to_string(), b).is_ok() {
            state.closing.insert(b);
            state.mine.remove(&b);
        }
    }
}
