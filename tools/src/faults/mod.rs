//! Fault injection and the drills of `khala chaos` (docs/RELIABILITY.md): a loopback
//! TCP proxy with seeded per-connection faults ([`proxy`], [`plan`]), the processes a
//! drill runs ([`rig`]), the history check every drill ends with ([`history`]) and the
//! drills themselves ([`drills`]).

pub mod drills;
pub mod history;
pub mod plan;
pub mod proxy;
pub mod rig;

pub use plan::{ConnFault, FaultKind, FaultPlan};
pub use proxy::{FaultCounters, Proxy};

use crate::ToolError;

/// Why a drill could not run to its checks (a failed check is a problem in its
/// [`drills::DrillRun`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("waited {secs} s for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Process(String),
}

impl DrillError {
    /// A stable, machine-readable code for the failure.
    pub fn code(&self) -> &'static str {
        match self {
            DrillError::Tool(e) => e.code(),
            DrillError::Io { .. } => "io_error",
            DrillError::Timeout { .. } => "drill_timeout",
            DrillError::Process(_) => "drill_process_failed",
        }
    }
}
