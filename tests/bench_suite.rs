//! The benchmark suite through the `disco` binary, on real KVM (and the
//! host's KSM for the sharing scenario): `disco bench all --quick` on the
//! tiny scenarios of `tests/bench-scenarios/`, then `disco bench compare`
//! on the folder it wrote, unchanged and with a planted regression.
//!
//! Checked: every scenario's JSON parses as a record with the machine,
//! commit, parameters, seeds and policies; every figure is present (the same
//! names in every run), measured and finite; every plot is a well-formed SVG
//! (parsed with roxmltree) with data in it (a polyline of finite points or
//! bars of positive height); report.md names every scenario, figure and
//! plot. Speed is not checked (tests never time anything).
//!
//! Bad scenario files are rejected before anything runs (no KVM needed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use disco::bench::suite::{Better, ScenarioRecord};
use disco::kvm_check::require_kvm;

fn disco(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_disco"))
        .args(args)
        .env("DISCO_LOG", "warn")
        .output()
        .expect("the disco binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench-scenarios")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("disco-bench-suite-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The figures each kind must report (a subset: the ones the issue asks for).
fn required_figures(kind: &str) -> &'static [&'static str] {
    match kind {
        "density" => &[
            "VMs per second (create + start)",
            "host memory per VM beyond guest RAM",
        ],
        "overhead" => &[
            "sweep-4MiB-1vcpu-2passes/static: disco/bare wall",
            "fill-4MiB-1vcpu/static: disco/bare guest run",
        ],
        "sharing" => &[
            "disco: time to steady state",
            "KSM: time to steady state",
            "KSM time / disco time (steady state)",
            "copy-on-write break: handler median",
            "copy-on-write break: handler p99",
        ],
        // tests/bench-scenarios/locality.toml runs static and migrate-only.
        "locality" => &[
            "static: local fraction, first quarter",
            "static: local fraction, last quarter",
            "static: modelled cost, last quarter",
            "static: pages migrated",
            "migrate-only: local fraction, first quarter",
            "migrate-only: local fraction, last quarter",
            "migrate-only: modelled cost, first quarter",
            "migrate-only: modelled cost, last quarter",
            "migrate-only: time to 90 % local",
            "migrate-only: pages migrated",
        ],
        // tests/bench-scenarios/replication.toml runs static and replicate-only.
        "replication" => &[
            "static: local fraction, last quarter",
            "static: write latency per page",
            "replicate-only: local fraction, first quarter",
            "replicate-only: local fraction, last quarter",
            "replicate-only: replicas made",
            "replicate-only: replicas collapsed",
            "replicate-only: extra replica pages at the write",
            "replicate-only: machine pages holding the table at the write",
            "replicate-only: write: copy-on-write breaks",
            "replicate-only: write latency per page",
        ],
        "migration" => &[
            "batched migration / memcpy",
            "memcpy",
            "batched migration (move_pages)",
            "single-page migration (move_page)",
            "guest slowdown while its pages move",
        ],
        // tests/bench-scenarios/scale.toml runs static and disco.
        "scale" => &[
            "static: guest run (slowest VM)",
            "disco: guest run / static",
            "static: memory saved",
            "disco: memory saved",
            "disco: scanner CPU per merge",
            "disco: kernel mappings at the end per 16 guest frames",
            "disco: monitor memory (RssAnon) / guest RAM",
        ],
        // tests/bench-scenarios/api.toml runs 4 VMs.
        "api" => &[
            "VMs created and started per second through the API",
            "VMs created and started per second by disco run",
            "GET /v1/vms p50 (4 VMs running)",
            "GET /v1/vms p99 (4 VMs running)",
            "PUT /v1/vms/{name} p50 (4 VMs running)",
            "PUT /v1/vms/{name} p99 (4 VMs running)",
        ],
        // tests/bench-scenarios/clone.toml makes 4 clones of an 8 MiB VM.
        "clone" => &[
            "clones started per second",
            "ms per clone",
            "new host memory per clone before it writes",
            "all new host memory per clone before it writes (pool, monitor RssAnon, page tables)",
            "monitor memory (RssAnon) per clone",
            "restore of one VM",
        ],
        "live-migration" => &[
            "sweeper: downtime",
            "sweeper: bytes sent / distinct non-zero pages",
            "pair: bytes together / separately",
        ],
        other => panic!("unexpected kind {other}"),
    }
}

/// A well-formed SVG document with data: at least one polyline with two or
/// more finite points inside the view box, or a bar of positive height.
fn check_svg(path: &Path) {
    let svg = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&svg)
        .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg", "{}", path.display());
    let dim = |a: &str| -> f64 { root.attribute(a).unwrap().parse().unwrap() };
    let (w, h) = (dim("width"), dim("height"));
    let mut lines = 0;
    let mut bars = 0;
    for n in root.descendants() {
        match n.tag_name().name() {
            "polyline" => {
                let pts: Vec<(f64, f64)> = n
                    .attribute("points")
                    .unwrap()
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').expect("x,y");
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect();
                for &(x, y) in &pts {
                    assert!(
                        x.is_finite()
                            && y.is_finite()
                            && (0.0..=w).contains(&x)
                            && (0.0..=h).contains(&y),
                        "{}: point ({x}, {y}) outside the {w}x{h} view",
                        path.display()
                    );
                }
                if pts.len() >= 2 {
                    lines += 1;
                }
            }
            "rect" if n.attribute("class") == Some("bar") => {
                let height: f64 = n.attribute("height").unwrap().parse().unwrap();
                if height > 0.0 {
                    bars += 1;
                }
            }
            _ => {}
        }
    }
    assert!(
        lines + bars > 0,
        "{} has no data (no polyline, no bar)",
        path.display()
    );
}

