//! The Linux KSM side of the sharing benchmark (`disco bench sharing`).
//!
//! The same guests as disco's own page-sharing scanner sees, but on what a
//! plain KVM host would give them: one anonymous private mapping per VM,
//! `madvise(MADV_MERGEABLE)`, and the kernel's KSM daemon (`ksmd`) switched on
//! at its fastest useful setting. What is measured: `pages_sharing` over time,
//! the time to reach 90 % and 100 % of the savings predicted from the content,
//! and the CPU time `ksmd` spent getting there.
//!
//! * [`Ksm`]: the sysfs directory `/sys/kernel/mm/ksm` (read and write knobs,
//!   read counters, find `ksmd` and its CPU time in `/proc`);
//! * [`KsmSettings`]: a snapshot of every writable knob; [`KsmGuard`] restores
//!   it on drop, on panic and explicitly;
//! * [`KsmStats`]: the counters and `ksmd`'s CPU time;
//! * [`run_ksm_side`]: one measurement; [`compare_settings`] several;
//! * [`KsmResult`]: serde result with a Markdown [`KsmResult::render_table`].
//!
//! # Content
//!
//! Each VM's region of `mib_per_vm` MiB is laid out as three contiguous parts
//! (see [`RegionLayout`]): *shared* pages, identical in every VM; *unique*
//! pages, different in every VM; *zero* pages. Shared and unique content is
//! [`crate::guest::model::page_content`]: with the benchmark seed for shared
//! pages, with [`vm_seed`] (the seed mixed with the VM index) for unique ones.
//!
//! With [`FillMode::Guests`] (the default) real micro-guests write it: the
//! existing `Fill` workload fills a whole RAM with one seed, so each VM's
//! region is given to two micro-VMs, one on the shared part (`Fill` with the
//! common seed) and one on the unique part (`Fill` with the VM's seed). Each
//! part therefore starts with a micro-VM's 1 MiB of low memory (page tables,
//! GDT, parameters, code, stacks: mostly never touched, a few pages written),
//! and only the rest is generated data. The zero part is touched by the host
//! (a real, zero-filled page is allocated): the `Fill` guest writes no zeros.
//! The micro-VMs stay alive (finished, memory slot still registered) while
//! KSM scans, so KSM merges pages that KVM has mapped, as on a real host; their
//! checksums are checked at the end.
//! With [`FillMode::Host`] the host writes exactly the same function into
//! every page (page `i` of a region is guest frame `i`), with no micro-VM.
//!
//! The savings KSM should reach are predicted from the content actually in
//! memory (the [`ContentCensus`]: every resident page hashed, pages grouped by
//! content; a group of `k` pages becomes `ceil(k / max_page_sharing)` KSM pages
//! and `k - ceil(k / max_page_sharing)` sharing sites; with
//! `use_zero_pages=1`, zero pages are merged into the kernel's zero page
//! instead and counted by `ksm_zero_pages`). The prediction from the config
//! fractions alone ("nominal") is reported next to it.
//!
//! Resident means present in `/proc/self/pagemap` and not the kernel's
//! shared zero page: a read of an untouched anonymous page (KVM reads guest
//! page 0, for one) maps the zero page, which KSM never scans.
//!
//! # Measurement
//!
//! `run=2` (clean start), the setting written, the memory filled and counted,
//! then `run=1` and a sample of the counters and `ksmd`'s CPU time every
//! `sample_interval` (100 ms by default: the times to 90 % and 100 % are the
//! first sample at or above them, so they are upper bounds with that
//! resolution) until the savings (`pages_sharing + ksm_zero_pages`) reach the
//! prediction or `timeout` passes. The pages are then re-hashed (KSM must not
//! change content), an optional `Sweep` guest is timed with KSM still
//! scanning ([`SlowdownConfig`]), KSM is stopped (`run=0`), the VMs are
//! checked and the memory unmapped, and the guard unmerges and restores.
//!
//! # Safety of the host
//!
//! KSM is global. [`KsmGuard`] takes an exclusive `flock` (so two
//! measurements, even in different processes, never interleave), snapshots
//! every writable knob and writes the snapshot to a state file. On restore it
//! writes `run=2` (unmerge everything: the next measurement starts clean and
//! `max_page_sharing` / `merge_across_nodes` may only change with no KSM pages
//! left), puts `advisor_mode` to `none` while restoring (`pages_to_scan` cannot
//! be written while the advisor is on), writes back every knob that differs,
//! then `advisor_mode` and `run`, and re-reads everything to check. It runs on
//! drop (also while unwinding from a panic); [`run_ksm_side`] additionally
//! catches a panic, restores, and returns it as an error. If a process dies
//! without restoring (SIGKILL, or Ctrl-C, which does not unwind), the state
//! file remains and the next guard restores from it first.
//!
//! `merge_across_nodes` is never changed (the build machines have one NUMA
//! node; changing it needs all KSM pages unmerged first). It and
//! `max_page_sharing`, `smart_scan`, `advisor_mode` are reported as in effect.
//! Note that `run=2` unmerges *all* KSM pages on the host, also those of other
//! processes if KSM was already in use.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{DefaultHasher, Hasher};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{markdown_table, HostInfo, Stats};
use crate::guest::layout::{min_ram_bytes, PAGE as GUEST_PAGE};
use crate::guest::{model, Workload};
use crate::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement};

/// Where the kernel exposes KSM.
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// Page size KSM works at (base pages).
const PAGE: usize = 4096;

/// The knobs [`Ksm::restore`] writes first and last, in this order.
const ADVISOR_MODE: &str = "advisor_mode";
const RUN: &str = "run";

/// `/proc/self/pagemap`: page present, and the page frame number (shown to
/// root only, 0 otherwise).
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;

/// Name of the lock and state files in the state directory.
const LOCK_FILE: &str = "disco-ksm.lock";
const STATE_FILE: &str = "disco-ksm.saved.json";

// ---------------------------------------------------------------------------
// sysfs access
// ---------------------------------------------------------------------------

/// The KSM sysfs directory (normally [`KSM_DIR`]) and where the guard keeps its
/// lock and state files.
#[derive(Clone, Debug)]
pub struct Ksm {
    dir: PathBuf,
    state_dir: PathBuf,
    /// `ksmd`'s pid, looked up once.
    ksmd: std::sync::OnceLock<Option<u32>>,
}

/// A knob value as written back: sysfs selections such as
/// `[none] scan-time` become the selected word.
fn normalise(raw: &str) -> String {
    let raw = raw.trim();
    crate::memory::folios::selected(raw)
        .unwrap_or(raw)
        .to_string()
}

impl Ksm {
    /// The host's KSM, checked to be present and writable. Fails with
    /// "KSM not available: ..." otherwise.
    pub fn system() -> Result<Ksm> {
        let ksm = Ksm::at(KSM_DIR, crate::leftovers::state_dir());
        ksm.check_available()?;
        Ok(ksm)
    }

