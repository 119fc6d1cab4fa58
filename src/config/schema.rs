//! The configuration as written: serde types shared by TOML files (`disco
//! run`, `disco check`, policy files) and the API's JSON bodies (`PUT
//! /v1/vms/{name}`, `PUT /v1/policy`). Unknown keys are errors
//! (`deny_unknown_fields`); every key is optional here, so that the checks
//! in `resolve` (ranges against the topology, keys that go together) say
//! what is missing and what is allowed in the same words for both.
//! Integers are `i64` (TOML's integers) so that a negative value reaches
//! those checks and is reported with its key's range.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// A config file: `[host]`, `policy`, `[[vm]]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub host: Option<HostSpec>,
    pub policy: Option<PolicyRef>,
    pub vm: Option<Vec<VmSpec>>,
}

/// `[host]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// `"host"`, a shipped fixture's name or an hwloc XML path.
    pub topology: Option<String>,
    /// Start VMs in turn as sharing frees memory (`Config::overcommit`).
    pub overcommit: Option<bool>,
    /// The most memory the pools may hold in all, MiB.
    pub memory_limit_mib: Option<i64>,
    /// Guest RAM asks for large shmem folios (`Config::large_folios`).
    pub large_folios: Option<bool>,
}

/// The `policy` key: a shipped policy's name or a policy file's path, or an
/// inline `[policy]` table.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PolicyRef {
    Named(String),
    Inline(Box<PolicySpec>),
}

impl<'de> Deserialize<'de> for PolicyRef {
    /// By the value's type (a string or a table), so that a mistake inside
    /// an inline table is reported at its key, not as "matched no variant".
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PolicyRef, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PolicyRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a policy name, a file path or a table")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PolicyRef, E> {
                Ok(PolicyRef::Named(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicyRef, A::Error> {
                PolicySpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|p| PolicyRef::Inline(Box::new(p)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A policy file, or an inline `[policy]` table.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: Option<String>,
    pub description: Option<String>,
    pub sharing: Option<SharingSpec>,
    pub numa: Option<NumaSpec>,
}

/// `[sharing]` (see `super::SharingPolicy`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharingSpec {
    pub enabled: Option<bool>,
    pub pages_per_second: Option<i64>,
    pub domains: Option<Vec<String>>,
    pub frames_per_mapping: Option<i64>,
    pub busy_cpu_share: Option<f64>,
}

/// `[numa]` (see `super::NumaPolicy`, whose fields these are).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NumaSpec {
    pub migrate: Option<bool>,
    pub replicate: Option<bool>,
    pub epoch_ms: Option<i64>,
    pub hot_threshold: Option<f64>,
    pub dominant_share: Option<f64>,
    pub reader_threshold: Option<f64>,
    pub writer_threshold: Option<f64>,
    pub replicate_min_nodes: Option<i64>,
    pub decay: Option<f64>,
    pub copy_budget_pages: Option<i64>,
    pub freeze_after_moves: Option<i64>,
    pub freeze_window_epochs: Option<i64>,
    pub freeze_epochs: Option<i64>,
    pub replica_idle_epochs: Option<i64>,
    pub sample_pages: Option<i64>,
    pub sample_rounds: Option<i64>,
    pub sample_run_pages: Option<i64>,
    pub migrate_region_pages: Option<i64>,
    pub follow_vm: Option<bool>,
    pub max_sampling_overhead: Option<f64>,
    pub settled_sampling_overhead: Option<f64>,
    pub sample_fault_cost_us: Option<f64>,
    pub sampling: Option<String>,
    pub trace_file: Option<String>,
}

/// The body of `POST /v1/vms/{name}/snapshot`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Where the snapshot file goes (an absolute path on the monitor's host).
    pub path: Option<String>,
    /// `"resume"` (the default) or `"stop"`: what the VM does afterwards.
    pub then: Option<String>,
}

/// The body of `POST /v1/migrate`: VMs of this monitor to move, running,
/// to the monitor listening at `to` (`disco serve --migrate-listen`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSpec {
    /// The VMs (migrated together: pages they share go once).
    pub vms: Option<Vec<String>>,
    /// `HOST:PORT` of the target's migration listener.
    pub to: Option<String>,
    /// Most pre-copy rounds before stop-and-copy (default 30).
    pub max_rounds: Option<i64>,
    /// Hold the guests part of the time when rounds stop shrinking
    /// (default true).
    pub throttle: Option<bool>,
}

/// The body of `POST /v1/vms/restore`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    /// The snapshot file (an absolute path on the monitor's host).
    pub path: Option<String>,
    /// The restored VM's name (new to the monitor).
    pub name: Option<String>,
    /// The node whose pool takes its memory (default: the snapshot's).
    pub memory_node: Option<i64>,
    /// The node of each vCPU (default: the snapshot's).
    pub vcpu_nodes: Option<Vec<i64>>,
}

/// The body of `POST /v1/vms/clone`: `count` clones named
/// `PREFIX-0..` or the clones `names`; clone k on `nodes[k % len]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloneSpec {
    pub path: Option<String>,
    pub count: Option<i64>,
    pub names: Option<Vec<String>>,
    /// Name prefix with `count` (default: the snapshot's VM name + `-clone`).
    pub prefix: Option<String>,
    pub nodes: Option<Vec<i64>>,
}

/// One `[[vm]]` (or the body of `PUT /v1/vms/{name}`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: Option<String>,
    pub count: Option<i64>,
    pub vcpus: Option<i64>,
    pub node: Option<i64>,
    pub vcpu_nodes: Option<Vec<i64>>,
    pub memory_mib: Option<i64>,
    pub memory_node: Option<i64>,
    pub time_limit_s: Option<f64>,
    pub sharing_domain: Option<String>,
    pub workload: Option<WorkloadSpec>,
    pub moves: Option<Vec<MoveSpec>>,
    // A Linux guest (see `super::linux::LinuxGuestConfig`).
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub cmdline: Option<String>,
    pub disk: Option<Vec<DiskSpec>>,
    pub serial: Option<String>,
    pub virtio_console: Option<bool>,
}

