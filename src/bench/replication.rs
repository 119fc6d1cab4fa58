//! Scenario kind `replication`: VMs on different nodes of an emulated NUMA
//! fixture read the same table (the `table_scan` workload with one seed:
//! identical content, which the sharing scanner merges into shared pages
//! across VMs), all of it placed on one node at start; run under each
//! policy.
//!
//! Per policy and repetition:
//! * the local-access fraction over time (the NUMA engine's samples), first
//!   and last quarter, time to the goal;
//! * replicas made / collapsed, freezes;
//! * the memory spent: replica pages beyond one copy per replica set, and
//!   the machine pages that hold the table frames of every VM (static:
//!   one private copy per VM; sharing alone: one; full replication: one per
//!   node), both taken at the write (below) and the former also at its peak;
//! * the write break: the *writer* (the VM on the last node) does fewer
//!   lookups (`writer_share` of the others') and finishes first; the moment
//!   its guest has exited, with the others still reading their replicas,
//!   the bench stores one word into every table frame of the writer through
//!   the writer's guest mapping (the same userfaultfd write-protect path a
//!   guest store takes). Each store's latency is timed; afterwards the
//!   writer must read its new word, every other VM the old page (byte for
//!   byte), `Memory::verify` must pass, and the other guests, which keep
//!   reading, must still finish with the checksums the host model predicts.
//!   A wrong content is an error, never a figure.
//!
//! Samples come from the real page-fault sampler (`sampling =
//! "page-faults"`, the default) or from a generated trace saying that every
//! VM reads every table page from its node three times an epoch (`sampling =
//! "trace"`, the engine's mechanism with perfect information). The result
//! records which.
//!
//! The run is driven here through a `Monitor`, not by `monitor::run`,
//! because the write must happen while the guests run: build the VMs,
//! start the fault handler, the VMs, the NUMA runner and the scanner,
//! `verify` every 500 ms, write, then `Monitor::finish` (checksums,
//! `verify` after the guests stopped and after teardown, no leaks).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::locality::{goal_name, policy_spec, stats_all, stats_of, SeriesSummary, GOAL_WINDOW};
use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{config_doc, config_from_doc, markdown_table_aligned, HostInfo, Stats};
use crate::config::{Config, ConfigFile, VmSpec, SHIPPED_POLICIES};
use crate::guest::layout::{DATA_ADDR, PAGE};
use crate::guest::Workload;
use crate::memory::{Memory, VmId};
use crate::monitor::Monitor;
use crate::topology::Topology;

pub const SAMPLING: &[&str] = &["page-faults", "trace"];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicationOptions {
    /// VMs; VM `i` runs on node `i % nodes`.
    pub vms: usize,
    pub memory_mib: u64,
    pub table_pages: u64,
    /// Lookups of every reader; the writer does `writer_share` of them.
    pub lookups: u64,
    pub writer_share: f64,
    /// Node whose pool holds every VM's memory at start.
    pub memory_node: usize,
    pub topology: String,
    pub policies: Vec<String>,
    pub sampling: String,
    pub reps: usize,
    pub goal: f64,
    /// Guest time limit, s.
    pub time_limit_s: u64,
}

impl ReplicationOptions {
    fn first_table_gfn() -> u64 {
        DATA_ADDR / PAGE
    }

    pub fn config(
        &self,
        policy: &str,
        seed: u64,
        trace: Option<&Path>,
        nodes: usize,
    ) -> Result<ConfigFile> {
        let sampling = if trace.is_some() {
            "trace"
        } else {
            "page-faults"
        };
        let vms = (0..self.vms)
            .map(|i| {
                let lookups = if i + 1 == self.vms {
                    ((self.lookups as f64 * self.writer_share) as u64).max(1)
                } else {
                    self.lookups
                };
                let role = if i + 1 == self.vms {
                    "writer"
                } else {
                    "reader"
                };
                let workload = Workload::TableScan {
                    seed,
                    table_pages: self.table_pages as u32,
                    lookups,
                    write_after: 0,
                };
                VmSpec {
                    name: Some(format!("{role}{i}")),
                    node: Some((i % nodes) as i64),
                    memory_node: Some(self.memory_node as i64),
                    memory_mib: Some(self.memory_mib as i64),
                    workload: Some((&workload).into()),
                    time_limit_s: Some(self.time_limit_s as f64),
                    ..VmSpec::default()
                }
            })
            .collect();
        Ok(config_doc(
            policy_spec(policy, sampling, trace)?,
            &self.topology,
            vms,
        ))
    }

