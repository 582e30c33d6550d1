//! The mirror's errors, each with a stable code (printed as `khala: <code>: <message>`).
//!
//! Only failures the mirror cannot ride out end up here: transient server and network
//! trouble is retried inside the loop, and bad events go to the dead-letter file.

use crate::ToolError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the cursor {} belongs to {found}, not {expected}; use another --state-dir for this input (or delete the cursor to start over)", path.display())]
    CursorMismatch { path: PathBuf, expected: String, found: String },
    #[error("the cursor {} is unreadable ({detail}); move it aside to start over from the beginning (republishing is safe)", path.display())]
    CursorCorrupt { path: PathBuf, detail: String },
    #[error("the input {} changed at or before byte {offset}, where the mirror had read it: {detail}; use another --state-dir for a new file", path.display())]
    InputChanged { path: PathBuf, offset: u64, detail: String },
    #[error("another mirror holds the state dir {} (lock {})", dir.display(), dir.join("lock").display())]
    StateLocked { dir: PathBuf },
    #[error("postgres: {what}: {detail}")]
    Postgres { what: String, detail: String },
    #[error("the outbox schema is missing ({detail}); apply it first: khala mirror --postgres URL --migrate")]
    OutboxNotMigrated { detail: String },
    #[error("the outbox tables' columns are missing or of types the mirror cannot read ({detail}); see tools/migrations/0001_outbox.sql")]
    OutboxSchemaMismatch { detail: String },
    #[error("the mirror's Postgres role lacks a privilege it needs ({detail}); it reads khala_outbox and reads and writes khala_mirror_cursor")]
    OutboxPermissionDenied { detail: String },
    #[error("the server refused the mirror: {0}")]
    Server(ToolError),
    #[error("stream {stream} stays invisible to the mirror's identity after publishing; reconciliation reads the heads of the streams it may publish, so grant it `publish` on the stream or a prefix of it (see docs/MIRROR.md)")]
    HeadsHidden { stream: String },
    #[error("the mirror's identity {identity} holds no live publish grant on {database}; give it the publisher role and a grant (`khala role --role publisher`, `khala grant --scopes publish --stream 'runtime.*'`), or use the current mirror token")]
    NoPublishGrant { identity: String, database: String },
    #[error("the token is the database owner's ({identity}); run the mirror as a publisher identity with publish grants (`khala up` makes one), or pass --allow-owner")]
    OwnerToken { identity: String },
    #[error("stream={stream} {fields}: the module holds another event at this seq than the authority")]
    AuthorityDivergence { stream: String, fields: String },
    #[error("held streams (the durable cursor stops before their first unpublished event): {}", streams.join("; "))]
    StreamsHeld { streams: Vec<String> },
    #[error("internal: {0}")]
    Internal(String),
}

impl MirrorError {
    /// A stable, machine-readable code for the failure.
    pub fn code(&self) -> &'static str {
        match self {
            MirrorError::Usage(_) => "usage",
            MirrorError::Io { .. } => "io_error",
            MirrorError::CursorMismatch { .. } => "cursor_mismatch",
            MirrorError::CursorCorrupt { .. } => "cursor_corrupt",
            MirrorError::InputChanged { .. } => "input_changed",
            MirrorError::StateLocked { .. } => "state_dir_locked",
            MirrorError::Postgres { .. } => "postgres_error",
            MirrorError::OutboxNotMigrated { .. } => "outbox_not_migrated",
            MirrorError::OutboxSchemaMismatch { .. } => "outbox_schema_mismatch",
            MirrorError::OutboxPermissionDenied { .. } => "outbox_permission_denied",
            MirrorError::Server(e) => e.code(),
            MirrorError::HeadsHidden { .. } => "heads_not_visible",
            MirrorError::NoPublishGrant { .. } => "no_publish_grant",
            MirrorError::OwnerToken { .. } => "owner_token",
            MirrorError::AuthorityDivergence { .. } => "authority_divergence",
            MirrorError::StreamsHeld { .. } => "streams_held",
            MirrorError::Internal(_) => "internal",
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> MirrorError {
        MirrorError::Io { what: what.into(), source }
    }

    pub fn postgres(what: impl Into<String>, detail: impl std::fmt::Display) -> MirrorError {
        MirrorError::Postgres { what: what.into(), detail: detail.to_string() }
    }
}

pub type Result<T, E = MirrorError> = std::result::Result<T, E>;
