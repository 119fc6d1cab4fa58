//! Replicas of read-shared pages: one copy of the same content per node, each
//! VM mapping the copy on the node its vCPUs run on (Disco's replication).
//!
//! A page shared across VMs (content sharing, `cow.rs`) lives on one node;
//! when VMs on several nodes read it, the NUMA policy asks for a replica on
//! each reading node. The mapper then copies the (write-protected, hence
//! stable) page to a fresh page of that node and remaps the owners whose VM
//! runs there onto the copy, each with its VM paused, exactly as a merge
//! remaps a duplicate. The copies form a **replica set**: different machine
//! pages, one content.
//!
//! Rules the mapper keeps (and `verify` checks):
//! * a set has at least two pages, on distinct nodes, all in use, all with
//!   the same bytes;
//! * every owner of a page in a set is shared and write-protected, even the
//!   sole owner of its copy: `write_protected == shared == (refcount > 1 ||
//!   in a replica set)`;
//! * a guest write to a replicated page breaks copy-on-write for the writer
//!   only: if its copy has other owners it gets a private copy, if it is the
//!   copy's only owner that copy leaves the set and becomes its private page;
//!   the other replicas are untouched;
//! * a set left with one page is dissolved, and that page follows the usual
//!   rule (private again when it has one owner).
//!
//! What KVM cannot do that Disco did: Disco's pmap was per vCPU's TLB, so two
//! vCPUs of one VM on different nodes could each see their node's replica of
//! the same guest page. Under KVM all vCPUs of a VM share one host address
//! space and so one mapping per guest page; a replica therefore serves the
//! VMs that run on its node, never a second node of the same VM. A VM whose
//! vCPUs span nodes maps the copy of its `cpu_node`.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};

use super::mapper::Memory;
use super::{Gfn, MachinePage, NodeId, VmId};
use crate::PAGE_SIZE;

/// Identifies one replica set.
pub type ReplicaSetId = u64;

/// The replica sets of a memory, and counters for reports.
#[derive(Debug, Default)]
pub(crate) struct Replicas {
    of_page: BTreeMap<MachinePage, ReplicaSetId>,
    sets: BTreeMap<ReplicaSetId, Vec<MachinePage>>,
    next: ReplicaSetId,
    pub(crate) replicas_made: u64,
    pub(crate) replicas_dropped: u64,
    /// Writes that took a replica out of its set.
    pub(crate) write_breaks: u64,
}

impl Replicas {
    pub(crate) fn contains(&self, page: MachinePage) -> bool {
        self.of_page.contains_key(&page)
    }

    /// Every copy of `page`'s content: its set's pages, or just `page`.
    pub(crate) fn group_of(&self, page: MachinePage) -> Vec<MachinePage> {
        match self.of_page.get(&page) {
            Some(set) => self.sets[set].clone(),
            None => vec![page],
        }
    }

    /// A value that names `page`'s content group (see `PageLocation::group`).
    pub(crate) fn group_id(&self, page: MachinePage) -> u64 {
        match self.of_page.get(&page) {
            Some(&set) => (1 << 63) | set,
            None => ((page.node as u64) << 32) | page.index as u64,
        }
    }

    /// Adds `copy` to the set of `original` (making one if needed).
    fn join(&mut self, original: MachinePage, copy: MachinePage) {
        let set = match self.of_page.get(&original) {
            Some(&s) => s,
            None => {
                let s = self.next;
                self.next += 1;
                self.of_page.insert(original, s);
                self.sets.insert(s, vec![original]);
                s
            }
        };
        self.of_page.insert(copy, set);
        self.sets.get_mut(&set).unwrap().push(copy);
    }

    /// Takes `page` out of its set. When the set is left with one page it
    /// is dissolved and that page is returned (the caller re-applies the
    /// one-owner rule to it).
    pub(crate) fn leave(&mut self, page: MachinePage) -> Option<MachinePage> {
        let set = self.of_page.remove(&page)?;
        let pages = self.sets.get_mut(&set).unwrap();
        pages.retain(|&p| p != page);
        if pages.len() == 1 {
            let last = pages[0];
            self.sets.remove(&set);
            self.of_page.remove(&last);
            return Some(last);
        }
        None
    }

