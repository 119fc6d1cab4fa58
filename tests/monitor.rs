//! The whole monitor on real KVM: configs in, guests run on pool-backed
//! memory, checksums checked against the host model, invariants verified
//! before, during and after the run.

mod common;

use common::{run_config, TraceFile};
use disco::kvm_check::require_kvm;
use disco::report::RunReport;
use disco::vm::VcpuOutcome;

/// Four VMs with two vCPUs each, one per node of the 4-node fixture, with
/// memory on a different node than the vCPUs for half of them.
fn four_vms(workload: &str) -> String {
    let mut text = String::from("policy = \"static\"\n[host]\ntopology = \"4-node\"\n");
    for i in 0..4 {
        text += &format!(
            "[[vm]]\nname = \"vm{i}\"\nvcpu_nodes = [{i}, {}]\nmemory_node = {}\nmemory_mib = 24\ntime_limit_s = 120\nworkload = {workload}\n",
            (i + 1) % 4,
            (i + i % 2) % 4
        );
    }
    text
}

fn assert_all_verified(report: &RunReport) {
    assert!(report.verify_ok, "invariants: {:?}", report.verify_errors);
    assert!(
        report.verify_runs >= 3,
        "verify ran before, during and after"
    );
    assert!(
        report.verify_while_running >= 1,
        "verify ran while guests ran"
    );
    for vm in &report.vms {
        assert_eq!(vm.status, "ok", "{}: {:?}", vm.name, vm.error);
        for v in &vm.vcpus {
            match &v.outcome {
                VcpuOutcome::Done { result, expected } => {
                    assert_eq!(Some(*result), *expected, "{} vcpu{}", vm.name, v.index)
                }
                other => panic!("{} vcpu{} did not finish: {other:?}", vm.name, v.index),
            }
        }
        assert_eq!(
            vm.pages_per_node.iter().sum::<u64>(),
            vm.memory_mib * 256,
            "every guest page is backed by a pool page"
        );
    }
    assert!(
        report
            .pools
            .iter()
            .all(|p| p.used_pages as u64 <= p.capacity_pages as u64),
        "pool usage within capacity"
    );
    let json = serde_json::to_string(report).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
}

#[test]
fn four_vms_fill() {
    if !require_kvm("four_vms_fill") {
        return;
    }
    assert_all_verified(&run_config(&four_vms("{ kind = \"fill\", seed = 5 }")));
}

#[test]
fn four_vms_sweep() {
    if !require_kvm("four_vms_sweep") {
        return;
    }
    assert_all_verified(&run_config(&four_vms(
        "{ kind = \"sweep\", seed = 6, passes = 6 }",
    )));
}

#[test]
fn four_vms_random() {
    if !require_kvm("four_vms_random") {
        return;
    }
    assert_all_verified(&run_config(&four_vms(
        "{ kind = \"random\", seed = 7, touches = 3000000 }",
    )));
}

#[test]
fn four_vms_table_scan() {
    if !require_kvm("four_vms_table_scan") {
        return;
    }
    assert_all_verified(&run_config(&four_vms(
        "{ kind = \"table_scan\", seed = 8, table_pages = 512, lookups = 3000000 }",
    )));
}

#[test]
fn four_vms_counters() {
    if !require_kvm("four_vms_counters") {
        return;
    }
    assert_all_verified(&run_config(&four_vms(
        "{ kind = \"counters\", counters = 16, increments = 1000000 }",
    )));
}

#[test]
fn memory_is_placed_on_the_configured_node() {
    if !require_kvm("memory_is_placed_on_the_configured_node") {
        return;
    }
    let report = run_config(&four_vms("{ kind = \"fill\", seed = 9 }"));
    for (i, vm) in report.vms.iter().enumerate() {
        let node = (i + i % 2) % 4;
        assert_eq!(vm.pages_per_node[node], vm.memory_mib * 256, "{}", vm.name);
        assert_eq!(vm.vcpus[0].node, i);
    }
    let used: Vec<u32> = report.pools.iter().map(|p| p.used_pages).collect();
    assert_eq!(used, vec![2 * 24 * 256, 0, 2 * 24 * 256, 0]);
}

