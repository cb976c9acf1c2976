//! Who may do what through the local API: two trust levels, the keys only root may read, and the
//! keys nobody may write or delete through the API.
//!
//! | level | who | may |
//! |---|---|---|
//! | [`Access::Inspect`] | any local process on the plain TCP listener (`127.0.0.1:8080`), a unix-socket peer that is neither root nor the agent's own user | every `GET`/`HEAD` except [secret](is_secret_key) values: single secret keys are refused (403), collections leave them out |
//! | [`Access::Full`] | root (or the agent's user) on a unix socket, by `SO_PEERCRED`; a TCP client presenting the [`BearerToken`] | everything, writes and deletes included (no delete of a [reserved key](is_reserved_key)) |
//!
//! Reserved keys are written by the nodes themselves (announcements, election, the master's
//! publications): deleting one through the API is refused at every level, as is deleting a
//! whole bucket that holds one, or one of the nodes' buckets. (Who may *write* a key is the
//! ledger's ownership rule, applied where entries merge on every node.) Every bucket may be some
//! cluster's (`p2p.network_id` is free), so the rules go by key name in every bucket.

use std::fmt;

use super::http::{Request, Response, Status};
use crate::cluster::election::{BALLOT_SUFFIX, MASTER_COMMIT, VOTE_SUFFIX};
use crate::ledger::names;

/// Length in bytes of the API bearer token's secret (printed as hex).
pub const BEARER_TOKEN_BYTES: usize = 32;
/// The bearer token's file in the state directory (mode 0600).
pub const BEARER_TOKEN_FILE: &str = "api.token";
/// Kairos' API socket, where `kairosctl` (and our clients) look first; under `KAIROS_P2P_ROOT`
/// when that is set (tests).
pub const KAIROS_SOCKET: &str = "/run/edgevpn-kairos.sock";

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Read everything but secrets.
    Inspect,
    /// Read and write everything (no delete of a reserved key).
    Full,
}

impl Access {
    /// The level of a unix-socket peer: root and the agent's own user get everything.
    #[must_use]
    pub fn of_unix_peer(peer_uid: Option<u32>, own_uid: u32) -> Access {
        match peer_uid {
            Some(uid) if uid == 0 || uid == own_uid => Access::Full,
            _ => Access::Inspect,
        }
    }
}

/// The API's bearer token: a random secret kept 0600 in the state directory; a TCP client that
/// sends `Authorization: Bearer <hex>` gets [`Access::Full`].
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// A token from secret bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8; BEARER_TOKEN_BYTES]) -> BearerToken {
        BearerToken(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A token read back from its file: `None` unless it is 64 hex digits (a newline allowed).
    #[must_use]
    pub fn parse(text: &str) -> Option<BearerToken> {
        let text = text.trim_end_matches('\n');
        (text.len() == 2 * BEARER_TOKEN_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| BearerToken(text.to_ascii_lowercase()))
    }

    /// The hex text, as stored and as sent.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    #[must_use]
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// The level of one request: the connection's, raised to [`Access::Full`] by the right bearer
/// token. A request with an `Authorization` header that is not the token is refused (401), so
/// a client with a stale token learns it instead of silently getting less.
pub fn request_access(
    connection: Access,
    request: &Request,
    token: Option<&BearerToken>,
) -> Result<Access, Response> {
    let Some(header) = request.authorization.as_deref() else {
        return Ok(connection);
    };
    let presented = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match (presented, token) {
        (Some(p), Some(t)) if t.matches(p) => Ok(Access::Full),
        _ => Err(Response::error(
            Status::Unauthorized,
            "the bearer token is not this agent's (read it from api.token in its state directory)",
        )),
    }
}

/// Keys whose values only [`Access::Full`] reads: the k3s join token (`token-*`) and
/// kubeconfigs (`*-kubeconfig`: `master-kubeconfig`, `control-plane-kubeconfig`), in every bucket.
#[must_use]
pub fn is_secret_key(key: &str) -> bool {
    key.starts_with("token-") || key.ends_with("-kubeconfig")
}

/// Buckets only the nodes write: VPN machines, health checks, address leases, suspicions.
#[must_use]
pub fn is_reserved_bucket(bucket: &str) -> bool {
    names::is_network_wide(bucket)
}

/// Cluster keys the nodes write (in any bucket, since any bucket may be a cluster's): the
/// master's publications, the election's keys and the per-node announcements.
#[must_use]
pub fn is_reserved_key(key: &str) -> bool {
    const CLUSTER: [&str; 5] = [
        names::LEADER_AUTO,
        names::IP_MASTER,
        MASTER_COMMIT,
        "ip-control-plane",
        "control-plane-ip",
    ];
    const NODE_SUFFIXES: [&str; 5] = [
        names::UUID_SUFFIX,
        names::IP_SUFFIX,
        names::ROLE_SUFFIX,
        BALLOT_SUFFIX,
        VOTE_SUFFIX,
    ];
    is_secret_key(key)
        || CLUSTER.contains(&key)
        || NODE_SUFFIXES
            .iter()
            .any(|s| key.len() > s.len() && key.ends_with(s))
}

/// Why an API delete of `bucket/key` is refused, if it is.
#[must_use]
pub fn delete_key_refusal(bucket: &str, key: &str) -> Option<String> {
    if is_reserved_bucket(bucket) || is_reserved_key(key) {
        return Some(format!(
            "{bucket}/{key} is a reserved key the nodes keep; it cannot be deleted through the API"
        ));
    }
    None
}

/// Why deleting the whole of `bucket`, which holds `keys`, is refused, if it is.
pub fn delete_bucket_refusal<'a>(
    bucket: &str,
    mut keys: impl Iterator<Item = &'a str>,
) -> Option<String> {
    if is_reserved_bucket(bucket) {
        return Some(format!(
            "bucket {bucket:?} is kept by the nodes; it cannot be deleted through the API"
        ));
    }
    keys.find(|k| is_reserved_key(k)).map(|k| {
        format!(
            "bucket {bucket:?} holds the reserved key {k:?} (it is a cluster's bucket); it \
             cannot be deleted as a whole: delete its free keys one by one"
        )
    })
}

