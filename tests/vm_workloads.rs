//! Micro-VMs on real KVM: every workload's result against the host model,
//! the failure reports (triple fault, time limit, unknown port), isolation of
//! a failing VM from a healthy one, and the fill content in RAM, including
//! fills that split their pages between a shared and a private seed.
//!
//! Guest RAM is a memfd mapped `MAP_SHARED`, as the monitor's memory manager
//! provides it.

use std::time::{Duration, Instant};

use disco::guest::layout::{self, PAGE};
use disco::guest::model::{expected_page, page_content, page_is_shared_in_runs, progress_total};
use disco::guest::Workload;
use disco::kvm_check::require_kvm;
use disco::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuOutcome, VcpuPlacement, VmOutcome};

/// Guest RAM backed by a memfd, mapped shared; unmapped on drop.
struct SharedRam {
    addr: *mut libc::c_void,
    size: usize,
    _fd: std::os::fd::OwnedFd,
}

impl SharedRam {
    fn new(size: usize) -> SharedRam {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: plain syscalls; results checked.
        unsafe {
            let fd = libc::memfd_create(c"disco-test-ram".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), size as libc::off_t), 0);
            let addr = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            SharedRam {
                addr,
                size,
                _fd: fd,
            }
        }
    }

    fn guest(&self) -> GuestRam {
        GuestRam {
            host_addr: self.addr as usize,
            size: self.size,
        }
    }

    /// The 512 words of guest page `gfn` (no VM may be running on it).
    fn page(&self, gfn: u64) -> Vec<u64> {
        assert!((gfn + 1) * PAGE <= self.size as u64);
        // SAFETY: inside our mapping, page-aligned, and no VM writes it.
        let words = unsafe {
            std::slice::from_raw_parts(
                (self.addr as *const u64).add((gfn * PAGE / 8) as usize),
                512,
            )
        };
        words.to_vec()
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every VM using it was waited for.
        unsafe { libc::munmap(self.addr, self.size) };
    }
}

fn spec(name: &str, workload: Workload, vcpus: usize, limit: Duration) -> MicroVmSpec {
    MicroVmSpec {
        name: name.into(),
        vcpus: (0..vcpus)
            .map(|_| VcpuPlacement {
                node: 0,
                host_cpus: Vec::new(),
            })
            .collect(),
        workload,
        time_limit: limit,
    }
}

/// Creates, starts and waits for a VM on fresh RAM of `ram_mib` MiB.
fn run(name: &str, workload: Workload, vcpus: usize, ram_mib: usize, limit: Duration) -> VmOutcome {
    let ram = SharedRam::new(ram_mib << 20);
    run_on(&ram, spec(name, workload, vcpus, limit))
}

fn run_on(ram: &SharedRam, spec: MicroVmSpec) -> VmOutcome {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let mut vm = MicroVm::create(&kvm, spec, ram.guest()).unwrap();
    vm.start().unwrap();
    let out = vm.wait();
    eprintln!("{}: {:?}, log {:?}", out.name, out.run_time, out.log);
    out
}

fn assert_checksums(out: &VmOutcome) {
    for (i, v) in out.vcpus.iter().enumerate() {
        match v {
            VcpuOutcome::Done { result, expected } => {
                assert_eq!(
                    Some(*result),
                    *expected,
                    "{} vCPU {i}: result vs model",
                    out.name
                )
            }
            VcpuOutcome::Failed { reason, regs } => {
                panic!("{} vCPU {i} failed: {reason}\n{regs}", out.name)
            }
            VcpuOutcome::NotRun => panic!("{} vCPU {i} did not run", out.name),
        }
    }
    assert!(out.checksum_ok());
}

/// Every vCPU of `out` failed, at least one with a reason containing
/// `reason_part`.
fn assert_all_failed(out: &VmOutcome, reason_part: &str) {
    assert_eq!(out.failures().count(), out.vcpus.len(), "{out:?}");
    assert!(!out.checksum_ok());
    assert!(
        out.failures()
            .any(|(_, reason, _)| reason.contains(reason_part)),
        "no vCPU failed with {reason_part:?}: {out:#?}"
    );
}

