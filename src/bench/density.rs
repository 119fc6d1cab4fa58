//! The density scenario: create and start many micro-VMs through a
//! `Monitor` (`Monitor::create_vm`, then `Monitor::start_vm` for each), as
//! `monitor::run` does (build every VM, then start every VM), and measure
//!
//! * how long creating and starting them takes (VMs per second), and how long
//!   until every guest finished;
//! * host memory per VM beyond guest RAM, at three points: all VMs created
//!   (not started), all started, all finished (before teardown).
//!
//! Every guest's checksum is checked and `Memory::verify` runs after they
//! finished (outside the timings); a wrong checksum or a violated invariant
//! is an error. Each repetition uses a fresh `Memory`.
//!
//! What the memory figures count (deltas from a snapshot taken after the
//! pools exist and before the first VM, divided by the number of VMs):
//!
//! * process: `RssAnon` (monitor heap: pmap, memmap, VM structures; thread
//!   stacks; the allocator's free memory is given back to the kernel before
//!   each baseline, so a repetition does not silently reuse the previous
//!   one's), with the heap bytes in use (`mallinfo2`) shown apart, and `RssFile` (file-backed pages: code first run, the vCPUs'
//!   mapped `kvm_run` pages) of `/proc/self/status`. Guest RAM is memfd pool
//!   pages, i.e. shmem, so it is in neither.
//! * kernel, from `/proc/meminfo` (system-wide, so other processes' activity
//!   is in it too: noisy): unreclaimable slab, kernel stacks, page tables
//!   (including this process's page tables mapping guest RAM), secondary
//!   page tables, vmalloc, per-CPU.
//! * guest RAM itself, reported but not counted: the pools' resident bytes
//!   (and `RssShmem` as a cross-check).
//!
//! `MemAvailable` / `MemFree` are not used: on the build hosts touching
//! 300 MiB of memfd pages lowered them by only about 204 MiB (the host gives
//! memory back elsewhere meanwhile), so their deltas say nothing per VM.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::params::{ParamResult, Params};
use super::procmem::{release_free_heap, MemInfo, ProcessMem};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{config_doc, config_from_doc, markdown_table, progress_bar, HostInfo, Stats};
use crate::config::Config;
use crate::config::{ConfigFile, PolicyRef, VmSpec, WorkloadSpec};
use crate::memory::Memory;
use crate::monitor::Monitor;

/// What to measure.
#[derive(Clone, Debug)]
pub struct DensityOptions {
    pub vms: usize,
    /// Guest RAM per VM.
    pub memory_mib: u64,
    /// Fresh monitor memory and `vms` VMs per repetition.
    pub reps: usize,
    /// Progress bar on stderr.
    pub progress: bool,
    /// Seed of the default `fill` workload (and of a `workload` table
    /// without one).
    pub seed: u64,
    /// The policy the VMs' config names (the scenario builds VMs itself and
    /// runs no scanner, so only the memory layout follows it).
    pub policy: String,
    /// `host`, a fixture name or an hwloc XML path.
    pub topology: String,
    /// A `workload` as in `disco run` configs; `None`: `fill`.
    pub workload: Option<WorkloadSpec>,
}

impl DensityOptions {
    /// `disco bench density`: 100 VMs of 1 vCPU and 4 MiB filling their
    /// memory, 3 repetitions (1 with `quick`).
    pub fn standard(quick: bool) -> DensityOptions {
        DensityOptions {
            vms: 100,
            memory_mib: 4,
            reps: if quick { 1 } else { 3 },
            progress: false,
            seed: 7,
            policy: "static".into(),
            topology: "host".into(),
            workload: None,
        }
    }

    /// A small configuration for tests: 10 VMs of 2 MiB, 1 repetition.
    pub fn tiny() -> DensityOptions {
        DensityOptions {
            vms: 10,
            memory_mib: 2,
            reps: 1,
            ..DensityOptions::standard(true)
        }
    }

