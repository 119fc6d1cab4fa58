//! The NUMA engine at work inside a run: a thread that, every epoch, polls
//! the counter source, feeds the samples to the [`PolicyEngine`], answers
//! its questions from the pmap, carries out its decisions through the
//! mapper, and records locality figures over time.
//!
//! Mechanisms: `Migrate` moves a private page with `Memory::move_page`
//! (safe under running guests). Replication and collapse of replicas have
//! no mapper mechanism yet: such decisions are counted as skipped and the
//! report says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::{AccessSample, CounterSource, Decision, PageFacts, PageLocation, PolicyEngine};
use crate::config::NumaPolicy;
use crate::memory::Memory;
use crate::topology::Topology;

/// Locality of one epoch's samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochLocality {
    pub epoch: u64,
    pub ms: f64,
    pub samples: u64,
    /// Fraction of samples whose page was on the accessing vCPU's node.
    pub local_fraction: f64,
    /// Mean modelled access cost: distance(accessing node, page node) / 10
    /// (1.0 = all local), from the topology's distance matrix.
    pub modelled_cost: f64,
}

/// What the NUMA engine did in a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NumaStats {
    /// The counter source and why it is the one in use.
    pub source: String,
    pub epochs: u64,
    pub samples: u64,
    pub migrations: u64,
    pub migration_failures: u64,
    /// Replicate / collapse decisions not carried out (no mechanism yet).
    pub replications_skipped: u64,
    pub collapses_skipped: u64,
    pub freezes: u64,
    /// Per VM (monitor space id order): samples and local samples.
    pub per_vm: Vec<(u64, u64)>,
    pub series: Vec<EpochLocality>,
}

struct MemoryFacts<'a>(&'a Memory);

impl PageFacts for MemoryFacts<'_> {
    fn location(&self, vm: u32, gfn: u64) -> Option<PageLocation> {
        let entry = self.0.lookup(vm, gfn).ok().flatten()?;
        Some(if entry.flags.shared {
            PageLocation::shared(entry.page.node())
        } else {
            PageLocation::private(entry.page.node())
        })
    }
}

pub struct NumaRunner {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<NumaStats>>,
    thread: Option<JoinHandle<()>>,
}

impl NumaRunner {
    pub fn start(
        memory: Arc<Memory>,
        topology: &Topology,
        policy: NumaPolicy,
        mut source: Box<dyn CounterSource>,
        vms: usize,
    ) -> std::io::Result<NumaRunner> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(NumaStats {
            source: source.describe(),
            per_vm: vec![(0, 0); vms],
            ..NumaStats::default()
        }));
        let distances = topology.distances.clone();
        let nodes = topology.node_count();
        let (flag, out) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("disco-numa".into())
            .spawn(move || {
                let epoch = Duration::from_millis(policy.epoch_ms);
                let mut engine = PolicyEngine::new(policy, nodes);
                let started = Instant::now();
                let mut samples: Vec<AccessSample> = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    let tick = Instant::now();
                    samples.clear();
                    if let Err(e) = source.poll(&mut samples) {
                        tracing::warn!("NUMA counter source: {e:#}");
                    }
                    let mut epoch_stats = EpochLocality {
                        ms: started.elapsed().as_secs_f64() * 1e3,
                        samples: samples.len() as u64,
                        ..EpochLocality::default()
                    };
                    let (mut local, mut cost) = (0u64, 0f64);
                    let mut s = out.lock();
                    for sample in &samples {
                        let Some(loc) = MemoryFacts(&memory).location(sample.vm, sample.gfn) else {
                            continue;
                        };
                        let is_local = loc.node == sample.node;
                        local += is_local as u64;
                        let d = distances
                            .get(sample.node)
                            .and_then(|row| row.get(loc.node))
                            .copied()
                            .unwrap_or(10);
                        cost += d as f64 / 10.0;
                        if let Some(v) = s.per_vm.get_mut(sample.vm as usize) {
                            v.0 += 1;
                            v.1 += is_local as u64;
                        }
                    }
                    drop(s);
                    if !samples.is_empty() {
                        epoch_stats.local_fraction = local as f64 / samples.len() as f64;
                        epoch_stats.modelled_cost = cost / samples.len() as f64;
                    }
                    engine.observe(&samples);
                    let decisions = engine.decide(&MemoryFacts(&memory));
                    let mut s = out.lock();
                    for d in decisions {
                        match d {
                            Decision::Migrate { vm, gfn, to } => {
                                match memory.move_page(vm, gfn, to) {
                                    Ok(_) => s.migrations += 1,
                                    Err(e) => {
                                        s.migration_failures += 1;
                                        tracing::debug!("migrating vm {vm} frame {gfn:#x}: {e:#}");
                                    }
                                }
                            }
                            Decision::Replicate { .. } => s.replications_skipped += 1,
                            Decision::Collapse { .. } => s.collapses_skipped += 1,
                            Decision::Freeze { .. } => s.freezes += 1,
                        }
                    }
                    s.epochs += 1;
                    s.samples += samples.len() as u64;
                    epoch_stats.epoch = s.epochs;
                    s.series.push(epoch_stats);
                    drop(s);
                    let spent = tick.elapsed();
                    if spent < epoch {
                        std::thread::sleep(epoch - spent);
                    }
                }
            })?;
        Ok(NumaRunner {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> NumaStats {
        self.stats.lock().clone()
    }

    pub fn stop(mut self) -> NumaStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stats()
    }
}

impl Drop for NumaRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
