//! A sans-IO HTTP/1.1 server connection: bytes in, [`Request`]s out, [`Response`]s in, bytes out.
//! No socket and no clock: the driver moves the bytes and passes `Instant`s.
//!
//! # What is accepted
//! - HTTP/1.0 and HTTP/1.1, origin-form targets (`/path?query`), methods GET, HEAD, POST, PUT,
//!   DELETE, OPTIONS and PATCH (routing decides which are allowed where).
//! - Bodies framed by `Content-Length` only; `Expect: 100-continue` is honoured.
//! - Keep-alive and pipelining: requests are handed out one at a time and answered in order.
//!   `Connection: close`, and HTTP/1.0 without `Connection: keep-alive`, close after the response.
//!
//! # What is refused (an error response, then the connection closes)
//! | input | status |
//! |---|---|
//! | malformed request line or header, bad target, missing or repeated `Host` (HTTP/1.1), bad or repeated `Content-Length` | 400 |
//! | no complete request [`REQUEST_TIMEOUT`] after its first byte | 408 |
//! | `Transfer-Encoding: chunked` | 411 |
//! | body over [`MAX_BODY_BYTES`] | 413 |
//! | request line over [`MAX_TARGET_LEN`] and a little | 414 |
//! | any other `Expect` | 417 |
//! | header section over [`MAX_HEADER_BYTES`] or over [`MAX_HEADERS`] fields | 431 |
//! | another method, another transfer coding | 501 |
//! | another `HTTP/x.y` version | 505 |
//!
//! The request line has its own limit, larger than the header section's, because edgevpn's
//! `PUT /api/ledger/:bucket/:key/:value` carries the value in the path.
//!
//! # Bounds
//! Input held is at most [`MAX_INPUT_BUFFER`] (a driver feeding more than
//! [`Connection::wants_input`] allows gets the connection closed); output stops growing once
//! [`OUTPUT_HIGH_WATER`] bytes are pending (pipelined requests wait). A connection without progress
//! (no input, no output read) for [`IDLE_TIMEOUT`] closes; progress made through
//! [`Connection::respond`] or [`Connection::consume_output`], which take no time, is noticed at the
//! next timer, so the bound is twice that.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Most header fields in a request.
pub const MAX_HEADERS: usize = 32;
/// Longest request target (path and query, as sent). Large enough for a 64 KiB value in a
/// `PUT /api/ledger/:bucket/:key/:value` path.
pub const MAX_TARGET_LEN: usize = 66 * 1024;
/// Longest request line: the target plus method, version and separators.
const MAX_REQUEST_LINE: usize = MAX_TARGET_LEN + 64;
/// Largest header section (after the request line, up to and including the empty line).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Bytes of empty lines tolerated before a request line (some clients send a CRLF after a body).
const MAX_LEADING_EMPTY_LINE_BYTES: usize = 64;
/// Most bytes a driver should pass to one [`Connection::feed`] call.
pub const MAX_FEED: usize = 64 * 1024;
/// Largest request on the wire.
const MAX_REQUEST_BYTES: usize = MAX_REQUEST_LINE + MAX_HEADER_BYTES + MAX_BODY_BYTES;
/// Most unparsed input a connection holds.
pub const MAX_INPUT_BUFFER: usize = MAX_REQUEST_BYTES + MAX_FEED;
/// Pending output above which no further request is handed out until the peer reads.
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// Time allowed from a request's first byte to its last.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time without progress (no input, no output read) after which a connection closes.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `Content-Type` of JSON responses (edgevpn's API sends the same).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of HTML responses.
pub const CONTENT_TYPE_HTML: &str = "text/html; charset=utf-8";
/// `Content-Type` of the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE_PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A request method this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`: a `GET` whose response body is left out.
    Head,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
    /// `OPTIONS`.
    Options,
    /// `PATCH`.
    Patch,
}

impl Method {
    /// The method named by a request-line token (case-sensitive, as HTTP defines it).
    fn from_token(token: &str) -> Option<Method> {
        Some(match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            _ => return None,
        })
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// The path as sent (percent-encoded, starts with `/`); see [`Request::segments`].
    pub path: String,
    /// The query string as sent, without the `?`.
    pub query: Option<String>,
    /// The `Host` header (absent in some HTTP/1.0 requests).
    pub host: Option<String>,
    /// The `Authorization` header (see [`crate::api::trust::request_access`]).
    pub authorization: Option<String>,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Why a path did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hexadecimal digits.
    BadEscape,
    /// A segment that is not UTF-8 once decoded.
    NotUtf8,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::BadEscape => "path has a % not followed by two hex digits",
            PathError::NotUtf8 => "path segment is not UTF-8 once percent-decoded",
        })
    }
}

impl std::error::Error for PathError {}

impl Request {
    /// The path split at `/` and percent-decoded segment by segment, so `%2F` puts a `/` inside a
    /// segment (a ledger key with a slash). `/` gives no segment; one trailing `/` is ignored.
    pub fn segments(&self) -> Result<Vec<String>, PathError> {
        let trimmed = self.path.strip_prefix('/').unwrap_or(&self.path);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Ok(Vec::new());
        }
        trimmed.split('/').map(percent_decode).collect()
    }
}

