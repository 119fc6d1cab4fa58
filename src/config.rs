//! The TOML configuration: host topology, VMs, policy.
//!
//! Parsing walks the TOML tree by hand instead of deriving `Deserialize`, so
//! that every error names the file, the full key (`vm[2].workload.seed`) and
//! what is allowed, and so that unknown keys are errors rather than silently
//! ignored. `disco check FILE` runs exactly this code.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::guest::{layout, Workload};
use crate::topology::Topology;

/// The embedded default scenario `disco run` uses without an argument.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/demo.toml");
/// Policies shipped in `policies/`, embedded so they work from any directory.
pub const SHIPPED_POLICIES: &[(&str, &str)] = &[
    ("disco", include_str!("../policies/disco.toml")),
    ("static", include_str!("../policies/static.toml")),
    (
        "migrate-only",
        include_str!("../policies/migrate-only.toml"),
    ),
    (
        "replicate-only",
        include_str!("../policies/replicate-only.toml"),
    ),
];

pub const MAX_VCPUS: u64 = 64;
/// Largest guest RAM of any VM: the micro-VM layout's (a Linux guest's is
/// lower, `crate::linux::MAX_MEMORY_MIB`).
pub const MAX_MEMORY_MIB: u64 = layout::MAX_RAM >> 20;
pub const MAX_COUNT: u64 = 1024;

/// A configuration error: which file, which key, what is wrong and allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.file, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

