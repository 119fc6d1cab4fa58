//! userfaultfd write-protect on memfd `MAP_SHARED` pages, for real: a writer
//! thread (or a KVM vCPU) blocks on a protected page, the test reads the
//! fault and resolves it by copy + `mmap(MAP_FIXED)` + wake, or by
//! un-protecting. Creating a userfaultfd needs root here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use disco::faults::{page_is_write_protected, FaultEvent, Userfault};
use disco::guest::layout::PAGE;
use disco::guest::model::page_content;
use disco::guest::Workload;
use disco::kvm_check::require_kvm;
use disco::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuOutcome, VcpuPlacement};
use disco::PAGE_SIZE;

/// How long a thread that should stay blocked is watched before the test
/// believes it.
const STILL_BLOCKED: Duration = Duration::from_millis(100);
/// Generous bound for anything that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(5);

fn uffd() -> Userfault {
    Userfault::new().unwrap_or_else(|e| {
        panic!("these tests need a userfaultfd (run as root, as on the build hosts): {e}")
    })
}

/// A memfd of `pages` pages (a sparse shmem file, like a pool).
fn memfd(pages: usize) -> File {
    // SAFETY: plain syscalls; results checked.
    unsafe {
        let fd = libc::memfd_create(c"disco-uffd-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        let file = File::from(OwnedFd::from_raw_fd(fd));
        file.set_len((pages * PAGE_SIZE) as u64).unwrap();
        file
    }
}

/// `pages` pages of `file` from page `first`, mapped shared, read-write;
/// unmapped on drop.
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    fn new(file: &File, first: usize, pages: usize) -> Mapping {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh mapping the kernel places; result checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                (first * PAGE_SIZE) as libc::off_t,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            addr: addr as usize,
            len,
        }
    }

    fn page(&self, i: usize) -> usize {
        assert!((i + 1) * PAGE_SIZE <= self.len);
        self.addr + i * PAGE_SIZE
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every thread using it has been joined.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Replaces the page at `addr` with page `page` of `file` (`MAP_FIXED`).
fn remap(addr: usize, file: &File, page: usize) {
    // SAFETY: `addr` is a page of a mapping this test owns; replacing it is
    // the point. Result checked.
    let got = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            (page * PAGE_SIZE) as libc::off_t,
        )
    };
    assert_eq!(
        got as usize,
        addr,
        "mmap(MAP_FIXED): {}",
        std::io::Error::last_os_error()
    );
}

/// The page at `addr` as read through the mapping (reads never block on a
/// write-protected page).
fn read_page(addr: usize) -> Vec<u8> {
    // SAFETY: `addr` is a mapped, readable page of a mapping the test owns.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) }.to_vec()
}

/// Page `page` of `file`, read with `pread` (not through any mapping).
fn file_page(file: &File, page: usize) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    file.read_exact_at(&mut buf, (page * PAGE_SIZE) as u64)
        .unwrap();
    buf
}

/// The copy-on-write step of the monitor: copies the page at `addr` into page
/// `to` of `file`, maps that copy over `addr`. Returns nothing; the caller
/// wakes.
fn copy_and_remap(addr: usize, file: &File, to: usize) {
    file.write_all_at(&read_page(addr), (to * PAGE_SIZE) as u64)
        .unwrap();
    remap(addr, file, to);
}

fn word(page: &[u8], index: usize) -> u64 {
    u64::from_le_bytes(page[index * 8..index * 8 + 8].try_into().unwrap())
}

fn gettid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// A thread that stores `value` at `addr` and reports when the store is
/// done.
struct Writer {
    tid: u32,
    done: mpsc::Receiver<Duration>,
    handle: thread::JoinHandle<()>,
}

