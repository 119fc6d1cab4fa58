//! What the full policy costs guests: no merge/break churn on fresh memory,
//! and page sampling that reaches every VM within its cost cap.

mod common;

use common::run_config;
use disco::kvm_check::require_kvm;

/// Two identical `fill` guests under the full Disco policy. Fill writes
/// every page once, so a merge can only break if it merged a page the guest
/// had not written yet. The scanner skips holes (pages never written),
/// merges only content that held still for 200 ms and releases zero pages
/// (no sharing, so no break), so the only breaks left are pages a guest
/// writes twice: none in `fill`'s data area.
/// The bound of 16 leaves room for a few frames the guest's own bookkeeping
/// may rewrite; before the hole rule the same run broke 5,633 merges.
#[test]
fn identical_fill_guests_under_the_full_policy_do_not_churn() {
    if !require_kvm("identical_fill_guests_under_the_full_policy_do_not_churn") {
        return;
    }
    let report = run_config(
        "policy = \"disco\"\n\n[[vm]]\nname = \"twin\"\ncount = 2\nvcpus = 2\nmemory_mib = 64\n\
         workload = { kind = \"fill\", seed = 7 }\n",
    );
    assert!(report.all_ok(), "{}", report.render_text());
    let sharing = report.sharing.as_ref().expect("sharing ran");
    eprintln!(
        "merges {} in {} batches, zero pages released {}, breaks {}, holes skipped {}, saved {} pages",
        sharing.scanner.merges,
        sharing.scanner.merge_batches,
        sharing.scanner.zero_releases,
        sharing.memory.cow_breaks,
        sharing.scanner.holes_skipped,
        sharing.memory.saved_pages
    );
    assert!(
        sharing.memory.cow_breaks <= 16,
        "{} copy-on-write breaks: {}",
        sharing.memory.cow_breaks,
        report.render_text()
    );
    // The twins still share what they hold in common once they are done.
    assert!(
        sharing.memory.saved_pages >= 15_000,
        "saved only {} pages: {}",
        sharing.memory.saved_pages,
        report.render_text()
    );
    let breaks: u64 = report.vms.iter().map(|v| v.costs.cow_breaks).sum();
    assert_eq!(breaks, sharing.memory.cow_breaks, "per-VM breaks add up");
}

/// Four VMs that keep touching their memory, under the full policy: each
/// one gets its share of page samples (issue: only the first VM ever did,
/// and it ran 3-9x slower than the others), and none is charged more
/// sampling time than the cap allows. (Their run times are not compared:
/// merging identical guests pauses each of them once per merged page, which
/// the report's cost table shows, and which slows them unevenly.)
#[test]
fn every_vm_gets_samples_and_none_pays_more_than_the_cap() {
    if !require_kvm("every_vm_gets_samples_and_none_pays_more_than_the_cap") {
        return;
    }
    let report = run_config(
        // Two nodes: on one, the disco policy samples nothing (every page
        // is local).
        "policy = \"disco\"\n[host]\ntopology = \"2-socket\"\n\n[[vm]]\nname = \"r\"\ncount = 4\n\
         vcpus = 1\nmemory_mib = 32\ntime_limit_s = 120\n\
         workload = { kind = \"random\", seed = 5, touches = 10000000 }\n",
    );
    assert!(report.all_ok(), "{}", report.render_text());
    let numa = report.numa.as_ref().expect("the NUMA engine ran");
    assert_eq!(
        numa.max_sampling_overhead, 0.02,
        "policies/disco.toml's cap"
    );
    let mean = report
        .vms
        .iter()
        .map(|v| v.costs.sampled_faults as f64)
        .sum::<f64>()
        / report.vms.len() as f64;
    for vm in &report.vms {
        let c = &vm.costs;
        assert!(
            c.sampled_faults as f64 >= mean / 3.0 && c.sampled_faults > 0,
            "{} got {} samples, the mean is {mean:.0}: {}",
            vm.name,
            c.sampled_faults,
            report.render_text()
        );
        assert!(
            c.sampling_ms <= 0.02 * c.vcpu_ms * 1.5 + 5.0,
            "{}: sampling charged {:.1} ms of {:.1} ms of vCPU time: {}",
            vm.name,
            c.sampling_ms,
            c.vcpu_ms,
            report.render_text()
        );
        // The vCPU threads' CPU time is measured (getrusage per thread) and
        // cannot exceed their wall-clock time (a few ms of slack for the
        // kernel's accounting granularity).
        let cpu = c.vcpu_user_ms + c.vcpu_system_ms;
        assert!(
            cpu > 0.0 && cpu <= c.vcpu_ms + 10.0,
            "{}: vCPU CPU time {cpu:.1} ms against {:.1} ms of vCPU wall time",
            vm.name,
            c.vcpu_ms
        );
    }
}

