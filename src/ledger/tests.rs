//! Scenario and property tests of the ledger: merge laws, limits, tombstones, clocks,
//! anti-entropy, wire robustness and persistence.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::*;
use crate::identity::Identity;
use crate::rng::Rng;

const NOW: u64 = 1_760_000_000_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;
const MINUTE: u64 = 60_000;

fn id(n: u8) -> Identity {
    Identity::from_seed([n; 32])
}

fn signed(i: &Identity, bucket: &str, key: &str, value: Option<&[u8]>, ms: u64) -> Entry {
    Entry::sign(i, bucket, key, value, Hlc::new(ms, 0)).unwrap()
}

fn state(l: &Ledger) -> Vec<Entry> {
    l.entries().cloned().collect()
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Random entries over few writers, buckets, keys and versions, so that ties in version, writer
/// and value all happen.
fn random_entries(rng: &mut Rng, writers: &[Identity], n: usize, keys: u64) -> Vec<Entry> {
    (0..n)
        .map(|_| {
            let w = &writers[rng.below(writers.len() as u64) as usize];
            let bucket = ["kairos", "dhcp", "machines"][rng.below(3) as usize];
            let key = format!("k{}", rng.below(keys));
            let version = Hlc::new(NOW + rng.below(4), rng.below(3) as u16);
            let value: Option<Vec<u8>> = if rng.chance(0.25) {
                None
            } else {
                Some(
                    (0..rng.below(3))
                        .map(|_| b'a' + rng.below(3) as u8)
                        .collect(),
                )
            };
            Entry::sign(w, bucket, &key, value.as_deref(), version).unwrap()
        })
        .collect()
}

fn writers(n: u8) -> Vec<Identity> {
    (1..=n).map(id).collect()
}

fn ledger_of(entries: impl IntoIterator<Item = Entry>) -> Ledger {
    let mut l = Ledger::default();
    for e in entries {
        l.apply(e, NOW).unwrap();
    }
    l
}

// ---------------------------------------------------------------------------------------------
// Merge laws

#[test]
fn apply_is_commutative_associative_and_idempotent() {
    let ws = writers(4);
    let mut rng = Rng::from_seed(0x1ed6e7);
    for case in 0..1200 {
        let n = 2 + rng.below(10) as usize;
        let entries = random_entries(&mut rng, &ws, n, 4);
        let reference = ledger_of(entries.clone());
        let want = state(&reference);
        let want_digest = reference.digest(&SyncLimits::default(), NOW);
        // Any permutation with any duplication.
        for _ in 0..3 {
            let mut seq: Vec<Entry> = entries
                .iter()
                .flat_map(|e| std::iter::repeat_n(e.clone(), 1 + rng.below(3) as usize))
                .collect();
            shuffle(&mut rng, &mut seq);
            let l = ledger_of(seq);
            assert_eq!(state(&l), want, "case {case}");
            assert_eq!(
                l.digest(&SyncLimits::default(), NOW),
                want_digest,
                "case {case}"
            );
        }
        // Associativity: merge two partial ledgers, in either direction.
        let cut = rng.below(n as u64 + 1) as usize;
        let (left, right) = entries.split_at(cut);
        let mut x = ledger_of(left.to_vec());
        let y = ledger_of(right.to_vec());
        x.apply_all(state(&y), NOW);
        assert_eq!(state(&x), want, "case {case}: (left) + (right)");
        let mut y2 = ledger_of(right.to_vec());
        y2.apply_all(state(&ledger_of(left.to_vec())), NOW);
        assert_eq!(state(&y2), want, "case {case}: (right) + (left)");
    }
}

#[test]
fn the_winner_is_the_same_whatever_the_order() {
    let (a, b) = (id(1), id(2));
    let e1 = signed(&a, "kairos", "leader-auto", Some(b"n1"), NOW);
    let e2 = signed(&b, "kairos", "leader-auto", Some(b"n2"), NOW);
    let winner = if e1.wins_over(&e2) { &e1 } else { &e2 };
    for order in [[&e1, &e2], [&e2, &e1]] {
        let l = ledger_of(order.into_iter().cloned());
        assert_eq!(l.entry("kairos", "leader-auto"), Some(winner));
    }
}

// ---------------------------------------------------------------------------------------------
// Store behaviour

#[test]
fn tombstones_read_as_absent_and_expire() {
    let me = id(1);
    let mut clock = Clock::new();
    let mut l = Ledger::default();
    l.put(&me, &mut clock, "kairos", "a-role", b"worker", NOW)
        .unwrap();
    l.put(&me, &mut clock, "kairos", "b-role", b"master", NOW)
        .unwrap();
    while l.poll_event().is_some() {}
    l.delete(&me, &mut clock, "kairos", "a-role", NOW + 1)
        .unwrap();
    assert_eq!(l.get("kairos", "a-role"), None);
    assert!(l.entry("kairos", "a-role").unwrap().is_tombstone());
    assert_eq!(
        l.bucket("kairos").collect::<Vec<_>>(),
        [("b-role", &b"master"[..])]
    );
    assert_eq!(l.buckets().collect::<Vec<_>>(), ["kairos"]);
    assert_eq!(
        l.poll_event(),
        Some(LedgerEvent::Changed {
            bucket: "kairos".into(),
            key: "a-role".into()
        })
    );
    assert_eq!(l.expire(NOW + DAY - 1), 0);
    assert_eq!(l.expire(NOW + DAY + 1), 1);
    assert_eq!(l.entry("kairos", "a-role"), None);
    assert_eq!(l.len(), 1);
    assert_eq!(l.counters().tombstones_expired, 1);
    assert_eq!(l.poll_event(), None, "expiry changes nothing visible");
}

/// What a reader following [`Ledger::changed_since`] holds of `bucket`: key -> entry.
type Mirror = BTreeMap<String, Entry>;

/// Brings `mirror` (read up to change `seen`) up to date; false when it had to read it all.
fn follow(l: &Ledger, bucket: &str, mirror: &mut Mirror, seen: &mut u64) -> bool {
    let incremental = match l.changed_since(bucket, *seen) {
        Some(changes) => {
            for (key, entry) in changes {
                match entry {
                    Some(e) => mirror.insert(key.to_owned(), e.clone()),
                    None => mirror.remove(key),
                };
            }
            true
        }
        None => {
            mirror.clear();
            for e in l.entries().filter(|e| e.bucket == bucket) {
                mirror.insert(e.key.clone(), e.clone());
            }
            false
        }
    };
    *seen = l.change_seq();
    incremental
}

#[test]
fn change_log_readers_follow_every_store_and_removal() {
    let mut rng = Rng::from_seed(7);
    let ws = writers(3);
    for round in 0..20 {
        let mut l = Ledger::default();
        l.follow("dhcp");
        let (mut mirror, mut seen) = (Mirror::new(), 0);
        let mut entries = random_entries(&mut rng, &ws, 300, 40);
        shuffle(&mut rng, &mut entries);
        for (i, e) in entries.into_iter().enumerate() {
            let _ = l.apply(e, NOW);
            if i % 7 == 0 {
                follow(&l, "dhcp", &mut mirror, &mut seen);
            }
            if i % 50 == 49 {
                // Tombstones go (removals) and the bucket may empty and come back.
                l.expire(NOW + DAY + round as u64);
            }
        }
        follow(&l, "dhcp", &mut mirror, &mut seen);
        let held: Mirror = l
            .entries()
            .filter(|e| e.bucket == "dhcp")
            .map(|e| (e.key.clone(), e.clone()))
            .collect();
        assert_eq!(mirror, held, "round {round}");
        assert!(l.changed_since("dhcp", seen).is_none_or(|c| c.is_empty()));
    }
}

#[test]
fn a_reader_behind_dropped_removal_marks_reads_the_whole_bucket() {
    let me = id(1);
    let mut clock = Clock::new();
    let mut l = Ledger::default();
    l.follow("dhcp");
    l.put(&me, &mut clock, "dhcp", "keep", b"10.1.0.1", NOW)
        .unwrap();
    let (mut mirror, mut seen) = (Mirror::new(), 0);
    // From change 0 (an empty ledger) every change is listed.
    assert!(follow(&l, "dhcp", &mut mirror, &mut seen));
    assert_eq!(mirror.keys().collect::<Vec<_>>(), ["keep"]);
    for i in 0..=MAX_REMOVAL_MARKS {
        l.delete(&me, &mut clock, "dhcp", &format!("k{i}"), NOW)
            .unwrap();
    }
    let before_removals = l.change_seq();
    assert!(follow(&l, "dhcp", &mut mirror, &mut seen));
    assert_eq!(mirror.len(), MAX_REMOVAL_MARKS + 2);
    l.expire(NOW + DAY + 1);
    // One mark too many: a reader that saw none of them cannot tell every removed key.
    let mut stale_seen = before_removals;
    let mut stale = mirror.clone();
    assert!(!follow(&l, "dhcp", &mut stale, &mut stale_seen));
    assert_eq!(stale.keys().collect::<Vec<_>>(), ["keep"]);
    // A reader that saw them all before still follows, and the marks after stay listed.
    let before_more = l.change_seq();
    l.delete(&me, &mut clock, "dhcp", "keep", NOW + DAY + 2)
        .unwrap();
    l.expire(NOW + 3 * DAY);
    assert!(
        l.changed_since("dhcp", before_more).is_none(),
        "bucket gone"
    );
    assert!(!follow(&l, "dhcp", &mut stale, &mut stale_seen));
    assert!(stale.is_empty());
    // An unfollowed bucket lists nothing: its readers read it whole.
    l.put(&me, &mut clock, "other", "k", b"v", NOW + 3 * DAY)
        .unwrap();
    assert!(l.changed_since("other", 0).is_none());
}

#[test]
fn expired_tombstones_replace_but_never_create() {
    let me = id(1);
    let old_live = signed(&me, "kairos", "k", Some(b"v"), NOW - 3 * DAY);
    let old_tomb = signed(&me, "kairos", "k", None, NOW - 2 * DAY);
    let mut l = Ledger::default();
    assert_eq!(l.apply(old_tomb.clone(), NOW).unwrap(), Applied::Stale);
    assert!(l.is_empty());
    l.apply(old_live, NOW).unwrap();
    assert_eq!(l.apply(old_tomb, NOW).unwrap(), Applied::Replaced);
    assert_eq!(l.get("kairos", "k"), None);
}

#[test]
fn local_writes_stamp_after_everything_held() {
    let (me, other) = (id(1), id(2));
    let mut l = Ledger::default();
    l.apply(
        signed(&other, "kairos", "ip-master", Some(b"10.1.0.9"), NOW + HOUR),
        NOW,
    )
    .unwrap();
    let mut clock = Clock::new();
    let mine = l
        .put(&me, &mut clock, "kairos", "ip-master", b"10.1.0.1", NOW)
        .unwrap();
    assert!(mine.version > Hlc::new(NOW + HOUR, 0));
    assert_eq!(l.get("kairos", "ip-master"), Some(&b"10.1.0.1"[..]));
}

#[test]
fn bad_signatures_and_invalid_entries_are_refused_and_counted() {
    let mut l = Ledger::default();
    let mut e = signed(&id(1), "kairos", "k", Some(b"v"), NOW);
    e.value = Some(b"forged".to_vec());
    assert!(matches!(
        l.apply(e, NOW),
        Err(LedgerError::BadSignature { .. })
    ));
    let mut e = signed(&id(1), "kairos", "k", Some(b"v"), NOW);
    e.key = "bad\nkey".into();
    assert!(matches!(
        l.apply(e, NOW),
        Err(LedgerError::InvalidName { field: "key", .. })
    ));
    assert_eq!(l.counters().bad_signature, 1);
    assert_eq!(l.counters().invalid, 1);
    assert!(l.is_empty());
    let text = LedgerError::InvalidName {
        field: "key",
        reason: "holds a control character",
    }
    .to_string();
    assert_eq!(text, "ledger key name holds a control character");
}

#[test]
fn a_full_ledger_refuses_new_keys_but_keeps_updating_old_ones() {
    let limits = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let me = id(1);
    let mut clock = Clock::new();
    let mut l = Ledger::new(limits);
    for k in ["a", "b", "c"] {
        l.put(&me, &mut clock, "kairos", k, b"1", NOW).unwrap();
    }
    let err = l
        .put(&me, &mut clock, "kairos", "d", b"1", NOW)
        .unwrap_err();
    assert!(matches!(err, LedgerError::Full { entries: 3, .. }), "{err}");
    assert!(matches!(
        l.apply(signed(&id(2), "dhcp", "x", None, NOW + 5), NOW),
        Err(LedgerError::Full { .. })
    ));
    assert_eq!(l.counters().rejected_full, 2);
    l.put(&me, &mut clock, "kairos", "a", b"2", NOW).unwrap();
    l.delete(&me, &mut clock, "kairos", "b", NOW).unwrap();
    assert_eq!(l.get("kairos", "a"), Some(&b"2"[..]));
    assert_eq!(l.len(), 3);
    assert_eq!(l.get("kairos", "c"), Some(&b"1"[..]), "nothing evicted");
}

#[test]
fn the_byte_budget_refuses_growth_not_shrinking() {
    let limits = Limits {
        max_total_bytes: 1000,
        ..Limits::default()
    };
    let me = id(1);
    let mut clock = Clock::new();
    let mut l = Ledger::new(limits);
    l.put(&me, &mut clock, "b", "k", &[0; 400], NOW).unwrap();
    assert!(matches!(
        l.put(&me, &mut clock, "b", "k2", &[0; 400], NOW),
        Err(LedgerError::Full { .. })
    ));
    assert!(matches!(
        l.put(&me, &mut clock, "b", "k", &[0; 900], NOW),
        Err(LedgerError::Full { .. })
    ));
    l.put(&me, &mut clock, "b", "k", &[0; 10], NOW).unwrap();
    assert!(l.total_bytes() <= 1000);
    let small = Ledger::new(Limits {
        max_value_bytes: 8,
        ..Limits::default()
    });
    let mut small = small;
    assert!(matches!(
        small.put(&me, &mut clock, "b", "k", &[0; 9], NOW),
        Err(LedgerError::ValueTooLarge { len: 9, max: 8 })
    ));
    assert_eq!(
        Limits::for_max_message_size(20_971_520).max_value_bytes,
        Limits::default().max_value_bytes
    );
}

#[test]
fn unpolled_events_collapse_into_resync() {
    let me = id(1);
    let mut clock = Clock::new();
    let mut l = Ledger::new(Limits {
        max_entries: 4,
        ..Limits::default()
    });
    for i in 0..6u8 {
        l.put(&me, &mut clock, "b", "k", &[i], NOW).unwrap();
    }
    assert_eq!(l.poll_event(), Some(LedgerEvent::Resync));
    assert!(l.counters().events_dropped > 0);
    let mut rest = 0;
    while l.poll_event().is_some() {
        rest += 1;
    }
    assert!(rest <= 4);
}

// ---------------------------------------------------------------------------------------------
// Clock horizon

#[test]
fn one_writer_cannot_vouch_for_its_own_future() {
    let (far, other) = (id(1), id(2));
    let mut l = Ledger::default();
    let ahead = signed(&far, "kairos", "k", Some(b"v"), NOW + DAY + HOUR);
    assert!(matches!(
        l.apply(ahead.clone(), NOW),
        Err(LedgerError::TooFarInFuture { .. })
    ));
    assert_eq!(l.counters().rejected_future, 1);
    // Within a day: fine. And it does not extend the horizon for its own writer.
    l.apply(
        signed(&far, "kairos", "j", Some(b"v"), NOW + 20 * HOUR),
        NOW,
    )
    .unwrap();
    assert!(l.apply(ahead.clone(), NOW).is_err());
    // A second writer vouches: the horizon moves.
    l.apply(
        signed(&other, "kairos", "i", Some(b"v"), NOW + 20 * HOUR),
        NOW,
    )
    .unwrap();
    assert_eq!(l.apply(ahead, NOW).unwrap(), Applied::New);
}

#[test]
fn a_node_with_an_unset_clock_takes_the_network_time() {
    let (me, peer) = (id(1), id(2));
    let boot = 30_000; // 1970
    let mut l = Ledger::default();
    l.apply(signed(&peer, "kairos", "k", Some(b"v"), NOW), boot)
        .unwrap();
    let mut clock = Clock::new();
    let mine = l
        .put(&me, &mut clock, "kairos", "k", b"mine", boot)
        .unwrap();
    assert!(mine.version > Hlc::new(NOW, 0), "stamped after the network");
    assert_eq!(l.get("kairos", "k"), Some(&b"mine"[..]));
    // And a peer with a set clock accepts it.
    let mut p = Ledger::default();
    p.apply(mine, NOW).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Anti-entropy

/// Runs one exchange A -> B (digest, summary, batch, answer) through the wire format; returns the
/// encoded sizes.
fn exchange(a: &mut Ledger, b: &mut Ledger, limits: &SyncLimits, now: u64) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut wire = |msg: SyncMessage| {
        let mut buf = Vec::new();
        msg.encode(limits, &mut buf).unwrap();
        assert!(buf.len() <= limits.max_message_bytes);
        sizes.push(buf.len());
        let back = SyncMessage::decode(&buf, limits).unwrap();
        assert_eq!(back, msg);
        back
    };
    // Both name their cluster (the same one: every bucket is exchanged), as nodes do; the
    // names fit in every message whatever its bound.
    let cluster = Some("c".repeat(MAX_BUCKET_LEN));
    let mut digest = a.digest(limits, now);
    digest.cluster.clone_from(&cluster);
    let SyncMessage::Digest(d) = wire(SyncMessage::Digest(digest)) else {
        panic!("digest")
    };
    let mut s = b.summary_for(&d, Scope::ALL, limits, now);
    s.cluster = cluster;
    let SyncMessage::Summary(s) = wire(SyncMessage::Summary(s)) else {
        panic!("summary")
    };
    a.apply_all(s.entries.iter().cloned(), now);
    let batch = a.reconcile(&s, Scope::ALL, limits, now);
    let SyncMessage::Batch(batch) = wire(SyncMessage::Batch(batch)) else {
        panic!("batch")
    };
    b.apply_all(batch.entries.iter().cloned(), now);
    if !batch.requests.is_empty() {
        let answer = b.answer(&batch.requests, Scope::ALL, limits);
        let SyncMessage::Batch(answer) = wire(SyncMessage::Batch(answer)) else {
            panic!("answer")
        };
        a.apply_all(answer.entries, now);
    }
    sizes
}

#[test]
fn one_exchange_converges_random_divergent_ledgers() {
    let ws = writers(5);
    let mut rng = Rng::from_seed(0x5eed);
    let limits = SyncLimits::default();
    let mut four_messages = 0;
    for case in 0..300 {
        let n = 1 + rng.below(60) as usize;
        let entries = random_entries(&mut rng, &ws, n, 12);
        let all = ledger_of(entries.clone());
        let (mut a, mut b) = (Ledger::default(), Ledger::default());
        for e in entries {
            let r = rng.below(3);
            if r != 1 {
                a.apply(e.clone(), NOW).unwrap();
            }
            if r != 0 {
                b.apply(e, NOW).unwrap();
            }
        }
        let sizes = exchange(&mut a, &mut b, &limits, NOW);
        if sizes.len() == 4 {
            four_messages += 1;
        }
        assert_eq!(state(&a), state(&all), "case {case}: A");
        assert_eq!(state(&b), state(&all), "case {case}: B");
        assert_eq!(a.digest(&limits, NOW), b.digest(&limits, NOW));
        // Converged ledgers exchange only a digest and an empty summary.
        let again = exchange(&mut a, &mut b, &limits, NOW);
        assert_eq!(again.len(), 3, "case {case}");
    }
    assert!(
        four_messages > 0,
        "some cases had gaps below the version vector"
    );
}

#[test]
fn small_message_caps_converge_over_several_exchanges() {
    let ws = writers(4);
    let mut rng = Rng::from_seed(77);
    for case in 0..20 {
        let entries = random_entries(&mut rng, &ws, 150, 60);
        let all = ledger_of(entries.clone());
        let (mut a, mut b) = (Ledger::default(), Ledger::default());
        for e in entries {
            if rng.chance(0.5) {
                a.apply(e, NOW).unwrap();
            } else {
                b.apply(e, NOW).unwrap();
            }
        }
        let limits = SyncLimits {
            max_message_bytes: 1500,
            ..SyncLimits::default()
        };
        let mut rounds = 0;
        while state(&a) != state(&all) || state(&b) != state(&all) {
            rounds += 1;
            assert!(rounds < 200, "case {case}: no convergence");
            let now = NOW + rounds;
            if rounds % 2 == 0 {
                exchange(&mut a, &mut b, &limits, now);
            } else {
                exchange(&mut b, &mut a, &limits, now);
            }
        }
    }
}

#[test]
fn a_digest_too_big_for_its_message_is_partial_and_still_converges() {
    let me = id(1);
    let mut clock = Clock::new();
    let mut a = Ledger::default();
    for i in 0..40 {
        a.put(&me, &mut clock, &format!("bucket-{i:02}"), "k", b"v", NOW)
            .unwrap();
    }
    let limits = SyncLimits {
        max_message_bytes: 600,
        ..SyncLimits::default()
    };
    let d = a.digest(&limits, NOW);
    assert!((d.partial || d.first.is_some()) && d.buckets.len() < 40);
    let mut b = Ledger::default();
    let s = b.summary_for(&d, Scope::ALL, &limits, NOW);
    assert!(!s.complete);
    assert!(
        s.buckets.iter().all(|bs| d.buckets.contains_key(&bs.name)),
        "nothing past the digest's cut-off"
    );
    for round in 0..40 {
        if state(&a) == state(&b) {
            break;
        }
        exchange(&mut a, &mut b, &limits, NOW + round);
        exchange(&mut b, &mut a, &limits, NOW + round);
    }
    assert_eq!(state(&a), state(&b));
}

#[test]
fn a_returning_node_forgets_what_was_deleted_while_it_was_away() {
    let (me, peer) = (id(1), id(2));
    let limits = SyncLimits::default();
    let mut a = Ledger::default();
    let mut b = Ledger::default();
    let (mut ca, mut cb) = (Clock::new(), Clock::new());
    let keep = b.put(&peer, &mut cb, "kairos", "keep", b"1", NOW).unwrap();
    let gone = b.put(&peer, &mut cb, "kairos", "gone", b"1", NOW).unwrap();
    a.apply_all([keep, gone], NOW);
    exchange(&mut a, &mut b, &limits, NOW + MINUTE);
    // A is away for three days; B deletes "gone", and the tombstone expires.
    let t1 = NOW + HOUR;
    b.delete(&peer, &mut cb, "kairos", "gone", t1).unwrap();
    let back = NOW + 3 * DAY;
    b.expire(back);
    b.put(&peer, &mut cb, "kairos", "fresh", b"1", back - HOUR)
        .unwrap();
    a.put(&me, &mut ca, "kairos", "mine", b"1", back - HOUR)
        .unwrap();
    assert!(b.entry("kairos", "gone").is_none());
    exchange(&mut a, &mut b, &limits, back);
    assert_eq!(a.get("kairos", "gone"), None, "not resurrected at A");
    assert_eq!(b.get("kairos", "gone"), None, "not resurrected at B");
    assert_eq!(a.counters().suspects_dropped, 1);
    assert_eq!(a.suspects(), 0, "the rest was confirmed");
    assert_eq!(state(&a), state(&b));
    assert_eq!(a.get("kairos", "fresh"), Some(&b"1"[..]));
    assert_eq!(b.get("kairos", "mine"), Some(&b"1"[..]));
}

#[test]
fn writes_made_during_a_partition_are_not_mistaken_for_deletes() {
    let (p1, p2) = (id(1), id(2));
    let limits = SyncLimits::default();
    let (mut a, mut b) = (Ledger::default(), Ledger::default());
    let (mut c1, mut c2) = (Clock::new(), Clock::new());
    a.put(&p1, &mut c1, "kairos", "old", b"1", NOW).unwrap();
    exchange(&mut a, &mut b, &limits, NOW + MINUTE);
    // Partitioned for two days: A writes, B deletes.
    a.put(&p1, &mut c1, "kairos", "during", b"1", NOW + HOUR)
        .unwrap();
    b.delete(&p2, &mut c2, "kairos", "old", NOW + HOUR).unwrap();
    let back = NOW + 2 * DAY;
    b.expire(back);
    exchange(&mut a, &mut b, &limits, back);
    assert_eq!(a.get("kairos", "old"), None, "the delete wins");
    assert_eq!(
        b.get("kairos", "during"),
        Some(&b"1"[..]),
        "the write survives"
    );
    exchange(&mut b, &mut a, &limits, back + 1);
    assert_eq!(state(&a), state(&b));
    assert_eq!((a.suspects(), b.suspects()), (0, 0));
}

#[test]
fn a_whole_network_coming_back_keeps_its_data() {
    let (p1, p2) = (id(1), id(2));
    let limits = SyncLimits::default();
    let (mut a, mut b) = (Ledger::default(), Ledger::default());
    let (mut c1, mut c2) = (Clock::new(), Clock::new());
    a.put(&p1, &mut c1, "kairos", "n1-role", b"master", NOW)
        .unwrap();
    b.put(&p2, &mut c2, "kairos", "n2-role", b"worker", NOW)
        .unwrap();
    exchange(&mut a, &mut b, &limits, NOW + MINUTE);
    // Power cut for a weekend: both quarantine, and confirm each other.
    let back = NOW + 2 * DAY;
    exchange(&mut a, &mut b, &limits, back);
    assert_eq!((a.len(), b.len()), (2, 2));
    assert_eq!(a.suspects(), 0, "B holds them all");
    assert_eq!(b.suspects(), 2, "B settles its own when it reconciles");
    exchange(&mut b, &mut a, &limits, back + 1);
    assert_eq!(b.suspects(), 0);
    assert_eq!(a.get("kairos", "n2-role"), Some(&b"worker"[..]));
}

#[test]
fn quarantine_is_lifted_after_a_lifetime_without_a_judge() {
    let mut l = ledger_of([signed(&id(1), "kairos", "k", Some(b"v"), NOW)]);
    l.note_contact(NOW + MINUTE);
    l.note_contact(NOW + 2 * DAY);
    assert_eq!(l.suspects(), 1);
    assert_eq!(l.get("kairos", "k"), Some(&b"v"[..]), "suspects still read");
    assert!(
        l.answer(
            &[Request {
                bucket: "kairos".into(),
                key: KeyId::of("k")
            }],
            Scope::ALL,
            &SyncLimits::default()
        )
        .entries
        .is_empty(),
        "but are never served"
    );
    l.expire(NOW + 3 * DAY - 1);
    assert_eq!(l.suspects(), 1);
    l.expire(NOW + 3 * DAY);
    assert_eq!(l.suspects(), 0);
}

// ---------------------------------------------------------------------------------------------
// Wire robustness

fn sample_messages(rng: &mut Rng) -> Vec<Vec<u8>> {
    let ws = writers(3);
    let limits = SyncLimits::default();
    let entries = random_entries(rng, &ws, 30, 10);
    let (mut a, mut b) = (Ledger::default(), Ledger::default());
    for e in entries {
        if rng.chance(0.5) {
            a.apply(e, NOW).unwrap();
        } else {
            b.apply(e, NOW).unwrap();
        }
    }
    let d = a.digest(&limits, NOW);
    let s = b.summary_for(&d, Scope::ALL, &limits, NOW);
    let batch = a.reconcile(&s, Scope::ALL, &limits, NOW);
    let held: Vec<&Entry> = a.entries().collect();
    let announce = SyncMessage::announcements(held.iter().map(|e| Announced::of(e)), &limits);
    let mut out = Vec::new();
    let brief = a.brief_digest(&limits, NOW);
    for msg in [
        SyncMessage::Digest(d),
        SyncMessage::Digest(brief),
        SyncMessage::Summary(s),
        SyncMessage::Batch(batch),
    ]
    .into_iter()
    .chain(announce)
    {
        let mut buf = Vec::new();
        msg.encode(&limits, &mut buf).unwrap();
        out.push(buf);
    }
    out
}

fn mutate(rng: &mut Rng, buf: &mut Vec<u8>) {
    match rng.below(4) {
        0 => {
            let n = 1 + rng.below(4);
            for _ in 0..n {
                if !buf.is_empty() {
                    let i = rng.below(buf.len() as u64) as usize;
                    buf[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let cut = rng.below(buf.len() as u64 + 1) as usize;
            buf.truncate(cut);
        }
        2 => {
            let i = rng.below(buf.len() as u64 + 1) as usize;
            buf.insert(i, rng.below(256) as u8);
        }
        _ => {
            // A large count or length field.
            if buf.len() > 8 {
                let i = rng.below(buf.len() as u64 - 4) as usize;
                buf[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, rng.below(256) as u8]);
            }
        }
    }
}

#[test]
fn decoding_random_and_mutated_messages_never_panics() {
    let mut rng = Rng::from_seed(0xf022);
    let limits = SyncLimits::default();
    let samples = sample_messages(&mut rng);
    let mut decoded_ok = 0;
    let mut target = Ledger::default();
    for i in 0..6000 {
        let mut buf = if i % 5 == 0 {
            let mut b = vec![0u8; rng.below(200) as usize];
            rng.fill(&mut b);
            if b.len() > 1 && rng.chance(0.5) {
                b[0] = SYNC_VERSION;
                b[1] = 1 + rng.below(4) as u8;
            }
            b
        } else {
            samples[rng.below(samples.len() as u64) as usize].clone()
        };
        mutate(&mut rng, &mut buf);
        if let Ok(msg) = SyncMessage::decode(&buf, &limits) {
            decoded_ok += 1;
            // Whatever decodes must be safe to act on.
            match msg {
                SyncMessage::Digest(d) => {
                    let _ = target.summary_for(&d, Scope::ALL, &limits, NOW);
                }
                SyncMessage::Summary(s) => {
                    target.apply_all(s.entries.iter().cloned(), NOW);
                    let _ = target.reconcile(&s, Scope::ALL, &limits, NOW);
                }
                SyncMessage::Batch(b) => {
                    let _ = target.answer(&b.requests, Scope::ALL, &limits);
                    target.apply_all(b.entries, NOW);
                }
                SyncMessage::Announce(items) => {
                    for item in items {
                        if let Some(held) = target.entry(&item.bucket, &item.key) {
                            let _ = item.is_covered_by(held);
                        }
                    }
                }
            }
        }
    }
    assert!(
        decoded_ok > 100,
        "mutations that keep a message valid: {decoded_ok}"
    );
}

#[test]
fn decoder_limits_are_typed_errors() {
    let mut rng = Rng::from_seed(1);
    let samples = sample_messages(&mut rng);
    let summary = &samples[1];
    let tight = SyncLimits {
        max_message_bytes: summary.len() - 1,
        ..SyncLimits::default()
    };
    assert!(matches!(
        SyncMessage::decode(summary, &tight),
        Err(LedgerError::Wire(crate::wire::WireError::TooLong { .. }))
    ));
    let mut buf = Vec::new();
    let msg = SyncMessage::decode(summary, &SyncLimits::default()).unwrap();
    assert!(msg.encode(&tight, &mut buf).is_err());
    assert!(
        buf.is_empty(),
        "a failed encode leaves the buffer as it was"
    );
    let mut bad_version = summary.clone();
    bad_version[0] = 9;
    assert!(matches!(
        SyncMessage::decode(&bad_version, &SyncLimits::default()),
        Err(LedgerError::Wire(
            crate::wire::WireError::UnsupportedVersion(9)
        ))
    ));
    let mut trailing = summary.clone();
    trailing.push(0);
    assert!(matches!(
        SyncMessage::decode(&trailing, &SyncLimits::default()),
        Err(LedgerError::Wire(crate::wire::WireError::Trailing(1)))
    ));
    // A batch claiming 4 billion entries is refused before any allocation.
    let huge = [SYNC_VERSION, 3, 0xff, 0xff, 0xff, 0xff];
    assert!(SyncMessage::decode(&huge, &SyncLimits::default()).is_err());
}

// ---------------------------------------------------------------------------------------------
// Persistence

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kairos-p2p-ledger-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample_ledger() -> Ledger {
    let mut rng = Rng::from_seed(5);
    let mut l = ledger_of(random_entries(&mut rng, &writers(3), 40, 20));
    l.note_contact(NOW + MINUTE);
    l
}

#[test]
fn a_scope_keeps_each_cluster_bucket_within_its_cluster() {
    // (this node's cluster, the peer's, bucket, exchanged)
    let cases = [
        (Some("a"), Some("a"), "a", true),
        (Some("a"), Some("b"), "a", false),
        (Some("a"), Some("b"), "b", false),
        (Some("a"), Some("b"), "photos", true),
        (Some("a"), Some("b"), names::DHCP, true),
        (Some("a"), Some("b"), names::MACHINES, true),
        (Some("a"), Some("b"), names::HEALTHCHECK, true),
        // A cluster named like a network-wide bucket does not make that bucket its own.
        (Some("dhcp"), Some("b"), names::DHCP, true),
        // The peer's cluster not known yet: our own bucket waits for its digest.
        (Some("a"), None, "a", false),
        (Some("a"), None, "photos", true),
        (None, None, "a", true),
    ];
    for (mine, theirs, bucket, shared) in cases {
        let scope = Scope { mine, theirs };
        assert_eq!(scope.shares(bucket, "k"), shared, "{scope:?} {bucket}");
        // Announcements bind uuids for the whole network: always exchanged.
        assert!(scope.shares(bucket, "node-1-uuid"), "{scope:?} {bucket}");
    }
}

/// The periodic check between synced members: a brief digest (no version vector) tells two
/// ledgers that match from two that differ, leaving out the cluster bucket each of two
/// clusters' members holds a part of.
#[test]
fn a_brief_digest_tells_matching_ledgers_from_differing_ones() {
    let limits = SyncLimits::default();
    let w = id(1);
    let (mut a, mut b) = (Ledger::default(), Ledger::default());
    for e in [
        signed(&w, "photos", "k", Some(b"v"), NOW),
        signed(&w, names::DHCP, "u1", Some(b"10.1.0.2"), NOW),
        signed(&w, "alpha", "u1-uuid", Some(b"{}"), NOW),
    ] {
        a.apply(e.clone(), NOW).unwrap();
        b.apply(e, NOW).unwrap();
    }
    // Only `a` is of cluster alpha and holds its role keys.
    a.apply(signed(&w, "alpha", "u1-role", Some(b"worker"), NOW), NOW)
        .unwrap();
    let brief = a.brief_digest(&limits, NOW);
    assert!(brief.brief && brief.writers.is_empty());
    let mut buf = Vec::new();
    SyncMessage::Digest(brief.clone())
        .encode(&limits, &mut buf)
        .unwrap();
    assert_eq!(
        SyncMessage::decode(&buf, &limits).unwrap(),
        SyncMessage::Digest(brief.clone())
    );
    let across = Scope {
        mine: Some("beta"),
        theirs: Some("alpha"),
    };
    let within = Scope {
        mine: Some("alpha"),
        theirs: Some("alpha"),
    };
    assert!(
        !b.differs_from(&brief, across),
        "alpha's bucket is left out"
    );
    assert!(b.differs_from(&brief, within));
    b.apply(signed(&w, "photos", "k2", Some(b"v"), NOW), NOW)
        .unwrap();
    assert!(b.differs_from(&brief, across), "a shared bucket differs");

    // A brief digest carrying a version vector is malformed.
    let mut bad = brief;
    bad.writers.insert(w.peer_id(), Hlc::new(NOW, 0));
    let mut buf = Vec::new();
    SyncMessage::Digest(bad).encode(&limits, &mut buf).unwrap();
    assert!(SyncMessage::decode(&buf, &limits).is_err());
}

#[test]
fn save_and_load_round_trip_privately() {
    let dir = temp_dir("roundtrip");
    let path = dir.join("ledger.bin");
    let l = sample_ledger();
    l.save(&path).unwrap();
    l.save(&path).unwrap(); // overwrite in place
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left"
    );
    let back = Ledger::load(&path, Limits::default()).unwrap();
    assert_eq!(state(&back), state(&l));
    assert_eq!(
        back.digest(&SyncLimits::default(), NOW),
        l.digest(&SyncLimits::default(), NOW)
    );
    assert_eq!(back.last_contact_ms(), Some(NOW + MINUTE));
    assert_eq!(back.total_bytes(), l.total_bytes());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn temporaries_of_killed_saves_are_removed_and_nothing_else() {
    let dir = temp_dir("stale");
    let path = dir.join("ledger.bin");
    sample_ledger().save(&path).unwrap();
    for leftover in [".ledger.bin.123.tmp", ".ledger.bin.4567.tmp"] {
        fs::write(dir.join(leftover), b"half a snapshot").unwrap();
    }
    for other in [
        "ledger.bin.1.tmp",
        ".ledger.bin..tmp",
        ".ledger.bin.12x.tmp",
        ".other.bin.1.tmp",
        "keep",
    ] {
        fs::write(dir.join(other), b"not ours").unwrap();
    }
    assert_eq!(Ledger::remove_stale_temporaries(&path), 2);
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            ".ledger.bin..tmp",
            ".ledger.bin.12x.tmp",
            ".other.bin.1.tmp",
            "keep",
            "ledger.bin",
            "ledger.bin.1.tmp"
        ]
    );
    assert!(!Ledger::load(&path, Limits::default()).unwrap().is_empty());
    assert_eq!(Ledger::remove_stale_temporaries(&dir.join("absent/x")), 0);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quarantine_survives_a_restart() {
    let dir = temp_dir("quarantine");
    let path = dir.join("ledger.bin");
    let mut l = sample_ledger();
    l.note_contact(NOW + 3 * DAY);
    let suspects = l.suspects();
    assert!(suspects > 0);
    l.save(&path).unwrap();
    let back = Ledger::load(&path, Limits::default()).unwrap();
    assert_eq!(back.suspects(), suspects);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_truncated_and_damaged_snapshots() {
    let dir = temp_dir("corrupt");
    let path = dir.join("ledger.bin");
    assert!(Ledger::load(&path, Limits::default()).unwrap().is_empty());
    sample_ledger().save(&path).unwrap();
    let good = fs::read(&path).unwrap();
    for cut in [0, 5, 20, good.len() / 2, good.len() - 1] {
        fs::write(&path, &good[..cut]).unwrap();
        let err = Ledger::load(&path, Limits::default()).unwrap_err();
        assert!(
            matches!(err, LedgerError::Corrupt { .. }),
            "cut {cut}: {err}"
        );
        assert!(err.to_string().contains("ledger.bin"), "{err}");
    }
    let mut rng = Rng::from_seed(3);
    for _ in 0..200 {
        let mut bad = good.clone();
        let i = rng.below(bad.len() as u64) as usize;
        bad[i] ^= 1 << rng.below(8);
        fs::write(&path, &bad).unwrap();
        assert!(matches!(
            Ledger::load(&path, Limits::default()),
            Err(LedgerError::Corrupt { .. })
        ));
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn entries_with_bad_signatures_are_skipped_on_load() {
    let mut l = Ledger::default();
    l.apply(signed(&id(1), "kairos", "good", Some(b"1"), NOW), NOW)
        .unwrap();
    // Forge a stored entry behind the ledger's back, then save: the checksum is valid.
    let forged = {
        let mut e = signed(&id(2), "kairos", "bad", Some(b"1"), NOW);
        e.value = Some(b"2".to_vec());
        e
    };
    l.admit(
        forged,
        store::Admit {
            verify: false,
            future: false,
            now: None,
        },
    )
    .unwrap();
    let bytes = l.encode_snapshot().unwrap();
    let back = Ledger::decode_snapshot(&bytes, Limits::default()).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back.get("kairos", "good"), Some(&b"1"[..]));
    assert_eq!(back.counters().bad_signature, 1);
}

#[test]
fn snapshot_parser_survives_mutations_with_valid_checksums() {
    use sha2::{Digest as _, Sha256};
    let good = sample_ledger().encode_snapshot().unwrap();
    let mut rng = Rng::from_seed(11);
    for _ in 0..1000 {
        let mut body = good[..good.len() - 32].to_vec();
        mutate(&mut rng, &mut body);
        let sum: [u8; 32] = Sha256::digest(&body).into();
        body.extend_from_slice(&sum);
        let _ = Ledger::decode_snapshot(&body, Limits::default());
    }
}

#[test]
fn oversized_snapshot_is_refused() {
    let dir = temp_dir("oversized");
    let path = dir.join("ledger.bin");
    sample_ledger().save(&path).unwrap();
    let tiny = Limits {
        max_total_bytes: 10,
        max_entries: 1,
        ..Limits::default()
    };
    assert!(matches!(
        Ledger::load(&path, tiny),
        Err(LedgerError::Corrupt { .. })
    ));
    fs::remove_dir_all(&dir).unwrap();
}

// ---- journal ----

/// A ledger of `n` entries of `size`-byte values.
fn big_ledger(n: usize, size: usize) -> Ledger {
    let mut l = Ledger::default();
    let mut clock = Clock::new();
    let me = id(9);
    for i in 0..n {
        l.put(
            &me,
            &mut clock,
            "bulk",
            &format!("k{i}"),
            &vec![b'x'; size],
            NOW,
        )
        .unwrap();
    }
    l
}

/// Item 5 of issue 14: with a big ledger, a save after one change appends that change (a few
/// hundred bytes) to the journal instead of rewriting the whole snapshot; the snapshot is only
/// rewritten once the journal outgrows the ledger; a load sees every saved change.
#[test]
fn saving_one_change_of_a_big_ledger_appends_it_and_compacts_later() {
    use super::journal::{MIN_COMPACT_BYTES, Persisted, journal_path};
    let dir = temp_dir("journal");
    let path = dir.join("ledger.snapshot");
    let mut l = big_ledger(8_000, 256);
    assert!(l.total_bytes() as u64 > 2 * MIN_COMPACT_BYTES);
    assert_eq!(l.persist(&path).unwrap(), Persisted::Compacted);
    let snapshot = fs::metadata(&path).unwrap();
    let (me, mut clock) = (id(9), Clock::new());
    let started = std::time::Instant::now();
    let mut changes = 0;
    let appended = loop {
        l.put(
            &me,
            &mut clock,
            "bulk",
            "k7",
            format!("v{changes}").as_bytes(),
            NOW,
        )
        .unwrap();
        changes += 1;
        match l.persist(&path).unwrap() {
            Persisted::Appended(n) => {
                assert!(n < 1024, "one change appended {n} bytes");
                if changes == 100 {
                    break n;
                }
            }
            other => panic!("change {changes}: {other:?}"),
        }
    };
    let appends = started.elapsed();
    let full = std::time::Instant::now();
    l.save(&dir.join("full.snapshot")).unwrap();
    eprintln!(
        "100 saves of one change each in a {} KiB ledger: {appends:?} ({appended} bytes each); \
         one whole snapshot: {:?}",
        l.total_bytes() / 1024,
        full.elapsed()
    );
    let now = fs::metadata(&path).unwrap();
    assert_eq!(now.len(), snapshot.len(), "the snapshot was not rewritten");
    assert_eq!(now.modified().unwrap(), snapshot.modified().unwrap());
    assert_eq!(
        fs::metadata(journal_path(&path))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let back = Ledger::load(&path, Limits::default()).unwrap();
    assert_eq!(back.get("bulk", "k7"), Some(&b"v99"[..]));
    assert_eq!(state(&back), state(&l));

    // Enough changes: the journal outgrows the ledger and is compacted into the snapshot.
    let mut compacted = false;
    for i in 0..(l.total_bytes() / 200 + 10) {
        l.put(
            &me,
            &mut clock,
            "bulk",
            &format!("k{}", i % 8_000),
            &vec![b'y'; 256],
            NOW,
        )
        .unwrap();
        if l.persist(&path).unwrap() == Persisted::Compacted {
            compacted = true;
            break;
        }
    }
    assert!(compacted);
    assert!(!journal_path(&path).exists());
    assert_eq!(
        state(&Ledger::load(&path, Limits::default()).unwrap()),
        state(&l)
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// A crash in the middle of an append leaves a torn record: it and what follows are ignored,
/// what came before loads, and the next save compacts rather than append behind it.
#[test]
fn a_torn_journal_record_is_ignored_and_the_next_save_compacts() {
    use super::journal::{Persisted, journal_path};
    let dir = temp_dir("torn");
    let path = dir.join("ledger.snapshot");
    let (me, mut clock) = (id(9), Clock::new());
    let mut l = Ledger::default();
    l.put(&me, &mut clock, "b", "base", b"0", NOW).unwrap();
    assert_eq!(l.persist(&path).unwrap(), Persisted::Compacted);
    l.put(&me, &mut clock, "b", "first", b"1", NOW).unwrap();
    assert!(matches!(l.persist(&path).unwrap(), Persisted::Appended(_)));
    let good = fs::metadata(journal_path(&path)).unwrap().len();
    l.put(&me, &mut clock, "b", "second", b"2", NOW).unwrap();
    assert!(matches!(l.persist(&path).unwrap(), Persisted::Appended(_)));
    let journal = fs::read(journal_path(&path)).unwrap();
    // Cut inside the second append's first record.
    fs::write(journal_path(&path), &journal[..good as usize + 10]).unwrap();
    let mut back = Ledger::load(&path, Limits::default()).unwrap();
    assert_eq!(back.get("b", "first"), Some(&b"1"[..]));
    assert_eq!(back.get("b", "second"), None, "torn");
    assert!(good < journal.len() as u64);
    back.put(&me, &mut clock, "b", "third", b"3", NOW).unwrap();
    assert_eq!(back.persist(&path).unwrap(), Persisted::Compacted);
    let again = Ledger::load(&path, Limits::default()).unwrap();
    assert_eq!(again.get("b", "third"), Some(&b"3"[..]));
    fs::remove_dir_all(&dir).unwrap();
}

/// The "150 PUTs of 60 KB": one writer stops at its quota, on every node (the check is
/// in the merge), others still write, and the quota writer may still update what it holds.
#[test]
fn one_writer_stops_at_its_quota_and_others_still_write() {
    let (spammer, other) = (id(1), id(2));
    let mut clock = Clock::new();
    let mut local = Ledger::default();
    let mut remote = Ledger::default();
    let value = vec![b'x'; 60 * 1024];
    let mut stored = 0;
    for i in 0..150 {
        match local.put(&spammer, &mut clock, "spam", &format!("k{i}"), &value, NOW) {
            Ok(e) => {
                remote.apply(e, NOW).unwrap();
                stored += 1;
            }
            Err(e) => assert!(matches!(e, LedgerError::OverQuota { .. }), "{e}"),
        }
    }
    assert!(
        stored < 150 && stored * value.len() <= MAX_WRITER_BYTES,
        "{stored}"
    );
    assert!(local.usage_of(&spammer.peer_id()).1 <= MAX_WRITER_BYTES);
    assert_eq!(local.counters().rejected_quota, 150 - stored as u64);
    // A forged batch straight to a peer is refused there too.
    let past = Entry::sign(&spammer, "spam", "more", Some(&value), Hlc::new(NOW + 1, 0)).unwrap();
    assert!(matches!(
        remote.apply(past, NOW),
        Err(LedgerError::OverQuota { .. })
    ));
    // The others are not affected; the spammer may still shrink or update its own.
    local
        .put(&other, &mut clock, "kairos", "k", b"v", NOW)
        .unwrap();
    local
        .put(&spammer, &mut clock, "spam", "k0", b"small", NOW)
        .unwrap();
}

/// What a restart must find: the entries with their suspicion and the contact state.
fn saved_state(l: &Ledger) -> (Vec<(Entry, bool)>, Option<u64>, Option<u64>) {
    let entries = l
        .buckets
        .values()
        .flat_map(|b| b.entries.values())
        .map(|s| (s.entry.clone(), s.suspect))
        .collect();
    (entries, l.last_contact_ms, l.quarantined_at)
}

/// The simulator's virtual disk holds the very bytes the agent's files hold, save after save
/// (a first snapshot, journal appends, a full rewrite after a key is removed), and a ledger
/// loaded from them equals the one saved.
#[test]
fn the_memory_disk_holds_the_file_bytes_and_loads_back_the_same_ledger() {
    use super::disk::MemoryDisk;
    use super::journal::{Persisted, journal_path};
    let dir = temp_dir("memory-disk");
    let path = dir.join("ledger.snapshot");
    let (mut on_file, mut in_memory) = (sample_ledger(), sample_ledger());
    let mut disk = MemoryDisk::default();
    let (me, mut clock) = (id(9), Clock::new());
    let mut writer = Ledger::default();
    let save = |on_file: &mut Ledger, in_memory: &mut Ledger, disk: &mut MemoryDisk| {
        let persisted = on_file.persist(&path).unwrap();
        assert_eq!(in_memory.persist_to(disk).unwrap(), persisted);
        assert_eq!(disk.snapshot(), Some(&fs::read(&path).unwrap()[..]));
        assert_eq!(
            disk.journal(),
            fs::read(journal_path(&path)).ok().as_deref()
        );
        let back = disk.load(Limits::default()).unwrap();
        assert_eq!(saved_state(&back), saved_state(in_memory));
        assert_eq!(
            saved_state(&Ledger::load(&path, Limits::default()).unwrap()),
            saved_state(in_memory)
        );
        persisted
    };
    assert!(disk.load(Limits::default()).unwrap().is_empty());
    assert_eq!(
        save(&mut on_file, &mut in_memory, &mut disk),
        Persisted::Compacted
    );
    for i in 0..20u8 {
        let value = [i; 40];
        let key = format!("k{}", i % 7);
        let entry = if i % 5 == 4 {
            writer.delete(&me, &mut clock, "b", &key, NOW).unwrap()
        } else {
            writer.put(&me, &mut clock, "b", &key, &value, NOW).unwrap()
        };
        on_file.apply(entry.clone(), NOW).unwrap();
        in_memory.apply(entry, NOW).unwrap();
        on_file.note_contact(NOW + u64::from(i));
        in_memory.note_contact(NOW + u64::from(i));
        assert!(matches!(
            save(&mut on_file, &mut in_memory, &mut disk),
            Persisted::Appended(_)
        ));
    }
    assert!(disk.journal().is_some());
    assert_eq!(
        save(&mut on_file, &mut in_memory, &mut disk),
        Persisted::Unchanged
    );
    // Tombstones expire: a removed key is only recorded by a whole new snapshot.
    assert!(on_file.expire(NOW + 3 * DAY) > 0);
    assert!(in_memory.expire(NOW + 3 * DAY) > 0);
    assert_eq!(
        save(&mut on_file, &mut in_memory, &mut disk),
        Persisted::Compacted
    );
    assert_eq!(disk.journal(), None);
    // Appends continue the new snapshot, and a reloaded ledger goes on appending.
    let entry = writer
        .put(&me, &mut clock, "b", "after", b"x", NOW)
        .unwrap();
    on_file.apply(entry.clone(), NOW).unwrap();
    in_memory.apply(entry, NOW).unwrap();
    assert!(matches!(
        save(&mut on_file, &mut in_memory, &mut disk),
        Persisted::Appended(_)
    ));
    let mut reloaded = disk.load(Limits::default()).unwrap();
    let entry = writer
        .put(&me, &mut clock, "b", "later", b"y", NOW)
        .unwrap();
    reloaded.apply(entry, NOW).unwrap();
    assert!(matches!(
        reloaded.persist_to(&mut disk),
        Ok(Persisted::Appended(_))
    ));
    assert_eq!(
        saved_state(&disk.load(Limits::default()).unwrap()),
        saved_state(&reloaded)
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_discard_disk_saves_as_the_memory_disk_does_and_keeps_no_bytes() {
    use super::disk::{DiscardDisk, MemoryDisk};
    use super::journal::Persisted;
    let (mut kept, mut dropped) = (sample_ledger(), sample_ledger());
    let (mut memory, mut discard) = (MemoryDisk::default(), DiscardDisk::default());
    assert!(!discard.saved());
    let (me, mut clock) = (id(9), Clock::new());
    let mut writer = Ledger::default();
    let mut outcomes = Vec::new();
    for i in 0..30u8 {
        let key = format!("k{}", i % 7);
        let entry = if i % 5 == 4 {
            writer.delete(&me, &mut clock, "b", &key, NOW).unwrap()
        } else {
            writer
                .put(&me, &mut clock, "b", &key, &[i; 40], NOW)
                .unwrap()
        };
        kept.apply(entry.clone(), NOW).unwrap();
        dropped.apply(entry, NOW).unwrap();
        if i == 20 {
            // A removed key: the next save is a whole snapshot and starts a new journal.
            assert!(kept.expire(NOW + 3 * DAY) > 0);
            assert!(dropped.expire(NOW + 3 * DAY) > 0);
        }
        let persisted = kept.persist_to(&mut memory).unwrap();
        // The same choice and the same byte counts (they drive compaction).
        assert_eq!(dropped.persist_to(&mut discard).unwrap(), persisted);
        outcomes.push(persisted);
    }
    assert!(outcomes.contains(&Persisted::Compacted));
    assert!(outcomes.iter().any(|p| matches!(p, Persisted::Appended(_))));
    assert!(discard.saved());
}
