//! The monitor's service threads and the policy they carry out: the
//! copy-on-write fault handler, the NUMA runner (with its sample source)
//! and the sharing scanner.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::Policy;
use crate::faults::FaultHandler;
use crate::memory::Memory;
use crate::numa::runner::{Feed, NumaRunner, NumaStats};
use crate::numa::{
    choose_source, probe_hardware_pmu, EventSet, MissCounters, SourceKind, TraceSource,
};
use crate::sharing::{Scanner, ScannerStats};
use crate::topology::Topology;

/// Whether and how the NUMA engine runs; with hardware counters, the
/// per-vCPU miss counters that steer the page sampler.
pub(crate) enum NumaPlan {
    Off,
    Run(Feed, String, Option<Arc<MissCounters>>),
    Unavailable(String),
    /// Asked for, but with nothing to do here (why).
    Idle(String),
}

/// Chooses the NUMA engine's sample source. Page-fault sampling must be
/// enabled on `memory` before any guest space exists, so a monitor makes
/// its plan before it builds a VM. `config_file`: where an inline policy
/// was written, for errors.
pub(crate) fn numa_plan(
    policy: &Policy,
    config_file: &str,
    topology: &Topology,
    memory: &Memory,
) -> Result<NumaPlan> {
    let numa = &policy.numa;
    // With nothing to move, the engine runs only when a sample source is
    // asked for explicitly: it then measures locality and moves nothing.
    if !numa.migrate && !numa.replicate && numa.sampling == crate::numa::Sampling::Auto {
        return Ok(NumaPlan::Off);
    }
    // On one node every page is local: nothing can migrate or replicate,
    // and page-fault samples would cost the guests up to
    // `max_sampling_overhead` for nothing. So "auto" samples nothing there,
    // as Linux keeps its automatic NUMA balancing off on a one-node
    // machine; an explicit source still runs (to measure, or to test).
    if topology.node_count() == 1 && numa.sampling == crate::numa::Sampling::Auto {
        return Ok(NumaPlan::Idle(
            "the topology has one node: every page is local, nothing to migrate or replicate"
                .into(),
        ));
    }
    let choice = choose_source(
        numa.sampling,
        numa.trace_file.as_deref(),
        probe_hardware_pmu(),
    )
    .map_err(|e| {
        // Named like a config error: the policy file, the key, the reason
        // (an inline policy is in the config file itself).
        let file = match policy.source.as_str() {
            "inline" => config_file.to_string(),
            other => other.to_string(),
        };
        crate::config::ConfigError {
            file,
            key: "numa.sampling".into(),
            message: format!("policy {}: {e}", policy.name),
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

/// What the monitor does with the policy's sections in this build.
pub(crate) fn policy_status(p: &Policy, numa: &NumaPlan) -> String {
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
        NumaPlan::Idle(why) => parts.push(format!("NUMA engine off ({why})")),
    }
    if parts.is_empty() {
        "static placement; nothing requested beyond it".to_string()
    } else {
        parts.join("; ")
    }
}

/// The default longest wait for the scanner's final passes after the guests
/// are done: 30 s, plus 10 s per GiB of guest memory, at most 5 minutes.
/// With the guests stopped the scanner runs unthrottled (hashing is about
/// 1 us a page on the build hosts, a merge about 20 us: docs/host-facts.md,
/// "Sharing scanner"), so two passes over N GiB that is
/// mostly duplicate need about 2 x 262,144 N x 20 us = 10 N s; the cap keeps
/// a huge run from hanging on its report, which then says how far it got.
pub fn settle_limit(guest_bytes: u64) -> Duration {
    let gib = guest_bytes as f64 / (1u64 << 30) as f64;
    Duration::from_secs_f64((30.0 + 10.0 * gib).min(300.0))
}

/// The service threads of one policy. The fault handler starts first
/// (before any page is shared or sampled) and stops last.
pub(crate) struct Services {
    pub policy: Policy,
    /// What the policy does in this build (the report's `policy.status`).
    pub status: String,
    /// The NUMA plan until [`Services::start_threads`] takes its feed.
    plan: Option<NumaPlan>,
    pub miss_counters: Option<Arc<MissCounters>>,
    pub numa: Option<NumaRunner>,
    pub scanner: Option<Scanner>,
    fault_handler: Option<FaultHandler>,
}

impl Services {
    /// Plans `policy` on `memory` (see [`numa_plan`]); no thread runs yet.
    pub fn plan(
        policy: Policy,
        config_file: &str,
        topology: &Topology,
        memory: &Memory,
    ) -> Result<Services> {
        let plan = numa_plan(&policy, config_file, topology, memory)?;
        let miss_counters = match &plan {
            NumaPlan::Run(_, _, steer) => steer.clone(),
            _ => None,
        };
        Ok(Services {
            status: policy_status(&policy, &plan),
            policy,
            plan: Some(plan),
            miss_counters,
            numa: None,
            scanner: None,
            fault_handler: None,
        })
    }

    /// Starts the fault handler if the policy needs one: copy-on-write
    /// sharing needs it before any page is shared, and the NUMA engine
    /// too (migration takes a run from the guest, sampled pages fault).
    pub fn start_fault_handler(&mut self, memory: &Arc<Memory>) -> Result<()> {
        let numa_active = matches!(self.plan, Some(NumaPlan::Run(..))) || self.numa.is_some();
        if self.fault_handler.is_none() && (self.policy.sharing.enabled || numa_active) {
            self.fault_handler = Some(FaultHandler::start(memory.clone()).with_context(|| {
                format!(
                    "policy {} turns sharing or NUMA placement on, which needs userfaultfd \
                     (run as root, or turn both off)",
                    self.policy.name
                )
            })?);
        }
        Ok(())
    }

    /// Starts the fault handler whatever the policy: VMs built from a
    /// snapshot map shared, write-protected pages from the start, and
    /// their writes wait for copy-on-write even under a policy that shares
    /// nothing itself. Kept across policy swaps, as every fault handler is.
    pub fn require_fault_handler(&mut self, memory: &Arc<Memory>) -> Result<()> {
        if self.fault_handler.is_none() {
            self.fault_handler = Some(FaultHandler::start(memory.clone()).context(
                "VMs restored from a snapshot share pages copy-on-write, which needs \
                 userfaultfd (run as root)",
            )?);
        }
        Ok(())
    }

    /// Starts the NUMA runner (sized for `vms` VMs; it grows with more)
    /// and the sharing scanner.
    pub fn start_threads(
        &mut self,
        memory: &Arc<Memory>,
        topology: &Topology,
        vms: usize,
    ) -> Result<()> {
        self.start_fault_handler(memory)?;
        if let Some(NumaPlan::Run(feed, why, steer)) = self.plan.take() {
            self.numa = Some(NumaRunner::start(
                memory.clone(),
                topology,
                self.policy.numa.clone(),
                feed,
                &why,
                vms,
                steer,
            )?);
        }
        self.scanner = Scanner::for_policy(memory.clone(), &self.policy.sharing)?;
        Ok(())
    }

    /// Carries out `policy` from now on: plans it (an error leaves the
    /// current policy running), stops the NUMA runner and the scanner of
    /// the old one, starts those of the new. The fault handler stays: pages
    /// shared or protected under the old policy still need it.
    pub fn swap(
        &mut self,
        policy: Policy,
        config_file: &str,
        topology: &Topology,
        memory: &Arc<Memory>,
        vms: usize,
    ) -> Result<()> {
        let mut next = Services::plan(policy, config_file, topology, memory)?;
        if let Some(n) = self.numa.take() {
            n.stop();
        }
        if let Some(s) = self.scanner.take() {
            s.stop();
        }
        next.fault_handler = self.fault_handler.take();
        *self = next;
        self.start_threads(memory, topology, vms)
    }

    /// The NUMA runner's figures so far.
    pub fn numa_stats(&self) -> Option<NumaStats> {
        self.numa.as_ref().map(NumaRunner::stats)
    }

    /// The scanner's figures so far.
    pub fn scanner_stats(&self) -> Option<ScannerStats> {
        self.scanner.as_ref().map(Scanner::stats)
    }
}
