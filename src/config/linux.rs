//! A Linux guest's configuration: the Linux keys of a `[[vm]]` once checked
//! (`kernel`, `initramfs`, `cmdline`, `disk`, `serial`, `virtio_console`),
//! its limits, and how its RAM is split across guest NUMA nodes. The
//! `crate::linux` layer boots from these; nothing here imports it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;

/// Bytes of the guest's command-line area (`crate::linux::layout`), so at
/// most this minus one characters (Linux's COMMAND_LINE_SIZE).
pub const MAX_CMDLINE: usize = 2048;

/// Smallest and largest RAM of a Linux VM (RAM stays below the 3 GiB hole).
pub const MIN_MEMORY_MIB: u64 = 64;
/// 3 GiB: `crate::linux::layout::RAM_LIMIT` (checked there).
pub const MAX_MEMORY_MIB: u64 = 3 << 10;

/// Where the serial console's output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialOutput {
    /// The monitor's stdout, each line prefixed with `<vm>| `.
    Console,
    /// A file (created or truncated when the VM is built).
    File(PathBuf),
    /// Nowhere (still captured in memory).
    None,
}

/// A virtio-mmio block device backed by a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The Linux-guest keys of a `[[vm]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxGuestConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// As given; the monitor appends the device announcements.
    pub cmdline: Option<String>,
    pub disks: Vec<DiskConfig>,
    pub serial: SerialOutput,
    /// Add a virtio console (hvc0) writing to the same output as the serial port.
    pub virtio_console: bool,
}

impl LinuxGuestConfig {
    /// Its virtio-mmio devices: the disks, then the console if any.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + self.virtio_console as usize
    }

    /// The config of copy `vm` (a `{vm}` in the serial file path becomes
    /// the VM's name).
    pub fn for_vm(&self, vm: &str) -> LinuxGuestConfig {
        let mut c = self.clone();
        if let SerialOutput::File(p) = &c.serial {
            c.serial = SerialOutput::File(PathBuf::from(p.to_string_lossy().replace("{vm}", vm)));
        }
        c
    }
}

/// A disk image must hold at least one sector.
pub const SECTOR_BYTES: u64 = 512;

impl LinuxGuestConfig {
    /// Checks the files this guest names without reading them: the kernel
    /// and initramfs are regular files that fit in the VM's RAM
    /// (`ram_bytes`) together, each disk is a regular file or block device
    /// of at least one sector, openable for writing unless `read_only`.
    /// Nothing blocks (see [`crate::files`]). On error: the config key
    /// (`kernel`, `initramfs`, `disk[1].path`) and the message.
    pub fn check_files(&self, ram_bytes: u64) -> std::result::Result<(), (String, String)> {
        use crate::files::{fmt_size, open, Kind};
        let ram = fmt_size(ram_bytes);
        let image = |key: &str, path: &std::path::Path| {
            let (_, size) = open(path, Kind::Regular, false)
                .map_err(|e| (key.to_string(), format!("{} {e}", path.display())))?;
            if size > ram_bytes {
                return Err((
                    key.to_string(),
                    format!(
                        "{} is {}; allowed: a file no larger than the VM's RAM ({ram}, memory_mib)",
                        path.display(),
                        fmt_size(size)
                    ),
                ));
            }
            Ok(size)
        };
        let kernel = image("kernel", &self.kernel)?;
        if let Some(path) = &self.initramfs {
            let initramfs = image("initramfs", path)?;
            if kernel + initramfs > ram_bytes {
                return Err((
                    "initramfs".into(),
                    format!(
                        "{} ({}) and the kernel ({}) together are larger than the VM's RAM; \
                         allowed: at most {ram} together (memory_mib)",
                        path.display(),
                        fmt_size(initramfs),
                        fmt_size(kernel)
                    ),
                ));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            let key = format!("disk[{i}].path");
            let (_, size) =
                open(&d.path, Kind::RegularOrBlockDevice, !d.read_only).map_err(|e| {
                    let hint = if d.read_only {
                        ""
                    } else {
                        " (the disk is read-write; `read_only = true` needs read access only)"
                    };
                    (key.clone(), format!("{} {e}{hint}", d.path.display()))
                })?;
            // Also catches /proc and /sys files, which report size 0
            // (root may open /proc/version for writing; the write fails).
            if size < SECTOR_BYTES {
                return Err((
                    key,
                    format!(
                        "{} is {size} bytes; allowed: a disk image of at least one {SECTOR_BYTES}-byte sector",
                        d.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A guest NUMA node (an ACPI proximity domain): the topology node it is
/// placed on and its slice of guest-physical RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNode {
    /// The monitor's topology node whose pool backs this slice and whose
    /// CPUs run this node's vCPUs.
    pub topology_node: usize,
    pub mem_start: u64,
    pub mem_len: u64,
}

/// How a Linux guest's `ram` bytes are split into guest NUMA nodes: one per
/// distinct topology node of its vCPUs (`vcpu_nodes`, in ascending order),
/// RAM split evenly between them in 2 MiB multiples (the last takes the
/// rest). The guest's NUMA plan (`crate::linux::layout::NumaPlan`) is built
/// on it, and `Config::validate` counts each node's pool use with it.
pub fn split_ram(vcpu_nodes: &[usize], ram: u64) -> Vec<GuestNode> {
    let mut topo: Vec<usize> = vcpu_nodes.to_vec();
    topo.sort_unstable();
    topo.dedup();
    let n = topo.len() as u64;
    let align = 2 << 20;
    let chunk = (ram / n / align * align).max(align);
    topo.iter()
        .enumerate()
        .map(|(i, &t)| {
            let start = (i as u64 * chunk).min(ram);
            let end = if i as u64 == n - 1 {
                ram
            } else {
                ((i as u64 + 1) * chunk).min(ram)
            };
            GuestNode {
                topology_node: t,
                mem_start: start,
                mem_len: end - start,
            }
        })
        .collect()
}

impl GuestNode {
    /// The guest frames of this node.
    pub fn frames(&self) -> std::ops::Range<u64> {
        self.mem_start / PAGE_SIZE as u64..(self.mem_start + self.mem_len) / PAGE_SIZE as u64
    }
}
