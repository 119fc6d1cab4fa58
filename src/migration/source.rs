//! The sending side of a live migration (see the module doc of
//! `crate::migration`).

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::Mutex;

use super::wire::{self, Msg, WirePage};
use super::MigrationReport;
use crate::memory::{Gfn, Memory, PageImage};
use crate::monitor::{Monitor, Outgoing, VmError};
use crate::PAGE_SIZE;

/// How a migration runs.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Most pre-copy rounds (round 0 included) before stop-and-copy.
    pub max_rounds: u32,
    /// Stop and copy once a round finds at most this many dirty pages.
    pub stop_pages: u64,
    /// Hold the guests part of the time when a round does not shrink the
    /// dirty set (auto-converge); off: pre-copy ends at `max_rounds`.
    pub throttle: bool,
    /// Connecting, and each wait for the target.
    pub timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            max_rounds: 30,
            stop_pages: 512,
            throttle: true,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Why a migration did not happen.
#[derive(Debug)]
pub enum MigrateError {
    /// The request named VMs that cannot migrate (nothing was started).
    Vm(VmError),
    /// The transfer failed or the target refused: the VMs run on here.
    Failed(String),
}

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateError::Vm(e) => write!(f, "{e}"),
            MigrateError::Failed(m) => write!(f, "migration failed: {m}; the VMs run on here"),
        }
    }
}

impl std::error::Error for MigrateError {}

/// Frames read per hold of the memory lock.
const CHUNK_FRAMES: u64 = 4096;

/// Pages per `Pages` message (and per query).
const BATCH_PAGES: usize = 256;

/// Migrates the micro-VMs `names` of `monitor` to the monitor listening
/// at `to` (`disco serve --migrate-listen`). The monitor's lock is held
/// only briefly during pre-copy (the API goes on answering) and from the
/// pause to the end. On any failure the VMs run on here, with dirty
/// logging off, and the target keeps nothing.
pub fn migrate(
    monitor: &Arc<Mutex<Monitor>>,
    names: &[String],
    to: &str,
    options: &MigrateOptions,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let (out, memory) = {
        let mut m = monitor.lock();
        let out = m.migration_start(names).map_err(MigrateError::Vm)?;
        (out, m.memory().clone())
    };
    let mut report = MigrationReport {
        vms: names.to_vec(),
        to: to.to_string(),
        guest_ram_bytes: out.iter().map(|o| o.frames * PAGE_SIZE as u64).sum(),
        ..MigrationReport::default()
    };
    match run(monitor, &memory, &out, to, options, &mut report) {
        Ok(()) => {
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            report.bytes_per_distinct_page =
                report.bytes_sent as f64 / (report.distinct_pages.max(1) * PAGE_SIZE as u64) as f64;
            Ok(report)
        }
        Err(e) => {
            let why = format!("{e:#}");
            monitor
                .lock()
                .migration_abandon(&out, &format!("to {to}: {why}"));
            Err(MigrateError::Failed(format!("to {to}: {why}")))
        }
    }
}

/// The stream to the target, with the pages it has been given.
struct Stream {
    w: BufWriter<TcpStream>,
    r: BufReader<TcpStream>,
    /// Hashes of page contents the target holds for this migration.
    sent: HashSet<u128>,
    /// The target has pages of its own worth asking about.
    ask: bool,
}

impl Stream {
    /// Ends round `round` and waits until the target has applied it.
    fn end_round(&mut self, report: &mut MigrationReport, round: u32) -> Result<()> {
        self.send(report, &Msg::RoundEnd { round }, &[])?;
        self.flush()?;
        wire::expect(&mut self.r, "the target to apply a round", |m, _| match m {
            Msg::Applied { round: r } if r == round => Some(()),
            _ => None,
        })
    }

    fn send(&mut self, report: &mut MigrationReport, msg: &Msg, body: &[u8]) -> Result<()> {
        report.bytes_sent += wire::send(&mut self.w, msg, body)?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.w.flush().context("sending to the target")
    }

