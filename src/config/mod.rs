//! The configuration: host topology, VMs, policy. One model for TOML files
//! and the API's JSON: [`schema`] holds the serde types as written
//! (unknown keys are errors), [`resolve`] turns them into the values the
//! monitor runs, checking each against the topology, and
//! [`Config::validate`] checks the VMs together against the host. Every
//! error is a [`ConfigError`] naming the file (or "request body"), the key
//! (`vm[2].workload.seed`) and what is allowed; `disco check FILE` runs
//! exactly the code `disco run` does.

pub mod error;
pub mod linux;
pub mod resolve;
pub mod schema;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use error::At;
pub use error::{ConfigError, Result};
pub use schema::{
    CloneSpec, ConfigFile, DiskSpec, HostSpec, MigrateSpec, MoveSpec, NumaSpec, PolicyRef,
    PolicySpec, RestoreSpec, SharingSpec, SnapshotSpec, VmSpec, WorkloadSpec,
};

use crate::guest::{layout, Workload};
use crate::topology::Topology;

/// The embedded default scenario `disco run` uses without an argument.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/demo.toml");
/// Policies shipped in `policies/`, embedded so they work from any directory.
pub const SHIPPED_POLICIES: &[(&str, &str)] = &[
    ("disco", include_str!("../../policies/disco.toml")),
    ("static", include_str!("../../policies/static.toml")),
    (
        "migrate-only",
        include_str!("../../policies/migrate-only.toml"),
    ),
    (
        "replicate-only",
        include_str!("../../policies/replicate-only.toml"),
    ),
];

pub const MAX_VCPUS: u64 = 64;
/// Largest guest RAM of any VM: the micro-VM layout's (a Linux guest's is
/// lower, [`linux::MAX_MEMORY_MIB`]).
pub const MAX_MEMORY_MIB: u64 = layout::MAX_RAM >> 20;
pub const MAX_COUNT: u64 = 1024;

/// Where the host topology comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyChoice {
    /// The real machine, read through hwloc.
    Host,
    /// A fixture shipped in `topology-fixtures/`, by name.
    Fixture(String),
    /// Any hwloc XML file.
    File(PathBuf),
}

impl TopologyChoice {
    /// The topology `name` names: `host`, a shipped fixture, or an hwloc
    /// XML file (a path ending in `.xml`, relative to `dir`).
    pub fn named(name: &str, dir: &Path) -> Option<TopologyChoice> {
        match name {
            "host" => Some(TopologyChoice::Host),
            n if Topology::fixture_names().contains(&n) => {
                Some(TopologyChoice::Fixture(n.to_string()))
            }
            p if p.ends_with(".xml") => Some(TopologyChoice::File(dir.join(p))),
            _ => None,
        }
    }

    pub fn load(&self) -> anyhow::Result<Topology> {
        match self {
            TopologyChoice::Host => Topology::host(),
            TopologyChoice::Fixture(name) => Topology::from_fixture_name(name),
            TopologyChoice::File(path) => Topology::from_xml_file(path),
        }
    }
}

/// Page sharing knobs: the `[sharing]` section, read by the sharing scanner
/// (`crate::sharing::Scanner::for_policy`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SharingPolicy {
    pub enabled: bool,
    pub pages_per_second: u64,
    /// Sharing domains whose VMs are scanned; empty means every domain.
    pub domains: Vec<String>,
    /// Each VM's budget of kernel mappings (VMAs): one per this many guest
    /// frames; 0 turns the budget off.
    pub frames_per_mapping: u64,
    /// While no host CPU is idle, the most of all CPUs' time the scanner
    /// may take (see `crate::sharing` `cpu_share`); 1 lifts the cap.
    pub busy_cpu_share: f64,
}

