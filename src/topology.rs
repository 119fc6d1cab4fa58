//! NUMA topologies: the real host, or a fixture machine emulated on top of it.
//!
//! disco places guest memory and vCPUs by NUMA node. A [`Topology`] says which
//! nodes exist, which CPUs and how much memory each one has, how far apart
//! they are (the hwloc distance matrix: relative latencies, 10 = local), and
//! onto which host node and host CPUs each node is mapped.
//!
//! There are two kinds of topology:
//!
//! * **Host** ([`Topology::host`]): the machine disco runs on, read with hwloc
//!   (through the `hwlocality` crate). Every node maps onto itself.
//! * **Fixture** ([`Topology::from_fixture_name`], [`Topology::from_xml_file`]):
//!   an hwloc XML description of another machine, e.g. a 2-socket server or
//!   an 8-node box, as exported by `lstopo`. The shipped fixtures live in
//!   `topology-fixtures/` and are embedded in the binary.
//!
//! # Emulated nodes
//!
//! A fixture usually describes more NUMA nodes and CPUs than the host has
//! (the build machines have one node and two CPUs). Its nodes are then
//! *emulated*: fixture node `i` is mapped onto host node `i mod host_nodes`,
//! and the node's CPUs are spread round-robin over that host node's CPUs, so
//! several fixture nodes share one host node and several vCPU threads share
//! one host CPU. Everything the monitor does per node still runs for real:
//! each emulated node gets its own page pool, placement decides which node a
//! page lives on, the sampler attributes accesses to nodes, and the migration
//! and replication policy acts on what it sees. The one thing that cannot be
//! real on such a host is the cost of a remote access; that is modelled from
//! the distance matrix ([`Topology::distance`]), e.g. a 21 means a remote
//! access costs 2.1 times a local one. [`Topology::is_emulated`] says when
//! this is the case, and [`Topology::render_text`] says it in words.
//!
//! A fixture without a NUMA distance matrix falls back to 10 for local and 20
//! for every remote pair ([`DistanceOrigin::Default`]); a one-node machine
//! simply has the matrix `[[10]]` (hwloc does not store 1x1 matrices).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::distance::DistancesKind;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use serde::Serialize;

/// Distance between a node and itself in hwloc's relative scale.
pub const LOCAL_DISTANCE: u32 = 10;
/// Remote distance used when a topology has no distance matrix.
pub const DEFAULT_REMOTE_DISTANCE: u32 = 20;

/// The fixtures shipped with disco, embedded so `disco` works from any
/// directory: (name, path in the source tree, XML text).
const FIXTURES: &[(&str, &str, &str)] = &[
    (
        "1-node",
        "topology-fixtures/1-node.xml",
        include_str!("../topology-fixtures/1-node.xml"),
    ),
    (
        "2-socket",
        "topology-fixtures/2-socket.xml",
        include_str!("../topology-fixtures/2-socket.xml"),
    ),
    (
        "4-node",
        "topology-fixtures/4-node.xml",
        include_str!("../topology-fixtures/4-node.xml"),
    ),
    (
        "8-node",
        "topology-fixtures/8-node.xml",
        include_str!("../topology-fixtures/8-node.xml"),
    ),
];

const FIXTURE_NAMES: &[&str] = &["1-node", "2-socket", "4-node", "8-node"];

/// A NUMA topology and its mapping onto the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Short name: the fixture name, the file stem, or "host".
    pub name: String,
    /// Where the description came from.
    pub source: TopologySource,
    /// NUMA nodes in hwloc logical order; `nodes[i].index == i`.
    pub nodes: Vec<Node>,
    /// `distances[from][to]`, hwloc relative values, 10 = local.
    pub distances: Vec<Vec<u32>>,
    /// NUMA nodes of the real host.
    pub host_nodes: usize,
    /// CPUs (PUs) of the real host that disco may use.
    pub host_cpus: usize,
    /// Where `distances` came from (the XML, or the 10/20 fallback).
    pub distance_origin: DistanceOrigin,
}

