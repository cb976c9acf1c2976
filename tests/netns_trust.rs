//! The API by trust level, on real agents and bridges in network namespaces (root, util-linux's
//! `setpriv`): the unprivileged user `nobody` inspects but reads no secret and changes nothing;
//! root does everything through the unix sockets or with the bearer token; `nobody`'s slow
//! connections do not lock root out; a bridge's token never shows on its command line.
//!
//! Requests as `nobody` are made by this test binary itself, run again as a child through
//! `ip netns exec NS setpriv --reuid=65534 ...` with the ignored test `client_helper` (the
//! environment says what to do): the same code as root's requests, only the uid differs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    Host, api_exchange, api_request, api_socket, client_env, kairos_socket, lab_with_hosts,
    wait_for,
};

/// The helper's environment: what to do.
const HELPER_MODE: &str = "KP_TRUST_HELPER";
/// `tcp:ADDR` or `unix:PATH`.
const HELPER_TARGET: &str = "KP_TRUST_TARGET";
/// The raw request (mode `request`).
const HELPER_RAW: &str = "KP_TRUST_RAW";
/// `TARGET=COUNT;TARGET=COUNT` (mode `slow`).
const HELPER_SLOW: &str = "KP_TRUST_SLOW";
const NOBODY: u32 = 65534;

const K3S_YAML: &str = "apiVersion: v1\nclusters:\n- cluster:\n    server: https://127.0.0.1:6443\n  name: default\nkind: Config\n";
const NODE_TOKEN: &str = "K10secretjointoken::server:abcdef";

