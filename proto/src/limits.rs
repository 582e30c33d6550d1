//! The contract's size and shape limits, in one place: the module enforces them, the
//! mirror and the tools check events against them before sending (so a refusal is caught
//! where the event is read, not after a round trip).

/// Longest stream id, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 128;
/// Longest idempotency key of one event, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Longest event kind, in bytes.
pub const MAX_KIND_LEN: usize = 128;
/// The module's default largest payload of one event (256 KiB); `set_limits` changes it
/// per database.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 256 * 1024;

/// Whether `b` may appear in a stream id: `[A-Za-z0-9._:-]` (safe in file names, logs
/// and SQL literals).
pub fn stream_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._:-".contains(&b)
}

/// The stream id rule: 1..=[`MAX_STREAM_ID_LEN`] bytes of [`stream_id_byte`]s, starting
/// with a letter or digit.
pub fn valid_stream_id(stream_id: &str) -> bool {
    let bytes = stream_id.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_STREAM_ID_LEN && bytes[0].is_ascii_alphanumeric() && bytes.iter().all(|b| stream_id_byte(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_id_rule() {
        assert!(valid_stream_id("runtime.run.1:events-x_y"));
        assert!(valid_stream_id(&"a".repeat(MAX_STREAM_ID_LEN)));
        assert!(!valid_stream_id(&"a".repeat(MAX_STREAM_ID_LEN + 1)));
        assert!(!valid_stream_id(""));
        assert!(!valid_stream_id(".starts-with-a-dot"));
        assert!(!valid_stream_id("has space"));
        assert!(!valid_stream_id("quote'"));
        assert_eq!(DEFAULT_MAX_PAYLOAD_BYTES, 262_144);
    }
}
