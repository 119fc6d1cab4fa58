//! A small, safe layer over userfaultfd write-protect (uffd-wp) and minor
//! faults for guest RAM made of `MAP_SHARED` memfd (shmem) pages.
//!
//! # Protocol (copy-on-write of a shared page)
//!
//! 1. [`Userfault::new`] once; the mapper [`register_wp`](Userfault::register_wp)s
//!    a guest's RAM and [`write_protect`](Userfault::write_protect)s each
//!    shared page. Protected pages stay mapped `PROT_READ | PROT_WRITE`:
//!    reads (guest or monitor) never fault.
//! 2. A write to a protected page, by a vCPU inside `KVM_RUN` or by any
//!    host thread, blocks that thread in the kernel and queues a message.
//! 3. A handler thread gets it from [`read_event`](Userfault::read_event):
//!    the page address (the guest-physical address is `address -
//!    ram_base`), `wp` and `write` set, and the faulting thread's id (the
//!    vCPU thread's tid).
//! 4. The handler copies the page into a new machine page,
//!    `mmap(MAP_FIXED)`s the copy over the faulting page, and
//!    [`wake`](Userfault::wake)s the page. The writer retries and its
//!    write lands in the copy; the shared page is unchanged. To give the
//!    page back to a single owner instead, un-protect it in place
//!    (`write_protect(.., false)`), which also wakes.
//!
//! # Findings (Linux 6.18, nested KVM, `tests/uffd.rs`)
//!
//! * **What wakes a blocked writer.** `UFFDIO_WAKE`; `UFFDIO_WRITEPROTECT`
//!   un-protect *without* `DONTWAKE` (so `write_protect(.., false)` alone
//!   resolves a fault; [`Userfault::unprotect_dontwake`] does not wake);
//!   closing the userfaultfd. **Not** a `mmap(MAP_FIXED)` over the page: the
//!   writer stays blocked (checked for 100 ms) until `UFFDIO_WAKE`, which
//!   works on the remapped, no longer registered range. **Not**
//!   `UFFDIO_UNREGISTER` either: it clears the protection but wakes only
//!   missing-mode waiters, so a WP waiter needs a wake after it. A wake
//!   before the fault is resolved only makes the writer retry, fault again
//!   and queue a second message, so early or duplicate wakes are harmless.
//! * **A remap loses the registration.** The page mapped by
//!   `mmap(MAP_FIXED)` is a new VMA without `VM_UFFD_WP`: it is writable,
//!   pagemap bit 57 is clear, and `UFFDIO_WRITEPROTECT` on it fails with
//!   `ENOENT` until the mapper registers it again (tested over 300
//!   remap/re-register/protect rounds). Registering part of a VMA splits it
//!   (more VMAs, see `vm.max_map_count` in ARCHITECTURE.md).
//! * **Untouched pages.** Protecting a never-touched shmem page (no page in
//!   the memfd, no PTE) works here: the kernel installs a uffd-wp PTE
//!   marker (Linux 5.19+, `CONFIG_PTE_MARKER_UFFD_WP`), pagemap bit 57 is
//!   set on it, a read populates the page and keeps it protected, and a
//!   write faults like on a populated page. So sharing can protect pages
//!   whatever their state, and un-populated guest RAM can be protected
//!   wholesale.
//! * **pagemap bit 57** ([`page_is_write_protected`]) is set after protect
//!   (populated page or marker), clear after un-protect, remap, unregister
//!   and close; clear on pages never registered.
//! * **Dropping the [`Userfault`]** clears every protection it set and lets
//!   blocked writers write *in place*: it must outlive the sharing it
//!   enforces.
//! * **KVM.** A guest write to a protected page blocks the vCPU thread
//!   inside `KVM_RUN`; the message's thread id is the vCPU thread. The
//!   vCPU kick signal (`crate::vm::control`) interrupts that wait:
//!   `MicroVm::stop` ends a vCPU blocked in a fault in about 2 ms, the
//!   page staying protected and unwritten. A fault the vCPU has left is
//!   dequeued, read or not: a handler must expect `read_event` to find
//!   nothing after `poll` said readable (`EAGAIN`, reported as `Ok(None)`),
//!   and may resolve a fault whose thread is gone (harmless).
//! * **Timings on the build hosts** (docs/host-facts.md, "userfaultfd"):
//!   copy + remap + wake of a
//!   host thread's fault about 15 us median (35 us p99), the blocked store
//!   about 40 us median end to end; for guest writes, copy + remap about
//!   10 us median, and a fill with 256 protected pages takes about 47 us
//!   more per fault than without (the whole guest round trip: exit into
//!   the fault, message, handler, wake, re-entry). Timing a handler's
//!   `UFFDIO_WAKE` can show ~50 us: the woken vCPU may preempt the handler
//!   on its CPU and run to its next fault first.
//!
//! # Minor faults (page-access sampling, `crate::memory::sampler`)
//!
//! [`Userfault::new`] also asks for `UFFD_FEATURE_MINOR_SHMEM` when offered
//! ([`Userfault::supports_minor`]). A range [`register`](Userfault::register)ed
//! in minor mode raises a minor fault when a thread touches a page that the
//! memfd holds but the page table does not map, e.g. after
//! `madvise(MADV_DONTNEED)` (a "zap"); [`Userfault::continue_range`]
//! (`UFFDIO_CONTINUE`) maps the existing page and wakes. Findings (Linux
//! 6.18, `tests/sampler.rs`):
//!
//! * **WP and MINOR in one registration** work (`register(.., true, true)`):
//!   both kinds of fault arrive on the one descriptor, told apart by
//!   [`FaultEvent::minor`] / [`FaultEvent::wp`].
//! * A minor fault's message has the page, `WRITE` when the first access
//!   was a store, neither `WP` nor (for a read) `WRITE`, and the faulting
//!   thread's id. Touching a **hole** (no page in the memfd) raises no
//!   fault (missing mode is not registered): it allocates as usual.
//! * **`MADV_DONTNEED` keeps the uffd-wp protection** of a protected page:
//!   the PTE becomes a uffd-wp marker (pagemap bit 57 stays set, present
//!   bit clear). A write to it raises a *minor* fault first (`WRITE`, not
//!   `WP`).
//! * **`UFFDIO_CONTINUE` replaces that marker.** Without
//!   `UFFDIO_CONTINUE_MODE_WP` (`keep_wp: false`) the page comes back
//!   writable and the write lands in place, with no write-protect fault: a
//!   shared page would be corrupted. With `keep_wp` the page is mapped
//!   protected and the retried write raises the usual WP fault (a second
//!   message), so a minor fault on a protected page needs both handlings:
//!   continue-with-WP, then the copy-on-write.
//! * A continue on a page already mapped fails with `EEXIST` and does not
//!   wake; `continue_range` wakes the range then (two threads faulting on
//!   one page).
//! * Re-registering a WP|MINOR range in WP mode only keeps minor mode (the
//!   kernel skips VMAs that already have the asked-for modes). A range
//!   freshly mapped with `mmap(MAP_FIXED)` has no modes, so the mapper must
//!   register it with minor mode again.
//! * With KVM the faulting thread is the vCPU thread (inside `KVM_RUN`);
//!   KVM's MMU notifier drops the guest's mapping on the zap. A guest
//!   read-modify-write (load, then store) is sampled as a read: the
//!   continue maps the page writable, so the store does not fault again.
//! * Costs on the build hosts (docs/host-facts.md, "userfaultfd";
//!   `kvm_sweep_sampled_while_running`):
//!   zap about 4-12 us per page, handler (bookkeeping + continue + wake)
//!   about 8 us median (~150 us p99), about 40-50 us more guest time per
//!   sample (the vCPU's round trip through the fault), the same order as a
//!   write-protect fault.
//!
//! # Pitfalls
//!
//! * The handler must not *write* a protected page itself (it would block
//!   in its own fault); reading it, to copy it, is fine.
//! * A page must be registered before it is protected; after every
//!   `mmap(MAP_FIXED)` of a page that is to stay protected, register again.
//! * The fd is `O_NONBLOCK`; `read_event` polls, so a fault woken between
//!   poll and read never hangs the handler.
//! * Creating a userfaultfd that sees kernel-mode faults (KVM's
//!   `get_user_pages`) needs root (`CAP_SYS_PTRACE`) or
//!   `vm.unprivileged_userfaultfd=1`, or a usable `/dev/userfaultfd`
//!   (tried as a fallback). `UFFD_USER_MODE_ONLY` would not see guest
//!   writes, so it is not used.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::PAGE_SIZE;

