//! Canonical JSON: the byte form of a JSON payload that Khala stores and hashes.
//!
//! Objects have their keys sorted by byte order, there is no insignificant whitespace,
//! strings are written as serde_json writes them, and numbers keep the digits they were
//! written with (serde_json's `arbitrary_precision`, which this crate's `json` feature
//! turns on, so `0.10` stays `0.10` in every build). Two authority events
//! whose payloads are equal as JSON values therefore get the same payload hash.

use serde_json::value::RawValue;
use serde_json::Value;

/// The canonical bytes of a JSON value.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    // serde_json's `Map` is a `BTreeMap` (the `preserve_order` feature is not enabled in
    // this workspace), so serialising a `Value` writes keys in sorted order.
    serde_json::to_vec(value).expect("a Value always serialises")
}

/// The canonical bytes of one JSON value as it was written (`RawValue`: text that
/// serde_json has checked is valid JSON).
///
/// When `raw` is already canonical, which it is whenever the authority writes canonical
/// JSON, it is copied as it is: no `Value` tree is built and nothing is written again
/// (that pass was about a fifth of the mirror's CPU). Otherwise only the parts that are
/// not canonical are rewritten: objects have their members sorted by key and arrays
/// their separators tightened, each member is copied as written when it is canonical, and
/// only what is neither (a key with an escape, a `\u` escape, `1E3`) takes the full pass
/// through `Value`. That is the shape of text Postgres writes for `jsonb` (a space after
/// each `:` and `,`, keys by length before bytes). The result is [`canonical_json`] of
/// the value either way; the error is serde_json's (a value nested deeper than it reads).
pub fn canonicalize(raw: &RawValue) -> serde_json::Result<Vec<u8>> {
    let text = raw.get();
    let full_pass = || Ok(canonical_json(&serde_json::from_str(text)?));
    // serde_json reads an object whose one key is one of its private markers as something
    // else (with `arbitrary_precision`, `{"$serde_json::private::Number":"1"}` is the
    // number 1), and only its full pass knows that.
    if names_a_private_marker(text.as_bytes()) {
        return full_pass();
    }
    if is_canonical(text.as_bytes()) {
        return Ok(text.as_bytes().to_vec());
    }
    // The rewrite reads each level anew, so it would never meet serde_json's depth limit:
    // deep text takes the full pass, and fails where it fails.
    if nesting(text.as_bytes()) > MAX_SCAN_DEPTH {
        return full_pass();
    }
    let mut out = Vec::with_capacity(text.len());
    rewrite(raw, &mut out, 0)?;
    Ok(out)
}

/// Whether `text` holds serde_json's private marker prefix (almost never: a `$` first).
fn names_a_private_marker(text: &[u8]) -> bool {
    static MARKER: std::sync::LazyLock<memchr::memmem::Finder<'static>> = std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"$serde_json::private::"));
    memchr::memchr(b'$', text).is_some() && MARKER.find(text).is_some()
}