impl Writer {
    fn spawn(addr: usize, value: u64) -> Writer {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let handle = thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let t0 = Instant::now();
            // SAFETY: `addr` is an aligned word of a writable mapping the
            // test keeps alive until this thread is joined.
            unsafe { std::ptr::write_volatile(addr as *mut u64, value) };
            let _ = done_tx.send(t0.elapsed());
        });
        Writer {
            tid: tid_rx.recv().unwrap(),
            done,
            handle,
        }
    }

    fn assert_blocked(&self, why: &str) {
        match self.done.recv_timeout(STILL_BLOCKED) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("the writer should still be blocked {why}, got {other:?}"),
        }
    }

    /// Waits for the store; returns how long it took.
    fn finish(self, why: &str) -> Duration {
        let took = self
            .done
            .recv_timeout(PROMPTLY)
            .unwrap_or_else(|e| panic!("the writer did not finish {why}: {e:?}"));
        self.handle.join().unwrap();
        took
    }
}

fn expect_event(uffd: &Userfault) -> FaultEvent {
    uffd.read_event(Some(PROMPTLY))
        .unwrap()
        .expect("no fault message within 5 s")
}

fn assert_wp_write(ev: &FaultEvent, addr: usize, tid: u32) {
    assert_eq!(ev.address, addr, "fault address");
    assert!(ev.wp && ev.write && !ev.minor, "flags of {ev:?}");
    assert_eq!(ev.thread_id, Some(tid), "faulting thread");
}

fn wp(addr: usize) -> bool {
    page_is_write_protected(addr).unwrap()
}

#[test]
fn features_and_argument_checks() {
    let u = uffd();
    let offered = Userfault::offered_features().unwrap();
    eprintln!("offered features {offered:#x}, enabled {:#x}", u.features());
    // WP on shmem (bit 12) and THREAD_ID (bit 8) are enabled, and minor
    // faults on shmem (bit 10) when the kernel offers them.
    assert_eq!(u.features() & !(1 << 10), 1 << 12 | 1 << 8 | 1);
    assert_eq!(u.supports_minor(), offered & (1 << 10) != 0);
    assert_eq!(offered & u.features(), u.features());
    assert!(u.as_raw_fd() >= 0);

    let file = memfd(2);
    let map = Mapping::new(&file, 0, 2);
    let e = u.register_wp(map.addr + 8, PAGE_SIZE).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    let e = u.write_protect(map.addr, 0, true).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    // Protecting a range that is not registered is refused (ENOENT).
    let e = u.write_protect(map.addr, PAGE_SIZE, true).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    // Nothing pending: a short wait times out.
    let t0 = Instant::now();
    assert_eq!(u.read_event(Some(Duration::from_millis(20))).unwrap(), None);
    assert!(t0.elapsed() >= Duration::from_millis(20));
    // Registration, protection and un-registration of the mapping.
    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(map.addr, map.len, true).unwrap();
    assert!(wp(map.page(0)) && wp(map.page(1)));
    u.unregister(map.addr, map.len).unwrap();
    assert!(
        !wp(map.page(0)) && !wp(map.page(1)),
        "unregister clears protection"
    );
    // Not registered any more: writes go straight through.
    // SAFETY: a word of our writable mapping.
    unsafe { std::ptr::write_volatile(map.page(1) as *mut u64, 9) };
    assert_eq!(word(&file_page(&file, 1), 0), 9);
}