/// The kernel ABI, transcribed from `include/uapi/linux/userfaultfd.h`
/// (Linux 6.x) and `include/uapi/asm-generic/ioctl.h` (the `_IOC` encoding).
mod sys {
    /// `UFFD_API`: the only API version.
    pub const UFFD_API: u64 = 0xAA;
    /// `UFFDIO`: the ioctl type byte.
    const UFFDIO: u64 = 0xAA;

    // `_IOC(dir, type, nr, size)` = dir << 30 | size << 16 | type << 8 | nr,
    // with `_IOC_WRITE` = 1 and `_IOC_READ` = 2.
    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
    }
    const fn iowr(nr: u64, size: usize) -> u64 {
        ioc(3, nr, size)
    }
    const fn ior(nr: u64, size: usize) -> u64 {
        ioc(2, nr, size)
    }

    // `_UFFDIO_*` ioctl numbers.
    pub const NR_REGISTER: u64 = 0x00;
    pub const NR_UNREGISTER: u64 = 0x01;
    pub const NR_WAKE: u64 = 0x02;
    pub const NR_WRITEPROTECT: u64 = 0x06;
    pub const NR_CONTINUE: u64 = 0x07;
    pub const NR_API: u64 = 0x3F;

    /// `struct uffdio_api`.
    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    /// `struct uffdio_range`.
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    /// `struct uffdio_register`.
    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        /// Out: bit `1 << _UFFDIO_*` for each ioctl usable on the range.
        pub ioctls: u64,
    }

    /// `struct uffdio_writeprotect`.
    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioWriteprotect {
        pub range: UffdioRange,
        pub mode: u64,
    }

    /// `struct uffdio_continue`.
    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioContinue {
        pub range: UffdioRange,
        pub mode: u64,
        /// Out: bytes mapped, or a negative errno.
        pub mapped: i64,
    }

    /// `struct uffd_msg` (`__packed`, 32 bytes): `event`, three reserved
    /// fields, then a 24-byte union. For `UFFD_EVENT_PAGEFAULT` the union is
    /// `{ __u64 flags; __u64 address; union { __u32 ptid; } feat; }`.
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct UffdMsg {
        pub event: u8,
        pub reserved1: u8,
        pub reserved2: u16,
        pub reserved3: u32,
        pub arg: [u64; 3],
    }

    pub const UFFDIO_API: u64 = iowr(NR_API, size_of::<UffdioApi>());
    pub const UFFDIO_REGISTER: u64 = iowr(NR_REGISTER, size_of::<UffdioRegister>());
    pub const UFFDIO_UNREGISTER: u64 = ior(NR_UNREGISTER, size_of::<UffdioRange>());
    pub const UFFDIO_WAKE: u64 = ior(NR_WAKE, size_of::<UffdioRange>());
    pub const UFFDIO_WRITEPROTECT: u64 = iowr(NR_WRITEPROTECT, size_of::<UffdioWriteprotect>());
    pub const UFFDIO_CONTINUE: u64 = iowr(NR_CONTINUE, size_of::<UffdioContinue>());
    /// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
    pub const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

    // The numbers as the C headers produce them.
    const _: () = {
        assert!(size_of::<UffdMsg>() == 32);
        assert!(UFFDIO_API == 0xc018_aa3f);
        assert!(UFFDIO_REGISTER == 0xc020_aa00);
        assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
        assert!(UFFDIO_WAKE == 0x8010_aa02);
        assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
        assert!(UFFDIO_CONTINUE == 0xc020_aa07);
        assert!(USERFAULTFD_IOC_NEW == 0xaa00);
    };

    // `UFFD_FEATURE_*`.
    pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const FEATURE_THREAD_ID: u64 = 1 << 8;
    pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
    pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

    // `UFFD_EVENT_*`.
    pub const EVENT_PAGEFAULT: u8 = 0x12;

    // `UFFD_PAGEFAULT_FLAG_*`.
    pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
    pub const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

    // `UFFDIO_REGISTER_MODE_*`.
    pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
    pub const REGISTER_MODE_WP: u64 = 1 << 1;
    pub const REGISTER_MODE_MINOR: u64 = 1 << 2;

    // `UFFDIO_CONTINUE_MODE_*` (`DONTWAKE` is bit 0, unused here).
    pub const CONTINUE_MODE_WP: u64 = 1 << 1;

    // `UFFDIO_WRITEPROTECT_MODE_*`.
    pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
    pub const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
}

