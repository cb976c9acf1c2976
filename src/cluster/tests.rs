//! Tests of the cluster layer: the election under a hostile network, the acceptor rules, role
//! assignment, the view, replication, settings from a configuration, and three nodes forming a
//! cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::election::{self, Accepted, Ballot, Proposal, Proposer, Tally, Vote};
use super::liveness::{self, Liveness, Suspicion};
use super::replication::{
    ANTI_ENTROPY_INTERVAL, ASK_TIMEOUT, EAGER_FANOUT, LAZY_WAIT, NEWS_BATCH_DELAY, Replication,
};
use super::roles::{self, Assignment, RolePolicy};
use super::view::{self, Announcement, NodeView, View};
use super::{Cluster, ClusterEvent, ClusterSettings, LAZY_SAVE, Write, fnv32a, ipam};
use crate::config::{self, HostFacts, P2pConfig, Role};
use crate::identity::{Identity, PeerId};
use crate::ledger::{
    Applied, Clock, Entry, Ledger, LedgerError, Limits, Scope, SyncLimits, SyncMessage, names,
};
use crate::rng::Rng;

/// The cluster bucket of the tests (the default `network_id`).
const BUCKET: &str = "kairos";
/// 2026-01-01T00:00:00Z: the tests' wall clock starts here.
const UNIX_BASE_MS: u64 = 1_767_225_600_000;

/// A fixed identity per number.
fn identity(n: u8) -> Identity {
    Identity::from_seed([n; 32])
}

/// `uuids` ordered by rank (FNV-32a), highest first.
fn by_rank(uuids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = uuids.iter().map(|u| u.to_string()).collect();
    v.sort_by_key(|u| std::cmp::Reverse(fnv32a(u)));
    v
}

// ---- election model ----

/// One member of the election model: its own durable ledger, an acceptor, maybe a proposer.
struct Member {
    uuid: String,
    identity: Identity,
    clock: Clock,
    ledger: Ledger,
    proposer: Option<Proposer>,
}

/// An entry on its way to member `to`.
struct Delivery {
    to: usize,
    entry: Entry,
}

/// Members running the election through their own ledgers, the entries they write travelling
/// over a network that may lose, duplicate and reorder them.
struct ElectionModel {
    members: Vec<Member>,
    /// Entries in flight, delivered in any order.
    in_flight: Vec<Delivery>,
    /// A member only hears from members of its own group.
    group: Vec<usize>,
    quorum: usize,
    /// Probability that one copy of an entry is lost.
    drop: f64,
    /// Probability that one copy of an entry arrives twice.
    duplicate: f64,
    unix_ms: u64,
    /// Every candidate a proposer reported chosen, in order.
    chosen: Vec<String>,
    /// Every `(ballot, candidate)` ever accepted, with the acceptors that accepted it.
    accepted: BTreeMap<(Ballot, String), BTreeSet<String>>,
}

impl ElectionModel {
    /// `size` members `node-0`, `node-1`, ...; those in `proposers` also propose (themselves).
    fn new(size: usize, proposers: &[usize], quorum: usize) -> Self {
        let members = (0..size)
            .map(|i| {
                let uuid = format!("node-{i}");
                Member {
                    identity: identity(i as u8 + 1),
                    clock: Clock::new(),
                    ledger: Ledger::new(Limits::default()),
                    proposer: proposers.contains(&i).then(|| Proposer::new(&uuid)),
                    uuid,
                }
            })
            .collect();
        Self {
            members,
            in_flight: Vec::new(),
            group: vec![0; size],
            quorum,
            drop: 0.0,
            duplicate: 0.0,
            unix_ms: UNIX_BASE_MS,
            chosen: Vec::new(),
            accepted: BTreeMap::new(),
        }
    }

    /// One pass of member `i`, as the cluster layer runs it: vote on what it has seen, then, if
    /// `propose`, take a proposer step on the same tally.
    fn act(&mut self, i: usize, propose: bool, rng: &mut Rng) {
        let m = &mut self.members[i];
        let tally = Tally::read(&m.ledger, BUCKET);
        let mut writes: Vec<Write> = election::accept(&tally, BUCKET, &m.uuid)
            .into_iter()
            .collect();
        if let Some(proposer) = m.proposer.as_mut().filter(|_| propose) {
            let step = proposer.step(
                &tally,
                BUCKET,
                self.quorum,
                Some(&m.uuid),
                names::ROLE_MASTER,
                0,
            );
            self.chosen.extend(step.chosen);
            writes.extend(step.writes);
        }
        for w in &writes {
            self.write(i, w, rng);
        }
    }

    /// Member `i` stores `w` and sends the entry to the other members of its group.
    fn write(&mut self, i: usize, w: &Write, rng: &mut Rng) {
        let m = &mut self.members[i];
        let value = w.value.as_deref().expect("the election only puts");
        if w.key.ends_with(election::VOTE_SUFFIX) {
            let vote: Vote = serde_json::from_slice(value).expect("a vote");
            if let Some(a) = vote.accepted {
                let voters = self.accepted.entry((a.ballot, a.candidate)).or_default();
                voters.insert(m.uuid.clone());
            }
        }
        let entry = m
            .ledger
            .put(
                &m.identity,
                &mut m.clock,
                &w.bucket,
                &w.key,
                value,
                self.unix_ms,
            )
            .expect("ledger write");
        for to in 0..self.members.len() {
            if to == i || self.group[to] != self.group[i] || rng.chance(self.drop) {
                continue;
            }
            let copies = if rng.chance(self.duplicate) { 2 } else { 1 };
            for _ in 0..copies {
                self.in_flight.push(Delivery {
                    to,
                    entry: entry.clone(),
                });
            }
        }
    }

    /// Delivers the entry in flight at `index`; returns the member it reached if it was news
    /// there.
    fn deliver(&mut self, index: usize) -> Option<usize> {
        let d = self.in_flight.swap_remove(index);
        let applied = self.members[d.to]
            .ledger
            .apply(d.entry, self.unix_ms)
            .expect("entries are valid");
        (applied != Applied::Stale).then_some(d.to)
    }

    /// Delivers everything in flight, in random order.
    fn deliver_all(&mut self, rng: &mut Rng) {
        while !self.in_flight.is_empty() {
            let index = rng.below(self.in_flight.len() as u64) as usize;
            self.deliver(index);
        }
    }

    /// Anti-entropy within each group: every member gets every entry its group holds.
    fn anti_entropy(&mut self) {
        let all: Vec<(usize, Entry)> = self
            .members
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.ledger.entries().map(move |e| (i, e.clone())))
            .collect();
        for (to, m) in self.members.iter_mut().enumerate() {
            for (from, e) in &all {
                if self.group[*from] == self.group[to] {
                    m.ledger
                        .apply(e.clone(), self.unix_ms)
                        .expect("valid entry");
                }
            }
        }
    }

    /// Member `i`'s proposer restarts: a new one, same uuid, same durable ledger.
    fn restart_proposer(&mut self, i: usize) {
        let m = &mut self.members[i];
        if m.proposer.is_some() {
            m.proposer = Some(Proposer::new(&m.uuid));
        }
    }

    /// Rounds in which every member in `actors` acts once and everything is delivered, until
    /// every member holds a commit; the number of rounds that took, if at most `max_rounds`.
    fn rounds_until_committed(
        &mut self,
        actors: &[usize],
        max_rounds: usize,
        rng: &mut Rng,
    ) -> Option<usize> {
        for round in 1..=max_rounds {
            for &i in actors {
                self.act(i, true, rng);
            }
            self.deliver_all(rng);
            self.unix_ms += 10;
            if self.commit_everywhere() {
                return Some(round);
            }
        }
        None
    }

    /// True when every member's ledger holds a commit.
    fn commit_everywhere(&self) -> bool {
        self.members
            .iter()
            .all(|m| Tally::read(&m.ledger, BUCKET).commit.is_some())
    }

    /// Every distinct candidate ever chosen in the Paxos sense: accepted by a quorum under one
    /// ballot, whether or not anybody noticed and committed it.
    fn chosen_by_quorum(&self) -> BTreeSet<String> {
        self.accepted
            .iter()
            .filter(|(_, voters)| voters.len() >= self.quorum)
            .map(|((_, candidate), _)| candidate.clone())
            .collect()
    }

    /// Every distinct candidate ever committed: those proposers reported chosen and the
    /// `master-commit` values in any ledger now.
    fn committed(&self) -> BTreeSet<String> {
        let in_ledgers = self
            .members
            .iter()
            .filter_map(|m| Tally::read(&m.ledger, BUCKET).commit)
            .map(|c| c.candidate);
        self.chosen.iter().cloned().chain(in_ledgers).collect()
    }
}

/// One random schedule: a chaotic phase (any order, losses, duplicates, proposer restarts),
/// then the network heals and one proposer (the leader) carries on alone. At most one master
/// may ever be chosen, it must be one of the proposers, and the healed network must choose one.
fn run_random_schedule(seed: u64) {
    let mut rng = Rng::from_seed(seed);
    let size = 3 + rng.below(5) as usize;
    let proposers: Vec<usize> = (0..2 + rng.below(2) as usize).collect();
    let quorum = election::quorum(2, size);
    assert!(2 * quorum > size, "majority quorums intersect");
    let mut model = ElectionModel::new(size, &proposers, quorum);
    model.drop = [0.0, 0.1, 0.3][rng.below(3) as usize];
    model.duplicate = 0.1;

    // Proposers compete: mostly the one that believes it leads, plus stale ones, more or less
    // often; who leads changes from time to time. Every member votes on what it has seen.
    let stale = [2, 10, 30][rng.below(3) as usize];
    // Members behind slow links learn late and act on old views.
    let slow: Vec<bool> = (0..size).map(|_| rng.chance(0.3)).collect();
    let mut leading = proposers[0];
    for _ in 0..30 + rng.below(90) {
        model.unix_ms += rng.below(50);
        let any_proposer = proposers[rng.below(proposers.len() as u64) as usize];
        match rng.below(100) {
            0..=49 => {
                for _ in 0..1 + rng.below(2 * size as u64) {
                    if model.in_flight.is_empty() {
                        break;
                    }
                    let index = rng.below(model.in_flight.len() as u64) as usize;
                    if slow[model.in_flight[index].to] && rng.chance(0.75) {
                        continue;
                    }
                    // A member reacts to news at once, as the cluster layer does, or later.
                    if let Some(to) = model.deliver(index).filter(|_| rng.chance(0.5)) {
                        model.act(to, to == leading, &mut rng);
                    }
                }
            }
            50 => model.restart_proposer(any_proposer),
            51..=53 => leading = any_proposer,
            54..=63 => model.act(leading, true, &mut rng),
            n if n < 64 + stale => model.act(any_proposer, true, &mut rng),
            _ => {
                let i = rng.below(size as u64) as usize;
                model.act(i, false, &mut rng);
            }
        }
    }
    let during_chaos = model.committed();
    assert!(
        during_chaos.len() <= 1,
        "seed {seed}: two masters committed: {during_chaos:?}"
    );
    let by_quorum = model.chosen_by_quorum();
    assert!(
        by_quorum.len() <= 1,
        "seed {seed}: two candidates accepted by a quorum: {by_quorum:?}"
    );
    assert!(
        during_chaos.is_subset(&by_quorum),
        "seed {seed}: committed unchosen"
    );

    model.drop = 0.0;
    model.duplicate = 0.0;
    model.deliver_all(&mut rng);
    model.anti_entropy();
    let leader = proposers[rng.below(proposers.len() as u64) as usize];
    for (i, m) in model.members.iter_mut().enumerate() {
        if i != leader {
            m.proposer = None;
        }
    }
    let everyone: Vec<usize> = (0..size).collect();
    let rounds = model.rounds_until_committed(&everyone, 10, &mut rng);
    assert!(
        rounds.is_some(),
        "seed {seed}: no commit after healing (size {size}, quorum {quorum})"
    );
    let committed = model.committed();
    assert_eq!(committed.len(), 1, "seed {seed}: {committed:?}");
    assert!(
        during_chaos.is_subset(&committed),
        "seed {seed}: the commit changed after healing"
    );
    assert_eq!(committed, model.chosen_by_quorum(), "seed {seed}");
    let master = committed.first().expect("one commit");
    assert!(
        proposers.iter().any(|&p| model.members[p].uuid == *master),
        "seed {seed}: {master} was never proposed"
    );
}

#[test]
fn election_chooses_at_most_one_master_under_random_schedules() {
    for seed in 0..2_000 {
        run_random_schedule(seed);
    }
}

#[test]
fn one_proposer_on_a_reliable_network_commits_its_pick() {
    let mut rng = Rng::from_seed(1);
    let mut model = ElectionModel::new(3, &[0], election::quorum(2, 3));
    // Prepare, promises, accept request, accepts, commit.
    let rounds = model.rounds_until_committed(&[0, 1, 2], 10, &mut rng);
    assert_eq!(rounds, Some(5));
    assert_eq!(model.chosen, ["node-0"]);
    for m in &model.members {
        let tally = Tally::read(&m.ledger, BUCKET);
        assert_eq!(tally.commit.expect("committed").candidate, "node-0");
        assert_eq!(
            m.ledger.get(BUCKET, &names::role_key("node-0")),
            Some(names::ROLE_MASTER.as_bytes())
        );
    }
    // Once committed, nobody writes anything any more.
    let sizes: Vec<usize> = model.members.iter().map(|m| m.ledger.len()).collect();
    for i in 0..3 {
        model.act(i, true, &mut rng);
    }
    assert!(model.in_flight.is_empty());
    let after: Vec<usize> = model.members.iter().map(|m| m.ledger.len()).collect();
    assert_eq!(sizes, after);
}

