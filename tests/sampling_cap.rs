//! The sampling cost cap keeps an aggressive policy from livelocking a
//! guest. Before the cap, two 16 MiB `random` guests under a policy that
//! only shortened `epoch_ms` to 10 ms did not finish within 30 s (6 runs of
//! 6): the sampler zapped about 2 M pages and the guests spent their time
//! in minor faults. Alone in its test binary so no sibling test competes for
//! the CPUs while the two runs are compared.

mod common;

use common::run_config;
use disco::kvm_check::require_kvm;

fn two_random_guests(policy: &str) -> String {
    format!(
        "{policy}\n\n[[vm]]\nname = \"r\"\ncount = 2\nvcpus = 1\nmemory_mib = 16\ntime_limit_s = 60\n\
         workload = {{ kind = \"random\", seed = 13, touches = 10000000 }}\n"
    )
}

#[test]
fn an_aggressive_sampling_policy_costs_the_guests_a_bounded_share() {
    if !require_kvm("an_aggressive_sampling_policy_costs_the_guests_a_bounded_share") {
        return;
    }
    let static_run = run_config(&two_random_guests("policy = \"static\""));
    assert!(
        static_run.all_ok(),
        "static run: {}",
        static_run.render_text()
    );
    // Every knob at its default but the epoch: 10 ms epochs of 8 rounds of
    // 64 pages per VM ask for 51,200 zaps per second per VM.
    let aggressive = run_config(&two_random_guests(
        "[policy]\nname = \"fast-epochs\"\n[policy.numa]\nmigrate = true\nreplicate = true\n\
         sampling = \"page-faults\"\nepoch_ms = 10",
    ));
    assert!(
        aggressive.all_ok(),
        "capped run: {}",
        aggressive.render_text()
    );
    let slowest = |r: &disco::report::RunReport| r.vms.iter().map(|v| v.run_ms).fold(0.0, f64::max);
    let (base, capped) = (slowest(&static_run), slowest(&aggressive));
    eprintln!("static {base:.0} ms, epoch_ms = 10 {capped:.0} ms");
    assert!(
        capped <= 1.5 * base,
        "the capped guests took {capped:.0} ms against {base:.0} ms under static: {}",
        aggressive.render_text()
    );
    // The sampler did run, and the cap is what held it back.
    let numa = aggressive.numa.as_ref().expect("the NUMA engine ran");
    assert!(
        numa.samples > 0,
        "no samples at all: {}",
        aggressive.render_text()
    );
    for vm in &aggressive.vms {
        let c = &vm.costs;
        assert!(c.sampled_faults > 0, "{}: never sampled", vm.name);
        assert!(
            c.sampling_capped_rounds > 0 && c.sampled_pages_per_s < c.asked_pages_per_s / 4.0,
            "{}: the cap should have cut the policy's ask: {c:?}",
            vm.name
        );
        // The charge stays near the cap (one epoch's allowance up front,
        // and faults land after the zaps that caused them).
        assert!(
            c.sampling_ms <= 0.02 * c.vcpu_ms * 1.5 + 5.0,
            "{}: sampling charged {:.1} ms of {:.1} ms of vCPU time",
            vm.name,
            c.sampling_ms,
            c.vcpu_ms
        );
    }
}
