//! A reproducible catch-up scenario for benchmarks: how many bytes the sync protocol moves when
//! a node comes back having missed a batch of recent changes.

use std::fmt;

use super::names;
use super::{Clock, Entry, Ledger, LedgerError, Limits, Scope, SyncLimits, SyncMessage};
use crate::identity::Identity;
use crate::rng::Rng;

/// 2025-10-09, the scenario's start.
const T0: u64 = 1_760_000_000_000;
const MINUTE: u64 = 60_000;

/// What [`catch_up_report`] measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpReport {
    /// Entries both ledgers held before the away node left.
    pub base_entries: usize,
    /// Changes the away node missed (distinct keys written while it was away).
    pub changes: usize,
    /// Each message: its name and encoded size in bytes, in the order sent.
    pub messages: Vec<(&'static str, usize)>,
    /// Sum of the message sizes.
    pub total_bytes: usize,
    /// Entries carried in full, all messages together.
    pub entries_sent: usize,
    /// Encoded bytes of those entries (the payload; the rest of `total_bytes` is overhead).
    pub entry_bytes: usize,
    /// Whether the two ledgers were identical afterwards.
    pub converged: bool,
}

impl fmt::Display for CatchUpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "catch-up of {} changes over {} entries: ",
            self.changes, self.base_entries
        )?;
        for (name, bytes) in &self.messages {
            write!(f, "{name} {bytes} B, ")?;
        }
        write!(
            f,
            "total {} B in {} messages, {} entries sent ({} B of entries), {}",
            self.total_bytes,
            self.messages.len(),
            self.entries_sent,
            self.entry_bytes,
            if self.converged {
                "converged"
            } else {
                "NOT converged"
            }
        )
    }
}

/// One simulated member: its key, clock and Kairos uuid.
struct Member {
    identity: Identity,
    clock: Clock,
    uuid: String,
    ip: String,
}

impl Member {
    fn new(rng: &mut Rng, index: usize) -> Self {
        let mut seed = [0u8; 32];
        rng.fill(&mut seed);
        Self {
            identity: Identity::from_seed(seed),
            clock: Clock::new(),
            uuid: format!("{:016x}{:016x}-node{index}", rng.next_u64(), rng.next_u64()),
            ip: format!("10.1.{}.{}", index / 250, index % 250 + 1),
        }
    }

    fn write(
        &mut self,
        bucket: &str,
        key: &str,
        value: Option<&[u8]>,
        ms: u64,
    ) -> Result<Entry, LedgerError> {
        let version = self.clock.tick(ms);
        Entry::sign(&self.identity, bucket, key, value, version)
    }

    /// The five entries a member announces when it joins.
    fn join(&mut self, role: &str, ms: u64) -> Result<Vec<Entry>, LedgerError> {
        let bucket = names::DEFAULT_NETWORK_ID;
        let machine = format!(
            "{{\"peer\":\"{}\",\"hostname\":\"{}\",\"os\":\"linux\",\"arch\":\"amd64\",\"version\":\"v0.1.0\"}}",
            self.identity.peer_id(),
            self.uuid
        );
        let (uuid, ip) = (self.uuid.clone(), self.ip.clone());
        Ok(vec![
            self.write(
                bucket,
                &names::uuid_key(&uuid),
                Some(ms.to_string().as_bytes()),
                ms,
            )?,
            self.write(bucket, &names::role_key(&uuid), Some(role.as_bytes()), ms)?,
            self.write(bucket, &names::ip_key(&uuid), Some(ip.as_bytes()), ms)?,
            self.write(names::MACHINES, &ip, Some(machine.as_bytes()), ms)?,
            self.write(names::DHCP, &uuid, Some(ip.as_bytes()), ms)?,
        ])
    }
}

fn random_text(rng: &mut Rng, len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..len)
        .map(|_| {
            ALPHABET
                .get(rng.below(64) as usize)
                .copied()
                .unwrap_or(b'A')
        })
        .collect()
}