#[test]
fn a_later_proposer_adopts_the_value_a_quorum_accepted() {
    let mut rng = Rng::from_seed(2);
    let mut model = ElectionModel::new(3, &[0, 2], 2);
    // node-0 prepares, node-0 and node-1 promise, node-0 asks to accept itself, both accept:
    // node-0 is chosen, but node-0 stops before it commits.
    model.act(0, true, &mut rng);
    model.deliver_all(&mut rng);
    model.act(0, true, &mut rng);
    model.act(1, true, &mut rng);
    model.deliver_all(&mut rng);
    model.act(0, true, &mut rng);
    model.deliver_all(&mut rng);
    model.act(0, true, &mut rng);
    model.act(1, true, &mut rng);
    model.deliver_all(&mut rng);
    assert!(model.committed().is_empty());

    // node-2 proposes itself, but must carry node-0 through.
    let rounds = model.rounds_until_committed(&[1, 2], 10, &mut rng);
    assert!(rounds.is_some(), "node-2 commits with node-1");
    assert_eq!(model.chosen, ["node-0"]);
}

#[test]
fn a_restarted_proposer_outbids_its_own_earlier_ballot() {
    let mut rng = Rng::from_seed(3);
    let mut model = ElectionModel::new(3, &[0], 2);
    model.act(0, true, &mut rng);
    model.deliver_all(&mut rng);
    model.act(1, true, &mut rng);
    model.act(2, true, &mut rng);
    model.deliver_all(&mut rng);
    model.restart_proposer(0);
    model.act(0, true, &mut rng);
    let ballot = Tally::read(&model.members[0].ledger, BUCKET)
        .proposals
        .into_iter()
        .find(|(u, _)| u == "node-0")
        .map(|(_, p)| p);
    assert_eq!(
        ballot,
        Some(Proposal {
            round: 2,
            candidate: None
        })
    );
    model.deliver_all(&mut rng);
    assert!(
        model
            .rounds_until_committed(&[0, 1, 2], 10, &mut rng)
            .is_some()
    );
    assert_eq!(model.chosen, ["node-0"]);
}

#[test]
fn disjoint_quorums_let_two_masters_be_chosen() {
    // The check above must be able to fail: quorum 1 in two partitioned groups lets each group
    // choose its own master.
    let mut rng = Rng::from_seed(4);
    let mut model = ElectionModel::new(6, &[0, 3], 1);
    model.group = vec![0, 0, 0, 1, 1, 1];
    let everyone: Vec<usize> = (0..6).collect();
    assert!(
        model
            .rounds_until_committed(&everyone, 10, &mut rng)
            .is_some()
    );
    let committed: Vec<String> = model.committed().into_iter().collect();
    assert_eq!(committed, ["node-0", "node-3"]);
    assert_eq!(model.chosen_by_quorum().len(), 2);
}

#[test]
fn partitioned_halves_with_majority_quorums_choose_nobody() {
    let mut rng = Rng::from_seed(5);
    let mut model = ElectionModel::new(6, &[0, 3], election::quorum(2, 6));
    model.group = vec![0, 0, 0, 1, 1, 1];
    let everyone: Vec<usize> = (0..6).collect();
    assert_eq!(model.rounds_until_committed(&everyone, 20, &mut rng), None);
    assert!(model.committed().is_empty());
}

#[test]
fn quorums_are_majorities_and_at_least_minimum_nodes() {
    assert_eq!(election::quorum(2, 1), 2);
    assert_eq!(election::quorum(2, 3), 2);
    assert_eq!(election::quorum(2, 4), 3);
    assert_eq!(election::quorum(3, 3), 3);
    assert_eq!(election::quorum(1, 7), 4);
    for minimum in 1..5 {
        for live in 1..30 {
            assert!(2 * election::quorum(minimum, live) > live);
        }
    }
}

// ---- acceptor rules ----

fn ballot(round: u64, proposer: &str) -> Ballot {
    Ballot {
        round,
        proposer: proposer.to_string(),
    }
}

/// `proposer`'s prepare at `round`.
fn prepare(proposer: &str, round: u64) -> (String, Proposal) {
    let proposal = Proposal {
        round,
        candidate: None,
    };
    (proposer.to_string(), proposal)
}

/// `proposer`'s accept request for `candidate` at `round`.
fn accept_request(proposer: &str, round: u64, candidate: &str) -> (String, Proposal) {
    let proposal = Proposal {
        round,
        candidate: Some(candidate.to_string()),
    };
    (proposer.to_string(), proposal)
}

fn vote(promised: Option<Ballot>, accepted: Option<(Ballot, &str)>) -> Vote {
    Vote {
        promised,
        accepted: accepted.map(|(ballot, c)| Accepted {
            ballot,
            candidate: c.to_string(),
        }),
    }
}

/// The vote `accept` writes for acceptor `me`, or `None` when it writes nothing.
fn vote_written(tally: &Tally) -> Option<Vote> {
    election::accept(tally, BUCKET, "me").map(|w| {
        assert_eq!((w.bucket.as_str(), w.key.as_str()), (BUCKET, "me-vote"));
        serde_json::from_slice(&w.value.expect("a put")).expect("a vote")
    })
}

#[test]
fn acceptor_rules() {
    struct Case {
        name: &'static str,
        before: Vote,
        proposals: Vec<(String, Proposal)>,
        after: Option<Vote>,
    }
    let cases = [
        Case {
            name: "promises a higher ballot",
            before: vote(Some(ballot(1, "a")), None),
            proposals: vec![prepare("b", 2)],
            after: Some(vote(Some(ballot(2, "b")), None)),
        },
        Case {
            name: "promises a first ballot",
            before: Vote::default(),
            proposals: vec![prepare("b", 1)],
            after: Some(vote(Some(ballot(1, "b")), None)),
        },
        Case {
            name: "ignores a lower round",
            before: vote(Some(ballot(3, "a")), None),
            proposals: vec![prepare("b", 2)],
            after: None,
        },
        Case {
            name: "ignores the same round from a lower uuid",
            before: vote(Some(ballot(2, "z")), None),
            proposals: vec![prepare("b", 2)],
            after: None,
        },
        Case {
            name: "ignores a prepare it already promised",
            before: vote(Some(ballot(2, "b")), None),
            proposals: vec![prepare("b", 2)],
            after: None,
        },
        Case {
            name: "accepts at the promised ballot",
            before: vote(Some(ballot(2, "b")), None),
            proposals: vec![accept_request("b", 2, "c")],
            after: Some(vote(Some(ballot(2, "b")), Some((ballot(2, "b"), "c")))),
        },
        Case {
            name: "accepts a higher ballot it never saw prepared",
            before: vote(Some(ballot(2, "b")), Some((ballot(2, "b"), "c"))),
            proposals: vec![accept_request("d", 5, "e")],
            after: Some(vote(Some(ballot(5, "d")), Some((ballot(5, "d"), "e")))),
        },
        Case {
            name: "refuses an accept below its promise",
            before: vote(Some(ballot(3, "z")), None),
            proposals: vec![accept_request("b", 3, "c"), accept_request("y", 2, "c")],
            after: None,
        },
        Case {
            name: "keeps its accepted value when promising higher",
            before: vote(Some(ballot(2, "b")), Some((ballot(2, "b"), "c"))),
            proposals: vec![accept_request("b", 2, "c"), prepare("d", 4)],
            after: Some(vote(Some(ballot(4, "d")), Some((ballot(2, "b"), "c")))),
        },
        Case {
            name: "writes nothing when nothing changes",
            before: vote(Some(ballot(2, "b")), Some((ballot(2, "b"), "c"))),
            proposals: vec![accept_request("b", 2, "c"), prepare("a", 1)],
            after: None,
        },
        Case {
            name: "takes proposals in ballot order, not in listed order",
            before: Vote::default(),
            proposals: vec![prepare("d", 3), accept_request("b", 2, "x")],
            after: Some(vote(Some(ballot(3, "d")), Some((ballot(2, "b"), "x")))),
        },
    ];
    for case in cases {
        let tally = Tally {
            proposals: case.proposals,
            votes: vec![("me".to_string(), case.before)],
            commit: None,
        };
        assert_eq!(vote_written(&tally), case.after, "{}", case.name);
    }
}

#[test]
fn acceptor_ignores_other_votes_and_stops_after_a_commit() {
    let others = vec![(
        "other".to_string(),
        vote(Some(ballot(9, "z")), Some((ballot(9, "z"), "x"))),
    )];
    let mut tally = Tally {
        proposals: vec![prepare("b", 2)],
        votes: others,
        commit: None,
    };
    assert_eq!(vote_written(&tally), Some(vote(Some(ballot(2, "b")), None)));
    tally.commit = Some(election::Commit {
        ballot: ballot(1, "a"),
        candidate: "a".to_string(),
        at_ms: 0,
    });
    assert_eq!(vote_written(&tally), None);
}

// ---- role assignment ----

/// A node of a hand-made view.
struct Spec<'a> {
    uuid: &'a str,
    asked: Role,
    live: bool,
    role: Option<&'a str>,
}

fn spec<'a>(uuid: &'a str, asked: Role, live: bool, role: Option<&'a str>) -> Spec<'a> {
    Spec {
        uuid,
        asked,
        live,
        role,
    }
}

fn view_of(specs: &[Spec<'_>]) -> View {
    let nodes = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let node = NodeView {
                peer: identity(i as u8 + 1).peer_id(),
                asked: s.asked,
                hostname: s.uuid.to_string(),
                live: s.live,
                silent_ms: Some(if s.live { 1_000 } else { 600_000 }),
                role: s.role.map(str::to_string),
                rank: fnv32a(s.uuid),
            };
            (s.uuid.to_string(), node)
        })
        .collect();
    View {
        nodes,
        leader: None,
    }
}

/// The role writes of an assignment by uuid (`None`: deleted); each key at most once.
fn role_writes(a: &Assignment) -> BTreeMap<String, Option<String>> {
    let map: BTreeMap<String, Option<String>> = a
        .writes
        .iter()
        .map(|w| {
            assert_eq!(w.bucket, BUCKET);
            let uuid = w.key.strip_suffix(names::ROLE_SUFFIX).expect("a role key");
            let value = w
                .value
                .as_ref()
                .map(|v| String::from_utf8(v.clone()).unwrap());
            (uuid.to_string(), value)
        })
        .collect();
    assert_eq!(map.len(), a.writes.len(), "one write per key");
    map
}

fn puts(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
    pairs
        .iter()
        .map(|(u, r)| (u.to_string(), Some(r.to_string())))
        .collect()
}

const NO_HA: RolePolicy = RolePolicy {
    ha_masters: 0,
    dynamic: false,
};

#[test]
fn without_ha_the_master_gets_master_and_live_nodes_workers() {
    let view = view_of(&[
        spec("m", Role::Auto, true, None),
        spec("a", Role::Auto, true, None),
        spec("b", Role::Auto, true, None),
        spec("dead", Role::Auto, false, None),
    ]);
    let a = roles::assign(&view, BUCKET, "m", NO_HA);
    assert_eq!(
        role_writes(&a),
        puts(&[("m", "master"), ("a", "worker"), ("b", "worker")])
    );
    assert!(a.refused_masters.is_empty());
}

