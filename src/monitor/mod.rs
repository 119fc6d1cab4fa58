//! The monitor: one object that owns the topology, machine memory, the
//! service threads (fault handler, NUMA runner, sharing scanner) and the
//! VMs, which come and go while it lives.
//!
//! `disco run` ([`run`]), the REST API (`crate::api`) and the benchmarks
//! drive a [`Monitor`]: add VMs, start them, [`Monitor::tick`] every few
//! milliseconds while they run (scheduled vCPU moves, the sampler's view of
//! vCPU threads, collecting the outcome of VMs that finished), pause,
//! resume, stop, move and remove them, read statistics, and at the end
//! [`Monitor::finish`] with the run report. A VM that fails is stopped and
//! reported on its own; the others carry on.

mod events;
mod guest;
mod info;
mod migrate;
mod run;
mod services;
mod snapshot;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use crate::config::{Config, Policy, VcpuMove, VmConfig};
use crate::memory::{Memory, VmId};
use crate::report::{
    PolicySummary, RunReport, SharingReport, TopologySummary, VcpuReport, VmCosts, VmReport,
};
use crate::topology::Topology;
use crate::vm::{VcpuOutcome, VmOutcome};
use crate::PAGE_SIZE;

pub use events::{Event, EventLog, Rates};
pub use guest::{build_vm, micro_vm_spec};
pub use info::{
    MemmapNode, MonitorStats, PmapRun, PmapRuns, VerifySummary, VmInfo, MEMMAP_CHUNK, PMAP_CHUNK,
};
pub use migrate::Outgoing;
pub use run::{run, run_with, run_with_control, serve, serve_until, RunOptions};
pub use services::settle_limit;
pub use snapshot::{AfterSnapshot, CloneReport, RestoreOptions, SnapshotReport};

use guest::{apply_move, count_vcpu_threads, register_vcpu_threads, Guest};
use services::Services;

const WHILE_RUNNING: &str = "while running";
/// Checks while guests run wait at least this many times as long as the
/// last one took (see `Monitor::verify_if_due`): at most 1 % of one CPU.
const VERIFY_SHARE_INVERSE: u32 = 100;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Built, not started.
    Created,
    Running,
    /// Running, its vCPUs held outside the guest by an operator.
    Paused,
    /// Its vCPUs have exited (done, stopped or failed: see the result).
    Finished,
    /// Building or starting it failed.
    Failed,
}

/// A VM of the monitor.
struct MonitorVm {
    config: VmConfig,
    space: Option<VmId>,
    guest: Option<Guest>,
    /// Why building or starting it failed.
    error: Option<String>,
    started: Option<Instant>,
    /// An operator's pause in force.
    paused: bool,
    moves_done: usize,
    moves: Vec<String>,
    /// A signal stopped it before it finished.
    interrupted: bool,
    /// An operator stopped it (the reason).
    stopped: Option<String>,
    /// How long it waited for memory before it was built (an overcommitted
    /// config's later waves).
    waited: Option<Duration>,
    /// Once its vCPUs have exited: the outcome, the nodes of its vCPUs and
    /// its progress at the end.
    outcome: Option<VmOutcome>,
    final_nodes: Vec<usize>,
    final_progress: (u64, u64),
    /// Where a micro-VM's guest RAM is mapped (for as long as its space lives).
    ram_base: Option<usize>,
    /// The thread collecting its outcome (joining the vCPU threads and
    /// computing the host model's checksums, which takes as long as the
    /// guest's own work), while the monitor goes on.
    pending: Option<std::thread::JoinHandle<VmOutcome>>,
}

impl MonitorVm {
    fn new(config: VmConfig) -> MonitorVm {
        MonitorVm {
            final_nodes: config.vcpu_nodes.clone(),
            config,
            space: None,
            guest: None,
            error: None,
            started: None,
            paused: false,
            moves_done: 0,
            moves: Vec::new(),
            interrupted: false,
            stopped: None,
            waited: None,
            outcome: None,
            final_progress: (0, 0),
            ram_base: None,
            pending: None,
        }
    }

    fn state(&self) -> VmState {
        if self.exited() {
            return VmState::Finished;
        }
        match (&self.guest, &self.outcome) {
            (_, Some(_)) => VmState::Finished,
            (Some(_), None) if self.paused => VmState::Paused,
            (Some(_), None) if self.started.is_some() => VmState::Running,
            (Some(_), None) => VmState::Created,
            (None, None) => VmState::Failed,
        }
    }

    fn vcpu_nodes(&self) -> Vec<usize> {
        match &self.guest {
            Some(g) => g.vcpu_nodes(&self.config),
            None => self.final_nodes.clone(),
        }
    }

    fn progress(&self) -> (u64, u64) {
        match &self.guest {
            Some(g) => g.progress(),
            None => self.final_progress,
        }
    }

    /// Whether its vCPUs have all exited (its outcome may not be
    /// collected yet).
    fn exited(&self) -> bool {
        self.outcome.is_some()
            || self.pending.is_some()
            || self.guest.as_ref().is_some_and(Guest::is_finished)
    }

    /// Starts collecting the outcome of a VM whose vCPUs have exited (or
    /// were asked to) on a thread of its own; its KVM VM is closed there.
    fn begin_collect(&mut self) {
        if let Some(g) = self.guest.take() {
            self.final_nodes = g.vcpu_nodes(&self.config);
            let (done, total) = g.progress();
            self.final_progress = (done.min(total), total);
            if self.paused {
                g.pauser().resume();
                self.paused = false;
            }
            let name = self.config.name.clone();
            match std::thread::Builder::new()
                .name("disco-collect".into())
                .spawn(move || g.wait())
            {
                Ok(t) => self.pending = Some(t),
                Err(e) => {
                    tracing::warn!("collecting VM {name} on a thread of its own: {e}");
                }
            }
        }
    }

    /// Takes the outcome once its collecting thread is done; `true` then.
    fn poll_collect(&mut self) -> bool {
        if self.pending.as_ref().is_some_and(|t| t.is_finished()) {
            self.join_pending();
            return true;
        }
        false
    }