/// Where a [`Topology`] was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TopologySource {
    /// The machine disco runs on, discovered by hwloc.
    Host,
    /// An hwloc XML description. `path` is `None` for the fixtures embedded in
    /// the binary and for XML given as a string.
    Fixture { name: String, path: Option<PathBuf> },
}

/// Where the distance matrix of a [`Topology`] came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum DistanceOrigin {
    /// An hwloc NUMA-node distance matrix (from the OS for the host, from the
    /// `<distances2>` element for XML). `kind` describes hwloc's kind flags.
    Hwloc { kind: String },
    /// A single node: the matrix is `[[10]]` by definition.
    SingleNode,
    /// No matrix was available: 10 local, 20 for every remote pair.
    Default,
}

/// One NUMA node of a [`Topology`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Logical index, 0..n.
    pub index: usize,
    /// OS (physical) index of the node in its description (`P#` in lstopo).
    pub os_index: u32,
    /// OS indices of the PUs in this node (of the fixture, for a fixture).
    pub cpus: Vec<u32>,
    /// Memory local to the node, in bytes.
    pub memory_bytes: u64,
    /// OS index of the host NUMA node this node is mapped onto.
    pub host_node: u32,
    /// Host CPUs its vCPU threads get pinned to, distinct, in round-robin
    /// order: the node's `k`-th CPU (`cpus[k]`, or the node's `k`-th vCPU)
    /// runs on `host_cpus[k % host_cpus.len()]` (see [`Node::host_cpu_for`]).
    /// Shorter than `cpus` when several fixture CPUs share a host CPU; empty
    /// for a node without CPUs.
    pub host_cpus: Vec<usize>,
}

impl Node {
    /// The host CPU for the node's `k`-th CPU or vCPU (round-robin over
    /// [`Node::host_cpus`]); `None` if the node has no host CPUs.
    pub fn host_cpu_for(&self, k: usize) -> Option<usize> {
        if self.host_cpus.is_empty() {
            None
        } else {
            Some(self.host_cpus[k % self.host_cpus.len()])
        }
    }
}

/// The host as far as the mapping is concerned: its NUMA nodes and their
/// CPUs. [`HostView::detect`] reads the real one; tests may build others to
/// exercise the mapping onto a multi-node host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostView {
    /// Host NUMA nodes in hwloc logical order.
    pub nodes: Vec<HostNode>,
}

/// One NUMA node of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostNode {
    /// OS index, as used by `mbind`/`set_mempolicy`.
    pub os_index: u32,
    /// Host CPUs (OS indices) local to this node that disco may use.
    pub cpus: Vec<usize>,
    /// Memory local to the node, in bytes, as hwloc reports it.
    pub memory_bytes: u64,
}

impl HostView {
    /// Read the host's NUMA nodes and CPUs with hwloc.
    pub fn detect() -> Result<HostView> {
        Self::from_hwloc(&load_host()?)
    }

    fn from_hwloc(topo: &hwlocality::Topology) -> Result<HostView> {
        let allowed: BTreeSet<usize> = topo.allowed_cpuset().iter_set().map(usize::from).collect();
        let mut nodes = Vec::new();
        for obj in numa_objects(topo) {
            let os_index = node_os_index(obj).context("host NUMA node without an OS index")?;
            let cpus = obj
                .cpuset()
                .map(|set| {
                    set.iter_set()
                        .map(usize::from)
                        .filter(|c| allowed.contains(c))
                        .collect()
                })
                .unwrap_or_default();
            nodes.push(HostNode {
                os_index,
                cpus,
                memory_bytes: node_memory(obj),
            });
        }
        let host = if nodes.is_empty() {
            // hwloc always reports at least one node on Linux; be safe anyway.
            HostView {
                nodes: vec![HostNode {
                    os_index: 0,
                    cpus: allowed.iter().copied().collect(),
                    memory_bytes: 0,
                }],
            }
        } else {
            HostView { nodes }
        };
        if host.cpu_count() == 0 {
            bail!("hwloc reports no usable CPUs on this host");
        }
        Ok(host)
    }

