//! The master election: single-decree Paxos run through the ledger.
//!
//! Kairos lets its leader write the master role with no agreement, which is how users end up
//! with two masters. Here the leader (the live node with the highest FNV-32a of its uuid) runs
//! Paxos for the value "who is master", with the ledger as the message bus and the store:
//!
//! - A proposer's ballot is `(round, proposer uuid)`, published in `<uuid>-ballot`: first
//!   `{"round": r}` (prepare), then `{"round": r, "candidate": c}` (accept request).
//! - Each eligible node keeps its acceptor state in `<uuid>-vote`, written only by itself:
//!   the highest ballot it promised and the last `(ballot, candidate)` it accepted. It promises a
//!   ballot higher than any it promised, and accepts an accept request whose ballot is not lower
//!   than its promise. The ledger is persisted before those writes leave the node, so a restart
//!   keeps them; a node whose state was wiped waits until it has synced with a peer, which gives
//!   it back its own vote.
//! - When a quorum promised its ballot, the proposer asks to accept the candidate accepted under
//!   the highest ballot anywhere in its ledger (any accepted value, not only the quorum's: the
//!   chosen value, if any, is the one with the highest accepted ballot), or else its own pick.
//!   When a quorum accepted it, the candidate is chosen: the proposer writes `master-commit`, the
//!   candidate's `<uuid>-role` and `leader-auto`.
//!
//! The quorum is `max(minimum_nodes, ⌊live/2⌋ + 1)` where `live` counts the live eligible nodes
//! the proposer sees. Two quorums always intersect while fewer than `2 × minimum_nodes` nodes
//! exist, so then at most one master is ever chosen whatever the losses, delays, restarts and
//! partitions. Beyond that, they intersect as long as the proposers' views agree on who is live,
//! which is what the leader's settle rule (its view must be unchanged for the settle time) and
//! the liveness timeout give, unless a partition outlasts the liveness timeout during the very
//! first election (see the README).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::ledger::{Ledger, names};

use super::Write;

/// Key of the chosen master.
pub const MASTER_COMMIT: &str = "master-commit";
/// Key suffix of a proposer's ballot.
pub const BALLOT_SUFFIX: &str = "-ballot";
/// Key suffix of an acceptor's state.
pub const VOTE_SUFFIX: &str = "-vote";
/// Key suffix of the cluster a k3s server belongs to: `<uuid>-cluster` holds the [`Commit`]
/// under which the node got its server role (written by the node itself; see
/// `Cluster::merge_split`).
pub const CLUSTER_SUFFIX: &str = "-cluster";

/// A Paxos ballot: higher rounds win, then the proposer's uuid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ballot {
    /// The round.
    pub round: u64,
    /// The proposer's uuid.
    pub proposer: String,
}

impl PartialOrd for Ballot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ballot {
    fn cmp(&self, other: &Self) -> Ordering {
        self.round
            .cmp(&other.round)
            .then_with(|| self.proposer.cmp(&other.proposer))
    }
}

/// The value of `<uuid>-ballot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The round of the proposer's ballot.
    pub round: u64,
    /// The candidate, once the proposer asks for acceptance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
}

/// A value accepted under a ballot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The ballot.
    pub ballot: Ballot,
    /// The candidate's uuid.
    pub candidate: String,
}

/// The value of `<uuid>-vote`: an acceptor's durable state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// The highest ballot promised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promised: Option<Ballot>,
    /// The last value accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Accepted>,
}

/// The value of `master-commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The ballot under which the master was chosen.
    pub ballot: Ballot,
    /// The master's uuid.
    pub candidate: String,
    /// When it was chosen (the proposer's hybrid time, unix ms; 0 in commits written before
    /// this field existed). Of two clusters that meet, the one chosen first is kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub at_ms: u64,
}

impl Commit {
    /// The same cluster: the same ballot and candidate (a re-asserted commit keeps `at_ms`).
    pub fn same_cluster(&self, other: &Commit) -> bool {
        self.ballot == other.ballot && self.candidate == other.candidate
    }

