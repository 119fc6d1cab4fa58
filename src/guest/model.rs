//! Host reference of the micro-guests: the same computations as the guest
//! code in `super::programs`, giving the result each vCPU must return and the
//! progress value it reaches. The constants here define the algorithms; the
//! guest programs are assembled from them.
//!
//! Generated content depends only on the seed and the guest page: word `w` of
//! guest page `g` is the `w+1`-th xorshift64 step from
//! `seed ^ g * GOLDEN` (replaced by `NONZERO` when that is 0). Two VMs with
//! the same seed and layout therefore hold identical data pages, which is
//! what content-based sharing finds. A fill may give a chosen share of its
//! pages a second, private seed instead ([`page_is_shared`],
//! [`fill_seed`]): VMs with the same seed and different private seeds then
//! share exactly the other pages.

use super::layout::{VcpuParams, PAGE, WORDS_PER_PAGE};
use super::Workload;

/// Multiplier mixing the guest frame number into a page's first state.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// First state of a page whose mixed state would be 0 (xorshift needs ≠ 0).
pub const NONZERO: u64 = 0x2545_F491_4F6C_DD1D;
/// Multiplier of the LCG (Knuth's MMIX) used by sweeps and random streams.
pub const LCG_A: u64 = 6_364_136_223_846_793_005;
/// Increment of the LCG.
pub const LCG_C: u64 = 1_442_695_040_888_963_407;
/// Multiplier mixing the vCPU index into its random stream.
pub const STREAM_K: u64 = 0xD1B5_4A32_D192_ED03;
/// Rotation of the checksum fold.
pub const FOLD_ROTATE: u32 = 7;

/// One xorshift64 step (13, 7, 17).
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The state a page's fill starts from.
pub fn page_state(seed: u64, gfn: u64) -> u64 {
    match seed ^ gfn.wrapping_mul(GOLDEN) {
        0 => NONZERO,
        x => x,
    }
}

/// The content the fill writes into guest page `gfn`.
pub fn page_content(seed: u64, gfn: u64) -> [u64; 512] {
    let mut page = [0u64; 512];
    let mut x = page_state(seed, gfn);
    for word in &mut page {
        x = xorshift(x);
        *word = x;
    }
    page
}

/// Whether data page `gfn` of a fill with `shared_percent` (0 to 100) gets
/// the content of the shared seed rather than of the private one:
/// `pick(gfn * GOLDEN, 100) < shared_percent`. It depends on the frame only,
/// so every VM agrees on which pages are shared; `gfn * GOLDEN` is a Weyl
/// sequence, so any run of frames has very nearly `shared_percent` % shared
/// pages. Always true at 100, never at 0. The guest's fill routine computes
/// the same (`super::programs`).
pub fn page_is_shared(gfn: u64, shared_percent: u8) -> bool {
    pick(gfn.wrapping_mul(GOLDEN), 100) < shared_percent as u64
}

/// [`page_is_shared`] decided per block of `shared_run` frames: block
/// `gfn / shared_run` is shared or private as a whole.
pub fn page_is_shared_in_runs(gfn: u64, shared_percent: u8, shared_run: u32) -> bool {
    page_is_shared(gfn / shared_run.max(1) as u64, shared_percent)
}

/// The seed whose [`page_content`] a fill writes into data page `gfn`.
pub fn fill_seed(
    seed: u64,
    private_seed: u64,
    shared_percent: u8,
    shared_run: u32,
    gfn: u64,
) -> u64 {
    if page_is_shared_in_runs(gfn, shared_percent, shared_run) {
        seed
    } else {
        private_seed
    }
}

/// The content of data page `gfn` (a page of a vCPU's private slice) after
/// the fill of `workload`, or `None` when the workload is not a fill (sweeps
/// and random touches change the filled content; the other workloads have
/// no private data).
pub fn expected_page(workload: &Workload, gfn: u64) -> Option<[u64; 512]> {
    match *workload {
        Workload::Fill {
            seed,
            private_seed,
            shared_percent,
            shared_run,
        } => Some(page_content(
            fill_seed(seed, private_seed, shared_percent, shared_run, gfn),
            gfn,
        )),
        _ => None,
    }
}

/// The content the fill of `p`'s private slice writes into its page `gfn`.
fn slice_page(p: &VcpuParams, gfn: u64) -> [u64; 512] {
    page_content(
        fill_seed(p.seed, p.private_seed, p.shared_percent, p.shared_run, gfn),
        gfn,
    )
}

/// The checksum step: every value the guest writes or reads is folded in.
pub fn fold(acc: u64, value: u64) -> u64 {
    acc.rotate_left(FOLD_ROTATE) ^ value
}

/// One LCG step.
pub fn lcg(s: u64) -> u64 {
    s.wrapping_mul(LCG_A).wrapping_add(LCG_C)
}