#[test]
fn ha_slots_go_to_the_highest_ranks_then_workers() {
    let r = by_rank(&["ant", "bee", "cat", "dog", "eel"]);
    let mut specs = vec![spec("m", Role::Auto, true, None)];
    specs.extend(r.iter().map(|u| spec(u, Role::Auto, true, None)));
    let policy = RolePolicy {
        ha_masters: 2,
        dynamic: false,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", policy);
    assert_eq!(
        role_writes(&a),
        puts(&[
            ("m", "master/clusterinit"),
            (&r[0], "master/ha"),
            (&r[1], "master/ha"),
            (&r[2], "worker"),
            (&r[3], "worker"),
            (&r[4], "worker"),
        ])
    );
}

#[test]
fn asked_masters_come_first_and_are_refused_without_a_slot() {
    let r = by_rank(&["ant", "bee", "cat"]);
    let lowest = r[2].as_str();
    let specs = [
        spec("m", Role::Auto, true, Some("master/clusterinit")),
        spec(&r[0], Role::Auto, true, None),
        spec(&r[1], Role::Auto, true, None),
        spec(lowest, Role::Master, true, None),
    ];
    let one_slot = RolePolicy {
        ha_masters: 1,
        dynamic: false,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", one_slot);
    assert_eq!(
        role_writes(&a),
        puts(&[(lowest, "master/ha"), (&r[0], "worker"), (&r[1], "worker")])
    );
    assert!(a.refused_masters.is_empty());

    // No HA: no slot, no role at all rather than a worker's.
    let specs = [
        spec("m", Role::Auto, true, Some("master")),
        spec(&r[0], Role::Auto, true, None),
        spec(lowest, Role::Master, true, None),
    ];
    let a = roles::assign(&view_of(&specs), BUCKET, "m", NO_HA);
    assert_eq!(role_writes(&a), puts(&[(&r[0], "worker")]));
    assert_eq!(a.refused_masters, [lowest]);

    // The only slot is taken.
    let specs = [
        spec("m", Role::Auto, true, Some("master/clusterinit")),
        spec("h", Role::Auto, true, Some("master/ha")),
        spec(lowest, Role::Master, true, None),
    ];
    let a = roles::assign(&view_of(&specs), BUCKET, "m", one_slot);
    assert!(a.writes.is_empty());
    assert_eq!(a.refused_masters, [lowest]);
}

#[test]
fn asked_workers_never_become_ha_masters() {
    let r = by_rank(&["ant", "bee", "cat"]);
    let specs = [
        spec("m", Role::Auto, true, Some("master/clusterinit")),
        spec(&r[0], Role::Worker, true, None),
        spec(&r[1], Role::Auto, true, None),
        spec(&r[2], Role::Worker, true, None),
    ];
    let policy = RolePolicy {
        ha_masters: 2,
        dynamic: true,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", policy);
    assert_eq!(
        role_writes(&a),
        puts(&[(&r[0], "worker"), (&r[1], "master/ha"), (&r[2], "worker")])
    );
}

#[test]
fn existing_roles_are_sticky() {
    let specs = [
        spec("m", Role::Auto, false, Some("master/clusterinit")),
        spec("h", Role::Auto, false, Some("master/ha")),
        spec("w", Role::Auto, true, Some("worker")),
        spec("gone", Role::Auto, false, Some("worker")),
        spec("new", Role::Auto, true, None),
    ];
    let policy = RolePolicy {
        ha_masters: 2,
        dynamic: false,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", policy);
    // One HA slot is free: the new node takes it; the worker is not promoted and dead nodes
    // keep their roles.
    assert_eq!(role_writes(&a), puts(&[("new", "master/ha")]));

    // Everything assigned: nothing to write.
    let specs = [
        spec("m", Role::Auto, true, Some("master")),
        spec("w", Role::Auto, true, Some("worker")),
    ];
    assert!(
        roles::assign(&view_of(&specs), BUCKET, "m", NO_HA)
            .writes
            .is_empty()
    );
}

#[test]
fn dynamic_roles_free_dead_slots_and_promote_the_best_live_worker() {
    let r = by_rank(&["ant", "bee", "cat"]);
    let specs = [
        spec("m", Role::Auto, false, Some("master/clusterinit")),
        spec("h", Role::Auto, false, Some("master/ha")),
        spec("dead-worker", Role::Auto, false, Some("worker")),
        spec(&r[0], Role::Worker, true, Some("worker")),
        spec(&r[1], Role::Auto, true, Some("worker")),
        spec(&r[2], Role::Auto, true, Some("worker")),
    ];
    let policy = RolePolicy {
        ha_masters: 1,
        dynamic: true,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", policy);
    let mut expected = puts(&[(&r[1], "master/ha")]);
    expected.insert("h".to_string(), None);
    expected.insert("dead-worker".to_string(), None);
    assert_eq!(role_writes(&a), expected);

    // The same view without dynamic roles changes nothing.
    let sticky = RolePolicy {
        ha_masters: 1,
        dynamic: false,
    };
    assert!(
        roles::assign(&view_of(&specs), BUCKET, "m", sticky)
            .writes
            .is_empty()
    );
}

#[test]
fn a_dead_master_is_never_replaced() {
    let specs = [
        spec("m", Role::Auto, false, Some("master")),
        spec("a", Role::Auto, true, Some("worker")),
        spec("b", Role::Master, true, None),
    ];
    let policy = RolePolicy {
        ha_masters: 0,
        dynamic: true,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", policy);
    assert!(a.writes.is_empty());
    assert_eq!(a.refused_masters, ["b"]);
}

#[test]
fn nodes_with_role_none_get_nothing() {
    let specs = [
        spec("m", Role::Auto, true, None),
        spec("observer", Role::None, true, None),
    ];
    let policy = RolePolicy {
        ha_masters: 2,
        dynamic: true,
    };
    let a = roles::assign(&view_of(&specs), BUCKET, "m", policy);
    assert_eq!(role_writes(&a), puts(&[("m", "master/clusterinit")]));
}

// ---- view ----

/// A ledger several nodes write to, in time order.
struct SharedLedger {
    ledger: Ledger,
    clock: Clock,
}

impl SharedLedger {
    fn new() -> Self {
        Self {
            ledger: Ledger::new(Limits::default()),
            clock: Clock::new(),
        }
    }

    fn put(&mut self, who: &Identity, bucket: &str, key: &str, value: &[u8], unix_ms: u64) {
        let e = self
            .ledger
            .put(who, &mut self.clock, bucket, key, value, unix_ms)
            .expect("ledger write");
        assert_eq!(e.version.millis(), unix_ms, "written in time order");
    }

    fn announce(&mut self, who: &Identity, uuid: &str, asked: Role, unix_ms: u64) {
        let ann = Announcement::new(asked, &format!("host-{uuid}"));
        self.put(who, BUCKET, &names::uuid_key(uuid), &ann.to_json(), unix_ms);
    }

    fn beat(&mut self, who: &Identity, uuid: &str, unix_ms: u64) {
        self.put(who, names::HEALTHCHECK, uuid, b"1", unix_ms);
    }
}

const TIMEOUT_MS: u64 = 60_000;

/// The liveness of the default 60 s timeout.
fn liveness() -> Liveness {
    Liveness::for_timeout(Duration::from_millis(TIMEOUT_MS))
}

#[test]
fn view_liveness_follows_heartbeat_leases_and_suspicions() {
    let now = UNIX_BASE_MS + 10_000_000;
    let l = liveness();
    let ids: Vec<Identity> = (1..=8).map(identity).collect();
    let uuids = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    ];
    let mut s = SharedLedger::new();
    for (i, (id, uuid)) in ids.iter().zip(uuids).enumerate() {
        s.announce(id, uuid, Role::Auto, UNIX_BASE_MS + i as u64);
    }
    let lease_end = l.renew_ms + TIMEOUT_MS;
    // (Written in time order.)
    s.beat(&ids[1], "bravo", now - lease_end);
    s.beat(&ids[2], "charlie", now - lease_end + 1);
    s.beat(&ids[4], "echo", now - 80_000);
    s.beat(&ids[7], "hotel", now - 30_000);
    let hotel_old = s.ledger.entry(names::HEALTHCHECK, "hotel").unwrap().version;
    s.beat(&ids[5], "foxtrot", now - 20_000);
    s.beat(&ids[6], "golf", now - 20_000);
    s.beat(&ids[0], "alpha", now - 10_000);
    s.ledger
        .delete(
            &ids[4],
            &mut s.clock,
            names::HEALTHCHECK,
            "echo",
            now - 5_000,
        )
        .expect("delete");
    // alpha lost foxtrot a grace ago and golf 5 s ago; hotel answered by beating again.
    let beat_of =
        |s: &SharedLedger, u: &str| s.ledger.entry(names::HEALTHCHECK, u).unwrap().version;
    let suspicions = [
        Suspicion {
            uuid: "foxtrot".into(),
            beat: beat_of(&s, "foxtrot"),
            at: now - l.grace_ms,
        },
        Suspicion {
            uuid: "golf".into(),
            beat: beat_of(&s, "golf"),
            at: now - 5_000,
        },
        Suspicion {
            uuid: "hotel".into(),
            beat: hotel_old,
            at: now - 20_000,
        },
    ];
    s.put(
        &ids[0],
        names::SUSPECTS,
        "alpha",
        &liveness::encode(&suspicions),
        now - 2_000,
    );
    s.beat(&ids[7], "hotel", now - 1_000);

    let view = View::read(&s.ledger, BUCKET, now, &l);
    let state = |u: &str| {
        let n = &view.nodes[u];
        (n.live, n.silent_ms)
    };
    assert_eq!(state("alpha"), (true, Some(0)));
    assert_eq!(state("bravo"), (false, Some(TIMEOUT_MS)));
    assert_eq!(state("charlie"), (true, Some(TIMEOUT_MS - 1)));
    assert_eq!(state("delta"), (false, None));
    assert_eq!(state("echo"), (false, None));
    assert_eq!(state("foxtrot"), (false, Some(TIMEOUT_MS)));
    assert_eq!(state("golf"), (true, Some(TIMEOUT_MS - l.grace_ms + 5_000)));
    assert_eq!(state("hotel"), (true, Some(0)));
    assert_eq!(view.live_eligible_count(), 4);
    // charlie's lease ends in 1 ms.
    assert_eq!(view.next_expiry_ms(&s.ledger, now, &l), Some(1));
}

#[test]
fn view_leader_is_the_live_eligible_node_of_highest_rank() {
    let now = UNIX_BASE_MS + 10_000_000;
    let r = by_rank(&["ant", "bee", "cat", "dog"]);
    let ids: Vec<Identity> = (1..=4).map(identity).collect();
    let asked = [Role::None, Role::Auto, Role::Auto, Role::Master];
    let mut s = SharedLedger::new();
    for (i, uuid) in r.iter().enumerate() {
        s.announce(&ids[i], uuid, asked[i], UNIX_BASE_MS + i as u64);
    }
    // r[1] is dead (its lease ran out); the others beat recently.
    s.beat(&ids[1], &r[1], now - liveness().renew_ms - 2 * TIMEOUT_MS);
    for i in [0, 2, 3] {
        s.beat(&ids[i], &r[i], now - 1_000 + i as u64);
    }
    let view = View::read(&s.ledger, BUCKET, now, &liveness());
    assert_eq!(view.leader.as_deref(), Some(r[2].as_str()));
    assert!(view.nodes[&r[0]].live && !view.nodes[&r[0]].eligible());
    let live: Vec<&String> = view.live_eligible().map(|(u, _)| u).collect();
    assert_eq!(
        live,
        BTreeSet::from([&r[2], &r[3]])
            .into_iter()
            .collect::<Vec<_>>()
    );
    for (uuid, n) in &view.nodes {
        assert_eq!(n.rank, fnv32a(uuid));
    }

    // Nobody live: no leader.
    let later = View::read(
        &s.ledger,
        BUCKET,
        now + liveness().renew_ms + 2 * TIMEOUT_MS,
        &liveness(),
    );
    assert_eq!(later.leader, None);
}

#[test]
fn view_leader_ties_on_rank_go_to_the_higher_uuid() {
    assert_eq!(fnv32a("costarring"), fnv32a("liquid"));
    let now = UNIX_BASE_MS + 1_000_000;
    let mut s = SharedLedger::new();
    let (a, b) = (identity(1), identity(2));
    s.announce(&a, "costarring", Role::Auto, UNIX_BASE_MS);
    s.announce(&b, "liquid", Role::Auto, UNIX_BASE_MS + 1);
    s.beat(&a, "costarring", now - 1_000);
    s.beat(&b, "liquid", now - 999);
    let view = View::read(&s.ledger, BUCKET, now, &liveness());
    assert_eq!(view.leader.as_deref(), Some("liquid"));
}

#[test]
fn view_reads_roles_and_skips_garbage() {
    let now = UNIX_BASE_MS + 1_000_000;
    let (a, b, c) = (identity(1), identity(2), identity(3));
    let mut s = SharedLedger::new();
    s.announce(&a, "alpha", Role::Worker, UNIX_BASE_MS);
    let odd = Announcement {
        role: "boss".to_string(),
        hostname: "host-bravo".to_string(),
    };
    s.put(&b, BUCKET, "bravo-uuid", &odd.to_json(), UNIX_BASE_MS + 1);
    s.put(&c, BUCKET, "charlie-uuid", b"{not json", UNIX_BASE_MS + 2);
    s.put(&a, BUCKET, "alpha-role", b"worker", UNIX_BASE_MS + 3);
    s.put(&a, BUCKET, "bravo-role", b"captain", UNIX_BASE_MS + 4);
    s.put(&a, BUCKET, "zulu-role", b"master", UNIX_BASE_MS + 5);
    s.put(
        &a,
        "other-network",
        "delta-uuid",
        &odd.to_json(),
        UNIX_BASE_MS + 6,
    );

    // An empty network id reads the default bucket.
    let view = View::read(&s.ledger, "", now, &liveness());
    let uuids: Vec<&str> = view.nodes.keys().map(String::as_str).collect();
    assert_eq!(uuids, ["alpha", "bravo"]);
    let alpha = &view.nodes["alpha"];
    assert_eq!(alpha.peer, a.peer_id());
    assert_eq!(alpha.asked, Role::Worker);
    assert_eq!(alpha.hostname, "host-alpha");
    assert_eq!(alpha.role.as_deref(), Some("worker"));
    let bravo = &view.nodes["bravo"];
    assert_eq!(bravo.peer, b.peer_id());
    assert_eq!(bravo.asked, Role::Auto);
    assert_eq!(bravo.role, None);
    assert_eq!(view.leader, None, "nobody beats");
}

#[test]
fn view_reads_roles_set_through_the_api() {
    let now = UNIX_BASE_MS + 1_000_000;
    let mut s = SharedLedger::new();
    let ids: Vec<Identity> = (1..=3).map(identity).collect();
    for (i, uuid) in ["alpha", "bravo", "charlie"].iter().enumerate() {
        s.announce(&ids[i], uuid, Role::Auto, UNIX_BASE_MS + i as u64);
    }
    // What the API stores for `kairosctl role set` (edgevpn's Go client) and for a curl PUT.
    let kairos = serde_json::to_string(&crate::ledger::edgevpn::client_segment("master/ha"));
    let curl = serde_json::to_string("worker");
    let bogus = serde_json::to_string(&crate::ledger::edgevpn::client_segment("captain"));
    for (uuid, value, ms) in [
        ("alpha", kairos, 10),
        ("bravo", curl, 11),
        ("charlie", bogus, 12),
    ] {
        let value = value.unwrap();
        s.put(
            &ids[0],
            BUCKET,
            &names::role_key(uuid),
            value.as_bytes(),
            UNIX_BASE_MS + ms,
        );
    }
    let view = View::read(&s.ledger, BUCKET, now, &liveness());
    let role = |u: &str| view.nodes[u].role.clone();
    assert_eq!(role("alpha").as_deref(), Some("master/ha"));
    assert_eq!(role("bravo").as_deref(), Some("worker"));
    assert_eq!(role("charlie"), None);
}

// ---- replication ----

/// A ledger and its replication, as one node runs them.
struct Replica {
    identity: Identity,
    clock: Clock,
    ledger: Ledger,
    replication: Replication,
}

impl Replica {
    fn new(n: u8) -> Self {
        Self::in_cluster(n, BUCKET)
    }

    /// A node of the cluster whose bucket is `cluster`.
    fn in_cluster(n: u8, cluster: &str) -> Self {
        let limits = Limits::default();
        Self {
            identity: identity(n),
            clock: Clock::new(),
            ledger: Ledger::new(limits),
            replication: Replication::new(
                SyncLimits::for_ledger(&limits, 1 << 20),
                cluster,
                u64::from(n),
            ),
        }
    }

    fn peer(&self) -> PeerId {
        self.identity.peer_id()
    }

    fn put(&mut self, bucket: &str, key: &str, value: &str, unix_ms: u64) -> Entry {
        self.ledger
            .put(
                &self.identity,
                &mut self.clock,
                bucket,
                key,
                value.as_bytes(),
                unix_ms,
            )
            .expect("ledger write")
    }

    /// Writes `bucket/key` and pushes it as the node does (not back to `source`); returns the
    /// peers the messages it queued go to.
    fn write_and_push(
        &mut self,
        bucket: &str,
        key: &str,
        unix_ms: u64,
        source: Option<PeerId>,
    ) -> BTreeSet<PeerId> {
        let entry = self.put(bucket, key, "v", unix_ms);
        let now = Instant::now();
        self.replication.push(now, &[entry], source);
        // Relayed news waits for the next batch.
        self.flush(now + NEWS_BATCH_DELAY * 2);
        self.outbox()
            .into_iter()
            .filter(|(_, bytes)| bytes.get(1) == Some(&3)) // batches, not digests
            .map(|(p, _)| p)
            .collect()
    }

    fn entries(&self) -> Vec<Entry> {
        self.ledger.entries().cloned().collect()
    }

    /// Runs the replication's timers at `now` (sends the waiting news).
    fn flush(&mut self, now: Instant) {
        self.replication
            .handle_timeout(now, UNIX_BASE_MS, &self.ledger);
    }

    fn outbox(&mut self) -> Vec<(PeerId, Vec<u8>)> {
        std::iter::from_fn(|| self.replication.poll_message()).collect()
    }
}

/// Connects replicas `a` and `b` (both ends, as the node does).
fn connect(replicas: &mut [Replica], a: usize, b: usize, now: Instant) {
    let (pa, pb) = (replicas[a].peer(), replicas[b].peer());
    for (me, other) in [(a, pb), (b, pa)] {
        let r = &mut replicas[me];
        r.replication.connected(now, UNIX_BASE_MS, &r.ledger, other);
    }
}

/// `nodes` replicas, the first connected to each of the others (not yet synced), and when.
fn star(nodes: u8) -> (Vec<Replica>, Instant) {
    let mut r: Vec<Replica> = (1..=nodes).map(Replica::new).collect();
    let now = Instant::now();
    for peer in 1..r.len() {
        connect(&mut r, 0, peer, now);
    }
    (r, now)
}

/// Hands `messages` sent by replica `from` to their targets.
fn hand_over(replicas: &mut [Replica], from: usize, messages: Vec<(PeerId, Vec<u8>)>) {
    let sender = replicas[from].peer();
    for (to, bytes) in messages {
        let r = replicas
            .iter_mut()
            .find(|r| r.peer() == to)
            .expect("a known peer");
        r.replication
            .handle_message(Instant::now(), UNIX_BASE_MS, &mut r.ledger, sender, &bytes);
    }
}

/// Delivers messages until none is left (relayed news as soon as nothing else is in flight, as
/// its timer would send it); returns how many were delivered.
fn pump(replicas: &mut [Replica]) -> usize {
    let mut delivered = 0;
    loop {
        let mut any = false;
        for pass in 0..2 {
            if pass == 1 {
                if any {
                    break;
                }
                for r in replicas.iter_mut() {
                    r.replication.flush_news();
                    // Announced entries that did not come in full are asked for.
                    let later = Instant::now() + LAZY_WAIT + ASK_TIMEOUT;
                    r.replication.ask_wanted(later, &r.ledger);
                }
            }
            for from in 0..replicas.len() {
                let out = replicas[from].outbox();
                any |= !out.is_empty();
                delivered += out.len();
                hand_over(replicas, from, out);
            }
        }
        if !any {
            return delivered;
        }
        assert!(delivered < 10_000, "replication does not quiesce");
    }
}

#[test]
fn clusters_of_one_token_share_the_network_wide_buckets_and_keep_their_own() {
    // Nodes 0 and 2 in cluster "alpha", node 1 in "beta"; links 0-1 and 1-2 first.
    let mut r = vec![
        Replica::in_cluster(1, "alpha"),
        Replica::in_cluster(2, "beta"),
        Replica::in_cluster(3, "alpha"),
    ];
    let t = UNIX_BASE_MS + 1_000;
    r[0].put("alpha", "a", "1", t);
    r[0].put(names::DHCP, "10.1.0.1", "a", t);
    r[0].put("photos", "p", "1", t); // a user's bucket: network-wide
    r[1].put("beta", "b", "1", t);
    r[1].put("beta", &names::uuid_key("node-b"), "{}", t); // its announcement
    r[1].put(names::HEALTHCHECK, "b", "1", t);
    connect(&mut r, 0, 1, Instant::now());
    connect(&mut r, 1, 2, Instant::now());
    pump(&mut r);
    for (i, node) in r.iter().enumerate() {
        assert!(
            node.ledger.get(names::DHCP, "10.1.0.1").is_some(),
            "node {i}"
        );
        assert!(node.ledger.get("photos", "p").is_some(), "node {i}");
        assert!(
            node.ledger.get(names::HEALTHCHECK, "b").is_some(),
            "node {i}"
        );
    }
    assert_eq!(
        r[1].ledger.get("alpha", "a"),
        None,
        "beta holds no alpha entry"
    );
    // But announcements cross: they bind the uuids the network-wide buckets are keyed by.
    for node in [&r[0], &r[2]] {
        assert!(
            node.ledger
                .get("beta", &names::uuid_key("node-b"))
                .is_some()
        );
    }
    assert_eq!(r[0].ledger.get("beta", "b"), None);
    assert_eq!(r[2].ledger.get("beta", "b"), None);
    assert_eq!(
        r[2].ledger.get("alpha", "a"),
        None,
        "alpha's bucket does not cross a beta node"
    );
    // Pushes keep to the same scope: a new alpha entry goes to no beta member, a claim does.
    let beta = r[1].peer();
    assert!(r[0].write_and_push("alpha", "a2", t + 1, None).is_empty());
    assert_eq!(
        r[0].write_and_push(names::DHCP, "10.1.0.2", t + 1, None),
        BTreeSet::from([beta])
    );
    pump(&mut r);
    assert_eq!(r[1].ledger.get("alpha", "a2"), None);
    // A member of the same cluster whose cluster is not known yet (its digest is on the way)
    // gets no push of the bucket; the exchange that starts the connection brings it all.
    connect(&mut r, 0, 2, Instant::now());
    let third = r[2].peer();
    let pushed_to = r[0].write_and_push("alpha", "a3", t + 2, None);
    assert!(!pushed_to.contains(&third), "{pushed_to:?}");
    pump(&mut r);
    for key in ["a", "a2", "a3"] {
        assert!(r[2].ledger.get("alpha", key).is_some(), "{key}");
    }
    assert_eq!(r[2].ledger.get("beta", "b"), None);
    assert_eq!(r[1].ledger.get("alpha", "a3"), None);
}

#[test]
fn relayed_news_goes_in_full_to_a_few_members_and_is_announced_to_the_others() {
    // Node 0 is connected to nodes 1 to 6; node 1 writes, node 0 passes it on to the five
    // others.
    let (mut r, now) = star(7);
    pump(&mut r);
    let entry = r[1].put(BUCKET, "k", "v", UNIX_BASE_MS + 1_000);
    r[1].replication
        .push(now, std::slice::from_ref(&entry), None);
    let out = r[1].outbox();
    hand_over(&mut r, 1, out);
    r[0].replication.flush_news();
    let out = r[0].outbox();
    let kinds: Vec<u8> = out.iter().map(|(_, bytes)| bytes[1]).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == 3).count(),
        EAGER_FANOUT,
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == 4).count(), 5 - EAGER_FANOUT);
    assert!(
        out.iter().all(|(p, _)| *p != r[1].peer()),
        "not back to its writer"
    );
    hand_over(&mut r, 0, out);
    let announced: Vec<usize> = (2..r.len())
        .filter(|i| r[*i].ledger.entry(BUCKET, "k").is_none())
        .collect();
    assert_eq!(announced.len(), 5 - EAGER_FANOUT);
    // Not asked for before the wait is over (a full copy may be on its way), then asked for.
    for i in &announced {
        let node = &mut r[*i];
        node.replication.ask_wanted(now, &node.ledger);
        assert!(node.outbox().is_empty());
        node.replication.ask_wanted(now + LAZY_WAIT, &node.ledger);
    }
    pump(&mut r);
    for node in &r {
        assert_eq!(node.ledger.entry(BUCKET, "k"), Some(&entry));
    }
    let asked: u64 = r.iter().map(|n| n.replication.stats().entries_asked).sum();
    assert_eq!(asked, (5 - EAGER_FANOUT) as u64);
    assert_eq!(
        r[0].replication.stats().entries_announced,
        (5 - EAGER_FANOUT) as u64
    );
}

/// The periodic check is a brief digest: a member whose ledger matches answers nothing; one
/// that differs answers with its full digest, and the exchange the other way repairs it.
#[test]
fn the_periodic_check_is_brief_and_repairs_a_missed_entry() {
    let mut r = vec![Replica::new(1), Replica::new(2)];
    let start = Instant::now();
    connect(&mut r, 0, 1, start);
    pump(&mut r);
    assert!(r[0].replication.all_peers_synced() && r[1].replication.all_peers_synced());
    let check = |r: &mut Vec<Replica>, at: Instant| {
        r[0].flush(at);
        let out = r[0].outbox();
        assert_eq!(out.len(), 1, "one digest");
        let SyncMessage::Digest(d) =
            SyncMessage::decode(&out[0].1, &SyncLimits::default()).unwrap()
        else {
            panic!("a digest")
        };
        assert!(d.brief && d.writers.is_empty());
        hand_over(r, 0, out);
    };
    let at = start + ANTI_ENTROPY_INTERVAL + Duration::from_secs(1);
    check(&mut r, at);
    assert!(r[1].outbox().is_empty(), "matching ledgers: no answer");

    // Node 1 writes an entry whose push was lost; node 0's next check finds it.
    r[1].put(BUCKET, "missed", "v", UNIX_BASE_MS + 5_000);
    check(&mut r, at + ANTI_ENTROPY_INTERVAL);
    let answer = r[1].outbox();
    assert_eq!(answer.len(), 1, "node 1 answers with its digest");
    hand_over(&mut r, 1, answer);
    pump(&mut r);
    assert_eq!(r[0].ledger.get(BUCKET, "missed"), Some(&b"v"[..]));
}

#[test]
fn two_ledgers_converge_after_connecting() {
    let mut r = vec![Replica::new(1), Replica::new(2)];
    for key in ["a1", "a2", "a3"] {
        r[0].put(BUCKET, key, "from a", UNIX_BASE_MS + 1_000);
    }
    r[0].put(BUCKET, "shared", "older", UNIX_BASE_MS + 1_000);
    r[1].put(BUCKET, "b1", "from b", UNIX_BASE_MS + 2_000);
    r[1].put(names::HEALTHCHECK, "b", "1", UNIX_BASE_MS + 2_000);
    r[1].put(BUCKET, "shared", "newer", UNIX_BASE_MS + 2_000);
    assert!(!r[0].replication.is_synced());

    connect(&mut r, 0, 1, Instant::now());
    assert!(pump(&mut r) > 0);
    assert_eq!(r[0].entries(), r[1].entries());
    assert_eq!(r[0].ledger.len(), 6);
    assert_eq!(r[0].ledger.get(BUCKET, "shared"), Some(&b"newer"[..]));
    assert!(r[0].replication.is_synced() && r[1].replication.is_synced());
    assert_eq!(r[0].replication.stats().entries_fresh, 3);
    assert_eq!(r[1].replication.stats().entries_fresh, 3);
    assert_eq!(r[0].replication.stats().rejected, 0);
}

#[test]
fn three_ledgers_in_a_chain_converge() {
    let mut r: Vec<Replica> = (1..=3).map(Replica::new).collect();
    for (i, replica) in r.iter_mut().enumerate() {
        for k in 0..4 {
            replica.put(BUCKET, &format!("n{i}-k{k}"), "v", UNIX_BASE_MS + 100 * k);
        }
    }
    // 0 - 1 - 2: what 0 and 2 hold reaches the other end through 1.
    let now = Instant::now();
    connect(&mut r, 0, 1, now);
    connect(&mut r, 1, 2, now);
    pump(&mut r);
    let first = r[0].entries();
    assert_eq!(first.len(), 12);
    assert!(r.iter().all(|x| x.entries() == first));
    assert!(r.iter().all(|x| x.replication.is_synced()));
}

#[test]
fn pushes_reach_peers_and_heartbeats_are_news() {
    let (mut r, _) = star(4);
    pump(&mut r);
    let peers: BTreeSet<PeerId> = r[1..].iter().map(Replica::peer).collect();

    let t = UNIX_BASE_MS + 5_000;
    let e = r[0].put(BUCKET, "fresh", "v", t);
    let hub = &mut r[0];
    hub.replication.push(Instant::now(), &[e], None);
    let out = hub.outbox();
    assert_eq!(out.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>(), peers);
    hand_over(&mut r, 0, out);
    assert!(
        r[1..]
            .iter()
            .all(|x| x.ledger.get(BUCKET, "fresh") == Some(&b"v"[..]))
    );
    // The spokes' only peer is the hub, where the entry came from: nothing is pushed back.
    assert!(r[1..].iter_mut().all(|x| x.outbox().is_empty()));

    // Heartbeats are rare (see `liveness`): each one goes to every member at once.
    let hub = &mut r[0];
    let beat = |hub: &mut Replica, at: u64| hub.write_and_push(names::HEALTHCHECK, "hub", at, None);
    assert_eq!(beat(hub, t), peers);
    assert_eq!(beat(hub, t + 15_000), peers);

    let source = r[1].peer();
    let targets = r[0].write_and_push(BUCKET, "relayed", t + 90_000, Some(source));
    assert_eq!(targets.len(), 2);
    assert!(!targets.contains(&source));
}

#[test]
fn relayed_news_waits_for_its_batch_and_skips_the_members_that_sent_it() {
    // 0 is connected to 1, 2 and 3; 1 writes an entry and 0 gets it from 1, then from 2.
    let (mut r, now) = star(4);
    connect(&mut r, 1, 2, now);
    pump(&mut r);
    let e = r[1].put(BUCKET, "fresh", "v", UNIX_BASE_MS + 5_000);
    r[1].replication.push(now, &[e], None);
    // The writer's own news goes at once, to both of its members.
    let out = r[1].outbox();
    assert_eq!(out.len(), 2);
    let (to_0, to_2): (Vec<_>, Vec<_>) = out.into_iter().partition(|(p, _)| *p == r[0].peer());
    hand_over(&mut r, 1, to_0);
    // 0 holds it back for its batch, and hears it from 2 meanwhile.
    assert!(r[0].outbox().is_empty());
    assert!(
        r[0].replication
            .poll_timeout()
            .is_some_and(|t| t <= now + NEWS_BATCH_DELAY * 2)
    );
    hand_over(&mut r, 1, to_2);
    r[2].replication.flush_news();
    let from_2: Vec<_> = r[2]
        .outbox()
        .into_iter()
        .filter(|(p, _)| *p == r[0].peer())
        .collect();
    assert_eq!(from_2.len(), 1, "2 does not know 0 holds it");
    hand_over(&mut r, 2, from_2);
    let hub = &mut r[0];
    hub.flush(Instant::now() + NEWS_BATCH_DELAY * 2);
    let to: Vec<PeerId> = hub.outbox().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        to,
        vec![r[3].peer()],
        "only the member that lacks it gets it"
    );
    assert_eq!(r[0].replication.stats().entries_stale, 1);
}

#[test]
fn malformed_messages_are_counted_not_fatal() {
    let mut r = vec![Replica::new(1), Replica::new(2)];
    r[1].put(BUCKET, "k", "v", UNIX_BASE_MS);
    connect(&mut r, 0, 1, Instant::now());
    let digest = r[0].outbox().pop().expect("a digest").1;
    let from = r[1].peer();
    let target = &mut r[0];
    for bytes in [&b"garbage"[..], &[], &digest[..digest.len() / 2]] {
        let fresh = target.replication.handle_message(
            Instant::now(),
            UNIX_BASE_MS,
            &mut target.ledger,
            from,
            bytes,
        );
        assert!(fresh.is_empty());
    }
    let stats = target.replication.stats();
    assert_eq!((stats.messages_in, stats.rejected), (3, 3));
    assert!(target.outbox().is_empty(), "nothing answered");
    assert!(target.ledger.is_empty());
    // The connection still works.
    pump(&mut r);
    assert_eq!(r[0].entries(), r[1].entries());
    assert_eq!(r[0].ledger.len(), 1);
}

// ---- settings from the configuration ----

/// The `p2p` block of a one-file configuration.
fn p2p(yaml: &str) -> P2pConfig {
    let host = HostFacts {
        machine_id: "f0e1d2c3b4a5968778695a4b3c2d1e0f".to_string(),
        hostname: "host-1".to_string(),
    };
    config::parse(&[(Path::new("test.yaml"), yaml)], &host)
        .unwrap_or_else(|e| panic!("{e}"))
        .p2p
}

fn settings(yaml: &str) -> ClusterSettings {
    ClusterSettings::from_config(&p2p(yaml), "uuid-1", "host-1", 1 << 20)
}

#[test]
fn settings_from_an_empty_config_are_the_defaults() {
    let s = ClusterSettings::from_config(&p2p(""), "uuid-1", "uuid-1", 20 * 1024 * 1024);
    assert_eq!(s, ClusterSettings::defaults("uuid-1"));
    assert_eq!(s.minimum_nodes, 2);
    assert_eq!(s.network_id, "kairos");
    assert!(s.ipam.as_ref().is_some_and(|i| i.static_address.is_none()));
}

#[test]
fn settings_from_config() {
    let s = settings(
        "p2p:\n  network_id: prod\n  role: master\n  minimum_nodes: 3\n  dynamic_roles: true\n  liveness_timeout: 90\n  auto:\n    enable: false\n    ha:\n      enable: true\n      master_nodes: 2\n",
    );
    assert_eq!(s.network_id, "prod");
    assert_eq!((s.uuid.as_str(), s.hostname.as_str()), ("uuid-1", "host-1"));
    assert_eq!(s.role, Role::Master);
    assert!(!s.auto);
    assert_eq!(s.minimum_nodes, 3);
    assert_eq!(
        s.roles,
        RolePolicy {
            ha_masters: 2,
            dynamic: true
        }
    );
    assert_eq!(s.roles.master_role(), names::ROLE_MASTER_CLUSTERINIT);
    assert_eq!(s.liveness_timeout, Duration::from_secs(90));
    assert_eq!(s.ledger_limits, Limits::for_max_message_size(1 << 20));
    assert_eq!(s.max_message_bytes, 1 << 20);

    let s = settings("p2p:\n  auto:\n    ha:\n      enable: false\n      master_nodes: 3\n");
    assert_eq!(s.roles.ha_masters, 0);
    assert_eq!(s.roles.master_role(), names::ROLE_MASTER);
    assert!(s.auto && !s.roles.dynamic);
}

#[test]
fn settings_vpn_addresses() {
    assert_eq!(settings("p2p:\n  vpn:\n    create: false\n").ipam, None);

    let s = settings("p2p:\n  vpn:\n    env:\n      ADDRESS: 10.5.0.9/24\n      DHCP: \"off\"\n");
    let ipam = s.ipam.expect("an allocator");
    assert_eq!(ipam.static_address, Some(Ipv4Addr::new(10, 5, 0, 9)));
    assert_eq!(ipam.network.prefix_len, 24);
    assert_eq!(ipam.hostname, "host-1");

    let s = settings("p2p:\n  vpn:\n    env:\n      ADDRESS: 10.5.0.9/24\n      DHCP: true\n");
    let ipam = s.ipam.expect("an allocator");
    assert_eq!(ipam.static_address, None);
    assert_eq!(ipam.network.addr, Ipv4Addr::new(10, 5, 0, 9));
}

// ---- three clusters ----

/// `Cluster`s connected to each other directly, on a virtual clock.
struct Wired {
    nodes: Vec<Cluster>,
    peers: Vec<PeerId>,
    /// How far each node's wall clock is off, in milliseconds.
    skew_ms: Vec<i64>,
    base: Instant,
    now: Instant,
}

impl Wired {
    fn new(uuids: &[&str]) -> Self {
        let base = Instant::now();
        let mut nodes = Vec::new();
        let mut peers = Vec::new();
        for (i, uuid) in uuids.iter().enumerate() {
            let id = identity(100 + i as u8);
            peers.push(id.peer_id());
            let settings = ClusterSettings::defaults(uuid);
            nodes.push(Cluster::new(&id, settings, Ledger::default(), i as u64));
        }
        Self {
            skew_ms: vec![0; nodes.len()],
            nodes,
            peers,
            base,
            now: base,
        }
    }

    /// The wall clock of node `i`.
    fn unix_ms(&self, i: usize) -> u64 {
        (UNIX_BASE_MS + (self.now - self.base).as_millis() as u64)
            .saturating_add_signed(self.skew_ms[i])
    }

    /// Starts every node, then connects every pair.
    fn start(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            let ms = self.unix_ms(i);
            self.nodes[i].handle_timeout(now, ms);
        }
        for i in 0..self.nodes.len() {
            let ms = self.unix_ms(i);
            for j in 0..self.nodes.len() {
                if i != j {
                    self.nodes[i].peer_connected(now, ms, self.peers[j]);
                }
            }
        }
        self.deliver();
    }

    /// Delivers messages until none is left.
    fn deliver(&mut self) {
        let now = self.now;
        for _ in 0..10_000 {
            let mut any = false;
            for from in 0..self.nodes.len() {
                while let Some((to, bytes)) = self.nodes[from].poll_message() {
                    let j = self.peers.iter().position(|p| *p == to).expect("a peer");
                    let ms = self.unix_ms(j);
                    self.nodes[j].handle_message(now, ms, self.peers[from], &bytes);
                    any = true;
                }
            }
            if !any {
                return;
            }
        }
        panic!("messages do not quiesce");
    }

    /// Runs every timer due within `duration`.
    fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        for _ in 0..100_000 {
            let next = self.nodes.iter().filter_map(Cluster::poll_timeout).min();
            let Some(next) = next.filter(|t| *t <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(next);
            let now = self.now;
            for i in 0..self.nodes.len() {
                let ms = self.unix_ms(i);
                let n = &mut self.nodes[i];
                if n.poll_timeout().is_some_and(|t| t <= now) {
                    n.handle_timeout(now, ms);
                }
            }
            self.deliver();
        }
        panic!("timers do not advance");
    }
}

