//! DNS on the VPN, as edgevpn's `dns` service offers it (`pkg/services/dns.go`): names from
//! the ledger's `dns` bucket, the rest forwarded to `DNSFORWARDSERVER`, forwarded answers
//! cached (`DNSCACHESIZE`). Sans-IO: the driver feeds datagrams and the time in and sends what
//! [`Dns::poll_transmit`] gives.
//!
//! # Records
//! Bucket `dns`, key = a Go (RE2) regular expression matched against the query name as text
//! with its trailing dot (`^web\.vpn\.$`, unanchored as Go's `MatchString`; ASCII
//! case-insensitive, as DNS names are, where edgevpn compares case as sent), value = JSON
//! object from record type number to record text (`{"1":"10.1.0.5"}`: edgevpn's
//! `types.DNS`, written by `POST /api/dns`). The first key in key order whose expression
//! matches and that holds the asked type answers, authoritatively, TTL [`RECORD_TTL`] (miekg's
//! default, which edgevpn's answers carry). Answered types: A, AAAA, CNAME, NS, PTR, MX, TXT.
//!
//! # Forwarding
//! Names no record matches are sent to the first forward server; an answer without records
//! (not truncated) or no answer within [`FORWARD_TIMEOUT`] moves on to the next server, as
//! edgevpn does; the last server's answer is relayed as it is (id restored). Successful answers
//! with records are cached for their smallest TTL (at most [`MAX_CACHE_TTL`]; edgevpn keeps
//! them until evicted), least recently used evicted first.
//!
//! # Deviations from edgevpn
//! - A name matching a record's expression but not its type gets NOERROR without records (the
//!   name exists); a name matching nothing with forwarding off (or no server) gets REFUSED
//!   (edgevpn: an empty NOERROR); a forward that fails everywhere gets SERVFAIL.
//! - Malformed queries get FORMERR when their header can be read, else nothing; opcodes other
//!   than QUERY get NOTIMP (edgevpn: no answer).

pub mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use regex::bytes::{Regex, RegexBuilder};

use crate::ledger::Ledger;
use crate::rng::Rng;
use wire::{Query, Rcode};

/// The ledger bucket of DNS records (edgevpn's `protocol.DNSKey`).
pub const DNS_BUCKET: &str = "dns";
/// TTL of answers from the ledger.
pub const RECORD_TTL: u32 = 3600;
/// How long one forward server has to answer.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries forwarded and not answered yet, at most (more get SERVFAIL).
pub const MAX_PENDING: usize = 256;
/// Longest time a forwarded answer is cached.
pub const MAX_CACHE_TTL: u32 = 3600;
/// Records compiled from the ledger, at most (more are ignored).
pub const MAX_RECORDS: usize = 1024;
/// Compiled size limit of one record's expression.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// How the service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Forward names the ledger does not hold (`DNSFORWARD`).
    pub forward: bool,
    /// Where, in order (`DNSFORWARDSERVER`).
    pub servers: Vec<SocketAddr>,
    /// Forwarded answers kept (`DNSCACHESIZE`).
    pub cache_size: usize,
}

/// Which socket a datagram leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The listening socket (answers to clients).
    Listener,
    /// The forwarding socket (queries to servers).
    Upstream,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The socket it leaves from.
    pub via: Via,
    /// Its destination.
    pub to: SocketAddr,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Counters (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries answered from the ledger.
    pub from_ledger: u64,
    /// Queries answered from the cache.
    pub from_cache: u64,
    /// Queries sent to a forward server.
    pub forwarded: u64,
    /// Datagrams dropped or refused as malformed.
    pub malformed: u64,
    /// Upstream datagrams that matched no pending query.
    pub unexpected: u64,
}

/// One record of the `dns` bucket, compiled.
struct Record {
    pattern: Regex,
    values: BTreeMap<u16, String>,
}

struct Pending {
    client: SocketAddr,
    query: Query,
    /// The query as sent upstream (our id).
    packet: Vec<u8>,
    server: usize,
    deadline: Instant,
}

struct Cached {
    answer: Vec<u8>,
    expires: Instant,
    used: u64,
}

type CacheKey = (Vec<u8>, u16, u16);

/// The DNS service.
pub struct Dns {
    settings: DnsSettings,
    rng: Rng,
    /// `(key, version)` of the `dns` bucket the records were compiled from.
    records_from: Vec<(String, u64)>,
    records: Vec<Record>,
    pending: HashMap<u16, Pending>,
    cache: HashMap<CacheKey, Cached>,
    /// Cache keys by last use.
    cache_order: BTreeMap<u64, CacheKey>,
    uses: u64,
    transmits: VecDeque<Transmit>,
    stats: DnsStats,
}