    /// The merge order of clusters: chosen first, then the smaller master uuid, then the
    /// smaller ballot. Every node computes it alike from the commits it holds.
    pub fn merge_key(&self) -> (u64, &str, &Ballot) {
        (self.at_ms, self.candidate.as_str(), &self.ballot)
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The election state read from the ledger bucket of one network.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Proposals by proposer uuid.
    pub proposals: Vec<(String, Proposal)>,
    /// Votes by acceptor uuid.
    pub votes: Vec<(String, Vote)>,
    /// The chosen master, if any.
    pub commit: Option<Commit>,
}

impl Tally {
    /// Reads the election keys of `bucket`.
    pub fn read(ledger: &Ledger, bucket: &str) -> Tally {
        let mut t = Tally::default();
        for (key, value) in ledger.bucket(bucket) {
            if key == MASTER_COMMIT {
                t.commit = serde_json::from_slice(value).ok();
            } else if let Some(uuid) = key.strip_suffix(BALLOT_SUFFIX) {
                if let Ok(p) = serde_json::from_slice(value) {
                    t.proposals.push((uuid.to_string(), p));
                }
            } else if let Some(uuid) = key.strip_suffix(VOTE_SUFFIX) {
                if let Ok(v) = serde_json::from_slice(value) {
                    t.votes.push((uuid.to_string(), v));
                }
            }
        }
        t
    }

    fn vote_of(&self, uuid: &str) -> Vote {
        self.votes
            .iter()
            .find(|(u, _)| u == uuid)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    fn highest_round(&self) -> u64 {
        let p = self.proposals.iter().map(|(_, p)| p.round);
        let v = self.votes.iter().flat_map(|(_, v)| {
            [
                v.promised.as_ref().map(|b| b.round),
                v.accepted.as_ref().map(|a| a.ballot.round),
            ]
            .into_iter()
            .flatten()
        });
        p.chain(v).max().unwrap_or(0)
    }

    fn highest_accepted(&self) -> Option<&Accepted> {
        self.votes
            .iter()
            .filter_map(|(_, v)| v.accepted.as_ref())
            .max_by(|a, b| a.ballot.cmp(&b.ballot))
    }

    fn promised_above(&self, ballot: &Ballot) -> bool {
        self.votes
            .iter()
            .any(|(_, v)| v.promised.as_ref().is_some_and(|p| p > ballot))
    }
}

/// Acceptor duty: the new state of `me`'s vote after every proposal in `tally`, as a write if it
/// changed.
pub fn accept(tally: &Tally, bucket: &str, me: &str) -> Option<Write> {
    if tally.commit.is_some() {
        return None;
    }
    let before = tally.vote_of(me);
    let mut vote = before.clone();
    let mut proposals: Vec<(Ballot, Option<&String>)> = tally
        .proposals
        .iter()
        .map(|(u, p)| {
            (
                Ballot {
                    round: p.round,
                    proposer: u.clone(),
                },
                p.candidate.as_ref(),
            )
        })
        .collect();
    proposals.sort();
    for (ballot, candidate) in proposals {
        let promised = vote.promised.as_ref();
        match candidate {
            None if promised.is_none_or(|p| *p < ballot) => vote.promised = Some(ballot),
            Some(c) if promised.is_none_or(|p| *p <= ballot) => {
                let accepted = Accepted {
                    ballot: ballot.clone(),
                    candidate: c.clone(),
                };
                vote.promised = Some(ballot);
                vote.accepted = Some(accepted);
            }
            _ => {}
        }
    }
    (vote != before).then(|| Write::put(bucket, &format!("{me}{VOTE_SUFFIX}"), json(&vote)))
}

/// Where a proposer is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Preparing(Ballot),
    Accepting(Ballot, String),
    Done,
}

/// What a proposer step produced.
#[derive(Debug, Default)]
pub struct Step {
    /// Ledger writes.
    pub writes: Vec<Write>,
    /// The master just chosen.
    pub chosen: Option<String>,
}

/// Proposer state of one node.
#[derive(Debug, Clone)]
pub struct Proposer {
    me: String,
    phase: Phase,
}

impl Proposer {
    /// A proposer for node `me`.
    pub fn new(me: &str) -> Self {
        Self {
            me: me.to_string(),
            phase: Phase::Idle,
        }
    }