/// Decodes `%XX` escapes (either case); every other byte stays as it is (`+` included).
pub fn percent_decode(segment: &str) -> Result<String, PathError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex_value(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex_value(*b));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEscape);
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A response status this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Ok,
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 405 (send an `Allow` header with it).
    MethodNotAllowed,
    /// 408.
    RequestTimeout,
    /// 411.
    LengthRequired,
    /// 413.
    ContentTooLarge,
    /// 414.
    UriTooLong,
    /// 417.
    ExpectationFailed,
    /// 431.
    HeaderFieldsTooLarge,
    /// 500.
    InternalServerError,
    /// 501.
    NotImplemented,
    /// 505.
    VersionNotSupported,
}

impl Status {
    /// The numeric code.
    #[must_use]
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::LengthRequired => 411,
            Status::ContentTooLarge => 413,
            Status::UriTooLong => 414,
            Status::ExpectationFailed => 417,
            Status::HeaderFieldsTooLarge => 431,
            Status::InternalServerError => 500,
            Status::NotImplemented => 501,
            Status::VersionNotSupported => 505,
        }
    }

    /// The reason phrase (RFC 9110).
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Unauthorized => "Unauthorized",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::LengthRequired => "Length Required",
            Status::ContentTooLarge => "Content Too Large",
            Status::UriTooLong => "URI Too Long",
            Status::ExpectationFailed => "Expectation Failed",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// A response to encode. Every response also carries `Content-Length`,
/// `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`; header values all come from
/// this program, never from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: Status,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body (left out on the wire for `HEAD`).
    pub body: Vec<u8>,
    /// The `Allow` header, for 405 responses.
    pub allow: Option<&'static str>,
}

/// The body of an error response, as edgevpn's web framework (echo) writes it.
#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
}

impl Response {
    /// `value` as JSON followed by a newline (as edgevpn's API writes it).
    pub fn json<T: Serialize + ?Sized>(status: Status, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Response {
                    status,
                    content_type: CONTENT_TYPE_JSON,
                    body,
                    allow: None,
                }
            }
            Err(e) => {
                log::warn!("api: a response did not serialize: {e}");
                Response::error(Status::InternalServerError, "response did not serialize")
            }
        }
    }

    /// `{"message": "..."}` with `status`.
    #[must_use]
    pub fn error(status: Status, message: &str) -> Response {
        let mut body = serde_json::to_vec(&ErrorBody { message }).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: CONTENT_TYPE_JSON,
            body,
            allow: None,
        }
    }

    /// `body` with a given content type and status 200.
    #[must_use]
    pub fn content(content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status: Status::Ok,
            content_type,
            body,
            allow: None,
        }
    }
}

/// What happens to the connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persistence {
    /// Close it (`Connection: close` is sent).
    Close,
    /// HTTP/1.1 keep-alive (the default, nothing sent).
    KeepAlive,
    /// HTTP/1.0 keep-alive, which the response must confirm with `Connection: keep-alive`.
    KeepAliveHttp10,
}

/// A parsed request head whose body may still be arriving.
#[derive(Debug)]
struct Head {
    /// Bytes of the head, up to and including its empty line.
    len: usize,
    method: Method,
    path: String,
    query: Option<String>,
    host: Option<String>,
    authorization: Option<String>,
    content_length: usize,
    persistence: Persistence,
    /// `Expect: 100-continue` from an HTTP/1.1 client.
    expects_continue: bool,
    continue_sent: bool,
}

/// The request handed out and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    head_only: bool,
    persistence: Persistence,
}

