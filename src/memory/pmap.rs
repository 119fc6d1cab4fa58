//! The per-VM pmap: guest frame number -> machine page, plus flags.

use serde::Serialize;

use super::{Gfn, MachinePage};

/// Flags of one pmap entry. Later features (sharing, replication,
/// write-protection) set them; the mapper keeps them consistent with the
/// host mapping's protection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageFlags {
    /// The machine page may be mapped by other owners too.
    pub shared: bool,
    /// The host mapping is read-only (a write must go through the monitor).
    pub write_protected: bool,
    /// The page held only zeros and the scanner punched it out of its pool
    /// (`Memory::release_zero_frames`): it costs the host nothing until the
    /// guest touches it again, which allocates a fresh zero page in place
    /// (no fault reaches the monitor). Cleared when the scanner finds the
    /// page resident again, and by any remap.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PmapEntry {
    pub page: MachinePage,
    pub flags: PageFlags,
}

/// Guest frames of one VM. `None` means the frame has no machine page: the
/// host range there is an inaccessible hole.
#[derive(Debug, Default)]
pub struct Pmap {
    entries: Vec<Option<PmapEntry>>,
    /// Entries with `flags.released` (kept as entries change, so reports
    /// need not walk the pmap).
    released: u64,
}

impl Pmap {
    pub fn new(frames: u64) -> Pmap {
        Pmap {
            entries: vec![None; frames as usize],
            released: 0,
        }
    }
    pub fn frames(&self) -> u64 {
        self.entries.len() as u64
    }
    pub fn get(&self, gfn: Gfn) -> Option<PmapEntry> {
        self.entries.get(gfn as usize).copied().flatten()
    }
    pub fn set(&mut self, gfn: Gfn, entry: Option<PmapEntry>) {
        let released = |e: &Option<PmapEntry>| e.is_some_and(|e| e.flags.released) as u64;
        let slot = &mut self.entries[gfn as usize];
        self.released = self.released - released(slot) + released(&entry);
        *slot = entry;
    }
    /// Frames whose zero page was released to the host (`PageFlags::released`).
    pub fn released(&self) -> u64 {
        self.released
    }
    /// All mapped frames in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (Gfn, PmapEntry)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(g, e)| e.map(|e| (g as Gfn, e)))
    }
}