/// (1) The copy-on-write path: block, read the fault, copy, remap, wake.
#[test]
fn write_to_protected_page_resolved_by_copy_remap_and_wake() {
    let u = uffd();
    // Pages 0..4 are guest RAM; page 6 receives the copy.
    let file = memfd(8);
    let map = Mapping::new(&file, 0, 4);
    let target = map.page(1);
    // SAFETY: page 1 of our writable mapping.
    unsafe { std::ptr::write_bytes(target as *mut u8, 0x11, PAGE_SIZE) };
    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(target, PAGE_SIZE, true).unwrap();
    assert!(wp(target));
    assert!(!wp(map.page(2)));

    let writer = Writer::spawn(target + 8, 0xdead_beef);
    let ev = expect_event(&u);
    let handler_start = Instant::now();
    assert_wp_write(&ev, target, writer.tid);
    writer.assert_blocked("before the fault is resolved");

    copy_and_remap(target, &file, 6);
    assert!(!wp(target), "the new mapping is not protected");
    // The remap alone does not wake the blocked writer.
    writer.assert_blocked("after the remap, before UFFDIO_WAKE");
    let wake_start = Instant::now();
    u.wake(target, PAGE_SIZE).unwrap();
    let handler = wake_start - handler_start;
    let took = writer.finish("after UFFDIO_WAKE");
    eprintln!("writer blocked {took:?} (handler {handler:?} incl. the 100 ms checks)");

    // The write landed in the copy; the original page is unchanged.
    let copy = file_page(&file, 6);
    assert_eq!(word(&copy, 1), 0xdead_beef);
    assert!(copy
        .iter()
        .enumerate()
        .all(|(i, &b)| (8..16).contains(&i) || b == 0x11));
    assert!(
        file_page(&file, 1).iter().all(|&b| b == 0x11),
        "original changed"
    );
    assert_eq!(word(&read_page(target), 1), 0xdead_beef);
    // Registered but unprotected neighbours take writes without faulting.
    // SAFETY: a word of our writable mapping.
    unsafe { std::ptr::write_volatile(map.page(2) as *mut u64, 7) };
    assert_eq!(word(&file_page(&file, 2), 0), 7);
    assert_eq!(u.read_event(Some(Duration::from_millis(10))).unwrap(), None);
}

/// (2) Resolving by un-protecting in place: un-protect alone wakes the
/// writer; with DONTWAKE it stays blocked until UFFDIO_WAKE.
#[test]
fn unprotect_in_place_wakes_unless_dontwake() {
    let u = uffd();
    let file = memfd(2);
    let map = Mapping::new(&file, 0, 2);
    let target = map.page(0);
    u.register_wp(map.addr, map.len).unwrap();

    // Un-protect (no DONTWAKE) resolves the fault by itself.
    u.write_protect(target, PAGE_SIZE, true).unwrap();
    let writer = Writer::spawn(target, 1);
    assert_wp_write(&expect_event(&u), target, writer.tid);
    writer.assert_blocked("before un-protect");
    u.write_protect(target, PAGE_SIZE, false).unwrap();
    assert!(!wp(target));
    writer.finish("after un-protect without UFFDIO_WAKE");
    assert_eq!(word(&file_page(&file, 0), 0), 1, "the write lands in place");

    // Un-protect with DONTWAKE leaves it blocked until a wake.
    u.write_protect(target, PAGE_SIZE, true).unwrap();
    let writer = Writer::spawn(target + 16, 2);
    assert_wp_write(&expect_event(&u), target, writer.tid);
    u.unprotect_dontwake(target, PAGE_SIZE).unwrap();
    assert!(!wp(target));
    writer.assert_blocked("after un-protect with DONTWAKE");
    u.wake(target, PAGE_SIZE).unwrap();
    writer.finish("after UFFDIO_WAKE");
    let page = file_page(&file, 0);
    assert_eq!((word(&page, 0), word(&page, 2)), (1, 2));
    assert_eq!(u.read_event(Some(Duration::from_millis(10))).unwrap(), None);
}

/// A wake before the fault is resolved only makes the writer retry: it
/// faults again and a second message arrives. Handlers may wake too early
/// without harm.
#[test]
fn early_wake_makes_the_writer_fault_again() {
    let u = uffd();
    let file = memfd(1);
    let map = Mapping::new(&file, 0, 1);
    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(map.addr, PAGE_SIZE, true).unwrap();
    let writer = Writer::spawn(map.addr, 77);
    assert_wp_write(&expect_event(&u), map.addr, writer.tid);
    u.wake(map.addr, PAGE_SIZE).unwrap();
    assert_wp_write(&expect_event(&u), map.addr, writer.tid);
    writer.assert_blocked("after a wake with the page still protected");
    u.write_protect(map.addr, PAGE_SIZE, false).unwrap();
    writer.finish("after un-protect");
    assert_eq!(word(&file_page(&file, 0), 0), 77);
}