/// A raw request with `Connection: close`.
fn raw(method: &str, target: &str, extra_headers: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\n{extra_headers}Connection: close\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// This test binary run as the helper in `host`'s namespace, as `uid` (0: root).
fn helper(host: &Host, uid: u32, env: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.ns]);
    if uid != 0 {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    cmd.arg(exe)
        .args(["--exact", "client_helper", "--ignored", "--nocapture"])
        .args(["--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    cmd
}

/// One request from `host`'s namespace as `uid` to `target` (`tcp:ADDR` or `unix:PATH`): the
/// raw response, or `Err` with the connection error.
fn request_as(host: &Host, uid: u32, target: &str, request: &str) -> Result<String, String> {
    let out = helper(
        host,
        uid,
        &[
            (HELPER_MODE, "request".to_string()),
            (HELPER_TARGET, target.to_string()),
            (HELPER_RAW, request.to_string()),
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(e) = between(&stdout, "<<<ERROR ", ">>>") {
        return Err(e.to_string());
    }
    between(&stdout, "<<<RESPONSE\n", "\nRESPONSE>>>")
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "helper failed: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// `kairos-p2p <args>` in `host`'s namespace as `uid`, with the host's state and root.
fn kairos_p2p_as(host: &Host, uid: u32, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.ns]);
    if uid != 0 {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_kairos-p2p"))
        .args(args)
        .envs(client_env(host))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Not a test: what the other tests run as `nobody` (or root) through `helper`.
#[test]
#[ignore = "run by the other tests of this file, as another user"]
fn client_helper() {
    let Ok(mode) = std::env::var(HELPER_MODE) else {
        return;
    };
    match mode.as_str() {
        "request" => {
            let target = std::env::var(HELPER_TARGET).unwrap();
            let raw = std::env::var(HELPER_RAW).unwrap();
            match exchange(&target, raw.as_bytes()) {
                Ok(response) => println!("<<<RESPONSE\n{response}\nRESPONSE>>>"),
                Err(e) => println!("<<<ERROR {e}>>>"),
            }
        }
        "slow" => {
            raise_fd_limit();
            let mut held: Vec<Box<dyn Write>> = Vec::new();
            let mut failed = 0;
            for spec in std::env::var(HELPER_SLOW).unwrap().split(';') {
                let (target, count) = spec.rsplit_once('=').unwrap();
                for _ in 0..count.parse::<usize>().unwrap() {
                    // Half a request line, then nothing: a slow client.
                    match connect(target) {
                        Ok(mut stream) => {
                            let _ = stream.write_all(b"GET /api/summary HTTP/1.1\r\n");
                            held.push(stream);
                        }
                        Err(_) => failed += 1,
                    }
                }
            }
            println!("<<<READY {} {failed}>>>", held.len());
            std::io::stdout().flush().unwrap();
            // Hold them until the parent closes our standard input.
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(held);
        }
        other => panic!("unknown helper mode {other}"),
    }
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to fill, then to pass back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max.min(8192);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn connect(target: &str) -> std::io::Result<Box<dyn Write>> {
    Ok(match target.split_once(':') {
        Some(("tcp", addr)) => Box::new(TcpStream::connect(addr)?),
        Some(("unix", path)) => Box::new(UnixStream::connect(path)?),
        _ => panic!("bad target {target}"),
    })
}

fn exchange(target: &str, raw: &[u8]) -> std::io::Result<String> {
    let timeout = Some(Duration::from_secs(5));
    let mut out = Vec::new();
    match target.split_once(':') {
        Some(("tcp", addr)) => {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(timeout)?;
            s.write_all(raw)?;
            s.read_to_end(&mut out)?;
        }
        Some(("unix", path)) => {
            let mut s = UnixStream::connect(path)?;
            s.set_read_timeout(timeout)?;
            s.write_all(raw)?;
            s.read_to_end(&mut out)?;
        }
        _ => panic!("bad target {target}"),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Opens `socket` (and its 0700 state directory) to every user, as a careless admin might.
fn loosen(socket: &Path) {
    let dir = socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
}

/// Starts one agent and waits for its sockets and bearer token.
fn one_agent(test: &str, subnet: &str) -> (common::Lab, Host, PathBuf, PathBuf, String) {
    // minimum_nodes 1: the lone agent commits itself master at once, so that root may write
    // the master's keys through it (the ledger takes them only from the committed master).
    let (mut lab, config, hosts) = lab_with_hosts(test, subnet, 1, "  minimum_nodes: 1\n");
    let host = hosts[0].clone();
    lab.spawn_with_env(
        &host,
        &["agent", "--config", &config],
        &[("UUID", "netns-trust-node-1")],
    );
    let (state_socket, kairos) = (api_socket(&host), kairos_socket(&host));
    let token_file = host.dir.join("state/api.token");
    assert!(
        wait_for(Duration::from_secs(10), || {
            state_socket.exists() && kairos.exists() && token_file.exists()
        })
        .is_some(),
        "sockets {} {} and token {}",
        state_socket.display(),
        kairos.display(),
        token_file.display()
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    (lab, host, state_socket, kairos, token)
}

#[test]
fn nobody_inspects_and_root_controls_the_api() {
    let (mut lab, host, state_socket, kairos, token) = one_agent("trust", "10.79.0");
    for path in [&state_socket, &kairos, &host.dir.join("state/api.token")] {
        assert_eq!(mode_of(path), 0o600, "{}", path.display());
    }
    let committed = wait_for(Duration::from_secs(20), || {
        let (_, _, body) = api_request(&state_socket, "GET", "/api/ledger/kairos/master-commit");
        body.len() > 4
    });
    assert!(
        committed.is_some(),
        "the lone agent committed itself master"
    );
    // Root (this process) through the state socket: the master's secrets, as Kairos stores them.
    let kubeconfig = common_b64(K3S_YAML);
    for (key, value) in [
        ("master-kubeconfig", kubeconfig.as_str()),
        ("token-nodetoken", NODE_TOKEN),
        ("ip-master", "10.1.0.1"),
    ] {
        let (status, _, body) = api_request(
            &state_socket,
            "PUT",
            &format!("/api/ledger/kairos/{key}/{value}"),
        );
        assert_eq!(status, "HTTP/1.1 200 OK", "{key}: {body}");
    }
    let tcp = "tcp:127.0.0.1:8080";
    let nobody = |request: &str| request_as(&host, NOBODY, tcp, request).expect("TCP answers");

    // nobody: no secret, single or in a collection.
    for key in ["master-kubeconfig", "token-nodetoken"] {
        let response = nobody(&raw("GET", &format!("/api/ledger/kairos/{key}"), ""));
        assert_eq!(status_of(&response), 403, "{key}: {response}");
        assert!(body_of(&response).contains("secret"), "{response}");
    }
    for target in ["/api/ledger", "/api/ledger/kairos", "/api/blockchain"] {
        let response = nobody(&raw("GET", target, ""));
        assert_eq!(status_of(&response), 200, "{target}: {response}");
        let body = body_of(&response);
        assert!(body.contains("ip-master"), "{target}: {body}");
        for secret in [
            kubeconfig.as_str(),
            "K10secretjointoken",
            "master-kubeconfig",
        ] {
            assert!(!body.contains(secret), "{target} shows {secret}: {body}");
        }
    }
    // nobody: inspection works.
    for target in [
        "/",
        "/metrics",
        "/api/summary",
        "/api/machines",
        "/api/nodes",
    ] {
        let response = nobody(&raw("GET", target, ""));
        assert_eq!(status_of(&response), 200, "{target}: {response}");
    }
    // nobody: no write, no delete, no forged token.
    for (method, target) in [
        ("PUT", "/api/ledger/kairos/ip-master/10.66.66.66"),
        ("PUT", "/api/ledger/test/hello/world"),
        ("DELETE", "/api/ledger/kairos"),
        ("DELETE", "/api/ledger/kairos/ip-master"),
    ] {
        let response = nobody(&raw(method, target, ""));
        assert_eq!(status_of(&response), 403, "{method} {target}: {response}");
        assert!(body_of(&response).contains("needs root"), "{response}");
    }
    let forged = nobody(&raw(
        "DELETE",
        "/api/ledger/kairos",
        &format!("Authorization: Bearer {}\r\n", "0".repeat(64)),
    ));
    assert_eq!(status_of(&forged), 401, "{forged}");
    // nobody: the unix sockets and the token file are closed to it.
    for socket in [&state_socket, &kairos] {
        let refused = request_as(
            &host,
            NOBODY,
            &format!("unix:{}", socket.display()),
            &raw("GET", "/api/summary", ""),
        );
        let e = refused.expect_err("nobody cannot connect to a 0600 root socket");
        assert!(e.to_lowercase().contains("permission denied"), "{e}");
    }
    // nobody's own clients: get-kubeconfig falls back to TCP and is told why it gets nothing;
    // role set is refused.
    let out = kairos_p2p_as(&host, NOBODY, &["get-kubeconfig"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("secret") && err.contains("403"), "{err}");
    assert!(out.stdout.is_empty(), "no kubeconfig printed");
    let out = kairos_p2p_as(&host, NOBODY, &["role", "set", "n9", "worker"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
    // Nothing nobody tried took effect.
    let value = common::api_get_json(&state_socket, "/api/ledger/kairos/ip-master");
    assert_eq!(value, serde_json::json!("\"10.1.0.1\""));
    assert_eq!(
        common::api_get_json(&state_socket, "/api/ledger/test/hello"),
        serde_json::json!("")
    );

    // Root: secrets through both unix sockets, and over TCP with the bearer token.
    for socket in [&state_socket, &kairos] {
        let (status, _, body) = api_request(socket, "GET", "/api/ledger/kairos/master-kubeconfig");
        assert_eq!(status, "HTTP/1.1 200 OK", "{}", socket.display());
        assert!(body.contains(&kubeconfig), "{body}");
    }
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let with_token = request_as(
        &host,
        0,
        tcp,
        &raw("GET", "/api/ledger/kairos/token-nodetoken", &bearer),
    )
    .unwrap();
    assert_eq!(status_of(&with_token), 200, "{with_token}");
    assert!(body_of(&with_token).contains("K10secretjointoken"));
    let put = request_as(
        &host,
        0,
        tcp,
        &raw("PUT", "/api/ledger/test/hello/world", &bearer),
    )
    .unwrap();
    assert_eq!(status_of(&put), 200, "{put}");
    // Root cannot delete the cluster's bucket or a reserved key either (clear errors).
    for target in ["/api/ledger/kairos", "/api/ledger/kairos/ip-master"] {
        let (status, _, body) = api_request(&state_socket, "DELETE", target);
        assert_eq!(status, "HTTP/1.1 403 Forbidden", "{target}: {body}");
        assert!(
            body.contains("reserved") || body.contains("cluster"),
            "{body}"
        );
    }
    let (status, _, _) = api_request(&state_socket, "DELETE", "/api/ledger/test");
    assert_eq!(status, "HTTP/1.1 200 OK", "a free bucket can be deleted");

    // Root's clients: Kairos' socket by default, the bearer token on TCP, EDGEVPN_API.
    let expected = K3S_YAML.replace("https://127.0.0.1:6443", "https://10.1.0.1:6443");
    let state_api = format!("unix://{}", state_socket.display());
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], bool);
    let cases: [Case; 5] = [
        (&["get-kubeconfig"], &[], true),
        (
            &["get-kubeconfig", "--api", "http://127.0.0.1:8080"],
            &[],
            true,
        ),
        (&["get-kubeconfig"], &[("EDGEVPN_API", &state_api)], true),
        (
            &["get-kubeconfig"],
            &[("EDGEVPN_NETWORK_ID", "nothing")],
            false,
        ),
        (
            &["get-kubeconfig", "--network-id", "kairos"],
            &[("EDGEVPN_NETWORK_ID", "nothing")],
            true,
        ),
    ];
    for (args, env, found) in cases {
        let out = kairos_p2p_as(&host, 0, args, env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if found {
            assert!(out.status.success(), "{args:?} {env:?}: {stderr}");
            assert_eq!(stdout, expected, "{args:?}");
        } else {
            assert!(
                stderr.contains("no kubeconfig"),
                "{args:?} {env:?}: {stderr}"
            );
        }
    }

    // SO_PEERCRED: a socket whose mode was loosened still gives nobody inspection only.
    loosen(&state_socket);
    let unix = format!("unix:{}", state_socket.display());
    let summary = request_as(&host, NOBODY, &unix, &raw("GET", "/api/summary", "")).unwrap();
    assert_eq!(status_of(&summary), 200, "{summary}");
    for request in [
        raw("GET", "/api/ledger/kairos/master-kubeconfig", ""),
        raw("PUT", "/api/ledger/kairos/ip-master/10.66.66.66", ""),
    ] {
        let response = request_as(&host, NOBODY, &unix, &request).unwrap();
        assert_eq!(status_of(&response), 403, "{request}: {response}");
    }

    assert!(lab.stop(0).success(), "clean stop");
    assert!(!kairos.exists(), "Kairos' socket removed on exit");
    assert!(!state_socket.exists(), "state socket removed on exit");
}

#[test]
fn slow_connections_from_nobody_do_not_lock_root_out() {
    let (mut lab, host, state_socket, kairos, token) = one_agent("lockout", "10.79.1");
    // The state socket loosened so that nobody can reach it too: its unprivileged budget fills,
    // not root's.
    loosen(&state_socket);
    let slow = format!(
        "tcp:127.0.0.1:8080=1000;unix:{}=200",
        state_socket.display()
    );
    let mut attack: Child = helper(
        &host,
        NOBODY,
        &[(HELPER_MODE, "slow".to_string()), (HELPER_SLOW, slow)],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(attack.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| between(&l, "<<<READY ", ">>>").map(str::to_string))
        .expect("the slow clients are connected");
    let counts: Vec<usize> = ready.split(' ').map(|n| n.parse().unwrap()).collect();
    let held = counts[0];
    assert_eq!(
        counts,
        [1200, 0],
        "nobody holds 1000 TCP and 200 unix connections"
    );

    // Root is answered on both sockets, and over TCP with the bearer token, every time: the
    // slow connections hold no slot against clients that talk.
    let started = Instant::now();
    let mut answered = 0;
    for i in 0..26 {
        let socket = if i % 2 == 0 { &kairos } else { &state_socket };
        let response = api_exchange(socket, raw("GET", "/api/summary", "").as_bytes());
        if status_of(&response) == 200 {
            answered += 1;
        }
    }
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let secret = raw("GET", "/api/ledger/kairos/token-nodetoken", &bearer);
    let over_tcp = request_as(&host, 0, "tcp:127.0.0.1:8080", &secret).unwrap_or_default();
    assert_eq!(status_of(&over_tcp), 200, "root over TCP: {over_tcp}");
    let took = started.elapsed();
    assert!(
        attack.try_wait().unwrap().is_none(),
        "the attack still held its connections"
    );
    assert_eq!(answered, 26, "root's requests answered during the attack");
    eprintln!("26 root requests answered in {took:?} while nobody held {held} connections");
    drop(attack.stdin.take());
    let _ = attack.wait();
    assert!(lab.stop(0).success(), "clean stop");
}

#[test]
fn a_bridge_scrubs_its_token_from_its_command_line() {
    let (mut lab, config, hosts) = lab_with_hosts("trustbr", "10.79.2", 3, "");
    let token = std::fs::read_to_string(&config).unwrap();
    let token = between(&token, "network_token: \"", "\"")
        .unwrap()
        .to_string();
    lab.spawn_with_env(
        &hosts[0],
        &["agent", "--config", &config],
        &[("UUID", "netns-trust-agent")],
    );
    // --token on the command line (kairos' current flag): scrubbed once the bridge starts.
    let on_argv = lab.spawn(&hosts[1], &["bridge", "--token", &token, "--mtu", "1300"]);
    // --token-file, --dhcp and a lease directory: nothing secret on the command line at all.
    let token_file = hosts[2].dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let lease_dir = hosts[2].dir.join("lease");
    let from_file = lab.spawn(
        &hosts[2],
        &[
            "bridge",
            "--token-file",
            token_file.to_str().unwrap(),
            "--dhcp",
            "--lease-dir",
            lease_dir.to_str().unwrap(),
            "--log-level",
            "debug",
        ],
    );
    let joined = |h: &Host| common::log_lines(h, "bridge: joining the network").len() == 1;
    assert!(
        wait_for(Duration::from_secs(10), || joined(&hosts[1])
            && joined(&hosts[2]))
        .is_some(),
        "both bridges started"
    );
    for index in [on_argv, from_file] {
        let pid = lab.pid(index);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("bridge"), "{cmdline}");
        assert!(!cmdline.contains(&token), "token visible: {cmdline}");
        let ps = Command::new("ps")
            .args(["-ww", "-o", "args=", "-p", &pid.to_string()])
            .output()
            .unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        assert!(ps.contains("bridge") && !ps.contains(&token), "ps: {ps}");
    }
    let pid = lab.pid(on_argv);
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("--token\0***"), "{cmdline:?}");
    assert!(
        !common::log_lines(&hosts[1], "given on the command line").is_empty(),
        "the bridge warns about a token on argv"
    );

    // The bridge's API has the same trust levels as an agent's.
    let bridge = &hosts[1];
    let secret = raw("GET", "/api/ledger/kairos/master-kubeconfig", "");
    let tcp = "tcp:127.0.0.1:8080";
    let refused = request_as(bridge, NOBODY, tcp, &secret).unwrap();
    assert_eq!(status_of(&refused), 403, "{refused}");
    let put = raw("PUT", "/api/ledger/kairos/ip-master/10.66.66.66", "");
    let refused = request_as(bridge, NOBODY, tcp, &put).unwrap();
    assert_eq!(status_of(&refused), 403, "{refused}");
    let summary = request_as(bridge, NOBODY, tcp, &raw("GET", "/api/summary", "")).unwrap();
    assert_eq!(status_of(&summary), 200, "{summary}");
    let bridge_socket = kairos_socket(bridge);
    assert_eq!(mode_of(&bridge_socket), 0o600);
    assert_eq!(mode_of(&bridge.dir.join("state/bridge/api.token")), 0o600);
    let (status, _, _) = api_request(
        &bridge_socket,
        "GET",
        "/api/ledger/kairos/master-kubeconfig",
    );
    assert_eq!(
        status, "HTTP/1.1 200 OK",
        "root through the bridge's socket"
    );

    // --mtu sets the VPN interface's MTU; --dhcp takes an allocated address (not .254);
    // --lease-dir holds the key and ledger (the lease), so the address comes back.
    let mtu = Command::new("ip")
        .args(["-n", &hosts[1].ns, "-o", "link", "show", "dev", "kairos0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&mtu.stdout).contains("mtu 1300"),
        "{}",
        String::from_utf8_lossy(&mtu.stdout)
    );
    let allocated = wait_for(Duration::from_secs(30), || {
        common::vpn_addr(&hosts[2], "kairos0").is_some_and(|a| a != "10.1.0.254")
    });
    assert!(
        allocated.is_some(),
        "the --dhcp bridge got an address: {:?}",
        common::vpn_addr(&hosts[2], "kairos0")
    );
    let address = common::vpn_addr(&hosts[2], "kairos0").unwrap();
    assert!(address.starts_with("10.1.0."), "{address}");
    assert!(
        lease_dir.join("identity.key").exists(),
        "the key kept in --lease-dir"
    );
    assert!(lab.stop(from_file).success(), "clean stop");
    let again = lab.spawn(
        &hosts[2],
        &[
            "bridge",
            "--token-file",
            token_file.to_str().unwrap(),
            "--dhcp",
            "--lease-dir",
            lease_dir.to_str().unwrap(),
        ],
    );
    let same = wait_for(Duration::from_secs(30), || {
        common::vpn_addr(&hosts[2], "kairos0").as_deref() == Some(address.as_str())
    });
    assert!(
        same.is_some(),
        "the lease came back: {:?} then {:?}",
        address,
        common::vpn_addr(&hosts[2], "kairos0")
    );
    assert!(lab.stop(again).success(), "clean stop");
}

/// Base64url without padding, as Kairos stores the kubeconfig.
fn common_b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[test]
fn a_bridge_reads_its_token_from_standard_input() {
    let token = common::generate_token();
    let bridge = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kairos-p2p"))
            .arg("bridge")
            .args(args)
            .env_remove("NETWORK_TOKEN")
            .env_remove("EDGEVPNTOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A valid token read from the pipe (implicitly, then with `--token-file -`) gets past the
    // token checks to the next refusal (a bad --mtu, so that no interface is made here).
    for args in [
        &["--mtu", "100"][..],
        &["--token-file", "-", "--mtu", "100"][..],
    ] {
        let (code, err) = bridge(args, &format!("{token}\n"));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("--mtu 100"), "{args:?}: {err}");
        assert!(!err.contains(&token), "{err}");
    }
    let (code, err) = bridge(&[], "not a token\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("not valid"), "{err}");
    let (code, err) = bridge(&[], "");
    assert_eq!(code, Some(2));
    assert!(err.contains("no network token"), "{err}");
}
