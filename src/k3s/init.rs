//! The init system under the root prefix and what the k3s service looks like for it.
//!
//! - systemd when `<root>/run/systemd/system` exists: the environment in
//!   `/etc/sysconfig/<service>` (0600), and either a drop-in
//!   `/etc/systemd/system/<service>.service.d/50-kairos-p2p.conf` that replaces `ExecStart` of
//!   an installed unit (k3s' installer's), or our own `/etc/systemd/system/<service>.service`;
//!   then `systemctl daemon-reload`, `systemctl enable <service>`,
//!   `systemctl restart --no-block <service>`.
//! - OpenRC when `<root>/sbin/openrc-run` or `<root>/run/openrc` exists: the environment in
//!   `/etc/rancher/k3s/<service>.env` (0600, where k3s' own OpenRC script reads it), the
//!   arguments in `/etc/conf.d/<service>` (`command_args`), our init script
//!   `/etc/init.d/<service>` (supervise-daemon); then `rc-update add <service> default`,
//!   `rc-service <service> restart`.
//! - Neither: the agent runs k3s itself ([`super::supervise`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Root;
use super::files::{EXECUTABLE, PRIVATE};
use super::plan::Plan;
use super::value::{self, ValueError};

/// Says a file is ours (our unit is rewritten; a unit without it gets a drop-in).
pub const WRITTEN_BY: &str = "written by kairos-p2p";

/// The init system that runs k3s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitSystem {
    /// systemd.
    Systemd,
    /// OpenRC.
    OpenRc,
    /// None: the agent supervises k3s itself.
    None,
}

impl fmt::Display for InitSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InitSystem::Systemd => "systemd",
            InitSystem::OpenRc => "openrc",
            InitSystem::None => "none (the agent supervises k3s)",
        })
    }
}

/// The init system of the system under `root`.
pub fn detect(root: &Root) -> InitSystem {
    if root.path("/run/systemd/system").is_dir() {
        InitSystem::Systemd
    } else if root.path("/sbin/openrc-run").exists() || root.path("/run/openrc").exists() {
        InitSystem::OpenRc
    } else {
        InitSystem::None
    }
}

/// A file to write: path (under the root), contents, mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFile {
    /// Where.
    pub path: PathBuf,
    /// What.
    pub contents: String,
    /// Mode.
    pub mode: u32,
}

/// The files that make `init` run `plan` with the k3s binary `bin`. A control character in the
/// binary's path, an argument or the environment is refused: environment files and shell
/// quoting have no escape for them, and in a unit file a line end starts a new directive.
pub fn service_files(
    init: InitSystem,
    root: &Root,
    plan: &Plan,
    bin: &Path,
) -> Result<Vec<ServiceFile>, ValueError> {
    value::check_text(
        || "the k3s binary's path".to_string(),
        &bin.to_string_lossy(),
    )?;
    for (i, arg) in plan.args.iter().enumerate() {
        value::check_text(|| format!("k3s argument {i}"), arg)?;
    }
    for (name, v) in &plan.env {
        value::check_text(|| "a k3s environment variable name".to_string(), name)?;
        value::check_text(|| format!("k3s environment variable {name}"), v)?;
    }
    Ok(unchecked_service_files(init, root, plan, bin))
}