    /// KSM at another directory (tests use a directory of plain files).
    pub fn at(dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Ksm {
        Ksm {
            dir: dir.into(),
            state_dir: state_dir.into(),
            ksmd: std::sync::OnceLock::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fails with a clear "KSM not available" message when the directory is
    /// missing or `run` cannot be opened for writing (not root, read-only
    /// sysfs).
    pub fn check_available(&self) -> Result<()> {
        if !self.dir.is_dir() {
            bail!(
                "KSM not available: {} does not exist (kernel built without CONFIG_KSM?)",
                self.dir.display()
            );
        }
        let run = self.dir.join(RUN);
        // Opening for writing writes nothing but checks the permission.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&run)
            .map_err(|e| {
                anyhow!(
                    "KSM not available: {} cannot be opened for writing ({e}); \
                     changing KSM settings needs root and a writable sysfs",
                    run.display()
                )
            })?;
        Ok(())
    }

    /// One knob or counter, trimmed (selections as the selected word).
    pub fn read(&self, name: &str) -> Result<String> {
        let path = self.dir.join(name);
        let raw = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(normalise(&raw))
    }

    /// One counter as a number, or `None` if this kernel does not have it.
    fn read_opt_i64(&self, name: &str) -> Result<Option<i64>> {
        if !self.dir.join(name).exists() {
            return Ok(None);
        }
        let v = self.read(name)?;
        v.parse()
            .map(Some)
            .with_context(|| format!("{}/{name} is not a number: {v:?}", self.dir.display()))
    }

    fn read_u64(&self, name: &str) -> Result<u64> {
        match self.read_opt_i64(name)? {
            Some(v) => Ok(v.max(0) as u64),
            None => bail!("{}/{name} does not exist", self.dir.display()),
        }
    }

    fn read_opt_u64(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.read_opt_i64(name)?.map(|v| v.max(0) as u64))
    }

    /// Writes one knob. Writing `run=2` returns when everything is unmerged.
    pub fn write(&self, name: &str, value: &str) -> Result<()> {
        let path = self.dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("opening {} for writing", path.display()))?;
        f.write_all(value.as_bytes())
            .with_context(|| format!("writing {value:?} to {}", path.display()))
    }

    /// Every writable knob and its value.
    pub fn settings(&self) -> Result<KsmSettings> {
        let mut knobs = BTreeMap::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.dir.display()))?;
            let meta = entry.metadata()?;
            use std::os::unix::fs::PermissionsExt;
            if !meta.is_file() || meta.permissions().mode() & 0o200 == 0 {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let value = self.read(&name)?;
            knobs.insert(name, value);
        }
        if !knobs.contains_key(RUN) {
            bail!(
                "KSM not available: {} has no writable `run`",
                self.dir.display()
            );
        }
        Ok(KsmSettings { knobs })
    }

    /// The counters and `ksmd`'s CPU time.
    pub fn stats(&self) -> Result<KsmStats> {
        let (cpu_ticks_ms, runtime_ns) = match *self.ksmd.get_or_init(find_ksmd) {
            Some(pid) => (ksmd_stat_ms(pid), ksmd_schedstat_ns(pid)),
            None => (None, None),
        };
        Ok(KsmStats {
            pages_shared: self.read_u64("pages_shared")?,
            pages_sharing: self.read_u64("pages_sharing")?,
            pages_unshared: self.read_u64("pages_unshared")?,
            pages_volatile: self.read_u64("pages_volatile")?,
            full_scans: self.read_u64("full_scans")?,
            pages_scanned: self.read_opt_u64("pages_scanned")?,
            ksm_zero_pages: self.read_opt_u64("ksm_zero_pages")?,
            general_profit: self.read_opt_i64("general_profit")?,
            stable_node_chains: self.read_opt_u64("stable_node_chains")?,
            stable_node_dups: self.read_opt_u64("stable_node_dups")?,
            ksmd_cpu_ticks_ms: cpu_ticks_ms,
            ksmd_runtime_ns: runtime_ns,
        })
    }

    /// `run=2`: stop ksmd and unmerge every KSM page.
    pub fn unmerge_all(&self) -> Result<()> {
        self.write(RUN, "2")
            .context("unmerging all KSM pages (run=2)")
    }

    /// Applies `setting` (without starting KSM): advisor off, then the scan
    /// rate, zero-page and smart-scan knobs present on this kernel.
    pub fn apply(&self, setting: &KsmSetting) -> Result<()> {
        let current = self.settings()?;
        if current.get(ADVISOR_MODE).is_some_and(|m| m != "none") {
            self.write(ADVISOR_MODE, "none")?;
        }
        self.write("pages_to_scan", &setting.pages_to_scan.to_string())?;
        self.write("sleep_millisecs", &setting.sleep_millisecs.to_string())?;
        if current.get("use_zero_pages").is_some() {
            self.write(
                "use_zero_pages",
                if setting.use_zero_pages { "1" } else { "0" },
            )?;
        } else if setting.use_zero_pages {
            bail!("this kernel's KSM has no use_zero_pages knob");
        }
        if let Some(smart) = setting.smart_scan {
            if current.get("smart_scan").is_some() {
                self.write("smart_scan", if smart { "1" } else { "0" })?;
            }
        }
        Ok(())
    }

    /// Unmerges everything (`run=2`) and writes `saved` back (see the module
    /// docs for the order), then re-reads every knob and returns them (equal
    /// to `saved`, or an error). Tries every knob even after a failure and
    /// reports all failures.
    pub fn restore(&self, saved: &KsmSettings) -> Result<KsmSettings> {
        let mut errors = Vec::new();
        if let Err(e) = self.unmerge_all() {
            errors.push(format!("{e:#}"));
        }
        let current = match self.settings() {
            Ok(c) => c,
            Err(e) => bail!("restoring KSM settings: {e:#}"),
        };
        let advisor_present = current.get(ADVISOR_MODE).is_some();
        if advisor_present && current.get(ADVISOR_MODE) != Some("none") {
            if let Err(e) = self.write(ADVISOR_MODE, "none") {
                errors.push(format!("{e:#}"));
            }
        }
        for (name, value) in &saved.knobs {
            if name == RUN || name == ADVISOR_MODE {
                continue;
            }
            if current.get(name) != Some(value.as_str()) {
                if let Err(e) = self.write(name, value) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        if let Some(mode) = saved.get(ADVISOR_MODE) {
            if advisor_present && mode != "none" {
                if let Err(e) = self.write(ADVISOR_MODE, mode) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        if let Some(run) = saved.get(RUN) {
            if let Err(e) = self.write(RUN, run) {
                errors.push(format!("{e:#}"));
            }
        }
        let now = match self.settings() {
            Ok(now) => {
                for d in saved.differences(&now) {
                    errors.push(format!("after restoring, {d}"));
                }
                Some(now)
            }
            Err(e) => {
                errors.push(format!("re-reading KSM settings: {e:#}"));
                None
            }
        };
        if let (true, Some(now)) = (errors.is_empty(), now) {
            Ok(now)
        } else {
            bail!(
                "restoring KSM settings in {} failed: {}",
                self.dir.display(),
                errors.join("; ")
            )
        }
    }

    /// The lock file every KSM measurement holds (`flock`), created if need
    /// be; read-only when it cannot be opened for writing (a flock needs no
    /// write access).
    fn open_lock_file(&self) -> Result<File> {
        let lock_path = self.state_dir.join(LOCK_FILE);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .or_else(|_| File::open(&lock_path))
            .with_context(|| format!("opening the KSM lock file {}", lock_path.display()))
    }

    /// Restores the settings a measurement that died left in the state file
    /// (run at every `disco` start, see `crate::leftovers`). Does nothing
    /// when there is no state file, or while a measurement holds the lock
    /// (its state file is not a leftover). Returns the notice to print.
    pub fn restore_leftover(&self) -> Result<Option<String>> {
        let state_path = self.state_dir.join(STATE_FILE);
        if !state_path.exists() {
            return Ok(None);
        }
        let lock = self.open_lock_file()?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let Ok(text) = std::fs::read_to_string(&state_path) else {
            return Ok(None); // restored meanwhile by its measurement
        };
        let saved: KsmSettings = serde_json::from_str(&text)
            .with_context(|| format!("parsing the KSM state file {}", state_path.display()))?;
        let shown = |s: &KsmSettings| {
            ["run", "pages_to_scan", "sleep_millisecs"]
                .iter()
                .filter_map(|k| s.get(k).map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let left = self.settings().map(|s| shown(&s)).unwrap_or_default();
        self.check_available()
            .and_then(|()| self.restore(&saved))
            .with_context(|| {
                format!(
                    "a `disco bench` that did not finish left KSM changed ({left}); restoring the settings saved in {} failed",
                    state_path.display()
                )
            })?;
        std::fs::remove_file(&state_path)
            .with_context(|| format!("removing {}", state_path.display()))?;
        Ok(Some(format!(
            "disco: a `disco bench` that did not finish left KSM at {left}; restored the settings saved in {} ({})",
            state_path.display(),
            shown(&saved)
        )))
    }

    /// Locks KSM for this measurement (waiting for any other holder, in this
    /// or another process), restores settings a crashed run left behind,
    /// snapshots the settings and returns the guard that restores them.
    pub fn guard(&self) -> Result<KsmGuard> {
        std::fs::create_dir_all(&self.state_dir).ok();
        let lock = self.open_lock_file()?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", self.state_dir.join(LOCK_FILE).display()));
        }
        let state_path = self.state_dir.join(STATE_FILE);
        if let Ok(text) = std::fs::read_to_string(&state_path) {
            let stale: KsmSettings = serde_json::from_str(&text)
                .with_context(|| format!("parsing the KSM state file {}", state_path.display()))?;
            eprintln!(
                "disco: a previous KSM measurement did not restore KSM's settings; \
                 restoring them from {}",
                state_path.display()
            );
            self.restore(&stale)?;
        }
        let saved = self.settings()?;
        std::fs::write(&state_path, serde_json::to_string_pretty(&saved)?)
            .with_context(|| format!("writing the KSM state file {}", state_path.display()))?;
        Ok(KsmGuard {
            ksm: self.clone(),
            saved,
            state_path,
            _lock: lock,
            done: false,
        })
    }
}

// ---------------------------------------------------------------------------
// ksmd in /proc
// ---------------------------------------------------------------------------

/// The pid of the `ksmd` kernel thread (`/proc/<pid>/comm` is `ksmd`).
pub fn find_ksmd() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in clock ticks.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command may contain spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `ksmd`'s CPU time from `/proc/<pid>/stat` (clock-tick resolution), in ms.
fn ksmd_stat_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(parse_stat_ticks(&stat)? * 1000 / hz)
}

/// `ksmd`'s time on CPU from `/proc/<pid>/schedstat` (nanoseconds), when the
/// kernel keeps schedstats.
fn ksmd_schedstat_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// settings, guard, stats
// ---------------------------------------------------------------------------

/// Every writable knob of `/sys/kernel/mm/ksm` and its value (a selection
/// such as `advisor_mode` as the selected word).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmSettings {
    pub knobs: BTreeMap<String, String>,
}

impl KsmSettings {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.knobs.get(name).map(String::as_str)
    }

    /// Human-readable differences from `other` (empty when equal).
    pub fn differences(&self, other: &KsmSettings) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.knobs {
            match other.get(k) {
                Some(o) if o == v => {}
                Some(o) => out.push(format!("{k} is {o:?}, was {v:?}")),
                None => out.push(format!("{k} is missing, was {v:?}")),
            }
        }
        for k in other.knobs.keys() {
            if !self.knobs.contains_key(k) {
                out.push(format!("{k} appeared"));
            }
        }
        out
    }
}

