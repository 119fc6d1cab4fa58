//! The NUMA engine in real runs: real micro-guests on the emulated 4-node
//! fixture, real page-fault sampling (or a replayed trace where the test
//! must be deterministic), real migration and replication through the
//! mapper, checksums verified against the host model, and `verify()` run
//! every 20 ms while the guests run.

mod common;

use std::path::Path;

use common::TraceFile;
use disco::config::{Config, SHIPPED_POLICIES};
use disco::kvm_check::require_kvm;
use disco::report::RunReport;

/// `migrate-only` with sampling allowed 10 % of a VM's vCPU time instead
/// of 2 %: these tests check that pages follow their users, and on a busy
/// 2-core host at 2 % a VM gets about a hundred samples a second, so
/// whether 700 pages moved within a few seconds came down to the host's
/// load that day (a local run failed at 512 of 700 with the code that had
/// passed CI hours before). The shipped policies' own runs are checked in
/// `static_moves_nothing_and_every_shipped_policy_runs`, their cost in
/// tests/policy_cost.rs.
const MIGRATE_ONLY_10PCT: &str = r#"[policy]
name = "migrate-only-10pct"
[policy.sharing]
enabled = false
[policy.numa]
migrate = true
replicate = false
max_sampling_overhead = 0.1
"#;

/// Runs an inline config; every VM must end ok.
fn run_config(text: &str) -> RunReport {
    let report = common::run_config(text);
    assert!(report.all_ok(), "{}", report.render_text());
    report
}

/// Local fraction of the first and last quarter of the epochs with samples.
fn locality_first_last(report: &RunReport) -> (f64, f64) {
    let numa = report.numa.as_ref().expect("the NUMA engine ran");
    let points: Vec<_> = numa
        .series
        .iter()
        .filter(|e| e.locality_samples > 0)
        .collect();
    assert!(points.len() >= 8, "too few epochs with samples: {numa:?}");
    let q = points.len() / 4;
    let frac = |ps: &[&disco::numa::runner::EpochLocality]| {
        let (t, l) = ps.iter().fold((0.0, 0.0), |(t, l), e| {
            (
                t + e.locality_samples as f64,
                l + e.local_fraction * e.locality_samples as f64,
            )
        });
        l / t
    };
    (frac(&points[..q]), frac(&points[points.len() - q..]))
}

#[test]
fn a_remote_vm_gets_its_hot_pages_on_its_node_with_real_sampling() {
    if !require_kvm("a_remote_vm_gets_its_hot_pages_on_its_node_with_real_sampling") {
        return;
    }
    // vCPU on node 2, memory placed on node 0; the sweep touches all its
    // data pages over and over, so they are all hot. 5000 passes: at 2000
    // a local CI run had 448 pages moved (short of 700) once the sampler's
    // zapping was charged on a busy host (`numa::cap`).
    // Memory following its VM (rule 9, `follow_vm`) would move it before
    // any page got hot: off, so that this checks Disco's page rules.
    let report = run_config(&format!(
        r#"
{MIGRATE_ONLY_10PCT}
follow_vm = false
[host]
topology = "4-node"
[[vm]]
name = "remote"
vcpus = 1
node = 2
memory_node = 0
memory_mib = 8
workload = {{ kind = "sweep", seed = 3, passes = 5000 }}
"#
    ));
    let numa = report.numa.as_ref().unwrap();
    assert!(
        numa.source.contains("page-level samples"),
        "{}",
        numa.source
    );
    let sampler = numa.sampler.as_ref().expect("page-fault sampling ran");
    // Sampling is capped at 10 % of the vCPU's time (MIGRATE_ONLY_10PCT).
    assert!(sampler.samples > 100, "{sampler:?}");
    assert_eq!(numa.migration_failures, 0);
    let vm = &report.vms[0];
    // 2048 frames: the first 256 (page tables, code, stacks) are not
    // sampled (see Memory::zap_frames); of the 1792 data frames most must
    // have moved while the guest ran.
    assert!(
        vm.pages_per_node[2] >= 700,
        "hot pages should be on node 2 by now: {:?}\n{}",
        vm.pages_per_node,
        report.render_text()
    );
    // Sampled pages moved, and their regions with them.
    assert_eq!(
        vm.pages_per_node[2],
        numa.migrations + numa.region_migrations
    );
    assert_eq!(numa.follow_migrations, 0, "follow_vm = false");
    assert!(numa.region_migrations > 0, "regions moved along");
    let (first, last) = locality_first_last(&report);
    assert!(
        last > first + 0.3,
        "local accesses should rise: {first:.2} -> {last:.2}"
    );
}

