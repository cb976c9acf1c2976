//! The k3s flag contract (issue 15): every k3s command line and environment kairos-p2p generates
//! uses only flags and `K3S_*` variables real k3s has. The list comes from k3s' own source
//! (`tests/data/k3s-flags.json`, with where it was read); the k3s stand-in refuses anything else
//! (so every end-to-end test that runs an agent checks its plans too), and here every plan
//! `k3s::plan` makes, for every role, for the docs' configurations and for every option that
//! changes the command line, goes through the stand-in's check-only mode with exactly the
//! environment the agent gives k3s.

mod standin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kairos_p2p::config::{self, Config, HostFacts};
use kairos_p2p::k3s::K3sRole;
use kairos_p2p::k3s::plan::{Facts, Plan, plan};
use kairos_p2p::k3s::value::K3sToken;
use kairos_p2p::token::{NEVER_ROTATE, NetworkToken};
use standin::STANDIN;

const ROLES: [K3sRole; 4] = [
    K3sRole::Master,
    K3sRole::ClusterInit,
    K3sRole::HaMaster,
    K3sRole::Worker,
];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn host() -> HostFacts {
    HostFacts {
        machine_id: "f0e1d2c3b4a5968778695a4b3c2d1e0f".to_string(),
        hostname: "edge-7".to_string(),
    }
}