    /// A trace in which every VM reads every table page from its node three
    /// times per epoch (twice would settle exactly at the shipped
    /// `hot_threshold` of 4 decayed samples and a private page would never
    /// count as hot), after `quiet` epochs without samples (the scanner merges
    /// the tables first), for `epochs` epochs.
    fn write_trace(&self, path: &Path, nodes: usize, quiet: u64, epochs: u64) -> Result<()> {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        writeln!(f, "# generated by disco bench replication\nnodes {nodes}")?;
        let first = Self::first_table_gfn();
        for epoch in quiet..epochs {
            writeln!(f, "epoch {epoch}")?;
            for vm in 0..self.vms {
                for gfn in first..first + self.table_pages {
                    let node = vm % nodes;
                    for _ in 0..3 {
                        writeln!(f, "{vm} {gfn:x} {node} r")?;
                    }
                }
            }
        }
        f.flush()?;
        Ok(())
    }
}

/// The write of one table frame by the writer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageWrite {
    pub gfn: u64,
    /// What the frame was when written: "replicated", "shared", "private".
    pub state: String,
    pub latency_us: f64,
}

/// One run of one policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicationRun {
    pub policy: String,
    pub rep: usize,
    /// "page-faults" (the real sampler) or "trace" (generated).
    pub sampling: String,
    /// The NUMA engine's source, as it describes itself.
    pub source: String,
    /// Over the epochs until the first VM finished (`first_done_ms`).
    #[serde(flatten)]
    pub summary: SeriesSummary,
    /// `(ms, local fraction)` of every epoch with samples, to the end.
    pub full_local_series: Vec<(f64, f64)>,
    /// ms since the start when the first VM (normally the writer) finished.
    pub first_done_ms: f64,
    pub epochs: u64,
    pub samples: u64,
    pub migrations: u64,
    pub replicas_made: u64,
    pub replicas_collapsed: u64,
    pub replication_failures: u64,
    pub freezes: u64,
    /// ms since the start when the writer wrote.
    pub write_at_ms: f64,
    /// Replica sets and the pages beyond one copy per set, at the write.
    pub replica_sets_at_write: u64,
    pub extra_replica_pages_at_write: u64,
    /// The most pages beyond one copy per set seen during the run.
    pub extra_replica_pages_peak: u64,
    /// Distinct machine pages mapped by the table frames of every VM, at
    /// the write.
    pub table_machine_pages_at_write: u64,
    /// Table frames (all VMs) on their VM's node, at the write.
    pub table_local_at_write: f64,
    pub writes: Vec<PageWrite>,
    /// Writes that took the writer's own replica out of its set (it was
    /// the copy's only owner; `Memory::replica_stats().write_breaks`).
    pub replica_write_breaks: u64,
    /// Writes to a shared or replicated frame after which the writer's
    /// frame was private (checked for every such write): copy-on-write
    /// breaks, replicas leaving their set included.
    pub cow_breaks: u64,
    /// Other VMs' table frames that mapped a page on their own node before
    /// the write and another node's after it (should be 0).
    pub others_moved_by_write: u64,
    /// Pages compared after the write (writer and others).
    pub pages_checked: u64,
    pub guest_run_ms: f64,
    pub verify_runs: u32,
}

