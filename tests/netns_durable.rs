//! Durable acknowledgements (issue 14, item 5): an agent answers a ledger write only once it is
//! on disk, so a write answered 200 survives a `kill -9` right after the answer, even on an agent
//! alone (no peer could give it back).

mod common;

use std::time::{Duration, Instant};

use common::{api_request, api_socket, is_root, lab_with_hosts, unix_get, wait_for};

#[test]
fn an_answered_write_survives_kill_9_right_after_the_answer() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let (mut lab, config, hosts) = lab_with_hosts("durable", "10.79.7", 1, "");
    let host = &hosts[0];
    let args = ["agent", "--config", config.as_str()];
    let env = [("UUID", "netns-durable-node-1")];
    let mut agent = lab.spawn_with_env(host, &args, &env);
    let socket = api_socket(host);
    let snapshot = host.dir.join("state").join("ledger.snapshot");
    for round in 0..3 {
        assert!(
            wait_for(Duration::from_secs(20), || socket.exists()
                && unix_get(&socket, "/api/summary").contains("NodeID"))
            .is_some(),
            "round {round}: the API answers"
        );
        let key = format!("durable-{round}");
        let value = format!("acknowledged-{round}");
        let asked = Instant::now();
        let (status, _, body) =
            api_request(&socket, "PUT", &format!("/api/ledger/faults/{key}/{value}"));
        let answered = asked.elapsed();
        assert_eq!(status, "HTTP/1.1 200 OK", "round {round}: {body}");
        // No clean shutdown: whatever was not on disk at the answer is gone.
        lab.kill(agent);
        eprintln!("round {round}: write answered in {answered:?}, then kill -9");
        agent = lab.spawn_with_env(host, &args, &env);
        assert!(
            wait_for(Duration::from_secs(20), || {
                unix_get(&socket, &format!("/api/ledger/faults/{key}")).contains(&value)
            })
            .is_some(),
            "round {round}: the answered write is back after kill -9"
        );
        // Every earlier write too.
        for earlier in 0..round {
            let body = unix_get(&socket, &format!("/api/ledger/faults/durable-{earlier}"));
            assert!(body.contains(&format!("acknowledged-{earlier}")), "{body}");
        }
    }
    assert!(snapshot.is_file(), "a snapshot was written");
}
