//! Canonical JSON: the byte form of a JSON payload that Khala stores and hashes.
//!
//! Objects have their keys sorted by byte order, there is no insignificant whitespace,
//! strings are written as serde_json writes them, and numbers keep the digits they were
//! written with (serde_json's `arbitrary_precision`, which this crate's `json` feature
//! turns on, so `0.10` stays `0.10` in every build). Two authority events
//! whose payloads are equal as JSON values therefore get the same payload hash.

use serde_json::Value;

/// The canonical bytes of a JSON value.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    // serde_json's `Map` is a `BTreeMap` (the `preserve_order` feature is not enabled in
    // this workspace), so serialising a `Value` writes keys in sorted order.
    serde_json::to_vec(value).expect("a Value always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        let v: Value = serde_json::from_str(r#"{ "b": [1, {"z": null, "a": true}], "a": "x" }"#).unwrap();
        assert_eq!(canonical_json(&v), br#"{"a":"x","b":[1,{"a":true,"z":null}]}"#);
    }

    #[test]
    fn numbers_keep_their_digits() {
        let v: Value = serde_json::from_str(r#"{"a":0.10,"b":12345678901234567890123,"c":-0}"#).unwrap();
        assert_eq!(canonical_json(&v), br#"{"a":0.10,"b":12345678901234567890123,"c":-0}"#);
    }

    #[test]
    fn equal_values_have_equal_bytes() {
        let a: Value = serde_json::from_str(r#"{"x":1,"y":2}"#).unwrap();
        let b: Value = serde_json::from_str("{\"y\":2,\n \"x\":1}").unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
    }
}
