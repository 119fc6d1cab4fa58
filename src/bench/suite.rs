//! The benchmark suite: scenario files in, a results folder out.
//!
//! `disco bench all` (and `disco bench NAME`, `disco bench run FILE.toml`)
//! reads scenario files ([`super::params`]), runs each through its kind's
//! code, and writes into one folder (default
//! `bench-results/<date>-<commit>/`):
//!
//! * `<scenario>.json`: a [`ScenarioRecord`]: the machine, the commit, the
//!   parameters in effect, the policies used (with their text), the seeds,
//!   every figure (median, min, max, all samples; unit; which direction is
//!   better) and each run's raw result;
//! * `<scenario>-<plot>.svg`: the scenario's plots;
//! * `report.md`: every scenario record in the folder, rendered (rewritten
//!   after each scenario, so running one scenario into an existing folder
//!   updates its part).
//!
//! # Adding a scenario kind
//! 1. a module with a `prepare` function reading its keys from [`Params`]
//!    and returning a [`Scenario`] whose `run(seed, progress)` returns a
//!    [`ScenarioResult`] (figures, plots, Markdown, JSON);
//! 2. one entry in [`KINDS`];
//! 3. one file in `benches/scenarios/` (embedded at build time).
//!
//! DEVELOPERS.md walks through it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::machine::{utc_now, MachineInfo, GIT_COMMIT};
use super::params::{ParamResult, Params};
use super::{markdown_table_aligned, Stats};

include!(concat!(env!("OUT_DIR"), "/bench_scenarios.rs"));

/// Which way a figure should move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// Smaller is better (times, CPU, memory, overhead ratios).
    Lower,
    /// Larger is better (rates, savings).
    Higher,
    /// Neither: a reference or context figure (e.g. KSM's own time); a
    /// change is shown, never called a regression.
    Neither,
}

impl Better {
    pub fn word(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
            Better::Neither => "-",
        }
    }
}

/// One named figure of a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Unique within the scenario; what `compare` matches on.
    pub name: String,
    pub unit: String,
    pub better: Better,
    /// Shown in the report's headline table (and the README's).
    #[serde(default)]
    pub headline: bool,
    /// `None`: not measured in this run (e.g. a steady state never
    /// reached); the report says so.
    pub stats: Option<Stats>,
}

impl Figure {
    /// A figure from repeated measurements.
    pub fn new(name: &str, unit: &str, better: Better, stats: Stats) -> Figure {
        Figure {
            name: name.to_string(),
            unit: unit.to_string(),
            better,
            headline: false,
            stats: Some(stats),
        }
    }

    /// A figure measured once.
    pub fn value(name: &str, unit: &str, better: Better, v: f64) -> Figure {
        Figure::new(name, unit, better, Stats::of(&[v]))
    }

    /// A figure measured once, or not at all.
    pub fn maybe(name: &str, unit: &str, better: Better, v: Option<f64>) -> Figure {
        Figure {
            stats: v.map(|v| Stats::of(&[v])),
            ..Figure::value(name, unit, better, 0.0)
        }
    }

    /// Marks the figure as a headline figure.
    pub fn headline(mut self) -> Figure {
        self.headline = true;
        self
    }

    /// `median (min-max)`, with decimals suited to the magnitude.
    pub fn show(&self) -> String {
        match &self.stats {
            None => "not measured".into(),
            Some(s) => {
                let d = decimals(s.median);
                if s.n > 1 {
                    s.show(d)
                } else {
                    format!("{:.d$}", s.median)
                }
            }
        }
    }
}

/// Decimals for a value: 3 significant digits, at most 3 decimals.
pub fn decimals(v: f64) -> usize {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    }
}

/// One plot: an SVG document and a title.
#[derive(Clone, Debug, PartialEq)]
pub struct Plot {
    /// File name part: the file is `<scenario>-<name>.svg`.
    pub name: String,
    pub title: String,
    pub svg: String,
}