/// The refusal of a write or delete at [`Access::Inspect`].
#[must_use]
pub fn write_needs_full() -> Response {
    Response::error(
        Status::Forbidden,
        "changing the ledger needs root: use the root-only unix socket (/run/edgevpn-kairos.sock \
         or api.sock in the state directory) or send the API bearer token",
    )
}

/// The refusal of a secret read at [`Access::Inspect`].
#[must_use]
pub fn secret_needs_full(key: &str) -> Response {
    Response::error(
        Status::Forbidden,
        &format!(
            "{key} is a secret: read it as root through the root-only unix socket \
             (/run/edgevpn-kairos.sock or api.sock in the state directory) or send the API \
             bearer token"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::Method;

    fn request(authorization: Option<&str>) -> Request {
        Request {
            method: Method::Get,
            path: "/api/summary".to_string(),
            query: None,
            host: None,
            authorization: authorization.map(str::to_string),
            body: Vec::new(),
        }
    }

    #[test]
    fn unix_peers_root_and_owner_get_full_access() {
        assert_eq!(Access::of_unix_peer(Some(0), 1000), Access::Full);
        assert_eq!(Access::of_unix_peer(Some(1000), 1000), Access::Full);
        assert_eq!(Access::of_unix_peer(Some(65534), 0), Access::Inspect);
        assert_eq!(Access::of_unix_peer(None, 0), Access::Inspect);
    }

    #[test]
    fn bearer_token_raises_access_and_a_wrong_one_is_refused() {
        let token = BearerToken::from_bytes(&[0xab; BEARER_TOKEN_BYTES]);
        let hex = token.as_str().to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(BearerToken::parse(&format!("{hex}\n")), Some(token.clone()));
        assert_eq!(BearerToken::parse("abc"), None);
        let with = |h: Option<&str>, t: Option<&BearerToken>| {
            request_access(Access::Inspect, &request(h), t).map_err(|r| r.status)
        };
        assert_eq!(with(None, Some(&token)), Ok(Access::Inspect));
        assert_eq!(
            with(Some(&format!("Bearer {hex}")), Some(&token)),
            Ok(Access::Full)
        );
        assert_eq!(
            with(Some(&format!("bearer  {hex}")), Some(&token)),
            Ok(Access::Full)
        );
        let mut wrong = hex.clone();
        wrong.replace_range(63.., "0");
        for bad in [
            format!("Bearer {wrong}"),
            format!("Basic {hex}"),
            hex.clone(),
            "Bearer".to_string(),
        ] {
            assert_eq!(
                with(Some(&bad), Some(&token)),
                Err(Status::Unauthorized),
                "{bad}"
            );
        }
        assert_eq!(
            with(Some(&format!("Bearer {hex}")), None),
            Err(Status::Unauthorized)
        );
        assert_eq!(format!("{token:?}"), "BearerToken(..)");
    }

    #[test]
    fn secrets_and_reserved_keys_by_name() {
        for key in [
            "token-nodetoken",
            "master-kubeconfig",
            "control-plane-kubeconfig",
        ] {
            assert!(is_secret_key(key) && is_reserved_key(key), "{key}");
        }
        for key in [
            "ip-master",
            "leader-auto",
            "master-commit",
            "n1-uuid",
            "n1-ip",
            "n1-vote",
        ] {
            assert!(!is_secret_key(key) && is_reserved_key(key), "{key}");
        }
        for key in ["hello", "-ip", "mytoken", "kubeconfig"] {
            assert!(!is_reserved_key(key), "{key}");
        }
        assert!(delete_key_refusal("kairos", "n1-role").is_some());
        assert!(delete_key_refusal("test", "hello").is_none());
        assert!(delete_bucket_refusal("test", ["a", "b"].into_iter()).is_none());
        let refused = delete_bucket_refusal("kairos", ["a", "ip-master"].into_iter());
        assert!(refused.is_some_and(|m| m.contains("ip-master")));
        assert!(delete_bucket_refusal("dhcp", std::iter::empty()).is_some());
    }
}