/// The first state of vCPU `index`'s random stream.
pub fn stream_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(STREAM_K)
}

/// The word index in `0..words` a stream state picks (`words` < 2^32).
pub fn pick(s: u64, words: u64) -> u64 {
    ((s >> 32) * words) >> 32
}

/// The result each vCPU returns with the DONE hypercall, or `None` for the
/// test workloads, which never complete.
pub fn expected_results(workload: &Workload, params: &[VcpuParams]) -> Vec<Option<u64>> {
    match *workload {
        Workload::Fill { .. } => params.iter().map(|p| Some(fill_checksum(p))).collect(),
        Workload::Sweep { passes, .. } => params
            .iter()
            .map(|p| Some(sweep_checksum(p, passes)))
            .collect(),
        Workload::Random { touches, .. } => params
            .iter()
            .map(|p| Some(random_checksum(p, touches)))
            .collect(),
        Workload::TableScan {
            lookups,
            write_after,
            ..
        } => {
            let Some(first) = params.first() else {
                return Vec::new();
            };
            let table = fill_words(
                first.seed,
                first.shared_base,
                first.shared_words / WORDS_PER_PAGE,
            );
            // After the write (between lookup `write_after` and the next),
            // every word has GOLDEN added (not a complement: the fold of an
            // even number of complemented words would hide the write).
            let before = if write_after == 0 {
                lookups
            } else {
                write_after
            };
            params
                .iter()
                .map(|p| {
                    let mut s = stream_seed(p.seed, p.index);
                    let mut acc = 0;
                    for i in 0..lookups {
                        s = lcg(s);
                        let word = table[pick(s, table.len() as u64) as usize];
                        acc = fold(
                            acc,
                            if i < before {
                                word
                            } else {
                                word.wrapping_add(GOLDEN)
                            },
                        );
                    }
                    Some(acc)
                })
                .collect()
        }
        Workload::Counters {
            counters,
            increments,
        } => {
            let sum = counters_checksum(counters as u64, increments, params.len());
            vec![Some(sum); params.len()]
        }
        Workload::Crash | Workload::Spin | Workload::BadIo => vec![None; params.len()],
    }
}

/// The progress value vCPU `params` stores when it is done: pages filled or
/// swept, plus touches, lookups or increments.
pub fn progress_total(workload: &Workload, params: &VcpuParams) -> u64 {
    let pages = params.pages();
    match *workload {
        Workload::Fill { .. } => pages,
        Workload::Sweep { passes, .. } => pages * (1 + passes as u64),
        Workload::Random { touches, .. } => pages + touches,
        Workload::TableScan {
            table_pages,
            lookups,
            ..
        } => {
            lookups
                + if params.index == 0 {
                    table_pages as u64
                } else {
                    0
                }
        }
        Workload::Counters { increments, .. } => increments,
        Workload::Crash | Workload::Spin | Workload::BadIo => 0,
    }
}

/// The words the fill writes into `pages` pages from guest-physical `base`.
fn fill_words(seed: u64, base: u64, pages: u64) -> Vec<u64> {
    let first = base / PAGE;
    (first..first + pages)
        .flat_map(|gfn| page_content(seed, gfn))
        .collect()
}

/// Folds the fill of the private slice into a checksum, without storing it.
fn fill_checksum(p: &VcpuParams) -> u64 {
    let first = p.base / PAGE;
    (first..first + p.pages())
        .flat_map(|gfn| slice_page(p, gfn))
        .fold(0, fold)
}

/// Fill, then `passes` sweeps replacing each word `v` by `lcg(v)`. After `k`
/// sweeps a word is `lcg^k(fill)`, an affine map, so no copy of the slice is
/// needed.
fn sweep_checksum(p: &VcpuParams, passes: u32) -> u64 {
    let first = p.base / PAGE;
    let mut acc = fill_checksum(p);
    let (mut a, mut c) = (1u64, 0u64);
    for _ in 0..passes {
        a = a.wrapping_mul(LCG_A);
        c = c.wrapping_mul(LCG_A).wrapping_add(LCG_C);
        for gfn in first..first + p.pages() {
            for v in slice_page(p, gfn) {
                acc = fold(acc, v.wrapping_mul(a).wrapping_add(c));
            }
        }
    }
    acc
}

