//! The monitor's snapshot operations on micro-VMs: write a running VM to a
//! file ([`Monitor::snapshot_vm`]), build a VM that goes on from a file
//! ([`Monitor::restore_vm`]), and build N clones of one file whose pages
//! are loaded once per node and shared copy-on-write
//! ([`Monitor::clone_vms`]). The file format is `crate::snapshot::format`.
//! Micro-VMs and Linux guests both: a Linux guest's state adds the
//! irqchip, PIT, clock and devices (`crate::linux::state`); one with a
//! writable disk is refused (a snapshot holds memory, not disks).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use super::guest::{main_node, micro_vm_spec, Guest};
use super::{AddError, Monitor, MonitorVm, VmError};
use crate::config::VmConfig;
use crate::guest::layout;
use crate::linux::{LinuxVm, LinuxVmState, SerialOutput};
use crate::memory::{Gfn, ImageSource, SpaceRequest, VmId};
use crate::snapshot::{self, GuestState, Meta, VmMeta, WriteStats};
use crate::vm::{GuestRam, MicroVm, MicroVmState};
use crate::PAGE_SIZE;

/// What a VM does once its snapshot is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    /// Runs on from where it was paused.
    #[default]
    Resume,
    /// Is stopped (its report says so); its memory stays until removed.
    Stop,
}

/// What a snapshot took.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    pub vm: String,
    #[serde(flatten)]
    pub file: WriteStats,
    /// How long the VM's vCPUs were held (pause, capture, memory written).
    pub paused_ms: f64,
    /// The VM's progress (done, total) when it was captured.
    pub progress: (u64, u64),
    pub then: AfterSnapshot,
}

/// Where a restored VM runs; by default where the snapshot's VM ran.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The new VM's name (must be new to the monitor).
    pub name: String,
    /// The node whose pool takes its memory.
    pub memory_node: Option<usize>,
    /// The node of each vCPU (as many as the snapshot's VM had).
    pub vcpu_nodes: Option<Vec<usize>>,
}

/// What a clone (or a restore, a clone of one) built.
#[derive(Clone, Debug, Serialize)]
pub struct CloneReport {
    pub path: String,
    pub names: Vec<String>,
    /// Image pages loaded into each node's pool: one copy per node with
    /// clones, whatever their number.
    pub pages_per_node: Vec<u64>,
    /// Guest frames mapped onto those pages, over all clones.
    pub frames_mapped: u64,
    /// From opening the file until every clone was started.
    pub elapsed_ms: f64,
}

impl Monitor {
    /// Writes a snapshot of VM `name` to `path`, then resumes or stops it.
    /// The VM is paused for the whole capture: its vCPUs' KVM state (taken
    /// by each vCPU's thread while parked), a Linux guest's irqchip, PIT,
    /// clock and devices, and every machine page it maps, each once. The
    /// file appears under `path` only when complete. An operator's pause in
    /// force stays in force.
    pub fn snapshot_vm(
        &mut self,
        name: &str,
        path: &Path,
        then: AfterSnapshot,
    ) -> Result<SnapshotReport, VmError> {
        let i = self.live(name)?;
        let v = &self.vms[i];
        let (Some(guest), Some(space)) = (v.guest.as_ref(), v.space) else {
            return Err(VmError::Failed(format!(
                "VM `{name}` has no guest to snapshot (it was never built)"
            )));
        };
        let held = Instant::now();
        let pauser = guest.pauser();
        let operator_paused = v.paused;
        if !operator_paused && !pauser.pause() {
            return Err(VmError::Failed(format!(
                "VM `{name}`: its vCPUs did not stop within the pause limit; it keeps running"
            )));
        }
        let written = (|| -> Result<SnapshotReport> {
            let state = match guest {
                Guest::Micro(vm) => GuestState::Micro(vm.capture_state()?),
                Guest::Linux(vm) => GuestState::Linux(Box::new(vm.capture_state()?)),
            };
            let progress = guest.progress();
            let meta = Meta {
                written_by: format!("disco {}", env!("CARGO_PKG_VERSION")),
                vm: vm_meta(&v.config),
                state,
                frames: (v.config.memory_mib << 20) / PAGE_SIZE as u64,
            };
            let file = snapshot::write(&self.memory, space, &meta, path)?;
            Ok(SnapshotReport {
                vm: name.to_string(),
                file,
                paused_ms: 0.0,
                progress,
                then,
            })
        })();
        let result = match written {
            Ok(mut report) => {
                if then == AfterSnapshot::Stop {
                    let g = self.vms[i].guest.as_ref().expect("live");
                    g.stop_because("stopped after a snapshot");
                    self.vms[i].stopped = Some("stopped after a snapshot".into());
                }
                report.paused_ms = held.elapsed().as_secs_f64() * 1e3;
                self.events.push(
                    "vm-snapshot",
                    Some(name),
                    format!(
                        "{}: {} pages, {} bytes",
                        report.file.path, report.file.pages, report.file.bytes
                    ),
                );
                Ok(report)
            }
            Err(e) => Err(VmError::Failed(format!("VM `{name}`: snapshot: {e:#}"))),
        };
        if !operator_paused {
            pauser.resume();
        }
        result
    }

