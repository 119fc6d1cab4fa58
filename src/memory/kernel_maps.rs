//! The process's kernel memory mappings (VMAs), watched over a run.
//!
//! Every remap of guest memory can split a mapping, and the kernel caps a
//! process at `vm.max_map_count` of them; each costs kernel memory and
//! makes every `/proc/self/maps` read (`Memory::verify`) longer. The
//! monitor samples the count while guests run and reports the peak and the
//! count at the end, so a policy that fragments guest memory shows.

use std::io::Read;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Mappings of the calling process: the lines of `/proc/self/maps`,
/// counted in 64 KiB reads (about 10 ms per 100,000 mappings here).
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

/// Kernel mappings of the monitor process over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct KernelMappings {
    /// Most mappings seen in one sample (sampled about once a second while
    /// the guests run, and at the end).
    pub peak: u64,
    /// Mappings when the run ended, before its guest spaces were torn down.
    pub end: u64,
    /// Guest frames of the run, for scale (one mapping per 16 frames is
    /// the design bound).
    pub guest_frames: u64,
}

/// Samples the mapping count, at most once per `every`.
pub struct MapWatch {
    every: Duration,
    last: Option<Instant>,
    peak: u64,
}

impl MapWatch {
    pub fn new(every: Duration) -> MapWatch {
        MapWatch {
            every,
            last: None,
            peak: 0,
        }
    }

    /// Takes a sample if the last one is older than `every`.
    pub fn sample(&mut self) {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        if let Ok(n) = process_map_count() {
            self.peak = self.peak.max(n);
        }
    }

    /// The figures of the run, with a last sample now.
    pub fn finish(mut self, guest_frames: u64) -> KernelMappings {
        let end = process_map_count().unwrap_or(0);
        self.peak = self.peak.max(end);
        KernelMappings {
            peak: self.peak,
            end,
            guest_frames,
        }
    }
}
