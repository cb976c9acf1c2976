//! Role requests: `kairosctl role set <uuid> <role>` through a node that may not write that
//! node's role.
//!
//! The ownership rule (see [`crate::ledger::authority`]) lets only a node itself and the leader
//! of record write `<uuid>-role`. A `role set` for another node reaching any other node's API is
//! stored as a request in a key the requesting node owns,
//! `<requester>-role-request-<hash of the target>` = `{"uuid": target, "role": value}`. The
//! leader of record, and the target node itself, apply a request newer than the role it names by
//! writing the real `<uuid>-role` (a master role only for the committed master, as the rule
//! says); the requester deletes its request once the role is what it asked for or newer than the
//! request. A request for a node that has not joined yet waits in the ledger until a leader or
//! the node itself applies it.

use serde::{Deserialize, Serialize};

use crate::identity::PeerId;
use crate::ledger::{Ledger, LedgerError, edgevpn, names};

use super::Write;

/// The value of a role request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRequest {
    /// The node whose role is asked for.
    pub uuid: String,
    /// The value to store in `<uuid>-role`, as the client sent it.
    pub role: String,
}

/// Who this node is, for requests.
pub struct Me<'a> {
    /// Its uuid.
    pub uuid: &'a str,
    /// Its peer id.
    pub peer: PeerId,
}

/// `write` as this node may make it: a role for another node becomes a request unless this
/// node is the leader of record. Refuses what no leader could apply (a master role for a node
/// that is not the committed master, a value that is no role).
pub fn route(
    ledger: &Ledger,
    bucket: &str,
    me: &Me<'_>,
    write: Write,
) -> Result<Write, LedgerError> {
    let target = match (write.bucket == bucket, names::parse_node_key(&write.key)) {
        (true, Some(names::NodeKey::Role(target))) if target != me.uuid => target.to_string(),
        _ => return Ok(write),
    };
    match ledger.leader_of_record(bucket) {
        Some(leader) if leader == me.peer => return Ok(write),
        // Nobody leads yet and the node has not joined: the rule lets any member write it.
        None if ledger.bound_peer(&target).is_none() => return Ok(write),
        _ => {}
    }
    let Some(value) = &write.value else {
        // Deleting a role is refused by the API; a deletion is the leader's or the node's own.
        return Ok(write);
    };
    let refused = |reason| LedgerError::NotOwner {
        bucket: write.bucket.clone(),
        key: write.key.clone(),
        writer: me.peer,
        reason,
    };
    let text = String::from_utf8(value.clone()).map_err(|_| refused("a role is text"))?;
    let role = edgevpn::text(&text);
    if !names::is_role(&role) {
        return Err(refused("not a role"));
    }
    if is_master(&role) && committed(ledger, bucket).as_deref() != Some(target.as_str()) {
        return Err(refused("master role for a node not committed"));
    }
    let request = RoleRequest {
        uuid: target.clone(),
        role: text,
    };
    let json = serde_json::to_vec(&request).unwrap_or_default();
    Ok(Write::put(
        bucket,
        &names::role_request_key(me.uuid, &target),
        json,
    ))
}

/// The writes requests ask of this node now: as the leader of record (`leading`) or as the
/// target, the roles to write; as a requester, the requests to delete.
pub fn pending(ledger: &Ledger, bucket: &str, me: &Me<'_>, leading: bool) -> Vec<Write> {
    let mut writes = Vec::new();
    let own_prefix = format!("{}{}", me.uuid, names::ROLE_REQUEST_INFIX);
    let committed = committed(ledger, bucket);
    for (key, value) in ledger.bucket(bucket) {
        if !key.contains(names::ROLE_REQUEST_INFIX) {
            continue;
        }
        let Some(entry) = ledger.entry(bucket, key) else {
            continue;
        };
        let Ok(request) = serde_json::from_slice::<RoleRequest>(value) else {
            continue;
        };
        if request.uuid.is_empty() {
            continue;
        }
        let role_key = names::role_key(&request.uuid);
        let held = ledger.entry(bucket, &role_key);
        let fulfilled = held.is_some_and(|h| {
            h.version > entry.version
                || h.value
                    .as_deref()
                    .map(|v| edgevpn::text(&String::from_utf8_lossy(v)))
                    == Some(edgevpn::text(&request.role))
        });
        if fulfilled {
            if key.starts_with(&own_prefix) && entry.writer == me.peer {
                writes.push(Write::delete(bucket, key));
            }
            continue;
        }
        let role = edgevpn::text(&request.role);
        let applier = leading || request.uuid == me.uuid;
        let allowed = names::is_role(&role)
            && (!is_master(&role) || committed.as_deref() == Some(request.uuid.as_str()));
        if applier && allowed {
            log::info!(
                "role request {bucket}/{key} (by {}): {} becomes {role}",
                entry.writer,
                request.uuid
            );
            writes.push(Write::put(bucket, &role_key, request.role.as_bytes()));
        }
    }
    writes
}

fn is_master(role: &str) -> bool {
    matches!(role, names::ROLE_MASTER | names::ROLE_MASTER_CLUSTERINIT)
}

/// The committed master in `bucket`.
fn committed(ledger: &Ledger, bucket: &str) -> Option<String> {
    let raw = ledger.get(bucket, super::election::MASTER_COMMIT)?;
    serde_json::from_slice::<super::election::Commit>(raw)
        .ok()
        .map(|c| c.candidate)
}