    /// Builds a VM from snapshot `path` that goes on where the snapshot's
    /// VM was, under `options.name`, and starts it. The file is checked as
    /// it is read; a bad file (foreign, wrong version, truncated,
    /// corrupted) is refused with what is wrong, and nothing of the VM is
    /// left (no space, no page taken from the pools).
    pub fn restore_vm(
        &mut self,
        path: &Path,
        options: &RestoreOptions,
    ) -> Result<CloneReport, AddError> {
        let started = Instant::now();
        let (meta, pages) = snapshot::open(path).map_err(AddError::Snapshot)?;
        let mut vc = vm_config(&meta.vm, &options.name);
        if let Some(node) = options.memory_node {
            vc.memory_node = node;
        }
        if let Some(nodes) = &options.vcpu_nodes {
            if nodes.len() != meta.vm.vcpu_nodes.len() {
                return Err(AddError::Invalid(crate::config::ConfigError {
                    file: String::new(),
                    key: "vcpu_nodes".into(),
                    message: format!(
                        "{} nodes given; allowed: one per vCPU of the snapshot's VM ({})",
                        nodes.len(),
                        meta.vm.vcpu_nodes.len()
                    ),
                }));
            }
            vc.vcpu_nodes = nodes.clone();
        }
        self.build_from_image(path, &meta, pages, vec![vc], false, started)
    }

