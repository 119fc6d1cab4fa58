//! The receiving side of a live migration (see the module doc of
//! `crate::migration`): a listener thread, one thread per incoming
//! migration.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use parking_lot::Mutex;

use super::wire::{self, Msg};
use crate::config::VmConfig;
use crate::memory::{Gfn, Memory, OwnedPage, SpaceRequest, VmId};
use crate::monitor::Monitor;
use crate::snapshot::VmMeta;
use crate::vm::{MicroVm, MicroVmState};
use crate::PAGE_SIZE;

/// How long a session waits for its source before it gives up.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Frames read per hold of the memory lock while indexing.
const INDEX_CHUNK: u64 = 4096;

/// Takes migrations into a monitor until dropped (dropping it waits for
/// the sessions under way).
pub struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Listens on `addr` (e.g. `0.0.0.0:7070`; port 0 picks one).
    pub fn start(addr: &str, monitor: Arc<Mutex<Monitor>>) -> Result<Listener> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("listening for migrations on {addr}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("disco-mig-listen".into())
                .spawn(move || {
                    let mut sessions: Vec<std::thread::JoinHandle<()>> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        sessions.retain(|t| !t.is_finished());
                        match listener.accept() {
                            Ok((stream, peer)) => {
                                let monitor = monitor.clone();
                                let spawned = std::thread::Builder::new()
                                    .name("disco-mig-in".into())
                                    .spawn(move || serve_one(stream, peer, monitor));
                                match spawned {
                                    Ok(t) => sessions.push(t),
                                    Err(e) => {
                                        tracing::warn!("migration from {peer}: no thread: {e}")
                                    }
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Err(e) => {
                                tracing::warn!("accepting a migration: {e}");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                    // Sessions under way end (or time out) before the
                    // monitor they hold goes.
                    for t in sessions {
                        let _ = t.join();
                    }
                })?
        };
        Ok(Listener {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, peer: SocketAddr, monitor: Arc<Mutex<Monitor>>) {
    let setup = (|| -> Result<(BufReader<TcpStream>, BufWriter<TcpStream>)> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(SESSION_TIMEOUT))?;
        stream.set_write_timeout(Some(SESSION_TIMEOUT))?;
        Ok((
            BufReader::with_capacity(1 << 20, stream.try_clone()?),
            BufWriter::with_capacity(1 << 16, stream),
        ))
    })();
    let (mut r, mut w) = match setup {
        Ok(rw) => rw,
        Err(e) => {
            tracing::warn!("migration from {peer}: {e:#}");
            return;
        }
    };
    let memory = monitor.lock().memory().clone();
    let mut session = Session {
        monitor,
        memory,
        peer: peer.to_string(),
        vcs: Vec::new(),
        spaces: Vec::new(),
        vms: Vec::new(),
        committed: false,
    };
    if let Err(e) = session.run(&mut r, &mut w) {
        let reason = format!("{e:#}");
        tracing::warn!("migration from {peer} failed: {reason}");
        // Best effort: the source may be gone.
        let _ = wire::send(&mut w, &Msg::Refuse { reason }, &[]).and_then(|_| Ok(w.flush()?));
    }
}

/// One incoming migration; what it built goes when it is dropped
/// uncommitted.
struct Session {
    monitor: Arc<Mutex<Monitor>>,
    memory: Arc<Memory>,
    peer: String,
    vcs: Vec<VmConfig>,
    /// The guest spaces, once round 0 is in.
    spaces: Vec<(VmId, usize)>,
    /// The KVM VMs, once the states are in.
    vms: Vec<MicroVm>,
    committed: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // The VMs (never started) before their memory.
        self.vms.clear();
        for &(space, _) in &self.spaces {
            if let Err(e) = self.memory.destroy_space(space) {
                tracing::warn!("undoing a failed migration: {e:#}");
            }
        }
        if !self.vcs.is_empty() {
            let names: Vec<&str> = self.vcs.iter().map(|v| v.name.as_str()).collect();
            self.monitor.lock().incoming_failed(&self.peer, &names);
        }
    }
}

impl Session {
    fn run(&mut self, r: &mut BufReader<TcpStream>, w: &mut BufWriter<TcpStream>) -> Result<()> {
        // Handshake.
        let (hello, _) = wire::recv(r).context("not a disco migration stream")?;
        let Msg::Hello {
            magic,
            version,
            sender,
        } = hello
        else {
            bail!(
                "not a disco migration stream (it began with a {} message)",
                hello.name()
            );
        };
        ensure!(
            magic == wire::MAGIC,
            "not a disco migration stream (bad magic)"
        );
        ensure!(
            version == wire::VERSION,
            "{sender} speaks migration protocol version {version}; this monitor (disco {}) \
             speaks only version {}",
            env!("CARGO_PKG_VERSION"),
            wire::VERSION
        );
        wire::send(w, &Msg::Welcome { version }, &[])?;
        w.flush()?;

        // The VMs, admitted; the pages this monitor holds, indexed.
        let metas: Vec<VmMeta> = wire::expect(r, "the VMs", |m, _| match m {
            Msg::Begin { vms_json } => Some(serde_json::from_slice(&vms_json)),
            _ => None,
        })?
        .context("the VMs' description")?;
        ensure!(!metas.is_empty(), "no VM to take");
        self.vcs = self
            .monitor
            .lock()
            .incoming_admit(&metas)
            .map_err(|e| anyhow!("{e}"))?;
        let frames: Vec<u64> = metas
            .iter()
            .map(|m| (m.memory_mib << 20) / PAGE_SIZE as u64)
            .collect();
        let index = self.index()?;
        wire::send(
            w,
            &Msg::Accept {
                indexed_pages: index.len() as u64,
            },
            &[],
        )?;
        w.flush()?;

        // Contents by hash, and round 0's owners of each.
        let mut bytes: HashMap<u128, Vec<u8>> = HashMap::new();
        let mut staged: Vec<(u128, Vec<(usize, Gfn)>)> = Vec::new();
        let mut staged_at: HashMap<u128, usize> = HashMap::new();
        // Where each content was last placed: a later frame with the same
        // content maps that page shared.
        let mut placed: HashMap<u128, (usize, Gfn)> = HashMap::new();
        loop {
            let (msg, body) = wire::recv(r)?;
            match msg {
                Msg::Query { hashes } => {
                    let held = hashes
                        .iter()
                        .map(|&h| self.confirm(&index, h, &mut bytes))
                        .collect::<Result<Vec<_>>>()?;
                    wire::send(w, &Msg::Have { held }, &[])?;
                    w.flush()?;
                }
                Msg::Pages { pages } => {
                    let carried = pages.iter().filter(|p| p.carried).count();
                    ensure!(
                        body.len() == carried * PAGE_SIZE,
                        "a batch of {carried} pages with {} bytes",
                        body.len()
                    );
                    let mut chunks = body.chunks_exact(PAGE_SIZE);
                    for p in pages {
                        if p.carried {
                            let page = chunks.next().expect("counted");
                            ensure!(
                                wire::page_hash(page) == p.hash,
                                "a page's bytes do not match its hash"
                            );
                            bytes.entry(p.hash).or_insert_with(|| page.to_vec());
                        }
                        let Some(page) = bytes.get(&p.hash) else {
                            bail!("a page referenced before it was sent");
                        };
                        let owners = p
                            .owners
                            .iter()
                            .map(|&(k, g)| {
                                ensure!(
                                    (k as usize) < frames.len() && g < frames[k as usize],
                                    "frame {g:#x} of VM {k} is outside the migrating VMs"
                                );
                                Ok((k as usize, g))
                            })
                            .collect::<Result<Vec<_>>>()?;
                        if self.spaces.is_empty() {
                            let at = *staged_at.entry(p.hash).or_insert_with(|| {
                                staged.push((p.hash, Vec::new()));
                                staged.len() - 1
                            });
                            staged[at].1.extend(owners);
                        } else {
                            for (k, g) in owners {
                                self.place(&mut placed, p.hash, k, g, page)?;
                            }
                        }
                    }
                }
                Msg::Zero { vm, frames: zeros } => {
                    ensure!(!self.spaces.is_empty(), "zero frames during round 0");
                    let k = vm as usize;
                    ensure!(k < frames.len(), "VM {k} is not migrating");
                    let zero = vec![0u8; PAGE_SIZE];
                    for g in zeros {
                        ensure!(g < frames[k], "frame {g:#x} of VM {k} is outside it");
                        self.write(k, g, &zero)?;
                    }
                }
                Msg::RoundEnd { round } => {
                    if round == 0 {
                        self.build(&frames, &staged, &bytes)?;
                        placed = staged
                            .iter()
                            .filter_map(|(h, owners)| owners.first().map(|&o| (*h, o)))
                            .collect();
                        staged = Vec::new();
                        staged_at = HashMap::new();
                    }
                    wire::send(w, &Msg::Applied { round }, &[])?;
                    w.flush()?;
                }
                Msg::Final { states_json } => {
                    ensure!(
                        !self.spaces.is_empty(),
                        "the final round before round 0 ended"
                    );
                    let states: Vec<MicroVmState> =
                        serde_json::from_slice(&states_json).context("the VMs' states")?;
                    ensure!(
                        states.len() == self.vcs.len(),
                        "{} states for {} VMs",
                        states.len(),
                        self.vcs.len()
                    );
                    self.vms =
                        self.monitor
                            .lock()
                            .incoming_build(&self.vcs, &self.spaces, &states)?;
                    wire::send(w, &Msg::Ready, &[])?;
                    w.flush()?;
                }
                Msg::Commit => {
                    ensure!(!self.vms.is_empty(), "a commit before the VMs' states");
                    let vms = std::mem::take(&mut self.vms);
                    self.monitor
                        .lock()
                        .incoming_start(&self.vcs, &self.spaces, vms, &self.peer)
                        .map_err(|e| anyhow!("{e}"))?;
                    self.committed = true;
                    // The source may have gone; the VMs run here anyway.
                    let _ = wire::send(w, &Msg::Started, &[]).and_then(|_| Ok(w.flush()?));
                    return Ok(());
                }
                other => bail!("unexpected {} message", other.name()),
            }
        }
    }

    /// Hash -> (space, frame) of every page with data that this monitor's
    /// guest spaces hold now (read through the pool views).
    fn index(&self) -> Result<HashMap<u128, (VmId, Gfn)>> {
        let mut index = HashMap::new();
        for (vm, frames, _) in self.memory.spaces() {
            let mut recorded = vec![false; frames as usize];
            let mut first = 0;
            while first < frames {
                let end = (first + INDEX_CHUNK).min(frames);
                // A space removed meanwhile is skipped.
                let Ok(pages) = self.memory.image_chunk(vm, first..end, &mut recorded) else {
                    break;
                };
                for p in pages {
                    index.insert(wire::page_hash(&p.bytes), (vm, p.frames[0]));
                }
                first = end;
            }
        }
        Ok(index)
    }

    /// Whether this monitor holds a page of hash `h`: its indexed candidate
    /// read again and hashed (it may have changed since); if it still
    /// matches, its bytes are kept for this migration.
    fn confirm(
        &self,
        index: &HashMap<u128, (VmId, Gfn)>,
        h: u128,
        bytes: &mut HashMap<u128, Vec<u8>>,
    ) -> Result<bool> {
        if bytes.contains_key(&h) {
            return Ok(true);
        }
        let Some(&(vm, gfn)) = index.get(&h) else {
            return Ok(false);
        };
        match self.memory.read_guest_page(vm, gfn) {
            Ok(page) if wire::page_hash(&page) == h => {
                bytes.insert(h, page);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The guest spaces from round 0's pages, each content loaded once per
    /// node and mapped shared into all its owners there.
    fn build(
        &mut self,
        frames: &[u64],
        staged: &[(u128, Vec<(usize, Gfn)>)],
        bytes: &HashMap<u128, Vec<u8>>,
    ) -> Result<()> {
        ensure!(self.spaces.is_empty(), "round 0 ended twice");
        let requests: Vec<SpaceRequest> = self
            .vcs
            .iter()
            .map(|vc| SpaceRequest {
                name: vc.name.clone(),
                domain: vc.sharing_domain.clone(),
                node: vc.memory_node,
            })
            .collect();
        let pages = staged.iter().map(|(h, owners)| OwnedPage {
            owners: owners.clone(),
            bytes: &bytes[h],
        });
        let load = self
            .memory
            .create_spaces_with_owners(frames, &requests, pages)
            .context("building the guest spaces")?;
        self.spaces = load.spaces;
        Ok(())
    }

    /// Frame `gfn` of VM `k` now holds `page` of hash `h`: mapped shared
    /// onto the frame `placed` last gave that content, when that frame is
    /// on the same node and still holds these bytes (compared), else
    /// written.
    fn place(
        &self,
        placed: &mut HashMap<u128, (usize, Gfn)>,
        h: u128,
        k: usize,
        gfn: Gfn,
        page: &[u8],
    ) -> Result<()> {
        if let Some(&(k0, g0)) = placed.get(&h) {
            let (space0, space) = (self.spaces[k0].0, self.spaces[k].0);
            if (k0, g0) != (k, gfn)
                && self.vcs[k0].memory_node == self.vcs[k].memory_node
                && self.memory.read_guest_page(space0, g0).ok().as_deref() == Some(page)
            {
                return self.memory.share_page(space0, g0, space, gfn);
            }
        }
        self.write(k, gfn, page)?;
        placed.insert(h, (k, gfn));
        Ok(())
    }

    /// Frame `gfn` of VM `k` now holds `page`: written into its machine
    /// page when that is private, else onto a fresh page of its own.
    fn write(&self, k: usize, gfn: Gfn, page: &[u8]) -> Result<()> {
        let space = self.spaces[k].0;
        if let Some(e) = self.memory.lookup(space, gfn)? {
            if !e.flags.write_protected
                && !e.flags.released
                && self.memory.write_guest_page(space, gfn, page).is_ok()
            {
                return Ok(());
            }
            self.memory.unmap_page(space, gfn)?;
        }
        self.memory.map_page(space, gfn, self.vcs[k].memory_node)?;
        self.memory.write_guest_page(space, gfn, page)
    }
}
