//! The scanner's share of a busy host: when no CPU is idle, every
//! millisecond the scanner runs is a millisecond some vCPU does not.
//!
//! The pace (`Pace`) bounds how many pages the scanner hashes, but not what
//! they cost the guests: on the 2-core build host a 2-vCPU guest that
//! rewrites its memory (the overhead bench's `sweep`) ran 1.17-1.30x its
//! bare-KVM time with sharing alone on, because the first full pass at the
//! pace's ceiling takes about a quarter of a CPU, all of it from the vCPUs.
//! So the scanner looks at the host's idle time (`crate::host_load`):
//! while at least half a CPU would be idle without the scanner,
//! its work costs no guest anything and only the pace applies; while less
//! is, it may use at most `share` of all CPUs' time (a bucket of CPU time
//! filled at that rate, holding at most [`BURST`] of it, charged with the
//! scanner thread's own CPU time, so merges count as well as hashing).
//!
//! Linux's ksmd has only its nice level; KSM's `pages_to_scan` is the
//! same kind of bound as the pace. Memory the host needs back (VMs waiting
//! for memory to start) is the scanner's to take whatever it costs: the
//! caller then asks for no cap.

use std::time::{Duration, Instant};

use crate::host_load::HostLoad;

/// The most CPU time the bucket holds, as a multiple of one second's
/// allowance: bounds the burst after a quiet spell.
const BURST: f64 = 0.5;

/// The bucket of CPU time the scanner may spend while the host is busy.
pub struct CpuShare {
    /// Fraction of all CPUs' time the scanner may take while none is idle
    /// (1 or more: no cap).
    share: f64,
    load: HostLoad,
    /// The scanner thread's CPU time at the last charge.
    cpu_at_charge_ms: f64,
    tokens_ms: f64,
    last_fill: Instant,
    /// Time spent waiting for the bucket, for the report.
    pub held_back: Duration,
}

impl CpuShare {
    /// A cap of `share` of the host's CPUs (1 lifts it); `cpu_ms` is
    /// the scanner thread's CPU time now.
    pub fn new(share: f64, cpu_ms: f64) -> CpuShare {
        let now = Instant::now();
        CpuShare {
            share,
            load: HostLoad::new(cpu_ms),
            cpu_at_charge_ms: cpu_ms,
            tokens_ms: 0.0,
            last_fill: now,
            held_back: Duration::ZERO,
        }
    }

    fn capacity_ms(&self) -> f64 {
        self.share * self.load.cpus() * 1e3 * BURST
    }

    /// Charges the CPU time used since the last call (`cpu_ms`: the thread's
    /// total), and says whether the scanner may work now. `uncapped`: no cap
    /// this time (guests stopped, or memory wanted back).
    pub fn may_run(&mut self, cpu_ms: f64, uncapped: bool) -> bool {
        let now = Instant::now();
        self.tokens_ms -= cpu_ms - self.cpu_at_charge_ms;
        self.cpu_at_charge_ms = cpu_ms;
        let busy = self.load.busy(cpu_ms);
        let fill = (now - self.last_fill).as_secs_f64() * 1e3;
        self.last_fill = now;
        if uncapped || self.share >= 1.0 || !busy {
            // Not capped now; a busy spell starts with a full bucket.
            self.tokens_ms = self.capacity_ms();
            return true;
        }
        self.tokens_ms =
            (self.tokens_ms + fill * self.share * self.load.cpus()).min(self.capacity_ms());
        if self.tokens_ms > 0.0 {
            true
        } else {
            self.held_back += Duration::from_secs_f64(fill / 1e3);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_host_does_not_cap() {
        let mut c = CpuShare::new(0.01, 0.0);
        // Not busy before the first look: the bucket is full and stays so.
        assert!(c.may_run(0.0, false));
        assert!(c.may_run(1000.0, false));
    }

    #[test]
    fn a_busy_host_caps_at_the_share() {
        let mut c = CpuShare::new(0.01, 0.0);
        c.load.assume_busy(); // no look in this test
        c.tokens_ms = 1.0;
        assert!(c.may_run(0.5, false));
        // 5 ms of CPU used against about 0.5 ms left: held back.
        assert!(!c.may_run(5.5, false));
        // Uncapped runs whatever the bucket says.
        assert!(c.may_run(5.5, true));
    }
}
