//! The NUMA policy engine on the 4-node fixture's node count, driven by the
//! shipped policy files (parsed exactly as `disco run` parses them), and
//! the access-trace format. Pure logic: no KVM needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disco::config::{Config, NumaPolicy, SHIPPED_POLICIES};
use disco::numa::{
    choose_source, probe_hardware_pmu, AccessSample, CounterSource, Decision, PageKey,
    PageLocation, PolicyEngine, Sampling, SourceKind, Trace, TraceSource, TraceWriter,
};
use disco::topology::Topology;

const VMS: &str = r#"
[host]
topology = "4-node"

[[vm]]
name = "a"
vcpus = 2
node = 1
memory_mib = 8
workload = { kind = "sweep", seed = 3, passes = 2 }
"#;

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("disco-numa-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let path = temp_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Node count of the 4-node fixture.
fn nodes() -> usize {
    let n = Topology::from_fixture_name("4-node").unwrap().node_count();
    assert_eq!(n, 4);
    n
}

/// The `[numa]` knobs of a shipped policy, parsed through a config that
/// names it.
fn shipped(name: &str) -> NumaPolicy {
    let text = format!("policy = \"{name}\"\n{VMS}");
    Config::parse(&text, "test.toml", Path::new("."))
        .unwrap_or_else(|e| panic!("shipped policy {name}: {e}"))
        .policy
        .numa
}

/// A policy file: `policies/<base>.toml` with `from` replaced by `to`.
fn variant(base: &str, from: &str, to: &str) -> Result<NumaPolicy, String> {
    let text = std::fs::read_to_string(format!("policies/{base}.toml")).unwrap();
    assert!(text.contains(from), "policies/{base}.toml has no `{from}`");
    // Tests run in parallel: every variant gets its own file.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = write_temp(
        &format!("{base}-variant-{n}.toml"),
        &text.replacen(from, to, 1),
    );
    let config = format!("policy = \"{}\"\n{VMS}", file.display());
    Config::parse(&config, "test.toml", Path::new("."))
        .map(|c| c.policy.numa)
        .map_err(|e| e.to_string())
}

type Facts = BTreeMap<PageKey, PageLocation>;

fn reads(vm: u32, gfn: u64, node: usize, n: usize) -> Vec<AccessSample> {
    vec![AccessSample::read(vm, gfn, node); n]
}

/// Runs `epochs` of samples through an engine and returns each epoch's
/// decisions (facts do not change: the decisions are not carried out).
fn run(params: NumaPolicy, facts: &Facts, epochs: &[Vec<AccessSample>]) -> Vec<Vec<Decision>> {
    let mut e = PolicyEngine::new(params, nodes());
    epochs
        .iter()
        .map(|s| {
            e.observe(s);
            e.decide(facts)
        })
        .collect()
}

/// VM 7 has 64 pages on node 0; its vCPUs run on node 2. Pages 0..16 are
/// hot (20 samples per epoch), the others are touched once per epoch.
fn remote_vm() -> (Facts, Vec<AccessSample>) {
    let facts: Facts = (0..64)
        .map(|g| ((7, g), PageLocation::private(0)))
        .collect();
    let mut samples = Vec::new();
    for g in 0..64 {
        let n = if g < 16 { 20 } else { 1 };
        for i in 0..n {
            samples.push(AccessSample {
                vcpu: i % 2,
                ..AccessSample::read(7, g, 2)
            });
        }
    }
    (facts, samples)
}

/// Page (1, 5) is shared across VMs, sits on node 0 and is read from all
/// four nodes; page (1, 6) is the same but private to VM 1.
fn read_shared() -> (Facts, Vec<AccessSample>) {
    let facts: Facts = [
        ((1, 5), PageLocation::shared(0)),
        ((1, 6), PageLocation::private(0)),
    ]
    .into();
    let mut samples = Vec::new();
    for node in 0..4 {
        samples.extend(reads(1, 5, node, 5));
        samples.extend(reads(1, 6, node, 5));
    }
    (facts, samples)
}