    /// Sends `pages` of VM `k`: each content once per migration, the
    /// target asked first about contents it may hold.
    fn pages(&mut self, report: &mut MigrationReport, k: u32, pages: &[PageImage]) -> Result<()> {
        for chunk in pages.chunks(BATCH_PAGES) {
            let hashes: Vec<u128> = chunk.iter().map(|p| wire::page_hash(&p.bytes)).collect();
            if self.ask {
                let mut unknown: Vec<u128> = hashes
                    .iter()
                    .copied()
                    .filter(|h| !self.sent.contains(h))
                    .collect();
                unknown.sort_unstable();
                unknown.dedup();
                if !unknown.is_empty() {
                    self.send(
                        report,
                        &Msg::Query {
                            hashes: unknown.clone(),
                        },
                        &[],
                    )?;
                    self.flush()?;
                    let held =
                        wire::expect(&mut self.r, "the answer to a query", |m, _| match m {
                            Msg::Have { held } => Some(held),
                            _ => None,
                        })?;
                    if held.len() != unknown.len() {
                        bail!(
                            "the target answered {} of {} hashes",
                            held.len(),
                            unknown.len()
                        );
                    }
                    for (h, yes) in unknown.iter().zip(held) {
                        if yes {
                            self.sent.insert(*h);
                            report.pages_target_had += 1;
                        }
                    }
                }
            }
            let mut body = Vec::with_capacity(chunk.len() * PAGE_SIZE);
            let mut wire_pages = Vec::with_capacity(chunk.len());
            for (p, &hash) in chunk.iter().zip(&hashes) {
                let carried = self.sent.insert(hash);
                if carried {
                    body.extend_from_slice(&p.bytes);
                    report.pages_carried += 1;
                } else {
                    report.pages_referenced += 1;
                }
                wire_pages.push(WirePage {
                    owners: p.frames.iter().map(|&g| (k, g)).collect(),
                    hash,
                    carried,
                });
            }
            self.send(report, &Msg::Pages { pages: wire_pages }, &body)?;
        }
        Ok(())
    }

    /// Sends the frames of VM `k` set in `dirty` (one bit per frame):
    /// their pages, and the list of those that now hold zeros.
    fn dirty(
        &mut self,
        report: &mut MigrationReport,
        memory: &Memory,
        k: u32,
        o: &Outgoing,
        dirty: &[u64],
    ) -> Result<u64> {
        let frames = o.frames;
        let mut recorded = vec![true; frames as usize];
        let mut wanted: Vec<Gfn> = Vec::new();
        for (w, &word) in dirty.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let gfn = w as u64 * 64 + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                if gfn < frames {
                    recorded[gfn as usize] = false;
                    wanted.push(gfn);
                }
            }
        }
        if wanted.is_empty() {
            return Ok(0);
        }
        let mut zero: Vec<u64> = Vec::new();
        let mut at = 0;
        while at < wanted.len() {
            let first = wanted[at];
            let end = (first + CHUNK_FRAMES).min(frames);
            let pages = memory.image_chunk(o.space, first..end, &mut recorded)?;
            let mut got: Vec<Gfn> = pages
                .iter()
                .flat_map(|p| p.frames.iter().copied())
                .collect();
            got.sort_unstable();
            while at < wanted.len() && wanted[at] < end {
                if got.binary_search(&wanted[at]).is_err() {
                    zero.push(wanted[at]);
                }
                at += 1;
            }
            self.pages(report, k, &pages)?;
        }
        if !zero.is_empty() {
            self.send(
                report,
                &Msg::Zero {
                    vm: k,
                    frames: zero,
                },
                &[],
            )?;
        }
        Ok(wanted.len() as u64)
    }
}

/// Holds the guests part of the time (auto-converge) while it lives.
struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The throttle's levels: percent of the time the guests are held.
const LEVELS: [u32; 6] = [0, 50, 75, 90, 95, 99];

/// How long the guests' write rate is watched before round 0.
const PROBE: Duration = Duration::from_millis(40);

/// What the stream moves, pages per second, for the throttle's first
/// level (measured on localhost here: about 1 GB/s; a slower link only
/// makes the later rounds raise the throttle).
const STREAM_PAGES_PER_S: f64 = 250_000.0;