#[test]
fn crashing_and_looping_guests_are_reported_while_others_finish() {
    if !require_kvm("crashing_and_looping_guests_are_reported_while_others_finish") {
        return;
    }
    let report = run_config(
        r#"
policy = "static"
[host]
topology = "2-socket"

[[vm]]
name = "crasher"
node = 0
memory_mib = 4
workload = { kind = "crash" }

[[vm]]
name = "looper"
vcpus = 2
node = 1
memory_mib = 4
time_limit_s = 2
workload = { kind = "spin" }

[[vm]]
name = "stranger"
node = 1
memory_mib = 4
workload = { kind = "bad_io" }

[[vm]]
name = "good-fill"
vcpus = 2
node = 0
memory_mib = 16
workload = { kind = "fill", seed = 3 }

[[vm]]
name = "good-sweep"
vcpus = 2
node = 1
memory_mib = 16
workload = { kind = "sweep", seed = 4, passes = 20 }

[[vm]]
name = "good-counters"
vcpus = 2
node = 0
memory_mib = 4
workload = { kind = "counters", counters = 4, increments = 2000000 }
"#,
    );
    assert!(report.verify_ok, "invariants: {:?}", report.verify_errors);
    let vm = |name: &str| report.vms.iter().find(|v| v.name == name).unwrap();
    let failed_reason = |name: &str| match &vm(name).vcpus[0].outcome {
        VcpuOutcome::Failed { reason, regs } => {
            assert!(regs.rip != 0, "{name}: registers are reported");
            reason.clone()
        }
        other => panic!("{name} should have failed: {other:?}"),
    };
    assert_eq!(vm("crasher").status, "failed");
    let crash = failed_reason("crasher");
    assert!(
        crash.contains("triple fault") || crash.contains("SHUTDOWN"),
        "{crash}"
    );
    assert_eq!(vm("looper").status, "failed");
    assert!(failed_reason("looper").contains("time limit"));
    assert_eq!(vm("stranger").status, "failed");
    assert!(failed_reason("stranger").contains("unknown I/O port"));
    for good in ["good-fill", "good-sweep", "good-counters"] {
        assert_eq!(vm(good).status, "ok", "{good}: {:?}", vm(good).error);
    }
    assert!(!report.all_ok());
    let text = report.render_text();
    assert!(text.contains("3 of 6 VMs ok"), "{text}");
    assert!(
        text.contains("rip"),
        "register dump in the text report: {text}"
    );
}

#[test]
fn final_passes_cut_short_say_how_far_they_got() {
    if !require_kvm("final_passes_cut_short_say_how_far_they_got") {
        return;
    }
    // No time at all for the final passes: the report must say so, and how
    // far the scanner got, instead of a bare "not completed".
    let config = common::parse(
        "policy = \"disco\"\n[[vm]]\nname = \"twin\"\ncount = 2\nmemory_mib = 8\n\
         workload = { kind = \"fill\", seed = 3 }\n",
    );
    let options = disco::monitor::RunOptions {
        settle_limit: Some(std::time::Duration::ZERO),
        ..common::run_options()
    };
    let report = disco::monitor::run(&config, &options).expect("the monitor runs");
    assert!(report.all_ok(), "{}", report.render_text());
    let sharing = report.sharing.as_ref().expect("sharing report");
    assert!(!sharing.settled);
    let note = sharing.settle_note.as_deref().expect("a note says why");
    assert!(
        // The scanner may finish the pass it was in before it stops.
        note.starts_with("final passes not completed: ")
            && note.contains(" of 2 in the 0 s limit, "),
        "{note}"
    );
    assert!(report.render_text().contains(note));
}

#[test]
fn the_final_passes_of_hundreds_of_vms_complete() {
    if !require_kvm("the_final_passes_of_hundreds_of_vms_complete") {
        return;
    }
    // 300 identical VMs finish long before the scanner has seen their
    // memory once; with the guests done it runs unthrottled and must finish
    // its two passes within the default limit, finding the duplicates.
    let report = run_config(
        "policy = \"disco\"\n[[vm]]\nname = \"many\"\ncount = 300\nmemory_mib = 4\n\
         workload = { kind = \"fill\", seed = 5 }\n",
    );
    assert!(report.all_ok(), "{}", report.render_text());
    let sharing = report.sharing.as_ref().expect("sharing report");
    assert!(
        sharing.settled,
        "{:?}\n{}",
        sharing.settle_note,
        report.render_text()
    );
    // Each VM's 3 MiB data area is the same content: all but one copy saved.
    let data_pages = 299 * 3 * 256;
    assert!(
        sharing.memory.saved_pages >= data_pages,
        "saved {} pages, expected at least {data_pages}",
        sharing.memory.saved_pages
    );
}

