//! The k3s worker thread: performs the blocking steps for the event loop and reports back
//! through a channel and a [`mio::Waker`].
//!
//! Steps for a [`Want`] (role and facts from the event loop):
//! 1. the plan ([`plan::plan`], with the cluster-init marker);
//! 2. the k3s binary (`KAIROS_P2P_K3S`, else `k3s` on `PATH`); missing: `failed`, retried;
//! 3. unless the deployed marker already records this role and plan: KubeVIP manifests
//!    (servers) and the init system's files, then its start commands; with no init system the
//!    agent's [`Supervisor`] runs k3s (every start of the agent);
//! 4. servers: wait for the API ([`publish::ready`]); the cluster-init server then records
//!    that its datastore exists (its plan loses `--cluster-init`); masters read the join data
//!    and send it to the event loop, which writes it to the ledger;
//! 5. the deployed marker.
//!
//! Every step is idempotent: a node stopped anywhere in between does the rest on its next
//! start, and never a second cluster-init.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::Waker;

use super::init::{self, InitSystem};
use super::marker::Markers;
use super::plan::{self, Facts, Plan};
use super::publish::{self, JoinData};
use super::supervise::{ChildStatus, SuperviseTiming, Supervisor};
use super::{K3sRole, K3sState, Root, kubevip};
use crate::config::Config;

/// Timing of the worker's retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The supervised child's restarts and stop.
    pub supervise: SuperviseTiming,
    /// Between two readiness checks of the API.
    pub ready_retry: Duration,
    /// TCP connect timeout of a readiness check.
    pub connect_timeout: Duration,
    /// Between two attempts after a failure (binary missing, a command failed).
    pub retry: Duration,
    /// How often a supervised child is checked for an exit.
    pub child_check: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            supervise: SuperviseTiming::default(),
            // A file check and a TCP connect to our own node: cheap, and the whole cluster waits
            // for the master's API to be seen ready.
            ready_retry: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            retry: Duration::from_secs(30),
            child_check: Duration::from_millis(500),
        }
    }
}

/// What the worker needs to know besides the wants.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The configuration (k3s, k3s-agent, kubevip, p2p.auto.ha blocks).
    pub config: Config,
    /// The state directory (markers).
    pub state_dir: PathBuf,
    /// The root prefix of system paths.
    pub root: Root,
    /// The init system.
    pub init: InitSystem,
    /// `KAIROS_P2P_K3S`, when set.
    pub binary: Option<PathBuf>,
    /// `PATH`, to find `k3s` when `binary` is not set.
    pub path: Option<OsString>,
    /// Retry timing.
    pub timing: Timing,
}

/// What the event loop wants: the node's role and the facts its plan depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// Role and facts (`cluster_initialised` is the worker's business: it reads the marker).
    pub facts: Facts,
    /// The address a master publishes as `ip-master` (the KubeVIP EIP, else its node address).
    pub publish_address: String,
    /// The LAN interface (the KubeVIP VIP's when `kubevip.interface` is empty).
    pub lan_iface: String,
}

/// From the event loop to the worker.
#[derive(Debug)]
pub enum Command {
    /// Run k3s for this want (replaces the previous one).
    Apply(Want),
    /// This node left its cluster (a merge of two clusters): stop the k3s server, move its
    /// data directory aside (kept) and forget the set-up; the next [`Command::Apply`] sets the
    /// new role up afresh.
    LeaveCluster,
    /// Stop (the supervised k3s too) and end the thread.
    Stop,
}

/// From the worker to the event loop.
#[derive(Debug)]
pub enum Report {
    /// k3s' state changed.
    State(K3sState),
    /// A master's API is ready: publish this.
    Publish(JoinData),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    FindBinary,
    Install,
    WaitReady,
    Done,
}

struct Job {
    want: Want,
    plan: Plan,
    bin: PathBuf,
    step: Step,
    next_at: Instant,
    waiting_since: Instant,
    logged_wait: Option<Instant>,
}

/// The worker's state, owned by its thread.
pub struct Worker {
    s: WorkerSettings,
    markers: Markers,
    reports: Sender<Report>,
    waker: Arc<Waker>,
    job: Option<Job>,
    supervisor: Option<Supervisor>,
    state: Option<K3sState>,
}

