//! Default locations under the user's data directory.

use std::path::PathBuf;

/// `$XDG_DATA_HOME` or `~/.local/share` (the platform's user data dir).
pub fn data_home() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".khala-data"))
}

/// The default data dir of the local server that `khala up` runs.
pub fn default_server_dir() -> PathBuf {
    data_home().join("khala").join("server")
}

/// The workspace root this binary was built from (to find `module/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}