/// Why a request was refused: the status and a message for the client.
type Rejection = (Status, &'static str);

/// The refusal of a header section over [`MAX_HEADER_BYTES`].
const HEADERS_TOO_LARGE: Rejection = (Status::HeaderFieldsTooLarge, "header section over 8 KiB");

/// Incremental search for the end of a request head, so that input arriving byte by byte is
/// scanned once, not once per byte.
#[derive(Debug, Default)]
struct HeadScan {
    /// Next byte to look at.
    pos: usize,
    /// Start of the line being scanned.
    line_start: usize,
    /// End of the request line (after its `\n`), once seen.
    request_line_end: Option<usize>,
}

/// What [`HeadScan::scan`] found.
enum Scan {
    /// The head is not complete yet.
    Incomplete,
    /// The head is complete and this long.
    Complete(usize),
    /// The head breaks a limit.
    Refused(Rejection),
}

impl HeadScan {
    fn scan(&mut self, input: &[u8]) -> Scan {
        while let Some(&byte) = input.get(self.pos) {
            self.pos += 1;
            if byte != b'\n' {
                continue;
            }
            let line = &input[self.line_start..self.pos - 1];
            let empty = line.is_empty() || line == b"\r";
            match self.request_line_end {
                None if empty => {}
                None => {
                    if self.pos - self.line_start > MAX_REQUEST_LINE {
                        return Scan::Refused((Status::UriTooLong, "request line too long"));
                    }
                    self.request_line_end = Some(self.pos);
                }
                Some(end) if self.pos - end > MAX_HEADER_BYTES => {
                    return Scan::Refused(HEADERS_TOO_LARGE);
                }
                Some(_) if empty => return Scan::Complete(self.pos),
                Some(_) => {}
            }
            self.line_start = self.pos;
        }
        match self.request_line_end {
            None if self.pos - self.line_start > MAX_REQUEST_LINE => {
                Scan::Refused((Status::UriTooLong, "request line too long"))
            }
            None if self.line_start > MAX_LEADING_EMPTY_LINE_BYTES => {
                Scan::Refused((Status::BadRequest, "too many empty lines"))
            }
            Some(end) if self.pos - end > MAX_HEADER_BYTES => Scan::Refused(HEADERS_TOO_LARGE),
            _ => Scan::Incomplete,
        }
    }
}

/// Parses a complete request head (as found by [`HeadScan`]).
fn parse_head(buf: &[u8]) -> Result<Head, Rejection> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err((Status::BadRequest, "incomplete head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((Status::HeaderFieldsTooLarge, "more than 32 header fields"));
        }
        Err(httparse::Error::Version) => return Err(version_rejection(buf)),
        Err(httparse::Error::HeaderName) => return Err((Status::BadRequest, "bad header name")),
        Err(httparse::Error::HeaderValue) => {
            return Err((Status::BadRequest, "bad header value"));
        }
        Err(_) => return Err((Status::BadRequest, "malformed request line")),
    };
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err((Status::BadRequest, "malformed request line"));
    };
    let method = Method::from_token(method).ok_or((Status::NotImplemented, "unknown method"))?;
    if !target.starts_with('/') {
        return Err((Status::BadRequest, "request target must start with /"));
    }
    if target.len() > MAX_TARGET_LEN {
        return Err((Status::UriTooLong, "request target too long"));
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };

    let mut host = None;
    let mut hosts = 0;
    let mut authorization = None;
    let mut content_length = None;
    let mut close = false;
    let mut keep_alive = false;
    let mut expects_continue = false;
    for field in parsed.headers.iter() {
        let name = field.name;
        let value = field.value.trim_ascii();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(if has_token(value, b"chunked") {
                (
                    Status::LengthRequired,
                    "chunked bodies are not supported: send Content-Length",
                )
            } else {
                (Status::NotImplemented, "transfer codings are not supported")
            });
        } else if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err((Status::BadRequest, "repeated Content-Length"));
            }
            let length = parse_decimal(value).ok_or((Status::BadRequest, "bad Content-Length"))?;
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            let value = std::str::from_utf8(value).map_err(|_| (Status::BadRequest, "bad Host"))?;
            host = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Err((Status::BadRequest, "repeated Authorization"));
            }
            let value = std::str::from_utf8(value)
                .map_err(|_| (Status::BadRequest, "bad Authorization"))?;
            authorization = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            close |= has_token(value, b"close");
            keep_alive |= has_token(value, b"keep-alive");
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err((Status::ExpectationFailed, "only 100-continue is supported"));
            }
            expects_continue = version == 1;
        }
    }
    if hosts > 1 || (version == 1 && hosts == 0) {
        return Err((Status::BadRequest, "HTTP/1.1 needs exactly one Host"));
    }
    let content_length = match content_length {
        None => 0,
        Some(n) if n <= MAX_BODY_BYTES as u64 => n as usize,
        Some(_) => return Err((Status::ContentTooLarge, "body over 64 KiB")),
    };
    let persistence = match (version, close, keep_alive) {
        (_, true, _) | (0, false, false) => Persistence::Close,
        (0, false, true) => Persistence::KeepAliveHttp10,
        _ => Persistence::KeepAlive,
    };
    Ok(Head {
        len,
        method,
        path: path.to_string(),
        query,
        host,
        authorization,
        content_length,
        persistence,
        expects_continue: expects_continue && content_length > 0,
        continue_sent: false,
    })
}

/// 505 for a well-formed request line (`METHOD SP target SP HTTP/<digit>...`) whose version is
/// not 1.0 or 1.1, else 400.
fn version_rejection(head: &[u8]) -> Rejection {
    let request_line = head
        .split(|b| *b == b'\n')
        .find(|line| !line.trim_ascii().is_empty())
        .unwrap_or_default()
        .trim_ascii();
    let parts: Vec<&[u8]> = request_line.split(|b| *b == b' ').collect();
    match parts.as_slice() {
        [_, _, version]
            if version
                .strip_prefix(b"HTTP/")
                .is_some_and(starts_with_digit) =>
        {
            (Status::VersionNotSupported, "only HTTP/1.0 and HTTP/1.1")
        }
        _ => (Status::BadRequest, "malformed request line"),
    }
}

fn starts_with_digit(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(u8::is_ascii_digit)
}

/// True when the comma-separated header value holds `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A non-empty run of ASCII digits as a number (`None` on anything else or on overflow).
fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, b| {
        let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
        n.checked_mul(10)?.checked_add(digit)
    })
}

/// Appends the encoding of `response` to `out`.
fn encode(out: &mut Vec<u8>, response: &Response, head_only: bool, persistence: Persistence) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        response.status.code(),
        response.status.reason(),
        response.content_type,
        response.body.len(),
    );
    if let Some(allow) = response.allow {
        head.push_str("Allow: ");
        head.push_str(allow);
        head.push_str("\r\n");
    }
    match persistence {
        Persistence::Close => head.push_str("Connection: close\r\n"),
        Persistence::KeepAliveHttp10 => head.push_str("Connection: keep-alive\r\n"),
        Persistence::KeepAlive => {}
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(&response.body);
    }
}

