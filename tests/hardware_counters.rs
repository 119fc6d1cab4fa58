//! Per-vCPU perf-event counters (`disco::numa::hardware`) for real.
//!
//! The build machines have no PMU (FACTS.md), so the hardware event set can
//! only be checked for its refusal and its stated reason here; the counting
//! path (one group per thread, per-epoch deltas, per-VM sums, the budget
//! split) is the same code with software events, exercised on host threads
//! and on the vCPU threads of running micro-VMs. On a host with a PMU the
//! refusal checks turn into checks that the hardware events count.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use disco::config::{Config, NumaPolicy};
use disco::faults::FaultHandler;
use disco::kvm_check::require_kvm;
use disco::memory::Memory;
use disco::monitor::{build_vm, run, RunOptions};
use disco::numa::hardware::{
    budget_floor, probe, scale_sample_budget, EventSet, MissCounters, SoftwareEvent as Software,
};
use disco::numa::runner::{Feed, NumaRunner};
use disco::numa::Sampling;

/// Whether this host exposes a CPU PMU to perf (FACTS.md: not the build
/// machines).
fn host_has_pmu() -> bool {
    Path::new("/sys/bus/event_source/devices/cpu").exists()
}

fn gettid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// A host thread that reports its tid, waits for `go`, then either spins
/// (`busy`) or sleeps until `stop`; a busy thread also touches `pages`
/// fresh anonymous pages first (one page fault each).
fn worker(
    busy: bool,
    pages: usize,
    go: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
) -> (u32, std::thread::JoinHandle<u64>) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        go.recv().unwrap();
        let mut work = 0u64;
        if pages > 0 {
            let mut v: Vec<u8> = Vec::with_capacity(pages * 4096);
            // SAFETY: within capacity; u8 has no invalid values. Each write
            // touches a new page of a fresh anonymous allocation.
            unsafe {
                let p = v.as_mut_ptr();
                for i in 0..pages {
                    std::ptr::write_volatile(p.add(i * 4096), 1);
                }
                v.set_len(pages * 4096);
            }
            work += v.iter().step_by(4096).map(|&b| b as u64).sum::<u64>();
        }
        while !stop.load(Ordering::Relaxed) {
            if busy {
                for i in 0..10_000u64 {
                    work = std::hint::black_box(work.wrapping_mul(31).wrapping_add(i));
                }
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        work
    });
    (rx.recv().unwrap(), handle)
}

#[test]
fn hardware_events_are_refused_with_a_stated_reason_without_a_pmu() {
    let set = EventSet::hardware();
    assert_eq!(
        set.names(),
        vec!["llc-read-misses", "cache-misses", "node-load-misses"]
    );
    let counters = MissCounters::new(EventSet::hardware());
    let stop = Arc::new(AtomicBool::new(false));
    let (go, rx) = mpsc::channel();
    let (tid, handle) = worker(true, 0, rx, stop.clone());
    let opened = counters.add_thread(tid, 0, 0);
    go.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let counts = counters.read_epoch(1);
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    if host_has_pmu() {
        // A host with a PMU: at least one hardware event counts, and the
        // spinning thread misses some cache lines.
        assert!(opened.is_ok(), "{opened:?}");
        assert!(counters.is_active(), "{}", counters.describe());
        assert!(probe(&set).is_ok());
        return;
    }
    let why = opened.expect_err("no PMU on this host (FACTS.md), the group cannot open");
    assert!(why.contains("no hardware PMU"), "{why}");
    assert!(why.contains("ENOENT"), "FACTS.md: ENOENT here: {why}");
    for e in counters.status() {
        assert!(!e.present, "{e:?}");
        let reason = e.reason.unwrap();
        assert!(
            reason.contains("no hardware PMU") && reason.contains(&e.name),
            "{reason}"
        );
    }
    assert!(!counters.is_active());
    assert_eq!(counters.threads(), 0);
    assert!(counters.knows_thread(tid), "a failed thread is not retried");
    assert_eq!(counters.failed_threads()[0].0, tid);
    assert_eq!(counts.misses_per_vm, vec![0]);
    assert!(counts.threads.is_empty());
    // The probe (what `sampling = "auto"` decides on) says it in one
    // sentence naming every event.
    let why = probe(&set).unwrap_err();
    assert!(
        why.contains("no hardware PMU")
            && set.names().iter().all(|n| why.contains(n))
            && why.contains("perf_event_open"),
        "{why}"
    );
    assert_eq!(disco::numa::probe_hardware_pmu().unwrap_err(), why);
    let described = counters.describe();
    assert!(
        described.contains("present none") && described.contains("no hardware PMU"),
        "{described}"
    );
}

