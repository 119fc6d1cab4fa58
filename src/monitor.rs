//! The monitor: owns the topology, machine memory and the VMs of one run.
//!
//! `run` builds every VM's guest space through the mapper, starts its vCPU
//! threads, shows progress while they run, checks the memory invariants
//! before, during and after, and gathers the report. A VM that fails is
//! stopped and reported by its own runner; the others carry on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{Config, VcpuMove, VmConfig};
use crate::control::{Command, ControlSocket};
use crate::faults::FaultHandler;
use crate::guest::layout;
use crate::memory::{Memory, VmId};
use crate::numa::runner::{Feed, NumaRunner, NumaStats};
use crate::numa::{
    choose_source, probe_hardware_pmu, EventSet, MissCounters, SourceKind, TraceSource,
};
use crate::report::{
    PolicySummary, RunReport, SharingReport, TopologySummary, VcpuReport, VmCosts, VmReport,
};
use crate::sharing::Scanner;
use crate::topology::Topology;
use crate::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuOutcome, VcpuPlacement};
use crate::PAGE_SIZE;

/// How `run` behaves; the defaults suit the command line.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Draw a live progress line on stderr.
    pub progress: bool,
    /// How often to run `Memory::verify` while guests run.
    pub verify_every: Duration,
    /// Longest wait for the sharing scanner's final passes once the guests
    /// are done; `None`: [`settle_limit`] of the guests' memory.
    pub settle_limit: Option<Duration>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            progress: true,
            verify_every: Duration::from_millis(500),
            settle_limit: None,
        }
    }
}

/// A VM of the run: its guest space and its runner (None if creating it failed).
struct RunningVm {
    index: usize,
    space: Option<VmId>,
    vm: Option<Guest>,
    error: Option<String>,
}

/// A micro-guest VM or a Linux VM (`crate::linux`, a `[[vm]]` with `kernel`).
enum Guest {
    Micro(Box<MicroVm>),
    Linux(Box<crate::linux::LinuxVm>),
}

impl Guest {
    fn build(
        kvm: &kvm_ioctls::Kvm,
        memory: &Memory,
        topology: &Topology,
        vc: &VmConfig,
    ) -> Result<(VmId, Guest)> {
        Ok(match vc.linux {
            Some(_) => {
                let (space, vm) = crate::linux::build(kvm, memory, topology, vc)?;
                (space, Guest::Linux(Box::new(vm)))
            }
            None => {
                let (space, vm) = build_vm(kvm, memory, topology, vc)?;
                (space, Guest::Micro(Box::new(vm)))
            }
        })
    }
    fn start(&mut self) -> Result<()> {
        match self {
            Guest::Micro(vm) => vm.start(),
            Guest::Linux(vm) => vm.start(),
        }
    }
    /// (done, total); a Linux VM counts as one unit, done when it ended.
    fn progress(&self) -> (u64, u64) {
        match self {
            Guest::Micro(vm) => vm.progress(),
            Guest::Linux(vm) => (vm.is_finished() as u64, 1),
        }
    }
    fn is_finished(&self) -> bool {
        match self {
            Guest::Micro(vm) => vm.is_finished(),
            Guest::Linux(vm) => vm.is_finished(),
        }
    }
    fn stop_because(&self, reason: &str) {
        match self {
            Guest::Micro(vm) => vm.stop_because(reason),
            Guest::Linux(vm) => vm.stop_because(reason),
        }
    }
    fn wait(self) -> crate::vm::VmOutcome {
        match self {
            Guest::Micro(vm) => vm.wait(),
            Guest::Linux(vm) => vm.wait(),
        }
    }
}

