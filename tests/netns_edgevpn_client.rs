//! edgevpn's Go client (what kairosctl and kairos-agent use) against real agents: a master and a
//! worker in network namespaces with the k3s stand-in and KubeVIP on, their API answers decoded
//! exactly as the Go client decodes them (re-implemented below from upstream v0.35,
//! `api/client/client.go` and `api/client/service/service.go`).

mod common;
mod standin;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use common::{Host, api_request, api_socket, client_env, lab_with_hosts, wait_for};
use serde_json::Value;
use standin::STANDIN;

/// `Client.GetBucketKey(b, k)`: `json.Unmarshal(body, &r)`, `json.Unmarshal([]byte(r), &r)`,
/// `base64.URLEncoding.DecodeString(r)` (padded, strict) is the `blockchain.Data`.
fn get_bucket_key(socket: &Path, bucket: &str, key: &str) -> Result<String, String> {
    let (status, _, body) = api_request(socket, "GET", &format!("/api/ledger/{bucket}/{key}"));
    if status != "HTTP/1.1 200 OK" {
        return Err(status);
    }
    let r: String = serde_json::from_str(&body).map_err(|e| format!("body {body}: {e}"))?;
    let r: String = serde_json::from_str(&r).map_err(|e| format!("inner {r}: {e}"))?;
    let d = URL_SAFE
        .decode(&r)
        .map_err(|e| format!("base64 {r}: {e}"))?;
    String::from_utf8(d).map_err(|e| e.to_string())
}

/// `service.Client.Get(thing, uuid)`: `GetBucketKey(serviceID, "<uuid>-<thing>")`, the Data
/// unmarshalled into a string ("" when it is not one).
fn get(socket: &Path, bucket: &str, key: &str) -> String {
    get_bucket_key(socket, bucket, key)
        .ok()
        .and_then(|d| serde_json::from_str::<String>(&d).ok())
        .unwrap_or_default()
}