/// Page (2, 9): written from nodes 1 and 3 (and read from all); page (2, 10):
/// shared across VMs and read by all nodes but written once.
fn write_shared() -> (Facts, Vec<AccessSample>) {
    let facts: Facts = [
        ((2, 9), PageLocation::private(0)),
        ((2, 10), PageLocation::shared(0)),
    ]
    .into();
    let mut samples = Vec::new();
    for node in 0..4 {
        samples.extend(reads(2, 9, node, 5));
        samples.extend(reads(2, 10, node, 5));
    }
    samples.extend(vec![AccessSample::write(2, 9, 1); 100]); // dominant, yet write-shared
    samples.extend(vec![AccessSample::write(2, 9, 3); 2]);
    samples.push(AccessSample::write(2, 10, 2));
    (facts, samples)
}

#[test]
fn remote_vm_gets_its_hot_pages_migrated_to_its_node() {
    let (facts, samples) = remote_vm();
    let decisions = run(shipped("disco"), &facts, &[samples]).remove(0);
    let mut migrated: Vec<u64> = decisions
        .iter()
        .map(|d| match d {
            Decision::Migrate { vm: 7, gfn, to: 2 } => *gfn,
            other => panic!("unexpected decision {other:?}"),
        })
        .collect();
    migrated.sort_unstable();
    assert_eq!(migrated, (0..16).collect::<Vec<_>>(), "hot pages only");
}

#[test]
fn read_shared_page_shared_across_vms_is_replicated() {
    let (facts, samples) = read_shared();
    let decisions = run(shipped("disco"), &facts, std::slice::from_ref(&samples)).remove(0);
    assert_eq!(
        decisions,
        vec![Decision::Replicate {
            vm: 1,
            gfn: 5,
            nodes: vec![1, 2, 3]
        }],
        "the private page (1, 6) cannot be replicated: a VM maps one copy"
    );
    let decisions = run(
        shipped("replicate-only"),
        &facts,
        std::slice::from_ref(&samples),
    )
    .remove(0);
    assert!(matches!(
        decisions[..],
        [Decision::Replicate { gfn: 5, .. }]
    ));
    assert!(run(shipped("migrate-only"), &facts, &[samples])[0].is_empty());
}

#[test]
fn write_shared_pages_get_nothing() {
    let (facts, samples) = write_shared();
    for policy in ["disco", "migrate-only", "replicate-only"] {
        let decisions = run(shipped(policy), &facts, &[samples.clone(), samples.clone()]);
        assert!(
            decisions.iter().all(Vec::is_empty),
            "{policy}: {decisions:?}"
        );
    }
}

#[test]
fn ping_ponging_page_is_frozen() {
    // The only user of page (3, 1) moves between nodes 1 and 3 every 4
    // epochs; each move of the user makes the page migrate after it, until
    // the policy's freeze_after_moves is reached.
    let params = shipped("disco");
    let mut engine = PolicyEngine::new(params.clone(), nodes());
    let mut facts: Facts = [((3, 1), PageLocation::private(0))].into();
    let mut log = Vec::new();
    for epoch in 0..60u64 {
        let node = if (epoch / 4) % 2 == 0 { 1 } else { 3 };
        engine.observe(&reads(3, 1, node, 20));
        let d = engine.decide(&facts);
        for x in &d {
            if let Decision::Migrate { to, .. } = x {
                facts.get_mut(&(3, 1)).unwrap().node = *to;
            }
            log.push((epoch, x.clone()));
        }
    }
    let migrations: Vec<u64> = log
        .iter()
        .filter(|(_, d)| matches!(d, Decision::Migrate { .. }))
        .map(|(e, _)| *e)
        .collect();
    assert_eq!(
        migrations.len() as u64,
        params.freeze_after_moves,
        "{log:?}"
    );
    let freezes: Vec<&(u64, Decision)> = log
        .iter()
        .filter(|(_, d)| matches!(d, Decision::Freeze { .. }))
        .collect();
    assert_eq!(freezes.len(), 1, "{log:?}");
    let (at, freeze) = freezes[0];
    assert_eq!(
        *freeze,
        Decision::Freeze {
            vm: 3,
            gfn: 1,
            epochs: params.freeze_epochs
        }
    );
    assert!(*at > *migrations.last().unwrap());
    assert!(
        *at - migrations[0] < params.freeze_window_epochs,
        "all within the window"
    );
    assert_eq!(log.last().unwrap().0, *at, "nothing after the freeze");
    assert!(engine.is_frozen(3, 1));
}

