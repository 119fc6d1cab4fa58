//! The guest-physical memory layout of a micro-VM and the per-vCPU parameter
//! block: the ABI between the monitor (`crate::vm`) and the guest code
//! (`super::programs`).
//!
//! Guest RAM starts at guest-physical 0 and is identity-mapped (virtual ==
//! physical) by page tables the monitor writes, using 2 MiB pages with the
//! U/S bit set because the guest runs at CPL 3 (see `crate::vm::cpu_setup`).
//!
//! ```text
//! 0x0000_1000  PML4                     (one page)
//! 0x0000_2000  PDPT                     (one page, entries 0..4 used)
//! 0x0000_3000  page directories         (up to 4 pages: 4 GiB of 2 MiB pages)
//! 0x0000_8000  GDT
//! 0x0000_9000  vCPU parameter blocks    (64 bytes each, MAX_VCPUS of them)
//! 0x0000_A000  sync page                (table-ready flag, barrier counter)
//! 0x0001_0000  guest code               (up to 64 KiB)
//! 0x0002_0000  vCPU stacks              (4 KiB each, MAX_VCPUS of them)
//! 0x0010_0000  data area, up to the end of RAM:
//!              shared area (table or counters), page-aligned, then
//!              one equal page-aligned private slice per vCPU
//! ```
//!
//! The guest reports progress by storing a counter into the last word of its
//! parameter block. The monitor reads it straight from RAM, so progress costs
//! the guest no exit (an exit to user space costs ~30 µs on the build hosts,
//! docs/host-facts.md).

use super::Workload;

/// Size of a guest page (the layout's allocation unit).
pub const PAGE: u64 = 4096;
/// Size of the large pages the guest page tables map.
pub const LARGE_PAGE: u64 = 2 << 20;

/// Guest-physical address of the PML4.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the first page directory (one per GiB follow).
pub const PD_ADDR: u64 = 0x3000;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x8000;
/// Guest-physical address of the first vCPU parameter block.
pub const PARAMS_ADDR: u64 = 0x9000;
/// Size of one vCPU parameter block.
pub const PARAMS_SIZE: u64 = 64;
/// Guest-physical address of the sync page.
pub const SYNC_ADDR: u64 = 0xA000;
/// Sync page word set to 1 by vCPU 0 once the shared table is filled.
pub const SYNC_TABLE_READY: u64 = SYNC_ADDR;
/// Sync page word every vCPU increments (locked) when it reaches the barrier.
/// On its own cache line, away from the ready flag.
pub const SYNC_BARRIER: u64 = SYNC_ADDR + 64;
/// Guest-physical address where the program is loaded and starts.
pub const CODE_ADDR: u64 = 0x10000;
/// Room for the program.
pub const CODE_MAX: u64 = 0x10000;
/// Guest-physical address of vCPU 0's stack (the stack grows down from the
/// end of the vCPU's 4 KiB).
pub const STACKS_ADDR: u64 = 0x20000;
/// Size of one vCPU stack.
pub const STACK_SIZE: u64 = PAGE;
/// Start of the data area.
pub const DATA_ADDR: u64 = 0x10_0000;

/// Most vCPUs a micro-VM may have (their parameter blocks fill one page).
pub const MAX_VCPUS: usize = (PAGE / PARAMS_SIZE) as usize;
/// Most RAM a micro-VM may have (the page directories at `PD_ADDR` map 4 GiB).
pub const MAX_RAM: u64 = 4 << 30;

/// A guest virtual address no page table maps (PML4 entry 128 is empty); the
/// `crash` workload reads it.
pub const UNMAPPED_ADDR: u64 = 0x0000_4000_0000_0000;

/// Byte offsets of the fields of a parameter block, as the guest code reads
/// them. Every field is a little-endian u64.
pub mod field {
    /// Guest-physical start of the vCPU's private slice.
    pub const BASE: i32 = 0;
    /// Number of u64 words in the private slice.
    pub const WORDS: i32 = 8;
    /// Content seed.
    pub const SEED: i32 = 16;
    /// Workload iterations (passes, touches, lookups or increments).
    pub const ITERATIONS: i32 = 24;
    /// Guest-physical start of the shared area.
    pub const SHARED_BASE: i32 = 32;
    /// Number of u64 words of the shared area the workload uses.
    pub const SHARED_WORDS: i32 = 40;
    /// Number of vCPUs of the VM.
    pub const NVCPUS: i32 = 48;
    /// Progress counter, written by the guest.
    pub const PROGRESS: i32 = 56;
}

