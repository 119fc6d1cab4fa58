//! Page-access sampling with userfaultfd minor faults (`disco::memory::sampler`)
//! on memfd `MAP_SHARED` guest RAM, for real: host threads first (the
//! kernel's behaviour the sampler relies on), then KVM micro-guests whose
//! vCPU threads take the faults. Creating a userfaultfd needs root here.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use disco::faults::uffd::ContinueOutcome;
use disco::faults::{page_is_write_protected, FaultEvent, Userfault};
use disco::guest::layout::PAGE;
use disco::guest::model::page_content;
use disco::guest::Workload;
use disco::kvm_check::require_kvm;
use disco::memory::sampler::PageSampler;
use disco::numa::{AccessSample, CounterSource};
use disco::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuOutcome, VcpuPlacement, VmOutcome};
use disco::PAGE_SIZE;

const STILL_BLOCKED: Duration = Duration::from_millis(100);
const PROMPTLY: Duration = Duration::from_secs(5);

fn uffd() -> Arc<Userfault> {
    let u = Userfault::new().unwrap_or_else(|e| {
        panic!("these tests need a userfaultfd (run as root, as on the build hosts): {e}")
    });
    assert!(
        u.supports_minor(),
        "FACTS.md: the build hosts offer UFFD_FEATURE_MINOR_SHMEM (features {:#x})",
        u.features()
    );
    Arc::new(u)
}

fn memfd(pages: usize) -> File {
    // SAFETY: plain syscalls; results checked.
    unsafe {
        let fd = libc::memfd_create(c"disco-sampler-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        let file = File::from(OwnedFd::from_raw_fd(fd));
        file.set_len((pages * PAGE_SIZE) as u64).unwrap();
        file
    }
}

/// A shared read-write mapping of a whole memfd; unmapped on drop.
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    fn new(file: &File, pages: usize) -> Mapping {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh mapping the kernel places; result checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
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

fn zap(addr: usize) {
    // SAFETY: a page of a shared mapping the test owns.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// `/proc/self/pagemap` bit 63: a page is present in the page table.
fn present(addr: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let f = File::open("/proc/self/pagemap").unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (addr / PAGE_SIZE) as u64 * 8)
        .unwrap();
    u64::from_le_bytes(e) & (1 << 63) != 0
}

fn wp(addr: usize) -> bool {
    page_is_write_protected(addr).unwrap()
}

fn gettid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// A host thread doing one access (`Some(v)`: store `v`; `None`: load) to
/// the word at `addr`; reports the loaded value when done.
struct Access {
    tid: u32,
    done: mpsc::Receiver<u64>,
    handle: thread::JoinHandle<()>,
}

impl Access {
    fn spawn(addr: usize, store: Option<u64>) -> Access {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let handle = thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            // SAFETY: an aligned word of a mapping the test keeps alive
            // until this thread is joined.
            let v = unsafe {
                match store {
                    Some(v) => {
                        std::ptr::write_volatile(addr as *mut u64, v);
                        v
                    }
                    None => std::ptr::read_volatile(addr as *const u64),
                }
            };
            let _ = done_tx.send(v);
        });
        Access {
            tid: tid_rx.recv().unwrap(),
            done,
            handle,
        }
    }

    fn assert_blocked(&self, why: &str) {
        match self.done.recv_timeout(STILL_BLOCKED) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("the access should still be blocked {why}, got {other:?}"),
        }
    }

    fn finish(self, why: &str) -> u64 {
        let v = self
            .done
            .recv_timeout(PROMPTLY)
            .unwrap_or_else(|e| panic!("the access did not finish {why}: {e:?}"));
        self.handle.join().unwrap();
        v
    }
}

fn expect_event(u: &Userfault) -> FaultEvent {
    u.read_event(Some(PROMPTLY))
        .unwrap()
        .expect("no fault message within 5 s")
}

fn no_event(u: &Userfault) {
    if let Some(ev) = u.read_event(Some(STILL_BLOCKED)).unwrap() {
        panic!("unexpected fault {ev:?}");
    }
}