/// Holds the KSM lock and the settings to restore. Restores on drop (also
/// during a panic's unwinding) unless [`KsmGuard::restore`] already did.
pub struct KsmGuard {
    ksm: Ksm,
    saved: KsmSettings,
    state_path: PathBuf,
    _lock: File,
    done: bool,
}

impl KsmGuard {
    /// The settings as they were when the guard was taken.
    pub fn saved(&self) -> &KsmSettings {
        &self.saved
    }

    pub fn ksm(&self) -> &Ksm {
        &self.ksm
    }

    /// Unmerges everything and restores the saved settings, reporting any
    /// failure; returns the settings as re-read while still holding the lock.
    /// The state file is removed only after a full restore.
    pub fn restore(mut self) -> Result<KsmSettings> {
        self.done = true;
        self.restore_now()
    }

    fn restore_now(&self) -> Result<KsmSettings> {
        let now = self.ksm.restore(&self.saved)?;
        std::fs::remove_file(&self.state_path).ok();
        Ok(now)
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.restore_now() {
                eprintln!("disco: {e:#}");
            }
        }
    }
}

/// KSM's counters (`/sys/kernel/mm/ksm`) and `ksmd`'s CPU time (`/proc`).
/// Counters a kernel does not have are `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KsmStats {
    /// KSM pages in use (one per merged content, per `max_page_sharing` sites).
    pub pages_shared: u64,
    /// Sites mapping a KSM page beyond the first: the pages saved.
    pub pages_sharing: u64,
    /// Pages scanned and unique so far.
    pub pages_unshared: u64,
    /// Pages changing too fast to be merged.
    pub pages_volatile: u64,
    /// Completed scans of all mergeable memory (cumulative).
    pub full_scans: u64,
    pub pages_scanned: Option<u64>,
    /// Pages merged into the kernel's zero page (`use_zero_pages=1`).
    pub ksm_zero_pages: Option<u64>,
    /// Bytes saved minus KSM's metadata (can be negative).
    pub general_profit: Option<i64>,
    pub stable_node_chains: Option<u64>,
    pub stable_node_dups: Option<u64>,
    /// `utime + stime` of `ksmd` from `/proc/<pid>/stat`, in ms (clock-tick
    /// resolution); `None` when no `ksmd` thread was found.
    pub ksmd_cpu_ticks_ms: Option<u64>,
    /// `ksmd`'s time on CPU from `/proc/<pid>/schedstat`, in ns.
    pub ksmd_runtime_ns: Option<u64>,
}

impl KsmStats {
    /// `ksmd`'s CPU time in ms: schedstat (ns resolution) when the kernel
    /// has it, else utime + stime.
    pub fn ksmd_cpu_ms(&self) -> Option<f64> {
        self.ksmd_runtime_ns
            .map(|ns| ns as f64 / 1e6)
            .or(self.ksmd_cpu_ticks_ms.map(|ms| ms as f64))
    }

    /// Which source [`KsmStats::ksmd_cpu_ms`] uses.
    pub fn ksmd_cpu_source(&self) -> &'static str {
        if self.ksmd_runtime_ns.is_some() {
            "/proc/<ksmd>/schedstat"
        } else if self.ksmd_cpu_ticks_ms.is_some() {
            "/proc/<ksmd>/stat utime+stime"
        } else {
            "unavailable (no ksmd thread)"
        }
    }

    /// Pages saved: sharing sites plus pages merged into the zero page.
    pub fn saved_pages(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages.unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------

/// How fast KSM scans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmSetting {
    /// Pages ksmd scans per batch.
    pub pages_to_scan: u32,
    /// Sleep between batches (0: ksmd only yields).
    pub sleep_millisecs: u32,
    /// Merge zero-filled pages into the kernel's zero page.
    pub use_zero_pages: bool,
    /// Write `smart_scan` (skip pages that did not merge recently); `None`
    /// leaves the host's value.
    pub smart_scan: Option<bool>,
}

impl KsmSetting {
    /// The kernel's defaults (100 pages every 20 ms).
    pub const KERNEL_DEFAULT: KsmSetting = KsmSetting {
        pages_to_scan: 100,
        sleep_millisecs: 20,
        use_zero_pages: false,
        smart_scan: None,
    };

    /// The fastest useful setting, measured on the build machines (2 CPUs,
    /// nested KVM, Linux 6.18) with [`compare_settings`] over
    /// [`KsmSetting::candidates`], 8 VMs x 32 MiB, 50 % identical, guest
    /// fill, three rounds (the ignored test `survey_ksm_settings`). Median
    /// time to the predicted savings: 100/20 (kernel default) 29.2 s,
    /// 1000/20 4.0 s, 10000/20 1.7 s, 10000/1 1.2 s, **10000/0 0.9 s**,
    /// 100000/0 1.2 s; ksmd needed 0.55-0.7 s of CPU in every case, so the
    /// setting only decides how soon that work is done. Larger batches gain
    /// nothing once ksmd never sleeps. The price: with `sleep_millisecs=0`
    /// ksmd keeps a CPU busy (55-100 % of one here) for as long as it runs,
    /// also after everything is merged, which is why a measurement stops it.
    pub const FASTEST: KsmSetting = KsmSetting {
        pages_to_scan: 10_000,
        sleep_millisecs: 0,
        use_zero_pages: false,
        smart_scan: None,
    };

    /// The settings [`compare_settings`] tries by default: the kernel's
    /// default, then ever larger batches and shorter sleeps.
    pub fn candidates() -> Vec<KsmSetting> {
        let s = |pages_to_scan, sleep_millisecs| KsmSetting {
            pages_to_scan,
            sleep_millisecs,
            ..KsmSetting::KERNEL_DEFAULT
        };
        vec![
            s(100, 20),
            s(1_000, 20),
            s(10_000, 20),
            s(10_000, 1),
            s(10_000, 0),
            s(100_000, 0),
        ]
    }

