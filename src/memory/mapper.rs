//! The mapper: the only code that changes a guest's host mappings.
//!
//! Every operation takes the one memory lock, changes the host mapping with
//! `mmap(MAP_FIXED)`, and updates the pmap, the memmap and the pool
//! allocators before releasing it, so the four never disagree for longer
//! than one locked section. KVM sees the new mapping on the guest's next
//! access to the page through its MMU notifiers (verified on this host, see
//! FACTS.md), so no memory-slot change is needed.
//!
//! Policies (sharing, migration, replication) decide *what* to change and
//! call the mapper; they never touch a mapping themselves.

use std::collections::BTreeMap;
use std::io;

use anyhow::{bail, ensure, Context, Result};
use parking_lot::Mutex;
use serde::Serialize;

use super::memmap::Memmap;
use super::pmap::{PageFlags, Pmap, PmapEntry};
use super::pool::Pool;
use super::{Gfn, MachinePage, NodeId, VmId};
use crate::topology::Topology;
use crate::PAGE_SIZE;

/// Process-wide budget of memory mappings (`vm.max_map_count`) reserved for
/// things other than guest RAM (libraries, thread stacks, pool views).
const MAP_COUNT_MARGIN: u64 = 4096;

/// One VM's guest-physical space: a host virtual range and its pmap.
struct GuestSpace {
    name: String,
    base: usize,
    pmap: Pmap,
}

impl GuestSpace {
    fn frames(&self) -> u64 {
        self.pmap.frames()
    }
    fn addr(&self, gfn: Gfn) -> usize {
        self.base + gfn as usize * PAGE_SIZE
    }
}

struct Inner {
    pools: Vec<Pool>,
    memmap: Memmap,
    spaces: BTreeMap<VmId, GuestSpace>,
    next_vm: VmId,
}

/// All machine memory of one monitor, behind one lock.
pub struct Memory {
    inner: Mutex<Inner>,
}

/// Pages of one pool, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStats {
    pub node: NodeId,
    pub host_node: u32,
    pub capacity_pages: u32,
    pub used_pages: u32,
    pub free_pages: u32,
    /// Host memory the pool really occupies.
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
    pub shared_pages: u64,
}

fn check_mmap(ret: *mut libc::c_void, what: &str) -> Result<()> {
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(())
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

/// Maps `pages` consecutive pool pages starting at `index` at `addr`.
fn map_pool_run(addr: usize, pool: &Pool, index: u32, pages: usize, writable: bool) -> Result<()> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
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
    check_mmap(ret, "mapping pool pages into guest RAM")
}

impl Memory {
    /// One pool per node of `topology`, on the host node it is mapped to.
    /// A pool can hold as much as its node's memory, capped at the host's
    /// memory (pools are sparse: capacity costs nothing until used).
    pub fn for_topology(topology: &Topology) -> Result<Memory> {
        // SAFETY: sysconf has no preconditions.
        let host_pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(1) as u64;
        let pools = topology
            .nodes
            .iter()
            .map(|n| {
                let pages = (n.memory_bytes / PAGE_SIZE as u64).clamp(1, host_pages);
                (n.index, n.host_node, pages.min(u32::MAX as u64) as u32)
            })
            .collect::<Vec<_>>();
        Memory::new(&pools)
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
        Ok(Memory {
            inner: Mutex::new(Inner {
                pools: built,
                memmap: Memmap::default(),
                spaces: BTreeMap::new(),
                next_vm: 0,
            }),
        })
    }

    pub fn node_count(&self) -> usize {
        self.inner.lock().pools.len()
    }