    /// Stops proposing (no longer the leader, or not allowed to run an election now).
    pub fn stand_down(&mut self) {
        if self.phase != Phase::Done {
            self.phase = Phase::Idle;
        }
    }

    /// One proposer step: `quorum` is the number of acceptors needed, `pick` the candidate to
    /// propose when no value was accepted yet, `master_role` the role the master gets, `now_ms`
    /// the hybrid time a commit records.
    pub fn step(
        &mut self,
        tally: &Tally,
        bucket: &str,
        quorum: usize,
        pick: Option<&str>,
        master_role: &str,
        now_ms: u64,
    ) -> Step {
        let mut step = Step::default();
        if tally.commit.is_some() {
            self.phase = Phase::Done;
            return step;
        }
        let ballot_key = format!("{}{BALLOT_SUFFIX}", self.me);
        match self.phase.clone() {
            Phase::Done => {}
            Phase::Idle => self.prepare(tally, bucket, &ballot_key, &mut step),
            Phase::Preparing(ballot) => {
                if tally.promised_above(&ballot) {
                    return self.restart(tally, bucket, &ballot_key);
                }
                let promises = tally
                    .votes
                    .iter()
                    .filter(|(_, v)| v.promised.as_ref() == Some(&ballot))
                    .count();
                if promises < quorum {
                    return step;
                }
                let candidate = tally
                    .highest_accepted()
                    .map(|a| a.candidate.clone())
                    .or_else(|| pick.map(str::to_string));
                let Some(candidate) = candidate else {
                    return step;
                };
                let proposal = Proposal {
                    round: ballot.round,
                    candidate: Some(candidate.clone()),
                };
                step.writes
                    .push(Write::put(bucket, &ballot_key, json(&proposal)));
                self.phase = Phase::Accepting(ballot, candidate);
            }
            Phase::Accepting(ballot, candidate) => {
                if tally.promised_above(&ballot) {
                    return self.restart(tally, bucket, &ballot_key);
                }
                let accepts = tally
                    .votes
                    .iter()
                    .filter(|(_, v)| {
                        v.accepted
                            .as_ref()
                            .is_some_and(|a| a.ballot == ballot && a.candidate == candidate)
                    })
                    .count();
                if accepts < quorum {
                    return step;
                }
                let commit = Commit {
                    ballot,
                    candidate: candidate.clone(),
                    at_ms: now_ms,
                };
                step.writes
                    .push(Write::put(bucket, MASTER_COMMIT, json(&commit)));
                step.writes.push(Write::put(
                    bucket,
                    &names::role_key(&candidate),
                    master_role,
                ));
                step.chosen = Some(candidate);
                self.phase = Phase::Done;
            }
        }
        step
    }

    fn prepare(&mut self, tally: &Tally, bucket: &str, ballot_key: &str, step: &mut Step) {
        let ballot = Ballot {
            round: tally.highest_round() + 1,
            proposer: self.me.clone(),
        };
        let proposal = Proposal {
            round: ballot.round,
            candidate: None,
        };
        step.writes
            .push(Write::put(bucket, ballot_key, json(&proposal)));
        self.phase = Phase::Preparing(ballot);
    }

    fn restart(&mut self, tally: &Tally, bucket: &str, ballot_key: &str) -> Step {
        let mut step = Step::default();
        self.prepare(tally, bucket, ballot_key, &mut step);
        step
    }
}

/// The quorum for a proposer that sees `live` live eligible nodes.
pub fn quorum(minimum_nodes: usize, live: usize) -> usize {
    minimum_nodes.max(live / 2 + 1)
}
