//! The `live-migration` scenario kind (`disco bench live-migration`): two
//! monitors in this process, the target taking migrations on a localhost
//! TCP listener (`crate::migration::Listener`), the source sending through
//! `crate::migration::migrate`, as two `disco serve` processes would.
//!
//! 1. One micro-VM of `mib` MiB sweeping its memory (a read-modify-write
//!    pass after pass, every page written each pass), migrated once its
//!    fill is done: downtime (goal at most 100 ms), bytes sent over its
//!    distinct non-zero pages x 4 KiB (goal at most 1.2), rounds, total
//!    time, the throttle it needed.
//! 2. A pair of micro-VMs of `pair_mib` MiB each reading a table of
//!    `shared_percent` % of their memory filled from one seed (identical
//!    in both; the rest of their memory untouched): migrated together,
//!    then a fresh pair one VM at a time to an emptied target; bytes
//!    together over bytes separately (goal at most 0.6).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use serde::Serialize;

use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::BarPlot;
use super::{config_from_toml, markdown_table, HostInfo};
use crate::config::Config;
use crate::migration::{migrate, Listener, MigrateOptions, MigrationReport};
use crate::monitor::Monitor;

#[derive(Clone, Debug)]
struct LiveMigration {
    mib: u64,
    pair_mib: u64,
    shared_percent: u64,
    topology: String,
}

/// Sweep passes: more than any run lasts (the VM is removed at the end).
const PASSES: u64 = 10_000;

impl LiveMigration {
    fn config_text(&self) -> String {
        let table_pages = self.pair_mib * 256 * self.shared_percent / 100;
        let mut text = format!(
            "policy = \"static\"\n[host]\ntopology = \"{}\"\n\n[[vm]]\nname = \"sweeper\"\n\
             vcpus = 1\nmemory_mib = {}\ntime_limit_s = 3600\n\
             workload = {{ kind = \"sweep\", seed = 1, passes = {PASSES} }}\n",
            self.topology, self.mib
        );
        for name in ["left", "right", "first", "second"] {
            text += &format!(
                "\n[[vm]]\nname = \"{name}\"\nvcpus = 1\nmemory_mib = {}\ntime_limit_s = 3600\n\
                 workload = {{ kind = \"table_scan\", seed = 7, table_pages = {table_pages}, \
                 lookups = 1000000000000, write_after = 0 }}\n",
                self.pair_mib
            );
        }
        text
    }
}

pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let quick = p.quick();
    let s = LiveMigration {
        mib: p.u64("mib", 4, 4096, if quick { 64 } else { 256 })?,
        pair_mib: p.u64("pair_mib", 4, 4096, if quick { 32 } else { 128 })?,
        shared_percent: p.u64("shared_percent", 10, 95, 90)?,
        topology: p.topology("topology", "host")?,
    };
    config_from_toml(&s.config_text())
        .map_err(|e| super::blame_config_error(p, &e, "static", "topology", "mib"))?;
    Ok(Box::new(s))
}

#[derive(Clone, Debug, Serialize)]
struct LiveMigrationResult {
    mib: u64,
    pair_mib: u64,
    shared_percent: u64,
    sweeper: MigrationReport,
    together: MigrationReport,
    separately: Vec<MigrationReport>,
    host: HostInfo,
}

impl LiveMigrationResult {
    fn separate_bytes(&self) -> u64 {
        self.separately.iter().map(|r| r.bytes_sent).sum()
    }
    fn pair_ratio(&self) -> f64 {
        self.together.bytes_sent as f64 / self.separate_bytes().max(1) as f64
    }
}

/// A monitor for `config` whose VMs are added one by one.
fn monitor(config: &Config) -> Result<Arc<Mutex<Monitor>>> {
    let mut m = Monitor::for_config(config, Duration::from_secs(3600))?;
    m.collect_finished(true);
    Ok(Arc::new(Mutex::new(m)))
}

