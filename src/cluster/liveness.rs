//! Liveness: which nodes count as alive, judged from connections, with only changes published.
//!
//! A node writes its heartbeat `healthcheck/<uuid>` when it starts, when somebody suspects it
//! (below) and otherwise only every [`Liveness::renew_ms`] (30 liveness timeouts). The members
//! it is connected to watch it: the overlay keeps every connection alive (a QUIC PING when idle)
//! and reports the peer lost after the transport's idle timeout, which the node sets to
//! [`watch_timeout`] (half the liveness timeout, at most 30 s). A member that loses a node's connection (idle timeout, reset,
//! closed by the other side) writes a *suspicion* in its own key `suspects/<its uuid>`: the
//! node's uuid, the version of the heartbeat it held and when. A node that sees itself suspected
//! at its current heartbeat writes a new one at once (news, pushed to everyone), which answers the
//! suspicion; one that does not answer within [`Liveness::grace_ms`] of the suspicion counts as
//! dead everywhere. So an idle cluster sends no heartbeats: what it costs is the keep-alives of
//! each node's few connections, whatever the cluster's size, and a death costs one suspicion
//! per member that was connected to the dead node.
//!
//! Everything that judged a heartbeat's age keeps doing so through [`Liveness::heard_ms`]: the
//! time a node was last known alive, as if it had kept beating. For a node nobody suspects that
//! is its heartbeat plus the renewal period (a node whose watchers all died with it still
//! expires, at the latest a liveness timeout after its next renewal was due); for a suspected
//! one it is the suspicion's time plus the grace, minus the liveness timeout. A node is live while
//! that is less than the liveness timeout behind this node's hybrid time, as before; ages are
//! measured in versions and times stamped by their writers, so every node reaches the same
//! verdict from the same entries.
//!
//! Counting a dead node as alive for longer (nobody watched it) only makes quorums larger (safe,
//! if slower); counting a live node as dead takes a suspicion it could not answer within the
//! grace: it was cut off from the suspecting side, which is what the liveness timeout always
//! meant.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ledger::{Hlc, Ledger, names};

/// Most suspicions one node's entry holds (the oldest go first): a node watches its few
/// neighbours, so even a whole site lost at once is a handful per watcher.
pub const MAX_SUSPICIONS: usize = 64;

/// A heartbeat is renewed every this many liveness timeouts when nobody suspects its node.
pub const RENEWAL_TIMEOUTS: u32 = 30;

/// The timing of liveness, from the cluster's liveness timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A node last known alive this long ago is dead (`p2p.liveness_timeout`).
    pub timeout_ms: u64,
    /// How often a node nobody suspects renews its heartbeat.
    pub renew_ms: u64,
    /// How long a suspected node has to answer.
    pub grace_ms: u64,
}

/// How long a connection may stay silent before the transport reports its peer lost, for a
/// liveness timeout of `timeout`: half of it, between 1 s and the transport's usual 30 s.
pub fn watch_timeout(timeout: Duration) -> Duration {
    (timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

impl Liveness {
    /// The timing for a liveness timeout of `timeout`: renewal every [`RENEWAL_TIMEOUTS`]
    /// timeouts, and a grace of what the timeout leaves after the [`watch_timeout`], so that
    /// a node that stops answering counts as dead a liveness timeout after it was last heard,
    /// as when every node beat every quarter timeout.
    pub fn for_timeout(timeout: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let grace = timeout.saturating_sub(watch_timeout(timeout));
        Self {
            timeout_ms: ms(timeout),
            renew_ms: ms(timeout).saturating_mul(u64::from(RENEWAL_TIMEOUTS)),
            grace_ms: ms(grace),
        }
    }

    /// When a node whose heartbeat has version `beat` was last known alive (unix ms, as if it
    /// had kept beating), given the time of the earliest suspicion of that heartbeat, if any.
    pub fn heard_ms(&self, beat: Hlc, suspected_at: Option<u64>) -> u64 {
        let lease = beat.millis().saturating_add(self.renew_ms);
        match suspected_at {
            Some(at) => lease.min(
                at.saturating_add(self.grace_ms)
                    .saturating_sub(self.timeout_ms),
            ),
            None => lease,
        }
    }

    /// How long before hybrid time `now_ms` a node was last known alive (0 while it is).
    pub fn silence_ms(&self, now_ms: u64, beat: Hlc, suspected_at: Option<u64>) -> u64 {
        now_ms.saturating_sub(self.heard_ms(beat, suspected_at))
    }
}

/// One suspicion: a watcher lost `uuid`'s connection while holding its heartbeat `beat`, at
/// unix ms `at` (the watcher's hybrid time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspicion {
    /// The suspected node.
    pub uuid: String,
    /// The heartbeat version the watcher held.
    pub beat: Hlc,
    /// When.
    pub at: u64,
}

/// Encodes a watcher's suspicions as the value of its `suspects/<uuid>` entry: one line
/// `<uuid> <heartbeat version> <unix ms>` each.
pub fn encode(suspicions: &[Suspicion]) -> Vec<u8> {
    let mut out = String::new();
    for s in suspicions.iter().take(MAX_SUSPICIONS) {
        out.push_str(&format!("{} {} {}\n", s.uuid, s.beat.0, s.at));
    }
    out.into_bytes()
}

/// Decodes a `suspects/<uuid>` value; lines that do not parse are skipped, and at most
/// [`MAX_SUSPICIONS`] are read.
pub fn decode(value: &[u8]) -> Vec<Suspicion> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let uuid = parts.next().filter(|u| !u.is_empty())?;
            let beat = parts.next()?.parse::<u64>().ok()?;
            let at = parts.next()?.parse::<u64>().ok()?;
            parts.next().is_none().then(|| Suspicion {
                uuid: uuid.to_string(),
                beat: Hlc(beat),
                at,
            })
        })
        .take(MAX_SUSPICIONS)
        .collect()
}