/// Fill, then `touches` read-modify-writes `v = v.rotate_left(1) ^ s` of the
/// words the vCPU's stream picks. Only touched words are kept.
fn random_checksum(p: &VcpuParams, touches: u64) -> u64 {
    let mut acc = fill_checksum(p);
    // The slice's pages, generated on first touch (most runs touch every
    // page many times; a hash map of words was 20x slower).
    let pages = p.words.div_ceil(WORDS_PER_PAGE) as usize;
    let mut slice: Vec<Option<Box<[u64; WORDS_PER_PAGE as usize]>>> = vec![None; pages];
    let mut s = stream_seed(p.seed, p.index);
    for _ in 0..touches {
        s = lcg(s);
        let i = pick(s, p.words);
        let page = (i / WORDS_PER_PAGE) as usize;
        let words =
            slice[page].get_or_insert_with(|| Box::new(slice_page(p, p.base / PAGE + page as u64)));
        let word = &mut words[(i % WORDS_PER_PAGE) as usize];
        *word = word.rotate_left(1) ^ s;
        acc = fold(acc, *word);
    }
    acc
}

/// vCPU `i` increments counters `(i + k) % counters` for `k < increments`;
/// the result folds the final counter values in order.
fn counters_checksum(counters: u64, increments: u64, nvcpus: usize) -> u64 {
    let mut values = vec![nvcpus as u64 * (increments / counters); counters as usize];
    let rest = increments % counters;
    for i in 0..nvcpus as u64 {
        for k in 0..rest {
            values[((i + k) % counters) as usize] += 1;
        }
    }
    values.into_iter().fold(0, fold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::plan;

    #[test]
    fn page_content_depends_on_seed_and_gfn_only() {
        assert_eq!(page_content(7, 300), page_content(7, 300));
        assert_ne!(page_content(7, 300), page_content(7, 301));
        assert_ne!(page_content(7, 300), page_content(8, 300));
        assert!(page_content(0, 0).iter().all(|&w| w != 0));
    }

    #[test]
    fn counters_sum_to_all_increments() {
        // With one counter the checksum is the counter: all increments.
        assert_eq!(counters_checksum(1, 10, 3), 30);
        let w = Workload::Counters {
            counters: 5,
            increments: 7,
        };
        let p = plan(&w, 4 << 20, 3).unwrap();
        let r = expected_results(&w, &p);
        assert!(r.iter().all(|x| *x == r[0] && x.is_some()));
    }

    fn fill(seed: u64, private_seed: u64, shared_percent: u8) -> Workload {
        Workload::Fill {
            seed,
            private_seed,
            shared_percent,
            shared_run: 1,
        }
    }

    #[test]
    fn sweep_without_passes_is_fill() {
        let p = plan(&fill(3, 3, 100), 2 << 20, 2).unwrap();
        assert_eq!(sweep_checksum(&p[1], 0), fill_checksum(&p[1]));
        assert_eq!(random_checksum(&p[1], 0), fill_checksum(&p[1]));
    }

    #[test]
    fn shared_pages_are_chosen_by_frame_in_the_given_proportion() {
        for gfn in 0..1000 {
            assert!(page_is_shared(gfn, 100));
            assert!(!page_is_shared(gfn, 0));
            // Monotonic in the percentage: a page shared at p is shared above.
            assert!(!page_is_shared(gfn, 30) || page_is_shared(gfn, 31));
        }
        for percent in [1, 10, 25, 50, 75, 99] {
            let shared = (256..256 + 10_000)
                .filter(|&g| page_is_shared(g, percent))
                .count();
            let want = 100 * percent as usize;
            assert!(shared.abs_diff(want) <= 20, "{percent} %: {shared}/10000");
        }
    }

    #[test]
    fn fill_at_100_percent_ignores_the_private_seed_and_at_0_uses_only_it() {
        // Checksums alone cannot tell seeds apart (the content is GF(2)-linear
        // in the seed, the fold is too, and its rotation over a page is a
        // multiple of 64, so an even number of pages from one seed cancels
        // out): compare the pages.
        let slice = |w: &Workload| {
            let p = plan(w, 4 << 20, 2).unwrap();
            let first = p[1].base / PAGE;
            (first..first + p[1].pages())
                .map(|g| {
                    let page = slice_page(&p[1], g);
                    assert_eq!(Some(page), expected_page(w, g));
                    page
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(slice(&fill(5, 9, 100)), slice(&fill(5, 5, 100)));
        assert_eq!(slice(&fill(5, 9, 0)), slice(&fill(9, 9, 100)));
        assert_eq!(slice(&fill(5, 5, 40)), slice(&fill(5, 5, 100)));
        let (split, seed, private) = (
            slice(&fill(5, 9, 50)),
            slice(&fill(5, 5, 100)),
            slice(&fill(9, 9, 100)),
        );
        let first = plan(&fill(5, 9, 50), 4 << 20, 2).unwrap()[1].base / PAGE;
        for (k, page) in split.iter().enumerate() {
            let gfn = first + k as u64;
            let want = if page_is_shared(gfn, 50) {
                &seed
            } else {
                &private
            };
            assert_eq!(page, &want[k], "page {gfn:#x}");
        }
        assert_eq!(
            expected_page(&Workload::Sweep { seed: 5, passes: 1 }, 300),
            None
        );
    }
}