/// `Client.GetBucket(b)`: `map[string]blockchain.Data`.
fn get_bucket(socket: &Path, bucket: &str) -> serde_json::Map<String, Value> {
    let (_, _, body) = api_request(socket, "GET", &format!("/api/ledger/{bucket}"));
    match serde_json::from_str(&body) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// `Client.Put(b, k, v)` for a string: the URL as Go's `net/http` sends it (`=` unescaped).
fn put(socket: &Path, bucket: &str, key: &str, value: &str) -> Value {
    let segment = URL_SAFE.encode(serde_json::to_string(value).unwrap());
    let target = format!("/api/ledger/{bucket}/{key}/{segment}");
    let (status, _, body) = api_request(socket, "PUT", &target);
    assert_eq!(status, "HTTP/1.1 200 OK", "{target}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn summary(h: &Host) -> Value {
    let (_, _, body) = api_request(&api_socket(h), "GET", "/api/summary");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// Go's `time.Parse(time.RFC3339, s)` for the UTC form the API writes; unix seconds.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<u64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (*d.first()?, *d.get(1)?, *d.get(2)?);
    // Days from civil (the inverse of the API's conversion).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + t.first()? * 3600 + t.get(1)? * 60 + t.get(2)?)
}

#[test]
fn kairos_tools_read_what_the_agents_write_and_their_writes_round_trip() {
    let eip = "10.79.0.200";
    let extra =
        format!("  vpn:\n    env:\n      APILISTEN: \"127.0.0.1:18080\"\nkubevip:\n  eip: {eip}\n");
    let (mut lab, config, hosts) = lab_with_hosts("evclient", "10.79.0", 2, &extra);
    let uuids = ["netns-evclient-node-1", "netns-evclient-node-2"];
    for (h, uuid) in hosts.iter().zip(uuids) {
        let root = h.dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        lab.spawn_with_env(
            h,
            &["agent", "--config", &config],
            &[
                ("UUID", uuid),
                ("KAIROS_P2P_ROOT", root.to_str().unwrap()),
                ("KAIROS_P2P_K3S", STANDIN),
            ],
        );
    }
    let sockets: Vec<_> = hosts.iter().map(api_socket).collect();
    let published = wait_for(Duration::from_secs(90), || {
        sockets.iter().all(|s| {
            s.exists()
                && !get(s, "kairos", "master-kubeconfig").is_empty()
                && uuids
                    .iter()
                    .all(|u| !get(s, "kairos", &format!("{u}-ip")).is_empty())
        })
    });
    let result = std::panic::catch_unwind(|| {
        assert!(published.is_some(), "join data published and gossiped");
        let m = hosts
            .iter()
            .position(|h| summary(h)["Role"] == "master")
            .expect("a master");
        let master_root = hosts[m].dir.join("root");
        for s in &sockets {
            // get-kubeconfig (kairosctl): Get("kubeconfig", "master"), RawURLEncoding, and
            // Get("master", "ip") in place of 127.0.0.1.
            let encoded = get(s, "kairos", "master-kubeconfig");
            let yaml = URL_SAFE_NO_PAD.decode(&encoded).expect("kubeconfig base64");
            assert_eq!(
                String::from_utf8(yaml).unwrap(),
                standin::kubeconfig(&master_root).unwrap()
            );
            assert_eq!(get(s, "kairos", "ip-master"), eip, "ip-master is the EIP");
            assert_eq!(
                get(s, "kairos", "token-nodetoken"),
                standin::node_token(&master_root).unwrap().trim()
            );
            // role list (kairosctl): ListItems(uuid) over the bucket's keys, Get("role", u),
            // Get("ip", u).
            let keys = get_bucket(s, "kairos");
            for (h, uuid) in hosts.iter().zip(uuids) {
                assert!(keys.contains_key(&format!("{uuid}-uuid")), "{keys:?}");
                let sum = summary(h);
                assert_eq!(get(s, "kairos", &format!("{uuid}-role")), sum["Role"]);
                assert_eq!(get(s, "kairos", &format!("{uuid}-ip")), sum["Address"]);
                // AdvertizingNodes: the announcement's Time, within 15 minutes.
                let ad = get_bucket_key(s, "kairos", &format!("{uuid}-uuid")).unwrap();
                let ad: Value = serde_json::from_str(&ad).unwrap();
                let time = parse_rfc3339(ad["Time"].as_str().unwrap_or_default());
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                assert!(time.is_some_and(|t| t + 900 > now), "{ad}");
            }
            // ActiveNodes: healthcheck values are RFC 3339 strings.
            let health = get_bucket(s, "healthcheck");
            for uuid in uuids {
                let beat = health[uuid].as_str().unwrap();
                let beat: String = serde_json::from_str(beat).unwrap();
                assert!(parse_rfc3339(&beat).is_some(), "{beat}");
            }
        }

        // The Go client's own writes round-trip, on the node written and the other one.
        let answer = put(&sockets[0], "kairos", "future-node-role", "master/ha");
        assert_eq!(answer["State"], "Announcing");
        let roundtrip = wait_for(Duration::from_secs(5), || {
            sockets
                .iter()
                .all(|s| get(s, "kairos", "future-node-role") == "master/ha")
        });
        assert!(roundtrip.is_some(), "Put then Get");

        // Our role set stores what kairosctl's would (the same Data).
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts[1].ns,
                env!("CARGO_BIN_EXE_kairos-p2p"),
            ])
            .args(["role", "set", "later-node", "worker", "--api"])
            .arg("http://127.0.0.1:18080")
            .envs(client_env(&hosts[1])) // root's client finds the API bearer token there
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        put(&sockets[0], "kairos", "later-node-kairosctl-role", "worker");
        // The role set went through the leader, the PUT is a request the leader applies (this
        // node does not lead): wait until both arrived here (a missing key reads as an empty
        // value too), then compare.
        let same = wait_for(Duration::from_secs(5), || {
            let (_, _, ours) =
                api_request(&sockets[0], "GET", "/api/ledger/kairos/later-node-role");
            let (_, _, theirs) = api_request(
                &sockets[0],
                "GET",
                "/api/ledger/kairos/later-node-kairosctl-role",
            );
            get(&sockets[0], "kairos", "later-node-role") == "worker" && ours == theirs
        });
        assert!(same.is_some(), "role set stores kairosctl's Data");
        assert_eq!(get(&sockets[0], "kairos", "later-node-role"), "worker");
    });
    if let Err(e) = result {
        for h in &hosts {
            let log = std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "=== {}\n{}",
                h.ns,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::panic::resume_unwind(e);
    }
    drop(lab);
}
