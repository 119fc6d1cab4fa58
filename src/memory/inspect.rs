//! Read-only views of the pmap and the memmap in bounded pieces, for
//! readers that must not hold the memory lock for a whole VM or a whole
//! node: the API streams a 1 GiB VM's pmap (262,144 frames) or every
//! machine page's owners a chunk at a time, and the guests' faults, the
//! scanner and the NUMA runner get the lock between chunks.

use std::ops::Range;

use anyhow::Result;
use serde::Serialize;

use super::mapper::Memory;
use super::pmap::PageFlags;
use super::{Gfn, MachinePage, NodeId, VmId};

/// One mapped guest frame as a chunk of its pmap shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameView {
    pub gfn: Gfn,
    pub page: MachinePage,
    pub flags: PageFlags,
    /// Its content has copies on other nodes (a replica set).
    pub replica: bool,
}

/// One machine page in use, as a chunk of the memmap shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PageView {
    pub node: NodeId,
    pub page: u32,
    pub refcount: u32,
    /// The `(vm, gfn)` frames that map it.
    pub owners: Vec<(VmId, Gfn)>,
    /// One of a replica set's copies.
    pub replica: bool,
}

/// Per node: what a walk over its memmap counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeSharing {
    /// Machine pages in use.
    pub pages: u64,
    /// Pages with two owners or more, and the frames that map them.
    pub shared_pages: u64,
    pub sharing_frames: u64,
    /// Pages that are a replica set's copy.
    pub replica_pages: u64,
}

impl Memory {
    /// The mapped frames of `vm` within `gfns` (clipped to the space),
    /// under one hold of the memory lock. An error when the space is gone.
    pub fn pmap_chunk(&self, vm: VmId, gfns: Range<Gfn>) -> Result<Vec<FrameView>> {
        let inner = self.inner.lock();
        let space = inner.space(vm)?;
        let end = gfns.end.min(space.frames());
        Ok((gfns.start.min(end)..end)
            .filter_map(|gfn| {
                let entry = space.pmap.get(gfn)?;
                Some(FrameView {
                    gfn,
                    page: entry.page,
                    flags: entry.flags,
                    replica: inner.replicas.contains(entry.page),
                })
            })
            .collect())
    }

    /// Frames of `vm`'s guest space (`None` when it is gone).
    pub fn space_frames(&self, vm: VmId) -> Option<u64> {
        self.inner.lock().spaces.get(&vm).map(|s| s.frames())
    }

    /// Slots of node `node`'s memmap: page indices to walk in chunks.
    pub fn memmap_extent(&self, node: NodeId) -> u32 {
        self.inner.lock().memmap.extent(node)
    }

    /// The pages in use on `node` with an index in `pages`, under one hold
    /// of the memory lock.
    pub fn memmap_chunk(&self, node: NodeId, pages: Range<u32>) -> Vec<PageView> {
        let inner = self.inner.lock();
        inner
            .memmap
            .range(node, pages)
            .map(|(page, info)| PageView {
                node,
                page: page.index,
                refcount: info.refcount,
                owners: info.owners.to_vec(),
                replica: inner.replicas.contains(page),
            })
            .collect()
    }

    /// Counts node `node`'s pages by sharing state, `chunk` slots per hold
    /// of the memory lock.
    pub fn node_sharing(&self, node: NodeId, chunk: u32) -> NodeSharing {
        let mut out = NodeSharing::default();
        let extent = self.memmap_extent(node);
        let mut start = 0;
        while start < extent {
            let end = start.saturating_add(chunk.max(1)).min(extent);
            let inner = self.inner.lock();
            for (page, info) in inner.memmap.range(node, start..end) {
                out.pages += 1;
                if info.refcount > 1 {
                    out.shared_pages += 1;
                    out.sharing_frames += info.refcount as u64;
                }
                out.replica_pages += inner.replicas.contains(page) as u64;
            }
            drop(inner);
            start = end;
        }
        out
    }
}