    /// The config the scenario runs: `vms` VMs `d-0`.. of 1 vCPU running
    /// the workload (default: filling their `memory_mib`).
    pub fn config(&self) -> ConfigFile {
        let workload = self.workload.clone().unwrap_or_else(|| WorkloadSpec {
            kind: Some("fill".into()),
            seed: Some(self.seed as i64),
            ..WorkloadSpec::default()
        });
        let vm = VmSpec {
            count: Some(self.vms as i64),
            time_limit_s: Some(120.0),
            ..VmSpec::micro("d", 1, self.memory_mib, workload)
        };
        config_doc(
            PolicyRef::Named(self.policy.clone()),
            &self.topology,
            vec![vm],
        )
    }
}

/// Per-VM memory at one point of the scenario, KiB per VM, over repetitions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryPerVm {
    /// "created", "started" or "finished".
    pub when: String,
    pub process_anon_kib: Stats,
    /// Allocator bytes in use (glibc `mallinfo2`): the monitor's heap data
    /// (pmap, memmap, VM structures), part of `process_anon_kib`.
    pub process_heap_kib: Stats,
    pub process_file_kib: Stats,
    pub kernel_slab_unreclaimable_kib: Stats,
    pub kernel_stack_kib: Stats,
    pub kernel_page_tables_kib: Stats,
    pub kernel_sec_page_tables_kib: Stats,
    pub kernel_vmalloc_kib: Stats,
    pub kernel_percpu_kib: Stats,
    /// Sum of the kernel counters above (system-wide).
    pub kernel_total_kib: Stats,
    /// process anon + process file + kernel total: the monitor's memory
    /// per VM beyond guest RAM.
    pub total_beyond_guest_ram_kib: Stats,
    /// Guest RAM resident in the pools (not counted above).
    pub guest_ram_resident_kib: Stats,
    /// `RssShmem` growth: the guest RAM this process maps.
    pub process_shmem_kib: Stats,
    /// Extra threads in the process (per VM).
    pub threads: Stats,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DensityResult {
    pub host: HostInfo,
    pub vms: usize,
    pub vcpus_per_vm: usize,
    pub memory_mib: u64,
    pub workload: String,
    pub reps: usize,
    /// `build_vm` of every VM (guest space in the pool, KVM VM, guest image), ms.
    pub create_ms: Stats,
    /// `MicroVm::start` of every VM (vCPU and watchdog threads), ms.
    pub start_ms: Stats,
    pub create_start_ms: Stats,
    /// vms / (create + start) seconds.
    pub vms_per_second: Stats,
    /// vms / create seconds (building only; starting shares the CPUs with
    /// the guests already running).
    pub create_vms_per_second: Stats,
    /// From the first create until every guest finished, ms.
    pub all_finished_ms: Stats,
    /// VMs whose guest had not finished when the last VM was started.
    pub running_after_start: Stats,
    /// At "created", "started", "finished".
    pub memory: Vec<MemoryPerVm>,
    /// `vm.max_map_count` after the run (disco raises it as root).
    pub max_map_count: u64,
    /// Per repetition: when each VM was created and started.
    #[serde(default)]
    pub timelines: Vec<Timeline>,
}

/// When each VM of one repetition was created (built) and started, ms since
/// the first create began, in VM order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub created_ms: Vec<f64>,
    pub started_ms: Vec<f64>,
}

/// Counters at one point.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    process: ProcessMem,
    system: MemInfo,
    guest_resident: u64,
}

impl Snapshot {
    fn take(memory: &Memory) -> Result<Snapshot> {
        Ok(Snapshot {
            process: ProcessMem::read()?,
            system: MemInfo::read()?,
            guest_resident: memory.pool_stats().iter().map(|p| p.resident_bytes).sum(),
        })
    }
}