/// Every suspicion the ledger holds, by suspected uuid: the heartbeat version and time of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suspicions(BTreeMap<String, Vec<(Hlc, u64)>>);

impl Suspicions {
    /// Reads the `suspects` bucket.
    pub fn read(ledger: &Ledger) -> Self {
        let mut map: BTreeMap<String, Vec<(Hlc, u64)>> = BTreeMap::new();
        for (_, value) in ledger.bucket(names::SUSPECTS) {
            for s in decode(value) {
                map.entry(s.uuid).or_default().push((s.beat, s.at));
            }
        }
        Self(map)
    }

    /// The earliest suspicion of `uuid` that its heartbeat `beat` has not answered (a suspicion
    /// of that heartbeat or of a newer one).
    pub fn of(&self, uuid: &str, beat: Hlc) -> Option<u64> {
        self.0
            .get(uuid)?
            .iter()
            .filter(|(held, _)| *held >= beat)
            .map(|(_, at)| *at)
            .min()
    }
}

/// When `uuid` was last known alive by `ledger` (see [`Liveness::heard_ms`]), from its heartbeat
/// (`None`: it never beat, or its heartbeat was deleted).
pub fn heard_ms(
    ledger: &Ledger,
    suspicions: &Suspicions,
    liveness: &Liveness,
    uuid: &str,
) -> Option<u64> {
    let beat = ledger
        .entry(names::HEALTHCHECK, uuid)
        .filter(|e| e.value.is_some())?
        .version;
    Some(liveness.heard_ms(beat, suspicions.of(uuid, beat)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_heard_until_its_renewal_or_a_suspicion_plus_the_grace() {
        let l = Liveness::for_timeout(Duration::from_secs(60));
        assert_eq!((l.renew_ms, l.grace_ms), (1_800_000, 30_000));
        let beat = Hlc::new(1_000_000, 0);
        // (suspected at, silence at 1_000_000 + 50 s, at + 1 h)
        let cases = [
            (None, 0, 3_600_000 - 1_800_000),
            (Some(1_010_000), 50_000 - 10_000 - 30_000 + 60_000, 0),
            (Some(1_000_000), 50_000 - 30_000 + 60_000, 0),
        ];
        for (at, silence_50s, silence_1h) in cases {
            assert_eq!(l.silence_ms(1_050_000, beat, at), silence_50s, "{at:?}");
            if at.is_none() {
                assert_eq!(l.silence_ms(1_000_000 + 3_600_000, beat, at), silence_1h);
            }
        }
        // Dead exactly a grace after the suspicion.
        let at = 2_000_000;
        assert!(l.silence_ms(at + l.grace_ms - 1, beat, Some(at)) < l.timeout_ms);
        assert!(l.silence_ms(at + l.grace_ms, beat, Some(at)) >= l.timeout_ms);
    }

    #[test]
    fn suspicions_round_trip_and_bad_lines_are_skipped() {
        let list = vec![
            Suspicion {
                uuid: "node-a".into(),
                beat: Hlc::new(5, 2),
                at: 9,
            },
            Suspicion {
                uuid: "node-b".into(),
                beat: Hlc(u64::MAX),
                at: u64::MAX,
            },
        ];
        assert_eq!(decode(&encode(&list)), list);
        assert_eq!(decode(b"node-a 1 2\n\xff\n"), Vec::new(), "not UTF-8");
        let bad = b"node-a 1\nnode-b x 3\n 1 2\nnode-c 1 2 3\n\nnode-d 4 5\n";
        assert_eq!(
            decode(bad),
            vec![Suspicion {
                uuid: "node-d".into(),
                beat: Hlc(4),
                at: 5
            }]
        );
        let many: Vec<Suspicion> = (0..100)
            .map(|i| Suspicion {
                uuid: format!("n{i}"),
                beat: Hlc(1),
                at: 1,
            })
            .collect();
        assert_eq!(decode(&encode(&many)).len(), MAX_SUSPICIONS);
    }
}
