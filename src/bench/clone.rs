//! The clone scenario: K micro-VMs cloned from one snapshot
//! (`Monitor::clone_vms`), each running, against Firecracker's published
//! snapshot restore (about 5-8 ms per microVM).
//!
//! One origin VM of `memory_mib` runs `table_scan` with a table that fills
//! its RAM (vCPU 0 writes the table, then reads it): it is snapshotted
//! (and stopped) once the table is written and the reads are under way, so
//! the snapshot holds about `memory_mib` of distinct pages and every clone
//! goes on reading it, writing almost nothing (its stack and progress
//! counter). Measured:
//!
//! * clones started per second, and ms per clone: one `clone_vms` call
//!   (file read and checked, pages loaded once, K guest spaces mapped
//!   shared, K KVM VMs made and started); a single `restore_vm` of the same
//!   file for comparison;
//! * new host memory per clone before it writes: the pools' resident bytes
//!   (memfd pages really held, `fstat` blocks) right after the clones
//!   started, less one copy of the image and less the pages copy-on-write
//!   had already copied, over K; the pool pages handed out (fresh frames
//!   the image left out count there but hold no memory until written);
//!   `RssShmem`, the monitor's own `RssAnon` (pmaps, memmap, VM
//!   structures) and the page tables (`VmPTE`: write-protect markers) per
//!   clone, and their sum with the pool's as the headline;
//! * once every clone finished (checksums checked against the host model,
//!   `Memory::verify` after): copy-on-write breaks per clone and the
//!   pools' resident bytes, sampled over time for the plot.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::params::{ParamResult, Params};
use super::procmem::ProcessMem;
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{config_from_toml, markdown_table, HostInfo};
use crate::monitor::{AfterSnapshot, Monitor, RestoreOptions};
use crate::vm::VcpuOutcome;

/// Firecracker's published snapshot restore time per microVM, ms (the
/// upper end of its 5-8 ms).
pub const FIRECRACKER_RESTORE_MS: f64 = 8.0;

struct CloneScenario {
    clones: usize,
    memory_mib: u64,
    lookups: u64,
    policy: String,
    topology: String,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct CloneResult {
    pub host: HostInfo,
    pub clones: usize,
    pub memory_mib: u64,
    /// The origin's table reads: the scenario's `lookups`, times four for
    /// each time the origin finished before its snapshot.
    pub lookups: u64,
    pub policy: String,
    pub topology: String,
    /// Machine pages in the snapshot (each once), its size in bytes.
    pub snapshot_pages: u64,
    pub snapshot_bytes: u64,
    /// Writing the snapshot (VM paused meanwhile).
    pub snapshot_ms: f64,
    /// One `restore_vm` of the file (then removed).
    pub restore_one_ms: f64,
    /// The `clone_vms` call for all K clones.
    pub clone_all_ms: f64,
    pub clones_per_s: f64,
    pub ms_per_clone: f64,
    /// Per clone, right after they all started, KiB: pool memory beyond
    /// one copy of the image and the copy-on-write copies made so far.
    pub new_pool_kib_per_clone: f64,
    /// Pool pages handed out per clone beyond the image (fresh frames the
    /// image left out, holes until written), KiB.
    pub pool_pages_kib_per_clone: f64,
    /// `RssShmem` growth per clone beyond one copy (includes any copy-on-
    /// write copies and page-table mappings of shared pages).
    pub rss_shmem_kib_per_clone: f64,
    /// The monitor's `RssAnon` growth per clone (pmap, memmap, VM).
    pub monitor_anon_kib_per_clone: f64,
    /// The process's page tables (`VmPTE`) growth per clone: the
    /// userfaultfd write-protect markers of a clone's shared pages live in
    /// page-table entries, 8 bytes a frame.
    pub page_tables_kib_per_clone: f64,
    /// Everything above that is new host memory, per clone, before it
    /// writes: pool memory beyond one copy and the copy-on-write copies,
    /// the monitor's `RssAnon`, page tables. (Not counted: KVM's own
    /// kernel structures, which `/proc/self/status` does not show.)
    pub all_new_kib_per_clone: f64,
    pub cow_breaks_at_start: u64,
    pub cow_breaks_per_clone_at_end: f64,
    /// Pools' resident memory once all finished, MiB (one copy + breaks).
    pub pool_resident_end_mib: f64,
    /// Until every clone finished, from the clone call.
    pub all_finished_ms: f64,
    /// (ms since the clone call, pools' resident MiB).
    pub memory_over_time: Vec<(f64, f64)>,
}

pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let quick = p.quick();
    let s = CloneScenario {
        clones: p.usize("clones", 1, 1024, if quick { 8 } else { 100 })?,
        memory_mib: p.u64("memory_mib", 4, 4096, if quick { 64 } else { 256 })?,
        lookups: p.u64("lookups", 1000, 1 << 32, 2_000_000)?,
        policy: p.policy("policy", "static")?,
        topology: p.topology("topology", "host")?,
    };
    config_from_toml(&s.config_text(1))
        .map_err(|e| super::blame_config_error(p, &e, &s.policy, "policy", "memory_mib"))?;
    Ok(Box::new(s))
}

