//! The snapshot file (described for users in `docs/snapshot-format.md`).
//!
//! ```text
//! header   "DISCOSNP"  version u32  meta_len u32  meta_crc u32   (20 bytes, little-endian)
//! meta     meta_len bytes of JSON (serde_json of `Meta`), CRC-32 meta_crc
//! blocks   "PAGE" count u32 index_len u32 crc u32  index  count x 4096 bytes
//! end      "END!" 0 u32 8 u32 crc u32  total_pages u64
//! ```
//!
//! * The metadata (the VM's spec and its state: vCPUs and micro-VM
//!   book-keeping, or for a Linux guest vCPUs, irqchip, PIT, clock and
//!   devices, see [`GuestState`]) is JSON:
//!   a few KiB per vCPU, self-describing (the workload keeps the tagged
//!   form the config and the API use), and readable with `jq` after
//!   skipping the 20-byte header.
//! * Memory is stored **by machine page**: each page once, with the list of
//!   guest frames that map it (the block's `index`, postcard of
//!   `Vec<Vec<u64>>`: one list of frames per page, varint-coded, so a
//!   run of private pages costs a few bytes each). Holes and pages of zeros
//!   are not stored: a restore maps fresh (zero) pages there.
//! * Page bytes are raw, in blocks of at most [`BLOCK_PAGES`] pages after
//!   their index, not inside a serde structure: a page is 4096 opaque
//!   bytes, so a serialiser adds nothing but a length prefix, and raw
//!   blocks can be written and read in a stream with bounded memory (a
//!   256 MiB guest is never held whole), straight from and into pool pages,
//!   which is also what a migration stream needs.
//! * Each part is checked: the metadata by its CRC-32, each block by one
//!   CRC-32 over its index and pages (crc32fast), so a corrupted byte is
//!   reported with the block it is in. The end marker carries the number of
//!   pages, so a file cut anywhere (even between blocks) is reported as
//!   truncated, and bytes after it are refused.
//! * The version is checked before anything else is read: a reader refuses
//!   a file of another version rather than guessing.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::guest::Workload;
use crate::linux::{LinuxGuestConfig, LinuxVmState};
use crate::memory::{write_pool_bytes, Gfn, ImageSource, PageImage, PoolRun};
use crate::vm::MicroVmState;
use crate::PAGE_SIZE;

/// The first bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"DISCOSNP";
/// The format this build writes and reads (2: Linux guests' state;
/// version 1 held micro-VMs only).
pub const VERSION: u32 = 2;
/// Most pages in one block.
pub const BLOCK_PAGES: usize = 256;
/// Largest metadata accepted (a VM of 64 vCPUs needs about 1 MiB).
pub const MAX_META_BYTES: u32 = 16 << 20;
/// Largest block index accepted (every frame of a 256-page block listed:
/// generous for pages shared by many frames).
pub const MAX_INDEX_BYTES: u32 = 64 << 20;

const BLOCK_TAG: &[u8; 4] = b"PAGE";
const END_TAG: &[u8; 4] = b"END!";

/// The VM a snapshot was taken of, as the monitor built it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMeta {
    pub name: String,
    pub vcpu_nodes: Vec<usize>,
    pub memory_mib: u64,
    pub memory_node: usize,
    pub workload: Workload,
    pub time_limit_ms: u64,
    pub sharing_domain: String,
    /// A Linux guest's kernel, disks and console (None: a micro-VM).
    #[serde(default)]
    pub linux: Option<LinuxGuestConfig>,
}

/// A VM's state apart from its memory.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestState {
    Micro(MicroVmState),
    Linux(Box<LinuxVmState>),
}

impl GuestState {
    /// The number of vCPUs whose state it holds.
    pub fn vcpus(&self) -> usize {
        match self {
            GuestState::Micro(s) => s.vcpus.len(),
            GuestState::Linux(s) => s.vcpus.len(),
        }
    }
}

/// Everything in a snapshot but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Meta {
    /// The program that wrote it (`disco 0.1.0`), for messages.
    pub written_by: String,
    pub vm: VmMeta,
    pub state: GuestState,
    /// Guest frames (the VM's memory in pages).
    pub frames: u64,
}