#[test]
fn the_memory_of_a_remote_vm_of_real_size_follows_it_under_the_shipped_cap() {
    if !require_kvm("the_memory_of_a_remote_vm_of_real_size_follows_it_under_the_shipped_cap") {
        return;
    }
    // A 64 MiB guest touching random words of all its memory, its vCPU on
    // node 1 and its memory on node 0, under the shipped `migrate-only`
    // (sampling capped at 2 %): a few hundred samples a second among
    // 16,384 frames make no page hot, so before policy rule 9 ("memory
    // follows its VM") nothing moved and it stayed remote for good.
    let report = run_config(
        r#"
policy = "migrate-only"
[host]
topology = "2-socket"
[[vm]]
name = "remote"
vcpus = 1
node = 1
memory_node = 0
memory_mib = 64
workload = { kind = "random", seed = 3, touches = 150000000 }
"#,
    );
    let numa = report.numa.as_ref().unwrap();
    let vm = &report.vms[0];
    // Rule 9 moves what the copy budget (512 pages an epoch) leaves: at
    // least a quarter of the guest within its run here.
    assert!(
        numa.follow_migrations >= 4096 && vm.pages_per_node[1] >= 4096,
        "the VM's memory should follow it to node 1: {} frames followed, pages per node {:?}\n{}",
        numa.follow_migrations,
        vm.pages_per_node,
        report.render_text()
    );
    assert_eq!(numa.migration_failures, 0);
    assert_eq!(
        vm.pages_per_node[1],
        numa.migrations + numa.region_migrations + numa.follow_migrations
    );
    let (first, last) = locality_first_last(&report);
    assert!(
        last > first + 0.2,
        "local accesses should rise: {first:.2} -> {last:.2}\n{}",
        report.render_text()
    );
}

/// Four 1-vCPU readers of one `table`-page table (same seed: identical
/// content, merged by the scanner), one per node of the 4-node fixture with
/// memory on node 0, under a sharing + replication policy whose NUMA engine
/// replays a trace: after `quiet` quiet epochs (the scanner merges first),
/// every epoch up to `epochs` says each VM reads every table page from its
/// node. `write_after(vm)` is that reader's `write_after`. Returns the
/// trace file (keep it alive for the run) and the config.
fn traced_table_readers(
    name: &str,
    table: u64,
    quiet: u32,
    epochs: u32,
    lookups: u64,
    write_after: impl Fn(usize) -> u64,
) -> (TraceFile, String) {
    let mut text = String::from("nodes 4\n");
    for epoch in 0..epochs {
        text += &format!("epoch {epoch}\n");
        if epoch < quiet {
            continue;
        }
        for vm in 0..4 {
            for gfn in 0x100..0x100 + table {
                text += &format!("{vm} {gfn:x} {vm} r\n{vm} {gfn:x} {vm} r\n");
            }
        }
    }
    let trace = TraceFile::new(name, &text);
    let mut config = format!(
        r#"
[host]
topology = "4-node"
[policy]
name = "trace-replicate"
[policy.sharing]
enabled = true
[policy.numa]
migrate = false
replicate = true
epoch_ms = 40
sampling = "trace"
trace_file = "{}"
"#,
        trace.path().display()
    );
    for vm in 0..4 {
        config += &format!(
            "[[vm]]\nname = \"reader{vm}\"\nnode = {vm}\nmemory_node = 0\nmemory_mib = 4\n\
             workload = {{ kind = \"table_scan\", seed = 17, table_pages = {table}, \
             lookups = {lookups}, write_after = {} }}\n",
            write_after(vm)
        );
    }
    (trace, config)
}

#[test]
fn four_vms_reading_one_shared_table_get_a_replica_each() {
    if !require_kvm("four_vms_reading_one_shared_table_get_a_replica_each") {
        return;
    }
    // Four VMs, one per node, memory on node 0, scanning the same 32-page
    // table (same seed: identical content, merged by the sharing scanner).
    // A replayed trace says each VM reads every table page from its node:
    // the engine must give the table a replica on nodes 1, 2 and 3 and each
    // VM must map its own node's copy.
    const TABLE: u64 = 32;
    let (_trace, config) = traced_table_readers("table", TABLE, 10, 60, 150_000_000, |_| 0);
    let report = run_config(&config);
    let numa = report.numa.as_ref().unwrap();
    assert_eq!(numa.migrations, 0, "migration is off");
    assert_eq!(numa.replication_failures, 0, "{numa:?}");
    for (v, vm) in report.vms.iter().enumerate().skip(1) {
        assert_eq!(
            vm.pages_per_node[v],
            TABLE,
            "{} should map node {v}'s replica of every table page: {:?}\n{}",
            vm.name,
            vm.pages_per_node,
            report.render_text()
        );
    }
    assert_eq!(report.replicas.sets, TABLE, "{:?}", report.replicas);
    assert_eq!(report.replicas.pages, 4 * TABLE, "one copy per node");
}