/// What the kernel does with minor faults on shmem, combined with
/// write-protect (the findings in `faults/uffd.rs`).
#[test]
fn minor_faults_on_shmem_with_write_protect() {
    let u = uffd();
    let file = memfd(8);
    let map = Mapping::new(&file, 8);
    for i in 0..5 {
        // SAFETY: the test's own mapping.
        unsafe { std::ptr::write_volatile(map.page(i) as *mut u64, 100 + i as u64) };
    }
    // One registration, both modes.
    u.register(map.addr, map.len, true, true).unwrap();

    // (1) A read of a zapped page: a minor fault (not WRITE, not WP) with
    // the reader's thread id; continue maps the page, data intact.
    zap(map.page(0));
    assert!(!present(map.page(0)), "MADV_DONTNEED drops the PTE");
    let r = Access::spawn(map.page(0), None);
    let ev = expect_event(&u);
    assert_eq!(ev.address, map.page(0));
    assert!(ev.minor && !ev.write && !ev.wp, "{ev:?}");
    assert_eq!(ev.thread_id, Some(r.tid));
    r.assert_blocked("before the continue");
    assert_eq!(
        u.continue_range(map.page(0), PAGE_SIZE, false).unwrap(),
        ContinueOutcome::Mapped
    );
    assert_eq!(r.finish("after the continue"), 100);
    assert!(present(map.page(0)));
    // A second continue on the mapped page: EEXIST, reported and woken.
    assert_eq!(
        u.continue_range(map.page(0), PAGE_SIZE, false).unwrap(),
        ContinueOutcome::AlreadyMapped
    );

    // (2) A write to a zapped page: minor fault with WRITE.
    zap(map.page(4));
    let w = Access::spawn(map.page(4), Some(44));
    let ev = expect_event(&u);
    assert!(ev.minor && ev.write && !ev.wp, "{ev:?}");
    u.continue_range(map.page(4), PAGE_SIZE, false).unwrap();
    w.finish("after the continue");
    no_event(&u);

    // (3) A write-protected page keeps its protection through a zap (the
    // uffd-wp PTE marker; pagemap bit 57 stays set on the non-present
    // page). A write first raises a minor fault (WRITE, not WP); continued
    // with keep_wp, the retry raises the write-protect fault.
    u.write_protect(map.page(1), PAGE_SIZE, true).unwrap();
    zap(map.page(1));
    assert!(!present(map.page(1)));
    assert!(wp(map.page(1)), "the zap dropped the uffd-wp marker");
    let w = Access::spawn(map.page(1), Some(11));
    let ev = expect_event(&u);
    assert!(ev.minor && ev.write && !ev.wp, "{ev:?}");
    assert_eq!(
        u.continue_range(map.page(1), PAGE_SIZE, true).unwrap(),
        ContinueOutcome::Mapped
    );
    let ev = expect_event(&u);
    assert!(ev.wp && ev.write && !ev.minor, "{ev:?}");
    w.assert_blocked("in the write-protect fault");
    assert!(wp(map.page(1)) && present(map.page(1)));
    u.write_protect(map.page(1), PAGE_SIZE, false).unwrap();
    assert_eq!(w.finish("after the un-protect"), 11);

    // (4) The same without keep_wp: the continue replaces the marker with a
    // writable PTE, and the write goes through with no write-protect fault.
    // This is why the sampler must continue protected pages with keep_wp.
    u.write_protect(map.page(2), PAGE_SIZE, true).unwrap();
    zap(map.page(2));
    assert!(wp(map.page(2)));
    let w = Access::spawn(map.page(2), Some(22));
    let ev = expect_event(&u);
    assert!(ev.minor && ev.write, "{ev:?}");
    u.continue_range(map.page(2), PAGE_SIZE, false).unwrap();
    assert_eq!(w.finish("after a plain continue"), 22);
    assert!(!wp(map.page(2)), "a plain continue lost the protection");
    no_event(&u);

    // (5) A read of a zapped protected page: minor fault; continued with
    // keep_wp the page is readable and still protected.
    u.write_protect(map.page(3), PAGE_SIZE, true).unwrap();
    zap(map.page(3));
    let r = Access::spawn(map.page(3), None);
    let ev = expect_event(&u);
    assert!(ev.minor && !ev.write, "{ev:?}");
    u.continue_range(map.page(3), PAGE_SIZE, true).unwrap();
    assert_eq!(r.finish("after the continue"), 103);
    assert!(wp(map.page(3)) && present(map.page(3)));
    u.write_protect(map.page(3), PAGE_SIZE, false).unwrap();

    // (6) A hole (no page in the memfd): no minor fault; the access
    // allocates as usual (missing mode is not registered).
    let r = Access::spawn(map.page(6), None);
    assert_eq!(r.finish("on a hole"), 0);
    no_event(&u);

    // (7) Registering again in write-protect mode only keeps minor mode?
    u.register(map.addr, map.len, true, false).unwrap();
    zap(map.page(0));
    let r = Access::spawn(map.page(0), None);
    match u.read_event(Some(STILL_BLOCKED)).unwrap() {
        Some(ev) => {
            assert!(ev.minor, "{ev:?}");
            eprintln!("finding: re-registering WP-only keeps minor mode");
            u.continue_range(map.page(0), PAGE_SIZE, false).unwrap();
        }
        None => eprintln!("finding: re-registering WP-only drops minor mode"),
    }
    assert_eq!(r.finish("after re-registration"), 100);
    assert!(u.register(map.addr, map.len, false, false).is_err());
}