#[test]
fn copy_budget_caps_decisions_hottest_first() {
    // 600 hot remote pages, page g sampled 10 + g % 300 times: more than
    // disco.toml's 512-page budget.
    let params = shipped("disco");
    assert_eq!(params.copy_budget_pages, 512);
    let facts: Facts = (0..600)
        .map(|g| ((4, g), PageLocation::private(1)))
        .collect();
    let samples: Vec<AccessSample> = (0..600u64)
        .flat_map(|g| reads(4, g, 3, 10 + (g % 300) as usize))
        .collect();
    let mut engine = PolicyEngine::new(params, nodes());
    engine.observe(&samples);
    let decisions = engine.decide(&facts);
    assert_eq!(decisions.len(), 512);
    assert_eq!(engine.last_epoch().pages_copied, 512);
    assert_eq!(engine.last_epoch().deferred, 88);
    let heat = |d: &Decision| 10 + d.page().1 % 300;
    assert!(
        decisions.windows(2).all(|w| heat(&w[0]) >= heat(&w[1])),
        "hottest first"
    );
    // The 88 left out are the coolest: heat 10..=53 (two pages each).
    let lowest = decisions.iter().map(heat).min().unwrap();
    assert_eq!(lowest, 54);

    // A tighter budget from a policy file.
    let tight = variant("disco", "copy_budget_pages = 512", "copy_budget_pages = 3").unwrap();
    let (facts, samples) = remote_vm();
    let mut extra = samples.clone();
    extra.extend(reads(7, 2, 2, 5)); // page 2 is the hottest
    extra.extend(reads(7, 9, 2, 3)); // then page 9
    let decisions = run(tight, &facts, &[extra]).remove(0);
    assert_eq!(
        decisions,
        vec![
            Decision::Migrate {
                vm: 7,
                gfn: 2,
                to: 2
            },
            Decision::Migrate {
                vm: 7,
                gfn: 9,
                to: 2
            },
            Decision::Migrate {
                vm: 7,
                gfn: 0,
                to: 2
            },
        ]
    );
}

#[test]
fn static_policy_decides_nothing() {
    let params = shipped("static");
    assert!(!params.migrate && !params.replicate);
    for (facts, samples) in [remote_vm(), read_shared(), write_shared()] {
        let decisions = run(params.clone(), &facts, &vec![samples; 30]);
        assert!(decisions.iter().all(Vec::is_empty), "{decisions:?}");
    }
}

#[test]
fn every_shipped_policy_parses_and_says_what_it_does() {
    let expect = [
        ("disco", true, true),
        ("static", false, false),
        ("migrate-only", true, false),
        ("replicate-only", false, true),
    ];
    for (name, migrate, replicate) in expect {
        let p = shipped(name);
        assert_eq!((p.migrate, p.replicate), (migrate, replicate), "{name}");
        assert_eq!(p.sampling, Sampling::Auto, "{name}");
    }
    // Every file in policies/ is shipped, and every shipped one is listed.
    let mut files: Vec<String> = std::fs::read_dir("policies")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
        .collect();
    files.sort();
    let mut names: Vec<String> = SHIPPED_POLICIES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    names.sort();
    assert_eq!(files, names);
    for (name, _, _) in expect {
        assert!(names.iter().any(|n| n == name));
    }
}

