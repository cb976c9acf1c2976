//! Issue 16, goal 4 at test size: 200 nodes of one token in 10 clusters (`network_id`s) of 20,
//! on two subnets joined through the DHT, started within a second. Every cluster forms: every
//! node holds a role and each cluster has exactly one master. No time is asserted (the scale
//! benchmark, `cargo bench --bench scale`, measures the 1,000-node run); no node holds an entry
//! of another cluster's bucket but its nodes' announcements, and every node holds every node's
//! address claim. Optimised builds
//! (`make sim-properties`) run 200 nodes; debug builds (the plain `cargo test` pass) 10 x 5.
//!
//! `SIM_SEED=<n>` replays one seed; `SIM_SCALE_CLUSTERS` and `SIM_SCALE_PER_CLUSTER` change the
//! size (for profiling).

use kairos_p2p::sim::scale::{ScaleSpec, formation};
use kairos_p2p::sim::seed::run_seeded;

const TARGET: &str = env!("CARGO_CRATE_NAME");

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn ten_clusters_of_one_token_all_form() {
    run_seeded(TARGET, "ten_clusters_of_one_token_all_form", &[1], |seed| {
        let spec = ScaleSpec::new(
            seed,
            env_num("SIM_SCALE_CLUSTERS", 10),
            env_num(
                "SIM_SCALE_PER_CLUSTER",
                if cfg!(debug_assertions) { 5 } else { 20 },
            ),
        );
        let (_, report) = formation(spec).expect("simulation");
        eprintln!(
            "{} nodes: formed at {:?} virtual, {:.1} s wall, {} steps, replication {:?}, \
             ledgers {:?}",
            spec.nodes(),
            report.formed_at,
            report.wall.as_secs_f64(),
            report.steps,
            report.replication,
            report.ledgers
        );
        for (id, c) in &report.clusters {
            assert_eq!(c.with_role, c.nodes, "{id}: {c:?}");
            assert_eq!(c.masters, 1, "{id}: {c:?}");
        }
        assert_eq!(report.clusters.len(), spec.clusters);
        // Each cluster's bucket stays within the cluster but for its nodes' announcements
        // (`ledger::Scope`), and every node holds every other node's address claim.
        assert_eq!(
            report.ledgers.other_clusters_not_announcements, 0,
            "{:?}",
            report.ledgers
        );
        assert!(
            report.ledgers.dhcp_claims >= (spec.nodes() * spec.nodes()) as u64,
            "{:?}",
            report.ledgers
        );
        assert!(report.formed_at.is_some());
    });
}