fn check_record(dir: &Path, r: &ScenarioRecord) {
    let name = &r.scenario;
    assert!(
        !r.git_commit.is_empty() && r.git_commit != "unknown",
        "{name}: commit {}",
        r.git_commit
    );
    assert!(r.quick, "{name}: ran in quick mode");
    assert!(
        r.command.contains("bench all --quick"),
        "{name}: {}",
        r.command
    );
    let m = &r.machine;
    assert!(
        m.cpus >= 1 && m.cores >= 1 && m.numa_nodes >= 1,
        "{name}: {m:?}"
    );
    assert!(
        m.kernel != "unknown" && m.cpu_model != "unknown",
        "{name}: {m:?}"
    );
    assert!(
        m.kvm_kind != "none" && m.dev_kvm,
        "{name}: KVM recorded as {}",
        m.kvm_kind
    );
    assert!(
        !r.seeds.is_empty() && r.runs.len() == r.seeds.len(),
        "{name}: seeds {:?}",
        r.seeds
    );
    assert!(
        r.params.get("kind").is_some(),
        "{name}: params {}",
        r.params
    );
    assert!(!r.source_text.is_empty(), "{name}: scenario text recorded");
    // migration drives the mapper itself: no policy runs.
    if !["sharing", "migration"].contains(&r.kind.as_str()) {
        assert!(
            r.policies
                .iter()
                .any(|p| p.name == "static" && p.source == "shipped:static" && !p.text.is_empty()),
            "{name}: policies {:?}",
            r.policies
        );
    }

    // Every figure present (same names in every run and in the pooled list),
    // measured and finite; samples pooled over the seeds.
    assert!(!r.figures.is_empty(), "{name}: no figures");
    let names: Vec<&str> = r.figures.iter().map(|f| f.name.as_str()).collect();
    for run in &r.runs {
        let run_names: Vec<&str> = run.figures.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            run_names, names,
            "{name}: seed {} reports other figures",
            run.seed
        );
        assert!(run.result.is_object(), "{name}: raw result");
        assert!(!run.markdown.is_empty());
    }
    for want in required_figures(&r.kind) {
        assert!(
            names.contains(want),
            "{name}: figure {want:?} missing; has {names:?}"
        );
    }
    for f in &r.figures {
        // "time to 90 % local" is not measured when a policy never gets
        // there (static never does); every other figure must be.
        let Some(s) = f.stats.as_ref() else {
            assert!(
                f.name.contains(": time to "),
                "{name}: figure {:?} was not measured",
                f.name
            );
            continue;
        };
        assert!(!f.unit.is_empty(), "{name}: {} has no unit", f.name);
        assert!(
            s.n >= r.seeds.len() && s.samples.len() == s.n,
            "{name}: {}: {s:?}",
            f.name
        );
        for v in s.samples.iter().chain([&s.median, &s.min, &s.max]) {
            assert!(v.is_finite(), "{name}: {} is not finite: {s:?}", f.name);
        }
        assert!(
            s.min <= s.median && s.median <= s.max,
            "{name}: {}: {s:?}",
            f.name
        );
    }
    assert!(
        r.figures.iter().any(|f| f.headline),
        "{name}: no headline figure"
    );
    assert!(r.figures.iter().any(|f| f.better != Better::Neither));

    // Plots: listed, written, valid, with data.
    assert!(!r.plots.is_empty(), "{name}: no plots");
    for p in &r.plots {
        check_svg(&dir.join(p));
    }
}