#[test]
fn every_numa_knob_in_every_policy_file_has_a_comment() {
    for (name, text) in SHIPPED_POLICIES {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| *l == "[numa]")
            .unwrap_or_else(|| panic!("{name}: no [numa] section"));
        let mut keys = Vec::new();
        for (i, line) in lines.iter().enumerate().skip(start + 1) {
            if line.starts_with('[') {
                break;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = line.split('=').next().unwrap().trim();
            assert!(
                lines[i - 1].starts_with('#'),
                "{name}: knob `{key}` has no comment above it"
            );
            keys.push(key.to_string());
        }
        for knob in [
            "migrate",
            "replicate",
            "epoch_ms",
            "hot_threshold",
            "dominant_share",
            "reader_threshold",
            "writer_threshold",
            "replicate_min_nodes",
            "decay",
            "copy_budget_pages",
            "freeze_after_moves",
            "freeze_window_epochs",
            "freeze_epochs",
            "sampling",
        ] {
            assert!(keys.iter().any(|k| k == knob), "{name}: `{knob}` missing");
        }
        assert!(
            text.contains("trace_file"),
            "{name}: trace_file is documented"
        );
    }
}

#[test]
fn bad_policy_values_give_clear_errors() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "dominant_share = 0.75",
            "dominant_share = 0.3",
            &[
                "key `numa.dominant_share`",
                "0.3 is out of range",
                "allowed: 0.5 to 1",
            ],
        ),
        (
            "decay = 0.5",
            "decay = 1.5",
            &[
                "key `numa.decay`",
                "1.5 is out of range",
                "allowed: 0 to 0.99",
            ],
        ),
        (
            "replicate_min_nodes = 2",
            "replicate_min_nodes = 1",
            &[
                "key `numa.replicate_min_nodes`",
                "1 is out of range",
                "allowed: 2 to 4096",
            ],
        ),
        (
            "copy_budget_pages = 512",
            "copy_budget_pages = -1",
            &[
                "key `numa.copy_budget_pages`",
                "-1 is out of range",
                "0 to 100000000",
            ],
        ),
        (
            "hot_threshold = 4.0",
            "hot_threshold = \"high\"",
            &[
                "key `numa.hot_threshold`",
                "expected a number, found a string",
            ],
        ),
        (
            "freeze_epochs = 100",
            "freeze_epochs = 0",
            &["key `numa.freeze_epochs`", "allowed: 1 to 1000000"],
        ),
        (
            "sampling = \"auto\"",
            "sampling = \"pmu\"",
            &[
                "key `numa.sampling`",
                "`pmu` is not a sample source",
                "auto, hardware, page-faults, trace",
            ],
        ),
        (
            "sampling = \"auto\"",
            "sampling = \"trace\"",
            &[
                "key `numa.trace_file`",
                "is required when sampling = \"trace\"",
            ],
        ),
        (
            "sampling = \"auto\"",
            "sampling = \"auto\"\ntrace_file = \"x.trace\"",
            &[
                "key `numa.trace_file`",
                "only used with sampling = \"trace\"",
            ],
        ),
        (
            "reader_threshold = 2.0",
            "reader_threshold = 5.0",
            &["key `numa.reader_threshold`", "above hot_threshold (4)"],
        ),
        (
            "writer_threshold = 0.25",
            "writer_threshold = 0",
            &["key `numa.writer_threshold`", "0.001 to 1000000000"],
        ),
        (
            "decay = 0.5",
            "decay = 0.5\nhot = 3",
            &["key `numa.hot`", "unknown key", "hot_threshold"],
        ),
    ];
    for (from, to, parts) in cases {
        let err = variant("disco", from, to).expect_err(to);
        assert!(
            err.contains("disco-variant-"),
            "error must name the policy file: {err}"
        );
        for p in *parts {
            assert!(err.contains(p), "`{to}`: expected `{p}` in: {err}");
        }
    }
    // And a good trace setting parses.
    let p = variant(
        "disco",
        "sampling = \"auto\"",
        "sampling = \"trace\"\ntrace_file = \"runs/a.trace\"",
    )
    .unwrap();
    assert_eq!(p.sampling, Sampling::Trace);
    assert_eq!(p.trace_file, Some(PathBuf::from("runs/a.trace")));
}