/// Unregistering a range clears its protection but does not wake the
/// writer blocked there (only missing-mode registrations are woken); a wake
/// then lets its write land in place. Closing the userfaultfd clears the
/// protection and wakes: a `Userfault` must outlive the sharing it enforces.
#[test]
fn unregister_and_close_release_protection() {
    let file = memfd(1);
    let map = Mapping::new(&file, 0, 1);
    let u = uffd();
    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(map.addr, PAGE_SIZE, true).unwrap();
    let writer = Writer::spawn(map.addr, 1);
    assert_wp_write(&expect_event(&u), map.addr, writer.tid);
    u.unregister(map.addr, map.len).unwrap();
    assert!(!wp(map.addr));
    writer.assert_blocked("after unregister");
    u.wake(map.addr, PAGE_SIZE).unwrap();
    writer.finish("after unregister and wake");

    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(map.addr, PAGE_SIZE, true).unwrap();
    let writer = Writer::spawn(map.addr + 8, 2);
    assert_wp_write(&expect_event(&u), map.addr, writer.tid);
    drop(u);
    writer.finish("after closing the userfaultfd");
    assert!(!wp(map.addr));
    let page = file_page(&file, 0);
    assert_eq!((word(&page, 0), word(&page, 1)), (1, 2));
}

/// (3) Pages never touched (no page in the memfd, no page table entry) can
/// be protected (a PTE marker): reads see zeros and keep the protection,
/// writes fault.
#[test]
fn untouched_page_can_be_protected() {
    let u = uffd();
    let file = memfd(4);
    let map = Mapping::new(&file, 0, 3);
    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(map.addr, map.len, true).unwrap();
    assert!(
        wp(map.page(0)) && wp(map.page(2)),
        "PTE markers on untouched pages"
    );

    // A read populates the page and keeps it protected.
    assert!(read_page(map.page(1)).iter().all(|&b| b == 0));
    assert!(
        wp(map.page(1)),
        "a read fault on the marker keeps the protection"
    );

    for (i, spare) in [(2, None), (1, Some(3))] {
        let target = map.page(i);
        let writer = Writer::spawn(target + 24, 0x42 + i as u64);
        assert_wp_write(&expect_event(&u), target, writer.tid);
        writer.assert_blocked("on the untouched page");
        match spare {
            None => u.write_protect(target, PAGE_SIZE, false).unwrap(),
            Some(to) => {
                copy_and_remap(target, &file, to);
                u.wake(target, PAGE_SIZE).unwrap();
            }
        }
        writer.finish("after resolution");
        assert_eq!(word(&read_page(target), 3), 0x42 + i as u64);
    }
    assert_eq!(word(&file_page(&file, 2), 3), 0x44);
    assert_eq!(word(&file_page(&file, 3), 3), 0x43);
    assert!(
        file_page(&file, 1).iter().all(|&b| b == 0),
        "page 1 of the memfd changed"
    );
    assert!(wp(map.page(0)), "page 0 untouched and still protected");
}

/// (4) The pagemap bit follows protect, un-protect and remap.
#[test]
fn pagemap_bit_follows_protection() {
    let u = uffd();
    let file = memfd(3);
    let map = Mapping::new(&file, 0, 2);
    let (p0, p1) = (map.page(0), map.page(1));
    // SAFETY: page 0 of our writable mapping (populated; page 1 is not).
    unsafe { std::ptr::write_volatile(p0 as *mut u64, 5) };
    assert!(!wp(p0) && !wp(p1), "not registered");
    u.register_wp(map.addr, map.len).unwrap();
    assert!(!wp(p0) && !wp(p1), "registered, not protected");
    u.write_protect(map.addr, map.len, true).unwrap();
    assert!(wp(p0) && wp(p1), "protected");
    u.write_protect(p0, PAGE_SIZE, false).unwrap();
    assert!(!wp(p0) && wp(p1), "page 0 un-protected");
    u.write_protect(p0, PAGE_SIZE, true).unwrap();
    assert!(wp(p0));
    remap(p1, &file, 2);
    assert!(wp(p0) && !wp(p1), "page 1 remapped");
    // The remapped page lost its registration: protecting it is refused.
    assert!(u.write_protect(p1, PAGE_SIZE, true).is_err());
    // An address outside any mapping reads as unprotected.
    assert!(!wp(0x1000));
}

