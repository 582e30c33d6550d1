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
    /// A request that got no usable answer (network, timeout, unreadable reply).
    #[error("{what}: {detail}")]
    Http { what: String, detail: String },
    /// The server answered with a failing HTTP status: callers decide on `status`, not on
    /// the text (which reads `HTTP 404 Not Found: <body>`, as before the field existed).
    #[error("{what}: HTTP {}: {body}", status_line(*status))]
    HttpStatus { what: String, status: u16, body: String },
    #[error("reducer {reducer} failed: {error}")]
    Reducer { reducer: String, error: CodedError },
    /// The cause is part of the message and deliberately not a `source()`, so that an
    /// error chain printed with `{:#}` says it once.
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    /// A command refusing or failing for a reason of its own, with its stable code.
    #[error("{detail}")]
    Command { code: &'static str, detail: String },
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
            ToolError::Http { .. } | ToolError::HttpStatus { .. } => "http_error",
            ToolError::Reducer { error, .. } => error.code.name(),
            ToolError::Io { .. } => "io_error",
            ToolError::Command { code, .. } => code,
        }
    }

    /// The HTTP status the server answered with, if it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            ToolError::HttpStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> ToolError {
        ToolError::Io { what: what.into(), cause: source }
    }
}

/// `404 Not Found`, as reqwest writes a status.
fn status_line(status: u16) -> String {
    reqwest::StatusCode::from_u16(status).map(|s| s.to_string()).unwrap_or_else(|_| status.to_string())
}

pub type Result<T, E = ToolError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_a_field_and_the_text_is_unchanged() {
        let e = ToolError::HttpStatus { what: "calling publish on db".into(), status: 404, body: "no such database".into() };
        assert_eq!(e.http_status(), Some(404));
        assert_eq!(e.code(), "http_error");
        assert_eq!(e.to_string(), "calling publish on db: HTTP 404 Not Found: no such database");
        let e = ToolError::Http { what: "calling publish".into(), detail: "connection refused".into() };
        assert_eq!(e.http_status(), None);
    }
}