/// What the monitor does with the policy's sections in this build.
fn policy_status(config: &Config, numa: &NumaPlan) -> String {
    let p = &config.policy;
    let mut parts = Vec::new();
    if p.sharing.enabled {
        parts.push("sharing active (copy-on-write, scanner running)".to_string());
    }
    match numa {
        NumaPlan::Off => {}
        NumaPlan::Run(_, reason, _) => {
            let what = match (p.numa.migrate, p.numa.replicate) {
                (true, true) => "migration and replication",
                (true, false) => "migration",
                (false, true) => "replication",
                (false, false) => "measuring locality only, nothing moves",
            };
            parts.push(format!("NUMA engine active ({reason}); {what} carried out"))
        }
        NumaPlan::Unavailable(why) => parts.push(format!(
            "migration/replication requested but the NUMA engine is idle: {why}"
        )),
    }
    if parts.is_empty() {
        "static placement; nothing requested beyond it".to_string()
    } else {
        parts.join("; ")
    }
}

/// Whether and how the NUMA engine runs; with hardware counters, the
/// per-vCPU miss counters that steer the page sampler.
enum NumaPlan {
    Off,
    Run(Feed, String, Option<Arc<MissCounters>>),
    Unavailable(String),
}

/// Chooses the NUMA engine's sample source. Page-fault sampling must be
/// enabled on `memory` before any guest space exists, so this runs first.
fn numa_plan(config: &Config, topology: &Topology, memory: &Memory) -> Result<NumaPlan> {
    let numa = &config.policy.numa;
    // With nothing to move, the engine runs only when a sample source is
    // asked for explicitly: it then measures locality and moves nothing.
    if !numa.migrate && !numa.replicate && numa.sampling == crate::numa::Sampling::Auto {
        return Ok(NumaPlan::Off);
    }
    let choice = choose_source(
        numa.sampling,
        numa.trace_file.as_deref(),
        probe_hardware_pmu(),
    )
    .map_err(|e| {
        // Named like a config error: the policy file, the key, the reason
        // (an inline policy is in the config file itself).
        let file = match config.policy.source.as_str() {
            "inline" => config.source.clone(),
            other => other.to_string(),
        };
        crate::config::ConfigError {
            file,
            key: "numa.sampling".into(),
            message: format!("policy {}: {e}", config.policy.name),
        }
    })?;
    let sampler = |reason: String, steer: Option<Arc<MissCounters>>| match memory.enable_sampling()
    {
        Ok(s) => NumaPlan::Run(Feed::Sampler(s), reason, steer),
        Err(e) => {
            NumaPlan::Unavailable(format!("{reason}, but page sampling is unavailable: {e:#}"))
        }
    };
    Ok(match choice.kind {
        SourceKind::Trace(path) => {
            let source = TraceSource::open(&path)?;
            source
                .check_nodes(topology.node_count())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            NumaPlan::Run(Feed::Source(Box::new(source)), choice.reason, None)
        }
        SourceKind::PageFaults => sampler(choice.reason, None),
        // Hardware counters name threads, not pages (a PMU sample's address
        // in guest mode is guest-virtual): they steer the page sampler's
        // effort toward the VMs that miss most; page faults name the pages.
        SourceKind::Hardware => sampler(
            format!(
                "{}; pages are named by page-level samples from hinting faults",
                choice.reason
            ),
            Some(Arc::new(MissCounters::new(EventSet::hardware()))),
        ),
    })
}

const WHILE_RUNNING: &str = "while running";

/// The default longest wait for the scanner's final passes after the guests
/// are done: 30 s, plus 10 s per GiB of guest memory, at most 5 minutes.
/// With the guests stopped the scanner runs unthrottled (hashing is about
/// 1 us a page here, a merge about 20 us), so two passes over N GiB that is
/// mostly duplicate need about 2 x 262,144 N x 20 us = 10 N s; the cap keeps
/// a huge run from hanging on its report, which then says how far it got.
pub fn settle_limit(guest_bytes: u64) -> Duration {
    let gib = guest_bytes as f64 / (1u64 << 30) as f64;
    Duration::from_secs_f64((30.0 + 10.0 * gib).min(300.0))
}

/// Runs every VM of `config` to completion and reports.
pub fn run(config: &Config, options: &RunOptions) -> Result<RunReport> {
    run_with_control(config, options, None)
}

