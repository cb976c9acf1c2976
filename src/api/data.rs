//! Ledger values as edgevpn's API shows them: its `blockchain.Data`, the JSON document an
//! edgevpn ledger would hold for the same thing. The one place where this agent's stored values
//! meet edgevpn's encoding: every route that shows a value (`/api/ledger...`,
//! `/api/blockchain`) goes through [`data`].
//!
//! # Why at the API, not in the ledger
//! edgevpn stores two kinds of values. Its nodes write their own buckets (`machines`,
//! `healthcheck`, `dns`, ...) with `ledger.Add`: the value marshalled as JSON. Everything else
//! (all of Kairos' keys) is written through its Go client, `api/client/client.go`: `Put` sends
//! base64url (padded) of the value's JSON as the last path segment, and the API's
//! `Ledger.Persist` stores that segment marshalled as JSON, so the role `master` is the Data
//! `"Im1hc3RlciI="`. `GetBucketKey` reverses it: the body as a JSON string, that string as a
//! JSON string again, base64url, then the caller unmarshals the JSON (`service.Client.Get`
//! into a string). This agent's own writes keep their plain form (`master`, `10.1.0.1`,
//! `{"Role":"auto",...}`): its readers (the cluster layer, k3s, the CLI) and nodes of earlier
//! versions read them, and the ledger stays small. Showing them in edgevpn's form here keeps
//! that format, and nodes running earlier versions, untouched; values that came through the
//! API (`PUT`) are edgevpn's form already and are shown as stored, so they round-trip.
//!
//! # Rules
//! 1. A value that is a JSON string literal is shown as stored: it came through `PUT` (curl's
//!    `"hello"`, the Go client's `"Im1hc3RlciI="`), exactly what `Ledger.Persist` stores. This
//!    agent never writes a value that starts with `"` itself.
//! 2. Otherwise it is this agent's plain value; its JSON is the value itself when it is a JSON
//!    object or array, else the text as a JSON string. Two values are translated to what
//!    Kairos reads: `healthcheck/<uuid>` becomes the RFC 3339 time edgevpn's alive service
//!    writes, and an announcement `<bucket>/<uuid>-uuid` gets provider-kairos' `Time` field (its
//!    `AdvertizingNodes` keeps nodes younger than 15 minutes). Both show when the node was last
//!    known alive (`cluster::liveness`): now while it is live, as edgevpn's nodes beat every
//!    few seconds, though ours renew their heartbeat only every half hour; else the stored
//!    heartbeat's unix seconds.
//! 3. In a bucket edgevpn's nodes write ([`NODE_BUCKETS`]) that JSON is the Data; in any other
//!    bucket the Data is what the Go client's `Put` would have stored: the JSON string of the
//!    base64url (padded) of that JSON.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use serde_json::Value;

use crate::cluster::liveness::{self, Suspicions};
use crate::ledger::{Ledger, names};

/// Buckets edgevpn's nodes write themselves (`pkg/protocol`'s ledger keys, and `dhcp`): values
/// are plain JSON there. Every other bucket is written through edgevpn's Go client.
pub const NODE_BUCKETS: [&str; 10] = [
    "files",
    names::MACHINES,
    "services",
    "users",
    names::HEALTHCHECK,
    "dns",
    "egress",
    "trustzone",
    "trustzoneAuth",
    names::DHCP,
];

/// The edgevpn `blockchain.Data` standing for the value stored at `bucket/key`, at wall-clock
/// time `now_ms`.
pub fn data<'a>(
    ledger: &Ledger,
    now_ms: u64,
    bucket: &str,
    key: &str,
    stored: &'a [u8],
) -> Cow<'a, str> {
    let text = String::from_utf8_lossy(stored);
    if serde_json::from_str::<String>(&text).is_ok() {
        return text;
    }
    let json = plain_json(ledger, now_ms, bucket, key, &text);
    if NODE_BUCKETS.contains(&bucket) {
        Cow::Owned(json)
    } else {
        Cow::Owned(json_string(&URL_SAFE.encode(json)))
    }
}

/// The JSON this agent's plain value stands for (rule 2).
fn plain_json(ledger: &Ledger, now_ms: u64, bucket: &str, key: &str, text: &str) -> String {
    if bucket == names::HEALTHCHECK {
        if let Some(seconds) =
            heard_seconds(ledger, now_ms, key).or_else(|| text.trim().parse::<u64>().ok())
        {
            return json_string(&rfc3339(seconds));
        }
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut object)) => {
            let uuid = key.strip_suffix(names::UUID_SUFFIX);
            let beat = uuid.and_then(|u| {
                heard_seconds(ledger, now_ms, u).or_else(|| heartbeat_seconds(ledger, u))
            });
            match (NODE_BUCKETS.contains(&bucket), beat) {
                (false, Some(seconds)) if !object.contains_key("Time") => {
                    object.insert("Time".to_string(), Value::String(rfc3339(seconds)));
                    Value::Object(object).to_string()
                }
                _ => text.to_string(),
            }
        }
        Ok(Value::Array(_)) => text.to_string(),
        _ => json_string(text),
    }
}

