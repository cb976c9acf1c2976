//! The k3s stand-in itself (`tests/k3s-standin`), which the end-to-end tests and `make demo` give
//! the agents instead of k3s: a server in one namespace writes its node token and kubeconfig
//! under its root and answers on port 6443; agents and joining servers in another namespace are
//! let in with the right token and refused (exit 1) with a wrong one; a restarted server reuses
//! its cluster.

mod common;
mod standin;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Host, Lab, wait_for};
use standin::{Record, STANDIN, read_log, secret_of};

/// Stand-in processes started by the test, killed by pid when it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `k3s-standin <args>` in the host's namespace with root `root` and a clean K3S_* environment.
fn standin(host: &Host, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    fs::create_dir_all(root).unwrap();
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &host.ns, STANDIN])
        .args(args)
        .env("KAIROS_P2P_ROOT", root)
        .env_remove("K3S_URL")
        .env_remove("K3S_TOKEN")
        .envs(env.iter().copied());
    command
}

/// Starts the stand-in; output to `<root>/out.log`.
fn spawn(host: &Host, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut command = standin(host, root, args, env);
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("out.log"))
        .unwrap();
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("run tests/k3s-standin (python3)")
}

/// Runs the stand-in to completion (for the ones that must exit).
fn run(host: &Host, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    standin(host, root, args, env).output().unwrap()
}