/// The deepest nesting of arrays and objects in `text` (valid JSON); strings are skipped.
fn nesting(text: &[u8]) -> usize {
    let (mut depth, mut deepest, mut at) = (0usize, 0usize, 0usize);
    while at < text.len() {
        match text[at] {
            b'"' => loop {
                at += 1;
                match memchr::memchr2(b'"', b'\\', &text[at..]) {
                    Some(i) if text[at + i] == b'\\' => at += i + 1,
                    Some(i) => {
                        at += i;
                        break;
                    }
                    None => return deepest,
                }
            },
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    deepest
}

/// Deeper than this, [`rewrite`] hands the rest of a value to the full pass (each level
/// reads its subtree once more).
const MAX_REWRITE_DEPTH: usize = 8;

/// An object's members in the order written, borrowed: a key with an escape cannot be
/// borrowed, and fails to read.
struct Members<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members<'a>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<&'a str, &'a RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// Appends the canonical bytes of `raw`, which [`is_canonical`] may have refused.
fn rewrite(raw: &RawValue, out: &mut Vec<u8>, depth: usize) -> serde_json::Result<()> {
    let text = raw.get();
    if is_canonical(text.as_bytes()) {
        out.extend_from_slice(text.as_bytes());
        return Ok(());
    }
    let full_pass = |out: &mut Vec<u8>| -> serde_json::Result<()> {
        serde_json::to_writer(out, &serde_json::from_str::<Value>(text)?)
    };
    if depth >= MAX_REWRITE_DEPTH {
        return full_pass(out);
    }
    match text.as_bytes().first() {
        Some(b'{') => {
            // Borrowed keys are keys written without an escape, so they are written back
            // as they are; a key with one fails to borrow and the object takes the full
            // pass. So does an object with a key twice: `Value` keeps the last, and only
            // the full pass checks the values it drops.
            let Ok(Members(mut members)) = serde_json::from_str::<Members>(text) else { return full_pass(out) };
            members.sort_by(|a, b| a.0.cmp(b.0));
            if members.windows(2).any(|pair| pair[0].0 == pair[1].0) {
                return full_pass(out);
            }
            out.push(b'{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
                rewrite(value, out, depth + 1)?;
            }
            out.push(b'}');
            Ok(())
        }
        Some(b'[') => {
            let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) else { return full_pass(out) };
            out.push(b'[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                rewrite(item, out, depth + 1)?;
            }
            out.push(b']');
            Ok(())
        }
        _ => full_pass(out),
    }
}

/// Whether `text`, valid JSON, is exactly what [`canonical_json`] writes for its value.
/// (On text that is not valid JSON the answer means nothing: raw control characters in
/// strings, for one, are not looked for.)
///
/// Conservative: it may answer `false` for canonical text (an escape in a key, a `\u`
/// escape, deep nesting), which costs only the full pass, but never `true` for text that
/// differs from the canonical form. It accepts: no whitespace, object keys in strictly
/// increasing byte order, strings whose only escapes are the seven that serde_json writes
/// (`\"` `\\` `\b` `\f` `\n` `\r` `\t`), and any number (numbers keep their digits).
pub fn is_canonical(text: &[u8]) -> bool {
    let mut scan = Scan { text, at: 0 };
    scan.value(0) && scan.at == text.len()
}

/// Deeper than this, [`is_canonical`] says `false` (serde_json itself refuses depth 128).
const MAX_SCAN_DEPTH: usize = 100;

/// A cursor over JSON text for [`is_canonical`].
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let ate = self.peek() == Some(byte);
        self.at += usize::from(ate);
        ate
    }

    fn value(&mut self, depth: usize) -> bool {
        if depth > MAX_SCAN_DEPTH {
            return false;
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().is_some(),
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => false,
        }
    }

    fn word(&mut self, word: &[u8]) -> bool {
        let found = self.text[self.at..].starts_with(word);
        if found {
            self.at += word.len();
        }
        found
    }

    fn object(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b'}') {
            return true;
        }
        let mut previous: Option<&[u8]> = None;
        loop {
            // Keys compare as written only when they hold no escape.
            let Some(key) = self.string().filter(|key| !key.contains(&b'\\')) else { return false };
            if previous.is_some_and(|previous| previous >= key) {
                return false;
            }
            previous = Some(key);
            if !self.eat(b':') || !self.value(depth + 1) {
                return false;
            }
            if self.eat(b'}') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    fn array(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b']') {
            return true;
        }
        loop {
            if !self.value(depth + 1) {
                return false;
            }
            if self.eat(b']') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    /// A string in canonical form: its bytes between the quotes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let text = self.text;
        if text.get(self.at) != Some(&b'"') {
            return None;
        }
        let start = self.at + 1;
        let mut at = start;
        // Valid JSON has no raw control character in a string, so only quotes and
        // backslashes need finding (memchr: strings are most of a payload's bytes).
        loop {
            at += memchr::memchr2(b'"', b'\\', &text[at..])?;
            if text[at] == b'"' {
                break;
            }
            match text.get(at + 1)? {
                b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
                _ => return None,
            }
        }
        self.at = at + 1;
        Some(&text[start..at])
    }

    /// A number as JSON's grammar allows it (numbers are kept as written).
    fn number(&mut self) -> bool {
        fn digits(scan: &mut Scan) -> bool {
            let start = scan.at;
            while scan.peek().is_some_and(|b| b.is_ascii_digit()) {
                scan.at += 1;
            }
            scan.at > start
        }
        self.eat(b'-');
        if self.eat(b'0') {
            if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                return false;
            }
        } else if !digits(self) {
            return false;
        }
        if self.eat(b'.') && !digits(self) {
            return false;
        }
        // serde_json writes an exponent as `e` and a sign (`1E3` becomes `1e+3`).
        if self.eat(b'e') {
            return (self.eat(b'+') || self.eat(b'-')) && digits(self);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`canonicalize`] of JSON text.
    fn canon(text: &str) -> serde_json::Result<Vec<u8>> {
        canonicalize(&serde_json::from_str::<Box<RawValue>>(text)?)
    }

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
    fn canonical_text_is_recognised_and_kept() {
        for text in [
            r#"{"a":"x","b":[1,{"a":true,"z":null}]}"#,
            r#"{"i":17,"pad":"Zk-_9a"}"#,
            r#"{"":0,"a":-0.10e+5,"b":1e-3,"c":"q\"\\\n\t\r\b\f"}"#,
            "[\"é\",[],{},\"\u{7f}\"]",
            "12345678901234567890123",
            r#""plain""#,
            "null",
        ] {
            assert!(is_canonical(text.as_bytes()), "{text}");
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(canonical_json(&value), text.as_bytes(), "{text}");
            assert_eq!(canon(text).unwrap(), text.as_bytes());
        }
    }

    #[test]
    fn other_text_takes_the_full_pass() {
        for (text, canonical) in [
            (r#"{"b":1,"a":2}"#, r#"{"a":2,"b":1}"#),
            (r#"{"a":1,"a":2}"#, r#"{"a":2}"#),
            (r#"{ "a":1}"#, r#"{"a":1}"#),
            (r#"["\/","\u0041"]"#, r#"["/","A"]"#),
            (r#"{"\n":1,"a":2}"#, r#"{"\n":1,"a":2}"#),
            ("[\n1]", "[1]"),
            ("[1E3,1e3]", "[1e+3,1e+3]"),
        ] {
            assert!(!is_canonical(text.as_bytes()), "{text}");
            assert_eq!(canon(text).unwrap(), canonical.as_bytes(), "{text}");
        }
        let deep = format!("{}{}", "[".repeat(120), "]".repeat(120));
        assert!(!is_canonical(deep.as_bytes()), "deeper than the scan goes");
        assert_eq!(canon(&deep).unwrap(), deep.as_bytes());
        let deeper = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(canon(&deeper).is_err(), "serde_json's own depth limit still holds");
    }

    #[test]
    fn jsonb_text_gets_the_canonical_bytes() {
        for (text, canonical) in [
            (r#"{"s": 1, "t": 0, "pad": "xx"}"#, r#"{"pad":"xx","s":1,"t":0}"#),
            (r#"[1, {"b": [true, null], "a": "\u0041"}]"#, r#"[1,{"a":"A","b":[true,null]}]"#),
            (r#"{"b": {"z": 1, "z": 2}, "\n": 0}"#, r#"{"\n":0,"b":{"z":2}}"#),
            (r#"{"b": 1, "a": {"k\"": 1E3, "j": 0.10}}"#, r#"{"a":{"j":0.10,"k\"":1e+3},"b":1}"#),
        ] {
            assert_eq!(String::from_utf8(canon(text).unwrap()).unwrap(), canonical, "{text}");
        }
        let deep = format!("{}{}", "[ ".repeat(120), "]".repeat(120));
        assert_eq!(canon(&deep).unwrap(), format!("{}{}", "[".repeat(120), "]".repeat(120)).as_bytes());
    }

    /// `canonicalize` agrees with the full pass: the same bytes, or both an error.
    fn agrees_with_the_full_pass(text: &str) {
        let full = serde_json::from_str::<Value>(text).map(|v| canonical_json(&v));
        // A `RawValue` reads what `ignore_value` accepts, which the full pass may refuse.
        let Ok(raw) = serde_json::from_str::<&RawValue>(text) else { return assert!(full.is_err(), "{text}") };
        match (canonicalize(raw), full) {
            (Ok(ours), Ok(full)) => assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(full).unwrap(), "{text}"),
            (Err(_), Err(_)) => {}
            (ours, full) => panic!("{text:.80}: canonicalize {:?}, the full pass {:?}", ours.map(String::from_utf8), full.map(String::from_utf8)),
        }
    }

    #[test]
    fn the_rewrite_fails_where_the_full_pass_fails() {
        for depth in [99, 100, 101, 127, 128, 129, 136] {
            agrees_with_the_full_pass(&format!("{}{}", "[ ".repeat(depth), "]".repeat(depth)));
            agrees_with_the_full_pass(&format!("{}1{}", "{\"a\": ".repeat(depth), "}".repeat(depth)));
        }
        for text in [
            // A key twice: `Value` keeps the last, but the first must still be readable.
            r#"{"a": "\ud800", "a": 1}"#,
            r#"{"b": 1, "a": 2, "a": 3}"#,
            &format!(r#"{{"a": {}{}, "a": 0}}"#, "[".repeat(200), "]".repeat(200)),
            // serde_json's private markers mean something else to `Value`.
            r#"{"$serde_json::private::Number": "1"}"#,
            r#"{"$serde_json::private::Number":"1"}"#,
            r#"{"$serde_json::private::Number": "x"}"#,
            r#"{"$serde_json::private::RawValue": "[1]"}"#,
            r#"[{"k": "a \"quoted\" [not a bracket"}, {"z": 1, "y": [2]}]"#,
        ] {
            agrees_with_the_full_pass(text);
        }
    }

    #[test]
    fn equal_values_have_equal_bytes() {
        let a: Value = serde_json::from_str(r#"{"x":1,"y":2}"#).unwrap();
        let b: Value = serde_json::from_str("{\"y\":2,\n \"x\":1}").unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON values whose keys, strings and numbers exercise the scan: escapes, control
        /// and non-ASCII characters, and every shape of number.
        fn json() -> impl Strategy<Value = Value> {
            let number = r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?".prop_map(|n| serde_json::from_str::<Value>(&n).unwrap());
            let text = "[a-c\"\\\\\u{0}-\u{1f}\u{7f}é/ ]{0,6}";
            let leaf = prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), number, text.prop_map(Value::String)];
            leaf.prop_recursive(4, 48, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(text, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// How [`respelled`] writes a value.
        #[derive(Clone, Copy, Debug)]
        enum Spelling {
            Pretty,
            KeysReversed,
            /// As Postgres writes `jsonb`: `": "` and `", "`, keys shortest first.
            Jsonb,
        }

        fn spelling() -> impl Strategy<Value = Spelling> {
            prop_oneof![Just(Spelling::Pretty), Just(Spelling::KeysReversed), Just(Spelling::Jsonb)]
        }

        /// `value` spelled another way.
        fn respelled(value: &Value, spelling: Spelling) -> String {
            let (colon, comma) = match spelling {
                Spelling::Pretty => return serde_json::to_string_pretty(value).unwrap(),
                Spelling::KeysReversed => (":", ","),
                Spelling::Jsonb => (": ", ", "),
            };
            match value {
                Value::Object(map) => {
                    let mut members: Vec<(&String, &Value)> = map.iter().rev().collect();
                    if let Spelling::Jsonb = spelling {
                        members.sort_by(|(a, _), (b, _)| (a.len(), a).cmp(&(b.len(), b)));
                    }
                    let fields: Vec<String> = members.into_iter().map(|(k, v)| format!("{}{colon}{}", Value::String(k.clone()), respelled(v, spelling))).collect();
                    format!("{{{}}}", fields.join(comma))
                }
                Value::Array(items) => format!("[{}]", items.iter().map(|v| respelled(v, spelling)).collect::<Vec<_>>().join(comma)),
                other => other.to_string(),
            }
        }

        /// Whether some key anywhere in `value` is written with an escape.
        fn escaped_key(value: &Value) -> bool {
            match value {
                Value::Object(map) => map.iter().any(|(k, v)| Value::String(k.clone()).to_string().contains('\\') || escaped_key(v)),
                Value::Array(items) => items.iter().any(escaped_key),
                _ => false,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// The fast path is never wrong: however a value is spelled, the result is the
            /// value's canonical bytes.
            #[test]
            fn canonicalize_gives_the_canonical_bytes(value in json(), spelling in spelling()) {
                let canonical = canonical_json(&value);
                let other = respelled(&value, spelling);
                prop_assert_eq!(canon(&other).unwrap(), canonical.clone());
                if is_canonical(other.as_bytes()) {
                    prop_assert_eq!(other.as_bytes(), canonical.as_slice());
                }
            }

            /// A number the scan accepts is a number serde_json writes as it was written.
            #[test]
            fn accepted_numbers_are_kept_as_written(text in r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?") {
                if is_canonical(text.as_bytes()) {
                    prop_assert_eq!(canonical_json(&serde_json::from_str(&text).unwrap()), text.as_bytes());
                }
                prop_assert_eq!(canon(&text).unwrap(), canonical_json(&serde_json::from_str(&text).unwrap()));
            }

            /// And canonical text takes it, unless a key holds an escape or a string a `\u`.
            #[test]
            fn canonical_text_takes_the_fast_path(value in json()) {
                let text = String::from_utf8(canonical_json(&value)).unwrap();
                let slow = text.contains("\\u") || escaped_key(&value);
                prop_assert_eq!(is_canonical(text.as_bytes()), !slow, "{}", text);
                prop_assert_eq!(canon(&text).unwrap(), text.as_bytes());
            }
        }
    }
}