type Result<T> = std::result::Result<T, ConfigError>;

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
    /// A page that migrates takes along the private frames of its aligned
    /// region of this many frames that sit on the node it leaves (within
    /// the copy budget); 1 moves sampled pages only.
    pub migrate_region_pages: u64,
    /// Page-fault sampling: most of each VM's vCPU time its sampled faults
    /// may cost, a fraction (0.02 = 2 %); the sampler zaps fewer pages
    /// when a VM is over it, whatever `epoch_ms`, `sample_pages` and
    /// `sample_rounds` ask for.
    pub max_sampling_overhead: f64,
    /// Page-fault sampling: what one sampled fault costs the faulting vCPU
    /// beyond the handler's own (measured) time, in microseconds: the
    /// exit, the kernel's fault path and the wake-up, which the monitor
    /// cannot time itself.
    pub sample_fault_cost_us: f64,
    /// Where access samples come from.
    pub sampling: crate::numa::counters::Sampling,
    /// The trace replayed when `sampling = "trace"` (as written in the file;
    /// a relative path is relative to the directory `disco` runs in).
    pub trace_file: Option<PathBuf>,
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
            migrate_region_pages: 64,
            max_sampling_overhead: 0.02,
            sample_fault_cost_us: 90.0,
            sampling: crate::numa::counters::Sampling::Auto,
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
    pub linux: Option<crate::linux::LinuxGuestConfig>,
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
        let root: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            file: file.to_string(),
            key: String::new(),
            message: format!("not valid TOML: {}", e.to_string().trim_end()),
        })?;
        let top = Fields::new(file, "", &root);

        let (mut overcommit, mut memory_limit_mib) = (false, None);
        let (topology, topology_loaded) = match top.opt_table("host")? {
            Some(host) => {
                overcommit = host.opt_bool("overcommit")?.unwrap_or(false);
                memory_limit_mib = host.opt_u64("memory_limit_mib", 16, 1 << 40)?;
                let choice = match host.opt_str("topology")? {
                    None | Some("host") => TopologyChoice::Host,
                    Some(name) if Topology::fixture_names().contains(&name) => {
                        TopologyChoice::Fixture(name.to_string())
                    }
                    Some(p) if p.ends_with(".xml") => TopologyChoice::File(dir.join(p)),
                    Some(other) => {
                        return Err(host.error(
                            "topology",
                            format!(
                                "`{other}` is not a topology; allowed: \"host\", a shipped fixture ({}), or a path to an hwloc XML file ending in .xml",
                                Topology::fixture_names().join(", ")
                            ),
                        ))
                    }
                };
                host.finish()?;
                let loaded = choice
                    .load()
                    .map_err(|e| host.error("topology", format!("cannot load it: {e:#}")))?;
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

        let policy = match root.get("policy") {
            None => parse_policy_text(SHIPPED_POLICIES[0].1, "shipped:disco", "disco")?,
            Some(toml::Value::String(s)) => {
                top.used("policy");
                load_policy(s, dir).map_err(|e| match e {
                    PolicyLoadError::Unknown(message) | PolicyLoadError::File(message) => {
                        top.error("policy", message)
                    }
                    PolicyLoadError::Invalid(e) => e,
                })?
            }
            Some(toml::Value::Table(_)) => {
                let t = top.opt_table("policy")?.unwrap();
                parse_policy(&t, "inline", "inline")?
            }
            Some(other) => {
                return Err(top.error(
                    "policy",
                    format!(
                        "expected a policy name, a file path or a table, found a {}",
                        other.type_str()
                    ),
                ))
            }
        };

        let vm_tables = top.req_table_array("vm")?;
        if vm_tables.is_empty() {
            return Err(top.error("vm", "at least one [[vm]] is required".into()));
        }
        let mut vms = Vec::new();
        let mut names = BTreeSet::new();
        for t in &vm_tables {
            for vm in parse_vm(t, nodes, dir)? {
                if !names.insert(vm.name.clone()) {
                    return Err(t.error(
                        "name",
                        format!("VM name `{}` is used twice; names must be unique", vm.name),
                    ));
                }
                vms.push(vm);
            }
        }
        top.finish()?;
        let config = Config {
            source: file.to_string(),
            topology,
            topology_loaded: Some(topology_loaded),
            policy,
            vms,
            overcommit,
            memory_limit_mib,
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
        // Pages each node's pool gives out while the VMs are built: a
        // micro-VM's RAM comes from its memory_node; a Linux VM's is taken
        // whole from its first guest node, then each other guest node's
        // slice from that node (counted twice here: an upper bound).
        let mut need = vec![0u64; topology.node_count()];
        let mut users: Vec<Vec<&str>> = vec![Vec::new(); topology.node_count()];
        for vm in &self.vms {
            let frames = (vm.memory_mib << 20) / crate::PAGE_SIZE as u64;
            let mut take = |node: usize, pages: u64| {
                need[node] += pages;
                if !users[node].contains(&vm.name.as_str()) {
                    users[node].push(&vm.name);
                }
            };
            if vm.linux.is_some() {
                let plan =
                    crate::linux::NumaPlan::new(&vm.vcpu_nodes, vm.memory_mib << 20, |a, b| {
                        topology.distance(a, b)
                    });
                take(plan.nodes[0].topology_node, frames);
                for (i, n) in plan.nodes.iter().enumerate().skip(1) {
                    take(n.topology_node, plan.frames(i).end - plan.frames(i).start);
                }
            } else {
                take(vm.memory_node, frames);
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
            for vm in &self.vms {
                let frames = (vm.memory_mib << 20) / crate::PAGE_SIZE as u64;
                let node = if vm.linux.is_some() {
                    vm.vcpu_nodes.first().copied().unwrap_or(0)
                } else {
                    vm.memory_node
                };
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

/// A JSON document (the API's request bodies) as a TOML table, so that the
/// one parser of `[[vm]]` tables and policy files reads it. `file` names
/// the document in errors; a `null` (TOML has none) is an error naming its
/// key.
pub fn json_to_table(value: &serde_json::Value, file: &str) -> Result<toml::Table> {
    fn convert(v: &serde_json::Value, key: &str, file: &str) -> Result<toml::Value> {
        let err = |message: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        Ok(match v {
            serde_json::Value::Null => {
                return Err(err(
                    "null is not allowed; leave the key out for its default".into(),
                ))
            }
            serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => toml::Value::Integer(i),
                (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
                _ => return Err(err(format!("{n} is out of range"))),
            },
            serde_json::Value::String(s) => toml::Value::String(s.clone()),
            serde_json::Value::Array(a) => toml::Value::Array(
                a.iter()
                    .enumerate()
                    .map(|(i, v)| convert(v, &format!("{key}[{i}]"), file))
                    .collect::<Result<_>>()?,
            ),
            serde_json::Value::Object(o) => {
                let mut t = toml::Table::new();
                for (k, v) in o {
                    let sub = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    t.insert(k.clone(), convert(v, &sub, file)?);
                }
                toml::Value::Table(t)
            }
        })
    }
    match convert(value, "", file)? {
        toml::Value::Table(t) => Ok(t),
        _ => Err(ConfigError {
            file: file.to_string(),
            key: String::new(),
            message: "expected a JSON object".into(),
        }),
    }
}

/// One VM table (the keys of a `[[vm]]`, e.g. from the API's JSON) checked
/// as a config file's `[[vm]]` is, against a topology of `nodes` nodes; a
/// `count` gives several VMs. Errors name `file` and the key.
pub fn parse_vm_table(table: &toml::Table, file: &str, nodes: usize) -> Result<Vec<VmConfig>> {
    parse_vm(&Fields::new(file, "", table), nodes, Path::new("."))
}

/// A policy table (the keys of a policy file, e.g. from the API's JSON)
/// checked as a policy file is.
pub fn parse_policy_table(table: &toml::Table, file: &str) -> Result<Policy> {
    parse_policy(&Fields::new(file, "", table), file, "api")
}

/// Why a policy named by a config's `policy` key (or `disco serve
/// --policy`) could not be loaded.
#[derive(Debug)]
pub enum PolicyLoadError {
    /// Neither a shipped policy nor a `.toml` path (the message says what
    /// is allowed).
    Unknown(String),
    /// The file cannot be read.
    File(String),
    /// The policy file has an error (naming the file and key).
    Invalid(ConfigError),
}

impl fmt::Display for PolicyLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyLoadError::Unknown(m) | PolicyLoadError::File(m) => write!(f, "{m}"),
            PolicyLoadError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PolicyLoadError {}

/// A shipped policy by name, or a policy file (a path ending in `.toml`,
/// relative to `dir`).
pub fn load_policy(s: &str, dir: &Path) -> std::result::Result<Policy, PolicyLoadError> {
    if let Some((name, text)) = SHIPPED_POLICIES.iter().find(|(n, _)| *n == s) {
        parse_policy_text(text, &format!("shipped:{name}"), name).map_err(PolicyLoadError::Invalid)
    } else if s.ends_with(".toml") {
        let path = dir.join(s);
        let text = crate::files::read_text(&path, crate::files::MAX_CONFIG_BYTES)
            .map_err(|e| PolicyLoadError::File(format!("policy file {} {e}", path.display())))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("policy");
        parse_policy_text(&text, &path.display().to_string(), stem)
            .map_err(PolicyLoadError::Invalid)
    } else {
        let names: Vec<&str> = SHIPPED_POLICIES.iter().map(|(n, _)| *n).collect();
        Err(PolicyLoadError::Unknown(format!(
            "`{s}` is not a policy; allowed: a shipped policy ({}), a path to a .toml file, or an inline [policy] table",
            names.join(", ")
        )))
    }
}

fn parse_policy_text(text: &str, source: &str, default_name: &str) -> Result<Policy> {
    let root: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
        file: source.to_string(),
        key: String::new(),
        message: format!("not valid TOML: {}", e.to_string().trim_end()),
    })?;
    parse_policy(&Fields::new(source, "", &root), source, default_name)
}

fn parse_policy(t: &Fields, source: &str, default_name: &str) -> Result<Policy> {
    let name = t.opt_str("name")?.unwrap_or(default_name).to_string();
    let description = t.opt_str("description")?.unwrap_or("").to_string();
    let sharing = match t.opt_table("sharing")? {
        Some(s) => {
            let p = SharingPolicy {
                enabled: s.opt_bool("enabled")?.unwrap_or(true),
                pages_per_second: s
                    .opt_u64("pages_per_second", 1, 100_000_000)?
                    .unwrap_or(100_000),
                domains: s.opt_str_array("domains")?.unwrap_or_default(),
                frames_per_mapping: s
                    .opt_u64("frames_per_mapping", 0, 1 << 20)?
                    .unwrap_or(crate::sharing::FRAMES_PER_MAPPING),
                busy_cpu_share: s
                    .opt_f64("busy_cpu_share", 0.0001, 1.0)?
                    .unwrap_or(crate::sharing::BUSY_CPU_SHARE),
            };
            s.finish()?;
            p
        }
        None => SharingPolicy {
            enabled: false,
            pages_per_second: 100_000,
            domains: Vec::new(),
            frames_per_mapping: crate::sharing::FRAMES_PER_MAPPING,
            busy_cpu_share: crate::sharing::BUSY_CPU_SHARE,
        },
    };
    let numa = match t.opt_table("numa")? {
        Some(s) => {
            use crate::numa::counters::Sampling;
            let d = NumaPolicy::default();
            let sampling = match s.opt_str("sampling")? {
                None => d.sampling,
                Some(name) => Sampling::from_name(name).ok_or_else(|| {
                    s.error(
                        "sampling",
                        format!(
                            "`{name}` is not a sample source; allowed: {}",
                            Sampling::NAMES.join(", ")
                        ),
                    )
                })?,
            };
            let trace_file = s.opt_str("trace_file")?.map(PathBuf::from);
            match (sampling, &trace_file) {
                (Sampling::Trace, None) => {
                    return Err(s.error(
                        "trace_file",
                        "is required when sampling = \"trace\" (the path of the trace to replay)"
                            .into(),
                    ))
                }
                (Sampling::Trace, Some(p)) if p.as_os_str().is_empty() => {
                    return Err(s.error("trace_file", "is empty; give a path".into()))
                }
                (other, Some(_)) if other != Sampling::Trace => {
                    return Err(s.error(
                        "trace_file",
                        format!(
                            "is only used with sampling = \"trace\" (sampling is \"{}\"); remove it or set sampling = \"trace\"",
                            other.as_str()
                        ),
                    ))
                }
                _ => {}
            }
            let p = NumaPolicy {
                migrate: s.opt_bool("migrate")?.unwrap_or(d.migrate),
                replicate: s.opt_bool("replicate")?.unwrap_or(d.replicate),
                epoch_ms: s.opt_u64("epoch_ms", 1, 60_000)?.unwrap_or(d.epoch_ms),
                hot_threshold: s
                    .opt_f64("hot_threshold", 0.01, 1e9)?
                    .unwrap_or(d.hot_threshold),
                dominant_share: s
                    .opt_f64("dominant_share", 0.5, 1.0)?
                    .unwrap_or(d.dominant_share),
                reader_threshold: s
                    .opt_f64("reader_threshold", 0.01, 1e9)?
                    .unwrap_or(d.reader_threshold),
                writer_threshold: s
                    .opt_f64("writer_threshold", 0.001, 1e9)?
                    .unwrap_or(d.writer_threshold),
                replicate_min_nodes: s
                    .opt_u64("replicate_min_nodes", 2, 4096)?
                    .unwrap_or(d.replicate_min_nodes),
                decay: s.opt_f64("decay", 0.0, 0.99)?.unwrap_or(d.decay),
                copy_budget_pages: s
                    .opt_u64("copy_budget_pages", 0, 100_000_000)?
                    .unwrap_or(d.copy_budget_pages),
                freeze_after_moves: s
                    .opt_u64("freeze_after_moves", 0, 1000)?
                    .unwrap_or(d.freeze_after_moves),
                freeze_window_epochs: s
                    .opt_u64("freeze_window_epochs", 1, 1_000_000)?
                    .unwrap_or(d.freeze_window_epochs),
                freeze_epochs: s
                    .opt_u64("freeze_epochs", 1, 1_000_000)?
                    .unwrap_or(d.freeze_epochs),
                replica_idle_epochs: s
                    .opt_u64("replica_idle_epochs", 1, 1_000_000)?
                    .unwrap_or(d.replica_idle_epochs),
                sample_pages: s
                    .opt_u64("sample_pages", 1, 1_000_000)?
                    .unwrap_or(d.sample_pages),
                sample_rounds: s
                    .opt_u64("sample_rounds", 1, 1000)?
                    .unwrap_or(d.sample_rounds),
                migrate_region_pages: s
                    .opt_u64("migrate_region_pages", 1, 512)?
                    .unwrap_or(d.migrate_region_pages),
                max_sampling_overhead: s
                    .opt_f64("max_sampling_overhead", 0.0001, 1.0)?
                    .unwrap_or(d.max_sampling_overhead),
                sample_fault_cost_us: s
                    .opt_f64("sample_fault_cost_us", 0.1, 100_000.0)?
                    .unwrap_or(d.sample_fault_cost_us),
                sampling,
                trace_file,
            };
            if p.reader_threshold > p.hot_threshold {
                return Err(s.error(
                    "reader_threshold",
                    format!(
                        "{} is above hot_threshold ({}); allowed: 0.01 to hot_threshold (a node's count cannot need more samples than the whole page's)",
                        p.reader_threshold, p.hot_threshold
                    ),
                ));
            }
            s.finish()?;
            p
        }
        None => NumaPolicy::default(),
    };
    t.finish()?;
    Ok(Policy {
        name,
        source: source.to_string(),
        description,
        sharing,
        numa,
    })
}

const NAME_RULE: &str = "1 to 40 characters from a-z, A-Z, 0-9, '-' and '_'";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn parse_vm(t: &Fields, nodes: usize, dir: &Path) -> Result<Vec<VmConfig>> {
    let name = t.req_str("name")?.to_string();
    if !valid_name(&name) {
        return Err(t.error(
            "name",
            format!("`{name}` is not a valid VM name; allowed: {NAME_RULE}"),
        ));
    }
    let max_node = nodes as u64 - 1;
    let node_range = format!("0 to {max_node} (the topology has {nodes} nodes)");
    let home = t.opt_u64_msg("node", 0, max_node, &node_range)?;
    let vcpu_nodes: Vec<usize> = match t.opt_u64_array("vcpu_nodes", 0, max_node, &node_range)? {
        Some(list) => {
            if home.is_some() {
                return Err(t.error(
                    "vcpu_nodes",
                    "give either `node` (all vCPUs on one node) or `vcpu_nodes` (one node per vCPU), not both".into(),
                ));
            }
            t.used("vcpus");
            if t.has("vcpus") && t.opt_u64("vcpus", 1, MAX_VCPUS)? != Some(list.len() as u64) {
                return Err(t.error(
                    "vcpus",
                    format!(
                        "is {} but `vcpu_nodes` lists {} nodes; they must agree",
                        t.opt_u64("vcpus", 1, MAX_VCPUS)?.unwrap(),
                        list.len()
                    ),
                ));
            }
            if list.is_empty() || list.len() as u64 > MAX_VCPUS {
                return Err(t.error(
                    "vcpu_nodes",
                    format!("must list 1 to {MAX_VCPUS} nodes, one per vCPU"),
                ));
            }
            list.into_iter().map(|n| n as usize).collect()
        }
        None => {
            let vcpus = t.opt_u64("vcpus", 1, MAX_VCPUS)?.unwrap_or(1);
            vec![home.unwrap_or(0) as usize; vcpus as usize]
        }
    };
    let memory_node = t
        .opt_u64_msg("memory_node", 0, max_node, &node_range)?
        .map(|n| n as usize)
        .unwrap_or(vcpu_nodes[0]);
    let memory_mib = t.opt_u64("memory_mib", 2, MAX_MEMORY_MIB)?.unwrap_or(16);
    let time_limit = match t.opt_f64("time_limit_s", 0.1, 86_400.0)? {
        Some(s) => Duration::from_secs_f64(s),
        None => Duration::from_secs(60),
    };
    let count = t.opt_u64("count", 1, MAX_COUNT)?.unwrap_or(1);
    let sharing_domain = t
        .opt_str("sharing_domain")?
        .unwrap_or("default")
        .to_string();
    if !valid_name(&sharing_domain) {
        return Err(t.error(
            "sharing_domain",
            format!("`{sharing_domain}` is not a valid domain name; allowed: {NAME_RULE}"),
        ));
    }
    let linux = parse_linux(t, dir, memory_mib, count)?;
    let workload = match t.opt_table("workload")? {
        Some(_) if linux.is_some() => {
            return Err(t.error(
                "workload",
                "a VM runs either a micro-guest `workload` or a Linux `kernel`, not both".into(),
            ))
        }
        Some(w) => parse_workload(&w)?,
        // The documented default (README, `disco check` prints it).
        None => Workload::Fill {
            seed: 1,
            private_seed: 1,
            shared_percent: 100,
            shared_run: 1,
        },
    };
    let workload_is_default = linux.is_none() && !t.has("workload");
    let need = layout::min_ram_bytes(&workload, vcpu_nodes.len());
    if linux.is_none() && memory_mib * 1024 * 1024 < need {
        return Err(t.error(
            "memory_mib",
            format!(
                "{memory_mib} MiB is too small for workload `{}` with {} vCPUs; allowed: at least {} MiB",
                workload.name(),
                vcpu_nodes.len(),
                need.div_ceil(1024 * 1024)
            ),
        ));
    }
    let mut moves = Vec::new();
    for m in t.opt_table_array("moves")? {
        let after_ms = m
            .opt_u64("after_ms", 0, 86_400_000)?
            .ok_or_else(|| m.error("after_ms", "is required (milliseconds after start)".into()))?;
        let node = m
            .opt_u64_msg("node", 0, max_node, &node_range)?
            .ok_or_else(|| m.error("node", format!("is required; allowed: {node_range}")))?
            as usize;
        let vcpu_range = format!(
            "0 to {} (the VM has {} vCPUs)",
            vcpu_nodes.len() - 1,
            vcpu_nodes.len()
        );
        let vcpu = m
            .opt_u64_msg("vcpu", 0, vcpu_nodes.len() as u64 - 1, &vcpu_range)?
            .map(|v| v as usize);
        m.finish()?;
        moves.push(VcpuMove {
            after_ms,
            node,
            vcpu,
        });
    }
    moves.sort_by_key(|m| m.after_ms);
    t.finish()?;
    let make = |name: String| VmConfig {
        linux: linux.as_ref().map(|l| l.for_vm(&name)),
        name,
        vcpu_nodes: vcpu_nodes.clone(),
        memory_mib,
        memory_node,
        workload: workload.clone(),
        workload_is_default,
        time_limit,
        sharing_domain: sharing_domain.clone(),
        moves: moves.clone(),
    };
    Ok(if count == 1 {
        vec![make(name)]
    } else {
        (0..count).map(|i| make(format!("{name}-{i}"))).collect()
    })
}

/// The Linux-guest keys of a `[[vm]]` (`kernel`, `initramfs`, `cmdline`,
/// `disk`, `serial`, `virtio_console`); `None` when it names no kernel.
fn parse_linux(
    t: &Fields,
    dir: &Path,
    memory_mib: u64,
    count: u64,
) -> Result<Option<crate::linux::LinuxGuestConfig>> {
    use crate::linux::{
        DiskConfig, LinuxGuestConfig, SerialOutput, MAX_MEMORY_MIB, MIN_MEMORY_MIB,
    };
    // The files are checked here (type, size, writability: see
    // `LinuxGuestConfig::check_files`) and again when the VM is built.
    let file_key = |key: &str, path: &str| -> Result<PathBuf> {
        if path.is_empty() {
            return Err(t.error(
                key,
                "is empty; allowed: a file path (relative to the config file)".into(),
            ));
        }
        Ok(dir.join(path))
    };
    let Some(kernel) = t.opt_str("kernel")? else {
        for key in ["initramfs", "cmdline", "disk", "serial", "virtio_console"] {
            if t.has(key) {
                t.used(key);
                return Err(t.error(key, "is only allowed with `kernel` (a Linux guest)".into()));
            }
        }
        return Ok(None);
    };
    if t.has("moves") {
        t.used("moves");
        return Err(t.error(
            "moves",
            "vCPU moves are for micro-guests; a Linux VM (`kernel`) keeps its placement".into(),
        ));
    }
    let kernel = file_key("kernel", kernel)?;
    let initramfs = match t.opt_str("initramfs")? {
        Some(p) => Some(file_key("initramfs", p)?),
        None => None,
    };
    let cmdline = t.opt_str("cmdline")?.map(str::to_string);
    if let Some(c) = &cmdline {
        if c.len() >= crate::linux::MAX_CMDLINE {
            return Err(t.error(
                "cmdline",
                format!(
                    "is {} bytes; allowed: at most {} (Linux's COMMAND_LINE_SIZE)",
                    c.len(),
                    crate::linux::MAX_CMDLINE - 1
                ),
            ));
        }
    }
    let mut disks = Vec::new();
    if let Some(v) = t.get("disk") {
        let toml::Value::Array(items) = v else {
            return Err(t.type_error(
                "disk",
                "an array of tables like { path = \"disk.img\", read_only = true }",
                v,
            ));
        };
        for (i, item) in items.iter().enumerate() {
            let toml::Value::Table(d) = item else {
                return Err(t.type_error(
                    &format!("disk[{i}]"),
                    "a table { path = ..., read_only = ... }",
                    item,
                ));
            };
            let d = Fields::new(t.file, &t.key(&format!("disk[{i}]")), d);
            let path = d.req_str("path")?;
            if path.is_empty() {
                return Err(d.error("path", "is empty; allowed: a disk image's path".into()));
            }
            disks.push(DiskConfig {
                path: dir.join(path),
                read_only: d.opt_bool("read_only")?.unwrap_or(false),
            });
            d.finish()?;
        }
    }
    let serial = match t.opt_str("serial")? {
        None | Some("console") => SerialOutput::Console,
        Some("none") => SerialOutput::None,
        Some("") => {
            return Err(t.error(
                "serial",
                "is empty; allowed: \"console\", \"none\" or a file path".into(),
            ))
        }
        Some(p) => {
            if count > 1 && !p.contains("{vm}") {
                return Err(t.error("serial", format!("`{p}` would be shared by the {count} copies of this VM; allowed: a path containing {{vm}} (replaced by each VM's name), \"console\" or \"none\"")));
            }
            SerialOutput::File(dir.join(p))
        }
    };
    let virtio_console = t.opt_bool("virtio_console")?.unwrap_or(false);
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        t.used("memory_mib");
        return Err(t.error("memory_mib", format!("{memory_mib} MiB does not suit a Linux guest; allowed: {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} (RAM sits below the 3 GiB device hole)")));
    }
    let guest = LinuxGuestConfig {
        kernel,
        initramfs,
        cmdline,
        disks,
        serial,
        virtio_console,
    };
    guest
        .check_files(memory_mib << 20)
        .map_err(|(key, message)| t.error(&key, message))?;
    Ok(Some(guest))
}

fn parse_workload(w: &Fields) -> Result<Workload> {
    let kind = w.req_str("kind")?;
    let seed = || w.opt_u64("seed", 0, u64::MAX).map(|s| s.unwrap_or(1));
    let workload = match kind {
        "fill" => {
            let seed = seed()?;
            Workload::Fill {
                seed,
                private_seed: w.opt_u64("private_seed", 0, u64::MAX)?.unwrap_or(seed),
                shared_percent: w.opt_u64("shared_percent", 0, 100)?.unwrap_or(100) as u8,
                shared_run: match w.opt_u64("shared_run", 1, 65536)?.unwrap_or(1) {
                    r if r.is_power_of_two() => r as u32,
                    r => {
                        return Err(w.error(
                            "shared_run",
                            format!("{r} is not a power of two; allowed: 1, 2, 4, ... 65536 (frames per block of the shared/private choice)"),
                        ))
                    }
                },
            }
        }
        "sweep" => Workload::Sweep {
            seed: seed()?,
            passes: w.opt_u64("passes", 1, 10_000)?.unwrap_or(4) as u32,
        },
        "random" => Workload::Random {
            seed: seed()?,
            touches: w.opt_u64("touches", 1, 1 << 40)?.unwrap_or(1_000_000),
        },
        "table_scan" => {
            let lookups = w.opt_u64("lookups", 1, 1 << 40)?.unwrap_or(1_000_000);
            Workload::TableScan {
                seed: seed()?,
                table_pages: w.opt_u64("table_pages", 1, 1 << 20)?.unwrap_or(64) as u32,
                lookups,
                // Bounded by `lookups`: the write happens between two of them.
                write_after: w
                    .opt_u64_msg(
                        "write_after",
                        0,
                        lookups,
                        &format!("0 (never write) to `lookups` ({lookups})"),
                    )?
                    .unwrap_or(0),
            }
        }
        "counters" => Workload::Counters {
            counters: w.opt_u64("counters", 1, 4096)?.unwrap_or(16) as u32,
            increments: w.opt_u64("increments", 1, 1 << 40)?.unwrap_or(100_000),
        },
        "crash" => Workload::Crash,
        "spin" => Workload::Spin,
        "bad_io" => Workload::BadIo,
        other => {
            return Err(w.error(
                "kind",
                format!(
                    "`{other}` is not a workload; allowed: {}",
                    Workload::NAMES.join(", ")
                ),
            ))
        }
    };
    w.finish()?;
    Ok(workload)
}

/// A TOML table being read, with its key path for error messages and the set
/// of keys read so far (the rest are reported as unknown by [`Fields::finish`]).
struct Fields<'a> {
    file: &'a str,
    path: String,
    table: &'a toml::Table,
    seen: std::cell::RefCell<BTreeSet<String>>,
}

impl<'a> Fields<'a> {
    fn new(file: &'a str, path: &str, table: &'a toml::Table) -> Fields<'a> {
        Fields {
            file,
            path: path.to_string(),
            table,
            seen: Default::default(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn error(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key: self.key(key),
            message,
        }
    }

    fn used(&self, key: &str) {
        self.seen.borrow_mut().insert(key.to_string());
    }

    fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn get(&self, key: &str) -> Option<&'a toml::Value> {
        self.used(key);
        self.table.get(key)
    }

    fn type_error(&self, key: &str, expected: &str, found: &toml::Value) -> ConfigError {
        self.error(
            key,
            format!("expected {expected}, found a {}", found.type_str()),
        )
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_error(key, "a string", v)),
        }
    }

    fn req_str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?
            .ok_or_else(|| self.error(key, "is required (a string)".into()))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_error(key, "true or false", v)),
        }
    }

    fn opt_u64(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>> {
        self.opt_u64_msg(key, min, max, &format!("{min} to {max}"))
    }

    fn check_int(
        &self,
        key: &str,
        v: &toml::Value,
        min: u64,
        max: u64,
        allowed: &str,
    ) -> Result<u64> {
        match v {
            toml::Value::Integer(i) if *i >= 0 && (*i as u64) >= min && (*i as u64) <= max => {
                Ok(*i as u64)
            }
            toml::Value::Integer(i) => {
                Err(self.error(key, format!("{i} is out of range; allowed: {allowed}")))
            }
            v => Err(self.type_error(key, &format!("an integer ({allowed})"), v)),
        }
    }

    fn opt_u64_msg(&self, key: &str, min: u64, max: u64, allowed: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => self.check_int(key, v, min, max, allowed).map(Some),
        }
    }

    fn opt_u64_array(
        &self,
        key: &str,
        min: u64,
        max: u64,
        allowed: &str,
    ) -> Result<Option<Vec<u64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.check_int(&format!("{key}[{i}]"), v, min, max, allowed))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.type_error(key, "an array of integers", v)),
        }
    }

    fn opt_str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    v => Err(self.type_error(&format!("{key}[{i}]"), "a string", v)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.type_error(key, "an array of strings", v)),
        }
    }

    fn opt_f64(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>> {
        let value = match self.get(key) {
            None => return Ok(None),
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(v) => return Err(self.type_error(key, "a number", v)),
        };
        if !(min..=max).contains(&value) {
            return Err(self.error(
                key,
                format!("{value} is out of range; allowed: {min} to {max}"),
            ));
        }
        Ok(Some(value))
    }

    fn opt_table(&self, key: &str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(Fields::new(self.file, &self.key(key), t))),
            Some(v) => Err(self.type_error(key, "a table", v)),
        }
    }

    /// An optional array of (inline) tables; absent is empty.
    fn opt_table_array(&self, key: &str) -> Result<Vec<Fields<'a>>> {
        if self.get(key).is_none() {
            return Ok(Vec::new());
        }
        self.req_table_array(key)
    }

    fn req_table_array(&self, key: &str) -> Result<Vec<Fields<'a>>> {
        match self.get(key) {
            None => Err(self.error(key, "is required: add at least one [[vm]] table".into())),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::Table(t) => Ok(Fields::new(
                        self.file,
                        &format!("{}[{i}]", self.key(key)),
                        t,
                    )),
                    v => Err(self.type_error(&format!("{key}[{i}]"), "a table", v)),
                })
                .collect(),
            Some(v) => Err(self.type_error(key, "an array of tables ([[vm]])", v)),
        }
    }

    /// Fails on the first key that was never read: unknown keys are errors.
    fn finish(&self) -> Result<()> {
        let seen = self.seen.borrow();
        if let Some(unknown) = self.table.keys().find(|k| !seen.contains(k.as_str())) {
            let mut allowed: Vec<&str> = seen.iter().map(String::as_str).collect();
            allowed.sort_unstable();
            return Err(self.error(
                unknown,
                format!("unknown key; allowed here: {}", allowed.join(", ")),
            ));
        }
        Ok(())
    }
}
