//! The scale scenario (`disco bench scale`): many VMs of real size holding
//! mostly identical content, run by the monitor (`monitor::run`) under each
//! policy in turn: what sharing costs and saves at the sizes operators run.
//!
//! N VMs of M MiB each run `fill` with one seed for the shared part and a
//! seed of their own for the rest (`shared_percent` % of each VM's data
//! pages are identical across VMs, chosen in blocks of `shared_run` frames:
//! 256 by default, runs as VMs booted from one image hold; 1 scatters them
//! frame by frame, the worst case for the mapping budget). Each policy's run
//! reports the guests' run time (the slowest VM), the scanner's CPU and
//! merges, memory saved, the monitor's kernel mappings (VMAs) at peak and
//! at the end, the monitor's own memory (RssAnon) and the host memory the
//! pools held over time (the run report's memory timeline, sampled each
//! second). The first policy is the baseline the others' run times are
//! compared with (by default `static`: sharing off).
//!
//! On a topology of more than one node (`topology`, default `host`) the
//! VMs are spread over the nodes in turn, their memory where `placement`
//! says (`local` by default), so the full policy's NUMA engine samples,
//! and may migrate, at this size too; each run then reports what sampling
//! cost the guests and how local their accesses were. `shmem_folio_kib`
//! has the host allow large shmem folios for the runs, as operators who
//! want guest RAM in large folios set it.
//!
//! With `memory_limit_mib` (0: none) the pools may hold at most that much
//! and VMs start in waves as sharing frees memory (`[host] overcommit`):
//! more guest memory than the limit, as 32 VMs x 1 GiB in 16 GiB. Every
//! policy must then share (a run without sharing could never start the
//! later VMs), so the baseline is the first sharing policy.

use anyhow::{Context, Result};
use serde::Serialize;

use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{config_doc, config_from_doc, markdown_table};
use crate::config::{ConfigFile, PolicyRef, VmSpec};
use crate::guest::Workload;
use crate::memory::MemorySample;
use crate::monitor::{self, RunOptions};
use crate::topology::Topology;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Debug)]
struct ScaleScenario {
    vms: u64,
    memory_mib: u64,
    shared_percent: u64,
    shared_run: u64,
    /// The pools' limit, MiB, with overcommit; 0: no limit, no overcommit.
    memory_limit_mib: u64,
    policies: Vec<String>,
    /// `host`, a fixture name or an hwloc XML path, and the topology.
    topology_name: String,
    topology: Topology,
    /// Where each VM's memory starts (`locality::PLACEMENTS`).
    placement: String,
    /// The shmem folio size the host allows for the runs, kB (0: as it is).
    shmem_folio_kib: u32,
    /// 0: `fill` with shared content; otherwise each VM runs `random`
    /// with this many touches (content of its own), which keeps the
    /// NUMA engine's samples coming.
    touches: u64,
}

impl ScaleScenario {
    /// The generated config of one policy's run.
    fn config(&self, policy: &str, seed: u64) -> ConfigFile {
        let vms = (0..self.vms)
            .map(|i| {
                let workload = match self.touches {
                    0 => Workload::Fill {
                        seed,
                        private_seed: seed * 1000 + i + 1,
                        shared_percent: self.shared_percent as u8,
                        shared_run: self.shared_run as u32,
                    },
                    touches => Workload::Random {
                        seed: seed * 1000 + i + 1,
                        touches,
                    },
                };
                let nodes = self.topology.node_count();
                let (node, memory_node) = if nodes > 1 {
                    let node = i as usize % nodes;
                    let memory =
                        super::locality::memory_node(&self.placement, node, &self.topology);
                    (Some(node as i64), Some(memory as i64))
                } else {
                    (None, None)
                };
                VmSpec {
                    time_limit_s: Some(1800.0),
                    node,
                    memory_node,
                    ..VmSpec::micro(&format!("vm{i}"), 1, self.memory_mib, (&workload).into())
                }
            })
            .collect();
        let mut doc = config_doc(
            PolicyRef::Named(policy.to_string()),
            &self.topology_name,
            vms,
        );
        if self.memory_limit_mib > 0 {
            let host = doc.host.get_or_insert_with(Default::default);
            host.overcommit = Some(true);
            host.memory_limit_mib = Some(self.memory_limit_mib as i64);
        }
        doc
    }
}

/// One policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyRun {
    pub policy: String,
    pub wall_ms: f64,
    /// The slowest VM's guest run time, ms.
    pub guest_run_ms: f64,
    pub guest_mib: u64,
    pub saved_mib: f64,
    pub merges: u64,
    pub merge_batches: u64,
    pub zero_releases: u64,
    pub scanner_cpu_ms: f64,
    pub vmas_peak: u64,
    pub vmas_end: u64,
    pub monitor_anon_peak_mib: f64,
    pub pool_resident_peak_mib: f64,
    /// The NUMA engine's work, where it ran (more than one node).
    pub numa: Option<NumaFigures>,
    /// Large shmem folios: what the host allowed and whether guest RAM
    /// asked for them (the run report's line).
    pub large_folios: String,
    pub timeline: Vec<MemorySample>,
}

