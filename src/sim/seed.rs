//! Seeds for scenarios and the replay line printed when one fails.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Environment variable that overrides a scenario's seeds: one seed, or several separated by
/// commas.
pub const SEED_ENV: &str = "SIM_SEED";

/// The seeds to run: those of [`SEED_ENV`] when set and valid, else `defaults`.
#[must_use]
pub fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var(SEED_ENV) {
        Ok(text) => {
            let parsed: Result<Vec<u64>, _> =
                text.split(',').map(|s| s.trim().parse::<u64>()).collect();
            match parsed {
                Ok(list) if !list.is_empty() => list,
                _ => defaults.to_vec(),
            }
        }
        Err(_) => defaults.to_vec(),
    }
}

/// The command that replays `test` of integration-test target `target` with `seed`.
#[must_use]
pub fn replay_command(seed: u64, target: &str, test: &str) -> String {
    format!("{SEED_ENV}={seed} cargo test --release --test {target} -- {test} --exact")
}

/// Runs `scenario` once per seed of [`seeds`]; when one panics, panics again with the seed and
/// the exact command that replays it (`target` is the test crate, `env!("CARGO_CRATE_NAME")`,
/// `test` the test function's name).
pub fn run_seeded(target: &str, test: &str, defaults: &[u64], scenario: impl Fn(u64)) {
    for seed in seeds(defaults) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| scenario(seed))) {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            let replay = replay_command(seed, target, test);
            panic!("scenario {test} failed with seed {seed}: {message}\nreplay: {replay}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_seed_names_the_command_that_replays_it() {
        if std::env::var_os(SEED_ENV).is_some() {
            return; // The seeds are the caller's, not the defaults this test relies on.
        }
        let result = catch_unwind(|| {
            run_seeded("sim_x", "some_test", &[7, 8], |seed| {
                assert_ne!(seed, 8, "boom");
            });
        });
        let message = result
            .err()
            .and_then(|p| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(message.contains("seed 8"), "{message}");
        assert!(message.contains("boom"), "{message}");
        assert!(
            message.contains("SIM_SEED=8 cargo test --release --test sim_x -- some_test --exact"),
            "{message}"
        );
    }
}