#[test]
fn bench_all_quick_writes_results_and_compare_finds_a_planted_regression() {
    if !require_kvm("bench_all_quick_writes_results_and_compare_finds_a_planted_regression") {
        return;
    }
    let out = temp("run");
    let dir = scenario_dir();
    let o = disco(&[
        "bench",
        "all",
        "--quick",
        "--quiet",
        "--dir",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "disco bench all failed:\n{}", text(&o));

    // One record per scenario file, every file of the folder accounted for.
    let records = disco::bench::suite::read_records(&out).unwrap();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "api",
            "clone",
            "density",
            "live-migration",
            "locality",
            "migration",
            "overhead",
            "replication",
            "scale",
            "sharing"
        ],
        "{}",
        text(&o)
    );
    for r in &records {
        // The JSON file also parses as plain JSON with the raw results.
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("{}.json", r.scenario))).unwrap(),
        )
        .unwrap();
        assert!(raw["runs"][0]["result"].is_object());
        check_record(&out, r);
    }
    // The NUMA kinds: what the policies must (not) do.
    let fig = |scenario: &str, name: &str| -> f64 {
        let r = records.iter().find(|r| r.scenario == scenario).unwrap();
        r.figure(name)
            .and_then(|f| f.stats.as_ref())
            .unwrap_or_else(|| panic!("{scenario}: {name} not measured"))
            .median
    };
    assert_eq!(fig("locality", "static: pages migrated"), 0.0);
    assert_eq!(
        fig("locality", "static: local fraction, last quarter"),
        0.0,
        "memory two hops away and never moved"
    );
    assert!(fig("locality", "migrate-only: pages migrated") > 0.0);
    assert_eq!(fig("replication", "static: replicas made"), 0.0);
    assert_eq!(
        fig("replication", "static: write: copy-on-write breaks"),
        0.0
    );
    assert!(
        fig("replication", "replicate-only: replicas made") > 0.0,
        "{}",
        text(&o)
    );
    assert_eq!(fig("scale", "static: memory saved"), 0.0, "sharing off");
    assert!(
        fig("scale", "disco: memory saved") > 16.0,
        "3 VMs with 90 % of their pages identical"
    );
    assert!(
        fig(
            "scale",
            "disco: kernel mappings at the end per 16 guest frames"
        ) < 1.0,
        "the whole process's mappings, with 3 x 16 MiB of guests"
    );
    assert!(fig("api", "VMs created and started per second through the API") > 0.0);
    assert!(fig("clone", "clones started per second") > 0.0);
    assert!(
        fig("api", "GET /v1/vms p99 (4 VMs running)")
            >= fig("api", "GET /v1/vms p50 (4 VMs running)")
    );
    let density = records.iter().find(|r| r.scenario == "density").unwrap();
    assert_eq!(density.seeds, vec![7, 8]);
    assert_eq!(
        density.figures[0].stats.as_ref().unwrap().n,
        2,
        "pooled over two seeds"
    );
    assert_eq!(density.params["vms"], 8, "[quick] overrides applied");
    for f in std::fs::read_dir(&out).unwrap().flatten() {
        let n = f.file_name().to_string_lossy().into_owned();
        assert!(
            n == "report.md" || n.ends_with(".json") || n.ends_with(".svg"),
            "unexpected file {n}"
        );
        if n.ends_with(".svg") {
            assert!(
                records.iter().any(|r| r.plots.contains(&n)),
                "{n} not listed in a record"
            );
        }
    }

    // The report has every scenario, figure and plot.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Headline figures"), "{report}");
    assert!(
        report.contains(&format!("KVM {}", records[0].machine.kvm_kind)),
        "{report}"
    );
    for r in &records {
        assert!(
            report.contains(&format!("## {}", r.scenario)),
            "report lacks {}",
            r.scenario
        );
        for f in &r.figures {
            assert!(report.contains(&f.name), "report lacks figure {}", f.name);
        }
        for p in &r.plots {
            assert!(report.contains(&format!("]({p})")), "report lacks plot {p}");
        }
    }
    // The headline table printed on stdout.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("VMs per second (create + start)"),
        "{stdout}"
    );

    // An unchanged copy: nothing worse, exit 0 even with --fail-on-regression.
    let same = temp("same");
    std::fs::create_dir_all(&same).unwrap();
    for f in std::fs::read_dir(&out).unwrap().flatten() {
        std::fs::copy(f.path(), same.join(f.file_name())).unwrap();
    }
    let o = disco(&[
        "bench",
        "compare",
        out.to_str().unwrap(),
        same.to_str().unwrap(),
        "--fail-on-regression",
    ]);
    assert!(o.status.success(), "unchanged copy flagged:\n{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("\n0 worse, 0 better"), "{table}");
    assert!(!table.contains("WORSE"), "{table}");

    // Plant a regression well beyond the noise: density's VMs per second
    // (higher is better) divided by 10, the copy-on-write median (lower is
    // better) times 10.
    let worse = temp("worse");
    std::fs::create_dir_all(&worse).unwrap();
    for f in std::fs::read_dir(&out).unwrap().flatten() {
        std::fs::copy(f.path(), worse.join(f.file_name())).unwrap();
    }
    let plant = |file: &str, figure: &str, factor: f64| {
        let path = worse.join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let figs = v["figures"].as_array_mut().unwrap();
        let f = figs
            .iter_mut()
            .find(|f| f["name"] == figure)
            .unwrap_or_else(|| panic!("{figure}"));
        let s = &mut f["stats"];
        for k in ["median", "min", "max"] {
            s[k] = (s[k].as_f64().unwrap() * factor).into();
        }
        for x in s["samples"].as_array_mut().unwrap() {
            *x = (x.as_f64().unwrap() * factor).into();
        }
        std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    };
    plant("density.json", "VMs per second (create + start)", 0.1);
    plant("sharing.json", "copy-on-write break: handler median", 10.0);
    let o = disco(&[
        "bench",
        "compare",
        out.to_str().unwrap(),
        worse.to_str().unwrap(),
        "--fail-on-regression",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "planted regression not failed:\n{}",
        text(&o)
    );
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = |figure: &str| {
        table
            .lines()
            .find(|l| l.contains(figure))
            .unwrap_or_else(|| panic!("no row for {figure}:\n{table}"))
            .to_string()
    };
    assert!(
        row("| VMs per second (create + start) |").contains("| WORSE |"),
        "{table}"
    );
    assert!(
        row("| VMs per second (create + start) |").contains("-90.0%"),
        "{table}"
    );
    assert!(
        row("copy-on-write break: handler median").contains("| WORSE |"),
        "{table}"
    );
    assert!(table.contains("\n2 worse, 0 better"), "{table}");
    // Without the flag the comparison is reported, exit 0.
    let o = disco(&[
        "bench",
        "compare",
        out.to_str().unwrap(),
        worse.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The other direction: the same change is an improvement.
    let o = disco(&[
        "bench",
        "compare",
        worse.to_str().unwrap(),
        out.to_str().unwrap(),
        "--fail-on-regression",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\n0 worse, 2 better"),
        "{}",
        text(&o)
    );

    for d in [out, same, worse] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// A scenario that fails while it runs (a valid file whose guests crash:
/// the density bench refuses VMs that do not return the model's checksum)
/// fails the command, and its results folder keeps the error:
/// `<name>.failed.txt` and a "Failed scenarios" section at the top of
/// report.md.
#[test]
fn a_scenario_failing_at_run_time_is_recorded_in_the_results_folder() {
    if !require_kvm("a_scenario_failing_at_run_time_is_recorded_in_the_results_folder") {
        return;
    }
    let dir = temp("fails");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("crashing.toml");
    std::fs::write(
        &file,
        "kind = \"density\"\nseeds = [7]\nvms = 2\nmemory_mib = 4\nreps = 1\n\
         workload = { kind = \"crash\" }\n",
    )
    .unwrap();
    let out = dir.join("out");
    let o = disco(&[
        "bench",
        "run",
        file.to_str().unwrap(),
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success(),
        "the crashing scenario passed:\n{}",
        text(&o)
    );
    let saved = std::fs::read_to_string(out.join("crashing.failed.txt"))
        .unwrap_or_else(|e| panic!("no crashing.failed.txt ({e}):\n{}", text(&o)));
    let why = "did not return the model's checksum";
    assert!(
        saved.contains("crashing.toml") && saved.contains(why) && saved.contains("triple fault"),
        "{saved}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let section = report
        .find("## Failed scenarios")
        .expect("a failure section");
    assert!(report[section..].contains(why), "{report}");
    let failures = disco::bench::suite::read_failures(&out).unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "crashing");
}

#[test]
fn bad_scenario_files_are_rejected_naming_file_key_and_allowed() {
    let dir = temp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let case = |name: &str, body: &str, expect: &[&str]| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let o = disco(&[
            "bench",
            "run",
            path.to_str().unwrap(),
            "--out",
            dir.join("out").to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{name} accepted:\n{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            err.contains(&format!("disco: error: {}: ", path.display())),
            "{name}: {err}"
        );
        for e in expect {
            assert!(err.contains(e), "{name}: expected {e:?} in: {err}");
        }
    };
    case(
        "kind.toml",
        "kind = \"speed\"\n",
        &["key `kind`", "allowed: density, overhead, sharing"],
    );
    case(
        "typo.toml",
        "kind = \"density\"\nvm = 4\n",
        &["key `vm`: unknown key", "allowed: ", "vms"],
    );
    case(
        "range.toml",
        "kind = \"sharing\"\nduplicate_fraction = 1.5\n",
        &["key `duplicate_fraction`: 1.5 is out of range; allowed: 0 to 1"],
    );
    case(
        "quick.toml",
        "kind = \"overhead\"\n[quick]\nreps = 0\n",
        &["key `quick.reps`: 0 is out of range; allowed: 1 to 1000"],
    );
    case(
        "workload.toml",
        "kind = \"overhead\"\nworkloads = [\"sweep\", \"zip\"]\n",
        &["key `workloads`: `zip` is not allowed; allowed: sweep, fill"],
    );
    case(
        "policy.toml",
        "kind = \"density\"\npolicy = \"fastest\"\n",
        &["key `policy`", "allowed: a shipped policy (disco, static"],
    );
    case(
        "limit.toml",
        "kind = \"scale\"\nvms = 4\nmemory_mib = 32\nmemory_limit_mib = 64\n",
        &[
            "key `policies`: policy `static` shares nothing",
            "allowed with a limit: policies with [sharing] enabled",
        ],
    );
    case("toml.toml", "kind = \n", &["not valid TOML"]);
    // A policy file with a wrong key: the error names the scenario's
    // `policy`/`policies` key, the policy file and its wrong key (it used to
    // blame `memory_mib` or `workload`, and a file called `<bench>`).
    let bad_policy = dir.join("bad-policy.toml");
    std::fs::write(&bad_policy, "[numa]\nmigrate = true\nmigrat = false\n").unwrap();
    let bad = bad_policy.display().to_string();
    for (name, body, key) in [
        (
            "density-policy.toml",
            format!("kind = \"density\"\npolicy = \"{bad}\"\n"),
            "policy",
        ),
        (
            "overhead-policy.toml",
            format!("kind = \"overhead\"\npolicies = [\"{bad}\"]\n"),
            "policies",
        ),
        (
            "locality-policy.toml",
            format!("kind = \"locality\"\npolicies = [\"{bad}\"]\n"),
            "policies",
        ),
        (
            "replication-policy.toml",
            format!("kind = \"replication\"\npolicies = [\"{bad}\"]\n"),
            "policies",
        ),
    ] {
        case(
            name,
            &body,
            &[
                &format!("key `{key}`: "),
                &format!("policy `{bad}`"),
                "key `numa.migrat`: unknown key; allowed here:",
            ],
        );
    }
    // A topology file with a negative node memory names `topology`.
    let xml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("topology-fixtures/4-node.xml"),
    )
    .unwrap();
    let negative = dir.join("negative.xml");
    std::fs::write(
        &negative,
        xml.replace("local_memory=\"34359738368\"", "local_memory=\"-5\""),
    )
    .unwrap();
    for kind in ["density", "locality"] {
        case(
            &format!("{kind}-topology.toml"),
            &format!("kind = \"{kind}\"\ntopology = \"{}\"\n", negative.display()),
            &[
                "key `topology`",
                "attribute `local_memory`",
                "not a memory size",
            ],
        );
    }
    // More VMs than the host holds names `memory_mib`.
    case(
        "density-memory.toml",
        "kind = \"density\"\nvms = 1024\nmemory_mib = 4096\n",
        &["key `memory_mib`", "more than node 0's pool"],
    );
    // A scenario file that would hang or exhaust the reader.
    let fifo = dir.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let o = disco(&["bench", "run", fifo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("scenario file is a FIFO (named pipe); allowed: a regular file"),
        "{}",
        text(&o)
    );
    // Nothing ran: no results folder.
    assert!(!dir.join("out").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// The clone scenario alone (the suite test above runs it with the rest):
/// its record, figures and plot, clones that share their memory.
#[test]
fn clone_scenario_tiny() {
    if !require_kvm("clone_scenario_tiny") {
        return;
    }
    let out = temp("clone");
    let dir = temp("clone-scenarios");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(scenario_dir().join("clone.toml"), dir.join("clone.toml")).unwrap();
    let o = disco(&[
        "bench",
        "all",
        "--quick",
        "--quiet",
        "--dir",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "disco bench all (clone.toml) failed:\n{}",
        text(&o)
    );
    let records = disco::bench::suite::read_records(&out).unwrap();
    assert_eq!(records.len(), 1);
    check_record(&out, &records[0]);
    let fig = |name: &str| -> f64 {
        records[0]
            .figure(name)
            .and_then(|f| f.stats.as_ref())
            .unwrap_or_else(|| panic!("{name} not measured"))
            .median
    };
    assert!(fig("clones started per second") > 0.0);
    // Four clones of an 8 MiB VM share one copy: each holds (far) less
    // than a MiB of guest memory of its own before it writes.
    assert!(fig("new host memory per clone before it writes") < 1024.0);
    assert!(
        fig("pool memory once all finished") < 16.0,
        "one copy, not four"
    );
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn shipped_scenarios_are_listed() {
    let o = disco(&["bench", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for name in [
        "api",
        "clone",
        "density",
        "overhead",
        "sharing",
        "sharing-runs",
        "locality",
        "locality-8node",
        "replication",
    ] {
        assert!(out.contains(&format!("shipped:{name}.toml")), "{out}");
    }
    let o = disco(&["bench", "nosuch"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a scenario"),
        "{}",
        text(&o)
    );
}
