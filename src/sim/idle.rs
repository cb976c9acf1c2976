//! Idle traffic of simulated nodes, broken down by what it carries (issue 16, goal 3).
//!
//! The simulator sees UDP payloads ([`PacketKind`]); the QUIC share is split further with the
//! nodes' own counters of the messages they hand to the transport: ledger pushes (news,
//! heartbeats and suspicions included), anti-entropy exchanges and member lists. What QUIC
//! sends beyond those message bytes (packet headers, AEAD tags, stream frames, ACKs, PINGs,
//! flow-control updates) is reported as QUIC overhead.

use std::time::Duration;

use crate::discovery::kad::{Kad, KadStats};
use crate::node::NodeStats;

use super::metrics::{DhtKind, NodeMetrics, PacketKind, total_traffic};
use super::{HostId, Sim, SimError};

/// Bytes sent per node per second over an idle period, by what they carry.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IdleTraffic {
    /// Every UDP payload sent.
    pub total: f64,
    /// By packet kind ([`PacketKind::index`]).
    pub kinds: [f64; 4],
    /// Ledger messages pushing news (heartbeats and suspicions included).
    pub ledger_news: f64,
    /// Ledger anti-entropy exchanges (digests, summaries, answers).
    pub anti_entropy: f64,
    /// Member lists (gossip, periodic lists, empty keep-alive lists).
    pub member_lists: f64,
    /// Empty keep-alive member lists sent, per node per second (a count, not bytes).
    pub keep_alives: f64,
    /// QUIC bytes beyond the messages above: headers, tags, frames, ACKs, PINGs.
    pub quic_overhead: f64,
    /// DHT bytes by message kind ([`DhtKind::index`]).
    pub dht: [f64; DhtKind::COUNT],
    /// DHT GET lookups (rendezvous lookups) finished, per node per second (a count).
    pub dht_lookups: f64,
    /// DHT requests sent (retries included), per node per second (a count).
    pub dht_requests: f64,
    /// DHT requests that got no answer after every attempt, per node per second (a count).
    pub dht_timeouts: f64,
}

impl std::fmt::Display for IdleTraffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} B/s sent per node (", self.total)?;
        let mut first = true;
        for k in PacketKind::ALL {
            if self.kinds[k.index()] > 0.0 {
                let sep = if first { "" } else { ", " };
                write!(f, "{sep}{k:?} {:.0}", self.kinds[k.index()])?;
                first = false;
            }
        }
        write!(
            f,
            "; QUIC = ledger news {:.0} + anti-entropy {:.0} + member lists {:.0} ({:.2} \
             keep-alives/s) + QUIC overhead {:.0})",
            self.ledger_news,
            self.anti_entropy,
            self.member_lists,
            self.keep_alives,
            self.quic_overhead
        )?;
        if self.dht.iter().any(|b| *b > 0.0) {
            write!(f, "; DHT =")?;
            let mut first = true;
            for k in DhtKind::ALL {
                if self.dht[k.index()] > 0.0 {
                    let sep = if first { " " } else { " + " };
                    write!(f, "{sep}{k:?} {:.0}", self.dht[k.index()])?;
                    first = false;
                }
            }
            write!(
                f,
                " ({:.3} lookups/s, {:.2} requests/s, {:.3} timeouts/s)",
                self.dht_lookups, self.dht_requests, self.dht_timeouts
            )?;
        }
        Ok(())
    }
}

/// Message counters of one node at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    node: NodeStats,
    dht: KadStats,
    exchange_bytes: u64,
}

fn counters(sim: &Sim, hosts: &[HostId]) -> Vec<Counters> {
    hosts
        .iter()
        .map(|h| {
            let Some(node) = sim.node(*h) else {
                return Counters::default();
            };
            let r = node.cluster().map(|c| c.replication_stats());
            Counters {
                node: node.stats(),
                dht: node.kad().map(Kad::stats).unwrap_or_default(),
                exchange_bytes: r.map_or(0, |r| r.exchange_bytes_out),
            }
        })
        .collect()
}

/// Runs `sim` for `idle` and returns what `hosts` sent meanwhile, per node per second. Nodes
/// must keep running through the period (a restart resets a node's message counters).
pub fn measure(sim: &mut Sim, hosts: &[HostId], idle: Duration) -> Result<IdleTraffic, SimError> {
    let metrics0: Vec<_> = hosts
        .iter()
        .filter_map(|h| sim.metrics(*h).cloned())
        .collect();
    let c0 = counters(sim, hosts);
    sim.run_for(idle)?;
    let (sent, _) = total_traffic(hosts.iter().filter_map(|h| sim.metrics(*h)));
    let (sent0, _) = total_traffic(&metrics0);
    let c1 = counters(sim, hosts);
    let n = hosts.len().max(1) as f64;
    let secs = idle.as_secs_f64().max(f64::MIN_POSITIVE);
    let rate = |bytes: u64| bytes as f64 / n / secs;
    let delta = |f: &dyn Fn(&Counters) -> u64| -> u64 {
        c1.iter()
            .zip(&c0)
            .map(|(a, b)| f(a).saturating_sub(f(b)))
            .sum()
    };
    let kinds: [f64; 4] = std::array::from_fn(|i| rate(sent[i].bytes - sent0[i].bytes));
    let ledger = delta(&|c| c.node.ledger_bytes_out);
    let exchange = delta(&|c| c.exchange_bytes);
    let members = delta(&|c| c.node.members_bytes_out);
    let dht_sent = |metrics: &[NodeMetrics], i: usize| -> u64 {
        metrics.iter().map(|m| m.dht_sent[i].bytes).sum()
    };
    let metrics1: Vec<_> = hosts
        .iter()
        .filter_map(|h| sim.metrics(*h).cloned())
        .collect();
    let dht: [f64; DhtKind::COUNT] = std::array::from_fn(|i| {
        rate(dht_sent(&metrics1, i).saturating_sub(dht_sent(&metrics0, i)))
    });
    let quic = sent[PacketKind::Quic.index()].bytes - sent0[PacketKind::Quic.index()].bytes;
    Ok(IdleTraffic {
        total: kinds.iter().sum(),
        kinds,
        ledger_news: rate(ledger.saturating_sub(exchange)),
        anti_entropy: rate(exchange),
        member_lists: rate(members),
        keep_alives: rate(delta(&|c| c.node.keep_alives_out)),
        quic_overhead: rate(quic.saturating_sub(ledger + members)),
        dht,
        dht_lookups: rate(delta(&|c| c.node.dht_lookups)),
        dht_requests: rate(delta(&|c| c.dht.requests_sent)),
        dht_timeouts: rate(delta(&|c| c.dht.timeouts)),
    })
}
