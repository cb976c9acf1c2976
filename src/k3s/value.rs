//! Values from the ledger that reach k3s' command line, its environment files and unit files,
//! parsed before use: any member (and, depending on the API's trust levels, a local process) can
//! write a ledger key, so nothing read there is trusted as text.
//!
//! - [`master_address`]: `ip-master` must be one unicast IP address (surrounding blanks allowed,
//!   nothing else): no host names, ports, paths or control characters.
//! - [`K3sToken`]: the join token, printable ASCII without blanks (k3s' own tokens are
//!   `K10<hex>::<user>:<password>` or `<id>.<secret>`), at most [`MAX_K3S_TOKEN_LEN`] bytes.
//! - [`check_text`]: what every argument, environment name and value of a plan must pass: no
//!   control characters (a `\r` or `\n` in a unit file starts a new directive).

use std::fmt;
use std::net::IpAddr;

/// Longest accepted k3s join token, in bytes (k3s' are about 110).
pub const MAX_K3S_TOKEN_LEN: usize = 1024;

/// Why a ledger value cannot reach k3s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueError {
    /// `ip-master` is not one unicast IP address.
    NotAnAddress(String),
    /// The node token is empty, too long or has a character outside printable ASCII.
    BadToken(&'static str),
    /// A control character in a value bound for a command line or a file.
    ControlCharacter {
        /// What the value is (`argument 3`, `environment K3S_URL`).
        what: String,
    },
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnAddress(shown) => {
                write!(f, "ip-master is not a unicast IP address: {shown}")
            }
            Self::BadToken(why) => write!(f, "the node token (token-nodetoken) {why}"),
            Self::ControlCharacter { what } => {
                write!(f, "{what} contains a control character")
            }
        }
    }
}

impl std::error::Error for ValueError {}

/// `ip-master` as an address k3s can join: one IPv4 or IPv6 address, not unspecified, not
/// multicast, not broadcast.
pub fn master_address(value: &str) -> Result<IpAddr, ValueError> {
    let refuse = || ValueError::NotAnAddress(shown(value));
    let ip: IpAddr = value
        .trim_matches([' ', '\t', '\n'])
        .parse()
        .map_err(|_| refuse())?;
    let unusable = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if unusable { Err(refuse()) } else { Ok(ip) }
}

/// A k3s join token: built only by [`K3sToken::parse`]. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct K3sToken(String);

impl K3sToken {
    /// Parses a token as read from k3s' `node-token` file or the ledger: surrounding blanks and
    /// line ends are dropped; the rest must be 1 to [`MAX_K3S_TOKEN_LEN`] bytes of printable
    /// ASCII without blanks (`!` to `~`).
    pub fn parse(value: &str) -> Result<Self, ValueError> {
        let token = value.trim_matches([' ', '\t', '\n', '\r']);
        if token.is_empty() {
            return Err(ValueError::BadToken("is empty"));
        }
        if token.len() > MAX_K3S_TOKEN_LEN {
            return Err(ValueError::BadToken("is longer than 1024 bytes"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ValueError::BadToken(
                "has a character that is not printable ASCII",
            ));
        }
        Ok(Self(token.to_owned()))
    }

    /// The token text (a secret: for k3s' environment only).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether both tokens are of one k3s cluster: the same CA hash of the full form
    /// (`K10<ca hash>::<user>:<secret>`), else the same text.
    #[must_use]
    pub fn same_cluster(&self, other: &Self) -> bool {
        let ca = |t: &Self| {
            t.0.strip_prefix("K10")
                .and_then(|rest| rest.split_once("::"))
                .map(|(hash, _)| hash.to_string())
        };
        match (ca(self), ca(other)) {
            (Some(a), Some(b)) => a == b,
            _ => self.0 == other.0,
        }
    }
}

impl fmt::Debug for K3sToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("K3sToken(<redacted>)")
    }
}

/// Refuses `value` when it holds a control character (C0, DEL or C1); `what` names it.
pub fn check_text(what: impl FnOnce() -> String, value: &str) -> Result<(), ValueError> {
    if value.chars().any(char::is_control) {
        Err(ValueError::ControlCharacter { what: what() })
    } else {
        Ok(())
    }
}

/// A ledger value for a message: escaped and shortened (at most 40 characters).
fn shown(value: &str) -> String {
    let short: String = value.chars().take(40).collect();
    let more = if short.len() < value.len() { "..." } else { "" };
    format!("\"{}{more}\"", short.escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_one_cluster_share_the_ca_hash() {
        let t = |s: &str| K3sToken::parse(s).unwrap();
        let cases = [
            ("K10aa::server:one", "K10aa::server:two", true),
            ("K10aa::server:one", "K10bb::server:one", false),
            ("K10aa::node:one", "K10aa::server:one", true),
            ("plain", "plain", true),
            ("plain", "other", false),
            ("K10aa::server:one", "one", false),
        ];
        for (a, b, same) in cases {
            assert_eq!(t(a).same_cluster(&t(b)), same, "{a} / {b}");
        }
    }

    #[test]
    fn master_addresses() {
        assert_eq!(master_address("10.1.0.1"), Ok("10.1.0.1".parse().unwrap()));
        assert_eq!(master_address(" fd00::1\n"), Ok("fd00::1".parse().unwrap()));
        for hostile in [
            "",
            "10.1.0.1\r\nExecStart=/bin/sh -c id",
            "10.1.0.1\rExecStart=x",
            "10.1.0.1:6443",
            "master.example",
            "https://10.1.0.1",
            "10.1.0.1 10.1.0.2",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "10.1.0.1\0",
            "10.1.0.1/24",
        ] {
            let e = master_address(hostile).unwrap_err();
            assert!(matches!(e, ValueError::NotAnAddress(_)), "{hostile:?}");
            assert!(!e.to_string().contains('\r'), "{e}");
        }
    }

    #[test]
    fn tokens() {
        let t = K3sToken::parse("K10abc::server:def\n").unwrap();
        assert_eq!(t.expose(), "K10abc::server:def");
        assert_eq!(
            K3sToken::parse("abcdef.0123456789abcdef")
                .unwrap()
                .expose()
                .len(),
            23
        );
        assert!(!format!("{t:?}").contains("K10"));
        for hostile in [
            "",
            " \n",
            "K10abc\r\nExecStart=/bin/sh",
            "K10abc def",
            "K10abc\u{7f}",
            "K10abc\u{85}x",
            "K10é",
        ] {
            assert!(K3sToken::parse(hostile).is_err(), "{hostile:?}");
        }
        assert!(K3sToken::parse(&"a".repeat(MAX_K3S_TOKEN_LEN)).is_ok());
        assert!(K3sToken::parse(&"a".repeat(MAX_K3S_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn control_characters() {
        assert!(check_text(|| "x".into(), "--node-label=a b").is_ok());
        for c in ['\n', '\r', '\0', '\t', '\u{1b}', '\u{7f}', '\u{85}'] {
            let e = check_text(|| "argument 2".into(), &format!("a{c}b")).unwrap_err();
            assert_eq!(e.to_string(), "argument 2 contains a control character");
        }
    }
}
