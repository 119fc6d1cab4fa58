//! The benchmark scenarios behind `disco bench`, on tiny configurations and
//! real KVM: every figure is present, finite and positive where it must be,
//! the tables name every figure, and the JSON round-trips. Speed is not
//! checked here (benchmarks measure it; tests never time anything).

use disco::bench::bare::{self, BareMemory};
use disco::bench::density::{self, DensityOptions, DensityResult};
use disco::bench::overhead::{self, OverheadOptions, OverheadResult};
use disco::bench::Stats;
use disco::kvm_check::require_kvm;
use serde_json::Value;

/// The scenarios read process-wide and system-wide memory counters: run
/// them one at a time so that one test's VMs are not in another's deltas.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn assert_stats(name: &str, s: &Stats, n: usize, positive: bool) {
    assert_eq!(s.n, n, "{name}: {s:?}");
    assert_eq!(s.samples.len(), n, "{name}: {s:?}");
    for v in s.samples.iter().chain([&s.median, &s.min, &s.max]) {
        assert!(v.is_finite(), "{name} is not finite: {s:?}");
        if positive {
            assert!(*v > 0.0, "{name} must be positive: {s:?}");
        }
    }
    assert!(s.min <= s.median && s.median <= s.max, "{name}: {s:?}");
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
        _ => assert_eq!(a, b, "{path}"),
    }
}

/// Serialises, parses back into the result type, serialises again.
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(result: &T) {
    let json = serde_json::to_string_pretty(result).unwrap();
    let back: T = serde_json::from_str(&json).expect("the JSON parses back");
    let first: Value = serde_json::from_str(&json).unwrap();
    let second = serde_json::to_value(&back).unwrap();
    assert_json_eq("$", &first, &second);
}

#[test]
fn density_scenario_reports_every_figure() {
    if !require_kvm("density_scenario_reports_every_figure") {
        return;
    }
    let _serial = serial();
    let options = DensityOptions::tiny();
    let r: DensityResult = density::run(&options).expect("the density scenario runs");
    assert_eq!((r.vms, r.reps, r.vcpus_per_vm), (10, 1, 1));
    for (name, s) in [
        ("create_ms", &r.create_ms),
        ("start_ms", &r.start_ms),
        ("create_start_ms", &r.create_start_ms),
        ("vms_per_second", &r.vms_per_second),
        ("create_vms_per_second", &r.create_vms_per_second),
        ("all_finished_ms", &r.all_finished_ms),
    ] {
        assert_stats(name, s, 1, true);
    }
    assert_stats("running_after_start", &r.running_after_start, 1, false);
    assert!(r.running_after_start.max <= 10.0);
    assert!(r.all_finished_ms.median >= r.create_ms.median);
    assert!(r.max_map_count > 0);

    let whens: Vec<&str> = r.memory.iter().map(|m| m.when.as_str()).collect();
    assert_eq!(whens, ["created", "started", "finished"]);
    for m in &r.memory {
        // Guest RAM the monitor or the guests wrote must have grown. The
        // other figures are deltas of counters that other activity moves
        // too (the allocator may reuse memory an earlier test freed; the
        // system-wide ones follow other processes), so they need only be
        // present and finite.
        assert_stats("guest_ram_resident_kib", &m.guest_ram_resident_kib, 1, true);
        assert_stats("process_shmem_kib", &m.process_shmem_kib, 1, true);
        for (name, s) in [
            ("process_anon_kib", &m.process_anon_kib),
            ("process_file_kib", &m.process_file_kib),
            ("kernel_slab", &m.kernel_slab_unreclaimable_kib),
            ("kernel_stack", &m.kernel_stack_kib),
            ("kernel_page_tables", &m.kernel_page_tables_kib),
            ("kernel_sec_page_tables", &m.kernel_sec_page_tables_kib),
            ("kernel_vmalloc", &m.kernel_vmalloc_kib),
            ("kernel_percpu", &m.kernel_percpu_kib),
            ("kernel_total", &m.kernel_total_kib),
            ("total", &m.total_beyond_guest_ram_kib),
            ("process_heap_kib", &m.process_heap_kib),
            ("threads", &m.threads),
        ] {
            assert_stats(name, s, 1, false);
        }
    }
    // Guest RAM is written by the guests: more is resident once they ran.
    assert!(r.memory[2].guest_ram_resident_kib.median > r.memory[0].guest_ram_resident_kib.median);

    let table = r.render_table();
    for needle in [
        "VMs per second",
        "create + start 10 VMs",
        "total beyond guest RAM",
        "guest RAM resident",
        "all finished, before teardown",
    ] {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
    }
    round_trip(&r);
}

