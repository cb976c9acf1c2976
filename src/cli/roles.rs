//! `role list` and `role set`: node roles in the cluster bucket, as Kairos keeps them
//! (`<network_id>/<uuid>-role`, written through edgevpn's Go client by `kairosctl role set`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::cluster::requests::RoleRequest;
use crate::cluster::view::Announcement;
use crate::ledger::{MAX_KEY_LEN, edgevpn, names};

use super::table;

/// Why a `role set` is refused before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleError {
    /// Not a role the cluster knows.
    Unknown(String),
    /// `none` is asked for in a node's cloud-config, not set in the ledger.
    NoneIsConfig,
    /// Not a usable node uuid.
    BadUuid(&'static str),
}

impl fmt::Display for RoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleError::Unknown(role) => write!(
                f,
                "unknown role {role:?}: use one of {}",
                names::ROLES.join(", ")
            ),
            RoleError::NoneIsConfig => write!(
                f,
                "`none` (VPN only, no k3s) is set with p2p.role: none in that node's \
                 cloud-config; the ledger holds {}",
                names::ROLES.join(", ")
            ),
            RoleError::BadUuid(why) => write!(f, "node uuid {why}"),
        }
    }
}

impl std::error::Error for RoleError {}

/// The ledger key and role for `role set <uuid> <role>`.
pub fn role_key(uuid: &str, role: &str) -> Result<(String, &'static str), RoleError> {
    if uuid.is_empty() {
        return Err(RoleError::BadUuid("is empty"));
    }
    if uuid.chars().any(char::is_control) {
        return Err(RoleError::BadUuid("holds a control character"));
    }
    if uuid.len() + names::ROLE_SUFFIX.len() > MAX_KEY_LEN {
        return Err(RoleError::BadUuid("is too long"));
    }
    let role = match names::ROLES.iter().find(|r| **r == role) {
        Some(known) => *known,
        None if role == "none" => return Err(RoleError::NoneIsConfig),
        None => return Err(RoleError::Unknown(role.chars().take(64).collect())),
    };
    Ok((names::role_key(uuid), role))
}

/// One node of the `role list` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRow {
    /// Its uuid.
    pub uuid: String,
    /// Its hostname, once it has announced itself.
    pub hostname: String,
    /// Its role ("" when none).
    pub role: String,
    /// Listed by `/api/nodes` (which lists online nodes only).
    pub online: bool,
}

/// Every node of the cluster bucket (`GET /api/ledger/<network_id>`): those that announced
/// themselves (`<uuid>-uuid`) and those given a role (`<uuid>-role`, perhaps before joining).
pub fn rows(bucket: &BTreeMap<String, String>, online: &BTreeSet<String>) -> Vec<RoleRow> {
    let mut by_uuid: BTreeMap<&str, RoleRow> = BTreeMap::new();
    // Pending `role set` requests (see `cluster::requests`), shown until the role is written.
    let mut requested: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in bucket {
        if key.contains(names::ROLE_REQUEST_INFIX) {
            if let Ok(r) = serde_json::from_str::<RoleRequest>(&edgevpn::text(value)) {
                requested.insert(r.uuid, edgevpn::text(&r.role));
            }
            continue;
        }
        let (uuid, is_role) = match names::parse_node_key(key) {
            Some(names::NodeKey::Uuid(uuid)) => (uuid, false),
            Some(names::NodeKey::Role(uuid)) => (uuid, true),
            _ => continue,
        };
        let row = by_uuid.entry(uuid).or_insert_with(|| RoleRow {
            uuid: uuid.to_string(),
            hostname: String::new(),
            role: String::new(),
            online: online.contains(uuid),
        });
        if is_role {
            row.role = edgevpn::text(value);
        } else if let Ok(ann) = serde_json::from_str::<Announcement>(&edgevpn::text(value)) {
            row.hostname = ann.hostname;
        }
    }
    let mut rows: Vec<RoleRow> = by_uuid.into_values().collect();
    for (uuid, role) in requested {
        match rows.iter_mut().find(|r| r.uuid == uuid) {
            Some(row) if row.role.is_empty() => row.role = role,
            Some(_) => {}
            None => rows.push(RoleRow {
                online: online.contains(&uuid),
                uuid,
                hostname: String::new(),
                role,
            }),
        }
    }
    rows.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    rows
}