    /// All usable host CPUs, sorted.
    pub fn all_cpus(&self) -> Vec<usize> {
        let set: BTreeSet<usize> = self
            .nodes
            .iter()
            .flat_map(|n| n.cpus.iter().copied())
            .collect();
        set.into_iter().collect()
    }

    /// Number of usable host CPUs.
    pub fn cpu_count(&self) -> usize {
        self.all_cpus().len()
    }
}

impl Topology {
    /// The real machine, read with hwloc. Each node maps onto itself.
    pub fn host() -> Result<Topology> {
        let topo = load_host()?;
        let view = HostView::from_hwloc(&topo)?;
        let parsed = parse_hwloc(&topo).context("host topology")?;
        let mut nodes = Vec::with_capacity(parsed.nodes.len());
        for (i, p) in parsed.nodes.into_iter().enumerate() {
            let host_cpus = view
                .nodes
                .get(i)
                .map(|h| h.cpus.clone())
                .unwrap_or_default();
            // Only CPUs disco may run on (cgroups may restrict them).
            let cpus: Vec<u32> = host_cpus.iter().map(|&c| c as u32).collect();
            nodes.push(Node {
                index: i,
                os_index: p.os_index,
                cpus,
                memory_bytes: p.memory_bytes,
                host_node: p.os_index,
                host_cpus,
            });
        }
        let (distances, distance_origin) = parsed.distances;
        Ok(Topology {
            name: "host".to_string(),
            source: TopologySource::Host,
            nodes,
            distances,
            host_nodes: view.nodes.len(),
            host_cpus: view.cpu_count(),
            distance_origin,
        })
    }

    /// One of the fixtures shipped with disco (see [`Topology::fixture_names`]),
    /// mapped onto the host. A trailing `.xml` is accepted.
    pub fn from_fixture_name(name: &str) -> Result<Topology> {
        let wanted = name.strip_suffix(".xml").unwrap_or(name);
        let (fname, path, xml) =
            FIXTURES
                .iter()
                .find(|(n, _, _)| *n == wanted)
                .ok_or_else(|| {
                    anyhow!(
                        "unknown topology fixture {name:?}; the shipped fixtures are: {}",
                        FIXTURE_NAMES.join(", ")
                    )
                })?;
        let host = HostView::detect()?;
        Self::from_xml_str_on(
            fname,
            xml,
            TopologySource::Fixture {
                name: fname.to_string(),
                path: None,
            },
            &format!("{path} (embedded)"),
            &host,
        )
    }