/// Writes a snapshot to `W` as pages come: [`SnapshotWriter::push`] each
/// page, then [`SnapshotWriter::finish`].
pub struct SnapshotWriter<W: Write> {
    out: W,
    block: Vec<PageImage>,
    pages: u64,
    bytes: u64,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header and the metadata.
    pub fn new(mut out: W, meta: &Meta) -> Result<SnapshotWriter<W>> {
        let json = serde_json::to_vec(meta).context("encoding the snapshot's metadata")?;
        let mut header = Vec::with_capacity(20);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(json.len() as u32).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        out.write_all(&header)?;
        out.write_all(&json)?;
        Ok(SnapshotWriter {
            out,
            block: Vec::with_capacity(BLOCK_PAGES),
            pages: 0,
            bytes: (header.len() + json.len()) as u64,
        })
    }

    /// Adds one page (written once its block is full).
    pub fn push(&mut self, page: PageImage) -> Result<()> {
        anyhow::ensure!(page.bytes.len() == PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
        anyhow::ensure!(!page.frames.is_empty(), "a page needs a frame");
        self.block.push(page);
        if self.block.len() == BLOCK_PAGES {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let frames: Vec<&[u64]> = self.block.iter().map(|p| p.frames.as_slice()).collect();
        let index = postcard::to_allocvec(&frames).context("encoding a page block's index")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&index);
        for p in &self.block {
            crc.update(&p.bytes);
        }
        let mut head = Vec::with_capacity(16);
        head.extend_from_slice(BLOCK_TAG);
        head.extend_from_slice(&(self.block.len() as u32).to_le_bytes());
        head.extend_from_slice(&(index.len() as u32).to_le_bytes());
        head.extend_from_slice(&crc.finalize().to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&index)?;
        for p in &self.block {
            self.out.write_all(&p.bytes)?;
        }
        self.pages += self.block.len() as u64;
        self.bytes += (head.len() + index.len() + self.block.len() * PAGE_SIZE) as u64;
        self.block.clear();
        Ok(())
    }

    /// Writes the last block and the end marker; returns the output, the
    /// pages written and the bytes written.
    pub fn finish(mut self) -> Result<(W, u64, u64)> {
        self.flush_block()?;
        let total = self.pages.to_le_bytes();
        let mut end = Vec::with_capacity(24);
        end.extend_from_slice(END_TAG);
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&8u32.to_le_bytes());
        end.extend_from_slice(&crc32fast::hash(&total).to_le_bytes());
        end.extend_from_slice(&total);
        self.out.write_all(&end)?;
        self.out.flush()?;
        Ok((self.out, self.pages, self.bytes + end.len() as u64))
    }
}

/// What a snapshot is read from: bytes, and page bytes moved straight into
/// a pool's memfd.
pub trait PageInput: Read {
    /// Moves the next `len` bytes into `fd` at `offset`; `Ok(false)` when
    /// the input ends first. By default through a buffer (`pwrite`).
    fn move_to(&mut self, fd: RawFd, offset: u64, len: usize) -> Result<bool> {
        move_via_buffer(self, fd, offset, len)
    }
}