    fn join_pending(&mut self) {
        if let Some(t) = self.pending.take() {
            match t.join() {
                Ok(o) => self.outcome = Some(o),
                Err(_) => self.error = Some("collecting its outcome panicked".into()),
            }
        }
    }

    /// Joins the vCPU threads of a VM whose vCPUs have exited (or were
    /// asked to) and keeps the outcome; its KVM VM is closed.
    fn collect(&mut self) {
        self.begin_collect();
        self.join_pending();
    }
}

/// The memory checks a monitor has run, and what they found.
#[derive(Default)]
struct VerifyLog {
    runs: u32,
    while_running: u32,
    errors: Vec<String>,
}

/// One monitor: topology, memory, services, VMs.
pub struct Monitor {
    /// First, so that they drop first: a vCPU blocked on a fault is
    /// resolved by the fault handler (in `services`) while it stops.
    vms: Vec<MonitorVm>,
    topology: Topology,
    kvm: kvm_ioctls::Kvm,
    memory: Arc<Memory>,
    services: Services,
    /// The config file the monitor's policy came from, for errors and the
    /// report (`<api>` for `disco serve`).
    source: String,
    verify: VerifyLog,
    verify_every: Duration,
    last_verify: Option<Instant>,
    /// How long the last check while guests ran took.
    verify_took: Duration,
    started: Instant,
    /// The signal that ended the run early.
    interrupted: Option<&'static str>,
    events: EventLog,
    /// VMs the NUMA runner is sized for at start.
    expected_vms: usize,
    /// See [`Monitor::collect_finished`].
    collect_finished: bool,
    /// The memory timeline of the report (VMAs, pool residency, sharing,
    /// the monitor's own memory), from the first [`Monitor::sample_memory`].
    memory_watch: Option<crate::memory::MemoryWatch>,
    /// The `rates` events' clock (see [`Self::tick`]).
    rates: events::RateClock,
    /// When the monitor was ready (pools made), and when
    /// [`Self::start_created`] had started every VM built.
    ready: Instant,
    all_started: Option<Instant>,
    /// VMs waiting for room in the pools (`[host] overcommit`), in order.
    waiting: Waiting,
    /// The pools' limit in bytes (`[host] memory_limit_mib`).
    memory_limit: Option<u64>,
}

/// VMs queued until their memory fits the pools ([`Monitor::queue_vm`]):
/// an overcommitted config starts its VMs in waves, each once sharing has
/// given back enough of the memory of those before it.
#[derive(Default)]
struct Waiting {
    /// Each VM, since when it is queued, and whether it was ever turned
    /// away (only those count as having waited).
    queue: std::collections::VecDeque<(VmConfig, Instant, bool)>,
    /// Since when nothing has run, and the scanner's full passes then: a
    /// queue that cannot move gives up once nothing has run for
    /// [`WAIT_FOR_MEMORY_LIMIT`] and the scanner has made
    /// [`WAIT_FOR_MEMORY_PASSES`] full passes since (memory nobody writes
    /// merges within two).
    stalled: Option<(Instant, u64)>,
}

/// See [`Waiting::stalled`].
pub const WAIT_FOR_MEMORY_LIMIT: Duration = Duration::from_secs(5);
/// See [`Waiting::stalled`].
pub const WAIT_FOR_MEMORY_PASSES: u64 = 3;

/// Share of each pool kept free when VMs are let in from the queue: room
/// for the copy-on-write breaks of the VMs already running.
pub const ADMISSION_HEADROOM: u64 = 16;

impl Monitor {
    /// A monitor with no VM: opens KVM, makes one memory pool per node of
    /// `topology` and plans `policy` (page sampling is enabled now, before
    /// any guest space exists). No service thread runs yet.
    pub fn new(
        topology: Topology,
        policy: Policy,
        source: &str,
        verify_every: Duration,
    ) -> Result<Monitor> {
        Monitor::with_memory_limit(topology, policy, source, verify_every, None)
    }

    /// [`Monitor::new`] with pools that hold at most `memory_limit` bytes
    /// in all (`[host] memory_limit_mib`).
    pub fn with_memory_limit(
        topology: Topology,
        policy: Policy,
        source: &str,
        verify_every: Duration,
        memory_limit: Option<u64>,
    ) -> Result<Monitor> {
        let started = Instant::now();
        let kvm = kvm_ioctls::Kvm::new().context(
            "cannot open /dev/kvm: disco needs KVM (run as root or in group kvm on a host with KVM)",
        )?;
        let memory = Arc::new(Memory::for_topology_limited(&topology, memory_limit)?);
        // The policy's budget of kernel mappings per VM, held by the mapper;
        // `vm.max_map_count` is raised for it, not for one mapping a page.
        memory.set_frames_per_mapping(policy.sharing.frames_per_mapping)?;
        let services = Services::plan(policy, source, &topology, &memory)?;
        Ok(Monitor {
            topology,
            kvm,
            memory,
            services,
            source: source.to_string(),
            vms: Vec::new(),
            verify: VerifyLog::default(),
            verify_every,
            last_verify: None,
            verify_took: Duration::ZERO,
            started,
            interrupted: None,
            events: EventLog::new(started),
            expected_vms: 0,
            collect_finished: false,
            memory_watch: None,
            rates: events::RateClock::new(Duration::from_secs(1)),
            ready: Instant::now(),
            all_started: None,
            waiting: Waiting::default(),
            memory_limit,
        })
    }