    /// Any hwloc XML file (as written by `lstopo file.xml`), mapped onto the
    /// host.
    pub fn from_xml_file(path: &Path) -> Result<Topology> {
        let xml = crate::files::read_text(path, crate::files::MAX_TOPOLOGY_BYTES)
            .map_err(|e| anyhow!("{}: topology file {e}", path.display()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let host = HostView::detect()?;
        Self::from_xml_str_on(
            &name,
            &xml,
            TopologySource::Fixture {
                name: name.clone(),
                path: Some(path.to_path_buf()),
            },
            &path.display().to_string(),
            &host,
        )
    }

    /// hwloc XML given as a string, mapped onto `host`. `label` names the
    /// input in error messages (usually the file name).
    pub fn from_xml_str_on(
        name: &str,
        xml: &str,
        source: TopologySource,
        label: &str,
        host: &HostView,
    ) -> Result<Topology> {
        if !xml.contains("<topology") {
            bail!("{label}: not a valid hwloc XML: no <topology> element");
        }
        // hwloc refuses such a file with only "Topology does not contain any
        // NUMA node, aborting!" on stderr; say it properly instead.
        if xml.contains("</topology>") && !xml.contains("\"NUMANode\"") {
            bail!("{label}: has no NUMA nodes (no object of type NUMANode)");
        }
        let topo = guarded(label, || {
            hwlocality::Topology::builder()
                .from_xml(xml)
                .map_err(|e| anyhow!("{e}"))?
                .build()
                .map_err(|e| {
                    anyhow!(
                        "hwloc could not load it ({}); `HWLOC_XML_VERBOSE=1 lstopo -i {label}` shows why",
                        raw_error_text(&e)
                    )
                })
        })
        .and_then(|r| r)
        .with_context(|| format!("{label}: not a valid hwloc XML"))?;
        Self::from_hwloc_on(name, &topo, source, label, host)
    }

    /// An hwloc synthetic description such as `"pack:2 [numa(memory=1GiB)]
    /// core:2 pu:1"`, mapped onto the host. Synthetic topologies carry no
    /// distance matrix, so the 10/20 fallback applies when there are several
    /// nodes.
    pub fn from_synthetic(description: &str) -> Result<Topology> {
        let label = format!("synthetic topology {description:?}");
        let topo = guarded(&label, || {
            hwlocality::Topology::builder()
                .from_synthetic(description)
                .map_err(|e| anyhow!("{e}"))?
                .build()
                .map_err(|e| anyhow!("hwloc could not load it ({})", raw_error_text(&e)))
        })
        .and_then(|r| r)
        .with_context(|| format!("{label}: not a valid hwloc synthetic description"))?;
        let host = HostView::detect()?;
        Self::from_hwloc_on(
            "synthetic",
            &topo,
            TopologySource::Fixture {
                name: description.to_string(),
                path: None,
            },
            &label,
            &host,
        )
    }

    fn from_hwloc_on(
        name: &str,
        topo: &hwlocality::Topology,
        source: TopologySource,
        label: &str,
        host: &HostView,
    ) -> Result<Topology> {
        let parsed = parse_hwloc(topo).with_context(|| label.to_string())?;
        if parsed.nodes.is_empty() {
            bail!("{label}: has no NUMA nodes");
        }
        let nodes = parsed
            .nodes
            .into_iter()
            .enumerate()
            .map(|(i, p)| Node {
                index: i,
                os_index: p.os_index,
                cpus: p.cpus,
                memory_bytes: p.memory_bytes,
                host_node: 0,
                host_cpus: Vec::new(),
            })
            .collect();
        let (distances, distance_origin) = parsed.distances;
        let mut t = Topology {
            name: name.to_string(),
            source,
            nodes,
            distances,
            host_nodes: 0,
            host_cpus: 0,
            distance_origin,
        };
        t.map_onto(host)?;
        Ok(t)
    }

    /// (Re)map the nodes onto `host`: node `i` goes to host node
    /// `i mod host_nodes`; its CPUs go round-robin over that host node's CPUs,
    /// continuing where the previous fixture node on the same host node left
    /// off, so the load spreads evenly. A host node without CPUs (memory only)
    /// lends all host CPUs instead.
    pub fn map_onto(&mut self, host: &HostView) -> Result<()> {
        if host.nodes.is_empty() {
            bail!("the host view has no NUMA nodes");
        }
        let all_cpus = host.all_cpus();
        if all_cpus.is_empty() {
            bail!("the host view has no CPUs");
        }
        let mut next = vec![0usize; host.nodes.len()];
        for node in &mut self.nodes {
            let h = node.index % host.nodes.len();
            let hnode = &host.nodes[h];
            let pool: &[usize] = if hnode.cpus.is_empty() {
                &all_cpus
            } else {
                &hnode.cpus
            };
            node.host_node = hnode.os_index;
            // The round-robin sequence repeats after pool.len() CPUs, so the
            // first min(cpus, pool) of it are the distinct host CPUs in order.
            let take = node.cpus.len().min(pool.len());
            node.host_cpus = (0..take)
                .map(|k| pool[(next[h] + k) % pool.len()])
                .collect();
            next[h] = (next[h] + node.cpus.len()) % pool.len();
        }
        self.host_nodes = host.nodes.len();
        self.host_cpus = all_cpus.len();
        Ok(())
    }

    /// Names of the fixtures shipped with disco.
    pub fn fixture_names() -> &'static [&'static str] {
        FIXTURE_NAMES
    }

    /// True when fixture nodes or CPUs are mapped many-to-one onto fewer host
    /// nodes or CPUs, i.e. when NUMA effects are modelled rather than real.
    pub fn is_emulated(&self) -> bool {
        if matches!(self.source, TopologySource::Host) {
            return false;
        }
        let host_nodes: BTreeSet<u32> = self.nodes.iter().map(|n| n.host_node).collect();
        let cpu_count = self.cpu_count();
        let host_cpus: BTreeSet<usize> = self
            .nodes
            .iter()
            .flat_map(|n| n.host_cpus.iter().copied())
            .collect();
        host_nodes.len() < self.nodes.len() || host_cpus.len() < cpu_count
    }

    /// Relative distance from node `from` to node `to` (10 = local).
    /// Panics if either index is out of range.
    pub fn distance(&self, from: usize, to: usize) -> u32 {
        self.distances[from][to]
    }

    /// Number of NUMA nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Total number of CPUs (PUs) over all nodes.
    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }

    /// Total memory over all nodes, in bytes.
    pub fn total_memory(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory_bytes).sum()
    }

    /// The logical index of the node holding CPU `cpu` (an OS index of this
    /// topology), if any.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.cpus.contains(&cpu))
    }

    /// Human-readable report, as printed by `disco topo`.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let src = match &self.source {
            TopologySource::Host => "the host, read with hwloc".to_string(),
            TopologySource::Fixture { path: Some(p), .. } => format!("hwloc XML {}", p.display()),
            TopologySource::Fixture { name, path: None } => {
                if FIXTURE_NAMES.contains(&name.as_str()) {
                    format!("fixture topology-fixtures/{name}.xml, embedded in disco")
                } else {
                    format!("hwloc description {name:?}")
                }
            }
        };
        let _ = writeln!(s, "Topology {:?} ({src})", self.name);
        let _ = writeln!(
            s,
            "  {} NUMA node{}, {} CPU{}, {} memory",
            self.node_count(),
            plural(self.node_count()),
            self.cpu_count(),
            plural(self.cpu_count()),
            fmt_bytes(self.total_memory())
        );
        let _ = writeln!(
            s,
            "  host: {} NUMA node{}, {} CPU{}",
            self.host_nodes,
            plural(self.host_nodes),
            self.host_cpus,
            plural(self.host_cpus)
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "Nodes:");
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "  node {} (P#{}): {} CPU{} [{}], {}",
                n.index,
                n.os_index,
                n.cpus.len(),
                plural(n.cpus.len()),
                fmt_list(n.cpus.iter().map(|&c| c as usize)),
                fmt_bytes(n.memory_bytes)
            );
        }
        let _ = writeln!(s);
        match &self.distance_origin {
            DistanceOrigin::Hwloc { kind } => {
                let from = if matches!(self.source, TopologySource::Host) {
                    "reported by the OS"
                } else {
                    "from the XML's <distances2> matrix"
                };
                let _ = writeln!(
                    s,
                    "Distances ({from}, hwloc kind: {kind}; relative latency, 10 = local):"
                );
            }
            DistanceOrigin::SingleNode => {
                let _ = writeln!(s, "Distances (single node; 10 = local):");
            }
            DistanceOrigin::Default => {
                let _ = writeln!(
                    s,
                    "Distances: this topology has no NUMA distance matrix; \
                     using 10 for local and 20 for every remote pair:"
                );
            }
        }
        let _ = write!(s, "  from\\to");
        for j in 0..self.node_count() {
            let _ = write!(s, "{j:>5}");
        }
        let _ = writeln!(s);
        for (i, row) in self.distances.iter().enumerate() {
            let _ = write!(s, "  {i:>7}");
            for d in row {
                let _ = write!(s, "{d:>5}");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "Mapping onto the host:");
        for n in &self.nodes {
            let distinct: BTreeSet<usize> = n.host_cpus.iter().copied().collect();
            let share = if distinct.len() < n.cpus.len() {
                format!(
                    " ({} CPUs on {} host CPU{})",
                    n.cpus.len(),
                    distinct.len(),
                    plural(distinct.len())
                )
            } else {
                String::new()
            };
            let cpus = if n.host_cpus.is_empty() {
                "no CPUs".to_string()
            } else {
                format!("host CPUs [{}]", fmt_list(distinct.iter().copied()))
            };
            let _ = writeln!(
                s,
                "  node {} -> host node {}, {cpus}{share}",
                n.index, n.host_node
            );
        }
        let _ = writeln!(s);
        if matches!(self.source, TopologySource::Host) {
            let _ = writeln!(
                s,
                "These are the host's own NUMA nodes: placement, latency and bandwidth are all real."
            );
        } else if self.is_emulated() {
            let used_nodes: BTreeSet<u32> = self.nodes.iter().map(|n| n.host_node).collect();
            let used_cpus: BTreeSet<usize> = self
                .nodes
                .iter()
                .flat_map(|n| n.host_cpus.iter().copied())
                .collect();
            let _ = writeln!(
                s,
                "Emulated: {} fixture NUMA node{} run{} on {} host NUMA node{} and {} fixture CPU{} on {} host CPU{}. \
                 Page pools, placement, sampling and policy run for real per emulated node; \
                 only the latency difference between local and remote accesses is modelled, \
                 from the distance matrix above.",
                self.node_count(),
                plural(self.node_count()),
                if self.node_count() == 1 { "s" } else { "" },
                used_nodes.len(),
                plural(used_nodes.len()),
                self.cpu_count(),
                plural(self.cpu_count()),
                used_cpus.len(),
                plural(used_cpus.len()),
            );
        } else {
            let _ = writeln!(
                s,
                "Not emulated: every fixture node has its own host node and every fixture CPU its own host CPU."
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Reading an hwloc topology

struct ParsedNode {
    os_index: u32,
    cpus: Vec<u32>,
    memory_bytes: u64,
}

struct Parsed {
    nodes: Vec<ParsedNode>,
    distances: (Vec<Vec<u32>>, DistanceOrigin),
}

/// Run an hwlocality call, turning a panic inside it (hwlocality panics on
/// errno values it does not expect) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string());
        anyhow!("{what}: hwloc binding failed: {msg}")
    })
}

