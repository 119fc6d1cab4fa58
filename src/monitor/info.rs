//! What a monitor tells about itself while it runs: each VM's state and
//! memory, a VM's pmap as runs, the memmap per node, and statistics. All of
//! it serialises to the JSON the API serves.

use serde::Serialize;

use super::{Monitor, VmError, VmState};
use crate::memory::{FrameView, NodeSharing, PoolStats, ReplicaStats, SharingStats, VmId};
use crate::numa::runner::NumaStats;
use crate::report::VmReport;
use crate::sharing::ScannerStats;
use crate::PAGE_SIZE;

/// One VM as it stands.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    /// The node each vCPU runs on now.
    pub vcpu_nodes: Vec<usize>,
    pub memory_mib: u64,
    /// Guest pages backed by each node's pool.
    pub pages_per_node: Vec<u64>,
    /// Guest pages backed by a machine page shared with other frames.
    pub shared_pages: u64,
    pub shared_mib: f64,
    /// Work units done and in all (a Linux VM counts as one).
    pub progress: [u64; 2],
    /// Copy-on-write breaks of the VM's writes so far.
    pub cow_breaks: u64,
    /// Guest frames the NUMA engine moved to another node so far.
    pub frames_migrated: u64,
    /// Of the NUMA runner's locality samples of this VM's accesses, the %
    /// that hit a page on the accessing vCPU's node: over the whole run,
    /// and over the last [`RECENT_EPOCHS`] epochs (`None` without samples).
    pub local_percent: Option<f64>,
    pub recent_local_percent: Option<f64>,
    /// Its report: `status` (`running`, `paused`, `ok`, `failed`, `stopped`,
    /// `wrong-checksum`, ...), the vCPUs' results and checksums once done.
    pub result: VmReport,
}

/// A run of consecutive guest frames mapped to consecutive machine pages
/// of one node with the same flags.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PmapRun {
    pub gfn: u64,
    pub frames: u64,
    pub node: usize,
    /// The machine page of the first frame (its index in the node's pool).
    pub page: u32,
    pub shared: bool,
    pub replica: bool,
    pub protected: bool,
    /// Zero pages punched out of their pool (they cost the host nothing
    /// until the guest touches them again).
    pub released: bool,
}

impl PmapRun {
    fn of(f: &FrameView) -> PmapRun {
        PmapRun {
            gfn: f.gfn,
            frames: 1,
            node: f.page.node(),
            page: f.page.index,
            shared: f.flags.shared,
            replica: f.replica,
            protected: f.flags.write_protected,
            released: f.flags.released,
        }
    }

    /// Whether `f` continues this run: the next frame, on the next page of
    /// the same node, with the same flags.
    fn extends(&self, f: &FrameView) -> bool {
        let next = PmapRun::of(f);
        self.gfn + self.frames == f.gfn
            && self.node == next.node
            && self.page as u64 + self.frames == next.page as u64
            && (self.shared, self.replica, self.protected, self.released)
                == (next.shared, next.replica, next.protected, next.released)
    }
}

/// Guest frames read per hold of the memory lock when a pmap is read in
/// pieces (16 MiB of guest memory: well under a millisecond).
pub const PMAP_CHUNK: u64 = 4096;

/// Builds pmap runs from frames given in order, chunk after chunk: the
/// runs complete so far can be taken (and sent) while the last one may
/// still grow.
#[derive(Default)]
pub struct PmapRuns {
    done: Vec<PmapRun>,
    open: Option<PmapRun>,
}

impl PmapRuns {
    pub fn push(&mut self, f: &FrameView) {
        match &mut self.open {
            Some(r) if r.extends(f) => r.frames += 1,
            open => {
                if let Some(r) = open.replace(PmapRun::of(f)) {
                    self.done.push(r);
                }
            }
        }
    }

    /// The runs that can no longer grow.
    pub fn take_done(&mut self) -> Vec<PmapRun> {
        std::mem::take(&mut self.done)
    }