/// When `uuid` was last known alive, in unix seconds: now (by the hybrid clock at wall-clock
/// `now_ms`) while it is live (see `cluster::liveness`); `None` without a heartbeat or an
/// ownership rule.
fn heard_seconds(ledger: &Ledger, now_ms: u64, uuid: &str) -> Option<u64> {
    let l = ledger.liveness()?;
    let heard = liveness::heard_ms(ledger, &Suspicions::read(ledger), &l, uuid)?;
    Some(heard.min(now_ms.max(ledger.max_version().millis())) / 1000)
}

/// The unix seconds of `uuid`'s last heartbeat (`healthcheck/<uuid>`).
fn heartbeat_seconds(ledger: &Ledger, uuid: &str) -> Option<u64> {
    let stored = ledger.get(names::HEALTHCHECK, uuid)?;
    std::str::from_utf8(stored).ok()?.trim().parse().ok()
}

fn json_string(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

/// A unix time as Go marshals a UTC `time.Time` with whole seconds: `2006-01-02T15:04:05Z`.
#[must_use]
pub fn rfc3339(unix_seconds: u64) -> String {
    let (year, month, day) = civil_from_days(unix_seconds / 86_400);
    let of_day = unix_seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the era arithmetic of
/// "chrono-compatible low-level date algorithms", restricted to days after the epoch).
#[must_use]
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days since 0000-03-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod go_client {
    //! A faithful re-implementation of edgevpn's Go client's reads (`api/client/client.go`,
    //! `api/client/service/service.go`, upstream v0.35), for tests.
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE;

    /// `Client.GetBucketKey`: the body as a JSON string, that string as a JSON string again,
    /// base64url with padding (Go's `base64.URLEncoding`, strict) gives the `Data`.
    pub fn get_bucket_key(body: &[u8]) -> Result<String, String> {
        let r: String = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
        let r: String = serde_json::from_str(&r).map_err(|e| format!("inner: {e}"))?;
        let d = URL_SAFE
            .decode(r.as_bytes())
            .map_err(|e| format!("base64: {e}"))?;
        String::from_utf8(d).map_err(|e| e.to_string())
    }

    /// `service.Client.Get`: `GetBucketKey`, then the Data unmarshalled into a string (an
    /// unmarshal error leaves it empty, as in Go).
    pub fn get(body: &[u8]) -> Result<String, String> {
        let data = get_bucket_key(body)?;
        Ok(serde_json::from_str::<String>(&data).unwrap_or_default())
    }

    /// The path segment `Client.Put` sends for a string value.
    pub fn put_segment(value: &str) -> String {
        URL_SAFE.encode(serde_json::to_string(value).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::go_client;
    use super::*;
    use crate::identity::Identity;
    use crate::ledger::{Clock, Limits};

    fn ledger(values: &[(&str, &str, &str)]) -> Ledger {
        let mut ledger = Ledger::new(Limits::for_max_message_size(1 << 20));
        let id = Identity::from_seed([3; 32]);
        let mut clock = Clock::new();
        for (bucket, key, value) in values {
            ledger
                .put(
                    &id,
                    &mut clock,
                    bucket,
                    key,
                    value.as_bytes(),
                    1_700_000_000_000,
                )
                .unwrap();
        }
        ledger
    }

    /// The body `GET /api/ledger/:bucket/:key` sends.
    fn body(ledger: &Ledger, bucket: &str, key: &str) -> Vec<u8> {
        let stored = ledger.get(bucket, key).unwrap();
        serde_json::to_vec(&data(ledger, 0, bucket, key, stored)).unwrap()
    }

    #[test]
    fn plain_values_read_through_the_go_client() {
        let l = ledger(&[
            ("kairos", "ip-master", "10.1.0.1"),
            ("kairos", "u1-role", "master/ha"),
            ("kairos", "master-kubeconfig", "YXBpVmVyc2lvbjogdjEK"),
            ("kairos", "token-nodetoken", "K10abc::server:xyz"),
        ]);
        for (key, want) in [
            ("ip-master", "10.1.0.1"),
            ("u1-role", "master/ha"),
            ("master-kubeconfig", "YXBpVmVyc2lvbjogdjEK"),
            ("token-nodetoken", "K10abc::server:xyz"),
        ] {
            assert_eq!(go_client::get(&body(&l, "kairos", key)).unwrap(), want);
        }
    }

    #[test]
    fn values_put_by_the_go_client_round_trip_as_stored() {
        let segment = go_client::put_segment("worker");
        let stored = serde_json::to_string(&segment).unwrap();
        let l = ledger(&[("kairos", "u2-role", &stored), ("b", "k", "\"hello\"")]);
        assert_eq!(data(&l, 0, "kairos", "u2-role", stored.as_bytes()), stored);
        assert_eq!(
            go_client::get(&body(&l, "kairos", "u2-role")).unwrap(),
            "worker"
        );
        // curl's PUT: shown as edgevpn shows it (not base64: the Go client cannot read it there
        // either).
        assert_eq!(data(&l, 0, "b", "k", b"\"hello\""), "\"hello\"");
    }

    #[test]
    fn announcements_carry_the_heartbeat_time() {
        let l = ledger(&[
            ("kairos", "u1-uuid", r#"{"Role":"auto","Hostname":"h1"}"#),
            ("kairos", "u2-uuid", r#"{"Role":"auto","Hostname":"h2"}"#),
            ("healthcheck", "u1", "1700000000"),
        ]);
        let d = go_client::get_bucket_key(&body(&l, "kairos", "u1-uuid")).unwrap();
        let v: Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["Time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["Hostname"], "h1");
        let d = go_client::get_bucket_key(&body(&l, "kairos", "u2-uuid")).unwrap();
        assert!(serde_json::from_str::<Value>(&d).unwrap()["Time"].is_null());
    }

    /// Heartbeats are renewed every half hour (`cluster::liveness`): a live node shows now, as
    /// edgevpn's nodes that beat every few seconds do; a node suspected and silent past the
    /// grace shows when it was last known alive.
    #[test]
    fn live_nodes_show_now_and_dead_ones_when_last_known_alive() {
        use crate::cluster::liveness::{Liveness, Suspicion, encode};
        use crate::ledger::authority::Authority;
        let t = 1_700_000_000_000;
        let mut l = Ledger::new(Limits::for_max_message_size(1 << 20));
        l.set_authority(Authority {
            network_bucket: "kairos".into(),
            quorum_floor: 1,
            liveness: Liveness::for_timeout(std::time::Duration::from_secs(60)),
        });
        let id = Identity::from_seed([3; 32]);
        let mut clock = Clock::new();
        let mut put = |l: &mut Ledger, bucket: &str, key: &str, value: &[u8], at: u64| {
            l.put(&id, &mut clock, bucket, key, value, at).unwrap();
        };
        for u in ["u1", "u2"] {
            let ann = format!(r#"{{"Role":"auto","Hostname":"h-{u}"}}"#);
            put(&mut l, "kairos", &format!("{u}-uuid"), ann.as_bytes(), t);
            put(&mut l, "healthcheck", u, b"1700000000", t);
        }
        let beat = l.entry("healthcheck", "u2").unwrap().version;
        let suspicion = Suspicion {
            uuid: "u2".into(),
            beat,
            at: t + 1_000,
        };
        put(&mut l, "suspects", "u1", &encode(&[suspicion]), t + 1_000);
        let now = t + 20 * 60_000;
        assert_eq!(
            data(&l, now, "healthcheck", "u1", b"1700000000"),
            "\"2023-11-14T22:33:20Z\""
        );
        // 1 s after the beat + 30 s of grace - the 60 s timeout.
        assert_eq!(
            data(&l, now, "healthcheck", "u2", b"1700000000"),
            "\"2023-11-14T22:12:51Z\""
        );
        let stored = l.get("kairos", "u1-uuid").unwrap();
        let d = data(&l, now, "kairos", "u1-uuid", stored);
        let d = go_client::get_bucket_key(&serde_json::to_vec(&d).unwrap()).unwrap();
        let v: Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["Time"], "2023-11-14T22:33:20Z");
    }

    #[test]
    fn node_buckets_hold_plain_json() {
        let machine = r#"{"PeerID":"12D3","Address":"10.1.0.2"}"#;
        let l = ledger(&[
            ("machines", "10.1.0.2", machine),
            ("healthcheck", "u1", "1700000000"),
            ("dhcp", "u1", "10.1.0.2"),
        ]);
        assert_eq!(
            data(&l, 0, "machines", "10.1.0.2", machine.as_bytes()),
            machine
        );
        // What edgevpn's service client's ActiveNodes parses.
        assert_eq!(
            data(&l, 0, "healthcheck", "u1", b"1700000000"),
            "\"2023-11-14T22:13:20Z\""
        );
        assert_eq!(data(&l, 0, "dhcp", "u1", b"10.1.0.2"), "\"10.1.0.2\"");
    }

    #[test]
    fn odd_values_do_not_panic() {
        let l = ledger(&[]);
        for stored in [&b""[..], b"\xff\xfe", b"\"", b"{", b"[1,2]", b"12", b"null"] {
            let d = data(&l, 0, "kairos", "k", stored);
            assert!(go_client::get_bucket_key(&serde_json::to_vec(&d).unwrap()).is_ok());
        }
    }

    #[test]
    fn rfc3339_matches_go() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_562_257), "2026-12-06T13:04:17Z");
    }
}
