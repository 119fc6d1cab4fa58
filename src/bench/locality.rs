//! Scenario kind `locality`: VMs placed badly on an emulated NUMA fixture
//! (every VM's memory away from its vCPUs), run under each policy. The NUMA
//! engine's own page-fault samples give the local-access fraction and the
//! modelled memory cost (distance-weighted) over time; a policy that moves
//! nothing (static) samples the same way (its policy with
//! `sampling = "page-faults"`) and is the baseline.
//!
//! Keys (`benches/scenarios/locality.toml` documents each): `vms`, `vcpus`,
//! `memory_mib`, `workload`, `passes`, `policies`, `topology`, `placement`,
//! `reps`, `goal`.
//!
//! Figures, per policy, each over the repetitions: local fraction of the
//! first and last quarter of the epochs with samples, modelled cost of both,
//! pages migrated, replicas made, and the time until the local fraction
//! first reaches the goal (default 90 %) over a window of
//! [`GOAL_WINDOW`] epochs (not measured when it never does). Plots: local
//! fraction and modelled cost over time, one line per policy.
//!
//! The helpers here (policy tables with sampling forced, the summary of a
//! locality series) are shared with the `replication` kind.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{config_doc, config_from_doc, markdown_table_aligned, HostInfo, Stats};
use crate::config::SHIPPED_POLICIES;
use crate::config::{At, ConfigFile, NumaSpec, PolicyRef, VmSpec, WorkloadSpec};
use crate::monitor::{self, RunOptions};
use crate::numa::runner::{EpochLocality, NumaStats};
use crate::report::RunReport;
use crate::topology::Topology;

/// Epochs over which the local fraction must reach the goal (weighted by
/// their samples): one epoch alone has a few dozen samples and may be lucky.
pub const GOAL_WINDOW: usize = 3;

/// Where each VM's memory starts, relative to its vCPUs' node.
pub const PLACEMENTS: &[&str] = &["opposite", "farthest", "first-node", "local"];

/// The node whose pool backs the memory of a VM whose vCPUs run on `node`.
/// * `opposite`: `(node + n/2) % n` (two hops on the 4-node fixture);
/// * `farthest`: the node at the greatest distance (the lowest on a tie);
/// * `first-node`: node 0 for every VM;
/// * `local`: the vCPUs' node (the good placement, for reference).
pub fn memory_node(placement: &str, node: usize, topology: &Topology) -> usize {
    let n = topology.node_count();
    match placement {
        "opposite" => (node + n / 2) % n,
        "farthest" => {
            let row = &topology.distances[node];
            (0..n).fold(node, |best, m| if row[m] > row[best] { m } else { best })
        }
        "first-node" => 0,
        _ => node,
    }
}

/// A policy (shipped name or `.toml` path) as a document to inline in a
/// config, with `[numa] sampling` set to `sampling` (so a policy that
/// moves nothing still measures locality), and `trace_file` when given.
pub fn policy_spec(policy: &str, sampling: &str, trace_file: Option<&Path>) -> Result<PolicyRef> {
    let (mut spec, _, name) =
        crate::config::policy_spec(policy, Path::new("."), At::new("", ""), "policy")?;
    spec.name.get_or_insert(name);
    let numa = spec.numa.get_or_insert_with(NumaSpec::default);
    numa.sampling = Some(sampling.to_string());
    numa.trace_file = trace_file.map(|t| t.display().to_string());
    Ok(PolicyRef::Inline(Box::new(spec)))
}

/// A `workload` inline table's text with `seed` (and, for a sweep,
/// `passes`) set when the table does not give them.
pub fn workload_with(table_text: &str, seed: u64, passes: Option<u64>) -> Result<WorkloadSpec> {
    let mut w =
        crate::config::schema::workload_from_toml(table_text, super::BENCH_CONFIG, "workload")?;
    let kind = w.kind.clone().unwrap_or_default();
    if matches!(kind.as_str(), "fill" | "sweep" | "random" | "table_scan") {
        w.seed.get_or_insert(seed as i64);
    }
    if let (Some(p), "sweep") = (passes, kind.as_str()) {
        w.passes.get_or_insert(p as i64);
    }
    Ok(w)
}