fn unchecked_service_files(
    init: InitSystem,
    root: &Root,
    plan: &Plan,
    bin: &Path,
) -> Vec<ServiceFile> {
    let svc = plan.service();
    match init {
        InitSystem::None => Vec::new(),
        InitSystem::Systemd => {
            let exec = std::iter::once(bin.to_string_lossy().into_owned())
                .chain(plan.args.iter().cloned())
                .map(|a| systemd_quote(&a))
                .collect::<Vec<_>>()
                .join(" ");
            let env_file = format!("/etc/sysconfig/{svc}");
            let env = ServiceFile {
                path: root.path(&env_file),
                contents: env_lines(plan, systemd_env_value),
                mode: PRIVATE,
            };
            let installed = installed_unit(root, svc);
            let unit = match installed {
                Some(path) if !is_ours(&path) => ServiceFile {
                    path: root.path(format!(
                        "/etc/systemd/system/{svc}.service.d/50-kairos-p2p.conf"
                    )),
                    contents: format!(
                        "# {WRITTEN_BY}: k3s for the role {role}\n[Service]\n\
                         EnvironmentFile=-{env_file}\nExecStart=\nExecStart={exec}\n",
                        role = plan.role
                    ),
                    mode: PRIVATE,
                },
                _ => ServiceFile {
                    path: root.path(format!("/etc/systemd/system/{svc}.service")),
                    contents: systemd_unit(plan, &env_file, &exec),
                    mode: PRIVATE,
                },
            };
            vec![env, unit]
        }
        InitSystem::OpenRc => {
            let env_file = format!("/etc/rancher/k3s/{svc}.env");
            let args = plan
                .args
                .iter()
                .map(|a| sh_quote(a))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                ServiceFile {
                    path: root.path(&env_file),
                    contents: env_lines(plan, sh_quote),
                    mode: PRIVATE,
                },
                ServiceFile {
                    path: root.path(format!("/etc/conf.d/{svc}")),
                    contents: format!(
                        "# {WRITTEN_BY}: k3s for the role {}\ncommand_args={}\n",
                        plan.role,
                        sh_quote(&args)
                    ),
                    mode: PRIVATE,
                },
                ServiceFile {
                    path: root.path(format!("/etc/init.d/{svc}")),
                    contents: openrc_script(svc, bin, &env_file),
                    mode: EXECUTABLE,
                },
            ]
        }
    }
}

/// The commands that (re)start the service after its files changed.
pub fn start_commands(init: InitSystem, service: &str) -> Vec<Vec<String>> {
    let cmd = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match init {
        InitSystem::None => Vec::new(),
        InitSystem::Systemd => vec![
            cmd(&["systemctl", "daemon-reload"]),
            cmd(&["systemctl", "enable", service]),
            cmd(&["systemctl", "restart", "--no-block", service]),
        ],
        InitSystem::OpenRc => vec![
            cmd(&["rc-update", "add", service, "default"]),
            cmd(&["rc-service", service, "restart"]),
        ],
    }
}

/// The commands that stop the k3s server service and keep it from starting at boot (a node
/// that leaves its cluster in a merge).
pub fn stop_server_commands(init: InitSystem) -> Vec<Vec<String>> {
    let cmd = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let svc = super::K3sRole::Master.service();
    match init {
        InitSystem::None => Vec::new(),
        InitSystem::Systemd => vec![cmd(&["systemctl", "disable", "--now", svc])],
        InitSystem::OpenRc => vec![
            cmd(&["rc-service", svc, "stop"]),
            cmd(&["rc-update", "del", svc, "default"]),
        ],
    }
}

/// The commands that make the init system read changed files without a restart.
pub fn reload_commands(init: InitSystem) -> Vec<Vec<String>> {
    match init {
        InitSystem::Systemd => vec![vec!["systemctl".into(), "daemon-reload".into()]],
        InitSystem::OpenRc | InitSystem::None => Vec::new(),
    }
}

/// Runs `cmd` (found on `PATH`); an error names the command and says what it printed.
pub fn run(cmd: &[String]) -> Result<(), String> {
    let Some((program, args)) = cmd.split_first() else {
        return Ok(());
    };
    let shown = cmd.join(" ");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let text = text.trim();
    let text: String = text.chars().take(500).collect();
    Err(format!("`{shown}` failed ({}): {text}", out.status))
}

fn installed_unit(root: &Root, svc: &str) -> Option<PathBuf> {
    [
        "/etc/systemd/system",
        "/lib/systemd/system",
        "/usr/lib/systemd/system",
    ]
    .iter()
    .map(|d| root.path(format!("{d}/{svc}.service")))
    .find(|p| p.exists())
}

