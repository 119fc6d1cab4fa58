//! Whether the host has a CPU to spare: when none is idle, every
//! millisecond a monitor thread runs is a millisecond some vCPU waits for.
//! The sharing scanner (`sharing::cpu_share`) and the sampling cap
//! (`numa::cap`, which charges the sampler's zapping to the VMs only then)
//! both ask.
//!
//! Monitor threads also choose their priority against the vCPUs' here
//! ([`set_thread_nice`]): below them for background work (the scanner),
//! above them for work a vCPU waits on (the fault handler).
//!
//! The answer comes from the host's idle time in `/proc/stat`, looked at
//! every [`LOOK`]; the asking thread's own CPU time counts as idle, since
//! without it that time would have been.

use std::time::{Duration, Instant};

/// How often the host's idle time is looked at.
const LOOK: Duration = Duration::from_millis(200);
/// A host is busy when less than this many CPUs would be idle without the
/// asking thread.
const SPARE_CPUS: f64 = 0.5;

/// Sets the calling thread's nice level (raising priority needs root or
/// CAP_SYS_NICE; without, the thread keeps its level). `who` names the
/// thread in the debug log.
pub fn set_thread_nice(level: i32, who: &str) {
    // SAFETY: setpriority on the calling thread (tid 0 = caller) has no
    // memory-safety preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, level) } != 0 {
        tracing::debug!(
            "{who}: setpriority({level}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Aggregate CPU times of the host, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTimes {
    idle: u64,
    total: u64,
}

/// Reads the first line of `/proc/stat` (`cpu  user nice system idle
/// iowait irq softirq steal ...`); `None` if it cannot be read.
fn read_cpu_times() -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 5 {
        return None;
    }
    Some(CpuTimes {
        idle: fields[3] + fields[4],
        total: fields.iter().sum(),
    })
}

/// One thread's view of the host's load.
pub struct HostLoad {
    cpus: f64,
    last_times: Option<CpuTimes>,
    last_look: Instant,
    /// The asking thread's CPU time at the last look, ms.
    cpu_at_look_ms: f64,
    busy: bool,
}

impl HostLoad {
    /// `cpu_ms`: the asking thread's CPU time now. Not busy until the
    /// first look.
    pub fn new(cpu_ms: f64) -> HostLoad {
        HostLoad {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            last_times: read_cpu_times(),
            last_look: Instant::now(),
            cpu_at_look_ms: cpu_ms,
            busy: false,
        }
    }

    /// The host's CPUs.
    pub fn cpus(&self) -> f64 {
        self.cpus
    }

    /// Whether less than half a CPU would have been idle without the
    /// asking thread (whose CPU time is `cpu_ms` now) since the last look;
    /// looks again when [`LOOK`] has passed.
    pub fn busy(&mut self, cpu_ms: f64) -> bool {
        let now = Instant::now();
        if now - self.last_look >= LOOK {
            if let (Some(before), Some(after)) = (self.last_times, read_cpu_times()) {
                let total = after.total.saturating_sub(before.total);
                if total > 0 {
                    let idle = after.idle.saturating_sub(before.idle) as f64 / total as f64;
                    let wall_ms = (now - self.last_look).as_secs_f64() * 1e3;
                    let mine = (cpu_ms - self.cpu_at_look_ms) / wall_ms;
                    self.busy = idle * self.cpus + mine < SPARE_CPUS;
                }
                self.last_times = Some(after);
            }
            self.last_look = now;
            self.cpu_at_look_ms = cpu_ms;
        }
        self.busy
    }

    /// A host seen as busy until `LOOK` has passed (for tests).
    #[cfg(test)]
    pub fn assume_busy(&mut self) {
        self.busy = true;
        self.last_look = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read() {
        let t = read_cpu_times().expect("/proc/stat");
        assert!(t.total >= t.idle && t.total > 0);
    }

    #[test]
    fn not_busy_before_the_first_look() {
        let mut load = HostLoad::new(0.0);
        assert!(!load.busy(1000.0));
        load.assume_busy();
        assert!(load.busy(1000.0));
    }
}