/// The parameters of one vCPU, as planned by [`plan`]. The monitor writes all
/// but `index`, `private_seed` and `shared_percent` into the vCPU's parameter
/// block (the guest learns its index with the WHOAMI hypercall); the progress
/// word starts at 0. The block is full, so the fill's private seed and shared
/// percent, the same for every vCPU, are assembled into the program as
/// immediates instead (see `super::programs`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VcpuParams {
    /// The vCPU's index in its VM.
    pub index: usize,
    /// Guest-physical start of the private slice (page-aligned).
    pub base: u64,
    /// Number of u64 words in the private slice (a whole number of pages).
    pub words: u64,
    /// Content seed (0 for workloads without generated content); the seed
    /// of the fill's shared pages.
    pub seed: u64,
    /// Seed of the fill's private pages (`seed` unless the workload is a
    /// fill with its own private seed).
    pub private_seed: u64,
    /// Percentage of the fill's data pages that get `seed`'s content rather
    /// than `private_seed`'s (see `super::model::page_is_shared`); 100 unless
    /// the workload is a fill that says otherwise.
    pub shared_percent: u8,
    /// Frames per block of that choice (1 unless the fill says otherwise).
    pub shared_run: u32,
    /// Workload iterations: sweep passes, random touches, table lookups or
    /// counter increments (0 otherwise).
    pub iterations: u64,
    /// Guest-physical start of the shared area (page-aligned).
    pub shared_base: u64,
    /// Number of u64 words of the shared area the workload uses: the table
    /// (`table_pages * 512`) or the counters (8 per counter, one per line).
    pub shared_words: u64,
    /// Number of vCPUs of the VM.
    pub nvcpus: u64,
}

impl VcpuParams {
    /// Guest-physical address of this vCPU's parameter block.
    pub fn block_addr(&self) -> u64 {
        block_addr(self.index)
    }

    /// Guest-physical address of this vCPU's progress word.
    pub fn progress_addr(&self) -> u64 {
        self.block_addr() + field::PROGRESS as u64
    }

    /// The parameter block as the guest reads it (progress 0).
    pub fn block(&self) -> [u64; 8] {
        [
            self.base,
            self.words,
            self.seed,
            self.iterations,
            self.shared_base,
            self.shared_words,
            self.nvcpus,
            0,
        ]
    }

    /// Number of pages in the private slice.
    pub fn pages(&self) -> u64 {
        self.words / WORDS_PER_PAGE
    }
}

// The fixed areas do not overlap.
const _: () = {
    assert!(PD_ADDR + (MAX_RAM >> 30) * PAGE <= GDT_ADDR);
    assert!(PARAMS_ADDR + MAX_VCPUS as u64 * PARAMS_SIZE <= SYNC_ADDR);
    assert!(SYNC_ADDR + PAGE <= CODE_ADDR);
    assert!(CODE_ADDR + CODE_MAX <= STACKS_ADDR);
    assert!(STACKS_ADDR + MAX_VCPUS as u64 * STACK_SIZE <= DATA_ADDR);
};

/// Number of u64 words in a page.
pub const WORDS_PER_PAGE: u64 = PAGE / 8;

/// Guest-physical address of vCPU `index`'s parameter block.
pub fn block_addr(index: usize) -> u64 {
    PARAMS_ADDR + index as u64 * PARAMS_SIZE
}

/// Initial stack pointer of vCPU `index`.
pub fn stack_top(index: usize) -> u64 {
    STACKS_ADDR + (index as u64 + 1) * STACK_SIZE
}

/// Pages of the shared area a workload needs.
fn shared_pages(workload: &Workload) -> u64 {
    match *workload {
        Workload::TableScan { table_pages, .. } => table_pages as u64,
        Workload::Counters { counters, .. } => (counters as u64 * 64).div_ceil(PAGE),
        _ => 0,
    }
}

/// Words of the shared area a workload uses.
fn shared_words(workload: &Workload) -> u64 {
    match *workload {
        Workload::TableScan { table_pages, .. } => table_pages as u64 * WORDS_PER_PAGE,
        Workload::Counters { counters, .. } => counters as u64 * 8,
        _ => 0,
    }
}

/// Pages each vCPU's private slice needs at least.
fn min_private_pages(workload: &Workload) -> u64 {
    match workload {
        Workload::Fill { .. } | Workload::Sweep { .. } | Workload::Random { .. } => 1,
        _ => 0,
    }
}

/// The smallest guest RAM (bytes, page-aligned) in which `workload` runs with
/// `nvcpus` vCPUs.
pub fn min_ram_bytes(workload: &Workload, nvcpus: usize) -> u64 {
    DATA_ADDR + (shared_pages(workload) + nvcpus as u64 * min_private_pages(workload)) * PAGE
}

