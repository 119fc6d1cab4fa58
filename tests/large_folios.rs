//! Guest RAM in large shmem folios (`[host] large_folios`,
//! `disco::memory::folios`): really allocated when the host allows a size,
//! guests' data and the sharing of identical pages still exact, also
//! under page sampling.
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

/// Page sampling keeps large folios: only the pages zapped for a sample
/// are registered for minor faults, and only until their touch. A
/// sampled guest on two nodes gets 64 kB folios, its samples, and its
/// kernel mappings back (every armed page disarmed and merged into its
/// neighbours again: `Memory::verify` counts them against the pmap while
/// the guest runs). A sampling policy swapped in once guest RAM asked for
/// large folios starts too.
#[test]
fn sampled_guests_keep_large_folios_and_their_mappings() {
    if !require_kvm("sampled_guests_keep_large_folios_and_their_mappings") {
        return;
    }
    let (_lock, _knob) = allow_64k();
    let one_vm = "[host]\ntopology = \"2-socket\"\n\n[[vm]]\nname = \"a\"\nvcpus = 1\n\
                  memory_mib = 16\nworkload = { kind = \"sweep\", seed = 3, passes = 400 }\n";
    // A generous cap, so the run gets many samples.
    let policy = "[policy]\nname = \"sampled\"\n[policy.numa]\nmigrate = true\n\
                  sampling = \"page-faults\"\nmax_sampling_overhead = 0.1\n\
                  settled_sampling_overhead = 0.1\n";

    let before = allocs_64k();
    let sampled = run_config(&format!("{policy}{one_vm}"));
    let large = allocs_64k() - before;
    assert!(sampled.all_ok(), "{}", sampled.render_text());
    let numa = sampled.numa.as_ref().expect("the NUMA engine ran");
    let sampler = numa.sampler.as_ref().expect("page-fault samples");
    assert!(sampler.samples >= 20, "{}", sampled.render_text());
    // Its private pages left minor mode after their samples.
    assert!(sampler.disarmed_runs >= 10, "{}", sampled.render_text());
    assert!(
        sampled.large_folios.starts_with("asked for") && sampled.large_folios.contains("64"),
        "{}",
        sampled.large_folios
    );
    // 16 MiB is 256 folios of 64 kB; the guest writes all of it.
    assert!(large >= 200, "only {large} 64 kB folios under sampling");
    // Checked while the guest ran, armed pages and all (`all_ok` says
    // every check held).
    assert!(
        sampled.verify_while_running >= 1,
        "{}",
        sampled.render_text()
    );

    let config = parse(&format!("policy = \"static\"\n{one_vm}"));
    let mut monitor = Monitor::for_config(&config, Duration::from_secs(3600)).unwrap();
    monitor.create_vm(&config.vms[0]).expect("the VM is built");
    let disco = disco::config::load_policy("disco", std::path::Path::new(".")).unwrap();
    monitor.set_policy(disco).expect("the policy is swapped in");
    let status = monitor.policy_status();
    assert!(
        status.contains("NUMA engine active") && !status.contains("unavailable"),
        "{status}"
    );
    monitor
        .memory()
        .verify()
        .expect("memory agrees with itself");
}

/// Identical guests that keep rewriting their memory, sharing and
/// sampling at once in large folios on two nodes: merged pages are
/// sampled while write-protected (armed, continued protected, disarmed by
/// mapping them again under a pause), written (copy-on-write breaks), and
/// no guest ever sees the other's writes: every checksum matches the host
/// model and every invariant check holds.
#[test]
fn shared_pages_sampled_in_large_folios_keep_each_guest_its_own_writes() {
    if !require_kvm("shared_pages_sampled_in_large_folios_keep_each_guest_its_own_writes") {
        return;
    }
    let (_lock, _knob) = allow_64k();
    let config = "[policy]\nname = \"shared-sampled\"\n[policy.sharing]\nenabled = true\n\
                  [policy.numa]\nmigrate = true\nreplicate = true\nsampling = \"page-faults\"\n\
                  max_sampling_overhead = 0.1\nsettled_sampling_overhead = 0.1\n\
                  [host]\ntopology = \"2-socket\"\n\n\
                  [[vm]]\nname = \"twin\"\ncount = 2\nvcpus = 1\nvcpu_nodes = [0]\n\
                  memory_mib = 16\nworkload = { kind = \"table_scan\", seed = 5, table_pages = 3000, \
                  lookups = 60000000, write_after = 30000000 }\n";
    let report = run_config(config);
    assert!(report.all_ok(), "{}", report.render_text());
    let sampler = report
        .numa
        .as_ref()
        .and_then(|n| n.sampler.clone())
        .expect("page-fault samples");
    let sharing = report.sharing.as_ref().expect("sharing ran");
    eprintln!(
        "{} samples, {} of write-protected pages, {} merges, {} breaks, {} runs disarmed ({} shared, {} pauses)",
        sampler.samples,
        sampler.continued_wp,
        sharing.scanner.merges,
        sharing.memory.cow_breaks,
        sampler.disarmed_runs,
        sampler.disarmed_shared_runs,
        sampler.disarm_pauses
    );
    assert!(sharing.scanner.merges > 0, "{}", report.render_text());
    assert!(sampler.continued_wp > 0, "{}", report.render_text());
    // Shared pages left minor mode by being mapped again, under pauses.
    assert!(
        sampler.disarmed_shared_runs > 0 && sampler.disarm_pauses > 0,
        "{}",
        report.render_text()
    );
}