/// Builds a network of `nodes` members (five entries each, plus the leader's four cluster keys
/// with a 3 KB kubeconfig) held by two ledgers, A and B. A goes away; meanwhile `changes`
/// distinct keys change at B (liveness refreshes of every other member, then new members
/// joining) and A refreshes its own liveness key. Then A starts one exchange with B — digest,
/// summary, batch, and an answer if A asked for anything — with every message encoded and decoded
/// under [`SyncLimits::default`]. Deterministic for a given `seed`.
pub fn catch_up_report(
    nodes: usize,
    changes: usize,
    seed: u64,
) -> Result<CatchUpReport, LedgerError> {
    let mut rng = Rng::from_seed(seed);
    let mut a = Ledger::new(Limits::default());
    let mut b = Ledger::new(Limits::default());
    let nodes = nodes.max(2);
    let mut members: Vec<Member> = (0..nodes).map(|i| Member::new(&mut rng, i)).collect();

    // The network before A leaves.
    let mut base = Vec::new();
    for (i, m) in members.iter_mut().enumerate() {
        let role = if i == 0 {
            names::ROLE_MASTER
        } else {
            names::ROLE_WORKER
        };
        base.extend(m.join(role, T0 + i as u64)?);
    }
    let kubeconfig = random_text(&mut rng, 3000);
    let node_token = random_text(&mut rng, 100);
    if let Some(leader) = members.first_mut() {
        let bucket = names::DEFAULT_NETWORK_ID;
        let (uuid, ip) = (leader.uuid.clone(), leader.ip.clone());
        base.push(leader.write(
            bucket,
            names::LEADER_AUTO,
            Some(uuid.as_bytes()),
            T0 + MINUTE,
        )?);
        base.push(leader.write(bucket, names::IP_MASTER, Some(ip.as_bytes()), T0 + MINUTE)?);
        base.push(leader.write(bucket, names::NODE_TOKEN, Some(&node_token), T0 + MINUTE)?);
        base.push(leader.write(bucket, names::KUBECONFIG, Some(&kubeconfig), T0 + MINUTE)?);
    }
    let now = T0 + 120 * MINUTE;
    a.apply_all(base.iter().cloned(), now);
    b.apply_all(base.iter().cloned(), now);
    let base_entries = b.len();

    // A (member 1) is away; B hears `changes` changes.
    let away = 1;
    let mut made = 0;
    let mut ms = T0 + 60 * MINUTE;
    for (i, m) in members.iter_mut().enumerate() {
        if made == changes {
            break;
        }
        if i == away {
            continue;
        }
        let key = names::uuid_key(&m.uuid);
        b.apply(
            m.write(
                names::DEFAULT_NETWORK_ID,
                &key,
                Some(ms.to_string().as_bytes()),
                ms,
            )?,
            now,
        )?;
        made += 1;
        ms += 1;
    }
    let mut index = nodes;
    while made < changes {
        let mut m = Member::new(&mut rng, index);
        for e in m
            .join(names::ROLE_WORKER, ms)?
            .into_iter()
            .take(changes - made)
        {
            b.apply(e, now)?;
            made += 1;
        }
        index += 1;
        ms += 1;
    }
    if let Some(m) = members.get_mut(away) {
        let key = names::uuid_key(&m.uuid);
        a.apply(
            m.write(names::DEFAULT_NETWORK_ID, &key, Some(b"back"), ms)?,
            now,
        )?;
    }

    // The exchange, every message through the wire format.
    let limits = SyncLimits::default();
    let mut messages = Vec::new();
    let mut entries_sent = 0;
    let mut entry_bytes = 0;
    let size = |es: &[Entry]| es.iter().map(Entry::encoded_len).sum::<usize>();
    let mut wire = |name: &'static str, msg: SyncMessage| -> Result<SyncMessage, LedgerError> {
        let mut buf = Vec::new();
        msg.encode(&limits, &mut buf)?;
        messages.push((name, buf.len()));
        SyncMessage::decode(&buf, &limits)
    };
    let SyncMessage::Digest(digest) = wire("digest", SyncMessage::Digest(a.digest(&limits, now)))?
    else {
        return Err(LedgerError::Wire(crate::wire::WireError::Invalid("digest")));
    };
    let summary = b.summary_for(&digest, Scope::ALL, &limits, now);
    let SyncMessage::Summary(summary) = wire("summary", SyncMessage::Summary(summary))? else {
        return Err(LedgerError::Wire(crate::wire::WireError::Invalid(
            "summary",
        )));
    };
    entries_sent += summary.entries.len();
    entry_bytes += size(&summary.entries);
    a.apply_all(summary.entries.iter().cloned(), now);
    let batch = a.reconcile(&summary, Scope::ALL, &limits, now);
    let SyncMessage::Batch(batch) = wire("batch", SyncMessage::Batch(batch))? else {
        return Err(LedgerError::Wire(crate::wire::WireError::Invalid("batch")));
    };
    entries_sent += batch.entries.len();
    entry_bytes += size(&batch.entries);
    b.apply_all(batch.entries.iter().cloned(), now);
    if !batch.requests.is_empty() {
        let answer = b.answer(&batch.requests, Scope::ALL, &limits);
        let SyncMessage::Batch(answer) = wire("answer", SyncMessage::Batch(answer))? else {
            return Err(LedgerError::Wire(crate::wire::WireError::Invalid("answer")));
        };
        entries_sent += answer.entries.len();
        entry_bytes += size(&answer.entries);
        a.apply_all(answer.entries, now);
    }
    let total_bytes = messages.iter().map(|(_, n)| n).sum();
    let converged = a.digest(&limits, now) == b.digest(&limits, now) && a.entries().eq(b.entries());
    Ok(CatchUpReport {
        base_entries,
        changes: made,
        messages,
        total_bytes,
        entries_sent,
        entry_bytes,
        converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn away_node_catches_up_on_1000_changes_in_one_round_trip() {
        let report = catch_up_report(200, 1000, 7).unwrap();
        println!("{report}");
        assert!(report.converged, "{report}");
        assert_eq!(report.changes, 1000);
        let names: Vec<_> = report.messages.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["digest", "summary", "batch"],
            "no gaps: no 4th message"
        );
        assert_eq!(report.entries_sent, 1001, "1000 to A, A's own change to B");
    }
}