fn is_ours(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(WRITTEN_BY))
}

fn systemd_unit(plan: &Plan, env_file: &str, exec: &str) -> String {
    // k3s servers tell systemd when they are up; agents do not.
    let kind = if plan.role.is_server() {
        "notify"
    } else {
        "exec"
    };
    format!(
        "# {WRITTEN_BY}: k3s for the role {role}\n\
         [Unit]\nDescription=Lightweight Kubernetes ({role}, {WRITTEN_BY})\n\
         Documentation=https://k3s.io\nWants=network-online.target\n\
         After=network-online.target\n\n\
         [Service]\nType={kind}\nEnvironmentFile=-{env_file}\n\
         KillMode=process\nDelegate=yes\nLimitNOFILE=1048576\nLimitNPROC=infinity\n\
         LimitCORE=infinity\nTasksMax=infinity\nTimeoutStartSec=0\nRestart=always\n\
         RestartSec=5s\nExecStartPre=-/sbin/modprobe br_netfilter\n\
         ExecStartPre=-/sbin/modprobe overlay\nExecStart={exec}\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        role = plan.role
    )
}

fn openrc_script(svc: &str, bin: &Path, env_file: &str) -> String {
    format!(
        "#!/sbin/openrc-run\n# {WRITTEN_BY}; arguments in /etc/conf.d/{svc}\n\n\
         depend() {{\n    after network-online\n    want cgroups\n}}\n\n\
         supervisor=supervise-daemon\nname={svc}\ncommand={bin}\n\
         output_log=/var/log/{svc}.log\nerror_log=/var/log/{svc}.log\n\
         pidfile=/var/run/{svc}.pid\nrespawn_delay=5\nrespawn_max=0\n\n\
         set -o allexport\nif [ -f {env_file} ]; then . {env_file}; fi\nset +o allexport\n",
        bin = sh_quote(&bin.to_string_lossy())
    )
}

/// `KEY=value` lines of the plan's environment, values quoted by `quote`.
fn env_lines(plan: &Plan, quote: fn(&str) -> String) -> String {
    let mut out = format!("# {WRITTEN_BY}\n");
    for (k, v) in &plan.env {
        if is_env_name(k) {
            out.push_str(&format!("{k}={}\n", quote(v)));
        } else {
            log::warn!("k3s environment: {k:?} is not a variable name; left out");
        }
    }
    out
}

fn is_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,@+".contains(c))
}