/// (5) After a remap the page must be registered again; then it can be
/// protected and resolved again, many times over. Measures the round trip.
#[test]
fn remapped_page_can_be_registered_and_protected_again() {
    const ROUNDS: usize = 300;
    let u = uffd();
    // Page 1 of the mapping bounces between memfd pages 4 and 5.
    let file = memfd(6);
    let map = Mapping::new(&file, 0, 3);
    let target = map.page(1);
    u.register_wp(map.addr, map.len).unwrap();

    let (cmd_tx, cmd_rx) = mpsc::channel::<u64>();
    let (done_tx, done_rx) = mpsc::channel::<Duration>();
    let (tid_tx, tid_rx) = mpsc::channel();
    let writer = thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        for value in cmd_rx {
            let t0 = Instant::now();
            // SAFETY: a word of the test's writable mapping, alive until
            // this thread is joined.
            unsafe { std::ptr::write_volatile((target + 40) as *mut u64, value) };
            done_tx.send(t0.elapsed()).unwrap();
        }
    });
    let tid = tid_rx.recv().unwrap();

    let (mut blocked, mut handler) = (Vec::new(), Vec::new());
    let mut registered = true;
    for round in 0..ROUNDS {
        let spare = 4 + round % 2;
        if !registered {
            u.register_wp(target, PAGE_SIZE).unwrap();
        }
        u.write_protect(target, PAGE_SIZE, true).unwrap();
        assert!(wp(target), "round {round}: protected again");
        let value = 1000 + round as u64;
        cmd_tx.send(value).unwrap();
        let ev = expect_event(&u);
        let t0 = Instant::now();
        assert_wp_write(&ev, target, tid);
        copy_and_remap(target, &file, spare);
        u.wake(target, PAGE_SIZE).unwrap();
        handler.push(t0.elapsed());
        registered = false;
        assert!(!wp(target));
        blocked.push(done_rx.recv_timeout(PROMPTLY).unwrap());
        let copy = file_page(&file, spare);
        assert_eq!(word(&copy, 5), value, "round {round}: write in the copy");
        if round > 0 {
            assert_eq!(word(&copy, 5) - 1, word(&file_page(&file, 9 - spare), 5));
        }
    }
    drop(cmd_tx);
    writer.join().unwrap();
    assert!(
        file_page(&file, 1).iter().all(|&b| b == 0),
        "original changed"
    );
    assert_eq!(u.read_event(Some(Duration::from_millis(10))).unwrap(), None);

    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100], v[v.len() - 1])
    };
    let (h50, h99, hmax) = stats(&mut handler);
    let (b50, b99, bmax) = stats(&mut blocked);
    eprintln!(
        "{ROUNDS} rounds: handler (event read -> copy, remap, wake) median {h50:?}, p99 {h99:?}, \
         max {hmax:?}; writer's blocked store median {b50:?}, p99 {b99:?}, max {bmax:?}"
    );
}

// ---- KVM: a guest write to a protected page ----

/// A fill whose every data page gets `page_content(seed, gfn)`.
fn fill(seed: u64) -> Workload {
    Workload::Fill {
        seed,
        private_seed: seed,
        shared_percent: 100,
        shared_run: 1,
    }
}

fn spec(name: &str, workload: Workload) -> MicroVmSpec {
    MicroVmSpec {
        name: name.into(),
        vcpus: vec![VcpuPlacement {
            node: 0,
            host_cpus: Vec::new(),
        }],
        workload,
        time_limit: Duration::from_secs(30),
    }
}

/// Guest RAM size for the KVM tests, and the spare memfd pages after it
/// that receive copies.
const RAM: usize = 4 << 20;
const SPARE_PAGES: usize = 512;