/// Per-VM deltas of one repetition at one point, KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Deltas {
    anon: f64,
    heap: f64,
    file: f64,
    slab: f64,
    kstack: f64,
    pt: f64,
    sec_pt: f64,
    vmalloc: f64,
    percpu: f64,
    kernel: f64,
    total: f64,
    guest: f64,
    shmem: f64,
    threads: f64,
}

impl Deltas {
    fn between(base: &Snapshot, now: &Snapshot, vms: usize) -> Deltas {
        let n = vms as f64;
        let d = |a: u64, b: u64| (b as f64 - a as f64) / n;
        let (p0, p1) = (&base.process, &now.process);
        let (s0, s1) = (&base.system, &now.system);
        let guest = d(base.guest_resident, now.guest_resident) / 1024.0;
        let anon = d(p0.rss_anon_kib, p1.rss_anon_kib);
        let file = d(p0.rss_file_kib, p1.rss_file_kib);
        let kernel = d(s0.kernel_kib(), s1.kernel_kib());
        Deltas {
            anon,
            heap: d(p0.heap_in_use_kib, p1.heap_in_use_kib),
            file,
            slab: d(s0.slab_unreclaimable_kib, s1.slab_unreclaimable_kib),
            kstack: d(s0.kernel_stack_kib, s1.kernel_stack_kib),
            pt: d(s0.page_tables_kib, s1.page_tables_kib),
            sec_pt: d(s0.sec_page_tables_kib, s1.sec_page_tables_kib),
            vmalloc: d(s0.vmalloc_used_kib, s1.vmalloc_used_kib),
            percpu: d(s0.percpu_kib, s1.percpu_kib),
            kernel,
            total: anon + file + kernel,
            guest,
            shmem: d(p0.rss_shmem_kib, p1.rss_shmem_kib),
            threads: d(p0.threads, p1.threads),
        }
    }
}

fn memory_per_vm(when: &str, reps: &[Deltas]) -> MemoryPerVm {
    let s = |f: fn(&Deltas) -> f64| Stats::of(&reps.iter().map(f).collect::<Vec<_>>());
    MemoryPerVm {
        when: when.to_string(),
        process_anon_kib: s(|d| d.anon),
        process_heap_kib: s(|d| d.heap),
        process_file_kib: s(|d| d.file),
        kernel_slab_unreclaimable_kib: s(|d| d.slab),
        kernel_stack_kib: s(|d| d.kstack),
        kernel_page_tables_kib: s(|d| d.pt),
        kernel_sec_page_tables_kib: s(|d| d.sec_pt),
        kernel_vmalloc_kib: s(|d| d.vmalloc),
        kernel_percpu_kib: s(|d| d.percpu),
        kernel_total_kib: s(|d| d.kernel),
        total_beyond_guest_ram_kib: s(|d| d.total),
        guest_ram_resident_kib: s(|d| d.guest),
        process_shmem_kib: s(|d| d.shmem),
        threads: s(|d| d.threads),
    }
}

/// One repetition's figures.
struct Rep {
    create: Duration,
    start: Duration,
    all_finished: Duration,
    running_after_start: usize,
    /// created, started, finished.
    deltas: [Deltas; 3],
    timeline: Timeline,
}