const LIMIT: Duration = Duration::from_secs(30);

/// Today's fill: every data page from `seed`.
fn fill(seed: u64) -> Workload {
    split_fill(seed, seed, 100)
}

fn split_fill(seed: u64, private_seed: u64, shared_percent: u8) -> Workload {
    split_fill_in_runs(seed, private_seed, shared_percent, 1)
}

fn split_fill_in_runs(
    seed: u64,
    private_seed: u64,
    shared_percent: u8,
    shared_run: u32,
) -> Workload {
    Workload::Fill {
        seed,
        private_seed,
        shared_percent,
        shared_run,
    }
}

/// Runs two 2-vCPU fills with `seed` and the private seeds 0xA and 0xB
/// concurrently on 16 MiB each; checks their checksums against the model and
/// every data page of both against `expected_page`, and that exactly the
/// pages `page_is_shared` selects are identical across the two VMs. Returns
/// the number of identical data pages and of data pages.
fn split_fill_pair(seed: u64, shared_percent: u8) -> (usize, usize) {
    split_fill_pair_in_runs(seed, shared_percent, 1).0
}

/// [`split_fill_pair`] with the choice made per block of `shared_run`
/// frames; also returns the runs of identical pages (maximal runs of
/// consecutive data frames identical across the VMs).
fn split_fill_pair_in_runs(
    seed: u64,
    shared_percent: u8,
    shared_run: u32,
) -> ((usize, usize), usize) {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ram: Vec<SharedRam> = (0..2).map(|_| SharedRam::new(16 << 20)).collect();
    let workloads = [
        split_fill_in_runs(seed, 0xA, shared_percent, shared_run),
        split_fill_in_runs(seed, 0xB, shared_percent, shared_run),
    ];
    let mut vms: Vec<MicroVm> = ram
        .iter()
        .zip(&workloads)
        .enumerate()
        .map(|(i, (r, w))| {
            let name = format!("split{shared_percent}-{i}");
            MicroVm::create(&kvm, spec(&name, w.clone(), 2, LIMIT), r.guest()).unwrap()
        })
        .collect();
    for vm in &mut vms {
        vm.start().unwrap();
    }
    let params = vms[0].params().to_vec();
    let slices = |vm: &MicroVm| -> Vec<(u64, u64)> {
        vm.params().iter().map(|p| (p.base, p.words)).collect()
    };
    assert_eq!(slices(&vms[0]), slices(&vms[1]), "same layout");
    for vm in vms {
        let out = vm.wait();
        eprintln!("{}: {:?}", out.name, out.run_time);
        assert_checksums(&out);
    }
    let (mut same, mut total, mut runs) = (0, 0, 0);
    for p in &params {
        let first = p.base / PAGE;
        let mut previous = false;
        for gfn in first..first + p.pages() {
            let pages = [ram[0].page(gfn), ram[1].page(gfn)];
            for (page, w) in pages.iter().zip(&workloads) {
                assert_eq!(
                    *page,
                    expected_page(w, gfn).unwrap().to_vec(),
                    "page {gfn:#x} of {w:?}"
                );
            }
            let shared = page_is_shared_in_runs(gfn, shared_percent, shared_run);
            runs += (shared && !previous) as usize;
            previous = shared;
            if shared {
                assert_eq!(pages[0], page_content(seed, gfn).to_vec(), "{gfn:#x}");
            }
            assert_eq!(
                pages[0] == pages[1],
                shared,
                "page {gfn:#x}: identical across the VMs iff page_is_shared"
            );
            same += shared as usize;
            total += 1;
        }
    }
    eprintln!(
        "{shared_percent} % shared in blocks of {shared_run}: {same} of {total} data pages \
         identical, in {runs} runs"
    );
    ((same, total), runs)
}