/// The features [`Userfault::new`] asks for: write-protect on shmem, and the
/// faulting thread's id in each message (which vCPU wrote).
/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP` is implied by any `UFFDIO_API` call on
/// current kernels but is named explicitly.
const WANTED_FEATURES: u64 =
    sys::FEATURE_PAGEFAULT_FLAG_WP | sys::FEATURE_WP_HUGETLBFS_SHMEM | sys::FEATURE_THREAD_ID;

/// Features [`Userfault::new`] asks for in addition when the kernel offers
/// them: minor faults on shmem (Linux 5.13+), for page-access sampling
/// (`crate::memory::sampler`).
const OPTIONAL_FEATURES: u64 = sys::FEATURE_MINOR_SHMEM;

/// How a [`Userfault::continue_range`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContinueOutcome {
    /// The page-cache pages were mapped and the waiters woken.
    Mapped,
    /// A page of the range was already mapped (`EEXIST`: another fault on
    /// the same page was resolved first); the range was woken instead.
    AlreadyMapped,
}

/// A userfaultfd set up for write-protect faults on shmem.
///
/// All methods take `&self`: one handler thread can read events while the
/// mapper registers and protects pages from other threads. Dropping it closes
/// the file descriptor, which unregisters every range, clears their
/// protection and wakes every thread blocked in one of its faults, so it must
/// outlive every guest mapping whose pages it protects (a shared page whose
/// protection goes away is writable by all its sharers).
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    features: u64,
}

/// One page fault read from a [`Userfault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// Host virtual address of the faulting page (page-aligned).
    pub address: usize,
    /// The access was a write (`UFFD_PAGEFAULT_FLAG_WRITE`).
    pub write: bool,
    /// The fault is a write-protect fault (`UFFD_PAGEFAULT_FLAG_WP`).
    pub wp: bool,
    /// The fault is a minor fault (`UFFD_PAGEFAULT_FLAG_MINOR`; only on
    /// ranges registered in minor mode): the page is in the shmem file but
    /// not mapped here. Resolve with [`Userfault::continue_range`].
    pub minor: bool,
    /// Kernel thread id of the faulting thread (for a guest write, the vCPU
    /// thread), when `UFFD_FEATURE_THREAD_ID` was granted.
    pub thread_id: Option<u32>,
}

