//! Bounded config and token parsing, measured on the real binary: `validate` on hostile inputs up
//! to the 4 MiB file limit (alias bombs, deep nesting, the largest accepted file) stays under
//! 64 MB of peak RSS and 1 s of CPU time, each child measured on its own with `wait4`; a FIFO
//! nobody writes to does not hang it.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::TempDir;

/// Peak RSS `validate` may reach on any input.
const MAX_PEAK_RSS_KB: i64 = 64 * 1024;
/// CPU time (user + system) `validate` may take on any input; CPU time, so a loaded machine does
/// not make the test flaky.
const MAX_CPU: Duration = Duration::from_secs(1);
/// The config file size limit (`config::MAX_FILE_SIZE`).
const LIMIT: usize = 4 * 1024 * 1024;

/// What one `validate` run cost and said.
struct Run {
    status: ExitStatus,
    peak_rss_kb: i64,
    cpu: Duration,
    output: String,
}

/// Runs `validate --config path` and measures the child alone (`wait4` gives its own rusage).
#[allow(clippy::zombie_processes)] // Reaped by `wait4`, which `Child::wait` cannot replace.
fn validate(path: &Path) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kairos-p2p"))
        .arg("validate")
        .arg("--config")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Outputs are small (at most 50 messages), well within the pipe buffers.
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain syscall on our own child; `rusage` is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let mut output = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Run {
        status: ExitStatus::from_raw(status),
        peak_rss_kb: usage.ru_maxrss,
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        output,
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A hostile input: its name, how to make its text, and a part of the message expected (empty:
/// accepted). Made one at a time, so that the test process itself stays small: a child's peak
/// RSS as `wait4` reports it includes the parent's at the time of the spawn (Linux carries the
/// old memory's high-water mark through `exec`), so the measure is an upper bound.
type Input = (&'static str, fn() -> String, &'static str);

const HOSTILE_INPUTS: &[Input] = &[
    (
        "node alias bomb",
        node_alias_bomb,
        "once aliases are expanded",
    ),
    (
        "string alias bomb",
        string_alias_bomb,
        "bytes of text once aliases are expanded",
    ),
    ("flow sequences 2M deep", flow_sequences, "collections deep"),
    ("flow mappings 100k deep", flow_mappings, "collections deep"),
    (
        "block sequences 2M deep",
        block_sequences,
        "collections deep",
    ),
    (
        "block mappings 2800 deep",
        block_mappings,
        "collections deep",
    ),
    ("2M-item flow list", wide_list, "once aliases are expanded"),
    ("largest accepted file", largest_accepted, ""),
    ("one 4 MiB string", one_long_string, ""),
    (
        "4 MiB of template actions",
        template_actions,
        "must be at most 64 bytes",
    ),
    (
        "95,000 values with an error each",
        many_errors,
        "more errors not shown",
    ),
    (
        "token alias bomb",
        token_alias_bomb,
        "network token YAML is not accepted",
    ),
    (
        "token nested 24k deep",
        token_nested,
        "network token YAML is not accepted",
    ),
];

/// Billion laughs, ~300 KB: 1000 x 1000 x 150 x n nodes, under serde_yaml's repetition limit.
fn node_alias_bomb() -> String {
    let mut bomb = String::from("p2p:\n  network_id: x\na0: &a0 [");
    bomb += &["x"; 1000].join(",");
    bomb += "]\na1: &a1 [";
    bomb += &["*a0"; 1000].join(",");
    bomb += "]\n";
    let mut i = 0;
    while bomb.len() < 300 * 1024 {
        bomb += &format!("b{i}: [{}]\n", ["*a1"; 150].join(","));
        i += 1;
    }
    bomb
}

/// One 1 MiB string aliased a thousand times.
fn string_alias_bomb() -> String {
    let text = "x".repeat(1024 * 1024);
    format!("s: &s {text}\nl: [{}]\n", ["*s"; 1000].join(", "))
}

const DEPTH: usize = LIMIT / 2 - 16;

fn flow_sequences() -> String {
    format!("x: {}{}\n", "[".repeat(DEPTH), "]".repeat(DEPTH))
}

fn flow_mappings() -> String {
    format!("x: {}1{}\n", "{a: ".repeat(100_000), "}".repeat(100_000))
}

fn block_sequences() -> String {
    format!("x:\n  {}a\n", "- ".repeat(DEPTH))
}

fn block_mappings() -> String {
    (0..2800)
        .map(|i| format!("{}a:\n", " ".repeat(i)))
        .collect()
}

fn wide_list() -> String {
    format!("x: [{}a]\n", "a,".repeat(LIMIT / 2 - 8))
}

/// The largest accepted file: just under the node budget, just under the size limit.
fn largest_accepted() -> String {
    let mut large = String::from("install:\n");
    let line_len = LIMIT / 49_000;
    for i in 0..49_000 {
        let key = format!("  k{i}: ");
        large += &key;
        large += &"v".repeat(line_len - key.len() - 1);
        large += "\n";
    }
    large
}

fn one_long_string() -> String {
    format!("x: {}\n", "a".repeat(LIMIT - 8))
}

fn template_actions() -> String {
    let action = "{{ .Hostname }}";
    let n = (LIMIT - 64) / action.len();
    format!("p2p:\n  network_id: \"{}\"\n", action.repeat(n))
}

/// Every value refused (a control character in a k3s argument): 50 errors listed, the rest
/// counted, each located in the file.
fn many_errors() -> String {
    format!("k3s:\n  args:\n{}", "    - \"a\\x01\"\n".repeat(95_000))
}

/// A network token whose YAML body is an alias bomb (within the 64 KiB token limit).
fn token_alias_bomb() -> String {
    let mut body = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
    for i in 1..8 {
        body += &format!("a{i}: &a [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n");
    }
    format!("p2p:\n  network_token: {}\n", b64(&body))
}

fn token_nested() -> String {
    let nested = format!("{}x{}", "[".repeat(24_000), "]".repeat(24_000));
    format!("p2p:\n  network_token: {}\n", b64(&nested))
}

#[test]
fn validate_stays_within_memory_and_cpu_bounds_on_hostile_inputs() {
    let dir = TempDir::new("bounds");
    let mut report = Vec::new();
    for (name, make, expected) in HOSTILE_INPUTS {
        let text = make();
        assert!(text.len() <= LIMIT, "{name}: {} bytes", text.len());
        let path = dir.write("c.yaml", &text);
        drop(text);
        let run = validate(&path);
        report.push(format!(
            "{name}: {} KB peak, {:?} CPU, {}",
            run.peak_rss_kb, run.cpu, run.status
        ));
        assert!(
            run.status.code().is_some(),
            "{name}: killed by a signal: {}",
            run.status
        );
        assert!(
            run.peak_rss_kb < MAX_PEAK_RSS_KB,
            "{name}: peak RSS {} KB",
            run.peak_rss_kb
        );
        assert!(run.cpu < MAX_CPU, "{name}: {:?} of CPU", run.cpu);
        if expected.is_empty() {
            assert!(run.status.success(), "{name}: {}", run.output);
        } else {
            assert_eq!(run.status.code(), Some(2), "{name}: {}", run.output);
            assert!(run.output.contains(expected), "{name}: {}", run.output);
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn validate_does_not_hang_on_a_fifo_nobody_writes() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("c.yaml");
    common::sh(&["mkfifo", fifo.to_str().unwrap()]).unwrap();
    let start = Instant::now();
    let run = validate(&fifo);
    let took = start.elapsed();
    assert_eq!(run.status.code(), Some(2), "{}", run.output);
    assert!(
        run.output.contains("no end of input within 5 s"),
        "{}",
        run.output
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn validate_reads_a_pipe_that_ends() {
    let child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} validate --config <(printf 'p2p:\\n  network_id: piped\\n')",
            env!("CARGO_BIN_EXE_kairos-p2p")
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout).to_string();
    assert!(child.status.success(), "{out}{:?}", child.stderr);
    assert!(out.contains("network_id: \"piped\""), "{out}");
}