/// What one run of a scenario (one seed) produced.
pub trait ScenarioResult {
    /// Every figure, each with its unit and better direction. The same
    /// names on every run of a scenario (they are pooled over seeds).
    fn figures(&self) -> Vec<Figure>;
    /// Plots (may be empty).
    fn plots(&self) -> Vec<Plot>;
    /// The scenario's own tables, in Markdown.
    fn markdown(&self) -> String;
    /// Every raw figure, as JSON.
    fn json(&self) -> serde_json::Value;
}

/// A scenario ready to run (parameters validated).
pub trait Scenario {
    /// Runs it once with `seed`. Long runs should show a bar from
    /// `progress.bar(..)` or phase lines from `progress.say(..)`.
    fn run(&self, seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>>;
    /// Policies used (shipped names or `.toml` paths), recorded with their
    /// text in the result.
    fn policies(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Progress output for scenarios: indicatif bars and phase lines on stderr,
/// or nothing.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub show: bool,
}

impl Progress {
    pub fn hidden() -> Progress {
        Progress { show: false }
    }
    /// A bar of `len` steps.
    pub fn bar(&self, len: u64) -> ProgressBar {
        super::progress_bar(len, self.show)
    }
    /// A phase line.
    pub fn say(&self, what: &str) {
        if self.show {
            eprintln!("  {what}");
        }
    }
}

/// Reads a scenario kind's keys and returns the scenario.
pub type Prepare = fn(&Params) -> ParamResult<Box<dyn Scenario>>;

/// A scenario kind: the code behind `kind = "..."` in scenario files.
pub struct Kind {
    pub name: &'static str,
    pub about: &'static str,
    pub prepare: Prepare,
}

/// Every scenario kind. Add yours here.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "density",
        about: "create and start many micro-VMs: VMs per second, host memory per VM beyond guest RAM",
        prepare: super::density::prepare,
    },
    Kind {
        name: "overhead",
        about: "the same workloads run by disco and by a bare-KVM runner: ratios of wall and guest time",
        prepare: super::overhead::prepare,
    },
    Kind {
        name: "sharing",
        about: "disco's copy-on-write page sharing vs Linux KSM on the same guests (needs root)",
        prepare: super::sharing::prepare,
    },
    Kind {
        name: "migration",
        about: "page migration between node pools: batched and single-page pages/s against memcpy, guest slowdown",
        prepare: super::migration::prepare,
    },
    Kind {
        name: "locality",
        about: "VMs whose memory starts far from their vCPUs, under each policy: local-access fraction and modelled cost over time, migrations",
        prepare: super::locality::prepare,
    },
    Kind {
        name: "scale",
        about: "many VMs of real size with mostly identical content under each policy: run time, savings, kernel mappings, monitor memory, host memory over time",
        prepare: super::scale::prepare,
    },
    Kind {
        name: "api",
        about: "the REST API with many micro-VMs running: GET / PUT latency p50 and p99, VMs created and started per second through it against disco run",
        prepare: super::api::prepare,
    },
    Kind {
        name: "clone",
        about: "K micro-VMs cloned from one snapshot, each running: clones started per second against Firecracker's 5-8 ms restore, new host memory per clone before it writes",
        prepare: super::clone::prepare,
    },
    Kind {
        name: "live-migration",
        about: "a running micro-VM moved between two monitors over TCP: downtime, bytes sent over distinct pages, a sharing pair together against one at a time",
        prepare: super::live_migration::prepare,
    },
    Kind {
        name: "replication",
        about: "VMs on different nodes reading one shared table, under each policy: locality over time, replicas, their memory, the write break",
        prepare: super::replication::prepare,
    },
];

/// A scenario file's text and where it came from.
#[derive(Clone, Debug)]
pub struct ScenarioFile {
    /// A path, or `shipped:<file name>` for embedded ones.
    pub source: String,
    pub text: String,
}

impl ScenarioFile {
    /// The scenarios embedded from `benches/scenarios/`.
    pub fn shipped() -> Vec<ScenarioFile> {
        SHIPPED_SCENARIOS
            .iter()
            .map(|(name, text)| ScenarioFile {
                source: format!("shipped:{name}"),
                text: text.to_string(),
            })
            .collect()
    }

