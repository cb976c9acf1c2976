//! The edgevpn/Kairos network token and the key schedule derived from it.
//!
//! A token is standard base64 of a YAML document (edgevpn's connection data). [`NetworkToken`]
//! decodes, validates, encodes (byte-compatible with edgevpn) and generates tokens;
//! [`KeySchedule`] derives every secret the other layers need from it.
//!
//! Secrets never reach logs: `Debug` of every type here redacts keys, room, rendezvous and mDNS
//! strings, and [`TokenError`] never echoes a value of those fields.

mod emit;
mod error;
mod keys;
mod parse;
mod random;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::config::budget;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

pub use error::TokenError;
pub use keys::{KeySchedule, Window, accepted_windows, window_at};

/// Rotation interval meaning "never rotate" (`i64::MAX` seconds, as Kairos' `generate-token`
/// writes): the default, because boards without an RTC boot with a wrong clock.
pub const NEVER_ROTATE: u64 = i64::MAX as u64;

/// Largest accepted rotation interval in seconds (edgevpn reads it into a Go `int`).
pub const MAX_INTERVAL: u64 = NEVER_ROTATE;

/// Largest accepted OTP `length` (generators use 32 or 43).
pub const MAX_OTP_LENGTH: u32 = 1024;

/// Largest accepted `max_message_size`, in bytes (1 GiB).
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 1 << 30;

/// edgevpn's default `max_message_size` (20 MiB), used for generated tokens.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 20 * 1024 * 1024;

/// Largest accepted token text, in bytes (checked before any decoding).
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Length of generated keys, room, rendezvous and mDNS strings, and generated OTP `length`.
pub const GENERATED_LEN: usize = 43;

/// Base64 engine: standard alphabet, emits padding, accepts input with or without padding and
/// with non-zero trailing bits (as Go's `StdEncoding` does).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// An edgevpn/Kairos network token: the shared secret of one overlay network.
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkToken {
    /// The two rotating-secret streams.
    pub otp: Otp,
    /// Secret room name (edgevpn's gossip room).
    pub room: String,
    /// Secret DHT rendezvous string.
    pub rendezvous: String,
    /// Secret mDNS service name.
    pub mdns: String,
    /// Largest message edgevpn accepts, in bytes.
    pub max_message_size: u64,
}

/// The OTP section of a token.
#[derive(Clone, PartialEq, Eq)]
pub struct Otp {
    /// Stream used for DHT rendezvous.
    pub dht: OtpParams,
    /// Stream used for encryption.
    pub crypto: OtpParams,
}

/// One rotating-secret stream.
#[derive(Clone, PartialEq, Eq)]
pub struct OtpParams {
    /// Rotation interval in seconds; [`NEVER_ROTATE`] means never.
    pub interval: u64,
    /// Secret key of the stream.
    pub key: String,
    /// edgevpn's OTP code length (kept for compatibility; our keys do not depend on it).
    pub length: u32,
}

/// Writes `<redacted>` in place of a secret.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for NetworkToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkToken")
            .field("otp", &self.otp)
            .field("room", &Redacted)
            .field("rendezvous", &Redacted)
            .field("mdns", &Redacted)
            .field("max_message_size", &self.max_message_size)
            .finish()
    }
}

impl fmt::Debug for Otp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Otp")
            .field("dht", &self.dht)
            .field("crypto", &self.crypto)
            .finish()
    }
}

impl fmt::Debug for OtpParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtpParams")
            .field("interval", &self.interval)
            .field("key", &Redacted)
            .field("length", &self.length)
            .finish()
    }
}