    pub(crate) fn sets(&self) -> impl Iterator<Item = (&ReplicaSetId, &Vec<MachinePage>)> {
        self.sets.iter()
    }
}

/// Where a frame's content lives, for the NUMA engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLocation {
    /// The machine page this frame maps.
    pub page: MachinePage,
    /// Mapped by more than one frame, or one of several replicas.
    pub shared: bool,
    /// Nodes holding a copy of the content (more than one when replicated).
    pub copies: Vec<NodeId>,
    /// Names the content: equal for every frame mapping any of its copies.
    pub group: u64,
    /// In an area excluded from sharing and sampling
    /// (`Memory::exclude_from_sharing`, e.g. the micro-guest's system
    /// area): the policies leave it where it is.
    pub excluded: bool,
}

/// Replica figures for reports.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicaStats {
    /// Replica sets alive now and the machine pages in them.
    pub sets: u64,
    pub pages: u64,
    pub replicas_made: u64,
    pub replicas_dropped: u64,
    pub write_breaks: u64,
}

impl Memory {
    /// Records that VM `vm`'s vCPUs now run on `node`: it maps that node's
    /// replica of pages replicated from now on.
    pub fn set_cpu_node(&self, vm: VmId, node: NodeId) -> Result<()> {
        let mut inner = self.inner.lock();
        ensure!(node < inner.pools.len(), "node {node} does not exist");
        inner.space_mut(vm)?.cpu_node = node;
        Ok(())
    }

    /// Where frame `gfn` of `vm` lives; `None` when it is not mapped.
    pub fn frame_location(&self, vm: VmId, gfn: Gfn) -> Option<FrameLocation> {
        let inner = self.inner.lock();
        let space = inner.spaces.get(&vm)?;
        let entry = space.pmap.get(gfn)?;
        let mut copies: Vec<NodeId> = inner
            .replicas
            .group_of(entry.page)
            .iter()
            .map(|p| p.node())
            .collect();
        copies.sort_unstable();
        Some(FrameLocation {
            page: entry.page,
            shared: entry.flags.shared,
            copies,
            group: inner.replicas.group_id(entry.page),
            excluded: !space.mergeable(gfn),
        })
    }