/// The sampler on host threads: a zapped page's first touch becomes one
/// sample of the registered thread; faults it did not ask for are resolved
/// but not sampled; write-protect faults are left to the caller.
#[test]
fn sampler_records_first_touch_of_zapped_pages() {
    let u = uffd();
    let file = memfd(8);
    let map = Mapping::new(&file, 8);
    for i in 0..8 {
        // SAFETY: the test's own mapping.
        unsafe { std::ptr::write_volatile(map.page(i) as *mut u64, i as u64) };
    }
    u.register(map.addr, map.len, true, true).unwrap();
    let mut sampler = PageSampler::new(u.clone()).unwrap();
    sampler.register_space(7, map.addr, map.len);

    sampler.zap_frame(7, 2).unwrap();
    sampler.zap(map.page(5), PAGE_SIZE).unwrap();
    assert!(sampler.zap_frame(7, 8).is_err());
    assert_eq!(sampler.pending(), 2);

    // A registered thread reads frame 2.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (tid_tx, tid_rx) = mpsc::channel();
    let addr2 = map.page(2);
    let reader = thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        go_rx.recv().unwrap();
        // SAFETY: the test's mapping, alive until joined.
        unsafe { std::ptr::read_volatile(addr2 as *const u64) }
    });
    let tid = tid_rx.recv().unwrap();
    sampler.register_thread(tid, 7, 1, 3);
    go_tx.send(()).unwrap();
    let ev = expect_event(&u);
    assert!(sampler.handle_event(&ev));
    assert_eq!(reader.join().unwrap(), 2);

    // An unregistered thread writes frame 5: resolved, not attributed.
    let w = Access::spawn(map.page(5), Some(55));
    let ev = expect_event(&u);
    assert!(sampler.handle_event(&ev));
    w.finish("after handle_event");

    // A write-protect fault is not the sampler's.
    u.write_protect(map.page(6), PAGE_SIZE, true).unwrap();
    let w = Access::spawn(map.page(6), Some(66));
    let ev = expect_event(&u);
    assert!(!sampler.handle_event(&ev));
    u.write_protect(map.page(6), PAGE_SIZE, false).unwrap();
    w.finish("after the un-protect");

    // A protected zapped page: handle_event keeps the protection (pagemap).
    u.write_protect(map.page(4), PAGE_SIZE, true).unwrap();
    sampler.zap(map.page(4), PAGE_SIZE).unwrap();
    let w = Access::spawn(map.page(4), Some(44));
    let ev = expect_event(&u);
    assert!(ev.minor);
    assert!(sampler.handle_event(&ev));
    let ev = expect_event(&u);
    assert!(ev.wp, "{ev:?}");
    assert!(!sampler.handle_event(&ev));
    u.write_protect(map.page(4), PAGE_SIZE, false).unwrap();
    w.finish("after the un-protect");

    let mut out = Vec::new();
    sampler.poll(&mut out).unwrap();
    assert_eq!(
        out,
        vec![AccessSample {
            vm: 7,
            gfn: 2,
            node: 3,
            write: false,
            vcpu: 1
        }]
    );
    sampler.poll(&mut out).unwrap();
    assert_eq!(out.len(), 1, "poll drains");
    let s = sampler.stats();
    assert_eq!(
        (s.zapped, s.samples, s.unattributed, s.continued_wp),
        (3, 1, 2, 1),
        "{s:?}"
    );
    assert_eq!(sampler.name(), "page-faults");
    assert!(sampler.describe().contains("minor faults"));
}

