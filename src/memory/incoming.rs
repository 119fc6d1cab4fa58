//! Guest spaces built from pages that arrive with their owners across
//! several spaces: what a live migration's target needs from the mapper
//! when VMs that share pages migrate together (`crate::migration`).
//!
//! [`Memory::create_spaces_with_owners`] is the multi-VM sibling of
//! `create_spaces_from_image` (image.rs, where every space is a clone of
//! one image): each page names `(space, frame)` owners; it is loaded once
//! into the pool of each node whose spaces own it and mapped into every
//! owner there, write-protected and shared when it has more than one owner
//! on that node (the mapper's rule `shared == write_protected ==
//! refcount > 1`). Frames no page names get fresh pages. Mapped in runs, as image.rs
//! does: one `mmap` per run of consecutive frames onto consecutive pool
//! pages, one ranged write-protect per shared run.

use anyhow::{bail, ensure, Result};

use super::image::{ImageLoad, SpaceRequest, IMAGE_BATCH};
use super::mapper::{Inner, Memory};
use super::{Gfn, MachinePage, NodeId, VmId};
use crate::PAGE_SIZE;

/// One page for [`Memory::create_spaces_with_owners`].
#[derive(Clone, Debug)]
pub struct OwnedPage<'a> {
    /// `(index into the requests, frame)`, at least one.
    pub owners: Vec<(usize, Gfn)>,
    /// `PAGE_SIZE` bytes.
    pub bytes: &'a [u8],
}