    /// Gives the shared content of frame `gfn` of `vm` a replica on each of
    /// `nodes` that has none yet and that some owner's VM runs on, and remaps
    /// those owners onto it. Returns the replicas made. A node no owner runs
    /// on gets no replica (nobody would map it).
    pub fn replicate_page(&self, vm: VmId, gfn: Gfn, nodes: &[NodeId]) -> Result<usize> {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        ensure!(
            entry.flags.shared,
            "frame {gfn:#x} of vm {vm} is private; only shared pages are replicated"
        );
        let mut made = 0;
        for &node in nodes {
            ensure!(node < inner.pools.len(), "node {node} does not exist");
            // The frame's page now: an earlier node's remap may have moved
            // this very frame onto a replica (and freed its old page).
            let Some(source) = inner.space(vm)?.pmap.get(gfn).map(|e| e.page) else {
                break;
            };
            let group = inner.replicas.group_of(source);
            if group.iter().any(|p| p.node() == node) {
                continue;
            }
            // Owners (of any copy) whose VM runs on `node`.
            let movers: Vec<(VmId, Gfn, MachinePage)> = group
                .iter()
                .flat_map(|&p| {
                    inner
                        .memmap
                        .get(p)
                        .map(|i| i.owners.to_vec())
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |(v, g)| (v, g, p))
                })
                .filter(|&(v, _, _)| inner.spaces.get(&v).is_some_and(|s| s.cpu_node == node))
                .collect();
            if movers.is_empty() {
                continue;
            }
            // A copy target: `copy_page` fills it before anyone maps it.
            let index = inner.pools[node].alloc_for_copy(1)?[0];
            let copy = MachinePage {
                node: node as u16,
                index,
            };
            inner.copy_page(source, copy);
            inner.replicas.join(source, copy);
            inner.replicas.replicas_made += 1;
            made += 1;
            let mut mapped_any = false;
            for (v, g, old) in movers {
                match inner.remap_paused(v, g, copy) {
                    Ok(true) => {
                        mapped_any = true;
                        inner.drop_owner(old, v, g)?;
                    }
                    Ok(false) => {}
                    Err(e) if mapped_any => return Err(e),
                    Err(e) => {
                        inner.discard_unused_copy(copy)?;
                        return Err(e);
                    }
                }
            }
            if !mapped_any {
                inner.discard_unused_copy(copy)?;
                made -= 1;
            }
        }
        Ok(made)
    }

    /// Keeps only the copies of frame `gfn`'s content that lie on `keep`:
    /// owners of the other copies are remapped onto a kept copy (the one on
    /// their VM's node if there is one) and the other copies freed. Returns
    /// the copies dropped.
    pub fn collapse_page(&self, vm: VmId, gfn: Gfn, keep: &[NodeId]) -> Result<usize> {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.space(vm)?.pmap.get(gfn) else {
            bail!("frame {gfn:#x} of vm {vm} is not mapped");
        };
        let group = inner.replicas.group_of(entry.page);
        let kept: Vec<MachinePage> = group
            .iter()
            .copied()
            .filter(|p| keep.contains(&p.node()))
            .collect();
        ensure!(
            !kept.is_empty(),
            "collapse of frame {gfn:#x} of vm {vm} keeps none of its copies"
        );
        let mut dropped = 0;
        for old in group.into_iter().filter(|p| !kept.contains(p)) {
            let owners = inner
                .memmap
                .get(old)
                .map(|i| i.owners.to_vec())
                .unwrap_or_default();
            for (v, g) in owners {
                let node = inner.space(v)?.cpu_node;
                let target = kept
                    .iter()
                    .copied()
                    .find(|p| p.node() == node)
                    .unwrap_or(kept[0]);
                // A VM that cannot be paused keeps its copy for now.
                if inner.remap_paused(v, g, target)? {
                    inner.drop_owner(old, v, g)?;
                }
            }
            if inner.memmap.get(old).is_none() {
                dropped += 1;
                inner.replicas.replicas_dropped += 1;
            }
        }
        Ok(dropped)
    }

    pub fn replica_stats(&self) -> ReplicaStats {
        let inner = self.inner.lock();
        let r = &inner.replicas;
        ReplicaStats {
            sets: r.sets.len() as u64,
            pages: r.of_page.len() as u64,
            replicas_made: r.replicas_made,
            replicas_dropped: r.replicas_dropped,
            write_breaks: r.write_breaks,
        }
    }
}

impl super::mapper::Inner {
    /// Maps `(vm, gfn)` onto `page` (shared, write-protected) with the VM
    /// paused; `false` when it could not be paused in time or the remap
    /// would take it over its budget of mappings (nothing done).
    /// The caller drops the frame's previous page.
    pub(super) fn remap_paused(&mut self, vm: VmId, gfn: Gfn, page: MachinePage) -> Result<bool> {
        if !self.remap_fits(vm, gfn, page) {
            return Ok(false); // over the VM's budget of mappings: it stays
        }
        let pauser = self.pausers.get(&vm).cloned();
        let started = std::time::Instant::now();
        if let Some(p) = &pauser {
            if !p.pause() {
                self.count_pause(vm, started, false);
                return Ok(false);
            }
        }
        let mapped = self.map_onto(vm, gfn, page);
        if let Some(p) = &pauser {
            p.resume();
            self.count_pause(vm, started, true);
        }
        mapped.map(|_| true)
    }

