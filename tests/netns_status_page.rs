//! The status page (`GET /`) in headless Chromium: three real agents in network namespaces made
//! by the test, the API on loopback TCP (`APILISTEN`) inside the first one, and Chromium run in
//! that namespace. Chromium's `--dump-dom` gives the DOM after the page's scripts fetched the API;
//! its `--screenshot` is saved as `<target dir>/status-page.png` (and `status-page-narrow.png`).
//!
//! Needs root, iproute2 and Chromium (`tests/setup-host.sh`, run by `make deps`, installs the
//! Debian packages); the test fails when Chromium is missing.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Host, Lab, TempDir, generate_token, peer_id_of, sh, wait_for, write_config};
use serde_json::Value;

const CHROMIUM: &str = "chromium";
/// The API address configured through `p2p.vpn.env.APILISTEN` (loopback of the namespace).
const API_LISTEN: &str = "127.0.0.1:18080";
/// Longest a Chromium run may take before it is killed.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(90);

/// `GET target` over the agent's unix socket (reachable from outside its namespace).
fn get(host: &Host, target: &str) -> String {
    let path = host.dir.join("state").join("api.sock");
    let mut stream = UnixStream::connect(&path).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let raw = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("response");
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200 "), "{target}: {head}");
    body.to_string()
}

fn get_json(host: &Host, target: &str) -> Value {
    let body = get(host, target);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// What the page should show, read from the API of the node it is served by.
struct Expected {
    me: String,
    address: String,
    role: String,
    uuid: String,
    /// `(peer id, VPN address, role)` of the other nodes.
    peers: Vec<(String, String, String)>,
}

/// The API of `host` once every node is online with an address and a role, and connected.
fn ready(host: &Host, me: &str, count: usize) -> Option<Expected> {
    let summary = get_json(host, "/api/summary");
    let machines = get_json(host, "/api/machines");
    let nodes = get_json(host, "/api/nodes");
    let machines = machines.as_array()?;
    let nodes = nodes.as_array()?;
    if text(&summary["Address"]).is_empty()
        || text(&summary["Role"]).is_empty()
        || machines.len() != count
        || nodes.len() != count
    {
        return None;
    }
    let mut peers = Vec::new();
    for m in machines {
        let id = text(&m["PeerID"]);
        if m["Online"] != true || text(&m["Address"]).is_empty() || text(&m["Role"]).is_empty() {
            return None;
        }
        if id != me {
            let node = nodes.iter().find(|n| text(&n["ID"]) == id)?;
            if node["Connected"] != true {
                return None;
            }
            peers.push((
                id.to_string(),
                text(&m["Address"]).to_string(),
                text(&m["Role"]).to_string(),
            ));
        }
    }
    Some(Expected {
        me: me.to_string(),
        address: text(&summary["Address"]).to_string(),
        role: text(&summary["Role"]).to_string(),
        uuid: text(&summary["UUID"]).to_string(),
        peers,
    })
}

/// Fails clearly when Chromium is not installed (CI runs `tests/setup-host.sh` first).
fn require_chromium() {
    let found = Command::new(CHROMIUM)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs Chromium ({CHROMIUM} on PATH): run `bash tests/setup-host.sh` \
         (`make deps`), which installs the Debian packages chromium and chromium-driver"
    );
}

/// Runs headless Chromium in namespace `ns` with `args` and a fresh profile; returns its stdout.
/// Chromium leads its own process group, which is killed (by id) when it overruns or exits.
fn chromium(ns: &str, name: &str, args: &[&str]) -> String {
    let profile = TempDir::new(&format!("chromium-{name}"));
    let out_path = profile.0.join("stdout");
    let err_path = profile.0.join("stderr");
    let user_data = profile.0.join("profile");
    let user_data_arg = format!("--user-data-dir={}", user_data.display());
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, CHROMIUM])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            &user_data_arg,
        ])
        .args(args)
        .env("HOME", &profile.0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let group = format!("-{}", child.id());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > CHROMIUM_LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Chromium's helpers (zygote, renderer) are in its group: none may outlive the run.
    let _ = sh(&["kill", "-KILL", "--", &group]);
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("chromium ({name}) still running after {CHROMIUM_LIMIT:?}, killed: {stderr}")
    });
    assert!(status.success(), "chromium ({name}): {status}: {stderr}");
    eprintln!("chromium ({name}): {:.1?}", start.elapsed());
    std::fs::read_to_string(&out_path).unwrap()
}

