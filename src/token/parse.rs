//! Typed extraction of the token fields from a parsed YAML value.
//!
//! Done by hand over `serde_yaml::Value` (rather than `#[derive(Deserialize)]`) so that every
//! error names the exact field and never echoes a secret value. Unknown extra fields are ignored,
//! like edgevpn's non-strict yaml.v2 `Unmarshal` does, so tokens from newer generators still work.
//! A null value counts as missing.

use serde_yaml::{Mapping, Value};

use super::{
    MAX_INTERVAL, MAX_MESSAGE_SIZE_LIMIT, MAX_OTP_LENGTH, NetworkToken, Otp, OtpParams, TokenError,
    check_range,
};

/// Dotted paths of one OTP block's fields, for error messages.
struct ParamPaths {
    block: &'static str,
    interval: &'static str,
    key: &'static str,
    length: &'static str,
}

const DHT: ParamPaths = ParamPaths {
    block: "otp.dht",
    interval: "otp.dht.interval",
    key: "otp.dht.key",
    length: "otp.dht.length",
};

const CRYPTO: ParamPaths = ParamPaths {
    block: "otp.crypto",
    interval: "otp.crypto.interval",
    key: "otp.crypto.key",
    length: "otp.crypto.length",
};

/// Builds a token from the YAML document. Ranges are checked here too (negative numbers cannot
/// be represented after this step); the caller still runs `validate`.
pub(super) fn token_from_value(doc: &Value) -> Result<NetworkToken, TokenError> {
    let root = match doc {
        Value::Mapping(m) => m,
        other => return Err(TokenError::NotMapping(kind(other))),
    };
    let otp = mapping(root, "otp", "otp")?;
    Ok(NetworkToken {
        otp: Otp {
            dht: params(otp, "dht", &DHT)?,
            crypto: params(otp, "crypto", &CRYPTO)?,
        },
        room: string(root, "room", "room")?,
        rendezvous: string(root, "rendezvous", "rendezvous")?,
        mdns: string(root, "mdns", "mdns")?,
        max_message_size: integer(
            root,
            "max_message_size",
            "max_message_size",
            1,
            MAX_MESSAGE_SIZE_LIMIT,
        )?,
    })
}

fn params(otp: &Mapping, name: &str, paths: &ParamPaths) -> Result<OtpParams, TokenError> {
    let block = mapping(otp, name, paths.block)?;
    let interval = integer(block, "interval", paths.interval, 1, MAX_INTERVAL)?;
    let key = string(block, "key", paths.key)?;
    let max_length = u64::from(MAX_OTP_LENGTH);
    let length = integer(block, "length", paths.length, 1, max_length)?;
    // Already range-checked, so this conversion cannot fail.
    let length = u32::try_from(length).map_err(|_| TokenError::OutOfRange {
        field: paths.length,
        value: i128::from(length),
        min: 1,
        max: max_length,
    })?;
    Ok(OtpParams {
        interval,
        key,
        length,
    })
}

fn get<'a>(map: &'a Mapping, key: &str, path: &'static str) -> Result<&'a Value, TokenError> {
    match map.get(key) {
        None | Some(Value::Null) => Err(TokenError::Missing(path)),
        Some(v) => Ok(v),
    }
}

fn mapping<'a>(map: &'a Mapping, key: &str, path: &'static str) -> Result<&'a Mapping, TokenError> {
    match get(map, key, path)? {
        Value::Mapping(m) => Ok(m),
        other => Err(wrong_type(path, "a mapping", other)),
    }
}

fn string(map: &Mapping, key: &str, path: &'static str) -> Result<String, TokenError> {
    match get(map, key, path)? {
        Value::String(s) if s.is_empty() => Err(TokenError::EmptyField(path)),
        Value::String(s) => Ok(s.clone()),
        other => Err(wrong_type(path, "a string", other)),
    }
}

fn integer(
    map: &Mapping,
    key: &str,
    path: &'static str,
    min: u64,
    max: u64,
) -> Result<u64, TokenError> {
    let value = get(map, key, path)?;
    let n: i128 = match value {
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => i128::from(u),
            (None, Some(i)) => i128::from(i),
            (None, None) => return Err(wrong_type(path, "an integer", value)),
        },
        other => return Err(wrong_type(path, "an integer", other)),
    };
    check_range(path, n, min, max)
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Value) -> TokenError {
    TokenError::WrongType {
        field,
        expected,
        found: kind(found),
    }
}

/// A short description of a YAML value's type (never its content).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a non-integer number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