/// `Err(InvalidInput)` unless `addr` and `len` are page-aligned and `len > 0`.
fn check_range(what: &str, addr: usize, len: usize) -> io::Result<sys::UffdioRange> {
    if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "userfaultfd {what}: range {addr:#x} + {len:#x} is not a non-empty page-aligned range"
            ),
        ));
    }
    Ok(sys::UffdioRange {
        start: addr as u64,
        len: len as u64,
    })
}

/// Wraps the last OS error as `"<what> <addr>+<len>: <error>"`, keeping its
/// kind (and raw errno in the message).
fn os_error(what: &str, addr: usize, len: usize) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(
        e.kind(),
        format!("userfaultfd {what} {addr:#x}+{len:#x}: {e}"),
    )
}

/// Creates the raw userfaultfd: the `userfaultfd(2)` syscall, or, when that is
/// refused, `/dev/userfaultfd` (Linux 6.1+, permission by file mode).
fn open_userfaultfd(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor that nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall_err = io::Error::last_os_error();
    match syscall_err.raw_os_error() {
        Some(libc::ENOSYS) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "userfaultfd: the kernel has no userfaultfd (CONFIG_USERFAULTFD is off)",
            ))
        }
        Some(libc::EPERM) => {}
        _ => {
            return Err(io::Error::new(
                syscall_err.kind(),
                format!("userfaultfd(2): {syscall_err}"),
            ))
        }
    }
    // Refused: try the device, whose file mode may grant access.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd");
    let dev_err = match dev {
        Ok(dev) => {
            // SAFETY: ioctl on the device we opened; the result is checked.
            let fd = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    sys::USERFAULTFD_IOC_NEW as libc::c_ulong,
                    flags,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor that nobody else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            io::Error::last_os_error()
        }
        Err(e) => e,
    };
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "userfaultfd needs root (CAP_SYS_PTRACE) or vm.unprivileged_userfaultfd=1 to handle \
             faults taken by KVM in kernel mode: userfaultfd(2) said {syscall_err}; \
             /dev/userfaultfd: {dev_err}"
        ),
    ))
}

