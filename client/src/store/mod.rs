//! Local stores that own their cursors: the events and each stream's cursor are committed
//! in one transaction, so a crash loses a whole batch or nothing, and what the client
//! offers again after a restart is exactly what the store does not hold (exactly-once
//! effects). See [`crate::Handler::cursors`].

#[cfg(feature = "sqlite")]
pub mod sqlite;