/// A member that loses a live node's connection suspects it (see `liveness`); the node answers
/// with a new heartbeat at once, stays live everywhere, and the suspicion is withdrawn. A node
/// that does not answer counts as dead everywhere a grace after the suspicion, not before.
#[test]
fn a_suspected_node_that_answers_stays_live_and_one_that_does_not_is_dead() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.start();
    w.run_for(Duration::from_secs(10));
    let beat = |w: &Wired, u: &str| {
        w.nodes[0]
            .ledger()
            .entry(names::HEALTHCHECK, u)
            .unwrap()
            .version
    };
    let before = beat(&w, "node-b");
    let (now, ms, peer) = (w.now, w.unix_ms(0), w.peers[1]);
    w.nodes[0].peer_disconnected(now, ms, &peer, true);
    w.deliver();
    assert!(w.nodes[2].ledger().get(names::SUSPECTS, "node-a").is_some());
    w.run_for(Duration::from_secs(1));
    assert!(beat(&w, "node-b") > before, "node-b answered");
    w.run_for(Duration::from_secs(60));
    for n in &w.nodes {
        assert!(n.view().nodes["node-b"].live);
        assert_eq!(n.ledger().get(names::SUSPECTS, "node-a"), None, "withdrawn");
    }

    // node-c is gone: node-a and node-b lose it, and it never answers.
    let gone = w.nodes.remove(2);
    let gone_peer = w.peers.remove(2);
    w.skew_ms.remove(2);
    let lost_at = w.now;
    for i in 0..2 {
        let ms = w.unix_ms(i);
        w.nodes[i].peer_disconnected(lost_at, ms, &gone_peer, true);
    }
    w.deliver();
    let grace = Duration::from_millis(Liveness::for_timeout(Duration::from_secs(60)).grace_ms);
    w.run_for(grace - Duration::from_millis(100));
    assert!(w.nodes.iter().all(|n| n.view().nodes["node-c"].live));
    w.run_for(Duration::from_millis(200));
    assert!(w.nodes.iter().all(|n| !n.view().nodes["node-c"].live));
    drop(gone);
}