/// NUMA placement knobs: the `[numa]` section, read by the policy engine
/// (`crate::numa::PolicyEngine`, whose docs give the rules). Counts are
/// decayed access samples (see `decay`). `policies/*.toml` explain each knob.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NumaPolicy {
    /// Move a hot page used mostly from one node to that node.
    pub migrate: bool,
    /// Replicate hot read-only pages shared across VMs on their reader nodes.
    pub replicate: bool,
    /// Length of a policy epoch, in milliseconds.
    pub epoch_ms: u64,
    /// A page is hot when its count (all nodes, reads and writes) reaches
    /// this many decayed samples.
    pub hot_threshold: f64,
    /// "Used mostly by one node": that node's fraction of the page's count
    /// (0.5 to 1).
    pub dominant_share: f64,
    /// A node uses (reads) a page when its count reaches this many decayed
    /// samples; replicas on nodes below it are collapsed.
    pub reader_threshold: f64,
    /// A node writes a page when its decayed write count reaches this: a
    /// page two nodes write is write-shared (left alone), a page any node
    /// writes is not replicated.
    pub writer_threshold: f64,
    /// Fewest nodes that must use a page for it to be replicated.
    pub replicate_min_nodes: u64,
    /// Factor applied to every count at the end of each epoch (0 to 0.99).
    pub decay: f64,
    /// Most pages copied (migrations + new replicas) per epoch.
    pub copy_budget_pages: u64,
    /// Moves within `freeze_window_epochs` after which a page is frozen
    /// instead of moved again; 0 never freezes.
    pub freeze_after_moves: u64,
    pub freeze_window_epochs: u64,
    /// How long a frozen page is left alone, in epochs.
    pub freeze_epochs: u64,
    /// A replica on a node that has not sampled its page for this many
    /// epochs is freed (at least the best copy stays).
    pub replica_idle_epochs: u64,
    /// Page-fault sampling: guest pages zapped per VM per sampling round
    /// (half re-checks of pages last seen remote, half fresh random pages).
    pub sample_pages: u64,
    /// Page-fault sampling: rounds per epoch (a page touched in every round
    /// of every epoch settles at `sample_rounds / (1 - decay)`).
    pub sample_rounds: u64,
    /// Page-fault sampling: fresh random samples come as aligned runs of
    /// this many consecutive guest pages, zapped with one call (each call
    /// costs the monitor and the guest a KVM invalidation, whatever its
    /// length); 1 samples single pages.
    pub sample_run_pages: u64,
    /// A page that migrates takes along the private frames of its aligned
    /// region of this many frames that sit on the node it leaves (within
    /// the copy budget); 1 moves sampled pages only.
    pub migrate_region_pages: u64,
    /// With `migrate`: a VM's private memory follows it to the node its
    /// samples come from, hot or not (`crate::numa::policy`, rule 9).
    pub follow_vm: bool,
    /// Page-fault sampling: most of each VM's vCPU time its sampled faults
    /// may cost, a fraction (0.02 = 2 %); the sampler zaps fewer pages
    /// when a VM is over it, whatever `epoch_ms`, `sample_pages` and
    /// `sample_rounds` ask for.
    pub max_sampling_overhead: f64,
    /// Page-fault sampling: the allowance a VM backs off to, a fraction of
    /// its vCPU time, while its samples find its pages where they belong
    /// (halved each such epoch, from `max_sampling_overhead`; see
    /// `numa::cap`). At most `max_sampling_overhead`.
    pub settled_sampling_overhead: f64,
    /// Page-fault sampling: what one sampled fault costs the faulting vCPU
    /// beyond the handler's own (measured) time, in microseconds: the
    /// exit, the kernel's fault path and the wake-up, which the monitor
    /// cannot time itself.
    pub sample_fault_cost_us: f64,
    /// Where access samples come from.
    pub sampling: Sampling,
    /// The trace replayed when `sampling = "trace"` (as written in the file;
    /// a relative path is relative to the directory `disco` runs in).
    pub trace_file: Option<PathBuf>,
}

/// The `sampling` knob of a policy's `[numa]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// Hardware counters when the host has a PMU, else page-fault samples.
    #[default]
    Auto,
    /// Hardware counters only; an error without a PMU.
    Hardware,
    /// Page-level samples from hinting faults.
    PageFaults,
    /// A replayed trace file (`trace_file`).
    Trace,
}

impl Sampling {
    /// The spellings accepted in a policy file, in order.
    pub const NAMES: &'static [&'static str] = &["auto", "hardware", "page-faults", "trace"];

    pub fn as_str(self) -> &'static str {
        match self {
            Sampling::Auto => "auto",
            Sampling::Hardware => "hardware",
            Sampling::PageFaults => "page-faults",
            Sampling::Trace => "trace",
        }
    }

    pub fn from_name(name: &str) -> Option<Sampling> {
        match name {
            "auto" => Some(Sampling::Auto),
            "hardware" => Some(Sampling::Hardware),
            "page-faults" => Some(Sampling::PageFaults),
            "trace" => Some(Sampling::Trace),
            _ => None,
        }
    }
}