/// Runs the scenario.
pub fn run(options: &DensityOptions) -> Result<DensityResult> {
    ensure!(
        options.vms > 0,
        "the density scenario needs at least one VM"
    );
    ensure!(
        options.reps > 0,
        "the density scenario needs at least one repetition"
    );
    let config = config_from_doc(options.config())?;
    let bar = progress_bar((options.vms * options.reps) as u64, options.progress);
    let mut reps = Vec::new();
    for rep in 0..options.reps {
        bar.set_message(format!("repetition {}/{}", rep + 1, options.reps));
        // A fresh monitor (its memory pools) per repetition; its service
        // threads are not started: the scenario measures the VMs alone.
        let mut monitor = Monitor::for_config(&config, Duration::from_millis(500))?;
        // Let the kernel finish freeing the previous repetition's VMs, and
        // give freed heap back so this repetition's growth is its own.
        std::thread::sleep(Duration::from_millis(200));
        release_free_heap();
        let base = Snapshot::take(monitor.memory())?;

        let t0 = Instant::now();
        let mut created_ms = Vec::with_capacity(options.vms);
        let built = (|| -> Result<()> {
            for vc in &config.vms {
                // The monitor's build step alone (guest space, KVM VM,
                // guest image): the figure measured is its time.
                monitor.create_vm(vc)?;
                created_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                bar.inc(1);
            }
            Ok(())
        })();
        let create = t0.elapsed();
        let result = built
            .and_then(|()| measure_rep(&mut monitor, &config, &base, create, t0))
            .map(|mut r| {
                r.timeline.created_ms = created_ms;
                r
            });
        // Tear down whatever exists, also after an error.
        let torn_down = tear_down(monitor);
        let rep_result = result?;
        torn_down?;
        reps.push(rep_result);
    }
    bar.finish_and_clear();

    let stat = |f: &dyn Fn(&Rep) -> f64| Stats::of(&reps.iter().map(f).collect::<Vec<_>>());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let vms = options.vms as f64;
    let memory = ["created", "started", "finished"]
        .iter()
        .enumerate()
        .map(|(i, when)| memory_per_vm(when, &reps.iter().map(|r| r.deltas[i]).collect::<Vec<_>>()))
        .collect();
    Ok(DensityResult {
        host: HostInfo::detect(),
        vms: options.vms,
        vcpus_per_vm: 1,
        memory_mib: options.memory_mib,
        workload: match &options.workload {
            None => format!(
                "fill (seed {}): every page of the VM's data slice written once",
                options.seed
            ),
            Some(w) => toml::Value::try_from(w).map_or_else(|e| e.to_string(), |v| v.to_string()),
        },
        reps: options.reps,
        create_ms: stat(&|r| ms(r.create)),
        start_ms: stat(&|r| ms(r.start)),
        create_start_ms: stat(&|r| ms(r.create + r.start)),
        vms_per_second: stat(&|r| vms / (r.create + r.start).as_secs_f64()),
        create_vms_per_second: stat(&|r| vms / r.create.as_secs_f64()),
        all_finished_ms: stat(&|r| ms(r.all_finished)),
        running_after_start: stat(&|r| r.running_after_start as f64),
        memory,
        max_map_count: std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
        timelines: reps.into_iter().map(|r| r.timeline).collect(),
    })
}

/// Ends the monitor (joins every VM, destroys every guest space, checks
/// the memory invariants after that: every pool empty), then checks that
/// every guest returned the model's checksum.
fn tear_down(monitor: Monitor) -> Result<()> {
    let report = monitor.finish(Some(Duration::ZERO), &indicatif::ProgressBar::hidden(), 0.0)?;
    let bad: Vec<String> = report
        .vms
        .iter()
        .filter(|v| v.status != "ok")
        .map(|v| {
            format!(
                "{}: {} {:?}",
                v.name,
                v.error.as_deref().unwrap_or(""),
                v.vcpus
            )
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "{} of {} VMs did not return the model's checksum: {}",
            bad.len(),
            report.vms.len(),
            bad.join("; ")
        );
    }
    ensure!(
        report.verify_ok,
        "memory invariants after teardown: {}",
        report.verify_errors.join("; ")
    );
    Ok(())
}

