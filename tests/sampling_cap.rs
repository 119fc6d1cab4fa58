//! The sampling cost cap keeps an aggressive policy from livelocking a
//! guest. Before the cap, two 16 MiB `random` guests under a policy that
//! only shortened `epoch_ms` to 10 ms did not finish within 30 s (6 runs of
//! 6): the sampler zapped about 2 M pages and the guests spent their time
//! in minor faults. Alone in its test binary so no sibling test competes for
//! the CPUs while the runs are compared. Each side runs three times and the
//! fastest runs are compared: on this noisy host one run of these 0.2 s
//! guests can take 1.5x another under the same policy (seen in CI: 352
//! against 222 ms, with 47 samples in all).

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
    // Every knob at its default but the epoch: 10 ms epochs of 8 rounds of
    // 64 pages per VM ask for 51,200 zaps per second per VM.
    let fast_epochs = "[policy]\nname = \"fast-epochs\"\n[policy.numa]\nmigrate = true\n\
                       replicate = true\nsampling = \"page-faults\"\nepoch_ms = 10";
    let slowest = |r: &disco::report::RunReport| r.vms.iter().map(|v| v.run_ms).fold(0.0, f64::max);
    let (mut base, mut capped) = (f64::INFINITY, f64::INFINITY);
    let mut aggressive = None;
    for _ in 0..3 {
        let static_run = run_config(&two_random_guests("policy = \"static\""));
        assert!(
            static_run.all_ok(),
            "static run: {}",
            static_run.render_text()
        );
        base = base.min(slowest(&static_run));
        let run = run_config(&two_random_guests(fast_epochs));
        assert!(run.all_ok(), "capped run: {}", run.render_text());
        if slowest(&run) < capped {
            capped = slowest(&run);
            aggressive = Some(run);
        }
    }
    let aggressive = aggressive.unwrap();
    eprintln!("static {base:.0} ms, epoch_ms = 10 {capped:.0} ms (fastest of 3 each)");
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
