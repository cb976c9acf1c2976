//! k3s as a child of the agent, when there is no init system: started with the plan's
//! arguments and environment, its output forwarded to our log (prefixed `k3s[pid]:`),
//! restarted with exponential back-off when it exits, stopped with SIGTERM (then SIGKILL after
//! a grace period) when the agent stops. The child also gets SIGTERM if the agent dies
//! (`PR_SET_PDEATHSIG`), so a restarted agent never finds an orphaned k3s holding its ports.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ROOT_ENV;
use super::plan::Plan;

/// Restart and stop timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperviseTiming {
    /// First restart delay; doubled after each exit, up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// A child that ran this long resets the delay to `backoff_min`.
    pub stable_after: Duration,
    /// Between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
}

impl Default for SuperviseTiming {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            grace: Duration::from_secs(20),
        }
    }
}

/// What happened to the child since the last poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildStatus {
    /// Running with this pid.
    Running(u32),
    /// Not running; restarted at the instant given. The string says why it is not running.
    Waiting(String, Instant),
}

/// The supervised k3s.
#[derive(Debug)]
pub struct Supervisor {
    bin: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    timing: SuperviseTiming,
    child: Option<Child>,
    started_at: Option<Instant>,
    backoff: Duration,
    restart_at: Option<Instant>,
    last_exit: Option<String>,
    starts: u32,
}

impl Supervisor {
    /// A supervisor of `bin` running `plan`; nothing starts before [`Supervisor::poll`].
    pub fn new(bin: &Path, plan: &Plan, timing: SuperviseTiming) -> Self {
        Self {
            bin: bin.to_path_buf(),
            args: plan.args.clone(),
            env: plan.env.clone(),
            timing,
            child: None,
            started_at: None,
            backoff: timing.backoff_min,
            restart_at: None,
            last_exit: None,
            starts: 0,
        }
    }

    /// Whether it runs `bin` with `plan`.
    pub fn runs(&self, bin: &Path, plan: &Plan) -> bool {
        self.bin == bin && self.args == plan.args && self.env == plan.env
    }

    /// Uses `bin` and `plan` from the next start on (the running child is left alone).
    pub fn set_plan(&mut self, bin: &Path, plan: &Plan) {
        self.bin = bin.to_path_buf();
        self.args = plan.args.clone();
        self.env = plan.env.clone();
    }

    /// The running child's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many times the child was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// When [`Supervisor::poll`] has something to do next (a restart); `None` while running.
    pub fn next_restart(&self) -> Option<Instant> {
        if self.child.is_some() {
            None
        } else {
            self.restart_at
        }
    }

    /// Notices an exit, starts the child when it is due; says where it stands.
    pub fn poll(&mut self, now: Instant) -> ChildStatus {
        if let Some(child) = &mut self.child {
            let pid = child.id();
            let exited = match child.try_wait() {
                Ok(None) => return ChildStatus::Running(pid),
                Ok(Some(status)) => format!("k3s (pid {pid}) exited: {status}"),
                Err(e) => format!("k3s (pid {pid}) cannot be waited for: {e}"),
            };
            self.child = None;
            if self
                .started_at
                .is_some_and(|t| now.saturating_duration_since(t) >= self.timing.stable_after)
            {
                self.backoff = self.timing.backoff_min;
            }
            self.schedule_restart(now, exited);
        }
        if self.restart_at.is_some_and(|t| now < t) {
            let why = self.last_exit.clone().unwrap_or_default();
            return ChildStatus::Waiting(why, self.restart_at.unwrap_or(now));
        }
        match self.spawn() {
            Ok(child) => {
                let pid = child.id();
                self.child = Some(child);
                self.started_at = Some(now);
                self.restart_at = None;
                self.starts += 1;
                log::info!(
                    "k3s started (pid {pid}): {} {}",
                    self.bin.display(),
                    shown(&self.args)
                );
                ChildStatus::Running(pid)
            }
            Err(e) => {
                self.schedule_restart(now, e);
                let why = self.last_exit.clone().unwrap_or_default();
                ChildStatus::Waiting(why, self.restart_at.unwrap_or(now))
            }
        }
    }