impl Worker {
    /// A worker reporting to `reports` and waking the loop with `waker`.
    pub fn new(s: WorkerSettings, reports: Sender<Report>, waker: Arc<Waker>) -> Self {
        Self {
            markers: Markers::new(&s.state_dir),
            s,
            reports,
            waker,
            job: None,
            supervisor: None,
            state: None,
        }
    }

    /// Runs until [`Command::Stop`] or until the event loop drops its sender; stops the
    /// supervised k3s on the way out.
    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            let now = Instant::now();
            let wait = self.next_wake().map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(now)
            });
            match commands.recv_timeout(wait) {
                Ok(Command::Apply(want)) => self.apply(want),
                Ok(Command::LeaveCluster) => self.leave_cluster(),
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.step(Instant::now());
        }
        if let Some(mut s) = self.supervisor.take() {
            s.stop();
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let job = self
            .job
            .as_ref()
            .filter(|j| j.step != Step::Done)
            .map(|j| j.next_at);
        let child = self.supervisor.as_ref().map(|s| {
            s.next_restart()
                .unwrap_or_else(|| Instant::now() + self.s.timing.child_check)
        });
        [job, child].into_iter().flatten().min()
    }

    fn report(&mut self, r: Report) {
        if let Report::State(s) = &r {
            if self.state.as_ref() == Some(s) {
                return;
            }
            match s {
                K3sState::Failed(why) => log::warn!("k3s: {why}"),
                other => log::info!("k3s: {other}"),
            }
            self.state = Some(s.clone());
        }
        if self.reports.send(r).is_ok() {
            if let Err(e) = self.waker.wake() {
                log::warn!("cannot wake the event loop: {e}");
            }
        }
    }

    fn fail(&mut self, why: String) {
        self.report(Report::State(K3sState::Failed(why)));
    }

    fn plan_for(&self, want: &Want) -> Result<Plan, String> {
        let facts = Facts {
            cluster_initialised: want.facts.role == K3sRole::ClusterInit
                && self.markers.cluster_initialised(),
            ..want.facts.clone()
        };
        plan::plan(&self.s.config, &facts).map_err(|e| e.to_string())
    }

    fn apply(&mut self, want: Want) {
        if self.job.as_ref().is_some_and(|j| j.want == want) {
            return;
        }
        let plan = match self.plan_for(&want) {
            Ok(p) => p,
            Err(e) => return self.fail(format!("no k3s plan for {}: {e}", want.facts.role)),
        };
        if let Some(job) = &mut self.job {
            if job.plan == plan {
                // Same invocation (e.g. only the published address changed).
                let redo_publish = job.want.publish_address != want.publish_address;
                job.want = want;
                if redo_publish && job.step == Step::Done && job.plan.role.publishes() {
                    job.step = Step::WaitReady;
                    job.next_at = Instant::now();
                }
                return;
            }
            log::info!("k3s: the plan changed; setting k3s up again");
            let joined = job.want.facts.node_token.as_ref();
            let joins = want.facts.node_token.as_ref();
            if let (Some(old), Some(new)) = (joined, joins) {
                if !old.same_cluster(new) {
                    // Another k3s cluster (two clusters merged): the pods of the old one, its
                    // CNI bridge and flannel addresses would clash with the new cluster's.
                    log::warn!(
                        "k3s: this node now joins another k3s cluster (another node token): \
                         stopping k3s and its pods first"
                    );
                    if let Some(mut s) = self.supervisor.take() {
                        s.stop();
                    }
                    self.kill_containers();
                }
            }
        }
        let now = Instant::now();
        self.job = Some(Job {
            want,
            plan,
            bin: PathBuf::new(),
            step: Step::FindBinary,
            next_at: now,
            waiting_since: now,
            logged_wait: None,
        });
        self.report(Report::State(K3sState::Starting));
    }

    fn leave_cluster(&mut self) {
        if let Some(mut s) = self.supervisor.take() {
            s.stop();
        }
        for cmd in init::stop_server_commands(self.s.init) {
            if let Err(e) = init::run(&cmd) {
                // The data of a server that may still run is not moved under it.
                self.job = None;
                return self.fail(format!(
                    "leaving the cluster: {e}; k3s server data left in place: stop k3s and move \
                     it aside by hand (see the README, \"Second master\")"
                ));
            }
        }
        self.kill_containers();
        let data_dir = super::data_dir(&self.s.config.k3s.args);
        match super::move_server_data_aside(&self.s.root, &data_dir, unix_secs()) {
            Ok(Some(kept)) => log::warn!(
                "k3s: left the cluster: k3s server stopped, its data kept in {}",
                kept.display()
            ),
            Ok(None) => log::warn!(
                "k3s: left the cluster: k3s server stopped ({} held no server data)",
                self.s.root.path(data_dir.join("server")).display()
            ),
            Err(e) => log::error!("k3s: left the cluster: k3s server stopped, but {e}"),
        }
        if let Err(e) = self.markers.clear() {
            log::warn!("k3s: {e}");
        }
        self.job = None;
        self.state = None;
        self.report(Report::State(K3sState::WaitingForRole));
    }

    /// Stops the containers the stopped server leaves running (k3s keeps them across a stop,
    /// see k3s' "Stopping K3s"): runs `k3s-killall.sh` ([`find_killall`]), bounded by
    /// [`MAX_KILLALL_TIME`]; without it, says what is left to do.
    fn kill_containers(&self) {
        let k3s = find_k3s(self.s.binary.as_deref(), self.s.path.as_deref()).ok();
        let Some(script) = find_killall(k3s.as_deref(), self.s.path.as_deref()) else {
            log::warn!(
                "k3s: no {KILLALL_SCRIPT} beside k3s or on PATH: the old server's pods may keep \
                 running until the node reboots (see the README, \"Second master\")"
            );
            return;
        };
        match run_bounded(&script, MAX_KILLALL_TIME) {
            Ok(()) => log::info!("k3s: ran {}", script.display()),
            Err(e) => log::warn!("k3s: {}: {e}", script.display()),
        }
    }

    fn step(&mut self, now: Instant) {
        // Steps that succeed go straight on to the next one.
        for _ in 0..4 {
            let Some(job) = &self.job else { break };
            if job.step == Step::Done || now < job.next_at {
                break;
            }
            let before = job.step;
            match before {
                Step::FindBinary => self.find_binary(now),
                Step::Install => self.install(now),
                Step::WaitReady => self.wait_ready(now),
                Step::Done => {}
            }
            if self.job.as_ref().is_none_or(|j| j.step == before) {
                break;
            }
        }
        self.watch_child(now);
    }

    fn find_binary(&mut self, now: Instant) {
        match find_k3s(self.s.binary.as_deref(), self.s.path.as_deref()) {
            Ok(bin) => {
                if let Some(job) = &mut self.job {
                    job.bin = bin;
                    job.step = Step::Install;
                }
                self.report(Report::State(K3sState::Starting));
            }
            Err(why) => {
                self.fail(format!(
                    "{why}; keeping the role and the VPN, looking again in {} s",
                    self.s.timing.retry.as_secs()
                ));
                if let Some(job) = &mut self.job {
                    job.next_at = now + self.s.timing.retry;
                }
            }
        }
    }

    fn install(&mut self, now: Instant) {
        let Some(job) = &self.job else { return };
        let (plan, bin) = (job.plan.clone(), job.bin.clone());
        let role = plan.role;
        let deployed = self.markers.is_deployed(role.as_str(), &plan.hash());
        if deployed {
            log::info!("k3s: already set up for {role} with this plan (deployed marker)");
        } else {
            log::info!(
                "k3s: setting up {role} ({}), init system {}",
                plan.shown_args(),
                self.s.init
            );
            let lan_iface = job.want.lan_iface.clone();
            if let Err(e) = self.write_setup(&plan, &bin, &lan_iface) {
                self.fail(e);
                if let Some(job) = &mut self.job {
                    job.next_at = now + self.s.timing.retry;
                }
                return;
            }
        }
        if self.s.init == InitSystem::None {
            match &mut self.supervisor {
                Some(s) if s.runs(&bin, &plan) => {}
                Some(s) => {
                    s.stop();
                    s.set_plan(&bin, &plan);
                }
                None => {
                    self.supervisor = Some(Supervisor::new(&bin, &plan, self.s.timing.supervise))
                }
            }
        } else if !deployed {
            for cmd in init::start_commands(self.s.init, plan.service()) {
                if let Err(e) = init::run(&cmd) {
                    self.fail(e);
                    if let Some(job) = &mut self.job {
                        job.next_at = now + self.s.timing.retry;
                    }
                    return;
                }
            }
        }
        if let Some(job) = &mut self.job {
            job.waiting_since = now;
            job.next_at = now;
            job.step = if role.is_server() {
                Step::WaitReady
            } else {
                Step::Done
            };
        }
        self.watch_child(now);
        if !role.is_server() {
            self.finish(now);
        }
    }

    /// KubeVIP (servers) and the init system's files.
    fn write_setup(&self, plan: &Plan, bin: &std::path::Path, iface: &str) -> Result<(), String> {
        if plan.role.is_server() {
            kubevip::deploy(&self.s.config, &self.s.root, iface)?;
        }
        let files = init::service_files(self.s.init, &self.s.root, plan, bin)
            .map_err(|e| format!("k3s service files not written: {e}"))?;
        for f in files {
            super::files::write(&f.path, f.contents.as_bytes(), f.mode)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn wait_ready(&mut self, now: Instant) {
        let Some(job) = &mut self.job else { return };
        let node_ip = job.want.facts.node_ip;
        if let Err(why) = publish::ready(&self.s.root, node_ip, self.s.timing.connect_timeout) {
            job.next_at = Instant::now() + self.s.timing.ready_retry;
            if job
                .logged_wait
                .is_none_or(|t| now >= t + Duration::from_secs(30))
            {
                job.logged_wait = Some(now);
                log::info!(
                    "k3s: waiting for the API ({} s so far): {why}",
                    now.saturating_duration_since(job.waiting_since).as_secs()
                );
            }
            return;
        }
        log::info!(
            "k3s: API ready after {} s",
            now.saturating_duration_since(job.waiting_since).as_secs()
        );
        let role = job.plan.role;
        if role == K3sRole::ClusterInit && !self.markers.cluster_initialised() {
            if let Err(e) = self.markers.set_cluster_initialised(unix_secs()) {
                return self.retry_later(now, e.to_string());
            }
            log::info!("k3s: cluster initialised; later starts resume it without --cluster-init");
            if let Err(e) = self.replan_after_init() {
                return self.retry_later(now, e);
            }
        }
        if role.publishes() {
            let Some(job) = &self.job else { return };
            match publish::read_join_data(&self.s.root, &job.want.publish_address) {
                Ok(data) => self.report(Report::Publish(data)),
                Err(e) => return self.retry_later(now, format!("cannot publish: {e}")),
            }
        }
        self.finish(now);
    }

    /// The cluster-init server's plan without `--cluster-init`, written where the next start
    /// reads it (no restart now).
    fn replan_after_init(&mut self) -> Result<(), String> {
        let Some(job) = &self.job else {
            return Ok(());
        };
        let plan = self.plan_for(&job.want)?;
        let bin = job.bin.clone();
        let files = init::service_files(self.s.init, &self.s.root, &plan, &bin)
            .map_err(|e| format!("k3s service files not written: {e}"))?;
        for f in files {
            super::files::write(&f.path, f.contents.as_bytes(), f.mode)
                .map_err(|e| e.to_string())?;
        }
        for cmd in init::reload_commands(self.s.init) {
            init::run(&cmd)?;
        }
        if let Some(s) = &mut self.supervisor {
            s.set_plan(&bin, &plan);
        }
        if let Some(job) = &mut self.job {
            job.plan = plan;
        }
        Ok(())
    }

    fn retry_later(&mut self, now: Instant, why: String) {
        self.fail(why);
        if let Some(job) = &mut self.job {
            job.next_at = now + self.s.timing.ready_retry;
        }
    }

    fn finish(&mut self, now: Instant) {
        let Some(job) = &mut self.job else { return };
        job.step = Step::Done;
        let (role, hash) = (job.plan.role, job.plan.hash());
        if !self.markers.is_deployed(role.as_str(), &hash) {
            if let Err(e) = self.markers.set_deployed(role.as_str(), &hash, unix_secs()) {
                log::warn!("k3s: {e} (the set-up will be checked again at the next start)");
            }
        }
        if self.supervisor.is_none() {
            self.report(Report::State(K3sState::Deployed));
        }
        self.watch_child(now);
    }

    /// Restarts the supervised child when due and reports where it stands.
    fn watch_child(&mut self, now: Instant) {
        let Some(s) = &mut self.supervisor else {
            return;
        };
        let status = s.poll(now);
        let ready = self.job.as_ref().is_some_and(|j| j.step == Step::Done);
        let state = match status {
            ChildStatus::Running(pid) if ready => K3sState::Running { pid },
            ChildStatus::Running(_) => K3sState::Starting,
            ChildStatus::Waiting(why, at) => K3sState::Failed(format!(
                "{why}; restarting in {:.0} s",
                at.saturating_duration_since(now).as_secs_f64()
            )),
        };
        self.report(Report::State(state));
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The k3s binary: `explicit` (`KAIROS_P2P_K3S`) if given, else `k3s` in `path` (`PATH`).
pub fn find_k3s(
    explicit: Option<&std::path::Path>,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(p) = explicit {
        return if executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(format!(
                "k3s binary not found: {}={} is not an executable file",
                super::K3S_BIN_ENV,
                p.display()
            ))
        };
    }
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("k3s"))
        .find(|p| executable(p))
        .ok_or_else(|| {
            format!(
                "k3s binary not found: no executable k3s on PATH (install k3s or set {})",
                super::K3S_BIN_ENV
            )
        })
}

/// The script k3s' installer puts beside the k3s binary to stop every k3s process and
/// container of the node (its data is kept).
pub const KILLALL_SCRIPT: &str = "k3s-killall.sh";

/// Longest [`KILLALL_SCRIPT`] may run before it is killed (it unmounts and stops every pod).
pub const MAX_KILLALL_TIME: Duration = Duration::from_secs(120);

/// [`KILLALL_SCRIPT`] beside the k3s binary `k3s`, else on `path`; `None` when neither has it.
pub fn find_killall(
    k3s: Option<&std::path::Path>,
    path: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    let beside = k3s
        .and_then(std::path::Path::parent)
        .map(|d| d.join(KILLALL_SCRIPT));
    beside
        .into_iter()
        .chain(
            path.into_iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join(KILLALL_SCRIPT)),
        )
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
}