    /// Every run left, the open one last.
    pub fn finish(mut self) -> Vec<PmapRun> {
        self.done.extend(self.open.take());
        self.done
    }
}

/// Machine pages read per hold of the memory lock when the memmap is read
/// in pieces.
pub const MEMMAP_CHUNK: u32 = 4096;

/// Epochs the recent local-access % is taken over.
pub const RECENT_EPOCHS: usize = 4;

/// Per VM (space id order), the local % over the last [`RECENT_EPOCHS`]
/// epochs of `numa`.
fn recent_locality(numa: &NumaStats) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let from = numa.series.len().saturating_sub(RECENT_EPOCHS);
    for point in &numa.series[from..] {
        if out.len() < point.per_vm.len() {
            out.resize(point.per_vm.len(), (0, 0));
        }
        for (total, p) in out.iter_mut().zip(&point.per_vm) {
            total.0 += p.0;
            total.1 += p.1;
        }
    }
    out
}

fn percent((samples, local): (u64, u64)) -> Option<f64> {
    (samples > 0).then(|| 100.0 * local as f64 / samples as f64)
}

/// One node's machine memory.
#[derive(Clone, Debug, Serialize)]
pub struct MemmapNode {
    pub node: usize,
    pub pool: PoolStats,
    /// Guest frames of every VM backed by this node's pool.
    pub guest_frames: u64,
    /// Of them, frames on pages shared with other frames.
    pub shared_frames: u64,
    /// The node's machine pages by sharing state (from its memmap).
    pub sharing: NodeSharing,
    /// Guest frames per VM on this node.
    pub per_vm: Vec<(String, u64)>,
}

/// The memory checks run so far.
#[derive(Clone, Debug, Serialize)]
pub struct VerifySummary {
    pub runs: u32,
    pub while_running: u32,
    pub ok: bool,
    pub errors: Vec<String>,
}

/// Statistics of the whole monitor.
#[derive(Clone, Debug, Serialize)]
pub struct MonitorStats {
    pub uptime_ms: u64,
    pub vms: usize,
    pub policy: String,
    pub policy_status: String,
    pub verify: VerifySummary,
    pub pools: Vec<PoolStats>,
    pub sharing: SharingStats,
    pub scanner: Option<ScannerStats>,
    pub replicas: ReplicaStats,
    /// The NUMA runner's figures (its per-epoch series left out).
    pub numa: Option<NumaStats>,
    /// Memory mappings of the process (`/proc/self/maps` lines).
    pub kernel_mappings: usize,
}

impl Monitor {
    /// The names of the VMs, in the order they were added.
    pub fn vm_names(&self) -> Vec<String> {
        self.vms.iter().map(|v| v.config.name.clone()).collect()
    }

    /// Every VM as it stands.
    pub fn vm_infos(&self) -> Vec<VmInfo> {
        // The NUMA runner's figures once for all VMs, not once each.
        let numa = self.services.numa_stats();
        (0..self.vms.len())
            .map(|i| self.info_of(i, numa.as_ref()))
            .collect()
    }

    /// VM `name` as it stands.
    pub fn vm_info(&self, name: &str) -> Result<VmInfo, VmError> {
        let i = self.find(name)?;
        Ok(self.info_of(i, self.services.numa_stats().as_ref()))
    }

    fn info_of(&self, i: usize, numa: Option<&NumaStats>) -> VmInfo {
        let v = &self.vms[i];
        let result = self.vm_report(i, numa);
        let (done, total) = v.progress();
        let slot = v.space.map(|s| s as usize);
        let of =
            |per_vm: &[(u64, u64)]| slot.and_then(|s| per_vm.get(s).copied()).and_then(percent);
        VmInfo {
            name: v.config.name.clone(),
            state: v.state(),
            vcpu_nodes: v.vcpu_nodes(),
            memory_mib: v.config.memory_mib,
            pages_per_node: result.pages_per_node.clone(),
            shared_pages: result.shared_pages,
            shared_mib: (result.shared_pages * PAGE_SIZE as u64) as f64 / (1 << 20) as f64,
            progress: [done.min(total), total],
            cow_breaks: result.costs.cow_breaks,
            frames_migrated: slot
                .and_then(|s| numa?.moved_per_vm.get(s).copied())
                .unwrap_or(0),
            local_percent: numa.and_then(|n| of(&n.per_vm)),
            recent_local_percent: numa.and_then(|n| of(&recent_locality(n))),
            result,
        }
    }

