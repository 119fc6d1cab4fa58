//! The userfaultfd handler thread: copy-on-write breaks and access samples.
//!
//! One thread per monitor waits on the memory's userfaultfd. A guest write
//! to a write-protected (shared) page blocks the writing vCPU thread in the
//! kernel and queues a message here; the handler asks the mapper to give
//! the writer a private copy (`Memory::resolve_write_fault`) and wakes it.
//! A minor fault (a page zapped for sampling touched again) goes to
//! `Memory::resolve_minor_fault`, which records the sample and maps the
//! page back. Minor and missing faults also come from runs of pages that
//! `Memory::move_pages` has taken away from the guest while it copies
//! them; resolving those waits for the memory lock, so for the move.
//! The handler never holds the memory lock while waiting, so a merge in
//! progress delays a break but never deadlocks with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::memory::{FaultOutcome, Memory};

/// How often the handler looks at its stop flag while no fault arrives.
const POLL: Duration = Duration::from_millis(50);
/// The handler's nice level: above the vCPUs (0). Every fault it takes
/// has a vCPU blocked on it, and its work is microseconds; at the vCPUs'
/// level, on a host with more vCPUs than CPUs, a fault waited for the
/// handler to be scheduled: eight 1-vCPU guests on two host CPUs were
/// blocked 2.2-3.2 s each for about 600 samples (milliseconds a fault).
const NICE: i32 = -10;
/// Pause after a write fault that found every pool full, so a starved VM's
/// vCPU and this thread do not spin until the monitor stops the VM.
const STARVED_BACKOFF: Duration = Duration::from_millis(2);

pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultHandler {
    /// Starts the handler thread for `memory`'s userfaultfd.
    pub fn start(memory: Arc<Memory>) -> Result<FaultHandler> {
        let uffd = memory
            .userfault()
            .cloned()
            .context("copy-on-write needs userfaultfd, which could not be opened")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("disco-cow-faults".into())
            .spawn(move || {
                crate::host_load::set_thread_nice(NICE, "fault handler");
                while !flag.load(Ordering::Relaxed) {
                    match uffd.read_event(Some(POLL)) {
                        Ok(Some(event)) if event.wp => {
                            match memory.resolve_write_fault(event.address) {
                                Ok(FaultOutcome::PoolsFull) => {
                                    // Woken, the vCPU faults again until the
                                    // monitor stops its starved VM: no spin.
                                    std::thread::sleep(STARVED_BACKOFF);
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    // Never leave a vCPU blocked: wake it; if
                                    // the page is still protected it faults
                                    // again.
                                    tracing::error!(
                                        "copy-on-write fault at {:#x}: {e:#}",
                                        event.address
                                    );
                                    let _ = uffd.wake(event.address, crate::PAGE_SIZE);
                                }
                            }
                        }
                        Ok(Some(event)) if event.minor => {
                            // A page zapped for access sampling, or one of
                            // a run being migrated, was touched.
                            if let Err(e) = memory.resolve_minor_fault(&event) {
                                tracing::warn!("minor fault at {:#x}: {e:#}", event.address);
                            }
                        }
                        Ok(Some(event)) => {
                            // A missing fault: a hole in a run being
                            // migrated was touched.
                            if let Err(e) = memory.resolve_missing_fault(&event) {
                                tracing::error!(
                                    "missing fault at {:#x}: {e:#}; waking",
                                    event.address
                                );
                                let _ = uffd.wake(event.address, crate::PAGE_SIZE);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!("reading userfaultfd: {e}");
                            std::thread::sleep(POLL);
                        }
                    }
                }
            })
            .context("spawning the copy-on-write fault handler")?;
        Ok(FaultHandler {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
