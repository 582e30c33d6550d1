//! Errors of the tools library, each with a stable code for scripts and logs.

use khala_proto::CodedError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToolError {
    #[error("{binary} {version} was not found (looked in {looked_in}); run `khala setup` to install it")]
    EngineMissing { binary: &'static str, version: &'static str, looked_in: String },
    #[error("engine install step failed: {step}: {detail}; rerun `khala setup` (or run the step by hand)")]
    InstallFailed { step: String, detail: String },
    #[error("port {port} on 127.0.0.1 is already in use by another program; pick another with --port or stop that program")]
    PortInUse { port: u16 },
    #[error("{} holds files Khala did not create ({found}); use an empty or new directory with --data-dir", path.display())]
    ForeignDataDir { path: PathBuf, found: String },
    #[error("the server at {url} did not answer within {secs} s; its log is {}", log.display())]
    ServerUnresponsive { url: String, secs: u64, log: PathBuf },
    #[error("the server exited during start-up ({status}); its log is {}:\n{tail}", log.display())]
    ServerExited { status: String, log: PathBuf, tail: String },
    #[error("building the module failed: {0}")]
    ModuleBuild(String),
    #[error("the server refused the new module for database {database}: {detail}; the database's schema or data cannot be updated in place (for a local development database, `khala up --clear` starts it over; its data is lost and the authority can be mirrored again)")]
    ModuleRejected { database: String, detail: String },
    #[error("{what}: {detail}")]
    Http { what: String, detail: String },
    #[error("reducer {reducer} failed: {error}")]
    Reducer { reducer: String, error: CodedError },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl ToolError {
    /// A stable, machine-readable code for the failure.
    pub fn code(&self) -> &'static str {
        match self {
            ToolError::EngineMissing { .. } => "engine_missing",
            ToolError::InstallFailed { .. } => "install_failed",
            ToolError::PortInUse { .. } => "port_in_use",
            ToolError::ForeignDataDir { .. } => "foreign_data_dir",
            ToolError::ServerUnresponsive { .. } => "server_unresponsive",
            ToolError::ServerExited { .. } => "server_exited",
            ToolError::ModuleBuild(_) => "module_build_failed",
            ToolError::ModuleRejected { .. } => "module_rejected",
            ToolError::Http { .. } => "http_error",
            ToolError::Reducer { error, .. } => error.code.name(),
            ToolError::Io { .. } => "io_error",
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> ToolError {
        ToolError::Io { what: what.into(), source }
    }
}

pub type Result<T, E = ToolError> = std::result::Result<T, E>;