    pub fn read(path: &Path) -> Result<ScenarioFile> {
        Ok(ScenarioFile {
            source: path.display().to_string(),
            text: crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES)
                .map_err(|e| anyhow::anyhow!("{}: scenario file {e}", path.display()))?,
        })
    }

    /// Every `*.toml` of `dir`, sorted by name.
    pub fn read_dir(dir: &Path) -> Result<Vec<ScenarioFile>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list the scenario directory", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            bail!(
                "{}: no scenario files (*.toml) in this directory",
                dir.display()
            );
        }
        paths.iter().map(|p| ScenarioFile::read(p)).collect()
    }

    /// Parses and validates the file, its `[quick]` variant included
    /// whichever mode is asked for; runs nothing.
    pub fn load(&self, quick: bool, overrides: &[String]) -> Result<Loaded> {
        if !quick {
            self.load_mode(true, overrides)?;
        }
        self.load_mode(quick, overrides)
    }

    fn load_mode(&self, quick: bool, overrides: &[String]) -> Result<Loaded> {
        let params = Params::parse(&self.text, &self.source, quick, overrides)?;
        let kind = KINDS
            .iter()
            .find(|k| k.name == params.kind())
            .ok_or_else(|| {
                params.error(
                    "kind",
                    format!(
                        "`{}` is not a scenario kind; allowed: {}",
                        params.kind(),
                        KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
        let seeds = params.seeds(&[1])?;
        let scenario = (kind.prepare)(&params)?;
        params.finish()?;
        Ok(Loaded {
            params,
            seeds,
            scenario,
        })
    }
}

/// A validated scenario.
pub struct Loaded {
    pub params: Params,
    pub seeds: Vec<u64>,
    pub scenario: Box<dyn Scenario>,
}

/// A policy a scenario used, with its text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyUsed {
    pub name: String,
    /// `shipped:<name>` or the file's path.
    pub source: String,
    pub text: String,
}

impl PolicyUsed {
    fn of(policy: &str) -> PolicyUsed {
        if let Some((name, text)) = crate::config::SHIPPED_POLICIES
            .iter()
            .find(|(n, _)| *n == policy)
        {
            return PolicyUsed {
                name: name.to_string(),
                source: format!("shipped:{name}"),
                text: text.to_string(),
            };
        }
        PolicyUsed {
            name: policy.to_string(),
            source: policy.to_string(),
            text: crate::files::read_text(Path::new(policy), crate::files::MAX_CONFIG_BYTES)
                .unwrap_or_else(|e| format!("(policy file {policy} {e})")),
        }
    }
}

/// One run of a scenario (one seed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub seed: u64,
    pub duration_s: f64,
    pub figures: Vec<Figure>,
    /// The scenario's own tables.
    pub markdown: String,
    /// Every raw figure.
    pub result: serde_json::Value,
}

/// `<scenario>.json` in a results folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRecord {
    /// Version of this layout.
    pub format: u32,
    pub scenario: String,
    pub kind: String,
    pub description: String,
    /// The scenario file (`shipped:<name>` or a path).
    pub source: String,
    /// The scenario file's text.
    pub source_text: String,
    pub quick: bool,
    pub started_utc: String,
    pub duration_s: f64,
    /// The commit the binary was built from.
    pub git_commit: String,
    pub command: String,
    pub machine: MachineInfo,
    /// Every parameter in effect (file, `[quick]` and `--set` merged).
    pub params: serde_json::Value,
    pub seeds: Vec<u64>,
    pub policies: Vec<PolicyUsed>,
    /// Each figure pooled over the runs (all seeds' samples).
    pub figures: Vec<Figure>,
    /// SVG files written next to this one.
    pub plots: Vec<String>,
    pub runs: Vec<RunRecord>,
}

pub const RECORD_FORMAT: u32 = 1;

impl ScenarioRecord {
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }
}

