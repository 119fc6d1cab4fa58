//! `disco bench locality`: VMs placed badly on the emulated 4-node fixture
//! (every VM's memory on a node two hops from its vCPUs), run once under
//! each shipped policy. The NUMA engine's own page-fault samples give the
//! local-access fraction and the modelled memory cost (distance-weighted)
//! over time; the static baseline samples the same way but moves nothing
//! (its policy with `sampling = "page-faults"`).
//!
//! Headline: the local fraction after convergence (the last quarter of the
//! epochs with samples) per policy; the goal for `disco` is >= 90 %.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::svg::LinePlot;
use super::{markdown_table_aligned, progress_bar, HostInfo};
use crate::config::{Config, SHIPPED_POLICIES};
use crate::monitor::{self, RunOptions};
use crate::report::RunReport;

#[derive(Clone, Debug)]
pub struct LocalityOptions {
    pub vms: usize,
    pub memory_mib: u64,
    /// Sweep passes per VM (the run length).
    pub passes: u32,
    /// Topology fixture.
    pub topology: String,
    /// Shipped policies to compare.
    pub policies: Vec<String>,
    pub progress: bool,
}

impl LocalityOptions {
    pub fn standard(quick: bool) -> LocalityOptions {
        LocalityOptions {
            vms: if quick { 4 } else { 8 },
            memory_mib: 4,
            passes: if quick { 600 } else { 3000 },
            topology: "4-node".into(),
            policies: SHIPPED_POLICIES
                .iter()
                .map(|(n, _)| n.to_string())
                .collect(),
            progress: false,
        }
    }
}

/// One policy's run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRun {
    pub policy: String,
    /// `(ms since start, local fraction)` per epoch with samples.
    pub local_series: Vec<(f64, f64)>,
    /// `(ms since start, modelled cost)` per epoch with samples.
    pub cost_series: Vec<(f64, f64)>,
    /// Local fraction over the first / last quarter of the epochs.
    pub local_first: f64,
    pub local_last: f64,
    pub cost_first: f64,
    pub cost_last: f64,
    pub samples: u64,
    pub migrations: u64,
    pub replicas_made: u64,
    pub freezes: u64,
    /// Longest guest run, ms.
    pub guest_run_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalityResult {
    pub host: HostInfo,
    pub topology: String,
    pub vms: usize,
    pub memory_mib: u64,
    pub passes: u32,
    pub runs: Vec<PolicyRun>,
}

/// The scenario's config: VM `i` runs on node `i % n`, its memory sits on
/// node `(i + n/2) % n` (the far side of the fixture).
pub fn config_text(o: &LocalityOptions, policy: &str, nodes: usize) -> Result<String> {
    let Some((_, text)) = SHIPPED_POLICIES.iter().find(|(n, _)| *n == policy) else {
        bail!("unknown policy {policy}");
    };
    // The shipped policy as an inline table, with sampling forced on so a
    // policy that moves nothing (static) is measured the same way.
    let mut policy_table: toml::Table = toml::from_str(text).context("shipped policy")?;
    policy_table
        .entry("numa")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("[numa]")?
        .insert("sampling".into(), toml::Value::String("page-faults".into()));
    let mut doc = toml::Table::new();
    doc.insert("policy".into(), toml::Value::Table(policy_table));
    let mut out = toml::to_string(&doc)?;
    out += &format!("[host]\ntopology = \"{}\"\n", o.topology);
    for i in 0..o.vms {
        out += &format!(
            "[[vm]]\nname = \"vm{i}\"\nnode = {}\nmemory_node = {}\nmemory_mib = {}\n\
             workload = {{ kind = \"sweep\", seed = {}, passes = {} }}\ntime_limit_s = 600\n",
            i % nodes,
            (i + nodes / 2) % nodes,
            o.memory_mib,
            100 + i,
            o.passes
        );
    }
    Ok(out)
}

