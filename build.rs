//! Build script: two facts the benchmark suite needs at run time.
//!
//! * `DISCO_GIT_COMMIT`: the short commit the binary was built from, with
//!   `-dirty` when tracked files differed from it (`unknown` outside git).
//!   Result folders are named after it (`bench-results/<date>-<commit>/`).
//! * `$OUT_DIR/bench_scenarios.rs`: every `benches/scenarios/*.toml`, embedded
//!   with `include_str!`, so `disco bench all` works from any directory and a
//!   new scenario file is picked up by the next build without code changes.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=10", "HEAD"]) {
        Some(c) if !c.is_empty() => {
            // Only tracked files count (untracked build outputs do not).
            let dirty = git(&[
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=DISCO_GIT_COMMIT={commit}");
    // Re-run when the commit or the sources change (a changed source can
    // make the tree dirty or clean).
    for p in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", p]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &head_ref]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    for p in ["src", "benches", "Cargo.toml", "build.rs"] {
        println!("cargo:rerun-if-changed={p}");
    }

    // The shipped scenarios, sorted by file name.
    let dir = Path::new("benches/scenarios");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let mut code = String::from(
        "/// `benches/scenarios/*.toml`: (file name, text), sorted by name.\n\
         pub const SHIPPED_SCENARIOS: &[(&str, &str)] = &[\n",
    );
    for f in &files {
        let path = Path::new(&manifest).join(dir).join(f);
        code += &format!(
            "    ({f:?}, include_str!({:?})),\n",
            path.display().to_string()
        );
    }
    code += "];\n";
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("bench_scenarios.rs");
    std::fs::write(out, code).expect("writing bench_scenarios.rs");
}