fn load(name: &str, text: &str) -> Config {
    let token = NetworkToken::generate(NEVER_ROTATE).unwrap().encode();
    let text = text.replace("YOUR_TOKEN_GOES_HERE", &token);
    config::parse(&[(Path::new(name), &text)], &host()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Configurations that change the k3s command line: each option on its own, the realistic
/// user arguments a Kairos user writes, and the documentation's examples.
fn configs() -> Vec<(String, Config)> {
    let head = "#cloud-config\np2p:\n  network_token: \"YOUR_TOKEN_GOES_HERE\"\n";
    let ha = "  auto:\n    ha:\n      enable: true\n      master_nodes: 2\n";
    let db = "  auto:\n    ha:\n      enable: true\n      master_nodes: 2\n      \
              external_db: \"postgres://k3s:secret@10.0.0.5:5432/k3s\"\n";
    let kubevip = "kubevip:\n  eip: 192.168.1.110\n";
    let k3s_user = "k3s:\n  args:\n  - --disable=traefik,servicelb\n  - --write-kubeconfig-mode=0644\n  \
                    - --tls-san=cluster.example\n  - --kube-apiserver-arg=event-ttl=2h\n  \
                    - --cluster-cidr=10.44.0.0/16\n  - --node-label=site=a\n  \
                    env:\n    K3S_KUBECONFIG_MODE: \"0640\"\n    HTTP_PROXY: http://proxy:3128\n";
    let agent_user = "k3s-agent:\n  args:\n  - --node-label=zone=b\n  - --node-taint=edge=true:NoSchedule\n  \
                      - --kubelet-arg=max-pods=50\n  env:\n    K3S_NODE_NAME: edge-7\n";
    let replace = "k3s:\n  args: [--disable-network-policy, --flannel-backend=host-gw]\n  \
                   replace_args: true\n  env: {K3S_TOKEN_FILE: /etc/k3s-token}\n  replace_env: true\n\
                   k3s-agent:\n  args: [--node-ip=10.9.0.9]\n  replace_args: true\n  \
                   env: {K3S_URL: \"https://10.9.0.1:6443\", K3S_TOKEN: t}\n  replace_env: true\n";
    let cases: Vec<(&str, String)> = vec![
        ("defaults", String::new()),
        (
            "lan without the vpn",
            "  vpn:\n    create: false\n    use: false\n".into(),
        ),
        ("ha", ha.into()),
        ("ha with an external datastore", db.into()),
        ("kubevip", kubevip.into()),
        (
            "kubevip, ha and an external datastore",
            format!("{db}{kubevip}"),
        ),
        (
            "embedded registry",
            "k3s:\n  embedded_registry: true\n".into(),
        ),
        ("user args and env", format!("{k3s_user}{agent_user}")),
        ("ha with user args", format!("{ha}{k3s_user}{agent_user}")),
        ("replaced args and env", replace.into()),
    ];
    let mut out: Vec<(String, Config)> = cases
        .into_iter()
        .map(|(name, extra)| {
            let text = format!("{head}{extra}");
            (name.to_string(), load(name, &text))
        })
        .collect();
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(data_dir().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    fixtures.sort();
    for path in fixtures {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        out.push((name.clone(), load(&name, &text)));
    }
    out
}

/// What the plan depends on besides the configuration, as a node of each role has it.
fn facts(role: K3sRole, cfg: &Config, v6_master: bool, initialised: bool) -> Facts {
    let vpn = cfg.p2p.vpn.use_vpn;
    Facts {
        role,
        node_ip: if vpn { "10.1.0.7" } else { "192.168.1.7" }
            .parse()
            .unwrap(),
        iface: if vpn { "edgevpn0" } else { "eth0" }.to_string(),
        master: Some(
            if v6_master { "fd00::1" } else { "10.1.0.1" }
                .parse()
                .unwrap(),
        ),
        node_token: Some(
            K3sToken::parse(&format!("K10{}::server:{}", "a".repeat(64), "b".repeat(32))).unwrap(),
        ),
        cluster_initialised: initialised,
    }
}

/// Every plan made for `cfg`: each role, IPv4 and IPv6 masters, before and after the
/// cluster-init server created its datastore.
fn plans(cfg: &Config) -> Vec<(String, Plan)> {
    let mut out = Vec::new();
    for role in ROLES {
        for v6 in [false, true] {
            for initialised in [false, true] {
                let f = facts(role, cfg, v6, initialised);
                let p = plan(cfg, &f).unwrap_or_else(|e| panic!("{role:?}: {e}"));
                out.push((
                    format!("{role:?} v6-master={v6} initialised={initialised}"),
                    p,
                ));
            }
        }
    }
    out
}

/// Runs the stand-in's check on `args` with exactly `env` (plus PATH and the check switch), as
/// the agent's supervisor starts k3s (`env_clear`, PATH, the plan's environment).
fn check(args: &[String], env: &BTreeMap<String, String>) -> Output {
    Command::new(STANDIN)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .envs(env)
        .env("K3S_STANDIN_CHECK_ONLY", "1")
        .output()
        .expect("run tests/k3s-standin (python3)")
}

/// The stand-in's verdict on each `(args, env)` case, in one run (its check batch mode):
/// `Ok(())` or the refusal.
fn check_batch(cases: &[(Vec<String>, BTreeMap<String, String>)]) -> Vec<Result<(), String>> {
    let file = std::env::temp_dir().join(format!(
        "kairos-p2p-k3s-contract-{}-{}.json",
        std::process::id(),
        cases.len()
    ));
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|(args, env)| serde_json::json!({ "args": args, "env": env }))
        .collect();
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let o = Command::new(STANDIN)
        .env("K3S_STANDIN_CHECK_BATCH", &file)
        .output()
        .expect("run tests/k3s-standin (python3)");
    let _ = std::fs::remove_file(&file);
    let verdicts: Vec<Result<(), String>> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["ok"] == true {
                Ok(())
            } else {
                Err(v["message"].as_str().unwrap_or_default().to_string())
            }
        })
        .collect();
    assert_eq!(verdicts.len(), cases.len(), "{o:?}");
    assert_eq!(
        o.status.success(),
        verdicts.iter().all(Result::is_ok),
        "{o:?}"
    );
    verdicts
}

#[test]
fn every_plan_uses_only_flags_and_variables_real_k3s_has() {
    let mut all: Vec<(String, Plan)> = Vec::new();
    for (name, cfg) in configs() {
        for (what, p) in plans(&cfg) {
            all.push((format!("{name}, {what}"), p));
        }
    }
    let cases: Vec<(Vec<String>, BTreeMap<String, String>)> = all
        .iter()
        .map(|(_, p)| (p.args.clone(), p.env.clone()))
        .collect();
    let mut seen_flags: BTreeMap<String, usize> = BTreeMap::new();
    for ((what, p), verdict) in all.iter().zip(check_batch(&cases)) {
        if let Err(why) = verdict {
            panic!(
                "{what}: k3s would refuse `k3s {}` with env {:?}: {why}",
                p.shown_args(),
                p.env.keys().collect::<Vec<_>>()
            );
        }
        for a in &p.args[1..] {
            let flag = a.split('=').next().unwrap_or(a).to_string();
            *seen_flags.entry(flag).or_default() += 1;
        }
    }
    // The richest plan of each role also as the agent starts k3s: a process with exactly that
    // environment.
    for role in ROLES {
        let (what, p) = all
            .iter()
            .filter(|(_, p)| p.role == role)
            .max_by_key(|(_, p)| p.args.len() + p.env.len())
            .unwrap();
        let o = check(&p.args, &p.env);
        assert!(o.status.success(), "{what}: {o:?}");
    }
    let checked = all.len();
    // Every flag kairos-p2p itself adds was exercised.
    for ours in [
        "--node-ip",
        "--flannel-iface",
        "--tls-san",
        "--embedded-registry",
        "--datastore-endpoint",
        "--cluster-init",
        "--server",
        "--with-node-id",
    ] {
        assert!(seen_flags.contains_key(ours), "{ours} never generated");
    }
    eprintln!("{checked} plans checked; flags seen: {seen_flags:?}");
}

