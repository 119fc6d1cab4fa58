//! From the configuration as written ([`super::schema`]) to the values the
//! monitor runs ([`VmConfig`], [`Policy`]): every range, every key that
//! needs or excludes another, each against the topology's node count. The
//! checks across VMs and against the host are `Config::validate`'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{At, Result};
use super::linux::{DiskConfig, LinuxGuestConfig, SerialOutput};
use super::schema::{NumaSpec, PolicySpec, SharingSpec, VmSpec, WorkloadSpec};
use super::{
    NumaPolicy, Policy, Sampling, SharingPolicy, VcpuMove, VmConfig, MAX_COUNT, MAX_MEMORY_MIB,
    MAX_VCPUS,
};
use crate::guest::{layout, Workload};

const NAME_RULE: &str = "1 to 40 characters from a-z, A-Z, 0-9, '-' and '_'";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A policy file's (or inline table's) values; `source` says where it was
/// read from, `default_name` names it when it has no `name`.
pub fn policy(spec: &PolicySpec, at: At, source: &str, default_name: &str) -> Result<Policy> {
    let sharing = match &spec.sharing {
        Some(s) => sharing(s, At::new(at.file, &at.key("sharing")))?,
        None => SharingPolicy {
            enabled: false,
            ..SharingPolicy::default()
        },
    };
    let numa = match &spec.numa {
        Some(n) => numa(n, At::new(at.file, &at.key("numa")))?,
        None => NumaPolicy::default(),
    };
    Ok(Policy {
        name: spec.name.as_deref().unwrap_or(default_name).to_string(),
        source: source.to_string(),
        description: spec.description.clone().unwrap_or_default(),
        sharing,
        numa,
    })
}

fn sharing(s: &SharingSpec, at: At) -> Result<SharingPolicy> {
    let d = SharingPolicy::default();
    Ok(SharingPolicy {
        enabled: s.enabled.unwrap_or(d.enabled),
        pages_per_second: at
            .int("pages_per_second", s.pages_per_second, 1, 100_000_000)?
            .unwrap_or(d.pages_per_second),
        domains: s.domains.clone().unwrap_or_default(),
        frames_per_mapping: at
            .int("frames_per_mapping", s.frames_per_mapping, 0, 1 << 20)?
            .unwrap_or(d.frames_per_mapping),
        busy_cpu_share: at
            .float("busy_cpu_share", s.busy_cpu_share, 0.0001, 1.0)?
            .unwrap_or(d.busy_cpu_share),
    })
}