/// A locality series boiled down: what every NUMA scenario reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SeriesSummary {
    /// `(ms since start, local fraction)` per epoch with samples.
    pub local_series: Vec<(f64, f64)>,
    /// `(ms since start, modelled cost)` per epoch with samples.
    pub cost_series: Vec<(f64, f64)>,
    /// Locality samples per epoch with samples (the weights).
    pub samples_series: Vec<u64>,
    /// Local fraction / modelled cost over the first and last quarter of
    /// the epochs with samples, weighted by their samples.
    pub local_first: f64,
    pub local_last: f64,
    pub cost_first: f64,
    pub cost_last: f64,
    /// ms since start of the first epoch from which [`GOAL_WINDOW`] epochs
    /// together reach the goal; `None`: never reached.
    pub time_to_goal_ms: Option<f64>,
}

fn weighted(points: &[&EpochLocality], f: fn(&EpochLocality) -> f64) -> f64 {
    let (t, v) = points.iter().fold((0.0, 0.0), |(t, v), e| {
        let w = e.locality_samples as f64;
        (t + w, v + w * f(e))
    });
    if t > 0.0 {
        v / t
    } else {
        f64::NAN
    }
}

impl SeriesSummary {
    /// From the NUMA engine's series; an error when fewer than 4 epochs
    /// had samples (too short a run to say anything). With `per_vm_mean`,
    /// an epoch's local fraction is the mean of the VMs' own fractions
    /// (VMs with samples that epoch) instead of the engine's pooled one:
    /// the sampler spends up to 3/4 of a VM's budget re-checking its remote
    /// pages and only fresh pages count, so a VM with remote pages gets
    /// fewer counted samples than a VM whose pages are all local, and the
    /// pooled fraction leans toward the local VMs when placements differ.
    pub fn of(numa: &NumaStats, goal: f64, per_vm_mean: bool) -> Result<SeriesSummary> {
        let mut points: Vec<EpochLocality> = numa
            .series
            .iter()
            .filter(|e| e.locality_samples > 0)
            .cloned()
            .collect();
        if per_vm_mean {
            for e in &mut points {
                let fr: Vec<f64> = e
                    .per_vm
                    .iter()
                    .filter(|(n, _)| *n > 0)
                    .map(|&(n, l)| l as f64 / n as f64)
                    .collect();
                if !fr.is_empty() {
                    e.local_fraction = fr.iter().sum::<f64>() / fr.len() as f64;
                }
            }
        }
        let points: Vec<&EpochLocality> = points.iter().collect();
        if points.len() < 4 {
            bail!(
                "only {} epochs with locality samples: the run is too short (more passes or lookups)",
                points.len()
            );
        }
        let q = (points.len() / 4).max(1);
        let (first, last) = (&points[..q], &points[points.len() - q..]);
        let time_to_goal_ms = points
            .windows(GOAL_WINDOW.min(points.len()))
            .find(|w| weighted(w, |e| e.local_fraction) >= goal)
            .map(|w| w[0].ms);
        Ok(SeriesSummary {
            local_series: points.iter().map(|e| (e.ms, e.local_fraction)).collect(),
            cost_series: points.iter().map(|e| (e.ms, e.modelled_cost)).collect(),
            samples_series: points.iter().map(|e| e.locality_samples).collect(),
            local_first: weighted(first, |e| e.local_fraction),
            local_last: weighted(last, |e| e.local_fraction),
            cost_first: weighted(first, |e| e.modelled_cost),
            cost_last: weighted(last, |e| e.modelled_cost),
            time_to_goal_ms,
        })
    }
}

/// Stats of `f` over `runs`.
pub fn stats_of<T>(runs: &[&T], f: impl Fn(&T) -> f64) -> Stats {
    Stats::of(&runs.iter().map(|r| f(r)).collect::<Vec<_>>())
}

/// Stats of an optional value: measured only when every run has it.
pub fn stats_all<T>(runs: &[&T], f: impl Fn(&T) -> Option<f64>) -> Option<Stats> {
    let v: Option<Vec<f64>> = runs.iter().map(|r| f(r)).collect();
    v.filter(|v| !v.is_empty()).map(|v| Stats::of(&v))
}

