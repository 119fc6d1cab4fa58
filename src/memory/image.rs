//! A guest space's memory as an image of machine pages, and guest spaces
//! built from one: what snapshots, restores and clones need from the
//! mapper (and what a migration stream can reuse).
//!
//! * [`Memory::image_chunk`] reads one stretch of a VM's frames: each
//!   machine page once, with every frame of the VM that maps it (the
//!   memmap's owners), skipping holes (pool pages never written: `mincore`
//!   on the pool view, as the sharing scanner does) and pages of zeros.
//! * [`Memory::create_spaces_from_image`] builds N guest spaces from such
//!   pages: each page is loaded **once per node** into that node's pool and
//!   mapped into every space on the node, write-protected and shared when
//!   it has more than one owner (the mapper's rule `shared ==
//!   write_protected == refcount > 1`), so copy-on-write gives a clone its
//!   own copy only of what it writes. Frames the image leaves out get fresh
//!   pages (holes in the pool: no host memory until written), as a new
//!   space's do. Each batch of pages is mapped in runs: one `mmap` per run
//!   of consecutive frames onto consecutive pool pages, one ranged
//!   userfaultfd write-protect per shared run.

use anyhow::{bail, ensure, Context, Result};

use super::mapper::{GuestSpace, Inner, Memory};
use super::pmap::{PageFlags, Pmap, PmapEntry};
use super::{Gfn, MachinePage, NodeId, VmId};
use crate::PAGE_SIZE;

/// One machine page of an image: its bytes and the frames that map it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageImage {
    /// Ascending, at least one.
    pub frames: Vec<Gfn>,
    /// `PAGE_SIZE` bytes.
    pub bytes: Vec<u8>,
}

/// One guest space to build from an image.
#[derive(Clone, Debug)]
pub struct SpaceRequest {
    pub name: String,
    pub domain: String,
    /// The node whose pool backs it (and takes its copy-on-write copies).
    pub node: NodeId,
}

/// What [`Memory::create_spaces_from_image`] built.
#[derive(Clone, Debug, Default)]
pub struct ImageLoad {
    /// Per request, in order: the space and the host address of its
    /// guest-physical 0.
    pub spaces: Vec<(VmId, usize)>,
    /// Image pages loaded into each node's pool (once per node).
    pub pages_per_node: Vec<u64>,
    /// Frames (of all spaces) mapped onto image pages.
    pub frames_mapped: u64,
}

/// Pages loaded per hold of the memory lock.
pub const IMAGE_BATCH: usize = 512;

impl Memory {
    /// The pages of `vm`'s frames in `gfns` not yet in `recorded` (one bit
    /// per frame of the space, set here for every frame handled), under one
    /// hold of the memory lock: each machine page once with all the VM's
    /// frames that map it, holes and zero pages left out. Read through the
    /// pool views; the caller keeps the VM paused so the bytes hold still.
    pub fn image_chunk(
        &self,
        vm: VmId,
        gfns: std::ops::Range<Gfn>,
        recorded: &mut [bool],
    ) -> Result<Vec<PageImage>> {
        let inner = self.inner.lock();
        let space = inner.space(vm)?;
        ensure!(
            recorded.len() as u64 == space.frames(),
            "the record of frames has {} entries, vm {vm} {} frames",
            recorded.len(),
            space.frames()
        );
        let end = gfns.end.min(space.frames());
        let mut out = Vec::new();
        for gfn in gfns.start.min(end)..end {
            if recorded[gfn as usize] {
                continue;
            }
            recorded[gfn as usize] = true;
            let Some(entry) = space.pmap.get(gfn) else {
                continue;
            };
            let pool = &inner.pools[entry.page.node()];
            if !pool.page_resident(entry.page.index) {
                continue;
            }
            let ptr = pool.page_ptr(entry.page.index);
            // SAFETY: an in-bounds page of a pool view.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, PAGE_SIZE) };
            if bytes.iter().all(|&b| b == 0) {
                continue;
            }
            let mut frames = vec![gfn];
            if let Some(info) = inner.memmap.get(entry.page) {
                for (owner, g) in info.owners.iter() {
                    if owner == vm && g != gfn && !recorded[g as usize] {
                        recorded[g as usize] = true;
                        frames.push(g);
                    }
                }
            }
            frames.sort_unstable();
            out.push(PageImage {
                frames,
                bytes: bytes.to_vec(),
            });
        }
        Ok(out)
    }