/// Two vCPU threads on different nodes touch one zapped page while it is
/// unmapped: both faults are queued before the first is answered, and both
/// become samples (the second one "concurrent"), so a page written from two
/// nodes at once is seen as write-shared. A third fault by a thread already
/// sampled on the page is not counted twice.
#[test]
fn concurrent_touches_of_one_zapped_page_are_all_sampled() {
    let u = uffd();
    let file = memfd(2);
    let map = Mapping::new(&file, 2);
    // SAFETY: the test's own mapping.
    unsafe { std::ptr::write_volatile(map.page(1) as *mut u64, 9) };
    u.register(map.addr, map.len, true, true).unwrap();
    let mut sampler = PageSampler::new(u.clone()).unwrap();
    sampler.register_space(3, map.addr, map.len);
    sampler.zap_frame(3, 1).unwrap();

    let first = Access::spawn(map.page(1), Some(10));
    sampler.register_thread(first.tid, 3, 0, 0);
    let ev1 = expect_event(&u);
    let second = Access::spawn(map.page(1) + 8, Some(20));
    sampler.register_thread(second.tid, 3, 1, 2);
    let ev2 = expect_event(&u);
    assert!(ev1.minor && ev2.minor, "{ev1:?} {ev2:?}");
    first.assert_blocked("before the first fault is answered");
    assert!(sampler.handle_event(&ev1));
    assert!(sampler.handle_event(&ev2), "the queued second fault");
    let (a, b) = (first.tid, second.tid);
    first.finish("after the continue");
    second.finish("after the continue");
    // The same thread's fault again (as a re-delivered event) is no sample.
    assert!(sampler.handle_event(&ev1));

    let mut out = Vec::new();
    sampler.poll(&mut out).unwrap();
    out.sort_by_key(|s| s.node);
    assert_eq!(
        out,
        vec![
            AccessSample {
                vm: 3,
                gfn: 1,
                node: 0,
                write: true,
                vcpu: 0
            },
            AccessSample {
                vm: 3,
                gfn: 1,
                node: 2,
                write: true,
                vcpu: 1
            }
        ],
        "threads {a} and {b}"
    );
    let s = sampler.stats();
    assert_eq!(
        (
            s.samples,
            s.concurrent_samples,
            s.write_samples,
            s.unsolicited
        ),
        (2, 1, 2, 1),
        "{s:?}"
    );
    // SAFETY: the test's own mapping, both writers joined.
    let words = unsafe {
        (
            std::ptr::read_volatile(map.page(1) as *const u64),
            std::ptr::read_volatile((map.page(1) + 8) as *const u64),
        )
    };
    assert_eq!(words, (10, 20), "both writes landed");
}

// ---- KVM micro-guests ----

const RAM: usize = 8 << 20;

fn spec(name: &str, workload: Workload) -> MicroVmSpec {
    MicroVmSpec {
        name: name.into(),
        vcpus: (0..2)
            .map(|_| VcpuPlacement {
                node: 0,
                host_cpus: Vec::new(),
            })
            .collect(),
        workload,
        time_limit: Duration::from_secs(60),
    }
}

