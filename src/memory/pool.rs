//! One pool of machine pages per NUMA node.
//!
//! A pool is a memfd of `capacity` pages. It is sparse: a page costs host
//! memory only once something touches it, and freeing a page punches a hole
//! so the host gets the memory back. The monitor keeps one `MAP_SHARED` view
//! of the whole pool (bound to the host node with `mbind`) to copy and
//! compare pages without going through any guest's mapping.
//!
//! Free pages come in two kinds:
//!
//! * **cold** pages are holes (punched, or never touched): they read as
//!   zeros and cost no host memory;
//! * **warm** pages were freed without punching, up to a cap per pool
//!   ([`WARM_CAP_BYTES`] by default): still resident, **still holding the
//!   data of whoever used them last**. They exist so that migration can copy
//!   into a page the kernel already has instead of making it allocate a
//!   fresh shmem page (and punch the old one) for every page moved.
//!
//! Safety rule: no guest ever sees another guest's (or its own freed) data.
//! So the allocators are split by what the caller does with the pages:
//!
//! * [`Pool::alloc`] / [`Pool::alloc_run`] hand out **zeroed** pages: cold
//!   ones or never-used ones. When only warm pages are left they punch them
//!   first, so the pages really read as zeros. Fresh guest RAM and anything
//!   mapped without data (`holds_data = false`) comes from these.
//! * [`Pool::alloc_for_copy`] / [`Pool::alloc_run_for_copy`] may hand out
//!   warm pages. Only a caller that overwrites **every byte** of each page
//!   before any guest can map it may use them: migration copies
//!   (`move_pages`, `move_page`, `replace_with_copy`), copy-on-write break
//!   copies (through `replace_with_copy`), replica copies and shared-page
//!   moves, all of which copy a whole page in before mapping it.
//!
//! Which free becomes warm is the caller's choice too: [`Pool::free_many`]
//! punches every page (tearing down, unmapping, merging: the host gets the
//! memory back at once, so memory-saving figures stay exact), while
//! [`Pool::free_many_keep_warm`] (migration's old pages) keeps pages warm
//! while there is room under the cap and punches the rest.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

use super::runs::{runs_of, RunSet};
use super::{numa, NodeId};
use crate::PAGE_SIZE;