/// [`run`], answering the commands of a control socket (`disco run
/// --control PATH`, see [`crate::control`]) while the guests run.
pub fn run_with_control(
    config: &Config,
    options: &RunOptions,
    control: Option<&ControlSocket>,
) -> Result<RunReport> {
    let started = Instant::now();
    // What `disco check` checks, again (a config may have been built or
    // changed in code), before anything on the host changes.
    config.validate()?;
    let topology = config.topology()?;
    let kvm = kvm_ioctls::Kvm::new().context(
        "cannot open /dev/kvm: disco needs KVM (run as root or in group kvm on a host with KVM)",
    )?;
    let memory = Arc::new(Memory::for_topology(&topology)?);
    let numa_plan = numa_plan(config, &topology, &memory)?;
    let sampler = memory.sampler();
    // One raise of vm.max_map_count (as root) for all VMs, not one per VM.
    memory.reserve_map_count(crate::memory::mapper::map_count_needed(
        config
            .vms
            .iter()
            .map(|v| v.memory_mib * 1024 * 1024 / PAGE_SIZE as u64),
    ))?;

    let mut vms = Vec::new();
    for index in 0..config.vms.len() {
        if let Some(signal) = crate::signals::interrupted() {
            vms.push(RunningVm {
                index,
                space: None,
                vm: None,
                error: Some(format!("not created: {signal} interrupted the run")),
            });
            continue;
        }
        vms.push(
            match Guest::build(&kvm, &memory, &topology, &config.vms[index]) {
                Ok((space, vm)) => RunningVm {
                    index,
                    space: Some(space),
                    vm: Some(vm),
                    error: None,
                },
                Err(e) => RunningVm {
                    index,
                    space: None,
                    vm: None,
                    error: Some(format!("{e:#}")),
                },
            },
        );
    }
    let create_ms = started.elapsed().as_secs_f64() * 1e3;

    let mut verify_runs = 0;
    let mut verify_while_running = 0;
    let mut verify_errors = Vec::new();
    let mut check = |when: &str| {
        verify_runs += 1;
        if when == WHILE_RUNNING {
            verify_while_running += 1;
        }
        if let Err(e) = memory.verify() {
            verify_errors.push(format!("{when}: {e:#}"));
        }
    };
    check("before start");

    // Copy-on-write sharing: the fault handler must run before any page is
    // shared, the scanner once the guests run.
    // The NUMA engine needs it too: migration write-protects a page while
    // it copies it, and sampled pages fault there.
    let sharing = &config.policy.sharing;
    let numa_active = matches!(numa_plan, NumaPlan::Run(..));
    let miss_counters = match &numa_plan {
        NumaPlan::Run(_, _, steer) => steer.clone(),
        _ => None,
    };
    let _fault_handler = if sharing.enabled || numa_active {
        Some(FaultHandler::start(memory.clone()).with_context(|| {
            format!(
                "policy {} turns sharing or NUMA placement on, which needs userfaultfd \
                 (run as root, or turn both off)",
                config.policy.name
            )
        })?)
    } else {
        None
    };

    for rv in vms.iter_mut() {
        if let Some(vm) = rv.vm.as_mut() {
            if let Err(e) = vm.start() {
                rv.error = Some(format!("cannot start: {e:#}"));
                rv.vm = None;
            }
        }
    }

    let vms_started = Instant::now();
    let status = policy_status(config, &numa_plan);
    let numa_runner = match numa_plan {
        NumaPlan::Run(feed, why, steer) => Some(NumaRunner::start(
            memory.clone(),
            &topology,
            config.policy.numa.clone(),
            feed,
            &why,
            config.vms.len(),
            steer,
        )?),
        _ => None,
    };

    let scanner = Scanner::for_policy(memory.clone(), sharing)?;

    let bar = if options.progress {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg}",
            )
            .unwrap(),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut last_verify: Option<Instant> = None;
    let mut memory_watch = crate::memory::MemoryWatch::new(Duration::from_secs(1));
    let mut moves_done = vec![0usize; vms.len()];
    let mut moves_applied: Vec<Vec<String>> = vec![Vec::new(); vms.len()];
    // The signal that ended the run early, and which VMs it stopped.
    let mut interrupted: Option<&str> = None;
    let mut unfinished_at_interrupt = vec![false; vms.len()];
    loop {
        if let Some(signal) = crate::signals::interrupted() {
            let reason = format!("{signal} interrupted the run");
            for (i, rv) in vms.iter().enumerate() {
                if let Some(vm) = rv.vm.as_ref().filter(|vm| !vm.is_finished()) {
                    unfinished_at_interrupt[i] = true;
                    vm.stop_because(&reason);
                }
            }
            interrupted = Some(signal);
            break;
        }
        for (i, rv) in vms.iter_mut().enumerate() {
            // vCPU moves and page sampling apply to micro-VMs (a Linux VM's
            // config cannot have moves).
            let (Some(Guest::Micro(vm)), Some(space)) = (rv.vm.as_mut(), rv.space) else {
                continue;
            };
            let vc = &config.vms[rv.index];
            while let Some(m) = vc.moves.get(moves_done[i]) {
                if vms_started.elapsed() < Duration::from_millis(m.after_ms) {
                    break;
                }
                moves_done[i] += 1;
                let note = apply_move(vm, space, m, &topology, &memory, sampler.as_deref());
                moves_applied[i].push(note);
            }
            if let Some(sampler) = &sampler {
                register_vcpu_threads(vm, space, sampler);
            }
            if let Some(counters) = &miss_counters {
                count_vcpu_threads(vm, space, counters);
            }
        }
        if let Some(control) = control {
            for request in control.pending() {
                let answer = match &request.command {
                    Command::Status => Ok(status_line(config, &vms)),
                    Command::Move { vm, node, vcpu } => {
                        let m = VcpuMove {
                            after_ms: vms_started.elapsed().as_millis() as u64,
                            node: *node,
                            vcpu: *vcpu,
                        };
                        control_move(config, &mut vms, vm, &m, &topology).map(|(i, space)| {
                            let Some(Guest::Micro(guest)) = vms[i].vm.as_mut() else {
                                unreachable!("control_move checked it is a micro-VM");
                            };
                            let note = format!(
                                "{} (control socket)",
                                apply_move(
                                    guest,
                                    space,
                                    &m,
                                    &topology,
                                    &memory,
                                    sampler.as_deref()
                                )
                            );
                            moves_applied[i].push(note.clone());
                            note
                        })
                    }
                };
                request.answer(answer);
            }
        }
        let running: Vec<&Guest> = vms.iter().filter_map(|v| v.vm.as_ref()).collect();
        let (done, total) = running.iter().fold((0, 0), |(d, t), vm| {
            let (a, b) = vm.progress();
            (d + a.min(b), t + b)
        });
        let finished = running.iter().filter(|v| v.is_finished()).count();
        bar.set_length(total.max(1));
        bar.set_position(done);
        let shared = match &scanner {
            Some(_) => format!(
                ", {:.1} MiB saved by sharing",
                memory.sharing_stats().saved_bytes as f64 / (1024.0 * 1024.0)
            ),
            None => String::new(),
        };
        bar.set_message(format!("{finished}/{} VMs finished{shared}", running.len()));
        if finished == running.len() {
            break;
        }
        memory_watch.sample(&memory);
        if last_verify.is_none_or(|t| t.elapsed() >= options.verify_every) {
            check(WHILE_RUNNING);
            last_verify = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // From here on nothing answers the control socket's commands: tell
    // its clients at once rather than let them wait for a loop that is gone.
    if let Some(control) = control {
        control.close();
    }
    let numa_stats = numa_runner.map(NumaRunner::stop);
    // Collect every guest's outcome and close its KVM VM before the final
    // passes: each KVM VM in the process adds its MMU notifier to every
    // page-table change the mapper makes, so merges with 300 finished VMs
    // still open cost about 20x more (0.4 ms instead of 20 us each).
    let finished: Vec<(Vec<usize>, Option<crate::vm::VmOutcome>)> = vms
        .iter_mut()
        .map(|rv| {
            let final_nodes = match &rv.vm {
                Some(Guest::Micro(vm)) => vm.placements().iter().map(|p| p.node).collect(),
                _ => config.vms[rv.index].vcpu_nodes.clone(),
            };
            (final_nodes, rv.vm.take().map(Guest::wait))
        })
        .collect();
    // Let the scanner see the guests' final memory: two more full passes
    // (the first may have started before the guests' last writes). Nothing
    // writes any more, so pages that were volatile need not prove it.
    let scan_stats = scanner.map(|scanner| {
        if interrupted.is_some() {
            // No final passes: the operator wants the run to end.
            let end = scanner.stop();
            return (
                end,
                false,
                Some("final passes skipped: the run was interrupted".into()),
            );
        }
        let guest_pages: u64 = config.vms.iter().map(|v| v.memory_mib * 256).sum();
        let limit = options
            .settle_limit
            .unwrap_or_else(|| settle_limit(guest_pages * PAGE_SIZE as u64));
        scanner.guests_quiescent();
        let start = scanner.stats();
        let target = start.full_scans + 2;
        let began = Instant::now();
        let progress = |now: &crate::sharing::ScannerStats| {
            (now.pages_scanned - start.pages_scanned) as f64 / (2 * guest_pages).max(1) as f64
        };
        // Settled means both passes ended within the limit (the batch in
        // flight when the limit struck may still end one; it does not count).
        let (settled, at_end) = loop {
            let now = scanner.stats();
            if now.full_scans >= target {
                break (true, now);
            }
            if began.elapsed() >= limit || crate::signals::interrupted().is_some() {
                break (false, now);
            }
            bar.set_message(format!(
                "guests done; sharing scanner finishing its passes: {:.0} % ({} merges so far)",
                100.0 * progress(&now).min(1.0),
                now.merges - start.merges
            ));
            std::thread::sleep(Duration::from_millis(10));
        };
        let end = scanner.stop();
        let done = at_end.full_scans - start.full_scans;
        let why = match crate::signals::interrupted() {
            Some(_) => "before the run was interrupted".to_string(),
            None => format!("in the {:.0} s limit", limit.as_secs_f64()),
        };
        let note = (!settled).then(|| {
            format!(
                "final passes not completed: {done} of 2 {why}, {:.0} % of their pages scanned, \
                 {} merges meanwhile",
                100.0 * progress(&at_end).min(1.0),
                at_end.merges - start.merges
            )
        });
        (end, settled, note)
    });
    // A signal during the final passes cuts them short: say so too.
    if interrupted.is_none() {
        interrupted = crate::signals::interrupted();
    }
    bar.set_message("guests done; checking their results against the host model");

    let mut reports = Vec::new();
    for ((i, rv), (final_nodes, outcome)) in vms.iter_mut().enumerate().zip(finished) {
        let vc = &config.vms[rv.index];
        let space_stats = rv.space.and_then(|s| memory.space_stats(s).ok());
        let pages_per_node = space_stats
            .as_ref()
            .map(|s| s.pages_per_node.clone())
            .unwrap_or_default();
        let shared_pages = space_stats.as_ref().map_or(0, |s| s.shared_pages);
        let vcpus = final_nodes
            .iter()
            .enumerate()
            .map(|(i, &node)| VcpuReport {
                index: i,
                node,
                host_cpus: topology.nodes[node].host_cpus.clone(),
                outcome: match &outcome {
                    Some(o) => o.vcpus[i].clone(),
                    None => VcpuOutcome::NotRun,
                },
            })
            .collect::<Vec<_>>();
        let failures: Vec<String> = vcpus
            .iter()
            .filter_map(|v| match &v.outcome {
                VcpuOutcome::Failed { reason, .. } => Some(format!("vcpu{}: {reason}", v.index)),
                _ => None,
            })
            .collect();
        let all_match = vcpus.iter().all(|v| v.outcome.checksum_ok());
        let (status, error) = if let Some(e) = rv.error.take() {
            ("failed", Some(e))
        } else if unfinished_at_interrupt[i] {
            (
                "interrupted",
                Some(format!(
                    "stopped before it finished: {} interrupted the run",
                    interrupted.unwrap_or("a signal")
                )),
            )
        } else if !failures.is_empty() {
            ("failed", Some(failures.join("; ")))
        } else if !all_match {
            (
                "wrong-checksum",
                Some("a vCPU returned a checksum the host model does not predict".to_string()),
            )
        } else {
            ("ok", None)
        };
        let run_ms = outcome
            .as_ref()
            .map(|o| o.run_time.as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        let costs = vm_costs(&memory, rv.space, numa_stats.as_ref(), run_ms, vcpus.len());
        reports.push(VmReport {
            name: vc.name.clone(),
            workload: vc.workload.clone(),
            kernel: vc.linux.as_ref().map(|l| l.kernel.display().to_string()),
            memory_mib: vc.memory_mib,
            pages_per_node,
            shared_pages,
            sharing_domain: vc.sharing_domain.clone(),
            vcpus,
            status: status.to_string(),
            error,
            moves: std::mem::take(&mut moves_applied[i]),
            run_ms,
            costs,
            log: outcome.map(|o| o.log).unwrap_or_default(),
        });
    }
    bar.finish_and_clear();
    check("after the guests stopped");
    let pools = memory.pool_stats();
    let guest_frames: u64 = config.vms.iter().map(|v| v.memory_mib * 256).sum();
    let (kernel_mappings, memory_timeline) = memory_watch.finish(&memory, guest_frames);
    let sharing_report = scan_stats.map(|(scanner, settled, settle_note)| SharingReport {
        scanner,
        settled,
        settle_note,
        memory: memory.sharing_stats(),
    });
    let replicas = memory.replica_stats();
    for rv in &vms {
        if let Some(space) = rv.space {
            memory.destroy_space(space)?;
        }
    }
    check("after tearing down");
    let leaked: u32 = memory.pool_stats().iter().map(|p| p.used_pages).sum();
    if leaked != 0 {
        verify_errors.push(format!(
            "{leaked} machine pages still in use after every VM was destroyed"
        ));
    }

    Ok(RunReport {
        config: config.source.clone(),
        topology: TopologySummary {
            name: topology.name.clone(),
            nodes: topology.node_count(),
            emulated: topology.is_emulated(),
            host_nodes: topology.host_nodes,
        },
        policy: PolicySummary {
            policy: config.policy.clone(),
            status,
        },
        vms: reports,
        interrupted: interrupted.map(str::to_string),
        sharing: sharing_report,
        kernel_mappings,
        memory_timeline,
        numa: numa_stats,
        replicas,
        pools,
        verify_runs,
        verify_while_running,
        verify_ok: verify_errors.is_empty(),
        verify_errors,
        create_ms,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// The micro-VM a VM config describes: its name, vCPU placement (each vCPU
/// pinned to the host CPUs of its node), workload and time limit.
pub fn micro_vm_spec(vc: &VmConfig, topology: &Topology) -> MicroVmSpec {
    MicroVmSpec {
        name: vc.name.clone(),
        vcpus: vc
            .vcpu_nodes
            .iter()
            .map(|&node| VcpuPlacement {
                node,
                host_cpus: topology.nodes[node].host_cpus.clone(),
            })
            .collect(),
        workload: vc.workload.clone(),
        time_limit: vc.time_limit,
    }
}

/// Builds one VM: its guest space in the memory node's pool, then its KVM
/// VM on that space. On failure nothing is left behind.
pub fn build_vm(
    kvm: &kvm_ioctls::Kvm,
    memory: &Memory,
    topology: &Topology,
    vc: &VmConfig,
) -> Result<(VmId, MicroVm)> {
    let frames = vc.memory_mib * 1024 * 1024 / PAGE_SIZE as u64;
    let (space, base) = memory
        .create_space_in(&vc.name, frames, vc.memory_node, &vc.sharing_domain)
        .context("cannot build guest memory")?;
    let spec = micro_vm_spec(vc, topology);
    let ram = GuestRam {
        host_addr: base,
        size: frames as usize * PAGE_SIZE,
    };
    // The micro-guest's system area (page tables, GDT, parameter blocks,
    // code, stacks: the first MiB) stays out of sharing: on the build hosts'
    // KVM (kvm_pvm), merging those pages while the vCPUs run occasionally
    // makes a port-I/O hypercall fault (#GP, a triple fault). Measured in
    // ARCHITECTURE.md. The data area, where the workloads live, is shared.
    memory.exclude_from_sharing(space, layout::system_frames())?;
    match MicroVm::create(kvm, spec, ram) {
        Ok(vm) => {
            memory.set_pauser(space, vm.pauser())?;
            memory.set_cpu_node(space, main_node(&vc.vcpu_nodes))?;
            Ok((space, vm))
        }
        Err(e) => {
            memory.destroy_space(space)?;
            Err(e.context("cannot create the VM"))
        }
    }
}

/// The `status` reply of the control socket: per VM, its name, state and
/// the node of each vCPU.
fn status_line(config: &Config, vms: &[RunningVm]) -> String {
    let parts: Vec<String> = vms
        .iter()
        .map(|rv| {
            let name = &config.vms[rv.index].name;
            match &rv.vm {
                None => format!("{name} failed to start"),
                Some(g) => {
                    let state = if g.is_finished() {
                        "finished"
                    } else {
                        "running"
                    };
                    let nodes: Vec<String> = match g {
                        Guest::Micro(vm) => {
                            vm.placements().iter().map(|p| p.node.to_string()).collect()
                        }
                        Guest::Linux(_) => config.vms[rv.index]
                            .vcpu_nodes
                            .iter()
                            .map(|n| n.to_string())
                            .collect(),
                    };
                    format!("{name} {state} vcpu nodes {}", nodes.join(","))
                }
            }
        })
        .collect();
    parts.join("; ")
}

/// Checks a control-socket move: the VM exists, is a running micro-VM,
/// the node and vCPU are in range. Returns the VM's index and space.
fn control_move(
    config: &Config,
    vms: &mut [RunningVm],
    name: &str,
    m: &VcpuMove,
    topology: &Topology,
) -> Result<(usize, VmId), String> {
    let Some(i) = vms.iter().position(|rv| config.vms[rv.index].name == name) else {
        let names: Vec<&str> = vms
            .iter()
            .map(|rv| config.vms[rv.index].name.as_str())
            .collect();
        return Err(format!("no VM `{name}`; the VMs are: {}", names.join(", ")));
    };
    let nodes = topology.node_count();
    if m.node >= nodes {
        return Err(format!(
            "node {} does not exist; allowed: 0 to {} (the topology has {nodes} nodes)",
            m.node,
            nodes - 1
        ));
    }
    let (Some(Guest::Micro(vm)), Some(space)) = (vms[i].vm.as_ref(), vms[i].space) else {
        return Err(match vms[i].vm {
            None => format!("VM `{name}` is not running (it failed to start)"),
            Some(_) => format!("VM `{name}` is a Linux VM; only micro-VMs can be moved"),
        });
    };
    if vm.is_finished() {
        return Err(format!("VM `{name}` has finished"));
    }
    let count = vm.placements().len();
    if let Some(v) = m.vcpu {
        if v >= count {
            return Err(format!(
                "VM `{name}` has no vCPU {v}; allowed: 0 to {}",
                count - 1
            ));
        }
    }
    Ok((i, space))
}

/// The node most of `nodes` are on (the lowest on a tie): the node whose
/// replicas a VM with vCPUs on several nodes maps.
fn main_node(nodes: &[usize]) -> usize {
    let mut best = (0, usize::MAX);
    for &n in nodes {
        let count = nodes.iter().filter(|&&m| m == n).count();
        if count > best.0 || (count == best.0 && n < best.1) {
            best = (count, n);
        }
    }
    best.1
}

/// Carries out one scheduled vCPU move; returns what happened, for the
/// report. The VM's pages are not moved here: under a migrating policy the
/// NUMA engine sees the accesses come from the new node and moves the hot
/// ones.
fn apply_move(
    vm: &mut MicroVm,
    space: VmId,
    m: &VcpuMove,
    topology: &Topology,
    memory: &Memory,
    sampler: Option<&crate::numa::sampler::PageSampler>,
) -> String {
    let targets: Vec<usize> = match m.vcpu {
        Some(v) => vec![v],
        None => (0..vm.placements().len()).collect(),
    };
    let placement = VcpuPlacement {
        node: m.node,
        host_cpus: topology.nodes[m.node].host_cpus.clone(),
    };
    let tids = vm.vcpu_tids();
    for &i in &targets {
        if let Err(e) = vm.move_vcpu(i, placement.clone()) {
            return format!(
                "at {} ms: moving vCPU {i} to node {} failed: {e:#}",
                m.after_ms, m.node
            );
        }
        if let (Some(sampler), Some(Some(tid))) = (sampler, tids.get(i)) {
            sampler.set_thread_node(*tid, m.node);
        }
    }
    let nodes: Vec<usize> = vm.placements().iter().map(|p| p.node).collect();
    if let Err(e) = memory.set_cpu_node(space, main_node(&nodes)) {
        tracing::warn!("recording the node of vm {space}: {e:#}");
    }
    match m.vcpu {
        Some(v) => format!("at {} ms: vCPU {v} moved to node {}", m.after_ms, m.node),
        None => format!("at {} ms: all vCPUs moved to node {}", m.after_ms, m.node),
    }
}

/// Opens the miss counters of every vCPU thread of `vm` not yet counted
/// (threads appear once their vCPU starts running). A thread whose counters
/// cannot be opened is recorded with the reason (in the report) and not
/// retried.
fn count_vcpu_threads(vm: &MicroVm, space: VmId, counters: &MissCounters) {
    for (i, tid) in vm.vcpu_tids().into_iter().enumerate() {
        if let Some(tid) = tid {
            if !counters.knows_thread(tid) {
                if let Err(e) = counters.add_thread(tid, space, i) {
                    tracing::debug!("miss counters of vCPU {i} of vm {space}: {e}");
                }
            }
        }
    }
}

/// What sampling, copy-on-write and remap pauses cost VM `space`.
fn vm_costs(
    memory: &Memory,
    space: Option<VmId>,
    numa: Option<&NumaStats>,
    run_ms: f64,
    vcpus: usize,
) -> VmCosts {
    let Some(space) = space else {
        return VmCosts::default();
    };
    let g = memory.guest_costs(space);
    let mut c = VmCosts {
        cow_breaks: g.cow_breaks,
        cow_break_ms: g.cow_break_ms,
        pauses: g.pauses,
        paused_ms: g.paused_ms,
        pause_timeouts: g.pause_timeouts,
        ..VmCosts::default()
    };
    if let Some(s) = numa.and_then(|n| n.sampling_cost.iter().find(|s| s.vm == space)) {
        c.sampled_faults = s.faults;
        c.sampling_ms = s.charged_ms;
        c.sampling_rounds = s.rounds;
        c.sampling_capped_rounds = s.capped_rounds;
        if run_ms > 0.0 {
            c.sampled_pages_per_s = s.zapped as f64 / (run_ms / 1e3);
            c.asked_pages_per_s = s.pages_asked as f64 / (run_ms / 1e3);
        }
    }
    c.finish(run_ms, vcpus)
}

/// Tells the sampler which thread runs which vCPU on which node (threads
/// appear once their vCPU starts running).
fn register_vcpu_threads(vm: &MicroVm, space: VmId, sampler: &crate::numa::sampler::PageSampler) {
    for (i, tid) in vm.vcpu_tids().into_iter().enumerate() {
        if let Some(tid) = tid {
            if !sampler.knows_thread(tid) {
                sampler.register_thread(tid, space, i, vm.placements()[i].node);
            }
        }
    }
}
