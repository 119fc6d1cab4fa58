//! The sharing scenario (`disco bench sharing`) on a tiny configuration, on
//! real KVM and the host's real KSM: every figure is present and finite,
//! disco's savings reach the prediction from the content, KSM's settings
//! are exactly as before, the JSON round-trips and the files are written.
//! Speed is not checked (benchmarks measure it; tests never time anything).
//!
//! KSM is host-wide: the KSM side takes the ksm module's lock, so this test
//! never measures KSM at the same time as another test or process.

use disco::bench::ksm::Ksm;
use disco::bench::sharing::{self, SharingOptions, SharingResult};
use disco::kvm_check::require_kvm;
use serde_json::Value;

fn finite(name: &str, v: f64) {
    assert!(v.is_finite(), "{name} is not finite: {v}");
}

/// Every number in the JSON tree is finite. serde_json writes NaN and
/// infinities as null, so a null is one too, except inside the KSM side's
/// own result (its optional counters) and the optional `smart_scan` knob.
fn all_numbers_finite(path: &str, v: &Value) {
    match v {
        Value::Number(n) => finite(path, n.as_f64().unwrap()),
        Value::Null => assert!(
            path.starts_with(".ksm.") || path.ends_with(".smart_scan"),
            "{path} is null"
        ),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                all_numbers_finite(&format!("{path}[{i}]"), x);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                all_numbers_finite(&format!("{path}.{k}"), x);
            }
        }
        _ => {}
    }
}

/// Equal JSON trees, numbers within a relative 1e-12 (serde_json's float
/// parsing may differ from the printed value in the last bit).
fn assert_json_eq(path: &str, a: &Value, b: &Value) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                "{path}: {x} != {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_json_eq(&format!("{path}[{i}]"), x, y);
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{path}"
            );
            for (k, v) in x {
                assert_json_eq(&format!("{path}.{k}"), v, &y[k]);
            }
        }
        _ => assert!(a == b, "{path}: {a} != {b}"),
    }
}

