//! Stopping a VM: a VM-wide stop flag plus a signal that kicks each vCPU
//! thread out of `KVM_RUN`.
//!
//! A guest spinning at CPL 3 never exits on its own, so a stop needs a signal:
//! a pending signal makes `KVM_RUN` return `EINTR`. The signal handler also
//! sets `immediate_exit` in the thread's `kvm_run`, so a kick that lands just
//! before the thread enters `KVM_RUN` is not lost: that entry returns `EINTR`
//! at once. Protocol: the stopper sets the flag, then signals every live vCPU
//! thread; a vCPU thread checks the flag before every entry and after every
//! `EINTR`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use kvm_bindings::kvm_run;

use super::state::VcpuState;
use parking_lot::{Condvar, Mutex};

/// The kick signal is `SIGRTMIN() + KICK_SIGNAL_OFFSET`; the rest of the
/// process must leave that signal alone.
pub const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The signal that kicks vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a byte store: async-signal-safe.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: set by `KickTarget::install` to the mapped kvm_run of
            // this thread's vCPU and cleared before that mapping goes away.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Makes the calling thread kickable while it runs `run`'s vCPU: unblocks the
/// kick signal and points the handler at `run`. Dropping it detaches.
pub(crate) struct KickTarget;

impl KickTarget {
    pub fn install(run: &mut kvm_run) -> anyhow::Result<KickTarget> {
        KVM_RUN.with(|c| c.set(run));
        vmm_sys_util::signal::unblock_signal(kick_signal())
            .map_err(|e| anyhow::anyhow!("cannot unblock the kick signal: {e}"))?;
        Ok(KickTarget)
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Book-keeping of the vCPU threads shared by a VM and its threads.
struct Threads {
    /// Live vCPU threads (None before start and after exit).
    live: Vec<Option<libc::pthread_t>>,
    /// Kernel thread ids of the live vCPU threads (for samplers and
    /// affinity changes).
    tids: Vec<Option<u32>>,
    /// vCPU threads not yet exited.
    running: usize,
    /// When the last vCPU thread exited.
    finished_at: Option<Instant>,
    /// The DONE hypercall's result of each vCPU that made it.
    done: Vec<Option<u64>>,
    /// CPU time of the vCPU threads that exited, summed.
    cpu: ThreadCpu,
    /// When each live vCPU thread registered, with its scheduler
    /// statistics then (its life since splits into on a CPU, waiting for
    /// one, and blocked).
    since: Vec<Option<(Instant, Option<Schedstat>)>>,
}

/// CPU time of threads, split as the kernel accounts it: `user` includes
/// time in guest mode (KVM charges guest time as user time), `system` is
/// time in the host kernel on the thread's behalf (VM exits, page faults,
/// `KVM_RUN` itself). Wall-clock run time also counts time the thread was
/// runnable but descheduled, or blocked (a userfaultfd wait); CPU time does
/// not, so on a busy host it separates what a policy makes the vCPU
/// *execute* from what the host's other threads take from it.
///
/// The off-CPU rest of a thread's life splits in two (from the kernel's
/// scheduler statistics, `/proc/thread-self/schedstat`, where the kernel
/// keeps them; zero where it does not): `waiting`, runnable but with no
/// CPU to run on (other threads, the monitor's included, had them), and
/// `blocked`, asleep (a userfaultfd wait, a pause, a halted vCPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ThreadCpu {
    pub user: std::time::Duration,
    pub system: std::time::Duration,
    pub waiting: std::time::Duration,
    pub blocked: std::time::Duration,
}

impl ThreadCpu {
    /// The calling thread's CPU time so far (`getrusage(RUSAGE_THREAD)`).
    pub fn of_this_thread() -> ThreadCpu {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a rusage into the buffer it is given.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        if rc != 0 {
            return ThreadCpu::default();
        }
        // SAFETY: initialised by the successful call (and zeroed before).
        let usage = unsafe { usage.assume_init() };
        let d = |t: libc::timeval| {
            std::time::Duration::from_secs(t.tv_sec as u64)
                + std::time::Duration::from_micros(t.tv_usec as u64)
        };
        ThreadCpu {
            user: d(usage.ru_utime),
            system: d(usage.ru_stime),
            ..ThreadCpu::default()
        }
    }

