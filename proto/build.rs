//! Compiles `khala/sync/v1/*.proto` with protox (pure Rust, no `protoc` needed), and
//! writes each enum's snake_case names (`SnakeName`) from the same descriptors, so no
//! name table is kept by hand.

use std::fmt::Write as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=khala");
    let descriptors = protox::compile(["khala/sync/v1/sync.proto"], ["."])?;
    let mut names = String::new();
    // Only the contract's own files (imports such as google/protobuf/struct.proto come along).
    for file in descriptors.file.iter().filter(|f| f.package() == "khala.sync.v1") {
        if !file.message_type.iter().all(|m| m.enum_type.is_empty()) {
            return Err("nested enums are not named by build.rs; declare enums at the top level".into());
        }
        for e in &file.enum_type {
            let rust = e.name();
            // prost strips the enum's own SCREAMING_SNAKE prefix from its values.
            let prefix = format!("{}_", screaming_snake(rust));
            let snake: Vec<String> = e.value.iter().map(|v| v.name().strip_prefix(&prefix).unwrap_or(v.name()).to_ascii_lowercase()).collect();
            // The variant is prost's UpperCamelCase of the stripped name; a mismatch fails to compile.
            let to_name: String = snake.iter().map(|s| format!("{rust}::{} => {s:?}, ", upper_camel(s))).collect();
            let from_name: String = snake.iter().map(|s| format!("{s:?} => Some({rust}::{}), ", upper_camel(s))).collect();
            writeln!(
                names,
                "impl crate::SnakeName for {rust} {{\n    fn snake_name(self) -> &'static str {{ match self {{ {to_name}}} }}\n    fn from_snake_name(name: &str) -> Option<Self> {{ match name {{ {from_name}_ => None }} }}\n}}"
            )?;
        }
    }
    std::fs::write(std::path::Path::new(&std::env::var("OUT_DIR")?).join("snake_names.rs"), names)?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

/// `stale_cursor` → `StaleCursor`.
fn upper_camel(snake: &str) -> String {
    snake.split('_').map(|w| w[..1].to_ascii_uppercase() + &w[1..]).collect()
}

/// `RebootstrapReason` → `REBOOTSTRAP_REASON`.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
