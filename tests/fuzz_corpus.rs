//! The fuzz corpus and regressions (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) run
//! through the same bodies as the fuzz targets ([`switchyard::fuzzing::TARGETS`]), on the stable
//! toolchain and under the same allocation bound: no input may panic, break a property or allocate
//! past the bound. No broker needed; CI runs it with the other tests. Fuzzing itself:
//! `deploy/local/fuzz.sh` (README, "Fuzzing").

#[path = "../fuzz/alloc_bound.rs"]
mod alloc_bound;

#[global_allocator]
static ALLOC: alloc_bound::Bounded = alloc_bound::Bounded;

use std::path::{Path, PathBuf};

use switchyard::fuzzing::{target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly under `dir`, sorted (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_fuzz_target_is_registered_and_has_a_corpus() {
    let mut names: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    names.sort();
    let mut registered: Vec<String> = TARGETS.iter().map(|t| t.name.to_string()).collect();
    registered.sort();
    assert_eq!(names, registered, "fuzz/fuzz_targets/ and fuzzing::TARGETS");
    for t in TARGETS {
        assert!(
            !files(&fuzz_dir().join("corpus").join(t.name)).is_empty(),
            "fuzz/corpus/{} is empty",
            t.name
        );
    }
    // Regressions only for targets that exist.
    for dir in std::fs::read_dir(fuzz_dir().join("regressions"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let name = dir.file_name().to_string_lossy().into_owned();
        assert!(
            target(&name).is_some(),
            "fuzz/regressions/{name}: no such target"
        );
    }
}

#[test]
fn corpus_and_regressions_pass_every_target() {
    let mut failed = Vec::new();
    let mut ran = 0;
    for t in TARGETS {
        for kind in ["corpus", "regressions"] {
            for file in files(&fuzz_dir().join(kind).join(t.name)) {
                let data = match std::fs::read(&file) {
                    Ok(d) => d,
                    // A fuzzer running on the corpus replaces inputs by smaller ones.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        failed.push(format!("{}: cannot be read: {e}", file.display()));
                        continue;
                    }
                };
                ran += 1;
                let run = t.run;
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    failed.push(file.display().to_string());
                }
            }
        }
    }
    assert!(ran > 0, "no corpus files found under fuzz/");
    assert!(
        failed.is_empty(),
        "{} of {ran} inputs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