impl Dns {
    /// A service with `settings`; `seed` seeds the upstream query ids.
    #[must_use]
    pub fn new(settings: DnsSettings, seed: u64) -> Self {
        Dns {
            settings,
            rng: Rng::from_seed(seed),
            records_from: Vec::new(),
            records: Vec::new(),
            pending: HashMap::new(),
            cache: HashMap::new(),
            cache_order: BTreeMap::new(),
            uses: 0,
            transmits: VecDeque::new(),
            stats: DnsStats::default(),
        }
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> DnsStats {
        self.stats
    }

    /// A datagram from a client on the listening socket.
    pub fn handle_query(&mut self, now: Instant, from: SocketAddr, msg: &[u8], ledger: &Ledger) {
        let query = match wire::parse_query(msg) {
            Ok(q) => q,
            Err(_) => {
                self.stats.malformed += 1;
                if let Some(answer) = formerr(msg) {
                    self.send(Via::Listener, from, answer);
                }
                return;
            }
        };
        if query.opcode != 0 {
            let answer = wire::response(&query, Rcode::NotImp, false, &[]);
            self.send(Via::Listener, from, answer);
            return;
        }
        self.refresh_records(ledger);
        if let Some((rcode, answers)) = self.record_answer(&query) {
            self.stats.from_ledger += 1;
            let answer = wire::response(&query, rcode, true, &answers);
            self.send(Via::Listener, from, answer);
            return;
        }
        if !self.settings.forward || self.settings.servers.is_empty() {
            let answer = wire::response(&query, Rcode::Refused, false, &[]);
            self.send(Via::Listener, from, answer);
            return;
        }
        if let Some(answer) = self.cached_answer(now, &query) {
            self.stats.from_cache += 1;
            self.send(Via::Listener, from, answer);
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            let answer = wire::response(&query, Rcode::ServFail, false, &[]);
            self.send(Via::Listener, from, answer);
            return;
        }
        let id = self.free_id();
        let packet = wire::with_id(msg, id);
        self.pending.insert(
            id,
            Pending {
                client: from,
                query,
                packet,
                server: 0,
                deadline: now + FORWARD_TIMEOUT,
            },
        );
        self.forward(id);
    }

    /// A datagram from a forward server on the forwarding socket.
    pub fn handle_upstream(&mut self, now: Instant, from: SocketAddr, msg: &[u8]) {
        let Ok(answer) = wire::parse_upstream(msg) else {
            self.stats.unexpected += 1;
            return;
        };
        let matches = self.pending.get(&answer.id).is_some_and(|p| {
            self.settings.servers.get(p.server) == Some(&from)
                && p.query.question.eq_ignore_ascii_case(&answer.question)
        });
        if !matches {
            self.stats.unexpected += 1;
            return;
        }
        let Some(mut pending) = self.pending.remove(&answer.id) else {
            return;
        };
        let empty = answer.answers == 0 && !answer.truncated;
        if empty && pending.server + 1 < self.settings.servers.len() {
            pending.server += 1;
            pending.deadline = now + FORWARD_TIMEOUT;
            self.pending.insert(answer.id, pending);
            self.forward(answer.id);
            return;
        }
        if answer.rcode == Rcode::NoError as u8 && answer.answers > 0 && !answer.truncated {
            let ttl = answer.min_ttl.unwrap_or(0).min(MAX_CACHE_TTL);
            if ttl > 0 {
                self.cache_put(now, pending.query.key(), msg.to_vec(), ttl);
            }
        }
        let reply = wire::with_id(msg, pending.query.id);
        self.send(Via::Listener, pending.client, reply);
    }

    /// Moves forwarded queries whose server did not answer in time on to the next server, or
    /// answers SERVFAIL after the last one.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut pending) = self.pending.remove(&id) else {
                continue;
            };
            if pending.server + 1 < self.settings.servers.len() {
                pending.server += 1;
                pending.deadline = now + FORWARD_TIMEOUT;
                self.pending.insert(id, pending);
                self.forward(id);
            } else {
                let answer = wire::response(&pending.query, Rcode::ServFail, false, &[]);
                self.send(Via::Listener, pending.client, answer);
            }
        }
    }

    /// When [`Dns::handle_timeout`] is due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn send(&mut self, via: Via, to: SocketAddr, payload: Vec<u8>) {
        self.transmits.push_back(Transmit { via, to, payload });
    }

    fn forward(&mut self, id: u16) {
        let Some(p) = self.pending.get(&id) else {
            return;
        };
        let Some(&server) = self.settings.servers.get(p.server) else {
            return;
        };
        let packet = p.packet.clone();
        self.stats.forwarded += 1;
        self.send(Via::Upstream, server, packet);
    }

    /// An id no pending query uses.
    fn free_id(&mut self) -> u16 {
        loop {
            let id = (self.rng.next_u64() & 0xffff) as u16;
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Recompiles the records when the `dns` bucket changed.
    fn refresh_records(&mut self, ledger: &Ledger) {
        let current: Vec<(String, u64)> = ledger
            .bucket(DNS_BUCKET)
            .take(MAX_RECORDS)
            .map(|(key, _)| {
                let version = ledger.entry(DNS_BUCKET, key).map_or(0, |e| e.version.0);
                (key.to_string(), version)
            })
            .collect();
        if current == self.records_from {
            return;
        }
        self.records = ledger
            .bucket(DNS_BUCKET)
            .take(MAX_RECORDS)
            .filter_map(|(key, value)| compile(key, value))
            .collect();
        self.records_from = current;
    }

    /// The answer from the ledger's records, if one matches the name.
    fn record_answer(&self, query: &Query) -> Option<(Rcode, Vec<wire::AnswerRecord>)> {
        let mut name_exists = false;
        for record in &self.records {
            if !record.pattern.is_match(&query.name) {
                continue;
            }
            name_exists = true;
            if let Some(text) = record.values.get(&query.qtype) {
                if let Some(data) = wire::rdata(query.qtype, text) {
                    return Some((Rcode::NoError, vec![(query.qtype, RECORD_TTL, data)]));
                }
            }
        }
        name_exists.then(|| (Rcode::NoError, Vec::new()))
    }

    fn cached_answer(&mut self, now: Instant, query: &Query) -> Option<Vec<u8>> {
        let key = query.key();
        let cached = self.cache.get_mut(&key)?;
        if cached.expires <= now {
            let used = cached.used;
            self.cache.remove(&key);
            self.cache_order.remove(&used);
            return None;
        }
        self.uses += 1;
        self.cache_order.remove(&cached.used);
        cached.used = self.uses;
        self.cache_order.insert(self.uses, key);
        Some(wire::with_id(&cached.answer, query.id))
    }

    fn cache_put(&mut self, now: Instant, key: CacheKey, answer: Vec<u8>, ttl: u32) {
        if let Some(old) = self.cache.remove(&key) {
            self.cache_order.remove(&old.used);
        }
        while self.cache.len() >= self.settings.cache_size.max(1) {
            let Some((_, oldest)) = self.cache_order.pop_first() else {
                break;
            };
            self.cache.remove(&oldest);
        }
        self.uses += 1;
        self.cache_order.insert(self.uses, key.clone());
        self.cache.insert(
            key,
            Cached {
                answer,
                expires: now + Duration::from_secs(u64::from(ttl)),
                used: self.uses,
            },
        );
    }
}

/// A record key's expression, compiled as the service matches it.
fn expression(key: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("(?-u){key}"))
        .size_limit(REGEX_SIZE_LIMIT)
        .case_insensitive(true)
        .build()
}

