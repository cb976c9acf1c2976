//! A client of the agent's local API (edgevpn's endpoints) for `get-kubeconfig`, `role` and
//! `status`: HTTP to loopback or over a unix socket (`unix:///run/edgevpn-kairos.sock`, as
//! kairosctl), bounded responses, typed errors.
//!
//! Where it goes: `--api`, else `$EDGEVPN_API`, else Kairos' root-only socket when it answers
//! (root gets everything there), else `http://127.0.0.1:8080` (inspection). On loopback TCP it
//! sends the API bearer token of an agent or bridge of this machine when it can read one (root).

use std::fmt;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::api::trust::{BEARER_TOKEN_FILE, KAIROS_SOCKET};
use crate::ledger::edgevpn;

/// The API's TCP address when nothing else is given: where an agent or `bridge` serves it
/// (`APILISTEN`).
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";
/// Environment variable naming the API (as edgevpn's and kairosctl's clients read it).
pub const API_ENV: &str = "EDGEVPN_API";
/// Environment variable naming the cluster's `network_id` (as kairosctl reads it).
pub const NETWORK_ID_ENV: &str = "EDGEVPN_NETWORK_ID";
/// Largest response read (the ledger's own limit on a message is larger, but no endpoint the
/// clients call comes near this on a real cluster).
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
/// Largest response head read over a unix socket.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest `--api` accepted.
const MAX_URL_LEN: usize = 2048;
/// Time allowed for one request, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// `--api` is not a usable URL.
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
                 default 127.0.0.1:8080, and the root-only socket {KAIROS_SOCKET}); from a \
                 workstation, join the network first with `kairos-p2p bridge`. Pass --api URL \
                 (or set {API_ENV}) if it listens elsewhere."
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

/// Kairos' API socket on this machine (under `KAIROS_P2P_ROOT` when set).
#[must_use]
pub fn kairos_socket() -> PathBuf {
    crate::k3s::Root::from_env(std::env::var(crate::k3s::ROOT_ENV).ok()).path(KAIROS_SOCKET)
}

/// The API to call: `flag`, else `$EDGEVPN_API` (non-empty), else Kairos' socket when it
/// answers here, else [`DEFAULT_API`].
#[must_use]
pub fn choose_api(flag: Option<&str>, env: Option<String>, socket: &Path) -> String {
    if let Some(flag) = flag {
        return flag.to_string();
    }
    if let Some(env) = env.filter(|e| !e.trim().is_empty()) {
        return env;
    }
    if UnixStream::connect(socket).is_ok() {
        return format!("unix://{}", socket.display());
    }
    DEFAULT_API.to_string()
}

/// The cluster's `network_id`: `flag`, else `$EDGEVPN_NETWORK_ID` (non-empty), else `kairos`.
#[must_use]
pub fn choose_network_id(flag: Option<&str>, env: Option<String>) -> String {
    flag.map(str::to_string)
        .or_else(|| env.filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| crate::ledger::names::DEFAULT_NETWORK_ID.to_string())
}

/// The bearer tokens this user can read: the agent's, then the bridge's, from `state_dir`.
#[must_use]
pub fn readable_bearer_tokens(state_dir: &Path) -> Vec<String> {
    [
        state_dir.join(BEARER_TOKEN_FILE),
        state_dir
            .join(super::bridge::BRIDGE_STATE_SUBDIR)
            .join(BEARER_TOKEN_FILE),
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|t| crate::api::trust::BearerToken::parse(&t))
    .map(|t| t.as_str().to_string())
    .collect()
}

/// Where requests go.
enum Transport {
    /// `http://host:port`, with the bearer tokens to try (loopback hosts only).
    Http {
        base: String,
        agent: ureq::Agent,
        tokens: Vec<String>,
    },
    /// A unix socket.
    Unix(PathBuf),
}

/// The API of one agent.
pub struct Api {
    transport: Transport,
}