#[test]
fn a_reader_that_turns_writer_after_replication_keeps_its_write_private() {
    if !require_kvm("a_reader_that_turns_writer_after_replication_keeps_its_write_private") {
        return;
    }
    // As above (the trace replicates the merged table on every node from
    // epoch 3, about 0.15 s in, and keeps every reader reading for 16 s so
    // no replica goes idle), but reader 1 turns writer two thirds of the
    // way through its lookups (about 4 s in on an idle host, later on a
    // busy one): it rewrites every table page. Each write must
    // break copy-on-write from a replica, the writer must see its own words
    // (its checksum includes them) and the other readers must keep their
    // replicas and never see the write (their checksums are of the original
    // table). Checksums are checked against the host model by `run_config`.
    const TABLE: u64 = 32;
    const WRITER: usize = 1;
    let (_trace, config) =
        traced_table_readers("table-writer", TABLE, 3, 400, 1_500_000_000, |vm| {
            if vm == WRITER {
                1_000_000_000
            } else {
                0
            }
        });
    let report = run_config(&config);
    let numa = report.numa.as_ref().unwrap();
    let text = report.render_text();
    assert_eq!(numa.replication_failures, 0, "{numa:?}");
    assert!(
        report.replicas.write_breaks >= TABLE,
        "every table page should be written while replicated: {:?}\n{text}",
        report.replicas
    );
    for (v, vm) in report.vms.iter().enumerate().skip(2) {
        assert_eq!(
            vm.pages_per_node[v], TABLE,
            "{} should keep node {v}'s replica of every table page: {:?}\n{text}",
            vm.name, vm.pages_per_node
        );
    }
    assert_eq!(
        report.replicas.sets, TABLE,
        "the readers' replica sets survive the write: {:?}",
        report.replicas
    );
}

/// A 1-vCPU sweep of 8 MiB on node 0 (memory there too), its vCPU moved
/// to node 3 after `after_ms`; checks that the move is reported and that
/// at least 400 of its 2048 pages followed.
fn run_moved_sweeper(name: &str, after_ms: u64) -> RunReport {
    let report = run_config(&format!(
        r#"
{MIGRATE_ONLY_10PCT}
[host]
topology = "4-node"
[[vm]]
name = "{name}"
vcpus = 1
node = 0
memory_mib = 8
workload = {{ kind = "sweep", seed = 5, passes = 10000 }}
moves = [{{ after_ms = {after_ms}, node = 3 }}]
"#
    ));
    let vm = &report.vms[0];
    assert_eq!(vm.moves.len(), 1, "{:?}", vm.moves);
    assert!(vm.moves[0].contains("moved to node 3"), "{:?}", vm.moves);
    assert_eq!(vm.vcpus[0].node, 3, "the report shows where the vCPU ended");
    assert!(
        vm.pages_per_node[3] >= 400,
        "pages should follow the vCPU to node 3: {:?}\n{}",
        vm.pages_per_node,
        report.render_text()
    );
    report
}

#[test]
fn a_vm_moved_to_another_node_has_its_pages_follow() {
    if !require_kvm("a_vm_moved_to_another_node_has_its_pages_follow") {
        return;
    }
    // 10000 passes (the most a sweep takes): a 6 s guest run alone. At 8000
    // a local CI run moved 448 pages beside the other tests of this file,
    // two others 500 or more; hence 10000 passes and at least 400 pages
    // (a fifth of the guest). At 2000 the run ended in CI, beside
    // the other tests of this file on 2 cores, with 320 of 2048 pages
    // moved, and at 4000 with 192 once the sampler's zapping was charged
    // while no host CPU is idle (`numa::cap`): sampling was capped at 2 %
    // of the vCPU's time, so pages follow at the pace the guest's own run
    // time pays for, and on a busy host a sample costs more (now 10 %,
    // MIGRATE_ONLY_10PCT).
    run_moved_sweeper("mover", 300);
}