    fn schedule_restart(&mut self, now: Instant, why: String) {
        log::warn!(
            "{why}; starting it again in {:.1} s",
            self.backoff.as_secs_f64()
        );
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.timing.backoff_max);
        self.last_exit = Some(why);
    }

    fn spawn(&self) -> Result<Child, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| {
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                }),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches the agent, which stops it.
            .process_group(0);
        if let Some(root) = std::env::var_os(ROOT_ENV) {
            cmd.env(ROOT_ENV, root);
        }
        cmd.envs(&self.env);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            forward(out, pid);
        }
        if let Some(err) = child.stderr.take() {
            forward(err, pid);
        }
        Ok(child)
    }

    /// Stops the child: SIGTERM, then SIGKILL after the grace period. No restart follows.
    pub fn stop(&mut self) {
        self.restart_at = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        log::info!("stopping k3s (pid {pid})");
        if let Ok(raw) = i32::try_from(pid) {
            // SAFETY: plain kill(2) of our own child, which has not been reaped yet.
            unsafe {
                libc::kill(raw, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.timing.grace;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => {
                    log::info!("k3s (pid {pid}) stopped: {status}");
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        log::warn!(
            "k3s (pid {pid}) still running {} s after SIGTERM: killing it",
            self.timing.grace.as_secs()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The arguments for a log line, without secrets.
fn shown(args: &[String]) -> String {
    Plan {
        role: super::K3sRole::Worker,
        args: args.to_vec(),
        env: BTreeMap::new(),
    }
    .shown_args()
}

/// Longest output line forwarded (longer ones are cut).
const MAX_LINE: usize = 4096;

/// Forwards the child's output to our log, line by line, from a small thread of its own.
fn forward(stream: impl Read + Send + 'static, pid: u32) {
    let spawned = std::thread::Builder::new()
        .name(format!("k3s-log-{pid}"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader
                    .by_ref()
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        log::info!(target: "k3s", "k3s[{pid}]: {}", text.trim_end());
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot forward the output of k3s (pid {pid}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k3s::K3sRole;

    fn script(dir: &Path, body: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join("k3s");
        let tmp = dir.join("k3s.tmp");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    fn plan(args: &[&str], env: &[(&str, &str)]) -> Plan {
        Plan {
            role: K3sRole::Worker,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks the process exists.
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn restarts_with_backoff_and_passes_args_and_env() {
        let dir = std::env::temp_dir().join(format!("kp2p-sup-restart-{}", std::process::id()));
        let log = dir.join("runs");
        let bin = script(
            &dir,
            &format!(
                "echo \"$* K3S_URL=$K3S_URL HOME=${{HOME:-unset}}\" >> {}\nexit 3",
                log.display()
            ),
        );
        let timing = SuperviseTiming {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            stable_after: Duration::from_secs(60),
            grace: Duration::from_secs(2),
        };
        let p = plan(
            &["agent", "--with-node-id"],
            &[("K3S_URL", "https://10.1.0.1:6443")],
        );
        let mut s = Supervisor::new(&bin, &p, timing);
        assert!(s.runs(&bin, &p));
        let t0 = Instant::now();
        let mut delays = Vec::new();
        let mut last_start = None;
        while s.starts() < 4 {
            let now = Instant::now();
            if let ChildStatus::Running(_) = s.poll(now) {
                if last_start != Some(s.starts()) {
                    last_start = Some(s.starts());
                    delays.push(now - t0);
                }
            }
            assert!(
                now - t0 < Duration::from_secs(10),
                "no restarts: {delays:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_for("the fourth run", || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 4)
        });
        let runs = std::fs::read_to_string(&log).unwrap();
        assert!(
            runs.lines()
                .all(|l| l == "agent --with-node-id K3S_URL=https://10.1.0.1:6443 HOME=unset"),
            "{runs}"
        );
        // Back-off: 100, 200, 400 ms between the starts (at least).
        let gaps: Vec<_> = delays.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
        assert!(gaps[1] >= Duration::from_millis(200), "{gaps:?}");
        assert!(gaps[2] >= Duration::from_millis(400), "{gaps:?}");
        match s.poll(Instant::now()) {
            ChildStatus::Waiting(why, _) => assert!(why.contains("exited"), "{why}"),
            ChildStatus::Running(_) => {}
        }
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The supervised child gets each argument and variable exactly as planned, one argv entry
    /// each: no shell ever reads them (blanks, quotes, `$(...)` and globs stay text).
    #[test]
    fn hostile_arguments_reach_the_child_verbatim() {
        let dir = std::env::temp_dir().join(format!("kp2p-sup-verbatim-{}", std::process::id()));
        let out = dir.join("argv");
        let pwned = dir.join("pwned");
        let bin = script(
            &dir,
            &format!(
                "printf '%s\\n' \"$@\" \"URL=$K3S_URL\" > {out}.tmp && mv {out}.tmp {out}\nsleep 30",
                out = out.display()
            ),
        );
        let injected = format!("$(touch {})", pwned.display());
        let args = [
            "agent",
            "--node-label=a b",
            injected.as_str(),
            "'q'\"x\";id",
            "*",
        ];
        let url = format!("https://10.1.0.1:6443`touch {}`", pwned.display());
        let p = plan(&args, &[("K3S_URL", url.as_str())]);
        let mut s = Supervisor::new(&bin, &p, SuperviseTiming::default());
        s.poll(Instant::now());
        wait_for("the child's argv", || out.exists());
        let got = std::fs::read_to_string(&out).unwrap();
        let mut want: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        want.push(format!("URL={url}"));
        assert_eq!(got.lines().collect::<Vec<_>>(), want);
        assert!(!pwned.exists());
        s.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stop_terminates_then_kills() {
        let dir = std::env::temp_dir().join(format!("kp2p-sup-stop-{}", std::process::id()));
        let timing = SuperviseTiming {
            grace: Duration::from_millis(300),
            ..SuperviseTiming::default()
        };
        // Honours SIGTERM.
        let bin = script(&dir, "trap 'exit 0' TERM\nwhile true; do sleep 0.05; done");
        let mut s = Supervisor::new(&bin, &plan(&["server"], &[]), timing);
        let ChildStatus::Running(pid) = s.poll(Instant::now()) else {
            panic!("not started");
        };
        assert!(alive(pid));
        let t = Instant::now();
        s.stop();
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "SIGTERM was enough"
        );
        assert!(s.pid().is_none());
        assert_eq!(s.next_restart(), None, "no restart after stop");
        // Ignores SIGTERM: killed after the grace period.
        let bin = script(&dir, "trap '' TERM\nwhile true; do sleep 0.05; done");
        let mut s = Supervisor::new(&bin, &plan(&["server"], &[]), timing);
        let ChildStatus::Running(pid) = s.poll(Instant::now()) else {
            panic!("not started");
        };
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        drop(s);
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(!alive(pid), "killed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_binary_is_retried_not_fatal() {
        let timing = SuperviseTiming {
            backoff_min: Duration::from_millis(10),
            ..SuperviseTiming::default()
        };
        let mut s = Supervisor::new(
            Path::new("/nonexistent/k3s"),
            &plan(&["server"], &[]),
            timing,
        );
        match s.poll(Instant::now()) {
            ChildStatus::Waiting(why, at) => {
                assert!(why.contains("/nonexistent/k3s"), "{why}");
                assert!(at > Instant::now() - Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        assert!(s.next_restart().is_some());
    }
}