impl Api {
    /// A client of the API at `url` (see [`parse_api`]); `tokens` are sent, one after the other
    /// while the API refuses them (401), to a loopback TCP address only.
    pub fn new(url: &str, tokens: Vec<String>) -> Result<Api, ClientError> {
        let transport = match parse_api(url)? {
            ApiAddress::Unix(path) => Transport::Unix(path),
            ApiAddress::Http(base) => {
                let config = ureq::Agent::config_builder()
                    .timeout_global(Some(TIMEOUT))
                    .http_status_as_error(false)
                    .max_redirects(0)
                    .build();
                let tokens = if is_loopback_url(&base) {
                    tokens
                } else {
                    Vec::new()
                };
                Transport::Http {
                    base,
                    agent: config.into(),
                    tokens,
                }
            }
        };
        Ok(Api { transport })
    }

    /// `GET path`, decoded from JSON.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (url, body) = self.call("GET", path)?;
        serde_json::from_str(&body).map_err(|e| ClientError::BadResponse {
            url,
            reason: format!("not the JSON expected: {e}"),
        })
    }

    /// `PUT path`; the API answers `{"State": "Announcing"}`.
    pub fn put(&self, path: &str) -> Result<(), ClientError> {
        let (url, body) = self.call("PUT", path)?;
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

    /// `method path`: the URL called and the body of a successful answer.
    fn call(&self, method: &str, path: &str) -> Result<(String, String), ClientError> {
        match &self.transport {
            Transport::Unix(socket) => {
                let url = format!("unix://{}{path}", socket.display());
                let (status, body) =
                    unix_call(socket, method, path).map_err(|reason| ClientError::Unreachable {
                        url: url.clone(),
                        reason,
                    })?;
                let body = checked(&url, status, body)?;
                Ok((url, body))
            }
            Transport::Http {
                base,
                agent,
                tokens,
            } => {
                let url = format!("{base}{path}");
                let mut tokens = tokens.iter().map(Some).collect::<Vec<_>>();
                tokens.push(None);
                let mut last = None;
                for token in tokens {
                    let response = match (method, token) {
                        ("PUT", Some(t)) => agent
                            .put(&url)
                            .header("Authorization", format!("Bearer {t}"))
                            .send_empty(),
                        ("PUT", None) => agent.put(&url).send_empty(),
                        (_, Some(t)) => agent
                            .get(&url)
                            .header("Authorization", format!("Bearer {t}"))
                            .call(),
                        (_, None) => agent.get(&url).call(),
                    };
                    match read(&url, response) {
                        // A stale token (another agent's): try the next, then none.
                        Err(ClientError::Status { status: 401, .. }) if token.is_some() => {}
                        other => {
                            last = Some(other);
                            break;
                        }
                    }
                }
                let body = last.unwrap_or_else(|| {
                    Err(ClientError::BadResponse {
                        url: url.clone(),
                        reason: "no answer".to_string(),
                    })
                })?;
                Ok((url, body))
            }
        }
    }
}

/// One request over the unix socket at `socket` (`Connection: close`): the status and body.
fn unix_call(socket: &Path, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Length: 0\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES + MAX_HEAD_BYTES as u64)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    parse_response(&raw)
}

/// The status and body of a whole HTTP/1.1 response (`Content-Length` framed, as the agent
/// sends them).
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let split = raw
        .windows(4)
        .take(MAX_HEAD_BYTES)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete HTTP response head")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "response head is not text")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("not an HTTP status line")?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>().map_err(|_| "bad Content-Length"))
        .transpose()?;
    let body = &raw[split + 4..];
    let body = match length {
        Some(n) if n <= body.len() => &body[..n],
        Some(_) => return Err("response cut short".to_string()),
        None => body,
    };
    Ok((status, String::from_utf8_lossy(body).into_owned()))
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
    checked(url, status, body)
}

/// `body` when `status` is a success, else the error with the API's `message`.
fn checked(url: &str, status: u16, body: String) -> Result<String, ClientError> {
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

/// A parsed `--api`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddress {
    /// A base URL without a trailing slash: `http://host:port`.
    Http(String),
    /// A unix socket's path.
    Unix(PathBuf),
}

