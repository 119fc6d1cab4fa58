//! Page-level access samples from userfaultfd minor faults: the mechanism
//! behind the `page-faults` counter source, which works on every host (no
//! PMU needed). It lives in the memory layer because zapping a page and
//! continuing it change a guest mapping: in the monitor the mapper drives
//! it (`Memory::zap_frames`, `Memory::resolve_minor_fault`, under the memory
//! lock); `crate::numa::sampler` presents it to the policy engine as a
//! `CounterSource`.
//!
//! # Mechanism
//!
//! Guest RAM is shmem (pool memfds mapped `MAP_SHARED`) registered with
//! `UFFDIO_REGISTER_MODE_WP` for copy-on-write, and with
//! `UFFDIO_REGISTER_MODE_MINOR` too: the whole range, or (with large
//! folios) just the page or run about to be sampled (see "Arming only what
//! is sampled"). To sample a page the monitor [`zap`](PageSampler::zap)s
//! it: `madvise(MADV_DONTNEED)` drops the host page-table entry (and, through
//! KVM's MMU notifier, the guest's mapping of it) while the memfd keeps the
//! data. The next access, normally a vCPU thread inside `KVM_RUN`, finds the
//! page in the page cache but not mapped and raises a *minor* fault: the vCPU
//! thread blocks, and the fault handler thread reads a message with the page
//! address, the `WRITE` flag and (with `UFFD_FEATURE_THREAD_ID`) the faulting
//! thread's id. [`handle_event`](PageSampler::handle_event) turns it into an
//! [`AccessSample`] (address -> `(vm, gfn)` through the registered spaces,
//! thread id -> `(vm, vcpu, node)` through the registered vCPU threads) and
//! resolves it with `UFFDIO_CONTINUE`, which maps the existing page (nothing
//! is copied) and wakes the vCPU.
//!
//! Each zapped page yields one sample per vCPU thread that touched it while
//! it was unmapped: the first touch after the zap, with `write` telling
//! whether that touch was a write, plus one for every *other* vCPU whose
//! fault on the same page was already queued when the first was resolved
//! (once `UFFDIO_CONTINUE` has mapped the page, nobody faults on it again,
//! so a later minor fault on an answered page can only be such a
//! concurrent touch). This matters for pages written by vCPUs on several
//! nodes in lockstep, e.g. a counter array walked by every vCPU: the vCPU
//! that is a few bytes ahead touches every zapped page first, and with the
//! first touch alone the page would look like that node's private page and
//! migrate, when Disco's rule is to leave write-shared pages alone. The
//! faulting vCPU waits while its fault is handled, so the one behind it
//! usually reaches the page and faults too, and is counted.
//!
//! # Write-protected pages
//!
//! A zapped page that is write-protected (shared) keeps its protection as a
//! uffd-wp PTE marker, but `UFFDIO_CONTINUE` replaces that marker: without
//! `UFFDIO_CONTINUE_MODE_WP` the page would come back **writable** and a
//! guest write would land in the shared page. So a page must be continued
//! with `keep_wp` exactly when it is protected. [`handle_event`] reads the
//! page's uffd-wp bit from `/proc/self/pagemap` (the marker sets it); the
//! monitor, which knows from the pmap, should instead call
//! [`handle_event_with`](PageSampler::handle_event_with) under the memory
//! lock, so that no protect / un-protect can slip in between the decision
//! and the continue. A write to a protected zapped page then faults twice:
//! a minor fault (sampled, continued write-protected) and, on the retry, the
//! usual write-protect fault for the copy-on-write handler.
//!
//! # One descriptor, two consumers
//!
//! The fault handler thread reads every event of the memory's userfaultfd.
//! It offers each to [`PageSampler::handle_event`] first, which consumes
//! every minor fault (recording a sample only for pages it zapped) and
//! returns `false` for write-protect faults, which go on to
//! `Memory::resolve_write_fault` as before.
//!
//! # Arming only what is sampled
//!
//! Where guest RAM asks for large folios, the monitor
//! (`Memory::zap_frames`) keeps minor mode to the pages it zapped, and gives them back to write-protect mode alone once their touch
//! came (or a second passed): with the whole guest range in minor mode,
//! every page that is in the page cache but not mapped faults to the
//! handler, and a large shmem folio's first touch maps only the touched
//! page, so its other pages would each cost a handler round trip. Arming
//! per sample lets sampled guests keep large folios. An armed run is a
//! kernel mapping of its own until disarmed (userfaultfd modes are per
//! mapping); the mapper bounds how many frames a VM has armed.
//!
//! Minor faults on pages nobody zapped (counted as `unsolicited`, resolved,
//! not sampled) are then rare: a range the caller registered in minor mode
//! itself, or another vCPU's touch of a page already answered.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use crate::faults::uffd::{page_is_write_protected, ContinueOutcome, FaultEvent, Userfault};
use crate::PAGE_SIZE;

