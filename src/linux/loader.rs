//! Loading a Linux guest into its RAM with the x86 boot protocol
//! (linux-loader): the kernel (ELF vmlinux at its physical addresses, or a
//! bzImage's protected-mode part at 1 MiB), the initramfs at the top of RAM,
//! the command line, the zero page with the e820 map and the RSDP address,
//! the boot GDT and identity page tables for the 64-bit entry, and the ACPI
//! tables.

use std::path::Path;

use anyhow::{bail, Context, Result};
use linux_loader::bootparam::boot_params;
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::acpi::AcpiTables;
use super::layout::*;
use crate::vm::GuestRam;

/// A vm-memory view of the VM's RAM (the monitor's mapping of pool pages;
/// not owned: dropping it unmaps nothing).
pub fn guest_memory(ram: &GuestRam) -> Result<GuestMemoryMmap> {
    // SAFETY: `ram` is the caller's mapping, which it keeps mapped
    // read-write for the VM's life (the contract of `GuestRam`).
    let region = unsafe {
        MmapRegion::build_raw(
            ram.host_addr as *mut u8,
            ram.size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .map_err(|e| anyhow::anyhow!("wrapping guest RAM: {e}"))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| anyhow::anyhow!("guest RAM region overflows"))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| anyhow::anyhow!("guest RAM: {e}"))
}

/// Where the kernel was loaded and how to enter it.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Loaded {
    /// 64-bit entry point (guest-physical, paging identity-maps it).
    pub entry: u64,
    pub kernel_end: u64,
    pub initramfs: Option<(u64, u64)>,
}

/// Which kind of image a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn kernel_format(path: &Path) -> Result<KernelFormat> {
    use std::io::Read;
    // The headers only: the file may be far larger than what is needed here.
    let (file, _) = crate::files::open(path, crate::files::Kind::Regular, false)
        .map_err(|e| anyhow::anyhow!("kernel {} {e}", path.display()))?;
    let mut data = Vec::with_capacity(0x206);
    file.take(0x206)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if data.len() > 0x206 && &data[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        bail!(
            "{} is neither an ELF vmlinux nor a bzImage (no ELF magic, no HdrS header)",
            path.display()
        )
    }
}

/// Loads everything; `cmdline` is the complete command line.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    acpi: &AcpiTables,
) -> Result<Loaded> {
    let format = kernel_format(kernel)?;
    // Checked again here (the config check ran earlier; the file may have
    // changed since): a regular file no larger than guest RAM.
    let (mut file, size) = crate::files::open(kernel, crate::files::Kind::Regular, false)
        .map_err(|e| anyhow::anyhow!("kernel {} {e}", kernel.display()))?;
    if size > ram_size {
        bail!(
            "kernel {} is {} bytes, more than the VM's {} MiB of RAM",
            kernel.display(),
            size,
            ram_size >> 20
        );
    }
    let (entry, result) = match format {
        KernelFormat::Elf => {
            let r = loader::Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM)))
                .map_err(|e| anyhow::anyhow!("loading ELF kernel {}: {e}", kernel.display()))?;
            (r.kernel_load.0, r)
        }
        KernelFormat::BzImage => {
            let r = loader::BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM)))
                .map_err(|e| anyhow::anyhow!("loading bzImage {}: {e}", kernel.display()))?;
            // The 64-bit entry is 0x200 past the protected-mode code.
            (r.kernel_load.0 + 0x200, r)
        }
    };
    if result.kernel_end > ram_size {
        bail!(
            "kernel {} ends at {:#x}, beyond the VM's {} MiB of RAM",
            kernel.display(),
            result.kernel_end,
            ram_size >> 20
        );
    }

    let mut params = boot_params::default();
    if let Some(h) = result.setup_header {
        params.hdr = h;
    } else {
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.boot_flag = 0xaa55;
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = 0xff; // undefined loader
    params.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH | CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.acpi_rsdp_addr = acpi.rsdp_addr;

    let mut initramfs_at = None;
    if let Some(path) = initramfs {
        let data = crate::files::read_bytes(path, ram_size)
            .map_err(|e| anyhow::anyhow!("initramfs {} {e}", path.display()))?;
        let max = if params.hdr.initrd_addr_max != 0 {
            params.hdr.initrd_addr_max as u64
        } else {
            0x37ff_ffff
        };
        let top = ram_size.min(max + 1);
        let addr = top
            .checked_sub(data.len() as u64)
            .map(|a| a & !(crate::PAGE_SIZE as u64 - 1))
            .filter(|&a| a >= result.kernel_end)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "initramfs {} ({} bytes) does not fit between the kernel and the end of RAM",
                    path.display(),
                    data.len()
                )
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| anyhow::anyhow!("writing the initramfs: {e}"))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
        initramfs_at = Some((addr, data.len() as u64));
    }

    let map = e820_map(ram_size);
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind;
    }
    params.e820_entries = map.len() as u8;

    if cmdline.len() >= MAX_CMDLINE {
        bail!(
            "kernel command line of {} bytes exceeds {}",
            cmdline.len(),
            MAX_CMDLINE - 1
        );
    }
    let mut cl = loader::Cmdline::new(MAX_CMDLINE).map_err(|e| anyhow::anyhow!("{e}"))?;
    cl.insert_str(cmdline)
        .map_err(|e| anyhow::anyhow!("kernel command line `{cmdline}`: {e}"))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE), &cl)
        .map_err(|e| anyhow::anyhow!("writing the command line: {e}"))?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| anyhow::anyhow!("writing the zero page: {e}"))?;

    write_boot_tables(mem)?;
    for (addr, bytes) in &acpi.pieces {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| anyhow::anyhow!("writing ACPI tables: {e}"))?;
    }
    Ok(Loaded {
        entry,
        kernel_end: result.kernel_end,
        initramfs: initramfs_at,
    })
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT_ENTRIES: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];

/// Writes the boot GDT and page tables identity-mapping the first 4 GiB
/// with 2 MiB pages (what the 64-bit boot protocol asks of the loader).
fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| anyhow::anyhow!("writing boot tables at {addr:#x}: {e}"))
    };
    for (i, e) in BOOT_GDT_ENTRIES.iter().enumerate() {
        w(BOOT_GDT + i as u64 * 8, *e)?;
    }
    w(PML4, PDPT | 0x3)?;
    for g in 0..4u64 {
        w(PDPT + g * 8, (PD + g * 0x1000) | 0x3)?;
        for e in 0..512u64 {
            let addr = (g << 30) | (e << 21);
            w(PD + g * 0x1000 + e * 8, addr | 0x83)?;
        }
    }
    Ok(())
}
