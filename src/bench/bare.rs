//! The baseline of the overhead benchmark: a minimal bare-KVM runner.
//!
//! It runs the VMs of a config the plainest way KVM allows, with no monitor:
//!
//! * **included** (identical to `disco`): opening `/dev/kvm`, one KVM VM per
//!   guest with its RAM as memory slot 0, the same guest image (page tables,
//!   GDT, parameter blocks, code assembled with iced-x86), the same vCPU setup
//!   and placement (pinned to the same host CPUs), one thread per vCPU running
//!   the same exit loop, the time-limit watchdog, and the checksum check
//!   against the host model (computed on the host after the guests exit, in
//!   both). All of that is [`MicroVm`], which takes
//!   caller-owned RAM, so the guest work is the same instructions on the same
//!   layout.
//! * **excluded** (what `disco` adds and the comparison measures): guest RAM
//!   comes from one plain `mmap(MAP_PRIVATE | MAP_ANONYMOUS)` per VM instead
//!   of memfd pool pages mapped `MAP_SHARED` by the mapper; no pools, pmap or
//!   memmap, no `mbind`, no `vm.max_map_count` budget; no monitor loop (it
//!   checks every 1 ms whether the vCPU threads exited, where the monitor
//!   polls progress every 10 ms; no `Memory::verify` before, during or after
//!   the run, no report); teardown is one `munmap` instead of freeing pool pages
//!   (punching holes in the memfd).
//!
//! Anonymous memory follows the host's transparent huge page setting
//! (`HostInfo::transparent_hugepages`); the runner does not `madvise` it.
//!
//! With [`BareMemory::Shmem`] the runner's guest RAM is one memfd mapped
//! `MAP_SHARED`, the kind of memory disco's pools are made of (but one file
//! per VM, no `mbind`, no userfaultfd). Comparing the two bare runs gives
//! the price of the memory type alone; comparing disco with the shmem run
//! gives what the monitor and its policy add on top.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::topology::Topology;
use crate::vm::{GuestRam, MicroVm, VmOutcome};

/// What the bare runner's guest RAM is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BareMemory {
    /// `mmap(MAP_PRIVATE | MAP_ANONYMOUS)`: what a plain KVM user has.
    Anonymous,
    /// A memfd mapped `MAP_SHARED`: the memory type of disco's pools.
    Shmem,
}

/// Guest RAM of the bare runner; unmapped (and its memfd closed) on drop.
pub struct BareRam {
    addr: usize,
    size: usize,
    /// The memfd behind shmem RAM (closed after the unmap).
    _file: Option<std::fs::File>,
}

impl BareRam {
    /// `size` bytes (a multiple of the page size) of private anonymous memory.
    pub fn new(size: usize) -> Result<BareRam> {
        BareRam::of(size, BareMemory::Anonymous)
    }

    /// `size` bytes of `kind` memory, untouched.
    pub fn of(size: usize, kind: BareMemory) -> Result<BareRam> {
        let file = match kind {
            BareMemory::Anonymous => None,
            BareMemory::Shmem => {
                let file = std::fs::File::from(
                    nix::sys::memfd::memfd_create(
                        "disco-bare-ram",
                        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                    )
                    .context("memfd_create for the bare runner's guest RAM")?,
                );
                file.set_len(size as u64)
                    .context("sizing the bare runner's memfd")?;
                Some(file)
            }
        };
        let (flags, fd) = match &file {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            Some(f) => (libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(f)),
        };
        // SAFETY: a fresh mapping of our own memory or memfd; nothing else
        // refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {size} bytes of {kind:?} guest RAM"));
        }
        Ok(BareRam {
            addr: addr as usize,
            size,
            _file: file,
        })
    }

    pub fn guest(&self) -> GuestRam {
        GuestRam {
            host_addr: self.addr,
            size: self.size,
        }
    }
}

impl Drop for BareRam {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the VM on it was waited for or dropped
        // first (`run` keeps that order).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size) };
    }
}

/// What a bare run produced.
#[derive(Debug)]
pub struct BareRun {
    pub outcomes: Vec<VmOutcome>,
    /// Opening KVM, mapping RAM and creating every VM.
    pub create: Duration,
}

impl BareRun {
    /// Every vCPU of every VM returned the model's checksum.
    pub fn all_ok(&self) -> bool {
        self.outcomes.iter().all(VmOutcome::checksum_ok)
    }

    /// Longest guest run time (start to last vCPU exit) over the VMs.
    pub fn guest_run(&self) -> Duration {
        self.outcomes
            .iter()
            .map(|o| o.run_time)
            .max()
            .unwrap_or_default()
    }
}

/// How often the bare runner looks whether its guests are done.
pub const POLL: Duration = Duration::from_millis(1);

/// Runs every VM of `config` on the bare runner: for each VM RAM of kind
/// `memory` and a micro-VM on it; then start them all, wait until every vCPU thread
/// has exited (checking every [`POLL`]), collect the outcomes
/// (`MicroVm::wait`: the host model's checksums, then joining the threads),
/// and unmap. Waiting for the exits first keeps the host model from
/// competing with running guests for CPUs, as in `monitor::run`.
/// The topology only gives the vCPUs' host CPUs (as for `disco`).
pub fn run(config: &Config, topology: &Topology, memory: BareMemory) -> Result<BareRun> {
    let t = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().context("cannot open /dev/kvm")?;
    let mut rams = Vec::with_capacity(config.vms.len());
    let mut vms = Vec::with_capacity(config.vms.len());
    for vc in &config.vms {
        let ram = BareRam::of(vc.memory_mib as usize * 1024 * 1024, memory)?;
        let vm = MicroVm::create(
            &kvm,
            crate::monitor::micro_vm_spec(vc, topology),
            ram.guest(),
        )
        .with_context(|| format!("bare runner: creating {}", vc.name))?;
        rams.push(ram);
        vms.push(vm);
    }
    let create = t.elapsed();
    for vm in vms.iter_mut() {
        vm.start()?;
    }
    // Each VM's watchdog ends it at its time limit, so this terminates.
    while !vms.iter().all(MicroVm::is_finished) {
        std::thread::sleep(POLL);
    }
    let outcomes: Vec<VmOutcome> = vms.into_iter().map(MicroVm::wait).collect();
    // Every VM is joined: now the RAM may go.
    drop(rams);
    Ok(BareRun { outcomes, create })
}

/// Like [`run`], but an error unless every checksum matches the model.
pub fn run_checked(config: &Config, topology: &Topology, memory: BareMemory) -> Result<BareRun> {
    let run = run(config, topology, memory)?;
    if !run.all_ok() {
        let why: Vec<String> = run
            .outcomes
            .iter()
            .filter(|o| !o.checksum_ok())
            .map(|o| format!("{}: {:?}", o.name, o.vcpus))
            .collect();
        bail!(
            "bare runner: a guest did not return the model's checksum: {}",
            why.join("; ")
        );
    }
    Ok(run)
}