fn numa(s: &NumaSpec, at: At) -> Result<NumaPolicy> {
    let d = NumaPolicy::default();
    let sampling = match &s.sampling {
        None => d.sampling,
        Some(name) => Sampling::from_name(name).ok_or_else(|| {
            at.error(
                "sampling",
                format!(
                    "`{name}` is not a sample source; allowed: {}",
                    Sampling::NAMES.join(", ")
                ),
            )
        })?,
    };
    let trace_file = s.trace_file.as_ref().map(PathBuf::from);
    match (sampling, &trace_file) {
        (Sampling::Trace, None) => {
            return Err(at.error(
                "trace_file",
                "is required when sampling = \"trace\" (the path of the trace to replay)",
            ))
        }
        (Sampling::Trace, Some(p)) if p.as_os_str().is_empty() => {
            return Err(at.error("trace_file", "is empty; give a path"))
        }
        (other, Some(_)) if other != Sampling::Trace => {
            return Err(at.error(
                "trace_file",
                format!(
                    "is only used with sampling = \"trace\" (sampling is \"{}\"); remove it or set sampling = \"trace\"",
                    other.as_str()
                ),
            ))
        }
        _ => {}
    }
    let int = |key, v, min, max, default| at.int(key, v, min, max).map(|v| v.unwrap_or(default));
    let float =
        |key, v, min, max, default| at.float(key, v, min, max).map(|v| v.unwrap_or(default));
    let mut p = NumaPolicy {
        migrate: s.migrate.unwrap_or(d.migrate),
        replicate: s.replicate.unwrap_or(d.replicate),
        epoch_ms: int("epoch_ms", s.epoch_ms, 1, 60_000, d.epoch_ms)?,
        hot_threshold: float("hot_threshold", s.hot_threshold, 0.01, 1e9, d.hot_threshold)?,
        dominant_share: float(
            "dominant_share",
            s.dominant_share,
            0.5,
            1.0,
            d.dominant_share,
        )?,
        reader_threshold: float(
            "reader_threshold",
            s.reader_threshold,
            0.01,
            1e9,
            d.reader_threshold,
        )?,
        writer_threshold: float(
            "writer_threshold",
            s.writer_threshold,
            0.001,
            1e9,
            d.writer_threshold,
        )?,
        replicate_min_nodes: int(
            "replicate_min_nodes",
            s.replicate_min_nodes,
            2,
            4096,
            d.replicate_min_nodes,
        )?,
        decay: float("decay", s.decay, 0.0, 0.99, d.decay)?,
        copy_budget_pages: int(
            "copy_budget_pages",
            s.copy_budget_pages,
            0,
            100_000_000,
            d.copy_budget_pages,
        )?,
        freeze_after_moves: int(
            "freeze_after_moves",
            s.freeze_after_moves,
            0,
            1000,
            d.freeze_after_moves,
        )?,
        freeze_window_epochs: int(
            "freeze_window_epochs",
            s.freeze_window_epochs,
            1,
            1_000_000,
            d.freeze_window_epochs,
        )?,
        freeze_epochs: int(
            "freeze_epochs",
            s.freeze_epochs,
            1,
            1_000_000,
            d.freeze_epochs,
        )?,
        replica_idle_epochs: int(
            "replica_idle_epochs",
            s.replica_idle_epochs,
            1,
            1_000_000,
            d.replica_idle_epochs,
        )?,
        sample_pages: int("sample_pages", s.sample_pages, 1, 1_000_000, d.sample_pages)?,
        sample_rounds: int("sample_rounds", s.sample_rounds, 1, 1000, d.sample_rounds)?,
        sample_run_pages: int(
            "sample_run_pages",
            s.sample_run_pages,
            1,
            512,
            d.sample_run_pages,
        )?,
        migrate_region_pages: int(
            "migrate_region_pages",
            s.migrate_region_pages,
            1,
            512,
            d.migrate_region_pages,
        )?,
        follow_vm: s.follow_vm.unwrap_or(d.follow_vm),
        max_sampling_overhead: float(
            "max_sampling_overhead",
            s.max_sampling_overhead,
            0.0001,
            1.0,
            d.max_sampling_overhead,
        )?,
        // At most max_sampling_overhead: checked below, where a policy
        // that lowers only the cap gets a floor no higher than it.
        settled_sampling_overhead: float(
            "settled_sampling_overhead",
            s.settled_sampling_overhead,
            0.0001,
            1.0,
            d.settled_sampling_overhead,
        )?,
        sample_fault_cost_us: float(
            "sample_fault_cost_us",
            s.sample_fault_cost_us,
            0.1,
            100_000.0,
            d.sample_fault_cost_us,
        )?,
        sampling,
        trace_file,
    };
    if p.settled_sampling_overhead > p.max_sampling_overhead {
        if s.settled_sampling_overhead.is_some() {
            return Err(at.error(
                "settled_sampling_overhead",
                format!(
                    "{} is above max_sampling_overhead ({}); allowed: 0.0001 to max_sampling_overhead (the settled allowance is what the sampler backs off to from the cap)",
                    p.settled_sampling_overhead, p.max_sampling_overhead
                ),
            ));
        }
        p.settled_sampling_overhead = p.max_sampling_overhead;
    }
    if p.reader_threshold > p.hot_threshold {
        return Err(at.error(
            "reader_threshold",
            format!(
                "{} is above hot_threshold ({}); allowed: 0.01 to hot_threshold (a node's count cannot need more samples than the whole page's)",
                p.reader_threshold, p.hot_threshold
            ),
        ));
    }
    Ok(p)
}