/// The fault-handling loop of the test (what `faults/handler.rs` does with
/// a sampler): minor faults to the sampler, write-protect faults resolved by
/// un-protecting in place. vCPU threads are registered on first sight, from
/// their names (`disco-<vm>-vcpu<i>`, node `i`, as if each vCPU had its own
/// node), since they start touching memory before the test could look them
/// up. Returns the number of write-protect faults.
fn spawn_handler(
    u: Arc<Userfault>,
    sampler: Arc<PageSampler>,
    vm_name: &str,
    vm: u32,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<u64> {
    let mut prefix = format!("disco-{vm_name}-vcpu");
    prefix.truncate(15);
    thread::spawn(move || {
        let mut known: HashMap<u32, bool> = HashMap::new();
        let mut wp_faults = 0;
        while !stop.load(Ordering::Relaxed) {
            let Some(ev) = u.read_event(Some(Duration::from_millis(20))).unwrap() else {
                continue;
            };
            if let Some(tid) = ev.thread_id {
                known.entry(tid).or_insert_with(|| {
                    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                        .unwrap_or_default();
                    match comm.trim_end().strip_prefix(&prefix).map(str::parse) {
                        Some(Ok(i)) => {
                            sampler.register_thread(tid, vm, i, i);
                            true
                        }
                        _ => false,
                    }
                });
            }
            if sampler.handle_event(&ev) {
                continue;
            }
            assert!(ev.wp && ev.write, "{ev:?}");
            wp_faults += 1;
            u.write_protect(ev.address, PAGE_SIZE, false).unwrap();
        }
        wp_faults
    })
}

fn check(out: &VmOutcome) {
    for (i, v) in out.vcpus.iter().enumerate() {
        if let VcpuOutcome::Failed { reason, regs } = v {
            panic!("vCPU {i} failed: {reason}\n{regs}");
        }
    }
    assert!(out.checksum_ok(), "{out:?}");
}

/// Whose private slice (vCPU index) guest frame `gfn` is in.
fn owner(vm: &MicroVm, gfn: u64) -> Option<usize> {
    vm.params()
        .iter()
        .position(|p| gfn >= p.base / PAGE && gfn < p.base / PAGE + p.pages())
}

/// A fill (pure stores) on RAM whose data pages already hold data and are
/// zapped before the start, some also write-protected: every zapped page's
/// first touch is a write by the vCPU whose slice it is in; protected pages
/// fault twice (minor, then write-protect); the fill's results are right.
#[test]
fn kvm_fill_samples_are_writes_by_the_owner() {
    if !require_kvm("kvm_fill_samples_are_writes_by_the_owner") {
        return;
    }
    let seed = 0x5eed;
    let u = uffd();
    let file = memfd(RAM / PAGE_SIZE);
    let map = Mapping::new(&file, RAM / PAGE_SIZE);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ram = GuestRam {
        host_addr: map.addr,
        size: RAM,
    };
    let workload = Workload::Fill {
        seed,
        private_seed: seed,
        shared_percent: 100,
        shared_run: 1,
    };
    let vm = MicroVm::create(&kvm, spec("sf", workload), ram).unwrap();
    u.register(map.addr, map.len, true, true).unwrap();
    let sampler = Arc::new(PageSampler::new(u.clone()).unwrap());
    sampler.register_space(1, map.addr, map.len);
    // Every 4th data page: give it content (so the memfd holds a page),
    // zap it; every 16th also write-protected.
    let mut zapped = Vec::new();
    for p in vm.params() {
        for gfn in (p.base / PAGE..p.base / PAGE + p.pages()).step_by(4) {
            let addr = map.page(gfn as usize);
            // SAFETY: the test's mapping; the VM has not started.
            unsafe { std::ptr::write_volatile(addr as *mut u64, 0xdead) };
            if gfn % 16 == 0 {
                u.write_protect(addr, PAGE_SIZE, true).unwrap();
            }
            sampler.zap(addr, PAGE_SIZE).unwrap();
            zapped.push(gfn);
        }
    }
    let protected = zapped.iter().filter(|&&g| g % 16 == 0).count() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let handler = spawn_handler(u.clone(), sampler.clone(), "sf", 1, stop.clone());
    let mut vm = vm;
    vm.start().unwrap();
    let owners: HashMap<u64, usize> = zapped
        .iter()
        .map(|&g| (g, owner(&vm, g).unwrap()))
        .collect();
    let out = vm.wait();
    stop.store(true, Ordering::Relaxed);
    let wp_faults = handler.join().unwrap();
    check(&out);

    let mut samples = Vec::new();
    sampler.clone().poll(&mut samples).unwrap();
    let s = sampler.stats();
    eprintln!(
        "fill with {} zapped pages ({protected} also protected): {s:?}, {wp_faults} wp faults, run {:?}",
        zapped.len(),
        out.run_time
    );
    assert_eq!(samples.len(), zapped.len(), "one sample per zapped page");
    for smp in &samples {
        assert_eq!(smp.vm, 1);
        assert!(smp.write, "a fill only stores: {smp:?}");
        assert_eq!(Some(&smp.vcpu), owners.get(&smp.gfn), "{smp:?}");
        assert_eq!(smp.node, smp.vcpu);
    }
    assert_eq!(s.continued_wp, protected);
    assert_eq!(
        wp_faults, protected,
        "the retry of each protected page faults"
    );
    assert_eq!(sampler.pending(), 0);
    for gfn in zapped {
        let want = page_content(seed, gfn);
        // SAFETY: the VM is done; the mapping is ours.
        let got = unsafe { std::slice::from_raw_parts(map.page(gfn as usize) as *const u64, 512) };
        assert_eq!(got, &want[..], "guest page {gfn}");
    }
}

/// The vCPU threads' ids, from their names, once both run.
fn vcpu_tids(name: &str, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let mut tids = vec![0u32; n];
        for entry in std::fs::read_dir("/proc/self/task").unwrap() {
            let entry = entry.unwrap();
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            for (i, t) in tids.iter_mut().enumerate() {
                let mut want = format!("disco-{name}-vcpu{i}");
                want.truncate(15);
                if comm.trim_end() == want {
                    *t = entry.file_name().to_str().unwrap().parse().unwrap();
                }
            }
        }
        if tids.iter().all(|&t| t != 0) {
            return tids;
        }
        assert!(
            Instant::now() < deadline,
            "vCPU threads of {name} not found"
        );
        thread::sleep(Duration::from_micros(200));
    }
}