/// One batch as the criterion bench times it: add every VM of `config` to
/// `monitor` (built, not started), start them all, wait until every guest
/// finished (checking every 1 ms), then remove each (joins it, checks its
/// checksums, frees its guest space). No snapshots, no `verify`.
pub fn run_batch(monitor: &mut Monitor, config: &Config) -> Result<()> {
    let mut added = Vec::with_capacity(config.vms.len());
    let run = (|| -> Result<()> {
        for vc in &config.vms {
            added.push(monitor.create_vm(vc)?);
        }
        for &i in &added {
            monitor.start_vm(i).map_err(|e| anyhow::anyhow!(e))?;
        }
        while !monitor.all_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })();
    let mut bad = Vec::new();
    for vc in &config.vms {
        match monitor.remove(&vc.name) {
            Ok(r) if r.status == "ok" => {}
            Ok(r) => bad.push(format!("{}: {} {:?}", r.name, r.status, r.vcpus)),
            Err(e) => bad.push(format!("{}: {e}", vc.name)),
        }
    }
    run?;
    if !bad.is_empty() {
        bail!(
            "{} VMs did not return the model's checksum: {}",
            bad.len(),
            bad.join("; ")
        );
    }
    let leaked: u32 = monitor
        .memory()
        .pool_stats()
        .iter()
        .map(|p| p.used_pages)
        .sum();
    ensure!(
        leaked == 0,
        "{leaked} pool pages still in use after every VM was destroyed"
    );
    Ok(())
}