    /// The calling thread's CPU time, with its off-CPU time since
    /// `since` (an instant and the thread's scheduler statistics then)
    /// split into waiting and blocked.
    fn of_this_thread_since(since: Option<(Instant, Option<Schedstat>)>) -> ThreadCpu {
        let mut cpu = ThreadCpu::of_this_thread();
        if let (Some((at, Some(then))), Some(now)) = (since, Schedstat::of_this_thread()) {
            let on_cpu = now.on_cpu.saturating_sub(then.on_cpu);
            cpu.waiting = now.waiting.saturating_sub(then.waiting);
            cpu.blocked = at.elapsed().saturating_sub(on_cpu + cpu.waiting);
        }
        cpu
    }

    pub fn total(&self) -> std::time::Duration {
        self.user + self.system
    }

    /// The calling thread's CPU time so far, to the nanosecond
    /// (`CLOCK_THREAD_CPUTIME_ID`): for timing a piece of a thread's work.
    pub fn clock() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes a timespec into a valid pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

impl std::ops::AddAssign for ThreadCpu {
    fn add_assign(&mut self, other: ThreadCpu) {
        self.user += other.user;
        self.system += other.system;
        self.waiting += other.waiting;
        self.blocked += other.blocked;
    }
}

/// A thread's time on a CPU and waiting on a run queue so far.
#[derive(Clone, Copy, Debug)]
struct Schedstat {
    on_cpu: std::time::Duration,
    waiting: std::time::Duration,
}

/// Time thread `tid` of this process has spent on a CPU, from its
/// scheduler statistics (`None` where the kernel keeps none, or once the
/// thread has exited).
pub fn thread_on_cpu(tid: u32) -> Option<std::time::Duration> {
    Schedstat::read(&format!("/proc/self/task/{tid}/schedstat")).map(|s| s.on_cpu)
}

impl Schedstat {
    /// The calling thread's, from `/proc/thread-self/schedstat` (`None`
    /// where the kernel keeps no scheduler statistics).
    fn of_this_thread() -> Option<Schedstat> {
        Schedstat::read("/proc/thread-self/schedstat")
    }

    fn read(path: &str) -> Option<Schedstat> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        let on_cpu = fields.next()?.ok()?;
        let waiting = fields.next()?.ok()?;
        Some(Schedstat {
            on_cpu: std::time::Duration::from_nanos(on_cpu),
            waiting: std::time::Duration::from_nanos(waiting),
        })
    }
}

/// Shared control state of one VM.
/// Pause requests and the vCPU threads parked because of them.
#[derive(Default)]
struct Pause {
    /// Outstanding pause requests (nested pauses are counted).
    requested: u32,
    /// vCPU threads waiting outside `KVM_RUN` until the pause ends.
    parked: usize,
    /// The latest state capture asked of the parked vCPUs (0: none yet).
    capture: u64,
    /// Per vCPU, the capture it answered last and its answer.
    answers: Vec<Option<(u64, Result<VcpuState, String>)>>,
}

/// What a parked vCPU thread is to do when [`VmControl::park_if_paused`]
/// returns.
pub(crate) enum Parked {
    /// Run the guest (no pause in force, or a stop was requested).
    Go,
    /// Capture the vCPU's state for request `0`, answer with
    /// [`VmControl::answer_capture`], then park again.
    Capture(u64),
}

/// Whether kernel thread `tid` of this process sleeps in a userfaultfd
/// fault (`/proc/self/task/TID/wchan` names `handle_userfault`).
fn blocked_in_userfault(tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
        .is_ok_and(|w| w.trim() == "handle_userfault")
}

pub(crate) struct VmControl {
    stop: AtomicBool,
    reason: Mutex<Option<String>>,
    threads: Mutex<Threads>,
    exited: Condvar,
    pause: Mutex<Pause>,
    pause_changed: Condvar,
}

/// Longest wait for every vCPU to leave `KVM_RUN` when pausing.
const PAUSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

impl VmControl {
    pub fn new(nvcpus: usize) -> VmControl {
        VmControl {
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            threads: Mutex::new(Threads {
                live: vec![None; nvcpus],
                tids: vec![None; nvcpus],
                running: nvcpus,
                finished_at: None,
                done: vec![None; nvcpus],
                since: vec![None; nvcpus],
                cpu: ThreadCpu::default(),
            }),
            exited: Condvar::new(),
            pause: Mutex::new(Pause {
                answers: (0..nvcpus).map(|_| None).collect(),
                ..Pause::default()
            }),
            pause_changed: Condvar::new(),
        }
    }