/// A VM whose vCPUs have exited is no longer sampled (zapping its pages
/// would cost the monitor and yield nothing), and each VM's vCPU time
/// splits into on a CPU, waiting for one and blocked, which add up to its
/// vCPU wall time.
#[test]
fn a_finished_vm_is_not_sampled_and_vcpu_time_adds_up() {
    if !require_kvm("a_finished_vm_is_not_sampled_and_vcpu_time_adds_up") {
        return;
    }
    let report = run_config(
        "policy = \"disco\"\n[host]\ntopology = \"2-socket\"\n\n\
         [[vm]]\nname = \"short\"\nvcpus = 1\nmemory_mib = 16\n\
         workload = { kind = \"random\", seed = 3, touches = 300000 }\n\n\
         [[vm]]\nname = \"long\"\nvcpus = 1\nmemory_mib = 16\ntime_limit_s = 120\n\
         workload = { kind = \"random\", seed = 4, touches = 80000000 }\n",
    );
    assert!(report.all_ok(), "{}", report.render_text());
    let (short, long) = (&report.vms[0], &report.vms[1]);
    assert!(
        long.run_ms > 3.0 * short.run_ms,
        "the test needs the long VM to outlive the short one: {:.0} against {:.0} ms",
        long.run_ms,
        short.run_ms
    );
    // policies/disco.toml: 8 rounds per 100 ms epoch. Slack: the round in
    // flight when the VM ends, and the engine starting before the VM.
    let rounds_while_running = 80.0 * short.run_ms / 1e3;
    assert!(
        (short.costs.sampling_rounds as f64) <= rounds_while_running * 1.5 + 16.0,
        "short ran {:.0} ms (about {rounds_while_running:.0} rounds) but was offered {} rounds \
         (long: {}): {}",
        short.run_ms,
        short.costs.sampling_rounds,
        long.costs.sampling_rounds,
        report.render_text()
    );
    assert!(long.costs.sampled_faults > 0, "{}", report.render_text());
    let schedstats = std::path::Path::new("/proc/thread-self/schedstat").exists();
    for vm in &report.vms {
        let c = &vm.costs;
        let accounted = c.vcpu_user_ms + c.vcpu_system_ms + c.vcpu_waiting_ms + c.vcpu_blocked_ms;
        // Wall time per vCPU counts from the start of the run, a thread's
        // life from when its vCPU registered; the tick-based CPU time
        // (getrusage) can differ from the scheduler's by a few ms.
        assert!(
            accounted <= c.vcpu_ms + 20.0,
            "{}: {accounted:.1} ms accounted against {:.1} ms of vCPU wall time: {c:?}",
            vm.name,
            c.vcpu_ms
        );
        if schedstats {
            assert!(
                accounted >= 0.8 * c.vcpu_ms,
                "{}: only {accounted:.1} of {:.1} ms of vCPU wall time accounted for: {c:?}",
                vm.name,
                c.vcpu_ms
            );
        }
    }
}
