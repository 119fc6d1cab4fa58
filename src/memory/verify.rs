//! `Memory::verify`: every invariant of machine memory, checked against
//! what the kernel really maps.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

use super::mapper::Memory;
use super::{Gfn, MachinePage};
use crate::PAGE_SIZE;

impl Memory {
    /// Checks every invariant of machine memory against the kernel's view:
    ///
    /// 1. every pmap entry maps, in the host range, exactly the pool page it
    ///    names (same memfd inode and offset, `MAP_SHARED`, read-write);
    ///    the kernel's userfaultfd write-protect bit (`/proc/self/pagemap`)
    ///    is set exactly on write-protected entries; every unmapped frame is
    ///    an inaccessible hole;
    /// 2. every memmap page's refcount equals its number of owners, and each
    ///    owner's pmap entry names that page; every pmap entry is listed as an
    ///    owner (so a page is never used without being accounted); an entry
    ///    is shared and write-protected exactly when its page has several
    ///    owners, so no guest can see another guest's write;
    /// 3. no page is both free in its pool and used in the memmap, every page
    ///    handed out by a pool is used or held by an image load in progress
    ///    (no leak), and pool counters agree;
    /// 4. clone groups (`memmap.rs`) agree with the slots that name them,
    ///    and their members are live spaces (the owners they stand for are
    ///    checked against the pmaps with every other owner, in 2).
    ///
    /// Returns every violation found, not just the first.
    pub fn verify(&self) -> Result<()> {
        let inner = self.inner.lock();
        let maps = read_proc_maps()?;
        let mut errors = Vec::new();
        let pool_by_inode: BTreeMap<u64, usize> =
            inner.pools.iter().map(|p| (p.inode(), p.node())).collect();

        for (&vm, space) in &inner.spaces {
            let end = space.base + space.frames() as usize * PAGE_SIZE;
            let wp_bits = match &inner.uffd {
                Some(_) => Some(uffd_wp_bits(space.base, space.frames() as usize)?),
                None => None,
            };
            let mut covered = space.base;
            let mut kernel_mappings = 0u64;
            let armed = |m: &HostMapping| {
                space.armed.iter().any(|&(first, len, _)| {
                    let (a, b) = (space.addr(first), space.addr(first + len));
                    m.start < b && m.end > a
                })
            };
            let mut previous: Option<&HostMapping> = None;
            for m in maps.iter().filter(|m| m.end > space.base && m.start < end) {
                // A run armed for a sample is a mapping of its own until
                // disarmed (`Memory::zap_frames`), which the pmap's runs do
                // not count: a line that only arming split off its
                // neighbour is the same mapping.
                let split_by_arming = previous.is_some_and(|p| {
                    p.end == m.start
                        && p.inode == m.inode
                        && m.inode != 0
                        && p.offset + (p.end - p.start) as u64 == m.offset
                        && p.perms == m.perms
                        && (armed(p) || armed(m))
                });
                previous = Some(m);
                if !split_by_arming {
                    kernel_mappings += 1;
                }
                // Neighbouring spaces' holes may merge into one VMA, so a
                // mapping can start before this space and end after it.
                if m.start.max(space.base) != covered {
                    errors.push(format!(
                        "vm {vm}: host range {covered:#x}..{:#x} is not mapped at all",
                        m.start
                    ));
                }
                covered = m.end.min(end);
                let mut addr = m.start.max(space.base);
                while addr < m.end.min(end) {
                    let gfn = ((addr - space.base) / PAGE_SIZE) as Gfn;
                    let entry = space.pmap.get(gfn);
                    let seen = match pool_by_inode.get(&m.inode) {
                        Some(&node) if m.inode != 0 => Some(MachinePage {
                            node: node as u16,
                            index: ((m.offset + (addr - m.start) as u64) / PAGE_SIZE as u64) as u32,
                        }),
                        _ => None,
                    };
                    match entry {
                        Some(e) => {
                            if seen != Some(e.page) || !m.shared {
                                errors.push(format!(
                                    "vm {vm} gfn {gfn:#x}: pmap says {} but the host maps {}",
                                    e.page,
                                    m.describe()
                                ));
                            }
                            if !m.writable || !m.readable {
                                errors.push(format!(
                                    "vm {vm} gfn {gfn:#x}: pool pages are mapped read-write, the host has {}",
                                    m.perms
                                ));
                            }
                            if let Some(bits) = &wp_bits {
                                if bits[gfn as usize] != e.flags.write_protected {
                                    errors.push(format!(
                                        "vm {vm} gfn {gfn:#x}: write_protected={} but the kernel's uffd-wp bit is {}",
                                        e.flags.write_protected, bits[gfn as usize]
                                    ));
                                }
                            }
                        }
                        None => {
                            if seen.is_some() || m.readable || m.writable {
                                errors.push(format!(
                                    "vm {vm} gfn {gfn:#x}: unmapped in the pmap but the host maps {}",
                                    m.describe()
                                ));
                            }
                        }
                    }
                    addr += PAGE_SIZE;
                }
            }
            if covered != end {
                errors.push(format!("vm {vm}: host range ends unmapped at {covered:#x}"));
            }
            if kernel_mappings != space.pmap.mappings() {
                errors.push(format!(
                    "vm {vm}: the kernel holds the range in {kernel_mappings} mappings, the pmap's \
                     runs make {}",
                    space.pmap.mappings()
                ));
            }
            let mut released = 0;
            for (gfn, e) in space.pmap.iter() {
                if e.flags.released {
                    released += 1;
                    if e.flags.shared || e.flags.write_protected {
                        errors.push(format!(
                            "vm {vm} gfn {gfn:#x}: a released zero page cannot be shared or protected"
                        ));
                    }
                }
                match inner.memmap.get(e.page) {
                    Some(info) if info.owners.contains(&(vm, gfn)) => {}
                    _ => errors.push(format!(
                        "vm {vm} gfn {gfn:#x} maps {} but the memmap does not list it as an owner",
                        e.page
                    )),
                }
                if inner.pools[e.page.node()].is_free(e.page.index) {
                    errors.push(format!(
                        "vm {vm} gfn {gfn:#x} maps {} which is free",
                        e.page
                    ));
                }
            }
            if released != space.pmap.released() {
                errors.push(format!(
                    "vm {vm}: {released} released frames but the pmap counts {}",
                    space.pmap.released()
                ));
            }
        }

        let (mut shared_pages, mut sharing_frames) = (0u64, 0u64);
        for (page, info) in inner.memmap.iter() {
            if info.owners.len() > 1 {
                shared_pages += 1;
                sharing_frames += info.owners.len() as u64;
            }
            if info.refcount as usize != info.owners.len() || info.refcount == 0 {
                errors.push(format!(
                    "{page}: refcount {} but {} owners",
                    info.refcount,
                    info.owners.len()
                ));
            }
            for (vm, gfn) in info.owners.iter() {
                let actual = inner.spaces.get(&vm).and_then(|s| s.pmap.get(gfn));
                if actual.map(|e| e.page) != Some(page) {
                    errors.push(format!("{page}: owner ({vm}, {gfn:#x}) does not map it"));
                }
            }
            let shared = info.owners.len() > 1 || inner.replicas.contains(page);
            for (vm, gfn) in info.owners.iter() {
                let entry = inner.spaces.get(&vm).and_then(|s| s.pmap.get(gfn));
                if let Some(e) = entry {
                    if e.flags.shared != shared || e.flags.write_protected != shared {
                        errors.push(format!(
                            "{page}: {} owner(s) but ({vm}, {gfn:#x}) has shared={} write_protected={}",
                            info.owners.len(),
                            e.flags.shared,
                            e.flags.write_protected
                        ));
                    }
                }
            }
        }
        if inner.memmap.sharing() != (shared_pages, sharing_frames) {
            errors.push(format!(
                "memmap counts {:?} (shared pages, their frames) but holds {:?}",
                inner.memmap.sharing(),
                (shared_pages, sharing_frames)
            ));
        }
        inner
            .memmap
            .verify_groups(|vm| inner.spaces.contains_key(&vm), &mut errors);
        inner.verify_replicas(&mut errors);
        for pool in &inner.pools {
            let mut used = 0u32;
            for index in 0..pool.high_water() {
                let page = MachinePage {
                    node: pool.node() as u16,
                    index,
                };
                let in_use = inner.memmap.get(page).is_some();
                let free = pool.is_free(index);
                let loading = inner
                    .loading
                    .get(pool.node())
                    .is_some_and(|l| l.contains(index));
                if loading {
                    if in_use || free {
                        errors.push(format!(
                            "{page} is held by an image load but also {}",
                            if free { "free" } else { "in the memmap" }
                        ));
                    }
                    used += 1;
                    continue;
                }
                match (in_use, free) {
                    (true, true) => errors.push(format!("{page} is both free and in use")),
                    (false, false) => {
                        errors.push(format!("{page} is allocated but nobody owns it (leak)"))
                    }
                    (true, false) => used += 1,
                    (false, true) => {}
                }
            }
            if used != pool.used() {
                errors.push(format!(
                    "pool of node {}: counts {} used pages, memmap has {used}",
                    pool.node(),
                    pool.used()
                ));
            }
        }
        if let Some((page, _)) = inner.memmap.iter().find(|(p, _)| {
            p.node() >= inner.pools.len() || p.index >= inner.pools[p.node()].high_water()
        }) {
            errors.push(format!("{page} is in the memmap but was never allocated"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            let shown = errors.len().min(20);
            bail!(
                "memory invariants violated ({} problems):\n  {}",
                errors.len(),
                errors[..shown].join("\n  ")
            )
        }
    }
}

/// Bit 57 of a `/proc/self/pagemap` entry: the page is write-protected by
/// userfaultfd (also reported for a not-present page that carries a
/// write-protect marker).
const PAGEMAP_UFFD_WP: u64 = 1 << 57;

/// The uffd write-protect bit of each of `frames` pages from `base`.
fn uffd_wp_bits(base: usize, frames: usize) -> Result<Vec<bool>> {
    let file = std::fs::File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let mut raw = vec![0u8; frames * 8];
    file.read_exact_at(&mut raw, (base / PAGE_SIZE * 8) as u64)
        .context("reading /proc/self/pagemap")?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) & PAGEMAP_UFFD_WP != 0)
        .collect())
}

/// One line of `/proc/self/maps`.
struct HostMapping {
    start: usize,
    end: usize,
    perms: String,
    readable: bool,
    writable: bool,
    shared: bool,
    offset: u64,
    inode: u64,
}

impl HostMapping {
    fn describe(&self) -> String {
        if self.inode == 0 {
            format!("anonymous {}", self.perms)
        } else {
            format!(
                "inode {} offset {:#x} {}",
                self.inode, self.offset, self.perms
            )
        }
    }
}

fn read_proc_maps() -> Result<Vec<HostMapping>> {
    let text = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let b = perms.as_bytes();
        out.push(HostMapping {
            start: usize::from_str_radix(s, 16)?,
            end: usize::from_str_radix(e, 16)?,
            perms: perms.to_string(),
            readable: b.first() == Some(&b'r'),
            writable: b.get(1) == Some(&b'w'),
            shared: b.get(3) == Some(&b's'),
            offset: u64::from_str_radix(offset, 16)?,
            inode: inode.parse()?,
        });
    }
    Ok(out)
}