fn weighted(
    points: &[&crate::numa::runner::EpochLocality],
    f: fn(&crate::numa::runner::EpochLocality) -> f64,
) -> f64 {
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

fn policy_run(policy: &str, report: &RunReport) -> Result<PolicyRun> {
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
    let points: Vec<_> = numa
        .series
        .iter()
        .filter(|e| e.locality_samples > 0)
        .collect();
    if points.len() < 4 {
        bail!("policy {policy}: only {} epochs with samples", points.len());
    }
    let q = (points.len() / 4).max(1);
    let (first, last) = (&points[..q], &points[points.len() - q..]);
    Ok(PolicyRun {
        policy: policy.to_string(),
        local_series: points.iter().map(|e| (e.ms, e.local_fraction)).collect(),
        cost_series: points.iter().map(|e| (e.ms, e.modelled_cost)).collect(),
        local_first: weighted(first, |e| e.local_fraction),
        local_last: weighted(last, |e| e.local_fraction),
        cost_first: weighted(first, |e| e.modelled_cost),
        cost_last: weighted(last, |e| e.modelled_cost),
        samples: numa.samples,
        migrations: numa.migrations,
        replicas_made: numa.replicas_made,
        freezes: numa.freezes,
        guest_run_ms: report.vms.iter().map(|v| v.run_ms).fold(0.0, f64::max),
    })
}

pub fn run(o: &LocalityOptions) -> Result<LocalityResult> {
    let topology = crate::topology::Topology::from_fixture_name(&o.topology)?;
    let bar = progress_bar(o.policies.len() as u64, o.progress);
    let mut runs = Vec::new();
    for policy in &o.policies {
        bar.set_message(format!("policy {policy}"));
        let text = config_text(o, policy, topology.node_count())?;
        let config = Config::parse(&text, "<bench locality>", Path::new("."))
            .with_context(|| format!("the locality config for policy {policy}"))?;
        let report = monitor::run(
            &config,
            &RunOptions {
                progress: false,
                ..RunOptions::default()
            },
        )?;
        runs.push(policy_run(policy, &report)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(LocalityResult {
        host: HostInfo::detect(),
        topology: o.topology.clone(),
        vms: o.vms,
        memory_mib: o.memory_mib,
        passes: o.passes,
        runs,
    })
}

impl LocalityResult {
    pub fn render_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                vec![
                    r.policy.clone(),
                    format!("{:.0} %", 100.0 * r.local_first),
                    format!("{:.0} %", 100.0 * r.local_last),
                    format!("{:.2} -> {:.2}", r.cost_first, r.cost_last),
                    r.migrations.to_string(),
                    r.replicas_made.to_string(),
                    r.freezes.to_string(),
                    r.samples.to_string(),
                    format!("{:.0}", r.guest_run_ms),
                ]
            })
            .collect();
        format!(
            "locality: {} VMs x {} MiB (sweep, {} passes) on the {} fixture, memory two hops from the vCPUs\n\n{}\nLocal = sampled accesses to a page on the accessing vCPU's node; first/last = first/last quarter of the epochs. Cost = distance-weighted (1.0 = all local). {}\n",
            self.vms,
            self.memory_mib,
            self.passes,
            self.topology,
            markdown_table_aligned(
                &[
                    "policy",
                    "local (first)",
                    "local (last)",
                    "modelled cost",
                    "migrated",
                    "replicas",
                    "frozen",
                    "samples",
                    "guest ms"
                ],
                1,
                &rows
            ),
            self.host.describe()
        )
    }

    pub fn plot(&self) -> LinePlot {
        let mut plot = LinePlot::new(
            "Local accesses over time, VMs placed badly",
            "time since start (ms)",
            "local fraction of sampled accesses",
        )
        .reference_line(0.9, "goal 90 %");
        for r in &self.runs {
            plot = plot.series(&r.policy, r.local_series.clone());
        }
        plot
    }

    /// Writes locality.json, locality.md and locality.svg into `dir`.
    pub fn write_outputs(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("locality.json");
        let md = dir.join("locality.md");
        let svg = dir.join("locality.svg");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)?;
        std::fs::write(
            &md,
            format!(
                "## NUMA locality per policy\n\n{}\n![local fraction over time](locality.svg)\n",
                self.render_table()
            ),
        )?;
        self.plot().write(&svg)?;
        Ok(vec![json, md, svg])
    }
}