impl CloneScenario {
    fn table_pages(&self) -> u64 {
        // The first MiB is the micro-guest's system area; the table takes
        // the rest.
        (self.memory_mib - 1) * 256
    }

    fn config_text(&self, seed: u64) -> String {
        self.config_text_with(seed, self.lookups)
    }

    fn config_text_with(&self, seed: u64, lookups: u64) -> String {
        format!(
            "policy = \"{}\"\n[host]\ntopology = \"{}\"\n[[vm]]\nname = \"origin\"\nvcpus = 1\n\
             memory_mib = {}\ntime_limit_s = 3600\nworkload = {{ kind = \"table_scan\", seed = {seed}, \
             table_pages = {}, lookups = {} }}\n",
            self.policy,
            self.topology,
            self.memory_mib,
            self.table_pages(),
            lookups
        )
    }
}

fn pool_resident(m: &Monitor) -> u64 {
    m.memory()
        .pool_stats()
        .iter()
        .map(|p| p.resident_bytes)
        .sum()
}

fn pool_used(m: &Monitor) -> u64 {
    m.memory()
        .pool_stats()
        .iter()
        .map(|p| p.used_pages as u64)
        .sum()
}

fn checked(report: &crate::report::VmReport) -> Result<()> {
    for v in &report.vcpus {
        match &v.outcome {
            VcpuOutcome::Done {
                result,
                expected: Some(e),
            } if result == e => {}
            other => bail!("{} vCPU {}: {other:?}", report.name, v.index),
        }
    }
    Ok(())
}

impl Scenario for CloneScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let config = config_from_toml(&self.config_text(seed))?;
        let mut m = Monitor::for_config(&config, Duration::from_secs(3600))?;
        m.start_services(self.clones + 1)?;
        let dir = std::env::temp_dir().join(format!("disco-bench-clone-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("origin.snap");
        let result = self.measure(&mut m, seed, &path, progress);
        let _ = std::fs::remove_dir_all(&dir);
        result.map(|r| Box::new(r) as Box<dyn ScenarioResult>)
    }

    fn policies(&self) -> Vec<String> {
        vec![self.policy.clone()]
    }
}