#[test]
fn sharing_scenario_reports_every_figure_and_restores_ksm() {
    if !require_kvm("sharing_scenario_reports_every_figure_and_restores_ksm") {
        return;
    }
    let ksm = Ksm::system().unwrap_or_else(|e| {
        panic!("the sharing scenario needs the host's KSM (root, /sys/kernel/mm/ksm): {e:#}")
    });
    // Taking the guard waits for any other KSM measurement; snapshot then.
    let before = {
        let g = ksm.guard().unwrap();
        let s = g.saved().clone();
        g.restore().unwrap();
        s
    };

    let options = SharingOptions::tiny();
    let result = sharing::run(&options);
    let after = ksm.settings().unwrap();
    assert_eq!(
        before.differences(&after),
        Vec::<String>::new(),
        "KSM settings were not restored"
    );
    let r = result.unwrap_or_else(|e| panic!("sharing scenario: {e:#}"));
    let table = r.render_table();
    eprintln!("{table}");

    // disco reached exactly the savings its content predicts.
    let d = &r.disco;
    assert!(d.reached_steady, "disco did not reach the prediction");
    assert!(d.census.expected_saved_pages > 0);
    assert_eq!(d.saved_bytes, d.expected_saved_bytes);
    assert!(d.content_unchanged && d.guests_ok);
    for (name, v) in [
        ("time to 90 %", d.time_to_90pct_ms),
        ("time to steady", d.time_to_steady_ms),
        ("scanner CPU to steady", d.scanner_cpu_ms_to_steady),
        ("monitor CPU to steady", d.monitor_cpu_ms_to_steady),
        ("handler CPU to steady", d.handler_cpu_ms_to_steady),
    ] {
        let v = v.unwrap_or_else(|| panic!("disco {name} missing"));
        finite(name, v);
        assert!(v >= 0.0, "{name} = {v}");
    }
    assert!(d.monitor_cpu_ms_to_steady.unwrap() > 0.0);
    assert!(d.series.len() >= 2);
    assert_eq!(d.scanner.errors, 0);
    assert!(d.scanner.merges > 0);
    // Zero frames (if the content has any outside the unshared system area)
    // have their pages released to the host.
    assert_eq!(
        d.scanner.zero_releases > 0,
        d.census.expected_saved_zero_pages > 0,
        "{:?}",
        d.census
    );

    // Copy-on-write: breaks happened and were timed.
    let cow = &d.cow;
    assert!(cow.breaks > 0 && cow.breaks_per_rewrite.median > 0.0);
    assert!(cow.handler_median_us > 0.0 && cow.handler_p99_us >= cow.handler_median_us);
    for (name, v) in [
        ("guest cost per break", cow.guest_cost_per_break_us),
        ("handler CPU per break", cow.handler_cpu_us_per_break),
        ("shared rewrite", cow.shared_run_ms.median),
        ("private rewrite", cow.private_run_ms.median),
    ] {
        finite(name, v);
    }

    // Slowdown: both runs measured, as many as asked.
    let s = &d.slowdown;
    assert_eq!(s.scanner_off_ms.n, options.sweep.reps);
    assert_eq!(s.scanner_on_ms.n, options.sweep.reps);
    assert!(s.scanner_off_ms.min > 0.0 && s.scanner_on_ms.min > 0.0);
    finite("slowdown ratio", s.ratio);

    // KSM side: it merged, and its steady state (or plateau) is known.
    let k = &r.ksm;
    assert!(k.bytes_saved > 0 && k.expected_bytes_saved > 0);
    assert!(k.content_unchanged);
    assert_eq!(k.guests_ok, Some(true));
    assert!(k.slowdown.is_some(), "KSM's sweep slowdown measured");
    assert_eq!(k.config.vms, options.vms);
    assert_eq!(k.config.seed, options.seed);
    let c = &r.comparison;
    for (name, v) in [
        ("KSM steady time", c.ksm_steady_ms),
        ("KSM steady CPU", c.ksm_steady_cpu_ms),
        ("time ratio", c.time_ratio_steady),
        ("CPU ratio", c.cpu_ratio_steady),
        ("time ratio 90 %", c.time_ratio_90pct),
        ("CPU ratio 90 %", c.cpu_ratio_90pct),
    ] {
        let v = v.unwrap_or_else(|| panic!("{name} missing"));
        finite(name, v);
        assert!(v > 0.0, "{name} = {v}");
    }
    assert_eq!(c.disco_saved_fraction, 1.0);
    assert!(c.ksm_saved_fraction > 0.9 && c.ksm_saved_fraction <= 1.0);
    // Nothing stays merged by KSM after the run.
    assert_eq!(ksm.stats().unwrap().pages_sharing, 0);

    // The table names every figure.
    for needle in [
        "time to 90 %",
        "time to steady state",
        "CPU to steady state",
        "copy-on-write break",
        "sweep guest",
        "goal",
        "pages_to_scan=",
        "Savings over time",
    ] {
        assert!(table.contains(needle), "table lacks {needle:?}");
    }

    // JSON round-trips; every number is finite; nulls only in KSM's own
    // optional figures (the ksm module's) and the optional smart_scan knob.
    let json = serde_json::to_string(&r).unwrap();
    let back: SharingResult = serde_json::from_str(&json).unwrap();
    let tree: Value = serde_json::from_str(&json).unwrap();
    let again: Value = serde_json::from_str(&serde_json::to_string(&back).unwrap()).unwrap();
    assert_json_eq("", &tree, &again);
    all_numbers_finite("", &tree);

    // The files.
    let dir = std::env::temp_dir().join(format!("disco-bench-sharing-{}", std::process::id()));
    let files = r.write_outputs(&dir).unwrap();
    assert_eq!(files.len(), 3);
    let json_file = std::fs::read_to_string(dir.join("sharing.json")).unwrap();
    let _: SharingResult = serde_json::from_str(&json_file).unwrap();
    let md = std::fs::read_to_string(dir.join("sharing.md")).unwrap();
    assert!(md.contains("| figure |") && md.contains("sharing-savings.svg"));
    let svg = std::fs::read_to_string(dir.join("sharing-savings.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "one line per system");
    for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
        let points = line.split("points=\"").nth(1).unwrap();
        let points = &points[..points.find('"').unwrap()];
        let coords: Vec<&str> = points.split_whitespace().collect();
        assert!(coords.len() >= 2, "a line with too few points: {line}");
        for p in coords {
            let xy: Vec<f64> = p.split(',').map(|v| v.parse().unwrap()).collect();
            assert!(xy.len() == 2 && xy.iter().all(|v| v.is_finite()), "{p}");
        }
    }
    assert!(svg.contains("disco") && svg.contains("KSM"));
    std::fs::remove_dir_all(&dir).ok();
}
