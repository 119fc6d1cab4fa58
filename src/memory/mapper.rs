//! The mapper: the only code that changes a guest's host mappings.
//!
//! Every operation takes the one memory lock, changes the host mapping with
//! `mmap(MAP_FIXED)`, and updates the pmap, the memmap and the pool
//! allocators before releasing it, so the four never disagree for longer
//! than one locked section. KVM sees the new mapping on the guest's next
//! access to the page through its MMU notifiers (verified on the build
//! hosts, see docs/host-facts.md, "KVM"), so no memory-slot change is needed.
//!
//! Policies (sharing, migration, replication) decide *what* to change and
//! call the mapper; they never touch a mapping themselves.
//!
//! Write protection: every pool page is mapped read-write, and a page that
//! several owners share is write-protected with userfaultfd (not with
//! `mprotect`: a guest write to a read-only host mapping makes `KVM_RUN`
//! fail with `EFAULT` and no address, see docs/host-facts.md, "KVM"). The rule the mapper
//! keeps is `write_protected == shared == (refcount > 1)`. Because a
//! `mmap(MAP_FIXED)` drops the userfaultfd registration of the range it
//! replaces, every pool mapping is registered again right after it is made.

use std::collections::BTreeMap;
use std::io;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use parking_lot::Mutex;
use serde::Serialize;

use super::cow::CowCounters;
use super::memmap::Memmap;
use super::pmap::{PageFlags, Pmap, PmapEntry};
use super::pool::Pool;
use super::replica::Replicas;
use super::sampler::PageSampler;
use super::{Gfn, MachinePage, NodeId, VmId};
use crate::faults::uffd::{FaultEvent, Userfault};
use crate::topology::Topology;
use crate::PAGE_SIZE;
use std::sync::Arc;

/// Process-wide budget of memory mappings (`vm.max_map_count`) reserved for
/// things other than guest RAM (libraries, thread stacks, pool views).
pub(super) const MAP_COUNT_MARGIN: u64 = 4096;

/// Most frames of one VM armed for a sample at once (see
/// `Memory::zap_frames`); each armed run may split a kernel mapping in
/// three.
pub const MAX_ARMED_FRAMES: u64 = 128;

/// How long a frame zapped for a sample stays armed waiting for its touch:
/// a page nobody touched for this long is cold, and its sample is dropped
/// (its next touch is an ordinary fault the kernel handles).
pub const ARM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One VM's guest-physical space: a host virtual range and its pmap.
pub(super) struct GuestSpace {
    pub(super) name: String,
    /// Pages are only shared between spaces of the same domain.
    pub(super) domain: String,
    /// Node that receives this VM's copy-on-write copies.
    pub(super) home_node: NodeId,
    /// Node this VM's vCPUs run on (see `Memory::set_cpu_node`): the node
    /// whose replica of a replicated page the VM maps.
    pub(super) cpu_node: NodeId,
    pub(super) base: usize,
    pub(super) pmap: Pmap,
    /// Frames never merged (see `Memory::exclude_from_sharing`).
    pub(super) unmergeable: Vec<std::ops::Range<Gfn>>,
    /// Runs of frames armed for a sample (registered for minor faults
    /// too, see `Memory::zap_frames`): first frame, frames, when armed.
    pub(super) armed: Vec<(Gfn, u64, std::time::Instant)>,
}

impl GuestSpace {
    pub(super) fn frames(&self) -> u64 {
        self.pmap.frames()
    }
    pub(super) fn mergeable(&self, gfn: Gfn) -> bool {
        !self.unmergeable.iter().any(|r| r.contains(&gfn))
    }
    pub(super) fn addr(&self, gfn: Gfn) -> usize {
        self.base + gfn as usize * PAGE_SIZE
    }
    /// Frames armed for a sample now.
    pub(super) fn armed_frames(&self) -> u64 {
        self.armed.iter().map(|a| a.1).sum()
    }
}

pub(super) struct Inner {
    pub(super) pools: Vec<Pool>,
    pub(super) memmap: Memmap,
    pub(super) spaces: BTreeMap<VmId, GuestSpace>,
    pub(super) next_vm: VmId,
    /// Write-protection of shared pages; `None` when userfaultfd could not
    /// be opened (then sharing is refused with `uffd_error`).
    pub(super) uffd: Option<Arc<Userfault>>,
    pub(super) uffd_error: String,
    pub(super) cow: CowCounters,
    /// How to pause each VM's vCPUs (see `GuestPause`).
    pub(super) pausers: BTreeMap<VmId, Arc<dyn super::GuestPause>>,
    /// Page-access sampling (minor faults), when enabled: only the pages
    /// zapped for a sample are registered in minor mode, while they wait
    /// for their touch (`GuestSpace::armed`).
    pub(super) sampler: Option<Arc<PageSampler>>,
    /// Replica sets of read-shared pages (see `replica.rs`).
    pub(super) replicas: Replicas,
    /// This memory's claim on a raised `vm.max_map_count`, released (and
    /// the value set back) when the memory is dropped.
    pub(super) map_count: Option<crate::leftovers::MapCountLease>,
    /// Per node, pool pages an image load holds that no frame maps yet
    /// (read from a snapshot, not mapped until the whole image checked:
    /// image.rs); `verify` counts them as neither free nor leaked.
    pub(super) loading: Vec<super::runs::RunSet>,
    /// The budget of kernel mappings per VM (see `budget.rs`).
    pub(super) budget: super::budget::Budget,
    /// Guest mappings may ask the kernel for large shmem folios
    /// (`[host] large_folios`, see `folios.rs` and `ask_large_folios`).
    pub(super) large_folios: bool,
    /// The shmem folio sizes (kB) the host allowed when this memory was
    /// made (`folios::host_sizes_kib`).
    pub(super) host_folio_kib: Vec<u32>,
    /// Some guest mapping asked for them (for the report).
    pub(super) folios_asked: std::cell::Cell<bool>,
}

/// All machine memory of one monitor, behind one lock.
pub struct Memory {
    pub(super) inner: Mutex<Inner>,
    /// The same userfaultfd as in `Inner`, reachable without the lock so a
    /// fault handler can wait for events while the mapper works.
    uffd: Option<Arc<Userfault>>,
}

/// Longest run of consecutive frames [`Memory::move_pages`] moves under one
/// hold of the memory lock (2 MiB).
pub const MOVE_RUN_MAX: usize = 512;

/// Where the time of a [`Memory::move_pages`] call went, ns (summed over
/// its runs; the rest is locking and sorting).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MoveTimes {
    /// Taking each run away from the guest before the copy: unmapping it
    /// from the guest's page table (or write-protecting it, see
    /// `Inner::detach_run`).
    pub protect_ns: u64,
    /// Allocating target pages, reading the pmap.
    pub alloc_ns: u64,
    /// Copying the contents.
    pub copy_ns: u64,
    /// `mmap(MAP_FIXED)` and userfaultfd registration of each piece.
    pub map_ns: u64,
    /// pmap and memmap updates, freeing (punching) the old pages.
    pub free_ns: u64,
    /// Shared frames, moved one by one.
    pub shared_ns: u64,
}

/// What [`Memory::move_pages`] did with each frame it was given (each
/// frame once, however often it was named).
#[derive(Clone, Debug, Default)]
pub struct MoveReport {
    /// Frames that now map a page of the target node, moved by this call.
    pub moved: Vec<Gfn>,
    /// Frames whose page was already on the target node.
    pub unchanged: Vec<Gfn>,
    /// Frames that did not move, and why (unmapped, outside the space, a
    /// replica, a full pool, a VM that could not be paused, ...).
    pub failed: Vec<(Gfn, String)>,
    /// Pieces of private frames moved with one remap each.
    pub runs: u64,
    /// Frames moved through the shared-page path.
    pub shared_moves: u64,
    pub times: MoveTimes,
}

/// Pages of one pool, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStats {
    pub node: NodeId,
    pub host_node: u32,
    pub capacity_pages: u32,
    pub used_pages: u32,
    pub free_pages: u32,
    /// Free pages kept resident (not punched) as future copy targets; they
    /// count in `free_pages` and in `resident_bytes` (see `pool.rs`).
    pub warm_pages: u32,
    /// Most warm pages the pool keeps.
    pub warm_cap_pages: u32,
    /// Copy targets (migration, copy-on-write, replicas) served from warm
    /// pages since the pool was made.
    pub warm_reused_pages: u64,
    /// Host memory the pool really occupies: pages in use plus warm pages.
    pub resident_bytes: u64,
}

/// Pages of one guest space, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct GuestSpaceStats {
    pub vm: VmId,
    pub name: String,
    pub frames: u64,
    pub mapped_pages: u64,
    /// Mapped pages per node, indexed by node.
    pub pages_per_node: Vec<u64>,
    /// Frames whose machine page is shared with other frames.
    pub shared_pages: u64,
    pub domain: String,
}

fn check_mmap(ret: *mut libc::c_void, what: &str) -> Result<()> {
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(())
}