/// What the NUMA engine did in one policy's run, over all VMs.
#[derive(Clone, Debug, Serialize)]
pub struct NumaFigures {
    pub samples: u64,
    pub migrations: u64,
    pub replicas_made: u64,
    /// Locality samples that found the page on the vCPU's node, percent
    /// (`None` without locality samples).
    pub local_percent: Option<f64>,
    /// Sampling's charged cost against the VMs' vCPU time (their sum).
    pub sampling_share: f64,
    /// Sampling, copy-on-write and remap pauses against vCPU time.
    pub policy_share: f64,
    /// Sampled runs armed for minor faults and taken back out of it, and
    /// the VM pauses that took shared ones out.
    pub disarmed_runs: u64,
    pub disarm_pauses: u64,
    /// The vCPUs' time waiting for a host CPU against their vCPU time.
    pub vcpu_waiting_share: f64,
}

impl NumaFigures {
    fn of(report: &crate::report::RunReport) -> Option<NumaFigures> {
        let numa = report.numa.as_ref()?;
        let (samples, local) = numa
            .per_vm
            .iter()
            .fold((0, 0), |(s, l), (vs, vl)| (s + vs, l + vl));
        let sum = |f: fn(&crate::report::VmCosts) -> f64| -> f64 {
            report.vms.iter().map(|v| f(&v.costs)).sum()
        };
        let vcpu_ms = sum(|c| c.vcpu_ms).max(1e-9);
        let sampler = numa.sampler.as_ref();
        Some(NumaFigures {
            samples: numa.samples,
            migrations: numa.migrations + numa.region_migrations + numa.follow_migrations,
            replicas_made: numa.replicas_made,
            local_percent: (samples > 0).then(|| 100.0 * local as f64 / samples as f64),
            sampling_share: sum(|c| c.sampling_ms) / vcpu_ms,
            policy_share: sum(|c| c.overhead * c.vcpu_ms) / vcpu_ms,
            disarmed_runs: sampler.map_or(0, |s| s.disarmed_runs),
            disarm_pauses: sampler.map_or(0, |s| s.disarm_pauses),
            vcpu_waiting_share: sum(|c| c.vcpu_waiting_ms) / vcpu_ms,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleResult {
    pub vms: u64,
    pub memory_mib: u64,
    pub shared_percent: u64,
    pub shared_run: u64,
    pub topology_name: String,
    pub placement: String,
    pub shmem_folio_kib: u32,
    /// 0: `fill`; otherwise `random` with this many touches per VM.
    pub touches: u64,
    pub runs: Vec<PolicyRun>,
}

fn run_policy(s: &ScaleScenario, policy: &str, seed: u64) -> Result<PolicyRun> {
    let config = config_from_doc(s.config(policy, seed))?;
    let t = std::time::Instant::now();
    let report = monitor::run(&config, &RunOptions::quiet())?;
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        report.all_ok(),
        "policy {policy}: the run is not ok:\n{}",
        report.render_text()
    );
    let sharing = report.sharing.as_ref();
    let k = &report.kernel_mappings;
    Ok(PolicyRun {
        policy: policy.to_string(),
        wall_ms,
        guest_run_ms: report.vms.iter().map(|v| v.run_ms).fold(0.0, f64::max),
        guest_mib: s.vms * s.memory_mib,
        saved_mib: sharing.map_or(0.0, |sh| {
            sh.memory.pages_saved_in_all() as f64 * crate::PAGE_SIZE as f64 / MIB
        }),
        merges: sharing.map_or(0, |sh| sh.scanner.merges),
        merge_batches: sharing.map_or(0, |sh| sh.scanner.merge_batches),
        zero_releases: sharing.map_or(0, |sh| sh.scanner.zero_releases),
        scanner_cpu_ms: sharing.map_or(0.0, |sh| sh.scanner.cpu_ms),
        vmas_peak: k.peak,
        vmas_end: k.end,
        monitor_anon_peak_mib: k.monitor_anon_peak_bytes as f64 / MIB,
        pool_resident_peak_mib: report
            .memory_timeline
            .iter()
            .map(|m| m.pool_resident_bytes)
            .max()
            .unwrap_or(0) as f64
            / MIB,
        numa: NumaFigures::of(&report),
        large_folios: report.large_folios.clone(),
        timeline: report.memory_timeline,
    })
}

/// Reads a `kind = "scale"` scenario file: `vms`, `memory_mib`,
/// `shared_percent`, `policies` (the first is the baseline).
pub fn prepare(p: &super::params::Params) -> super::params::ParamResult<Box<dyn Scenario>> {
    let quick = p.quick();
    let topology_name = p.topology("topology", "host")?;
    let s = ScaleScenario {
        vms: p.u64("vms", 1, 512, if quick { 8 } else { 16 })?,
        memory_mib: p.u64(
            "memory_mib",
            4,
            crate::config::MAX_MEMORY_MIB,
            if quick { 256 } else { 1024 },
        )?,
        shared_percent: p.u64("shared_percent", 0, 100, 90)?,
        touches: p.u64("touches", 0, 1 << 40, 0)?,
        shared_run: p.u64("shared_run", 1, 65536, 256)?,
        memory_limit_mib: p.u64("memory_limit_mib", 0, 1 << 30, 0)?,
        policies: p.policies("policies", &["static", "disco"])?,
        topology: load_topology(&topology_name)
            .map_err(|e| p.error("topology", format!("{e:#}")))?,
        topology_name,
        placement: p.choice("placement", super::locality::PLACEMENTS, "local")?,
        shmem_folio_kib: p.folio_kib("shmem_folio_kib")?,
    };
    for policy in &s.policies {
        let config = config_from_doc(s.config(policy, 1))
            .map_err(|e| super::blame_config_error(p, &e, policy, "policies", "vms"))?;
        if s.memory_limit_mib > 0
            && s.vms * s.memory_mib > s.memory_limit_mib
            && !config.policy.sharing.enabled
        {
            return Err(p.error(
                "policies",
                format!(
                    "policy `{policy}` shares nothing, so {} VMs x {} MiB can never all start \
                     within memory_limit_mib = {}; allowed with a limit: policies with \
                     [sharing] enabled",
                    s.vms, s.memory_mib, s.memory_limit_mib
                ),
            ));
        }
    }
    Ok(Box::new(s))
}

/// The topology a scenario's `topology` names.
fn load_topology(name: &str) -> Result<Topology> {
    crate::config::TopologyChoice::named(name, std::path::Path::new("."))
        .with_context(|| format!("`{name}` is not a topology"))?
        .load()
}

impl Scenario for ScaleScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let _folios = super::allow_shmem_folios(self.shmem_folio_kib)?;
        let mut runs = Vec::new();
        for policy in &self.policies {
            progress.say(&format!(
                "{} VMs x {} MiB under policy {policy}",
                self.vms, self.memory_mib
            ));
            runs.push(run_policy(self, policy, seed).with_context(|| format!("policy {policy}"))?);
        }
        Ok(Box::new(ScaleResult {
            vms: self.vms,
            memory_mib: self.memory_mib,
            shared_percent: self.shared_percent,
            shared_run: self.shared_run,
            topology_name: self.topology_name.clone(),
            placement: self.placement.clone(),
            shmem_folio_kib: self.shmem_folio_kib,
            touches: self.touches,
            runs,
        }))
    }

    fn policies(&self) -> Vec<String> {
        self.policies.clone()
    }
}

impl ScenarioResult for ScaleResult {
    fn figures(&self) -> Vec<Figure> {
        let mut out = Vec::new();
        let base = self.runs.first().map_or(0.0, |r| r.guest_run_ms);
        for r in &self.runs {
            let p = &r.policy;
            let frames = (r.guest_mib * 256).max(1) as f64;
            out.extend([
                Figure::value(
                    &format!("{p}: guest run (slowest VM)"),
                    "ms",
                    Better::Lower,
                    r.guest_run_ms,
                ),
                Figure::value(
                    &format!("{p}: guest run / {}", self.runs[0].policy),
                    "ratio",
                    Better::Lower,
                    r.guest_run_ms / base.max(1e-9),
                )
                .headline(),
                Figure::value(
                    &format!("{p}: memory saved"),
                    "MiB",
                    Better::Higher,
                    r.saved_mib,
                )
                .headline(),
                Figure::value(
                    &format!("{p}: scanner CPU"),
                    "ms",
                    Better::Lower,
                    r.scanner_cpu_ms,
                ),
                Figure::value(
                    &format!("{p}: merges"),
                    "merges",
                    Better::Neither,
                    r.merges as f64,
                ),
                Figure::value(
                    &format!("{p}: kernel mappings at the end per 16 guest frames"),
                    "VMAs",
                    Better::Lower,
                    r.vmas_end as f64 * 16.0 / frames,
                )
                .headline(),
                Figure::value(
                    &format!("{p}: kernel mappings at peak"),
                    "VMAs",
                    Better::Lower,
                    r.vmas_peak as f64,
                ),
                Figure::value(
                    &format!("{p}: monitor memory (RssAnon) / guest RAM"),
                    "fraction",
                    Better::Lower,
                    r.monitor_anon_peak_mib / r.guest_mib.max(1) as f64,
                )
                .headline(),
                Figure::value(
                    &format!("{p}: host memory held by the pools at peak"),
                    "MiB",
                    Better::Lower,
                    r.pool_resident_peak_mib,
                ),
            ]);
            if let Some(n) = &r.numa {
                out.extend([
                    Figure::value(
                        &format!("{p}: policy cost / vCPU time"),
                        "fraction",
                        Better::Lower,
                        n.policy_share,
                    )
                    .headline(),
                    Figure::value(
                        &format!("{p}: page samples"),
                        "samples",
                        Better::Neither,
                        n.samples as f64,
                    ),
                    Figure::value(
                        &format!("{p}: vCPU time waiting for a host CPU / vCPU time"),
                        "fraction",
                        Better::Lower,
                        n.vcpu_waiting_share,
                    ),
                ]);
                if let Some(local) = n.local_percent {
                    out.push(Figure::value(
                        &format!("{p}: local accesses (samples)"),
                        "%",
                        Better::Higher,
                        local,
                    ));
                }
            }
            if r.merges > 0 {
                out.push(Figure::value(
                    &format!("{p}: scanner CPU per merge"),
                    "us",
                    Better::Lower,
                    r.scanner_cpu_ms * 1e3 / r.merges as f64,
                ));
            }
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let mut plot = LinePlot::new(
            &format!(
                "{} VMs x {} MiB, {} % identical: host memory the pools hold",
                self.vms, self.memory_mib, self.shared_percent
            ),
            "time since the VMs started (s)",
            "GiB",
        );
        for r in &self.runs {
            plot = plot.series(
                &r.policy,
                r.timeline
                    .iter()
                    .map(|m| (m.t_ms / 1e3, m.pool_resident_bytes as f64 / (MIB * 1024.0)))
                    .collect(),
            );
        }
        let guest_gib = (self.vms * self.memory_mib) as f64 / 1024.0;
        vec![Plot {
            name: "memory".into(),
            title: "host memory held by guest pages over time".into(),
            svg: plot.reference_line(guest_gib, "guest RAM").render(),
        }]
    }

    fn markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                vec![
                    r.policy.clone(),
                    format!("{:.0}", r.guest_run_ms),
                    format!("{:.0}", r.wall_ms),
                    format!("{:.0}", r.saved_mib),
                    format!("{} in {} batches", r.merges, r.merge_batches),
                    r.zero_releases.to_string(),
                    format!("{:.0}", r.scanner_cpu_ms),
                    format!("{} / {}", r.vmas_peak, r.vmas_end),
                    format!("{:.0}", r.monitor_anon_peak_mib),
                    format!("{:.0}", r.pool_resident_peak_mib),
                ]
            })
            .collect();
        let numa_rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .filter_map(|r| {
                let n = r.numa.as_ref()?;
                Some(vec![
                    r.policy.clone(),
                    n.samples.to_string(),
                    n.local_percent
                        .map_or("-".to_string(), |l| format!("{l:.1}")),
                    format!("{} ({} replicas)", n.migrations, n.replicas_made),
                    format!("{:.2}", 100.0 * n.sampling_share),
                    format!("{:.2}", 100.0 * n.policy_share),
                    format!("{} ({} pauses)", n.disarmed_runs, n.disarm_pauses),
                    format!("{:.1}", 100.0 * n.vcpu_waiting_share),
                ])
            })
            .collect();
        let numa = if numa_rows.is_empty() {
            String::new()
        } else {
            format!(
                "\n\nNUMA engine on `{}` (memory placed `{}`), all VMs together:\n\n{}",
                self.topology_name,
                self.placement,
                markdown_table(
                    &[
                        "policy",
                        "samples",
                        "local %",
                        "pages migrated",
                        "sampling % of vCPU time",
                        "policy cost % of vCPU time",
                        "runs armed and back",
                        "vCPU waiting for a CPU %",
                    ],
                    &numa_rows,
                )
            )
        };
        let workload = match self.touches {
            0 => format!(
                "`fill` with {} % of each VM's data pages identical across VMs, chosen in blocks of {} frames",
                self.shared_percent, self.shared_run
            ),
            t => format!("`random` with {t} touches each, content of its own"),
        };
        format!(
            "{} VMs x {} MiB on topology `{}`, {workload}.\n\n{}{numa}",
            self.vms,
            self.memory_mib,
            self.topology_name,
            markdown_table(
                &[
                    "policy",
                    "guest run ms (slowest)",
                    "wall ms",
                    "saved MiB",
                    "merges",
                    "zero pages released",
                    "scanner CPU ms",
                    "VMAs peak / end",
                    "monitor RssAnon MiB",
                    "pools' host memory peak MiB",
                ],
                &rows,
            )
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
