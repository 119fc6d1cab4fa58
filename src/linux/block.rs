//! virtio-blk backed by a file: read, write (unless read-only), flush and
//! get-ID requests, 512-byte sectors, one request queue.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Result;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::VirtioDevice;

pub const DEVICE_BLOCK: u32 = 2;
pub const SECTOR: u64 = 512;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Length of the device ID string of a GET_ID request.
pub const ID_LEN: usize = 20;

pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_LEN],
    /// Requests served (all kinds) and their failures.
    pub requests: u64,
    pub errors: u64,
}

impl Block {
    /// Opens `path` (read-write unless `read_only`); the disk's size is the
    /// file's (or block device's), rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Block> {
        let (file, len) =
            crate::files::open(path, crate::files::Kind::RegularOrBlockDevice, !read_only)
                .map_err(|e| anyhow::anyhow!("disk image {} {e}", path.display()))?;
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            sectors: len / SECTOR,
            id,
            requests: 0,
            errors: 0,
        })
    }

    /// Serves one request; returns (status, bytes written to the driver's
    /// buffers, excluding the status byte).
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data: &[(GuestAddress, u32, bool)],
    ) -> (u8, u32) {
        let total: u64 = data.iter().map(|d| d.1 as u64).sum();
        let in_range = |total: u64| {
            total.is_multiple_of(SECTOR)
                && sector
                    .checked_add(total / SECTOR)
                    .is_some_and(|end| end <= self.sectors)
        };
        match kind {
            T_IN => {
                if !in_range(total) || data.iter().any(|d| !d.2) {
                    return (S_IOERR, 0);
                }
                let mut off = sector * SECTOR;
                let mut written = 0;
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    if self.file.read_exact_at(&mut buf, off).is_err()
                        || mem.write_slice(&buf, addr).is_err()
                    {
                        return (S_IOERR, written);
                    }
                    off += len as u64;
                    written += len;
                }
                (S_OK, written)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                if !in_range(total) || data.iter().any(|d| d.2) {
                    return (S_IOERR, 0);
                }
                let mut off = sector * SECTOR;
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    if mem.read_slice(&mut buf, addr).is_err()
                        || self.file.write_all_at(&buf, off).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    off += len as u64;
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let Some(&(addr, len, true)) = data.first() else {
                    return (S_IOERR, 0);
                };
                let n = (len as usize).min(ID_LEN);
                match mem.write_slice(&self.id[..n], addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_BLOCK
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    /// Config space: capacity in sectors (u64 at 0); the rest reads 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cap = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = if o < 8 { cap[o] } else { 0 };
        }
    }

    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            self.requests += 1;
            // header (readable), data..., status (writable, last).
            let (status, written) = match (descs.first(), descs.last()) {
                (Some(h), Some(s)) if descs.len() >= 2 && h.len() >= 16 && s.is_write_only() => {
                    let mut hdr = [0u8; 16];
                    if mem.read_slice(&mut hdr, h.addr()).is_err() {
                        (S_IOERR, 0)
                    } else {
                        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
                        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
                        let data: Vec<_> = descs[1..descs.len() - 1]
                            .iter()
                            .map(|d| (d.addr(), d.len(), d.is_write_only()))
                            .collect();
                        self.serve(mem, kind, sector, &data)
                    }
                }
                _ => (S_IOERR, 0),
            };
            if status != S_OK {
                self.errors += 1;
            }
            let mut len = written;
            if let Some(s) = descs.last().filter(|s| s.is_write_only() && s.len() >= 1) {
                if mem.write_obj(status, s.addr()).is_ok() {
                    len += 1;
                }
            }
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}
