//! One pool of machine pages per NUMA node.
//!
//! A pool is a memfd of `capacity` pages. It is sparse: a page costs host
//! memory only once something touches it, and freeing a page punches a hole
//! so the host gets the memory back. The monitor keeps one `MAP_SHARED` view
//! of the whole pool (bound to the host node with `mbind`) to copy and
//! compare pages without going through any guest's mapping.
//!
//! Free pages are always holes, so a freshly allocated page reads as zeros.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

use super::{numa, NodeId};
use crate::PAGE_SIZE;

/// Distinguishes the pools of several `Memory` instances in one process
/// (tests run many), so `/proc/self/maps` names stay unique.
static POOL_GENERATION: AtomicU64 = AtomicU64::new(0);

pub struct Pool {
    node: NodeId,
    host_node: u32,
    fd: OwnedFd,
    inode: u64,
    capacity: u32,
    /// The monitor's own mapping of the whole memfd.
    view: *mut u8,
    /// Pages below `next` that are free (holes). Pages at or above `next`
    /// have never been handed out.
    free: BTreeSet<u32>,
    next: u32,
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
            free: BTreeSet::new(),
            next: 0,
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
        self.next - self.free.len() as u32
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
        index >= self.next || self.free.contains(&index)
    }
    pub fn free_list(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied()
    }

    /// Allocates `count` zeroed pages, preferring one contiguous run (which
    /// keeps the guest's host mapping in few VMAs). Returns page indices in
    /// ascending order.
    pub fn alloc(&mut self, count: u32) -> Result<Vec<u32>> {
        if count > self.available() {
            bail!(
                "memory pool of node {} is full: {} pages requested, {} of {} available",
                self.node,
                count,
                self.available(),
                self.capacity
            );
        }
        let mut pages = Vec::with_capacity(count as usize);
        // Recycle freed pages first so the pool stays compact, then extend.
        while pages.len() < count as usize {
            match self.free.pop_first() {
                Some(p) => pages.push(p),
                None => break,
            }
        }
        while pages.len() < count as usize {
            pages.push(self.next);
            self.next += 1;
        }
        pages.sort_unstable();
        Ok(pages)
    }

    /// Allocates one run of consecutive zeroed pages, at most `want` long
    /// and as long as the pool allows: the first free run of `want` pages,
    /// else `want` fresh pages past the high-water mark, else the longest
    /// run there is (the caller asks again for the rest). Returns the first
    /// page and the length (at least 1). Migration uses it so that a run of
    /// frames is one mapping of one pool range.
    pub fn alloc_run(&mut self, want: u32) -> Result<(u32, u32)> {
        if want == 0 || self.available() == 0 {
            bail!(
                "memory pool of node {} is full: {} pages requested, {} of {} available",
                self.node,
                want,
                self.available(),
                self.capacity
            );
        }
        // Free runs below the high-water mark, first fit; remember the
        // longest in case none is long enough.
        let mut best = (0u32, 0u32);
        let mut run: Option<(u32, u32)> = None;
        for &p in &self.free {
            run = match run {
                Some((start, len)) if start + len == p => Some((start, len + 1)),
                _ => Some((p, 1)),
            };
            let (start, len) = run.unwrap();
            if len > best.1 {
                best = (start, len);
            }
            if len == want {
                break;
            }
        }
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
        for p in start..start + len {
            if p >= self.next {
                self.next = p + 1;
            } else {
                self.free.remove(&p);
            }
        }
        Ok((start, len))
    }

    /// Returns a page to the pool and its memory to the host.
    pub fn free(&mut self, index: u32) -> Result<()> {
        self.free_many(&mut [index])
    }

    /// Returns pages to the pool, punching one hole per run of consecutive
    /// pages (tearing down a VM frees whole runs at once).
    pub fn free_many(&mut self, indices: &mut [u32]) -> Result<()> {
        indices.sort_unstable();
        for w in indices.windows(2) {
            if w[0] == w[1] {
                bail!("double free of machine page n{}:{:#x}", self.node, w[0]);
            }
        }
        if let Some(&index) = indices.iter().find(|&&i| self.is_free(i)) {
            bail!("double free of machine page n{}:{index:#x}", self.node);
        }
        let mut i = 0;
        while i < indices.len() {
            let mut run = 1;
            while i + run < indices.len() && indices[i + run] == indices[i] + run as u32 {
                run += 1;
            }
            self.punch(indices[i], run as u32)?;
            i += run;
        }
        self.free.extend(indices.iter().copied());
        Ok(())
    }

    fn punch(&self, index: u32, pages: u32) -> Result<()> {
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

    /// Pointer to a page through the monitor's view of the pool.
    pub fn page_ptr(&self, index: u32) -> *mut u8 {
        assert!(index < self.capacity, "page index out of pool");
        // SAFETY: in bounds of the view mapping.
        unsafe { self.view.add(index as usize * PAGE_SIZE) }
    }

    /// Host memory the pool really holds (resident pages of the memfd), in bytes.
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
