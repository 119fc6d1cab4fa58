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
    /// Packed entries (`pack`), in chunks that are stored as one entry
    /// while they map a run (see [`Chunks`]).
    entries: Chunks,
    /// Entries with `flags.released` (kept as entries change, so reports
    /// need not walk the pmap).
    released: u64,
    /// Places where the kernel cannot join two neighbouring frames into one
    /// mapping (see [`Pmap::mappings`]), kept as entries change.
    splits: u64,
}

/// Frames per chunk of the pmap (2 MiB of guest memory).
const CHUNK: u64 = 512;

/// One chunk of a pmap. A chunk whose frames map consecutive pages of one
/// pool with equal flags, or are all holes, is *linear*: its first entry
/// says everything, so it costs 8 bytes instead of 4 KiB. Fresh guest
/// memory (allocated in runs), restored and cloned spaces are mostly
/// linear: a clone of a 256 MiB snapshot needs 2 KiB of pmap, not 512 KiB.
/// A chunk becomes *explicit* (an entry per frame) at its first entry that
/// breaks the run, and linear again once no entry does.
#[derive(Debug)]
enum Chunk {
    /// Entry of the first frame; frame `k` maps page `index + k`.
    Linear(u64),
    /// An entry per frame, and how many of them differ from the run that
    /// the first one starts (`linear_at`): 0 makes the chunk linear again.
    Explicit { entries: Box<[u64]>, misses: u32 },
}

/// Frame `k`'s entry in the run whose first entry is `head` (a hole chunk
/// stays holes). `None` when the run would leave the page index range.
fn linear_at(head: u64, k: u64) -> Option<u64> {
    if head & PRESENT == 0 {
        return Some(head);
    }
    let index = (head as u32).checked_add(k as u32)?;
    Some((head & !0xffff_ffff) | index as u64)
}

/// The packed entries of a pmap, chunked (see [`Chunk`]).
#[derive(Debug, Default)]
struct Chunks {
    chunks: Vec<Chunk>,
    frames: u64,
}

impl Chunks {
    fn new(frames: u64) -> Chunks {
        let n = frames.div_ceil(CHUNK) as usize;
        Chunks {
            chunks: (0..n).map(|_| Chunk::Linear(pack(None))).collect(),
            frames,
        }
    }

    fn get(&self, gfn: Gfn) -> Option<u64> {
        if gfn >= self.frames {
            return None;
        }
        let k = gfn % CHUNK;
        match &self.chunks[(gfn / CHUNK) as usize] {
            Chunk::Linear(head) => Some(linear_at(*head, k).unwrap_or(0)),
            Chunk::Explicit { entries, .. } => Some(entries[k as usize]),
        }
    }

    /// Frames of chunk `c` (the last may be short).
    fn chunk_len(&self, c: usize) -> u64 {
        CHUNK.min(self.frames - c as u64 * CHUNK)
    }

    fn put(&mut self, gfn: Gfn, packed: u64) {
        let (c, k) = ((gfn / CHUNK) as usize, gfn % CHUNK);
        let len = self.chunk_len(c);
        let chunk = &mut self.chunks[c];
        if let Chunk::Linear(head) = *chunk {
            if linear_at(head, k) == Some(packed) {
                return;
            }
            let entries: Box<[u64]> = (0..len).map(|i| linear_at(head, i).unwrap_or(0)).collect();
            *chunk = Chunk::Explicit { entries, misses: 0 };
        }
        let Chunk::Explicit { entries, misses } = chunk else {
            unreachable!("made explicit above")
        };
        let old = entries[k as usize];
        entries[k as usize] = packed;
        if k == 0 {
            // A new head: every frame is measured against it again.
            *misses = (1..len)
                .filter(|&i| linear_at(packed, i) != Some(entries[i as usize]))
                .count() as u32;
        } else {
            let head = entries[0];
            let miss = |e: u64| (linear_at(head, k) != Some(e)) as u32;
            *misses = *misses - miss(old) + miss(packed);
        }
        if *misses == 0 {
            *chunk = Chunk::Linear(entries[0]);
        }
    }