fn move_via_buffer<R: Read + ?Sized>(
    input: &mut R,
    fd: RawFd,
    offset: u64,
    len: usize,
) -> Result<bool> {
    let mut buf = vec![0u8; len.min(1 << 20)];
    let mut done = 0;
    while done < len {
        let want = (len - done).min(buf.len());
        let mut got = 0;
        while got < want {
            match input.read(&mut buf[got..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        write_pool_bytes(fd, offset + done as u64, &buf[..want])?;
        done += want;
    }
    Ok(true)
}

impl PageInput for &[u8] {}

/// A file's pages go into the memfd with `splice` through a pipe: the
/// kernel moves page-cache references into the pipe and copies once into
/// the memfd's pages (written whole, so never zeroed first), with no user
/// buffer and no mapping. Measured here: 256 MiB in 180-200 ms, against
/// 340 ms with `read` + `pwrite` and 350 ms populating a mapping and
/// reading into it.
impl PageInput for std::fs::File {
    fn move_to(&mut self, fd: RawFd, offset: u64, len: usize) -> Result<bool> {
        let mut pipe = [0 as libc::c_int; 2];
        // SAFETY: a two-element array for the pipe's ends.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return move_via_buffer(self, fd, offset, len);
        }
        // SAFETY: the ends were just made and are owned here.
        let (r, w) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::os::fd::OwnedFd::from_raw_fd(pipe[0]),
                std::os::fd::OwnedFd::from_raw_fd(pipe[1]),
            )
        };
        // SAFETY: a pipe end; a larger pipe only means fewer calls.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let mut out = offset as libc::loff_t;
        let mut left = len;
        while left > 0 {
            // SAFETY: valid fds; null offsets read the file at its position.
            let n = unsafe {
                libc::splice(
                    self.as_raw_fd(),
                    std::ptr::null_mut(),
                    w.as_raw_fd(),
                    std::ptr::null_mut(),
                    left.min(1 << 20),
                    libc::SPLICE_F_MOVE,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not spliceable (nothing moved yet for this part).
                    Some(libc::EINVAL) => return move_via_buffer(self, fd, out as u64, left),
                    _ => return Err(e).context("splicing snapshot pages"),
                }
            }
            if n == 0 {
                return Ok(false);
            }
            let mut in_pipe = n as usize;
            while in_pipe > 0 {
                // SAFETY: valid fds and an offset into the memfd.
                let m = unsafe {
                    libc::splice(
                        r.as_raw_fd(),
                        std::ptr::null_mut(),
                        fd,
                        &mut out,
                        in_pipe,
                        libc::SPLICE_F_MOVE,
                    )
                };
                if m < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e).context("splicing snapshot pages into a pool");
                }
                anyhow::ensure!(m > 0, "splicing snapshot pages into a pool: no progress");
                in_pipe -= m as usize;
            }
            left -= n as usize;
        }
        Ok(true)
    }
}

/// Reads a snapshot from `R`: [`SnapshotReader::open`] checks the header
/// and returns the metadata; the reader is then an [`ImageSource`] (each
/// block's pages read straight into the caller's pages and checked there,
/// `None` after the end marker) or an iterator of pages (each block
/// checked before its pages come out). Every error names `source` (the
/// file) and what is wrong. `R` is read without a buffer of its own: page
/// bytes go straight into their destination (give it a `BufReader` only
/// for small reads).
pub struct SnapshotReader<R: PageInput> {
    input: R,
    /// For reading pages back from their destination (the CRC).
    check: Vec<u8>,
    source: String,
    frames: u64,
    /// The block whose header and index were read, its pages not yet.
    current: Option<BlockHead>,
    /// Pages of the current block not handed out yet, in order (iterator).
    pending: std::collections::VecDeque<PageImage>,
    blocks: u64,
    pages: u64,
    done: bool,
    failed: bool,
    /// The file is known to end with a valid end marker, so running out of
    /// bytes inside a part means a wrong length, not a cut.
    complete: bool,
}

/// A block's header and index, read ahead of its pages.
struct BlockHead {
    count: usize,
    index: Vec<u8>,
    crc: u32,
}

/// What it means that the file ended inside `what`: it was cut short, or,
/// when it is known to end with a valid end marker (`complete`), a length
/// in it is wrong.
fn ran_out(source: &str, what: &str, complete: bool) -> anyhow::Error {
    match complete {
        false => anyhow::anyhow!("{source}: truncated: the file ends inside {what}"),
        true => anyhow::anyhow!(
            "{source}: corrupted: {what} runs past the end of the file, which ends with a valid \
             end marker (a length in it is wrong)"
        ),
    }
}

/// Whether `tail`, a file's last [`END_BYTES`] bytes, is a valid end
/// marker (its checksum matches; the page count is checked later).
pub fn is_end_marker(tail: &[u8]) -> bool {
    tail.len() == END_BYTES
        && &tail[..4] == END_TAG
        && u32_at(tail, 4) == 0
        && u32_at(tail, 8) == 8
        && crc32fast::hash(&tail[16..]) == u32_at(tail, 12)
}

/// Bytes of the end marker.
pub const END_BYTES: usize = 24;

