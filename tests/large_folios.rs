//! Guest RAM in large shmem folios (`[host] large_folios`,
//! `disco::memory::folios`): really allocated when the host allows a size,
//! guests' data and the sharing of identical pages still exact, never
//! mixed with page sampling.
//!
//! The tests set the host's 64 kB `shmem_enabled` to `advise` for their
//! run and put it back (it needs root, as KVM and userfaultfd do here).
//! They run one at a time: the knob and the kernel's folio counter are the
//! whole host's.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{parse, run_config};
use disco::kvm_check::require_kvm;
use disco::memory::folios::{self, KnobGuard};
use disco::monitor::Monitor;

static HOST_KNOB: Mutex<()> = Mutex::new(());

/// Holds the host's 64 kB shmem folios at `advise` for one test.
fn allow_64k() -> (std::sync::MutexGuard<'static, ()>, KnobGuard) {
    let lock = HOST_KNOB.lock().unwrap_or_else(|e| e.into_inner());
    let knob = KnobGuard::set(64, "advise")
        .expect("these tests need a kernel with multi-size shmem folios (6.11 or later) and root");
    (lock, knob)
}

fn allocs_64k() -> u64 {
    folios::shmem_allocs(64).expect("the kernel counts 64 kB shmem folio allocations")
}

const TWINS: &str = "policy = \"disco\"\n\n[[vm]]\nname = \"twin\"\ncount = 2\nvcpus = 2\n\
                     memory_mib = 64\nworkload = { kind = \"fill\", seed = 7 }\n";

/// Two identical `fill` guests under the full policy on this one-node
/// host (sharing on, no sampling): their RAM comes in 64 kB folios, yet
/// the scanner still merges their pages one by one (punching single pages
/// out of large folios), every checksum and invariant check holds, and
/// the same run with `large_folios = false` allocates none.
#[test]
fn twins_in_large_folios_share_exactly_and_the_switch_turns_them_off() {
    if !require_kvm("twins_in_large_folios_share_exactly_and_the_switch_turns_them_off") {
        return;
    }
    let (_lock, _knob) = allow_64k();
    let before = allocs_64k();
    let report = run_config(TWINS);
    let large = allocs_64k() - before;
    assert!(report.all_ok(), "{}", report.render_text());
    assert!(
        report.large_folios.starts_with("asked for") && report.large_folios.contains("64"),
        "{}",
        report.large_folios
    );
    // 2 x 64 MiB of guest RAM is 2,048 folios of 64 kB; the guests write
    // nearly all of it.
    assert!(large >= 1_000, "only {large} 64 kB folios allocated");
    let sharing = report.sharing.as_ref().expect("sharing ran");
    assert!(
        sharing.memory.saved_pages >= 15_000,
        "saved only {} pages: {}",
        sharing.memory.saved_pages,
        report.render_text()
    );
    eprintln!(
        "large folios: {large} allocated, {} pages saved, {} breaks",
        sharing.memory.saved_pages, sharing.memory.cow_breaks
    );

    let before = allocs_64k();
    let small = run_config(&TWINS.replace(
        "policy = \"disco\"\n",
        "policy = \"disco\"\n[host]\nlarge_folios = false\n",
    ));
    assert!(small.all_ok(), "{}", small.render_text());
    assert_eq!(
        allocs_64k() - before,
        0,
        "large_folios = false asks for none"
    );
    assert!(
        small.large_folios.starts_with("off"),
        "{}",
        small.large_folios
    );
}

/// Page sampling and large folios exclude each other: a monitor that
/// samples from the start does not ask for them (and allocates none), and
/// a policy that needs sampling, swapped in once guest RAM asked, gets
/// sampling refused with the reason instead of a storm of faults.
#[test]
fn sampling_and_large_folios_exclude_each_other() {
    if !require_kvm("sampling_and_large_folios_exclude_each_other") {
        return;
    }
    let (_lock, _knob) = allow_64k();
    let one_vm = "[host]\ntopology = \"2-socket\"\n\n[[vm]]\nname = \"a\"\nvcpus = 1\n\
                  memory_mib = 16\nworkload = { kind = \"sweep\", seed = 3, passes = 2 }\n";

    let before = allocs_64k();
    let sampled = run_config(&format!("policy = \"disco\"\n{one_vm}"));
    assert!(sampled.all_ok(), "{}", sampled.render_text());
    assert!(sampled.numa.is_some(), "the NUMA engine sampled pages");
    assert!(
        sampled
            .large_folios
            .starts_with("not asked: page sampling is on"),
        "{}",
        sampled.large_folios
    );
    assert_eq!(allocs_64k() - before, 0, "no large folio under sampling");

    let config = parse(&format!("policy = \"static\"\n{one_vm}"));
    let mut monitor = Monitor::for_config(&config, Duration::from_secs(3600)).unwrap();
    monitor.create_vm(&config.vms[0]).expect("the VM is built");
    let disco = disco::config::load_policy("disco", std::path::Path::new(".")).unwrap();
    monitor.set_policy(disco).expect("the policy is swapped in");
    let status = monitor.policy_status();
    assert!(
        status.contains("page sampling is unavailable")
            && status.contains("large shmem folios")
            && status.contains("large_folios = false"),
        "{status}"
    );
    monitor
        .memory()
        .verify()
        .expect("memory agrees with itself");
}

/// The same over the API: `disco serve` asks for large folios by default,
/// so a sampling policy swapped in after a VM came is refused its
/// sampling, with the reason; `--large-folios false` keeps 4 KiB folios
/// and the swap turns sampling on.
#[test]
fn a_served_monitor_keeps_small_folios_when_told_so_for_a_later_sampling_policy() {
    if !require_kvm("a_served_monitor_keeps_small_folios_when_told_so_for_a_later_sampling_policy")
    {
        return;
    }
    let (_lock, _knob) = allow_64k();
    let vm = serde_json::json!({"vcpus": 1, "memory_mib": 8, "time_limit_s": 60,
        "workload": {"kind": "sweep", "seed": 4, "passes": 2000}});
    let sampling = serde_json::json!({"numa": {"migrate": true, "sampling": "page-faults"}});
    for (name, large) in [("large", true), ("small", false)] {
        let mut args = vec!["--topology", "2-socket", "--policy", "static"];
        if !large {
            args.extend(["--large-folios", "false"]);
        }
        let s = common::serve::Serve::spawn("folios", name, &args, false, false);
        s.expect("PUT", "/v1/vms/walker", Some(vm.clone()), 201);
        let swapped = s.expect("PUT", "/v1/policy", Some(sampling.clone()), 200);
        let status = swapped["status"].as_str().unwrap();
        if large {
            assert!(
                status.contains("page sampling is unavailable")
                    && status.contains("large shmem folios"),
                "{status}"
            );
        } else {
            assert!(
                status.contains("NUMA engine active") && !status.contains("unavailable"),
                "{status}"
            );
        }
        s.verified();
    }
}