    /// Frames `first..first+n` onto the run that `head` starts: whole
    /// chunks become linear at once, the ends go frame by frame.
    fn fill(&mut self, first: Gfn, head: u64, n: u64) {
        let mut k = 0;
        while k < n {
            let gfn = first + k;
            let c = (gfn / CHUNK) as usize;
            let len = self.chunk_len(c);
            match linear_at(head, k) {
                Some(at)
                    if gfn.is_multiple_of(CHUNK)
                        && n - k >= len
                        && linear_at(at, len - 1).is_some() =>
                {
                    self.chunks[c] = Chunk::Linear(at);
                    k += len;
                }
                at => {
                    self.put(gfn, at.unwrap_or(0));
                    k += 1;
                }
            }
        }
    }
}

/// Whether the kernel can hold frames `a` and `a + 1` in one mapping (VMA):
/// two holes (inaccessible anonymous memory), or two consecutive pages of
/// one pool (one file, consecutive offsets). Protection does not matter:
/// userfaultfd write-protects page-table entries, not mappings.
fn joinable(a: Option<PmapEntry>, b: Option<PmapEntry>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.page.node == b.page.node && a.page.index.checked_add(1) == Some(b.page.index)
        }
        _ => false,
    }
}

impl Pmap {
    pub fn new(frames: u64) -> Pmap {
        Pmap {
            entries: Chunks::new(frames),
            released: 0,
            splits: 0,
        }
    }
    pub fn frames(&self) -> u64 {
        self.entries.frames
    }
    pub fn get(&self, gfn: Gfn) -> Option<PmapEntry> {
        self.entries.get(gfn).and_then(unpack)
    }
    pub fn set(&mut self, gfn: Gfn, entry: Option<PmapEntry>) {
        let released = |e: &Option<PmapEntry>| e.is_some_and(|e| e.flags.released) as u64;
        let old = self.get(gfn);
        self.released = self.released - released(&old) + released(&entry);
        let splits_around = |pmap: &Pmap| pmap.split_at(gfn) as u64 + pmap.split_at(gfn + 1) as u64;
        self.splits -= splits_around(self);
        self.entries.put(gfn, pack(entry));
        self.splits += splits_around(self);
    }

    /// Whether frames `gfn - 1` and `gfn` fall in different kernel mappings
    /// (false at the space's edges).
    fn split_at(&self, gfn: Gfn) -> bool {
        gfn > 0 && gfn < self.frames() && !joinable(self.get(gfn - 1), self.get(gfn))
    }

    /// The kernel mappings (VMAs) this space's host range is made of, as
    /// the kernel joins them: one per maximal run of frames that map
    /// consecutive pages of one pool, and one per run of holes. `verify`
    /// checks it against `/proc/self/maps`; the mapper holds each VM to its
    /// budget of mappings with it (`super::budget`).
    pub fn mappings(&self) -> u64 {
        self.splits + 1
    }

    /// How [`Pmap::mappings`] would change if each `(gfn, entry)` of
    /// `changes` (sorted by frame, each frame once) were set.
    pub fn mappings_delta(&self, changes: &[(Gfn, Option<PmapEntry>)]) -> i64 {
        let after = |gfn: Gfn| match changes.binary_search_by_key(&gfn, |c| c.0) {
            Ok(i) => changes[i].1,
            Err(_) => self.get(gfn),
        };
        let mut places: Vec<Gfn> = changes.iter().flat_map(|c| [c.0, c.0 + 1]).collect();
        places.dedup();
        let mut delta = 0i64;
        for gfn in places {
            if gfn == 0 || gfn >= self.frames() {
                continue;
            }
            delta += !joinable(after(gfn - 1), after(gfn)) as i64;
            delta -= !joinable(self.get(gfn - 1), self.get(gfn)) as i64;
        }
        delta
    }

    /// The frames around `gfn` that one kernel mapping holds (see
    /// [`Pmap::mappings`]), clipped to `within` (which holds `gfn`): the
    /// walk costs a step per frame, so callers bound it.
    pub fn mapping_around(&self, gfn: Gfn, within: std::ops::Range<Gfn>) -> std::ops::Range<Gfn> {
        let mut start = gfn;
        while start > within.start && !self.split_at(start) {
            start -= 1;
        }
        let mut end = gfn + 1;
        while end < within.end.min(self.frames()) && !self.split_at(end) {
            end += 1;
        }
        start..end
    }
    /// Maps frames `first..first+n` onto consecutive pages from `page`
    /// (same node), all with `flags`: the bulk form of [`Pmap::set`] that
    /// restores and clones fill a space with.
    pub fn fill(&mut self, first: Gfn, page: MachinePage, n: u64, flags: PageFlags) {
        // The mapping count changes only at the places this run touches.
        let splits_within =
            |pmap: &Pmap| (first..=first + n).filter(|&g| pmap.split_at(g)).count() as u64;
        self.splits -= splits_within(self);
        self.fill_entries(first, page, n, flags);
        self.splits += splits_within(self);
    }