/// Splits `pages` into runs of consecutive pages of one pool: `(first
/// position, length)` each, in order (one copy per run).
fn pool_runs(pages: &[MachinePage]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= pages.len() {
            return None;
        }
        let first = pages[i];
        let mut n = 1;
        while i + n < pages.len()
            && pages[i + n].node == first.node
            && pages[i + n].index == first.index + n as u32
        {
            n += 1;
        }
        let run = (i, n);
        i += n;
        Some(run)
    })
}

/// Makes `[addr, addr+len)` an inaccessible hole (no machine page).
fn map_hole(addr: usize, len: usize) -> Result<()> {
    // SAFETY: addr lies inside a guest range this module reserved.
    let ret = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    check_mmap(ret, "unmapping guest pages")
}

/// Maps `pages` consecutive pool pages starting at `index` at `addr`,
/// read-write (write protection is userfaultfd's job), asking for large
/// shmem folios with `large_folios` (see `folios.rs`). All guest mappings
/// of a memory ask alike (see `Inner::ask_large_folios`), so neighbouring
/// mappings still merge into one kernel mapping.
fn map_pool_run(
    addr: usize,
    pool: &Pool,
    index: u32,
    pages: usize,
    large_folios: bool,
) -> Result<()> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: addr lies inside a guest range this module reserved; the pool
    // fd is valid and the run is inside its capacity.
    let ret = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            pages * PAGE_SIZE,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            pool.fd(),
            index as libc::off_t * PAGE_SIZE as libc::off_t,
        )
    };
    check_mmap(ret, "mapping pool pages into guest RAM")?;
    let len = pages * PAGE_SIZE;
    if large_folios {
        // SAFETY: advice on the mapping made just above.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            // Only advice: a kernel without it maps 4 KiB folios.
            tracing::debug!(
                "MADV_HUGEPAGE {addr:#x}+{len:#x}: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

impl Memory {
    /// One pool per node of `topology`, on the host node it is mapped to.
    /// Makes sure the process may hold `needed` memory mappings (raising
    /// `vm.max_map_count` as root, see `crate::leftovers`); this memory holds
    /// the raise until it is dropped. `monitor::run` calls it once for all
    /// VMs, after the config's checks, so one raise covers every space.
    pub fn reserve_map_count(&self, needed: u64) -> Result<()> {
        crate::leftovers::ensure_map_count(needed, &mut self.inner.lock().map_count)
    }

    /// A pool can hold as much as its node's memory, capped at the host's
    /// memory (pools are sparse: capacity costs nothing until used).
    pub fn for_topology(topology: &Topology) -> Result<Memory> {
        Memory::for_topology_limited(topology, None)
    }

    /// Like [`Memory::for_topology`], with the pools together holding at
    /// most `limit_bytes` (`[host] memory_limit_mib`), split across the
    /// nodes in proportion to their memory.
    pub fn for_topology_limited(topology: &Topology, limit_bytes: Option<u64>) -> Result<Memory> {
        let pools = topology
            .nodes
            .iter()
            .zip(pool_capacities(topology, limit_bytes))
            .map(|(n, capacity)| (n.index, n.host_node, capacity))
            .collect::<Vec<_>>();
        Memory::new(&pools)
    }

    /// Per node, the pool's capacity and the pages it can still hand out
    /// (no system call, unlike [`Memory::pool_stats`]: the monitor asks
    /// every tick while VMs wait for memory).
    pub fn pool_room(&self) -> Vec<(u64, u64)> {
        self.inner
            .lock()
            .pools
            .iter()
            .map(|p| (p.capacity() as u64, p.available() as u64))
            .collect()
    }

    /// Pools given as `(node, host node, capacity in pages)`, nodes 0..n in order.
    pub fn new(pools: &[(NodeId, u32, u32)]) -> Result<Memory> {
        let mut built = Vec::new();
        for (i, &(node, host_node, capacity)) in pools.iter().enumerate() {
            ensure!(
                node == i,
                "memory pools must be given for nodes 0..n in order"
            );
            built.push(Pool::new(node, host_node, capacity)?);
        }
        let (uffd, uffd_error) = match Userfault::new() {
            Ok(u) => (Some(Arc::new(u)), String::new()),
            Err(e) => (None, e.to_string()),
        };
        Ok(Memory {
            uffd: uffd.clone(),
            inner: Mutex::new(Inner {
                pools: built,
                memmap: Memmap::default(),
                spaces: BTreeMap::new(),
                next_vm: 0,
                uffd,
                uffd_error,
                cow: CowCounters::default(),
                pausers: BTreeMap::new(),
                sampler: None,
                replicas: Replicas::default(),
                map_count: None,
                loading: Vec::new(),
                budget: Default::default(),
                large_folios: true,
                host_folio_kib: super::folios::host_sizes_kib(),
                folios_asked: Default::default(),
            }),
        })
    }

    pub fn node_count(&self) -> usize {
        self.inner.lock().pools.len()
    }

    /// The userfaultfd that write-protects shared pages, if one could be
    /// opened (it needs root or `vm.unprivileged_userfaultfd=1`).
    pub fn userfault(&self) -> Option<&Arc<Userfault>> {
        self.uffd.as_ref()
    }

    /// Creates a guest space of `frames` pages, every page backed by a fresh
    /// (zeroed) machine page of `node`. Returns its id and the host address
    /// of guest-physical 0.
    pub fn create_space(&self, name: &str, frames: u64, node: NodeId) -> Result<(VmId, usize)> {
        self.create_space_in(name, frames, node, "default")
    }

    /// Like [`Memory::create_space`], in sharing domain `domain`.
    pub fn create_space_in(
        &self,
        name: &str,
        frames: u64,
        node: NodeId,
        domain: &str,
    ) -> Result<(VmId, usize)> {
        ensure!(frames > 0, "a guest space needs at least one page");
        let mut inner = self.inner.lock();
        ensure!(
            node < inner.pools.len(),
            "node {node} does not exist (this topology has {} nodes)",
            inner.pools.len()
        );
        // The most mappings the spaces can hold under the budget (one per
        // guest page without one), so a remap never fails for want of one.
        let needed = inner.map_count_for(&[frames]);
        crate::leftovers::ensure_map_count(needed, &mut inner.map_count)?;

        let (vm, base) = inner.reserve_space(name, domain, node, frames)?;
        let result = inner.map_fresh(vm, 0, frames, node);
        if let Err(e) = result {
            inner.destroy(vm).ok();
            return Err(e.context(format!("building guest RAM of {name}")));
        }
        Ok((vm, base))
    }

    /// Registers how to pause `vm`'s vCPUs. A VM that runs while its pages
    /// may be merged must have one (the monitor sets it for every VM).
    pub fn set_pauser(&self, vm: VmId, pauser: Arc<dyn super::GuestPause>) -> Result<()> {
        let mut inner = self.inner.lock();
        inner.space(vm)?;
        inner.pausers.insert(vm, pauser);
        Ok(())
    }

    /// Keeps frames `gfns` of `vm` out of page sharing: they are never
    /// merged, neither as duplicate nor as the kept page.
    pub fn exclude_from_sharing(&self, vm: VmId, gfns: std::ops::Range<Gfn>) -> Result<()> {
        self.inner.lock().space_mut(vm)?.unmergeable.push(gfns);
        Ok(())
    }

    /// Removes a guest space: unmaps its RAM and frees every machine page it
    /// was the last owner of.
    pub fn destroy_space(&self, vm: VmId) -> Result<()> {
        self.inner.lock().destroy(vm)
    }

    /// Backs an unmapped frame with a fresh zeroed page of `node`.
    pub fn map_page(&self, vm: VmId, gfn: Gfn, node: NodeId) -> Result<MachinePage> {
        let mut inner = self.inner.lock();
        ensure!(
            inner.space(vm)?.pmap.get(gfn).is_none(),
            "frame {gfn:#x} of vm {vm} is already mapped"
        );
        inner.map_fresh(vm, gfn, 1, node)?;
        Ok(inner.space(vm)?.pmap.get(gfn).unwrap().page)
    }

    /// Takes the machine page away from a frame; the guest faults if it
    /// touches it. The page is freed if this was its last owner.
    pub fn unmap_page(&self, vm: VmId, gfn: Gfn) -> Result<()> {
        let mut inner = self.inner.lock();
        let space = inner.space(vm)?;
        let Some(entry) = space.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        map_hole(space.addr(gfn), PAGE_SIZE)?;
        inner.space_mut(vm)?.pmap.set(gfn, None);
        inner.drop_owner(entry.page, vm, gfn)
    }

    /// Migrates a frame to a fresh page on `node` while its guest may be
    /// running: write-protect, copy, remap, free the old page. A page shared
    /// by several frames moves for all of them (each remapped with its VM
    /// paused, as in a merge); a replicated page is not migrated (its
    /// replicas are placed by `replicate_page` / `collapse_page`).
    ///
    /// A guest write during the copy faults on the protection and waits for
    /// the fault handler, which needs the lock held here; when it gets it,
    /// the frame maps the new, unprotected page, so the handler only wakes
    /// the writer, whose write then lands in the new page. Without
    /// userfaultfd the caller must keep the guest from writing the page.
    pub fn move_page(&self, vm: VmId, gfn: Gfn, node: NodeId) -> Result<MachinePage> {
        let mut inner = self.inner.lock();
        let Some(old) = inner.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        if old.flags.shared {
            return inner.move_shared_page(old.page, node);
        }
        if let Some(uffd) = &inner.uffd {
            let addr = inner.space(vm)?.addr(gfn);
            uffd.write_protect(addr, PAGE_SIZE, true)
                .context("write-protecting a page to migrate")?;
        }
        inner.replace_with_copy(vm, gfn, node)
    }

    /// Migrates many frames of `vm` to `node` at once: the batched form of
    /// [`Memory::move_page`], with the same guest-visible behaviour.
    ///
    /// The frames are sorted and cut into runs of consecutive frames (at
    /// most [`MOVE_RUN_MAX`] each, one hold of the memory lock per run, so
    /// the fault handler and other mapper users wait at most one run). In a
    /// run, consecutive *private* frames move together: one userfaultfd
    /// write-protect of the range, one allocation of consecutive pages on
    /// `node` when the pool has them (else the run is split), the copies,
    /// one `mmap(MAP_FIXED)` and registration of the whole range, the pmap
    /// and memmap updates, and one hole punched per run of freed pages.
    /// Shared frames take `move_page`'s shared-page path one by one
    /// (replicas are refused there, as in `move_page`). Frames already on
    /// `node` are left alone; unmapped or out-of-range frames fail.
    ///
    /// A guest write to a run during its copy faults on the protection and
    /// waits for the fault handler, which needs the lock held for the whole
    /// run; when it gets it, every frame of the run maps its new,
    /// unprotected page, so the handler only wakes the writer and the write
    /// lands in the new page (the argument of `move_page`, for a range).
    /// Without userfaultfd the caller must keep the guest from writing.
    ///
    /// Fails as a whole only when `vm` or `node` does not exist; otherwise
    /// the report says what happened to every frame.
    pub fn move_pages(&self, vm: VmId, gfns: &[Gfn], node: NodeId) -> Result<MoveReport> {
        {
            let inner = self.inner.lock();
            inner.space(vm)?;
            ensure!(node < inner.pools.len(), "node {node} does not exist");
        }
        let mut sorted = gfns.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut report = MoveReport::default();
        let mut i = 0;
        while i < sorted.len() {
            let mut n = 1;
            while i + n < sorted.len() && n < MOVE_RUN_MAX && sorted[i + n] == sorted[i] + n as Gfn
            {
                n += 1;
            }
            let mut inner = self.inner.lock();
            inner.move_frames(vm, sorted[i], n, node, &mut report)?;
            drop(inner);
            i += n;
        }
        Ok(report)
    }

    /// Makes `(dst_vm, dst_gfn)` map the machine page behind
    /// `(src_vm, src_gfn)`, read-only for both, and frees the page `dst`
    /// had if that was its last owner.
    pub fn share_page(&self, src_vm: VmId, src_gfn: Gfn, dst_vm: VmId, dst_gfn: Gfn) -> Result<()> {
        let mut inner = self.inner.lock();
        let Some(src) = inner.space(src_vm)?.pmap.get(src_gfn) else {
            bail!("frame {src_gfn:#x} of vm {src_vm} is not mapped");
        };
        ensure!(
            (src_vm, src_gfn) != (dst_vm, dst_gfn),
            "cannot share a frame with itself"
        );
        let dst_old = inner.space(dst_vm)?.pmap.get(dst_gfn);
        if dst_old.map(|e| e.page) == Some(src.page) {
            return Ok(());
        }
        inner.require_uffd()?;
        inner.protect_frame(src_vm, src_gfn)?;
        inner.map_onto(dst_vm, dst_gfn, src.page)?;
        if let Some(old) = dst_old {
            inner.drop_owner(old.page, dst_vm, dst_gfn)?;
        }
        Ok(())
    }

    /// Copies a frame's content: the machine page its pmap entry names, read
    /// through the pool's view (`verify` checks that the guest maps exactly
    /// that page). Not through the guest mapping: a page zapped for sampling
    /// would fault there and wait for the fault handler, which needs the
    /// lock held here.
    pub fn read_guest_page(&self, vm: VmId, gfn: Gfn) -> Result<Vec<u8>> {
        let inner = self.inner.lock();
        let Some(entry) = inner.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        let ptr = inner.pools[entry.page.node()].page_ptr(entry.page.index);
        // SAFETY: an in-bounds page of a pool view.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, PAGE_SIZE) };
        Ok(bytes.to_vec())
    }

    /// Writes a frame's machine page as a guest store would: refused when
    /// the frame is write-protected (a guest would fault there). Written
    /// through the pool view, for the reason given at `read_guest_page`.
    pub fn write_guest_page(&self, vm: VmId, gfn: Gfn, data: &[u8]) -> Result<()> {
        ensure!(data.len() == PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
        let inner = self.inner.lock();
        let Some(entry) = inner.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        ensure!(
            !entry.flags.write_protected,
            "frame {gfn:#x} of vm {vm} is write-protected"
        );
        let ptr = inner.pools[entry.page.node()].page_ptr(entry.page.index);
        // SAFETY: an in-bounds page of a pool view, private to this frame
        // (not write-protected, so not shared).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, PAGE_SIZE) };
        Ok(())
    }

    /// The pmap entry of a frame.
    pub fn lookup(&self, vm: VmId, gfn: Gfn) -> Result<Option<PmapEntry>> {
        Ok(self.inner.lock().space(vm)?.pmap.get(gfn))
    }

    /// Turns page-access sampling on (see `super::sampler`). Nothing is
    /// registered for minor faults until a page is zapped for a sample
    /// (`zap_frames`), so it may start at any time, also with guest RAM in
    /// large folios.
    pub fn enable_sampling(&self) -> Result<Arc<PageSampler>> {
        let mut inner = self.inner.lock();
        if let Some(s) = &inner.sampler {
            return Ok(s.clone());
        }
        let uffd = match &inner.uffd {
            Some(u) => u.clone(),
            None => bail!(
                "page sampling needs userfaultfd, which is unavailable: {}",
                inner.uffd_error
            ),
        };
        let sampler = Arc::new(PageSampler::new(uffd.clone())?);
        inner.sampler = Some(sampler.clone());
        let everywhere = inner.minor_everywhere();
        for (&vm, space) in &inner.spaces {
            sampler.register_space(vm, space.base, space.frames() as usize * PAGE_SIZE);
            if !everywhere {
                continue;
            }
            // Registering a registered range again with the same
            // userfaultfd adds modes and keeps its page tables
            // (write-protected pages stay so). Only mapped frames: a hole
            // of the space is anonymous memory, which minor mode refuses.
            // Not populated first (unlike `map_run`): that would allocate
            // the pools' holes, so a page the guest mapped but has not
            // touched since costs one unsampled minor fault.
            let mapped: Vec<Gfn> = space.pmap.iter().map(|(g, _)| g).collect();
            for (first, n) in super::runs::runs_of(&mapped) {
                if let Err(e) = uffd.register(space.addr(first), n as usize * PAGE_SIZE, true, true)
                {
                    inner.sampler = None;
                    return Err(e).context("registering guest pages for page sampling");
                }
            }
        }
        Ok(sampler)
    }

    /// Whether guest mappings may ask for large shmem folios (`[host]
    /// large_folios`, on by default); set before any VM is made.
    pub fn set_large_folios(&self, on: bool) {
        self.inner.lock().large_folios = on;
    }

    /// One line on large shmem folios for the run report: what the host
    /// allows and whether guest RAM asked for them.
    pub fn large_folio_status(&self) -> String {
        let inner = self.inner.lock();
        if !inner.large_folios {
            return "off ([host] large_folios = false)".into();
        }
        if inner.host_folio_kib.is_empty() {
            return "none: the host allows no shmem folio size above 4 kB (see \
                    /sys/kernel/mm/transparent_hugepage/hugepages-*kB/shmem_enabled; \
                    `advise` lets disco use one)"
                .into();
        }
        let sizes = super::folios::sizes_text(&inner.host_folio_kib);
        if inner.folios_asked.get() {
            format!("asked for ({sizes} allowed by the host)")
        } else {
            format!("to be asked for ({sizes} allowed by the host); no guest memory mapped yet")
        }
    }

    /// The sampler, when sampling is on.
    pub fn sampler(&self) -> Option<Arc<PageSampler>> {
        self.inner.lock().sampler.clone()
    }

    /// Zaps frames of `vm` for sampling (see `PageSampler::zap`): the next
    /// guest access to each is reported once. Unmapped frames and frames
    /// excluded from sharing (the micro-guest's system area: page tables
    /// that KVM itself walks) are skipped. Returns the frames zapped.
    ///
    /// Where guest RAM asks for large folios (not `minor_everywhere`),
    /// only the zapped frames are registered for minor faults ("armed"),
    /// and only until their touch came or [`ARM_TIMEOUT`] passed: the rest
    /// of guest RAM is registered for write-protect faults alone, so a
    /// guest touching a page of a large shmem folio that is not mapped yet
    /// has the kernel map it, as without sampling (with the whole range in
    /// minor mode every such touch was an exit to the fault handler, which
    /// kept sampled guests in 4 KiB folios). Arming splits the kernel
    /// mapping around the run; disarming (every sampling round,
    /// [`Memory::disarm_sampled`]) merges it back. At most
    /// [`MAX_ARMED_FRAMES`] frames of a VM are armed at once,
    /// which bounds the extra mappings (`budget::mapping_bound`).
    pub fn zap_frames(&self, vm: VmId, gfns: &[Gfn]) -> Result<usize> {
        self.disarm_sampled(vm)?;
        let mut inner = self.inner.lock();
        let (sampler, uffd) = inner.sampling_parts()?;
        let arm = !inner.minor_everywhere();
        let space = inner.space(vm)?;
        let mut room = MAX_ARMED_FRAMES.saturating_sub(space.armed_frames());
        // One `madvise` per run of consecutive frames: on the build hosts
        // (docs/host-facts.md, "KVM") every
        // call makes KVM invalidate the guest's mappings (and kick its
        // vCPUs), whatever its length, so runs cost the guest far less
        // than the same pages one by one.
        // A hole (a page never written since it was handed out) is not
        // zapped: its next touch is a missing fault, which the sampler does
        // not register, so it could never yield a sample, only an madvise
        // and a `pending` entry that never resolves.
        let mut sorted: Vec<Gfn> = gfns
            .iter()
            .copied()
            .filter(|&g| {
                space.pmap.get(g).is_some_and(|e| {
                    space.mergeable(g)
                        && (e.flags.shared
                            || inner.pools[e.page.node()].page_resident(e.page.index))
                })
            })
            .collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut armed = Vec::new();
        let mut failed = None;
        for (first, len) in super::runs::runs_of(&sorted) {
            if arm && len > room {
                continue;
            }
            let (addr, bytes) = (space.addr(first), len as usize * PAGE_SIZE);
            // Armed before the zap, so its touch is a minor fault. Keeps
            // the write-protect mode and the pages' uffd-wp bits.
            if arm {
                if let Err(e) = uffd.register(addr, bytes, true, true) {
                    failed =
                        Some(anyhow::Error::from(e).context("arming guest pages for a sample"));
                    break;
                }
                room -= len;
            }
            armed.push((first, len, std::time::Instant::now()));
            if let Err(e) = sampler.zap(addr, bytes) {
                failed = Some(e.into());
                break;
            }
        }
        let zapped = armed.iter().map(|a| a.1 as usize).sum();
        // Recorded also after a failure, so that what was armed is
        // disarmed later.
        if arm {
            inner
                .spaces
                .get_mut(&vm)
                .expect("checked")
                .armed
                .extend(armed);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(zapped),
        }
    }

    /// Takes the frames of `vm` armed for samples whose touch came (or
    /// timed out) out of minor mode (see [`Memory::zap_frames`]); the
    /// sampler calls it every round, also for VMs it zaps nothing of. Runs
    /// holding shared (write-protected) frames are left armed until half of
    /// [`MAX_ARMED_FRAMES`] are (their touch come or timed out), and then
    /// disarmed together under one pause of the VM. (Counting every armed
    /// frame instead paused VMs for nothing while their samples were still
    /// to come: eight 256 MiB guests sharing two host CPUs were paused 539
    /// times without a shared run to disarm.)
    pub fn disarm_sampled(&self, vm: VmId) -> Result<()> {
        let crowded = {
            let mut inner = self.inner.lock();
            if inner.space(vm)?.armed.is_empty() {
                return Ok(());
            }
            let (sampler, uffd) = inner.sampling_parts()?;
            inner.disarm(vm, &sampler, &uffd, false)? >= MAX_ARMED_FRAMES / 2
        };
        if crowded {
            self.disarm_paused(vm)?;
        }
        Ok(())
    }

    /// Disarms every armed run of `vm` whose touch came or timed out,
    /// write-protected ones too, with its vCPUs paused: a protected page
    /// leaves minor mode by being mapped again (see `Inner::disarm`), and
    /// a running vCPU must not write it between the `mmap` and the
    /// protection. Paused before the lock is taken, as a merge batch is.
    /// A VM without a pauser, or one that does not stop in time, keeps
    /// them armed.
    fn disarm_paused(&self, vm: VmId) -> Result<()> {
        let Some(pauser) = self.inner.lock().pausers.get(&vm).cloned() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        if !pauser.pause() {
            self.inner.lock().count_pause(vm, started, false);
            return Ok(());
        }
        let done = {
            let mut inner = self.inner.lock();
            let (sampler, uffd) = inner.sampling_parts()?;
            sampler.count_disarm_pause();
            inner.disarm(vm, &sampler, &uffd, true).map(|_| ())
        };
        pauser.resume();
        self.inner.lock().count_pause(vm, started, true);
        done
    }

    /// Resolves a minor fault (a zapped page touched again): records the
    /// sample and maps the page back, write-protected exactly when the pmap
    /// says so. Under the memory lock, so no protect or unprotect slips in
    /// between reading the flag and the continue.
    pub fn resolve_minor_fault(&self, event: &FaultEvent) -> Result<()> {
        let inner = self.inner.lock();
        let page_addr = event.address & !(PAGE_SIZE - 1);
        let keep_wp = inner
            .spaces
            .values()
            .find(|s| page_addr >= s.base && page_addr < s.base + s.frames() as usize * PAGE_SIZE)
            .and_then(|s| s.pmap.get(((page_addr - s.base) / PAGE_SIZE) as Gfn))
            .is_some_and(|e| e.flags.write_protected);
        match &inner.sampler {
            Some(sampler) => {
                sampler.handle_event_with(event, keep_wp);
                Ok(())
            }
            None => {
                // A guest access to a run that `move_pages` took away from
                // the guest (`detach_run`): the lock above waited for the
                // move, so the retried access finds the new mapping.
                if let Some(u) = &inner.uffd {
                    u.wake(page_addr, PAGE_SIZE)?;
                }
                Ok(())
            }
        }
    }

    /// Resolves a missing fault: a guest access to a hole (a page it never
    /// wrote) in a run that `move_pages` took away from the guest (see
    /// `Inner::detach_run`; no other range is registered for missing
    /// faults). Taking the lock waits for the move; the woken access then
    /// faults on the new mapping.
    pub fn resolve_missing_fault(&self, event: &FaultEvent) -> Result<()> {
        let inner = self.inner.lock();
        if let Some(u) = &inner.uffd {
            u.wake(event.address & !(PAGE_SIZE - 1), PAGE_SIZE)?;
        }
        Ok(())
    }

    pub fn pool_stats(&self) -> Vec<PoolStats> {
        let inner = self.inner.lock();
        inner
            .pools
            .iter()
            .map(|p| PoolStats {
                node: p.node(),
                host_node: p.host_node(),
                capacity_pages: p.capacity(),
                used_pages: p.used(),
                free_pages: p.available(),
                warm_pages: p.warm_pages(),
                warm_cap_pages: p.warm_cap(),
                warm_reused_pages: p.warm_reused(),
                resident_bytes: p.resident_bytes(),
            })
            .collect()
    }

    /// Sets how much host memory each pool may keep in warm free pages
    /// (rounded down to pages; 0 turns them off). Warm pages above the new
    /// cap are punched at once.
    pub fn set_warm_cap(&self, bytes: usize) -> Result<()> {
        let pages = (bytes / PAGE_SIZE).min(u32::MAX as usize) as u32;
        for pool in &mut self.inner.lock().pools {
            pool.set_warm_cap(pages)?;
        }
        Ok(())
    }

    /// Gives the memory of every warm page back to the host (punches them).
    pub fn release_warm(&self) -> Result<()> {
        for pool in &mut self.inner.lock().pools {
            pool.release_warm()?;
        }
        Ok(())
    }

    pub fn space_stats(&self, vm: VmId) -> Result<GuestSpaceStats> {
        let inner = self.inner.lock();
        let space = inner.space(vm)?;
        let mut per_node = vec![0u64; inner.pools.len()];
        let mut mapped = 0;
        let mut shared = 0;
        for (_, e) in space.pmap.iter() {
            per_node[e.page.node()] += 1;
            mapped += 1;
            shared += e.flags.shared as u64;
        }
        Ok(GuestSpaceStats {
            vm,
            name: space.name.clone(),
            frames: space.frames(),
            mapped_pages: mapped,
            pages_per_node: per_node,
            shared_pages: shared,
            domain: space.domain.clone(),
        })
    }
}

impl Inner {
    pub(super) fn space(&self, vm: VmId) -> Result<&GuestSpace> {
        self.spaces
            .get(&vm)
            .with_context(|| format!("no guest space with id {vm}"))
    }
    pub(super) fn space_mut(&mut self, vm: VmId) -> Result<&mut GuestSpace> {
        self.spaces
            .get_mut(&vm)
            .with_context(|| format!("no guest space with id {vm}"))
    }

    /// Maps `count` frames from `first` to fresh pages of `node`, one mmap per
    /// run of consecutive pool pages.
    pub(super) fn map_fresh(
        &mut self,
        vm: VmId,
        first: Gfn,
        count: u64,
        node: NodeId,
    ) -> Result<()> {
        ensure!(node < self.pools.len(), "node {node} does not exist");
        let frames = self.space(vm)?.frames();
        ensure!(
            first + count <= frames,
            "frames {first:#x}+{count} are outside vm {vm} ({frames} frames)"
        );
        let pages = self.pools[node].alloc(count as u32)?;
        let base = self.space(vm)?.addr(first);
        let mut i = 0;
        while i < pages.len() {
            let mut run = 1;
            while i + run < pages.len() && pages[i + run] == pages[i] + run as u32 {
                run += 1;
            }
            if let Err(e) = self.map_run(base + i * PAGE_SIZE, node, pages[i], run, false) {
                // Give back what is not mapped yet; mapped frames are recorded below.
                for &p in &pages[i..] {
                    self.pools[node].free(p)?;
                }
                self.record_fresh(vm, first, &pages[..i], node);
                return Err(e);
            }
            i += run;
        }
        self.record_fresh(vm, first, &pages, node);
        Ok(())
    }

    fn record_fresh(&mut self, vm: VmId, first: Gfn, pages: &[u32], node: NodeId) {
        for (i, &index) in pages.iter().enumerate() {
            let page = MachinePage {
                node: node as u16,
                index,
            };
            let gfn = first + i as Gfn;
            self.memmap.add_owner(page, vm, gfn);
            self.spaces.get_mut(&vm).unwrap().pmap.set(
                gfn,
                Some(PmapEntry {
                    page,
                    flags: PageFlags::default(),
                }),
            );
        }
    }

    /// A new guest space with no frame mapped: the reserved range only.
    pub(super) fn reserve_space(
        &mut self,
        name: &str,
        domain: &str,
        node: NodeId,
        frames: u64,
    ) -> Result<(VmId, usize)> {
        let len = frames as usize * PAGE_SIZE;
        // Aligned to 2 MiB, so that a pool run at a like-aligned offset can
        // be mapped with large folios (the kernel needs the address and the
        // file offset aligned alike): reserve more, trim both ends.
        let align = 2 << 20;
        // SAFETY: a fresh reservation; nothing else uses this range.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + align,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        check_mmap(raw, "reserving guest RAM address space")?;
        let raw = raw as usize;
        let base = raw.next_multiple_of(align);
        // SAFETY: both ends lie inside the reservation just made and
        // outside the range kept.
        unsafe {
            if base > raw {
                libc::munmap(raw as *mut libc::c_void, base - raw);
            }
            libc::munmap((base + len) as *mut libc::c_void, raw + align - base);
        }
        let vm = self.next_vm;
        self.next_vm += 1;
        self.spaces.insert(
            vm,
            GuestSpace {
                name: name.to_string(),
                domain: domain.to_string(),
                home_node: node,
                cpu_node: node,
                base,
                pmap: Pmap::new(frames),
                unmergeable: Vec::new(),
                armed: Vec::new(),
            },
        );
        if let Some(sampler) = &self.sampler {
            sampler.register_space(vm, base, len);
        }
        Ok((vm, base))
    }

    /// Whether a new guest mapping asks for large shmem folios: when
    /// `[host] large_folios` allows it, the host allows some size (else
    /// asking changes nothing but the mappings' flags) and page sampling
    /// is off (a sampled page's touch must fault; see `folios.rs`).
    fn ask_large_folios(&self) -> bool {
        self.large_folios && !self.host_folio_kib.is_empty()
    }

    /// Maps a run of pool pages read-write and registers it for
    /// write-protect faults (the mmap dropped any earlier registration,
    /// including a page armed for a sample: its sample is forgotten), and
    /// for minor faults when the whole guest range samples in minor mode
    /// (`Inner::minor_everywhere`).
    ///
    /// `holds_data`: the pool pages already hold data (a copy, a shared
    /// page). In that mode such a mapping is populated before it is
    /// registered: otherwise its first touch would be a minor fault (page in
    /// the file, not mapped), an exit to the fault handler that samples
    /// nothing. Fresh pages are holes in the file and fault normally.
    pub(super) fn map_run(
        &self,
        addr: usize,
        node: NodeId,
        index: u32,
        pages: usize,
        holds_data: bool,
    ) -> Result<()> {
        let ask = self.ask_large_folios();
        self.folios_asked.set(self.folios_asked.get() || ask);
        map_pool_run(addr, &self.pools[node], index, pages, ask)?;
        let len = pages * PAGE_SIZE;
        if let Some(sampler) = &self.sampler {
            sampler.forget_pending(addr, len);
            if holds_data && self.minor_everywhere() {
                // SAFETY: populating page tables of a mapping made just above.
                let r = unsafe {
                    libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_READ)
                };
                if r != 0 {
                    tracing::debug!(
                        "MADV_POPULATE_READ {addr:#x}+{len:#x}: {}",
                        io::Error::last_os_error()
                    );
                }
            }
        }
        if let Some(uffd) = &self.uffd {
            uffd.register(addr, len, true, self.minor_everywhere())
                .context("registering guest pages with userfaultfd")?;
        }
        Ok(())
    }

    /// Whether sampling keeps the whole guest range in minor mode: when
    /// guest RAM does not ask for large folios. Arming only the sampled
    /// pages (`Memory::zap_frames`) costs four mode changes per sample,
    /// each taking the process's mmap lock for writing, and taking minor
    /// mode away (`UFFDIO_UNREGISTER`) invalidates KVM's mapping of the
    /// range: four 4 MiB guests on two nodes ran 40 % longer that way. It
    /// is worth that only where it keeps large folios.
    pub(super) fn minor_everywhere(&self) -> bool {
        self.sampler.is_some() && !self.ask_large_folios()
    }

    /// The sampler and the userfaultfd, when sampling is on.
    fn sampling_parts(&self) -> Result<(Arc<PageSampler>, Arc<Userfault>)> {
        let Some(sampler) = self.sampler.clone() else {
            bail!("page sampling is not enabled");
        };
        Ok((sampler, self.require_uffd()?.clone()))
    }

    /// Takes the armed runs of `vm` whose touch came, or that waited
    /// [`ARM_TIMEOUT`] in vain, out of minor mode (see `Memory::zap_frames`).
    ///
    /// A run of private frames is unregistered and registered again for
    /// write-protect faults alone (registering fewer modes over more does
    /// nothing, and unregistering clears the range's uffd-wp bits, of
    /// which private frames have none). A run with a write-protected frame
    /// is mapped again instead, as a merge maps its pages, and protected
    /// again: only with `paused` (its vCPUs held), else it stays armed.
    /// Frames that are holes now are left alone (not a pool mapping).
    /// Returns the frames of runs left armed only for want of a pause.
    fn disarm(
        &mut self,
        vm: VmId,
        sampler: &PageSampler,
        uffd: &Userfault,
        paused: bool,
    ) -> Result<u64> {
        let now = std::time::Instant::now();
        let armed = std::mem::take(&mut self.space_mut(vm)?.armed);
        let mut keep = Vec::new();
        let mut want_pause = 0;
        for (first, len, when) in armed {
            let space = self.space(vm)?;
            let (addr, bytes) = (space.addr(first), len as usize * PAGE_SIZE);
            let mapped: Vec<(Gfn, PmapEntry)> = (first..first + len)
                .filter_map(|g| space.pmap.get(g).map(|e| (g, e)))
                .collect();
            let protected = mapped.iter().any(|(_, e)| e.flags.write_protected);
            let waiting = now - when < ARM_TIMEOUT && sampler.any_pending(addr, bytes);
            if waiting || (protected && !paused) {
                if !waiting {
                    want_pause += len;
                }
                keep.push((first, len, when));
                continue;
            }
            sampler.forget_pending(addr, bytes);
            sampler.count_disarmed(protected);
            if protected {
                let mut i = 0;
                while i < mapped.len() {
                    // A run of frames on consecutive pages of one pool.
                    let (g, e) = mapped[i];
                    let mut n = 1;
                    while i + n < mapped.len()
                        && mapped[i + n].0 == g + n as Gfn
                        && mapped[i + n].1.page.node == e.page.node
                        && mapped[i + n].1.page.index == e.page.index + n as u32
                    {
                        n += 1;
                    }
                    self.map_run(space.addr(g), e.page.node(), e.page.index, n, true)?;
                    i += n;
                }
                let space = self.space(vm)?;
                let wp: Vec<Gfn> = mapped
                    .iter()
                    .filter(|(_, e)| e.flags.write_protected)
                    .map(|&(g, _)| g)
                    .collect();
                for (g, n) in super::runs::runs_of(&wp) {
                    uffd.write_protect(space.addr(g), n as usize * PAGE_SIZE, true)
                        .context("write-protecting shared pages after their sample")?;
                }
            } else {
                let gfns: Vec<Gfn> = mapped.iter().map(|&(g, _)| g).collect();
                for (g, n) in super::runs::runs_of(&gfns) {
                    let (a, l) = (space.addr(g), n as usize * PAGE_SIZE);
                    uffd.unregister(a, l)
                        .and_then(|()| uffd.register_wp(a, l))
                        .context("taking guest pages out of minor mode after their sample")?;
                }
            }
        }
        self.space_mut(vm)?.armed.extend(keep);
        Ok(want_pause)
    }

    pub(super) fn require_uffd(&self) -> Result<&Arc<Userfault>> {
        match &self.uffd {
            Some(u) => Ok(u),
            None => bail!(
                "page sharing needs userfaultfd write-protection, which is unavailable: {}",
                self.uffd_error
            ),
        }
    }

    /// [`Inner::protect_frame`] for many frames of `vm` (each mapped):
    /// one userfaultfd write-protect per run of consecutive frames not yet
    /// protected.
    pub(super) fn protect_frames(&mut self, vm: VmId, gfns: &[Gfn]) -> Result<()> {
        self.set_protection(vm, gfns, true)
    }

    /// [`Inner::unprotect_frame`] for many frames of `vm` (each mapped),
    /// one userfaultfd call per run of consecutive protected frames.
    pub(super) fn unprotect_frames(&mut self, vm: VmId, gfns: &[Gfn]) -> Result<()> {
        self.set_protection(vm, gfns, false)
    }

    fn set_protection(&mut self, vm: VmId, gfns: &[Gfn], protect: bool) -> Result<()> {
        let space = self.space(vm)?;
        let mut change = Vec::with_capacity(gfns.len());
        let mut entries = Vec::with_capacity(gfns.len());
        for &gfn in gfns {
            let Some(entry) = space.pmap.get(gfn) else {
                bail!("frame {gfn:#x} of vm {vm} is not mapped");
            };
            if entry.flags.write_protected != protect {
                change.push(gfn);
            }
            entries.push((gfn, entry.page));
        }
        change.sort_unstable();
        change.dedup();
        let base = space.base;
        let uffd = self.require_uffd()?.clone();
        for (first, len) in super::runs::runs_of(&change) {
            uffd.write_protect(
                base + first as usize * PAGE_SIZE,
                len as usize * PAGE_SIZE,
                protect,
            )
            .context(if protect {
                "write-protecting guest pages"
            } else {
                "lifting write protection from guest pages"
            })?;
        }
        let pmap = &mut self.space_mut(vm)?.pmap;
        for (gfn, page) in entries {
            let flags = PageFlags {
                shared: protect,
                write_protected: protect,
                released: false,
            };
            pmap.set(gfn, Some(PmapEntry { page, flags }));
        }
        Ok(())
    }

    /// Write-protects one frame (if it is not already) and marks it shared.
    pub(super) fn protect_frame(&mut self, vm: VmId, gfn: Gfn) -> Result<()> {
        let space = self.space(vm)?;
        let Some(entry) = space.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        if !entry.flags.write_protected {
            let addr = space.addr(gfn);
            self.require_uffd()?
                .write_protect(addr, PAGE_SIZE, true)
                .context("write-protecting a guest page")?;
        }
        self.space_mut(vm)?.pmap.set(
            gfn,
            Some(PmapEntry {
                page: entry.page,
                flags: PageFlags {
                    shared: true,
                    write_protected: true,
                    released: false,
                },
            }),
        );
        Ok(())
    }

    /// Lifts write protection from one frame and marks it private.
    pub(super) fn unprotect_frame(&mut self, vm: VmId, gfn: Gfn) -> Result<()> {
        let space = self.space(vm)?;
        let Some(entry) = space.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        if entry.flags.write_protected {
            let addr = space.addr(gfn);
            self.require_uffd()?
                .write_protect(addr, PAGE_SIZE, false)
                .context("lifting write protection from a guest page")?;
        }
        self.space_mut(vm)?.pmap.set(
            gfn,
            Some(PmapEntry {
                page: entry.page,
                flags: PageFlags::default(),
            }),
        );
        Ok(())
    }

    /// Maps `page` (already owned by someone) at `(vm, gfn)`, write-protected
    /// and shared, and records the new owner. The caller drops the frame's
    /// previous page.
    pub(super) fn map_onto(&mut self, vm: VmId, gfn: Gfn, page: MachinePage) -> Result<()> {
        self.map_onto_run(vm, gfn, page, 1)
    }

    /// [`Inner::map_onto`] for `len` consecutive frames from `first` onto
    /// `len` consecutive pages of one pool from `page`: one `mmap`, one
    /// registration, one write-protect (one VMA where the run's neighbours
    /// allow).
    pub(super) fn map_onto_run(
        &mut self,
        vm: VmId,
        first: Gfn,
        page: MachinePage,
        len: usize,
    ) -> Result<()> {
        let addr = self.space(vm)?.addr(first);
        self.map_run(addr, page.node(), page.index, len, true)?;
        self.require_uffd()?
            .write_protect(addr, len * PAGE_SIZE, true)
            .context("write-protecting shared guest pages")?;
        for i in 0..len {
            let (gfn, page) = (
                first + i as Gfn,
                MachinePage {
                    node: page.node,
                    index: page.index + i as u32,
                },
            );
            let flags = PageFlags {
                shared: true,
                write_protected: true,
                released: false,
            };
            self.space_mut(vm)?
                .pmap
                .set(gfn, Some(PmapEntry { page, flags }));
            self.memmap.add_owner(page, vm, gfn);
        }
        Ok(())
    }

    /// Gives `(vm, gfn)` a private writable copy of its page on `node`,
    /// and drops its ownership of the old page (kept warm if freed). The
    /// copy may land in a warm page: `copy_page` overwrites all of it
    /// before it is mapped.
    pub(super) fn replace_with_copy(
        &mut self,
        vm: VmId,
        gfn: Gfn,
        node: NodeId,
    ) -> Result<MachinePage> {
        let Some(old) = self.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        ensure!(node < self.pools.len(), "node {node} does not exist");
        // A full home pool (overcommitted guests) lends from another node:
        // a remote page beats a guest that cannot go on.
        let node = if self.pools[node].available() > 0 {
            node
        } else {
            (0..self.pools.len())
                .find(|&n| self.pools[n].available() > 0)
                .unwrap_or(node)
        };
        let index = self.pools[node].alloc_for_copy(1)?[0];
        let new = MachinePage {
            node: node as u16,
            index,
        };
        self.copy_page(old.page, new);
        let addr = self.space(vm)?.addr(gfn);
        if let Err(e) = self.map_run(addr, node, index, 1, true) {
            self.pools[node].free(index)?;
            return Err(e);
        }
        self.space_mut(vm)?.pmap.set(
            gfn,
            Some(PmapEntry {
                page: new,
                flags: PageFlags::default(),
            }),
        );
        self.memmap.add_owner(new, vm, gfn);
        self.drop_owner_keep_warm(old.page, vm, gfn)?;
        Ok(new)
    }

    /// `move_pages` for frames `first..first+count` of `vm` (consecutive),
    /// under the lock: private stretches move as runs, shared frames one by
    /// one. Errors only when the space is gone.
    fn move_frames(
        &mut self,
        vm: VmId,
        first: Gfn,
        count: usize,
        node: NodeId,
        report: &mut MoveReport,
    ) -> Result<()> {
        let frames = self.space(vm)?.frames();
        // Start of the pending stretch of private frames, if any.
        let mut private: Option<Gfn> = None;
        for gfn in first..first + count as Gfn {
            let entry = if gfn < frames {
                self.space(vm)?.pmap.get(gfn)
            } else {
                None
            };
            let is_private = entry.is_some_and(|e| !e.flags.shared && e.page.node() != node);
            if is_private {
                private.get_or_insert(gfn);
                continue;
            }
            if let Some(start) = private.take() {
                self.move_private_run(vm, start, (gfn - start) as usize, node, report)?;
            }
            match entry {
                None if gfn >= frames => report.failed.push((
                    gfn,
                    format!("frame {gfn:#x} is outside vm {vm} ({frames} frames)"),
                )),
                None => report
                    .failed
                    .push((gfn, format!("frame {gfn:#x} of vm {vm} is not mapped"))),
                Some(e) if e.page.node() == node => report.unchanged.push(gfn),
                Some(e) => {
                    let t = Instant::now();
                    match self.move_shared_page(e.page, node) {
                        Ok(_) => {
                            report.moved.push(gfn);
                            report.shared_moves += 1;
                        }
                        Err(err) => report.failed.push((gfn, format!("{err:#}"))),
                    }
                    report.times.shared_ns += t.elapsed().as_nanos() as u64;
                }
            }
        }
        if let Some(start) = private {
            let end = first + count as Gfn;
            self.move_private_run(vm, start, (end - start) as usize, node, report)?;
        }
        Ok(())
    }

    /// Moves private frames `first..first+count` of `vm` (all mapped, all
    /// elsewhere than `node`) to `node`: take the range away from the guest
    /// once (`detach_run`), then one piece per run of consecutive pages the
    /// pool hands out. On a failure the frames not moved yet keep their
    /// pages, and the guest gets them back.
    fn move_private_run(
        &mut self,
        vm: VmId,
        first: Gfn,
        count: usize,
        node: NodeId,
        report: &mut MoveReport,
    ) -> Result<()> {
        let addr = self.space(vm)?.addr(first);
        if !self.move_fits_anywhere(vm, first, count as u64) {
            let why = format!(
                "deferred: moving {count} frames from {first:#x} would take vm {vm} over its \
                 budget of kernel mappings"
            );
            for gfn in first..first + count as Gfn {
                report.failed.push((gfn, why.clone()));
            }
            return Ok(());
        }
        let t = Instant::now();
        if let Err(e) = self.detach_run(addr, count * PAGE_SIZE) {
            let why = format!("taking frames to migrate away from the guest: {e:#}");
            for gfn in first..first + count as Gfn {
                report.failed.push((gfn, why.clone()));
            }
            return Ok(());
        }
        report.times.protect_ns += t.elapsed().as_nanos() as u64;
        let mut done = 0;
        while done < count {
            let gfn = first + done as Gfn;
            match self.move_private_piece(vm, gfn, count - done, node, &mut report.times) {
                Ok(n) => {
                    report.moved.extend(gfn..gfn + n as Gfn);
                    report.runs += 1;
                    done += n;
                }
                Err(e) => {
                    let rest = (count - done) * PAGE_SIZE;
                    self.reattach_run(addr + done * PAGE_SIZE, rest);
                    let why = format!("{e:#}");
                    for g in gfn..first + count as Gfn {
                        report.failed.push((g, why.clone()));
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Makes sure no write reaches the old pages of `addr..addr+len` (a
    /// run of private frames about to be copied) until `map_run` puts the
    /// copies in their place. Every guest access that comes meanwhile waits
    /// in the fault handler, which needs the memory lock the move holds.
    ///
    /// Two ways, by what the kernel offers:
    /// * **unmap** (userfaultfd minor faults on shmem): register the range
    ///   for minor and missing faults too and drop its page-table entries
    ///   (`MADV_DONTNEED`; the pages stay in the pool). A touch is then a
    ///   minor fault, or a missing one for a page the guest never wrote (a
    ///   hole in the pool: without missing mode the kernel would fill it
    ///   there, in the old page, and the write would be lost), answered
    ///   after the move (`resolve_minor_fault`, `resolve_missing_fault`). The
    ///   `mmap` of the copies over an empty range costs next to nothing, so
    ///   each page-table entry is changed once.
    /// * **write-protect** (userfaultfd-wp only): reads go on during the
    ///   copy, a write waits. Each entry is changed twice (protected, then
    ///   unmapped by the `mmap`): about 130 ns more per page here, a third
    ///   of the memcpy of the page.
    ///
    /// Without userfaultfd nothing is done (a space no guest runs in).
    fn detach_run(&self, addr: usize, len: usize) -> Result<()> {
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        if !uffd.supports_minor() {
            return uffd
                .write_protect(addr, len, true)
                .context("write-protecting the run");
        }
        uffd.register_every_fault(addr, len)
            .context("registering the run for minor and missing faults")?;
        // SAFETY: drops page-table entries of a MAP_SHARED pool mapping of
        // guest RAM; the data stays in the pool file.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
            let e = io::Error::last_os_error();
            self.reattach_run(addr, len);
            return Err(e).context("unmapping the run from the guest");
        }
        Ok(())
    }

    /// Undoes `detach_run` for frames that stay where they are: the range
    /// gets its usual userfaultfd modes back, and a guest access waiting
    /// meanwhile is woken (it faults the old page in again, or, when
    /// sampling, is answered by the fault handler).
    fn reattach_run(&self, addr: usize, len: usize) {
        let Some(uffd) = &self.uffd else {
            return;
        };
        let undone = if uffd.supports_minor() {
            uffd.register(addr, len, true, self.minor_everywhere())
                .and_then(|()| uffd.wake(addr, len))
        } else {
            // Un-protecting also wakes a writer that faulted meanwhile: its
            // write lands in its old page.
            uffd.write_protect(addr, len, false)
        };
        if let Err(e) = undone {
            tracing::error!("giving frames that did not migrate back to the guest: {e}");
        }
    }

    /// One piece of a private run: as many frames from `first` (at most
    /// `want`) as the target pool has consecutive free pages for; copied,
    /// mapped with one `mmap`, recorded, old pages freed. Returns how many.
    fn move_private_piece(
        &mut self,
        vm: VmId,
        first: Gfn,
        want: usize,
        node: NodeId,
        times: &mut MoveTimes,
    ) -> Result<usize> {
        let t = Instant::now();
        // Copy targets: `copy_to_run` overwrites every page before the
        // `map_run` below, so warm pages (stale content) are allowed.
        let (start, len, warm) =
            self.pools[node].alloc_run_for_copy(want.min(u32::MAX as usize) as u32)?;
        let len = len as usize;
        let target = MachinePage {
            node: node as u16,
            index: start,
        };
        if !self.move_fits(vm, first, len as u64, target) {
            let mut fresh: Vec<u32> = (start..start + len as u32).collect();
            self.pools[node].free_many(&mut fresh)?;
            bail!(
                "deferred: moving {len} frames from {first:#x} would take vm {vm} over its \
                 budget of kernel mappings"
            );
        }
        let olds: Vec<MachinePage> = {
            let pmap = &self.space(vm)?.pmap;
            (0..len)
                .map(|i| pmap.get(first + i as Gfn).expect("a private frame").page)
                .collect()
        };
        let t1 = Instant::now();
        times.alloc_ns += (t1 - t).as_nanos() as u64;
        if let Err(e) = self.copy_to_run(&olds, node, start, warm) {
            // Punched on the way back: a partial copy leaves nothing behind.
            let mut fresh: Vec<u32> = (start..start + len as u32).collect();
            self.pools[node].free_many(&mut fresh)?;
            return Err(e);
        }
        let t2 = Instant::now();
        times.copy_ns += (t2 - t1).as_nanos() as u64;
        let addr = self.space(vm)?.addr(first);
        if let Err(e) = self.map_run(addr, node, start, len, true) {
            let mut fresh: Vec<u32> = (start..start + len as u32).collect();
            self.pools[node].free_many(&mut fresh)?;
            return Err(e);
        }
        let t3 = Instant::now();
        times.map_ns += (t3 - t2).as_nanos() as u64;
        let mut dropped = Vec::with_capacity(olds.len());
        for (i, &old) in olds.iter().enumerate() {
            let gfn = first + i as Gfn;
            let new = MachinePage {
                node: node as u16,
                index: start + i as u32,
            };
            self.space_mut(vm)?.pmap.set(
                gfn,
                Some(PmapEntry {
                    page: new,
                    flags: PageFlags::default(),
                }),
            );
            self.memmap.add_owner(new, vm, gfn);
            dropped.push((old, vm, gfn));
        }
        self.drop_owners(&dropped, true)?;
        times.free_ns += t3.elapsed().as_nanos() as u64;
        Ok(len)
    }

    /// Copies `olds` (any pages) into consecutive pages of `node` from
    /// `start`: one `copy_file_range` per run of consecutive old pages of
    /// one pool. The kernel copies page cache to page cache: no page fault
    /// on either pool view and no zeroing of the new pages (a copy through
    /// the views cost two page faults per page, ~8 us on the build hosts:
    /// docs/host-facts.md, "Memory and mappings").
    ///
    /// `warm`: the targets are warm pages (resident). Then the copy goes
    /// through the pool views instead, with memcpy: no allocation, and no
    /// page fault per page (`Pool::populate_view` maps the runs the views
    /// do not map yet with one `madvise` each, and skips the rest).
    pub(super) fn copy_to_run(
        &mut self,
        olds: &[MachinePage],
        node: NodeId,
        start: u32,
        warm: bool,
    ) -> Result<()> {
        if warm {
            return self.copy_to_warm_run(olds, node, start);
        }
        for (i, n) in pool_runs(olds) {
            let from = &self.pools[olds[i].node()];
            let to = &self.pools[node];
            let mut off_in = olds[i].index as i64 * PAGE_SIZE as i64;
            let mut off_out = (start + i as u32) as i64 * PAGE_SIZE as i64;
            let mut left = n * PAGE_SIZE;
            while left > 0 {
                // SAFETY: two pool memfds we own, offsets inside both files.
                let r = unsafe {
                    libc::copy_file_range(from.fd(), &mut off_in, to.fd(), &mut off_out, left, 0)
                };
                if r <= 0 {
                    let e = if r == 0 {
                        io::Error::from(io::ErrorKind::UnexpectedEof)
                    } else {
                        io::Error::last_os_error()
                    };
                    return Err(e).context("copying pages between memory pools");
                }
                left -= r as usize;
            }
        }
        Ok(())
    }

    fn copy_to_warm_run(&mut self, olds: &[MachinePage], node: NodeId, start: u32) -> Result<()> {
        self.pools[node].populate_view(start, olds.len() as u32, true);
        for (i, n) in pool_runs(olds) {
            let from = &mut self.pools[olds[i].node()];
            from.populate_view(olds[i].index, n as u32, false);
            let src = from.page_ptr(olds[i].index);
            let dst = self.pools[node].page_ptr(start + i as u32);
            // SAFETY: in-bounds runs of two pool views; the target run is
            // freshly allocated, so it cannot overlap the old pages.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, n * PAGE_SIZE) };
        }
        Ok(())
    }

    /// Removes one owner from a page; frees the page when none is left, and
    /// makes the last owner private again when one is left.
    pub(super) fn drop_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) -> Result<()> {
        self.drop_owner_with(page, vm, gfn, false)
    }

    /// `drop_owner` for migration's old pages: a freed page stays warm (a
    /// future copy target) while its pool has room.
    pub(super) fn drop_owner_keep_warm(
        &mut self,
        page: MachinePage,
        vm: VmId,
        gfn: Gfn,
    ) -> Result<()> {
        self.drop_owner_with(page, vm, gfn, true)
    }

    /// [`Inner::drop_owner`] for many `(page, vm, gfn)` at once: the pages
    /// left without an owner are freed per pool in one call (one hole per
    /// run of consecutive pages; warm while the pool has room when
    /// `keep_warm`).
    pub(super) fn drop_owners(
        &mut self,
        olds: &[(MachinePage, VmId, Gfn)],
        keep_warm: bool,
    ) -> Result<()> {
        let mut to_free: Vec<Vec<u32>> = vec![Vec::new(); self.pools.len()];
        let mut freed = Vec::new();
        for &(page, vm, gfn) in olds {
            if self.memmap.remove_owner(page, vm, gfn) {
                to_free[page.node()].push(page.index);
                freed.push(page);
            } else {
                self.after_owner_removed(page)?;
            }
        }
        for (n, mut pages) in to_free.into_iter().enumerate() {
            if pages.is_empty() {
                continue;
            }
            if keep_warm {
                self.pools[n].free_many_keep_warm(&mut pages)?;
            } else {
                self.pools[n].free_many(&mut pages)?;
            }
        }
        for page in freed {
            self.after_page_freed(page)?;
        }
        Ok(())
    }

    fn drop_owner_with(
        &mut self,
        page: MachinePage,
        vm: VmId,
        gfn: Gfn,
        keep_warm: bool,
    ) -> Result<()> {
        if self.memmap.remove_owner(page, vm, gfn) {
            let pool = &mut self.pools[page.node()];
            if keep_warm {
                pool.free_keep_warm(page.index)?;
            } else {
                pool.free(page.index)?;
            }
            self.after_page_freed(page)
        } else {
            self.after_owner_removed(page)
        }
    }

    /// `verify`'s part for warm pages: each pool keeps at most its cap, and
    /// a warm page is free (nobody owns it, no replica set names it).
    pub(super) fn verify_warm(&self, errors: &mut Vec<String>) {
        for pool in &self.pools {
            if pool.warm_pages() > pool.warm_cap() {
                errors.push(format!(
                    "pool of node {}: {} warm pages, above its cap of {}",
                    pool.node(),
                    pool.warm_pages(),
                    pool.warm_cap()
                ));
            }
            for index in pool.warm_list() {
                let page = MachinePage {
                    node: pool.node() as u16,
                    index,
                };
                if index >= pool.high_water() {
                    errors.push(format!("warm page {page} was never allocated"));
                }
                if let Some(info) = self.memmap.get(page) {
                    errors.push(format!(
                        "warm page {page} is owned by {:?} (stale content mapped)",
                        info.owners.to_vec()
                    ));
                }
                if self.replicas.contains(page) {
                    errors.push(format!("warm page {page} is in a replica set"));
                }
            }
        }
    }

    /// After a page was freed: it leaves its replica set, and the set's last
    /// copy, if it is the only one left, follows the one-owner rule.
    pub(super) fn after_page_freed(&mut self, page: MachinePage) -> Result<()> {
        match self.replicas.leave(page) {
            Some(last) => self.after_owner_removed(last),
            None => Ok(()),
        }
    }

    /// After an owner left a page that still has owners: a single remaining
    /// owner becomes private again, unless the page is one of several
    /// replicas (then it stays a protected copy of shared content).
    pub(super) fn after_owner_removed(&mut self, page: MachinePage) -> Result<()> {
        if self.replicas.contains(page) {
            return Ok(());
        }
        if let Some(info) = self.memmap.get(page) {
            let (last_vm, last_gfn) = info.owners.first();
            // A frame whose pmap entry is already gone belongs to a space
            // being destroyed, and one whose entry names another page was
            // remapped by a batch (`merge_batch`) that drops its old
            // ownership next: either way not an owner to unprotect.
            let live = self
                .spaces
                .get(&last_vm)
                .is_some_and(|s| s.pmap.get(last_gfn).is_some_and(|e| e.page == page));
            if info.owners.len() == 1 && live {
                self.unprotect_frame(last_vm, last_gfn)?;
            }
        }
        Ok(())
    }

    pub(super) fn copy_page(&self, from: MachinePage, to: MachinePage) {
        let src = self.pools[from.node()].page_ptr(from.index);
        let dst = self.pools[to.node()].page_ptr(to.index);
        // SAFETY: two distinct in-bounds pages of pool views.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE) };
    }

    pub(super) fn destroy(&mut self, vm: VmId) -> Result<()> {
        let space = self.space_mut(vm)?;
        let (base, len) = (space.base, space.frames() as usize * PAGE_SIZE);
        let owned: Vec<(Gfn, MachinePage)> = space.pmap.iter().map(|(g, e)| (g, e.page)).collect();
        // Empty the pmap and unmap first, so no access reaches pages being
        // freed; then drop ownership (which can make a frame of another
        // space the private last owner of its page).
        for &(gfn, _) in &owned {
            space.pmap.set(gfn, None);
        }
        // SAFETY: unmapping the range this module reserved for the space.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
        // Pages this space was the last owner of are freed per pool in one
        // batch (one hole per run).
        let mut to_free: Vec<Vec<u32>> = vec![Vec::new(); self.pools.len()];
        for (gfn, page) in owned {
            if self.memmap.remove_owner(page, vm, gfn) {
                to_free[page.node()].push(page.index);
                self.after_page_freed(page)?;
            } else {
                self.after_owner_removed(page)?;
            }
        }
        for (node, mut pages) in to_free.into_iter().enumerate() {
            self.pools[node].free_many(&mut pages)?;
        }
        self.memmap.forget_vm(vm);
        self.spaces.remove(&vm);
        self.pausers.remove(&vm);
        self.cow.per_vm.remove(&vm);
        if let Some(sampler) = &self.sampler {
            sampler.unregister_space(vm);
        }
        Ok(())
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        let ids: Vec<VmId> = self.inner.get_mut().spaces.keys().copied().collect();
        for vm in ids {
            let _ = self.inner.get_mut().destroy(vm);
        }
    }
}

/// The host's memory, in pages.
pub fn host_pages() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(1) as u64
}

/// Pages the pool of a node with `memory_bytes` holds: the node's memory,
/// capped at the host's ([`Memory::for_topology`]).
pub fn pool_capacity_pages(memory_bytes: u64) -> u32 {
    (memory_bytes / PAGE_SIZE as u64)
        .clamp(1, host_pages())
        .min(u32::MAX as u64) as u32
}

/// Each node's pool capacity in pages for `topology`: the node's memory
/// capped at the host's ([`pool_capacity_pages`]), and with `limit_bytes`
/// the limit split across the nodes in proportion to their memory.
pub fn pool_capacities(topology: &Topology, limit_bytes: Option<u64>) -> Vec<u32> {
    let total: u64 = topology
        .nodes
        .iter()
        .map(|n| n.memory_bytes)
        .sum::<u64>()
        .max(1);
    topology
        .nodes
        .iter()
        .map(|n| {
            let full = pool_capacity_pages(n.memory_bytes);
            match limit_bytes {
                None => full,
                Some(limit) => {
                    let share = (limit as u128 * n.memory_bytes as u128 / total as u128) as u64;
                    full.min((share / PAGE_SIZE as u64).max(1).min(u32::MAX as u64) as u32)
                }
            }
        })
        .collect()
}

const MAP_COUNT_PATH: &str = "/proc/sys/vm/max_map_count";
/// The kernel's ceiling for `vm.max_map_count` (an `int`).
const MAP_COUNT_CEILING: u64 = i32::MAX as u64;

/// Memory mappings (`vm.max_map_count`) that guest spaces of these frame
/// counts may need at worst under a budget of one mapping per
/// `frames_per_mapping` frames (0: one per guest page): see
/// [`super::budget::map_count_needed`].
pub fn map_count_needed(frames: impl IntoIterator<Item = u64>, frames_per_mapping: u64) -> u64 {
    super::budget::map_count_needed(frames, frames_per_mapping)
}

fn current_map_count() -> Result<u64> {
    std::fs::read_to_string(MAP_COUNT_PATH)
        .context("reading vm.max_map_count")?
        .trim()
        .parse()
        .context("parsing vm.max_map_count")
}

/// Whether [`crate::leftovers::ensure_map_count`] would succeed for `needed`, changing
/// nothing: the limit is high enough already, or this process runs as root
/// and the ceiling allows it. The error says what to do.
pub fn check_map_count(needed: u64) -> Result<()> {
    let current = current_map_count()?;
    if needed <= current {
        return Ok(());
    }
    let target = map_count_target(needed, current);
    ensure!(
        needed <= MAP_COUNT_CEILING,
        "guest RAM may need up to {needed} memory mappings, above the kernel's limit of \
         {MAP_COUNT_CEILING} for vm.max_map_count"
    );
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "guest RAM may need up to {needed} memory mappings but vm.max_map_count is {current}; \
         run disco as root (it raises the limit) or run `sysctl -w vm.max_map_count={target}`"
    );
    Ok(())
}

/// Leave room to grow so that a raise does not happen on every VM.
fn map_count_target(needed: u64, current: u64) -> u64 {
    (needed.max(current) * 2).min(MAP_COUNT_CEILING)
}