/// After every VM is built: snapshot, start all, snapshot, wait until all
/// finished, snapshot, verify.
fn measure_rep(
    monitor: &mut Monitor,
    config: &Config,
    base: &Snapshot,
    create: Duration,
    t0: Instant,
) -> Result<Rep> {
    let n = config.vms.len();
    let created = Snapshot::take(monitor.memory())?;
    let t1 = Instant::now();
    let mut started_ms = Vec::with_capacity(n);
    for i in 0..n {
        monitor.start_vm(i).map_err(|e| anyhow::anyhow!(e))?;
        started_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let start = t1.elapsed();
    let running_after_start = config
        .vms
        .iter()
        .filter(|vc| !monitor.has_exited(&vc.name))
        .count();
    let started = Snapshot::take(monitor.memory())?;
    // The watchdogs end every VM at its time limit, so this terminates.
    while !monitor.all_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let all_finished = t0.elapsed();
    let finished = Snapshot::take(monitor.memory())?;
    monitor
        .memory()
        .verify()
        .context("memory invariants after the guests finished")?;
    Ok(Rep {
        create,
        start,
        all_finished,
        running_after_start,
        deltas: [
            Deltas::between(base, &created, n),
            Deltas::between(base, &started, n),
            Deltas::between(base, &finished, n),
        ],
        timeline: Timeline {
            created_ms: Vec::new(),
            started_ms,
        },
    })
}

impl DensityResult {
    /// Markdown: timings, then memory per VM at each point.
    pub fn render_table(&self) -> String {
        let mut out = format!(
            "{} micro-VMs ({} vCPU, {} MiB, workload {}), created through the monitor's memory \
             and started; {} repetition(s), median (min-max)\n\n",
            self.vms, self.vcpus_per_vm, self.memory_mib, self.workload, self.reps
        );
        let n = self.vms;
        let rows = vec![
            vec![format!("create {n} VMs (ms)"), self.create_ms.show(1)],
            vec![format!("start {n} VMs (ms)"), self.start_ms.show(1)],
            vec![
                format!("create + start {n} VMs (ms)"),
                self.create_start_ms.show(1),
            ],
            vec![
                "VMs per second (create + start)".into(),
                self.vms_per_second.show(0),
            ],
            vec![
                "VMs per second (create only)".into(),
                self.create_vms_per_second.show(0),
            ],
            vec![
                format!("all {n} guests finished, from the first create (ms)"),
                self.all_finished_ms.show(1),
            ],
            vec![
                "guests still running when the last VM was started".into(),
                self.running_after_start.show(0),
            ],
        ];
        out += &markdown_table(&["figure", "value"], &rows);
        out += "\nStarting a VM spawns its vCPU and watchdog threads; the guests started first \
                run meanwhile and share the host CPUs with the thread starting the others, so on \
                a small host the start figure includes the guests' own work.\n";

        out +=
            "\nHost memory per VM beyond guest RAM, KiB per VM (deltas from before the first VM, \
                divided by the number of VMs), median (min-max):\n\n";
        type Get = fn(&MemoryPerVm) -> &Stats;
        let lines: [(&str, Get); 14] = [
            ("process: anonymous (RssAnon)", |m| &m.process_anon_kib),
            ("  of which heap in use (malloc)", |m| &m.process_heap_kib),
            ("process: file-backed (RssFile)", |m| &m.process_file_kib),
            ("kernel: unreclaimable slab", |m| {
                &m.kernel_slab_unreclaimable_kib
            }),
            ("kernel: stacks", |m| &m.kernel_stack_kib),
            ("kernel: page tables (incl. guest RAM mappings)", |m| {
                &m.kernel_page_tables_kib
            }),
            ("kernel: secondary page tables", |m| {
                &m.kernel_sec_page_tables_kib
            }),
            ("kernel: vmalloc", |m| &m.kernel_vmalloc_kib),
            ("kernel: per-CPU", |m| &m.kernel_percpu_kib),
            ("kernel: total (system-wide, noisy)", |m| {
                &m.kernel_total_kib
            }),
            ("**total beyond guest RAM** (process + kernel)", |m| {
                &m.total_beyond_guest_ram_kib
            }),
            ("guest RAM resident in the pools (not counted above)", |m| {
                &m.guest_ram_resident_kib
            }),
            ("process: RssShmem (guest RAM mapped)", |m| {
                &m.process_shmem_kib
            }),
            ("process: threads per VM", |m| &m.threads),
        ];
        let rows: Vec<Vec<String>> = lines
            .iter()
            .map(|(name, get)| {
                let mut row = vec![name.to_string()];
                row.extend(self.memory.iter().map(|m| get(m).show(1)));
                row
            })
            .collect();
        let mut headers = vec!["counted"];
        let whens: Vec<String> = self
            .memory
            .iter()
            .map(|m| match m.when.as_str() {
                "created" => "all created, not started".to_string(),
                "started" => "all started".to_string(),
                "finished" => "all finished, before teardown".to_string(),
                other => other.to_string(),
            })
            .collect();
        headers.extend(whens.iter().map(String::as_str));
        out += &markdown_table(&headers, &rows);
        out += &format!(
            "\nKernel figures are system-wide counters of /proc/meminfo (other processes move them \
             too); `MemAvailable` is not used (unreliable on these hosts). On Linux 6.13 and later \
             KVM runs one `kvm-nx-lpage-recovery` worker thread per VM in the VMM process, started \
             with the VM's first vCPU run: that is the thread per VM (and its 16 KiB kernel stack) \
             left when the guests finished. vm.max_map_count after the run: {} (disco raises it \
             as root to budget one mapping per guest page). Host: {}.\n",
            self.max_map_count,
            self.host.describe()
        );
        out
    }
}

// ---------------------------------------------------------------------------
// the suite's view (`disco bench`, benches/scenarios/density.toml)
// ---------------------------------------------------------------------------

struct DensityScenario(DensityOptions);

/// Reads a `kind = "density"` scenario file: `vms`, `memory_mib`, `reps`,
/// `policy`, `topology`, `workload` (an inline table as in `disco run`
/// configs; its seed defaults to the run's seed).
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let d = DensityOptions::standard(p.quick());
    let workload = p
        .opt_table_text("workload")?
        .map(|text| {
            crate::config::schema::workload_from_toml(&text, "", "workload")
                .map_err(|e| p.error("workload", e.to_string()))
        })
        .transpose()?;
    let options = DensityOptions {
        vms: p.usize("vms", 1, crate::config::MAX_COUNT as usize, d.vms)?,
        memory_mib: p.u64("memory_mib", 2, crate::config::MAX_MEMORY_MIB, d.memory_mib)?,
        reps: p.usize("reps", 1, 1000, d.reps)?,
        policy: p.policy("policy", &d.policy)?,
        topology: p.topology("topology", &d.topology)?,
        workload,
        ..d
    };
    // The generated config must be valid (workload parameters, memory
    // large enough, topology loads): checked now, before anything runs.
    let check = DensityScenario(options.clone()).options_for(1);
    config_from_doc(check.config()).map_err(|e| {
        let other = if options.workload.is_some() {
            "workload"
        } else {
            "memory_mib"
        };
        super::blame_config_error(p, &e, &options.policy, "policy", other)
    })?;
    Ok(Box::new(DensityScenario(options)))
}