/// `goal` as a figure name part: `90 %`.
pub fn goal_name(goal: f64) -> String {
    format!("{} %", (goal * 100.0 * 10.0).round() / 10.0)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalityOptions {
    pub vms: usize,
    pub vcpus: usize,
    pub memory_mib: u64,
    /// The `workload` inline table (seed per VM added when absent).
    pub workload: String,
    /// Sweep passes when the workload is a sweep without its own.
    pub passes: u64,
    pub topology: String,
    pub policies: Vec<String>,
    pub placement: String,
    pub reps: usize,
    pub goal: f64,
}

impl LocalityOptions {
    /// The scenario's config for one policy: VM `i` runs on node `i % n`,
    /// its memory on [`memory_node`] of that.
    pub fn config(&self, policy: &str, seed: u64, topology: &Topology) -> Result<ConfigFile> {
        let n = topology.node_count();
        let vms = (0..self.vms)
            .map(|i| {
                let node = i % n;
                let workload =
                    workload_with(&self.workload, seed * 1000 + i as u64, Some(self.passes))?;
                Ok(VmSpec {
                    node: Some(node as i64),
                    memory_node: Some(memory_node(&self.placement, node, topology) as i64),
                    time_limit_s: Some(600.0),
                    ..VmSpec::micro(
                        &format!("vm{i}"),
                        self.vcpus as u64,
                        self.memory_mib,
                        workload,
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(config_doc(
            policy_spec(policy, "page-faults", None)?,
            &self.topology,
            vms,
        ))
    }
}

/// One run of one policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalityRun {
    pub policy: String,
    pub rep: usize,
    #[serde(flatten)]
    pub summary: SeriesSummary,
    pub epochs: u64,
    pub samples: u64,
    pub migrations: u64,
    /// Frames that moved along with the sampled pages (their regions).
    #[serde(default)]
    pub region_migrations: u64,
    /// Frames that moved following their VM to its node (policy rule 9).
    #[serde(default)]
    pub follow_migrations: u64,
    pub migration_failures: u64,
    pub replicas_made: u64,
    pub replicas_collapsed: u64,
    pub freezes: u64,
    /// The NUMA engine's sample source, as the report gives it.
    pub source: String,
    /// Sweep passes of this run: the scenario's, times four for each time
    /// a run was too short to give samples from 4 epochs.
    #[serde(default)]
    pub passes: u64,
    /// Fraction of every VM's pages on its vCPUs' node at the end.
    pub pages_local_at_end: f64,
    /// Longest guest run, ms.
    pub guest_run_ms: f64,
    pub total_ms: f64,
}

impl LocalityRun {
    fn of(policy: &str, rep: usize, report: &RunReport, goal: f64) -> Result<LocalityRun> {
        if !report.all_ok() {
            bail!(
                "policy {policy}: a guest failed or an invariant broke:\n{}",
                report.render_text()
            );
        }
        let numa = report
            .numa
            .as_ref()
            .with_context(|| format!("policy {policy}: the NUMA engine did not run"))?;
        let (mut local, mut all) = (0u64, 0u64);
        for vm in &report.vms {
            let node = vm.vcpus.first().map_or(0, |v| v.node);
            local += vm.pages_per_node.get(node).copied().unwrap_or(0);
            all += vm.pages_per_node.iter().sum::<u64>();
        }
        Ok(LocalityRun {
            policy: policy.to_string(),
            rep,
            summary: SeriesSummary::of(numa, goal, false)
                .with_context(|| format!("policy {policy}"))?,
            epochs: numa.epochs,
            samples: numa.samples,
            migrations: numa.migrations,
            region_migrations: numa.region_migrations,
            follow_migrations: numa.follow_migrations,
            migration_failures: numa.migration_failures,
            replicas_made: numa.replicas_made,
            replicas_collapsed: numa.replicas_collapsed,
            freezes: numa.freezes,
            source: numa.source.clone(),
            passes: 0,
            pages_local_at_end: local as f64 / all.max(1) as f64,
            guest_run_ms: report.vms.iter().map(|v| v.run_ms).fold(0.0, f64::max),
            total_ms: report.total_ms,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalityResult {
    pub host: HostInfo,
    pub seed: u64,
    pub options: LocalityOptions,
    pub runs: Vec<LocalityRun>,
}

/// Runs every policy `reps` times (policies interleaved within a rep).
pub fn run(o: &LocalityOptions, seed: u64, progress: &Progress) -> Result<LocalityResult> {
    let topology = Topology::from_fixture_name(&o.topology)
        .or_else(|_| Topology::from_xml_file(Path::new(&o.topology)))?;
    let bar = progress.bar((o.policies.len() * o.reps) as u64);
    let mut runs = Vec::new();
    for rep in 0..o.reps {
        for policy in &o.policies {
            bar.set_message(format!("locality: {policy}, rep {}", rep + 1));
            // The figures need samples from at least 4 epochs; on a fast
            // host (or one where the sampler backs off early, its pages
            // placed) the guests can finish sooner. Such a run is made
            // again with four times the sweep passes, at most twice.
            let mut opts = o.clone();
            let mut attempt = 1;
            let report = loop {
                let doc = opts.config(policy, seed + rep as u64, &topology)?;
                let config = config_from_doc(doc)
                    .with_context(|| format!("the locality config for policy {policy}"))?;
                let report = monitor::run(&config, &RunOptions::quiet())?;
                let sampled = report.numa.as_ref().map_or(0, |n| {
                    n.series.iter().filter(|e| e.locality_samples > 0).count()
                });
                if sampled >= 4 || attempt == 3 {
                    break report;
                }
                attempt += 1;
                opts.passes = opts.passes.saturating_mul(4);
                bar.set_message(format!(
                    "locality: {policy}, rep {}: {sampled} epochs with samples, again with {} passes",
                    rep + 1,
                    opts.passes
                ));
            };
            let mut run = LocalityRun::of(policy, rep, &report, o.goal)?;
            run.passes = opts.passes;
            runs.push(run);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(LocalityResult {
        host: HostInfo::detect(),
        seed,
        options: o.clone(),
        runs,
    })
}

struct LocalityScenario(LocalityOptions);

/// Keys: see the module doc and `benches/scenarios/locality.toml`.
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let all: Vec<&str> = SHIPPED_POLICIES.iter().map(|(n, _)| *n).collect();
    let o = LocalityOptions {
        vms: p.usize("vms", 1, 64, if p.quick() { 4 } else { 8 })?,
        vcpus: p.usize("vcpus", 1, 8, 1)?,
        memory_mib: p.u64("memory_mib", 2, 1024, 4)?,
        workload: p
            .opt_table_text("workload")?
            .unwrap_or_else(|| "{ kind = \"sweep\" }".into()),
        passes: p.u64("passes", 1, 1_000_000, if p.quick() { 400 } else { 3000 })?,
        topology: p.topology("topology", "4-node")?,
        policies: p.policies("policies", &all)?,
        placement: p.choice("placement", PLACEMENTS, "opposite")?,
        reps: p.usize("reps", 1, 100, 1)?,
        goal: p.f64("goal", 0.01, 1.0, 0.9)?,
    };
    if o.topology == "host" {
        return Err(p.error(
            "topology",
            "`host` has one NUMA node here; allowed: a fixture (4-node, 8-node) or an hwloc XML file"
                .into(),
        ));
    }
    let topology = Topology::from_fixture_name(&o.topology)
        .or_else(|_| Topology::from_xml_file(Path::new(&o.topology)))
        .map_err(|e| p.error("topology", format!("cannot load it: {e:#}")))?;
    for policy in &o.policies {
        let doc = o
            .config(policy, 1, &topology)
            .map_err(|e| super::blame_config_error(p, &e, policy, "policies", "workload"))?;
        config_from_doc(doc)
            .map_err(|e| super::blame_config_error(p, &e, policy, "policies", "workload"))?;
    }
    Ok(Box::new(LocalityScenario(o)))
}

impl Scenario for LocalityScenario {
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        Ok(Box::new(run(&self.0, seed, progress)?))
    }
    fn policies(&self) -> Vec<String> {
        self.0.policies.clone()
    }
}

impl LocalityResult {
    fn of_policy(&self, policy: &str) -> Vec<&LocalityRun> {
        self.runs.iter().filter(|r| r.policy == policy).collect()
    }

    pub fn plot_local(&self) -> LinePlot {
        let mut plot = LinePlot::new(
            &format!(
                "Local accesses over time: {} VMs, memory {} of the vCPUs, {} fixture",
                self.options.vms, self.options.placement, self.options.topology
            ),
            "time since start (ms)",
            "local fraction of sampled accesses",
        )
        .reference_line(
            self.options.goal,
            &format!("goal {}", goal_name(self.options.goal)),
        );
        for r in self.runs.iter().filter(|r| r.rep == 0) {
            plot = plot.series(&r.policy, r.summary.local_series.clone());
        }
        plot
    }
}

impl ScenarioResult for LocalityResult {
    fn figures(&self) -> Vec<Figure> {
        let goal = goal_name(self.options.goal);
        let mut out = Vec::new();
        for policy in &self.options.policies {
            let runs = self.of_policy(policy);
            let s = |f: fn(&LocalityRun) -> f64| stats_of(&runs, f);
            out.push(Figure::new(
                &format!("{policy}: local fraction, first quarter"),
                "fraction",
                Better::Neither,
                s(|r| r.summary.local_first),
            ));
            out.push(
                Figure::new(
                    &format!("{policy}: local fraction, last quarter"),
                    "fraction",
                    Better::Higher,
                    s(|r| r.summary.local_last),
                )
                .headline(),
            );
            out.push(Figure::new(
                &format!("{policy}: modelled cost, first quarter"),
                "x local",
                Better::Neither,
                s(|r| r.summary.cost_first),
            ));
            out.push(Figure::new(
                &format!("{policy}: modelled cost, last quarter"),
                "x local",
                Better::Lower,
                s(|r| r.summary.cost_last),
            ));
            out.push(Figure {
                stats: stats_all(&runs, |r| r.summary.time_to_goal_ms),
                ..Figure::value(
                    &format!("{policy}: time to {goal} local"),
                    "ms",
                    Better::Lower,
                    0.0,
                )
            });
            out.push(Figure::new(
                &format!("{policy}: pages migrated"),
                "pages",
                Better::Neither,
                s(|r| r.migrations as f64),
            ));
            out.push(Figure::new(
                &format!("{policy}: frames moved with their region"),
                "pages",
                Better::Neither,
                s(|r| r.region_migrations as f64),
            ));
            out.push(Figure::new(
                &format!("{policy}: frames moved following their VM"),
                "pages",
                Better::Neither,
                s(|r| r.follow_migrations as f64),
            ));
            out.push(Figure::new(
                &format!("{policy}: replicas made"),
                "pages",
                Better::Neither,
                s(|r| r.replicas_made as f64),
            ));
            out.push(Figure::new(
                &format!("{policy}: guest run"),
                "ms",
                Better::Lower,
                s(|r| r.guest_run_ms),
            ));
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let mut cost = LinePlot::new(
            "Modelled memory cost over time (distance-weighted, 1.0 = all local)",
            "time since start (ms)",
            "modelled cost",
        );
        for r in self.runs.iter().filter(|r| r.rep == 0) {
            cost = cost.series(&r.policy, r.summary.cost_series.clone());
        }
        vec![
            Plot {
                name: "local".into(),
                title: "local fraction over time per policy".into(),
                svg: self.plot_local().render(),
            },
            Plot {
                name: "cost".into(),
                title: "modelled cost over time per policy".into(),
                svg: cost.render(),
            },
        ]
    }

    fn markdown(&self) -> String {
        let o = &self.options;
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                vec![
                    r.policy.clone(),
                    (r.rep + 1).to_string(),
                    format!("{:.0} %", 100.0 * r.summary.local_first),
                    format!("{:.0} %", 100.0 * r.summary.local_last),
                    format!("{:.2} -> {:.2}", r.summary.cost_first, r.summary.cost_last),
                    r.summary
                        .time_to_goal_ms
                        .map_or("not reached".into(), |t| format!("{t:.0}")),
                    format!(
                        "{} + {} + {}",
                        r.migrations, r.region_migrations, r.follow_migrations
                    ),
                    r.replicas_made.to_string(),
                    r.freezes.to_string(),
                    format!("{:.0} %", 100.0 * r.pages_local_at_end),
                    r.samples.to_string(),
                    format!("{:.0}", r.guest_run_ms),
                ]
            })
            .collect();
        format!(
            "locality: {} VMs x {} vCPU x {} MiB (workload {}, sweep passes {}) on the {} fixture, \
             memory placed `{}` from the vCPUs, seed {}\n\n{}\nLocal = sampled accesses (page-fault \
             samples, unbiased random pages) to a page on the accessing vCPU's node; first/last = \
             first/last quarter of the epochs with samples; cost = distance-weighted (1.0 = all \
             local); time to {} = first epoch from which {} epochs together reach it; pages local \
             = each VM's pages on its vCPUs' node at the end. {}\n",
            o.vms,
            o.vcpus,
            o.memory_mib,
            o.workload,
            o.passes,
            o.topology,
            o.placement,
            self.seed,
            markdown_table_aligned(
                &[
                    "policy",
                    "rep",
                    "local (first)",
                    "local (last)",
                    "modelled cost",
                    &format!("ms to {}", goal_name(o.goal)),
                    "migrated (+ with their regions + following their VM)",
                    "replicas",
                    "frozen",
                    "pages local",
                    "samples",
                    "guest ms"
                ],
                1,
                &rows
            ),
            goal_name(o.goal),
            GOAL_WINDOW,
            self.host.describe()
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
