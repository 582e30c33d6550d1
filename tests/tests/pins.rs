//! Every `spacetimedb*` crate in `Cargo.lock` is at 1.2.0: the server here is 1.2.0, and
//! `spacetimedb = "=1.2.0"` alone lets its own dependencies drift to newer 1.x releases.

#[test]
fn every_spacetimedb_crate_is_pinned_to_1_2_0() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let mut seen = 0;
    let mut drift = Vec::new();
    let mut name = "";
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = n.trim_matches('"');
        } else if let Some(v) = line.strip_prefix("version = ") {
            if name.starts_with("spacetimedb") {
                seen += 1;
                if v.trim_matches('"') != khala_tools::engine::ENGINE_VERSION {
                    drift.push(format!("{name} {v}"));
                }
            }
        }
    }
    assert!(seen >= 2, "Cargo.lock lists no spacetimedb crates at all");
    assert!(drift.is_empty(), "spacetimedb crates not at 1.2.0: {drift:?}");
}

/// tungstenite, the SDK's WebSocket library, is built once, from the patched copy in
/// `vendor/` (vendor/README.md): a registry copy in the lock file means the
/// `[patch.crates-io]` entry stopped applying (for example after the SDK moved to another
/// tungstenite), and every client would again zero-fill megabytes per message.
#[test]
fn tungstenite_is_built_from_the_patched_copy() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let packages: Vec<&str> = lock.split("[[package]]").filter(|p| p.contains("\nname = \"tungstenite\"\n")).collect();
    assert_eq!(packages.len(), 1, "one tungstenite in Cargo.lock, found: {packages:?}");
    assert!(packages[0].contains("\nversion = \"0.26.2\"\n"), "tungstenite is not 0.26.2: {}", packages[0]);
    assert!(!packages[0].contains("\nsource = "), "tungstenite comes from a registry, not vendor/tungstenite: {}", packages[0]);
}