#[test]
fn three_clusters_elect_one_master_and_two_workers() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.start();
    for n in &mut w.nodes {
        n.saved();
    }
    w.run_for(Duration::from_secs(10));

    let master = by_rank(&uuids).remove(0);
    let mut addresses = BTreeSet::new();
    for (n, uuid) in w.nodes.iter_mut().zip(uuids) {
        assert_eq!(n.master(), Some(master.as_str()), "{uuid}");
        assert_eq!(n.leader(), Some(master.as_str()), "{uuid}");
        let role = if uuid == master { "master" } else { "worker" };
        assert_eq!(n.role(), Some(role), "{uuid}");
        assert_eq!(n.view().live_eligible_count(), 3);
        let addr = n.address().expect("an address");
        assert_eq!(addr.octets()[..3], [10, 1, 0]);
        addresses.insert(addr);

        let events: Vec<ClusterEvent> = std::iter::from_fn(|| n.poll_event()).collect();
        let elected = ClusterEvent::MasterElected {
            uuid: master.clone(),
        };
        assert_eq!(events.iter().filter(|e| **e == elected).count(), 1);
        assert!(events.contains(&ClusterEvent::RoleAssigned {
            role: role.to_string()
        }));
        assert!(events.iter().any(|e| matches!(
            e,
            ClusterEvent::Address(ipam::IpamEvent::Assigned { addr: a, .. }) if *a == addr
        )));
        assert!(!events.iter().any(ClusterEvent::is_alarm), "{events:?}");
    }
    assert_eq!(addresses.len(), 3, "distinct addresses");
    let masters = w.nodes[0]
        .view()
        .nodes
        .values()
        .filter(|n| n.role.as_deref() == Some(names::ROLE_MASTER))
        .count();
    assert_eq!(masters, 1);

    // Role writes must reach the disk; after a save an idle cluster writes nothing until the
    // heartbeats' renewal, which is saved lazily.
    let now = w.now;
    assert!(w.nodes.iter().all(|n| n.save_due(now)));
    for n in &mut w.nodes {
        n.saved();
    }
    assert!(w.nodes.iter().all(|n| !n.save_due(now)));
    w.run_for(Duration::from_secs(60) + LAZY_SAVE);
    let now = w.now;
    assert!(w.nodes.iter().all(|n| !n.save_due(now)));
    let renewal = Duration::from_millis(Liveness::for_timeout(Duration::from_secs(60)).renew_ms);
    w.run_for(renewal + LAZY_SAVE);
    let now = w.now;
    assert!(w.nodes.iter().all(|n| n.save_due(now)));
    assert!(w.nodes.iter().all(|n| n.role().is_some()));
}

/// Clocks minutes apart (boxes without NTP): a node whose clock is behind writes its first
/// heartbeat with a version the others see as minutes old. It beats again as soon as their
/// versions pull its hybrid clock up, so everybody is live and has a role within seconds,
/// not after the next renewal.
#[test]
fn nodes_with_clocks_minutes_behind_are_live_at_once() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.skew_ms = vec![0, -5 * 60_000, 3 * 60_000];
    w.start();
    w.run_for(Duration::from_secs(5));
    for (n, uuid) in w.nodes.iter().zip(uuids) {
        assert_eq!(
            n.view().live_eligible_count(),
            3,
            "{uuid} sees everybody live"
        );
        assert!(n.role().is_some(), "{uuid} has a role 5 s in");
    }
}

/// A node alone with `minimum_nodes: 1` (a one-box cluster) runs the whole election by itself,
/// one step per update pass: it must not stall until the next heartbeat.
#[test]
fn a_lone_node_with_minimum_nodes_one_becomes_master_right_after_settling() {
    let mut settings = ClusterSettings::defaults("solo");
    settings.minimum_nodes = 1;
    let settle = settings.settle;
    let limits = settings.ledger_limits;
    let mut cluster = Cluster::new(&identity(1), settings, Ledger::new(limits), 7);
    let start = Instant::now();
    let mut now = start;
    let unix = |now: Instant| 1_700_000_000_000 + now.duration_since(start).as_millis() as u64;
    cluster.handle_timeout(now, unix(now));
    while cluster.role().is_none() && now < start + Duration::from_secs(60) {
        now = cluster
            .poll_timeout()
            .expect("a timer is always set")
            .max(now);
        cluster.handle_timeout(now, unix(now));
    }
    assert_eq!(cluster.role(), Some(names::ROLE_MASTER));
    let took = now.duration_since(start);
    assert!(
        took <= settle + Duration::from_millis(100),
        "master after {took:?}, settle is {settle:?}"
    );
}