/// One observed access: a vCPU of VM `vm`, running on node `node`, touched
/// guest frame `gfn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AccessSample {
    pub vm: u32,
    pub gfn: u64,
    /// Node of the accessing vCPU.
    pub node: usize,
    pub write: bool,
    pub vcpu: usize,
}

impl AccessSample {
    pub fn read(vm: u32, gfn: u64, node: usize) -> AccessSample {
        AccessSample {
            vm,
            gfn,
            node,
            write: false,
            vcpu: 0,
        }
    }

    pub fn write(vm: u32, gfn: u64, node: usize) -> AccessSample {
        AccessSample {
            write: true,
            ..AccessSample::read(vm, gfn, node)
        }
    }
}

/// Who a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuIdentity {
    pub vm: u32,
    pub vcpu: usize,
    pub node: usize,
}

/// One guest's RAM: guest-physical 0 is at `host_addr`.
#[derive(Clone, Copy, Debug)]
struct Space {
    vm: u32,
    host_addr: usize,
    len: usize,
}

#[derive(Default)]
struct State {
    threads: HashMap<u32, VcpuIdentity>,
    spaces: Vec<Space>,
    /// Zapped pages (host addresses) whose first touch is still to come.
    pending: HashMap<usize, ()>,
    /// Pages whose first touch was sampled since the last drain, with the
    /// threads sampled on them: a minor fault from another vCPU thread on
    /// one of these raced the first (see the module doc) and is sampled too.
    answered: HashMap<usize, Vec<u32>>,
    samples: Vec<AccessSample>,
    /// Handler time per resolved minor fault, nanoseconds (bounded).
    handler_ns: Vec<u64>,
    /// Per VM: minor faults resolved on its RAM and their handler time in
    /// nanoseconds (what the sampling cost cap charges).
    vm_faults: HashMap<u32, (u64, u64)>,
}

/// Keep at most this many handler timings (for the median and p99).
const MAX_TIMINGS: usize = 1 << 16;

/// Counters, for reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SamplerStats {
    /// Pages zapped so far.
    pub zapped: u64,
    /// Samples recorded (first touches of zapped pages by a known vCPU).
    pub samples: u64,
    /// Of them, writes.
    pub write_samples: u64,
    /// Of them, touches by a second (third, ...) vCPU that faulted on the
    /// page before the first touch was resolved.
    pub concurrent_samples: u64,
    /// First touches of zapped pages by a thread that is no registered vCPU
    /// (e.g. the monitor reading guest RAM): resolved, not sampled.
    pub unattributed: u64,
    /// Minor faults on pages the sampler did not zap (freshly remapped
    /// pages, or a second fault on a page already resolved): resolved, not
    /// sampled.
    pub unsolicited: u64,
    /// Continues that found the page already mapped (woken instead).
    pub already_mapped: u64,
    /// Continues that failed (the thread was woken to retry).
    pub errors: u64,
    /// Pages continued write-protected.
    pub continued_wp: u64,
    /// Runs armed for a sample and taken out of minor mode again
    /// (`Memory::zap_frames`); of them, those holding shared pages, mapped
    /// again under a pause of their VM; and those pauses.
    #[serde(default)]
    pub disarmed_runs: u64,
    #[serde(default)]
    pub disarmed_shared_runs: u64,
    #[serde(default)]
    pub disarm_pauses: u64,
    /// Handler time per minor fault (bookkeeping + `UFFDIO_CONTINUE`, which
    /// includes the wake), median and 99th percentile, microseconds.
    pub handler_median_us: f64,
    pub handler_p99_us: f64,
}

/// The page-access sampler; share it as `Arc<PageSampler>` between the
/// fault handler thread (which feeds it events), whoever zaps pages, and the
/// policy engine (which polls it as a [`CounterSource`]).
pub struct PageSampler {
    uffd: Arc<Userfault>,
    state: Mutex<State>,
    zapped: AtomicU64,
    samples: AtomicU64,
    write_samples: AtomicU64,
    concurrent_samples: AtomicU64,
    unattributed: AtomicU64,
    unsolicited: AtomicU64,
    already_mapped: AtomicU64,
    errors: AtomicU64,
    continued_wp: AtomicU64,
    disarmed_runs: AtomicU64,
    disarmed_shared_runs: AtomicU64,
    disarm_pauses: AtomicU64,
}