/// Distinguishes the pools of several `Memory` instances in one process
/// (tests run many), so `/proc/self/maps` names stay unique.
static POOL_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Host memory a pool may keep in warm free pages by default (16 MiB, 4096
/// pages): enough for the copy targets of a NUMA epoch's migrations or of a
/// `move_pages` call of several MiB, small against guest RAM. Memory held
/// this way shows in `resident_bytes` (see `PoolStats::warm_pages`).
pub const WARM_CAP_BYTES: usize = 16 << 20;

/// A warm run shorter than this (and shorter than what was asked for) is
/// not worth a piece of its own: a copy takes a cold run instead, so a
/// fragmented warm set does not split a migration into many remaps.
const WARM_MIN_RUN: u32 = 16;

pub struct Pool {
    node: NodeId,
    host_node: u32,
    fd: OwnedFd,
    inode: u64,
    capacity: u32,
    /// The monitor's own mapping of the whole memfd.
    view: *mut u8,
    /// Pages below `next` that are free holes (read as zeros). Pages at or
    /// above `next` have never been handed out.
    cold: RunSet,
    /// Pages below `next` that are free but resident with stale content
    /// (never handed to a zeroed allocation; see the module docs).
    warm: RunSet,
    /// Most pages `warm` may hold.
    warm_cap: u32,
    /// Pages handed out from `warm` to copy allocations, ever.
    warm_reused: u64,
    next: u32,
    /// A hint, one bit per page: the monitor's view maps the page already
    /// (see [`Pool::populate_view`]). Set when the view is populated or a
    /// copy went through it; cleared by a punch. The kernel may still drop
    /// a view entry (reclaim), which only costs a page fault later.
    view_mapped: Vec<u64>,
}

// SAFETY: `view` is a shared mapping owned by the pool for its whole life;
// the pool itself is only mutated under the mapper's lock.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Pool {
    /// Creates the pool for `node`, placing its pages on `host_node`.
    pub fn new(node: NodeId, host_node: u32, capacity_pages: u32) -> Result<Pool> {
        let generation = POOL_GENERATION.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(format!("disco-pool-{}-node{node}", generation)).unwrap();
        // SAFETY: memfd_create with a valid C string.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("memfd_create for a memory pool");
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let bytes = capacity_pages as usize * PAGE_SIZE;
        // SAFETY: fd is valid.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("sizing the node {node} pool to {bytes} bytes"));
        }
        // SAFETY: mapping a file we own; NORESERVE because the pool is sparse.
        let view = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if view == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mapping a memory pool");
        }
        if let Err(e) = numa::bind_to_node(view as usize, bytes, host_node) {
            // SAFETY: unmapping what we just mapped.
            unsafe { libc::munmap(view, bytes) };
            bail!("cannot bind the node {node} pool to host NUMA node {host_node}: {e}");
        }
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd valid, st is a valid out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error()).context("fstat on a memory pool");
        }
        Ok(Pool {
            node,
            host_node,
            fd,
            inode: st.st_ino,
            capacity: capacity_pages,
            view: view as *mut u8,
            cold: RunSet::default(),
            warm: RunSet::default(),
            warm_cap: (WARM_CAP_BYTES / PAGE_SIZE) as u32,
            warm_reused: 0,
            next: 0,
            view_mapped: Vec::new(),
        })
    }

    pub fn node(&self) -> NodeId {
        self.node
    }
    pub fn host_node(&self) -> u32 {
        self.host_node
    }
    pub fn fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }
    /// Inode of the memfd, to recognise its mappings in `/proc/self/maps`.
    pub fn inode(&self) -> u64 {
        self.inode
    }
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
    /// Pages currently handed out.
    pub fn used(&self) -> u32 {
        self.next - self.cold.len() - self.warm.len()
    }
    /// Pages that can still be handed out.
    pub fn available(&self) -> u32 {
        self.capacity - self.used()
    }
    /// Highest page index ever handed out, plus one.
    pub fn high_water(&self) -> u32 {
        self.next
    }
    pub fn is_free(&self, index: u32) -> bool {
        index >= self.next || self.cold.contains(index) || self.warm.contains(index)
    }
    /// Free pages that still hold stale content (resident, not punched).
    pub fn warm_pages(&self) -> u32 {
        self.warm.len()
    }
    pub fn warm_list(&self) -> impl Iterator<Item = u32> + '_ {
        self.warm.iter()
    }
    /// Most warm pages the pool keeps.
    pub fn warm_cap(&self) -> u32 {
        self.warm_cap
    }
    /// Pages copy allocations took from the warm set, ever.
    pub fn warm_reused(&self) -> u64 {
        self.warm_reused
    }

    /// Sets the warm cap (0 turns warm pages off); warm pages above the
    /// new cap are punched at once.
    pub fn set_warm_cap(&mut self, pages: u32) -> Result<()> {
        self.warm_cap = pages;
        let mut excess = self.warm.len().saturating_sub(pages);
        // The highest warm pages go first.
        let mut runs = Vec::new();
        for (start, len) in self.warm.runs().rev() {
            if excess == 0 {
                break;
            }
            let take = len.min(excess);
            runs.push((start + len - take, take));
            excess -= take;
        }
        self.cool(&runs)
    }

    /// Punches every warm page (they become cold holes).
    pub fn release_warm(&mut self) -> Result<()> {
        let runs: Vec<(u32, u32)> = self.warm.runs().collect();
        self.cool(&runs)
    }

    /// Punches warm `runs` (`(start, len)`, each inside the warm set) and
    /// moves them to the cold set.
    fn cool(&mut self, runs: &[(u32, u32)]) -> Result<()> {
        for &(start, len) in runs {
            self.punch(start, len)?;
            assert!(
                self.warm.remove(start, len),
                "cooling pages that are not warm"
            );
            self.cold.insert(start, len);
        }
        Ok(())
    }

    /// Punches one hole per run of consecutive pages of `sorted`.
    fn punch_runs(&mut self, sorted: &[u32]) -> Result<()> {
        for (start, len) in runs_of(sorted) {
            self.punch(start, len)?;
        }
        Ok(())
    }

    /// Punches pages that stay allocated (zero pages released to the host:
    /// see `PageFlags::released`), one hole per run of `sorted`.
    pub fn discard(&mut self, sorted: &[u32]) -> Result<()> {
        self.punch_runs(sorted)
    }

    fn full_error(&self, count: u32) -> anyhow::Error {
        anyhow::anyhow!(
            "memory pool of node {} is full: {} pages requested, {} of {} available",
            self.node,
            count,
            self.available(),
            self.capacity
        )
    }

    /// Allocates `count` zeroed pages, preferring one contiguous run (which
    /// keeps the guest's host mapping in few VMAs). Returns page indices in
    /// ascending order. Never hands out a warm page unpunched: cold pages
    /// first, then never-used ones, then warm ones punched here.
    pub fn alloc(&mut self, count: u32) -> Result<Vec<u32>> {
        if count > self.available() {
            return Err(self.full_error(count));
        }
        let mut pages = Vec::with_capacity(count as usize);
        // Recycle freed pages first so the pool stays compact, then extend.
        for (start, len) in self.cold.take_runs(count) {
            pages.extend(start..start + len);
        }
        while pages.len() < count as usize && self.next < self.capacity {
            pages.push(self.next);
            self.next += 1;
        }
        for (start, len) in self.warm.take_runs(count - pages.len() as u32) {
            // Punched before it is handed out: a zeroed allocation.
            self.punch(start, len)?;
            pages.extend(start..start + len);
        }
        pages.sort_unstable();
        Ok(pages)
    }

    /// Allocates `count` pages whose every byte the caller overwrites before
    /// any guest can map them (see the module docs): warm pages first, then
    /// as [`Pool::alloc`]. Ascending order.
    pub fn alloc_for_copy(&mut self, count: u32) -> Result<Vec<u32>> {
        if count > self.available() {
            return Err(self.full_error(count));
        }
        let mut pages = Vec::with_capacity(count as usize);
        for (start, len) in self.warm.take_runs(count) {
            pages.extend(start..start + len);
        }
        self.warm_reused += pages.len() as u64;
        let rest = count - pages.len() as u32;
        if rest > 0 {
            pages.extend(self.alloc(rest)?);
        }
        pages.sort_unstable();
        Ok(pages)
    }

    /// Allocates one run of consecutive zeroed pages, at most `want` long
    /// and as long as the pool allows: the first free cold run of `want`
    /// pages, else `want` fresh pages past the high-water mark, else the
    /// longest run there is (the caller asks again for the rest). Returns
    /// the first page and the length (at least 1). When only warm pages are
    /// left, a run of them is punched first (never handed out with stale
    /// content).
    pub fn alloc_run(&mut self, want: u32) -> Result<(u32, u32)> {
        if want == 0 || self.available() == 0 {
            return Err(self.full_error(want));
        }
        if self.cold.is_empty() && self.next == self.capacity {
            let (start, len) = self.warm.find_run(want);
            self.cool(&[(start, len)])?;
        }
        // Free runs below the high-water mark, first fit, else the longest.
        let best = self.cold.find_run(want);
        let run = self.cold.last_run();
        // A free run that ends at the high-water mark continues into the
        // never-used pages above it.
        let tail = self.capacity - self.next;
        let (start, len) = match run {
            _ if best.1 == want => best,
            Some((start, len)) if start + len == self.next && len + tail >= want => (start, want),
            _ if tail >= want => (self.next, want),
            Some((start, len)) if start + len == self.next && len + tail > best.1 => {
                (start, len + tail)
            }
            _ if tail > best.1 => (self.next, tail),
            _ => best,
        };
        if start < self.next {
            let below = self.next.min(start + len) - start;
            assert!(
                self.cold.remove(start, below),
                "allocating pages that are not free"
            );
        }
        self.next = self.next.max(start + len);
        Ok((start, len))
    }

    /// Allocates one run of consecutive pages, at most `want` long, for a
    /// caller that overwrites every byte of them before any guest can map
    /// them (see the module docs): the first warm run of `want` pages, else
    /// the longest warm run if it is at least `min(want, 16)` pages long,
    /// else as [`Pool::alloc_run`] (and a short warm run when nothing else
    /// is left). Migration uses it for its copy targets. The flag says the
    /// run is made of warm (resident) pages.
    pub fn alloc_run_for_copy(&mut self, want: u32) -> Result<(u32, u32, bool)> {
        if want == 0 || self.available() == 0 {
            return Err(self.full_error(want));
        }
        let (start, len) = self.warm.find_run(want);
        let only_warm_left = self.cold.is_empty() && self.next == self.capacity;
        if len > 0 && (len >= want.min(WARM_MIN_RUN) || only_warm_left) {
            self.warm.remove(start, len);
            self.warm_reused += len as u64;
            return Ok((start, len, true));
        }
        let (start, len) = self.alloc_run(want)?;
        Ok((start, len, false))
    }

    /// Takes pages `start..start+len` for a copy (the caller overwrites
    /// every byte before a guest maps them, as for
    /// [`Pool::alloc_run_for_copy`]) if every one of them is free; `false`
    /// (nothing taken) otherwise. The mapping budget asks for the pages
    /// next to a frame's neighbours, so the kernel joins the copy with them
    /// into one mapping (`super::budget`).
    pub fn take_exact_for_copy(&mut self, start: u32, len: u32) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if len == 0 || end > self.capacity || !(start..end).all(|i| self.is_free(i)) {
            return false;
        }
        for i in start..end.min(self.next) {
            if self.cold.contains(i) {
                self.cold.remove(i, 1);
            } else {
                self.warm.remove(i, 1);
                self.warm_reused += 1;
            }
        }
        if end > self.next {
            // Never-used pages between the high-water mark and the run
            // become free holes below the new mark.
            if start > self.next {
                self.cold.insert(self.next, start - self.next);
            }
            self.next = end;
        }
        true
    }

    /// Returns a page to the pool and its memory to the host.
    pub fn free(&mut self, index: u32) -> Result<()> {
        self.free_many(&mut [index])
    }

    /// Returns pages to the pool, punching one hole per run of consecutive
    /// pages (tearing down a VM frees whole runs at once).
    pub fn free_many(&mut self, indices: &mut [u32]) -> Result<()> {
        self.check_free(indices)?;
        self.punch_runs(indices)?;
        for (start, len) in runs_of(indices) {
            self.cold.insert(start, len);
        }
        Ok(())
    }

    /// Like [`Pool::free`], keeping the page warm if there is room.
    pub fn free_keep_warm(&mut self, index: u32) -> Result<()> {
        self.free_many_keep_warm(&mut [index])
    }

    /// Returns pages to the pool, keeping as many as the warm cap leaves
    /// room for resident and unpunched (warm, for later copy targets), and
    /// punching the rest as [`Pool::free_many`] does.
    pub fn free_many_keep_warm(&mut self, indices: &mut [u32]) -> Result<()> {
        self.check_free(indices)?;
        let room = self.warm_cap.saturating_sub(self.warm.len()) as usize;
        let keep = room.min(indices.len());
        let (warm, punched) = indices.split_at(keep);
        self.punch_runs(punched)?;
        for (start, len) in runs_of(punched) {
            self.cold.insert(start, len);
        }
        for (start, len) in runs_of(warm) {
            self.warm.insert(start, len);
        }
        Ok(())
    }

    /// Sorts `indices` and refuses double frees.
    fn check_free(&self, indices: &mut [u32]) -> Result<()> {
        indices.sort_unstable();
        for w in indices.windows(2) {
            if w[0] == w[1] {
                bail!("double free of machine page n{}:{:#x}", self.node, w[0]);
            }
        }
        if let Some(&index) = indices.iter().find(|&&i| i >= self.capacity) {
            bail!("machine page n{}:{index:#x} is outside the pool", self.node);
        }
        // One look-up per run; the page to name only on the error path.
        let free = |(start, len): (u32, u32)| {
            start + len > self.next
                || self.cold.overlaps(start, len)
                || self.warm.overlaps(start, len)
        };
        if runs_of(indices).any(free) {
            let index = indices.iter().find(|&&i| self.is_free(i)).unwrap();
            bail!("double free of machine page n{}:{index:#x}", self.node);
        }
        Ok(())
    }

    fn punch(&mut self, index: u32, pages: u32) -> Result<()> {
        self.set_view_mapped(index, pages, false);
        let off = index as libc::off_t * PAGE_SIZE as libc::off_t;
        let len = pages as libc::off_t * PAGE_SIZE as libc::off_t;
        // SAFETY: punching a hole in a file we own.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("punching a hole in a memory pool");
        }
        Ok(())
    }

    /// Makes sure the monitor's view maps pages `start..start+len` before
    /// a copy goes through it: runs the view does not map yet (by the
    /// hint) are populated with one `madvise` each, so the copy takes no
    /// page fault per page; runs already mapped cost nothing. (Populating
    /// a mapped run is not free: the kernel still walks it page by page,
    /// about as long as the memcpy itself on the build hosts:
    /// docs/host-facts.md.) `write`: the caller
    /// writes the pages.
    pub fn populate_view(&mut self, start: u32, len: u32, write: bool) {
        let advice = if write {
            libc::MADV_POPULATE_WRITE
        } else {
            libc::MADV_POPULATE_READ
        };
        let end = start + len;
        let mut i = start;
        while i < end {
            if self.view_mapped(i) {
                i += 1;
                continue;
            }
            let from = i;
            while i < end && !self.view_mapped(i) {
                i += 1;
            }
            let bytes = (i - from) as usize * PAGE_SIZE;
            // SAFETY: an in-bounds range of our own view.
            let r =
                unsafe { libc::madvise(self.page_ptr(from) as *mut libc::c_void, bytes, advice) };
            if r != 0 {
                // Only a speed-up: the copy faults the pages in instead.
                tracing::debug!("populating a pool view: {}", io::Error::last_os_error());
            }
        }
        self.set_view_mapped(start, len, true);
    }

    fn view_mapped(&self, index: u32) -> bool {
        let word = index as usize / 64;
        self.view_mapped
            .get(word)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    fn set_view_mapped(&mut self, start: u32, len: u32, mapped: bool) {
        let end = (start + len) as usize;
        if mapped && self.view_mapped.len() * 64 < end {
            self.view_mapped.resize(end.div_ceil(64), 0);
        }
        for i in start as usize..end.min(self.view_mapped.len() * 64) {
            let bit = 1u64 << (i % 64);
            if mapped {
                self.view_mapped[i / 64] |= bit;
            } else {
                self.view_mapped[i / 64] &= !bit;
            }
        }
    }

    /// Pointer to a page through the monitor's view of the pool.
    pub fn page_ptr(&self, index: u32) -> *mut u8 {
        assert!(index < self.capacity, "page index out of pool");
        // SAFETY: in bounds of the view mapping.
        unsafe { self.view.add(index as usize * PAGE_SIZE) }
    }

    /// Whether pool page `index` holds data in the memfd (is resident in
    /// the page cache), asked with `mincore` on the monitor's view, which
    /// does not touch the page. A page the guest never wrote is a hole:
    /// reading it through the `MAP_SHARED` view would make the kernel
    /// allocate it (docs/host-facts.md, "Memory and mappings"), so the
    /// sharing scanner asks this first.
    pub fn page_resident(&self, index: u32) -> bool {
        let mut out = Vec::with_capacity(1);
        view_pages_resident(self.page_ptr(index), 1, &mut out);
        out[0]
    }

    /// Host memory the pool really holds (resident pages of the memfd), in
    /// bytes: pages in use and warm free pages.
    pub fn resident_bytes(&self) -> u64 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, valid out pointer.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return 0;
        }
        st.st_blocks as u64 * 512
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: unmapping our own view; the fd closes with OwnedFd.
        unsafe {
            libc::munmap(
                self.view as *mut libc::c_void,
                self.capacity as usize * PAGE_SIZE,
            )
        };
    }
}

/// Whether each of the `n` pages of a pool view from `ptr` (page-aligned)
/// holds data in its memfd, appended to `out`: one `mincore`, which does
/// not touch the pages. On an error they count as resident: the caller
/// then reads them (safe, only not as cheap).
pub(crate) fn view_pages_resident(ptr: *const u8, n: usize, out: &mut Vec<bool>) {
    let mut vec = vec![0u8; n];
    // SAFETY: mincore only reads the page tables of `n` page-aligned pages
    // of one view; `vec` has room for a byte per page.
    let r = unsafe { libc::mincore(ptr as *mut libc::c_void, n * PAGE_SIZE, vec.as_mut_ptr()) };
    out.extend(vec.iter().map(|&v| r != 0 || v & 1 != 0));
}