    /// `pages_to_scan=… sleep_millisecs=…` as written.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "pages_to_scan={} sleep_millisecs={} use_zero_pages={}",
            self.pages_to_scan, self.sleep_millisecs, self.use_zero_pages as u8
        );
        if let Some(smart) = self.smart_scan {
            s += &format!(" smart_scan={}", smart as u8);
        }
        s
    }
}

/// Who writes the guests' memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    /// Two `Fill` micro-VMs per region (shared part, unique part), see the
    /// module docs.
    Guests,
    /// The host writes `page_content` into every page.
    Host,
}

/// Optional: a `Sweep` guest's run time with KSM off and with KSM on (after
/// the merge reached its steady state; ksmd keeps scanning at the setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowdownConfig {
    pub mib: usize,
    pub passes: u32,
    /// Runs with KSM off and with KSM on (medians are compared).
    pub runs: usize,
}

/// One KSM measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KsmBenchConfig {
    /// Number of VMs (one anonymous region each).
    pub vms: usize,
    pub mib_per_vm: usize,
    /// Fraction of each region's pages identical in every VM.
    pub shared_fraction: f64,
    /// Fraction of each region's pages that are zero-filled.
    pub zero_fraction: f64,
    /// Content seed (shared pages; unique pages use [`vm_seed`]).
    pub seed: u64,
    pub fill: FillMode,
    pub setting: KsmSetting,
    /// Give up waiting for the predicted savings after this long.
    pub timeout: Duration,
    pub sample_interval: Duration,
    /// Allow transparent huge pages on the regions (default: `MADV_NOHUGEPAGE`,
    /// so KSM sees 4 KiB pages as disco's scanner does).
    pub transparent_hugepages: bool,
    pub slowdown: Option<SlowdownConfig>,
}

impl Default for KsmBenchConfig {
    /// 8 VMs of 32 MiB, half of the pages identical, guests fill, fastest
    /// setting, 100 ms samples, 120 s timeout.
    fn default() -> Self {
        KsmBenchConfig {
            vms: 8,
            mib_per_vm: 32,
            shared_fraction: 0.5,
            zero_fraction: 0.0,
            seed: 0x5EED_0D15_C0DE,
            fill: FillMode::Guests,
            setting: KsmSetting::FASTEST,
            timeout: Duration::from_secs(120),
            sample_interval: Duration::from_millis(100),
            transparent_hugepages: false,
            slowdown: None,
        }
    }
}

/// The page parts of one VM's region, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub shared_pages: usize,
    pub unique_pages: usize,
    pub zero_pages: usize,
}

impl RegionLayout {
    pub fn total_pages(&self) -> usize {
        self.shared_pages + self.unique_pages + self.zero_pages
    }
}

/// The seed of VM `vm`'s unique pages (never equal to `seed`).
pub fn vm_seed(seed: u64, vm: usize) -> u64 {
    model::stream_seed(seed, vm)
}

impl KsmBenchConfig {
    /// The parts of each region.
    pub fn layout(&self) -> RegionLayout {
        let total = self.mib_per_vm * (1 << 20) / PAGE;
        let shared = ((self.shared_fraction * total as f64).round() as usize).min(total);
        let zero = ((self.zero_fraction * total as f64).round() as usize).min(total - shared);
        RegionLayout {
            shared_pages: shared,
            unique_pages: total - shared - zero,
            zero_pages: zero,
        }
    }

    /// Checks the numbers (and, for guest fill, that each part holds a
    /// micro-VM).
    pub fn validate(&self) -> Result<()> {
        if self.vms == 0 || self.mib_per_vm == 0 {
            bail!("the KSM benchmark needs at least one VM of at least 1 MiB");
        }
        for (name, f) in [
            ("shared_fraction", self.shared_fraction),
            ("zero_fraction", self.zero_fraction),
        ] {
            if !(0.0..=1.0).contains(&f) {
                bail!("{name} must be within 0..=1, not {f}");
            }
        }
        if self.shared_fraction + self.zero_fraction > 1.0 + 1e-9 {
            bail!("shared_fraction + zero_fraction exceed 1");
        }
        if self.sample_interval.is_zero() {
            bail!("sample_interval must be positive");
        }
        if self.fill == FillMode::Guests {
            let l = self.layout();
            let min = (min_ram_bytes(
                &Workload::Fill {
                    seed: 0,
                    private_seed: 0,
                    shared_percent: 100,
                    shared_run: 1,
                },
                1,
            ) / GUEST_PAGE) as usize;
            for (part, pages) in [("shared", l.shared_pages), ("unique", l.unique_pages)] {
                if pages != 0 && pages < min {
                    bail!(
                        "with guest fill the {part} part of each region ({pages} pages) must be \
                         empty or hold a micro-VM ({min} pages at least); use a larger region, \
                         another fraction, or host fill"
                    );
                }
            }
        }
        Ok(())
    }

    /// Savings expected from the config fractions alone, as if every page
    /// of every region were resident with its part's content.
    pub fn nominal_saved_pages(&self, use_zero_pages: bool, max_page_sharing: u64) -> u64 {
        let l = self.layout();
        let n = self.vms as u64;
        let mut saved = l.shared_pages as u64 * group_saving(n, max_page_sharing);
        let zeros = l.zero_pages as u64 * n;
        saved += if use_zero_pages {
            zeros
        } else {
            group_saving(zeros, max_page_sharing)
        };
        saved
    }
}

/// Sites saved when `k` identical pages merge: `k - ceil(k / max_sharing)`.
fn group_saving(k: u64, max_sharing: u64) -> u64 {
    if k < 2 {
        0
    } else {
        k - k.div_ceil(max_sharing.max(2))
    }
}

// ---------------------------------------------------------------------------
// memory and content
// ---------------------------------------------------------------------------

/// Private anonymous memory marked `MADV_MERGEABLE`; unmapped on drop (by
/// the bare runner's `BareRam` it is made of).
struct MergeableRegion {
    addr: usize,
    size: usize,
    _ram: super::bare::BareRam,
}

impl MergeableRegion {
    fn new(size: usize, transparent_hugepages: bool) -> Result<MergeableRegion> {
        let ram = super::bare::BareRam::new(size)?;
        let addr = ram.guest().host_addr as *mut libc::c_void;
        let region = MergeableRegion {
            addr: addr as usize,
            size,
            _ram: ram,
        };
        if !transparent_hugepages {
            // SAFETY: our own mapping.
            if unsafe { libc::madvise(addr, size, libc::MADV_NOHUGEPAGE) } != 0 {
                return Err(std::io::Error::last_os_error()).context("madvise(MADV_NOHUGEPAGE)");
            }
        }
        // SAFETY: our own mapping.
        if unsafe { libc::madvise(addr, size, libc::MADV_MERGEABLE) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("KSM not available: madvise(MADV_MERGEABLE) failed");
        }
        Ok(region)
    }

    fn guest(&self, offset_pages: usize, pages: usize) -> GuestRam {
        assert!((offset_pages + pages) * PAGE <= self.size);
        GuestRam {
            host_addr: self.addr + offset_pages * PAGE,
            size: pages * PAGE,
        }
    }

    fn pages(&self) -> usize {
        self.size / PAGE
    }

    /// Which pages hold a page of their own (present in `/proc/self/pagemap`
    /// and not the kernel's shared zero page, which a read fault of an
    /// untouched page maps and which KSM ignores), without touching any.
    fn resident(&self, zero_pfn: Option<u64>) -> Result<Vec<bool>> {
        use std::os::unix::fs::FileExt;
        let pagemap = File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
        let mut raw = vec![0u8; self.pages() * 8];
        pagemap
            .read_exact_at(&mut raw, (self.addr / PAGE * 8) as u64)
            .context("reading /proc/self/pagemap")?;
        Ok(raw
            .chunks_exact(8)
            .map(|b| {
                let e = u64::from_le_bytes(b.try_into().unwrap());
                e & PM_PRESENT != 0 && zero_pfn.is_none_or(|z| e & PM_PFN != z)
            })
            .collect())
    }

    /// Page `i` as words. Only for resident pages (reading an untouched page
    /// would map the zero page).
    fn page(&self, i: usize) -> &[u64] {
        assert!(i < self.pages());
        // SAFETY: inside our mapping, page-aligned; guests may only have
        // written it before (they are finished when this is called).
        unsafe { std::slice::from_raw_parts((self.addr + i * PAGE) as *const u64, PAGE / 8) }
    }