/// Whether `key` compiles as a record expression (the error says why not).
pub fn check_expression(key: &str) -> Result<(), regex::Error> {
    expression(key).map(drop)
}

/// Compiles one `dns` entry; `None` when its key is not an expression or its value not a
/// record map (it is then ignored, as edgevpn ignores it).
fn compile(key: &str, value: &[u8]) -> Option<Record> {
    let pattern = expression(key).ok()?;
    let text = crate::ledger::edgevpn::text(&String::from_utf8_lossy(value));
    let map: BTreeMap<String, String> = serde_json::from_str(&text).ok()?;
    let values = map
        .into_iter()
        .filter_map(|(t, v)| Some((t.parse::<u16>().ok()?, v)))
        .collect();
    Some(Record { pattern, values })
}

/// A FORMERR for a datagram whose header reads as a query, else `None`.
fn formerr(msg: &[u8]) -> Option<Vec<u8>> {
    let header = msg.get(..12)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let mut out = header.to_vec();
    out[2] = 0x80 | (header[2] & 0x78) | (header[2] & 0x01);
    out[3] = 0x80 | Rcode::FormErr as u8;
    out[4..12].fill(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::wire::{TYPE_A, TYPE_AAAA, TYPE_TXT, build_query, parse_upstream};
    use super::*;
    use crate::identity::Identity;
    use crate::ledger::{Clock, Limits};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ledger(records: &[(&str, &str)]) -> Ledger {
        let mut l = Ledger::new(Limits::for_max_message_size(1 << 20));
        let id = Identity::from_seed([5; 32]);
        let mut clock = Clock::new();
        for (k, v) in records {
            l.put(
                &id,
                &mut clock,
                DNS_BUCKET,
                k,
                v.as_bytes(),
                1_700_000_000_000,
            )
            .unwrap();
        }
        l
    }

    fn dns(servers: &[&str]) -> Dns {
        Dns::new(
            DnsSettings {
                forward: true,
                servers: servers.iter().map(|s| addr(s)).collect(),
                cache_size: 2,
            },
            1,
        )
    }

    const CLIENT: &str = "10.1.0.9:5353";

    fn ask(d: &mut Dns, now: Instant, l: &Ledger, name: &str, t: u16) -> Transmit {
        d.handle_query(now, addr(CLIENT), &build_query(0x4242, name, t), l);
        d.poll_transmit().expect("a datagram")
    }

    #[test]
    fn ledger_records_answer_by_expression_and_type() {
        let l = ledger(&[
            (r"^web\.vpn\.$", r#"{"1":"10.1.0.5","16":"hello"}"#),
            (r"\.svc\.vpn\.$", r#"{"28":"fd00::7"}"#),
        ]);
        let mut d = dns(&[]);
        let now = Instant::now();
        let t = ask(&mut d, now, &l, "WEB.vpn", TYPE_A);
        assert_eq!((t.via, t.to), (Via::Listener, addr(CLIENT)));
        let a = parse_upstream(&t.payload).unwrap();
        assert_eq!(
            (a.id, a.rcode, a.answers, a.min_ttl),
            (0x4242, 0, 1, Some(RECORD_TTL))
        );
        assert_eq!(&t.payload[t.payload.len() - 4..], &[10, 1, 0, 5]);
        assert_eq!(
            parse_upstream(&ask(&mut d, now, &l, "web.vpn", TYPE_TXT).payload)
                .unwrap()
                .answers,
            1
        );
        let aaaa = ask(&mut d, now, &l, "db.svc.vpn", TYPE_AAAA);
        assert_eq!(parse_upstream(&aaaa.payload).unwrap().answers, 1);
        // The name exists, not the type: NOERROR, no records.
        let none = parse_upstream(&ask(&mut d, now, &l, "web.vpn", TYPE_AAAA).payload).unwrap();
        assert_eq!((none.rcode, none.answers), (0, 0));
        // Nothing matches and there is nowhere to forward: REFUSED.
        let refused = parse_upstream(&ask(&mut d, now, &l, "other.org", TYPE_A).payload).unwrap();
        assert_eq!(refused.rcode, Rcode::Refused as u8);
        assert_eq!(d.stats().from_ledger, 4);
    }

    #[test]
    fn bad_records_are_ignored() {
        let l = ledger(&[("(unclosed", r#"{"1":"10.1.0.5"}"#), ("ok", "not json")]);
        let mut d = dns(&[]);
        let r = parse_upstream(&ask(&mut d, Instant::now(), &l, "ok.vpn", TYPE_A).payload).unwrap();
        assert_eq!(r.rcode, Rcode::Refused as u8);
    }

    /// The answer a server at `server` gives to the forwarded `t`, with `records` A records.
    fn upstream_answer(t: &Transmit, records: usize, ttl: u32) -> Vec<u8> {
        let q = wire::parse_query(&t.payload).unwrap();
        let answers: Vec<_> = (0..records)
            .map(|i| (TYPE_A, ttl, vec![192, 0, 2, u8::try_from(i).unwrap()]))
            .collect();
        wire::response(&q, Rcode::NoError, false, &answers)
    }

    #[test]
    fn forwarding_moves_on_caches_and_restores_the_id() {
        let l = ledger(&[]);
        let (s1, s2) = ("192.0.2.53:53", "198.51.100.53:53");
        let mut d = dns(&[s1, s2]);
        let now = Instant::now();
        d.handle_query(
            now,
            addr(CLIENT),
            &build_query(77, "example.org", TYPE_A),
            &l,
        );
        let first = d.poll_transmit().unwrap();
        assert_eq!((first.via, first.to), (Via::Upstream, addr(s1)));
        // An empty answer from the first: on to the second.
        d.handle_upstream(now, addr(s1), &upstream_answer(&first, 0, 60));
        let second = d.poll_transmit().unwrap();
        assert_eq!(second.to, addr(s2));
        // A spoofed answer from elsewhere is ignored.
        d.handle_upstream(
            now,
            addr("203.0.113.1:53"),
            &upstream_answer(&second, 1, 60),
        );
        assert_eq!(d.poll_transmit(), None);
        d.handle_upstream(now, addr(s2), &upstream_answer(&second, 1, 60));
        let reply = d.poll_transmit().unwrap();
        assert_eq!(reply.to, addr(CLIENT));
        assert_eq!(parse_upstream(&reply.payload).unwrap().id, 77);
        // Cached: answered at once, with the new id, until its TTL.
        d.handle_query(
            now,
            addr(CLIENT),
            &build_query(78, "EXAMPLE.org", TYPE_A),
            &l,
        );
        let cached = d.poll_transmit().unwrap();
        assert_eq!(
            (cached.to, parse_upstream(&cached.payload).unwrap().id),
            (addr(CLIENT), 78)
        );
        assert_eq!(d.stats().from_cache, 1);
        let later = now + Duration::from_secs(61);
        d.handle_query(
            later,
            addr(CLIENT),
            &build_query(79, "example.org", TYPE_A),
            &l,
        );
        assert_eq!(d.poll_transmit().unwrap().via, Via::Upstream);
    }

    #[test]
    fn silent_servers_time_out_into_servfail() {
        let l = ledger(&[]);
        let mut d = dns(&["192.0.2.53:53", "198.51.100.53:53"]);
        let now = Instant::now();
        d.handle_query(now, addr(CLIENT), &build_query(5, "slow.org", TYPE_A), &l);
        assert!(d.poll_transmit().is_some());
        let t1 = d.poll_timeout().unwrap();
        d.handle_timeout(t1);
        assert_eq!(d.poll_transmit().unwrap().to, addr("198.51.100.53:53"));
        d.handle_timeout(d.poll_timeout().unwrap());
        let fail = d.poll_transmit().unwrap();
        assert_eq!(
            parse_upstream(&fail.payload).unwrap().rcode,
            Rcode::ServFail as u8
        );
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used() {
        let l = ledger(&[]);
        let s = "192.0.2.53:53";
        let mut d = dns(&[s]);
        let now = Instant::now();
        for name in ["a.org", "b.org", "a.org", "c.org"] {
            d.handle_query(now, addr(CLIENT), &build_query(1, name, TYPE_A), &l);
            let t = d.poll_transmit().unwrap();
            if t.via == Via::Upstream {
                d.handle_upstream(now, addr(s), &upstream_answer(&t, 1, 300));
                d.poll_transmit().unwrap();
            }
        }
        // Size 2: b.org (least recently used) went.
        for (name, cached) in [("a.org", true), ("c.org", true), ("b.org", false)] {
            d.handle_query(now, addr(CLIENT), &build_query(1, name, TYPE_A), &l);
            let t = d.poll_transmit().unwrap();
            assert_eq!(t.via == Via::Listener, cached, "{name}");
        }
    }

    #[test]
    fn random_and_mutated_datagrams_never_panic() {
        let l = ledger(&[(r"vpn\.$", r#"{"1":"10.1.0.5","16":"t"}"#)]);
        let mut d = dns(&["192.0.2.53:53"]);
        let mut rng = Rng::from_seed(7);
        let now = Instant::now();
        let valid = build_query(1, "a.b.vpn", TYPE_A);
        for round in 0..20_000u32 {
            let mut msg = if round % 2 == 0 {
                valid.clone()
            } else {
                let mut m = vec![0u8; usize::try_from(rng.below(80)).unwrap()];
                rng.fill(&mut m);
                m
            };
            for _ in 0..rng.below(4) {
                if !msg.is_empty() {
                    let i = usize::try_from(rng.below(msg.len() as u64)).unwrap();
                    msg[i] = (rng.next_u64() & 0xff) as u8;
                }
            }
            d.handle_query(now, addr(CLIENT), &msg, &l);
            d.handle_upstream(now, addr("192.0.2.53:53"), &msg);
            while let Some(t) = d.poll_transmit() {
                assert!(t.payload.len() <= wire::MAX_MESSAGE);
            }
        }
        assert!(d.pending.len() <= MAX_PENDING);
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let l = ledger(&[]);
        let mut d = dns(&[]);
        let now = Instant::now();
        let mut q = build_query(3, "x.vpn", TYPE_A);
        q.truncate(14);
        d.handle_query(now, addr(CLIENT), &q, &l);
        let t = d.poll_transmit().unwrap();
        assert_eq!(t.payload[3] & 0x0f, Rcode::FormErr as u8);
        d.handle_query(now, addr(CLIENT), &[1, 2, 3], &l);
        assert_eq!(d.poll_transmit(), None);
        assert_eq!(d.stats().malformed, 2);
    }
}
