//! Host settings disco changes system-wide, and putting them back.
//!
//! - `vm.max_map_count`: the mapper raises it for the guests' worst-case
//!   number of mappings ([`ensure_map_count`]). The value found and the
//!   value written are kept in a state file with every live monitor that
//!   relies on it (pid, process start time, a token per `Memory`); when the
//!   last of them ends (its `Memory` is dropped: normal end, error, or
//!   SIGINT/SIGTERM, which end the run normally) the value found is written
//!   back, unless someone changed it since.
//! - KSM: `disco bench sharing` saves KSM's settings to a state file before
//!   changing them (`bench::ksm`) and removes it once they are restored.
//!
//! A process killed with SIGKILL (or by a second SIGINT) leaves a state file
//! behind; [`restore_at_start`], run at every `disco` start, puts the
//! settings back and says so on stderr. State files live in [`state_dir`]
//! (`/run/lock`, emptied at boot, when the settings are back to their
//! defaults anyway), each guarded by an `flock`ed lock file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

const MAP_COUNT: &str = "/proc/sys/vm/max_map_count";
/// The state and lock files of `vm.max_map_count` in [`state_dir`].
pub const MAP_COUNT_STATE: &str = "disco-max-map-count.json";
const MAP_COUNT_LOCK: &str = "disco-max-map-count.lock";

/// Where disco keeps the state files of the host settings it changed.
pub fn state_dir() -> PathBuf {
    if std::path::Path::new("/run/lock").is_dir() {
        PathBuf::from("/run/lock")
    } else {
        std::env::temp_dir()
    }
}

/// Puts back what a disco that died left changed (KSM settings,
/// `vm.max_map_count`) and returns one line per setting it dealt with, for
/// stderr. Nothing is touched while the process that changed it still runs.
pub fn restore_at_start() -> Vec<String> {
    let mut notes = Vec::new();
    match crate::bench::ksm::Ksm::at(crate::bench::ksm::KSM_DIR, state_dir()).restore_leftover() {
        Ok(Some(note)) => notes.push(note),
        Ok(None) => {}
        Err(e) => notes.push(format!("disco: {e:#}")),
    }
    if state_dir().join(MAP_COUNT_STATE).exists() {
        match restore_map_count_leftover() {
            Ok(Some(note)) => notes.push(note),
            Ok(None) => {}
            Err(e) => notes.push(format!("disco: {e:#}")),
        }
    }
    notes
}

/// What the state file of `vm.max_map_count` records.
#[derive(Debug, Serialize, Deserialize)]
struct MapCountState {
    /// The value before the first monitor raised it.
    original: u64,
    /// The value disco wrote last.
    set_to: u64,
    /// The monitors relying on `set_to`.
    holders: Vec<Holder>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    /// Start time of the process (`/proc/PID/stat` field 22), so a reused
    /// pid does not pass for the monitor that died.
    start: u64,
    token: u64,
}