/// `GET http://<addr>/<path>` from inside a namespace: (status, body).
fn http_get(host: &Host, url: &str, token: Option<&str>) -> Option<(u16, String)> {
    const GET: &str = r#"
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2: req.add_header("X-K3s-Token", sys.argv[2])
try:
    r = urllib.request.urlopen(req, timeout=3); print(r.status); print(r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode().strip())
"#;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.ns, "python3", "-c", GET, url]);
    if let Some(t) = token {
        cmd.arg(t);
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n')?;
    Some((status.trim().parse().ok()?, body.trim().to_string()))
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn stop(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap()
}

fn ready(root: &Path, pid: u32) -> Option<Record> {
    read_log(root)
        .into_iter()
        .find(|r| r.pid() == pid && r.event() == "ready")
}

fn wait_ready(root: &Path, child: &Child, what: &str) -> Record {
    let pid = child.id();
    wait_for(Duration::from_secs(15), || ready(root, pid).is_some()).unwrap_or_else(|| {
        panic!(
            "{what} ready: {}\n{}",
            standin::describe(&read_log(root)),
            fs::read_to_string(root.join("out.log")).unwrap_or_default()
        )
    });
    ready(root, pid).unwrap()
}

fn is_k3s_token(token: &str) -> bool {
    let Some(rest) = token.strip_prefix("K10") else {
        return false;
    };
    let Some((hash, secret)) = rest.split_once("::server:") else {
        return false;
    };
    hash.len() == 64
        && secret.len() == 32
        && hash
            .chars()
            .chain(secret.chars())
            .all(|c| c.is_ascii_hexdigit())
}

#[test]
fn standin_server_agents_joins_and_restart() {
    let mut lab = Lab::new("standin");
    let h1 = lab.add_host(1, "10.83.0.1/24");
    let h2 = lab.add_host(2, "10.83.0.2/24");
    let root1: PathBuf = h1.dir.join("root");
    let root2: PathBuf = h2.dir.join("root");
    let root3: PathBuf = h2.dir.join("root-agent");
    let mut procs = Procs(Vec::new());

    // The version, as k3s prints it.
    let out = run(&h1, &root1, &["--version"], &[]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("k3s version v1."),
        "{out:?}"
    );

    // A first server: a new embedded-etcd cluster on its node address.
    let server_args = [
        "server",
        "--cluster-init",
        "--node-ip",
        "10.83.0.1",
        "--flannel-iface=edgevpn0",
        "--tls-san",
        "10.83.0.200",
    ];
    // A flag real k3s does not have is refused, as k3s refuses it (tests/data/k3s-flags.json).
    let refused = run(&h1, &root1, &["server", "--some-future-flag", "value"], &[]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("-some-future-flag"),
        "{refused:?}"
    );
    let error = read_log(&root1).pop().expect("the refusal is logged");
    assert_eq!(error.event(), "error");
    procs.0.push(spawn(&h1, &root1, &server_args, &[]));
    let first = wait_ready(&root1, &procs.0[0], "server");
    assert_eq!(first.init(), Some("cluster-init"));
    assert_eq!(first.flag("node-ip").as_deref(), Some("10.83.0.1"));
    assert_eq!(first.flag("flannel-iface").as_deref(), Some("edgevpn0"));
    assert_eq!(first.flag_values("tls-san"), ["10.83.0.200"]);
    assert!(first.has_flag("cluster-init"));
    let token_path = root1.join("var/lib/rancher/k3s/server/node-token");
    let kube_path = root1.join("etc/rancher/k3s/k3s.yaml");
    let token = standin::node_token(&root1).expect("node-token written");
    assert!(is_k3s_token(&token), "k3s token format: {token}");
    assert_eq!(mode_of(&token_path), 0o600, "node-token mode");
    assert_eq!(mode_of(&kube_path), 0o600, "k3s.yaml mode");
    let kube = standin::kubeconfig(&root1).unwrap();
    assert!(
        kube.contains("    server: https://127.0.0.1:6443\n"),
        "{kube}"
    );
    assert!(kube.contains("certificate-authority-data: "), "{kube}");
    assert!(kube.contains("client-key-data: "), "{kube}");

    // It answers on its node address, from another namespace.
    assert_eq!(
        http_get(&h2, "http://10.83.0.1:6443/ping", None),
        Some((200, "pong".to_string()))
    );
    assert_eq!(
        http_get(&h2, "http://10.83.0.1:6443/v1-standin/join", Some("nope")).map(|r| r.0),
        Some(401)
    );

    // An agent with the right token (the full one) joins and runs until SIGTERM.
    let url = ("K3S_URL", "https://10.83.0.1:6443");
    let good = [url, ("K3S_TOKEN", token.as_str())];
    procs.0.push(spawn(
        &h2,
        &root3,
        &["agent", "--with-node-id", "--node-ip", "10.83.0.2"],
        &good,
    ));
    let joined = wait_ready(&root3, &procs.0[1], "agent");
    assert_eq!(joined.outcome(), "joined");
    assert_eq!(joined.server_url().as_deref(), Some(url.1));
    assert_eq!(joined.token().as_deref(), Some(token.as_str()));
    assert!(joined.has_flag("with-node-id"));
    assert!(stop(&mut procs.0[1]).success(), "agent exits 0 on SIGTERM");
    let stopped = read_log(&root3);
    assert_eq!(stopped.last().map(Record::event), Some("stop"));

    // The short secret alone is a valid token too (k3s accepts both); flags instead of env.
    procs.0.push(spawn(
        &h2,
        &root3,
        &[
            "agent",
            "--server",
            url.1,
            "--token",
            secret_of(&token),
            "--with-node-id",
        ],
        &[],
    ));
    wait_ready(&root3, &procs.0[2], "agent with the secret as token");

    // A wrong token: refused at once, exit 1, a clear message.
    let out = run(
        &h2,
        &root3,
        &["agent", "--with-node-id"],
        &[url, ("K3S_TOKEN", "K10deadbeef::server:wrong")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("refused the token"), "{err}");
    // No URL, no token, or nobody at the URL: exit 1.
    let out = run(&h2, &root3, &["agent"], &[("K3S_TOKEN", "x")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("K3S_URL"));
    let out = run(&h2, &root3, &["agent"], &[url]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(
        &h2,
        &root3,
        &["agent"],
        &[
            ("K3S_URL", "https://10.83.0.9:6443"),
            ("K3S_TOKEN", &token),
            ("K3S_STANDIN_JOIN_TIMEOUT", "1"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot join"));
    let errors: Vec<Record> = read_log(&root3)
        .into_iter()
        .filter(|r| r.event() == "error")
        .collect();
    assert_eq!(errors.len(), 4, "{}", standin::describe(&errors));

    // A second server joins the first (HA): same node token, its own listener.
    procs.0.push(spawn(
        &h2,
        &root2,
        &["server", "--server", url.1, "--node-ip", "10.83.0.2"],
        &[("K3S_TOKEN", &token)],
    ));
    let ha = wait_ready(&root2, &procs.0[3], "joining server");
    assert_eq!(ha.init(), Some("join"));
    assert_eq!(standin::node_token(&root2).as_deref(), Some(token.as_str()));
    assert_eq!(
        http_get(&h1, "http://10.83.0.2:6443/ping", None),
        Some((200, "pong".to_string()))
    );
    // A joining server with a wrong token is refused.
    let out = run(
        &h1,
        &h1.dir.join("root-bad"),
        &["server", "--server", url.1],
        &[("K3S_TOKEN", "wrong")],
    );
    assert_eq!(out.status.code(), Some(1));

    // The first server stops cleanly and, restarted, reuses its cluster: same token, no
    // second initialisation.
    assert!(stop(&mut procs.0[0]).success(), "server exits 0 on SIGTERM");
    procs.0.push(spawn(&h1, &root1, &server_args, &[]));
    let again = wait_ready(&root1, &procs.0[4], "restarted server");
    assert_eq!(again.init(), Some("restart"));
    assert_eq!(standin::node_token(&root1).as_deref(), Some(token.as_str()));
    let inits: Vec<Record> = read_log(&root1)
        .into_iter()
        .filter(Record::created_cluster)
        .collect();
    assert_eq!(inits.len(), 1, "{}", standin::describe(&read_log(&root1)));
    // Its joined peers still get in with the old token.
    assert_eq!(
        http_get(
            &h2,
            "http://10.83.0.1:6443/v1-standin/join",
            Some(token.as_str())
        )
        .map(|r| r.0),
        Some(200)
    );
    for child in &mut procs.0[2..] {
        assert!(stop(child).success());
    }
}