impl CloneScenario {
    /// Starts the origin with `lookups` reads and waits until its table is
    /// written and a tenth of the reads are done. False when it finished
    /// before that (too few lookups for this host).
    fn start_origin_and_wait(
        &self,
        m: &mut Monitor,
        seed: u64,
        lookups: u64,
        progress: &Progress,
    ) -> Result<bool> {
        let config = config_from_toml(&self.config_text_with(seed, lookups))?;
        progress.say("origin: writing its table");
        m.add_vm(&config.vms[0])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let want = self.table_pages() + lookups / 10;
        let began = Instant::now();
        loop {
            m.tick();
            let (done, _, finished, _) = m.progress();
            if finished != 0 {
                return Ok(false);
            }
            if done >= want {
                return Ok(true);
            }
            ensure!(
                began.elapsed() < Duration::from_secs(600),
                "the origin made no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn measure(
        &self,
        m: &mut Monitor,
        seed: u64,
        path: &std::path::Path,
        progress: &Progress,
    ) -> Result<CloneResult> {
        // The snapshot must catch the origin mid-read. How long its reads
        // last depends on the host (a fast one did 360,000 lookups between
        // two polls), so an origin that finishes first is run again with
        // four times the lookups rather than failing the run.
        let mut lookups = self.lookups;
        let mut attempt = 1;
        while !self.start_origin_and_wait(m, seed, lookups, progress)? {
            m.remove("origin").map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(
                attempt < 4,
                "the origin finished before its snapshot {attempt} times, the last with \
                 {lookups} lookups: raise lookups"
            );
            attempt += 1;
            lookups = lookups.saturating_mul(4);
            progress.say(&format!(
                "origin finished before its snapshot: again with {lookups} lookups"
            ));
        }
        let t = Instant::now();
        let snap = m
            .snapshot_vm("origin", path, AfterSnapshot::Stop)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let snapshot_ms = t.elapsed().as_secs_f64() * 1e3;
        m.wait_vm("origin").map_err(|e| anyhow::anyhow!("{e}"))?;
        m.remove("origin").map_err(|e| anyhow::anyhow!("{e}"))?;

        progress.say("one restore");
        let t = Instant::now();
        m.restore_vm(
            path,
            &RestoreOptions {
                name: "restored".into(),
                ..RestoreOptions::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let restore_one_ms = t.elapsed().as_secs_f64() * 1e3;
        checked(&m.wait_vm("restored").map_err(|e| anyhow::anyhow!("{e}"))?)?;
        m.remove("restored").map_err(|e| anyhow::anyhow!("{e}"))?;
        m.memory().release_warm()?;

        progress.say(&format!("{} clones", self.clones));
        let resident0 = pool_resident(m);
        let used0 = pool_used(m);
        let breaks0 = m.memory().sharing_stats().cow_breaks;
        super::procmem::release_free_heap();
        let proc0 = ProcessMem::read()?;
        let names: Vec<String> = (0..self.clones).map(|k| format!("clone{k}")).collect();
        let t = Instant::now();
        let report = m
            .clone_vms(path, &names, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let clone_all_ms = t.elapsed().as_secs_f64() * 1e3;
        let resident1 = pool_resident(m);
        let used1 = pool_used(m);
        let breaks1 = m.memory().sharing_stats().cow_breaks - breaks0;
        let proc1 = ProcessMem::read()?;
        let image_bytes = report.pages_per_node.iter().sum::<u64>() * crate::PAGE_SIZE as u64;
        let k = self.clones as f64;
        let page_kib = crate::PAGE_SIZE as f64 / 1024.0;
        let new_pool_kib_per_clone = (resident1 as f64
            - resident0 as f64
            - image_bytes as f64
            - breaks1 as f64 * crate::PAGE_SIZE as f64)
            / 1024.0
            / k;
        let image_pages = image_bytes / crate::PAGE_SIZE as u64;
        let pool_pages_kib_per_clone =
            (used1 as f64 - used0 as f64 - image_pages as f64) * page_kib / k;
        let rss_shmem_kib_per_clone =
            (proc1.rss_shmem_kib as f64 - proc0.rss_shmem_kib as f64 - image_bytes as f64 / 1024.0)
                / k;
        let monitor_anon_kib_per_clone =
            (proc1.rss_anon_kib as f64 - proc0.rss_anon_kib as f64) / k;
        let page_tables_kib_per_clone = (proc1.pte_kib as f64 - proc0.pte_kib as f64) / k;
        let all_new_kib_per_clone = new_pool_kib_per_clone.max(0.0)
            + monitor_anon_kib_per_clone
            + page_tables_kib_per_clone;

        let bar = progress.bar(self.clones as u64);
        let mut memory_over_time = vec![(clone_all_ms, resident1 as f64 / (1 << 20) as f64)];
        let mut last_sample = Instant::now();
        loop {
            m.tick();
            if last_sample.elapsed() >= Duration::from_millis(50) {
                memory_over_time.push((
                    t.elapsed().as_secs_f64() * 1e3,
                    pool_resident(m) as f64 / (1 << 20) as f64,
                ));
                last_sample = Instant::now();
            }
            let done = names.iter().filter(|n| m.has_exited(n)).count();
            bar.set_position(done as u64);
            if done == names.len() {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(3600),
                "the clones did not finish"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        bar.finish_and_clear();
        let all_finished_ms = t.elapsed().as_secs_f64() * 1e3;
        let pool_resident_end = pool_resident(m);
        memory_over_time.push((all_finished_ms, pool_resident_end as f64 / (1 << 20) as f64));
        let breaks_end = m.memory().sharing_stats().cow_breaks - breaks0;
        for name in &names {
            checked(&m.wait_vm(name).map_err(|e| anyhow::anyhow!("{e}"))?)?;
        }
        m.memory()
            .verify()
            .context("memory invariants after the clones")?;
        for name in &names {
            m.remove(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(CloneResult {
            host: HostInfo::detect(),
            clones: self.clones,
            memory_mib: self.memory_mib,
            lookups,
            policy: self.policy.clone(),
            topology: self.topology.clone(),
            snapshot_pages: snap.file.pages,
            snapshot_bytes: snap.file.bytes,
            snapshot_ms,
            restore_one_ms,
            clone_all_ms,
            clones_per_s: k / (clone_all_ms / 1e3),
            ms_per_clone: clone_all_ms / k,
            new_pool_kib_per_clone,
            pool_pages_kib_per_clone,
            rss_shmem_kib_per_clone,
            monitor_anon_kib_per_clone,
            page_tables_kib_per_clone,
            all_new_kib_per_clone,
            cow_breaks_at_start: breaks1,
            cow_breaks_per_clone_at_end: breaks_end as f64 / k,
            pool_resident_end_mib: pool_resident_end as f64 / (1 << 20) as f64,
            all_finished_ms,
            memory_over_time,
        })
    }
}

impl ScenarioResult for CloneResult {
    fn figures(&self) -> Vec<Figure> {
        vec![
            Figure::value(
                "clones started per second",
                "VMs/s",
                Better::Higher,
                self.clones_per_s,
            )
            .headline(),
            Figure::value("ms per clone", "ms", Better::Lower, self.ms_per_clone),
            Figure::value(
                "ms per clone / Firecracker's 8 ms restore",
                "ratio",
                Better::Lower,
                self.ms_per_clone / FIRECRACKER_RESTORE_MS,
            ),
            Figure::value(
                "all new host memory per clone before it writes (pool, monitor RssAnon, page tables)",
                "KiB",
                Better::Lower,
                self.all_new_kib_per_clone,
            )
            .headline(),
            Figure::value(
                "new host memory per clone before it writes",
                "KiB",
                Better::Lower,
                self.new_pool_kib_per_clone,
            ),
            Figure::value(
                "page tables (VmPTE) per clone",
                "KiB",
                Better::Lower,
                self.page_tables_kib_per_clone,
            ),
            Figure::value(
                "monitor memory (RssAnon) per clone",
                "KiB",
                Better::Lower,
                self.monitor_anon_kib_per_clone,
            ),
            Figure::value(
                "RssShmem per clone beyond one copy",
                "KiB",
                Better::Lower,
                self.rss_shmem_kib_per_clone,
            ),
            Figure::value(
                "pool pages handed out per clone beyond one copy",
                "KiB",
                Better::Neither,
                self.pool_pages_kib_per_clone,
            ),
            Figure::value(
                "restore of one VM",
                "ms",
                Better::Lower,
                self.restore_one_ms,
            ),
            Figure::value("snapshot", "ms", Better::Lower, self.snapshot_ms),
            Figure::value(
                "copy-on-write breaks per clone (run to the end)",
                "pages",
                Better::Neither,
                self.cow_breaks_per_clone_at_end,
            ),
            Figure::value(
                "pool memory once all finished",
                "MiB",
                Better::Lower,
                self.pool_resident_end_mib,
            ),
        ]
    }

    fn plots(&self) -> Vec<Plot> {
        let image_mib = self.snapshot_pages as f64 * crate::PAGE_SIZE as f64 / (1 << 20) as f64;
        let plot = LinePlot::new(
            &format!(
                "{} clones of a {} MiB snapshot: host memory in the pools (without sharing: {:.0} MiB)",
                self.clones,
                self.memory_mib,
                image_mib * self.clones as f64
            ),
            "milliseconds since the clone call",
            "MiB resident in the pools",
        )
        .series("pools", self.memory_over_time.clone())
        .reference_line(image_mib, "one copy of the snapshot");
        vec![Plot {
            name: "memory".into(),
            title: "Host memory while the clones run".into(),
            svg: plot.render(),
        }]
    }

    fn markdown(&self) -> String {
        let mut out = format!(
            "{} clones of a {} MiB snapshot ({} pages, {:.1} MiB file) of a `table_scan` \
             micro-VM, policy `{}`, topology `{}`; {}\n\n",
            self.clones,
            self.memory_mib,
            self.snapshot_pages,
            self.snapshot_bytes as f64 / (1 << 20) as f64,
            self.policy,
            self.topology,
            self.host.describe()
        );
        let f = |v: f64| format!("{v:.1}");
        out += &markdown_table(
            &["what", "value"],
            &[
                vec!["snapshot written, ms".into(), f(self.snapshot_ms)],
                vec!["one restore, ms".into(), f(self.restore_one_ms)],
                vec![
                    format!("{} clones (one call), ms", self.clones),
                    f(self.clone_all_ms),
                ],
                vec!["clones per second".into(), f(self.clones_per_s)],
                vec![
                    "ms per clone (Firecracker: 5-8 ms per restore)".into(),
                    format!("{:.2}", self.ms_per_clone),
                ],
                vec![
                    "new host memory per clone before it writes, KiB".into(),
                    f(self.new_pool_kib_per_clone),
                ],
                vec![
                    "monitor RssAnon per clone, KiB".into(),
                    f(self.monitor_anon_kib_per_clone),
                ],
                vec![
                    "page tables (VmPTE) per clone, KiB".into(),
                    f(self.page_tables_kib_per_clone),
                ],
                vec![
                    "all new host memory per clone before it writes (pool + RssAnon + page tables), KiB"
                        .into(),
                    f(self.all_new_kib_per_clone),
                ],
                vec![
                    "RssShmem per clone beyond one copy, KiB".into(),
                    f(self.rss_shmem_kib_per_clone),
                ],
                vec![
                    "pool pages handed out per clone beyond one copy (holes), KiB".into(),
                    f(self.pool_pages_kib_per_clone),
                ],
                vec![
                    "copy-on-write breaks at start / per clone at the end".into(),
                    format!(
                        "{} / {:.1}",
                        self.cow_breaks_at_start, self.cow_breaks_per_clone_at_end
                    ),
                ],
                vec![
                    "pool memory once all finished, MiB".into(),
                    f(self.pool_resident_end_mib),
                ],
                vec!["all clones finished, ms".into(), f(self.all_finished_ms)],
            ],
        );
        out
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
