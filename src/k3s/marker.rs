//! Markers in the state directory that make the k3s set-up resumable and idempotent.
//!
//! - `k3s-deployed`: the node finished setting up k3s for a role and a plan (its hash). A node
//!   that finds its current plan there does not redo the set-up (it only starts its supervised
//!   k3s again, or checks the API and publishes again).
//! - `k3s-cluster-init`: the `master/clusterinit` server reached its API once, so its datastore
//!   exists: it is never given `--cluster-init` again (a restart resumes the cluster, it never
//!   initialises a second one).
//!
//! Both are small JSON documents, written atomically with mode 0600.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::{self, FileError};

/// File name of the deployed marker.
pub const DEPLOYED: &str = "k3s-deployed";
/// File name of the cluster-init marker.
pub const CLUSTER_INIT: &str = "k3s-cluster-init";

/// What the deployed marker records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// The role set up (`master`, `master/clusterinit`, `master/ha`, `worker`).
    pub role: String,
    /// [`Plan::hash`](super::plan::Plan::hash) of the plan set up.
    pub plan: String,
    /// When, in unix seconds.
    pub at: u64,
}

/// The markers of one state directory.
#[derive(Debug, Clone)]
pub struct Markers {
    dir: PathBuf,
}

impl Markers {
    /// The markers in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The deployed marker; `Ok(None)` when absent. A marker that does not parse is reported
    /// as an error (the caller then sets up again, which is idempotent).
    pub fn deployed(&self) -> Result<Option<Deployed>, String> {
        let path = self.path(DEPLOYED);
        match files::read(&path).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is not a deployed marker: {e}", path.display())),
        }
    }

    /// Whether the deployed marker records exactly `role` and `plan_hash`.
    pub fn is_deployed(&self, role: &str, plan_hash: &str) -> bool {
        matches!(self.deployed(), Ok(Some(d)) if d.role == role && d.plan == plan_hash)
    }

    /// Records that `role` with `plan_hash` is set up.
    pub fn set_deployed(
        &self,
        role: &str,
        plan_hash: &str,
        unix_secs: u64,
    ) -> Result<(), FileError> {
        let d = Deployed {
            role: role.to_string(),
            plan: plan_hash.to_string(),
            at: unix_secs,
        };
        let json = serde_json::to_vec(&d).unwrap_or_default();
        files::write(&self.path(DEPLOYED), &json, files::PRIVATE).map(|_| ())
    }

    /// Forgets both markers (the node left its cluster: the next role is set up afresh).
    pub fn clear(&self) -> Result<(), String> {
        for name in [DEPLOYED, CLUSTER_INIT] {
            let path = self.path(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
            }
        }
        Ok(())
    }

    /// Whether this node's cluster-init server created its datastore already.
    pub fn cluster_initialised(&self) -> bool {
        self.path(CLUSTER_INIT).exists()
    }

    /// Records that the cluster-init server's datastore exists.
    pub fn set_cluster_initialised(&self, unix_secs: u64) -> Result<(), FileError> {
        let json = format!("{{\"at\":{unix_secs}}}");
        files::write(&self.path(CLUSTER_INIT), json.as_bytes(), files::PRIVATE).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kp2p-marker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn deployed_marker_round_trip() {
        let d = dir("deployed");
        let m = Markers::new(&d);
        assert_eq!(m.deployed(), Ok(None));
        assert!(!m.is_deployed("worker", "abc"));
        m.set_deployed("worker", "abc", 7).unwrap();
        assert!(m.is_deployed("worker", "abc"));
        assert!(
            !m.is_deployed("worker", "abd"),
            "another plan is not deployed"
        );
        assert!(
            !m.is_deployed("master", "abc"),
            "another role is not deployed"
        );
        let meta = std::fs::metadata(d.join(DEPLOYED)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        std::fs::write(d.join(DEPLOYED), "garbage").unwrap();
        let e = m.deployed().unwrap_err();
        assert!(e.contains(DEPLOYED), "{e}");
        assert!(!m.is_deployed("worker", "abc"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cluster_init_marker() {
        let d = dir("init");
        let m = Markers::new(&d);
        assert!(!m.cluster_initialised());
        m.set_cluster_initialised(1).unwrap();
        assert!(m.cluster_initialised());
        assert!(Markers::new(&d).cluster_initialised(), "survives a restart");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