// ---- a lone node asking for `master` (the docs' single-node example) ----

/// `Wired` nodes with settings of their own (not yet started).
fn wired_with(uuids: &[&str], settings: impl Fn(&str) -> ClusterSettings) -> Wired {
    let mut w = Wired::new(uuids);
    for (i, uuid) in uuids.iter().enumerate() {
        let id = identity(100 + i as u8);
        w.nodes[i] = Cluster::new(&id, settings(uuid), Ledger::default(), i as u64);
    }
    w
}

fn asking(role: Role) -> impl Fn(&str) -> ClusterSettings {
    move |uuid| {
        let mut s = ClusterSettings::defaults(uuid);
        s.role = role;
        s
    }
}

/// Starts node `i` alone (no peer).
fn start_one(w: &mut Wired, i: usize) {
    let (now, ms) = (w.now, w.unix_ms(i));
    w.nodes[i].handle_timeout(now, ms);
}

/// Connects node `i` to every started node and delivers.
fn join(w: &mut Wired, i: usize) {
    let now = w.now;
    for j in 0..w.nodes.len() {
        if j != i && w.nodes[j].poll_timeout().is_some() {
            let (mi, mj) = (w.unix_ms(i), w.unix_ms(j));
            let (pi, pj) = (w.peers[i], w.peers[j]);
            w.nodes[i].peer_connected(now, mi, pj);
            w.nodes[j].peer_connected(now, mj, pi);
        }
    }
    w.deliver();
}

fn masters(w: &Wired) -> BTreeSet<String> {
    w.nodes
        .iter()
        .filter_map(|n| n.master().map(str::to_string))
        .collect()
}

#[test]
fn a_lone_node_asking_for_master_forms_alone_after_the_wait() {
    let mut w = wired_with(&["solo"], asking(Role::Master));
    let wait = w.nodes[0].settings.lone_master_wait;
    assert_eq!(wait, super::LONE_MASTER_WAIT);
    assert_eq!(w.nodes[0].settings.minimum_nodes, 2);
    start_one(&mut w, 0);
    w.run_for(wait - Duration::from_millis(100));
    assert_eq!(w.nodes[0].role(), None, "not before the wait");
    w.run_for(Duration::from_millis(200));
    assert_eq!(w.nodes[0].role(), Some(names::ROLE_MASTER));
    assert_eq!(w.nodes[0].master(), Some("solo"));
    let events: Vec<ClusterEvent> = std::iter::from_fn(|| w.nodes[0].poll_event()).collect();
    assert!(
        events.contains(&ClusterEvent::FormingAlone { waited: wait }),
        "{events:?}"
    );
    // With HA asked for, the lone master is the cluster-init one (HA masters join it later).
    let mut w = wired_with(&["solo"], |uuid| {
        let mut s = asking(Role::Master)(uuid);
        s.roles.ha_masters = 2;
        s
    });
    start_one(&mut w, 0);
    w.run_for(wait + Duration::from_millis(100));
    assert_eq!(w.nodes[0].role(), Some(names::ROLE_MASTER_CLUSTERINIT));
}

#[test]
fn a_lone_auto_or_worker_node_still_waits_for_minimum_nodes() {
    for role in [Role::Auto, Role::Worker] {
        let mut w = wired_with(&["solo"], asking(role));
        start_one(&mut w, 0);
        w.run_for(Duration::from_secs(600));
        assert_eq!(w.nodes[0].role(), None, "{role:?}");
        assert_eq!(w.nodes[0].master(), None, "{role:?}");
    }
}

/// Two nodes configured `role: master` that meet within the wait: one master, the other gets
/// no role (as any node asking for `master` once the cluster has one).
#[test]
fn two_nodes_asking_for_master_together_elect_one() {
    let uuids = ["box-a", "box-b"];
    let mut w = wired_with(&uuids, asking(Role::Master));
    w.start();
    w.run_for(Duration::from_secs(120));
    assert_eq!(masters(&w).len(), 1, "{:?}", masters(&w));
    let roles: Vec<Option<&str>> = w.nodes.iter().map(Cluster::role).collect();
    assert_eq!(
        roles
            .iter()
            .filter(|r| **r == Some(names::ROLE_MASTER))
            .count(),
        1,
        "{roles:?}"
    );
    assert!(roles.contains(&None), "{roles:?}");
    let events: Vec<ClusterEvent> = w
        .nodes
        .iter_mut()
        .flat_map(|n| std::iter::from_fn(|| n.poll_event()).collect::<Vec<_>>())
        .collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ClusterEvent::FormingAlone { .. })),
        "{events:?}"
    );
}

/// A node that formed alone stays the only master: nodes that come later, a second node asking
/// for `master` among them, join its cluster.
#[test]
fn nodes_that_come_after_a_lone_master_join_it() {
    let uuids = ["first", "second-master", "auto-1", "auto-2"];
    let mut w = wired_with(&uuids, |uuid| {
        let role = if uuid.starts_with("auto") {
            Role::Auto
        } else {
            Role::Master
        };
        asking(role)(uuid)
    });
    start_one(&mut w, 0);
    w.run_for(super::LONE_MASTER_WAIT + Duration::from_secs(1));
    assert_eq!(w.nodes[0].role(), Some(names::ROLE_MASTER));
    for i in 1..uuids.len() {
        start_one(&mut w, i);
        join(&mut w, i);
        w.run_for(Duration::from_secs(5));
    }
    w.run_for(Duration::from_secs(120));
    assert_eq!(masters(&w), BTreeSet::from(["first".to_string()]));
    let roles: Vec<Option<&str>> = w.nodes.iter().map(Cluster::role).collect();
    assert_eq!(
        roles,
        [
            Some(names::ROLE_MASTER),
            None,
            Some(names::ROLE_WORKER),
            Some(names::ROLE_WORKER)
        ]
    );
}

/// A node asking for `master` that knows of another node (from its persisted ledger: a
/// multi-node network restarting while the others are still down) never forms alone.
#[test]
fn a_master_that_knows_of_other_nodes_does_not_form_alone() {
    let uuids = ["box-a", "box-b"];
    let mut w = wired_with(&uuids, asking(Role::Master));
    // Both announce and meet, then box-b goes away before any election (minimum_nodes 3 here,
    // so none happens while they are together).
    for n in &mut w.nodes {
        n.settings.minimum_nodes = 3;
    }
    w.start();
    w.run_for(Duration::from_secs(5));
    assert!(w.nodes[0].view().nodes.contains_key("box-b"));
    let ledger = w.nodes[0].ledger().clone();
    let mut settings = asking(Role::Master)("box-a");
    settings.minimum_nodes = 3;
    let mut w = Wired::new(&["box-a"]);
    w.nodes[0] = Cluster::new(&identity(100), settings, ledger, 0);
    start_one(&mut w, 0);
    w.run_for(Duration::from_secs(600));
    assert_eq!(w.nodes[0].role(), None);
    assert_eq!(w.nodes[0].master(), None);
}

#[test]
fn a_second_master_is_reported_once_per_change() {
    // Two groups elected before they met: the ledgers merged, `master-commit` names a; b still
    // holds the master role of its own cluster.
    let (a, b, c) = (identity(1), identity(2), identity(3));
    let mut ledger = Ledger::new(Limits::default());
    let mut clock = Clock::new();
    let t = UNIX_BASE_MS;
    let announce = |ledger: &mut Ledger, clock: &mut Clock, id: &Identity, uuid: &str| {
        let ann = Announcement::new(Role::Auto, uuid).to_json();
        ledger
            .put(id, clock, BUCKET, &names::uuid_key(uuid), &ann, t)
            .unwrap();
        ledger
            .put(id, clock, names::HEALTHCHECK, uuid, b"1767225600", t)
            .unwrap();
    };
    announce(&mut ledger, &mut clock, &a, "a");
    announce(&mut ledger, &mut clock, &b, "b");
    let commit = serde_json::to_vec(&election::Commit {
        ballot: ballot(1, "a"),
        candidate: "a".into(),
        at_ms: 0,
    })
    .unwrap();
    ledger
        .put(&a, &mut clock, BUCKET, election::MASTER_COMMIT, &commit, t)
        .unwrap();
    ledger
        .put(&a, &mut clock, BUCKET, &names::role_key("a"), b"master", t)
        .unwrap();
    ledger
        .put(&b, &mut clock, BUCKET, &names::role_key("b"), b"master", t)
        .unwrap();
    let mut cluster = Cluster::new(&c, ClusterSettings::defaults("c"), ledger, 7);
    let now = Instant::now();
    cluster.handle_timeout(now, t);
    let events: Vec<ClusterEvent> = std::iter::from_fn(|| cluster.poll_event()).collect();
    let second: Vec<&ClusterEvent> = events
        .iter()
        .filter(|e| matches!(e, ClusterEvent::SecondMaster { .. }))
        .collect();
    assert_eq!(
        second,
        vec![&ClusterEvent::SecondMaster {
            master: "a".into(),
            others: vec!["b".into()],
        }],
        "{events:?}"
    );
    assert!(second[0].is_alarm());
    assert_eq!(cluster.second_masters(), ["b".to_string()]);
    cluster.handle_timeout(now + Duration::from_secs(1), t + 1000);
    assert!(
        !std::iter::from_fn(|| cluster.poll_event())
            .any(|e| matches!(e, ClusterEvent::SecondMaster { .. })),
        "reported again without a change"
    );
}

/// Applied entries of every node over `duration`.
fn applied_during(w: &mut Wired, duration: Duration) -> Vec<u64> {
    let before: Vec<u64> = w
        .nodes
        .iter()
        .map(|n| n.ledger().counters().applied)
        .collect();
    w.run_for(duration);
    w.nodes
        .iter()
        .zip(before)
        .map(|(n, b)| n.ledger().counters().applied - b)
        .collect()
}

/// The storm of issue 14: every key of the cluster bucket deleted (as `DELETE
/// /api/ledger/kairos` did) left the nodes rewriting their roles in every update pass, forever:
/// a node keeping the role it applied read its role through its announcement, which was gone,
/// so it never saw its own rewrite. The nodes must announce again and settle.
#[test]
fn deleting_the_cluster_bucket_does_not_start_a_write_storm() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.start();
    w.run_for(Duration::from_secs(10));
    assert!(w.nodes.iter().all(|n| n.role().is_some()));
    let quiet = applied_during(&mut w, Duration::from_secs(20));

    let keys: Vec<String> = w.nodes[0]
        .ledger()
        .bucket(BUCKET)
        .map(|(k, _)| k.to_string())
        .collect();
    assert!(keys.len() > 6, "{keys:?}");
    // Every node deletes every key it may (its own: the ownership rule refuses the others'),
    // which together is the whole bucket.
    let now = w.now;
    for i in 0..w.nodes.len() {
        let ms = w.unix_ms(i);
        for k in &keys {
            let _ = w.nodes[i].write(now, ms, vec![Write::delete(BUCKET, k)]);
        }
    }
    w.deliver();
    w.deliver();
    w.run_for(Duration::from_secs(10));
    let after = applied_during(&mut w, Duration::from_secs(20));
    for (i, (q, a)) in quiet.iter().zip(&after).enumerate() {
        assert!(
            *a <= q + 10,
            "node {i}: {a} entries applied in 20 s after the deletion, {q} before"
        );
    }
    for (n, uuid) in w.nodes.iter().zip(uuids) {
        assert_eq!(
            n.view().live_eligible_count(),
            3,
            "{uuid} sees everybody again"
        );
        assert!(n.role().is_some(), "{uuid} keeps its role");
    }
}

/// Bucket, key and value of one entry.
type KeyValue = (String, String, Option<Vec<u8>>);

