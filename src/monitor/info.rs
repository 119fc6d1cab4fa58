//! What a monitor tells about itself while it runs: each VM's state and
//! memory, a VM's pmap as runs, the memmap per node, and statistics. All of
//! it serialises to the JSON the API serves.

use serde::Serialize;

use super::{Monitor, VmError, VmState};
use crate::memory::{PoolStats, ReplicaStats, SharingStats};
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
        (0..self.vms.len()).map(|i| self.info_of(i)).collect()
    }

    /// VM `name` as it stands.
    pub fn vm_info(&self, name: &str) -> Result<VmInfo, VmError> {
        Ok(self.info_of(self.find(name)?))
    }

    fn info_of(&self, i: usize) -> VmInfo {
        let v = &self.vms[i];
        let numa = self.services.numa_stats();
        let result = self.vm_report(i, numa.as_ref());
        let (done, total) = v.progress();
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
            result,
        }
    }

    /// VM `name`'s pmap as runs: consecutive frames on consecutive pages of
    /// one node with the same flags make one run; holes are left out.
    pub fn pmap(&self, name: &str) -> Result<Vec<PmapRun>, VmError> {
        let v = &self.vms[self.find(name)?];
        let Some(space) = v.space else {
            return Ok(Vec::new());
        };
        let frames = v.config.memory_mib * (1 << 20) / PAGE_SIZE as u64;
        let mut runs: Vec<PmapRun> = Vec::new();
        for gfn in 0..frames {
            let Ok(Some(entry)) = self.memory.lookup(space, gfn) else {
                continue;
            };
            let replica = self
                .memory
                .frame_location(space, gfn)
                .is_some_and(|l| l.copies.len() > 1);
            let here = PmapRun {
                gfn,
                frames: 1,
                node: entry.page.node(),
                page: entry.page.index,
                shared: entry.flags.shared,
                replica,
                protected: entry.flags.write_protected,
            };
            match runs.last_mut() {
                Some(r)
                    if r.gfn + r.frames == gfn
                        && r.node == here.node
                        && r.page as u64 + r.frames == here.page as u64
                        && (r.shared, r.replica, r.protected)
                            == (here.shared, here.replica, here.protected) =>
                {
                    r.frames += 1
                }
                _ => runs.push(here),
            }
        }
        Ok(runs)
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
        // Shared frames per node, from each VM's pmap flags.
        for v in &self.vms {
            if let Ok(runs) = self.pmap(&v.config.name) {
                for r in runs.iter().filter(|r| r.shared) {
                    nodes[r.node].shared_frames += r.frames;
                }
            }
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