impl PageSampler {
    /// A sampler over `uffd`, which must offer minor faults on shmem
    /// (`UFFD_FEATURE_MINOR_SHMEM`); guest ranges must be registered with
    /// it in minor mode (`Userfault::register(.., minor: true)`).
    pub fn new(uffd: Arc<Userfault>) -> io::Result<PageSampler> {
        if !uffd.supports_minor() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "page sampling needs userfaultfd minor faults on shmem \
                     (UFFD_FEATURE_MINOR_SHMEM, Linux 5.13+), not granted (features {:#x})",
                    uffd.features()
                ),
            ));
        }
        Ok(PageSampler {
            uffd,
            state: Mutex::default(),
            zapped: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            write_samples: AtomicU64::new(0),
            concurrent_samples: AtomicU64::new(0),
            unattributed: AtomicU64::new(0),
            unsolicited: AtomicU64::new(0),
            already_mapped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            continued_wp: AtomicU64::new(0),
            disarmed_runs: AtomicU64::new(0),
            disarmed_shared_runs: AtomicU64::new(0),
            disarm_pauses: AtomicU64::new(0),
        })
    }

    /// The userfaultfd the sampler resolves faults on.
    pub fn userfault(&self) -> &Arc<Userfault> {
        &self.uffd
    }

    /// Declares VM `vm`'s guest RAM: `len` bytes at host address
    /// `host_addr`, guest-physical 0 at `host_addr`.
    pub fn register_space(&self, vm: u32, host_addr: usize, len: usize) {
        let mut s = self.state.lock();
        s.spaces.retain(|sp| sp.vm != vm);
        s.spaces.push(Space { vm, host_addr, len });
    }

    /// Forgets VM `vm`'s RAM, its vCPU threads and its pending pages.
    pub fn unregister_space(&self, vm: u32) {
        let mut s = self.state.lock();
        let gone: Vec<Space> = s.spaces.iter().copied().filter(|sp| sp.vm == vm).collect();
        s.spaces.retain(|sp| sp.vm != vm);
        s.threads.retain(|_, id| id.vm != vm);
        s.vm_faults.remove(&vm);
        let in_gone = |a: usize| {
            gone.iter()
                .any(|sp| a >= sp.host_addr && a < sp.host_addr + sp.len)
        };
        s.pending.retain(|&a, _| !in_gone(a));
        s.answered.retain(|&a, _| !in_gone(a));
    }

    /// Declares that kernel thread `tid` runs vCPU `vcpu` of VM `vm` on
    /// NUMA node `node` (the vCPU thread's `gettid()`).
    pub fn register_thread(&self, tid: u32, vm: u32, vcpu: usize, node: usize) {
        self.state
            .lock()
            .threads
            .insert(tid, VcpuIdentity { vm, vcpu, node });
    }

    /// Forgets thread `tid`.
    pub fn unregister_thread(&self, tid: u32) {
        self.state.lock().threads.remove(&tid);
    }

    /// Takes the pages of `addr..addr+len` (page-aligned, inside guest RAM
    /// the caller registered in minor mode) away from the host page table with
    /// `madvise(MADV_DONTNEED)`, so that the next access to each raises a
    /// minor fault. The memfd keeps the data (and a write-protected page
    /// keeps its protection as a PTE marker). Zapping a page already
    /// pending is harmless.
    pub fn zap(&self, addr: usize, len: usize) -> io::Result<()> {
        if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("zap: {addr:#x}+{len:#x} is not a non-empty page-aligned range"),
            ));
        }
        {
            // Pending before the zap, so a fault right after it is sampled.
            let mut s = self.state.lock();
            for page in (addr..addr + len).step_by(PAGE_SIZE) {
                s.pending.insert(page, ());
                s.answered.remove(&page);
            }
        }
        // SAFETY: drops page-table entries of a MAP_SHARED shmem range the
        // caller owns; the data stays in the file, so nothing is lost.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if r != 0 {
            let e = io::Error::last_os_error();
            let mut s = self.state.lock();
            for page in (addr..addr + len).step_by(PAGE_SIZE) {
                s.pending.remove(&page);
            }
            return Err(io::Error::new(
                e.kind(),
                format!("madvise(MADV_DONTNEED) {addr:#x}+{len:#x}: {e}"),
            ));
        }
        self.zapped
            .fetch_add((len / PAGE_SIZE) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Zaps guest frame `gfn` of VM `vm` (see [`zap`](Self::zap)).
    pub fn zap_frame(&self, vm: u32, gfn: u64) -> io::Result<()> {
        let addr = {
            let s = self.state.lock();
            s.spaces
                .iter()
                .find(|sp| sp.vm == vm && gfn < (sp.len / PAGE_SIZE) as u64)
                .map(|sp| sp.host_addr + gfn as usize * PAGE_SIZE)
        };
        match addr {
            Some(a) => self.zap(a, PAGE_SIZE),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("zap: frame {gfn:#x} is not in the RAM registered for vm {vm}"),
            )),
        }
    }

    /// Forgets zapped pages of `addr..addr+len` that were remapped before
    /// their first touch (a fresh mapping of data is populated, so it
    /// raises no minor fault to sample).
    pub fn forget_pending(&self, addr: usize, len: usize) {
        let mut s = self.state.lock();
        if s.pending.is_empty() && s.answered.is_empty() {
            return;
        }
        for page in (addr..addr + len).step_by(PAGE_SIZE) {
            s.pending.remove(&page);
            s.answered.remove(&page);
        }
    }

    /// Counts a run the mapper took out of minor mode (`shared`: mapped
    /// again under a pause).
    pub fn count_disarmed(&self, shared: bool) {
        self.disarmed_runs.fetch_add(1, Ordering::Relaxed);
        if shared {
            self.disarmed_shared_runs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a pause of a VM for disarming its shared runs.
    pub fn count_disarm_pause(&self) {
        self.disarm_pauses.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a page of `addr..addr+len` was zapped and not touched yet.
    pub fn any_pending(&self, addr: usize, len: usize) -> bool {
        let s = self.state.lock();
        (addr..addr + len)
            .step_by(PAGE_SIZE)
            .any(|page| s.pending.contains_key(&page))
    }

    /// Re-declares vCPU thread `tid`'s node (after the vCPU moved).
    pub fn set_thread_node(&self, tid: u32, node: usize) {
        if let Some(id) = self.state.lock().threads.get_mut(&tid) {
            id.node = node;
        }
    }

    /// Whether thread `tid` is registered.
    pub fn knows_thread(&self, tid: u32) -> bool {
        self.state.lock().threads.contains_key(&tid)
    }

    /// Minor faults resolved on VM `vm`'s RAM so far, and their total
    /// handler time in nanoseconds.
    pub fn vm_faults(&self, vm: u32) -> (u64, u64) {
        self.state
            .lock()
            .vm_faults
            .get(&vm)
            .copied()
            .unwrap_or_default()
    }

    /// Thread ids of the vCPU threads registered for VM `vm`.
    pub fn vcpu_tids(&self, vm: u32) -> Vec<u32> {
        self.state
            .lock()
            .threads
            .iter()
            .filter(|(_, t)| t.vm == vm)
            .map(|(&tid, _)| tid)
            .collect()
    }

    /// vCPU threads registered for VM `vm`.
    pub fn vcpu_threads(&self, vm: u32) -> usize {
        self.state
            .lock()
            .threads
            .values()
            .filter(|t| t.vm == vm)
            .count()
    }

    /// Zapped pages not touched yet.
    pub fn pending(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Offers one userfaultfd event to the sampler. Consumes (and resolves)
    /// every minor fault, returning `true`; returns `false` for anything
    /// else (write-protect faults are the copy-on-write handler's).
    ///
    /// Whether the page is continued write-protected is read from the
    /// page's uffd-wp bit in `/proc/self/pagemap`; see the module doc for
    /// why the monitor should rather use
    /// [`handle_event_with`](Self::handle_event_with) under its memory lock.
    pub fn handle_event(&self, ev: &FaultEvent) -> bool {
        if !ev.minor {
            return false;
        }
        let keep_wp = page_is_write_protected(ev.address).unwrap_or_else(|e| {
            tracing::warn!("sampler: reading the uffd-wp bit of {:#x}: {e}", ev.address);
            false
        });
        self.handle_event_with(ev, keep_wp)
    }

    /// As [`handle_event`](Self::handle_event), with the caller saying
    /// whether the page is write-protected (`keep_wp`: continue it
    /// write-protected).
    pub fn handle_event_with(&self, ev: &FaultEvent, keep_wp: bool) -> bool {
        if !ev.minor {
            return false;
        }
        let started = Instant::now();
        let page = ev.address & !(PAGE_SIZE - 1);
        let vm = self.record(ev, page);
        match self.uffd.continue_range(page, PAGE_SIZE, keep_wp) {
            Ok(ContinueOutcome::Mapped) => {
                if keep_wp {
                    self.continued_wp.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(ContinueOutcome::AlreadyMapped) => {
                self.already_mapped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // Never leave the thread blocked: it retries and, if the
                // page is still unmapped, faults again.
                tracing::warn!("sampler: {e}; waking");
                self.errors.fetch_add(1, Ordering::Relaxed);
                let _ = self.uffd.wake(page, PAGE_SIZE);
            }
        }
        let ns = started.elapsed().as_nanos() as u64;
        let mut s = self.state.lock();
        if s.handler_ns.len() < MAX_TIMINGS {
            s.handler_ns.push(ns);
        }
        if let Some(vm) = vm {
            let e = s.vm_faults.entry(vm).or_default();
            e.0 += 1;
            e.1 += ns;
        }
        true
    }

    /// Turns a minor fault into a sample if the page was zapped by us (or
    /// its first touch was just answered and this is another vCPU's
    /// concurrent touch) and the thread is a known vCPU.
    ///
    /// Returns the VM whose RAM holds the page (sampled or not), which the
    /// cost cap charges for the fault.
    fn record(&self, ev: &FaultEvent, page: usize) -> Option<u32> {
        let mut s = self.state.lock();
        let space = s
            .spaces
            .iter()
            .find(|sp| page >= sp.host_addr && page < sp.host_addr + sp.len)
            .copied();
        let tid = ev.thread_id.unwrap_or(0);
        let concurrent = if s.pending.remove(&page).is_some() {
            s.answered.insert(page, vec![tid]);
            false
        } else {
            match s.answered.get_mut(&page) {
                Some(tids) if ev.thread_id.is_some() && !tids.contains(&tid) => {
                    tids.push(tid);
                    true
                }
                _ => {
                    self.unsolicited.fetch_add(1, Ordering::Relaxed);
                    return space.map(|sp| sp.vm);
                }
            }
        };
        let who = ev.thread_id.and_then(|t| s.threads.get(&t).copied());
        match (who, space) {
            (Some(who), Some(space)) if who.vm == space.vm => {
                s.samples.push(AccessSample {
                    vm: space.vm,
                    gfn: ((page - space.host_addr) / PAGE_SIZE) as u64,
                    node: who.node,
                    write: ev.write,
                    vcpu: who.vcpu,
                });
                self.samples.fetch_add(1, Ordering::Relaxed);
                if ev.write {
                    self.write_samples.fetch_add(1, Ordering::Relaxed);
                }
                if concurrent {
                    self.concurrent_samples.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.unattributed.fetch_add(1, Ordering::Relaxed);
            }
        }
        space.map(|sp| sp.vm)
    }

    /// Moves the samples gathered since the last drain into `out`.
    /// Concurrent touches come within microseconds of the first, so the
    /// answered pages are forgotten here (once per policy epoch) to keep
    /// the table small.
    pub fn drain(&self, out: &mut Vec<AccessSample>) {
        let mut s = self.state.lock();
        out.append(&mut s.samples);
        s.answered.clear();
    }

    pub fn stats(&self) -> SamplerStats {
        let mut ns = self.state.lock().handler_ns.clone();
        ns.sort_unstable();
        let pct = |q: f64| {
            if ns.is_empty() {
                0.0
            } else {
                ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
            }
        };
        SamplerStats {
            zapped: self.zapped.load(Ordering::Relaxed),
            samples: self.samples.load(Ordering::Relaxed),
            write_samples: self.write_samples.load(Ordering::Relaxed),
            concurrent_samples: self.concurrent_samples.load(Ordering::Relaxed),
            unattributed: self.unattributed.load(Ordering::Relaxed),
            unsolicited: self.unsolicited.load(Ordering::Relaxed),
            already_mapped: self.already_mapped.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            continued_wp: self.continued_wp.load(Ordering::Relaxed),
            disarmed_runs: self.disarmed_runs.load(Ordering::Relaxed),
            disarmed_shared_runs: self.disarmed_shared_runs.load(Ordering::Relaxed),
            disarm_pauses: self.disarm_pauses.load(Ordering::Relaxed),
            handler_median_us: pct(0.5),
            handler_p99_us: pct(0.99),
        }
    }
}