/// A member (node-c, with its own valid identity and signature) forges an entry of every
/// family owned by somebody else; none takes effect on any node, its own included.
#[test]
fn forged_entries_of_every_family_take_effect_nowhere() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.start();
    w.run_for(Duration::from_secs(10));
    let master = w.nodes[0].master().expect("a master").to_string();
    let forger_index = uuids
        .iter()
        .position(|u| *u != master)
        .expect("a non-master");
    let forger = identity(100 + forger_index as u8);
    let forger_uuid = uuids[forger_index];
    let victim = uuids
        .iter()
        .find(|u| **u != master && **u != forger_uuid)
        .expect("a victim")
        .to_string();
    let victim_peer = w.nodes[0].ledger().bound_peer(&victim).expect("bound");
    // Publish what the master owns, as its k3s layer does.
    let master_index = uuids.iter().position(|u| *u == master).unwrap();
    let (now, ms) = (w.now, w.unix_ms(master_index));
    for (k, v) in [
        (names::IP_MASTER, "10.1.0.1"),
        (names::NODE_TOKEN, "K10real::server:token"),
        (names::KUBECONFIG, "a3ViZWNvbmZpZw"),
    ] {
        w.nodes[master_index]
            .write(now, ms, vec![Write::put(BUCKET, k, v)])
            .unwrap();
    }
    w.deliver();
    w.run_for(Duration::from_secs(2));
    let forged_vote_key = format!("{forger_uuid}-vote");
    let before: Vec<Vec<KeyValue>> = w
        .nodes
        .iter()
        .map(|n| {
            n.ledger()
                .entries()
                .filter(|e| e.bucket != names::HEALTHCHECK && e.key != forged_vote_key)
                .map(|e| (e.bucket.clone(), e.key.clone(), e.value.clone()))
                .collect()
        })
        .collect();

    let victim_addr = w.nodes[0]
        .ledger()
        .get(names::DHCP, &victim)
        .map(|v| String::from_utf8_lossy(v).to_string())
        .expect("victim lease");
    let machine =
        serde_json::json!({"PeerID": victim_peer.to_string(), "Address": victim_addr}).to_string();
    let commit = serde_json::json!({
        "ballot": {"round": 99, "proposer": forger_uuid},
        "candidate": forger_uuid,
    })
    .to_string();
    let forged: Vec<(&str, String, Option<String>)> = vec![
        (
            BUCKET,
            names::uuid_key(&victim),
            Some("{\"Role\":\"none\",\"Hostname\":\"x\"}".into()),
        ),
        (BUCKET, names::ip_key(&victim), Some("10.66.66.66".into())),
        (BUCKET, format!("{victim}-vote"), Some("{}".into())),
        (
            BUCKET,
            format!("{victim}-ballot"),
            Some("{\"round\":100}".into()),
        ),
        (BUCKET, format!("{victim}-anything"), Some("x".into())),
        (
            BUCKET,
            names::role_key(&victim),
            Some(names::ROLE_MASTER.into()),
        ),
        (
            BUCKET,
            names::role_key(forger_uuid),
            Some(names::ROLE_MASTER.into()),
        ),
        (BUCKET, names::IP_MASTER.into(), Some("10.66.66.66".into())),
        (BUCKET, names::NODE_TOKEN.into(), Some("K10forged".into())),
        (BUCKET, names::KUBECONFIG.into(), None),
        (
            BUCKET,
            "control-plane-vip".into(),
            Some("10.66.66.66".into()),
        ),
        (BUCKET, election::MASTER_COMMIT.into(), Some(commit)),
        (BUCKET, election::MASTER_COMMIT.into(), None),
        (BUCKET, names::LEADER_AUTO.into(), Some(victim.clone())),
        // Claiming the lead while the real (higher-ranked) leader is live.
        (BUCKET, names::LEADER_AUTO.into(), Some(forger_uuid.into())),
        // Another node's role, not a master role: only that node or the leader writes it.
        (
            BUCKET,
            names::role_key(&victim),
            Some(names::ROLE_MASTER_HA.into()),
        ),
        // A role for a node that has not joined yet.
        (
            BUCKET,
            names::role_key("node-z"),
            Some(names::ROLE_WORKER.into()),
        ),
        (names::HEALTHCHECK, victim.clone(), None),
        (names::DHCP, victim.clone(), Some("10.1.0.200".into())),
        (names::MACHINES, victim_addr.clone(), Some(machine)),
        (names::MACHINES, victim_addr.clone(), None),
    ];
    let at = w.unix_ms(0) + 1_000;
    // The forger's own vote for its forged ballot (its own key: stored): the lone master's
    // proof, which must not replace a commit naming another master.
    let own_vote = serde_json::json!({
        "promised": {"round": 99, "proposer": forger_uuid},
        "accepted": {"ballot": {"round": 99, "proposer": forger_uuid}, "candidate": forger_uuid},
    })
    .to_string();
    let own_vote = Entry::sign(
        &forger,
        BUCKET,
        &format!("{forger_uuid}-vote"),
        Some(own_vote.as_bytes()),
        crate::ledger::Hlc::new(at - 1, 0),
    )
    .unwrap();
    for n in &mut w.nodes {
        n.ledger.apply(own_vote.clone(), at).unwrap();
    }
    let mut refused = 0;
    for (i, (bucket, key, value)) in forged.iter().enumerate() {
        let entry = Entry::sign(
            &forger,
            bucket,
            key,
            value.as_deref().map(str::as_bytes),
            crate::ledger::Hlc::new(at + i as u64, 0),
        )
        .unwrap();
        for n in &mut w.nodes {
            let unix = at;
            let deferred = n.ledger.deferred();
            match n.ledger.apply(entry.clone(), unix) {
                Err(_) => refused += 1,
                // Kept aside: its owner could still prove it (a commit's votes may be late).
                Ok(Applied::Stale) if n.ledger.deferred() > deferred => refused += 1,
                Ok(a) => panic!("forged {bucket}/{key}: {a:?}"),
            }
        }
    }
    w.run_for(Duration::from_secs(5));
    assert_eq!(
        refused,
        forged.len() * uuids.len(),
        "every forgery refused at once"
    );
    for (i, n) in w.nodes.iter().enumerate() {
        let after: Vec<KeyValue> = n
            .ledger()
            .entries()
            .filter(|e| e.bucket != names::HEALTHCHECK && e.key != forged_vote_key)
            .map(|e| (e.bucket.clone(), e.key.clone(), e.value.clone()))
            .collect();
        assert_eq!(after, before[i], "node {i}");
        assert!(n.ledger().entries().all(|e| e.writer != forger.peer_id()
            || !forged.iter().any(|(b, k, _)| *b == e.bucket && *k == e.key)
            || e.bucket == names::DHCP && e.key == forger_uuid));
        // All but the forged commit, which waits for votes that never come.
        assert!(
            n.ledger().counters().not_owner >= forged.len() as u64 - 1,
            "node {i}"
        );
        assert_eq!(n.master(), Some(master.as_str()));
    }
}

/// The ledger of a node `b` whose cluster (committed at `b_at`) met the cluster of `a`
/// (committed at `a_at`): `master-commit` names a (the ledger kept a's), both masters recorded
/// their cluster, b still holds its master role.
fn split_ledger(a: &Identity, b: &Identity, a_at: u64, b_at: u64, t: u64) -> Ledger {
    let mut ledger = Ledger::new(Limits::default());
    let mut clock = Clock::new();
    for (id, uuid) in [(a, "a"), (b, "b")] {
        let ann = Announcement::new(Role::Auto, uuid).to_json();
        ledger
            .put(id, &mut clock, BUCKET, &names::uuid_key(uuid), &ann, t)
            .unwrap();
        ledger
            .put(id, &mut clock, names::HEALTHCHECK, uuid, b"1767225600", t)
            .unwrap();
    }
    let commit = |uuid: &str, at_ms: u64| election::Commit {
        ballot: ballot(1, uuid),
        candidate: uuid.into(),
        at_ms,
    };
    let json = |c: &election::Commit| serde_json::to_vec(c).unwrap();
    let (ca, cb) = (commit("a", a_at), commit("b", b_at));
    ledger
        .put(
            a,
            &mut clock,
            BUCKET,
            election::MASTER_COMMIT,
            &json(&ca),
            t,
        )
        .unwrap();
    for (id, uuid, c) in [(a, "a", &ca), (b, "b", &cb)] {
        ledger
            .put(id, &mut clock, BUCKET, &names::role_key(uuid), b"master", t)
            .unwrap();
        let key = format!("{uuid}{}", election::CLUSTER_SUFFIX);
        ledger
            .put(id, &mut clock, BUCKET, &key, &json(c), t)
            .unwrap();
    }
    ledger
}

#[test]
fn the_younger_cluster_s_master_leaves_within_the_merge_window() {
    let (a, b) = (identity(1), identity(2));
    let t = UNIX_BASE_MS;
    let ledger = split_ledger(&a, &b, t - 20_000, t - 10_000, t);
    let mut settings = ClusterSettings::defaults("b");
    settings.settle = Duration::ZERO;
    let mut cluster = Cluster::new(&b, settings, ledger, 7);
    let now = Instant::now();
    cluster.handle_timeout(now, t);
    cluster.handle_timeout(now + Duration::from_millis(10), t + 10);
    let events: Vec<ClusterEvent> = std::iter::from_fn(|| cluster.poll_event()).collect();
    assert!(
        events.contains(&ClusterEvent::LeavingCluster {
            lost: "b".into(),
            winner: "a".into()
        }),
        "{events:?}"
    );
    assert_eq!(cluster.left_clusters(), 1);
    // Its master role deleted; the leader (here itself) may have made it a worker since.
    assert!(
        matches!(cluster.role(), None | Some("worker")),
        "{:?}",
        cluster.role()
    );
    let l = cluster.ledger();
    let role = l.get(BUCKET, &names::role_key("b"));
    assert!(matches!(role, None | Some(b"worker")), "{role:?}");
    assert_eq!(l.get(BUCKET, "b-cluster"), None, "its record deleted");
    // It never takes a master role under the commit it left.
    cluster.handle_timeout(now + Duration::from_secs(1), t + 1000);
    assert_eq!(cluster.left_clusters(), 1);
    assert_ne!(cluster.role(), Some("master"));
}

#[test]
fn a_split_past_the_merge_window_is_left_alone() {
    let (a, b) = (identity(1), identity(2));
    let t = UNIX_BASE_MS;
    let ledger = split_ledger(&a, &b, t - 700_000, t - 650_000, t);
    let mut settings = ClusterSettings::defaults("b");
    settings.settle = Duration::ZERO;
    let mut cluster = Cluster::new(&b, settings, ledger, 7);
    let now = Instant::now();
    cluster.handle_timeout(now, t);
    cluster.handle_timeout(now + Duration::from_millis(10), t + 10);
    let events: Vec<ClusterEvent> = std::iter::from_fn(|| cluster.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ClusterEvent::SplitTooOld { winner, .. } if winner == "a")),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ClusterEvent::LeavingCluster { .. }))
    );
    assert_eq!(cluster.left_clusters(), 0);
    assert_eq!(cluster.role(), Some("master"));
    assert_eq!(cluster.second_masters(), ["b".to_string()]);
}

/// After two clusters merge, a node that took the loser's join data while the loser's commit was
/// the one it held ends with the winner's, although the winner published its earlier: the
/// loser's token, address and master role no longer belong to their writer once another commit
/// wins, so they are dropped and the winner's older entries take their place. (Seen in
/// `netns_sites`: a worker kept the loser's node token, which the winner's k3s refused.)
#[test]
fn the_losing_master_s_join_data_gives_way_to_the_winner_s_older_one() {
    let (a, b) = (identity(1), identity(2));
    let t = UNIX_BASE_MS;
    let mut ledger = Ledger::new(Limits::default());
    ledger.set_authority(crate::ledger::authority::Authority {
        network_bucket: BUCKET.into(),
        quorum_floor: 1,
        liveness: Liveness::for_timeout(Duration::from_secs(60)),
    });
    let signed = |id: &Identity, key: &str, value: &[u8], at: u64| {
        Entry::sign(id, BUCKET, key, Some(value), crate::ledger::Hlc::new(at, 0)).unwrap()
    };
    let apply = |ledger: &mut Ledger, e: Entry| ledger.apply(e, t + 100_000);
    let cluster_of = |uuid: &str, at: u64| -> (Vec<u8>, Vec<u8>) {
        let commit = election::Commit {
            ballot: ballot(1, uuid),
            candidate: uuid.into(),
            at_ms: at,
        };
        let v = vote(None, Some((ballot(1, uuid), uuid)));
        (
            serde_json::to_vec(&commit).unwrap(),
            serde_json::to_vec(&v).unwrap(),
        )
    };
    for (id, uuid) in [(&a, "a"), (&b, "b")] {
        let ann = Announcement::new(Role::Auto, uuid).to_json();
        apply(&mut ledger, signed(id, &names::uuid_key(uuid), &ann, t)).unwrap();
    }
    // The winner b committed and published first (t + 10 … t + 12) …
    let (commit_b, vote_b) = cluster_of("b", t + 10);
    let b_entries = [
        signed(&b, "b-vote", &vote_b, t + 10),
        signed(&b, election::MASTER_COMMIT, &commit_b, t + 11),
        signed(&b, &names::role_key("b"), b"master", t + 11),
        signed(&b, names::NODE_TOKEN, b"K10bbbb::server:b", t + 12),
        signed(&b, names::IP_MASTER, b"10.1.0.2", t + 12),
    ];
    // … but this node first took a's cluster, committed and published later.
    let (commit_a, vote_a) = cluster_of("a", t + 20);
    for e in [
        signed(&a, "a-vote", &vote_a, t + 20),
        signed(&a, election::MASTER_COMMIT, &commit_a, t + 21),
        signed(&a, &names::role_key("a"), b"master", t + 21),
        signed(&a, names::NODE_TOKEN, b"K10aaaa::server:a", t + 22),
        signed(&a, names::IP_MASTER, b"10.1.0.1", t + 22),
    ] {
        apply(&mut ledger, e).unwrap();
    }
    assert_eq!(
        ledger.get(BUCKET, names::NODE_TOKEN),
        Some(&b"K10aaaa::server:a"[..])
    );
    // b's entries while a's commit holds: older, and a's are still a's to hold.
    for e in b_entries.iter().cloned() {
        let _ = apply(&mut ledger, e);
    }
    assert_eq!(
        ledger.get(BUCKET, names::NODE_TOKEN),
        Some(&b"K10aaaa::server:a"[..])
    );
    // The merge: b re-asserts its commit (newer), then anti-entropy offers b's older entries.
    let reasserted = signed(&b, election::MASTER_COMMIT, &commit_b, t + 30);
    for e in [reasserted].into_iter().chain(b_entries.iter().cloned()) {
        let _ = apply(&mut ledger, e);
    }
    assert_eq!(
        ledger.get(BUCKET, names::NODE_TOKEN),
        Some(&b"K10bbbb::server:b"[..])
    );
    assert_eq!(ledger.get(BUCKET, names::IP_MASTER), Some(&b"10.1.0.2"[..]));
    assert_eq!(
        ledger.get(BUCKET, &names::role_key("a")),
        None,
        "a's master role dropped"
    );
    assert_eq!(
        ledger.get(BUCKET, &names::role_key("b")),
        Some(&b"master"[..])
    );
    // In either order: the winner's older token also displaces the loser's newer one directly.
    let mut late = Ledger::new(Limits::default());
    late.set_authority(crate::ledger::authority::Authority {
        network_bucket: BUCKET.into(),
        quorum_floor: 1,
        liveness: Liveness::for_timeout(Duration::from_secs(60)),
    });
    for (id, uuid) in [(&a, "a"), (&b, "b")] {
        let ann = Announcement::new(Role::Auto, uuid).to_json();
        apply(&mut late, signed(id, &names::uuid_key(uuid), &ann, t)).unwrap();
    }
    apply(&mut late, signed(&b, "b-vote", &vote_b, t + 10)).unwrap();
    apply(&mut late, signed(&a, "a-vote", &vote_a, t + 20)).unwrap();
    apply(
        &mut late,
        signed(&a, election::MASTER_COMMIT, &commit_a, t + 21),
    )
    .unwrap();
    apply(
        &mut late,
        signed(&a, names::NODE_TOKEN, b"K10aaaa::server:a", t + 22),
    )
    .unwrap();
    // Its commit flips: the loser's token is dropped at once, nothing stale is read meanwhile.
    apply(
        &mut late,
        signed(&b, election::MASTER_COMMIT, &commit_b, t + 30),
    )
    .unwrap();
    assert_eq!(late.get(BUCKET, names::NODE_TOKEN), None);
    // The loser's token offered again is refused; the winner's older one is taken.
    assert!(
        apply(
            &mut late,
            signed(&a, names::NODE_TOKEN, b"K10aaaa::server:a", t + 22)
        )
        .is_err()
    );
    apply(
        &mut late,
        signed(&b, names::NODE_TOKEN, b"K10bbbb::server:b", t + 12),
    )
    .unwrap();
    assert_eq!(
        late.get(BUCKET, names::NODE_TOKEN),
        Some(&b"K10bbbb::server:b"[..])
    );
}