/// The `role list` table.
pub fn render(rows: &[RoleRow]) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.uuid.clone(),
                dash(&r.hostname),
                dash(&r.role),
                if r.online { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    table::render(&["UUID", "HOSTNAME", "ROLE", "ONLINE"], &cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    #[test]
    fn role_set_validates() {
        for (uuid, role, expected) in [
            ("abc-node1", "master", Ok(("abc-node1-role", "master"))),
            (
                "abc-node1",
                "master/ha",
                Ok(("abc-node1-role", "master/ha")),
            ),
            (
                "abc",
                "master/clusterinit",
                Ok(("abc-role", "master/clusterinit")),
            ),
            ("abc", "worker", Ok(("abc-role", "worker"))),
            ("abc", "none", Err(RoleError::NoneIsConfig)),
            ("abc", "Master", Err(RoleError::Unknown("Master".into()))),
            ("abc", "", Err(RoleError::Unknown(String::new()))),
            ("", "worker", Err(RoleError::BadUuid("is empty"))),
            (
                "a\nb",
                "worker",
                Err(RoleError::BadUuid("holds a control character")),
            ),
        ] {
            let got = role_key(uuid, role);
            let expected = expected.map(|(k, r)| (k.to_string(), r));
            assert_eq!(got, expected, "{uuid:?} {role:?}");
        }
        let long = "u".repeat(MAX_KEY_LEN);
        assert_eq!(
            role_key(&long, "worker"),
            Err(RoleError::BadUuid("is too long"))
        );
        assert!(RoleError::NoneIsConfig.to_string().contains("p2p.role"));
    }

    #[test]
    fn rows_merge_announcements_roles_and_presence() {
        let ann =
            |host: &str| String::from_utf8(Announcement::new(Role::Auto, host).to_json()).unwrap();
        let kairos_role = serde_json::to_string(&edgevpn::client_segment("master/ha")).unwrap();
        let bucket: BTreeMap<String, String> = [
            ("a-uuid", ann("host-a")),
            ("a-role", "master".to_string()),
            ("b-uuid", ann("host-b")),
            ("c-role", kairos_role),
            ("d-uuid", "{garbage".to_string()),
            ("leader-auto", "a".to_string()),
            ("ip-master", "10.1.0.1".to_string()),
            // Pending requests: shown where no role is written yet.
            (
                "a-role-request-0badc0de",
                r#"{"uuid":"b","role":"worker"}"#.to_string(),
            ),
            (
                "b-role-request-0badc0de",
                r#"{"uuid":"a","role":"worker"}"#.to_string(),
            ),
            (
                "b-role-request-12345678",
                r#"{"uuid":"e","role":"master/ha"}"#.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let online: BTreeSet<String> = ["a", "b"].into_iter().map(String::from).collect();
        let got = rows(&bucket, &online);
        let row = |uuid: &str, hostname: &str, role: &str, online: bool| RoleRow {
            uuid: uuid.into(),
            hostname: hostname.into(),
            role: role.into(),
            online,
        };
        assert_eq!(
            got,
            [
                row("a", "host-a", "master", true),
                row("b", "host-b", "worker", true),
                row("c", "", "master/ha", false),
                row("d", "", "", false),
                row("e", "", "master/ha", false),
            ]
        );
        assert_eq!(
            render(&got),
            "UUID  HOSTNAME  ROLE       ONLINE\n\
             a     host-a    master     yes\n\
             b     host-b    worker     yes\n\
             c     -         master/ha  no\n\
             d     -         -          no\n\
             e     -         master/ha  no\n"
        );
    }
}