    fn write_page(&self, i: usize, words: &[u64; 512]) {
        assert!(i < self.pages());
        // SAFETY: inside our mapping; no guest runs on it in host fill.
        unsafe {
            std::ptr::copy_nonoverlapping(
                words.as_ptr(),
                (self.addr + i * PAGE) as *mut u64,
                words.len(),
            )
        }
    }

    /// Allocates page `i` as a zero-filled page (a write fault).
    fn touch_zero(&self, i: usize) {
        assert!(i < self.pages());
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile((self.addr + i * PAGE) as *mut u64, 0) }
    }
}

/// The content actually in the regions: every resident page hashed, and the
/// savings KSM should reach for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentCensus {
    pub resident_pages: u64,
    /// Distinct contents among resident non-zero pages.
    pub distinct_contents: u64,
    /// Resident zero-filled pages.
    pub zero_pages: u64,
    /// Contents held by two pages or more (non-zero).
    pub duplicate_groups: u64,
    /// Pages in those groups.
    pub duplicate_pages: u64,
    /// KSM pages expected (`pages_shared`).
    pub expected_pages_shared: u64,
    /// Sharing sites expected (`pages_sharing`).
    pub expected_pages_sharing: u64,
    /// Pages expected merged into the zero page (`ksm_zero_pages`).
    pub expected_zero_pages: u64,
}

impl ContentCensus {
    /// Pages KSM should save at its steady state.
    pub fn expected_saved_pages(&self) -> u64 {
        self.expected_pages_sharing + self.expected_zero_pages
    }
}

/// Per region, per page: the content hash, or `None` when not resident.
type PageHashes = Vec<Vec<Option<u64>>>;

fn hash_page(words: &[u64]) -> u64 {
    let mut h = DefaultHasher::new();
    for &w in words {
        h.write_u64(w);
    }
    h.finish()
}

/// The page frame of the kernel's shared zero page, found by read-faulting
/// a fresh anonymous page; `None` when pagemap hides frame numbers (not root).
fn zero_pfn() -> Result<Option<u64>> {
    let probe = MergeableRegion::new(PAGE, false)?;
    // SAFETY: a read of our own fresh mapping maps the zero page.
    let _ = unsafe { std::ptr::read_volatile(probe.addr as *const u64) };
    use std::os::unix::fs::FileExt;
    let pagemap = File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let mut b = [0u8; 8];
    pagemap
        .read_exact_at(&mut b, (probe.addr / PAGE * 8) as u64)
        .context("reading /proc/self/pagemap")?;
    let e = u64::from_le_bytes(b);
    Ok((e & PM_PRESENT != 0 && e & PM_PFN != 0).then_some(e & PM_PFN))
}

/// Hashes every page with a page of its own (`previous == None`), or
/// exactly the pages hashed in `previous` (after merging, when KSM may have
/// mapped zero pages to the zero page).
fn hash_regions(
    regions: &[MergeableRegion],
    previous: Option<&PageHashes>,
    zero_pfn: Option<u64>,
) -> Result<PageHashes> {
    regions
        .iter()
        .enumerate()
        .map(|(v, r)| {
            let resident = match previous {
                Some(p) => p[v].iter().map(Option::is_some).collect(),
                None => r.resident(zero_pfn)?,
            };
            Ok((0..r.pages())
                .map(|i| {
                    resident[i].then(|| {
                        let p = r.page(i);
                        if p.iter().all(|&w| w == 0) {
                            0
                        } else {
                            // 0 is reserved for zero pages.
                            hash_page(p).max(1)
                        }
                    })
                })
                .collect())
        })
        .collect()
}

fn census(hashes: &PageHashes, use_zero_pages: bool, max_page_sharing: u64) -> ContentCensus {
    let mut groups: HashMap<u64, u64> = HashMap::new();
    let mut c = ContentCensus::default();
    for h in hashes.iter().flatten().flatten() {
        c.resident_pages += 1;
        if *h == 0 {
            c.zero_pages += 1;
        } else {
            *groups.entry(*h).or_default() += 1;
        }
    }
    c.distinct_contents = groups.len() as u64;
    let zero_group = (!use_zero_pages && c.zero_pages > 0).then_some(c.zero_pages);
    for &k in groups.values().chain(zero_group.iter()) {
        if k >= 2 {
            c.duplicate_groups += 1;
            c.duplicate_pages += k;
            c.expected_pages_shared += k.div_ceil(max_page_sharing.max(2));
            c.expected_pages_sharing += group_saving(k, max_page_sharing);
        }
    }
    if use_zero_pages {
        c.expected_zero_pages = c.zero_pages;
    }
    c
}

/// The regions with their content, and the micro-VMs that wrote it (alive,
/// finished). Field order: VMs are dropped before the memory they run on.
struct Guests {
    vms: Vec<MicroVm>,
    regions: Vec<MergeableRegion>,
}

fn fill_spec(name: String, seed: u64) -> MicroVmSpec {
    MicroVmSpec {
        name,
        vcpus: vec![VcpuPlacement {
            node: 0,
            host_cpus: Vec::new(),
        }],
        workload: Workload::Fill {
            seed,
            private_seed: seed,
            shared_percent: 100,
            shared_run: 1,
        },
        time_limit: Duration::from_secs(120),
    }
}