/// A micro-guest workload: `kind` and that kind's parameters (which
/// parameters a kind takes is checked in `resolve`, naming the allowed ones).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub kind: Option<String>,
    pub seed: Option<i64>,
    pub private_seed: Option<i64>,
    pub shared_percent: Option<i64>,
    pub shared_run: Option<i64>,
    pub passes: Option<i64>,
    pub touches: Option<i64>,
    pub table_pages: Option<i64>,
    pub lookups: Option<i64>,
    pub write_after: Option<i64>,
    pub counters: Option<i64>,
    pub increments: Option<i64>,
}

impl WorkloadSpec {
    /// The parameters given, by name, in declaration order.
    pub(crate) fn given(&self) -> Vec<&'static str> {
        [
            ("seed", self.seed),
            ("private_seed", self.private_seed),
            ("shared_percent", self.shared_percent),
            ("shared_run", self.shared_run),
            ("passes", self.passes),
            ("touches", self.touches),
            ("table_pages", self.table_pages),
            ("lookups", self.lookups),
            ("write_after", self.write_after),
            ("counters", self.counters),
            ("increments", self.increments),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k)
        .collect()
    }
}

impl From<&crate::guest::Workload> for WorkloadSpec {
    /// The document of a workload value (what a benchmark builds in code).
    fn from(w: &crate::guest::Workload) -> WorkloadSpec {
        use crate::guest::Workload as W;
        let int = |v: u64| Some(v as i64);
        let mut spec = WorkloadSpec {
            kind: Some(w.name().to_string()),
            ..WorkloadSpec::default()
        };
        match *w {
            W::Fill {
                seed,
                private_seed,
                shared_percent,
                shared_run,
            } => {
                spec.seed = int(seed);
                spec.private_seed = int(private_seed);
                spec.shared_percent = int(shared_percent.into());
                spec.shared_run = int(shared_run.into());
            }
            W::Sweep { seed, passes } => {
                spec.seed = int(seed);
                spec.passes = int(passes.into());
            }
            W::Random { seed, touches } => {
                spec.seed = int(seed);
                spec.touches = int(touches);
            }
            W::TableScan {
                seed,
                table_pages,
                lookups,
                write_after,
            } => {
                spec.seed = int(seed);
                spec.table_pages = int(table_pages.into());
                spec.lookups = int(lookups);
                spec.write_after = int(write_after);
            }
            W::Counters {
                counters,
                increments,
            } => {
                spec.counters = int(counters.into());
                spec.increments = int(increments);
            }
            W::Crash | W::Spin | W::BadIo => {}
        }
        spec
    }
}

impl VmSpec {
    /// A micro-VM of `vcpus` vCPUs and `memory_mib` MiB running `workload`
    /// (the rest as a `[[vm]]` that gives only these keys); benchmarks
    /// build their configs from these.
    pub fn micro(name: &str, vcpus: u64, memory_mib: u64, workload: WorkloadSpec) -> VmSpec {
        VmSpec {
            name: Some(name.to_string()),
            vcpus: Some(vcpus as i64),
            memory_mib: Some(memory_mib as i64),
            workload: Some(workload),
            ..VmSpec::default()
        }
    }
}

/// One of a `[[vm]]`'s `moves`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MoveSpec {
    pub after_ms: Option<i64>,
    pub node: Option<i64>,
    pub vcpu: Option<i64>,
}

/// One of a Linux `[[vm]]`'s `disk` entries.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: Option<String>,
    pub read_only: Option<bool>,
}

/// Reads `T` from a TOML document; `file` names it in errors.
pub fn from_toml<T: de::DeserializeOwned>(text: &str, file: &str) -> super::Result<T> {
    let root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| super::ConfigError {
            file: file.to_string(),
            key: String::new(),
            message: format!("not valid TOML: {}", e.to_string().trim_end()),
        })?;
    serde_path_to_error::deserialize(root).map_err(|e| super::error::from_serde(file, "", e))
}

/// A `workload` inline table's text (`{ kind = "sweep", passes = 2 }`, as
/// benchmark scenarios give it); `file` and `key` name it in errors.
pub fn workload_from_toml(text: &str, file: &str, key: &str) -> super::Result<WorkloadSpec> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        workload: WorkloadSpec,
    }
    let doc: Doc =
        from_toml(&format!("workload = {text}"), file).map_err(|e| super::ConfigError {
            key: e.key.replacen("workload", key, 1),
            ..e
        })?;
    Ok(doc.workload)
}

/// Reads `T` from a JSON document (an API request body); `file` names it in
/// errors. JSON's `null` is refused (TOML has none; leave the key out).
pub fn from_json<T: de::DeserializeOwned>(
    value: serde_json::Value,
    file: &str,
) -> super::Result<T> {
    reject_nulls(&value, "", file)?;
    serde_path_to_error::deserialize(value).map_err(|e| super::error::from_serde(file, "", e))
}

fn reject_nulls(v: &serde_json::Value, key: &str, file: &str) -> super::Result<()> {
    use super::error::join;
    match v {
        serde_json::Value::Null => Err(super::ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            message: "null is not allowed; leave the key out for its default".into(),
        }),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| reject_nulls(v, &format!("{key}[{i}]"), file)),
        serde_json::Value::Object(o) => o
            .iter()
            .try_for_each(|(k, v)| reject_nulls(v, &join(key, k), file)),
        _ => Ok(()),
    }
}