/// Pools the figures of several runs: same name, samples concatenated.
/// A figure with a non-finite sample is reported as not measured.
fn pool(runs: &[Vec<Figure>]) -> Vec<Figure> {
    let mut out: Vec<Figure> = Vec::new();
    for figures in runs {
        for f in figures {
            let samples: Vec<f64> = f.stats.as_ref().map_or(Vec::new(), |s| s.samples.clone());
            match out.iter_mut().find(|o| o.name == f.name) {
                Some(o) => {
                    let mut all = o.stats.as_ref().map_or(Vec::new(), |s| s.samples.clone());
                    all.extend(samples);
                    o.stats = (!all.is_empty()).then(|| Stats::of(&all));
                }
                None => out.push(Figure {
                    stats: (!samples.is_empty()).then(|| Stats::of(&samples)),
                    ..f.clone()
                }),
            }
        }
    }
    for f in &mut out {
        if f.stats
            .as_ref()
            .is_some_and(|s| s.samples.iter().any(|v| !v.is_finite()))
        {
            f.stats = None;
        }
    }
    out
}

/// The default results folder: `bench-results/<UTC date>-<commit>`.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from("bench-results").join(format!("{}-{}", &utc_now()[..10], GIT_COMMIT))
}

/// What a suite run did.
pub struct SuiteOutcome {
    pub out_dir: PathBuf,
    pub records: Vec<ScenarioRecord>,
    /// (scenario, error) of scenarios that failed.
    pub failures: Vec<(String, String)>,
}

/// Runs every loaded scenario, writing into `out_dir` as it goes. A failed
/// scenario is reported and the others still run.
pub fn run_suite(
    loaded: &[Loaded],
    out_dir: &Path,
    progress: Progress,
    command: &str,
) -> Result<SuiteOutcome> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating the results folder {}", out_dir.display()))?;
    let mut names = std::collections::BTreeSet::new();
    for l in loaded {
        if !names.insert(l.params.name()) {
            bail!(
                "{}: scenario name `{}` is used twice in this run; give one a `name`",
                l.params.file(),
                l.params.name()
            );
        }
    }
    let machine = MachineInfo::detect();
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for (i, l) in loaded.iter().enumerate() {
        let p = &l.params;
        if progress.show {
            eprintln!(
                "[{}/{}] {} ({}, {}{}, seeds {:?})",
                i + 1,
                loaded.len(),
                p.name(),
                p.kind(),
                p.file(),
                if p.quick() { ", quick" } else { "" },
                l.seeds
            );
        }
        let failed_file = out_dir.join(format!("{}{FAILED_SUFFIX}", p.name()));
        match run_one(l, &machine, out_dir, progress, command) {
            Ok(r) => {
                // A rerun into the same folder: the old failure is gone.
                let _ = std::fs::remove_file(&failed_file);
                records.push(r)
            }
            Err(e) => {
                eprintln!("disco bench: scenario {} failed: {e:#}", p.name());
                // Kept in the folder, so the report says what is missing
                // and why long after the terminal is gone.
                std::fs::write(
                    &failed_file,
                    format!("{} ({}): {e:#}\n", p.name(), p.file()),
                )
                .with_context(|| format!("writing {}", failed_file.display()))?;
                failures.push((p.name().to_string(), format!("{e:#}")));
            }
        }
        write_report(out_dir)?;
    }
    Ok(SuiteOutcome {
        out_dir: out_dir.to_path_buf(),
        records,
        failures,
    })
}