#[test]
fn split_fill_shares_the_chosen_half_of_the_pages_across_vms() {
    if !require_kvm("split_fill_shares_the_chosen_half_of_the_pages_across_vms") {
        return;
    }
    let (same, total) = split_fill_pair(0x5eed, 50);
    assert!(total > 3000, "{total} data pages");
    let fraction = same as f64 / total as f64;
    assert!(
        (fraction - 0.5).abs() < 0.02,
        "{same} of {total} data pages shared"
    );
}

/// The same split decided per block of 64 frames: about the same share of
/// identical pages, in runs a block long or longer (about 1/64 as many runs
/// as frame by frame).
#[test]
fn split_fill_in_runs_lays_shared_pages_out_in_blocks() {
    if !require_kvm("split_fill_in_runs_lays_shared_pages_out_in_blocks") {
        return;
    }
    let ((same, total), runs) = split_fill_pair_in_runs(0x5eed, 50, 64);
    let ((_, _), scattered_runs) = split_fill_pair_in_runs(0x5eed, 50, 1);
    let fraction = same as f64 / total as f64;
    assert!(
        (fraction - 0.5).abs() < 0.15,
        "{same} of {total} data pages shared"
    );
    assert!(
        runs * 32 <= scattered_runs && same / runs >= 64,
        "{runs} runs in blocks of 64 against {scattered_runs} frame by frame"
    );
}

#[test]
fn split_fill_at_100_and_0_percent() {
    if !require_kvm("split_fill_at_100_and_0_percent") {
        return;
    }
    // 100 %: today's fill whatever the private seed; every data page shared.
    let (same, total) = split_fill_pair(0x5eed, 100);
    assert_eq!(same, total);
    // 0 %: every page from the private seed; none shared.
    let (same, total) = split_fill_pair(0x5eed, 0);
    assert_eq!((same, total > 0), (0, true));
}