    /// Builds `names.len()` VMs from snapshot `path`, clone `k` with its
    /// memory and vCPUs on `nodes[k % nodes.len()]`, and starts them. Each
    /// page of the snapshot is loaded once into the pool of each node that
    /// has clones and mapped write-protected into every clone there, so
    /// they share all memory from the first instant and copy-on-write
    /// gives each its own copy of what it writes (no scanning). All or
    /// nothing: an error leaves no clone and no page taken.
    pub fn clone_vms(
        &mut self,
        path: &Path,
        names: &[String],
        nodes: &[usize],
    ) -> Result<CloneReport, AddError> {
        let started = Instant::now();
        if names.is_empty() {
            return Err(AddError::Invalid(crate::config::ConfigError {
                file: String::new(),
                key: "names".into(),
                message: "no clone asked for; allowed: at least one".into(),
            }));
        }
        let (meta, pages) = snapshot::open(path).map_err(AddError::Snapshot)?;
        let vcs = names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let mut vc = vm_config(&meta.vm, name);
                if let Some(&node) = (!nodes.is_empty()).then(|| &nodes[k % nodes.len()]) {
                    vc.memory_node = node;
                    vc.vcpu_nodes = vec![node; vc.vcpu_nodes.len()];
                }
                vc
            })
            .collect();
        self.build_from_image(path, &meta, pages, vcs, true, started)
    }

    /// Admits `vcs`, builds their guest spaces from the image `pages`, then
    /// a KVM VM each on the snapshot's state, and starts them; undone as a
    /// whole on any error.
    fn build_from_image(
        &mut self,
        path: &Path,
        meta: &Meta,
        pages: impl ImageSource,
        vcs: Vec<VmConfig>,
        clones: bool,
        started: Instant,
    ) -> Result<CloneReport, AddError> {
        let shown = path.display().to_string();
        let frames = (meta.vm.memory_mib << 20) / PAGE_SIZE as u64;
        if frames != meta.frames {
            return Err(AddError::Snapshot(anyhow!(
                "snapshot {shown}: corrupted: {} MiB of memory but {} frames",
                meta.vm.memory_mib,
                meta.frames
            )));
        }
        if meta.state.vcpus() != meta.vm.vcpu_nodes.len() {
            return Err(AddError::Snapshot(anyhow!(
                "snapshot {shown}: corrupted: {} vCPU states for {} vCPUs",
                meta.state.vcpus(),
                meta.vm.vcpu_nodes.len()
            )));
        }
        if meta.vm.linux.is_some() != matches!(meta.state, GuestState::Linux(_)) {
            return Err(AddError::Snapshot(anyhow!(
                "snapshot {shown}: corrupted: the VM's spec and its state disagree on whether \
                 it is a Linux guest"
            )));
        }
        if let (GuestState::Linux(state), Some(linux)) = (&meta.state, &meta.vm.linux) {
            // The disks a Linux guest's memory refers to must be as they
            // were: the snapshot's fault (or its environment's), not the
            // host's.
            state
                .check_fits(meta.vm.vcpu_nodes.len(), linux)
                .map_err(|e| AddError::Snapshot(e.context(format!("snapshot {shown}"))))?;
        }
        self.admit(&vcs, clones)?;
        self.services
            .require_fault_handler(&self.memory)
            .map_err(AddError::Host)?;
        let requests: Vec<SpaceRequest> = vcs
            .iter()
            .map(|vc| SpaceRequest {
                name: vc.name.clone(),
                domain: vc.sharing_domain.clone(),
                node: vc.memory_node,
            })
            .collect();
        // A page the file could not give is the file's fault; anything
        // else (a full pool) the host's.
        let file_failed = std::cell::Cell::new(false);
        let mut pages = Watched {
            source: pages,
            failed: &file_failed,
        };
        let load = self
            .memory
            .create_spaces_from_image(frames, &requests, &mut pages)
            .map_err(|e| {
                if file_failed.get() {
                    AddError::Snapshot(e)
                } else {
                    AddError::Host(e.context(format!("restoring from {shown}")))
                }
            })?;
        tracing::debug!(
            "{shown}: {} guest spaces loaded in {:.1} ms",
            vcs.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let mut built: Vec<(VmId, Guest)> = Vec::with_capacity(vcs.len());
        let mut failure = None;
        for (vc, &(space, base)) in vcs.iter().zip(&load.spaces) {
            let guest = match &meta.state {
                GuestState::Micro(state) => self
                    .restore_one(vc, space, base, state)
                    .map(|vm| Guest::Micro(Box::new(vm))),
                GuestState::Linux(state) => self
                    .restore_linux(vc, space, base, state, !clones)
                    .map(|vm| Guest::Linux(Box::new(vm))),
            };
            match guest {
                Ok(guest) => built.push((space, guest)),
                Err(e) => {
                    failure = Some(e.context(format!("restoring {} from {shown}", vc.name)));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            drop(built);
            for &(space, _) in &load.spaces {
                let _ = self.memory.destroy_space(space);
            }
            return Err(AddError::Host(e));
        }
        tracing::debug!(
            "{shown}: {} KVM VMs made at {:.1} ms",
            vcs.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let first = self.vms.len();
        for (vc, (space, guest)) in vcs.iter().zip(built) {
            let mut v = MonitorVm::new(vc.clone());
            if let Guest::Micro(vm) = &guest {
                v.ram_base = Some(vm.ram().host_addr);
            }
            v.space = Some(space);
            v.guest = Some(guest);
            self.vms.push(v);
            self.events.push(
                if clones { "vm-cloned" } else { "vm-restored" },
                Some(&vc.name),
                format!("from {shown}"),
            );
        }
        // Each VM starts held (its vCPU threads park before their first
        // entry) and all are let go together: otherwise on a small host the
        // clones started first take the CPUs from the thread starting the
        // rest (100 running clones on 2 cores made each later start take
        // 40 ms).
        let held: Vec<_> = (first..self.vms.len())
            .filter_map(|i| self.vms[i].guest.as_ref().map(Guest::pauser))
            .collect();
        for pauser in &held {
            pauser.pause();
        }
        for i in first..self.vms.len() {
            // A start that fails marks its VM failed (its report says why).
            let _ = self.start_vm(i);
        }
        for pauser in &held {
            pauser.resume();
        }
        tracing::debug!(
            "{shown}: {} VMs started at {:.1} ms",
            vcs.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(CloneReport {
            path: shown,
            names: vcs.iter().map(|v| v.name.clone()).collect(),
            pages_per_node: load.pages_per_node,
            frames_mapped: load.frames_mapped,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// One micro-VM on a space built from an image, with the snapshot's
    /// state; registered with the memory as `build_vm` does.
    pub(super) fn restore_one(
        &self,
        vc: &VmConfig,
        space: VmId,
        base: usize,
        state: &MicroVmState,
    ) -> Result<MicroVm> {
        self.memory
            .exclude_from_sharing(space, layout::system_frames())?;
        let ram = GuestRam {
            host_addr: base,
            size: (vc.memory_mib << 20) as usize,
        };
        let vm = MicroVm::restore(&self.kvm, micro_vm_spec(vc, &self.topology), ram, state)?;
        self.memory.set_pauser(space, vm.pauser())?;
        self.memory.set_cpu_node(space, main_node(&vc.vcpu_nodes))?;
        Ok(vm)
    }

    /// One Linux VM on a space built from an image, with the snapshot's
    /// state. With `place`, each guest NUMA node's slice of RAM (beyond the
    /// first) moves to its node's pool first, as `crate::linux::build`
    /// places it, so the SRAT the guest read stays true; clones share
    /// their pages and leave them where they were loaded.
    fn restore_linux(
        &self,
        vc: &VmConfig,
        space: VmId,
        base: usize,
        state: &LinuxVmState,
        place: bool,
    ) -> Result<LinuxVm> {
        let spec = crate::linux::spec_for(vc, &self.topology)?;
        if place {
            for i in 1..spec.numa.nodes.len() {
                let node = spec.numa.nodes[i].topology_node;
                let gfns: Vec<Gfn> = spec.numa.frames(i).collect();
                self.memory.move_pages(space, &gfns, node)?;
            }
        }
        let ram = GuestRam {
            host_addr: base,
            size: (vc.memory_mib << 20) as usize,
        };
        let vm = LinuxVm::restore(&self.kvm, spec, ram, state)?;
        self.memory.set_pauser(space, vm.pauser())?;
        Ok(vm)
    }
}

/// An image source that remembers whether it failed: a restore's error is
/// then the file's, not the host's.
struct Watched<'a, S> {
    source: S,
    failed: &'a std::cell::Cell<bool>,
}

impl<S: ImageSource> ImageSource for Watched<'_, S> {
    fn next_block(&mut self) -> Result<Option<usize>> {
        let r = self.source.next_block();
        self.failed.set(self.failed.get() || r.is_err());
        r
    }
    fn read_block(&mut self, dest: &[crate::memory::PoolRun]) -> Result<Vec<Vec<Gfn>>> {
        let r = self.source.read_block(dest);
        self.failed.set(self.failed.get() || r.is_err());
        r
    }
}

/// The part of a VM's config a snapshot keeps.
pub(super) fn vm_meta(vc: &VmConfig) -> VmMeta {
    VmMeta {
        name: vc.name.clone(),
        vcpu_nodes: vc.vcpu_nodes.clone(),
        memory_mib: vc.memory_mib,
        memory_node: vc.memory_node,
        workload: vc.workload.clone(),
        time_limit_ms: vc.time_limit.as_millis() as u64,
        sharing_domain: vc.sharing_domain.clone(),
        linux: vc.linux.clone(),
    }
}

/// The config of a VM restored from `meta` under `name`. A Linux guest
/// whose console went to a file writes to `NAME.FILE` beside it (the
/// snapshot's VM may still be writing its own).
pub(super) fn vm_config(meta: &VmMeta, name: &str) -> VmConfig {
    let linux = meta.linux.clone().map(|mut l| {
        if let SerialOutput::File(p) = &l.serial {
            let file = p
                .file_name()
                .map_or_else(|| "serial.log".into(), |f| f.to_string_lossy().into_owned());
            l.serial = SerialOutput::File(p.with_file_name(format!("{name}.{file}")));
        }
        l
    });
    VmConfig {
        name: name.to_string(),
        vcpu_nodes: meta.vcpu_nodes.clone(),
        memory_mib: meta.memory_mib,
        memory_node: meta.memory_node,
        workload: meta.workload.clone(),
        workload_is_default: false,
        time_limit: Duration::from_millis(meta.time_limit_ms),
        sharing_domain: meta.sharing_domain.clone(),
        moves: Vec::new(),
        linux,
    }
}