/// The `<tr>` of peer `id` in the dumped DOM.
fn peer_row<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("data-peer=\"{id}\""))
        .unwrap_or_else(|| panic!("no row for peer {id}: {dom}"));
    let start = dom[..at].rfind("<tr").unwrap();
    let end = at + dom[at..].find("</tr>").unwrap();
    &dom[start..end]
}

/// The first text inside the first element with attribute `attr` (e.g. `id="status"`) in `dom`,
/// looking through nested opening tags.
fn text_of<'a>(dom: &'a str, attr: &str) -> &'a str {
    let at = dom
        .find(attr)
        .unwrap_or_else(|| panic!("no element with {attr}: {dom}"));
    let mut start = at + dom[at..].find('>').unwrap() + 1;
    while dom[start..].starts_with('<') && !dom[start..].starts_with("</") {
        start += dom[start..].find('>').unwrap() + 1;
    }
    let end = start + dom[start..].find('<').unwrap();
    &dom[start..end]
}

/// The text of the element with id `id`.
fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    text_of(dom, &format!("id=\"{id}\""))
}

/// The text of the cell classed `class` in a row.
fn cell_text<'a>(row: &'a str, class: &str) -> &'a str {
    text_of(row, &format!("class=\"{class}\""))
}

/// Where the screenshots go: the cargo target directory (`target/` or `$CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_kairos-p2p"));
    bin.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Asserts `path` is a PNG of `width` x `height` with some content, and returns its size.
fn check_png(path: &Path, width: u32, height: u32) -> usize {
    let png = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "{} is not a PNG",
        path.display()
    );
    let dimension = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!(
        (dimension(16), dimension(20)),
        (width, height),
        "{}",
        path.display()
    );
    // A blank page compresses to a few hundred bytes; text and a table are far more.
    assert!(
        png.len() > 10_000,
        "{}: {} bytes",
        path.display(),
        png.len()
    );
    png.len()
}

