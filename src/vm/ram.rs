//! Access to guest RAM through the caller's host mapping.
//!
//! The memory manager owns the mapping and may replace pages underneath while
//! the guest runs (`mmap(MAP_FIXED)` of another memfd offset), so nothing here
//! keeps a pointer or slice into guest RAM beyond one access, and nothing here
//! maps, unmaps or protects it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Guest RAM as a caller-owned host mapping: `size` bytes at `host_addr`
/// (page-aligned), registered as guest-physical `0..size`. The caller keeps
/// it mapped, readable and writable until the [`super::MicroVm`] using it is
/// dropped or waited for. Its accessors are crate-private: only a `MicroVm`,
/// which holds the caller to that promise, dereferences it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRam {
    pub host_addr: usize,
    pub size: usize,
}

impl GuestRam {
    /// Host pointer to `len` bytes at guest-physical `gpa`, if inside RAM.
    fn ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.size as u64).then(|| (self.host_addr + gpa as usize) as *mut u8)
    }

    /// Copies `bytes` to guest-physical `gpa`. Panics outside RAM (a bug in
    /// the layout, not a guest error).
    pub(crate) fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self.ptr(gpa, bytes.len()).expect("guest write outside RAM");
        // SAFETY: inside the caller's mapping (checked above), which the
        // caller keeps valid while the VM exists.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
    }

    /// Writes `words` (little-endian) to guest-physical `gpa`.
    pub(crate) fn write_words(&self, gpa: u64, words: &[u64]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.write(gpa, &bytes);
    }

    /// Zeroes `len` bytes at guest-physical `gpa`. Panics outside RAM.
    pub(crate) fn zero(&self, gpa: u64, len: u64) {
        let p = self
            .ptr(gpa, len as usize)
            .expect("guest zeroing outside RAM");
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(p, 0, len as usize) }
    }

    /// Copies `len` bytes from guest-physical `gpa`, or `None` outside RAM.
    pub(crate) fn read(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let p = self.ptr(gpa, len)?;
        let mut out = vec![0u8; len];
        // SAFETY: as in `write`. The guest may write concurrently; the bytes
        // are then a snapshot, which is all callers need.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        Some(out)
    }

    /// Reads the aligned u64 at guest-physical `gpa` atomically (the guest
    /// may be writing it), or `None` outside RAM or unaligned.
    pub(crate) fn read_u64(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) {
            return None;
        }
        let p = self.ptr(gpa, 8)? as *mut u64;
        // SAFETY: inside the mapping, 8-byte aligned (host_addr is page
        // aligned); guest writes to it are atomic 8-byte stores too.
        Some(unsafe { AtomicU64::from_ptr(p) }.load(Ordering::Relaxed))
    }
}