impl Default for SharingPolicy {
    /// A `[sharing]` section that sets nothing (a policy without one gets
    /// this with `enabled = false`).
    fn default() -> SharingPolicy {
        SharingPolicy {
            enabled: true,
            pages_per_second: 100_000,
            domains: Vec::new(),
            frames_per_mapping: crate::sharing::FRAMES_PER_MAPPING,
            busy_cpu_share: crate::sharing::BUSY_CPU_SHARE,
        }
    }
}

impl Default for NumaPolicy {
    /// The engine's defaults with migration and replication off (what a
    /// policy without a `[numa]` section gets).
    fn default() -> NumaPolicy {
        NumaPolicy {
            migrate: false,
            replicate: false,
            epoch_ms: 100,
            hot_threshold: 8.0,
            dominant_share: 0.75,
            reader_threshold: 2.0,
            writer_threshold: 0.25,
            replicate_min_nodes: 2,
            decay: 0.5,
            copy_budget_pages: 512,
            freeze_after_moves: 3,
            freeze_window_epochs: 20,
            freeze_epochs: 100,
            replica_idle_epochs: 50,
            sample_pages: 64,
            sample_rounds: 8,
            sample_run_pages: 1,
            migrate_region_pages: 64,
            follow_vm: true,
            max_sampling_overhead: 0.02,
            settled_sampling_overhead: 0.004,
            sample_fault_cost_us: 90.0,
            sampling: Sampling::Auto,
            trace_file: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    pub name: String,
    /// Where it was read from: a file path, `shipped:<name>` or `inline`.
    pub source: String,
    pub description: String,
    pub sharing: SharingPolicy,
    pub numa: NumaPolicy,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmConfig {
    pub name: String,
    /// Node of each vCPU.
    pub vcpu_nodes: Vec<usize>,
    pub memory_mib: u64,
    /// Node whose pool backs the VM's memory at start.
    pub memory_node: usize,
    pub workload: Workload,
    /// The `[[vm]]` gave no `workload`, so it runs [`DEFAULT_WORKLOAD`]
    /// (`disco check` says so).
    pub workload_is_default: bool,
    pub time_limit: Duration,
    /// Pages are only ever shared between VMs of the same sharing domain
    /// (tenant): shared pages are a timing side channel.
    pub sharing_domain: String,
    /// vCPU moves to carry out while the VM runs, in time order.
    pub moves: Vec<VcpuMove>,
    /// A Linux guest instead of the micro-guest `workload` (`kernel` key).
    pub linux: Option<linux::LinuxGuestConfig>,
}

impl VmConfig {
    /// Pages each node's pool gives out while the VM is built (`nodes`:
    /// the topology's node count): a micro-VM's RAM comes from its
    /// memory_node; a Linux VM's is taken whole from its first guest node,
    /// then each other guest node's slice from that node (counted twice: an
    /// upper bound). `Config::validate` and the monitor's admission of
    /// waiting VMs both count with it.
    pub fn pages_per_node(&self, nodes: usize) -> Vec<u64> {
        let mut need = vec![0u64; nodes];
        let frames = (self.memory_mib << 20) / crate::PAGE_SIZE as u64;
        if self.linux.is_some() {
            let slices = linux::split_ram(&self.vcpu_nodes, self.memory_mib << 20);
            need[slices[0].topology_node] += frames;
            for n in slices.iter().skip(1) {
                need[n.topology_node] += n.frames().end - n.frames().start;
            }
        } else {
            need[self.memory_node] += frames;
        }
        need
    }
}

/// What a micro-guest `[[vm]]` without a `workload` key runs.
pub const DEFAULT_WORKLOAD: &str = "{ kind = \"fill\", seed = 1 }";

/// Moves vCPUs of a running VM to another node (`[[vm]] moves`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VcpuMove {
    /// When, after the VM started, in milliseconds.
    pub after_ms: u64,
    /// The node to move to.
    pub node: usize,
    /// Which vCPU; `None` moves every vCPU (the whole VM).
    pub vcpu: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// File the config came from, or `<embedded default>`.
    pub source: String,
    pub topology: TopologyChoice,
    #[serde(skip)]
    pub topology_loaded: Option<Topology>,
    pub policy: Policy,
    pub vms: Vec<VmConfig>,
    /// `[host] overcommit`: VMs whose memory does not fit the pools next to
    /// those already running wait, in order, until sharing frees enough
    /// (see `Monitor::queue_vm`); each VM alone must still fit.
    pub overcommit: bool,
    /// `[host] memory_limit_mib`: the most memory the pools may hold in all
    /// (default: the nodes' memory, capped at the host's).
    pub memory_limit_mib: Option<u64>,
    /// `[host] large_folios` (default true): guest RAM asks the kernel for
    /// large shmem folios where the host allows a size and page sampling is
    /// off (see `crate::memory::folios`).
    pub large_folios: bool,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let file = path.display().to_string();
        let text = crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES).map_err(|e| {
            ConfigError {
                file: file.clone(),
                key: String::new(),
                message: format!("config file {e}"),
            }
        })?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &file, &dir)
    }

    /// The embedded default scenario.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_CONFIG, "<embedded default>", Path::new("."))
            .expect("the embedded default config is valid")
    }

    /// Parses config text; `file` names it in errors, relative paths inside
    /// are resolved against `dir`.
    pub fn parse(text: &str, file: &str, dir: &Path) -> Result<Config> {
        Config::from_file(schema::from_toml(text, file)?, file, dir)
    }

    /// A config from its document (parsed from TOML, or built in code):
    /// each value checked against the topology it names, then the VMs
    /// together against the host ([`validate`](Self::validate)). `file`
    /// names it in errors; relative paths are resolved against `dir`.
    pub fn from_file(doc: ConfigFile, file: &str, dir: &Path) -> Result<Config> {
        let top = At::new(file, "");
        let (mut overcommit, mut memory_limit_mib, mut large_folios) = (false, None, true);
        let (topology, topology_loaded) = match &doc.host {
            Some(host) => {
                let at = At::new(file, "host");
                overcommit = host.overcommit.unwrap_or(false);
                large_folios = host.large_folios.unwrap_or(true);
                memory_limit_mib =
                    at.int("memory_limit_mib", host.memory_limit_mib, 16, 1 << 40)?;
                let name = host.topology.as_deref().unwrap_or("host");
                let choice = match TopologyChoice::named(name, dir) {
                    Some(choice) => choice,
                    None => {
                        return Err(at.error(
                            "topology",
                            format!(
                                "`{name}` is not a topology; allowed: \"host\", a shipped fixture ({}), or a path to an hwloc XML file ending in .xml",
                                Topology::fixture_names().join(", ")
                            ),
                        ))
                    }
                };
                let loaded = choice
                    .load()
                    .map_err(|e| at.error("topology", format!("cannot load it: {e:#}")))?;
                (choice, loaded)
            }
            None => {
                let loaded = Topology::host().map_err(|e| {
                    top.error("host", format!("cannot read the host topology: {e:#}"))
                })?;
                (TopologyChoice::Host, loaded)
            }
        };
        let nodes = topology_loaded.node_count();

        let policy = match &doc.policy {
            None => load_policy_at("disco", dir, top, "policy")?,
            Some(PolicyRef::Named(s)) => load_policy_at(s, dir, top, "policy")?,
            Some(PolicyRef::Inline(spec)) => {
                resolve::policy(spec, At::new(file, "policy"), "inline", "inline")?
            }
        };

        let specs = doc
            .vm
            .as_deref()
            .ok_or_else(|| top.error("vm", "is required: add at least one [[vm]] table"))?;
        if specs.is_empty() {
            return Err(top.error("vm", "at least one [[vm]] is required"));
        }
        let mut vms = Vec::new();
        let mut names = BTreeSet::new();
        for (i, spec) in specs.iter().enumerate() {
            let key = format!("vm[{i}]");
            let at = At::new(file, &key);
            for vm in resolve::vm(spec, at, nodes, dir)? {
                if !names.insert(vm.name.clone()) {
                    return Err(at.error(
                        "name",
                        format!("VM name `{}` is used twice; names must be unique", vm.name),
                    ));
                }
                vms.push(vm);
            }
        }
        let config = Config {
            source: file.to_string(),
            topology,
            topology_loaded: Some(topology_loaded),
            policy,
            vms,
            overcommit,
            memory_limit_mib,
            large_folios,
        };
        config.validate()?;
        Ok(config)
    }

    /// The checks across VMs and against this host that `disco check` and
    /// `monitor::run` share (`parse` runs them, and `run` again before it
    /// changes anything, for configs built in code): sharing domains the
    /// policy names exist, each node's pool and the host hold the guest RAM
    /// the VMs take at start, and the process may map it all
    /// (`vm.max_map_count`, raised by `run` only when running as root).
    pub fn validate(&self) -> Result<()> {
        let err = |key: &str, message: String| ConfigError {
            file: self.source.clone(),
            key: key.to_string(),
            message,
        };
        let domains: BTreeSet<&str> = self.vms.iter().map(|v| v.sharing_domain.as_str()).collect();
        let list = |set: &BTreeSet<&str>| set.iter().copied().collect::<Vec<_>>().join(", ");
        if let Some(d) = self
            .policy
            .sharing
            .domains
            .iter()
            .find(|d| !domains.contains(d.as_str()))
        {
            let (key, policy) = match self.policy.source.as_str() {
                "inline" => ("policy.sharing.domains", String::new()),
                src => ("policy", format!("policy {src}: ")),
            };
            return Err(err(
                key,
                format!(
                    "{policy}[sharing] domains names `{d}`, which is no VM's sharing_domain; \
                     allowed: the sharing domains of this config's VMs ({})",
                    list(&domains)
                ),
            ));
        }

        let topology = self
            .topology()
            .map_err(|e| err("host.topology", format!("cannot load it: {e:#}")))?;
        let mib = |pages: u64| (pages * crate::PAGE_SIZE as u64) >> 20;
        // Pages each node's pool gives out while the VMs are built.
        let mut need = vec![0u64; topology.node_count()];
        let mut users: Vec<Vec<&str>> = vec![Vec::new(); topology.node_count()];
        let per_vm: Vec<Vec<u64>> = self
            .vms
            .iter()
            .map(|vm| vm.pages_per_node(topology.node_count()))
            .collect();
        for (vm, pages) in self.vms.iter().zip(&per_vm) {
            for (node, &p) in pages.iter().enumerate().filter(|(_, &p)| p > 0) {
                need[node] += p;
                users[node].push(&vm.name);
            }
        }
        let host = crate::memory::mapper::host_pages();
        if let Some(limit) = self.memory_limit_mib {
            if limit > mib(host) {
                return Err(err(
                    "host.memory_limit_mib",
                    format!(
                        "{limit} MiB is more than the host's memory ({} MiB); allowed: 16 to {}",
                        mib(host),
                        mib(host)
                    ),
                ));
            }
        }
        let caps = crate::memory::mapper::pool_capacities(
            &topology,
            self.memory_limit_mib.map(|m| m << 20),
        );
        if self.overcommit {
            // VMs wait for room in turn; each must fit alone, with the
            // headroom the monitor keeps free when it lets one in.
            for (vm, pages) in self.vms.iter().zip(&per_vm) {
                for (node, &frames) in pages.iter().enumerate() {
                    let room =
                        caps[node] as u64 - caps[node] as u64 / crate::monitor::ADMISSION_HEADROOM;
                    if frames > room {
                        return Err(err(
                            "vm",
                            format!(
                            "VM `{}` needs {} MiB, more than node {node}'s pool can ever give it \
                             under overcommit ({} MiB: the pool's {} MiB less the 1/{} kept \
                             free for copy-on-write); allowed: at most {} MiB per VM (lower its \
                             memory_mib or raise [host] memory_limit_mib)",
                            vm.name,
                            mib(frames),
                            mib(room),
                            mib(caps[node] as u64),
                            crate::monitor::ADMISSION_HEADROOM,
                            mib(room)
                        ),
                        ));
                    }
                }
            }
        }
        for (node, &pages) in need.iter().enumerate() {
            let cap = caps[node] as u64;
            if pages > cap && !self.overcommit {
                let names = &users[node];
                let shown = if names.len() > 4 {
                    format!("{}, ... ({} VMs)", names[..3].join(", "), names.len())
                } else {
                    names.join(", ")
                };
                return Err(err(
                    "vm",
                    format!(
                        "the VMs whose memory starts on node {node} ({shown}) need {} MiB, \
                         more than node {node}'s pool ({} MiB: the node's memory, at most the \
                         host's, or its share of [host] memory_limit_mib); allowed: at most {} MiB per node (lower memory_mib or count, \
                         place memory on other nodes with memory_node, or set [host] overcommit = true \
                         to start VMs in turn as sharing frees memory)",
                        mib(pages),
                        mib(cap),
                        mib(cap)
                    ),
                ));
            }
        }
        let total: u64 = self
            .vms
            .iter()
            .map(|v| (v.memory_mib << 20) / crate::PAGE_SIZE as u64)
            .sum();
        if total > host && !self.overcommit {
            return Err(err(
                "vm",
                format!(
                    "the {} VMs have {} MiB of guest RAM in all, more than the host's {} MiB \
                     (every guest page gets a machine page of its own at start; sharing merges \
                     pages only later); allowed: at most {} MiB in all",
                    self.vms.len(),
                    mib(total),
                    mib(host),
                    mib(host)
                ),
            ));
        }
        let maps = crate::memory::mapper::map_count_needed(
            self.vms
                .iter()
                .map(|v| (v.memory_mib << 20) / crate::PAGE_SIZE as u64),
            self.policy.sharing.frames_per_mapping,
        );
        crate::memory::mapper::check_map_count(maps).map_err(|e| err("vm", format!("{e:#}")))?;
        Ok(())
    }

    /// The topology this config runs on (loaded while parsing).
    pub fn topology(&self) -> anyhow::Result<Topology> {
        match &self.topology_loaded {
            Some(t) => Ok(t.clone()),
            None => self.topology.load(),
        }
    }
}

