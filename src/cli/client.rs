//! A client of the agent's local API (edgevpn's endpoints) for `get-kubeconfig`, `role` and
//! `status`: plain HTTP to loopback, bounded responses, typed errors.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::ledger::edgevpn;

/// `--api` when not given: where an agent or `bridge` serves the API (`APILISTEN`).
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";
/// Largest response read (the ledger's own limit on a message is larger, but no endpoint the
/// clients call comes near this on a real cluster).
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
/// Longest `--api` accepted.
const MAX_URL_LEN: usize = 2048;
/// Time allowed for one request, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// `--api` is not a usable http URL.
    BadUrl(String),
    /// Nothing answered at the URL.
    Unreachable {
        /// The URL called.
        url: String,
        /// What the system said.
        reason: String,
    },
    /// The API answered with an error status.
    Status {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// Its `message`, if any.
        message: String,
    },
    /// The answer was not what the endpoint gives.
    BadResponse {
        /// The URL called.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::BadUrl(why) => write!(f, "--api: {why}"),
            ClientError::Unreachable { url, reason } => write!(
                f,
                "cannot reach the API at {url}: {reason}\n\
                 The API is served by a running `kairos-p2p agent` on this machine (APILISTEN, \
                 default 127.0.0.1:8080); from a workstation, join the network first with \
                 `kairos-p2p bridge`. Pass --api URL if it listens elsewhere."
            ),
            ClientError::Status {
                url,
                status,
                message,
            } => write!(f, "{url}: the API answered {status} {message}"),
            ClientError::BadResponse { url, reason } => {
                write!(f, "{url}: unexpected answer from the API: {reason}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// The API of one agent.
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    /// A client of the API at `url` (see [`base_url`]).
    pub fn new(url: &str) -> Result<Api, ClientError> {
        let base = base_url(url)?;
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .max_redirects(0)
            .build();
        Ok(Api {
            base,
            agent: config.into(),
        })
    }

    /// `GET path`, decoded from JSON.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self.agent.get(&url).call();
        let body = read(&url, response)?;
        serde_json::from_str(&body).map_err(|e| ClientError::BadResponse {
            url,
            reason: format!("not the JSON expected: {e}"),
        })
    }

    /// `PUT path`; the API answers `{"State": "Announcing"}`.
    pub fn put(&self, path: &str) -> Result<(), ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self.agent.put(&url).send_empty();
        let body = read(&url, response)?;
        if body.contains("Announcing") {
            Ok(())
        } else {
            Err(ClientError::BadResponse {
                url,
                reason: format!(
                    "expected {{\"State\":\"Announcing\"}}, got {}",
                    preview(&body)
                ),
            })
        }
    }

    /// The text of `bucket/key` ("" when absent), however it was stored
    /// ([`edgevpn::text`]).
    pub fn ledger_text(&self, bucket: &str, key: &str) -> Result<String, ClientError> {
        let stored: String =
            self.get_json(&format!("/api/ledger/{}/{}", segment(bucket), segment(key)))?;
        Ok(edgevpn::text(&stored))
    }
}

/// The body of a successful response, or the error.
fn read(
    url: &str,
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<String, ClientError> {
    let mut response = response.map_err(|e| match e {
        ureq::Error::Io(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Timeout(_) => ClientError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
        },
        other => ClientError::BadResponse {
            url: url.to_string(),
            reason: other.to_string(),
        },
    })?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BYTES)
        .read_to_string()
        .map_err(|e| ClientError::BadResponse {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| preview(&body));
    Err(ClientError::Status {
        url: url.to_string(),
        status,
        message,
    })
}

/// The first line of `text`, at most 80 characters.
fn preview(text: &str) -> String {
    text.lines().next().unwrap_or("").chars().take(80).collect()
}

/// `--api` as a base URL without a trailing slash: `http://host:port`, the scheme optional
/// (`127.0.0.1:8080` works as in edgevpn); `https` is refused (the API is plain HTTP on loopback).
pub fn base_url(arg: &str) -> Result<String, ClientError> {
    let arg = arg.trim();
    if arg.len() > MAX_URL_LEN {
        return Err(ClientError::BadUrl("too long".to_string()));
    }
    let (scheme, rest) = arg.split_once("://").unwrap_or(("http", arg));
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(ClientError::BadUrl(format!(
            "{scheme}:// is not supported: the API is plain http:// on loopback"
        )));
    }
    let rest = rest.trim_end_matches('/');
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ClientError::BadUrl(format!(
            "{arg:?} is not an http://HOST:PORT URL"
        )));
    }
    let url = format!("{scheme}://{rest}");
    Ok(url)
}

/// `text` percent-encoded as one path segment: everything but RFC 3986's unreserved bytes and
/// `=`, which Go's `net/url` leaves in paths too. edgevpn's router (echo) does not decode a
/// `%3D` in a path parameter, so the padded base64url segment `role set` sends must carry `=`
/// as kairosctl sends it, or edgevpn would store `...%3D`.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'=') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        for (arg, expected) in [
            ("http://127.0.0.1:8080", Ok("http://127.0.0.1:8080")),
            ("http://127.0.0.1:8080/", Ok("http://127.0.0.1:8080")),
            (" HTTP://localhost:9090 ", Ok("HTTP://localhost:9090")),
            ("127.0.0.1:8080", Ok("http://127.0.0.1:8080")),
            ("[::1]:8080", Ok("http://[::1]:8080")),
            ("https://127.0.0.1:8080", Err("https://")),
            ("unix:///run/api.sock", Err("unix://")),
            ("http://", Err("not an http")),
            ("", Err("not an http")),
            ("http://a b", Err("not an http")),
        ] {
            match (base_url(arg), expected) {
                (Ok(url), Ok(want)) => assert_eq!(url, want, "{arg:?}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{arg:?}: {e}"),
                (got, want) => panic!("{arg:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(base_url(&"a".repeat(MAX_URL_LEN + 1)).is_err());
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("kairos"), "kairos");
        assert_eq!(segment("abc-node1_x.y~"), "abc-node1_x.y~");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment("Im1hc3RlciI="), "Im1hc3RlciI=");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn unreachable_names_the_url_and_the_bridge() {
        let e = ClientError::Unreachable {
            url: "http://127.0.0.1:1/api/summary".to_string(),
            reason: "refused".to_string(),
        };
        let text = e.to_string();
        assert!(text.contains("http://127.0.0.1:1/api/summary"), "{text}");
        assert!(text.contains("kairos-p2p bridge"), "{text}");
    }
}
