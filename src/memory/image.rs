//! A guest space's memory as an image of machine pages, and guest spaces
//! built from one: what snapshots, restores and clones need from the
//! mapper (and what a migration stream can reuse).
//!
//! * [`Memory::image_chunk`] reads one stretch of a VM's frames: each
//!   machine page once, with every frame of the VM that maps it (the
//!   memmap's owners), skipping holes (pool pages never written: `mincore`
//!   on the pool view, as the sharing scanner does) and pages of zeros.
//! * [`Memory::create_spaces_from_image`] builds N guest spaces from an
//!   [`ImageSource`] (a snapshot file, or pages in memory: [`ImagePages`]).
//!   First every block of the image is read **straight into pool pages**
//!   of the first node with spaces (one copy, checked by the source over
//!   the destination), and copied once into the pool of each other node
//!   with spaces; pages read but not mapped yet are the load's
//!   (`Inner::loading`, which `verify` knows). Only once the whole image
//!   is read and checked is anything mapped: per space, one `mmap` and
//!   one registration per run of consecutive frames onto consecutive pool
//!   pages (the image's pages are allocated in frame order, so a whole
//!   snapshot is a few runs), one ranged userfaultfd write-protect per
//!   shared run, the pmap filled in runs. A page is write-protected and
//!   shared when it has more than one owner (the mapper's rule `shared ==
//!   write_protected == refcount > 1`), so copy-on-write gives a clone its
//!   own copy only of what it writes. Frames the image leaves out get
//!   fresh pages (holes in the pool: no host memory until written), as a
//!   new space's do.
//! * Two or more spaces on one node are a **clone group** in the memmap
//!   (`memmap.rs`): a page every clone maps at one frame costs one slot,
//!   not an owner record per clone; a clone joins the group in one pass
//!   over the group's runs.

use anyhow::{ensure, Context, Result};

use super::mapper::{Inner, Memory};
use super::pmap::{PageFlags, PmapEntry};
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

/// Pages per block of [`ImagePages`] (and per hold of the memory lock
/// for incoming migrations, `incoming.rs`).
pub const IMAGE_BATCH: usize = 512;

/// Most pages a source may put in one block.
pub const IMAGE_BLOCK_MAX: usize = 4096;

/// Where a block's pages go: a run of consecutive pages of a pool's
/// memfd, written with file I/O (`splice`, `pwrite`), not through a
/// mapping (installing 65,536 page-table entries in the pool's view cost
/// more than the copy itself: about 2 us each on these `kvm_pvm` hosts).
#[derive(Clone, Copy, Debug)]
pub struct PoolRun {
    pub fd: std::os::fd::RawFd,
    /// Byte offset of the run's first page in the memfd.
    pub offset: u64,
    pub pages: usize,
}

/// An image read block by block, each block's pages straight into the
/// pool pages that will hold them.
pub trait ImageSource {
    /// The number of pages in the next block (1 to [`IMAGE_BLOCK_MAX`]),
    /// or `None` once the image is complete and checked to its end.
    fn next_block(&mut self) -> Result<Option<usize>>;
    /// Writes the block [`ImageSource::next_block`] announced into `dest`
    /// (runs of pool pages, in order, as many pages as announced), checks
    /// it there (reading the destination back), and returns each page's
    /// frames (at least one each).
    fn read_block(&mut self, dest: &[PoolRun]) -> Result<Vec<Vec<Gfn>>>;
}

/// Writes all of `bytes` into `fd` at `offset` (`pwrite`).
pub fn write_pool_bytes(fd: std::os::fd::RawFd, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: a valid buffer and length; `fd` is a pool's memfd.
        let n = unsafe {
            libc::pwrite(
                fd,
                bytes[done..].as_ptr() as *const libc::c_void,
                bytes.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("writing image pages into a pool");
        }
        ensure!(n > 0, "writing image pages into a pool: no progress");
        done += n as usize;
    }
    Ok(())
}