/// Runs a 2-vCPU sweep; with `zap_per_round > 0`, zaps that many random
/// data pages every `period` while it runs. RAM is registered write-protect
/// only when `minor` is false (zaps then just cost the guest a KVM fault and
/// a kernel minor fault, as a tracepoint-based sampler would). Returns
/// (outcome, samples, stats, (frame, owner) of the data pages, zap time per
/// page).
fn sweep(
    name: &str,
    passes: u32,
    zap_per_round: usize,
    period: Duration,
    minor: bool,
) -> (
    VmOutcome,
    Vec<AccessSample>,
    disco::memory::sampler::SamplerStats,
    Vec<(u64, usize)>,
    Duration,
) {
    let u = uffd();
    let file = memfd(RAM / PAGE_SIZE);
    let map = Mapping::new(&file, RAM / PAGE_SIZE);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ram = GuestRam {
        host_addr: map.addr,
        size: RAM,
    };
    let mut vm =
        MicroVm::create(&kvm, spec(name, Workload::Sweep { seed: 9, passes }), ram).unwrap();
    u.register(map.addr, map.len, true, minor).unwrap();
    let sampler = Arc::new(PageSampler::new(u.clone()).unwrap());
    sampler.register_space(2, map.addr, map.len);
    let stop = Arc::new(AtomicBool::new(false));
    let handler = spawn_handler(u.clone(), sampler.clone(), name, 2, stop.clone());
    let data: Vec<u64> = vm
        .params()
        .iter()
        .flat_map(|p| p.base / PAGE..p.base / PAGE + p.pages())
        .collect();
    let owners: Vec<(u64, usize)> = data.iter().map(|&g| (g, owner(&vm, g).unwrap())).collect();
    vm.start().unwrap();
    for (i, tid) in vcpu_tids(name, 2).into_iter().enumerate() {
        sampler.register_thread(tid, 2, i, i);
    }
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut zap_time = Duration::ZERO;
    let mut zaps = 0u32;
    if zap_per_round > 0 {
        // Let the fill finish first (its pages are holes until written).
        while vm.progress().0 < data.len() as u64 && !vm.is_finished() {
            thread::sleep(Duration::from_micros(200));
        }
        while !vm.is_finished() {
            for _ in 0..zap_per_round {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let gfn = data[(rng % data.len() as u64) as usize];
                let t0 = Instant::now();
                sampler.zap(map.page(gfn as usize), PAGE_SIZE).unwrap();
                zap_time += t0.elapsed();
                zaps += 1;
            }
            thread::sleep(period);
        }
    }
    let out = vm.wait();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(handler.join().unwrap(), 0, "no write-protect faults");
    check(&out);
    let mut samples = Vec::new();
    sampler.clone().poll(&mut samples).unwrap();
    (
        out,
        samples,
        sampler.stats(),
        owners,
        zap_time / zaps.max(1),
    )
}