fn run_one(
    l: &Loaded,
    machine: &MachineInfo,
    out_dir: &Path,
    progress: Progress,
    command: &str,
) -> Result<ScenarioRecord> {
    let p = &l.params;
    let started_utc = utc_now();
    let t0 = Instant::now();
    let mut runs = Vec::new();
    let mut plots = Vec::new();
    for &seed in &l.seeds {
        if progress.show && l.seeds.len() > 1 {
            eprintln!("  seed {seed}");
        }
        let t = Instant::now();
        let result = l
            .scenario
            .run(seed, &progress)
            .with_context(|| format!("{} (seed {seed})", p.name()))?;
        let duration_s = t.elapsed().as_secs_f64();
        for plot in result.plots() {
            let file = if l.seeds.len() > 1 {
                format!("{}-{}-seed{seed}.svg", p.name(), plot.name)
            } else {
                format!("{}-{}.svg", p.name(), plot.name)
            };
            std::fs::write(out_dir.join(&file), &plot.svg)
                .with_context(|| format!("writing {}", out_dir.join(&file).display()))?;
            plots.push(file);
        }
        runs.push(RunRecord {
            seed,
            duration_s,
            figures: result.figures(),
            markdown: result.markdown(),
            result: result.json(),
        });
    }
    let figures = pool(&runs.iter().map(|r| r.figures.clone()).collect::<Vec<_>>());
    let record = ScenarioRecord {
        format: RECORD_FORMAT,
        scenario: p.name().to_string(),
        kind: p.kind().to_string(),
        description: p.description().to_string(),
        source: p.file().to_string(),
        source_text: String::new(),
        quick: p.quick(),
        started_utc,
        duration_s: t0.elapsed().as_secs_f64(),
        git_commit: GIT_COMMIT.to_string(),
        command: command.to_string(),
        machine: machine.clone(),
        params: p.to_json(),
        seeds: l.seeds.clone(),
        policies: l
            .scenario
            .policies()
            .iter()
            .map(|s| PolicyUsed::of(s))
            .collect(),
        figures,
        plots,
        runs,
    };
    let record = ScenarioRecord {
        source_text: scenario_text(p.file()),
        ..record
    };
    let path = out_dir.join(format!("{}.json", p.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(record)
}

/// The text of a scenario file by its source name.
fn scenario_text(source: &str) -> String {
    if let Some(name) = source.strip_prefix("shipped:") {
        return SHIPPED_SCENARIOS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(String::new(), |(_, t)| t.to_string());
    }
    std::fs::read_to_string(source).unwrap_or_default()
}

/// Every scenario record (`*.json` with a `format` and `figures`) of a
/// results folder, sorted by scenario name.
pub fn read_records(dir: &Path) -> Result<Vec<ScenarioRecord>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the results folder", dir.display()))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        if value.get("format").is_none() || value.get("figures").is_none() {
            continue; // not a scenario record (e.g. another tool's file)
        }
        let record: ScenarioRecord = serde_json::from_value(value)
            .with_context(|| format!("{}: not a scenario record", path.display()))?;
        out.push(record);
    }
    out.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    Ok(out)
}

/// Names a scenario's error in a results folder: `<scenario>.failed.txt`.
const FAILED_SUFFIX: &str = ".failed.txt";

/// The failures recorded in `dir` (`<scenario>.failed.txt`), by name:
/// (scenario, what its file says).
pub fn read_failures(dir: &Path) -> Result<Vec<(String, String)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the results folder", dir.display()))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(scenario) = name.strip_suffix(FAILED_SUFFIX) {
            let text = std::fs::read_to_string(e.path())
                .with_context(|| format!("reading {}", e.path().display()))?;
            out.push((scenario.to_string(), text.trim_end().to_string()));
        }
    }
    out.sort();
    Ok(out)
}

/// Rewrites `report.md` from every record in `dir`, with the scenarios that
/// failed first.
pub fn write_report(dir: &Path) -> Result<PathBuf> {
    let records = read_records(dir)?;
    let failures = read_failures(dir)?;
    let mut text = render_report(&records);
    if !failures.is_empty() {
        let mut section = String::from(
            "## Failed scenarios\n\nThese stopped with an error and have no figures in this report.\n\n",
        );
        for (name, why) in &failures {
            section += &format!("`{name}`:\n\n```text\n{why}\n```\n\n");
        }
        let at = text.find("\n\n").map_or(text.len(), |i| i + 2);
        text.insert_str(at, &section);
    }
    let path = dir.join("report.md");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A figure table: name, median (min-max), unit, n, better.
pub fn figure_table(figures: &[&Figure], scenario_column: Option<&[&str]>) -> String {
    let mut headers = vec![];
    if scenario_column.is_some() {
        headers.push("scenario");
    }
    headers.extend(["figure", "median (min-max)", "unit", "n", "better"]);
    let rows: Vec<Vec<String>> = figures
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut row = vec![];
            if let Some(s) = scenario_column {
                row.push(s[i].to_string());
            }
            row.extend([
                f.name.clone(),
                f.show(),
                f.unit.clone(),
                f.stats.as_ref().map_or("0".into(), |s| s.n.to_string()),
                f.better.word().to_string(),
            ]);
            row
        })
        .collect();
    let text_cols = if scenario_column.is_some() { 2 } else { 1 };
    markdown_table_aligned(&headers, text_cols, &rows)
}