/// One server-side HTTP connection (see the module documentation and the driver loop in
/// [`crate::api`]).
#[derive(Debug)]
pub struct Connection {
    /// Unparsed input.
    input: Vec<u8>,
    /// Encoded responses; `output[sent..]` is still to be written.
    output: Vec<u8>,
    sent: usize,
    scan: HeadScan,
    head: Option<Head>,
    pending: Option<Pending>,
    /// No further request is read; close once the output is written.
    closing: bool,
    /// The peer closed its side.
    eof: bool,
    last_activity: Instant,
    last_input: Instant,
    /// When the incomplete request in `input` started arriving.
    request_started: Option<Instant>,
    /// Output was produced or read since the timers were last set: the next
    /// [`handle_timeout`](Self::handle_timeout) restarts them instead of closing.
    progressed: bool,
}

impl Connection {
    /// A connection accepted at `now`.
    #[must_use]
    pub fn new(now: Instant) -> Self {
        Self {
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            scan: HeadScan::default(),
            head: None,
            pending: None,
            closing: false,
            eof: false,
            last_activity: now,
            last_input: now,
            request_started: None,
            progressed: false,
        }
    }

    /// Takes bytes read from the socket (at most [`MAX_FEED`] at a time). Bytes after the
    /// connection started closing are dropped; input beyond [`MAX_INPUT_BUFFER`] closes it.
    pub fn feed(&mut self, now: Instant, bytes: &[u8]) {
        if self.closing || self.eof || bytes.is_empty() {
            return;
        }
        self.last_activity = now;
        self.last_input = now;
        if self.input.len() + bytes.len() > MAX_INPUT_BUFFER {
            log::debug!("api: connection closed: the peer sent more than it may have pending");
            self.stop_reading();
            return;
        }
        if self.input.is_empty() {
            self.request_started = Some(now);
        }
        self.input.extend_from_slice(bytes);
    }

    /// The peer closed its sending side: complete requests already received are still answered,
    /// then the connection closes.
    pub fn handle_eof(&mut self) {
        self.eof = true;
        if self.input.is_empty() {
            self.close_if_eof();
        }
    }

    /// Whether the driver should read more from the socket now.
    #[must_use]
    pub fn wants_input(&self) -> bool {
        !self.closing && !self.eof && self.input.len() + MAX_FEED <= MAX_INPUT_BUFFER
    }

    /// The next complete request, if any and if the previous one was answered. A malformed
    /// request is answered here (with an error response) and closes the connection.
    pub fn poll_request(&mut self) -> Option<Request> {
        if self.closing
            || self.pending.is_some()
            || self.pending_output().len() >= OUTPUT_HIGH_WATER
        {
            return None;
        }
        if self.head.is_none() {
            if self.input.is_empty() {
                self.close_if_eof();
                return None;
            }
            match self.scan.scan(&self.input) {
                Scan::Incomplete => {
                    self.close_if_eof();
                    return None;
                }
                Scan::Refused((status, message)) => {
                    self.fail(status, message);
                    return None;
                }
                Scan::Complete(len) => match parse_head(&self.input[..len]) {
                    Ok(head) => self.head = Some(head),
                    Err((status, message)) => {
                        self.fail(status, message);
                        return None;
                    }
                },
            }
        }
        let head = self.head.as_mut()?;
        let total = head.len + head.content_length;
        if self.input.len() < total {
            if head.expects_continue && !head.continue_sent {
                head.continue_sent = true;
                self.output
                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            self.close_if_eof();
            return None;
        }
        let head = self.head.take()?;
        let body = self.input[head.len..total].to_vec();
        self.input.drain(..total);
        self.scan = HeadScan::default();
        self.request_started = (!self.input.is_empty()).then_some(self.last_input);
        self.pending = Some(Pending {
            head_only: head.method == Method::Head,
            persistence: head.persistence,
        });
        Some(Request {
            method: head.method,
            path: head.path,
            query: head.query,
            host: head.host,
            authorization: head.authorization,
            body,
        })
    }

    /// Answers the request last handed out by [`poll_request`](Self::poll_request) (ignored when
    /// there is none).
    pub fn respond(&mut self, response: Response) {
        let Some(pending) = self.pending.take() else {
            log::debug!("api: a response without a request was dropped");
            return;
        };
        let persistence = if self.closing {
            Persistence::Close
        } else {
            pending.persistence
        };
        encode(&mut self.output, &response, pending.head_only, persistence);
        self.progressed = true;
        if persistence == Persistence::Close {
            self.stop_reading();
        } else if self.input.is_empty() {
            self.close_if_eof();
        }
    }

    /// Bytes to write to the socket.
    #[must_use]
    pub fn pending_output(&self) -> &[u8] {
        self.output.get(self.sent..).unwrap_or_default()
    }

    /// Marks the first `n` bytes of [`pending_output`](Self::pending_output) as written.
    pub fn consume_output(&mut self, n: usize) {
        let n = n.min(self.pending_output().len());
        if n == 0 {
            return;
        }
        self.sent += n;
        self.progressed = true;
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        } else if self.sent > self.output.len() / 2 {
            self.output.drain(..self.sent);
            self.sent = 0;
        }
    }

