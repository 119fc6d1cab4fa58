//! Snapshots of VMs: one file holds a VM's spec, its state apart from
//! memory ([`GuestState`]: a micro-VM's vCPUs and book-keeping, or a Linux
//! guest's vCPUs, irqchip, clock and devices) and its memory by machine
//! page ([`format`]). This module is the glue between the file and the
//! memory layer: [`write`] streams a paused VM's pages
//! ([`crate::memory::Memory::image_chunk`]) into a temporary file that is
//! renamed into place only once complete, and [`open`] checks a file's
//! header and metadata and hands back a reader that
//! [`crate::memory::Memory::create_spaces_from_image`] reads block by
//! block straight into pool pages. The monitor's
//! operations (`Monitor::snapshot_vm`, `restore_vm`, `clone_vms`) are built
//! on these.

pub mod format;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

pub use format::{GuestState, Meta, SnapshotReader, SnapshotWriter, VmMeta, VERSION};

use crate::memory::{Gfn, Memory, VmId};

/// Largest snapshot file a restore opens (a 64 GiB guest with every page
/// distinct, plus its metadata).
pub const MAX_SNAPSHOT_BYTES: u64 = 65 << 30;

/// Frames read per hold of the memory lock while a snapshot is written.
const CHUNK_FRAMES: u64 = 4096;

/// What writing a snapshot did.
#[derive(Clone, Debug, Serialize)]
pub struct WriteStats {
    pub path: String,
    /// Guest frames.
    pub frames: u64,
    /// Machine pages stored (each once, whatever number of frames map it).
    pub pages: u64,
    /// Frames that map a stored page (the others were holes or zeros).
    pub frames_stored: u64,
    pub bytes: u64,
}

/// The temporary name a snapshot is written under before it is renamed:
/// `.NAME.partial-PID` in the same directory (a rename within one file
/// system is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes a snapshot of `vm` (paused by the caller, with `meta` captured)
/// to `path`: header and metadata, then every machine page the VM maps
/// once, read `CHUNK_FRAMES` frames per hold of the memory lock. Written
/// to a temporary file, synced, then renamed to `path`; on any error the
/// temporary file is removed and `path` is untouched.
pub fn write(memory: &Memory, vm: VmId, meta: &Meta, path: &Path) -> Result<WriteStats> {
    let shown = path.display().to_string();
    let temp = temp_path(path);
    let result = (|| -> Result<WriteStats> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        let mut writer = SnapshotWriter::new(BufWriter::with_capacity(1 << 20, file), meta)?;
        let mut recorded = vec![false; meta.frames as usize];
        let mut frames_stored = 0;
        let mut first: Gfn = 0;
        while first < meta.frames {
            let end = (first + CHUNK_FRAMES).min(meta.frames);
            for page in memory.image_chunk(vm, first..end, &mut recorded)? {
                frames_stored += page.frames.len() as u64;
                writer.push(page)?;
            }
            first = end;
        }
        let (out, pages, bytes) = writer.finish()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(WriteStats {
            path: shown.clone(),
            frames: meta.frames,
            pages,
            frames_stored,
            bytes,
        })
    })();
    match result {
        Ok(stats) => {
            std::fs::rename(&temp, path).with_context(|| {
                let _ = std::fs::remove_file(&temp);
                format!("renaming {} to {shown}", temp.display())
            })?;
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e.context(format!("writing snapshot {shown}")))
        }
    }
}

/// Opens snapshot `path` (a regular file of at most
/// [`MAX_SNAPSHOT_BYTES`], opened with `crate::files`), checks its header
/// and metadata, and returns them with a reader of its pages. Errors name
/// the file and what is wrong with it.
pub fn open(path: &Path) -> Result<(Meta, SnapshotReader<File>)> {
    let shown = path.display().to_string();
    let (file, size) = crate::files::open(path, crate::files::Kind::Regular, false)
        .map_err(|e| anyhow::anyhow!("snapshot {shown} {e}"))?;
    if size > MAX_SNAPSHOT_BYTES {
        anyhow::bail!(
            "snapshot {shown} is {}, more than the {} allowed",
            crate::files::fmt_size(size),
            crate::files::fmt_size(MAX_SNAPSHOT_BYTES)
        );
    }
    // A file that ends with a valid end marker was not cut short: a part
    // that runs past its end has a wrong length in it.
    let mut tail = [0u8; format::END_BYTES];
    let complete = size >= tail.len() as u64
        && std::os::unix::fs::FileExt::read_exact_at(
            &file,
            &mut tail,
            size - format::END_BYTES as u64,
        )
        .is_ok()
        && format::is_end_marker(&tail);
    // Unbuffered: page bytes are read straight into pool pages (a buffer
    // would copy them twice); headers and indexes are a few small reads
    // per 256 pages.
    SnapshotReader::open(file, &format!("snapshot {shown}"), complete)
}
