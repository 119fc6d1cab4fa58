//! Benchmarks of the monitor on real KVM with real guests: the scenarios
//! behind `disco bench` and the criterion benches in `benches/`.
//!
//! * [`bare`]: the baseline, a minimal bare-KVM runner on anonymous memory
//!   (same micro-VM and guest image, no monitor);
//! * [`overhead`]: the same workload run alternately by `disco` and by the
//!   bare runner in one process run; medians and their ratio;
//! * [`density`]: create and start many micro-VMs through the monitor's
//!   memory; VMs per second and host memory per VM beyond guest RAM;
//! * [`procmem`]: the `/proc` counters the density scenario reads;
//! * [`locality`]: badly placed VMs under each policy, local-access
//!   fraction and modelled cost over time;
//! * [`replication`]: VMs on different nodes reading one shared table:
//!   replicas, their memory cost, the write break;
//! * [`api`]: the REST API with many VMs running: request latencies, VMs
//!   started per second through it against `disco run`;
//! * [`clone`]: K VMs cloned from one snapshot: clones started per second,
//!   new host memory per clone before it writes.
//!
//! Every scenario checks the guests' checksums: a run with a wrong checksum
//! is an error, never a figure. Results are serde structs (JSON) with a
//! Markdown table renderer. Speed is measured here, never in timed tests.

pub mod api;
pub mod bare;
pub mod clone;
pub mod compare;
pub mod density;
pub mod ksm;
pub mod live_migration;
pub mod locality;
pub mod machine;
pub mod migration;
pub mod overhead;
pub mod params;
pub mod procmem;
pub mod replication;
pub mod scale;
pub mod sharing;
pub mod suite;
pub mod svg;

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigFile, HostSpec, PolicyRef, VmSpec};

/// Summary of repeated measurements of one quantity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of measurements.
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Every measurement, in the order taken.
    pub samples: Vec<f64>,
}

impl Stats {
    /// Summarises `samples` (at least one). The median of an even count is
    /// the mean of the two middle values.
    pub fn of(samples: &[f64]) -> Stats {
        assert!(!samples.is_empty(), "Stats::of needs at least one sample");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Stats {
            n,
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples: samples.to_vec(),
        }
    }