impl Holder {
    fn alive(&self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

/// The start time of process `pid`, in clock ticks since boot.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields follow the command, which may hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A `Memory`'s registration as a holder of the raised `vm.max_map_count`;
/// dropping it sets the value back once no other holder is left.
#[derive(Debug)]
pub struct MapCountLease {
    token: u64,
}

/// The lock file of the state file, locked until dropped.
struct StateLock {
    _file: File,
}

fn lock_state() -> Result<StateLock> {
    let path = state_dir().join(MAP_COUNT_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        // Another user's lock file can still be locked for reading.
        .or_else(|_| File::open(&path))
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(StateLock { _file: file })
}

fn read_map_count() -> Result<u64> {
    std::fs::read_to_string(MAP_COUNT)
        .context("reading vm.max_map_count")?
        .trim()
        .parse()
        .context("parsing vm.max_map_count")
}

/// The state file with its dead holders removed (`None` if there is none).
fn read_state() -> Result<Option<MapCountState>> {
    let path = state_dir().join(MAP_COUNT_STATE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut state: MapCountState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    state.holders.retain(Holder::alive);
    Ok(Some(state))
}

/// Writes `state` back, or, with no holder left, sets `vm.max_map_count`
/// back to its original value (unless someone else changed it since disco
/// did) and removes the file. Returns what was done when something was.
fn store_state(state: MapCountState) -> Result<Option<String>> {
    let path = state_dir().join(MAP_COUNT_STATE);
    if !state.holders.is_empty() {
        std::fs::write(&path, serde_json::to_string_pretty(&state)?)
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(None);
    }
    let current = read_map_count()?;
    let note = if current == state.set_to && current != state.original {
        std::fs::write(MAP_COUNT, state.original.to_string()).with_context(|| {
            format!(
                "setting vm.max_map_count back from {current} to {} (as root: \
                 `sysctl -w vm.max_map_count={}`)",
                state.original, state.original
            )
        })?;
        Some(format!(
            "set vm.max_map_count back from {current} to {}",
            state.original
        ))
    } else {
        None
    };
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(note)
}

/// Makes sure the process may hold `needed` memory mappings: raises
/// `vm.max_map_count` when running as root (recording the value it found
/// and registering `lease`), or fails with what to do. A monitor that needs
/// no raise but runs while another one's raise is in effect registers too,
/// since it may rely on the raised value (unless it is not root: it could
/// neither write the state file nor set the value back).
pub fn ensure_map_count(needed: u64, lease: &mut Option<MapCountLease>) -> Result<()> {
    let state_file = state_dir().join(MAP_COUNT_STATE);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if needed <= read_map_count()? && (lease.is_some() || !root || !state_file.exists()) {
        return Ok(());
    }
    let _lock = lock_state()?;
    let mut state = read_state()?;
    let current = read_map_count()?;
    if needed > current {
        // Leave room to grow so that this does not happen on every VM.
        let target = needed.max(current) * 2;
        if !root || std::fs::write(MAP_COUNT, target.to_string()).is_err() {
            bail!(
                "guest RAM may need up to {needed} memory mappings but vm.max_map_count is \
                 {current}; run disco as root (it raises the limit) or run \
                 `sysctl -w vm.max_map_count={target}`"
            );
        }
        tracing::info!("raised vm.max_map_count from {current} to {target} for guest RAM mappings");
        let s = state.get_or_insert(MapCountState {
            original: current,
            set_to: target,
            holders: Vec::new(),
        });
        s.set_to = target;
    }
    if let Some(mut s) = state {
        if lease.is_none() {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            let token = NEXT.fetch_add(1, Ordering::Relaxed);
            s.holders.push(Holder {
                pid: std::process::id(),
                start: process_start(std::process::id()).unwrap_or(0),
                token,
            });
            *lease = Some(MapCountLease { token });
        }
        store_state(s)?;
    }
    Ok(())
}

impl Drop for MapCountLease {
    fn drop(&mut self) {
        let result = lock_state().and_then(|_lock| {
            let Some(mut state) = read_state()? else {
                return Ok(None);
            };
            let me = std::process::id();
            state
                .holders
                .retain(|h| !(h.pid == me && h.token == self.token));
            store_state(state)
        });
        match result {
            Ok(Some(note)) => tracing::info!("{note}"),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

/// [`restore_at_start`] for `vm.max_map_count`.
fn restore_map_count_leftover() -> Result<Option<String>> {
    let _lock = lock_state()?;
    let Some(state) = read_state()? else {
        return Ok(None);
    };
    if !state.holders.is_empty() {
        return Ok(None); // a monitor that raised it still runs
    }
    let path = state_dir().join(MAP_COUNT_STATE);
    Ok(store_state(state)?.map(|done| {
        format!(
            "disco: a disco that ended without cleaning up raised vm.max_map_count; {done} \
             (from {})",
            path.display()
        )
    }))
}
