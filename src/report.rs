//! The run report: what `disco run` prints at the end, as text or JSON.

use serde::Serialize;

use crate::config::Policy;
use crate::guest::Workload;
use crate::memory::{KernelMappings, MemorySample, PoolStats, ReplicaStats, SharingStats};
use crate::numa::runner::NumaStats;
use crate::sharing::ScannerStats;
use crate::vm::VcpuOutcome;
use crate::PAGE_SIZE;

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub config: String,
    pub topology: TopologySummary,
    pub policy: PolicySummary,
    pub vms: Vec<VmReport>,
    /// The signal (`"SIGINT"`, `"SIGTERM"`) that ended the run before its
    /// guests finished; `null` for a run that ended by itself.
    pub interrupted: Option<String>,
    /// Present when the policy turned sharing on.
    pub sharing: Option<SharingReport>,
    /// The monitor process's kernel mappings (VMAs) over the run.
    pub kernel_mappings: KernelMappings,
    /// The process's memory about once a second while the guests ran
    /// (`crate::memory::watch`).
    pub memory_timeline: Vec<MemorySample>,
    /// Present when the NUMA engine ran.
    pub numa: Option<NumaStats>,
    /// Replicas of read-shared pages at the end of the run (before teardown).
    pub replicas: ReplicaStats,
    pub pools: Vec<PoolStats>,
    /// Large shmem folios for guest RAM: what the host allows and whether
    /// guest RAM asked for them (`crate::memory::folios`).
    pub large_folios: String,
    /// How many times `Memory::verify` ran during the run, and whether all passed.
    pub verify_runs: u32,
    /// Of those, how many ran while guests were running.
    pub verify_while_running: u32,
    pub verify_ok: bool,
    pub verify_errors: Vec<String>,
    /// Wall time to create all VMs (memory + KVM + guest image), in ms.
    pub create_ms: f64,
    /// From the monitor being ready (its pools made) to every VM of the
    /// run built and started, in ms (0 when VMs came one by one through
    /// the API: `disco serve`).
    pub started_ms: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SharingReport {
    pub scanner: ScannerStats,
    /// The scanner completed its final passes over the guests' final memory.
    pub settled: bool,
    /// Why not, when it did not: how far it got within the time limit.
    pub settle_note: Option<String>,
    pub memory: SharingStats,
    /// What the mapper's budget of kernel mappings did (`memory::budget`).
    pub budget: crate::memory::BudgetStats,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopologySummary {
    pub name: String,
    pub nodes: usize,
    pub emulated: bool,
    pub host_nodes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicySummary {
    #[serde(flatten)]
    pub policy: Policy,
    /// What the monitor does with the policy in this build.
    pub status: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VcpuReport {
    pub index: usize,
    pub node: usize,
    pub host_cpus: Vec<usize>,
    pub outcome: VcpuOutcome,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmReport {
    pub name: String,
    pub workload: Workload,
    /// A Linux VM's kernel (its `workload` is then unused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    pub memory_mib: u64,
    /// Guest pages backed by each node's pool at the end of the run.
    pub pages_per_node: Vec<u64>,
    /// Guest pages backed by a machine page shared with other frames.
    pub shared_pages: u64,
    pub sharing_domain: String,
    pub vcpus: Vec<VcpuReport>,
    /// "ok": every vCPU returned the checksum the host computed;
    /// "wrong-checksum"; "failed": stopped by the monitor (see `error`).
    pub status: String,
    pub error: Option<String>,
    /// vCPU moves carried out while it ran (`[[vm]] moves`).
    pub moves: Vec<String>,
    pub run_ms: f64,
    /// How long it waited for memory before it was built (`[host]
    /// overcommit`), milliseconds; 0 when it did not wait.
    #[serde(default)]
    pub waited_ms: f64,
    /// What the monitor's policy cost the guest.
    pub costs: VmCosts,
    pub log: Vec<String>,
}

/// What sampling, copy-on-write and remaps cost one VM, against its vCPU
/// time (run time x vCPUs).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VmCosts {
    /// Sampled minor faults and the vCPU time charged for them (see
    /// `numa::cap`: handler time measured, plus `sample_fault_cost_us`
    /// each).
    pub sampled_faults: u64,
    pub sampling_ms: f64,
    /// Of `sampling_ms`, the monitor's CPU time choosing and zapping the
    /// VM's pages while no host CPU was idle (then it is the vCPUs').
    #[serde(default)]
    pub sampling_zap_ms: f64,
    /// Copy-on-write breaks and their handler time.
    pub cow_breaks: u64,
    pub cow_break_ms: f64,
    /// Pauses for remaps, and the time paused.
    pub pauses: u64,
    pub paused_ms: f64,
    /// Pauses withdrawn because a vCPU did not stop in time (their time is
    /// in `paused_ms`).
    pub pause_timeouts: u64,
    /// Run time x vCPUs, in milliseconds.
    pub vcpu_ms: f64,
    /// CPU time the vCPU threads used, ms: in user mode (which includes
    /// guest mode) and in the host kernel (exits, page faults). Unlike
    /// `vcpu_ms`, it leaves out time descheduled or blocked, so it shows
    /// what the policy made the vCPUs execute apart from what other
    /// threads took from them on a busy host.
    #[serde(default)]
    pub vcpu_user_ms: f64,
    #[serde(default)]
    pub vcpu_system_ms: f64,
    /// The vCPU threads' time off a CPU, ms: runnable but waiting for one
    /// (what other threads, the monitor's included, took from them), and
    /// blocked (userfaultfd waits, pauses, halts). From the kernel's
    /// scheduler statistics; 0 where it keeps none.
    #[serde(default)]
    pub vcpu_waiting_ms: f64,
    #[serde(default)]
    pub vcpu_blocked_ms: f64,
    /// (sampling + copy-on-write + paused x vCPUs) / vCPU time.
    pub overhead: f64,
    /// Sampling rounds, and those in which the cap zapped fewer pages than
    /// the policy asked for.
    pub sampling_rounds: u64,
    pub sampling_capped_rounds: u64,
    /// Pages the cap allowed per second of run time, and the policy's ask.
    pub sampled_pages_per_s: f64,
    pub asked_pages_per_s: f64,
    /// Epochs judged, and those in which the VM was settled, so that its
    /// sampling allowance backed off towards `settled_sampling_overhead`.
    #[serde(default)]
    pub sampling_epochs: u64,
    #[serde(default)]
    pub sampling_settled_epochs: u64,
}

impl VmCosts {
    /// Fills the derived figures from the parts.
    pub fn finish(mut self, run_ms: f64, vcpus: usize) -> VmCosts {
        self.vcpu_ms = run_ms * vcpus as f64;
        if self.vcpu_ms > 0.0 {
            self.overhead = (self.sampling_ms + self.cow_break_ms + self.paused_ms * vcpus as f64)
                / self.vcpu_ms;
        }
        self
    }
}

impl VmReport {
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }

    /// `NAME: STATUS ERROR`, for errors that list the VMs at fault.
    pub fn status_line(&self) -> String {
        format!(
            "{}: {} {}",
            self.name,
            self.status,
            self.error.as_deref().unwrap_or("")
        )
    }
}

impl RunReport {
    /// True when every VM finished with a verified checksum and every
    /// invariant check passed.
    pub fn all_ok(&self) -> bool {
        self.interrupted.is_none() && self.verify_ok && self.vms.iter().all(VmReport::ok)
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let t = &self.topology;
        out += &format!(
            "disco run: {} | topology {} ({} nodes{}) | policy {} ({})\n",
            self.config,
            t.name,
            t.nodes,
            if t.emulated {
                format!(", emulated on {} host node(s)", t.host_nodes)
            } else {
                String::new()
            },
            self.policy.policy.name,
            self.policy.policy.source
        );
        out += &format!("policy status: {}\n", self.policy.status);
        out += &format!("large folios: {}\n", self.large_folios);
        if let Some(signal) = &self.interrupted {
            out +=
                &format!("INTERRUPTED by {signal}: the run was ended early (guests still running were stopped)\n");
        }
        out += "\n";
        out += &format!(
            "{:<14} {:<11} {:>5} {:<12} {:>7} {:<18} {:>10} {:>9} {}\n",
            "VM",
            "workload",
            "vCPUs",
            "vCPU nodes",
            "MiB",
            "pages per node",
            "shared MiB",
            "run ms",
            "result"
        );
        for vm in &self.vms {
            let nodes: Vec<String> = vm.vcpus.iter().map(|v| v.node.to_string()).collect();
            let per_node: Vec<String> = vm
                .pages_per_node
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0)
                .map(|(n, p)| format!("n{n}:{p}"))
                .collect();
            let result = match vm.status.as_str() {
                "ok" if vm.kernel.is_some() => "ok, the guest powered off".to_string(),
                "ok" => "ok, checksums verified".to_string(),
                s => format!("{s}: {}", vm.error.as_deref().unwrap_or("")),
            };
            out += &format!(
                "{:<14} {:<11} {:>5} {:<12} {:>7} {:<18} {:>10.1} {:>9.1} {}\n",
                vm.name,
                vm.kernel.as_ref().map_or(vm.workload.name(), |_| "linux"),
                vm.vcpus.len(),
                nodes.join(","),
                vm.memory_mib,
                per_node.join(" "),
                vm.shared_pages as f64 * PAGE_SIZE as f64 / (1024.0 * 1024.0),
                vm.run_ms,
                result
            );
            for v in &vm.vcpus {
                if let VcpuOutcome::Failed { reason, regs } = &v.outcome {
                    out += &format!(
                        "    vcpu{} (node {}): {reason}\n      {regs}\n",
                        v.index, v.node
                    );
                }
            }
            if vm.waited_ms > 0.0 {
                out += &format!(
                    "    started after waiting {:.1} s for memory (overcommit)\n",
                    vm.waited_ms / 1e3
                );
            }
            for line in &vm.moves {
                out += &format!("    move: {line}\n");
            }
            for line in &vm.log {
                out += &format!("    log: {line}\n");
            }
        }
        if self
            .vms
            .iter()
            .any(|v| v.costs.overhead > 0.0 || v.costs.sampling_rounds > 0)
        {
            out += &format!(
                "\nmonitor cost per VM (share of its vCPU time; sampling capped at {:.1}%, {:.1}% while settled):\n{:<14} {:>14} {:>12} {:>10} {:>9} {:>8} {:>10} {:>8} {:>17} {:>15} {:>22} {:>26}\n",
                100.0 * self.numa.as_ref().map_or(0.0, |n| n.max_sampling_overhead),
                100.0 * self.numa.as_ref().map_or(0.0, |n| n.settled_sampling_overhead),
                "VM", "sampled faults", "sampling ms", "COW breaks", "COW ms", "pauses", "paused ms", "total %", "sampled pages/s",
                "settled epochs", "vCPU CPU ms (system)", "vCPU ms waiting / blocked"
            );
            for vm in &self.vms {
                let c = &vm.costs;
                out += &format!(
                    "{:<14} {:>14} {:>12.1} {:>10} {:>9.1} {:>8} {:>10.1} {:>8.2} {:>17} {:>15} {:>22} {:>26}\n",
                    vm.name,
                    c.sampled_faults,
                    c.sampling_ms,
                    c.cow_breaks,
                    c.cow_break_ms,
                    c.pauses,
                    c.paused_ms,
                    100.0 * c.overhead,
                    if c.sampling_capped_rounds > 0 {
                        format!(
                            "{:.0} of {:.0} (cap)",
                            c.sampled_pages_per_s, c.asked_pages_per_s
                        )
                    } else {
                        format!("{:.0}", c.sampled_pages_per_s)
                    },
                    format!("{} of {}", c.sampling_settled_epochs, c.sampling_epochs),
                    format!(
                        "{:.0} ({:.0})",
                        c.vcpu_user_ms + c.vcpu_system_ms,
                        c.vcpu_system_ms
                    ),
                    format!("{:.0} / {:.0}", c.vcpu_waiting_ms, c.vcpu_blocked_ms)
                );
            }
            for vm in self.vms.iter().filter(|v| v.costs.pause_timeouts > 0) {
                out += &format!(
                    "  {}: {} pauses timed out (a vCPU did not stop in time; the remap was skipped)\n",
                    vm.name, vm.costs.pause_timeouts
                );
            }
        }
        if let Some(sh) = &self.sharing {
            let m = &sh.memory;
            let guest_pages: u64 = self.vms.iter().map(|v| v.memory_mib * 256).sum();
            let mib = |pages: u64| pages as f64 * PAGE_SIZE as f64 / (1024.0 * 1024.0);
            out += &format!(
                "\nsharing: {:.1} MiB saved ({:.1}% of {} MiB guest memory): {:.1} MiB by sharing ({} machine pages back {} guest pages), {:.1} MiB of zero pages released\n",
                mib(m.pages_saved_in_all()),
                100.0 * m.pages_saved_in_all() as f64 / guest_pages.max(1) as f64,
                guest_pages / 256,
                mib(m.saved_pages),
                m.shared_machine_pages,
                m.sharing_frames,
                mib(m.released_zero_frames),
            );
            out += &format!(
                "  scanner: {} pages scanned in {} full passes{}, {} merges in {} batches, {} zero pages released, {} compare failures, {:.0} ms CPU\n",
                sh.scanner.pages_scanned,
                sh.scanner.full_scans,
                match (&sh.settle_note, sh.settled) {
                    (_, true) => String::new(),
                    (Some(note), false) => format!(" ({note})"),
                    (None, false) => " (final passes not completed)".into(),
                },
                sh.scanner.merges,
                sh.scanner.merge_batches,
                sh.scanner.zero_releases,
                sh.scanner.compare_failures,
                sh.scanner.cpu_ms
            );
            if sh.scanner.busy_wait_ms > 0.0 {
                out += &format!(
                    "  scanner held back {:.0} ms while every host CPU was busy (its share then: {} % of the CPUs)\n",
                    sh.scanner.busy_wait_ms,
                    self.policy.policy.sharing.busy_cpu_share * 100.0
                );
            }
            if sh.scanner.max_vm_mappings > 0 {
                out += &format!(
                    "  kernel mappings: at most {} in one VM's guest range when a batch was issued; {} equal frames left unmerged by the mapping budget (policy frames_per_mapping = {})\n",
                    sh.scanner.max_vm_mappings,
                    sh.scanner.budget_deferrals,
                    self.policy.policy.sharing.frames_per_mapping
                );
            }
            let b = &sh.budget;
            if b.frames_per_mapping > 0 {
                out += &format!(
                    "  mapping budget: {} copy-on-write copies next to a neighbour, {} breaks unsharing a unit ({} frames, {} over the cap), {} compactions saving {} mappings, {} migrated frames and {} remaps deferred\n",
                    b.breaks_joined,
                    b.unit_breaks,
                    b.unit_frames,
                    b.overruns,
                    b.compactions,
                    b.compaction_saved,
                    b.deferred_moves,
                    b.deferred_remaps
                );
            }
            out += &format!(
                "  copy-on-write: {} breaks, handler time median {:.1} us, p99 {:.1} us\n",
                m.cow_breaks, m.cow_break_median_us, m.cow_break_p99_us
            );
        }
        if let Some(n) = &self.numa {
            out += &format!(
                "\nnuma: {}\n  {} epochs, {} samples; {} pages migrated ({} failed) and {} more with their regions, {} following their VM to its node, {} replicas made, {} collapsed ({} failed), {} pages frozen; {} replica sets ({} pages) at the end\n",
                n.source,
                n.epochs,
                n.samples,
                n.migrations,
                n.migration_failures,
                n.region_migrations,
                n.follow_migrations,
                n.replicas_made,
                n.replicas_collapsed,
                n.replication_failures,
                n.freezes,
                self.replicas.sets,
                self.replicas.pages
            );
            match (&n.counters, &n.hardware_unused) {
                (Some(c), _) => {
                    let events: Vec<String> = c
                        .events
                        .iter()
                        .map(|e| match (&e.reason, e.present) {
                            (_, true) if e.user_only => format!("{} (user mode only)", e.name),
                            (_, true) => e.name.clone(),
                            (Some(why), false) => format!("{} absent: {why}", e.name),
                            (None, false) => format!("{} absent", e.name),
                        })
                        .collect();
                    out += &format!(
                        "  counters: {} active on {} vCPU threads ({} failed), steering page sampling by {} (floor {} pages per VM per round); read in {:.1} us median, {:.1} us max per epoch; events: {}\n",
                        c.set,
                        c.threads,
                        c.failed_threads.len(),
                        c.steering_event.as_deref().unwrap_or("no event (none present)"),
                        c.floor,
                        c.read_median_us,
                        c.read_max_us,
                        events.join("; ")
                    );
                    if let Some(i) = c
                        .steering_event
                        .as_ref()
                        .and_then(|name| c.events.iter().position(|e| &e.name == name))
                    {
                        for (vm, report) in self.vms.iter().enumerate() {
                            let total = c.totals.get(vm).and_then(|t| t.get(i)).copied();
                            let budget: Vec<u64> = c
                                .per_epoch
                                .iter()
                                .filter_map(|e| e.budget.get(vm).copied())
                                .collect();
                            let mean =
                                budget.iter().sum::<u64>() as f64 / budget.len().max(1) as f64;
                            out += &format!(
                                "    {:<16} {} misses, mean sample budget {:.1} pages per round\n",
                                report.name,
                                total.unwrap_or(0),
                                mean
                            );
                        }
                    }
                }
                (None, Some(_)) => {
                    out += &format!(
                        "  counters: {} active; hardware miss counters not in use (reason above)\n",
                        n.counter_source
                    )
                }
                (None, None) => {}
            }
            if let Some(sm) = &n.sampler {
                out += &format!(
                    "  sampler: {} pages zapped, {} samples ({} writes, {} by a second vCPU), {} unattributed, handler median {:.1} us, p99 {:.1} us\n",
                    sm.zapped, sm.samples, sm.write_samples, sm.concurrent_samples, sm.unattributed, sm.handler_median_us, sm.handler_p99_us
                );
                if sm.disarmed_runs > 0 {
                    out += &format!(
                        "  armed for minor faults and back: {} runs, {} of them with shared pages (mapped again under {} pauses)\n",
                        sm.disarmed_runs, sm.disarmed_shared_runs, sm.disarm_pauses
                    );
                }
                let zap_ms: f64 = n.sampling_cost.iter().map(|c| c.zap_ms).sum();
                let charged_ms: f64 = n.sampling_cost.iter().map(|c| c.zap_charged_ms).sum();
                let zapped: u64 = n.sampling_cost.iter().map(|c| c.zapped).sum();
                if zapped > 0 {
                    out += &format!(
                        "  zapping: {zap_ms:.1} ms of the monitor's CPU ({:.1} us per page); {charged_ms:.1} ms of it, spent while no host CPU was idle, charged to the VMs' sampling\n",
                        zap_ms * 1e3 / zapped as f64
                    );
                }
            }
            let with_samples: Vec<_> = n.series.iter().filter(|e| e.locality_samples > 0).collect();
            if let (Some(f), Some(l)) = (with_samples.first(), with_samples.last()) {
                out += &format!(
                    "  local accesses {:.0}% -> {:.0}%, modelled cost {:.2} -> {:.2} (first -> last epoch with samples)\n",
                    100.0 * f.local_fraction,
                    100.0 * l.local_fraction,
                    f.modelled_cost,
                    l.modelled_cost
                );
                // Per VM over time: the run cut into (up to) 8 slices.
                let slices = with_samples.len().min(8);
                out += "  local % per VM over time (run cut into slices):\n";
                for (vm, report) in self.vms.iter().enumerate() {
                    let mut cells = Vec::new();
                    for k in 0..slices {
                        let part = &with_samples[k * with_samples.len() / slices
                            ..(k + 1) * with_samples.len() / slices];
                        let (t, l) = part.iter().fold((0, 0), |(t, l), e| {
                            let v = e.per_vm.get(vm).copied().unwrap_or((0, 0));
                            (t + v.0, l + v.1)
                        });
                        cells.push(match (100 * l).checked_div(t) {
                            Some(pct) => format!("{pct:>3}"),
                            None => "  -".to_string(),
                        });
                    }
                    out += &format!("    {:<16} {}\n", report.name, cells.join(" "));
                }
            }
        }
        out += &format!(
            "\n{:<6} {:>9} {:>12} {:>12} {:>12} {:>14}\n",
            "pool", "host node", "capacity MiB", "used pages", "used MiB", "resident MiB"
        );
        let mib = |pages: u64| pages as f64 * PAGE_SIZE as f64 / (1024.0 * 1024.0);
        for p in &self.pools {
            out += &format!(
                "node {:<1} {:>9} {:>12.0} {:>12} {:>12.1} {:>14.1}\n",
                p.node,
                p.host_node,
                mib(p.capacity_pages as u64),
                p.used_pages,
                mib(p.used_pages as u64),
                p.resident_bytes as f64 / (1024.0 * 1024.0)
            );
        }
        let k = &self.kernel_mappings;
        out += &format!(
            "kernel mappings (VMAs) of the monitor: peak {}, at the end {} ({:.2} per 16 guest frames); monitor's own memory (RssAnon) peak {:.1} MiB\n",
            k.peak,
            k.end,
            k.end as f64 * 16.0 / k.guest_frames.max(1) as f64,
            k.monitor_anon_peak_bytes as f64 / (1024.0 * 1024.0)
        );
        let ok = self.vms.iter().filter(|v| v.ok()).count();
        out += &format!(
            "\n{} of {} VMs ok; memory invariants checked {} times: {}; VMs created in {:.1} ms; total {:.1} ms\n",
            ok,
            self.vms.len(),
            self.verify_runs,
            if self.verify_ok { "all held" } else { "VIOLATED" },
            self.create_ms,
            self.total_ms
        );
        for e in &self.verify_errors {
            out += &format!("  invariant violation: {e}\n");
        }
        out
    }
}
