//! The guests a monitor runs: building one (guest space in the pools, then
//! its KVM VM), and the per-VM steps the monitor takes while it runs (vCPU
//! moves, telling the sampler and the miss counters about vCPU threads).

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::{VcpuMove, VmConfig};
use crate::guest::layout;
use crate::memory::{Memory, VmId};
use crate::numa::MissCounters;
use crate::topology::Topology;
use crate::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement, VmOutcome};
use crate::PAGE_SIZE;

/// A micro-guest VM or a Linux VM (`crate::linux`, a `[[vm]]` with `kernel`).
pub(crate) enum Guest {
    Micro(Box<MicroVm>),
    Linux(Box<crate::linux::LinuxVm>),
}

impl Guest {
    /// Builds the VM `vc` describes; on failure nothing is left behind.
    pub(crate) fn build(
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
    pub(crate) fn start(&mut self) -> Result<()> {
        match self {
            Guest::Micro(vm) => vm.start(),
            Guest::Linux(vm) => vm.start(),
        }
    }
    /// (done, total); a Linux VM counts as one unit, done when it ended.
    pub(crate) fn progress(&self) -> (u64, u64) {
        match self {
            Guest::Micro(vm) => vm.progress(),
            Guest::Linux(vm) => (vm.is_finished() as u64, 1),
        }
    }
    pub(crate) fn is_finished(&self) -> bool {
        match self {
            Guest::Micro(vm) => vm.is_finished(),
            Guest::Linux(vm) => vm.is_finished(),
        }
    }
    pub(crate) fn stop_because(&self, reason: &str) {
        match self {
            Guest::Micro(vm) => vm.stop_because(reason),
            Guest::Linux(vm) => vm.stop_because(reason),
        }
    }
    pub(crate) fn pauser(&self) -> Arc<dyn crate::memory::GuestPause> {
        match self {
            Guest::Micro(vm) => vm.pauser(),
            Guest::Linux(vm) => vm.pauser(),
        }
    }
    /// The node of each vCPU now (a Linux VM's never move: its config's).
    pub(crate) fn vcpu_nodes(&self, vc: &VmConfig) -> Vec<usize> {
        match self {
            Guest::Micro(vm) => vm.placements().iter().map(|p| p.node).collect(),
            Guest::Linux(_) => vc.vcpu_nodes.clone(),
        }
    }
    pub(crate) fn wait(self) -> VmOutcome {
        match self {
            Guest::Micro(vm) => vm.wait(),
            Guest::Linux(vm) => vm.wait(),
        }
    }
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

/// Builds one micro-VM: its guest space in the memory node's pool, then
/// its KVM VM on that space. On failure nothing is left behind.
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

/// The node most of `nodes` are on (the lowest on a tie): the node whose
/// replicas a VM with vCPUs on several nodes maps.
pub(crate) fn main_node(nodes: &[usize]) -> usize {
    let mut best = (0, usize::MAX);
    for &n in nodes {
        let count = nodes.iter().filter(|&&m| m == n).count();
        if count > best.0 || (count == best.0 && n < best.1) {
            best = (count, n);
        }
    }
    best.1
}

/// Carries out one vCPU move; returns what happened, for the report. The
/// VM's pages are not moved here: under a migrating policy the NUMA engine
/// sees the accesses come from the new node and moves the hot ones.
pub(crate) fn apply_move(
    vm: &mut MicroVm,
    space: VmId,
    m: &VcpuMove,
    topology: &Topology,
    memory: &Memory,
    sampler: Option<&crate::memory::sampler::PageSampler>,
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
pub(crate) fn count_vcpu_threads(vm: &MicroVm, space: VmId, counters: &MissCounters) {
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

/// Tells the sampler which thread runs which vCPU on which node (threads
/// appear once their vCPU starts running).
pub(crate) fn register_vcpu_threads(
    vm: &MicroVm,
    space: VmId,
    sampler: &crate::memory::sampler::PageSampler,
) {
    for (i, tid) in vm.vcpu_tids().into_iter().enumerate() {
        if let Some(tid) = tid {
            if !sampler.knows_thread(tid) {
                sampler.register_thread(tid, space, i, vm.placements()[i].node);
            }
        }
    }
}