#[test]
fn the_check_refuses_what_k3s_refuses() {
    let none = BTreeMap::new();
    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let args = |a: &[&str]| -> Vec<String> { a.iter().map(|s| s.to_string()).collect() };
    for (what, a, e, says) in [
        (
            "unknown flag",
            args(&["server", "--no-such-flag"]),
            none.clone(),
            "not defined",
        ),
        (
            "server-only flag on an agent",
            args(&["agent", "--cluster-init"]),
            none.clone(),
            "not defined",
        ),
        (
            "agent-only flag on a server",
            args(&["server", "--disable-apiserver-lb"]),
            none.clone(),
            "not defined",
        ),
        (
            "value flag without a value",
            args(&["agent", "--node-ip"]),
            none.clone(),
            "needs an argument",
        ),
        (
            "bad boolean",
            args(&["server", "--cluster-init=yes"]),
            none.clone(),
            "invalid boolean",
        ),
        (
            "stray argument",
            args(&["agent", "--with-node-id", "true"]),
            none.clone(),
            "no arguments",
        ),
        (
            "unknown K3S_ variable",
            args(&["agent"]),
            env(&[("K3S_NODENAME", "x")]),
            "K3S_NODENAME",
        ),
        (
            "server variable on an agent",
            args(&["agent"]),
            env(&[("K3S_DATASTORE_ENDPOINT", "x")]),
            "K3S_DATASTORE_ENDPOINT",
        ),
        (
            "no mode",
            args(&["--node-ip=1.2.3.4"]),
            none.clone(),
            "usage",
        ),
    ] {
        let o = check(&a, &e);
        assert_eq!(o.status.code(), Some(1), "{what}: {o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(says), "{what}: {stderr}");
    }
    // What k3s accepts: short aliases, one dash, `--flag value`, booleans with a value, other
    // variables (read by containerd or Go, not k3s' flags) and the stand-in's own knobs.
    for (a, e) in [
        (
            args(&["server", "-i", "10.0.0.1", "-t", "x", "--cluster-init=true"]),
            none.clone(),
        ),
        (
            args(&["agent", "-node-ip", "10.0.0.2", "--with-node-id=false"]),
            none.clone(),
        ),
        (
            args(&["agent"]),
            env(&[
                ("HTTP_PROXY", "http://p:3128"),
                ("K3S_STANDIN_READY_DELAY", "1"),
            ]),
        ),
    ] {
        let o = check(&a, &e);
        assert!(o.status.success(), "{a:?} {e:?}: {o:?}");
    }
}

#[test]
fn the_flag_list_says_where_it_comes_from() {
    let text = std::fs::read_to_string(data_dir().join("k3s-flags.json")).unwrap();
    let data: serde_json::Value = serde_json::from_str(&text).unwrap();
    let k3s = &data["k3s"];
    assert_eq!(k3s["repository"], "https://github.com/k3s-io/k3s");
    let files = k3s["files"].as_array().unwrap();
    assert!(files.iter().any(
        |f| f["path"] == "pkg/cli/cmds/server.go" && f["commit"].as_str().unwrap().len() == 40
    ));
    for mode in ["server", "agent"] {
        let rows = data[mode].as_array().unwrap();
        assert!(rows.len() > 30, "{mode}: {} flags", rows.len());
        for row in rows {
            let kind = row["kind"].as_str().unwrap();
            assert!(["bool", "value", "slice"].contains(&kind), "{row}");
        }
    }
}