/// A word for `sh` (single quotes unless plain). Inside single quotes every byte but `'` is
/// literal, control characters included (and [`service_files`] refuses those anyway).
fn sh_quote(s: &str) -> String {
    if is_plain(s) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A value for a systemd `EnvironmentFile` (double quotes unless plain). systemd reads a
/// backslash before `"`, `\`, `` ` `` or `$` as that character and has no escape for control
/// characters (inside quotes they are literal; [`service_files`] refuses them).
fn systemd_env_value(s: &str) -> String {
    if is_plain(s) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '`' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A word of a systemd `ExecStart=` line: `%` and `$` doubled (specifiers, variables), double
/// quotes unless plain, `"` and `\` escaped, and every control character written as a C escape
/// (`\n`, `\r`, `\t`, `\xNN`; systemd decodes them): the line can never be ended early.
fn systemd_quote(s: &str) -> String {
    let escaped = s.replace('%', "%%").replace('$', "$$");
    if is_plain(s) {
        return escaped;
    }
    let mut out = String::with_capacity(escaped.len() + 2);
    out.push('"');
    for c in escaped.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k3s::K3sRole;
    use std::collections::BTreeMap;

    fn temp_root(name: &str) -> Root {
        let d = std::env::temp_dir().join(format!("kp2p-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Root::new(d)
    }

    fn plan(role: K3sRole) -> Plan {
        let mut env = BTreeMap::new();
        env.insert("K3S_TOKEN".to_string(), "K10x::server:y".to_string());
        env.insert("NOTE".to_string(), "two words \"q\" 'x'".to_string());
        Plan {
            role,
            args: vec![
                "agent".into(),
                "--node-ip=10.1.0.2".into(),
                "--node-label=a b".into(),
            ],
            env,
        }
    }

    #[test]
    fn detects_init_systems_under_the_root() {
        let root = temp_root("detect");
        assert_eq!(detect(&root), InitSystem::None);
        std::fs::create_dir_all(root.path("/run/openrc")).unwrap();
        assert_eq!(detect(&root), InitSystem::OpenRc);
        std::fs::remove_dir_all(root.path("/run/openrc")).unwrap();
        std::fs::create_dir_all(root.path("/sbin")).unwrap();
        std::fs::write(root.path("/sbin/openrc-run"), "").unwrap();
        assert_eq!(detect(&root), InitSystem::OpenRc);
        std::fs::create_dir_all(root.path("/run/systemd/system")).unwrap();
        assert_eq!(detect(&root), InitSystem::Systemd, "systemd wins");
        std::fs::remove_dir_all(root.dir()).unwrap();
    }

    #[test]
    fn systemd_files() {
        let root = temp_root("systemd");
        let bin = Path::new("/usr/local/bin/k3s");
        let files = service_files(InitSystem::Systemd, &root, &plan(K3sRole::Worker), bin).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, root.path("/etc/sysconfig/k3s-agent"));
        assert_eq!(files[0].mode, 0o600);
        assert!(files[0].contents.contains("K3S_TOKEN=K10x::server:y\n"));
        assert!(
            files[0]
                .contents
                .contains("NOTE=\"two words \\\"q\\\" 'x'\"\n"),
            "{}",
            files[0].contents
        );
        assert_eq!(
            files[1].path,
            root.path("/etc/systemd/system/k3s-agent.service")
        );
        assert!(files[1].contents.contains(
            "ExecStart=/usr/local/bin/k3s agent --node-ip=10.1.0.2 \"--node-label=a b\"\n"
        ));
        assert!(files[1].contents.contains("Type=exec"));
        // Our own unit is rewritten; an installed one gets a drop-in.
        std::fs::create_dir_all(root.path("/etc/systemd/system")).unwrap();
        std::fs::write(&files[1].path, &files[1].contents).unwrap();
        let again = service_files(InitSystem::Systemd, &root, &plan(K3sRole::Worker), bin).unwrap();
        assert_eq!(again[1].path, files[1].path);
        std::fs::write(
            &files[1].path,
            "[Service]\nExecStart=/usr/local/bin/k3s agent\n",
        )
        .unwrap();
        let dropin =
            service_files(InitSystem::Systemd, &root, &plan(K3sRole::Worker), bin).unwrap();
        assert_eq!(
            dropin[1].path,
            root.path("/etc/systemd/system/k3s-agent.service.d/50-kairos-p2p.conf")
        );
        assert!(
            dropin[1]
                .contents
                .contains("ExecStart=\nExecStart=/usr/local/bin/k3s agent")
        );
        assert!(
            dropin[1]
                .contents
                .contains("EnvironmentFile=-/etc/sysconfig/k3s-agent")
        );
        assert_eq!(
            start_commands(InitSystem::Systemd, "k3s-agent")
                .last()
                .unwrap(),
            &["systemctl", "restart", "--no-block", "k3s-agent"]
        );
        std::fs::remove_dir_all(root.dir()).unwrap();
    }

    #[test]
    fn openrc_files() {
        let root = temp_root("openrc");
        let p = plan(K3sRole::Master);
        let files =
            service_files(InitSystem::OpenRc, &root, &p, Path::new("/usr/bin/k3s")).unwrap();
        let paths: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            paths,
            [
                root.path("/etc/rancher/k3s/k3s.env"),
                root.path("/etc/conf.d/k3s"),
                root.path("/etc/init.d/k3s")
            ]
        );
        assert_eq!(files[0].mode, 0o600);
        assert!(
            files[0]
                .contents
                .contains("NOTE='two words \"q\" '\\''x'\\'''\n")
        );
        assert!(
            files[1]
                .contents
                .contains("command_args='agent --node-ip=10.1.0.2 '\\''--node-label=a b'\\'''\n"),
            "{}",
            files[1].contents
        );
        assert_eq!(files[2].mode, 0o755);
        assert!(files[2].contents.starts_with("#!/sbin/openrc-run\n"));
        assert!(files[2].contents.contains("command=/usr/bin/k3s\n"));
        assert_eq!(
            start_commands(InitSystem::OpenRc, "k3s"),
            [
                ["rc-update", "add", "k3s", "default"].as_slice(),
                &["rc-service", "k3s", "restart"]
            ]
        );
        assert!(
            service_files(InitSystem::None, &root, &p, Path::new("k3s"))
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(root.dir()).unwrap();
    }

    /// Hostile values never end a line of a unit file: control characters in an `ExecStart=` word
    /// become C escapes; a plan carrying one is refused for every init system's files.
    #[test]
    fn hostile_values_are_escaped_or_refused() {
        for (word, want) in [
            ("a\rExecStart=/bin/sh", "\"a\\rExecStart=/bin/sh\""),
            ("a\nb\tc", "\"a\\nb\\tc\""),
            ("a\u{0}b\u{1b}c\u{7f}", "\"a\\x00b\\x1bc\\x7f\""),
            ("a\u{85}b", "\"a\\x85b\""),
            ("%h $HOME \"q\" \\", "\"%%h $$HOME \\\"q\\\" \\\\\""),
        ] {
            let quoted = systemd_quote(word);
            assert_eq!(quoted, want, "{word:?}");
            assert!(!quoted.chars().any(char::is_control), "{quoted:?}");
        }
        assert_eq!(
            systemd_env_value("a \"b\" $c `d` \\e"),
            "\"a \\\"b\\\" \\$c \\`d\\` \\\\e\""
        );
        let root = temp_root("hostile");
        let bin = Path::new("/usr/local/bin/k3s");
        let hostile = [
            ("argument", "--node-label=a\rExecStart=/bin/sh"),
            ("env value", "K10x\nExecStart=/bin/sh"),
            ("env name", "\r"),
        ];
        for init in [InitSystem::Systemd, InitSystem::OpenRc, InitSystem::None] {
            for (what, value) in hostile {
                let mut p = plan(K3sRole::Worker);
                match what {
                    "argument" => p.args.push(value.to_string()),
                    "env value" => drop(p.env.insert("K3S_TOKEN".into(), value.into())),
                    _ => drop(p.env.insert(value.into(), "x".into())),
                }
                let e = service_files(init, &root, &p, bin).unwrap_err();
                assert!(
                    e.to_string().contains("control character"),
                    "{init} {what}: {e}"
                );
            }
            let e = service_files(init, &root, &plan(K3sRole::Worker), Path::new("/bin/k3s\n"))
                .unwrap_err();
            assert!(e.to_string().contains("binary"), "{e}");
        }
        std::fs::remove_dir_all(root.dir()).unwrap();
    }

    #[test]
    fn failed_commands_are_named() {
        let e = run(&["/nonexistent/systemctl".to_string(), "enable".into()]).unwrap_err();
        assert!(e.contains("/nonexistent/systemctl enable"), "{e}");
        let e = run(&["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()]).unwrap_err();
        assert!(e.contains("boom") && e.contains("sh -c"), "{e}");
        assert!(run(&["true".into()]).is_ok());
    }
}
