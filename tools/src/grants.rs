//! Admin steps the commands share: making an identity a publisher of some streams.

use crate::api::{identity_arg, Api};
use crate::error::Result;
use serde_json::json;

/// The longest lease the module allows (366 days): for standing identities such as the
/// mirror's, renewed by every `khala up`.
pub const STANDING_TTL_SECS: u64 = 366 * 24 * 3600;

/// The stream prefix the default topic mapping puts every authority stream under, and so
/// what the runtime mirror is granted.
pub const MIRROR_PATTERN: &str = "runtime.*";

/// Gives `identity` (hex) the `publisher` role and a publish grant on each of `patterns`
/// (stream ids, or prefixes ending in `*`) for `ttl_secs`, acting as the admin `token`.
pub fn make_publisher(api: &Api, database: &str, token: &str, identity: &str, patterns: &[&str], ttl_secs: u64) -> Result<()> {
    api.call(database, "set_role", json!([identity_arg(identity), "publisher", true]), token)?;
    for pattern in patterns {
        api.call(database, "grant", json!([identity_arg(identity), pattern, ["publish"], ttl_secs]), token)?;
    }
    Ok(())
}