    /// Charges VM `vm` a pause that began at `started` and ended now (or
    /// timed out: `held` false).
    pub(super) fn count_pause(&mut self, vm: VmId, started: std::time::Instant, held: bool) {
        let c = self.cow.per_vm.entry(vm).or_default();
        if held {
            c.pauses += 1;
        } else {
            c.pause_timeouts += 1;
        }
        c.paused_ms += started.elapsed().as_secs_f64() * 1e3;
    }

    /// Moves shared content (one page, several owners) to a fresh page of
    /// `node`: the page is write-protected, so a copy stays exact; every
    /// owner is remapped with its VM paused; the old page is freed when its
    /// last owner left. An owner whose VM cannot be paused in time stays on
    /// the old page (still shared and protected, so still correct).
    pub(super) fn move_shared_page(
        &mut self,
        page: MachinePage,
        node: NodeId,
    ) -> Result<MachinePage> {
        ensure!(node < self.pools.len(), "node {node} does not exist");
        ensure!(
            !self.replicas.contains(page),
            "{page} is one of several replicas; replicas are not migrated"
        );
        if page.node() == node {
            return Ok(page);
        }
        let owners = self
            .memmap
            .get(page)
            .map(|i| i.owners.to_vec())
            .unwrap_or_default();
        // A copy target: `copy_page` fills it before anyone maps it.
        let index = self.pools[node].alloc_for_copy(1)?[0];
        let new = MachinePage {
            node: node as u16,
            index,
        };
        self.copy_page(page, new);
        let deferred_before = self.budget.stats.deferred_remaps;
        let mut moved = 0;
        for (v, g) in owners {
            match self.remap_paused(v, g, new) {
                Ok(true) => {
                    moved += 1;
                    self.drop_owner_keep_warm(page, v, g)?;
                }
                Ok(false) => {}
                Err(e) if moved > 0 => return Err(e),
                Err(e) => {
                    self.pools[node].free(index)?;
                    return Err(e);
                }
            }
        }
        if moved == 0 {
            self.pools[node].free(index)?;
            if self.budget.stats.deferred_remaps > deferred_before {
                bail!(
                    "deferred: moving {page} would take its owners over their budget of mappings"
                );
            }
            bail!("no owner of {page} could be paused to move it");
        }
        // The new page may have a single owner (others could not be paused
        // and stayed behind): then it is private.
        self.after_owner_removed(new)?;
        Ok(new)
    }

    /// Frees a replica nobody maps (creating it was abandoned).
    fn discard_unused_copy(&mut self, copy: MachinePage) -> Result<()> {
        if let Some(rest) = self.replicas.leave(copy) {
            self.after_owner_removed(rest)?;
        }
        self.replicas.replicas_made -= 1;
        self.pools[copy.node()].free(copy.index)
    }

    /// `verify`'s part for replica sets.
    pub(super) fn verify_replicas(&self, errors: &mut Vec<String>) {
        // Warm pages are checked here too: `verify` calls this hook after
        // its own pool checks.
        self.verify_warm(errors);
        for (set, pages) in self.replicas.sets() {
            if pages.len() < 2 {
                errors.push(format!("replica set {set} has {} page(s)", pages.len()));
            }
            let mut nodes: Vec<NodeId> = pages.iter().map(|p| p.node()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            if nodes.len() != pages.len() {
                errors.push(format!("replica set {set} has two copies on one node"));
            }
            for &p in pages {
                if self.memmap.get(p).is_none() {
                    errors.push(format!("replica {p} of set {set} is not in use"));
                    continue;
                }
                let a = self.pools[pages[0].node()].page_ptr(pages[0].index);
                let b = self.pools[p.node()].page_ptr(p.index);
                // SAFETY: in-bounds pages of pool views; replicas are
                // write-protected in every guest mapping, so stable.
                let same = unsafe {
                    std::slice::from_raw_parts(a as *const u8, PAGE_SIZE)
                        == std::slice::from_raw_parts(b as *const u8, PAGE_SIZE)
                };
                if !same {
                    errors.push(format!(
                        "replica {p} of set {set} differs from replica {}",
                        pages[0]
                    ));
                }
            }
        }
    }
}