/// Runs `program` without arguments (output discarded), killing it after `limit`.
fn run_bounded(program: &std::path::Path, limit: Duration) -> Result<(), String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("it failed ({status})")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {} s: killed", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k3s::value::K3sToken;

    #[test]
    fn finds_the_killall_script_beside_k3s_first_then_on_path() {
        let dir = std::env::temp_dir().join(format!("kp2p-killall-{}", std::process::id()));
        let (bin, other) = (dir.join("bin"), dir.join("other"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let k3s = bin.join("k3s");
        let on_path = std::env::join_paths([&other]).unwrap();
        assert_eq!(find_killall(Some(&k3s), Some(&on_path)), None);
        std::fs::write(other.join(KILLALL_SCRIPT), "#!/bin/sh\n").unwrap();
        assert_eq!(
            find_killall(Some(&k3s), Some(&on_path)),
            Some(other.join(KILLALL_SCRIPT))
        );
        std::fs::write(bin.join(KILLALL_SCRIPT), "#!/bin/sh\n").unwrap();
        assert_eq!(
            find_killall(Some(&k3s), Some(&on_path)),
            Some(bin.join(KILLALL_SCRIPT))
        );
        assert_eq!(find_killall(None, None), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_killall_script_that_hangs_is_killed_and_one_that_fails_is_reported() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("kp2p-killall-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let ok = script("ok.sh", "exit 0");
        let fails = script("fails.sh", "exit 3");
        let hangs = script("hangs.sh", "exec sleep 30");
        assert_eq!(run_bounded(&ok, Duration::from_secs(5)), Ok(()));
        let e = run_bounded(&fails, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("failed"), "{e}");
        let t = Instant::now();
        let e = run_bounded(&hangs, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_binary() {
        let dir = std::env::temp_dir().join(format!("kp2p-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = std::env::join_paths([dir.join("none"), dir.clone()]).unwrap();
        let e = find_k3s(None, Some(&path)).unwrap_err();
        assert!(e.contains("PATH"), "{e}");
        let bin = dir.join("k3s");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        assert!(find_k3s(None, Some(&path)).is_err(), "not executable");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_k3s(None, Some(&path)).unwrap(), bin);
        assert_eq!(find_k3s(Some(&bin), None).unwrap(), bin);
        let e = find_k3s(Some(&dir.join("nope")), Some(&path)).unwrap_err();
        assert!(e.contains("KAIROS_P2P_K3S") && e.contains("nope"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A k3s stand-in shell script: logs its arguments and K3S_TOKEN, writes the node token and
    /// k3s.yaml under the root (servers), runs until SIGTERM.
    fn fake_k3s(dir: &std::path::Path, root: &Root) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(dir).unwrap();
        let bin = dir.join("k3s");
        let script = format!(
            "#!/bin/sh\necho \"$* token=$K3S_TOKEN root=$KAIROS_P2P_ROOT\" >> {log}\n\
             if [ \"$1\" = server ]; then\n  mkdir -p {tokdir} {yamldir}\n  \
             echo 'K10fake::server:secret' > {tokdir}/node-token\n  \
             printf 'apiVersion: v1\\nclusters:\\n- cluster:\\n    server: https://127.0.0.1:6443\\n' > {yamldir}/k3s.yaml\nfi\n\
             trap 'exit 0' TERM\nwhile true; do sleep 0.05; done\n",
            log = dir.join("runs").display(),
            tokdir = root.path("/var/lib/rancher/k3s/server").display(),
            yamldir = root.path("/etc/rancher/k3s").display(),
        );
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    struct Harness {
        _poll: mio::Poll,
        commands: std::sync::mpsc::Sender<Command>,
        reports: std::sync::mpsc::Receiver<Report>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Harness {
        fn start(settings: WorkerSettings) -> Self {
            let poll = mio::Poll::new().unwrap();
            let waker = Arc::new(Waker::new(poll.registry(), mio::Token(1)).unwrap());
            let (commands, rx) = std::sync::mpsc::channel();
            let (tx, reports) = std::sync::mpsc::channel();
            let w = Worker::new(settings, tx, waker);
            let thread = Some(std::thread::spawn(move || w.run(rx)));
            Self {
                _poll: poll,
                commands,
                reports,
                thread,
            }
        }

        /// Reports until `until` says stop (or 10 s pass).
        fn wait(&self, mut until: impl FnMut(&Report) -> bool) -> Vec<Report> {
            let end = Instant::now() + Duration::from_secs(10);
            let mut seen = Vec::new();
            while Instant::now() < end {
                if let Ok(r) = self.reports.recv_timeout(Duration::from_millis(50)) {
                    let done = until(&r);
                    seen.push(r);
                    if done {
                        return seen;
                    }
                }
            }
            panic!("timed out; reports: {seen:?}");
        }

        fn stop(mut self) {
            self.commands.send(Command::Stop).unwrap();
            self.thread.take().unwrap().join().unwrap();
        }
    }

    fn settings(dir: &std::path::Path, config: &str) -> WorkerSettings {
        let root = Root::new(dir.join("root"));
        let text = format!("#cloud-config\np2p:\n  network_id: t\n{config}");
        let config = crate::config::parse(
            &[(std::path::Path::new("t.yaml"), &text)],
            &crate::config::HostFacts::default(),
        )
        .unwrap();
        let bin = fake_k3s(&dir.join("bin"), &root);
        WorkerSettings {
            config,
            state_dir: dir.join("state"),
            root,
            init: InitSystem::None,
            binary: Some(bin),
            path: None,
            timing: Timing {
                ready_retry: Duration::from_millis(50),
                connect_timeout: Duration::from_millis(200),
                retry: Duration::from_millis(100),
                child_check: Duration::from_millis(20),
                supervise: SuperviseTiming {
                    backoff_min: Duration::from_millis(50),
                    grace: Duration::from_secs(2),
                    ..SuperviseTiming::default()
                },
            },
        }
    }

    fn want(role: K3sRole, ip: std::net::IpAddr) -> Want {
        Want {
            facts: Facts {
                role,
                node_ip: ip,
                iface: "edgevpn0".into(),
                master: None,
                node_token: None,
                cluster_initialised: false,
            },
            publish_address: ip.to_string(),
            lan_iface: "eth0".into(),
        }
    }

    /// The cluster-init master: supervised, waits for its API, publishes, records its markers;
    /// restarted, it resumes without `--cluster-init` and publishes again.
    #[test]
    fn cluster_init_master_publishes_and_resumes() {
        let dir = std::env::temp_dir().join(format!("kp2p-worker-ci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The "API": a listener on a loopback address of its own, port 6443.
        let ip: std::net::IpAddr = format!(
            "127.77.{}.{}",
            std::process::id() % 200,
            1 + std::process::id() % 250
        )
        .parse()
        .unwrap();
        let _api = std::net::TcpListener::bind((ip, crate::k3s::API_PORT)).unwrap();
        let s = settings(&dir, "  auto:\n    ha:\n      master_nodes: 1\n");
        let runs = dir.join("bin/runs");
        let markers = Markers::new(&s.state_dir);

        let h = Harness::start(s.clone());
        h.commands
            .send(Command::Apply(want(K3sRole::ClusterInit, ip)))
            .unwrap();
        let seen = h.wait(|r| matches!(r, Report::State(K3sState::Running { .. })));
        let data = seen
            .iter()
            .find_map(|r| match r {
                Report::Publish(d) => Some(d.clone()),
                _ => None,
            })
            .expect("published before running");
        assert_eq!(data.node_token, "K10fake::server:secret");
        assert_eq!(data.address, ip.to_string());
        assert!(String::from_utf8_lossy(&data.kubeconfig).contains("127.0.0.1:6443"));
        assert!(markers.cluster_initialised());
        let deployed = markers.deployed().unwrap().unwrap();
        assert_eq!(deployed.role, "master/clusterinit");
        h.stop();
        let first = std::fs::read_to_string(&runs).unwrap();
        assert_eq!(first.lines().count(), 1, "{first}");
        assert!(first.contains("server --node-ip="), "{first}");
        assert!(first.contains("--cluster-init"), "{first}");
        assert!(
            first.contains(&format!(
                "root={}",
                std::env::var(crate::k3s::ROOT_ENV).unwrap_or_default()
            )),
            "the child inherits KAIROS_P2P_ROOT: {first}"
        );

        // Restart (the node rebooted): no second cluster-init, same plan, published again.
        let h = Harness::start(s.clone());
        h.commands
            .send(Command::Apply(want(K3sRole::ClusterInit, ip)))
            .unwrap();
        let seen = h.wait(|r| matches!(r, Report::State(K3sState::Running { .. })));
        assert!(seen.iter().any(|r| matches!(r, Report::Publish(_))));
        // The files of the first run make it ready at once: let the child start before stopping.
        let end = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&runs).map_or(0, |t| t.lines().count()) < 2 {
            assert!(Instant::now() < end, "the second run never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        h.stop();
        let all = std::fs::read_to_string(&runs).unwrap();
        let second = all.lines().nth(1).unwrap();
        assert!(!second.contains("--cluster-init"), "{all}");
        assert_eq!(
            markers.deployed().unwrap().unwrap(),
            deployed,
            "nothing redone"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A master that leaves its cluster in a merge: its k3s server stops, its server data is
    /// moved aside (kept), its markers are forgotten, and the next role is set up afresh.
    #[test]
    fn a_master_leaving_its_cluster_keeps_its_data_aside() {
        let dir = std::env::temp_dir().join(format!("kp2p-worker-leave-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ip: std::net::IpAddr = format!(
            "127.78.{}.{}",
            std::process::id() % 200,
            1 + std::process::id() % 250
        )
        .parse()
        .unwrap();
        let _api = std::net::TcpListener::bind((ip, crate::k3s::API_PORT)).unwrap();
        let s = settings(&dir, "");
        let markers = Markers::new(&s.state_dir);
        let h = Harness::start(s.clone());
        h.commands
            .send(Command::Apply(want(K3sRole::Master, ip)))
            .unwrap();
        h.wait(|r| matches!(r, Report::State(K3sState::Running { .. })));
        assert!(markers.deployed().unwrap().is_some());
        let token = s.root.path(crate::k3s::NODE_TOKEN_FILE);
        assert!(token.exists());

        h.commands.send(Command::LeaveCluster).unwrap();
        h.wait(|r| matches!(r, Report::State(K3sState::WaitingForRole)));
        assert!(!token.exists(), "the server data is moved away");
        let data = s.root.path(crate::k3s::DEFAULT_DATA_DIR);
        let kept: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("server.left-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            data.join(&kept[0]).join("node-token").exists(),
            "kept, not deleted"
        );
        assert!(markers.deployed().unwrap().is_none());

        // The role the winner's leader gives: a worker of the other cluster.
        let mut w = want(K3sRole::Worker, ip);
        w.facts.master = Some("10.1.0.1".parse().unwrap());
        w.facts.node_token = Some(K3sToken::parse("K10other::server:secret").unwrap());
        h.commands.send(Command::Apply(w)).unwrap();
        h.wait(|r| matches!(r, Report::State(K3sState::Running { .. })));
        let runs = dir.join("bin/runs");
        let end = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&runs).map_or(0, |t| t.lines().count()) < 2 {
            assert!(Instant::now() < end, "the agent never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        h.stop();
        let all = std::fs::read_to_string(&runs).unwrap();
        assert!(all.lines().next().unwrap().starts_with("server "), "{all}");
        assert!(all.lines().nth(1).unwrap().starts_with("agent "), "{all}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A worker: joins with K3S_URL/K3S_TOKEN; a missing binary is reported and retried.
    #[test]
    fn worker_joins_and_a_missing_binary_is_retried() {
        let dir = std::env::temp_dir().join(format!("kp2p-worker-w-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = settings(&dir, "");
        let real = s.binary.replace(dir.join("bin/k3s-later")).unwrap();
        let h = Harness::start(s.clone());
        let mut w = want(K3sRole::Worker, "10.1.0.9".parse().unwrap());
        w.facts.master = Some("10.1.0.1".parse().unwrap());
        w.facts.node_token = Some(K3sToken::parse("K10fake::server:secret").unwrap());
        h.commands.send(Command::Apply(w.clone())).unwrap();
        let seen = h.wait(|r| matches!(r, Report::State(K3sState::Failed(_))));
        let Some(Report::State(K3sState::Failed(why))) = seen.last() else {
            unreachable!()
        };
        assert!(
            why.contains("k3s binary not found") && why.contains("k3s-later"),
            "{why}"
        );
        // The binary appears: the next attempt finds it.
        std::fs::copy(&real, dir.join("bin/k3s-later")).unwrap();
        h.wait(|r| matches!(r, Report::State(K3sState::Running { .. })));
        // Running is reported once the child is spawned: let it log its arguments before stopping.
        let end = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(dir.join("bin/runs")).map_or(true, |t| t.is_empty()) {
            assert!(Instant::now() < end, "the fake k3s never logged its run");
            std::thread::sleep(Duration::from_millis(20));
        }
        h.stop();
        let runs = std::fs::read_to_string(dir.join("bin/runs")).unwrap();
        assert!(
            runs.starts_with("agent --with-node-id --node-ip=10.1.0.9 --flannel-iface=edgevpn0 token=K10fake::server:secret"),
            "{runs}"
        );
        assert!(!s.root.path(crate::k3s::NODE_TOKEN_FILE).exists());
        s.binary = Some(real);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