/// Discover the host with hwloc.
fn load_host() -> Result<hwlocality::Topology> {
    guarded("host topology", hwlocality::Topology::new)
        .and_then(|r| r.map_err(|e| anyhow!("{e}")))
        .context("cannot read the host topology with hwloc")
}

/// "hwloc_topology_load: Invalid argument (os error 22)" rather than the
/// Debug dump hwlocality's Display gives.
fn raw_error_text(e: &hwlocality::errors::RawHwlocError) -> String {
    match e.errno {
        Some(errno) => format!("{}: {errno}", e.api),
        None => format!("{} failed", e.api),
    }
}

fn numa_objects(topo: &hwlocality::Topology) -> Vec<&TopologyObject> {
    let mut v: Vec<&TopologyObject> = topo.objects_with_type(ObjectType::NUMANode).collect();
    v.sort_by_key(|o| o.logical_index());
    v
}

fn node_os_index(obj: &TopologyObject) -> Result<u32> {
    let idx = obj
        .os_index()
        .ok_or_else(|| anyhow!("NUMA node L#{} has no OS index", obj.logical_index()))?;
    u32::try_from(idx).map_err(|_| anyhow!("NUMA node OS index {idx} is too large"))
}

/// Largest memory a NUMA node may claim: 2^52 bytes.
pub const MAX_NODE_MEMORY: u64 = 1 << 52;

fn node_memory(obj: &TopologyObject) -> u64 {
    match obj.attributes() {
        Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
        _ => 0,
    }
}

