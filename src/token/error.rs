//! Why a network token was rejected.

use std::fmt;

/// Why a network token could not be decoded or failed validation.
///
/// Every variant names exactly what is wrong, and never carries a secret value (key, room,
/// rendezvous or mDNS string), so the error can be logged as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// The token text is longer than [`MAX_TOKEN_LEN`](super::MAX_TOKEN_LEN) bytes.
    TooLong {
        /// Length of the text that was given, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The token text is empty or only whitespace.
    Blank,
    /// The token is not standard base64 (the decoder's message).
    NotBase64(String),
    /// The base64 payload is not a YAML document (serde_yaml's message).
    NotYaml(String),
    /// The YAML document is over the token's budget (aliases expanded, nesting depth): an alias
    /// bomb or a deeply nested document, refused before it is loaded.
    OverBudget(crate::config::budget::BudgetError),
    /// The YAML document is not a mapping; holds what was found instead (e.g. "a string").
    NotMapping(&'static str),
    /// A required field is absent or null; holds its dotted path, e.g. `otp.crypto.key`.
    Missing(&'static str),
    /// A field has a value of the wrong YAML type.
    WrongType {
        /// Dotted path of the field.
        field: &'static str,
        /// The type the field must have, e.g. "an integer".
        expected: &'static str,
        /// The type that was found, e.g. "a string".
        found: &'static str,
    },
    /// A string field is empty.
    EmptyField(&'static str),
    /// An integer field is outside its allowed range.
    OutOfRange {
        /// Dotted path of the field.
        field: &'static str,
        /// The value found (integers in a token are never secret).
        value: i128,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { len, max } => {
                write!(f, "network token is too long: {len} bytes, at most {max}")
            }
            Self::Blank => f.write_str("network token is empty"),
            Self::NotBase64(msg) => write!(f, "network token is not valid base64: {msg}"),
            Self::NotYaml(msg) => write!(f, "network token does not hold valid YAML: {msg}"),
            Self::OverBudget(e) => write!(f, "network token YAML is not accepted: {e}"),
            Self::NotMapping(found) => {
                write!(f, "network token YAML is not a mapping (found {found})")
            }
            Self::Missing(field) => write!(f, "network token: {field} is missing"),
            Self::WrongType {
                field,
                expected,
                found,
            } => write!(
                f,
                "network token: {field} must be {expected}, found {found}"
            ),
            Self::EmptyField(field) => write!(f, "network token: {field} is empty"),
            Self::OutOfRange {
                field,
                value,
                min,
                max,
            } => write!(
                f,
                "network token: {field} is {value}, must be in {min}..={max}"
            ),
        }
    }
}

impl std::error::Error for TokenError {}
