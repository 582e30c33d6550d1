//! Error codes that cross a boundary, and the `code: message` text convention.
//!
//! Reducers can only fail with a string. Khala writes every reducer error as
//! `<code>: <human message>` with `<code>` the snake_case name of an [`ErrorCode`], so
//! that callers (the mirror, the client, the CLI) can act on the code without parsing prose.

pub use crate::v1::ErrorCode;
use crate::SnakeName;
use std::fmt;

impl ErrorCode {
    /// The stable snake_case name used on the wire, e.g. `payload_too_large`.
    pub fn name(self) -> &'static str {
        self.snake_name()
    }

    /// Parses a snake_case name back into a code (`unspecified` is not one).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::from_snake_name(name).filter(|code| *code != ErrorCode::Unspecified)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error with a stable code and a human message, as carried by reducer errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CodedError {
    pub code: ErrorCode,
    pub message: String,
}

impl CodedError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CodedError { code, message: message.into() }
    }

    /// Parses `code: message`. Text without a known code becomes `internal` with the whole
    /// text as its message, so nothing the server said is lost.
    pub fn parse(text: &str) -> CodedError {
        let text = text.trim();
        if let Some((code, message)) = text.split_once(": ") {
            if let Some(code) = ErrorCode::from_name(code) {
                return CodedError::new(code, message);
            }
        }
        CodedError::new(ErrorCode::Internal, text)
    }

    /// Finds a `code: message` anywhere in a longer text (HTTP bodies and SDK errors wrap
    /// the reducer's message in their own words).
    pub fn find_in(text: &str) -> Option<CodedError> {
        ALL_CODES.iter().find_map(|code| {
            let marker = format!("{}: ", code.name());
            text.find(&marker).map(|at| {
                let rest = &text[at + marker.len()..];
                let message = rest.lines().next().unwrap_or("").trim_end_matches(['"', '}']);
                CodedError::new(*code, message)
            })
        })
    }

    /// Reads `key=value` out of the message, e.g. `expected` in a `sequence_conflict`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.message.split_whitespace().find_map(|word| {
            word.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .map(|v| v.trim_end_matches([',', ';', ':', ')']))
        })
    }

    /// Which event of a batch the error is about: the module writes `event=<index>` in
    /// every per-event refusal (see [`EVENT_FIELD`]).
    pub fn event_index(&self) -> Option<usize> {
        self.field(EVENT_FIELD)?.parse().ok()
    }
}

/// The field naming the batch index of the event a reducer error is about (`event=3`).
pub const EVENT_FIELD: &str = "event";

/// Every code a reducer may return, for lookups.
pub const ALL_CODES: [ErrorCode; 18] = [
    ErrorCode::Unauthorized,
    ErrorCode::ForbiddenStream,
    ErrorCode::BadSubscription,
    ErrorCode::StaleCursor,
    ErrorCode::PayloadTooLarge,
    ErrorCode::SequenceConflict,
    ErrorCode::IdempotencyConflict,
    ErrorCode::ChainMismatch,
    ErrorCode::RateLimited,
    ErrorCode::UnsupportedProtocolVersion,
    ErrorCode::UpgradeRequired,
    ErrorCode::Internal,
    ErrorCode::InvalidArgument,
    ErrorCode::AckBeyondHead,
    ErrorCode::UnknownStream,
    ErrorCode::BatchTooLarge,
    ErrorCode::SlowConsumer,
    ErrorCode::AuthorityDivergence,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_proto_enum() {
        for code in ALL_CODES {
            let proto = code.as_str_name().strip_prefix("ERROR_CODE_").unwrap().to_ascii_lowercase();
            assert_eq!(code.name(), proto);
            assert_eq!(ErrorCode::from_name(code.name()), Some(code));
        }
        // Every proto value except UNSPECIFIED is listed in ALL_CODES.
        let listed = (1..64).filter(|n| ErrorCode::try_from(*n).is_ok()).count();
        assert_eq!(listed, ALL_CODES.len());
    }

    #[test]
    fn parses_code_and_fields() {
        let e = CodedError::parse("sequence_conflict: stream s expected=5 actual=9");
        assert_eq!(e.code, ErrorCode::SequenceConflict);
        assert_eq!(e.field("expected"), Some("5"));
        assert_eq!(e.field("actual"), Some("9"));
        let e = CodedError::parse("idempotency_conflict: event=3: key k was published at seq=9 with another payload");
        assert_eq!(e.event_index(), Some(3));
        assert_eq!(e.field("seq"), Some("9"));
        assert_eq!(CodedError::parse("payload_too_large: event=12 (key k) has 9 bytes").event_index(), Some(12));
        // Prose is not a field.
        assert_eq!(CodedError::parse("invalid_argument: event 4 is odd").event_index(), None);
        assert_eq!(CodedError::parse("boom").code, ErrorCode::Internal);
        assert_eq!(CodedError::parse("nope: x").message, "nope: x");
    }

    #[test]
    fn finds_a_code_inside_a_wrapping_text() {
        let e = CodedError::find_in("HTTP 530: The reducer failed: forbidden_stream: no grant on s").unwrap();
        assert_eq!(e.code, ErrorCode::ForbiddenStream);
        assert_eq!(e.message, "no grant on s");
        assert!(CodedError::find_in("all good").is_none());
    }

    #[test]
    fn display_round_trips() {
        let e = CodedError::new(ErrorCode::PayloadTooLarge, "event 3 is 9 bytes, limit 8");
        assert_eq!(CodedError::parse(&e.to_string()), e);
    }
}