impl NetworkToken {
    /// Decodes and validates a token: trims surrounding whitespace, ignores line breaks inside
    /// (as Go's base64 decoder does), accepts base64 with or without padding, then reads the YAML.
    /// Unknown extra YAML fields are ignored (forward compatibility, like edgevpn).
    pub fn decode(text: &str) -> Result<NetworkToken, TokenError> {
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong {
                len: text.len(),
                max: MAX_TOKEN_LEN,
            });
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Blank);
        }
        let compact: Cow<'_, str> = if text.contains(['\r', '\n']) {
            Cow::Owned(text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect())
        } else {
            Cow::Borrowed(text)
        };
        let yaml = BASE64
            .decode(compact.as_bytes())
            .map_err(|e| TokenError::NotBase64(e.to_string()))?;
        budget::check(&yaml, budget::TOKEN_BUDGET).map_err(TokenError::OverBudget)?;
        let doc: serde_yaml::Value =
            serde_yaml::from_slice(&yaml).map_err(|e| TokenError::NotYaml(e.to_string()))?;
        let token = parse::token_from_value(&doc)?;
        token.validate()?;
        Ok(token)
    }

    /// Encodes the token exactly as edgevpn does: standard base64 (with padding) of the YAML
    /// document yaml.v2 emits. Strings that are not plainly safe are double-quoted, so
    /// `decode(encode(t)) == t` for every valid token.
    #[must_use]
    pub fn encode(&self) -> String {
        BASE64.encode(emit::token_yaml(self))
    }

    /// Checks every field range: intervals in `1..=MAX_INTERVAL`, lengths in
    /// `1..=MAX_OTP_LENGTH`, non-empty strings, `max_message_size` in
    /// `1..=MAX_MESSAGE_SIZE_LIMIT`. [`decode`](Self::decode) always runs it.
    pub fn validate(&self) -> Result<(), TokenError> {
        for (p, interval, key, length) in [
            (
                &self.otp.dht,
                "otp.dht.interval",
                "otp.dht.key",
                "otp.dht.length",
            ),
            (
                &self.otp.crypto,
                "otp.crypto.interval",
                "otp.crypto.key",
                "otp.crypto.length",
            ),
        ] {
            check_range(interval, i128::from(p.interval), 1, MAX_INTERVAL)?;
            non_empty(key, &p.key)?;
            check_range(length, i128::from(p.length), 1, u64::from(MAX_OTP_LENGTH))?;
        }
        non_empty("room", &self.room)?;
        non_empty("rendezvous", &self.rendezvous)?;
        non_empty("mdns", &self.mdns)?;
        check_range(
            "max_message_size",
            i128::from(self.max_message_size),
            1,
            MAX_MESSAGE_SIZE_LIMIT,
        )?;
        Ok(())
    }

    /// Generates a new token from the OS CSPRNG: random 43-character alphanumeric keys, room,
    /// rendezvous and mDNS, OTP length 43, 20 MiB messages. `interval` is clamped to
    /// `1..=NEVER_ROTATE`; pass [`NEVER_ROTATE`] when the user gives none.
    pub fn generate(interval: u64) -> Result<NetworkToken, getrandom::Error> {
        let mut failure = None;
        let token = Self::generate_with(interval, &mut |buf: &mut [u8]| {
            if failure.is_none() {
                failure = getrandom::fill(buf).err();
            }
            if failure.is_some() {
                buf.fill(0);
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(token),
        }
    }

    /// [`generate`](Self::generate) with a caller-supplied random source (`fill` must fill the
    /// buffer with uniformly random bytes; for tests).
    #[must_use]
    pub fn generate_with(interval: u64, fill: &mut dyn FnMut(&mut [u8])) -> NetworkToken {
        let interval = interval.clamp(1, NEVER_ROTATE);
        let params = |fill: &mut dyn FnMut(&mut [u8])| OtpParams {
            interval,
            key: random::alphanumeric(GENERATED_LEN, fill),
            // GENERATED_LEN is 43.
            length: GENERATED_LEN as u32,
        };
        let dht = params(fill);
        let crypto = params(fill);
        NetworkToken {
            otp: Otp { dht, crypto },
            room: random::alphanumeric(GENERATED_LEN, fill),
            rendezvous: random::alphanumeric(GENERATED_LEN, fill),
            mdns: random::alphanumeric(GENERATED_LEN, fill),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Derives the key schedule (membership key and per-window keys) from this token.
    #[must_use]
    pub fn key_schedule(&self) -> KeySchedule {
        KeySchedule::new(self)
    }
}

impl FromStr for NetworkToken {
    type Err = TokenError;

    /// Same as [`NetworkToken::decode`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::decode(s)
    }
}

/// `Ok(value)` if `min <= value <= max`, else the typed range error for `field`.
fn check_range(field: &'static str, value: i128, min: u64, max: u64) -> Result<u64, TokenError> {
    if value < i128::from(min) || value > i128::from(max) {
        return Err(TokenError::OutOfRange {
            field,
            value,
            min,
            max,
        });
    }
    // In min..=max, so it fits in a u64.
    u64::try_from(value).map_err(|_| TokenError::OutOfRange {
        field,
        value,
        min,
        max,
    })
}

fn non_empty(field: &'static str, value: &str) -> Result<(), TokenError> {
    if value.is_empty() {
        Err(TokenError::EmptyField(field))
    } else {
        Ok(())
    }
}