#[test]
fn the_disco_policy_shares_identical_guests_and_reports_it() {
    if !require_kvm("the_disco_policy_shares_identical_guests_and_reports_it") {
        return;
    }
    let report = run_config(
        r#"
policy = "disco"
[host]
topology = "2-socket"

[[vm]]
name = "twin"
count = 2
vcpus = 2
node = 0
memory_mib = 8
workload = { kind = "fill", seed = 21 }

[[vm]]
name = "tenant"
vcpus = 1
node = 1
memory_mib = 8
sharing_domain = "other"
workload = { kind = "fill", seed = 21 }
"#,
    );
    assert!(report.all_ok(), "{}", report.render_text());
    let sharing = report.sharing.as_ref().expect("sharing report");
    assert!(sharing.settled, "the scanner finished its passes");
    // The twins' data areas (everything past the first MiB) are identical.
    let data_pages = 7 * 256;
    assert!(
        sharing.memory.saved_pages >= data_pages,
        "saved {} pages, expected at least {data_pages}",
        sharing.memory.saved_pages
    );
    let vm = |name: &str| report.vms.iter().find(|v| v.name == name).unwrap();
    assert!(vm("twin-0").shared_pages >= data_pages);
    // The other tenant holds the same content but shares only within itself
    // (its zero pages), never with the twins.
    assert!(vm("tenant").shared_pages < data_pages);
    assert!(report.render_text().contains("MiB saved"));
}

/// The NUMA engine in a real run, fed by a replayed trace: a VM whose vCPU
/// runs on node 2 while its memory starts on node 0; the trace says node 2
/// reads 64 of its data pages hard, so those pages migrate to node 2 while
/// the guest runs, and the guest's results stay right.
#[test]
fn a_replayed_trace_migrates_hot_pages_to_the_reading_node() {
    if !require_kvm("a_replayed_trace_migrates_hot_pages_to_the_reading_node") {
        return;
    }
    let mut text = String::from("# 64 hot pages read from node 2\nnodes 4\n");
    for epoch in 0..20 {
        text += &format!("epoch {epoch}\n");
        for gfn in 0x100..0x140u64 {
            for _ in 0..16 {
                text += &format!("0 {gfn:x} 2 r\n");
            }
        }
    }
    let trace = TraceFile::new("hot", &text);
    let report = run_config(&format!(
        r#"
[host]
topology = "4-node"

[policy]
name = "trace-migrate"
[policy.numa]
migrate = true
replicate = false
epoch_ms = 5
sampling = "trace"
trace_file = "{}"

[[vm]]
name = "remote"
vcpu_nodes = [2]
memory_node = 0
memory_mib = 8
workload = {{ kind = "sweep", seed = 4, passes = 400 }}
"#,
        trace.path().display()
    ));
    assert!(report.all_ok(), "{}", report.render_text());
    let numa = report.numa.as_ref().expect("the NUMA engine ran");
    assert!(numa.source.contains("trace"), "{}", numa.source);
    assert_eq!(numa.migrations, 64, "{numa:?}");
    assert_eq!(numa.migration_failures, 0);
    let vm = &report.vms[0];
    assert_eq!(vm.pages_per_node[2], 64, "the hot pages live on node 2 now");
    assert_eq!(vm.pages_per_node[0], 8 * 256 - 64);
    let first = numa.series.iter().find(|e| e.samples > 0).unwrap();
    let last = numa.series.iter().rev().find(|e| e.samples > 0).unwrap();
    assert_eq!(first.local_fraction, 0.0);
    assert_eq!(
        last.local_fraction, 1.0,
        "after migration every sampled access is local"
    );
    assert!(last.modelled_cost < first.modelled_cost);
}
