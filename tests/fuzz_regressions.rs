//! Replays every kept fuzz input on the stable toolchain: the committed seeds
//! (`tests/fuzz/seeds/<target>/`, a minimised corpus plus hand-written inputs) and the inputs of
//! crashes found and fixed (`tests/fuzz/regressions/<target>/`), through the same functions the
//! libFuzzer targets call (`tests/fuzz/bodies.rs`). A panic names the target and the file.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "fuzz/bodies.rs"]
mod bodies;

/// Every file directly in `dir`, sorted (none when `dir` does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_is_handled_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut failures = Vec::new();
    for (name, body) in bodies::TARGETS {
        let seeds = inputs(&root.join("seeds").join(name));
        let regressions = inputs(&root.join("regressions").join(name));
        // The seeds are committed: an empty directory means they were lost, not that all passed.
        assert!(
            !seeds.is_empty(),
            "no seeds for fuzz target {name} in tests/fuzz/seeds/{name}"
        );
        for file in seeds.iter().chain(&regressions) {
            let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failures.push(format!("{name}: {}", file.display()));
            }
        }
        eprintln!(
            "fuzz {name}: {} seed(s), {} regression input(s) replayed",
            seeds.len(),
            regressions.len()
        );
    }
    assert!(
        failures.is_empty(),
        "fuzz inputs that panic:\n{}",
        failures.join("\n")
    );
}