    /// Builds one guest space of `frames` frames per request from `pages`
    /// (see the module doc). On any error, from the pages (a bad file) or
    /// the mapper (a full pool), every space made so far is destroyed and
    /// every page given back: nothing is left half-built.
    pub fn create_spaces_from_image(
        &self,
        frames: u64,
        requests: &[SpaceRequest],
        pages: impl Iterator<Item = Result<PageImage>>,
    ) -> Result<ImageLoad> {
        ensure!(frames > 0, "a guest space needs at least one page");
        ensure!(!requests.is_empty(), "no guest space to build");
        let mut load = ImageLoad::default();
        let result = self.load_image(frames, requests, pages, &mut load);
        if let Err(e) = result {
            let mut inner = self.inner.lock();
            for &(vm, _) in &load.spaces {
                if let Err(d) = inner.destroy(vm) {
                    tracing::warn!("undoing a failed image load, vm {vm}: {d:#}");
                }
            }
            return Err(e);
        }
        Ok(load)
    }

    fn load_image(
        &self,
        frames: u64,
        requests: &[SpaceRequest],
        pages: impl Iterator<Item = Result<PageImage>>,
        load: &mut ImageLoad,
    ) -> Result<()> {
        // The spaces, empty (every frame a hole).
        {
            let mut inner = self.inner.lock();
            let nodes = inner.pools.len();
            for r in requests {
                ensure!(
                    r.node < nodes,
                    "node {} does not exist (this topology has {nodes} nodes)",
                    r.node
                );
            }
            load.pages_per_node = vec![0; nodes];
            let needed = inner.map_count_for(&vec![frames; requests.len()]);
            crate::leftovers::ensure_map_count(needed, &mut inner.map_count)?;
            for r in requests {
                let (vm, base) = inner.reserve_space(&r.name, &r.domain, r.node, frames)?;
                load.spaces.push((vm, base));
            }
        }
        // Which spaces each node's copy of a page serves.
        let mut groups: Vec<(NodeId, Vec<VmId>)> = Vec::new();
        for (r, &(vm, _)) in requests.iter().zip(&load.spaces) {
            match groups.iter_mut().find(|g| g.0 == r.node) {
                Some(g) => g.1.push(vm),
                None => groups.push((r.node, vec![vm])),
            }
        }
        let mut batch = Vec::with_capacity(IMAGE_BATCH);
        let mut pages = pages.peekable();
        while pages.peek().is_some() {
            batch.clear();
            while batch.len() < IMAGE_BATCH {
                match pages.next() {
                    Some(page) => batch.push(page?),
                    None => break,
                }
            }
            let mut inner = self.inner.lock();
            for (node, vms) in &groups {
                load.frames_mapped += inner.load_batch(*node, vms, &batch, frames)?;
                load.pages_per_node[*node] += batch.len() as u64;
            }
        }
        // The frames no page named: fresh pages, as a new space's.
        let mut inner = self.inner.lock();
        for (r, &(vm, _)) in requests.iter().zip(&load.spaces) {
            let empty: Vec<Gfn> = {
                let pmap = &inner.space(vm)?.pmap;
                (0..frames).filter(|&g| pmap.get(g).is_none()).collect()
            };
            for (first, count) in super::runs::runs_of(&empty) {
                inner.map_fresh(vm, first, count, r.node)?;
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Maps `vm`'s frames `first..first+n` onto pool pages
    /// `index..index+n` of `node` with one `mmap`, write-protected and
    /// flagged shared when `shared`, and records each frame in the pmap and
    /// as its page's owner in the memmap. Restores, clones and incoming
    /// migrations build their spaces with it.
    pub(super) fn map_owned_run(
        &mut self,
        vm: VmId,
        first: Gfn,
        node: NodeId,
        index: u32,
        n: usize,
        shared: bool,
    ) -> Result<()> {
        let addr = self.space(vm)?.addr(first);
        self.map_run(addr, node, index, n, true)?;
        if shared {
            self.require_uffd()?
                .write_protect(addr, n * PAGE_SIZE, true)
                .context("write-protecting shared guest pages")?;
        }
        let flags = PageFlags {
            shared,
            write_protected: shared,
            released: false,
        };
        for k in 0..n {
            let (gfn, page) = (
                first + k as Gfn,
                MachinePage {
                    node: node as u16,
                    index: index + k as u32,
                },
            );
            self.space_mut(vm)?
                .pmap
                .set(gfn, Some(PmapEntry { page, flags }));
            self.memmap.add_owner(page, vm, gfn);
        }
        Ok(())
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
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("reserving guest RAM address space");
        }
        let base = base as usize;
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
            },
        );
        if let Some(sampler) = &self.sampler {
            sampler.register_space(vm, base, len);
        }
        Ok((vm, base))
    }