    /// Holds every vCPU of the VM outside `KVM_RUN` (so no guest access to
    /// guest memory is in flight) until [`VmControl::resume`]: kicks them
    /// and waits until each live vCPU thread is parked, or sleeps in a
    /// userfaultfd fault. Returns `false` (pause withdrawn) when that takes
    /// longer than `PAUSE_LIMIT`.
    ///
    /// A vCPU sleeping in a userfaultfd fault counts as paused: it runs no
    /// guest code until the fault handler wakes it, and the handler needs
    /// the memory lock that every caller of `pause` holds. Waiting for it to
    /// park instead was a deadlock broken only by the time limit: a merge
    /// (lock held) waited 2 s for a vCPU whose sampled minor fault waited
    /// for the lock, which made guests under the full policy crawl (a
    /// Linux guest's copy-on-write breaks took a median of 2 s).
    pub fn pause(&self) -> bool {
        let deadline = Instant::now() + PAUSE_LIMIT;
        let mut pause = self.pause.lock();
        pause.requested += 1;
        let mut kicks = 0u32;
        loop {
            let (live, tids): (Vec<libc::pthread_t>, Vec<u32>) = {
                let threads = self.threads.lock();
                (
                    threads.live.iter().flatten().copied().collect(),
                    threads.tids.iter().flatten().copied().collect(),
                )
            };
            if pause.parked >= live.len() {
                return true;
            }
            // After a first kick, a vCPU that has not parked may be asleep
            // in a fault (see above).
            if kicks > 0
                && pause.parked + tids.iter().filter(|&&t| blocked_in_userfault(t)).count()
                    >= live.len()
            {
                return true;
            }
            kicks += 1;
            if Instant::now() >= deadline {
                drop(pause);
                self.resume();
                return false;
            }
            for thread in &live {
                // SAFETY: as in `request_stop`: a registered thread is live.
                unsafe { libc::pthread_kill(*thread, kick_signal()) };
            }
            self.pause_changed
                .wait_for(&mut pause, std::time::Duration::from_micros(200));
        }
    }

    /// Ends one pause; the vCPUs run again when no pause is left.
    pub fn resume(&self) {
        let mut pause = self.pause.lock();
        pause.requested = pause.requested.saturating_sub(1);
        if pause.requested == 0 {
            self.pause_changed.notify_all();
        }
    }

    /// Called by vCPU `index`'s thread before each `KVM_RUN`: waits while
    /// the VM is paused (or until a stop is requested). Returns early with
    /// [`Parked::Capture`] when a state capture is asked of it.
    pub fn park_if_paused(&self, index: usize) -> Parked {
        let mut pause = self.pause.lock();
        if pause.requested == 0 {
            return Parked::Go;
        }
        pause.parked += 1;
        self.pause_changed.notify_all();
        let mut next = Parked::Go;
        while pause.requested > 0 && !self.stopping() {
            let answered = pause.answers[index].as_ref().map(|a| a.0);
            if pause.capture > 0 && answered != Some(pause.capture) {
                next = Parked::Capture(pause.capture);
                break;
            }
            self.pause_changed
                .wait_for(&mut pause, std::time::Duration::from_millis(10));
        }
        pause.parked -= 1;
        next
    }

    /// A parked vCPU's answer to capture request `capture`.
    pub fn answer_capture(&self, index: usize, capture: u64, state: Result<VcpuState, String>) {
        let mut pause = self.pause.lock();
        pause.answers[index] = Some((capture, state));
        self.pause_changed.notify_all();
    }

    /// Records vCPU `index`'s DONE result (before its thread exits).
    pub fn set_done(&self, index: usize, result: u64) {
        self.threads.lock().done[index] = Some(result);
    }