#[test]
fn fill_returns_model_checksum_and_writes_page_content() {
    if !require_kvm("fill_returns_model_checksum_and_writes_page_content") {
        return;
    }
    let seed = 0x5eed;
    let ram = SharedRam::new(64 << 20);
    let spec = spec("fill", fill(seed), 2, LIMIT);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let started = Instant::now();
    let mut vm = MicroVm::create(&kvm, spec, ram.guest()).unwrap();
    vm.start().unwrap();
    let create_start = started.elapsed();
    let params = vm.params().to_vec();
    // Progress, read from guest RAM, grows monotonically to the total.
    let (mut last, mut partial) = (0, false);
    while !vm.is_finished() {
        let (done, total) = vm.progress();
        assert!(
            done >= last && done <= total,
            "progress {done}/{total} after {last}"
        );
        partial |= done > 0 && done < total;
        last = done;
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(partial, "never saw partial progress");
    let (done, total) = vm.progress();
    assert_eq!(done, total, "progress at the end");
    assert_eq!(
        total,
        params
            .iter()
            .map(|p| progress_total(&fill(seed), p))
            .sum::<u64>()
    );
    let out = vm.wait();
    assert_checksums(&out);
    assert_eq!(out.log, vec!["vcpu0: fill: vCPU 0 started".to_string()]);
    let bytes: u64 = params.iter().map(|p| p.words * 8).sum();
    eprintln!(
        "fill: create+start {create_start:?}; {} MiB in {:?} = {:.0} MB/s",
        bytes >> 20,
        out.run_time,
        bytes as f64 / out.run_time.as_secs_f64() / 1e6
    );

    // Sampled pages of every slice hold `page_content(seed, gfn)`.
    for p in &params {
        let first = p.base / PAGE;
        let pages = p.pages();
        for k in [0, 1, pages / 3, pages / 2, pages - 2, pages - 1] {
            let gfn = first + k;
            assert_eq!(
                ram.page(gfn),
                page_content(seed, gfn).to_vec(),
                "page {gfn:#x}"
            );
        }
    }
}

#[test]
fn fill_of_more_than_one_gib_and_of_odd_sized_ram() {
    if !require_kvm("fill_of_more_than_one_gib_and_of_odd_sized_ram") {
        return;
    }
    // 1 GiB + 64 MiB: vCPU 1's slice crosses into the second page directory.
    // 5 MiB + 12 KiB: the last 2 MiB page is only partly RAM.
    for size in [(1 << 30) + (64 << 20), (5 << 20) + 3 * PAGE as usize] {
        let seed = size as u64;
        let ram = SharedRam::new(size);
        let out = run_on(&ram, spec("big", fill(seed), 2, LIMIT));
        assert_checksums(&out);
        let params = layout::plan(&fill(seed), size as u64, 2).unwrap();
        let last = &params[1];
        let end = last.base / PAGE + last.pages();
        assert!(
            size as u64 / PAGE - end < 2,
            "at most one page is left over"
        );
        for gfn in [1 << 18, end - 1] {
            if gfn >= last.base / PAGE && gfn < end {
                assert_eq!(
                    ram.page(gfn),
                    page_content(seed, gfn).to_vec(),
                    "page {gfn:#x}"
                );
            }
        }
    }
}

#[test]
fn create_rejects_ram_too_small() {
    if !require_kvm("create_rejects_ram_too_small") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ram = SharedRam::new(1 << 20);
    let err = MicroVm::create(&kvm, spec("small", fill(1), 2, LIMIT), ram.guest())
        .err()
        .expect("1 MiB is too small");
    assert!(format!("{err:#}").contains("too small"), "{err:#}");
}

#[test]
fn a_vm_never_started_reports_not_run() {
    if !require_kvm("a_vm_never_started_reports_not_run") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ram = SharedRam::new(2 << 20);
    let vm = MicroVm::create(&kvm, spec("idle", Workload::Spin, 2, LIMIT), ram.guest()).unwrap();
    assert!(!vm.is_finished());
    assert_eq!(vm.progress(), (0, 0));
    let out = vm.wait();
    assert!(out.vcpus.iter().all(|v| matches!(v, VcpuOutcome::NotRun)));
    assert!(!out.checksum_ok());
}

#[test]
fn sweep_returns_model_checksum() {
    if !require_kvm("sweep_returns_model_checksum") {
        return;
    }
    let out = run(
        "sweep",
        Workload::Sweep {
            seed: 11,
            passes: 3,
        },
        2,
        8,
        LIMIT,
    );
    assert_checksums(&out);
}

#[test]
fn random_returns_model_checksum() {
    if !require_kvm("random_returns_model_checksum") {
        return;
    }
    let w = Workload::Random {
        seed: 12,
        touches: 300_000,
    };
    let out = run("random", w, 2, 8, LIMIT);
    assert_checksums(&out);
}

#[test]
fn table_scan_returns_model_checksum() {
    if !require_kvm("table_scan_returns_model_checksum") {
        return;
    }
    let w = Workload::TableScan {
        seed: 13,
        table_pages: 64,
        lookups: 200_000,
        write_after: 0,
    };
    let out = run("table", w, 2, 4, LIMIT);
    assert_checksums(&out);
    // Different streams, so different results.
    assert_ne!(format!("{:?}", out.vcpus[0]), format!("{:?}", out.vcpus[1]));
}

#[test]
fn table_scan_that_turns_writer_returns_model_checksum() {
    if !require_kvm("table_scan_that_turns_writer_returns_model_checksum") {
        return;
    }
    // Three vCPUs meet twice around vCPU 0's rewrite of the table: every
    // lookup after the barrier must see the rewritten words, none before.
    let reader = Workload::TableScan {
        seed: 13,
        table_pages: 64,
        lookups: 200_000,
        write_after: 0,
    };
    let writer = Workload::TableScan {
        seed: 13,
        table_pages: 64,
        lookups: 200_000,
        write_after: 50_000,
    };
    let read = run("reader", reader, 3, 4, LIMIT);
    let written = run("writer", writer, 3, 4, LIMIT);
    assert_checksums(&read);
    assert_checksums(&written);
    for (r, w) in read.vcpus.iter().zip(&written.vcpus) {
        assert_ne!(format!("{r:?}"), format!("{w:?}"), "the write shows");
    }
}

#[test]
fn counters_return_model_checksum_on_every_vcpu() {
    if !require_kvm("counters_return_model_checksum_on_every_vcpu") {
        return;
    }
    let w = Workload::Counters {
        counters: 37,
        increments: 100_003,
    };
    let out = run("counters", w, 2, 2, LIMIT);
    assert_checksums(&out);
    let VcpuOutcome::Done { result, .. } = out.vcpus[0] else {
        unreachable!()
    };
    assert!(matches!(out.vcpus[1], VcpuOutcome::Done { result: r, .. } if r == result));
}

#[test]
fn pinned_vcpus_run() {
    if !require_kvm("pinned_vcpus_run") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ram = SharedRam::new(4 << 20);
    let mut s = spec("pinned", fill(1), 2, LIMIT);
    for (i, v) in s.vcpus.iter_mut().enumerate() {
        v.host_cpus = vec![i % cpus];
    }
    assert_checksums(&run_on(&ram, s));
}

#[test]
fn crash_is_reported_with_registers() {
    if !require_kvm("crash_is_reported_with_registers") {
        return;
    }
    let out = run("crash", Workload::Crash, 2, 2, LIMIT);
    for (i, reason, regs) in out.failures() {
        eprintln!("crash vCPU {i}: {reason}\n{regs}");
    }
    assert_all_failed(&out, "triple fault");
    // The faulting vCPU stopped at the load from the unmapped address.
    let (_, _, regs) = out
        .failures()
        .find(|(_, reason, _)| reason.starts_with("triple fault"))
        .unwrap();
    assert_eq!(regs.rax, layout::UNMAPPED_ADDR, "{regs}");
    assert!(
        regs.instruction
            .as_deref()
            .unwrap_or("")
            .starts_with("mov rax,"),
        "{regs}"
    );
}

#[test]
fn spin_is_stopped_by_the_time_limit() {
    if !require_kvm("spin_is_stopped_by_the_time_limit") {
        return;
    }
    let started = Instant::now();
    let out = run("spin", Workload::Spin, 2, 2, Duration::from_secs(2));
    let took = started.elapsed();
    for (i, reason, regs) in out.failures() {
        eprintln!("spin vCPU {i}: {reason}\n{regs}");
    }
    assert_all_failed(&out, "time limit");
    assert!(took < Duration::from_secs(4), "stopping took {took:?}");
    let (_, _, regs) = out.failures().next().unwrap();
    assert!(
        regs.instruction.as_deref().unwrap_or("").starts_with("jmp"),
        "{regs}"
    );
}

#[test]
fn bad_io_is_reported_with_registers() {
    if !require_kvm("bad_io_is_reported_with_registers") {
        return;
    }
    let out = run("badio", Workload::BadIo, 2, 2, LIMIT);
    for (i, reason, regs) in out.failures() {
        eprintln!("bad_io vCPU {i}: {reason}\n{regs}");
    }
    assert_all_failed(&out, "unknown I/O port 0xbad");
}

#[test]
fn stopping_a_spinning_vm_leaves_another_vm_running() {
    if !require_kvm("stopping_a_spinning_vm_leaves_another_vm_running") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let spin_ram = SharedRam::new(2 << 20);
    let work_ram = SharedRam::new(16 << 20);
    let mut spinner = MicroVm::create(
        &kvm,
        spec("spinner", Workload::Spin, 2, LIMIT),
        spin_ram.guest(),
    )
    .unwrap();
    let w = Workload::Sweep {
        seed: 5,
        passes: 20,
    };
    let mut worker = MicroVm::create(&kvm, spec("worker", w, 2, LIMIT), work_ram.guest()).unwrap();
    spinner.start().unwrap();
    worker.start().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let stop_at = Instant::now();
    spinner.stop();
    let spun = spinner.wait();
    eprintln!("stop took {:?}", stop_at.elapsed());
    assert_all_failed(&spun, "stop requested");
    assert!(!worker.is_finished() || worker.progress().0 == worker.progress().1);
    assert_checksums(&worker.wait());
}
