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
    /// Packed entries (`pack`): 8 bytes a frame, where an
    /// `Option<PmapEntry>` takes 12.
    entries: Vec<u64>,
    /// Entries with `flags.released` (kept as entries change, so reports
    /// need not walk the pmap).
    released: u64,
}

impl Pmap {
    pub fn new(frames: u64) -> Pmap {
        Pmap {
            entries: vec![pack(None); frames as usize],
            released: 0,
        }
    }
    pub fn frames(&self) -> u64 {
        self.entries.len() as u64
    }
    pub fn get(&self, gfn: Gfn) -> Option<PmapEntry> {
        self.entries.get(gfn as usize).copied().and_then(unpack)
    }
    pub fn set(&mut self, gfn: Gfn, entry: Option<PmapEntry>) {
        let released = |e: &Option<PmapEntry>| e.is_some_and(|e| e.flags.released) as u64;
        let slot = &mut self.entries[gfn as usize];
        self.released = self.released - released(&unpack(*slot)) + released(&entry);
        *slot = pack(entry);
    }
    /// Maps frames `first..first+n` onto consecutive pages from `page`
    /// (same node), all with `flags`: the bulk form of [`Pmap::set`] that
    /// restores and clones fill a space with.
    pub fn fill(&mut self, first: Gfn, page: MachinePage, n: u64, flags: PageFlags) {
        let range = first as usize..(first + n) as usize;
        let was: u64 = self.entries[range.clone()]
            .iter()
            .filter(|&&e| e & RELEASED != 0)
            .count() as u64;
        self.released = self.released - was + if flags.released { n } else { 0 };
        for (k, slot) in self.entries[range].iter_mut().enumerate() {
            *slot = pack(Some(PmapEntry {
                page: MachinePage {
                    node: page.node,
                    index: page.index + k as u32,
                },
                flags,
            }));
        }
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
            .filter_map(|(g, &e)| unpack(e).map(|e| (g as Gfn, e)))
    }
}

/// Bit 63: the frame has an entry; bits 48-50: the flags; bits 32-47: the
/// node; bits 0-31: the page index.
const PRESENT: u64 = 1 << 63;
const SHARED: u64 = 1 << 48;
const WRITE_PROTECTED: u64 = 1 << 49;
const RELEASED: u64 = 1 << 50;

fn pack(entry: Option<PmapEntry>) -> u64 {
    let Some(e) = entry else { return 0 };
    let flag = |on: bool, bit: u64| if on { bit } else { 0 };
    PRESENT
        | e.page.index as u64
        | (e.page.node as u64) << 32
        | flag(e.flags.shared, SHARED)
        | flag(e.flags.write_protected, WRITE_PROTECTED)
        | flag(e.flags.released, RELEASED)
}

fn unpack(packed: u64) -> Option<PmapEntry> {
    (packed & PRESENT != 0).then_some(PmapEntry {
        page: MachinePage {
            node: (packed >> 32) as u16,
            index: packed as u32,
        },
        flags: PageFlags {
            shared: packed & SHARED != 0,
            write_protected: packed & WRITE_PROTECTED != 0,
            released: packed & RELEASED != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_pack_into_eight_bytes_and_back() {
        let mut pmap = Pmap::new(4);
        for bits in 0..8u8 {
            for (node, index) in [(0u16, 0u32), (7, 12345), (u16::MAX, u32::MAX)] {
                let entry = PmapEntry {
                    page: MachinePage { node, index },
                    flags: PageFlags {
                        shared: bits & 1 != 0,
                        write_protected: bits & 2 != 0,
                        released: bits & 4 != 0,
                    },
                };
                pmap.set(2, Some(entry));
                assert_eq!(pmap.get(2), Some(entry));
                assert_eq!(pmap.released(), entry.flags.released as u64);
            }
        }
        pmap.set(2, None);
        assert_eq!((pmap.get(2), pmap.get(0), pmap.released()), (None, None, 0));
        let flags = PageFlags {
            shared: true,
            write_protected: true,
            released: false,
        };
        pmap.fill(1, MachinePage { node: 3, index: 9 }, 3, flags);
        let got: Vec<_> = pmap
            .iter()
            .map(|(g, e)| (g, e.page.index, e.flags))
            .collect();
        assert_eq!(got, vec![(1, 9, flags), (2, 10, flags), (3, 11, flags)]);
        assert_eq!(std::mem::size_of_val(&pmap.entries[0]), 8);
    }
}