/// One throttle period: the guests are held `percent` of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

impl Throttle {
    fn start(out: &[Outgoing]) -> Result<Throttle> {
        let percent = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pausers: Vec<_> = out.iter().map(|o| o.pauser.clone()).collect();
        let thread = {
            let (percent, stop) = (percent.clone(), stop.clone());
            std::thread::Builder::new()
                .name("disco-mig-throttle".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let p = percent.load(Ordering::Relaxed).min(99);
                        if p == 0 {
                            std::thread::sleep(THROTTLE_PERIOD);
                            continue;
                        }
                        let held: Vec<bool> = pausers.iter().map(|x| x.pause()).collect();
                        std::thread::sleep(THROTTLE_PERIOD * p / 100);
                        for (x, h) in pausers.iter().zip(held) {
                            if h {
                                x.resume();
                            }
                        }
                        std::thread::sleep(THROTTLE_PERIOD * (100 - p) / 100);
                    }
                })?
        };
        Ok(Throttle {
            percent,
            stop,
            thread: Some(thread),
        })
    }

    /// Starts at the lowest level that lets the guests run at most
    /// `keep` of the time (0 when `keep` >= 1).
    fn start_at(&self, keep: f64) -> u32 {
        let level = LEVELS
            .iter()
            .copied()
            .find(|&p| (100 - p) as f64 / 100.0 <= keep)
            .unwrap_or(99);
        self.percent.store(level, Ordering::Relaxed);
        level
    }

    /// Holds the guests longer: 50, 75, 90, 95, 99 %.
    fn raise(&self) -> u32 {
        let next = match self.percent.load(Ordering::Relaxed) {
            0 => 50,
            50 => 75,
            75 => 90,
            90 => 95,
            _ => 99,
        };
        self.percent.store(next, Ordering::Relaxed);
        next
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resumes the VMs it paused, unless disarmed.
struct Held<'a> {
    out: &'a [Outgoing],
    paused: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for o in &self.out[..self.paused] {
            o.pauser.resume();
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn connect(to: &str, timeout: Duration) -> Result<TcpStream> {
    let mut last = None;
    for addr in to
        .to_socket_addrs()
        .with_context(|| format!("resolving `{to}`"))?
    {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(anyhow!("connecting to {addr}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("`{to}` names no address")))
}

fn run(
    monitor: &Arc<Mutex<Monitor>>,
    memory: &Memory,
    out: &[Outgoing],
    to: &str,
    options: &MigrateOptions,
    report: &mut MigrationReport,
) -> Result<()> {
    let tcp = connect(to, options.timeout)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(options.timeout))?;
    tcp.set_write_timeout(Some(options.timeout))?;
    let mut s = Stream {
        r: BufReader::with_capacity(1 << 16, tcp.try_clone()?),
        w: BufWriter::with_capacity(1 << 20, tcp),
        sent: HashSet::new(),
        ask: false,
    };
    let hello = Msg::Hello {
        magic: wire::MAGIC,
        version: wire::VERSION,
        sender: format!("disco {}", env!("CARGO_PKG_VERSION")),
    };
    s.send(report, &hello, &[])?;
    s.flush()?;
    wire::expect(&mut s.r, "the target's welcome", |m, _| match m {
        Msg::Welcome { version } if version == wire::VERSION => Some(()),
        _ => None,
    })?;
    let metas: Vec<_> = out.iter().map(|o| o.meta.clone()).collect();
    let begin = Msg::Begin {
        vms_json: serde_json::to_vec(&metas)?,
    };
    s.send(report, &begin, &[])?;
    s.flush()?;
    let indexed = wire::expect(&mut s.r, "the target's acceptance", |m, _| match m {
        Msg::Accept { indexed_pages } => Some(indexed_pages),
        _ => None,
    })?;
    s.ask = indexed > 0;

    // How fast the guests write, before round 0: the throttle starts where
    // their writes stay under a tenth of what the stream moves.
    let throttle = if options.throttle {
        Some(Throttle::start(out)?)
    } else {
        None
    };
    let probed = {
        std::thread::sleep(PROBE);
        let m = monitor.lock();
        out.iter()
            .map(|o| m.migration_dirty(&o.name))
            .collect::<Result<Vec<_>>>()?
            .iter()
            .flatten()
            .map(|w| w.count_ones() as u64)
            .sum::<u64>()
    };
    report.dirty_pages_per_s = probed as f64 / PROBE.as_secs_f64();
    if let Some(t) = &throttle {
        let keep = 0.1 * STREAM_PAGES_PER_S / report.dirty_pages_per_s.max(1.0);
        report.throttle_percent = t.start_at(keep);
    }

    // Round 0: every page that holds data.
    let mut distinct: HashSet<u128> = HashSet::new();
    for (k, o) in out.iter().enumerate() {
        let mut recorded = vec![false; o.frames as usize];
        let mut stored = 0u64;
        let mut first: Gfn = 0;
        while first < o.frames {
            let end = (first + CHUNK_FRAMES).min(o.frames);
            let pages = memory.image_chunk(o.space, first..end, &mut recorded)?;
            for p in &pages {
                stored += p.frames.len() as u64;
                distinct.insert(wire::page_hash(&p.bytes));
            }
            s.pages(report, k as u32, &pages)?;
            first = end;
        }
        report.zero_frames += o.frames - stored;
    }
    report.distinct_pages = distinct.len() as u64;
    s.end_round(report, 0)?;
    report.rounds = 1;

    // Later rounds: the pages written meanwhile, until few are.
    let mut last = u64::MAX;
    loop {
        let bitmaps = {
            let m = monitor.lock();
            out.iter()
                .map(|o| m.migration_dirty(&o.name))
                .collect::<Result<Vec<_>>>()?
        };
        let dirty: u64 = bitmaps
            .iter()
            .flatten()
            .map(|w| w.count_ones() as u64)
            .sum();
        if dirty <= options.stop_pages || report.rounds >= options.max_rounds {
            // These go with the final round.
            for ((k, o), b) in out.iter().enumerate().zip(&bitmaps) {
                s.dirty(report, memory, k as u32, o, b)?;
            }
            report.dirty_pages.push(dirty);
            break;
        }
        for ((k, o), b) in out.iter().enumerate().zip(&bitmaps) {
            s.dirty(report, memory, k as u32, o, b)?;
        }
        s.end_round(report, report.rounds)?;
        report.dirty_pages.push(dirty);
        report.rounds += 1;
        if let Some(t) = &throttle {
            if dirty * 10 > last * 9 {
                report.throttle_percent = t.raise();
            }
        }
        last = dirty;
    }
    drop(throttle);

    // Stop and copy: pause, the rest, the states; the target builds, then
    // starts on commit.
    let mut m = monitor.lock();
    let paused_at = Instant::now();
    let mut held = Held { out, paused: 0 };
    for o in out {
        if !o.pauser.pause() {
            bail!(
                "VM {}: its vCPUs did not stop within the pause limit",
                o.name
            );
        }
        held.paused += 1;
    }
    report.downtime_parts_ms.push(ms(paused_at));
    let mut last_dirty = 0;
    for (k, o) in out.iter().enumerate() {
        let bitmap = m.migration_dirty(&o.name)?;
        last_dirty += s.dirty(report, memory, k as u32, o, &bitmap)?;
    }
    report.dirty_pages.push(last_dirty);
    report.rounds += 1;
    let states = m.migration_states(out)?;
    let fin = Msg::Final {
        states_json: serde_json::to_vec(&states)?,
    };
    s.send(report, &fin, &[])?;
    s.flush()?;
    report.downtime_parts_ms.push(ms(paused_at));
    wire::expect(&mut s.r, "the target's ready", |m, _| {
        matches!(m, Msg::Ready).then_some(())
    })?;
    report.downtime_parts_ms.push(ms(paused_at));
    s.send(report, &Msg::Commit, &[])?;
    s.flush()?;
    wire::expect(&mut s.r, "the target's start", |m, _| {
        matches!(m, Msg::Started).then_some(())
    })?;
    report.downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    // `migration_done` ends the pauses.
    held.paused = 0;
    m.migration_done(out, to);
    Ok(())
}
