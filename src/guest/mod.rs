//! Micro-guests: small programs the monitor ships that run in guest user mode
//! (CPL 3, long mode) on page tables the monitor builds. They are the
//! workloads of tests and benchmarks.
//!
//! * [`layout`]: the guest-physical memory layout and the per-vCPU parameter
//!   block (the ABI between monitor and guest code).
//! * [`programs`]: the guest code, assembled at run time with iced-x86.
//! * [`model`]: the same computations on the host, giving the checksum each
//!   vCPU must return.

pub mod layout;
pub mod model;
pub mod programs;

use serde::Serialize;

/// What a micro-guest does. Chosen per VM in the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// Fill each vCPU's private slice; checksum of all words written. Data
    /// page `gfn` gets the content of `seed` when
    /// [`model::page_is_shared`]`(gfn, shared_percent)` and of `private_seed`
    /// otherwise, so VMs with the same seed and layout hold identical content
    /// in the shared pages (all of them at 100 %, whatever `private_seed`)
    /// and, given different private seeds, different content in the others.
    /// The choice is made per block of `shared_run` consecutive frames (a
    /// power of two): 1 scatters shared pages among private ones frame by
    /// frame (the worst case for sharing in runs), larger blocks lay them
    /// out in runs, as VMs booted from one image hold theirs.
    Fill {
        seed: u64,
        private_seed: u64,
        /// 0 to 100.
        shared_percent: u8,
        /// Frames per block of the shared/private choice: 1 to 65536, a
        /// power of two.
        shared_run: u32,
    },
    /// Fill, then `passes` sequential read-modify-write sweeps of the slice.
    Sweep { seed: u64, passes: u32 },
    /// Fill, then `touches` read-modify-writes of pseudo-random words.
    Random { seed: u64, touches: u64 },
    /// vCPU 0 fills a `table_pages` shared table from `seed`; every vCPU then
    /// does `lookups` pseudo-random reads of it (read-mostly shared data).
    /// With `write_after` > 0 the reader turns writer: once every vCPU has
    /// done `write_after` lookups they meet at a barrier, vCPU 0 adds
    /// `model::GOLDEN` to every word of the table, they meet again and do the rest of the
    /// lookups against the new content. The table's pages are then written
    /// after the monitor may have merged and replicated them.
    TableScan {
        seed: u64,
        table_pages: u32,
        lookups: u64,
        /// 0: never write; otherwise at most `lookups`.
        write_after: u64,
    },
    /// Every vCPU does `increments` locked increments over `counters`
    /// write-shared counters (one per cache line), then a barrier, then sums.
    Counters { counters: u32, increments: u64 },
    /// Test workload: touches an unmapped address (the guest triple-faults).
    Crash,
    /// Test workload: loops forever (stopped by the time limit).
    Spin,
    /// Test workload: writes to an I/O port the monitor does not know.
    BadIo,
}

impl Workload {
    /// Short name, as written in the config (`kind = "..."`).
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Fill { .. } => "fill",
            Workload::Sweep { .. } => "sweep",
            Workload::Random { .. } => "random",
            Workload::TableScan { .. } => "table_scan",
            Workload::Counters { .. } => "counters",
            Workload::Crash => "crash",
            Workload::Spin => "spin",
            Workload::BadIo => "bad_io",
        }
    }

    /// All workload names the config accepts.
    pub const NAMES: &'static [&'static str] = &[
        "fill",
        "sweep",
        "random",
        "table_scan",
        "counters",
        "crash",
        "spin",
        "bad_io",
    ];
}