#[test]
fn overhead_scenario_reports_every_figure() {
    if !require_kvm("overhead_scenario_reports_every_figure") {
        return;
    }
    let _serial = serial();
    let options = OverheadOptions::tiny();
    let r: OverheadResult = overhead::run(&options).expect("the overhead scenario runs");
    assert_eq!(r.reps, 2);
    assert_eq!(r.cases.len(), options.cases.len());
    for c in &r.cases {
        for (side, s) in [("disco", &c.disco), ("bare", &c.bare)] {
            assert_stats(&format!("{side} wall_ms"), &s.wall_ms, 2, true);
            assert_stats(&format!("{side} create_ms"), &s.create_ms, 2, true);
            assert_stats(&format!("{side} guest_run_ms"), &s.guest_run_ms, 2, true);
            assert_stats(&format!("{side} rest_ms"), &s.rest_ms, 2, false);
            assert!(s.wall_ms.min >= s.guest_run_ms.min, "{side}: {s:?}");
        }
        let shmem = c.bare_shmem.as_ref().expect("the shmem baseline ran");
        assert_stats("bare_shmem guest_run_ms", &shmem.guest_run_ms, 2, true);
        assert_stats("bare_shmem vcpu_cpu_ms", &shmem.vcpu_cpu_ms, 2, true);
        assert!(c.goal_check_shmem.is_some(), "{}", c.case.name);
        assert_stats("checksum_model_ms", &c.checksum_model_ms, 2, true);
        for (name, v) in [
            ("ratio_wall", c.ratio_wall),
            ("ratio_wall_without_model", c.ratio_wall_without_model),
            ("ratio_guest_run", c.ratio_guest_run),
        ] {
            assert!(v.is_finite() && v > 0.0, "{}: {name} = {v}", c.case.name);
        }
    }
    let table = r.render_table();
    for c in &r.cases {
        assert!(table.contains(&c.case.name), "table lacks {}", c.case.name);
        // Two repetitions are too few for a 95 % interval: no verdict.
        let check = c.goal_check.as_ref().expect("every case has a goal");
        assert_eq!(check.interval_95, None, "{}", c.case.name);
        assert_eq!(check.verdict, overhead::Verdict::Undecided);
    }
    assert!(table.contains("disco/bare wall"));
    assert!(table.contains("[too few]") && table.contains("undecided"));
    assert!(table.contains("bare on shmem") && table.contains("disco/shmem guest run"));
    round_trip(&r);
}

#[test]
fn bare_runner_checks_checksums_on_anonymous_and_shmem_memory() {
    if !require_kvm("bare_runner_checks_checksums_on_anonymous_and_shmem_memory") {
        return;
    }
    let _serial = serial();
    let config = disco::bench::config_from_toml(
        "[[vm]]\nname = \"a\"\ncount = 2\nvcpus = 2\nmemory_mib = 4\n\
         workload = { kind = \"sweep\", seed = 3, passes = 2 }\n",
    )
    .unwrap();
    let topology = config.topology().unwrap();
    for memory in [BareMemory::Anonymous, BareMemory::Shmem] {
        let run = bare::run_checked(&config, &topology, memory).expect("bare run");
        assert_eq!(run.outcomes.len(), 2, "{memory:?}");
        assert!(run.all_ok(), "{memory:?}");
        assert!(run.outcomes.iter().all(|o| o.vcpus.len() == 2));
    }
}

#[test]
fn locality_and_migration_benches_produce_finite_figures_and_a_plot() {
    if !disco::kvm_check::require_kvm(
        "locality_and_migration_benches_produce_finite_figures_and_a_plot",
    ) {
        return;
    }
    // Its VMs would be in the density test's memory deltas.
    let _serial = serial();
    use disco::bench::suite::{Progress, ScenarioResult};
    use disco::bench::{locality, migration};
    let options = locality::LocalityOptions {
        vms: 2,
        vcpus: 1,
        memory_mib: 4,
        workload: "{ kind = \"sweep\" }".into(),
        passes: 2400,
        topology: "4-node".into(),
        policies: vec!["static".into(), "migrate-only".into()],
        placement: "opposite".into(),
        reps: 1,
        goal: 0.9,
    };
    let result = locality::run(&options, 3, &Progress::hidden()).expect("locality bench runs");
    assert_eq!(result.runs.len(), 2);
    for r in &result.runs {
        assert!(r.samples > 0 && !r.summary.local_series.is_empty(), "{r:?}");
        assert!(
            r.summary.local_first.is_finite() && r.summary.local_last.is_finite(),
            "{r:?}"
        );
    }
    assert_eq!(result.runs[0].migrations, 0, "static moves nothing");
    assert_eq!(
        result.runs[0].summary.local_last, 0.0,
        "badly placed and never moved"
    );
    assert_eq!(result.runs[0].pages_local_at_end, 0.0);
    assert!(result.runs[1].migrations > 0, "migrate-only moves pages");
    let plots = result.plots();
    assert!(
        plots[0].svg.contains("<polyline") || plots[0].svg.contains("<path"),
        "the plot has lines"
    );
    let back: locality::LocalityResult = serde_json::from_value(result.json()).unwrap();
    assert_eq!(back.runs.len(), 2);

    let m = migration::run(&migration::MigrationOptions {
        mib: 4,
        reps: 1,
        passes: 30,
        guest_move_rate: migration::DEFAULT_GUEST_MOVE_RATE,
        progress: false,
    })
    .expect("migration bench runs");
    for v in [
        m.memcpy_pages_per_s.median,
        m.migrate_pages_per_s.median,
        m.ratio_to_memcpy,
        m.guest_slowdown,
    ] {
        assert!(v.is_finite() && v > 0.0, "{m:?}");
    }
}
