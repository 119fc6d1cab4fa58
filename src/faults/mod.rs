//! Page faults the monitor handles itself, through userfaultfd.
//!
//! * [`uffd`]: a safe layer over userfaultfd write-protect on the guests'
//!   `MAP_SHARED` memfd pages: register, protect, read fault messages, wake.
//!   Copy-on-write of shared pages is built on it: a guest write to a shared
//!   page blocks its vCPU in the kernel, a handler thread copies the page,
//!   remaps it under the writer and wakes it.

pub mod handler;
pub mod uffd;

pub use handler::FaultHandler;
pub use uffd::{page_is_write_protected, FaultEvent, Userfault};
