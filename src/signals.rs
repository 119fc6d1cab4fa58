//! SIGINT and SIGTERM during `disco run`.
//!
//! The first signal asks the run to end early: the monitor's loop sees
//! [`interrupted`], stops the guests, and the run ends as usual (report
//! marked interrupted, control socket removed, `vm.max_map_count` set back).
//! A second signal exits at once (status 128 + signal), after removing the
//! control socket; what else the monitor changed on the host is put back by
//! the next `disco` start (`crate::leftovers`).
//!
//! The signals are blocked in every thread and taken by one thread that
//! waits for them (`sigwait`), rather than by a handler: no vCPU, fault or
//! scanner thread is ever interrupted in a system call, and the code that
//! reacts is ordinary code. [`install`] must therefore run before the
//! process starts any thread (threads inherit the blocked mask).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// The sockets (control, API) to remove on a second signal.
static SOCKETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread
/// it starts later) and starts the thread that waits for them. Call it
/// before any other thread exists.
pub fn install() -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT and SIGTERM")?;
    std::thread::Builder::new()
        .name("disco-signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { continue };
            let first = RECEIVED
                .compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if first {
                eprintln!(
                    "\ndisco: {}: stopping the guests and reporting (send it again to exit at once)",
                    sig.as_str()
                );
            } else {
                if let Ok(paths) = SOCKETS.lock() {
                    for path in paths.iter() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                eprintln!(
                    "\ndisco: {} again: exiting at once; the next disco start restores host settings",
                    sig.as_str()
                );
                // SAFETY: _exit ends the process without running anything else.
                unsafe { libc::_exit(128 + sig as i32) };
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// The name of the first SIGINT or SIGTERM received (`"SIGINT"`), if any.
pub fn interrupted() -> Option<&'static str> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(Signal::try_from(n).map_or("a signal", |s| s.as_str())),
    }
}

/// The exit status for a run ended by the signal: 128 + its number.
pub fn exit_status() -> Option<u8> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some((128 + n) as u8),
    }
}

/// A socket (control, API) that a second signal removes before exiting.
pub fn remove_on_exit(path: Option<PathBuf>) {
    if let (Ok(mut s), Some(path)) = (SOCKETS.lock(), path) {
        s.push(path);
    }
}
