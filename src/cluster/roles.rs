//! Role assignment after the master is chosen: the leader's duties (HA masters, workers, forced
//! roles, freeing the slots of dead nodes with `dynamic_roles`) as a pure function of the view.

use std::collections::BTreeSet;

use crate::config::Role;
use crate::ledger::names;

use super::Write;
use super::view::View;

/// How roles are handed out in one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolePolicy {
    /// `master/ha` nodes beyond the cluster-init master (`p2p.auto.ha.master_nodes` when HA is
    /// on, else 0).
    pub ha_masters: usize,
    /// `p2p.dynamic_roles`: dead `master/ha` and workers lose their role and the slot is filled.
    pub dynamic: bool,
}

impl RolePolicy {
    /// The role the chosen master gets: `master/clusterinit` with HA, `master` without.
    pub fn master_role(&self) -> &'static str {
        if self.ha_masters > 0 {
            names::ROLE_MASTER_CLUSTERINIT
        } else {
            names::ROLE_MASTER
        }
    }
}

/// What the leader does now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Role writes and deletions.
    pub writes: Vec<Write>,
    /// Nodes that asked for `master` but can get neither master role.
    pub refused_masters: Vec<String>,
}

/// The leader's role writes for `view` of network `bucket`, given the chosen `master`.
///
/// Roles are sticky: a node that holds one keeps it (a dead master, above all, is never
/// replaced: that would start a second cluster). New live nodes get `master/ha` while HA slots
/// are free (nodes that asked for `master` first, then by rank), else `worker`; a node that asked
/// for `master` gets no role rather than a worker's. With `dynamic` roles, dead `master/ha` and
/// worker nodes lose their role and free HA slots are filled from live workers that did not ask
/// to be workers.
pub fn assign(view: &View, bucket: &str, master: &str, policy: RolePolicy) -> Assignment {
    let mut out = Assignment::default();
    let master_role = policy.master_role();
    if view
        .nodes
        .get(master)
        .is_some_and(|n| n.role.as_deref() != Some(master_role))
    {
        out.writes
            .push(Write::put(bucket, &names::role_key(master), master_role));
    }
    let mut freed: BTreeSet<&str> = BTreeSet::new();
    if policy.dynamic {
        for (uuid, n) in &view.nodes {
            let slot = matches!(
                n.role.as_deref(),
                Some(names::ROLE_MASTER_HA | names::ROLE_WORKER)
            );
            if slot && !n.live && uuid != master {
                out.writes
                    .push(Write::delete(bucket, &names::role_key(uuid)));
                freed.insert(uuid);
            }
        }
    }
    let holds = |uuid: &str, role: &str| {
        !freed.contains(uuid)
            && view
                .nodes
                .get(uuid)
                .is_some_and(|n| n.role.as_deref() == Some(role))
    };
    let mut ha = view
        .nodes
        .keys()
        .filter(|u| holds(u, names::ROLE_MASTER_HA))
        .count();
    let mut unassigned: Vec<(&String, Role, u32)> = view
        .live_eligible()
        .filter(|(u, n)| n.role.is_none() && u.as_str() != master)
        .map(|(u, n)| (u, n.asked, n.rank))
        .collect();
    // Asked-for masters first, then by rank, highest first.
    unassigned.sort_by(|a, b| {
        (b.1 == Role::Master)
            .cmp(&(a.1 == Role::Master))
            .then(b.2.cmp(&a.2))
            .then(a.0.cmp(b.0))
    });
    for (uuid, asked, _) in unassigned {
        let role = if asked != Role::Worker && ha < policy.ha_masters {
            ha += 1;
            names::ROLE_MASTER_HA
        } else if asked == Role::Master {
            out.refused_masters.push(uuid.clone());
            continue;
        } else {
            names::ROLE_WORKER
        };
        out.writes
            .push(Write::put(bucket, &names::role_key(uuid), role));
    }
    if policy.dynamic && ha < policy.ha_masters {
        let mut workers: Vec<(&String, u32)> = view
            .live_eligible()
            .filter(|(u, n)| {
                n.asked != Role::Worker && holds(u, names::ROLE_WORKER) && u.as_str() != master
            })
            .map(|(u, n)| (u, n.rank))
            .collect();
        workers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (uuid, _) in workers.into_iter().take(policy.ha_masters - ha) {
            out.writes.push(Write::put(
                bucket,
                &names::role_key(uuid),
                names::ROLE_MASTER_HA,
            ));
        }
    }
    out
}
