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