/// An [`ImageSource`] of pages in memory (tests, and anything that has
/// its pages as [`PageImage`]s), [`IMAGE_BATCH`] pages a block.
pub struct ImagePages<I> {
    pages: I,
    block: Vec<PageImage>,
}

impl<I: Iterator<Item = Result<PageImage>>> ImagePages<I> {
    pub fn new(pages: I) -> ImagePages<I> {
        ImagePages {
            pages,
            block: Vec::new(),
        }
    }
}

impl<I: Iterator<Item = Result<PageImage>>> ImageSource for ImagePages<I> {
    fn next_block(&mut self) -> Result<Option<usize>> {
        self.block.clear();
        while self.block.len() < IMAGE_BATCH {
            match self.pages.next() {
                Some(page) => {
                    let page = page?;
                    ensure!(
                        page.bytes.len() == PAGE_SIZE,
                        "a page of {} bytes",
                        page.bytes.len()
                    );
                    self.block.push(page);
                }
                None => break,
            }
        }
        Ok((!self.block.is_empty()).then_some(self.block.len()))
    }

    fn read_block(&mut self, dest: &[PoolRun]) -> Result<Vec<Vec<Gfn>>> {
        let mut pages = self.block.iter();
        for run in dest {
            for k in 0..run.pages {
                let page = pages
                    .next()
                    .context("a destination larger than the block")?;
                write_pool_bytes(run.fd, run.offset + (k * PAGE_SIZE) as u64, &page.bytes)?;
            }
        }
        ensure!(
            pages.next().is_none(),
            "a destination smaller than the block"
        );
        Ok(self.block.iter().map(|p| p.frames.clone()).collect())
    }
}

/// An image read into the pools, not mapped yet.
struct Loaded {
    /// `(frame, image page)` for every frame the image names, by frame.
    layout: Vec<(Gfn, u32)>,
    /// Image pages named by more than one frame (shared within a space).
    multi: Vec<bool>,
    /// Per node with spaces: the node, its spaces, and the pool page that
    /// holds each image page there (in image order).
    copies: Vec<(NodeId, Vec<VmId>, Vec<u32>)>,
}