fn wait_finished(vms: &[MicroVm], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !vms.iter().all(MicroVm::is_finished) {
        if Instant::now() > deadline {
            bail!("the fill guests did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn fill(cfg: &KsmBenchConfig, kvm: Option<&kvm_ioctls::Kvm>) -> Result<Guests> {
    let l = cfg.layout();
    let mut guests = Guests {
        vms: Vec::new(),
        regions: Vec::new(),
    };
    for _ in 0..cfg.vms {
        guests.regions.push(MergeableRegion::new(
            l.total_pages() * PAGE,
            cfg.transparent_hugepages,
        )?);
    }
    match cfg.fill {
        FillMode::Host => {
            for (v, r) in guests.regions.iter().enumerate() {
                for i in 0..l.shared_pages {
                    r.write_page(i, &model::page_content(cfg.seed, i as u64));
                }
                let unique = vm_seed(cfg.seed, v);
                for i in l.shared_pages..l.shared_pages + l.unique_pages {
                    r.write_page(i, &model::page_content(unique, i as u64));
                }
            }
        }
        FillMode::Guests => {
            let kvm = kvm.context("guest fill needs /dev/kvm")?;
            for (v, r) in guests.regions.iter().enumerate() {
                if l.shared_pages > 0 {
                    let ram = r.guest(0, l.shared_pages);
                    let spec = fill_spec(format!("ksm{v}-shared"), cfg.seed);
                    guests.vms.push(MicroVm::create(kvm, spec, ram)?);
                }
                if l.unique_pages > 0 {
                    let ram = r.guest(l.shared_pages, l.unique_pages);
                    let spec = fill_spec(format!("ksm{v}-unique"), vm_seed(cfg.seed, v));
                    guests.vms.push(MicroVm::create(kvm, spec, ram)?);
                }
            }
            for vm in guests.vms.iter_mut() {
                vm.start()?;
            }
            wait_finished(&guests.vms, Duration::from_secs(120))?;
        }
    }
    for r in &guests.regions {
        for i in l.shared_pages + l.unique_pages..l.total_pages() {
            r.touch_zero(i);
        }
    }
    Ok(guests)
}

// ---------------------------------------------------------------------------
// measurement
// ---------------------------------------------------------------------------

/// One sample of KSM's progress, relative to the moment KSM was started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_ms: u64,
    pub pages_sharing: u64,
    pub pages_shared: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub ksm_zero_pages: u64,
    /// Full scans completed since KSM was started.
    pub full_scans: u64,
    /// CPU time ksmd used since KSM was started.
    pub ksmd_cpu_ms: f64,
}

impl Sample {
    pub fn saved_pages(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages
    }
}

/// What [`run_ksm_side`] reports as it goes.
#[derive(Clone, Debug)]
pub enum KsmEvent<'a> {
    /// A phase begins ("filling", "census", "merging", ...).
    Phase(&'a str),
    /// A sample while merging; `target` is the expected saved pages.
    Sample { sample: &'a Sample, target: u64 },
}

/// A `Sweep` guest's run time (ms) without and with KSM running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlowdownResult {
    pub config: SlowdownConfig,
    pub ksm_off_ms: Stats,
    pub ksm_on_ms: Stats,
    /// Median with KSM on over median with KSM off.
    pub ratio: f64,
}

/// The result of one KSM measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KsmResult {
    pub config: KsmBenchConfig,
    pub layout: RegionLayout,
    /// The setting measured.
    pub setting: KsmSetting,
    /// Every writable knob while measuring (max_page_sharing, smart_scan,
    /// merge_across_nodes, advisor_mode ...).
    pub knobs_in_effect: BTreeMap<String, String>,
    /// Where ksmd's CPU time comes from.
    pub ksmd_cpu_source: String,
    pub fill_ms: f64,
    pub census: ContentCensus,
    pub series: Vec<Sample>,
    pub time_to_90pct_ms: Option<u64>,
    pub time_to_steady_ms: Option<u64>,
    pub ksmd_cpu_ms_to_90pct: Option<f64>,
    pub ksmd_cpu_ms_to_steady: Option<f64>,
    pub full_scans_to_steady: Option<u64>,
    /// Saved at the last sample: (pages_sharing + ksm_zero_pages) * 4 KiB.
    pub bytes_saved: u64,
    /// Predicted from the content in memory (the census).
    pub expected_bytes_saved: u64,
    /// Predicted from the config fractions alone.
    pub nominal_bytes_saved: u64,
    /// `general_profit` at the last sample (savings minus KSM metadata).
    pub general_profit: Option<i64>,
    /// `/proc/self/ksm_merging_pages` at the last sample.
    pub process_merging_pages: Option<u64>,
    /// The last sample's savings reached the prediction.
    pub reached_steady: bool,
    /// When the prediction was not reached: pages of duplicate content KSM
    /// left unmerged (from `/proc/kpageflags`), and up to 10 of them.
    pub unmerged_duplicate_pages: Option<u64>,
    pub unmerged_examples: Vec<String>,
    /// Every page still held its content after merging (re-hashed).
    pub content_unchanged: bool,
    /// Every fill guest returned the model's checksum (`None`: host fill).
    pub guests_ok: Option<bool>,
    pub final_stats: KsmStats,
    /// Every writable knob before the run and after restoring (read under
    /// the KSM lock; equal, else the run is an error).
    pub settings_before: KsmSettings,
    pub settings_after: KsmSettings,
    pub slowdown: Option<SlowdownResult>,
    pub host: HostInfo,
}

/// One KSM measurement, see the module docs. `progress` sees phases and
/// samples. KSM's settings are restored (and everything unmerged) before this
/// returns, whether it succeeds, fails or panics; a failure to restore is an
/// error.
pub fn run_ksm_side(
    cfg: &KsmBenchConfig,
    mut progress: impl FnMut(KsmEvent<'_>),
) -> Result<KsmResult> {
    cfg.validate()?;
    let ksm = Ksm::system()?;
    let kvm = match cfg.fill {
        FillMode::Guests => Some(kvm_ioctls::Kvm::new().context("cannot open /dev/kvm")?),
        FillMode::Host => None,
    };
    if cfg.slowdown.is_some() && kvm.is_none() {
        bail!("the slowdown measurement runs a guest: use guest fill");
    }
    let guard = ksm.guard()?;
    let settings_before = guard.saved().clone();
    let body = catch_unwind(AssertUnwindSafe(|| {
        measure(&ksm, cfg, kvm.as_ref(), &mut progress)
    }));
    progress(KsmEvent::Phase("unmerging and restoring KSM settings"));
    let restored = guard.restore();
    let result = match body {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("the KSM measurement panicked: {msg}"))
        }
    };
    match (result, restored) {
        (Ok(r), Ok(after)) => Ok(KsmResult {
            settings_before,
            settings_after: after,
            ..r
        }),
        (Err(e), Ok(_)) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(r)) => Err(e.context(format!("and then {r:#}"))),
    }
}