    /// True once the connection is closing and everything was written: close the socket.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.closing && self.pending_output().is_empty()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next (`None` once finished).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_finished() {
            return None;
        }
        let idle = self.last_activity.checked_add(IDLE_TIMEOUT);
        let request = self.request_deadline();
        match (idle, request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers: a request that did not arrive in time gets a 408, an idle connection (or
    /// one whose peer stopped reading) closes at once, its output dropped.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_finished() {
            return;
        }
        if std::mem::take(&mut self.progressed) {
            self.last_activity = now;
            if self.request_started.is_some() {
                self.request_started = Some(now);
            }
            return;
        }
        if self
            .request_deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            self.fail(Status::RequestTimeout, "request not received in time");
            self.progressed = false;
            self.last_activity = now;
            return;
        }
        if self
            .last_activity
            .checked_add(IDLE_TIMEOUT)
            .is_some_and(|deadline| now >= deadline)
        {
            self.stop_reading();
            self.pending = None;
            self.output.clear();
            self.sent = 0;
        }
    }

    /// The deadline of the request arriving, while one is arriving and we wait for it.
    fn request_deadline(&self) -> Option<Instant> {
        let waiting_for_client = !self.closing
            && self.pending.is_none()
            && !self.input.is_empty()
            && self.pending_output().len() < OUTPUT_HIGH_WATER;
        self.request_started
            .filter(|_| waiting_for_client)
            .and_then(|t| t.checked_add(REQUEST_TIMEOUT))
    }

    /// Answers a bad request with an error and closes.
    fn fail(&mut self, status: Status, message: &str) {
        log::debug!("api: refused a request: {} {message}", status.code());
        encode(
            &mut self.output,
            &Response::error(status, message),
            false,
            Persistence::Close,
        );
        self.progressed = true;
        self.stop_reading();
    }

    /// No further request will be read.
    fn stop_reading(&mut self) {
        self.closing = true;
        self.input = Vec::new();
        self.head = None;
        self.scan = HeadScan::default();
        self.request_started = None;
    }

    /// After end of stream, closes; called where nothing complete is left to answer.
    fn close_if_eof(&mut self) {
        if self.eof && self.pending.is_none() && !self.closing {
            self.stop_reading();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn start() -> Instant {
        Instant::now()
    }

    /// Drains every request the connection gives, answering each with its path as plain text,
    /// and returns the requests and everything written.
    fn serve(conn: &mut Connection) -> (Vec<Request>, String) {
        let mut requests = Vec::new();
        let mut written = Vec::new();
        loop {
            while let Some(request) = conn.poll_request() {
                let body = request.path.clone().into_bytes();
                requests.push(request);
                conn.respond(Response::content("text/plain", body));
            }
            let out = conn.pending_output().to_vec();
            if out.is_empty() {
                break;
            }
            conn.consume_output(out.len());
            written.extend_from_slice(&out);
        }
        (requests, String::from_utf8_lossy(&written).into_owned())
    }

    fn feed_whole(input: &[u8]) -> (Vec<Request>, String, Connection) {
        let mut conn = Connection::new(start());
        conn.feed(start(), input);
        let (requests, out) = serve(&mut conn);
        (requests, out, conn)
    }

    fn feed_byte_by_byte(input: &[u8]) -> (Vec<Request>, String, Connection) {
        let now = start();
        let mut conn = Connection::new(now);
        let mut requests = Vec::new();
        let mut out = String::new();
        for byte in input {
            conn.feed(now, std::slice::from_ref(byte));
            let (r, o) = serve(&mut conn);
            requests.extend(r);
            out.push_str(&o);
        }
        (requests, out, conn)
    }

    #[test]
    fn parses_a_get_and_encodes_the_response() {
        let (requests, out, conn) =
            feed_whole(b"GET /api/ledger/a%2Fb?x=1&y HTTP/1.1\r\nHost: localhost:8080\r\n\r\n");
        assert_eq!(
            requests,
            vec![Request {
                method: Method::Get,
                path: "/api/ledger/a%2Fb".to_string(),
                query: Some("x=1&y".to_string()),
                host: Some("localhost:8080".to_string()),
                authorization: None,
                body: Vec::new(),
            }]
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n/api/ledger/a%2Fb"
        );
        assert!(!conn.is_finished());
        assert!(conn.wants_input());
    }

    #[test]
    fn split_reads_give_the_same_requests_and_output() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /a HTTP/1.1\nHost: a\n\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\nGET /after-crlf HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /c HTTP/1.0\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /q HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        ];
        for input in cases {
            let (whole, whole_out, whole_conn) = feed_whole(input);
            let (split, split_out, split_conn) = feed_byte_by_byte(input);
            assert_eq!(whole, split, "{}", String::from_utf8_lossy(input));
            assert_eq!(whole_out, split_out, "{}", String::from_utf8_lossy(input));
            assert_eq!(whole_conn.is_finished(), split_conn.is_finished());
        }
        let (requests, _, _) = feed_byte_by_byte(cases[1]);
        assert_eq!(requests[0].method, Method::Put);
        assert_eq!(requests[0].body, b"hello");
        let (requests, out, conn) = feed_byte_by_byte(cases[3]);
        let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/after-crlf", "/c"]);
        assert!(out.contains("Connection: keep-alive\r\n"));
        assert!(conn.is_finished(), "HTTP/1.0 without keep-alive closes");
    }

    #[test]
    fn pipelined_requests_are_handed_out_one_at_a_time_in_order() {
        let mut conn = Connection::new(start());
        conn.feed(
            start(),
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: a\r\n\r\n\
              DELETE /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /4 HTTP/1.1\r\n",
        );
        let first = conn.poll_request().unwrap();
        assert_eq!(first.path, "/1");
        assert_eq!(
            conn.poll_request(),
            None,
            "the first one is not answered yet"
        );
        conn.respond(Response::content("text/plain", b"one".to_vec()));
        let second = conn.poll_request().unwrap();
        assert_eq!((second.method, second.path.as_str()), (Method::Head, "/2"));
        conn.respond(Response::content("text/plain", b"two".to_vec()));
        let third = conn.poll_request().unwrap();
        assert_eq!((third.method, third.path.as_str()), (Method::Delete, "/3"));
        conn.respond(Response::content("text/plain", b"three".to_vec()));
        assert_eq!(
            conn.poll_request(),
            None,
            "nothing is read after Connection: close"
        );
        let out = String::from_utf8(conn.pending_output().to_vec()).unwrap();
        let one = out.find("\r\n\r\none").unwrap();
        let two = out.find("Content-Length: 3\r\n").unwrap();
        let three = out.find("three").unwrap();
        assert!(one < three && two < three);
        assert!(!out.contains("two"), "HEAD responses carry no body");
        assert!(out.ends_with("Connection: close\r\n\r\nthree"));
        conn.consume_output(out.len());
        assert!(conn.is_finished());
    }

    #[test]
    fn connection_persistence_follows_version_and_header() {
        let cases: &[(&[u8], bool, Option<&str>)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false, None),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                true,
                Some("close"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, CLOSE\r\n\r\n",
                true,
                Some("close"),
            ),
            (b"GET / HTTP/1.0\r\n\r\n", true, Some("close")),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                false,
                Some("keep-alive"),
            ),
        ];
        for (input, closes, header) in cases {
            let (requests, out, conn) = feed_whole(input);
            assert_eq!(requests.len(), 1);
            assert_eq!(
                conn.is_finished(),
                *closes,
                "{}",
                String::from_utf8_lossy(input)
            );
            match header {
                Some(value) => assert!(out.contains(&format!("Connection: {value}\r\n"))),
                None => assert!(!out.contains("Connection:")),
            }
        }
    }

    #[test]
    fn bad_requests_get_an_error_and_close() {
        let many_headers: String = (0..33).map(|i| format!("X-{i}: v\r\n")).collect();
        let many_headers = format!("GET / HTTP/1.1\r\nHost: a\r\n{many_headers}\r\n");
        let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_TARGET_LEN + 100));
        let long_header = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "b".repeat(9000)
        );
        let cases: Vec<(&[u8], u16)> = vec![
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
                400,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
                400,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
                400,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
            ),
            (
                b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                400,
            ),
            (
                b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                411,
            ),
            (
                b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                411,
            ),
            (
                b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                501,
            ),
            (
                b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
                413,
            ),
            (long_target.as_bytes(), 414),
            (long_header.as_bytes(), 431),
            (many_headers.as_bytes(), 431),
            (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
            (b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            (b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /\r\n\r\n", 400),
            (b"GET http://example.com/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rInjected: c\r\n\r\n",
                400,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n folded: c\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n", 400),
            (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (&[b'\n'; 100], 400),
        ];
        for (input, status) in cases {
            for (requests, out, conn) in [feed_whole(input), feed_byte_by_byte(input)] {
                let shown = String::from_utf8_lossy(&input[..input.len().min(80)]).into_owned();
                assert!(requests.is_empty(), "{shown}");
                assert!(
                    out.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{shown}: {out}"
                );
                assert!(out.contains("Connection: close\r\n"), "{shown}");
                assert!(
                    out.contains("Content-Type: application/json\r\n"),
                    "{shown}"
                );
                assert!(out.ends_with("\"}\n"), "{shown}: {out}");
                assert!(conn.is_finished(), "{shown}");
                assert!(!conn.wants_input());
            }
        }
    }

    #[test]
    fn a_good_request_before_a_bad_one_is_answered_first() {
        let (requests, out, conn) =
            feed_whole(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/9.9\r\nHost: a\r\n\r\n");
        assert_eq!(requests.len(), 1);
        let ok = out.find("HTTP/1.1 200 OK").unwrap();
        let bad = out.find("HTTP/1.1 505 ").unwrap();
        assert!(ok < bad);
        assert!(conn.is_finished());
    }

    #[test]
    fn expect_100_continue_gets_an_interim_response() {
        let mut conn = Connection::new(start());
        conn.feed(
            start(),
            b"PUT /v HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
        );
        assert_eq!(conn.poll_request(), None);
        assert_eq!(conn.pending_output(), b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(conn.poll_request(), None);
        assert_eq!(conn.pending_output().len(), 25, "sent once");
        conn.consume_output(25);
        conn.feed(start(), b"data");
        let request = conn.poll_request().unwrap();
        assert_eq!(request.body, b"data");

        // With the body already there, no interim response.
        let (requests, out, _) = feed_whole(
            b"PUT /v HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
        );
        assert_eq!(requests.len(), 1);
        assert!(!out.contains("100 Continue"));
    }

    #[test]
    fn request_timeout_gives_408_and_closes() {
        let t0 = start();
        let mut conn = Connection::new(t0);
        assert_eq!(conn.poll_timeout(), Some(t0 + IDLE_TIMEOUT));
        let t1 = t0 + Duration::from_secs(1);
        conn.feed(t1, b"GET / HTTP/1.1\r\nHo");
        assert_eq!(conn.poll_request(), None);
        assert_eq!(conn.poll_timeout(), Some(t1 + REQUEST_TIMEOUT));
        conn.handle_timeout(t1 + Duration::from_secs(9));
        assert!(conn.pending_output().is_empty());
        conn.handle_timeout(t1 + REQUEST_TIMEOUT);
        let out = String::from_utf8(conn.pending_output().to_vec()).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
        assert!(out.contains("Connection: close"));
        conn.consume_output(out.len());
        assert!(conn.is_finished());
        assert_eq!(conn.poll_timeout(), None);
    }

    #[test]
    fn slow_body_times_out_too() {
        let t0 = start();
        let mut conn = Connection::new(t0);
        conn.feed(
            t0,
            b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345",
        );
        assert_eq!(conn.poll_request(), None);
        conn.handle_timeout(t0 + REQUEST_TIMEOUT);
        assert!(conn.pending_output().starts_with(b"HTTP/1.1 408 "));
    }

    #[test]
    fn idle_connection_closes_without_a_response() {
        let t0 = start();
        let mut conn = Connection::new(t0);
        conn.feed(t0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let (requests, _) = serve(&mut conn);
        assert_eq!(requests.len(), 1);
        // The response and its reading count as progress: the timers restart once.
        let deadline = conn.poll_timeout().unwrap();
        assert_eq!(deadline, t0 + IDLE_TIMEOUT);
        conn.handle_timeout(deadline);
        assert!(!conn.is_finished());
        let t1 = t0 + IDLE_TIMEOUT;
        assert_eq!(conn.poll_timeout(), Some(t1 + IDLE_TIMEOUT));
        conn.handle_timeout(t1 + IDLE_TIMEOUT - Duration::from_millis(1));
        assert!(!conn.is_finished());
        conn.handle_timeout(t1 + IDLE_TIMEOUT);
        assert!(conn.is_finished());
        assert!(conn.pending_output().is_empty());
    }

    #[test]
    fn a_peer_that_stops_reading_is_dropped() {
        let t0 = start();
        let mut conn = Connection::new(t0);
        conn.feed(t0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        conn.poll_request().unwrap();
        conn.respond(Response::content("text/plain", vec![b'x'; 100_000]));
        conn.consume_output(1000);
        // Progress at the first deadline extends it; none at the next one closes.
        conn.handle_timeout(t0 + IDLE_TIMEOUT);
        assert!(!conn.is_finished());
        conn.handle_timeout(t0 + IDLE_TIMEOUT * 2);
        assert!(conn.is_finished());
        assert!(conn.pending_output().is_empty(), "output dropped");
    }

    #[test]
    fn end_of_stream_answers_complete_requests_then_closes() {
        let mut conn = Connection::new(start());
        conn.feed(
            start(),
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HT",
        );
        conn.handle_eof();
        assert!(!conn.wants_input());
        let (requests, out) = serve(&mut conn);
        let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/1", "/2"]);
        assert_eq!(out.matches("200 OK").count(), 2);
        assert!(conn.is_finished());

        let mut idle = Connection::new(start());
        idle.handle_eof();
        assert!(idle.is_finished());
    }

    #[test]
    fn output_high_water_pauses_pipelining() {
        let mut conn = Connection::new(start());
        conn.feed(
            start(),
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        conn.poll_request().unwrap();
        conn.respond(Response::content("text/plain", vec![0; OUTPUT_HIGH_WATER]));
        assert_eq!(conn.poll_request(), None);
        // Not the client's fault: no request timeout while we hold its request back.
        assert_eq!(conn.request_deadline(), None);
        conn.consume_output(OUTPUT_HIGH_WATER / 2);
        assert_eq!(conn.poll_request().unwrap().path, "/2");
    }

    #[test]
    fn input_beyond_the_limit_closes() {
        let mut conn = Connection::new(start());
        conn.feed(start(), b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n");
        conn.poll_request().unwrap();
        let chunk = vec![b'a'; MAX_FEED];
        while conn.wants_input() {
            conn.feed(start(), &chunk);
        }
        assert!(conn.input.len() <= MAX_INPUT_BUFFER);
        conn.feed(start(), &chunk);
        conn.feed(start(), &chunk);
        assert!(conn.input.len() <= MAX_INPUT_BUFFER);
        // The request handed out is still answered, then the connection closes.
        conn.respond(Response::content("text/plain", b"late".to_vec()));
        let out = String::from_utf8_lossy(conn.pending_output()).into_owned();
        assert!(
            out.contains("Connection: close") && out.ends_with("late"),
            "{out}"
        );
        conn.consume_output(out.len());
        assert!(conn.is_finished());
    }

    #[test]
    fn respond_without_a_request_is_ignored() {
        let mut conn = Connection::new(start());
        conn.respond(Response::content("text/plain", b"x".to_vec()));
        assert!(conn.pending_output().is_empty());
    }

    #[test]
    fn segments_are_percent_decoded() {
        let cases: &[(&str, Result<&[&str], PathError>)] = &[
            ("/", Ok(&[])),
            ("/api/summary", Ok(&["api", "summary"])),
            ("/api/summary/", Ok(&["api", "summary"])),
            ("/api//x", Ok(&["api", "", "x"])),
            ("/a%2Fb/c", Ok(&["a/b", "c"])),
            ("/%C3%A9t%c3%a9/a+b", Ok(&["été", "a+b"])),
            ("/%25", Ok(&["%"])),
            ("/%", Err(PathError::BadEscape)),
            ("/%4", Err(PathError::BadEscape)),
            ("/%zz", Err(PathError::BadEscape)),
            ("/%ff", Err(PathError::NotUtf8)),
            ("/%C3", Err(PathError::NotUtf8)),
        ];
        for (path, expected) in cases {
            let request = Request {
                method: Method::Get,
                path: path.to_string(),
                query: None,
                host: None,
                authorization: None,
                body: Vec::new(),
            };
            let expected: Result<Vec<String>, PathError> =
                (*expected).map(|segments| segments.iter().map(|s| s.to_string()).collect());
            assert_eq!(request.segments(), expected, "{path}");
        }
    }

    /// Request-shaped noise: valid requests (some mutated), fragments of them and random bytes.
    fn random_input(rng: &mut Rng) -> Vec<u8> {
        const REQUESTS: &[&[u8]] = &[
            b"GET /api/summary HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"PUT /api/ledger/a/b/c HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"PUT /v HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
            b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"DELETE /api/ledger/a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ];
        const FRAGMENTS: &[&[u8]] = &[
            b"GET ",
            b"/api/ledger/a/b",
            b"/%zz",
            b" HTTP/1.1\r\n",
            b"Host: localhost\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 70000\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Expect: 100-continue\r\n",
            b"\r\n",
            b"\n",
            b"\r",
        ];
        let mut input = Vec::new();
        for _ in 0..rng.below(12) {
            match rng.below(4) {
                0 | 1 => {
                    let mut request = REQUESTS[rng.below(REQUESTS.len() as u64) as usize].to_vec();
                    if rng.chance(0.3) {
                        let at = rng.below(request.len() as u64) as usize;
                        request[at] = rng.next_u64() as u8;
                    }
                    input.extend_from_slice(&request);
                }
                2 => input.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len() as u64) as usize]),
                _ => {
                    let mut noise = vec![0u8; rng.below(64) as usize];
                    rng.fill(&mut noise);
                    input.extend_from_slice(&noise);
                }
            }
        }
        if rng.chance(0.02) {
            input.extend(std::iter::repeat_n(b'a', rng.below(200_000) as usize));
        }
        input
    }

    #[test]
    fn random_input_never_panics_and_buffers_stay_bounded() {
        let mut rng = Rng::from_seed(0x4b41_4952_4f53);
        let t0 = start();
        let (mut requests, mut refusals) = (0, 0);
        for _ in 0..10_000 {
            let input = random_input(&mut rng);
            let mut now = t0;
            let mut conn = Connection::new(now);
            let mut rest = input.as_slice();
            while !rest.is_empty() && !conn.is_finished() {
                let take = (rng.below(MAX_FEED as u64) as usize + 1).min(rest.len());
                if conn.wants_input() || rng.chance(0.1) {
                    conn.feed(now, &rest[..take]);
                }
                rest = &rest[take..];
                while let Some(request) = conn.poll_request() {
                    requests += 1;
                    assert!(request.body.len() <= MAX_BODY_BYTES);
                    assert!(request.path.len() <= MAX_TARGET_LEN);
                    let _ = request.segments();
                    let body = vec![b'r'; rng.below(1024) as usize];
                    conn.respond(Response::content("text/plain", body));
                }
                assert!(conn.input.len() <= MAX_INPUT_BUFFER);
                assert!(conn.pending_output().len() <= OUTPUT_HIGH_WATER + 64 * 1024);
                if conn.pending_output().starts_with(b"HTTP/1.1 4")
                    || conn.pending_output().starts_with(b"HTTP/1.1 5")
                {
                    refusals += 1;
                }
                let pending = conn.pending_output().len() as u64;
                conn.consume_output(rng.below(pending + 1) as usize);
                if rng.chance(0.05) {
                    now += Duration::from_secs(rng.below(40));
                    conn.handle_timeout(now);
                }
            }
            if rng.chance(0.5) {
                conn.handle_eof();
                while let Some(request) = conn.poll_request() {
                    requests += 1;
                    conn.respond(Response::content("text/plain", request.body));
                }
            }
            // A silent peer is let go after a few timeouts, whatever state it left.
            for _ in 0..4 {
                now += IDLE_TIMEOUT * 2;
                conn.handle_timeout(now);
            }
            assert!(conn.is_finished());
            assert_eq!(conn.poll_timeout(), None);
        }
        assert!(
            requests > 5_000 && refusals > 2_000,
            "{requests} {refusals}"
        );
    }
}