impl Userfault {
    /// Opens a userfaultfd and negotiates the API with
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_THREAD_ID`.
    ///
    /// Flags: `O_CLOEXEC` (no child inherits it) and `O_NONBLOCK`, so that
    /// [`read_event`](Self::read_event) can `poll` and then `read` without
    /// ever blocking: a fault may be woken (e.g. by a concurrent
    /// un-protect) between `poll` and `read`, which then says `EAGAIN`
    /// instead of hanging. Not `UFFD_USER_MODE_ONLY`: guest writes fault in
    /// KVM's kernel-mode `get_user_pages`, which that flag would exclude.
    ///
    /// Errors: not permitted (not root and `vm.unprivileged_userfaultfd=0`,
    /// no usable `/dev/userfaultfd`), no userfaultfd in the kernel, or
    /// shmem write-protect not offered (kernels before 5.19, or without
    /// `CONFIG_PTE_MARKER_UFFD_WP`); each with a message saying so.
    pub fn new() -> io::Result<Userfault> {
        // Optional features are asked for only when offered: an API call
        // with an unknown feature fails as a whole.
        let optional = Self::offered_features().map_or(0, |o| o & OPTIONAL_FEATURES);
        let requested = WANTED_FEATURES | optional;
        let fd = open_userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: requested,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API on our descriptor with a valid uffdio_api.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as libc::c_ulong, &mut api) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // The API handshake happens once per descriptor: ask a fresh one
            // what is offered, to name what is missing.
            let offered = Self::offered_features().ok();
            let missing = offered.map(|o| WANTED_FEATURES & !o);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "userfaultfd UFFDIO_API with features {WANTED_FEATURES:#x} failed: {e}; the kernel offers \
                     {}{}",
                    offered.map_or("(unknown)".into(), |o| format!("{o:#x}")),
                    match missing {
                        Some(m) if m & sys::FEATURE_WP_HUGETLBFS_SHMEM != 0 => {
                            " (no write-protect on shmem: needs Linux 5.19+ with CONFIG_PTE_MARKER_UFFD_WP)"
                                .to_string()
                        }
                        Some(m) if m != 0 => format!(" (missing {m:#x})"),
                        _ => String::new(),
                    }
                ),
            ));
        }
        // The reply lists every feature the kernel offers; the descriptor
        // has exactly the requested ones.
        Ok(Userfault {
            fd,
            features: requested,
        })
    }

    /// The `UFFD_FEATURE_*` bits the kernel offers, from a throw-away
    /// userfaultfd (an API handshake with no features requested).
    pub fn offered_features() -> io::Result<u64> {
        let fd = open_userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API on our descriptor with a valid uffdio_api.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as libc::c_ulong, &mut api) };
        if r != 0 {
            return Err(os_error("UFFDIO_API", 0, 0));
        }
        Ok(api.features)
    }

    /// The `UFFD_FEATURE_*` bits enabled on this descriptor (those
    /// requested: `PAGEFAULT_FLAG_WP | THREAD_ID | WP_HUGETLBFS_SHMEM`, and
    /// `MINOR_SHMEM` when the kernel offers it).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether minor faults on shmem can be registered
    /// (`UFFD_FEATURE_MINOR_SHMEM` was granted).
    pub fn supports_minor(&self) -> bool {
        self.features & sys::FEATURE_MINOR_SHMEM != 0
    }

    /// `UFFDIO_REGISTER` in write-protect mode on `addr..addr+len`
    /// (page-aligned, wholly mapped, not registered with another
    /// userfaultfd). Registering part of a VMA splits it. Fails when the
    /// kernel does not offer `UFFDIO_WRITEPROTECT` on the range.
    pub fn register_wp(&self, addr: usize, len: usize) -> io::Result<()> {
        self.register(addr, len, true, false)
    }

    /// `UFFDIO_REGISTER` on `addr..addr+len` in write-protect mode (`wp`),
    /// minor-fault mode (`minor`, shmem only, needs
    /// [`supports_minor`](Self::supports_minor)) or both at once (one
    /// registration: one VMA flag set, faults of both kinds on one fd).
    /// At least one mode must be asked for. Registering a range again with
    /// the same descriptor sets the modes asked for now (see the module's
    /// findings). Fails when the kernel does not offer
    /// `UFFDIO_WRITEPROTECT` (with `wp`) or `UFFDIO_CONTINUE` (with
    /// `minor`) on the range.
    pub fn register(&self, addr: usize, len: usize, wp: bool, minor: bool) -> io::Result<()> {
        self.register_modes(addr, len, wp, minor, false)
    }

    /// `UFFDIO_REGISTER` in all three modes: write-protect, minor and
    /// missing. Every access to a page of the range that its page table
    /// does not map then waits for the handler: minor for a page in the
    /// file, missing for a hole. Migration takes runs away from the guest
    /// this way (`Inner::detach_run`); registering the range again with
    /// [`register`](Self::register) ends it.
    pub fn register_every_fault(&self, addr: usize, len: usize) -> io::Result<()> {
        self.register_modes(addr, len, true, true, true)
    }

    fn register_modes(
        &self,
        addr: usize,
        len: usize,
        wp: bool,
        minor: bool,
        missing: bool,
    ) -> io::Result<()> {
        let range = check_range("register", addr, len)?;
        if !wp && !minor {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "userfaultfd register: no mode asked for (wp or minor)",
            ));
        }
        if minor && !self.supports_minor() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "userfaultfd: minor faults on shmem are not offered by this kernel \
                     (UFFD_FEATURE_MINOR_SHMEM, Linux 5.13+; features {:#x})",
                    self.features
                ),
            ));
        }
        let mode = if wp { sys::REGISTER_MODE_WP } else { 0 }
            | if minor { sys::REGISTER_MODE_MINOR } else { 0 }
            | if missing {
                sys::REGISTER_MODE_MISSING
            } else {
                0
            };
        let mut reg = sys::UffdioRegister {
            range,
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER with a valid uffdio_register; the kernel
        // only changes VMA flags of our own address space.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::UFFDIO_REGISTER as libc::c_ulong,
                &mut reg,
            )
        };
        if r != 0 {
            let what = match (wp, minor, missing) {
                (_, _, true) => "UFFDIO_REGISTER (write-protect | minor | missing mode)",
                (true, false, _) => "UFFDIO_REGISTER (write-protect mode)",
                (false, true, _) => "UFFDIO_REGISTER (minor mode)",
                _ => "UFFDIO_REGISTER (write-protect | minor mode)",
            };
            return Err(os_error(what, addr, len));
        }
        if minor && reg.ioctls & (1 << sys::NR_CONTINUE) == 0 {
            let _ = self.unregister(addr, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "userfaultfd: UFFDIO_CONTINUE is not available on {addr:#x}+{len:#x} \
                     (range ioctls {:#x})",
                    reg.ioctls
                ),
            ));
        }
        if wp && reg.ioctls & (1 << sys::NR_WRITEPROTECT) == 0 {
            let _ = self.unregister(addr, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "userfaultfd: UFFDIO_WRITEPROTECT is not available on {addr:#x}+{len:#x} \
                     (range ioctls {:#x})",
                    reg.ioctls
                ),
            ));
        }
        Ok(())
    }

    /// `UFFDIO_UNREGISTER` on `addr..addr+len`. The kernel clears the
    /// range's write protection but does **not** wake threads blocked in
    /// write-protect faults there (only missing-mode waiters): follow with
    /// [`wake`](Self::wake) if a fault may be pending.
    pub fn unregister(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut range = check_range("unregister", addr, len)?;
        // SAFETY: UFFDIO_UNREGISTER with a valid uffdio_range.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::UFFDIO_UNREGISTER as libc::c_ulong,
                &mut range,
            )
        };
        if r != 0 {
            return Err(os_error("UFFDIO_UNREGISTER", addr, len));
        }
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT` on `addr..addr+len`, which must be registered
    /// with [`register_wp`](Self::register_wp) (`ENOENT` otherwise).
    ///
    /// `protect == true` write-protects the pages, populated or not (an
    /// untouched shmem page gets a PTE marker). `protect == false` removes
    /// the protection **and wakes** the threads blocked in write faults on
    /// the range (no `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`): un-protecting is
    /// then a complete resolution of a fault by itself. Use
    /// [`unprotect_dontwake`](Self::unprotect_dontwake) to batch.
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> io::Result<()> {
        let mode = if protect {
            sys::WRITEPROTECT_MODE_WP
        } else {
            0
        };
        self.writeprotect_ioctl(addr, len, mode)
    }