/// Sampling a running 2-vCPU sweep: samples arrive, each from the vCPU
/// whose slice the page is in, and the guest's checksums are right. Prints
/// the per-sample costs.
#[test]
fn kvm_sweep_sampled_while_running() {
    if !require_kvm("kvm_sweep_sampled_while_running") {
        return;
    }
    const PASSES: u32 = 300;
    let (base, ..) = sweep("sb", PASSES, 0, Duration::ZERO, true);
    let (out, samples, s, owners, zap) = sweep("ss", PASSES, 32, Duration::from_millis(1), true);
    // The same zapping without minor-mode registration: what the guest pays
    // for a zap alone (the cost floor of any zap-based sampler, e.g. one
    // reading the kvm:kvm_page_fault tracepoint instead of userfaults).
    let (plain, plain_samples, plain_stats, ..) =
        sweep("sz", PASSES, 32, Duration::from_millis(1), false);
    assert!(plain_samples.is_empty());
    let owners: HashMap<u64, usize> = owners.into_iter().collect();
    assert!(samples.len() > 100, "only {} samples: {s:?}", samples.len());
    for smp in &samples {
        assert_eq!(smp.vm, 2);
        assert_eq!(Some(&smp.vcpu), owners.get(&smp.gfn), "{smp:?}");
    }
    let per_vcpu = |v| samples.iter().filter(|x| x.vcpu == v).count();
    assert!(per_vcpu(0) > 0 && per_vcpu(1) > 0);
    let writes = samples.iter().filter(|x| x.write).count();
    let extra = out.run_time.saturating_sub(base.run_time);
    eprintln!(
        "sweep of {} MiB x {PASSES} passes, 2 vCPUs: unsampled {:?}, sampled {:?} with {} samples \
         ({} vCPU 0, {} vCPU 1, {writes} first touches were writes), {} unattributed, {} unsolicited; \
         handler median {:.1} us p99 {:.1} us; zap {:?} per page; about {:?} extra guest time per sample",
        RAM >> 20,
        base.run_time,
        out.run_time,
        samples.len(),
        per_vcpu(0),
        per_vcpu(1),
        s.unattributed,
        s.unsolicited,
        s.handler_median_us,
        s.handler_p99_us,
        zap,
        extra / samples.len().max(1) as u32,
    );
    eprintln!(
        "same zapping without minor registration: {:?} with {} zaps: about {:?} extra guest \
         time per zapped page",
        plain.run_time,
        plain_stats.zapped,
        plain.run_time.saturating_sub(base.run_time) / plain_stats.zapped.max(1) as u32,
    );
}
