//! The machine a benchmark ran on, recorded in every result file: CPU,
//! cores, NUMA nodes, kernel, KVM module, hardware PMU, KSM settings,
//! transparent huge pages, NUMA balancing, load.
//!
//! Everything is read from `/proc` and `/sys`; what cannot be read is
//! recorded as `unknown` (never guessed).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub hostname: String,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs (hardware threads).
    pub cpus: usize,
    /// Distinct (physical id, core id) pairs of /proc/cpuinfo.
    pub cores: usize,
    /// Sockets (distinct physical ids).
    pub sockets: usize,
    /// `/sys/devices/system/node/node*`.
    pub numa_nodes: usize,
    pub mem_total_mib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// The KVM vendor module loaded (`kvm_intel`, `kvm_amd`, `kvm_pvm`, ...)
    /// from /proc/modules or /sys/module; `none` without one.
    pub kvm_kind: String,
    pub dev_kvm: bool,
    /// A hardware PMU is exposed (`/sys/bus/event_source/devices/cpu`, or
    /// `cpu_core` on hybrid CPUs): cache-miss sampling is possible.
    pub pmu_present: bool,
    /// Every readable KSM knob (`/sys/kernel/mm/ksm`), as found before the
    /// run; empty when the kernel has no KSM.
    pub ksm: BTreeMap<String, String>,
    /// Selected value of `/sys/kernel/mm/transparent_hugepage/enabled`.
    pub transparent_hugepages: String,
    /// `kernel.numa_balancing`.
    pub numa_balancing: String,
    /// `/proc/loadavg` when the record was made.
    pub load_average: String,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn selected(raw: &str) -> String {
    crate::memory::folios::selected(raw)
        .unwrap_or(raw)
        .to_string()
}

/// KVM vendor modules known to the kernel, most specific first.
const KVM_MODULES: &[&str] = &[
    "kvm_intel",
    "kvm_amd",
    "kvm_pvm",
    "kvm_hv",
    "kvm_pr",
    "kvm_arm",
];

fn kvm_kind() -> String {
    let modules = read("/proc/modules").unwrap_or_default();
    let loaded: Vec<&str> = modules
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for m in KVM_MODULES {
        if loaded.contains(m) || Path::new(&format!("/sys/module/{m}")).exists() {
            return m.to_string();
        }
    }
    if loaded.contains(&"kvm") || Path::new("/sys/module/kvm").exists() {
        "kvm (vendor module unknown)".into()
    } else {
        "none".into()
    }
}

fn ksm_knobs() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/sys/kernel/mm/ksm") else {
        return out;
    };
    for e in dir.flatten() {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = e.metadata() else { continue };
        // Knobs are the writable files; counters are read-only.
        if !meta.is_file() || meta.permissions().mode() & 0o200 == 0 {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(v) = read(&e.path().display().to_string()) {
            out.insert(name, selected(&v));
        }
    }
    out
}

impl MachineInfo {
    pub fn detect() -> MachineInfo {
        let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
        let mut model = None;
        let mut cores = std::collections::BTreeSet::new();
        let mut sockets = std::collections::BTreeSet::new();
        let mut phys = String::new();
        for line in cpuinfo.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim().to_string());
            match k {
                "model name" if model.is_none() => model = Some(v),
                "physical id" => {
                    phys = v.clone();
                    sockets.insert(v);
                }
                "core id" => {
                    cores.insert((phys.clone(), v));
                }
                _ => {}
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let numa_nodes = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("node")
                            .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
                    })
                    .count()
            })
            .unwrap_or(0);
        let mem_total_mib = super::procmem::MemInfo::read()
            .map(|m| m.mem_total_kib / 1024)
            .unwrap_or(0);
        let events = "/sys/bus/event_source/devices";
        MachineInfo {
            hostname: read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into()),
            cpu_model: model.unwrap_or_else(|| "unknown".into()),
            cpus,
            cores: if cores.is_empty() { cpus } else { cores.len() },
            sockets: sockets.len().max(1),
            numa_nodes: numa_nodes.max(1),
            mem_total_mib,
            kernel: read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
            kvm_kind: kvm_kind(),
            dev_kvm: Path::new("/dev/kvm").exists(),
            pmu_present: Path::new(&format!("{events}/cpu")).exists()
                || Path::new(&format!("{events}/cpu_core")).exists(),
            ksm: ksm_knobs(),
            transparent_hugepages: read("/sys/kernel/mm/transparent_hugepage/enabled")
                .map(|s| selected(&s))
                .unwrap_or_else(|| "unknown".into()),
            numa_balancing: read("/proc/sys/kernel/numa_balancing")
                .unwrap_or_else(|| "unknown".into()),
            load_average: read("/proc/loadavg").unwrap_or_else(|| "unknown".into()),
        }
    }

    /// One paragraph for reports.
    pub fn describe(&self) -> String {
        let ksm = if self.ksm.is_empty() {
            "no KSM".to_string()
        } else {
            let k = |n: &str| self.ksm.get(n).map_or("?", String::as_str).to_string();
            format!(
                "KSM run={} pages_to_scan={} sleep_millisecs={}",
                k("run"),
                k("pages_to_scan"),
                k("sleep_millisecs")
            )
        };
        format!(
            "{} ({} CPUs, {} cores, {} socket(s)), {} NUMA node(s), {} MiB RAM, Linux {}, KVM {}{}, \
             hardware PMU {}, {}, THP {}, NUMA balancing {}",
            self.cpu_model,
            self.cpus,
            self.cores,
            self.sockets,
            self.numa_nodes,
            self.mem_total_mib,
            self.kernel,
            self.kvm_kind,
            if self.dev_kvm { "" } else { " (no /dev/kvm)" },
            if self.pmu_present { "present" } else { "absent" },
            ksm,
            self.transparent_hugepages,
            self.numa_balancing
        )
    }

    /// What differs from `other` that makes figures hard to compare.
    pub fn differences(&self, other: &MachineInfo) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what}: {a} -> {b}"));
            }
        };
        cmp("CPU", self.cpu_model.clone(), other.cpu_model.clone());
        cmp("CPUs", self.cpus.to_string(), other.cpus.to_string());
        cmp(
            "NUMA nodes",
            self.numa_nodes.to_string(),
            other.numa_nodes.to_string(),
        );
        cmp("kernel", self.kernel.clone(), other.kernel.clone());
        cmp("KVM", self.kvm_kind.clone(), other.kvm_kind.clone());
        cmp(
            "PMU",
            self.pmu_present.to_string(),
            other.pmu_present.to_string(),
        );
        cmp(
            "THP",
            self.transparent_hugepages.clone(),
            other.transparent_hugepages.clone(),
        );
        out
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to a calendar starting on 0000-03-01 so leap days end a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..365
    let mp = (5 * doy + 2) / 153; // month from March, 0..11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    utc_from_unix(secs)
}

pub fn utc_from_unix(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The commit this binary was built from (`-dirty` when the tree had
/// changes), see build.rs.
pub const GIT_COMMIT: &str = env!("DISCO_GIT_COMMIT");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_795_219_200 + 3723), "2026-11-21T01:02:03Z");
        assert_eq!(utc_from_unix(-86_400), "1969-12-31T00:00:00Z");
    }

    #[test]
    fn detects_this_machine() {
        let m = MachineInfo::detect();
        assert!(m.cpus >= 1 && m.cores >= 1 && m.numa_nodes >= 1);
        assert!(!m.kernel.is_empty() && m.kernel != "unknown");
        assert!(m.describe().contains("NUMA node"));
    }
}