/// One `[[vm]]` against a topology of `nodes` nodes; a `count` gives
/// several VMs (`name-0`, `name-1`, ...). Relative paths are resolved
/// against `dir`.
pub fn vm(spec: &VmSpec, at: At, nodes: usize, dir: &Path) -> Result<Vec<VmConfig>> {
    let name = spec
        .name
        .clone()
        .ok_or_else(|| at.error("name", "is required (a string)"))?;
    if !valid_name(&name) {
        return Err(at.error(
            "name",
            format!("`{name}` is not a valid VM name; allowed: {NAME_RULE}"),
        ));
    }
    let max_node = nodes as u64 - 1;
    let node_range = format!("0 to {max_node} (the topology has {nodes} nodes)");
    let home = at.int_in("node", spec.node, 0, max_node, &node_range)?;
    let vcpus = at.int("vcpus", spec.vcpus, 1, MAX_VCPUS)?;
    let vcpu_nodes: Vec<usize> = match &spec.vcpu_nodes {
        Some(list) => {
            let list = list
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    at.int_in(
                        &format!("vcpu_nodes[{i}]"),
                        Some(n),
                        0,
                        max_node,
                        &node_range,
                    )
                    .map(|n| n.unwrap() as usize)
                })
                .collect::<Result<Vec<_>>>()?;
            if home.is_some() {
                return Err(at.error(
                    "vcpu_nodes",
                    "give either `node` (all vCPUs on one node) or `vcpu_nodes` (one node per vCPU), not both",
                ));
            }
            if let Some(v) = vcpus.filter(|&v| v != list.len() as u64) {
                return Err(at.error(
                    "vcpus",
                    format!(
                        "is {v} but `vcpu_nodes` lists {} nodes; they must agree",
                        list.len()
                    ),
                ));
            }
            if list.is_empty() || list.len() as u64 > MAX_VCPUS {
                return Err(at.error(
                    "vcpu_nodes",
                    format!("must list 1 to {MAX_VCPUS} nodes, one per vCPU"),
                ));
            }
            list
        }
        None => vec![home.unwrap_or(0) as usize; vcpus.unwrap_or(1) as usize],
    };
    let memory_node = at
        .int_in("memory_node", spec.memory_node, 0, max_node, &node_range)?
        .map(|n| n as usize)
        .unwrap_or(vcpu_nodes[0]);
    let memory_mib = at
        .int("memory_mib", spec.memory_mib, 2, MAX_MEMORY_MIB)?
        .unwrap_or(16);
    let time_limit = match at.float("time_limit_s", spec.time_limit_s, 0.1, 86_400.0)? {
        Some(s) => Duration::from_secs_f64(s),
        None => Duration::from_secs(60),
    };
    let count = at.int("count", spec.count, 1, MAX_COUNT)?.unwrap_or(1);
    let sharing_domain = spec
        .sharing_domain
        .as_deref()
        .unwrap_or("default")
        .to_string();
    if !valid_name(&sharing_domain) {
        return Err(at.error(
            "sharing_domain",
            format!("`{sharing_domain}` is not a valid domain name; allowed: {NAME_RULE}"),
        ));
    }
    let linux = linux(spec, at, dir, memory_mib, count)?;
    let workload = match &spec.workload {
        Some(_) if linux.is_some() => {
            return Err(at.error(
                "workload",
                "a VM runs either a micro-guest `workload` or a Linux `kernel`, not both",
            ))
        }
        Some(w) => workload(w, At::new(at.file, &at.key("workload")))?,
        // The documented default (README, `disco check` prints it).
        None => super::default_workload(),
    };
    let workload_is_default = linux.is_none() && spec.workload.is_none();
    let need = layout::min_ram_bytes(&workload, vcpu_nodes.len());
    if linux.is_none() && memory_mib * 1024 * 1024 < need {
        return Err(at.error(
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
    for (i, m) in spec.moves.iter().flatten().enumerate() {
        let key = at.key(&format!("moves[{i}]"));
        let m_at = At::new(at.file, &key);
        let after_ms = m_at
            .int("after_ms", m.after_ms, 0, 86_400_000)?
            .ok_or_else(|| m_at.error("after_ms", "is required (milliseconds after start)"))?;
        let node = m_at
            .int_in("node", m.node, 0, max_node, &node_range)?
            .ok_or_else(|| m_at.error("node", format!("is required; allowed: {node_range}")))?
            as usize;
        let vcpu_range = format!(
            "0 to {} (the VM has {} vCPUs)",
            vcpu_nodes.len() - 1,
            vcpu_nodes.len()
        );
        let vcpu = m_at
            .int_in("vcpu", m.vcpu, 0, vcpu_nodes.len() as u64 - 1, &vcpu_range)?
            .map(|v| v as usize);
        moves.push(VcpuMove {
            after_ms,
            node,
            vcpu,
        });
    }
    moves.sort_by_key(|m| m.after_ms);
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

/// The Linux-guest keys of a `[[vm]]`; `None` when it names no kernel.
fn linux(
    spec: &VmSpec,
    at: At,
    dir: &Path,
    memory_mib: u64,
    count: u64,
) -> Result<Option<LinuxGuestConfig>> {
    use super::linux::{MAX_CMDLINE, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
    // The files are checked here (type, size, writability: see
    // `LinuxGuestConfig::check_files`) and again when the VM is built.
    let file_key = |key: &str, path: &str| -> Result<PathBuf> {
        if path.is_empty() {
            return Err(at.error(
                key,
                "is empty; allowed: a file path (relative to the config file)",
            ));
        }
        Ok(dir.join(path))
    };
    let Some(kernel) = &spec.kernel else {
        let given = [
            ("initramfs", spec.initramfs.is_some()),
            ("cmdline", spec.cmdline.is_some()),
            ("disk", spec.disk.is_some()),
            ("serial", spec.serial.is_some()),
            ("virtio_console", spec.virtio_console.is_some()),
        ];
        if let Some((key, _)) = given.iter().find(|(_, g)| *g) {
            return Err(at.error(key, "is only allowed with `kernel` (a Linux guest)"));
        }
        return Ok(None);
    };
    if spec.moves.is_some() {
        return Err(at.error(
            "moves",
            "vCPU moves are for micro-guests; a Linux VM (`kernel`) keeps its placement",
        ));
    }
    let kernel = file_key("kernel", kernel)?;
    let initramfs = match &spec.initramfs {
        Some(p) => Some(file_key("initramfs", p)?),
        None => None,
    };
    let cmdline = spec.cmdline.clone();
    if let Some(c) = &cmdline {
        if c.len() >= MAX_CMDLINE {
            return Err(at.error(
                "cmdline",
                format!(
                    "is {} bytes; allowed: at most {} (Linux's COMMAND_LINE_SIZE)",
                    c.len(),
                    MAX_CMDLINE - 1
                ),
            ));
        }
    }
    let mut disks = Vec::new();
    for (i, d) in spec.disk.iter().flatten().enumerate() {
        let key = at.key(&format!("disk[{i}]"));
        let d_at = At::new(at.file, &key);
        let path = d
            .path
            .as_deref()
            .ok_or_else(|| d_at.error("path", "is required (a string)"))?;
        if path.is_empty() {
            return Err(d_at.error("path", "is empty; allowed: a disk image's path"));
        }
        disks.push(DiskConfig {
            path: dir.join(path),
            read_only: d.read_only.unwrap_or(false),
        });
    }
    let serial = match spec.serial.as_deref() {
        None | Some("console") => SerialOutput::Console,
        Some("none") => SerialOutput::None,
        Some("") => {
            return Err(at.error(
                "serial",
                "is empty; allowed: \"console\", \"none\" or a file path",
            ))
        }
        Some(p) => {
            if count > 1 && !p.contains("{vm}") {
                return Err(at.error("serial", format!("`{p}` would be shared by the {count} copies of this VM; allowed: a path containing {{vm}} (replaced by each VM's name), \"console\" or \"none\"")));
            }
            SerialOutput::File(dir.join(p))
        }
    };
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(at.error("memory_mib", format!("{memory_mib} MiB does not suit a Linux guest; allowed: {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} (RAM sits below the 3 GiB device hole)")));
    }
    let guest = LinuxGuestConfig {
        kernel,
        initramfs,
        cmdline,
        disks,
        serial,
        virtio_console: spec.virtio_console.unwrap_or(false),
    };
    guest
        .check_files(memory_mib << 20)
        .map_err(|(key, message)| at.error(&key, message))?;
    Ok(Some(guest))
}

/// The parameters each workload kind takes (besides `kind`).
fn workload_params(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "fill" => &["seed", "private_seed", "shared_percent", "shared_run"],
        "sweep" => &["seed", "passes"],
        "random" => &["seed", "touches"],
        "table_scan" => &["seed", "table_pages", "lookups", "write_after"],
        "counters" => &["counters", "increments"],
        "crash" | "spin" | "bad_io" => &[],
        _ => return None,
    })
}

/// A micro-guest workload; `at` is its table (`vm[0].workload`).
pub fn workload(w: &WorkloadSpec, at: At) -> Result<Workload> {
    let kind = w
        .kind
        .as_deref()
        .ok_or_else(|| at.error("kind", "is required (a string)"))?;
    let Some(params) = workload_params(kind) else {
        return Err(at.error(
            "kind",
            format!(
                "`{kind}` is not a workload; allowed: {}",
                Workload::NAMES.join(", ")
            ),
        ));
    };
    if let Some(other) = w.given().into_iter().find(|k| !params.contains(k)) {
        let mut allowed = params.to_vec();
        allowed.push("kind");
        allowed.sort_unstable();
        return Err(at.error(
            other,
            format!(
                "unknown key for workload `{kind}`; allowed here: {}",
                allowed.join(", ")
            ),
        ));
    }
    let seed = || at.int("seed", w.seed, 0, u64::MAX).map(|s| s.unwrap_or(1));
    Ok(match kind {
        "fill" => {
            let seed = seed()?;
            Workload::Fill {
                seed,
                private_seed: at
                    .int("private_seed", w.private_seed, 0, u64::MAX)?
                    .unwrap_or(seed),
                shared_percent: at
                    .int("shared_percent", w.shared_percent, 0, 100)?
                    .unwrap_or(100) as u8,
                shared_run: match at.int("shared_run", w.shared_run, 1, 65536)?.unwrap_or(1) {
                    r if r.is_power_of_two() => r as u32,
                    r => {
                        return Err(at.error(
                            "shared_run",
                            format!("{r} is not a power of two; allowed: 1, 2, 4, ... 65536 (frames per block of the shared/private choice)"),
                        ))
                    }
                },
            }
        }
        "sweep" => Workload::Sweep {
            seed: seed()?,
            passes: at.int("passes", w.passes, 1, 10_000)?.unwrap_or(4) as u32,
        },
        "random" => Workload::Random {
            seed: seed()?,
            touches: at
                .int("touches", w.touches, 1, 1 << 40)?
                .unwrap_or(1_000_000),
        },
        "table_scan" => {
            let lookups = at
                .int("lookups", w.lookups, 1, 1 << 40)?
                .unwrap_or(1_000_000);
            Workload::TableScan {
                seed: seed()?,
                table_pages: at
                    .int("table_pages", w.table_pages, 1, 1 << 20)?
                    .unwrap_or(64) as u32,
                lookups,
                // Bounded by `lookups`: the write happens between two of them.
                write_after: at
                    .int_in(
                        "write_after",
                        w.write_after,
                        0,
                        lookups,
                        &format!("0 (never write) to `lookups` ({lookups})"),
                    )?
                    .unwrap_or(0),
            }
        }
        "counters" => Workload::Counters {
            counters: at.int("counters", w.counters, 1, 4096)?.unwrap_or(16) as u32,
            increments: at
                .int("increments", w.increments, 1, 1 << 40)?
                .unwrap_or(100_000),
        },
        "crash" => Workload::Crash,
        "spin" => Workload::Spin,
        _ => Workload::BadIo,
    })
}