/// Plans the data area: the shared area first, then `nvcpus` equal private
/// slices sharing the rest of RAM. Fails when the RAM is too small, too large
/// or not page-aligned, when there are too many vCPUs, or when the workload's
/// shared area is empty.
pub fn plan(workload: &Workload, ram_bytes: u64, nvcpus: usize) -> Result<Vec<VcpuParams>, String> {
    if nvcpus == 0 {
        return Err("a micro-VM needs at least one vCPU".into());
    }
    if nvcpus > MAX_VCPUS {
        return Err(format!(
            "{nvcpus} vCPUs requested; a micro-VM has at most {MAX_VCPUS}"
        ));
    }
    if !ram_bytes.is_multiple_of(PAGE) {
        return Err(format!(
            "guest RAM of {ram_bytes} bytes is not a multiple of the {PAGE}-byte page"
        ));
    }
    if ram_bytes > MAX_RAM {
        return Err(format!(
            "guest RAM of {} MiB exceeds the micro-VM maximum of {} MiB",
            ram_bytes >> 20,
            MAX_RAM >> 20
        ));
    }
    match *workload {
        Workload::TableScan { table_pages: 0, .. } => {
            return Err("table_scan needs table_pages >= 1".into())
        }
        Workload::Counters { counters: 0, .. } => return Err("counters needs counters >= 1".into()),
        Workload::Fill { shared_run, .. }
            if !shared_run.is_power_of_two() || shared_run > 65536 =>
        {
            return Err(format!(
                "fill needs shared_run a power of two from 1 to 65536, not {shared_run}"
            ));
        }
        Workload::Fill { shared_percent, .. } if shared_percent > 100 => {
            return Err(format!(
                "fill needs shared_percent from 0 to 100, not {shared_percent}"
            ))
        }
        _ => {}
    }
    let min = min_ram_bytes(workload, nvcpus);
    if ram_bytes < min {
        return Err(format!(
            "guest RAM of {ram_bytes} bytes is too small for {} with {nvcpus} vCPUs: \
             it needs at least {min} bytes ({} KiB)",
            workload.name(),
            min.div_ceil(1024)
        ));
    }
    let shared_base = DATA_ADDR;
    let private_base = shared_base + shared_pages(workload) * PAGE;
    let slice_pages = (ram_bytes - private_base) / PAGE / nvcpus as u64;
    let (seed, iterations) = match *workload {
        Workload::Fill { seed, .. } => (seed, 0),
        Workload::Sweep { seed, passes } => (seed, passes as u64),
        Workload::Random { seed, touches } => (seed, touches),
        Workload::TableScan { seed, lookups, .. } => (seed, lookups),
        Workload::Counters { increments, .. } => (0, increments),
        Workload::Crash | Workload::Spin | Workload::BadIo => (0, 0),
    };
    let (private_seed, shared_percent, shared_run) = match *workload {
        Workload::Fill {
            private_seed,
            shared_percent,
            shared_run,
            ..
        } => (private_seed, shared_percent, shared_run),
        _ => (seed, 100, 1),
    };
    Ok((0..nvcpus)
        .map(|index| VcpuParams {
            index,
            base: private_base + index as u64 * slice_pages * PAGE,
            words: slice_pages * WORDS_PER_PAGE,
            seed,
            private_seed,
            shared_percent,
            shared_run,
            iterations,
            shared_base,
            shared_words: shared_words(workload),
            nvcpus: nvcpus as u64,
        })
        .collect())
}

/// Guest frames of the system area (page tables, GDT, parameter blocks,
/// code, stacks): everything below [`DATA_ADDR`]. The monitor keeps them out
/// of page sharing (see ARCHITECTURE.md).
pub const fn system_frames() -> std::ops::Range<u64> {
    0..DATA_ADDR / PAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_equal_page_aligned_and_inside_ram() {
        let w = Workload::TableScan {
            seed: 1,
            table_pages: 3,
            lookups: 10,
            write_after: 0,
        };
        let ram = 8 << 20;
        let p = plan(&w, ram, 3).unwrap();
        assert_eq!(p[0].shared_base, DATA_ADDR);
        assert_eq!(p[0].shared_words, 3 * 512);
        assert_eq!(p[0].base, DATA_ADDR + 3 * PAGE);
        for v in &p {
            assert_eq!(v.base % PAGE, 0);
            assert_eq!(v.words, p[0].words);
            assert!(v.base + v.words * 8 <= ram);
        }
        assert_eq!(p[1].base, p[0].base + p[0].words * 8);
    }

    #[test]
    fn errors_are_clear() {
        let w = Workload::Fill {
            seed: 1,
            private_seed: 1,
            shared_percent: 100,
            shared_run: 1,
        };
        assert!(plan(&w, 1 << 20, 1).unwrap_err().contains("too small"));
        assert!(plan(&w, 8 << 20, 65).unwrap_err().contains("at most 64"));
        assert!(plan(&w, (8 << 20) + 1, 1).unwrap_err().contains("multiple"));
        assert!(plan(&w, 8 << 30, 1).unwrap_err().contains("maximum"));
        assert!(plan(&w, min_ram_bytes(&w, 4), 4).is_ok());
        assert!(plan(&w, min_ram_bytes(&w, 4) - PAGE, 4).is_err());
        let w = Workload::Fill {
            seed: 1,
            private_seed: 2,
            shared_percent: 101,
            shared_run: 1,
        };
        assert!(plan(&w, 8 << 20, 1).unwrap_err().contains("0 to 100"));
    }
}