    /// Captures the state of every vCPU of a VM its caller has paused
    /// ([`VmControl::pause`]): each live vCPU thread, once parked, reads
    /// its own state (a vCPU that slept in a userfaultfd fault parks once
    /// the fault is resolved; it is kicked until then). Per vCPU: its
    /// state, or the DONE result of a vCPU whose thread has exited. Fails
    /// when a vCPU neither answers within the pause limit nor is done.
    pub fn capture_parked(&self) -> Result<Vec<super::state::VcpuSnapshot>, String> {
        use super::state::VcpuSnapshot;
        let deadline = Instant::now() + PAUSE_LIMIT;
        let mut pause = self.pause.lock();
        if pause.requested == 0 {
            return Err("the VM is not paused".into());
        }
        pause.capture += 1;
        let capture = pause.capture;
        self.pause_changed.notify_all();
        loop {
            let (live, done) = {
                let threads = self.threads.lock();
                (threads.live.clone(), threads.done.clone())
            };
            let mut missing = Vec::new();
            for (i, thread) in live.iter().enumerate() {
                let answered = matches!(&pause.answers[i], Some((c, _)) if *c == capture);
                if !answered && done[i].is_none() {
                    missing.push((i, *thread));
                }
            }
            if missing.is_empty() {
                let mut out = Vec::with_capacity(live.len());
                for (i, result) in done.iter().enumerate() {
                    match (result, pause.answers[i].take()) {
                        (_, Some((c, state))) if c == capture => out.push(VcpuSnapshot::Running(
                            Box::new(state.map_err(|e| format!("vCPU {i}: {e}"))?),
                        )),
                        (Some(result), _) => out.push(VcpuSnapshot::Done { result: *result }),
                        (None, _) => return Err(format!("vCPU {i} gave no state")),
                    }
                }
                return Ok(out);
            }
            if self.stopping() {
                return Err("the VM was stopped during the capture".into());
            }
            if Instant::now() >= deadline {
                let which: Vec<usize> = missing.iter().map(|m| m.0).collect();
                return Err(format!(
                    "vCPUs {which:?} did not park within {PAUSE_LIMIT:?} to give their state"
                ));
            }
            for (_, thread) in &missing {
                if let Some(thread) = thread {
                    // SAFETY: as in `request_stop`: a registered thread is live.
                    unsafe { libc::pthread_kill(*thread, kick_signal()) };
                }
            }
            self.pause_changed
                .wait_for(&mut pause, std::time::Duration::from_micros(500));
        }
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The first stop reason given.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }

    /// Asks every vCPU to stop: the first reason is kept, the flag is set,
    /// every live vCPU thread is kicked.
    pub fn request_stop(&self, reason: String) {
        self.reason.lock().get_or_insert(reason);
        self.stop.store(true, Ordering::SeqCst);
        let threads = self.threads.lock();
        for thread in threads.live.iter().flatten() {
            // SAFETY: a live thread is registered until it unregisters under
            // this lock, and is joined only after that; the handle is valid.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
    }

    /// Registers the calling thread as vCPU `index`'s.
    pub fn register(&self, index: usize) {
        let mut threads = self.threads.lock();
        // SAFETY: pthread_self has no preconditions.
        threads.live[index] = Some(unsafe { libc::pthread_self() });
        threads.tids[index] = Some(nix::unistd::gettid().as_raw() as u32);
        threads.since[index] = Some((Instant::now(), Schedstat::of_this_thread()));
    }

    /// Kernel thread id of each vCPU's thread while it runs.
    pub fn tids(&self) -> Vec<Option<u32>> {
        self.threads.lock().tids.clone()
    }

    /// Marks vCPU `index`'s thread as exited (it must not be kicked anymore),
    /// or as never started.
    pub fn unregister(&self, index: usize) {
        let mut threads = self.threads.lock();
        threads.live[index] = None;
        threads.tids[index] = None;
        threads.running -= 1;
        if threads.running == 0 {
            threads.finished_at = Some(Instant::now());
            self.exited.notify_all();
        }
    }

    /// Called by vCPU `index`'s own thread as it ends: charges the
    /// thread's CPU time to the VM, then unregisters it.
    pub fn thread_exits(&self, index: usize) {
        let since = self.threads.lock().since[index].take();
        let cpu = ThreadCpu::of_this_thread_since(since);
        self.threads.lock().cpu += cpu;
        self.unregister(index);
    }

    /// CPU time of the vCPU threads that have exited, summed.
    pub fn vcpu_cpu(&self) -> ThreadCpu {
        self.threads.lock().cpu
    }

    /// Whether every vCPU thread has exited.
    pub fn all_exited(&self) -> bool {
        self.threads.lock().running == 0
    }

    /// When the last vCPU thread exited.
    pub fn finished_at(&self) -> Option<Instant> {
        self.threads.lock().finished_at
    }

    /// Waits until every vCPU thread has exited or `deadline` passes; returns
    /// whether they all exited.
    pub fn wait_exited(&self, deadline: Instant) -> bool {
        let mut threads = self.threads.lock();
        while threads.running > 0 {
            if self.exited.wait_until(&mut threads, deadline).timed_out() {
                return threads.running == 0;
            }
        }
        true
    }
}

impl crate::memory::GuestPause for VmControl {
    fn pause(&self) -> bool {
        VmControl::pause(self)
    }
    fn resume(&self) {
        VmControl::resume(self)
    }
    fn still(&self) -> bool {
        self.all_exited() || self.pause.lock().requested > 0
    }
}