#[test]
fn a_settled_vm_samples_less_until_its_vcpu_moves() {
    if !require_kvm("a_settled_vm_samples_less_until_its_vcpu_moves") {
        return;
    }
    // Memory and vCPU on node 0: every sample is local, the engine has
    // nothing to do, and the VM's allowance backs off from 10 % of its vCPU
    // time to 0.4 % (MIGRATE_ONLY_10PCT; numa::cap, "Backing off").
    // At 1.5 s the vCPU moves to node 3: its samples turn remote and the
    // full allowance is back within an epoch, so its pages still follow
    // (checked by `run_moved_sweeper`).
    let report = run_moved_sweeper("settler", 1500);
    let costs = &report.vms[0].costs;
    assert!(
        costs.sampling_settled_epochs >= 5 && costs.sampling_settled_epochs < costs.sampling_epochs,
        "settled before the move, not after it: {} of {} epochs\n{}",
        costs.sampling_settled_epochs,
        costs.sampling_epochs,
        report.render_text()
    );
    // Samples per second of run time: backed off before the move (the
    // first 0.5 s, from the cap down to the floor, left out) against the
    // second after it (the first 0.2 s after it left out).
    let numa = report.numa.as_ref().unwrap();
    let rate = |from: f64, to: f64| {
        let n: u64 = numa
            .series
            .iter()
            .filter(|e| e.ms >= from && e.ms < to)
            .map(|e| e.samples)
            .sum();
        n as f64 / ((to - from) / 1e3)
    };
    let (settled, moved) = (rate(500.0, 1500.0), rate(1700.0, 2700.0));
    assert!(
        moved > 2.0 * settled,
        "samples/s settled {settled:.0} against {moved:.0} after the move\n{}",
        report.render_text()
    );
}

#[test]
fn static_moves_nothing_and_every_shipped_policy_runs() {
    if !require_kvm("static_moves_nothing_and_every_shipped_policy_runs") {
        return;
    }
    for &(policy, _) in SHIPPED_POLICIES {
        let report = run_config(&format!(
            r#"
policy = "{policy}"
[host]
topology = "4-node"
[[vm]]
name = "remote"
vcpus = 2
node = 1
memory_node = 0
memory_mib = 8
workload = {{ kind = "sweep", seed = 9, passes = 400 }}
[[vm]]
name = "twin"
count = 2
node = 2
memory_node = 3
memory_mib = 4
workload = {{ kind = "table_scan", seed = 2, table_pages = 16, lookups = 20000000 }}
"#
        ));
        let cfg = Config::parse(
            &format!("policy = \"{policy}\"\n[[vm]]\nname = \"x\"\n"),
            "<t>",
            Path::new("."),
        )
        .unwrap();
        let numa = &cfg.policy.numa;
        if !numa.migrate && !numa.replicate {
            assert!(report.numa.is_none(), "{policy}: no NUMA engine");
            assert_eq!(
                report.vms[0].pages_per_node,
                vec![2048, 0, 0, 0],
                "{policy}"
            );
            assert_eq!(report.vms[1].pages_per_node[3], 1024, "{policy}");
            assert_eq!(report.replicas.sets, 0);
        } else {
            assert!(report.numa.is_some(), "{policy}: the NUMA engine ran");
        }
        if !numa.migrate {
            assert_eq!(
                report.numa.as_ref().map_or(0, |n| n.migrations),
                0,
                "{policy}"
            );
        }
    }
}