impl DensityScenario {
    /// The options with `seed` (put into the workload table when it has no seed).
    fn options_for(&self, seed: u64) -> DensityOptions {
        let mut o = self.0.clone();
        o.seed = seed;
        if let Some(w) = &mut o.workload {
            let seeded = matches!(
                w.kind.as_deref(),
                Some("fill" | "sweep" | "random" | "table_scan")
            );
            if seeded && w.seed.is_none() {
                w.seed = Some(seed as i64);
            }
        }
        o
    }
}

impl Scenario for DensityScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let mut options = self.options_for(seed);
        options.progress = progress.show;
        Ok(Box::new(run(&options)?))
    }

    fn policies(&self) -> Vec<String> {
        vec![self.0.policy.clone()]
    }
}

impl ScenarioResult for DensityResult {
    fn figures(&self) -> Vec<Figure> {
        let finished = self.memory.iter().find(|m| m.when == "finished");
        let mut out = vec![
            Figure::new(
                "VMs per second (create + start)",
                "VMs/s",
                Better::Higher,
                self.vms_per_second.clone(),
            )
            .headline(),
            Figure::new(
                "VMs per second (create only)",
                "VMs/s",
                Better::Higher,
                self.create_vms_per_second.clone(),
            ),
            Figure::new(
                "create + start all VMs",
                "ms",
                Better::Lower,
                self.create_start_ms.clone(),
            ),
            Figure::new("start all VMs", "ms", Better::Lower, self.start_ms.clone()),
            Figure::new(
                "all guests finished (from the first create)",
                "ms",
                Better::Lower,
                self.all_finished_ms.clone(),
            ),
        ];
        if let Some(m) = finished {
            out.extend([
                Figure::new(
                    "host memory per VM beyond guest RAM",
                    "KiB",
                    Better::Lower,
                    m.total_beyond_guest_ram_kib.clone(),
                )
                .headline(),
                Figure::new(
                    "monitor anonymous memory per VM",
                    "KiB",
                    Better::Lower,
                    m.process_anon_kib.clone(),
                ),
                Figure::new(
                    "monitor heap in use per VM",
                    "KiB",
                    Better::Lower,
                    m.process_heap_kib.clone(),
                ),
                Figure::new(
                    "kernel memory per VM (system-wide counters)",
                    "KiB",
                    Better::Lower,
                    m.kernel_total_kib.clone(),
                ),
            ]);
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let mut plot = LinePlot::new(
            &format!(
                "VM start rate: {} micro-VMs ({} MiB each)",
                self.vms, self.memory_mib
            ),
            "milliseconds since the first create",
            "VMs",
        );
        let cumulative = |times: &[f64]| -> Vec<(f64, f64)> {
            std::iter::once((0.0, 0.0))
                .chain(times.iter().enumerate().map(|(i, &t)| (t, (i + 1) as f64)))
                .collect()
        };
        for (i, t) in self.timelines.iter().enumerate() {
            let rep = if self.timelines.len() > 1 {
                format!(" (rep {})", i + 1)
            } else {
                String::new()
            };
            plot = plot
                .series(&format!("created{rep}"), cumulative(&t.created_ms))
                .series(&format!("started{rep}"), cumulative(&t.started_ms));
        }
        vec![Plot {
            name: "start-rate".into(),
            title: "VMs created and started over time".into(),
            svg: plot.render(),
        }]
    }

    fn markdown(&self) -> String {
        self.render_table()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
