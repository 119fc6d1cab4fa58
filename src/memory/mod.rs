//! Machine memory: who owns every page the guests use.
//!
//! Disco's central idea is an explicit physical-to-machine indirection. Here:
//!
//! * a **pool** per (fixture) NUMA node is a memfd whose pages are allocated
//!   under that node's memory policy; a **machine page** is `(node, index)`,
//!   the page at `index * PAGE_SIZE` in that node's memfd ([`pool`]);
//! * each VM has a **pmap**: guest frame number -> machine page + flags
//!   ([`pmap`]);
//! * one global **memmap**: machine page -> refcount and owners `(vm, gfn)`
//!   ([`memmap`]);
//! * guest RAM is a host virtual range made of `MAP_SHARED` mappings of pool
//!   pages; KVM follows changes to it through its MMU notifiers. The
//!   **mapper** ([`mapper`]) is the only code that changes those mappings, and
//!   it updates pmap, memmap and the host mapping together under one lock.
//!
//! [`Memory::verify`] checks that all of them agree with what the kernel
//! really maps (read back from `/proc/self/maps`).

pub mod budget;
pub mod cow;
pub mod folios;
pub mod image;
pub mod incoming;
pub mod inspect;
pub mod mapper;
pub mod memmap;
pub mod numa;
pub mod pmap;
pub mod pool;
pub mod replica;
pub mod runs;
pub mod sampler;
mod verify;
pub mod watch;

pub use budget::BudgetStats;
pub use cow::{
    FaultOutcome, GuestCosts, MergeOutcome, MergePair, PageScan, RunAllowance, SharingStats,
    MERGE_BATCH_MAX,
};
pub use image::{
    write_pool_bytes, ImageLoad, ImagePages, ImageSource, PageImage, PoolRun, SpaceRequest,
};
pub use incoming::OwnedPage;
pub use inspect::{FrameView, NodeSharing, PageView};
pub use mapper::{GuestSpaceStats, Memory, MoveReport, MoveTimes, PoolStats, MOVE_RUN_MAX};
pub use replica::{FrameLocation, ReplicaStats};
pub use watch::{KernelMappings, MemorySample, MemoryWatch};

use serde::Serialize;

/// Index of a NUMA node of the (possibly emulated) topology.
pub type NodeId = usize;
/// Guest frame number: guest-physical address / PAGE_SIZE.
pub type Gfn = u64;
/// Identifies one VM's guest space inside [`Memory`].
pub type VmId = u32;

/// A page of machine memory: page `index` of node `node`'s pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MachinePage {
    pub node: u16,
    pub index: u32,
}

impl MachinePage {
    pub fn node(self) -> NodeId {
        self.node as NodeId
    }
}

impl std::fmt::Display for MachinePage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}:{:#x}", self.node, self.index)
    }
}

/// Stops a VM's vCPUs from touching guest memory for a moment.
///
/// Merging a frame onto another VM's page replaces the frame's mapping with
/// `mmap(MAP_FIXED)`, registers it with userfaultfd and write-protects it:
/// three steps, between which the new mapping of the *shared* page is
/// writable. A vCPU that retries a fault in that window would write into the
/// other VM's page (seen in tests: a lost write in about 1 run in 4 of the
/// constant-writer stress test). The mapper therefore pauses the VM whose
/// mapping it replaces; KSM avoids the window by doing the same change under
/// the page-table lock in the kernel.
pub trait GuestPause: Send + Sync {
    /// Holds every vCPU outside `KVM_RUN`; `false` if that could not be done
    /// in time (nothing is held then).
    fn pause(&self) -> bool;
    /// Ends a successful `pause`.
    fn resume(&self);
    /// No vCPU of the VM runs guest code for now (all exited, or paused by
    /// the monitor), so its memory cannot change under the scanner: the
    /// scanner may merge its content on first sight. A hint, read without
    /// locks; the default (for pausers that cannot tell) is `false`.
    fn still(&self) -> bool {
        false
    }
}