#[test]
fn write_shared_pages_stay_put_and_ping_pong_pages_freeze() {
    if !require_kvm("write_shared_pages_stay_put_and_ping_pong_pages_freeze") {
        return;
    }
    // A real guest with vCPUs on nodes 0 and 2 and memory on node 1 keeps
    // incrementing a 64-page counter array (write-shared by its vCPUs) while
    // a replayed trace (deterministic, unlike sampling on a busy host: see
    // ARCHITECTURE.md) tells the engine, per epoch:
    // - frames 0x100..0x120 are written from node 0 three times and from
    //   node 2 once: hot, and node 0 has the dominant share (0.75), but the
    //   pages are write-shared, so they must stay on node 1;
    // - frames 0x120..0x130 are written from node 2 only: they migrate
    //   there (the control: the engine does move what it should);
    // - frames 0x130..0x140 are written from node 0, then node 2, then
    //   node 0, ..., switching every 10 epochs (long enough for the old
    //   writer's decayed count to fall below writer_threshold): they follow
    //   three times (1 -> 0 -> 2 -> 0), then the ping-pong guard freezes
    //   them on node 0.
    let mut text = String::from("nodes 4\n");
    for epoch in 0..60 {
        text += &format!("epoch {epoch}\n");
        for gfn in 0x100..0x120u64 {
            text += &format!("0 {gfn:x} 0 w\n0 {gfn:x} 0 w\n0 {gfn:x} 0 w\n0 {gfn:x} 2 w\n");
        }
        for gfn in 0x120..0x130u64 {
            text += &format!("0 {gfn:x} 2 w\n").repeat(4);
        }
        let phase_node = if (epoch / 10) % 2 == 0 { 0 } else { 2 };
        for gfn in 0x130..0x140u64 {
            text += &format!("0 {gfn:x} {phase_node} w\n").repeat(4);
        }
    }
    let trace = TraceFile::new("pingpong", &text);
    let report = run_config(&format!(
        r#"
[host]
topology = "4-node"
[policy]
name = "trace-pingpong"
[policy.sharing]
enabled = false
[policy.numa]
migrate = true
replicate = false
epoch_ms = 20
hot_threshold = 4.0
dominant_share = 0.75
decay = 0.5
freeze_after_moves = 3
freeze_window_epochs = 100
freeze_epochs = 1000
writer_threshold = 0.25
sampling = "trace"
trace_file = "{}"
[[vm]]
name = "counters"
vcpu_nodes = [0, 2]
memory_node = 1
memory_mib = 2
workload = {{ kind = "counters", counters = 4096, increments = 200000000 }}
"#,
        trace.path().display()
    ));
    let numa = report.numa.as_ref().unwrap();
    let vm = &report.vms[0];
    assert!(
        numa.epochs >= 60,
        "the guest must outlive the 60-epoch trace: {} epochs\n{}",
        numa.epochs,
        report.render_text()
    );
    assert_eq!(numa.migration_failures, 0, "{numa:?}");
    // 512 frames: 448 untouched + 32 write-shared stay on node 1; 16 on node
    // 2 (control); 16 frozen on node 0 after their third move.
    assert_eq!(
        vm.pages_per_node,
        vec![16, 480, 16, 0],
        "{}",
        report.render_text()
    );
    assert_eq!(numa.migrations, 16 + 3 * 16, "{numa:?}");
    assert_eq!(
        numa.freezes, 16,
        "each ping-pong page frozen once: {numa:?}"
    );
}

#[test]
fn four_vms_reading_one_shared_table_get_replicas_with_real_sampling() {
    if !require_kvm("four_vms_reading_one_shared_table_get_replicas_with_real_sampling") {
        return;
    }
    // As above, but the engine learns who reads what from real page-fault
    // samples. Sampling is sparse (a VM samples 64 of its 1024 frames per
    // round), so the test asks for most of the table, not all of it; and a
    // replica must not be dropped for a dip in sparse counts (which would
    // make it again and end in freezes). The shipped policy caps sampling
    // at 2 % of each vCPU's time, a few hundred samples a second here, too
    // few to find 32 pages of 1024 within a 2 s run; this test is about the
    // mechanism, so it runs the shipped policy with the cap raised to 30 %.
    const TABLE: u64 = 32;
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/replicate-only.toml"),
    )
    .unwrap();
    assert!(shipped.contains("\nmax_sampling_overhead = 0.02\n"));
    let policy = common::TraceFile::named(
        "replicate-uncapped",
        "replicate-uncapped.toml",
        &shipped.replace(
            "\nmax_sampling_overhead = 0.02\n",
            "\nmax_sampling_overhead = 0.3\n",
        ),
    );
    let mut config = format!(
        "policy = \"{}\"\n[host]\ntopology = \"4-node\"\n",
        policy.path().display()
    );
    for vm in 0..4 {
        config += &format!(
            "[[vm]]\nname = \"reader{vm}\"\nnode = {vm}\nmemory_node = 0\nmemory_mib = 4\n\
             workload = {{ kind = \"table_scan\", seed = 17, table_pages = {TABLE}, lookups = 600000000 }}\n"
        );
    }
    let report = run_config(&config);
    let numa = report.numa.as_ref().unwrap();
    assert!(
        numa.source.contains("page-level samples"),
        "{}",
        numa.source
    );
    assert_eq!(numa.replication_failures, 0, "{numa:?}");
    assert!(
        report.replicas.sets >= TABLE * 3 / 4,
        "most table pages should have replicas: {:?}\n{}",
        report.replicas,
        report.render_text()
    );
    for (v, vm) in report.vms.iter().enumerate().skip(1) {
        assert!(
            vm.pages_per_node[v] >= TABLE * 5 / 8,
            "{} should map its node's replica of most table pages: {:?}\n{}",
            vm.name,
            vm.pages_per_node,
            report.render_text()
        );
    }
    assert!(
        numa.freezes <= TABLE / 8,
        "replicas should not churn into freezes: {numa:?}"
    );
}