/// Adds VM `name` of `config` to `m` and waits until it has done `done`
/// units of progress.
fn add_running(m: &Arc<Mutex<Monitor>>, config: &Config, name: &str, done: u64) -> Result<()> {
    let vc = config
        .vms
        .iter()
        .find(|v| v.name == name)
        .context("a VM of the scenario")?;
    m.lock()
        .add_vm(vc)
        .map_err(|e| anyhow::anyhow!("adding {name}: {e}"))?;
    let began = Instant::now();
    loop {
        let p = m.lock().vm_info(name)?.progress;
        if p[0] >= done {
            return Ok(());
        }
        if began.elapsed() > Duration::from_secs(120) {
            bail!("{name} made no progress in 120 s ({p:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_all(m: &Arc<Mutex<Monitor>>, names: &[&str]) {
    let mut m = m.lock();
    for n in names {
        let _ = m.remove(n);
    }
}

fn send(source: &Arc<Mutex<Monitor>>, names: &[&str], to: &str) -> Result<MigrationReport> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    migrate(source, &names, to, &MigrateOptions::default()).map_err(|e| anyhow::anyhow!("{e}"))
}

impl Scenario for LiveMigration {
    fn run(&self, _seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let config = config_from_toml(&self.config_text())?;
        let source = monitor(&config)?;
        let target = monitor(&config)?;
        let listener = Listener::start("127.0.0.1:0", target.clone())?;
        let to = listener.local_addr().to_string();

        progress.say(&format!("a {} MiB sweeper", self.mib));
        // Past its fill and one pass: every page holds data.
        let per_pass = self.mib * 256;
        add_running(&source, &config, "sweeper", 2 * per_pass)?;
        let sweeper = send(&source, &["sweeper"], &to)?;
        remove_all(&target, &["sweeper"]);

        progress.say(&format!("a {} MiB pair, together", self.pair_mib));
        add_running(&source, &config, "left", 1)?;
        add_running(&source, &config, "right", 1)?;
        let together = send(&source, &["left", "right"], &to)?;
        remove_all(&target, &["left", "right"]);

        progress.say("a pair, one at a time");
        add_running(&source, &config, "first", 1)?;
        add_running(&source, &config, "second", 1)?;
        let mut separately = Vec::new();
        for name in ["first", "second"] {
            separately.push(send(&source, &[name], &to)?);
            remove_all(&target, &[name]);
        }
        drop(listener);
        Ok(Box::new(LiveMigrationResult {
            mib: self.mib,
            pair_mib: self.pair_mib,
            shared_percent: self.shared_percent,
            sweeper,
            together,
            separately,
            host: HostInfo::detect(),
        }))
    }

    fn policies(&self) -> Vec<String> {
        vec!["static".into()]
    }
}

impl ScenarioResult for LiveMigrationResult {
    fn figures(&self) -> Vec<Figure> {
        let s = &self.sweeper;
        vec![
            Figure::value("sweeper: downtime", "ms", Better::Lower, s.downtime_ms).headline(),
            Figure::value(
                "sweeper: bytes sent / distinct non-zero pages",
                "ratio",
                Better::Lower,
                s.bytes_per_distinct_page,
            )
            .headline(),
            Figure::value("sweeper: total time", "ms", Better::Lower, s.total_ms),
            Figure::value(
                "sweeper: rounds",
                "rounds",
                Better::Neither,
                s.rounds as f64,
            ),
            Figure::value(
                "sweeper: highest throttle",
                "%",
                Better::Lower,
                s.throttle_percent as f64,
            ),
            Figure::value(
                "pair: bytes together / separately",
                "ratio",
                Better::Lower,
                self.pair_ratio(),
            )
            .headline(),
            Figure::value(
                "pair: downtime together",
                "ms",
                Better::Lower,
                self.together.downtime_ms,
            ),
        ]
    }

    fn plots(&self) -> Vec<Plot> {
        let plot = BarPlot::new(
            "Live migration: each figure over its goal (at most 1 meets it)",
            "figure / goal",
            vec![
                "downtime / 100 ms".into(),
                "bytes / distinct pages / 1.2".into(),
                "pair together / separately / 0.6".into(),
            ],
        )
        .series(
            "measured",
            vec![
                self.sweeper.downtime_ms / 100.0,
                self.sweeper.bytes_per_distinct_page / 1.2,
                self.pair_ratio() / 0.6,
            ],
            vec![None, None, None],
        )
        .reference_line(1.0, "goal");
        vec![Plot {
            name: "goals".into(),
            title: "live migration against its goals".into(),
            svg: plot.render(),
        }]
    }

    fn markdown(&self) -> String {
        let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
        let row = |what: &str, r: &MigrationReport| {
            vec![
                what.to_string(),
                r.rounds.to_string(),
                mib(r.guest_ram_bytes),
                mib(r.bytes_sent),
                r.distinct_pages.to_string(),
                format!("{:.2}", r.bytes_per_distinct_page),
                format!("{:.0}", r.total_ms),
                format!("{:.1}", r.downtime_ms),
                format!("{} %", r.throttle_percent),
            ]
        };
        let mut rows = vec![
            row(&format!("sweeper, {} MiB", self.mib), &self.sweeper),
            row(
                &format!("pair of {} MiB, together", self.pair_mib),
                &self.together,
            ),
        ];
        for (k, r) in self.separately.iter().enumerate() {
            rows.push(row(&format!("pair, VM {} alone", k + 1), r));
        }
        let mut out = format!(
            "Two monitors in one process over localhost TCP; {}\n\n",
            self.host.describe()
        );
        out += &markdown_table(
            &[
                "migration",
                "rounds",
                "guest MiB",
                "sent MiB",
                "distinct pages",
                "sent / distinct",
                "total ms",
                "downtime ms",
                "throttle",
            ],
            &rows,
        );
        out += &format!(
            "\nThe pair ({} % of each VM a table from one seed): {} MiB together against {} MiB \
             one at a time, {:.2}x.\n",
            self.shared_percent,
            mib(self.together.bytes_sent),
            mib(self.separate_bytes()),
            self.pair_ratio()
        );
        out
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