    /// Creates a guest space of `frames` pages, every page backed by a fresh
    /// (zeroed) machine page of `node`. Returns its id and the host address
    /// of guest-physical 0.
    pub fn create_space(&self, name: &str, frames: u64, node: NodeId) -> Result<(VmId, usize)> {
        ensure!(frames > 0, "a guest space needs at least one page");
        let mut inner = self.inner.lock();
        ensure!(
            node < inner.pools.len(),
            "node {node} does not exist (this topology has {} nodes)",
            inner.pools.len()
        );
        // Worst case every guest page ends up in its own VMA (after sharing
        // or migration), so budget for that now rather than fail later.
        let budget: u64 = inner.spaces.values().map(|s| s.frames() + 1).sum::<u64>() + frames + 1;
        ensure_map_count(budget + MAP_COUNT_MARGIN)?;

        let len = frames as usize * PAGE_SIZE;
        // SAFETY: a fresh reservation; nothing else uses this range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        check_mmap(base, "reserving guest RAM address space")?;
        let base = base as usize;
        let vm = inner.next_vm;
        inner.next_vm += 1;
        inner.spaces.insert(
            vm,
            GuestSpace {
                name: name.to_string(),
                base,
                pmap: Pmap::new(frames),
            },
        );
        let result = inner.map_fresh(vm, 0, frames, node);
        if let Err(e) = result {
            inner.destroy(vm).ok();
            return Err(e.context(format!("building guest RAM of {name}")));
        }
        Ok((vm, base))
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

    /// Moves a frame's content to a fresh page on `node`: copy, remap, free
    /// the old page if this was its last owner. The caller makes sure the
    /// guest does not write the page meanwhile (quiesced or write-protected).
    pub fn move_page(&self, vm: VmId, gfn: Gfn, node: NodeId) -> Result<MachinePage> {
        let mut inner = self.inner.lock();
        let Some(old) = inner.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        ensure!(node < inner.pools.len(), "node {node} does not exist");
        let index = inner.pools[node].alloc(1)?[0];
        let new = MachinePage {
            node: node as u16,
            index,
        };
        inner.copy_page(old.page, new);
        let addr = inner.space(vm)?.addr(gfn);
        let writable = !old.flags.write_protected;
        if let Err(e) = map_pool_run(addr, &inner.pools[node], index, 1, writable) {
            inner.pools[node].free(index)?;
            return Err(e);
        }
        inner.space_mut(vm)?.pmap.set(
            gfn,
            Some(PmapEntry {
                page: new,
                flags: PageFlags {
                    shared: false,
                    ..old.flags
                },
            }),
        );
        inner.memmap.add_owner(new, vm, gfn);
        inner.drop_owner(old.page, vm, gfn)?;
        Ok(new)
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
        let flags = PageFlags {
            shared: true,
            write_protected: true,
        };
        let page = src.page;
        for (vm, gfn) in [(src_vm, src_gfn), (dst_vm, dst_gfn)] {
            let addr = inner.space(vm)?.addr(gfn);
            map_pool_run(addr, &inner.pools[page.node()], page.index, 1, false)?;
            inner
                .space_mut(vm)?
                .pmap
                .set(gfn, Some(PmapEntry { page, flags }));
        }
        inner.memmap.add_owner(page, dst_vm, dst_gfn);
        if let Some(old) = dst_old {
            inner.drop_owner(old.page, dst_vm, dst_gfn)?;
        }
        Ok(())
    }

    /// Copies a frame's content as the guest sees it (through its mapping).
    pub fn read_guest_page(&self, vm: VmId, gfn: Gfn) -> Result<Vec<u8>> {
        let inner = self.inner.lock();
        let space = inner.space(vm)?;
        ensure!(
            space.pmap.get(gfn).is_some(),
            "frame {gfn:#x} of vm {vm} is not mapped"
        );
        // SAFETY: the frame is mapped readable (checked under the lock).
        let bytes = unsafe { std::slice::from_raw_parts(space.addr(gfn) as *const u8, PAGE_SIZE) };
        Ok(bytes.to_vec())
    }

    /// Writes a frame through the guest's own mapping, as a guest store would.
    pub fn write_guest_page(&self, vm: VmId, gfn: Gfn, data: &[u8]) -> Result<()> {
        ensure!(data.len() == PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
        let inner = self.inner.lock();
        let space = inner.space(vm)?;
        let Some(entry) = space.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        ensure!(
            !entry.flags.write_protected,
            "frame {gfn:#x} of vm {vm} is write-protected"
        );
        // SAFETY: the frame is mapped writable (checked under the lock).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), space.addr(gfn) as *mut u8, PAGE_SIZE)
        };
        Ok(())
    }

    /// The pmap entry of a frame.
    pub fn lookup(&self, vm: VmId, gfn: Gfn) -> Result<Option<PmapEntry>> {
        Ok(self.inner.lock().space(vm)?.pmap.get(gfn))
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
                resident_bytes: p.resident_bytes(),
            })
            .collect()
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
        })
    }

    /// Checks every invariant of machine memory against the kernel's view:
    ///
    /// 1. every pmap entry maps, in the host range, exactly the pool page it
    ///    names (same memfd inode and offset, `MAP_SHARED`), writable unless
    ///    write-protected; every unmapped frame is an inaccessible hole;
    /// 2. every memmap page's refcount equals its number of owners, and each
    ///    owner's pmap entry names that page; every pmap entry is listed as an
    ///    owner (so a page is never used without being accounted);
    /// 3. no page is both free in its pool and used in the memmap, every page
    ///    handed out by a pool is used (no leak), and pool counters agree.
    ///
    /// Returns every violation found, not just the first.
    pub fn verify(&self) -> Result<()> {
        let inner = self.inner.lock();
        let maps = read_proc_maps()?;
        let mut errors = Vec::new();
        let pool_by_inode: BTreeMap<u64, usize> =
            inner.pools.iter().map(|p| (p.inode(), p.node())).collect();

        for (&vm, space) in &inner.spaces {
            let end = space.base + space.frames() as usize * PAGE_SIZE;
            let mut covered = space.base;
            for m in maps.iter().filter(|m| m.end > space.base && m.start < end) {
                // Neighbouring spaces' holes may merge into one VMA, so a
                // mapping can start before this space and end after it.
                if m.start.max(space.base) != covered {
                    errors.push(format!(
                        "vm {vm}: host range {covered:#x}..{:#x} is not mapped at all",
                        m.start
                    ));
                }
                covered = m.end.min(end);
                let mut addr = m.start.max(space.base);
                while addr < m.end.min(end) {
                    let gfn = ((addr - space.base) / PAGE_SIZE) as Gfn;
                    let entry = space.pmap.get(gfn);
                    let seen = match pool_by_inode.get(&m.inode) {
                        Some(&node) if m.inode != 0 => Some(MachinePage {
                            node: node as u16,
                            index: ((m.offset + (addr - m.start) as u64) / PAGE_SIZE as u64) as u32,
                        }),
                        _ => None,
                    };
                    match entry {
                        Some(e) => {
                            if seen != Some(e.page) || !m.shared {
                                errors.push(format!(
                                    "vm {vm} gfn {gfn:#x}: pmap says {} but the host maps {}",
                                    e.page,
                                    m.describe()
                                ));
                            }
                            if m.writable == e.flags.write_protected || !m.readable {
                                errors.push(format!(
                                    "vm {vm} gfn {gfn:#x}: write_protected={} but host permissions are {}",
                                    e.flags.write_protected, m.perms
                                ));
                            }
                        }
                        None => {
                            if seen.is_some() || m.readable || m.writable {
                                errors.push(format!(
                                    "vm {vm} gfn {gfn:#x}: unmapped in the pmap but the host maps {}",
                                    m.describe()
                                ));
                            }
                        }
                    }
                    addr += PAGE_SIZE;
                }
            }
            if covered != end {
                errors.push(format!("vm {vm}: host range ends unmapped at {covered:#x}"));
            }
            for (gfn, e) in space.pmap.iter() {
                match inner.memmap.get(e.page) {
                    Some(info) if info.owners.contains(&(vm, gfn)) => {}
                    _ => errors.push(format!(
                        "vm {vm} gfn {gfn:#x} maps {} but the memmap does not list it as an owner",
                        e.page
                    )),
                }
                if inner.pools[e.page.node()].is_free(e.page.index) {
                    errors.push(format!(
                        "vm {vm} gfn {gfn:#x} maps {} which is free",
                        e.page
                    ));
                }
            }
        }

        for (page, info) in inner.memmap.iter() {
            if info.refcount as usize != info.owners.len() || info.refcount == 0 {
                errors.push(format!(
                    "{page}: refcount {} but {} owners",
                    info.refcount,
                    info.owners.len()
                ));
            }
            for &(vm, gfn) in &info.owners {
                let actual = inner.spaces.get(&vm).and_then(|s| s.pmap.get(gfn));
                if actual.map(|e| e.page) != Some(*page) {
                    errors.push(format!("{page}: owner ({vm}, {gfn:#x}) does not map it"));
                }
            }
            if info.owners.len() > 1
                && info.owners.iter().any(|&(vm, gfn)| {
                    inner
                        .spaces
                        .get(&vm)
                        .and_then(|s| s.pmap.get(gfn))
                        .is_some_and(|e| !e.flags.write_protected)
                })
            {
                errors.push(format!(
                    "{page}: shared by {} owners but writable by one",
                    info.owners.len()
                ));
            }
        }
        for pool in &inner.pools {
            let mut used = 0u32;
            for index in 0..pool.high_water() {
                let page = MachinePage {
                    node: pool.node() as u16,
                    index,
                };
                let in_use = inner.memmap.get(page).is_some();
                let free = pool.is_free(index);
                match (in_use, free) {
                    (true, true) => errors.push(format!("{page} is both free and in use")),
                    (false, false) => {
                        errors.push(format!("{page} is allocated but nobody owns it (leak)"))
                    }
                    (true, false) => used += 1,
                    (false, true) => {}
                }
            }
            if used != pool.used() {
                errors.push(format!(
                    "pool of node {}: counts {} used pages, memmap has {used}",
                    pool.node(),
                    pool.used()
                ));
            }
        }
        if let Some((page, _)) = inner.memmap.iter().find(|(p, _)| {
            p.node() >= inner.pools.len() || p.index >= inner.pools[p.node()].high_water()
        }) {
            errors.push(format!("{page} is in the memmap but was never allocated"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            let shown = errors.len().min(20);
            bail!(
                "memory invariants violated ({} problems):\n  {}",
                errors.len(),
                errors[..shown].join("\n  ")
            )
        }
    }
}

impl Inner {
    fn space(&self, vm: VmId) -> Result<&GuestSpace> {
        self.spaces
            .get(&vm)
            .with_context(|| format!("no guest space with id {vm}"))
    }
    fn space_mut(&mut self, vm: VmId) -> Result<&mut GuestSpace> {
        self.spaces
            .get_mut(&vm)
            .with_context(|| format!("no guest space with id {vm}"))
    }

    /// Maps `count` frames from `first` to fresh pages of `node`, one mmap per
    /// run of consecutive pool pages.
    fn map_fresh(&mut self, vm: VmId, first: Gfn, count: u64, node: NodeId) -> Result<()> {
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
            if let Err(e) =
                map_pool_run(base + i * PAGE_SIZE, &self.pools[node], pages[i], run, true)
            {
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

    /// Removes one owner from a page and frees the page when none is left.
    fn drop_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) -> Result<()> {
        if self.memmap.remove_owner(page, vm, gfn) {
            self.pools[page.node()].free(page.index)?;
        }
        Ok(())
    }

    fn copy_page(&self, from: MachinePage, to: MachinePage) {
        let src = self.pools[from.node()].page_ptr(from.index);
        let dst = self.pools[to.node()].page_ptr(to.index);
        // SAFETY: two distinct in-bounds pages of pool views.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE) };
    }

    fn destroy(&mut self, vm: VmId) -> Result<()> {
        let space = self
            .spaces
            .remove(&vm)
            .with_context(|| format!("no guest space with id {vm}"))?;
        // SAFETY: unmapping the range this module reserved for the space.
        unsafe {
            libc::munmap(
                space.base as *mut libc::c_void,
                space.frames() as usize * PAGE_SIZE,
            )
        };
        for (gfn, e) in space.pmap.iter() {
            self.drop_owner(e.page, vm, gfn)?;
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

/// One line of `/proc/self/maps`.
struct HostMapping {
    start: usize,
    end: usize,
    perms: String,
    readable: bool,
    writable: bool,
    shared: bool,
    offset: u64,
    inode: u64,
}

impl HostMapping {
    fn describe(&self) -> String {
        if self.inode == 0 {
            format!("anonymous {}", self.perms)
        } else {
            format!(
                "inode {} offset {:#x} {}",
                self.inode, self.offset, self.perms
            )
        }
    }
}

fn read_proc_maps() -> Result<Vec<HostMapping>> {
    let text = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let b = perms.as_bytes();
        out.push(HostMapping {
            start: usize::from_str_radix(s, 16)?,
            end: usize::from_str_radix(e, 16)?,
            perms: perms.to_string(),
            readable: b.first() == Some(&b'r'),
            writable: b.get(1) == Some(&b'w'),
            shared: b.get(3) == Some(&b's'),
            offset: u64::from_str_radix(offset, 16)?,
            inode: inode.parse()?,
        });
    }
    Ok(out)
}

/// Makes sure the process may hold `needed` memory mappings: raises
/// `vm.max_map_count` when running as root, or fails with what to do.
fn ensure_map_count(needed: u64) -> Result<()> {
    const PATH: &str = "/proc/sys/vm/max_map_count";
    let current: u64 = std::fs::read_to_string(PATH)
        .context("reading vm.max_map_count")?
        .trim()
        .parse()
        .context("parsing vm.max_map_count")?;
    if needed <= current {
        return Ok(());
    }
    // Leave room to grow so that this does not happen on every VM.
    let target = needed.max(current) * 2;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && std::fs::write(PATH, target.to_string()).is_ok() {
        tracing::info!("raised vm.max_map_count from {current} to {target} for guest RAM mappings");
        return Ok(());
    }
    bail!(
        "guest RAM may need up to {needed} memory mappings but vm.max_map_count is {current}; \
         run disco as root (it raises the limit) or run `sysctl -w vm.max_map_count={target}`"
    )
}