#[test]
fn software_counters_count_each_thread_and_steer_the_budget() {
    let set = EventSet::software(&[
        ("task-clock", Software::TASK_CLOCK),
        ("page-faults", Software::PAGE_FAULTS),
    ]);
    assert_eq!(probe(&set).unwrap().len(), 2);
    let counters = MissCounters::new(set);
    let stop = Arc::new(AtomicBool::new(false));
    const PAGES: usize = 2000;
    let (go_busy, rx) = mpsc::channel();
    let (busy, busy_handle) = worker(true, PAGES, rx, stop.clone());
    let (go_idle, rx) = mpsc::channel();
    let (idle, idle_handle) = worker(false, 0, rx, stop.clone());
    // The busy thread belongs to VM 1, the idle one to VM 0: the order of
    // VM ids must not matter.
    assert_eq!(counters.add_thread(busy, 1, 0), Ok(2));
    assert_eq!(counters.add_thread(idle, 0, 0), Ok(2));
    assert_eq!(counters.steering_event(), Some(0));
    assert!(counters.is_active());
    go_busy.send(()).unwrap();
    go_idle.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let first = counters.read_epoch(2);
    stop.store(true, Ordering::Relaxed);
    busy_handle.join().unwrap();
    idle_handle.join().unwrap();
    // After the threads exit their counters stay readable and stop moving.
    let after = counters.read_epoch(2);

    let by_tid = |tid: u32| first.threads.iter().find(|t| t.tid == tid).unwrap();
    let (b, i) = (by_tid(busy), by_tid(idle));
    let (b_clock, i_clock) = (b.counts[0].unwrap(), i.counts[0].unwrap());
    assert!(
        b_clock > 5 * i_clock,
        "the spinning thread's task-clock ({b_clock} ns) must dwarf the sleeping one's ({i_clock} ns)"
    );
    let b_faults = b.counts[1].unwrap();
    assert!(
        b_faults >= PAGES as u64,
        "touching {PAGES} fresh pages takes at least as many page faults, counted {b_faults}"
    );
    assert!(b_faults > i.counts[1].unwrap());
    // Per VM: the steering event (task-clock) summed.
    assert_eq!(first.misses_per_vm, vec![i_clock, b_clock]);
    assert_eq!(first.per_vm_events[1], vec![b_clock, b_faults]);
    assert!(first.read_us > 0.0);
    assert!(
        after.misses_per_vm.iter().all(|&m| m < b_clock / 10),
        "exited threads barely count: {:?} after {b_clock}",
        after.misses_per_vm
    );

    // The budget: VM 1 (busy) gets more, the total is kept, VM 0 keeps
    // the floor.
    let per_vm = 64;
    let floor = budget_floor(per_vm);
    let budget = scale_sample_budget(&first.misses_per_vm, per_vm, floor);
    assert_eq!(budget.iter().sum::<u64>(), 2 * per_vm);
    assert!(budget[1] > budget[0], "{budget:?}");
    assert!(budget[0] >= floor, "{budget:?}");
}