/// A ledger with the ownership rule on, `uuids` announced by `ids` at `t` (live at `t`).
fn authority_ledger(ids: &[(&Identity, &str)], t: u64) -> Ledger {
    let mut ledger = Ledger::new(Limits::default());
    ledger.set_authority(crate::ledger::authority::Authority {
        network_bucket: BUCKET.into(),
        quorum_floor: 1,
        liveness: Liveness::for_timeout(Duration::from_secs(60)),
    });
    for (id, uuid) in ids {
        let ann = Announcement::new(Role::Auto, uuid).to_json();
        let e = Entry::sign(
            id,
            BUCKET,
            &names::uuid_key(uuid),
            Some(&ann),
            crate::ledger::Hlc::new(t, 0),
        )
        .unwrap();
        ledger.apply(e, t).unwrap();
    }
    ledger
}

/// Who leads is decided by rank, not by who claimed last: a site cut off at boot elected its
/// own leader, whose claim is newer than the real leader's. Its nodes take the real leader's
/// older claim when it arrives (pushed, or asked for in anti-entropy, which used to skip it as
/// older), unless that leader has been silent for the rebind time. (Seen in `sim_late_sites`,
/// a site whose uplink comes up late: its nodes never took the leader's roles.)
#[test]
fn an_older_leader_claim_of_a_higher_ranked_live_node_wins() {
    let (a, b) = (identity(1), identity(2));
    let rank = |u: &str| (fnv32a(u), u.to_string());
    let (hi, lo) = if rank("node-a") > rank("node-b") {
        ((&a, "node-a"), (&b, "node-b"))
    } else {
        ((&b, "node-b"), (&a, "node-a"))
    };
    let t = UNIX_BASE_MS;
    let claim = |(id, uuid): (&Identity, &str), at: u64| {
        Entry::sign(
            id,
            BUCKET,
            names::LEADER_AUTO,
            Some(uuid.as_bytes()),
            crate::ledger::Hlc::new(at, 0),
        )
        .unwrap()
    };
    let beat = |(id, uuid): (&Identity, &str), at: u64| {
        Entry::sign(
            id,
            names::HEALTHCHECK,
            uuid,
            Some(b"1"),
            crate::ledger::Hlc::new(at, 0),
        )
        .unwrap()
    };
    let (hi_claim, lo_claim) = (claim(hi, t + 10), claim(lo, t + 20));
    let ids = [hi, lo];
    // Pushed: the older, higher-ranked claim replaces the newer one.
    let mut site = authority_ledger(&ids, t);
    site.apply(lo_claim.clone(), t + 30).unwrap();
    site.apply(hi_claim.clone(), t + 40).unwrap();
    assert_eq!(site.get(BUCKET, names::LEADER_AUTO), Some(hi.1.as_bytes()));
    // … and the newer, lower-ranked one does not come back.
    assert!(site.apply(lo_claim.clone(), t + 50).is_err());
    assert_eq!(site.get(BUCKET, names::LEADER_AUTO), Some(hi.1.as_bytes()));
    // Not from a leader silent for the rebind time: the newer claim stays.
    let mut late = authority_ledger(&ids, t);
    let long_after = t + 120_000;
    late.apply(beat(lo, long_after), long_after).unwrap();
    late.apply(claim(lo, long_after), long_after).unwrap();
    assert!(matches!(
        late.apply(hi_claim.clone(), long_after + 10),
        Ok(Applied::Stale)
    ));
    assert_eq!(late.get(BUCKET, names::LEADER_AUTO), Some(lo.1.as_bytes()));
    // In anti-entropy: the node holding the newer claim asks for the older one and takes it.
    let limits = SyncLimits::default();
    let now = t + 60;
    // Both hold a later heartbeat of the leader: the version vector does not show the claim
    // as missing, so the summary lists it without sending it.
    let hi_heartbeat = beat(hi, t + 40);
    let mut main = authority_ledger(&ids, t);
    main.apply(hi_claim, t + 30).unwrap();
    main.apply(hi_heartbeat.clone(), t + 40).unwrap();
    let mut cut_off = authority_ledger(&ids, t);
    cut_off.apply(lo_claim, t + 30).unwrap();
    cut_off.apply(hi_heartbeat, t + 40).unwrap();
    let digest = cut_off.digest(&limits, now);
    let summary = main.summary_for(&digest, Scope::ALL, &limits, now);
    cut_off.apply_all(summary.entries.iter().cloned(), now);
    let batch = cut_off.reconcile(&summary, Scope::ALL, &limits, now);
    assert!(!batch.requests.is_empty(), "the older claim is asked for");
    let answer = main.answer(&batch.requests, Scope::ALL, &limits);
    cut_off.apply_all(answer.entries, now);
    assert_eq!(
        cut_off.get(BUCKET, names::LEADER_AUTO),
        Some(hi.1.as_bytes())
    );
}

/// Runs `w` for a while and returns what `<uuid>-role` holds on every node.
fn roles_everywhere(w: &Wired, uuid: &str) -> Vec<Option<String>> {
    w.nodes
        .iter()
        .map(|n| view::role_of(n.ledger(), BUCKET, uuid))
        .collect()
}

/// `kairosctl role set` through any node's API: the leader writes the role itself; another
/// node stores a request that the leader (or the target) applies, for a node that joined and
/// for one that has not joined yet, and deletes the request once done. A master role for a node
/// that is not the committed master is refused at once.
#[test]
fn role_set_through_any_node_reaches_every_node() {
    let uuids = ["node-a", "node-b", "node-c"];
    // Dynamic roles: a node follows the ledger (otherwise it keeps the role it applied).
    let mut w = wired_with(&uuids, |uuid| {
        let mut s = ClusterSettings::defaults(uuid);
        s.roles.dynamic = true;
        s
    });
    w.start();
    w.run_for(Duration::from_secs(10));
    let master = w.nodes[0].master().expect("a master").to_string();
    let leader = w.nodes[0].leader().expect("a leader").to_string();
    let leader_index = uuids.iter().position(|u| *u == leader).unwrap();
    assert_eq!(
        w.nodes[0].ledger().get(BUCKET, names::LEADER_AUTO),
        Some(leader.as_bytes())
    );
    let others: Vec<usize> = (0..3).filter(|i| *i != leader_index).collect();
    let (via, target) = (others[0], uuids[others[1]]);
    assert_ne!(target, master);

    // Through a node that is neither the leader nor the target: a request.
    let (now, ms) = (w.now, w.unix_ms(via));
    w.nodes[via]
        .write(
            now,
            ms,
            vec![Write::put(BUCKET, &names::role_key(target), "master/ha")],
        )
        .unwrap();
    let request_key = names::role_request_key(uuids[via], target);
    assert!(w.nodes[via].ledger().get(BUCKET, &request_key).is_some());
    w.deliver();
    w.run_for(Duration::from_secs(2));
    assert_eq!(
        roles_everywhere(&w, target),
        vec![Some("master/ha".to_string()); 3]
    );
    for n in &w.nodes {
        assert_eq!(
            n.ledger().get(BUCKET, &request_key),
            None,
            "request deleted"
        );
        let writer = n
            .ledger()
            .entry(BUCKET, &names::role_key(target))
            .unwrap()
            .writer;
        let owners = [w.peers[leader_index], w.peers[others[1]]];
        assert!(
            owners.contains(&writer),
            "written by the leader or the node"
        );
    }

    // For a node that has not joined yet, through a non-leader: the leader writes it.
    let (now, ms) = (w.now, w.unix_ms(via));
    w.nodes[via]
        .write(
            now,
            ms,
            vec![Write::put(BUCKET, &names::role_key("node-z"), "worker")],
        )
        .unwrap();
    w.deliver();
    w.run_for(Duration::from_secs(2));
    assert_eq!(
        roles_everywhere(&w, "node-z"),
        vec![Some("worker".to_string()); 3]
    );
    assert!(w.nodes.iter().all(|n| {
        n.ledger()
            .entry(BUCKET, &names::role_key("node-z"))
            .unwrap()
            .writer
            == w.peers[leader_index]
    }));

    // Through the leader itself: written at once.
    let (now, ms) = (w.now, w.unix_ms(leader_index));
    w.nodes[leader_index]
        .write(
            now,
            ms,
            vec![Write::put(BUCKET, &names::role_key("node-y"), "worker")],
        )
        .unwrap();
    assert_eq!(
        view::role_of(w.nodes[leader_index].ledger(), BUCKET, "node-y").as_deref(),
        Some("worker")
    );

    // A master role for a node that is not the committed master: refused, nothing stored.
    let (now, ms) = (w.now, w.unix_ms(via));
    let refused = w.nodes[via].write(
        now,
        ms,
        vec![Write::put(BUCKET, &names::role_key(target), "master")],
    );
    assert!(
        matches!(refused, Err(LedgerError::NotOwner { .. })),
        "{refused:?}"
    );
    w.deliver();
    w.run_for(Duration::from_secs(2));
    assert_eq!(
        roles_everywhere(&w, target),
        vec![Some("master/ha".to_string()); 3]
    );
}

/// A new leader signs again the roles its predecessor wrote, so that a node that learns them
/// only now (a late joiner) takes them from the leader it knows.
#[test]
fn a_new_leader_signs_its_predecessors_roles_again() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.start();
    w.run_for(Duration::from_secs(10));
    let leader = w.nodes[0].leader().expect("a leader").to_string();
    let leader_index = uuids.iter().position(|u| *u == leader).unwrap();
    let old_leader_peer = w.peers[leader_index];
    // Roles the leader assigned to the others.
    let assigned: Vec<&str> = uuids.iter().copied().filter(|u| *u != leader).collect();
    for u in &assigned {
        let e = w.nodes[0]
            .ledger()
            .entry(BUCKET, &names::role_key(u))
            .unwrap();
        assert_eq!(e.writer, old_leader_peer, "{u}'s role by the leader");
    }
    // The leader's connections are lost: once the others' suspicions of it had their grace,
    // the next leader takes `leader-auto` and signs the roles again.
    w.nodes.remove(leader_index);
    let dead_peer = w.peers.remove(leader_index);
    w.skew_ms.remove(leader_index);
    for i in 0..w.nodes.len() {
        let ms = w.unix_ms(i);
        w.nodes[i].peer_disconnected(w.now, ms, &dead_peer, true);
    }
    w.run_for(Duration::from_secs(150));
    let new_leader = w.nodes[0].leader().expect("a new leader").to_string();
    assert_ne!(new_leader, leader);
    let new_index = [assigned[0], assigned[1]]
        .iter()
        .position(|u| *u == new_leader)
        .unwrap();
    for n in &w.nodes {
        assert_eq!(
            n.ledger().get(BUCKET, names::LEADER_AUTO),
            Some(new_leader.as_bytes())
        );
        for u in &assigned {
            if *u == new_leader {
                continue;
            }
            let e = n.ledger().entry(BUCKET, &names::role_key(u)).unwrap();
            assert_eq!(e.writer, w.peers[new_index], "{u}'s role signed again");
        }
    }
}

/// The leader comes back after the others took the lead under a lower-ranked node: it refuses
/// that claim (it is live), claims again, newer, and signs every role again, and every ledger
/// ends with the same `leader-auto` and roles.
#[test]
fn a_returning_leader_claims_again_and_the_ledgers_agree() {
    let uuids = ["node-a", "node-b", "node-c"];
    let mut w = Wired::new(&uuids);
    w.start();
    w.run_for(Duration::from_secs(10));
    let leader = w.nodes[0].leader().expect("a leader").to_string();
    let leader_index = uuids.iter().position(|u| *u == leader).unwrap();
    // Away for longer than the liveness timeout: the others move the lead.
    let away = w.nodes.remove(leader_index);
    let away_peer = w.peers.remove(leader_index);
    let away_skew = w.skew_ms.remove(leader_index);
    for i in 0..w.nodes.len() {
        let ms = w.unix_ms(i);
        w.nodes[i].peer_disconnected(w.now, ms, &away_peer, true);
    }
    w.run_for(Duration::from_secs(150));
    let interim = w.nodes[0].leader().expect("an interim leader").to_string();
    assert_ne!(interim, leader);
    assert_eq!(
        w.nodes[0].ledger().get(BUCKET, names::LEADER_AUTO),
        Some(interim.as_bytes())
    );
    // Back.
    w.nodes.insert(leader_index, away);
    w.peers.insert(leader_index, away_peer);
    w.skew_ms.insert(leader_index, away_skew);
    let now = w.now;
    let ms = w.unix_ms(leader_index);
    w.nodes[leader_index].handle_timeout(now, ms);
    for i in 0..w.nodes.len() {
        if i != leader_index {
            let (mi, ml) = (w.unix_ms(i), w.unix_ms(leader_index));
            let (pi, pl) = (w.peers[i], w.peers[leader_index]);
            w.nodes[i].peer_connected(now, mi, pl);
            w.nodes[leader_index].peer_connected(now, ml, pi);
        }
    }
    w.deliver();
    w.run_for(Duration::from_secs(60));
    let state = |n: &Cluster| -> Vec<(String, Option<Vec<u8>>)> {
        n.ledger()
            .bucket(BUCKET)
            .filter(|(k, _)| *k == names::LEADER_AUTO || k.ends_with(names::ROLE_SUFFIX))
            .map(|(k, v)| (k.to_string(), Some(v.to_vec())))
            .collect()
    };
    let first = state(&w.nodes[0]);
    for n in &w.nodes {
        assert_eq!(state(n), first, "every ledger agrees");
        assert_eq!(
            n.ledger().get(BUCKET, names::LEADER_AUTO),
            Some(leader.as_bytes()),
            "the returning leader leads"
        );
    }
}