/// [`run_ksm_side`] once per setting (each with a clean start).
pub fn compare_settings(
    cfg: &KsmBenchConfig,
    settings: &[KsmSetting],
    mut progress: impl FnMut(&KsmSetting, KsmEvent<'_>),
) -> Result<Vec<KsmResult>> {
    settings
        .iter()
        .map(|s| {
            let c = KsmBenchConfig {
                setting: *s,
                ..cfg.clone()
            };
            run_ksm_side(&c, |e| progress(s, e))
                .with_context(|| format!("measuring KSM at {}", s.describe()))
        })
        .collect()
}

/// The index of the fastest result: shortest time to steady state (results
/// within one sample interval count as equal), then least ksmd CPU.
pub fn fastest(results: &[KsmResult]) -> Option<usize> {
    let key = |r: &KsmResult| {
        let quantum = r.config.sample_interval.as_millis().max(1) as u64;
        (
            r.time_to_steady_ms.map_or(u64::MAX, |t| t / quantum),
            r.ksmd_cpu_ms_to_steady.unwrap_or(f64::MAX),
        )
    };
    (0..results.len()).min_by(|&a, &b| {
        let (ka, kb) = (key(&results[a]), key(&results[b]));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    })
}

/// Pages of duplicate content that KSM has not merged (their frame is not a
/// KSM page in `/proc/kpageflags`, nor the zero page for zero content with
/// `use_zero_pages`): the count and up to 10 examples. `None` when the
/// frames cannot be read (not root).
fn unmerged_duplicates(
    regions: &[MergeableRegion],
    hashes: &PageHashes,
    layout: &RegionLayout,
    zero_pfn: Option<u64>,
) -> Option<(u64, Vec<String>)> {
    use std::os::unix::fs::FileExt;
    const KPF_KSM: u64 = 1 << 21;
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for h in hashes.iter().flatten().flatten() {
        *counts.entry(*h).or_default() += 1;
    }
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let flags = File::open("/proc/kpageflags").ok()?;
    let (mut n, mut examples) = (0, Vec::new());
    for (v, r) in regions.iter().enumerate() {
        for (i, h) in hashes[v].iter().enumerate() {
            let Some(h) = h else { continue };
            if counts[h] < 2 {
                continue;
            }
            let mut b = [0u8; 8];
            pagemap
                .read_exact_at(&mut b, ((r.addr / PAGE + i) * 8) as u64)
                .ok()?;
            let pfn = u64::from_le_bytes(b) & PM_PFN;
            if pfn == 0 {
                return None;
            }
            if *h == 0 && Some(pfn) == zero_pfn {
                continue;
            }
            flags.read_exact_at(&mut b, pfn * 8).ok()?;
            if u64::from_le_bytes(b) & KPF_KSM == 0 {
                n += 1;
                if examples.len() < 10 {
                    let part = if i < layout.shared_pages {
                        "shared"
                    } else if i < layout.shared_pages + layout.unique_pages {
                        "unique"
                    } else {
                        "zero"
                    };
                    examples.push(format!(
                        "VM {v} page {i} ({part} part, {} copies{})",
                        counts[h],
                        if *h == 0 { ", zero-filled" } else { "" }
                    ));
                }
            }
        }
    }
    Some((n, examples))
}

fn read_process_merging_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/self/ksm_merging_pages")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs a `Sweep` guest on fresh mergeable memory and returns its run time.
fn sweep_once(kvm: &kvm_ioctls::Kvm, s: &SlowdownConfig, seed: u64, thp: bool) -> Result<f64> {
    let region = MergeableRegion::new(s.mib << 20, thp)?;
    let spec = MicroVmSpec {
        name: "ksm-sweep".into(),
        vcpus: vec![VcpuPlacement {
            node: 0,
            host_cpus: Vec::new(),
        }],
        workload: Workload::Sweep {
            seed,
            passes: s.passes,
        },
        time_limit: Duration::from_secs(300),
    };
    let mut vm = MicroVm::create(kvm, spec, region.guest(0, region.pages()))?;
    vm.start()?;
    let out = vm.wait();
    drop(region);
    if !out.checksum_ok() {
        bail!("the sweep guest did not return the model's checksum: {out:?}");
    }
    Ok(out.run_time.as_secs_f64() * 1e3)
}

fn measure(
    ksm: &Ksm,
    cfg: &KsmBenchConfig,
    kvm: Option<&kvm_ioctls::Kvm>,
    progress: &mut dyn FnMut(KsmEvent<'_>),
) -> Result<KsmResult> {
    // A clean start: nothing merged, ksmd stopped, our setting in place.
    ksm.unmerge_all()?;
    ksm.apply(&cfg.setting)?;
    let knobs = ksm.settings()?;
    let use_zero_pages = knobs.get("use_zero_pages") == Some("1");
    let max_page_sharing: u64 = knobs
        .get("max_page_sharing")
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);

    let slowdown_seed = cfg.seed ^ 0x51_0e_d0_e5;
    let mut ksm_off_ms = Vec::new();
    if let (Some(s), Some(kvm)) = (&cfg.slowdown, kvm) {
        progress(KsmEvent::Phase("sweep guest, KSM off"));
        for _ in 0..s.runs.max(1) {
            ksm_off_ms.push(sweep_once(
                kvm,
                s,
                slowdown_seed,
                cfg.transparent_hugepages,
            )?);
        }
    }

    progress(KsmEvent::Phase("filling"));
    let t_fill = Instant::now();
    let guests = fill(cfg, kvm)?;
    let fill_ms = t_fill.elapsed().as_secs_f64() * 1e3;

    progress(KsmEvent::Phase("census"));
    let zero_pfn = zero_pfn()?;
    let before = hash_regions(&guests.regions, None, zero_pfn)?;
    let census = census(&before, use_zero_pages, max_page_sharing);
    let target = census.expected_saved_pages();

    progress(KsmEvent::Phase("merging"));
    let s0 = ksm.stats()?;
    let cpu0 = s0.ksmd_cpu_ms().unwrap_or(0.0);
    let sample_of = |s: &KsmStats, t: Duration| Sample {
        t_ms: t.as_millis() as u64,
        pages_sharing: s.pages_sharing.saturating_sub(s0.pages_sharing),
        pages_shared: s.pages_shared.saturating_sub(s0.pages_shared),
        pages_unshared: s.pages_unshared,
        pages_volatile: s.pages_volatile,
        ksm_zero_pages: s
            .ksm_zero_pages
            .unwrap_or(0)
            .saturating_sub(s0.ksm_zero_pages.unwrap_or(0)),
        full_scans: s.full_scans.saturating_sub(s0.full_scans),
        ksmd_cpu_ms: s.ksmd_cpu_ms().unwrap_or(0.0) - cpu0,
    };
    let mut series = vec![sample_of(&s0, Duration::ZERO)];
    let start = Instant::now();
    ksm.write(RUN, "1").context("starting KSM (run=1)")?;
    let mut last = s0.clone();
    let mut t90 = None;
    let mut steady = None;
    for tick in 1.. {
        let next = start + cfg.sample_interval * tick;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        last = ksm.stats()?;
        let sample = sample_of(&last, start.elapsed());
        progress(KsmEvent::Sample {
            sample: &sample,
            target,
        });
        let saved = sample.saved_pages();
        if t90.is_none() && saved * 10 >= target * 9 {
            t90 = Some(series.len());
        }
        let reached = saved >= target;
        series.push(sample);
        if reached {
            steady = Some(series.len() - 1);
            break;
        }
        if start.elapsed() >= cfg.timeout {
            break;
        }
    }
    let process_merging_pages = read_process_merging_pages();
    let unmerged = if steady.is_none() {
        unmerged_duplicates(&guests.regions, &before, &cfg.layout(), zero_pfn)
    } else {
        None
    };

    progress(KsmEvent::Phase("checking content"));
    let after = hash_regions(&guests.regions, Some(&before), zero_pfn)?;
    let content_unchanged = before == after;

    let mut slowdown = None;
    if let (Some(s), Some(kvm)) = (&cfg.slowdown, kvm) {
        progress(KsmEvent::Phase("sweep guest, KSM on"));
        let mut on = Vec::new();
        for _ in 0..s.runs.max(1) {
            on.push(sweep_once(
                kvm,
                s,
                slowdown_seed,
                cfg.transparent_hugepages,
            )?);
        }
        let (off, on) = (Stats::of(&ksm_off_ms), Stats::of(&on));
        slowdown = Some(SlowdownResult {
            config: *s,
            ratio: on.median / off.median,
            ksm_off_ms: off,
            ksm_on_ms: on,
        });
    }

    // Stop scanning before tearing down, then check the guests.
    ksm.write(RUN, "0").context("stopping KSM (run=0)")?;
    let Guests { vms, regions } = guests;
    let guests_ok =
        (!vms.is_empty()).then(|| vms.into_iter().map(MicroVm::wait).all(|o| o.checksum_ok()));
    drop(regions);

    let at = |i: Option<usize>| i.map(|i| &series[i]);
    let last_sample = series
        .last()
        .cloned()
        .unwrap_or_else(|| sample_of(&s0, Duration::ZERO));
    let result = KsmResult {
        config: cfg.clone(),
        layout: cfg.layout(),
        setting: cfg.setting,
        knobs_in_effect: knobs.knobs.clone(),
        ksmd_cpu_source: s0.ksmd_cpu_source().into(),
        fill_ms,
        series: series.clone(),
        time_to_90pct_ms: at(t90).map(|s| s.t_ms),
        time_to_steady_ms: at(steady).map(|s| s.t_ms),
        ksmd_cpu_ms_to_90pct: at(t90).map(|s| s.ksmd_cpu_ms),
        ksmd_cpu_ms_to_steady: at(steady).map(|s| s.ksmd_cpu_ms),
        full_scans_to_steady: at(steady).map(|s| s.full_scans),
        bytes_saved: last_sample.saved_pages() * PAGE as u64,
        expected_bytes_saved: target * PAGE as u64,
        nominal_bytes_saved: cfg.nominal_saved_pages(use_zero_pages, max_page_sharing)
            * PAGE as u64,
        general_profit: last.general_profit,
        process_merging_pages,
        reached_steady: steady.is_some(),
        unmerged_duplicate_pages: unmerged.as_ref().map(|u| u.0),
        unmerged_examples: unmerged.map(|u| u.1).unwrap_or_default(),
        content_unchanged,
        guests_ok,
        final_stats: last,
        settings_before: KsmSettings::default(),
        settings_after: KsmSettings::default(),
        slowdown,
        host: HostInfo::detect(),
        census,
    };
    if !result.content_unchanged {
        bail!("a page's content changed while KSM merged it");
    }
    if result.guests_ok == Some(false) {
        bail!("a fill guest did not return the model's checksum");
    }
    Ok(result)
}

// ---------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

fn opt_ms(v: Option<u64>) -> String {
    v.map_or("not reached".into(), |v| v.to_string())
}

fn opt_f(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

impl KsmResult {
    /// Markdown: a summary table, the series (at most ~20 rows) and notes.
    pub fn render_table(&self) -> String {
        let c = &self.config;
        let knob = |k: &str| self.knobs_in_effect.get(k).cloned().unwrap_or("-".into());
        let mut out = format!(
            "### Linux KSM: {} VMs x {} MiB, {:.0} % identical, {:.0} % zero ({} fill)\n\n",
            c.vms,
            c.mib_per_vm,
            c.shared_fraction * 100.0,
            c.zero_fraction * 100.0,
            match c.fill {
                FillMode::Guests => "guest",
                FillMode::Host => "host",
            }
        );
        let rows = vec![
            vec![
                "setting".into(),
                format!(
                    "{} (max_page_sharing={}, smart_scan={}, merge_across_nodes={}, advisor_mode={})",
                    self.setting.describe(),
                    knob("max_page_sharing"),
                    knob("smart_scan"),
                    knob("merge_across_nodes"),
                    knob("advisor_mode"),
                ),
            ],
            vec![
                "expected saving (content / nominal), MiB".into(),
                format!(
                    "{} / {}",
                    mib(self.expected_bytes_saved),
                    mib(self.nominal_bytes_saved)
                ),
            ],
            vec!["saved at the end, MiB".into(), mib(self.bytes_saved)],
            vec!["time to 90 %, ms".into(), opt_ms(self.time_to_90pct_ms)],
            vec!["time to 100 %, ms".into(), opt_ms(self.time_to_steady_ms)],
            vec![
                "ksmd CPU to 90 % / 100 %, ms".into(),
                format!(
                    "{} / {}",
                    opt_f(self.ksmd_cpu_ms_to_90pct),
                    opt_f(self.ksmd_cpu_ms_to_steady)
                ),
            ],
            vec![
                "full scans to 100 %".into(),
                self.full_scans_to_steady
                    .map_or("-".into(), |v| v.to_string()),
            ],
            vec![
                "general_profit, MiB".into(),
                self.general_profit.map_or("-".into(), |p| {
                    format!("{:.1}", p as f64 / (1 << 20) as f64)
                }),
            ],
            vec!["fill, ms".into(), format!("{:.0}", self.fill_ms)],
        ];
        let mut rows = rows;
        if let Some(s) = &self.slowdown {
            rows.push(vec![
                format!(
                    "sweep guest ({} MiB, {} passes), KSM off / on, ms",
                    s.config.mib, s.config.passes
                ),
                format!(
                    "{} / {} (x{:.2})",
                    s.ksm_off_ms.show(0),
                    s.ksm_on_ms.show(0),
                    s.ratio
                ),
            ]);
        }
        out += &markdown_table(&["KSM", "value"], &rows);
        out += "\n";
        let step = self.series.len().div_ceil(20).max(1);
        let rows: Vec<Vec<String>> = self
            .series
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == self.series.len())
            .map(|(_, s)| {
                vec![
                    s.t_ms.to_string(),
                    s.pages_sharing.to_string(),
                    s.pages_shared.to_string(),
                    s.ksm_zero_pages.to_string(),
                    s.full_scans.to_string(),
                    format!("{:.0}", s.ksmd_cpu_ms),
                ]
            })
            .collect();
        out += &markdown_table(
            &[
                "t, ms",
                "pages_sharing",
                "pages_shared",
                "ksm_zero_pages",
                "full_scans",
                "ksmd CPU, ms",
            ],
            &rows,
        );
        out += &format!(
            "\nksmd CPU from {}; {}. Expected saving from the {} resident pages \
             ({} duplicate groups); KSM settings restored after the run.\n",
            self.ksmd_cpu_source,
            self.host.describe(),
            self.census.resident_pages,
            self.census.duplicate_groups
        );
        if let Some(n) = self.unmerged_duplicate_pages {
            out += &format!(
                "Not reached within {:?}: {n} pages of duplicate content left unmerged{}{}.\n",
                c.timeout,
                if self.unmerged_examples.is_empty() {
                    ""
                } else {
                    ", e.g. "
                },
                self.unmerged_examples.join("; ")
            );
        }
        out
    }
}

/// Markdown table of several settings' results (e.g. from
/// [`compare_settings`]).
pub fn render_comparison(results: &[KsmResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.setting.describe(),
                opt_ms(r.time_to_90pct_ms),
                opt_ms(r.time_to_steady_ms),
                opt_f(r.ksmd_cpu_ms_to_steady),
                r.full_scans_to_steady.map_or("-".into(), |v| v.to_string()),
                format!("{} / {}", mib(r.bytes_saved), mib(r.expected_bytes_saved)),
            ]
        })
        .collect();
    markdown_table(
        &[
            "KSM setting",
            "to 90 %, ms",
            "to 100 %, ms",
            "ksmd CPU to 100 %, ms",
            "full scans",
            "saved / expected, MiB",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake KSM directory of plain files.
    fn fake(name: &str) -> (Ksm, PathBuf) {
        let root =
            std::env::temp_dir().join(format!("disco-ksm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("ksm");
        std::fs::create_dir_all(&dir).unwrap();
        for (k, v) in [
            ("run", "0"),
            ("pages_to_scan", "100"),
            ("sleep_millisecs", "20"),
            ("use_zero_pages", "0"),
            ("max_page_sharing", "256"),
            ("advisor_mode", "[none] scan-time"),
            ("pages_sharing", "0"),
        ] {
            std::fs::write(dir.join(k), format!("{v}\n")).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("pages_sharing"),
            std::fs::Permissions::from_mode(0o444),
        )
        .unwrap();
        (Ksm::at(&dir, &root), root)
    }

    #[test]
    fn selections_and_numbers_normalise() {
        assert_eq!(normalise("[none] scan-time\n"), "none");
        assert_eq!(normalise("none [scan-time]"), "scan-time");
        assert_eq!(normalise(" 100\n"), "100");
    }

    #[test]
    fn stat_ticks_parse_after_the_command() {
        let line = "37 (ks md) S 2 0 0 0 -1 2097216 0 0 0 0 11 22 0 0 25 5 1 0 26";
        assert_eq!(parse_stat_ticks(line), Some(33));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn snapshot_covers_writable_knobs_only() {
        let (ksm, root) = fake("snapshot");
        let s = ksm.settings().unwrap();
        assert_eq!(s.get("advisor_mode"), Some("none"));
        assert_eq!(s.get("pages_to_scan"), Some("100"));
        // root reads/writes regardless of mode bits, so the check is the mode.
        assert_eq!(s.get("pages_sharing"), None);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn guard_restores_on_drop_and_on_panic() {
        let (ksm, root) = fake("guard");
        let before = ksm.settings().unwrap();
        {
            let _g = ksm.guard().unwrap();
            ksm.apply(&KsmSetting::FASTEST).unwrap();
            ksm.write("run", "1").unwrap();
            assert_ne!(ksm.settings().unwrap(), before);
        }
        assert_eq!(ksm.settings().unwrap(), before);
        let k2 = ksm.clone();
        let r = std::panic::catch_unwind(move || {
            let _g = k2.guard().unwrap();
            k2.write("pages_to_scan", "5000").unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        assert_eq!(ksm.settings().unwrap(), before);
        assert!(!root.join(STATE_FILE).exists());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn stale_state_file_is_restored_first() {
        let (ksm, root) = fake("stale");
        let before = ksm.settings().unwrap();
        let mut g = ksm.guard().unwrap();
        ksm.write("sleep_millisecs", "0").unwrap();
        // As if the process had been killed: the lock goes, nothing restored.
        g.done = true;
        drop(g);
        assert!(root.join(STATE_FILE).exists());
        let g = ksm.guard().unwrap();
        assert_eq!(g.saved(), &before);
        g.restore().unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn layout_and_nominal_savings() {
        let cfg = KsmBenchConfig {
            vms: 4,
            mib_per_vm: 8,
            shared_fraction: 0.5,
            zero_fraction: 0.25,
            ..KsmBenchConfig::default()
        };
        let l = cfg.layout();
        assert_eq!(
            (l.shared_pages, l.unique_pages, l.zero_pages),
            (1024, 512, 512)
        );
        // 1024 groups of 4 save 3 each; 2048 zero pages in chains of 256.
        assert_eq!(cfg.nominal_saved_pages(false, 256), 1024 * 3 + 2048 - 8);
        assert_eq!(cfg.nominal_saved_pages(true, 256), 1024 * 3 + 2048);
        assert!(cfg.validate().is_ok());
        let tiny = KsmBenchConfig {
            mib_per_vm: 2,
            shared_fraction: 0.1,
            ..cfg.clone()
        };
        assert!(tiny
            .validate()
            .unwrap_err()
            .to_string()
            .contains("micro-VM"));
    }

    #[test]
    fn census_counts_groups() {
        let hashes: PageHashes = vec![
            vec![Some(5), Some(6), Some(0), None],
            vec![Some(5), Some(7), Some(0), Some(0)],
            vec![Some(5), Some(8), None, None],
        ];
        let c = census(&hashes, false, 256);
        assert_eq!(c.resident_pages, 9);
        assert_eq!(c.zero_pages, 3);
        assert_eq!(c.expected_pages_shared, 2);
        assert_eq!(c.expected_pages_sharing, 2 + 2);
        let z = census(&hashes, true, 256);
        assert_eq!((z.expected_pages_sharing, z.expected_zero_pages), (2, 3));
        let chained = census(&vec![vec![Some(9); 5]], false, 2);
        assert_eq!(
            (
                chained.expected_pages_shared,
                chained.expected_pages_sharing
            ),
            (3, 2)
        );
    }
}
