//! The envvars file `khala up` writes and the other commands read: `KEY=value` lines,
//! also loadable by a shell (`set -a; . khala.env`).

use crate::error::{Result, ToolError};
use std::path::Path;

pub const SERVER_URL: &str = "KHALA_SERVER_URL";
pub const DATABASE: &str = "KHALA_DATABASE";
pub const TOKEN_FILE: &str = "KHALA_TOKEN_FILE";
pub const DATA_DIR: &str = "KHALA_DATA_DIR";
/// The runtime mirror's token: a publisher identity with publish grants, not the owner.
pub const MIRROR_TOKEN_FILE: &str = "KHALA_MIRROR_TOKEN_FILE";

/// Writes `pairs` as `KEY=value` lines, replacing the file atomically.
pub fn write(path: &Path, pairs: &[(&str, String)]) -> Result<()> {
    let mut text = String::from("# Written by `khala up`; read by the other khala commands.\n");
    for (key, value) in pairs {
        text.push_str(&format!("{key}={value}\n"));
    }
    let tmp = path.with_extension("env.tmp");
    std::fs::write(&tmp, text).map_err(|e| ToolError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| ToolError::io(format!("writing {}", path.display()), e))
}

/// Parses `KEY=value` lines; blank lines and `#` comments are skipped, and `${VAR}`
/// in a value is replaced by that environment variable (as a shell would).
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), expand(v.trim()))))
        .collect()
}

fn expand(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start..].find('}') else { break };
        out.push_str(&rest[..start]);
        out.push_str(&std::env::var(&rest[start + 2..start + len]).unwrap_or_default());
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// Sets each variable of the file that is not already set in the environment, so that
/// explicit settings win over the file. A missing file is not an error.
pub fn load_defaults(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else { return };
    for (key, value) in parse(&text) {
        if std::env::var_os(&key).is_none() {
            // SAFETY: called at start-up, before any other thread exists.
            unsafe { std::env::set_var(key, value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.env");
        write(&path, &[(SERVER_URL, "http://127.0.0.1:1".into()), (DATABASE, "db".into())]).unwrap();
        let pairs = parse(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(pairs, vec![(SERVER_URL.into(), "http://127.0.0.1:1".into()), (DATABASE.into(), "db".into())]);
    }

    #[test]
    fn expands_variables_like_a_shell() {
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(parse("A=${HOME}/x"), vec![("A".to_string(), format!("{home}/x"))]);
        assert_eq!(parse("B=${KHALA_SURELY_UNSET_VAR}y"), vec![("B".to_string(), "y".to_string())]);
        assert_eq!(parse("C=${open"), vec![("C".to_string(), "${open".to_string())]);
    }
}