    fn fill_entries(&mut self, first: Gfn, page: MachinePage, n: u64, flags: PageFlags) {
        let was = (first..first + n)
            .filter(|&g| self.entries.get(g).is_some_and(|e| e & RELEASED != 0))
            .count() as u64;
        self.released = self.released - was + if flags.released { n } else { 0 };
        let head = PmapEntry { page, flags };
        self.entries.fill(first, pack(Some(head)), n);
    }
    /// Frames whose zero page was released to the host (`PageFlags::released`).
    pub fn released(&self) -> u64 {
        self.released
    }
    /// All mapped frames in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (Gfn, PmapEntry)> + '_ {
        (0..self.frames()).filter_map(|g| self.get(g).map(|e| (g, e)))
    }
    /// Chunks of [`CHUNK`] frames stored as one entry (they map a run, or
    /// are holes), and all chunks: what the pmap costs in memory.
    #[cfg(test)]
    fn linear_chunks(&self) -> (usize, usize) {
        let chunks = &self.entries.chunks;
        let linear = chunks
            .iter()
            .filter(|c| matches!(c, Chunk::Linear(_)))
            .count();
        (linear, chunks.len())
    }
    /// Heap bytes the pmap holds (its chunks, 4 KiB for an explicit one).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let (linear, all) = self.linear_chunks();
        all * std::mem::size_of::<Chunk>() + (all - linear) * CHUNK as usize * 8
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
        assert_eq!(pmap.mappings(), 1, "one run of holes");
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
        // Frames 1-3 on consecutive pages, holes at 0: two mappings.
        assert_eq!(pmap.mappings(), 2, "fill keeps the mapping count");
        assert_eq!(pmap.linear_chunks(), (0, 1), "a chunk with a run and holes");
    }

    fn at(index: u32) -> Option<PmapEntry> {
        Some(PmapEntry {
            page: MachinePage { node: 0, index },
            flags: PageFlags::default(),
        })
    }

    #[test]
    fn mappings_follow_runs_of_consecutive_pages_and_holes() {
        let mut pmap = Pmap::new(8);
        for g in 0..8 {
            pmap.set(g, at(100 + g as u32));
        }
        assert_eq!(pmap.mappings(), 1);
        // A page elsewhere in the middle: three mappings.
        let change = [(3, at(7))];
        assert_eq!(pmap.mappings_delta(&change), 2);
        pmap.set(3, at(7));
        assert_eq!(pmap.mappings(), 3);
        assert_eq!(pmap.mapping_around(3, 0..8), 3..4);
        assert_eq!(pmap.mapping_around(5, 0..8), 4..8);
        assert_eq!(pmap.mapping_around(5, 5..7), 5..7);
        // Its home page back: one again.
        assert_eq!(pmap.mappings_delta(&[(3, at(103))]), -2);
        pmap.set(3, at(103));
        assert_eq!(pmap.mappings(), 1);
        // Holes next to each other join; a hole splits a run.
        pmap.set(0, None);
        pmap.set(1, None);
        assert_eq!(pmap.mappings(), 2);
        pmap.set(5, None);
        assert_eq!(pmap.mappings(), 4);
        // Another node's page with the next index does not join.
        let other = Some(PmapEntry {
            page: MachinePage {
                node: 1,
                index: 105,
            },
            flags: PageFlags::default(),
        });
        assert_eq!(pmap.mappings_delta(&[(5, other)]), 0);
        assert_eq!(pmap.mappings_delta(&[(5, at(105))]), -2);
    }

    /// The chunked pmap against a plain vector of entries, under random
    /// sets and fills: every entry, the released count and the mapping
    /// count (recounted from scratch) agree, and a chunk is stored as one
    /// entry exactly when its frames form a run or are all holes.
    #[test]
    fn chunks_agree_with_a_plain_vector_under_random_changes() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        // Frames at chunk boundaries come often, so fills cover whole chunks.
        let gfn = prop_oneof![0u64..1300, Just(0), Just(512), Just(1024), Just(511)];
        let op = (0u8..4, gfn, 0u32..3000, 0u8..8, 1u64..700);
        let mut runner = TestRunner::new(Config::with_cases(64));
        runner
            .run(&prop::collection::vec(op, 1..120), |ops| {
                let frames = 1100; // two full chunks and a short one
                let mut pmap = Pmap::new(frames);
                let mut model: Vec<Option<PmapEntry>> = vec![None; frames as usize];
                for (kind, gfn, index, bits, n) in ops {
                    let gfn = gfn % frames;
                    let flags = PageFlags {
                        shared: bits & 1 != 0,
                        write_protected: bits & 2 != 0,
                        released: bits & 4 != 0,
                    };
                    let one = PmapEntry {
                        page: MachinePage {
                            node: (bits % 2) as u16,
                            index,
                        },
                        flags,
                    };
                    let entry = Some(one);
                    match kind {
                        0 => {
                            pmap.set(gfn, None);
                            model[gfn as usize] = None;
                        }
                        1 | 2 => {
                            pmap.set(gfn, entry);
                            model[gfn as usize] = entry;
                        }
                        _ => {
                            let n = n.min(frames - gfn);
                            let page = one.page;
                            pmap.fill(gfn, page, n, flags);
                            for k in 0..n {
                                let mut e = one;
                                e.page.index += k as u32;
                                model[(gfn + k) as usize] = Some(e);
                            }
                        }
                    }
                }
                for g in 0..frames {
                    prop_assert_eq!(pmap.get(g), model[g as usize], "frame {}", g);
                }
                let released = model.iter().flatten().filter(|e| e.flags.released).count();
                prop_assert_eq!(pmap.released(), released as u64);
                let splits = (1..frames as usize)
                    .filter(|&g| !joinable(model[g - 1], model[g]))
                    .count();
                prop_assert_eq!(pmap.mappings(), splits as u64 + 1);
                let linear = model
                    .chunks(CHUNK as usize)
                    .filter(|c| {
                        c.iter().enumerate().all(|(k, e)| match (c[0], e) {
                            (None, None) => true,
                            (Some(h), Some(e)) => {
                                e.flags == h.flags
                                    && e.page.node == h.page.node
                                    && e.page.index == h.page.index + k as u32
                            }
                            _ => false,
                        })
                    })
                    .count();
                prop_assert_eq!(pmap.linear_chunks().0, linear);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_space_filled_in_runs_costs_an_entry_per_chunk() {
        // 256 MiB mapped as one run, as a clone of a snapshot is.
        let frames = 65536;
        let mut pmap = Pmap::new(frames);
        let flags = PageFlags {
            shared: true,
            write_protected: true,
            released: false,
        };
        pmap.fill(0, MachinePage { node: 0, index: 0 }, frames, flags);
        assert_eq!(pmap.linear_chunks(), (128, 128));
        assert!(pmap.heap_bytes() <= 4096, "{} bytes", pmap.heap_bytes());
        // A copy-on-write break makes its chunk explicit; mapping the frame
        // back onto its page of the run makes it linear again.
        let copy = PmapEntry {
            page: MachinePage {
                node: 0,
                index: 70000,
            },
            flags: PageFlags::default(),
        };
        pmap.set(600, Some(copy));
        assert_eq!(pmap.linear_chunks(), (127, 128));
        assert_eq!(pmap.get(600), Some(copy));
        assert_eq!(pmap.get(601).unwrap().page.index, 601);
        assert_eq!(pmap.mappings(), 3);
        let back = PmapEntry {
            page: MachinePage {
                node: 0,
                index: 600,
            },
            flags,
        };
        pmap.set(600, Some(back));
        assert_eq!((pmap.linear_chunks(), pmap.mappings()), ((128, 128), 1));
        // Fresh memory set frame by frame (as the mapper records it) ends
        // linear too.
        let mut fresh = Pmap::new(1024);
        for g in 0..1024 {
            fresh.set(g, at(5000 + g as u32));
        }
        assert_eq!(fresh.linear_chunks(), (2, 2));
    }
}