    /// Where VM `name`'s pmap is: its guest space and frame count (`None`
    /// when it has no guest space: it failed to build).
    pub fn pmap_source(&self, name: &str) -> Result<Option<(VmId, u64)>, VmError> {
        let v = &self.vms[self.find(name)?];
        Ok(v.space
            .map(|s| (s, v.config.memory_mib * (1 << 20) / PAGE_SIZE as u64)))
    }

    /// The name of each guest space's VM.
    pub fn space_names(&self) -> Vec<(VmId, String)> {
        self.vms
            .iter()
            .filter_map(|v| Some((v.space?, v.config.name.clone())))
            .collect()
    }

    /// VM `name`'s pmap as runs: consecutive frames on consecutive pages of
    /// one node with the same flags make one run; holes are left out. Read
    /// [`PMAP_CHUNK`] frames per hold of the memory lock, as the API's
    /// streamed pmap is (`crate::api`), with the same run builder.
    pub fn pmap(&self, name: &str) -> Result<Vec<PmapRun>, VmError> {
        let Some((space, frames)) = self.pmap_source(name)? else {
            return Ok(Vec::new());
        };
        let mut runs = PmapRuns::default();
        for start in (0..frames).step_by(PMAP_CHUNK as usize) {
            let chunk = self
                .memory
                .pmap_chunk(space, start..start + PMAP_CHUNK)
                .map_err(|e| VmError::Failed(format!("VM `{name}`: {e:#}")))?;
            chunk.iter().for_each(|f| runs.push(f));
        }
        Ok(runs.finish())
    }

    /// Per node: its pool and the guest frames it backs, per VM.
    pub fn memmap(&self) -> Vec<MemmapNode> {
        let pools = self.memory.pool_stats();
        let mut nodes: Vec<MemmapNode> = pools
            .into_iter()
            .enumerate()
            .map(|(node, pool)| MemmapNode {
                node,
                pool,
                guest_frames: 0,
                shared_frames: 0,
                sharing: NodeSharing::default(),
                per_vm: Vec::new(),
            })
            .collect();
        for v in &self.vms {
            let Some(stats) = v.space.and_then(|s| self.memory.space_stats(s).ok()) else {
                continue;
            };
            for (node, &pages) in stats.pages_per_node.iter().enumerate() {
                if pages > 0 {
                    nodes[node].guest_frames += pages;
                    nodes[node].per_vm.push((v.config.name.clone(), pages));
                }
            }
        }
        // Sharing per node from the memmap, a chunk at a time.
        for n in &mut nodes {
            n.sharing = self.memory.node_sharing(n.node, MEMMAP_CHUNK);
            n.shared_frames = n.sharing.sharing_frames;
        }
        nodes
    }

    /// The monitor's statistics now.
    pub fn stats(&self) -> MonitorStats {
        let numa = self.services.numa_stats().map(|mut n| {
            n.series.clear();
            n
        });
        MonitorStats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vms: self.vms.len(),
            policy: self.services.policy.name.clone(),
            policy_status: self.services.status.clone(),
            verify: VerifySummary {
                runs: self.verify.runs,
                while_running: self.verify.while_running,
                ok: self.verify.errors.is_empty(),
                errors: self.verify.errors.clone(),
            },
            pools: self.memory.pool_stats(),
            sharing: self.memory.sharing_stats(),
            scanner: self.services.scanner_stats(),
            replicas: self.memory.replica_stats(),
            numa,
            kernel_mappings: std::fs::read_to_string("/proc/self/maps")
                .map(|m| m.lines().count())
                .unwrap_or(0),
        }
    }
}