    /// A monitor for `config`'s topology and policy (checked again first:
    /// a config may have been built or changed in code).
    pub fn for_config(config: &Config, verify_every: Duration) -> Result<Monitor> {
        config.validate()?;
        let monitor = Monitor::with_memory_limit(
            config.topology()?,
            config.policy.clone(),
            &config.source,
            verify_every,
            config.memory_limit_mib.map(|m| m << 20),
        )?;
        monitor.memory.set_large_folios(config.large_folios);
        Ok(monitor)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }
    pub fn policy(&self) -> &Policy {
        &self.services.policy
    }
    /// What the policy does in this build (see the report's policy status).
    pub fn policy_status(&self) -> &str {
        &self.services.status
    }
    /// Carries out `policy` from now on (the NUMA runner and the scanner
    /// restart under it; page sampling, if the new policy needs it and the
    /// old did not, is turned on for the VMs that exist too).
    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        let name = policy.name.clone();
        let vms = self.expected_vms.max(self.vms.len());
        self.memory
            .set_frames_per_mapping(policy.sharing.frames_per_mapping)?;
        self.services
            .swap(policy, &self.source, &self.topology, &self.memory, vms)?;
        self.events.push(
            "policy-changed",
            None,
            format!("{name}: {}", self.services.status),
        );
        Ok(())
    }
    pub fn events(&self) -> &EventLog {
        &self.events
    }
    /// When the monitor was made.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Makes sure the process may map the guest RAM of `vms` (raising
    /// `vm.max_map_count` as root): one raise for many VMs, not one each.
    pub fn reserve_for<'a>(&self, vms: impl IntoIterator<Item = &'a VmConfig>) -> Result<()> {
        self.memory
            .reserve_map_count(crate::memory::mapper::map_count_needed(
                vms.into_iter()
                    .map(|v| v.memory_mib * 1024 * 1024 / PAGE_SIZE as u64),
                self.memory.frames_per_mapping(),
            ))
    }
    /// Builds a VM (guest space, KVM VM) without starting it and returns
    /// its index. A VM that cannot be built is kept, failed, with the
    /// reason (its report says why), and the error is returned too.
    pub fn create_vm(&mut self, vc: &VmConfig) -> Result<usize> {
        let mut v = MonitorVm::new(vc.clone());
        let built = Guest::build(&self.kvm, &self.memory, &self.topology, vc);
        let result = match built {
            Ok((space, guest)) => {
                if let Guest::Micro(vm) = &guest {
                    v.ram_base = Some(vm.ram().host_addr);
                }
                v.space = Some(space);
                v.guest = Some(guest);
                self.events.push("vm-added", Some(&vc.name), String::new());
                Ok(self.vms.len())
            }
            Err(e) => {
                v.error = Some(format!("{e:#}"));
                self.events
                    .push("vm-failed", Some(&vc.name), format!("cannot build: {e:#}"));
                Err(e.context(format!("creating {}", vc.name)))
            }
        };
        self.vms.push(v);
        result
    }

    /// Where VM `name`'s guest space is: its id in `Memory` and, for a
    /// micro-VM, the host address of its guest RAM (mapped until the VM is
    /// removed or the monitor finishes).
    pub fn space_of(&self, name: &str) -> Option<(VmId, Option<usize>)> {
        let v = &self.vms[self.index_of(name)?];
        Some((v.space?, v.ram_base))
    }

    /// Waits until VM `name`'s vCPUs have all exited (checking every
    /// millisecond, its vCPUs' own time limit bounds the wait), collects it
    /// and returns its report: result and checksums checked, run time.
    pub fn wait_vm(&mut self, name: &str) -> Result<VmReport, VmError> {
        let i = self.find(name)?;
        while !self.vms[i].exited() {
            if self.vms[i].guest.is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.vms[i].collect();
        Ok(self.vm_report(i, self.services.numa_stats().as_ref()))
    }

    /// Runs `workload` as a new micro-guest on VM `name`'s guest space,
    /// whose last guest has exited: the memory stays as that guest left it
    /// (a second program on the same machine, as the sharing benchmark
    /// rewrites what its fill guests wrote). Its report is the new guest's.
    pub fn rerun(&mut self, name: &str, workload: crate::guest::Workload) -> Result<(), VmError> {
        let i = self.find(name)?;
        let state = self.vms[i].state();
        let v = &mut self.vms[i];
        let (Some(space), Some(base)) = (v.space, v.ram_base) else {
            return Err(VmError::Failed(format!(
                "VM `{name}` has no micro-guest space to run on"
            )));
        };
        if !v.exited() {
            return Err(VmError::State {
                name: name.to_string(),
                state,
            });
        }
        v.collect();
        let mut vc = v.config.clone();
        vc.workload = workload;
        let ram = crate::vm::GuestRam {
            host_addr: base,
            size: (vc.memory_mib * (1 << 20)) as usize,
        };
        let vm = crate::vm::MicroVm::create(&self.kvm, micro_vm_spec(&vc, &self.topology), ram)
            .and_then(|vm| {
                self.memory.set_pauser(space, vm.pauser())?;
                Ok(vm)
            })
            .map_err(|e| VmError::Failed(format!("VM `{name}`: a new guest: {e:#}")))?;
        let mut next = MonitorVm::new(vc);
        next.space = Some(space);
        next.ram_base = Some(base);
        next.guest = Some(Guest::Micro(Box::new(vm)));
        self.vms[i] = next;
        self.start_vm(i).map_err(VmError::Failed)
    }

    /// The sharing scanner's figures so far (`None` when it does not run).
    pub fn scanner_stats(&self) -> Option<crate::sharing::ScannerStats> {
        self.services.scanner_stats()
    }

    /// Whether VM `name`'s vCPUs have all exited (it may not be collected
    /// by [`Self::tick`] yet).
    pub fn has_exited(&self, name: &str) -> bool {
        self.index_of(name).is_some_and(|i| self.vms[i].exited())
    }

    /// Keeps a VM that was never built, failed with `reason`.
    pub fn record_not_created(&mut self, vc: &VmConfig, reason: String) {
        let mut v = MonitorVm::new(vc.clone());
        v.error = Some(reason);
        self.vms.push(v);
    }

    /// Runs `Memory::verify` now and records the result under `when`.
    pub fn check(&mut self, when: &str) {
        self.verify.runs += 1;
        if when == WHILE_RUNNING {
            self.verify.while_running += 1;
        }
        if let Err(e) = self.memory.verify() {
            self.verify.errors.push(format!("{when}: {e:#}"));
        }
    }

    /// Takes a sample of the memory timeline when one is due (every second).
    pub fn sample_memory(&mut self) {
        self.memory_watch
            .get_or_insert_with(|| crate::memory::MemoryWatch::new(Duration::from_secs(1)))
            .sample(&self.memory);
    }

    /// [`Self::check`] while guests run, every `verify_every`, and no
    /// more often than keeps the checks to 1 % of one CPU: a check reads
    /// every frame's pagemap entry and the process's mappings, about 10 ms
    /// for 256 MiB of guest RAM on the build hosts, and on a host whose
    /// CPUs the vCPUs keep busy that time is theirs (it was about half of
    /// the monitor's own CPU time beside a 256 MiB guest at 2 checks a
    /// second).
    pub fn verify_if_due(&mut self) {
        let wait = self
            .verify_every
            .max(self.verify_took * VERIFY_SHARE_INVERSE);
        if self.last_verify.is_none_or(|t| t.elapsed() >= wait) {
            let started = Instant::now();
            self.check(WHILE_RUNNING);
            self.verify_took = started.elapsed();
            self.last_verify = Some(Instant::now());
        }
    }

    /// Starts the fault handler if the policy needs one (before any VM
    /// starts: pages may be shared or sampled from then on).
    pub fn start_fault_handler(&mut self) -> Result<()> {
        self.services.start_fault_handler(&self.memory)
    }

    /// Starts the service threads: fault handler, NUMA runner (sized for
    /// `expected_vms`; it grows with more), scanner.
    pub fn start_services(&mut self, expected_vms: usize) -> Result<()> {
        self.expected_vms = expected_vms;
        self.services
            .start_threads(&self.memory, &self.topology, expected_vms)
    }

    /// Starts every built VM that has not started; a VM that cannot start
    /// is failed with the reason.
    pub fn start_created(&mut self) {
        for i in 0..self.vms.len() {
            if self.vms[i].state() == VmState::Created {
                let _ = self.start_vm(i);
            }
        }
        self.all_started = Some(Instant::now());
    }
    /// Starts VM `i` (an index [`Self::create_vm`] gave); one that cannot
    /// start is failed with the reason, which is returned too.
    pub fn start_vm(&mut self, i: usize) -> Result<(), String> {
        let v = &mut self.vms[i];
        let Some(g) = v.guest.as_mut() else {
            return Err(format!("VM `{}` was not built", v.config.name));
        };
        match g.start() {
            Ok(()) => {
                v.started = Some(Instant::now());
                self.events
                    .push("vm-started", Some(&v.config.name), String::new());
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot start: {e:#}");
                v.error = Some(why.clone());
                v.guest = None;
                self.events
                    .push("vm-failed", Some(&v.config.name), why.clone());
                Err(format!("{}: {why}", v.config.name))
            }
        }
    }

    /// Queues a VM to be built and started once its memory fits the pools
    /// with [`ADMISSION_HEADROOM`] to spare (checked by [`Self::tick`]), for
    /// overcommitted configs whose VMs cannot all have their memory at once.
    pub fn queue_vm(&mut self, vc: &VmConfig) {
        self.events.push(
            "vm-waiting",
            Some(&vc.name),
            "waiting for memory".to_string(),
        );
        self.waiting
            .queue
            .push_back((vc.clone(), Instant::now(), false));
    }

    /// VMs waiting for memory.
    pub fn waiting(&self) -> usize {
        self.waiting.queue.len()
    }

    /// Lets waiting VMs in, in order, while the first one's memory fits;
    /// tells the scanner whether memory is wanted back (then it runs at its
    /// ceiling, whatever the guests' CPUs). A queue that cannot move while
    /// nothing runs and the scanner frees nothing fails its first VM.
    fn admit_waiting(&mut self) {
        if let Some(scanner) = &self.services.scanner {
            scanner.memory_wanted(!self.waiting.queue.is_empty());
        }
        while let Some((vc, since, _)) = self.waiting.queue.front() {
            let (need, memory_mib, since) = (
                vc.pages_per_node(self.topology.node_count()),
                vc.memory_mib,
                *since,
            );
            let pools = self.memory.pool_room();
            let fits = need
                .iter()
                .zip(&pools)
                .all(|(&n, &(capacity, free))| n == 0 || n + capacity / ADMISSION_HEADROOM <= free);
            if fits {
                let (vc, since, refused) = self.waiting.queue.pop_front().expect("front");
                self.waiting.stalled = None;
                if let Ok(i) = self.create_vm(&vc) {
                    self.vms[i].waited = refused.then(|| since.elapsed());
                    let _ = self.start_vm(i);
                }
                continue;
            }
            self.waiting.queue[0].2 = true;
            let passes = self.services.scanner_stats().map(|s| s.full_scans);
            if self.any_running() {
                self.waiting.stalled = None;
                break;
            }
            let (since_idle, passes_then) = *self
                .waiting
                .stalled
                .get_or_insert((Instant::now(), passes.unwrap_or(0)));
            let idle = since_idle.elapsed();
            let scanned = passes.is_none_or(|p| p >= passes_then + WAIT_FOR_MEMORY_PASSES);
            if idle < WAIT_FOR_MEMORY_LIMIT || !scanned {
                break;
            }
            let free: u64 = pools.iter().map(|p| p.1).sum();
            let reason = format!(
                "not started: its {} MiB never fit the pools (waited {:.1} s; {} MiB free, \
                 {} MiB kept free for copy-on-write; nothing ran for {:.1} s{}); allowed: \
                 guest memory that sharing can fold into [host] memory_limit_mib",
                memory_mib,
                since.elapsed().as_secs_f64(),
                (free * PAGE_SIZE as u64) >> 20,
                (pools.iter().map(|p| p.0).sum::<u64>() / ADMISSION_HEADROOM * PAGE_SIZE as u64)
                    >> 20,
                idle.as_secs_f64(),
                match passes {
                    Some(_) =>
                        format!(" and {WAIT_FOR_MEMORY_PASSES} sharing passes freed too little"),
                    None => ", and sharing is off".to_string(),
                }
            );
            let (vc, _, _) = self.waiting.queue.pop_front().expect("front");
            self.events
                .push("vm-failed", Some(&vc.name), reason.clone());
            self.record_not_created(&vc, reason);
            // The same evidence holds for the next in the queue.
        }
    }

    /// Stops the VMs whose copy-on-write break found every pool full.
    fn stop_starved(&mut self) {
        for space in self.memory.take_starved() {
            let Some(v) = self.vms.iter_mut().find(|v| v.space == Some(space)) else {
                continue;
            };
            if let Some(g) = v.guest.as_ref().filter(|g| !g.is_finished()) {
                let reason = "out of machine memory: a write to a shared page found every pool \
                              full (the overcommitted guests wrote more than sharing had saved); \
                              allowed: a [host] memory_limit_mib with room for the guests' \
                              private writes";
                g.stop_because(reason);
                self.events
                    .push("vm-failed", Some(&v.config.name), reason.to_string());
            }
        }
    }

    /// Checks that VMs `new` can join the monitor as `add_vm` requires
    /// (new names, room next to the others: `Config::validate`), reserves
    /// their mappings and starts the service threads if none runs yet.
    /// `shared_memory`: the new VMs map one copy of their pages (clones of
    /// a snapshot), so their guest memory is not added up against the
    /// pools as separate VMs' is (`overcommit` in the check); a clone
    /// that finds a pool full fails as a whole, undone.
    fn admit(&mut self, new: &[VmConfig], shared_memory: bool) -> Result<(), AddError> {
        for (k, vc) in new.iter().enumerate() {
            if self.index_of(&vc.name).is_some() || new[..k].iter().any(|o| o.name == vc.name) {
                return Err(AddError::Exists(vc.name.clone()));
            }
        }
        let live: Vec<VmConfig> = self
            .vms
            .iter()
            .filter(|v| v.space.is_some())
            .map(|v| v.config.clone())
            .chain(new.iter().cloned())
            .collect();
        let check = Config {
            source: self.source.clone(),
            topology: crate::config::TopologyChoice::Host,
            topology_loaded: Some(self.topology.clone()),
            policy: Policy {
                // The policy's sharing domains are checked against the
                // VMs of a config file; a live monitor takes VMs of any
                // domain.
                sharing: crate::config::SharingPolicy {
                    domains: Vec::new(),
                    ..self.services.policy.sharing.clone()
                },
                ..self.services.policy.clone()
            },
            vms: live.clone(),
            overcommit: shared_memory,
            memory_limit_mib: self.memory_limit.map(|b| b >> 20),
            large_folios: true,
        };
        check.validate().map_err(AddError::Invalid)?;
        self.reserve_for(&live).map_err(AddError::Host)?;
        if self.services.numa.is_none() && self.services.scanner.is_none() {
            self.start_services(0).map_err(AddError::Host)?;
        }
        Ok(())
    }

    /// Adds a VM while the monitor runs and starts it: the name must be
    /// new, the VM must fit next to the others (pools, host memory,
    /// mappings: `Config::validate`). Returns the VM's index.
    pub fn add_vm(&mut self, vc: &VmConfig) -> Result<usize, AddError> {
        self.admit(std::slice::from_ref(vc), false)?;
        let i = match self.create_vm(vc) {
            Ok(i) => i,
            Err(e) => {
                self.vms.pop();
                return Err(AddError::Host(e));
            }
        };
        if let Err(e) = self.start_vm(i) {
            let v = self.vms.remove(i);
            if let Some(space) = v.space {
                let _ = self.memory.destroy_space(space);
            }
            return Err(AddError::Host(anyhow::anyhow!(e)));
        }
        Ok(i)
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.config.name == name)
    }

    fn find(&self, name: &str) -> Result<usize, VmError> {
        self.index_of(name).ok_or_else(|| VmError::NotFound {
            name: name.to_string(),
            known: self.vms.iter().map(|v| v.config.name.clone()).collect(),
        })
    }

    /// One step of the monitor's loop: scheduled vCPU moves, the sampler
    /// and miss counters told about new vCPU threads, and VMs whose vCPUs
    /// have all exited collected (their outcome kept, their KVM VM closed:
    /// each KVM VM open in the process slows every page-table change the
    /// mapper makes).
    pub fn tick(&mut self) {
        self.stop_starved();
        self.admit_waiting();
        let sampler = self.memory.sampler();
        for i in 0..self.vms.len() {
            let v = &mut self.vms[i];
            let (Some(started), Some(space)) = (v.started, v.space) else {
                continue;
            };
            if let Some(Guest::Micro(vm)) = v.guest.as_mut() {
                while let Some(m) = v.config.moves.get(v.moves_done) {
                    if started.elapsed() < Duration::from_millis(m.after_ms) {
                        break;
                    }
                    v.moves_done += 1;
                    let note = apply_move(
                        vm,
                        space,
                        m,
                        &self.topology,
                        &self.memory,
                        sampler.as_deref(),
                    );
                    v.moves.push(note);
                }
                if let Some(sampler) = &sampler {
                    register_vcpu_threads(vm, space, sampler);
                }
                if let Some(counters) = &self.services.miss_counters {
                    count_vcpu_threads(vm, space, counters);
                }
            }
            if self.collect_finished && v.guest.as_ref().is_some_and(Guest::is_finished) {
                v.begin_collect();
            }
            if v.poll_collect() {
                let name = v.config.name.clone();
                let report = self.vm_report(i, None);
                let (kind, detail) = match report.status.as_str() {
                    "ok" => ("vm-finished", "ok: every checksum verified".to_string()),
                    "stopped" => ("vm-stopped", report.error.clone().unwrap_or_default()),
                    other => (
                        "vm-failed",
                        format!("{other}: {}", report.error.unwrap_or_default()),
                    ),
                };
                self.events.push(kind, Some(&name), detail);
            }
        }
        self.note_rates();
    }

    /// Once a second: a `rates` event when merges, copy-on-write breaks,
    /// migrations or replications happened since the last reading.
    fn note_rates(&mut self) {
        let now = Instant::now();
        if !self.rates.due(now) {
            return;
        }
        let sharing = self.memory.sharing_stats();
        let numa = self.services.numa_stats();
        let counts = events::Counts {
            merges: sharing.merges,
            cow_breaks: sharing.cow_breaks,
            migrations: numa.as_ref().map_or(0, |n| n.migrations),
            frames_moved: numa.as_ref().map_or(0, |n| {
                n.migrations + n.region_migrations + n.follow_migrations
            }),
            replications: numa.as_ref().map_or(0, |n| n.replicas_made),
        };
        if let Some(rates) = self.rates.reading(now, counts) {
            self.events.push_rates(rates);
        }
    }

    /// Whether no VM is running (every one exited, failed or not started).
    pub fn all_finished(&self) -> bool {
        self.waiting.queue.is_empty()
            && self
                .vms
                .iter()
                .all(|v| v.guest.as_ref().is_none_or(Guest::is_finished))
    }

    /// Whether some VM's vCPUs may run.
    pub fn any_running(&self) -> bool {
        self.vms
            .iter()
            .any(|v| v.started.is_some() && v.guest.as_ref().is_some_and(|g| !g.is_finished()))
    }

    /// Whether [`Self::tick`] collects a VM's outcome as soon as its vCPUs
    /// have exited (on a thread of its own: checking checksums against the
    /// host model takes as long as the guest's work), so that its result
    /// shows and its KVM VM closes while others run. Off by default: a run
    /// collects every outcome once all guests are done, so the host model's
    /// work does not compete with guests still running.
    pub fn collect_finished(&mut self, on: bool) {
        self.collect_finished = on;
    }

    /// (done, total) progress over the VMs that were built, and how many
    /// of them have finished.
    pub fn progress(&self) -> (u64, u64, usize, usize) {
        let built = self.vms.iter().filter(|v| v.space.is_some());
        let (mut done, mut total, mut finished, mut count) = (0, 0, 0, 0);
        for v in built {
            let (a, b) = v.progress();
            done += a.min(b);
            total += b;
            finished += v.exited() as usize;
            count += 1;
        }
        (done, total, finished, count)
    }

    /// A signal ends the run: every VM still running is stopped.
    pub fn interrupt(&mut self, signal: &'static str) {
        let reason = format!("{signal} interrupted the run");
        while let Some((vc, _, _)) = self.waiting.queue.pop_front() {
            self.record_not_created(&vc, format!("not started (waiting for memory): {reason}"));
        }
        for v in &mut self.vms {
            if let Some(g) = v.guest.as_ref().filter(|g| !g.is_finished()) {
                v.interrupted = true;
                g.stop_because(&reason);
            }
        }
        self.interrupted = Some(signal);
    }

    /// The VM `name`, running.
    fn live(&mut self, name: &str) -> Result<usize, VmError> {
        let i = self.find(name)?;
        match self.vms[i].state() {
            VmState::Running | VmState::Paused => Ok(i),
            state => Err(VmError::State {
                name: name.to_string(),
                state,
            }),
        }
    }

    /// Holds every vCPU of VM `name` outside the guest until `resume`.
    pub fn pause(&mut self, name: &str) -> Result<(), VmError> {
        let i = self.live(name)?;
        let v = &mut self.vms[i];
        if v.paused {
            return Ok(());
        }
        let pauser = v.guest.as_ref().expect("live").pauser();
        if !pauser.pause() {
            return Err(VmError::Failed(format!(
                "VM `{name}`: its vCPUs did not stop within the pause limit; it keeps running"
            )));
        }
        v.paused = true;
        self.events.push("vm-paused", Some(name), String::new());
        Ok(())
    }

    /// Ends an operator's pause of VM `name`.
    pub fn resume(&mut self, name: &str) -> Result<(), VmError> {
        let i = self.live(name)?;
        let v = &mut self.vms[i];
        if v.paused {
            v.guest.as_ref().expect("live").pauser().resume();
            v.paused = false;
            self.events.push("vm-resumed", Some(name), String::new());
        }
        Ok(())
    }

    /// Stops VM `name` (its vCPUs report as stopped); its memory stays
    /// until it is removed.
    pub fn stop(&mut self, name: &str, reason: &str) -> Result<(), VmError> {
        let i = self.live(name)?;
        let v = &mut self.vms[i];
        v.stopped = Some(reason.to_string());
        let g = v.guest.as_ref().expect("live");
        g.stop_because(reason);
        if v.paused {
            g.pauser().resume();
            v.paused = false;
        }
        Ok(())
    }

    /// Removes VM `name`: stops it if it runs, gives its memory back to the
    /// pools and forgets it. Returns its last report.
    pub fn remove(&mut self, name: &str) -> Result<VmReport, VmError> {
        let i = self.find(name)?;
        let v = &mut self.vms[i];
        if let Some(g) = &v.guest {
            if v.started.is_some() {
                v.stopped
                    .get_or_insert_with(|| "removed by an operator".into());
            }
            g.stop_because("removed by an operator");
        }
        // Its vCPU threads joined (also a collection under way) before its
        // memory goes.
        v.collect();
        let report = self.vm_report(i, self.services.numa_stats().as_ref());
        let v = self.vms.remove(i);
        if let Some(space) = v.space {
            self.memory
                .destroy_space(space)
                .map_err(|e| VmError::Failed(format!("VM `{name}`: freeing its memory: {e:#}")))?;
        }
        self.events.push("vm-removed", Some(name), String::new());
        Ok(report)
    }

    /// Moves every vCPU of VM `name` (or vCPU `vcpu`) to `node`, as a
    /// `moves` entry of its config would. `via` says who asked (the report
    /// notes it). Returns what happened.
    pub fn move_vcpus(
        &mut self,
        name: &str,
        node: usize,
        vcpu: Option<usize>,
        via: &str,
    ) -> Result<String, VmError> {
        let i = self.find(name)?;
        let nodes = self.topology.node_count();
        if node >= nodes {
            return Err(VmError::Invalid {
                field: "node".into(),
                message: format!(
                    "node {node} does not exist; allowed: 0 to {} (the topology has {nodes} nodes)",
                    nodes - 1
                ),
            });
        }
        let sampler = self.memory.sampler();
        let v = &mut self.vms[i];
        let (Some(Guest::Micro(vm)), Some(space)) = (v.guest.as_mut(), v.space) else {
            return Err(match (&v.guest, &v.outcome) {
                (_, Some(_)) => VmError::Failed(format!("VM `{name}` has finished")),
                (None, None) => {
                    VmError::Failed(format!("VM `{name}` is not running (it failed to start)"))
                }
                (Some(_), None) => VmError::Failed(format!(
                    "VM `{name}` is a Linux VM; only micro-VMs can be moved"
                )),
            });
        };
        if vm.is_finished() {
            return Err(VmError::Failed(format!("VM `{name}` has finished")));
        }
        let count = vm.placements().len();
        if let Some(k) = vcpu {
            if k >= count {
                return Err(VmError::Invalid {
                    field: "vcpu".into(),
                    message: format!("VM `{name}` has no vCPU {k}; allowed: 0 to {}", count - 1),
                });
            }
        }
        let m = VcpuMove {
            after_ms: v.started.map_or(0, |s| s.elapsed().as_millis() as u64),
            node,
            vcpu,
        };
        let note = format!(
            "{} ({via})",
            apply_move(
                vm,
                space,
                &m,
                &self.topology,
                &self.memory,
                sampler.as_deref()
            )
        );
        v.moves.push(note.clone());
        self.events.push("vm-moved", Some(name), note.clone());
        Ok(note)
    }

    /// The control socket's `status` reply: per VM, its name, state and the
    /// node of each vCPU.
    pub fn status_line(&self) -> String {
        let parts: Vec<String> = self
            .vms
            .iter()
            .map(|v| {
                let name = &v.config.name;
                if v.space.is_none() || v.error.is_some() {
                    return format!("{name} failed to start");
                }
                let state = if v.exited() { "finished" } else { "running" };
                let nodes: Vec<String> = v.vcpu_nodes().iter().map(|n| n.to_string()).collect();
                format!("{name} {state} vcpu nodes {}", nodes.join(","))
            })
            .collect();
        parts.join("; ")
    }

    /// The report of VM `i` as it stands: once it has finished, its result
    /// (checksums checked against the host model).
    fn vm_report(&self, i: usize, numa: Option<&crate::numa::runner::NumaStats>) -> VmReport {
        let v = &self.vms[i];
        let vc = &v.config;
        let space_stats = v.space.and_then(|s| self.memory.space_stats(s).ok());
        let pages_per_node = space_stats
            .as_ref()
            .map(|s| s.pages_per_node.clone())
            .unwrap_or_default();
        let shared_pages = space_stats.as_ref().map_or(0, |s| s.shared_pages);
        let final_nodes = v.vcpu_nodes();
        let outcome = v.outcome.as_ref();
        let vcpus = final_nodes
            .iter()
            .enumerate()
            .map(|(k, &node)| VcpuReport {
                index: k,
                node,
                host_cpus: self.topology.nodes[node].host_cpus.clone(),
                outcome: match outcome {
                    Some(o) => o.vcpus[k].clone(),
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
        let (status, error) = if let Some(e) = &v.error {
            ("failed", Some(e.clone()))
        } else if v.interrupted {
            (
                "interrupted",
                Some(format!(
                    "stopped before it finished: {} interrupted the run",
                    self.interrupted.unwrap_or("a signal")
                )),
            )
        } else if outcome.is_none() {
            (
                match v.state() {
                    VmState::Created => "created",
                    VmState::Paused => "paused",
                    // Its vCPUs have exited; its result is checked once its
                    // outcome is collected.
                    VmState::Finished => "exited",
                    _ => "running",
                },
                None,
            )
        } else if let (Some(why), false) = (&v.stopped, failures.is_empty()) {
            ("stopped", Some(why.clone()))
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
            .map(|o| o.run_time.as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        let mut costs = vm_costs(&self.memory, v.space, numa, run_ms, vcpus.len());
        if let Some(o) = outcome {
            costs.vcpu_user_ms = o.vcpu_cpu.user.as_secs_f64() * 1e3;
            costs.vcpu_system_ms = o.vcpu_cpu.system.as_secs_f64() * 1e3;
            costs.vcpu_waiting_ms = o.vcpu_cpu.waiting.as_secs_f64() * 1e3;
            costs.vcpu_blocked_ms = o.vcpu_cpu.blocked.as_secs_f64() * 1e3;
        }
        VmReport {
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
            moves: v.moves.clone(),
            run_ms,
            waited_ms: v.waited.map_or(0.0, |w| w.as_secs_f64() * 1e3),
            costs,
            log: outcome.map(|o| o.log.clone()).unwrap_or_default(),
        }
    }

    /// Ends the monitor: stops the NUMA runner, collects every VM, lets
    /// the scanner make its final passes over the guests' final memory
    /// (at most `settle`, default [`settle_limit`]), reports every VM,
    /// frees every guest space and checks that nothing leaked. `bar` shows
    /// how the final passes go; `created_at`: when building the VMs ended.
    pub fn finish(
        mut self,
        settle: Option<Duration>,
        bar: &ProgressBar,
        create_ms: f64,
    ) -> Result<RunReport> {
        let numa_stats = self
            .services
            .numa
            .take()
            .map(crate::numa::runner::NumaRunner::stop);
        // Collect every guest's outcome and close its KVM VM before the
        // final passes: each KVM VM in the process adds its MMU notifier to
        // every page-table change the mapper makes, so merges with 300
        // finished VMs still open cost about 20x more (0.4 ms, not 20 us;
        // docs/host-facts.md, "KVM").
        for v in &mut self.vms {
            v.collect();
        }
        // Let the scanner see the guests' final memory: two more full passes
        // (the first may have started before the guests' last writes).
        // Nothing writes any more, so pages that were volatile need not
        // prove it.
        let interrupted = self.interrupted;
        let guest_pages: u64 = self.vms.iter().map(|v| v.config.memory_mib * 256).sum();
        let scan_stats = self.services.scanner.take().map(|scanner| {
            if interrupted.is_some() {
                // No final passes: the operator wants the run to end.
                let end = scanner.stop();
                return (
                    end,
                    false,
                    Some("final passes skipped: the run was interrupted".into()),
                );
            }
            let limit = settle.unwrap_or_else(|| settle_limit(guest_pages * PAGE_SIZE as u64));
            scanner.guests_quiescent();
            let start = scanner.stats();
            let target = start.full_scans + 2;
            let began = Instant::now();
            let progress = |now: &crate::sharing::ScannerStats| {
                (now.pages_scanned - start.pages_scanned) as f64 / (2 * guest_pages).max(1) as f64
            };
            // Settled means both passes ended within the limit (the batch in
            // flight when the limit struck may still end one; it does not
            // count).
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
                    "final passes not completed: {done} of 2 {why}, {:.0} % of their pages \
                     scanned, {} merges meanwhile",
                    100.0 * progress(&at_end).min(1.0),
                    at_end.merges - start.merges
                )
            });
            (end, settled, note)
        });
        // A signal during the final passes cuts them short: say so too.
        if self.interrupted.is_none() {
            self.interrupted = crate::signals::interrupted();
        }
        bar.set_message("guests done; checking their results against the host model");
        let reports: Vec<VmReport> = (0..self.vms.len())
            .map(|i| self.vm_report(i, numa_stats.as_ref()))
            .collect();
        bar.finish_and_clear();
        self.check("after the guests stopped");
        let pools = self.memory.pool_stats();
        let guest_frames: u64 = self.vms.iter().map(|v| v.config.memory_mib * 256).sum();
        let (kernel_mappings, memory_timeline) = self
            .memory_watch
            .take()
            .unwrap_or_else(|| crate::memory::MemoryWatch::new(Duration::from_secs(1)))
            .finish(&self.memory, guest_frames);
        let sharing_report = scan_stats.map(|(scanner, settled, settle_note)| SharingReport {
            scanner,
            settled,
            settle_note,
            memory: self.memory.sharing_stats(),
            budget: self.memory.budget_stats(),
        });
        let replicas = self.memory.replica_stats();
        for v in &self.vms {
            if let Some(space) = v.space {
                self.memory.destroy_space(space)?;
            }
        }
        self.check("after tearing down");
        let leaked: u32 = self.memory.pool_stats().iter().map(|p| p.used_pages).sum();
        if leaked != 0 {
            self.verify.errors.push(format!(
                "{leaked} machine pages still in use after every VM was destroyed"
            ));
        }
        Ok(RunReport {
            config: self.source.clone(),
            topology: TopologySummary {
                name: self.topology.name.clone(),
                nodes: self.topology.node_count(),
                emulated: self.topology.is_emulated(),
                host_nodes: self.topology.host_nodes,
            },
            policy: PolicySummary {
                policy: self.services.policy.clone(),
                status: self.services.status.clone(),
            },
            vms: reports,
            large_folios: self.memory.large_folio_status(),
            interrupted: self.interrupted.map(str::to_string),
            sharing: sharing_report,
            kernel_mappings,
            memory_timeline,
            numa: numa_stats,
            replicas,
            pools,
            verify_runs: self.verify.runs,
            verify_while_running: self.verify.while_running,
            verify_ok: self.verify.errors.is_empty(),
            verify_errors: std::mem::take(&mut self.verify.errors),
            create_ms,
            started_ms: self
                .all_started
                .map_or(0.0, |t| t.duration_since(self.ready).as_secs_f64() * 1e3),
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Why a VM could not be added.
#[derive(Debug)]
pub enum AddError {
    /// A VM of that name exists.
    Exists(String),
    /// It does not fit (the config check's error, naming the key).
    Invalid(crate::config::ConfigError),
    /// The host refused (building the guest space or the KVM VM).
    Host(anyhow::Error),
    /// A snapshot file was refused (foreign, wrong version, truncated,
    /// corrupted, unreadable): the message names the file and the fault.
    Snapshot(anyhow::Error),
}

impl std::fmt::Display for AddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddError::Exists(name) => write!(
                f,
                "a VM named `{name}` exists; names must be unique (remove it first)"
            ),
            AddError::Invalid(e) => write!(f, "{e}"),
            AddError::Host(e) | AddError::Snapshot(e) => write!(f, "{e:#}"),
        }
    }
}

/// Why an operation on a VM was refused.
#[derive(Debug)]
pub enum VmError {
    NotFound {
        name: String,
        known: Vec<String>,
    },
    /// The VM is not in a state the operation applies to.
    State {
        name: String,
        state: VmState,
    },
    /// A request field is out of range.
    Invalid {
        field: String,
        message: String,
    },
    /// The operation could not be carried out.
    Failed(String),
}

impl std::fmt::Display for VmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmError::NotFound { name, known } => write!(
                f,
                "no VM `{name}`; the VMs are: {}",
                if known.is_empty() {
                    "(none)".to_string()
                } else {
                    known.join(", ")
                }
            ),
            VmError::State { name, state } => write!(
                f,
                "VM `{name}` is {}; allowed only while it runs (running or paused)",
                serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
            VmError::Invalid { message, .. } => write!(f, "{message}"),
            VmError::Failed(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for VmError {}

/// What sampling, copy-on-write and remap pauses cost VM `space`.
fn vm_costs(
    memory: &Memory,
    space: Option<VmId>,
    numa: Option<&crate::numa::runner::NumaStats>,
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
        c.sampling_zap_ms = s.zap_charged_ms;
        c.sampling_rounds = s.rounds;
        c.sampling_capped_rounds = s.capped_rounds;
        c.sampling_epochs = s.epochs;
        c.sampling_settled_epochs = s.settled_epochs;
        if run_ms > 0.0 {
            c.sampled_pages_per_s = s.zapped as f64 / (run_ms / 1e3);
            c.asked_pages_per_s = s.pages_asked as f64 / (run_ms / 1e3);
        }
    }
    c.finish(run_ms, vcpus)
}