/// One VM's document (a `[[vm]]` table, or the API's JSON body) checked as
/// a config file's `[[vm]]` is, against a topology of `nodes` nodes; a
/// `count` gives several VMs. Errors name `file` and the key.
pub fn vm_from_spec(spec: &VmSpec, file: &str, nodes: usize) -> Result<Vec<VmConfig>> {
    resolve::vm(spec, At::new(file, ""), nodes, Path::new("."))
}

/// A policy document (a policy file's tables, or the API's JSON body)
/// checked as a policy file is.
pub fn policy_from_spec(spec: &PolicySpec, file: &str) -> Result<Policy> {
    resolve::policy(spec, At::new(file, ""), file, "api")
}

/// A micro-guest workload from an inline TOML table's text (`{ kind =
/// "fill", seed = 1 }`, as benchmark scenarios give it), checked as a
/// `[[vm]]`'s `workload` is; `file` and `key` name it in errors.
pub fn workload_from_toml(text: &str, file: &str, key: &str) -> Result<Workload> {
    resolve::workload(
        &schema::workload_from_toml(text, file, key)?,
        At::new(file, key),
    )
}

/// The document of a policy named by a config's `policy` key (a shipped
/// policy's name, or a `.toml` path relative to `dir`), with where it was
/// read from and the name it gets when it gives none. Errors as
/// [`load_policy`]'s.
pub fn policy_spec(s: &str, dir: &Path, at: At, key: &str) -> Result<(PolicySpec, String, String)> {
    if let Some((name, text)) = SHIPPED_POLICIES.iter().find(|(n, _)| *n == s) {
        let source = format!("shipped:{name}");
        Ok((schema::from_toml(text, &source)?, source, name.to_string()))
    } else if s.ends_with(".toml") {
        let path = dir.join(s);
        let text = crate::files::read_text(&path, crate::files::MAX_CONFIG_BYTES)
            .map_err(|e| at.error(key, format!("policy file {} {e}", path.display())))?;
        let source = path.display().to_string();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("policy")
            .to_string();
        Ok((schema::from_toml(&text, &source)?, source, stem))
    } else {
        let names: Vec<&str> = SHIPPED_POLICIES.iter().map(|(n, _)| *n).collect();
        Err(at.error(
            key,
            format!(
                "`{s}` is not a policy; allowed: a shipped policy ({}), a path to a .toml file, or an inline [policy] table",
                names.join(", ")
            ),
        ))
    }
}

/// [`load_policy_at`] for a name given outside any file (errors about
/// the name carry no file or key).
pub fn load_policy(s: &str, dir: &Path) -> Result<Policy> {
    load_policy_at(s, dir, At::new("", ""), "")
}

/// A shipped policy by name, or a policy file (a path ending in `.toml`,
/// relative to `dir`). Errors about the name itself, or a file that cannot
/// be read, are at `at`'s `key` (a config's `policy` key; `--policy` with
/// no key); errors inside the file name the file.
pub fn load_policy_at(s: &str, dir: &Path, at: At, key: &str) -> Result<Policy> {
    let (spec, source, name) = policy_spec(s, dir, at, key)?;
    resolve::policy(&spec, At::new(&source, ""), &source, &name)
}

/// What a micro-guest `[[vm]]` without a `workload` runs: [`DEFAULT_WORKLOAD`].
pub fn default_workload() -> Workload {
    Workload::Fill {
        seed: 1,
        private_seed: 1,
        shared_percent: 100,
        shared_run: 1,
    }
}
