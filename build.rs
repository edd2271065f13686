//! Compiles the shipped defaults into the binary: `deploy/switchyard.yaml`, every topic definition
//! under `topics/` and every Avro schema under `schemas/` (see `src/embedded.rs`). A file added to
//! those folders is picked up without touching code.

use std::fmt::Write as _;
use std::path::Path;

fn files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn main() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&root);
    let mut out = String::new();
    let config = root.join("deploy/switchyard.yaml");
    let _ = writeln!(
        out,
        "/// The shipped config (`deploy/switchyard.yaml`).\npub const CONFIG: &str = include_str!({:?});",
        config.display().to_string()
    );
    let _ = writeln!(
        out,
        "/// Topic definitions (`topics/*.yaml`): (file name, text).\npub const TOPICS: &[(&str, &str)] = &["
    );
    for p in files(&root.join("topics"), "yaml") {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            p.display().to_string()
        );
    }
    let _ = writeln!(out, "];");
    let _ = writeln!(
        out,
        "/// Avro schemas (`schemas/*.avsc`): (name, text).\npub const SCHEMAS: &[(&str, &str)] = &["
    );
    for p in files(&root.join("schemas"), "avsc") {
        let name = p
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            p.display().to_string()
        );
    }
    let _ = writeln!(out, "];");
    let dest =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("embedded.rs");
    std::fs::write(&dest, out).expect("write embedded.rs");
    for d in ["deploy/switchyard.yaml", "topics", "schemas"] {
        println!("cargo:rerun-if-changed={d}");
    }
}