impl ReplicationRun {
    fn latencies(&self) -> Vec<f64> {
        self.writes.iter().map(|w| w.latency_us).collect()
    }
    fn count(&self, state: &str) -> usize {
        self.writes.iter().filter(|w| w.state == state).count()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicationResult {
    pub host: HostInfo,
    pub seed: u64,
    pub options: ReplicationOptions,
    pub runs: Vec<ReplicationRun>,
}

/// A guest space and its VM; torn down (stopped, joined, space destroyed)
/// on drop if the run did not finish it.
/// A VM of the run as the write phase sees it: its guest space, its
/// vCPU's node and where its guest RAM is mapped.
struct Vm {
    space: VmId,
    node: usize,
    base: usize,
}

fn table_machine_pages(memory: &Memory, vms: &[Vm], gfns: &[u64]) -> (u64, f64) {
    let mut pages = std::collections::BTreeSet::new();
    let (mut local, mut all) = (0u64, 0u64);
    for v in vms {
        for &gfn in gfns {
            if let Ok(Some(e)) = memory.lookup(v.space, gfn) {
                pages.insert(e.page);
                all += 1;
                local += (e.page.node() == v.node) as u64;
            }
        }
    }
    (pages.len() as u64, local as f64 / all.max(1) as f64)
}

fn run_policy(
    o: &ReplicationOptions,
    policy: &str,
    seed: u64,
    rep: usize,
    topology: &Topology,
) -> Result<ReplicationRun> {
    let nodes = topology.node_count();
    let trace_dir = std::env::temp_dir().join(format!(
        "disco-bench-replication-{}-{seed}-{rep}",
        std::process::id()
    ));
    let trace: Option<PathBuf> = if o.sampling == "trace" {
        std::fs::create_dir_all(&trace_dir)?;
        let path = trace_dir.join("table.trace");
        // Long enough for the run: the time limit in 100 ms epochs at most.
        let epochs = (o.time_limit_s * 10).clamp(50, 3000);
        o.write_trace(&path, nodes, 10, epochs)?;
        Some(path)
    } else {
        None
    };
    let result = run_policy_in(o, policy, seed, rep, topology, trace.as_deref());
    if trace.is_some() {
        std::fs::remove_dir_all(&trace_dir).ok();
    }
    result
}

fn run_policy_in(
    o: &ReplicationOptions,
    policy: &str,
    seed: u64,
    rep: usize,
    topology: &Topology,
    trace: Option<&Path>,
) -> Result<ReplicationRun> {
    let nodes = topology.node_count();
    let doc = o.config(policy, seed, trace, nodes)?;
    let config: Config = config_from_doc(doc)?;
    // The monitor plans the policy's sample source (the page sampler, or
    // the trace the config names) before any VM exists.
    let mut monitor = Monitor::for_config(&config, Duration::from_millis(500))?;
    monitor.reserve_for(&config.vms)?;
    for vc in &config.vms {
        monitor.create_vm(vc)?;
    }
    monitor.memory().verify().context("before the start")?;
    monitor.start_fault_handler()?;
    for i in 0..config.vms.len() {
        monitor.start_vm(i).map_err(|e| anyhow::anyhow!(e))?;
    }
    let started = Instant::now();
    monitor.start_services(o.vms)?;
    let memory = monitor.memory().clone();
    let vms: Vec<Vm> = config
        .vms
        .iter()
        .map(|vc| {
            let (space, base) = monitor.space_of(&vc.name).context("a VM built")?;
            Ok(Vm {
                space,
                node: vc.vcpu_nodes[0],
                base: base.context("a micro-VM")?,
            })
        })
        .collect::<Result<_>>()?;
    let first = ReplicationOptions::first_table_gfn();
    let gfns: Vec<u64> = (first..first + o.table_pages).collect();
    let writer = o.vms - 1;
    let mut written: Option<WriteOutcome> = None;
    let mut first_done_ms: Option<f64> = None;
    let mut peak = 0u64;
    let mut verify_runs = 0u32;
    let mut last_verify = Instant::now();
    let deadline = started + Duration::from_secs(o.time_limit_s + 30);
    loop {
        // Tells the sampler about new vCPU threads.
        monitor.tick();
        let r = memory.replica_stats();
        peak = peak.max(r.pages - r.sets);
        let finished: Vec<bool> = config
            .vms
            .iter()
            .map(|vc| monitor.has_exited(&vc.name))
            .collect();
        if first_done_ms.is_none() && finished.iter().any(|&f| f) {
            first_done_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        }
        if written.is_none() && finished[writer] {
            if finished.iter().all(|&f| f) {
                bail!(
                    "policy {policy}: every reader finished with the writer, so the write \
                     would not happen under running readers; raise `lookups` or lower `writer_share`"
                );
            }
            written = Some(write_phase(&memory, &vms, writer, &gfns, started)?);
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        if last_verify.elapsed() >= Duration::from_millis(500) {
            memory.verify().context("while the guests ran")?;
            verify_runs += 1;
            last_verify = Instant::now();
        }
        ensure!(
            Instant::now() < deadline,
            "policy {policy}: the guests did not finish in time"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // The monitor ends as a run does: NUMA runner stopped, every guest
    // collected, scanner stopped (no final passes: a zero limit), memory
    // checked after the guests stopped and after teardown (every pool
    // empty, or the report says what leaked).
    let report = monitor.finish(Some(Duration::ZERO), &indicatif::ProgressBar::hidden(), 0.0)?;
    let mut numa = report.numa.clone().context("the NUMA runner ran")?;
    // The figures cover the run while every VM ran (up to the write, as
    // the writer normally finishes first): once one is done, the samples
    // come from the others only (a static run whose local VM is the last
    // one running would look local).
    let first_done_ms = first_done_ms.unwrap_or(f64::INFINITY);
    let full_series = numa.series.clone();
    numa.series.retain(|e| e.ms <= first_done_ms);
    let mut guest_run_ms = 0f64;
    for v in &report.vms {
        guest_run_ms = guest_run_ms.max(v.run_ms);
        ensure!(
            v.status == "ok",
            "policy {policy}: {} returned a checksum the host model does not predict \
             (a guest saw wrong content): {} {:?}",
            v.name,
            v.error.as_deref().unwrap_or(""),
            v.vcpus
        );
    }
    ensure!(
        report.verify_ok,
        "policy {policy}: memory invariants: {}",
        report.verify_errors.join("; ")
    );
    verify_runs += 2;
    let w = written.context("the writer never finished")?;
    Ok(ReplicationRun {
        policy: policy.to_string(),
        rep,
        sampling: o.sampling.clone(),
        source: numa.source.clone(),
        summary: SeriesSummary::of(&numa, o.goal, true)
            .with_context(|| format!("policy {policy}"))?,
        full_local_series: full_series
            .iter()
            .filter(|e| e.locality_samples > 0)
            .map(|e| (e.ms, e.local_fraction))
            .collect(),
        first_done_ms,
        epochs: numa.epochs,
        samples: numa.samples,
        migrations: numa.migrations,
        replicas_made: numa.replicas_made,
        replicas_collapsed: numa.replicas_collapsed,
        replication_failures: numa.replication_failures,
        freezes: numa.freezes,
        write_at_ms: w.at_ms,
        replica_sets_at_write: w.sets,
        extra_replica_pages_at_write: w.extra,
        extra_replica_pages_peak: peak,
        table_machine_pages_at_write: w.table_pages,
        table_local_at_write: w.table_local,
        writes: w.writes,
        replica_write_breaks: w.breaks,
        cow_breaks: w.cow_breaks,
        others_moved_by_write: w.others_moved,
        pages_checked: w.checked,
        guest_run_ms,
        verify_runs,
    })
}

struct WriteOutcome {
    at_ms: f64,
    sets: u64,
    extra: u64,
    table_pages: u64,
    table_local: f64,
    writes: Vec<PageWrite>,
    breaks: u64,
    cow_breaks: u64,
    others_moved: u64,
    checked: u64,
}

/// The writer stores the complement of the first word of every table
/// frame through its guest mapping; then every VM's content is checked.
fn write_phase(
    memory: &Memory,
    vms: &[Vm],
    writer: usize,
    gfns: &[u64],
    started: Instant,
) -> Result<WriteOutcome> {
    let at_ms = started.elapsed().as_secs_f64() * 1e3;
    let r = memory.replica_stats();
    let (table_pages, table_local) = table_machine_pages(memory, vms, gfns);
    let base = vms[writer].base;
    let others: Vec<&Vm> = vms
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != writer)
        .map(|(_, v)| v)
        .collect();
    let mut writes = Vec::new();
    let (mut others_moved, mut checked, mut cow_breaks) = (0u64, 0u64, 0u64);
    for &gfn in gfns {
        let loc = memory
            .frame_location(vms[writer].space, gfn)
            .with_context(|| format!("writer frame {gfn:#x} is not mapped"))?;
        let state = if loc.copies.len() > 1 {
            "replicated"
        } else if loc.shared {
            "shared"
        } else {
            "private"
        };
        let reference = memory.read_guest_page(vms[writer].space, gfn)?;
        let local_before: Vec<bool> = others
            .iter()
            .map(|v| memory.frame_location(v.space, gfn).map(|l| l.page.node()) == Some(v.node))
            .collect();
        let old = u64::from_le_bytes(reference[..8].try_into().expect("8 bytes"));
        let addr = base + (gfn * PAGE) as usize;
        let t = Instant::now();
        // SAFETY: `addr` is the first word of a frame of the writer's guest
        // RAM, mapped for the life of its space (alive until teardown); the
        // writer's vCPUs have exited. A protected page blocks this store
        // until the fault handler gives the frame its own copy.
        unsafe { std::ptr::write_volatile(addr as *mut u64, !old) };
        let latency_us = t.elapsed().as_secs_f64() * 1e6;
        writes.push(PageWrite {
            gfn,
            state: state.into(),
            latency_us,
        });
        if state != "private" {
            let after = memory
                .frame_location(vms[writer].space, gfn)
                .with_context(|| format!("writer frame {gfn:#x} is not mapped after its write"))?;
            ensure!(
                !after.shared,
                "the writer's frame {gfn:#x} ({state}) is still shared after its write"
            );
            cow_breaks += 1;
        }
        let mine = memory.read_guest_page(vms[writer].space, gfn)?;
        ensure!(
            mine[..8] == (!old).to_le_bytes() && mine[8..] == reference[8..],
            "the writer's frame {gfn:#x} does not hold what it wrote"
        );
        checked += 1;
        for (v, was_local) in others.iter().zip(local_before) {
            let theirs = memory.read_guest_page(v.space, gfn)?;
            ensure!(
                theirs == reference,
                "vm {} frame {gfn:#x} changed when the writer wrote its copy",
                v.space
            );
            checked += 1;
            let local_after =
                memory.frame_location(v.space, gfn).map(|l| l.page.node()) == Some(v.node);
            others_moved += (was_local && !local_after) as u64;
        }
    }
    memory.verify().context("after the writer's stores")?;
    Ok(WriteOutcome {
        at_ms,
        sets: r.sets,
        extra: r.pages - r.sets,
        table_pages,
        table_local,
        writes,
        breaks: memory.replica_stats().write_breaks - r.write_breaks,
        cow_breaks,
        others_moved,
        checked,
    })
}

pub fn run(o: &ReplicationOptions, seed: u64, progress: &Progress) -> Result<ReplicationResult> {
    let topology = load_topology(&o.topology)?;
    let bar = progress.bar((o.policies.len() * o.reps) as u64);
    let mut runs = Vec::new();
    for rep in 0..o.reps {
        for policy in &o.policies {
            bar.set_message(format!("replication: {policy}, rep {}", rep + 1));
            runs.push(
                run_policy(o, policy, seed + rep as u64, rep, &topology)
                    .with_context(|| format!("policy {policy}, rep {}", rep + 1))?,
            );
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(ReplicationResult {
        host: HostInfo::detect(),
        seed,
        options: o.clone(),
        runs,
    })
}

fn load_topology(name: &str) -> Result<Topology> {
    Topology::from_fixture_name(name).or_else(|_| Topology::from_xml_file(Path::new(name)))
}

struct ReplicationScenario(ReplicationOptions);

/// Keys: see the module doc and `benches/scenarios/replication.toml`.
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let all: Vec<&str> = SHIPPED_POLICIES.iter().map(|(n, _)| *n).collect();
    let o = ReplicationOptions {
        vms: p.usize("vms", 2, 64, 4)?,
        memory_mib: p.u64("memory_mib", 2, 1024, 4)?,
        table_pages: p.u64("table_pages", 1, 1 << 16, if p.quick() { 32 } else { 128 })?,
        lookups: p.u64(
            "lookups",
            1,
            1 << 40,
            if p.quick() {
                300_000_000
            } else {
                1_200_000_000
            },
        )?,
        writer_share: p.f64("writer_share", 0.05, 0.95, 0.5)?,
        memory_node: p.usize("memory_node", 0, 4095, 0)?,
        topology: p.topology("topology", "4-node")?,
        policies: p.policies("policies", &all)?,
        sampling: p.choice("sampling", SAMPLING, "page-faults")?,
        reps: p.usize("reps", 1, 100, 1)?,
        goal: p.f64("goal", 0.01, 1.0, 0.9)?,
        time_limit_s: p.u64("time_limit_s", 1, 3600, 300)?,
    };
    if o.topology == "host" {
        return Err(p.error(
            "topology",
            "`host` has one NUMA node here; allowed: a fixture (4-node, 8-node) or an hwloc XML file"
                .into(),
        ));
    }
    let topology = load_topology(&o.topology)
        .map_err(|e| p.error("topology", format!("cannot load it: {e:#}")))?;
    if o.memory_node >= topology.node_count() {
        return Err(p.error(
            "memory_node",
            format!(
                "{} is not a node of {}; allowed: 0 to {}",
                o.memory_node,
                o.topology,
                topology.node_count() - 1
            ),
        ));
    }
    for policy in &o.policies {
        let doc = o
            .config(policy, 1, None, topology.node_count())
            .map_err(|e| super::blame_config_error(p, &e, policy, "policies", "table_pages"))?;
        config_from_doc(doc)
            .map_err(|e| super::blame_config_error(p, &e, policy, "policies", "table_pages"))?;
    }
    Ok(Box::new(ReplicationScenario(o)))
}

impl Scenario for ReplicationScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        Ok(Box::new(run(&self.0, seed, progress)?))
    }
    fn policies(&self) -> Vec<String> {
        self.0.policies.clone()
    }
}

impl ScenarioResult for ReplicationResult {
    fn figures(&self) -> Vec<Figure> {
        let goal = goal_name(self.options.goal);
        let mut out = Vec::new();
        for policy in &self.options.policies {
            let runs: Vec<&ReplicationRun> =
                self.runs.iter().filter(|r| &r.policy == policy).collect();
            let s = |f: fn(&ReplicationRun) -> f64| stats_of(&runs, f);
            let fig = |name: &str, unit: &str, better: Better, stats: Stats| {
                Figure::new(&format!("{policy}: {name}"), unit, better, stats)
            };
            out.push(fig(
                "local fraction, first quarter",
                "fraction",
                Better::Neither,
                s(|r| r.summary.local_first),
            ));
            out.push(
                fig(
                    "local fraction, last quarter",
                    "fraction",
                    Better::Higher,
                    s(|r| r.summary.local_last),
                )
                .headline(),
            );
            out.push(Figure {
                stats: stats_all(&runs, |r| r.summary.time_to_goal_ms),
                ..Figure::value(
                    &format!("{policy}: time to {goal} local"),
                    "ms",
                    Better::Lower,
                    0.0,
                )
            });
            out.push(fig(
                "replicas made",
                "pages",
                Better::Neither,
                s(|r| r.replicas_made as f64),
            ));
            out.push(fig(
                "replicas collapsed",
                "pages",
                Better::Neither,
                s(|r| r.replicas_collapsed as f64),
            ));
            out.push(fig(
                "freezes",
                "pages",
                Better::Neither,
                s(|r| r.freezes as f64),
            ));
            out.push(fig(
                "extra replica pages at the write",
                "pages",
                Better::Neither,
                s(|r| r.extra_replica_pages_at_write as f64),
            ));
            out.push(fig(
                "extra replica pages, peak",
                "pages",
                Better::Neither,
                s(|r| r.extra_replica_pages_peak as f64),
            ));
            out.push(fig(
                "machine pages holding the table at the write",
                "pages",
                Better::Neither,
                s(|r| r.table_machine_pages_at_write as f64),
            ));
            out.push(fig(
                "table frames local at the write",
                "fraction",
                Better::Higher,
                s(|r| r.table_local_at_write),
            ));
            out.push(fig(
                "write: replicated pages written",
                "pages",
                Better::Neither,
                s(|r| r.count("replicated") as f64),
            ));
            out.push(fig(
                "write: copy-on-write breaks",
                "breaks",
                Better::Neither,
                s(|r| r.cow_breaks as f64),
            ));
            out.push(fig(
                "write: replicas leaving their set",
                "pages",
                Better::Neither,
                s(|r| r.replica_write_breaks as f64),
            ));
            let lat: Vec<f64> = runs.iter().flat_map(|r| r.latencies()).collect();
            out.push(fig(
                "write latency per page",
                "us",
                Better::Lower,
                Stats::of(&lat),
            ));
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let o = &self.options;
        let mut plot = LinePlot::new(
            &format!(
                "Local accesses over time: {} VMs reading one shared {}-page table ({} fixture, samples: {})",
                o.vms, o.table_pages, o.topology, o.sampling
            ),
            "time since start (ms)",
            "local fraction of sampled accesses",
        )
        .reference_line(o.goal, &format!("goal {}", goal_name(o.goal)));
        for r in self.runs.iter().filter(|r| r.rep == 0) {
            plot = plot.series(&r.policy, r.summary.local_series.clone());
        }
        vec![Plot {
            name: "local".into(),
            title: "local fraction over time per policy".into(),
            svg: plot.render(),
        }]
    }

    fn markdown(&self) -> String {
        let o = &self.options;
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                let lat = Stats::of(&r.latencies());
                vec![
                    r.policy.clone(),
                    (r.rep + 1).to_string(),
                    format!("{:.0} %", 100.0 * r.summary.local_first),
                    format!("{:.0} %", 100.0 * r.summary.local_last),
                    r.summary
                        .time_to_goal_ms
                        .map_or("not reached".into(), |t| format!("{t:.0}")),
                    format!("{} / {}", r.replicas_made, r.replicas_collapsed),
                    r.freezes.to_string(),
                    format!(
                        "{} ({} peak)",
                        r.extra_replica_pages_at_write, r.extra_replica_pages_peak
                    ),
                    r.table_machine_pages_at_write.to_string(),
                    format!("{:.0} %", 100.0 * r.table_local_at_write),
                    format!(
                        "{}/{}/{}",
                        r.count("replicated"),
                        r.count("shared"),
                        r.count("private")
                    ),
                    format!("{} ({})", r.cow_breaks, r.replica_write_breaks),
                    format!("{:.1} ({:.1}-{:.1})", lat.median, lat.min, lat.max),
                    format!("{:.0}", r.write_at_ms),
                    format!("{:.0}", r.guest_run_ms),
                ]
            })
            .collect();
        let sources: std::collections::BTreeSet<&str> =
            self.runs.iter().map(|r| r.source.as_str()).collect();
        format!(
            "replication: {} VMs, one per node of the {} fixture ({} MiB each, all on node {} at \
             start), each reading the same {}-page table ({} lookups; the writer, the last VM, {:.0} % \
             of them); samples: **{}**; seed {}\n\n{}\n\
             Local = sampled accesses to a page on the accessing vCPU's node, per epoch the mean of \
             the VMs' own fractions (first/last quarter of \
             the epochs with samples while every VM ran, i.e. until the writer finished, as the \
             plot's lines: later samples come from fewer VMs); time to {} = first epoch from which {} epochs together reach \
             it. Replicas made / collapsed over the run. Extra pages = replica pages beyond one copy \
             per replica set (at the write, and the peak). Table pages = distinct machine pages \
             mapped by every VM's table frames at the write. Writes: the writer's table frames by \
             state at the write (replicated/shared/private), each stored into once through its \
             guest mapping after its guest exited while the others kept reading; latency in us, \
             median (min-max); every other VM's page was compared byte for byte after each store \
             and every guest's checksum matched the host model. Sample source: {}. {}\n",
            o.vms,
            o.topology,
            o.memory_mib,
            o.memory_node,
            o.table_pages,
            o.lookups,
            100.0 * o.writer_share,
            o.sampling,
            self.seed,
            markdown_table_aligned(
                &[
                    "policy",
                    "rep",
                    "local (first)",
                    "local (last)",
                    &format!("ms to {}", goal_name(o.goal)),
                    "replicas made / collapsed",
                    "frozen",
                    "extra pages",
                    "table pages",
                    "table local",
                    "writes r/s/p",
                    "COW breaks (replicas leaving)",
                    "write us",
                    "write at ms",
                    "guest ms"
                ],
                1,
                &rows
            ),
            goal_name(o.goal),
            GOAL_WINDOW,
            sources.into_iter().collect::<Vec<_>>().join("; "),
            self.host.describe()
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