/// Runs a one-vCPU fill on fresh memfd RAM of which `protect` data pages
/// (guest page indices into the vCPU's slice, spread evenly) are registered
/// and write-protected before the start; a handler thread resolves each
/// fault by copy + remap + wake. Returns (run time, sorted copy + remap
/// times).
fn fill_with_protected_pages(protect: usize) -> (Duration, Vec<Duration>) {
    let seed = 0xc0ffee;
    let u = Arc::new(uffd());
    let file = Arc::new(memfd(RAM / PAGE_SIZE + SPARE_PAGES));
    let map = Mapping::new(&file, 0, RAM / PAGE_SIZE);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let name = format!("wp{protect}");
    let ram = GuestRam {
        host_addr: map.addr,
        size: RAM,
    };
    let mut vm = MicroVm::create(&kvm, spec(&name, fill(seed)), ram).unwrap();
    let p = vm.params()[0].clone();
    let first = p.base / PAGE;
    let gfns: Vec<u64> = (0..protect as u64)
        .map(|k| first + k * (p.pages() / protect.max(1) as u64))
        .collect();
    let host = |gfn: u64| map.addr + gfn as usize * PAGE_SIZE;
    if protect > 0 {
        u.register_wp(map.addr, map.len).unwrap();
        for &gfn in &gfns {
            u.write_protect(host(gfn), PAGE_SIZE, true).unwrap();
            assert!(wp(host(gfn)));
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (u, file, stop) = (u.clone(), file.clone(), stop.clone());
        // The vCPU thread's name, as the kernel keeps it (15 bytes).
        let mut vcpu_comm = format!("disco-{name}-vcpu0");
        vcpu_comm.truncate(15);
        thread::spawn(move || {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Some(ev) = u.read_event(Some(Duration::from_millis(20))).unwrap() else {
                    continue;
                };
                assert!(ev.wp && ev.write, "{ev:?}");
                let tid = ev.thread_id.unwrap();
                if times.is_empty() {
                    let comm =
                        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
                    assert_eq!(
                        comm.trim_end(),
                        vcpu_comm,
                        "the faulting thread is the vCPU"
                    );
                }
                // The handler's own work: copy and remap. (Timing the wake
                // too would count the guest's run up to its next fault
                // whenever the woken vCPU preempts the handler on its CPU.)
                let t0 = Instant::now();
                copy_and_remap(ev.address, &file, RAM / PAGE_SIZE + times.len());
                times.push(t0.elapsed());
                u.wake(ev.address, PAGE_SIZE).unwrap();
            }
            times
        })
    };
    vm.start().unwrap();
    let out = vm.wait();
    stop.store(true, Ordering::Relaxed);
    let mut times = handler.join().unwrap();
    for (i, v) in out.vcpus.iter().enumerate() {
        if let VcpuOutcome::Failed { reason, regs } = v {
            panic!("vCPU {i} failed: {reason}\n{regs}");
        }
    }
    assert!(out.checksum_ok(), "{out:?}");
    assert_eq!(times.len(), protect, "one fault per protected page");

    for &gfn in &gfns {
        let want: Vec<u8> = page_content(seed, gfn)
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(read_page(host(gfn)), want, "guest page {gfn}");
        assert!(
            file_page(&file, gfn as usize).iter().all(|&b| b == 0),
            "the original machine page of guest page {gfn} was written"
        );
        assert!(!wp(host(gfn)));
    }
    // Every copy holds one of the protected pages' content.
    for i in 0..protect {
        let copy = file_page(&file, RAM / PAGE_SIZE + i);
        assert!(gfns
            .iter()
            .any(|&g| word(&copy, 0) == page_content(seed, g)[0]));
    }
    times.sort();
    (out.run_time, times)
}