impl Loaded {
    /// Runs of frames onto consecutive pages of `copy`: `(first frame,
    /// first pool page, length, named by several frames)`; a run never
    /// mixes pages named by one frame and by several.
    fn runs(&self, copy: &[u32]) -> Vec<(Gfn, u32, u32, bool)> {
        let mut runs: Vec<(Gfn, u32, u32, bool)> = Vec::new();
        for &(gfn, page) in &self.layout {
            let (index, multi) = (copy[page as usize], self.multi[page as usize]);
            match runs.last_mut() {
                Some((g, i, n, m)) if *g + *n as Gfn == gfn && *i + *n == index && *m == multi => {
                    *n += 1
                }
                _ => runs.push((gfn, index, 1, multi)),
            }
        }
        runs
    }
}

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

    /// Clone groups in the memmap and their members (see `memmap.rs`).
    pub fn clone_groups(&self) -> (usize, usize) {
        self.inner.lock().memmap.clone_groups()
    }

    /// Builds one guest space of `frames` frames per request from
    /// `source` (see the module doc). On any error, from the source (a bad
    /// file, found at any block or at its end) or the mapper (a full pool),
    /// every space made so far is destroyed and every page given back:
    /// nothing is left half-built, and nothing is mapped before the whole
    /// image was read and checked.
    pub fn create_spaces_from_image(
        &self,
        frames: u64,
        requests: &[SpaceRequest],
        source: &mut dyn ImageSource,
    ) -> Result<ImageLoad> {
        ensure!(frames > 0, "a guest space needs at least one page");
        ensure!(
            frames <= u32::MAX as u64,
            "a guest space of {frames} frames"
        );
        ensure!(!requests.is_empty(), "no guest space to build");
        let mut load = ImageLoad::default();
        let mut loaded = Loaded {
            layout: Vec::new(),
            multi: Vec::new(),
            copies: Vec::new(),
        };
        let started = std::time::Instant::now();
        let result = self
            .read_image(frames, requests, source, &mut load, &mut loaded)
            .and_then(|()| {
                tracing::debug!(
                    "image of {} pages read into {} node(s) in {:.1} ms",
                    loaded.multi.len(),
                    loaded.copies.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                let t = std::time::Instant::now();
                let mapped = self.map_image(frames, requests, &mut load, &loaded);
                tracing::debug!(
                    "image mapped into {} space(s) in {:.1} ms",
                    requests.len(),
                    t.elapsed().as_secs_f64() * 1e3
                );
                mapped
            });
        if let Err(e) = result {
            let mut inner = self.inner.lock();
            for &(vm, _) in &load.spaces {
                if let Err(d) = inner.destroy(vm) {
                    tracing::warn!("undoing a failed image load, vm {vm}: {d:#}");
                }
            }
            if let Err(d) = inner.drop_loading() {
                tracing::warn!("undoing a failed image load: {d:#}");
            }
            return Err(e);
        }
        Ok(load)
    }

    /// Reserves the spaces, then reads every block of `source` into the
    /// pools (see the module doc).
    fn read_image(
        &self,
        frames: u64,
        requests: &[SpaceRequest],
        source: &mut dyn ImageSource,
        load: &mut ImageLoad,
        loaded: &mut Loaded,
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
            ensure!(
                inner.loading.iter().all(|l| l.is_empty()),
                "another image is being loaded"
            );
            load.pages_per_node = vec![0; nodes];
            let needed = inner.map_count_for(&vec![frames; requests.len()]);
            crate::leftovers::ensure_map_count(needed, &mut inner.map_count)?;
            for r in requests {
                let (vm, base) = inner.reserve_space(&r.name, &r.domain, r.node, frames)?;
                load.spaces.push((vm, base));
                match loaded.copies.iter_mut().find(|c| c.0 == r.node) {
                    Some(c) => c.1.push(vm),
                    None => loaded.copies.push((r.node, vec![vm], Vec::new())),
                }
            }
        }
        let mut named = vec![false; frames as usize];
        let (mut alloc_ns, mut read_ns) = (0u128, 0u128);
        loop {
            let t = std::time::Instant::now();
            let Some(count) = source.next_block()? else {
                break;
            };
            ensure!(
                (1..=IMAGE_BLOCK_MAX).contains(&count),
                "a block of {count} pages"
            );
            let first = loaded.copies[0].0;
            let ta = std::time::Instant::now();
            let runs = self.inner.lock().load_pages(first, count as u32)?;
            alloc_ns += ta.elapsed().as_nanos();
            // The pages were just handed to this load (`Inner::loading`):
            // nothing maps or writes them but this reader.
            let dest: Vec<PoolRun> = runs
                .iter()
                .map(|&(index, n, fd)| PoolRun {
                    fd,
                    offset: index as u64 * PAGE_SIZE as u64,
                    pages: n as usize,
                })
                .collect();
            let frames_of = source.read_block(&dest)?;
            read_ns += t.elapsed().as_nanos();
            ensure!(
                frames_of.len() == count,
                "a block of {count} pages names the frames of {}",
                frames_of.len()
            );
            let base = loaded.multi.len() as u32;
            for (k, fs) in frames_of.iter().enumerate() {
                ensure!(!fs.is_empty(), "a page with no frame");
                for &g in fs {
                    ensure!(
                        g < frames,
                        "frame {g:#x} is outside the guest ({frames} frames)"
                    );
                    ensure!(!named[g as usize], "frame {g:#x} is given two pages");
                    named[g as usize] = true;
                    loaded.layout.push((g, base + k as u32));
                }
                loaded.multi.push(fs.len() > 1);
            }
            let indices: Vec<u32> = runs.iter().flat_map(|&(i, n, _)| i..i + n).collect();
            loaded.copies[0].2.extend(&indices);
            load.pages_per_node[first] += count as u64;
            // One copy in each other node with spaces.
            for c in 1..loaded.copies.len() {
                let node = loaded.copies[c].0;
                let mut inner = self.inner.lock();
                let runs = inner.load_pages(node, count as u32)?;
                let mut at = 0;
                for (index, n, _) in runs {
                    inner.pools[node].populate_view(index, n, true);
                    for k in 0..n {
                        let from = indices[at];
                        inner.pools[first].populate_view(from, 1, false);
                        inner.copy_page(
                            MachinePage {
                                node: first as u16,
                                index: from,
                            },
                            MachinePage {
                                node: node as u16,
                                index: index + k,
                            },
                        );
                        loaded.copies[c].2.push(index + k);
                        at += 1;
                    }
                }
                load.pages_per_node[node] += count as u64;
            }
        }
        loaded.layout.sort_unstable();
        tracing::debug!(
            "image read: {:.1} ms taking and populating pool pages, {:.1} ms reading and checking",
            alloc_ns as f64 / 1e6,
            (read_ns - alloc_ns) as f64 / 1e6
        );
        Ok(())
    }

    /// Maps the image read by `read_image` into every space, one hold of
    /// the memory lock per space (the first two of a clone group
    /// together: a group page is shared from its first record on).
    fn map_image(
        &self,
        frames: u64,
        requests: &[SpaceRequest],
        load: &mut ImageLoad,
        loaded: &Loaded,
    ) -> Result<()> {
        // Time in the kernel's mappings, the pmap and memmap, fresh frames.
        let mut times = [0u128; 3];
        for (node, vms, copy) in &loaded.copies {
            let runs = loaded.runs(copy);
            let together = if vms.len() >= 2 { 2 } else { 1 };
            let mut group = None;
            let mut k = 0;
            while k < vms.len() {
                let hold = if k == 0 { together } else { 1 };
                let mut inner = self.inner.lock();
                let t = std::time::Instant::now();
                for &vm in &vms[k..k + hold] {
                    inner.map_image_runs(vm, *node, &runs, vms.len() > 1)?;
                }
                times[0] += t.elapsed().as_nanos();
                let t = std::time::Instant::now();
                for &vm in &vms[k..k + hold] {
                    inner.record_image_runs(vm, *node, &runs, vms, &mut group);
                    load.frames_mapped += loaded.layout.len() as u64;
                }
                times[1] += t.elapsed().as_nanos();
                let t = std::time::Instant::now();
                if k == 0 {
                    inner.loaded(*node, copy);
                }
                // The frames no page named: fresh pages, as a new space's.
                for &vm in &vms[k..k + hold] {
                    let r = &requests[load.spaces.iter().position(|s| s.0 == vm).expect("ours")];
                    let empty: Vec<Gfn> = {
                        let pmap = &inner.space(vm)?.pmap;
                        (0..frames).filter(|&g| pmap.get(g).is_none()).collect()
                    };
                    for (first, count) in super::runs::runs_of(&empty) {
                        inner.map_fresh(vm, first, count, r.node)?;
                    }
                }
                times[2] += t.elapsed().as_nanos();
                k += hold;
            }
        }
        tracing::debug!(
            "image mapping: {:.1} ms mmap/register/write-protect, {:.1} ms pmap and memmap, \
             {:.1} ms fresh frames",
            times[0] as f64 / 1e6,
            times[1] as f64 / 1e6,
            times[2] as f64 / 1e6
        );
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

    /// Hands `count` pool pages of `node` to the image load in progress
    /// (`loading`): runs `(first page, length, the pool's memfd)`.
    fn load_pages(
        &mut self,
        node: NodeId,
        count: u32,
    ) -> Result<Vec<(u32, u32, std::os::fd::RawFd)>> {
        let indices = self.pools[node].alloc_for_copy(count)?;
        if self.loading.len() < self.pools.len() {
            self.loading.resize_with(self.pools.len(), Default::default);
        }
        let fd = self.pools[node].fd();
        let mut runs = Vec::new();
        for (start, n) in super::runs::runs_of(&indices) {
            self.loading[node].insert(start, n);
            runs.push((start, n, fd));
        }
        Ok(runs)
    }

    /// The load's pages of `node` are in the memmap now.
    fn loaded(&mut self, node: NodeId, pages: &[u32]) {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        for (start, n) in super::runs::runs_of(&sorted) {
            self.loading[node].remove(start, n);
        }
    }

    /// Gives back every page a failed load still holds.
    fn drop_loading(&mut self) -> Result<()> {
        for node in 0..self.loading.len() {
            let mut pages: Vec<u32> = self.loading[node].iter().collect();
            self.loading[node] = Default::default();
            self.pools[node].free_many(&mut pages)?;
        }
        Ok(())
    }

    /// The kernel's side of an image's runs in `vm`: one `mmap` and one
    /// registration per run, write-protected where shared (`clones`: the
    /// space is one of several on its node, so every page is). The pmap
    /// and memmap are left to `record_image_runs`, so a failure here
    /// leaves nothing to undo but the mappings (`destroy` unmaps them).
    fn map_image_runs(
        &mut self,
        vm: VmId,
        node: NodeId,
        runs: &[(Gfn, u32, u32, bool)],
        clones: bool,
    ) -> Result<()> {
        let base = self.space(vm)?.base;
        let mut protect: Vec<(usize, usize)> = Vec::new();
        for &(gfn, index, n, multi) in runs {
            let addr = base + gfn as usize * PAGE_SIZE;
            self.map_run(addr, node, index, n as usize, true)?;
            if clones || multi {
                match protect.last_mut() {
                    Some((a, len)) if *a + *len == addr => *len += n as usize * PAGE_SIZE,
                    _ => protect.push((addr, n as usize * PAGE_SIZE)),
                }
            }
        }
        if !protect.is_empty() {
            let uffd = self.require_uffd()?.clone();
            for (addr, len) in protect {
                uffd.write_protect(addr, len, true)
                    .context("write-protecting shared guest pages")?;
            }
        }
        Ok(())
    }

    /// Records an image's runs mapped in `vm` (one of `vms` on `node`):
    /// the pmap filled run by run; in the memmap, a page named by one
    /// frame joins the clone group of `vms` (made with the first two
    /// spaces, `group`) when there are several, else gets `vm` as its
    /// owner, and a page named by several frames gets each.
    fn record_image_runs(
        &mut self,
        vm: VmId,
        node: NodeId,
        runs: &[(Gfn, u32, u32, bool)],
        vms: &[VmId],
        group: &mut Option<super::memmap::GroupId>,
    ) {
        let clones = vms.len() > 1;
        let space = self.spaces.get_mut(&vm).expect("a space being built");
        for &(gfn, index, n, multi) in runs {
            let shared = clones || multi;
            let flags = PageFlags {
                shared,
                write_protected: shared,
                released: false,
            };
            let page = MachinePage {
                node: node as u16,
                index,
            };
            space.pmap.fill(gfn, page, n as u64, flags);
        }
        let single = || {
            runs.iter().filter(|r| !r.3).map(|&(gfn, index, n, _)| {
                let page = MachinePage {
                    node: node as u16,
                    index,
                };
                (gfn, page, n)
            })
        };
        match *group {
            _ if !clones => {
                for (gfn, page, n) in single() {
                    for k in 0..n {
                        let p = MachinePage {
                            node: page.node,
                            index: page.index + k,
                        };
                        self.memmap.add_owner(p, vm, gfn + k as Gfn);
                    }
                }
            }
            None if vm == vms[0] => {}
            None => {
                let frames = self.space(vm).expect("a space being built").frames();
                let id = self.memmap.new_group(&vms[..2], frames);
                for (gfn, page, n) in single() {
                    self.memmap.add_group_run(id, page, gfn, n);
                }
                *group = Some(id);
            }
            Some(id) => {
                let runs: Vec<(MachinePage, u32)> = single().map(|(_, p, n)| (p, n)).collect();
                self.memmap.join_group(id, vm, &runs);
            }
        }
        for &(gfn, index, n, multi) in runs {
            if multi {
                for k in 0..n {
                    let p = MachinePage {
                        node: node as u16,
                        index: index + k,
                    };
                    self.memmap.add_owner(p, vm, gfn + k as Gfn);
                }
            }
        }
    }
}