#[test]
fn trace_round_trips_and_replays_to_the_same_decisions() {
    let (facts, hot) = remote_vm();
    let (_, shared) = read_shared();
    let epochs = vec![hot.clone(), vec![], shared, hot];
    // Record.
    let path = temp_dir().join("round-trip.trace");
    let mut w = TraceWriter::new(std::fs::File::create(&path).unwrap(), Some(nodes())).unwrap();
    for e in &epochs {
        w.write_epoch(e).unwrap();
    }
    w.finish().unwrap();
    // Parse.
    let trace = Trace::load(&path).unwrap();
    assert_eq!(trace.nodes, Some(4));
    let parsed: Vec<Vec<AccessSample>> = trace.epochs.iter().map(|e| e.samples.clone()).collect();
    assert_eq!(parsed, epochs);
    assert_eq!(Trace::parse(&trace.to_text(), "again").unwrap(), trace);
    // Replay through the engine: same decisions as feeding it directly.
    let mut facts = facts;
    facts.insert((1, 5), PageLocation::shared(0));
    facts.insert((1, 6), PageLocation::private(0));
    let direct = run(shipped("disco"), &facts, &epochs);
    let mut source = TraceSource::open(&path).unwrap();
    source.check_nodes(nodes()).unwrap();
    assert_eq!(source.name(), "trace");
    assert!(source.describe().contains("round-trip.trace"));
    let mut engine = PolicyEngine::new(shipped("disco"), nodes());
    let mut replayed = Vec::new();
    while !source.finished() {
        let mut batch = Vec::new();
        source.poll(&mut batch).unwrap();
        engine.observe(&batch);
        replayed.push(engine.decide(&facts));
    }
    assert_eq!(replayed, direct);
    assert!(replayed.iter().flatten().count() > 0);
}

#[test]
fn bad_trace_lines_name_file_and_line() {
    let cases: &[(&str, &str)] = &[
        (
            "epoch 0\n7 0x10 2 r\n7 0x11 2 q\n",
            ":3: `q` is not an access kind",
        ),
        (
            "nodes 4\nepoch 0\n7 0x10 4 r\n",
            ":3: node 4 is out of range",
        ),
        (
            "# header\n7 0x10 2 r\n",
            ":2: a sample before the first `epoch",
        ),
        ("epoch 3\n\nepoch 2\n", ":3: epoch 2 after epoch 3"),
        (
            "epoch 0\n7 0xg 2 r\n",
            ":2: `0xg` is not a valid guest frame number",
        ),
        (
            "epoch 0\n7 0x10\n",
            ":2: expected `<vm> <gfn-hex> <node> r|w [vcpu]`",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = write_temp(&format!("bad-{i}.trace"), text);
        let err = Trace::load(&path).unwrap_err().to_string();
        let expected = format!("{}{want}", path.display());
        assert!(
            err.starts_with(&expected),
            "expected `{expected}...`, got: {err}"
        );
    }
    // A trace recorded on another topology is refused when replayed.
    let path = write_temp("eight.trace", "nodes 8\nepoch 0\n1 0x1 7 r\n");
    let err = TraceSource::open(&path)
        .unwrap()
        .check_nodes(nodes())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("recorded on 8 nodes but the topology has 4"),
        "{err}"
    );
}

#[test]
fn counter_source_is_chosen_with_a_stated_reason() {
    let probe = probe_hardware_pmu();
    let choice = choose_source(Sampling::Auto, None, probe.clone()).unwrap();
    match probe {
        Ok(()) => assert_eq!(choice.kind, SourceKind::Hardware),
        Err(why) => {
            // The build machines (FACTS.md): no PMU, perf_event_open ENOENT.
            assert_eq!(choice.kind, SourceKind::PageFaults);
            assert!(choice.reason.contains(&why), "{}", choice.reason);
            assert!(why.contains("perf_event_open"), "{why}");
            let err = choose_source(Sampling::Hardware, None, Err(why)).unwrap_err();
            assert!(err.contains("sampling = \"auto\""), "{err}");
        }
    }
}