    /// A distribution-free 95 % confidence interval of the median: the
    /// k-th smallest and k-th largest sample, k the largest order for which
    /// a Binomial(n, 1/2) falls below k with probability at most 2.5 %
    /// (the sign-test interval; no assumption about the noise's shape,
    /// which on a shared host is anything but normal). `None` below 6
    /// samples, where even [min, max] covers the median with less than 95 %.
    pub fn median_interval_95(&self) -> Option<(f64, f64)> {
        let n = self.n;
        let k = if n <= 1000 {
            // P(X <= i) for X ~ Binomial(n, 1/2), summed term by term
            // (2^-1000 is still a normal f64).
            let mut term = 0.5f64.powi(n as i32);
            let mut below = 0.0;
            let mut k = 0;
            for i in 0..n {
                below += term;
                if below > 0.025 {
                    break;
                }
                k = i + 1;
                term *= (n - i) as f64 / (i + 1) as f64;
            }
            k
        } else {
            // The normal approximation, exact enough at this size.
            ((n as f64 - 1.96 * (n as f64).sqrt()) / 2.0).floor() as usize
        };
        if k == 0 {
            return None;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_by(f64::total_cmp);
        Some((sorted[k - 1], sorted[n - k]))
    }

    /// `median (min-max)` with `decimals` decimals.
    pub fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// The machine a result was measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    pub mem_total_mib: u64,
    /// `/sys/kernel/mm/transparent_hugepage/enabled` (the selected value):
    /// with `always`, the bare runner's anonymous memory may get huge pages.
    pub transparent_hugepages: String,
    /// The shmem folio sizes (kB) above 4 kB the host allowed, which
    /// disco's guest RAM may get (`crate::memory::folios`).
    #[serde(default)]
    pub shmem_folio_kib: Vec<u32>,
}

impl HostInfo {
    pub fn detect() -> HostInfo {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .ok()
            .and_then(|s| crate::memory::folios::selected(&s).map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let mem_total_mib = procmem::MemInfo::read()
            .map(|m| m.mem_total_kib / 1024)
            .unwrap_or(0);
        HostInfo {
            kernel,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total_mib,
            transparent_hugepages: thp,
            shmem_folio_kib: crate::memory::folios::host_sizes_kib(),
        }
    }

    /// One line for table footers.
    pub fn describe(&self) -> String {
        let folios = crate::memory::folios::sizes_text(&self.shmem_folio_kib);
        format!(
            "Linux {}, {} CPUs, {} MiB RAM, THP {}, large shmem folios {folios}",
            self.kernel, self.cpus, self.mem_total_mib, self.transparent_hugepages
        )
    }
}

/// A config from TOML text, as `disco run` would read it from a file.
pub fn config_from_toml(text: &str) -> Result<Config> {
    Config::parse(text, BENCH_CONFIG, Path::new(".")).context("a benchmark config is invalid")
}

/// A config from its document built in code, checked as `disco run`
/// checks a file's (errors name the file `<bench>` and the key).
pub fn config_from_doc(doc: ConfigFile) -> Result<Config> {
    Config::from_file(doc, BENCH_CONFIG, Path::new(".")).context("a benchmark config is invalid")
}

/// A benchmark config's document: `policy` (a shipped name or a path) or
/// an inline policy, a topology (`host`, a fixture, an XML path), VMs.
/// Has the host allow `kib` kB shmem folios (`shmem_enabled` set to
/// `advise`) until the guard drops; `0` leaves the host as it is.
pub(crate) fn allow_shmem_folios(kib: u32) -> Result<Option<crate::memory::folios::KnobGuard>> {
    if kib == 0 {
        return Ok(None);
    }
    crate::memory::folios::KnobGuard::set(kib, "advise")
        .with_context(|| {
            format!(
                "shmem_folio_kib = {kib}: the host must allow {kib} kB shmem folios for the run \
                 (--set shmem_folio_kib=0 leaves the host as it is)"
            )
        })
        .map(Some)
}

pub fn config_doc(policy: PolicyRef, topology: &str, vms: Vec<VmSpec>) -> ConfigFile {
    ConfigFile {
        host: (topology != "host").then(|| HostSpec {
            topology: Some(topology.to_string()),
            ..HostSpec::default()
        }),
        policy: Some(policy),
        vm: Some(vms),
    }
}

/// Blames an error of [`config_from_doc`] on a scenario's generated
/// config on the scenario key it comes from, keeping the file and key that
/// are wrong: a mistake in policy `policy` (a policy file's, or an inlined
/// policy table's) names `policy_key` (`policy` or `policies`), one in the
/// topology names `topology`, anything else `other_key`.
pub(crate) fn blame_config_error(
    p: &params::Params,
    e: &anyhow::Error,
    policy: &str,
    policy_key: &str,
    other_key: &str,
) -> params::ParamError {
    let Some(ce) = e.downcast_ref::<crate::config::ConfigError>() else {
        return p.error(
            other_key,
            format!("the VM config it makes is invalid: {e:#}"),
        );
    };
    if ce.file != BENCH_CONFIG {
        // Read from a file the config names: the policy file.
        return p.error(policy_key, format!("policy `{policy}`: {ce}"));
    }
    if let Some(key) = ce.key.strip_prefix("policy.") {
        return p.error(
            policy_key,
            format!("policy `{policy}`: key `{key}`: {}", ce.message),
        );
    }
    if ce.key == "policy" {
        return p.error(policy_key, format!("policy `{policy}`: {}", ce.message));
    }
    if ce.key.starts_with("host") {
        return p.error("topology", ce.message.clone());
    }
    p.error(
        other_key,
        format!("the VM config it makes is invalid: {e:#}"),
    )
}

/// The file name of generated configs in errors.
const BENCH_CONFIG: &str = "<bench>";

/// A Markdown table: the first column left-aligned, the others right-aligned.
pub(crate) fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    markdown_table_aligned(headers, 1, rows)
}

/// A Markdown table; the first `text_columns` columns are left-aligned,
/// the others (figures) right-aligned.
pub(crate) fn markdown_table_aligned(
    headers: &[&str],
    text_columns: usize,
    rows: &[Vec<String>],
) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    out += &format!(
        "|{}\n",
        (0..headers.len())
            .map(|i| if i < text_columns { "---|" } else { "---:|" })
            .collect::<String>()
    );
    for row in rows {
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

/// A progress bar on stderr, or a hidden one.
pub(crate) fn progress_bar(len: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap(),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(s.samples, vec![3.0, 1.0, 2.0]);
    }

    #[test]
    fn median_interval_is_the_sign_test_interval() {
        // n = 5: even [min, max] covers the median with only 94 %.
        assert_eq!(
            Stats::of(&[1.0, 2.0, 3.0, 4.0, 5.0]).median_interval_95(),
            None
        );
        // n = 6: P(X = 0) = 1/64 <= 2.5 %, P(X <= 1) = 7/64 > 2.5 %: [min, max].
        let six = Stats::of(&[6.0, 1.0, 5.0, 2.0, 4.0, 3.0]);
        assert_eq!(six.median_interval_95(), Some((1.0, 6.0)));
        // n = 20: P(X <= 5) = 2.07 %, P(X <= 6) = 5.77 %: the 6th and 15th.
        let twenty: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(Stats::of(&twenty).median_interval_95(), Some((6.0, 15.0)));
        // n = 100: the 40th and 61st (P(X <= 39) = 1.76 %, P(X <= 40) = 2.84 %).
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Stats::of(&hundred).median_interval_95(), Some((40.0, 61.0)));
    }

    #[test]
    fn markdown_table_shape() {
        let t = markdown_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---:|\n| 1 | 2 |\n");
    }
}