impl Memory {
    /// Builds one guest space per request, request `k` with `frames[k]`
    /// frames, from `pages` (see the module doc). All or nothing: on any
    /// error every space made so far is destroyed and every page given
    /// back.
    pub fn create_spaces_with_owners<'a>(
        &self,
        frames: &[u64],
        requests: &[SpaceRequest],
        pages: impl Iterator<Item = OwnedPage<'a>>,
    ) -> Result<ImageLoad> {
        ensure!(!requests.is_empty(), "no guest space to build");
        ensure!(
            frames.len() == requests.len(),
            "{} frame counts for {} spaces",
            frames.len(),
            requests.len()
        );
        ensure!(
            frames.iter().all(|&f| f > 0),
            "a guest space needs at least one page"
        );
        let mut load = ImageLoad::default();
        let result = self.load_owned(frames, requests, pages, &mut load);
        if let Err(e) = result {
            let mut inner = self.inner.lock();
            for &(vm, _) in &load.spaces {
                if let Err(d) = inner.destroy(vm) {
                    tracing::warn!("undoing a failed load, vm {vm}: {d:#}");
                }
            }
            return Err(e);
        }
        Ok(load)
    }

    fn load_owned<'a>(
        &self,
        frames: &[u64],
        requests: &[SpaceRequest],
        pages: impl Iterator<Item = OwnedPage<'a>>,
        load: &mut ImageLoad,
    ) -> Result<()> {
        {
            let mut inner = self.inner.lock();
            let nodes = inner.pools.len();
            for r in requests {
                ensure!(
                    r.node < nodes,
                    "node {} does not exist (this topology has {nodes} nodes)",
                    r.node
                );
            }
            load.pages_per_node = vec![0; nodes];
            let needed = inner.map_count_for(frames);
            crate::leftovers::ensure_map_count(needed, &mut inner.map_count)?;
            for (r, &f) in requests.iter().zip(frames) {
                let (vm, base) = inner.reserve_space(&r.name, &r.domain, r.node, f)?;
                load.spaces.push((vm, base));
            }
        }
        let spaces: Vec<(VmId, NodeId, u64)> = load
            .spaces
            .iter()
            .zip(requests)
            .zip(frames)
            .map(|((&(vm, _), r), &f)| (vm, r.node, f))
            .collect();
        let mut batch: Vec<OwnedPage<'a>> = Vec::with_capacity(IMAGE_BATCH);
        let mut pages = pages.peekable();
        while pages.peek().is_some() {
            batch.clear();
            batch.extend(pages.by_ref().take(IMAGE_BATCH));
            let mut inner = self.inner.lock();
            let mut nodes: Vec<NodeId> = spaces.iter().map(|s| s.1).collect();
            nodes.sort_unstable();
            nodes.dedup();
            for node in nodes {
                let (mapped, loaded) = inner.load_owned_batch(node, &spaces, &batch)?;
                load.frames_mapped += mapped;
                load.pages_per_node[node] += loaded;
            }
        }
        let mut inner = self.inner.lock();
        for &(vm, node, f) in &spaces {
            let empty: Vec<Gfn> = {
                let pmap = &inner.space(vm)?.pmap;
                (0..f).filter(|&g| pmap.get(g).is_none()).collect()
            };
            for (first, count) in super::runs::runs_of(&empty) {
                inner.map_fresh(vm, first, count, node)?;
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Loads the pages of `batch` that spaces on `node` own into `node`'s
    /// pool, once each, and maps them into those owners. Returns (frames
    /// mapped, pages loaded). On an error the pages no frame maps yet are
    /// freed (the caller destroys the spaces).
    fn load_owned_batch(
        &mut self,
        node: NodeId,
        spaces: &[(VmId, NodeId, u64)],
        batch: &[OwnedPage<'_>],
    ) -> Result<(u64, u64)> {
        // The batch's pages with owners here, and those owners.
        let mut here: Vec<(&OwnedPage<'_>, Vec<(usize, Gfn)>)> = Vec::new();
        for p in batch {
            ensure!(
                p.bytes.len() == PAGE_SIZE,
                "a page of {} bytes",
                p.bytes.len()
            );
            ensure!(!p.owners.is_empty(), "a page with no frame");
            let mut mine = Vec::new();
            for &(k, gfn) in &p.owners {
                let Some(&(vm, n, f)) = spaces.get(k) else {
                    bail!("a page names space {k} of {}", spaces.len());
                };
                ensure!(gfn < f, "frame {gfn:#x} is outside space {k} ({f} frames)");
                if n == node {
                    if self.space(vm)?.pmap.get(gfn).is_some() {
                        bail!("frame {gfn:#x} of space {k} is given a page twice");
                    }
                    mine.push((k, gfn));
                }
            }
            if !mine.is_empty() {
                here.push((p, mine));
            }
        }
        if here.is_empty() {
            return Ok((0, 0));
        }
        // (space, gfn, pool index, shared), by space and frame.
        let indices = self.pools[node].alloc_for_copy(here.len() as u32)?;
        let mut layout: Vec<(usize, Gfn, u32, bool)> = Vec::new();
        for ((p, mine), &index) in here.iter().zip(&indices) {
            let dst = self.pools[node].page_ptr(index);
            // SAFETY: a page of the pool's view, just allocated: nobody
            // maps it yet.
            unsafe { std::ptr::copy_nonoverlapping(p.bytes.as_ptr(), dst, PAGE_SIZE) };
            let shared = mine.len() > 1;
            layout.extend(mine.iter().map(|&(k, g)| (k, g, index, shared)));
        }
        layout.sort_unstable();
        for pair in layout.windows(2) {
            if (pair[0].0, pair[0].1) == (pair[1].0, pair[1].1) {
                let e = anyhow::anyhow!(
                    "frame {:#x} of space {} is given two pages",
                    pair[0].1,
                    pair[0].0
                );
                self.free_unowned(node, &indices)?;
                return Err(e);
            }
        }
        let mut mapped = 0u64;
        let result = (|| -> Result<()> {
            let mut i = 0;
            while i < layout.len() {
                let (k, first, index, shared) = layout[i];
                let mut n = 1;
                while i + n < layout.len()
                    && layout[i + n].0 == k
                    && layout[i + n].1 == first + n as Gfn
                    && layout[i + n].2 == index + n as u32
                    && layout[i + n].3 == shared
                {
                    n += 1;
                }
                self.map_owned_run(spaces[k].0, first, node, index, n, shared)?;
                mapped += n as u64;
                i += n;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.free_unowned(node, &indices)?;
            return Err(e);
        }
        Ok((mapped, indices.len() as u64))
    }

    /// Frees the pages of `indices` on `node` that no frame maps.
    fn free_unowned(&mut self, node: NodeId, indices: &[u32]) -> Result<()> {
        let mut unowned: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|&index| {
                self.memmap
                    .get(MachinePage {
                        node: node as u16,
                        index,
                    })
                    .is_none()
            })
            .collect();
        self.pools[node].free_many(&mut unowned)
    }
}