/// The headline table: every headline figure of every record.
pub fn headline_table(records: &[ScenarioRecord]) -> String {
    let mut figs = Vec::new();
    let mut names = Vec::new();
    for r in records {
        for f in r.figures.iter().filter(|f| f.headline) {
            figs.push(f);
            names.push(r.scenario.as_str());
        }
    }
    figure_table(&figs, Some(&names))
}

/// `report.md`.
pub fn render_report(records: &[ScenarioRecord]) -> String {
    let mut out = String::from("# disco benchmark results\n\n");
    if records.is_empty() {
        out += "No scenario results in this folder.\n";
        return out;
    }
    let commits: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.git_commit.as_str()).collect();
    let first = records
        .iter()
        .map(|r| r.started_utc.as_str())
        .min()
        .unwrap_or("");
    let modes: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| if r.quick { "quick" } else { "full" })
        .collect();
    out += &format!(
        "Commit `{}`; started {}; mode {}; {} scenario(s).\n\n",
        commits.into_iter().collect::<Vec<_>>().join("`, `"),
        first,
        modes.into_iter().collect::<Vec<_>>().join(" and "),
        records.len()
    );
    let m = &records[0].machine;
    out += &format!("Machine: {}.\n\n", m.describe());
    for r in &records[1..] {
        let d = m.differences(&r.machine);
        if !d.is_empty() {
            out += &format!(
                "**{} ran on another machine**: {}.\n\n",
                r.scenario,
                d.join("; ")
            );
        }
    }
    out += "Commands: ";
    let cmds: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.command.as_str()).collect();
    out += &cmds
        .into_iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    out += "\n\n## Headline figures\n\n";
    out += &headline_table(records);
    out += "\nmedian (min-max) over every repetition and seed; n is the number of samples.\n";
    for r in records {
        out += &format!("\n## {}\n\n", r.scenario);
        if !r.description.is_empty() {
            out += &format!("{}\n\n", r.description);
        }
        out += &format!(
            "Kind `{}`, scenario file `{}`{}, seeds {:?}, {:.1} s, started {}.",
            r.kind,
            r.source,
            if r.quick { " (quick)" } else { "" },
            r.seeds,
            r.duration_s,
            r.started_utc
        );
        if !r.policies.is_empty() {
            out += &format!(
                " Policies: {}.",
                r.policies
                    .iter()
                    .map(|p| format!("{} ({})", p.name, p.source))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out += "\n\n";
        out += &figure_table(&r.figures.iter().collect::<Vec<_>>(), None);
        out += "\n";
        for p in &r.plots {
            out += &format!("![{p}]({p})\n\n");
        }
        for run in &r.runs {
            out += &format!(
                "<details><summary>{}: full tables (seed {})</summary>\n\n{}\n</details>\n\n",
                r.scenario, run.seed, run.markdown
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_are_valid() {
        let files = ScenarioFile::shipped();
        assert!(files.len() >= 3, "{files:?}");
        for f in files {
            for quick in [false, true] {
                f.load(quick, &[])
                    .unwrap_or_else(|e| panic!("{} (quick {quick}): {e:#}", f.source));
            }
        }
    }

    #[test]
    fn unknown_kind_names_the_kinds() {
        let f = ScenarioFile {
            source: "x.toml".into(),
            text: "kind = \"nope\"\n".into(),
        };
        let e = format!("{:#}", f.load(false, &[]).err().unwrap());
        assert!(
            e.starts_with("x.toml: key `kind`: `nope` is not a scenario kind; allowed: density"),
            "{e}"
        );
    }

    #[test]
    fn pooling_concatenates_samples() {
        let a = vec![Figure::value("t", "ms", Better::Lower, 1.0)];
        let b = vec![Figure::value("t", "ms", Better::Lower, 3.0)];
        let p = pool(&[a, b]);
        assert_eq!(p[0].stats.as_ref().unwrap().samples, vec![1.0, 3.0]);
        let c = vec![Figure::value("t", "ms", Better::Lower, f64::NAN)];
        assert!(pool(&[c])[0].stats.is_none());
    }
}