/// Reads exactly `buf.len()` bytes, or says why the file ended (`what`:
/// where it ended; see [`ran_out`]).
fn read_exact_or_truncated<R: Read>(
    input: &mut R,
    buf: &mut [u8],
    source: &str,
    what: &str,
    complete: bool,
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => return Err(ran_out(source, what, complete)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("{source}: reading {what}")),
        }
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl<R: PageInput> SnapshotReader<R> {
    /// Reads and checks the header and the metadata. `complete`: the
    /// caller saw a valid end marker at the end of the file
    /// ([`is_end_marker`]), so a part that runs past the end is reported as
    /// a wrong length (corrupted) rather than a cut (truncated).
    pub fn open(mut input: R, source: &str, complete: bool) -> Result<(Meta, SnapshotReader<R>)> {
        let mut header = [0u8; 20];
        let mut got = 0;
        while got < header.len() {
            match input.read(&mut header[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("{source}: reading its header")),
            }
        }
        if got < MAGIC.len() || &header[..8] != MAGIC {
            bail!(
                "{source}: not a disco snapshot (it does not start with {:?})",
                std::str::from_utf8(MAGIC).expect("ASCII")
            );
        }
        if got < header.len() {
            bail!("{source}: truncated: the file ends inside its header");
        }
        let version = u32_at(&header, 8);
        if version != VERSION {
            bail!(
                "{source}: snapshot format version {version}, this disco reads version {VERSION} only"
            );
        }
        let (len, crc) = (u32_at(&header, 12), u32_at(&header, 16));
        if len > MAX_META_BYTES {
            bail!(
                "{source}: corrupted: metadata of {len} bytes, more than the {MAX_META_BYTES} allowed"
            );
        }
        let mut json = vec![0u8; len as usize];
        read_exact_or_truncated(&mut input, &mut json, source, "its metadata", complete)?;
        if crc32fast::hash(&json) != crc {
            bail!("{source}: corrupted: the metadata's checksum does not match");
        }
        let meta: Meta = serde_json::from_slice(&json)
            .with_context(|| format!("{source}: corrupted: its metadata does not decode"))?;
        let frames = meta.frames;
        Ok((
            meta,
            SnapshotReader {
                input,
                check: Vec::new(),
                source: source.to_string(),
                frames,
                current: None,
                pending: Default::default(),
                blocks: 0,
                pages: 0,
                done: false,
                failed: false,
                complete,
            },
        ))
    }

    /// Reads the next block's header and index, or the end marker
    /// (checked; then `None`).
    fn read_head(&mut self) -> Result<Option<usize>> {
        let source = self.source.clone();
        let block = self.blocks + 1;
        let mut head = [0u8; 16];
        read_exact_or_truncated(
            &mut self.input,
            &mut head,
            &source,
            &format!(
                "the header of block {block} (no end marker after {} pages)",
                self.pages
            ),
            self.complete,
        )?;
        let (count, index_len, crc) = (u32_at(&head, 4), u32_at(&head, 8), u32_at(&head, 12));
        if &head[..4] == END_TAG {
            if count != 0 || index_len != 8 {
                bail!("{source}: corrupted: a malformed end marker");
            }
            let mut total = [0u8; 8];
            read_exact_or_truncated(
                &mut self.input,
                &mut total,
                &source,
                "the end marker",
                self.complete,
            )?;
            if crc32fast::hash(&total) != crc {
                bail!("{source}: corrupted: the end marker's checksum does not match");
            }
            let total = u64::from_le_bytes(total);
            if total != self.pages {
                bail!(
                    "{source}: corrupted: the end marker counts {total} pages, the blocks held {}",
                    self.pages
                );
            }
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra)? != 0 {
                bail!("{source}: corrupted: data after the end marker");
            }
            self.done = true;
            return Ok(None);
        }
        if &head[..4] != BLOCK_TAG {
            bail!("{source}: corrupted: block {block} does not start with a block tag");
        }
        if count == 0 || count as usize > BLOCK_PAGES || index_len > MAX_INDEX_BYTES {
            bail!(
                "{source}: corrupted: block {block} claims {count} pages and a {index_len}-byte index"
            );
        }
        let mut index = vec![0u8; index_len as usize];
        let what = self.block_name();
        read_exact_or_truncated(&mut self.input, &mut index, &source, &what, self.complete)?;
        self.current = Some(BlockHead {
            count: count as usize,
            index,
            crc,
        });
        Ok(Some(count as usize))
    }

    fn block_name(&self) -> String {
        format!("block {} (pages {}..)", self.blocks + 1, self.pages)
    }

    /// Moves the pages of the block `read_head` announced into `dest`
    /// (as many pages as the block holds), checks the block's CRC over
    /// its index and the pages read back from `dest`, and decodes its
    /// index.
    fn read_pages(&mut self, dest: &[PoolRun]) -> Result<Vec<Vec<Gfn>>> {
        let source = self.source.clone();
        let what = self.block_name();
        let head = self
            .current
            .take()
            .with_context(|| format!("{source}: pages read before their block's header"))?;
        let pages: usize = dest.iter().map(|d| d.pages).sum();
        anyhow::ensure!(
            pages == head.count,
            "{source}: {what} holds {} pages, the destination {pages}",
            head.count
        );
        for d in dest {
            if !self.input.move_to(d.fd, d.offset, d.pages * PAGE_SIZE)? {
                return Err(ran_out(&source, &what, self.complete));
            }
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&head.index);
        self.check.resize(BLOCK_PAGES * PAGE_SIZE, 0);
        for d in dest {
            let mut done = 0;
            while done < d.pages * PAGE_SIZE {
                let want = (d.pages * PAGE_SIZE - done).min(self.check.len());
                let buf = &mut self.check[..want];
                // SAFETY: a valid buffer; `d.fd` is a pool's memfd.
                let n = unsafe {
                    libc::pread(
                        d.fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        want,
                        (d.offset + done as u64) as libc::off_t,
                    )
                };
                if n <= 0 {
                    let e = std::io::Error::last_os_error();
                    if n < 0 && e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e).context("reading image pages back from a pool");
                }
                hasher.update(&buf[..n as usize]);
                done += n as usize;
            }
        }
        if hasher.finalize() != head.crc {
            bail!("{source}: corrupted: the checksum of {what} does not match");
        }
        let frames: Vec<Vec<u64>> = postcard::from_bytes(&head.index)
            .with_context(|| format!("{source}: corrupted: the index of {what} does not decode"))?;
        if frames.len() != head.count {
            bail!(
                "{source}: corrupted: {what} indexes {} pages, holds {}",
                frames.len(),
                head.count
            );
        }
        if frames
            .iter()
            .any(|f| f.is_empty() || f.iter().any(|&g| g >= self.frames))
        {
            bail!(
                "{source}: corrupted: a page of {what} names no frame or one outside the \
                 guest's {} frames",
                self.frames
            );
        }
        self.blocks += 1;
        self.pages += head.count as u64;
        Ok(frames)
    }

    /// Records a failure: the reader yields nothing more.
    fn failing<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