    /// Removes write protection from `addr..addr+len` without waking the
    /// threads blocked there (`UFFDIO_WRITEPROTECT_MODE_DONTWAKE`): they stay
    /// blocked until [`wake`](Self::wake). For un-protecting many ranges
    /// and waking once.
    pub fn unprotect_dontwake(&self, addr: usize, len: usize) -> io::Result<()> {
        self.writeprotect_ioctl(addr, len, sys::WRITEPROTECT_MODE_DONTWAKE)
    }

    fn writeprotect_ioctl(&self, addr: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut wp = sys::UffdioWriteprotect {
            range: check_range("writeprotect", addr, len)?,
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT with a valid uffdio_writeprotect; it
        // only changes page protections in our own address space.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::UFFDIO_WRITEPROTECT as libc::c_ulong,
                &mut wp,
            )
        };
        if r != 0 {
            let what = if mode & sys::WRITEPROTECT_MODE_WP != 0 {
                "UFFDIO_WRITEPROTECT (protect)"
            } else {
                "UFFDIO_WRITEPROTECT (un-protect)"
            };
            return Err(os_error(what, addr, len));
        }
        Ok(())
    }

    /// `UFFDIO_CONTINUE` on `addr..addr+len` (registered in minor mode):
    /// maps the pages the shmem file already holds there and wakes the
    /// threads blocked in minor faults on the range. This resolves a minor
    /// fault without copying anything.
    ///
    /// `keep_wp` maps them write-protected (`UFFDIO_CONTINUE_MODE_WP`,
    /// a recent addition, present on the build hosts' 6.18): **needed for a page that is write-protected**, since
    /// the continue replaces the uffd-wp PTE marker the zap left and,
    /// without the flag, installs a writable PTE (see the findings).
    ///
    /// `EEXIST` (a page is already mapped: a second fault on the same page,
    /// resolved first by another continue) wakes the range and reports
    /// [`ContinueOutcome::AlreadyMapped`]; `EAGAIN` (the address space was
    /// changing, or a partial map) is retried a few times. Other errors
    /// (`ENOENT`: not registered in minor mode, e.g. remapped since;
    /// `EFAULT`: no page in the file there) are returned, and the caller
    /// should [`wake`](Self::wake) the range so the thread retries.
    pub fn continue_range(
        &self,
        addr: usize,
        len: usize,
        keep_wp: bool,
    ) -> io::Result<ContinueOutcome> {
        let range = check_range("continue", addr, len)?;
        let mode = if keep_wp { sys::CONTINUE_MODE_WP } else { 0 };
        let mut tries = 0;
        loop {
            let mut cont = sys::UffdioContinue {
                range,
                mode,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE with a valid uffdio_continue; it only
            // maps pages of the registered file into our own address space.
            let r = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    sys::UFFDIO_CONTINUE as libc::c_ulong,
                    &mut cont,
                )
            };
            if r == 0 {
                return Ok(ContinueOutcome::Mapped);
            }
            let errno = io::Error::last_os_error().raw_os_error();
            match errno {
                Some(libc::EEXIST) => {
                    self.wake(addr, len)?;
                    return Ok(ContinueOutcome::AlreadyMapped);
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) if tries < 16 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                _ => {
                    return Err(os_error(
                        if keep_wp {
                            "UFFDIO_CONTINUE (write-protected)"
                        } else {
                            "UFFDIO_CONTINUE"
                        },
                        addr,
                        len,
                    ))
                }
            }
        }
    }

    /// `UFFDIO_WAKE` on `addr..addr+len`: the threads blocked in faults on the
    /// range retry their access. The range need not be registered any more
    /// (after a `MAP_FIXED` remap it is not). Waking with nothing blocked is
    /// harmless; waking before the fault is resolved makes the thread fault
    /// again (a new message).
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut range = check_range("wake", addr, len)?;
        // SAFETY: UFFDIO_WAKE with a valid uffdio_range.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::UFFDIO_WAKE as libc::c_ulong,
                &mut range,
            )
        };
        if r != 0 {
            return Err(os_error("UFFDIO_WAKE", addr, len));
        }
        Ok(())
    }

    /// Waits up to `timeout` (forever with `None`) for a page fault and reads
    /// its message. `Ok(None)` when none came in time, or when the fault
    /// that made the descriptor readable was woken before it could be read.
    ///
    /// Only page faults can arrive: the non-cooperative events (fork, remap,
    /// remove, unmap) are not enabled. Should another event kind come
    /// anyway, it is skipped (with a warning) and the wait goes on.
    pub fn read_event(&self, timeout: Option<Duration>) -> io::Result<Option<FaultEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let wait_ms: libc::c_int = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a short timeout still waits.
                    left.as_nanos()
                        .div_ceil(1_000_000)
                        .min(libc::c_int::MAX as u128) as libc::c_int
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    continue;
                }
                return Err(io::Error::new(e.kind(), format!("userfaultfd poll: {e}")));
            }
            if n == 0 {
                return Ok(None);
            }
            if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(io::Error::other(format!(
                    "userfaultfd poll: error condition (revents {:#x})",
                    pfd.revents
                )));
            }
            let mut msg = sys::UffdMsg::default();
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`,
            // a plain-old-data struct.
            let got = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut sys::UffdMsg).cast(),
                    size_of::<sys::UffdMsg>(),
                )
            };
            if got < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    // Woken (and so resolved) between poll and read.
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(io::Error::new(e.kind(), format!("userfaultfd read: {e}"))),
                }
            }
            if got as usize != size_of::<sys::UffdMsg>() {
                return Err(io::Error::other(format!(
                    "userfaultfd read: short message of {got} bytes"
                )));
            }
            if msg.event != sys::EVENT_PAGEFAULT {
                tracing::warn!("userfaultfd: ignoring unexpected event {:#x}", msg.event);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                continue;
            }
            let [flags, address, feat] = msg.arg;
            return Ok(Some(FaultEvent {
                address: address as usize & !(PAGE_SIZE - 1),
                write: flags & sys::PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & sys::PAGEFAULT_FLAG_WP != 0,
                minor: flags & sys::PAGEFAULT_FLAG_MINOR != 0,
                thread_id: (self.features & sys::FEATURE_THREAD_ID != 0).then_some(feat as u32),
            }));
        }
    }

    /// The raw descriptor (for `epoll` and the like; it stays owned here).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `/proc/self/pagemap` bit 57: "pte is uffd-wp write-protected"
/// (Documentation/admin-guide/mm/pagemap.rst; Linux 5.13+).
const PAGEMAP_UFFD_WP: u64 = 1 << 57;

/// True when bit 57 of `/proc/self/pagemap` says the page at `addr` is
/// uffd-wp protected. This covers an untouched page holding only a
/// write-protect PTE marker; a page with no page table entry at all reads
/// as not protected. Needs no privilege (only frame numbers are hidden from
/// unprivileged readers).
pub fn page_is_write_protected(addr: usize) -> io::Result<bool> {
    let pagemap = File::open("/proc/self/pagemap")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /proc/self/pagemap: {e}")))?;
    let mut entry = [0u8; 8];
    let offset = (addr / PAGE_SIZE) as u64 * 8;
    pagemap.read_exact_at(&mut entry, offset).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("reading /proc/self/pagemap for {addr:#x}: {e}"),
        )
    })?;
    Ok(u64::from_le_bytes(entry) & PAGEMAP_UFFD_WP != 0)
}
