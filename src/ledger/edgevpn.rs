//! Ledger values as edgevpn's Go client writes them, which is how Kairos' tools (provider-kairos,
//! `kairosctl role set`) store roles, `ip-master` and `master-kubeconfig`.
//!
//! The client's `Put` marshals the value to JSON and sends it base64url-encoded (padded) as the
//! last path segment of `PUT /api/ledger/:bucket/:key/:value`; the API stores that segment as a
//! JSON string literal. So the role `master` is stored as `"Im1hc3RlciI="`, while this agent's
//! own writes store the plain text (`master`). [`text`] reads both.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// base64url, padding optional (edgevpn pads, Kairos' kubeconfig is unpadded).
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The path segment edgevpn's Go client sends to store the string `text`.
#[must_use]
pub fn client_segment(text: &str) -> String {
    let json = serde_json::to_string(text).unwrap_or_default();
    URL_SAFE_LENIENT.encode(json)
}

/// The text a stored value stands for: for a JSON string literal, its contents, decoded once
/// more when they are the Go client's base64url of a JSON string (its contents) or of a JSON
/// object or array (that JSON, e.g. an announcement as the API shows it); any other value as it
/// is.
#[must_use]
pub fn text(stored: &str) -> String {
    let Ok(inner) = serde_json::from_str::<String>(stored) else {
        return stored.to_string();
    };
    let Ok(json) = URL_SAFE_LENIENT.decode(inner.as_bytes()) else {
        return inner;
    };
    match serde_json::from_slice::<serde_json::Value>(&json) {
        Ok(serde_json::Value::String(text)) => text,
        Ok(serde_json::Value::Object(_) | serde_json::Value::Array(_)) => {
            String::from_utf8(json).unwrap_or(inner)
        }
        _ => inner,
    }
}

/// Decodes base64 in either alphabet, padded or not (Kairos: base64url without padding).
pub fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let standard = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = text.split_ascii_whitespace().collect();
    URL_SAFE_LENIENT
        .decode(compact.as_bytes())
        .or_else(|_| standard.decode(compact.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_segments_match_go() {
        // Go: base64.URLEncoding.EncodeToString(json.Marshal("master")).
        assert_eq!(client_segment("master"), "Im1hc3RlciI=");
        assert_eq!(client_segment("master/ha"), "Im1hc3Rlci9oYSI=");
        assert_eq!(client_segment(""), "IiI=");
    }

    #[test]
    fn text_reads_every_form() {
        let stored = |segment: &str| serde_json::to_string(segment).unwrap();
        for (value, expected) in [
            // This agent's own writes.
            ("worker".to_string(), "worker"),
            ("10.1.0.1".to_string(), "10.1.0.1"),
            ("{\"Role\":\"auto\"}".to_string(), "{\"Role\":\"auto\"}"),
            // Through the API with curl: a JSON string literal.
            (stored("worker"), "worker"),
            (stored("10.1.0.1"), "10.1.0.1"),
            // Through the API with edgevpn's Go client (Kairos' tools).
            (stored(&client_segment("master/ha")), "master/ha"),
            (stored(&client_segment("10.1.0.7")), "10.1.0.7"),
            (stored(&client_segment("")), ""),
            // The API's form of an announcement: its JSON.
            (
                stored(&URL_SAFE_LENIENT.encode(r#"{"Role":"auto"}"#)),
                r#"{"Role":"auto"}"#,
            ),
            // base64 that is not of a JSON string, object or array stays as it is.
            (stored(&URL_SAFE_LENIENT.encode("12")), "MTI="),
            (stored("aGVsbG8="), "aGVsbG8="),
            ("\"unterminated".to_string(), "\"unterminated"),
            (String::new(), ""),
        ] {
            assert_eq!(text(&value), expected, "{value:?}");
        }
    }

    #[test]
    fn base64_in_both_alphabets() {
        for encoded in ["-_8=", "-_8", "+/8=", "+/8", " +/\n8= "] {
            assert_eq!(decode_base64(encoded).unwrap(), [0xfb, 0xff], "{encoded}");
        }
        assert!(decode_base64("a").is_err());
        assert!(decode_base64("%%%%").is_err());
    }
}
