//! disco: a NUMA-aware, Disco-style virtual machine monitor on Linux KVM.
//!
//! The crate is a library (so tests and benchmarks drive the real monitor) plus
//! the `disco` binary in `main.rs`. See ARCHITECTURE.md for the map.

pub mod api;
pub mod bench;
pub mod config;
pub mod control;
pub mod faults;
pub mod files;
pub mod guest;
pub mod host_load;
pub mod kvm_check;
pub mod leftovers;
pub mod linux;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod numa;
pub mod report;
pub mod sharing;
pub mod signals;
pub mod snapshot;
pub mod topology;
pub mod vm;

/// Size of a guest page and of a machine page. Everything the monitor maps is
/// managed at this granularity.
pub const PAGE_SIZE: usize = 4096;