impl<R: PageInput> ImageSource for SnapshotReader<R> {
    fn next_block(&mut self) -> Result<Option<usize>> {
        if self.done {
            return Ok(None);
        }
        anyhow::ensure!(!self.failed, "{}: read after an error", self.source);
        let r = self.read_head();
        self.failing(r)
    }

    fn read_block(&mut self, dest: &[PoolRun]) -> Result<Vec<Vec<Gfn>>> {
        let r = self.read_pages(dest);
        self.failing(r)
    }
}

impl<R: PageInput> Iterator for SnapshotReader<R> {
    type Item = Result<PageImage>;

    fn next(&mut self) -> Option<Result<PageImage>> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(Ok(p));
            }
            if self.done || self.failed {
                return None;
            }
            let count = match self.next_block() {
                Ok(Some(count)) => count,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            let bytes = match self.block_into_memory(count) {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            match bytes {
                (bytes, Ok(frames)) => {
                    for (f, b) in frames.into_iter().zip(bytes.chunks_exact(PAGE_SIZE)) {
                        self.pending.push_back(PageImage {
                            frames: f,
                            bytes: b.to_vec(),
                        });
                    }
                }
                (_, Err(e)) => return Some(Err(e)),
            }
        }
    }
}

impl<R: PageInput> SnapshotReader<R> {
    /// The iterator's way to a block's pages: through a scratch memfd.
    #[allow(clippy::type_complexity)]
    fn block_into_memory(&mut self, count: usize) -> Result<(Vec<u8>, Result<Vec<Vec<Gfn>>>)> {
        let memfd = nix::sys::memfd::memfd_create(
            "disco-snapshot-block",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .context("a scratch memfd for a snapshot block")?;
        let dest = [PoolRun {
            fd: memfd.as_raw_fd(),
            offset: 0,
            pages: count,
        }];
        let frames = self.read_block(&dest);
        let mut bytes = vec![0u8; count * PAGE_SIZE];
        if frames.is_ok() {
            let f = std::fs::File::from(memfd);
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, 0)?;
        }
        Ok((bytes, frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VcpuSnapshot;

    fn meta(frames: u64) -> Meta {
        Meta {
            written_by: "test".into(),
            vm: VmMeta {
                name: "t".into(),
                vcpu_nodes: vec![0],
                memory_mib: frames / 256,
                memory_node: 0,
                workload: Workload::Fill {
                    seed: 1,
                    private_seed: 1,
                    shared_percent: 100,
                    shared_run: 1,
                },
                time_limit_ms: 1000,
                sharing_domain: "default".into(),
                linux: None,
            },
            state: GuestState::Micro(MicroVmState {
                vcpus: vec![VcpuSnapshot::Done { result: 7 }],
                log: vec!["vcpu0: hello".into()],
                run_time_ns: 5,
                progress: (1, 2),
            }),
            frames,
        }
    }

    /// 300 pages (two blocks), some shared by several frames.
    fn pages() -> Vec<PageImage> {
        (0..300u64)
            .map(|i| PageImage {
                frames: if i % 7 == 0 {
                    vec![i, 1000 + i]
                } else {
                    vec![i]
                },
                bytes: vec![(i % 251) as u8 + 1; PAGE_SIZE],
            })
            .collect()
    }

    fn file() -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new(), &meta(2048)).unwrap();
        for p in pages() {
            w.push(p).unwrap();
        }
        let (out, n, bytes) = w.finish().unwrap();
        assert_eq!((n, bytes), (300, out.len() as u64));
        out
    }

    fn read(bytes: &[u8]) -> Result<(Meta, Vec<PageImage>)> {
        let (meta, reader) = SnapshotReader::open(bytes, "snapshot t.snap", false)?;
        let pages = reader.collect::<Result<Vec<_>>>()?;
        Ok((meta, pages))
    }

    #[test]
    fn round_trip() {
        let (meta, got) = read(&file()).unwrap();
        assert_eq!(meta.vm, self::meta(2048).vm);
        let GuestState::Micro(state) = meta.state else {
            panic!("a micro-VM's state")
        };
        assert_eq!(state.log, ["vcpu0: hello"]);
        assert_eq!(got, pages());
    }

    #[test]
    fn every_cut_is_truncated() {
        let f = file();
        for len in (0..f.len()).step_by(997).chain([8, 19, 20, f.len() - 1]) {
            let e = read(&f[..len]).expect_err("a cut file is refused");
            let text = format!("{e:#}");
            assert!(text.starts_with("snapshot t.snap: "), "{text}");
            assert!(
                text.contains("truncated") || (len < 8 && text.contains("not a disco snapshot")),
                "cut at {len}: {text}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let f = file();
        for at in (0..f.len()).step_by(4099) {
            let mut bad = f.clone();
            bad[at] ^= 0x10;
            let e = read(&bad)
                .err()
                .unwrap_or_else(|| panic!("byte {at} flipped"));
            let text = format!("{e:#}");
            assert!(
                text.contains("corrupted")
                    || text.contains("not a disco snapshot")
                    || text.contains("version"),
                "byte {at}: {text}"
            );
        }
    }

    #[test]
    fn frames_outside_the_guest_are_refused() {
        let mut w = SnapshotWriter::new(Vec::new(), &meta(256)).unwrap();
        w.push(PageImage {
            frames: vec![300],
            bytes: vec![1; PAGE_SIZE],
        })
        .unwrap();
        let (out, _, _) = w.finish().unwrap();
        let e = format!("{:#}", read(&out).err().unwrap());
        assert!(e.contains("outside the guest's 256 frames"), "{e}");
    }
}