fn parse_hwloc(topo: &hwlocality::Topology) -> Result<Parsed> {
    let objs = numa_objects(topo);
    let mut nodes = Vec::with_capacity(objs.len());
    for obj in &objs {
        let os_index = node_os_index(obj)?;
        let cpus = obj
            .cpuset()
            .map(|set| set.iter_set().map(|c| usize::from(c) as u32).collect())
            .unwrap_or_default();
        let memory_bytes = node_memory(obj);
        // hwloc reads the attribute as an unsigned 64-bit number, so
        // `local_memory="-5"` arrives as 2^64 - 5 bytes.
        if memory_bytes > MAX_NODE_MEMORY {
            bail!(
                "NUMA node with OS index {os_index}: attribute `local_memory` is {memory_bytes}, \
                 not a memory size (a negative number wraps around); allowed: 0 to {MAX_NODE_MEMORY} \
                 bytes (4 PiB, the x86-64 physical address limit)"
            );
        }
        nodes.push(ParsedNode {
            os_index,
            cpus,
            memory_bytes,
        });
    }
    let distances = read_distances(topo, &objs)?;
    Ok(Parsed { nodes, distances })
}

fn kind_text(kind: DistancesKind) -> String {
    let mut parts = Vec::new();
    if kind.contains(DistancesKind::FROM_OS) {
        parts.push("OS-provided");
    }
    if kind.contains(DistancesKind::FROM_USER) {
        parts.push("user-provided");
    }
    if kind.contains(DistancesKind::MEANS_LATENCY) {
        parts.push("latency");
    }
    if parts.is_empty() {
        "unspecified kind".to_string()
    } else {
        parts.join(", ")
    }
}

fn default_matrix(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if i == j {
                        LOCAL_DISTANCE
                    } else {
                        DEFAULT_REMOTE_DISTANCE
                    }
                })
                .collect()
        })
        .collect()
}

/// The NUMA distance matrix in node logical order. Prefers a matrix that
/// means latency; ignores bandwidth matrices.
fn read_distances(
    topo: &hwlocality::Topology,
    objs: &[&TopologyObject],
) -> Result<(Vec<Vec<u32>>, DistanceOrigin)> {
    let n = objs.len();
    if n <= 1 {
        return Ok((default_matrix(n), DistanceOrigin::SingleNode));
    }
    let all = topo
        .distances_with_type(None, ObjectType::NUMANode)
        .map_err(|e| anyhow!("cannot read the NUMA distance matrices: {e}"))?;
    let chosen = all
        .iter()
        .filter(|d| !d.kind().contains(DistancesKind::MEANS_BANDWIDTH))
        .max_by_key(|d| d.kind().contains(DistancesKind::MEANS_LATENCY));
    let Some(d) = chosen else {
        return Ok((default_matrix(n), DistanceOrigin::Default));
    };
    let idx: Vec<usize> = objs
        .iter()
        .map(|o| {
            d.object_idx(o).ok_or_else(|| {
                anyhow!(
                    "the NUMA distance matrix does not cover NUMA node P#{}",
                    o.os_index().unwrap_or(usize::MAX)
                )
            })
        })
        .collect::<Result<_>>()?;
    let values = d.distances();
    let m = d.num_objects();
    let mut matrix = vec![vec![0u32; n]; n];
    for (i, &a) in idx.iter().enumerate() {
        for (j, &b) in idx.iter().enumerate() {
            let v = values[a * m + b];
            if v == 0 {
                bail!("the NUMA distance matrix has a zero entry for nodes {i} -> {j}");
            }
            matrix[i][j] = u32::try_from(v)
                .map_err(|_| anyhow!("NUMA distance {v} for nodes {i} -> {j} is too large"))?;
        }
    }
    Ok((
        matrix,
        DistanceOrigin::Hwloc {
            kind: kind_text(d.kind()),
        },
    ))
}

// ---------------------------------------------------------------------------
// Formatting helpers

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn fmt_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if b == 0 {
        "unknown memory".to_string()
    } else if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    }
}

/// "0-15,32-47" style list of sorted-or-not CPU numbers.
fn fmt_list(items: impl IntoIterator<Item = usize>) -> String {
    let set: BTreeSet<usize> = items.into_iter().collect();
    let mut out: Vec<String> = Vec::new();
    let mut it = set.into_iter().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap_or(end);
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_compressed() {
        assert_eq!(fmt_list([0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(fmt_list(Vec::<usize>::new()), "");
    }

    #[test]
    fn default_matrix_is_10_20() {
        assert_eq!(default_matrix(2), vec![vec![10, 20], vec![20, 10]]);
    }
}
