//! The monitor process's memory over a run: kernel mappings, host memory
//! holding guest pages, what sharing saves, and the monitor's own memory.
//!
//! Every remap of guest memory can split a kernel mapping (VMA), and the
//! kernel caps a process at `vm.max_map_count` of them; each costs kernel
//! memory and makes every `/proc/self/maps` read (`Memory::verify`)
//! longer. The monitor samples these figures about once a second while
//! guests run (each sample reads `/proc/self/maps` and `/proc/self/status`
//! and takes the memory lock briefly: the sharing figures are kept
//! incrementally), and reports the peaks, the end and the series.

use std::io::Read;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Memory;

/// Mappings of the calling process: the lines of `/proc/self/maps`,
/// counted in 64 KiB reads.
pub fn process_map_count() -> std::io::Result<u64> {
    let mut file = std::fs::File::open("/proc/self/maps")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

impl Memory {
    /// Kernel mappings that start inside each guest space's host range,
    /// counted from one read of `/proc/self/maps` (not under the memory
    /// lock: the count is a measurement, taken between remaps).
    pub fn mappings_per_space(
        &self,
    ) -> std::io::Result<std::collections::HashMap<super::VmId, u64>> {
        let mut ranges: Vec<(usize, usize, super::VmId)> = {
            let inner = self.inner.lock();
            inner
                .spaces
                .iter()
                .map(|(&vm, s)| (s.base, s.base + s.frames() as usize * crate::PAGE_SIZE, vm))
                .collect()
        };
        ranges.sort_unstable();
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let mut counts = std::collections::HashMap::new();
        for line in maps.lines() {
            let Some(start) = line
                .split('-')
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok())
            else {
                continue;
            };
            let i = ranges.partition_point(|r| r.0 <= start);
            if let Some(&(base, end, vm)) = i.checked_sub(1).map(|i| &ranges[i]) {
                if (base..end).contains(&start) {
                    *counts.entry(vm).or_insert(0u64) += 1;
                }
            }
        }
        Ok(counts)
    }
}

/// The process's anonymous resident memory (`RssAnon` of
/// `/proc/self/status`), in bytes: the monitor's own memory (pmaps,
/// memmap, scanner tables, thread stacks), not guest RAM, which lives in
/// the pools' memfds (`RssShmem`).
pub fn monitor_anon_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Kernel mappings of the monitor process over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct KernelMappings {
    /// Most mappings seen in one sample.
    pub peak: u64,
    /// Mappings when the run ended, before its guest spaces were torn down.
    pub end: u64,
    /// Guest frames of the run, for scale (one mapping per 16 frames is
    /// the design bound).
    pub guest_frames: u64,
    /// Most anonymous memory the monitor held in one sample, bytes.
    pub monitor_anon_peak_bytes: u64,
}

/// One sample of [`MemoryWatch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MemorySample {
    /// Since the watch started, ms.
    pub t_ms: f64,
    /// Kernel mappings of the process.
    pub vmas: u64,
    /// Host memory the pools hold (resident pages of their memfds), bytes.
    pub pool_resident_bytes: u64,
    /// Machine pages sharing and released zero pages save, bytes.
    pub saved_bytes: u64,
    /// The monitor's anonymous memory, bytes.
    pub monitor_anon_bytes: u64,
}

/// Samples the process's memory at most once per `every`.
pub struct MemoryWatch {
    every: Duration,
    started: Instant,
    last: Option<Instant>,
    samples: Vec<MemorySample>,
}

/// Most samples kept: older ones are thinned (every other dropped) so a
/// long run's series stays bounded.
const MAX_SAMPLES: usize = 4096;

impl MemoryWatch {
    pub fn new(every: Duration) -> MemoryWatch {
        MemoryWatch {
            every,
            started: Instant::now(),
            last: None,
            samples: Vec::new(),
        }
    }

    /// Takes a sample if the last one is older than `every`.
    pub fn sample(&mut self, memory: &Memory) {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.take(memory);
    }

    fn take(&mut self, memory: &Memory) {
        self.last = Some(Instant::now());
        let sharing = memory.sharing_stats();
        let sample = MemorySample {
            t_ms: self.started.elapsed().as_secs_f64() * 1e3,
            vmas: process_map_count().unwrap_or(0),
            pool_resident_bytes: memory.pool_stats().iter().map(|p| p.resident_bytes).sum(),
            saved_bytes: sharing.pages_saved_in_all() * crate::PAGE_SIZE as u64,
            monitor_anon_bytes: monitor_anon_bytes(),
        };
        if self.samples.len() >= MAX_SAMPLES {
            let mut i = 0;
            self.samples.retain(|_| {
                i += 1;
                i % 2 == 0
            });
            self.every *= 2;
        }
        self.samples.push(sample);
    }

    /// The figures of the run, with a last sample now.
    pub fn finish(
        mut self,
        memory: &Memory,
        guest_frames: u64,
    ) -> (KernelMappings, Vec<MemorySample>) {
        self.take(memory);
        let end = self.samples.last().map_or(0, |s| s.vmas);
        let mappings = KernelMappings {
            peak: self.samples.iter().map(|s| s.vmas).max().unwrap_or(0),
            end,
            guest_frames,
            monitor_anon_peak_bytes: self
                .samples
                .iter()
                .map(|s| s.monitor_anon_bytes)
                .max()
                .unwrap_or(0),
        };
        (mappings, self.samples)
    }
}
