//! A Kairos user's commands, as kairosctl takes them, run against the real binary (issue 15):
//! the positional rotation interval, the `g`/`c` aliases, `--version`/`-v`, `validate FILE|URL`
//! (plain HTTP from a server in this process, HTTPS from `openssl s_server` with a test CA, both
//! on loopback), and no crash when the reader of the output goes away (`| head -c1`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;

const BIN: &str = env!("CARGO_BIN_EXE_kairos-p2p");

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kairos-p2p-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {o:?}");
    stdout(&o)
}

/// The key rotation intervals inside a token (its YAML holds `interval:` for the DHT and the
/// crypto keys).
fn intervals(token: &str) -> Vec<String> {
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .unwrap();
    String::from_utf8(yaml)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("interval: ").map(str::to_string))
        .collect()
}

fn token_in_config(config: &str) -> String {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("network_token: "))
        .unwrap_or_else(|| panic!("no token in {config}"))
        .trim_matches('"')
        .to_string()
}

#[test]
fn generate_token_and_create_config_take_the_interval_as_kairosctl_does() {
    for args in [
        &["generate-token", "3600"][..],
        &["g", "3600"],
        &["generate-token", "--interval", "3600"],
        &["generate-token", "3600", "--interval", "3600"],
        &["--state-dir", "/nonexistent", "g", "3600"],
    ] {
        assert_eq!(intervals(&ok(args)), ["3600", "3600"], "{args:?}");
    }
    for args in [
        &["create-config", "3600"][..],
        &["c", "3600"],
        &["create-config", "--interval", "3600"],
    ] {
        let config = ok(args);
        assert!(config.starts_with("#cloud-config\n"), "{config}");
        assert_eq!(intervals(&token_in_config(&config)), ["3600", "3600"]);
    }
    // Without an interval: never rotate (Kairos' maximum integer).
    let never = intervals(&ok(&["g"]));
    assert_eq!(never.len(), 2);
    assert!(never[0].parse::<u64>().unwrap() > 1 << 62, "{never:?}");
    // Clear refusals (kairosctl silently ignores a bad interval).
    for (args, says) in [
        (&["g", "soon"][..], "seconds"),
        (&["generate-token", "60", "--interval", "61"], "given twice"),
        (&["c", "0"], "at least 1 second"),
        (&["g", "1", "2"], ""),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn version_flags_and_the_kairosctl_name() {
    let version = ok(&["version"]);
    assert!(version.starts_with("kairos-p2p "), "{version}");
    assert_eq!(ok(&["--version"]), version);
    assert_eq!(ok(&["-v"]), version);
    let help = ok(&["--help"]);
    for word in ["`g`", "`c`", "--version", "-v"] {
        assert!(
            help.contains(word),
            "the help does not mention {word}:\n{help}"
        );
    }
    // Installed as `kairosctl`: the same commands.
    let dir = Scratch::new("kairosctl-name");
    let link = dir.0.join("kairosctl");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let o = Command::new(&link).args(["g", "60"]).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(intervals(&stdout(&o)), ["60", "60"]);
    let o = Command::new(&link).arg("--help").output().unwrap();
    assert!(stdout(&o).contains("Usage: kairosctl"), "{}", stdout(&o));
}

/// A config naming a fresh token (from the binary under test).
fn config_with(extra: &str) -> String {
    let token = ok(&["generate-token"]);
    format!(
        "#cloud-config\np2p:\n  network_token: \"{}\"\n{extra}",
        token.trim()
    )
}

#[test]
fn validate_takes_files_as_arguments() {
    let dir = Scratch::new("validate-files");
    let base = dir.write("base.yaml", &config_with("  network_id: first\n"));
    let over = dir.write("over.yaml", "#cloud-config\np2p:\n  network_id: second\n");
    let (base, over) = (base.to_str().unwrap(), over.to_str().unwrap());
    let one = ok(&["validate", base]);
    assert!(one.contains("network_id: \"first\""), "{one}");
    // Later files override earlier ones, as with --config.
    let both = ok(&["validate", base, over]);
    assert!(both.contains("network_id: \"second\""), "{both}");
    assert_eq!(ok(&["validate", "--config", base, "--config", over]), both);
    // Errors name the file; exit 2.
    let bad = dir.write("bad.yaml", "#cloud-config\np2p:\n  minimum_nodes: many\n");
    let o = run(&["validate", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("bad.yaml"), "{}", stderr(&o));
    // Both ways at once is ambiguous.
    let o = run(&["validate", base, "--config", over]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("not both"), "{}", stderr(&o));
    let o = run(&["validate", "ftp://example.invalid/a.yaml"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// Serves `responses` in order, one per connection, on a loopback port; returns the base URL.
fn http_server(responses: Vec<Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        for response in responses {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            read_request_head(&mut conn);
            let _ = conn.write_all(&response);
        }
    });
    url
}

fn read_request_head(conn: &mut TcpStream) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16_384 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
}

fn http_response(status: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn validate_downloads_a_url_bounded_in_size() {
    let config = config_with("  network_id: from-the-web\n");
    let big = vec![b'#'; 4 * 1024 * 1024 + 1];
    let moved = b"HTTP/1.1 302 Found\r\nLocation: /config.yaml\r\nContent-Length: 0\r\n\r\n";
    let url = http_server(vec![
        http_response("200 OK", config.as_bytes()),
        moved.to_vec(),
        http_response("200 OK", config.as_bytes()),
        http_response("404 Not Found", b"no such file"),
        http_response("200 OK", &big),
        http_response("200 OK", b"#cloud-config\np2p:\n  minimum_nodes: many\n"),
    ]);
    let shown = ok(&["validate", &format!("{url}/config.yaml")]);
    assert!(shown.contains("network_id: \"from-the-web\""), "{shown}");
    assert!(shown.contains(&format!("{url}/config.yaml")), "{shown}");
    // Redirects are followed.
    let shown = ok(&["validate", &format!("{url}/moved")]);
    assert!(shown.contains("network_id: \"from-the-web\""), "{shown}");
    // A 404, an oversized body (4 MiB + 1): exit 1 with the reason.
    for (what, says) in [("missing", "404"), ("big", "limit")] {
        let o = run(&["validate", &format!("{url}/{what}")]);
        assert_eq!(o.status.code(), Some(1), "{what}: {o:?}");
        assert!(stderr(&o).contains(says), "{what}: {}", stderr(&o));
    }
    // A config error in a downloaded file names the URL.
    let o = run(&["validate", &format!("{url}/bad.yaml")]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        stderr(&o).contains(&format!("{url}/bad.yaml")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn validate_gives_up_on_a_server_that_never_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow.yaml", listener.local_addr().unwrap());
    // Accepts and never answers; the binary's own limit is 30 s: check it ends, and say so.
    let hold = thread::spawn(move || {
        let conn = listener.accept();
        thread::sleep(Duration::from_secs(35));
        drop(conn);
    });
    let started = Instant::now();
    let o = run(&["validate", &url]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("timeout"), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(34),
        "{:?}",
        started.elapsed()
    );
    drop(hold);
}

/// Runs `openssl` with `args` in `dir`, failing with its stderr.
fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed (tests/setup-host.sh installs it)");
    assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
}

#[test]
fn validate_downloads_https_checked_against_the_system_ca_bundle() {
    let dir = Scratch::new("validate-https");
    let d = &dir.0;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat()
        .into_iter()
        .chain(["-days", "2", "-subj", "/CN=kairos-p2p test CA"])
        .collect::<Vec<_>>(),
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &["-keyout", "srv.key", "-out", "srv.csr"],
        ]
        .concat()
        .into_iter()
        .chain(["-subj", "/CN=127.0.0.1"])
        .collect::<Vec<_>>(),
    );
    dir.write(
        "ext",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    dir.write("config.yaml", &config_with("  network_id: over-tls\n"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // -WWW serves the files of its working directory.
    let mut server = Command::new("openssl")
        .args([
            "s_server", "-quiet", "-WWW", "-cert", "srv.pem", "-key", "srv.key",
        ])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "s_server did not start"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let url = format!("https://127.0.0.1:{port}/config.yaml");
    let trusted = Command::new(BIN)
        .args(["validate", &url])
        .env("SSL_CERT_FILE", d.join("ca.pem"))
        .output()
        .unwrap();
    // The system bundle does not hold the test CA: refused, and the message says what was used.
    let untrusted = Command::new(BIN)
        .args(["validate", &url])
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(trusted.status.success(), "{trusted:?}");
    assert!(stdout(&trusted).contains("network_id: \"over-tls\""));
    assert_eq!(untrusted.status.code(), Some(1), "{untrusted:?}");
    let why = stderr(&untrusted);
    assert!(why.contains("certificate") && why.contains("CA"), "{why}");
}

/// A pipe whose reading end is already closed: every write to the other end fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// Exit 134 is SIGABRT (the release build aborts on a panic), 101 a panic in a debug build.
fn assert_no_crash(what: &str, o: &Output) {
    let code = o.status.code();
    assert!(
        code.is_some() && code != Some(134) && code != Some(101),
        "{what}: {o:?}"
    );
    assert!(!stderr(o).contains("panicked"), "{what}: {}", stderr(o));
}

/// The commands whose output a user pipes, with the file they need.
fn piped_commands(config: &Path) -> Vec<Vec<String>> {
    let c = config.to_str().unwrap().to_string();
    [
        vec!["help"],
        vec!["--help"],
        vec!["bridge", "--help"],
        vec!["generate-token"],
        vec!["create-config", "60"],
        vec!["version"],
        vec!["validate", &c],
        vec!["validate", "--config", "/nonexistent/x.yaml"],
        vec!["no-such-command"],
    ]
    .into_iter()
    .map(|a| a.into_iter().map(String::from).collect())
    .collect()
}

#[test]
fn output_to_a_closed_pipe_never_crashes() {
    let dir = Scratch::new("closed-pipe");
    let config = dir.write("c.yaml", &config_with(""));
    for args in piped_commands(&config) {
        // Standard output closed; then standard error closed too.
        let o = Command::new(BIN)
            .args(&args)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_no_crash(&format!("{args:?} > closed pipe"), &o);
        let o = Command::new(BIN)
            .args(&args)
            .stdout(closed_pipe())
            .stderr(closed_pipe())
            .output()
            .unwrap();
        assert_no_crash(&format!("{args:?} > closed pipe 2> closed pipe"), &o);
    }
    // A closed pipe is not a failure (`kairos-p2p generate-token | head -c1` exits 0), a write
    // error otherwise is: /dev/full.
    let o = Command::new(BIN)
        .args(["generate-token"])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(BIN)
        .args(["generate-token"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("standard output"), "{}", stderr(&o));
}

#[test]
fn help_piped_to_head_200_times_never_aborts() {
    let dir = Scratch::new("head-c1");
    let config = dir.write("c.yaml", &config_with(""));
    let config = config.to_str().unwrap();
    // The issue's own reproduction: `| head -c1`, racing the reader's exit, 200 times each.
    for cmd in [
        "help",
        "--help",
        "bridge --help",
        "generate-token",
        &format!("validate {config}"),
    ] {
        let script = format!(
            "for i in $(seq 200); do \"$0\" {cmd} 2>&1 | head -c1 >/dev/null; \
             s=${{PIPESTATUS[0]}}; if [ \"$s\" = 134 ] || [ \"$s\" = 101 ]; then \
             echo \"run $i: exit $s\"; exit 1; fi; done"
        );
        let o = Command::new("bash")
            .args(["-c", &script, BIN])
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd}: {}{}", stdout(&o), stderr(&o));
    }
}

#[test]
fn the_docs_single_node_example_validates() {
    let dir = Scratch::new("validate-single-node");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config/docs-single-node.yaml");
    let token = ok(&["generate-token"]);
    let text = std::fs::read_to_string(fixture)
        .unwrap()
        .replace("YOUR_TOKEN_GOES_HERE", token.trim());
    let path = dir.write("single-node.yaml", &text);
    let shown = ok(&["validate", path.to_str().unwrap()]);
    assert!(shown.contains("role: \"master\""), "{shown}");
    assert!(shown.contains("disable_dht: true"), "{shown}");
}
