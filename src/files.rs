//! Opening and reading the files a user names (configs, policies,
//! topologies, scenarios, kernels, initramfs, disks) so that no input can
//! hang or exhaust the monitor.
//!
//! A path is `stat`ed before it is opened and must be a regular file (a
//! disk may also be a block device): `/dev/zero` would be read until the
//! host runs out of memory, and opening a FIFO for reading blocks until a
//! writer appears. The open itself uses `O_NONBLOCK` (a no-op on regular
//! files and block devices) and the opened file is checked again, so a path
//! swapped for a FIFO between the two cannot hang either. Sizes are checked
//! before reading and reads stop one byte past the cap, so a file that
//! grows meanwhile is still bounded.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest config, policy or bench scenario file (the shipped ones are a
/// few KiB; even 1024 `[[vm]]` tables written out one by one fit).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest hwloc topology XML (a 1000-core machine's export is about 1 MiB).
pub const MAX_TOPOLOGY_BYTES: u64 = 16 << 20;

/// What kinds of file a key accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    RegularOrBlockDevice,
}

impl Kind {
    fn allowed(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::RegularOrBlockDevice => "a regular file or a block device",
        }
    }
}

fn type_name(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn check_type(t: std::fs::FileType, kind: Kind) -> Result<(), String> {
    let ok = t.is_file() || (kind == Kind::RegularOrBlockDevice && t.is_block_device());
    if ok {
        Ok(())
    } else {
        Err(format!("is {}; allowed: {}", type_name(t), kind.allowed()))
    }
}

/// Human size for messages: bytes, KiB, MiB or GiB.
pub fn fmt_size(bytes: u64) -> String {
    match bytes {
        b if b < 1 << 10 => format!("{b} bytes"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b if b < 1 << 30 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b => format!("{:.1} GiB", b as f64 / (1 << 30) as f64),
    }
}

/// Opens `path` (for writing too when `write`), which must be of `kind`;
/// returns the file and its size (a block device's capacity). Errors are
/// one phrase to put after the file's name ("is a FIFO (named pipe);
/// allowed: a regular file").
pub fn open(path: &Path, kind: Kind, write: bool) -> Result<(File, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be opened: {e}"))?;
    check_type(meta.file_type(), kind)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if write {
                format!("cannot be opened for writing: {e}")
            } else {
                format!("cannot be opened: {e}")
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read its metadata: {e}"))?;
    check_type(meta.file_type(), kind)?;
    let size = if meta.file_type().is_block_device() {
        file.seek(SeekFrom::End(0))
            .and_then(|n| file.rewind().map(|_| n))
            .map_err(|e| format!("cannot read the block device's size: {e}"))?
    } else {
        meta.len()
    };
    Ok((file, size))
}

/// Reads all of a regular file of at most `max` bytes.
pub fn read_bytes(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let (file, size) = open(path, Kind::Regular, false)?;
    let too_big = |n: u64| {
        format!(
            "is {} ({n} bytes); allowed: at most {} ({max} bytes)",
            fmt_size(n),
            fmt_size(max)
        )
    };
    if size > max {
        return Err(too_big(size));
    }
    let mut data = Vec::with_capacity(size as usize);
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if data.len() as u64 > max {
        return Err(too_big(data.len() as u64));
    }
    Ok(data)
}

/// Reads a UTF-8 text file of at most `max` bytes.
pub fn read_text(path: &Path, max: u64) -> Result<String, String> {
    String::from_utf8(read_bytes(path, max)?)
        .map_err(|e| format!("is not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}
