//! The client's errors, each with a stable code.

use crate::checkpoint::CheckpointError;
use khala_proto::CodedError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused this client's protocol or build: retrying will not help.
    #[error("{0}")]
    Incompatible(CodedError),
    /// The token was refused.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("subscription failed: {0}")]
    Subscription(String),
    #[error("reading the token: {0}")]
    Token(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Config(String),
    /// The handler could not tell its own cursors ([`crate::Handler::cursors`]).
    #[error("the handler's cursors: {0}")]
    HandlerCursors(String),
    /// A handler that owns its cursors could not persist ([`crate::Handler::persist`]):
    /// what it applied since its last commit may be gone (SQLite rolls a transaction back
    /// by itself on a full disk), so the session ends and the next one resumes from the
    /// handler's cursors, offering those events again.
    #[error("the handler could not persist its effects; resuming from its own cursors")]
    HandlerPersist,
    /// The handler's syncer failed ([`crate::Handler::syncer`]): its commits may not be on
    /// disk, and an fsync tried again can succeed without them (the kernel may have
    /// dropped the pages it could not write), so the client stops rather than retry.
    #[error("the handler's sync failed: {0}")]
    HandlerSync(String),
    /// `run` was called again after it had stopped for a failure retrying cannot fix: that
    /// failure again, by its own code.
    #[error("stopped earlier, for good: {message}")]
    StoppedEarlier { code: &'static str, message: String },
}

impl ClientError {
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::Incompatible(e) => e.code.name(),
            ClientError::Unauthorized(_) => "unauthorized",
            ClientError::Connect(_) => "connect_failed",
            ClientError::Disconnected(_) => "disconnected",
            ClientError::Subscription(_) => "bad_subscription",
            ClientError::Token(_) => "token_unreadable",
            ClientError::Checkpoint(e) => e.code(),
            ClientError::Config(_) => "invalid_argument",
            ClientError::HandlerCursors(_) => "handler_cursors",
            ClientError::HandlerPersist => "handler_persist_failed",
            ClientError::HandlerSync(_) => "handler_sync_failed",
            ClientError::StoppedEarlier { code, .. } => code,
        }
    }

    /// Whether reconnecting could help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unauthorized(_) | ClientError::Connect(_) | ClientError::Disconnected(_) | ClientError::Subscription(_) | ClientError::Token(_) | ClientError::HandlerPersist)
    }
}