/// Two micro-VMs touching random pages of their memory (so there are
/// written pages to sample: never-written ones are not zapped) on one
/// host; the "light" one is paused most of the time, so its vCPU thread
/// does less work. Software counters on the
/// real vCPU threads must see it, and the NUMA runner steered by them must
/// give the busy VM the larger page-sample budget.
#[test]
fn software_counters_on_vcpu_threads_steer_the_runner() {
    if !require_kvm("software_counters_on_vcpu_threads_steer_the_runner") {
        return;
    }
    let config = Config::parse(
        r#"
policy = "static"
[[vm]]
name = "light"
vcpus = 1
memory_mib = 8
time_limit_s = 60
workload = { kind = "random", seed = 1, touches = 300000000 }
[[vm]]
name = "busy"
vcpus = 1
memory_mib = 8
time_limit_s = 60
workload = { kind = "random", seed = 2, touches = 300000000 }
"#,
        "<test>",
        Path::new("."),
    )
    .expect("test config is valid");
    let topology = config.topology().unwrap();
    let memory = Arc::new(Memory::for_topology(&topology).unwrap());
    let sampler = memory.enable_sampling().expect("page sampling (root)");
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (light_space, mut light) = build_vm(&kvm, &memory, &topology, &config.vms[0]).unwrap();
    let (busy_space, mut busy) = build_vm(&kvm, &memory, &topology, &config.vms[1]).unwrap();
    let _handler = FaultHandler::start(memory.clone()).unwrap();
    light.start().unwrap();
    busy.start().unwrap();

    // Direct counters (to compare the threads) and the runner's own.
    let task_clock = || EventSet::software(&[("task-clock", Software::TASK_CLOCK)]);
    let direct = MissCounters::new(task_clock());
    let steer = Arc::new(MissCounters::new(task_clock()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tids = [None, None];
    while tids.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "vCPU threads did not start");
        for (k, (vm, space)) in [(&light, light_space), (&busy, busy_space)]
            .into_iter()
            .enumerate()
        {
            if let (None, Some(Some(tid))) = (tids[k], vm.vcpu_tids().first()) {
                tids[k] = Some(*tid);
                sampler.register_thread(*tid, space, 0, vm.placements()[0].node);
                assert_eq!(direct.add_thread(*tid, space, 0), Ok(1));
                assert_eq!(steer.add_thread(*tid, space, 0), Ok(1));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    direct.read_epoch(2); // baseline after registration

    let policy = NumaPolicy {
        migrate: false,
        replicate: false,
        epoch_ms: 100,
        sample_pages: 64,
        sample_rounds: 4,
        sampling: Sampling::PageFaults,
        ..NumaPolicy::default()
    };
    let runner = NumaRunner::start(
        memory.clone(),
        &topology,
        policy.clone(),
        Feed::Sampler(sampler.clone()),
        "test: software counters steer page sampling",
        2,
        Some(steer.clone()),
    )
    .unwrap();
    // The light VM runs 1 ms in 10.
    let pauser = light.pauser();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(pauser.pause(), "pausing the light VM");
        std::thread::sleep(Duration::from_millis(9));
        pauser.resume();
        std::thread::sleep(Duration::from_millis(1));
    }
    let counts = direct.read_epoch(2);
    let stats = runner.stop();
    light.stop();
    busy.stop();
    let _ = light.wait();
    let _ = busy.wait();
    memory.destroy_space(light_space).unwrap();
    memory.destroy_space(busy_space).unwrap();

    let c = stats.counters.as_ref().expect("counter stats");
    eprintln!(
        "task-clock over the window: light {} ns, busy {} ns; per epoch (misses -> budget): {:?}; \
         reading 2 groups: median {:.1} us, max {:.1} us",
        counts.misses_per_vm[0],
        counts.misses_per_vm[1],
        c.per_epoch
            .iter()
            .map(|e| (e.misses.clone(), e.budget.clone()))
            .collect::<Vec<_>>(),
        c.read_median_us,
        c.read_max_us
    );

    // The threads: more work, larger count.
    let clock = |tid: Option<u32>| {
        counts
            .threads
            .iter()
            .find(|t| Some(t.tid) == tid)
            .unwrap()
            .counts[0]
            .unwrap()
    };
    let (light_ns, busy_ns) = (clock(tids[0]), clock(tids[1]));
    assert!(
        busy_ns > 2 * light_ns,
        "busy vCPU {busy_ns} ns vs light (paused 90 %) {light_ns} ns"
    );
    assert_eq!(counts.misses_per_vm, vec![light_ns, busy_ns]);

    // The runner: steered by the counters, same total, floor kept, the busy
    // VM sampled more.
    assert_eq!(stats.counter_source, "software");
    assert_eq!(stats.hardware_unused, None);
    assert_eq!(c.steering_event.as_deref(), Some("task-clock"));
    assert_eq!(c.threads, 2);
    assert_eq!(c.floor, budget_floor(policy.sample_pages));
    assert!(c.per_epoch.len() >= 8, "{} epochs", c.per_epoch.len());
    let (mut light_budget, mut busy_budget) = (0, 0);
    for e in &c.per_epoch {
        assert_eq!(
            e.budget.iter().sum::<u64>(),
            2 * policy.sample_pages,
            "{e:?}"
        );
        assert!(e.budget.iter().all(|&b| b >= c.floor), "{e:?}");
        assert_eq!(
            e.budget,
            scale_sample_budget(&e.misses, policy.sample_pages, c.floor)
        );
        light_budget += e.budget[0];
        busy_budget += e.budget[1];
    }
    assert!(
        busy_budget > light_budget,
        "busy VM budget {busy_budget} vs light {light_budget}: {:?}",
        c.per_epoch
    );
    assert!(c.totals[1][0] > c.totals[0][0], "{:?}", c.totals);
    assert!(c.read_median_us > 0.0 && c.read_max_us >= c.read_median_us);
    // The zaps followed the budget: the sampler zapped pages every round.
    assert!(stats.sampler.as_ref().unwrap().zapped > 0);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("disco-hw-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_with_policy(dir: &Path, sampling: &str) -> Config {
    std::fs::write(
        dir.join("hw.toml"),
        format!("name = \"hw\"\n[numa]\nmigrate = true\nsampling = \"{sampling}\"\n"),
    )
    .unwrap();
    // Two nodes: on one, "auto" samples nothing (every page is local).
    let text = r#"
policy = "hw.toml"
[host]
topology = "2-socket"
[[vm]]
name = "vm0"
vcpus = 1
memory_mib = 8
workload = { kind = "sweep", seed = 1, passes = 200 }
"#;
    Config::parse(text, "<test>", dir).expect("test config is valid")
}

#[test]
fn auto_falls_back_to_page_faults_with_the_reason_in_the_report() {
    if !require_kvm("auto_falls_back_to_page_faults_with_the_reason_in_the_report") {
        return;
    }
    let dir = temp_dir("auto");
    let config = config_with_policy(&dir, "auto");
    let options = RunOptions {
        progress: false,
        ..RunOptions::default()
    };
    let report = run(&config, &options).expect("the monitor runs");
    assert!(report.all_ok(), "{}", report.render_text());
    let numa = report.numa.as_ref().expect("the NUMA engine ran");
    let text = report.render_text();
    let json = serde_json::to_value(&report).unwrap();
    if host_has_pmu() {
        assert_eq!(numa.counter_source, "hardware");
        assert!(numa.counters.is_some());
        assert!(text.contains("counters: hardware active"), "{text}");
        return;
    }
    assert_eq!(numa.counter_source, "page-faults");
    assert!(numa.counters.is_none());
    let why = numa.hardware_unused.as_deref().unwrap();
    assert!(why.contains("no hardware PMU"), "{why}");
    assert!(why.contains("sampling = \"auto\""), "{why}");
    assert!(numa.source.contains("no hardware PMU"), "{}", numa.source);
    assert!(
        text.contains("counters: page-faults active; hardware miss counters not in use"),
        "{text}"
    );
    assert!(text.contains("no hardware PMU"), "{text}");
    assert_eq!(json["numa"]["counter_source"], "page-faults");
    assert!(json["numa"]["hardware_unused"]
        .as_str()
        .unwrap()
        .contains("no hardware PMU"));
    assert!(numa.sampler.as_ref().unwrap().zapped > 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn explicit_hardware_names_the_policy_file_key_and_reason() {
    if !require_kvm("explicit_hardware_names_the_policy_file_key_and_reason") {
        return;
    }
    let dir = temp_dir("explicit");
    let config = config_with_policy(&dir, "hardware");
    let options = RunOptions {
        progress: false,
        ..RunOptions::default()
    };
    let outcome = run(&config, &options);
    if host_has_pmu() {
        let report = outcome.expect("with a PMU, sampling = \"hardware\" runs");
        assert_eq!(report.numa.unwrap().counter_source, "hardware");
        return;
    }
    let err = format!(
        "{:#}",
        outcome.expect_err("no PMU here: sampling = \"hardware\" fails")
    );
    let file = dir.join("hw.toml").display().to_string();
    assert!(err.contains(&file), "names the policy file {file}: {err}");
    assert!(err.contains("key `numa.sampling`"), "{err}");
    assert!(err.contains("no hardware PMU"), "{err}");
    assert!(
        err.contains("sampling = \"auto\""),
        "says the way out: {err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