#[test]
fn status_page_in_headless_chromium_shows_the_node_and_its_peers() {
    require_chromium();
    let mut lab = Lab::new("page");
    let token = generate_token();
    let config = write_config(
        &lab.dir,
        "config.yaml",
        &format!(
            "#cloud-config\np2p:\n  network_token: \"{token}\"\n  disable_dht: true\n  \
             vpn:\n    env:\n      APILISTEN: \"{API_LISTEN}\"\n"
        ),
    );
    let config = config.to_str().unwrap().to_string();
    let hosts: Vec<Host> = (1..=3)
        .map(|i| lab.add_host(i, &format!("10.79.0.{i}/24")))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let uuid = format!("status-page-node-{}", i + 1);
        lab.spawn_with_env(h, &["agent", "--config", &config], &[("UUID", &uuid)]);
    }
    let host = &hosts[0];
    let me = peer_id_of(host);
    assert!(
        wait_for(Duration::from_secs(10), || host
            .dir
            .join("state/api.sock")
            .exists())
        .is_some(),
        "API socket created"
    );
    let mut expected = None;
    let took = wait_for(Duration::from_secs(60), || {
        expected = ready(host, &me, hosts.len());
        expected.is_some()
    });
    let expected = expected.unwrap_or_else(|| {
        panic!(
            "3 nodes online with addresses and roles: {} {}",
            get_json(host, "/api/machines"),
            get_json(host, "/api/nodes")
        )
    });
    eprintln!("cluster ready in {took:?}");
    assert_eq!(expected.peers.len(), 2);

    // The DOM once the page's scripts ran against the agent's TCP API.
    let url = format!("http://{API_LISTEN}/");
    let dom = chromium(
        &host.ns,
        "dom",
        &["--virtual-time-budget=5000", "--dump-dom", &url],
    );
    let status = element_text(&dom, "status");
    assert!(
        dom.contains("id=\"status\" class=\"ok\"") && status.starts_with("updated"),
        "status: {status}"
    );
    assert_eq!(element_text(&dom, "node-id"), expected.me);
    assert_eq!(element_text(&dom, "node-uuid"), expected.uuid);
    assert_eq!(element_text(&dom, "node-address"), expected.address);
    assert_eq!(element_text(&dom, "node-role"), expected.role);
    // No k3s binary in this lab: the page says where k3s stands (failed, retried), not a dash.
    let k3s = element_text(&dom, "node-k3s");
    assert!(
        k3s.starts_with("failed: k3s binary not found"),
        "k3s: {k3s}"
    );
    // The node's totals from /api/metrics: it has been talking to its peers.
    let traffic = element_text(&dom, "node-traffic");
    assert!(
        traffic.starts_with("in ") && !traffic.starts_with("in 0 B") && traffic.contains(", out "),
        "node-traffic: {traffic}"
    );
    assert!(
        dom.contains("id=\"peers-empty\" hidden"),
        "peers-empty hidden"
    );
    assert_eq!(dom.matches("<tr data-peer=").count(), 2, "{dom}");
    for (id, address, role) in &expected.peers {
        let row = peer_row(&dom, id);
        assert!(row.contains("class=\"peer online\""), "{row}");
        assert!(row.contains("<span class=\"yes\">online</span>"), "{row}");
        assert_eq!(cell_text(row, "vpn-address"), address, "{row}");
        assert_eq!(cell_text(row, "role"), role, "{row}");
        assert_eq!(cell_text(row, "state"), "online", "{row}");
        assert!(cell_text(row, "link").starts_with("direct "), "{row}");
        // Connected peers have byte counts (B, KiB, ...), not a dash.
        for class in ["traffic-in", "traffic-out"] {
            let traffic = cell_text(row, class);
            assert!(traffic.starts_with(|c: char| c.is_ascii_digit()), "{row}");
        }
        assert!(row.contains(&format!("title=\"{id}\"")), "{row}");
        let uuid = text_of(row, "class=\"uuid\"");
        assert!(uuid.starts_with("status-page-node-"), "{row}");
    }

    // Screenshots, wide and narrow.
    let dir = target_dir();
    for (file, width, height) in [
        ("status-page.png", 1200, 800),
        ("status-page-narrow.png", 420, 900),
    ] {
        let path = dir.join(file);
        let _ = std::fs::remove_file(&path);
        chromium(
            &host.ns,
            file,
            &[
                "--virtual-time-budget=5000",
                &format!("--window-size={width},{height}"),
                &format!("--screenshot={}", path.display()),
                &url,
            ],
        );
        let size = check_png(&path, width, height);
        eprintln!("screenshot: {} ({size} bytes)", path.display());
    }

    // The error state: the same page with no API behind it.
    let offline = TempDir::new("status-page-offline");
    let page = offline.write("index.html", &get(host, "/"));
    let dom = chromium(
        &host.ns,
        "offline",
        &[
            "--virtual-time-budget=3000",
            "--dump-dom",
            &format!("file://{}", page.display()),
        ],
    );
    assert!(dom.contains("id=\"status\" class=\"err\""), "{dom}");
    assert!(
        element_text(&dom, "status").starts_with("API unreachable"),
        "{dom}"
    );

    for i in 0..hosts.len() {
        assert!(lab.stop(i).success(), "clean stop");
    }
}