    /// Loads `batch` once into `node`'s pool and maps every page into each
    /// of `vms` at its frames. Returns the frames mapped. On an error the
    /// pages no frame maps yet are freed (the caller destroys the spaces).
    fn load_batch(
        &mut self,
        node: NodeId,
        vms: &[VmId],
        batch: &[PageImage],
        frames: u64,
    ) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        // Check the batch before anything is mapped.
        let mut named: Vec<Gfn> = batch
            .iter()
            .flat_map(|p| p.frames.iter().copied())
            .collect();
        named.sort_unstable();
        for pair in named.windows(2) {
            if pair[0] == pair[1] {
                bail!("frame {:#x} is given two pages", pair[0]);
            }
        }
        for p in batch {
            ensure!(
                p.bytes.len() == PAGE_SIZE,
                "a page of {} bytes",
                p.bytes.len()
            );
            ensure!(!p.frames.is_empty(), "a page with no frame");
        }
        if let Some(&last) = named.last() {
            ensure!(
                last < frames,
                "frame {last:#x} is outside the guest ({frames} frames)"
            );
        }
        for &vm in vms {
            let pmap = &self.space(vm)?.pmap;
            if let Some(g) = named.iter().find(|&&g| pmap.get(g).is_some()) {
                bail!("frame {g:#x} is given a page twice");
            }
        }
        let shared_any = vms.len() > 1 || batch.iter().any(|p| p.frames.len() > 1);
        if shared_any {
            self.require_uffd()?;
        }
        let indices = self.pools[node].alloc_for_copy(batch.len() as u32)?;
        for (p, &index) in batch.iter().zip(&indices) {
            let dst = self.pools[node].page_ptr(index);
            // SAFETY: a page of the pool's view, just allocated: nobody
            // maps it yet.
            unsafe { std::ptr::copy_nonoverlapping(p.bytes.as_ptr(), dst, PAGE_SIZE) };
        }
        // (gfn, pool index, shared), by frame.
        let mut layout: Vec<(Gfn, u32, bool)> = Vec::with_capacity(named.len());
        for (p, &index) in batch.iter().zip(&indices) {
            let shared = vms.len() * p.frames.len() > 1;
            layout.extend(p.frames.iter().map(|&g| (g, index, shared)));
        }
        layout.sort_unstable();
        let mut mapped = 0u64;
        let result = (|| -> Result<()> {
            for &vm in vms {
                let mut i = 0;
                while i < layout.len() {
                    let (first, index, shared) = layout[i];
                    let mut n = 1;
                    while i + n < layout.len()
                        && layout[i + n].0 == first + n as Gfn
                        && layout[i + n].1 == index + n as u32
                        && layout[i + n].2 == shared
                    {
                        n += 1;
                    }
                    self.map_owned_run(vm, first, node, index, n, shared)?;
                    mapped += n as u64;
                    i += n;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let mut unowned: Vec<u32> = indices
                .iter()
                .copied()
                .filter(|&index| {
                    self.memmap
                        .get(MachinePage {
                            node: node as u16,
                            index,
                        })
                        .is_none()
                })
                .collect();
            self.pools[node].free_many(&mut unowned)?;
            return Err(e);
        }
        Ok(mapped)
    }
}