/// (6) A guest write to a protected page blocks the vCPU; the handler's
/// copy + remap + wake lets the fill finish with the right content, in the
/// copy, while the original machine page stays untouched.
#[test]
fn kvm_guest_write_resolved_by_handler() {
    if !require_kvm("kvm_guest_write_resolved_by_handler") {
        return;
    }
    let (_, one) = fill_with_protected_pages(1);
    // The per-fault cost: the fastest of a few runs with and without N
    // protected pages.
    const N: usize = 256;
    let mut base = Duration::MAX;
    let mut many = Duration::MAX;
    let mut times = Vec::new();
    for _ in 0..3 {
        base = base.min(fill_with_protected_pages(0).0);
        let (run, t) = fill_with_protected_pages(N);
        if run < many {
            (many, times) = (run, t);
        }
    }
    eprintln!(
        "fill of {} MiB: 1 protected page: copy + remap {:?}; fastest of 3: unprotected \
         {base:?}, {N} protected pages {many:?} with copy + remap median {:?}, p99 {:?}: \
         about {:?} per fault (guest round trip)",
        RAM >> 20,
        one[0],
        times[N / 2],
        times[N * 99 / 100],
        many.saturating_sub(base) / N as u32,
    );
}

/// (7) Stopping a VM whose vCPU is blocked in a write-protect fault: the
/// kick signal interrupts the fault, the vCPU reports the stop, and the page
/// is left as it was (still protected, unwritten). With `read_first` the
/// handler has read the fault message before the stop; without, the message
/// is still queued when the vCPU leaves the fault.
fn stop_vcpu_blocked_in_wp_fault(read_first: bool) {
    let u = uffd();
    let file = memfd(RAM / PAGE_SIZE);
    let map = Mapping::new(&file, 0, RAM / PAGE_SIZE);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ram = GuestRam {
        host_addr: map.addr,
        size: RAM,
    };
    let mut vm = MicroVm::create(&kvm, spec("wpstop", fill(3)), ram).unwrap();
    let gfn = vm.params()[0].base / PAGE + 3;
    let target = map.addr + gfn as usize * PAGE_SIZE;
    u.register_wp(map.addr, map.len).unwrap();
    u.write_protect(target, PAGE_SIZE, true).unwrap();
    vm.start().unwrap();
    if read_first {
        assert_eq!(expect_event(&u).address, target);
    } else {
        // Blocked: the fault message is queued (the descriptor is readable)
        // and progress stalls.
        let mut pfd = libc::pollfd {
            fd: u.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, PROMPTLY.as_millis() as i32) };
        assert_eq!(n, 1, "no fault became readable");
    }
    let (progress, total) = vm.progress();
    assert!(progress < total);
    thread::sleep(STILL_BLOCKED);
    assert_eq!(vm.progress().0, progress, "the vCPU is blocked");

    let t0 = Instant::now();
    vm.stop();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || tx.send(vm.wait()).unwrap());
    let out = match rx.recv_timeout(PROMPTLY) {
        Ok(out) => out,
        Err(_) => {
            // Unblock the vCPU so the test ends, then fail.
            u.write_protect(target, PAGE_SIZE, false).unwrap();
            let _ = waiter.join();
            panic!("stopping the VM did not interrupt the vCPU blocked in the fault");
        }
    };
    let stopped = t0.elapsed();
    waiter.join().unwrap();
    match &out.vcpus[0] {
        VcpuOutcome::Failed { reason, regs } => {
            eprintln!(
                "stopped a vCPU blocked in a WP fault (message read first: {read_first}) in \
                 {stopped:?}: {reason}, at {:?}",
                regs.instruction
            );
            assert!(reason.contains("stop"), "{reason}");
        }
        other => panic!("the vCPU should report the stop: {other:?}"),
    }
    assert!(wp(target), "still protected");
    assert!(file_page(&file, gfn as usize).iter().all(|&b| b == 0));
    // A fault the vCPU has left is no longer queued: its unread message is
    // gone (a handler must expect read_event to find nothing).
    assert_eq!(u.read_event(Some(Duration::from_millis(10))).unwrap(), None);
}

#[test]
fn kvm_stop_interrupts_vcpu_blocked_in_wp_fault() {
    if !require_kvm("kvm_stop_interrupts_vcpu_blocked_in_wp_fault") {
        return;
    }
    stop_vcpu_blocked_in_wp_fault(true);
    stop_vcpu_blocked_in_wp_fault(false);
}