/// `--api`: `unix:///path/to.sock`, or `http://host:port` with the scheme optional
/// (`127.0.0.1:8080` works as in edgevpn); `https` is refused (the API is plain HTTP on
/// loopback).
pub fn parse_api(arg: &str) -> Result<ApiAddress, ClientError> {
    let arg = arg.trim();
    if arg.len() > MAX_URL_LEN {
        return Err(ClientError::BadUrl("too long".to_string()));
    }
    let (scheme, rest) = arg.split_once("://").unwrap_or(("http", arg));
    if scheme.eq_ignore_ascii_case("unix") {
        if rest.is_empty() || rest.chars().any(char::is_control) {
            return Err(ClientError::BadUrl(format!(
                "{arg:?} is not a unix:///PATH address"
            )));
        }
        return Ok(ApiAddress::Unix(PathBuf::from(rest)));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(ClientError::BadUrl(format!(
            "{scheme}:// is not supported: the API is plain http:// on loopback, or unix://"
        )));
    }
    let rest = rest.trim_end_matches('/');
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ClientError::BadUrl(format!(
            "{arg:?} is not an http://HOST:PORT URL"
        )));
    }
    Ok(ApiAddress::Http(format!("{scheme}://{rest}")))
}

/// Whether an `http://host[:port]` base URL names this machine (the bearer token goes there
/// only).
fn is_loopback_url(base: &str) -> bool {
    let host_port = base.split_once("://").map_or(base, |(_, r)| r);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    fn api_addresses() {
        let http = |u: &str| Ok(ApiAddress::Http(u.to_string()));
        for (arg, expected) in [
            ("http://127.0.0.1:8080", http("http://127.0.0.1:8080")),
            ("http://127.0.0.1:8080/", http("http://127.0.0.1:8080")),
            (" HTTP://localhost:9090 ", http("HTTP://localhost:9090")),
            ("127.0.0.1:8080", http("http://127.0.0.1:8080")),
            ("[::1]:8080", http("http://[::1]:8080")),
            (
                "unix:///run/edgevpn-kairos.sock",
                Ok(ApiAddress::Unix(PathBuf::from("/run/edgevpn-kairos.sock"))),
            ),
            ("https://127.0.0.1:8080", Err("https://")),
            ("unix://", Err("unix:///PATH")),
            ("http://", Err("not an http")),
            ("", Err("not an http")),
            ("http://a b", Err("not an http")),
        ] {
            match (parse_api(arg), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{arg:?}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{arg:?}: {e}"),
                (got, want) => panic!("{arg:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(parse_api(&"a".repeat(MAX_URL_LEN + 1)).is_err());
    }

    #[test]
    fn bearer_tokens_go_to_loopback_only() {
        for local in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:8080",
        ] {
            assert!(is_loopback_url(local), "{local}");
        }
        for remote in [
            "http://10.1.0.1:8080",
            "http://example.com:8080",
            "http://[fe80::1]:1",
        ] {
            assert!(!is_loopback_url(remote), "{remote}");
        }
    }

    #[test]
    fn api_and_network_id_from_flag_then_environment() {
        let none = Path::new("/nonexistent/kairos-p2p-test.sock");
        assert_eq!(
            choose_api(Some("unix:///x"), Some("e".into()), none),
            "unix:///x"
        );
        assert_eq!(
            choose_api(None, Some("http://e:1".into()), none),
            "http://e:1"
        );
        assert_eq!(choose_api(None, Some(" ".into()), none), DEFAULT_API);
        assert_eq!(choose_api(None, None, none), DEFAULT_API);
        let dir = std::env::temp_dir().join(format!("kp-client-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let socket = dir.join("s.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(
            choose_api(None, None, &socket),
            format!("unix://{}", socket.display())
        );
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(choose_network_id(Some("a"), Some("b".into())), "a");
        assert_eq!(choose_network_id(None, Some("b".into())), "b");
        assert_eq!(choose_network_id(None, None), "kairos");
    }

    #[test]
    fn unix_responses_parse() {
        let raw = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nhello!";
        assert_eq!(parse_response(raw), Ok((403, "hello".to_string())));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"garbage").is_err());
        let unframed = b"HTTP/1.0 200 OK\r\n\r\n\"x\"";
        assert_eq!(parse_response(unframed), Ok((200, "\"x\"".to_string())));
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
