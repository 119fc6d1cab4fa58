//! The NUMA policy engine: Disco's page placement rules as pure logic.
//!
//! Per epoch the monitor feeds access samples to [`PolicyEngine::observe`]
//! and, at the end of the epoch, calls [`PolicyEngine::decide`] with a
//! [`PageFacts`] that says where each page lives; the engine answers with
//! [`Decision`]s for the mapper to carry out. No I/O, no clocks, no
//! randomness: the same samples and facts give the same decisions.
//!
//! ## Counts
//! Each tracked page keeps, per node, a read count and a write count. A
//! sample adds 1; at the end of every epoch, after deciding, every count is
//! multiplied by `decay` (and counts below [`FORGET_BELOW`] become 0), so a
//! count is an exponentially weighted number of samples: a node that
//! samples a page `s` times per epoch settles at `s / (1 - decay)`.
//!
//! ## Rules (Disco, SOSP 1997, section 4.2, on per-page per-node counts)
//! Let `T` be the page's total count (all nodes, reads and writes) and
//! `use(n)` node `n`'s count. A node *uses* the page when
//! `use(n) >= reader_threshold`, and *writes* it when its write count
//! reaches `writer_threshold` (a threshold, not "any write ever": decayed
//! counts never quite reach zero, so without it a page written once from
//! two nodes would stay write-shared for good, and a page that ping-pongs
//! by writes would look write-shared after its first move and never be
//! frozen, just stuck).
//! 1. **Frozen** pages get no decision until their freeze ends.
//! 2. **Replicated** pages (several copies): when the page is written, the
//!    replicas collapse to one copy (`Collapse`, keeping the copy its
//!    heaviest user has); otherwise the copy on a node that has not sampled
//!    the page for `replica_idle_epochs` (and does not use it) is dropped
//!    (`Collapse` keeping the others; at least the best one); a replication
//!    counts as a sample by every node, so every copy starts with that much
//!    grace. Counts cannot
//!    say sooner that a node stopped reading: page samples are sparse (a
//!    VM samples a few dozen pages per round), so a reader's count dips
//!    below `reader_threshold` now and then while it still reads, and a
//!    replica dropped on such a dip is made again, then frozen (measured,
//!    docs/host-facts.md "NUMA":
//!    a 4-VM shared-table run froze 87 of 128 pages that way). If every
//!    copy is kept and the page is hot, nodes that now use it get a
//!    replica too (`Replicate`).
//! 3. A page is **hot** when `T >= hot_threshold`; cold pages stay put.
//! 4. **Write-shared** pages (two or more nodes write them) are left
//!    alone.
//! 5. **Migrate**: when one node `d` accounts for at least `dominant_share`
//!    of `T`, the page belongs on `d`. If it is elsewhere and `migrate` is
//!    on: `Migrate` to `d`. If it is on `d` already: nothing.
//! 6. **Replicate**: otherwise (or with `migrate` off) a page that is shared
//!    across VMs, written by no node, and used by at
//!    least `replicate_min_nodes` nodes gets a replica on every node that
//!    uses it (`Replicate`), when `replicate` is on. Only pages shared across
//!    VMs are replicated: KVM gives all vCPUs of a VM one address space, so a
//!    VM maps one copy of each page, and a replica only helps when different
//!    VMs on different nodes map the same page (each maps its node's copy).
//! 7. **Ping-pong**: every `Migrate`, `Replicate` and `Collapse` is a move. A
//!    page that has already moved `freeze_after_moves` times within the last
//!    `freeze_window_epochs` epochs is frozen instead of moved again
//!    (`Freeze` for `freeze_epochs` epochs, after which its move history
//!    starts afresh). `freeze_after_moves = 0` disables freezing.
//! 8. **Copy budget**: `Migrate` copies one page, `Replicate` one page per
//!    new replica; at most `copy_budget_pages` pages are copied per epoch.
//!    Candidates are served hottest first (ties: lowest `(vm, gfn)`); a
//!    replication that does not fit entirely gets its most-used nodes first;
//!    the rest waits for a later epoch (counts as `deferred`). `Collapse` and
//!    `Freeze` copy nothing and are not limited.
//!
//! 9. **Memory follows its VM**: page samples are sparse next to the
//!    pages of a guest of real size (a few dozen a second under the cost
//!    cap, against 65,536 pages in 256 MiB), so where a guest touches its
//!    memory evenly no page of it ever gets hot, and a VM whose memory sits
//!    on another node than its vCPUs would stay remote for good (measured:
//!    eight 256 MiB `random` guests on the `2-socket` fixture stayed 0 %
//!    local over 9 s under the rules above). So the engine also adds up,
//!    per VM, the counts of its private single-copy pages (not frozen, not
//!    write-shared) by accessing node and by the node the page is on. When
//!    the VM as a whole is hot (`hot_threshold`), one node `d` accounts for
//!    at least `dominant_share` of its uses, and at least
//!    [`FOLLOW_REMOTE_SHARE`] of `d`'s uses found the page on some other
//!    node, the VM's private memory on the most used such node belongs on
//!    `d` ([`Follow`], with `migrate` on). The mapper moves it in runs with
//!    what is left of the copy budget after the page decisions, so what a
//!    few samples say of the whole VM is acted on without every page having
//!    to be sampled; a VM whose vCPUs span nodes has no such `d` and is
//!    left to the page rules. `follow_vm = false` turns the rule off
//!    (Disco's rules alone).
//!
//! With both `migrate` and `replicate` off (policies/static.toml) no rule
//! produces a decision; the engine still counts, so reports can show hot
//! pages.
//!
//! ## Pages shared across VMs
//! Counts are kept per `(vm, gfn)`, but several VMs can map one machine page
//! (content sharing) or replicas of it. When [`PageLocation::group`] names
//! the shared content, the engine adds up the counts of every `(vm, gfn)` of
//! the group and decides once for it, naming the group's lowest `(vm, gfn)`
//! that it tracks: applying the decision changes the machine page (or replica
//! set) for every VM that maps it. Without this a page shared by a VM on
//! node 0 and one on node 2 would look private to each, and they would pull
//! it back and forth.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use super::counters::AccessSample;
use crate::config::NumaPolicy;

/// A decayed count below this becomes 0 (so a page's counts reach exactly
/// zero some epochs after its last sample, and a write is forgotten after
/// `log(FORGET_BELOW) / log(decay)` epochs: 5 at `decay = 0.5`).
pub const FORGET_BELOW: f64 = 0.05;

/// `(vm, gfn)`.
pub type PageKey = (u32, u64);

/// The share of a VM's uses from its dominant node that must find pages
/// elsewhere for its memory to follow it (rule 9): the runner's "settled"
/// test allows a tenth of a VM's sampled pages to be remote, so a VM
/// whose memory follows it stops where sampling backs off.
pub const FOLLOW_REMOTE_SHARE: f64 = 0.1;

/// Rule 9's verdict for one VM: its private memory on node `from` belongs
/// on node `to`, the node that uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Follow {
    pub vm: u32,
    pub from: usize,
    pub to: usize,
}

/// Where a page lives now, as the caller's pmap says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PageLocation {
    /// Node of the machine page this `(vm, gfn)` maps.
    pub node: usize,
    /// The machine page is mapped by more than one VM (content sharing).
    pub shared_across_vms: bool,
    /// Nodes holding a copy of the page when it is replicated (`node`
    /// included); empty (or just `node`) for a page with one copy.
    pub replicas: Vec<usize>,
    /// Identity of the shared content: every `(vm, gfn)` that maps this
    /// machine page or one of its replicas answers the same value, so the
    /// engine can add up their counts. `None` for a private page (or when the
    /// caller does not group; each `(vm, gfn)` is then judged alone).
    pub group: Option<u64>,
}

impl PageLocation {
    /// A private page with one copy on `node`.
    pub fn private(node: usize) -> PageLocation {
        PageLocation {
            node,
            shared_across_vms: false,
            replicas: Vec::new(),
            group: None,
        }
    }

    /// A page shared across VMs, one copy on `node`, not grouped.
    pub fn shared(node: usize) -> PageLocation {
        PageLocation {
            shared_across_vms: true,
            ..PageLocation::private(node)
        }
    }
}

/// What the engine needs to know about pages at the end of an epoch; the
/// monitor answers from the pmap and memmap.
pub trait PageFacts {
    /// Where `(vm, gfn)` lives, or `None` when it is not mapped (the engine
    /// then forgets the page).
    fn location(&self, vm: u32, gfn: u64) -> Option<PageLocation>;
}

impl PageFacts for BTreeMap<PageKey, PageLocation> {
    fn location(&self, vm: u32, gfn: u64) -> Option<PageLocation> {
        self.get(&(vm, gfn)).cloned()
    }
}

/// What the engine asks the mapper to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    /// Copy the page to node `to`, remap, free the old copy.
    Migrate { vm: u32, gfn: u64, to: usize },
    /// Give the page a replica on each of `nodes` (ascending; none of them
    /// holds a copy yet).
    Replicate {
        vm: u32,
        gfn: u64,
        nodes: Vec<usize>,
    },
    /// Keep only the copies on `keep` (ascending, non-empty, a strict subset
    /// of the current copies); free the others.
    Collapse { vm: u32, gfn: u64, keep: Vec<usize> },
    /// The page ping-pongs: the engine leaves it alone for `epochs` epochs.
    Freeze { vm: u32, gfn: u64, epochs: u64 },
}

impl Decision {
    pub fn page(&self) -> PageKey {
        match *self {
            Decision::Migrate { vm, gfn, .. }
            | Decision::Replicate { vm, gfn, .. }
            | Decision::Collapse { vm, gfn, .. }
            | Decision::Freeze { vm, gfn, .. } => (vm, gfn),
        }
    }

    /// Pages this decision copies (what the copy budget counts).
    pub fn copies(&self) -> usize {
        match self {
            Decision::Migrate { .. } => 1,
            Decision::Replicate { nodes, .. } => nodes.len(),
            Decision::Collapse { .. } | Decision::Freeze { .. } => 0,
        }
    }
}

/// Figures of one epoch (or, in [`PolicyEngine::totals`], of all epochs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EpochStats {
    /// Epochs decided (1 for one epoch's figures).
    pub epochs: u64,
    pub samples: u64,
    /// Samples naming a node outside the topology (dropped).
    pub ignored_samples: u64,
    /// Pages (groups of shared pages count once) with counts at decision time.
    pub tracked_pages: u64,
    pub hot_pages: u64,
    /// Pages left alone because they are frozen.
    pub frozen_pages: u64,
    pub migrations: u64,
    pub replications: u64,
    /// New replicas made by `replications`.
    pub replicas_made: u64,
    pub collapses: u64,
    pub freezes: u64,
    /// Pages copied (migrations + new replicas), at most the copy budget.
    pub pages_copied: u64,
    /// Moves left for a later epoch because the copy budget was spent.
    pub deferred: u64,
}

impl EpochStats {
    fn add(&mut self, o: &EpochStats) {
        self.epochs += o.epochs;
        self.samples += o.samples;
        self.ignored_samples += o.ignored_samples;
        self.tracked_pages += o.tracked_pages;
        self.hot_pages += o.hot_pages;
        self.frozen_pages += o.frozen_pages;
        self.migrations += o.migrations;
        self.replications += o.replications;
        self.replicas_made += o.replicas_made;
        self.collapses += o.collapses;
        self.freezes += o.freezes;
        self.pages_copied += o.pages_copied;
        self.deferred += o.deferred;
    }
}

/// Decayed counts of one page, per node.
#[derive(Clone, Debug, PartialEq)]
pub struct PageCounts {
    pub reads: Vec<f64>,
    pub writes: Vec<f64>,
}

#[derive(Clone, Debug)]
struct PageState {
    counts: PageCounts,
    /// Epochs in which the page moved, oldest first, within the window.
    moves: VecDeque<u64>,
    /// Frozen while `epoch < frozen_until`.
    frozen_until: u64,
    /// Last seen with several copies (kept tracked until collapsed).
    replicated: bool,
    /// Per node, the epoch of its latest sample of the page.
    last_seen_by: Vec<Option<u64>>,
}

impl PageState {
    fn new(nodes: usize) -> PageState {
        PageState {
            counts: PageCounts {
                reads: vec![0.0; nodes],
                writes: vec![0.0; nodes],
            },
            moves: VecDeque::new(),
            frozen_until: 0,
            replicated: false,
            last_seen_by: vec![None; nodes],
        }
    }
}

/// One page, or one group of `(vm, gfn)`s sharing content, as judged.
#[derive(Clone, Debug)]
struct View {
    /// Count per node: reads + writes.
    uses: Vec<f64>,
    writers: usize,
    written: bool,
    total: f64,
    /// Nodes holding a copy, ascending.
    copies: Vec<usize>,
    home: usize,
    shared: bool,
    /// Per node, epochs since it last sampled any member (`u64::MAX`:
    /// never).
    node_idle: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq)]
enum Action {
    Migrate(usize),
    /// New replica nodes, most used first.
    Replicate(Vec<usize>),
    Collapse(Vec<usize>),
}

/// Disco's placement rules over decayed per-page per-node counts.
pub struct PolicyEngine {
    params: NumaPolicy,
    nodes: usize,
    epoch: u64,
    pages: BTreeMap<PageKey, PageState>,
    current: EpochStats,
    last: EpochStats,
    totals: EpochStats,
    /// Rule 9's verdicts of the last decided epoch.
    follow: Vec<Follow>,
}

impl PolicyEngine {
    /// An engine for a topology of `nodes` NUMA nodes (at least 1).
    pub fn new(params: NumaPolicy, nodes: usize) -> PolicyEngine {
        assert!(nodes >= 1, "a topology has at least one node");
        PolicyEngine {
            params,
            nodes,
            epoch: 0,
            pages: BTreeMap::new(),
            current: EpochStats::default(),
            last: EpochStats::default(),
            totals: EpochStats::default(),
            follow: Vec::new(),
        }
    }

    pub fn params(&self) -> &NumaPolicy {
        &self.params
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The epoch being observed (0 before the first `decide`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Pages with state (counts, move history, a freeze or replicas).
    pub fn tracked(&self) -> usize {
        self.pages.len()
    }

    /// Current decayed counts of `(vm, gfn)`.
    pub fn counts(&self, vm: u32, gfn: u64) -> Option<&PageCounts> {
        self.pages.get(&(vm, gfn)).map(|s| &s.counts)
    }

    /// Whether `(vm, gfn)` is frozen in the current epoch.
    pub fn is_frozen(&self, vm: u32, gfn: u64) -> bool {
        self.pages
            .get(&(vm, gfn))
            .is_some_and(|s| self.epoch < s.frozen_until)
    }

    /// Whether the engine leaves `(vm, gfn)` where it is, whichever node
    /// uses it: frozen, or written from two nodes (write-shared) by its own
    /// counts.
    pub fn leaves_alone(&self, vm: u32, gfn: u64) -> bool {
        self.is_frozen(vm, gfn)
            || self
                .counts(vm, gfn)
                .is_some_and(|c| self.writers(&c.writes) >= 2)
    }

    /// Nodes whose write count (one per node) reaches `writer_threshold`.
    fn writers(&self, writes: &[f64]) -> usize {
        writes
            .iter()
            .filter(|&&w| w >= self.params.writer_threshold)
            .count()
    }

    /// VMs whose private memory should follow them to another node, as
    /// the last decided epoch found (rule 9): the mapper moves what the
    /// copy budget has left after the decisions.
    pub fn follow(&self) -> &[Follow] {
        &self.follow
    }

    /// Figures of the last decided epoch.
    pub fn last_epoch(&self) -> &EpochStats {
        &self.last
    }

    /// Figures summed over every decided epoch.
    pub fn totals(&self) -> &EpochStats {
        &self.totals
    }

    /// Adds samples of the current epoch. Samples naming a node outside the
    /// topology are counted in `ignored_samples` and dropped.
    pub fn observe(&mut self, samples: &[AccessSample]) {
        for s in samples {
            if s.node >= self.nodes {
                self.current.ignored_samples += 1;
                continue;
            }
            self.current.samples += 1;
            let nodes = self.nodes;
            let st = self
                .pages
                .entry((s.vm, s.gfn))
                .or_insert_with(|| PageState::new(nodes));
            st.last_seen_by[s.node] = Some(self.epoch);
            if s.write {
                st.counts.writes[s.node] += 1.0;
            } else {
                st.counts.reads[s.node] += 1.0;
            }
        }
    }

    /// Ends the epoch: applies the rules (module docs) to every tracked page,
    /// then decays the counts and moves on to the next epoch. Decisions come
    /// hottest page first.
    pub fn decide(&mut self, facts: &dyn PageFacts) -> Vec<Decision> {
        let epoch = self.epoch;
        let mut stats = std::mem::take(&mut self.current);
        stats.epochs = 1;

        // Where every tracked page lives; pages no longer mapped are dropped.
        let mut gone = Vec::new();
        let mut groups: BTreeMap<GroupKey, Vec<(PageKey, PageLocation)>> = BTreeMap::new();
        for (&key, st) in self.pages.iter_mut() {
            match facts.location(key.0, key.1) {
                Some(loc) if loc.node < self.nodes => {
                    st.replicated = copies_of(&loc, self.nodes).len() > 1;
                    let g = match loc.group {
                        Some(id) => GroupKey::Shared(id),
                        None => GroupKey::Page(key),
                    };
                    groups.entry(g).or_default().push((key, loc));
                }
                _ => gone.push(key),
            }
        }
        for key in gone {
            self.pages.remove(&key);
        }

        struct Candidate {
            heat: f64,
            rep: PageKey,
            members: Vec<PageKey>,
            action: Action,
        }
        let mut decisions = Vec::new();
        let mut candidates = Vec::new();
        let window = self.params.freeze_window_epochs;
        // Rule 9: per VM, uses of its private pages by [accessing node][page node].
        let mut vm_uses: BTreeMap<u32, Vec<Vec<f64>>> = BTreeMap::new();
        for members in groups.into_values() {
            let rep = members[0].0;
            let view = self.view(&members);
            stats.tracked_pages += 1;
            if view.total >= self.params.hot_threshold {
                stats.hot_pages += 1;
            }
            let states: Vec<&PageState> = members.iter().map(|(k, _)| &self.pages[k]).collect();
            if states.iter().any(|s| epoch < s.frozen_until) {
                stats.frozen_pages += 1;
                continue;
            }
            if !view.shared && view.copies.len() <= 1 && view.writers < 2 {
                let n = self.nodes;
                let m = vm_uses
                    .entry(rep.0)
                    .or_insert_with(|| vec![vec![0.0; n]; n]);
                for (a, row) in m.iter_mut().enumerate() {
                    row[view.home] += view.uses[a];
                }
            }
            let Some(action) = self.evaluate(&view) else {
                continue;
            };
            let recent = states
                .iter()
                .map(|s| s.moves.iter().filter(|&&e| e + window > epoch).count())
                .max()
                .unwrap_or(0) as u64;
            let keys: Vec<PageKey> = members.iter().map(|(k, _)| *k).collect();
            if self.params.freeze_after_moves > 0 && recent >= self.params.freeze_after_moves {
                let until = epoch + 1 + self.params.freeze_epochs;
                for k in &keys {
                    let st = self.pages.get_mut(k).expect("tracked");
                    st.frozen_until = until;
                    st.moves.clear();
                }
                stats.freezes += 1;
                decisions.push((
                    view.total,
                    rep,
                    Decision::Freeze {
                        vm: rep.0,
                        gfn: rep.1,
                        epochs: self.params.freeze_epochs,
                    },
                ));
                continue;
            }
            candidates.push(Candidate {
                heat: view.total,
                rep,
                members: keys,
                action,
            });
        }

        // Hottest first, within the copy budget.
        candidates.sort_by(|a, b| b.heat.total_cmp(&a.heat).then(a.rep.cmp(&b.rep)));
        let mut budget = self.params.copy_budget_pages;
        for c in candidates {
            let (vm, gfn) = c.rep;
            let decision = match c.action {
                Action::Collapse(keep) => {
                    stats.collapses += 1;
                    Decision::Collapse { vm, gfn, keep }
                }
                Action::Migrate(to) => {
                    if budget == 0 {
                        stats.deferred += 1;
                        continue;
                    }
                    budget -= 1;
                    stats.migrations += 1;
                    Decision::Migrate { vm, gfn, to }
                }
                Action::Replicate(mut nodes) => {
                    let fit = nodes.len().min(budget.min(usize::MAX as u64) as usize);
                    if fit < nodes.len() {
                        stats.deferred += 1;
                    }
                    if fit == 0 {
                        continue;
                    }
                    nodes.truncate(fit);
                    nodes.sort_unstable();
                    budget -= fit as u64;
                    stats.replications += 1;
                    stats.replicas_made += fit as u64;
                    Decision::Replicate { vm, gfn, nodes }
                }
            };
            stats.pages_copied += decision.copies() as u64;
            let replicated_after = match &decision {
                Decision::Replicate { .. } => Some(true),
                Decision::Collapse { keep, .. } => Some(keep.len() > 1),
                _ => None,
            };
            let fresh_replicas = matches!(decision, Decision::Replicate { .. });
            for k in &c.members {
                let st = self.pages.get_mut(k).expect("tracked");
                st.moves.push_back(epoch);
                if let Some(r) = replicated_after {
                    st.replicated = r;
                }
                if fresh_replicas {
                    // Every copy gets `replica_idle_epochs` of grace: the
                    // node of the original copy, read locally, may not have
                    // sampled the page yet (samples are sparse), and must
                    // not lose its copy for that at once.
                    for seen in st.last_seen_by.iter_mut() {
                        *seen = Some(epoch);
                    }
                }
            }
            decisions.push((c.heat, c.rep, decision));
        }
        decisions.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));

        self.follow = if self.params.migrate && self.params.follow_vm {
            vm_uses
                .into_iter()
                .filter_map(|(vm, m)| self.follows(vm, &m))
                .collect()
        } else {
            Vec::new()
        };

        // Decay, forget, next epoch.
        let decay = self.params.decay;
        let next = epoch + 1;
        self.pages.retain(|_, st| {
            let mut any = false;
            for c in st
                .counts
                .reads
                .iter_mut()
                .chain(st.counts.writes.iter_mut())
            {
                *c *= decay;
                if *c < FORGET_BELOW {
                    *c = 0.0;
                } else {
                    any = true;
                }
            }
            while st.moves.front().is_some_and(|&e| e + window <= next) {
                st.moves.pop_front();
            }
            any || !st.moves.is_empty() || st.frozen_until > next || st.replicated
        });
        self.epoch = next;
        self.totals.add(&stats);
        self.last = stats;
        decisions.into_iter().map(|(_, _, d)| d).collect()
    }

    /// Rule 9 for one VM, from the uses of its private pages by
    /// `[accessing node][page node]`.
    fn follows(&self, vm: u32, m: &[Vec<f64>]) -> Option<Follow> {
        let by_node: Vec<f64> = m.iter().map(|row| row.iter().sum()).collect();
        let total: f64 = by_node.iter().sum();
        if total < self.params.hot_threshold {
            return None;
        }
        let to =
            (0..self.nodes).max_by(|&a, &b| by_node[a].total_cmp(&by_node[b]).then(b.cmp(&a)))?;
        if by_node[to] < self.params.dominant_share * total {
            return None;
        }
        let from = (0..self.nodes)
            .filter(|&h| h != to)
            .max_by(|&a, &b| m[to][a].total_cmp(&m[to][b]).then(b.cmp(&a)))?;
        let remote: f64 = (0..self.nodes).filter(|&h| h != to).map(|h| m[to][h]).sum();
        (m[to][from] > 0.0 && remote >= FOLLOW_REMOTE_SHARE * by_node[to]).then_some(Follow {
            vm,
            from,
            to,
        })
    }

    /// Adds up the counts of a group's members.
    fn view(&self, members: &[(PageKey, PageLocation)]) -> View {
        let n = self.nodes;
        let mut reads = vec![0.0; n];
        let mut writes = vec![0.0; n];
        let mut copies = BTreeSet::new();
        let mut shared = members.len() > 1;
        let mut last_seen_by: Vec<Option<u64>> = vec![None; n];
        for (key, loc) in members {
            for (mine, theirs) in last_seen_by.iter_mut().zip(&self.pages[key].last_seen_by) {
                *mine = (*mine).max(*theirs);
            }
            let c = &self.pages[key].counts;
            for i in 0..n {
                reads[i] += c.reads[i];
                writes[i] += c.writes[i];
            }
            copies.extend(copies_of(loc, n));
            shared |= loc.shared_across_vms;
        }
        let uses: Vec<f64> = (0..n).map(|i| reads[i] + writes[i]).collect();
        let writers = self.writers(&writes);
        View {
            total: uses.iter().sum(),
            writers,
            written: writers > 0,
            uses,
            copies: copies.into_iter().collect(),
            home: members[0].1.node,
            shared,
            node_idle: last_seen_by
                .iter()
                .map(|e| e.map_or(u64::MAX, |e| self.epoch.saturating_sub(e)))
                .collect(),
        }
    }

    /// The rules of the module docs, for one page or group.
    fn evaluate(&self, v: &View) -> Option<Action> {
        let p = &self.params;
        let users: Vec<usize> = (0..self.nodes)
            .filter(|&n| v.uses[n] >= p.reader_threshold)
            .collect();
        let hot = v.total >= p.hot_threshold;
        // Nodes that use the page but hold no copy, most used first.
        let new_replicas = |have: &[usize]| -> Vec<usize> {
            let mut new: Vec<usize> = users
                .iter()
                .copied()
                .filter(|n| !have.contains(n))
                .collect();
            new.sort_by(|&a, &b| v.uses[b].total_cmp(&v.uses[a]).then(a.cmp(&b)));
            new
        };

        if v.copies.len() > 1 {
            if !p.replicate {
                return None;
            }
            // The copy to keep when only one stays: its heaviest user's,
            // preferring the home copy on ties, then the lowest node.
            let best = *v
                .copies
                .iter()
                .max_by(|&&a, &&b| {
                    v.uses[a]
                        .total_cmp(&v.uses[b])
                        .then((a == v.home).cmp(&(b == v.home)))
                        .then(b.cmp(&a))
                })
                .expect("several copies");
            let keep: Vec<usize> = if v.written {
                vec![best]
            } else {
                let kept: Vec<usize> = v
                    .copies
                    .iter()
                    .copied()
                    .filter(|&c| users.contains(&c) || v.node_idle[c] < p.replica_idle_epochs)
                    .collect();
                if kept.is_empty() {
                    vec![best]
                } else {
                    kept
                }
            };
            if keep != v.copies {
                return Some(Action::Collapse(keep));
            }
            if hot && v.shared && users.len() as u64 >= p.replicate_min_nodes {
                let new = new_replicas(&v.copies);
                if !new.is_empty() {
                    return Some(Action::Replicate(new));
                }
            }
            return None;
        }

        if !hot || v.writers >= 2 {
            return None;
        }
        let dominant = (0..self.nodes)
            .max_by(|&a, &b| v.uses[a].total_cmp(&v.uses[b]).then(b.cmp(&a)))
            .expect("at least one node");
        if v.uses[dominant] >= p.dominant_share * v.total {
            if dominant == v.home {
                return None;
            }
            if p.migrate {
                return Some(Action::Migrate(dominant));
            }
        }
        if p.replicate && v.shared && !v.written && users.len() as u64 >= p.replicate_min_nodes {
            let new = new_replicas(&[v.home]);
            if !new.is_empty() {
                return Some(Action::Replicate(new));
            }
        }
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum GroupKey {
    Shared(u64),
    Page(PageKey),
}

/// Nodes holding a copy: `node` and `replicas`, within the topology.
fn copies_of(loc: &PageLocation, nodes: usize) -> BTreeSet<usize> {
    std::iter::once(loc.node)
        .chain(loc.replicas.iter().copied())
        .filter(|&n| n < nodes)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::counters::Sampling;
    use proptest::prelude::*;

    fn params() -> NumaPolicy {
        NumaPolicy {
            migrate: true,
            replicate: true,
            epoch_ms: 100,
            hot_threshold: 8.0,
            dominant_share: 0.75,
            reader_threshold: 2.0,
            writer_threshold: 0.25,
            replicate_min_nodes: 2,
            decay: 0.5,
            copy_budget_pages: 1000,
            freeze_after_moves: 3,
            freeze_window_epochs: 20,
            freeze_epochs: 10,
            sampling: Sampling::Auto,
            trace_file: None,
            replica_idle_epochs: 5,
            ..NumaPolicy::default()
        }
    }

    /// A pmap stand-in that carries out decisions.
    #[derive(Default, Clone, Debug)]
    struct Sim(BTreeMap<PageKey, PageLocation>);

    impl PageFacts for Sim {
        fn location(&self, vm: u32, gfn: u64) -> Option<PageLocation> {
            self.0.get(&(vm, gfn)).cloned()
        }
    }

    impl Sim {
        /// `k` and every page of its group.
        fn members(&self, k: PageKey) -> Vec<PageKey> {
            match self.0[&k].group {
                None => vec![k],
                Some(g) => self
                    .0
                    .iter()
                    .filter(|(_, l)| l.group == Some(g))
                    .map(|(k, _)| *k)
                    .collect(),
            }
        }

        /// Nodes holding a copy of `k`'s content.
        fn copies(&self, k: PageKey) -> BTreeSet<usize> {
            self.members(k)
                .iter()
                .flat_map(|m| copies_of(&self.0[m], 64))
                .collect()
        }

        fn apply(&mut self, decisions: &[Decision]) {
            for d in decisions {
                let have = self.copies(d.page());
                for m in self.members(d.page()) {
                    let loc = self.0.get_mut(&m).unwrap();
                    match d {
                        Decision::Migrate { to, .. } => loc.node = *to,
                        Decision::Replicate { nodes, .. } => {
                            let mut all = have.clone();
                            all.extend(nodes);
                            loc.replicas = all.into_iter().collect();
                        }
                        Decision::Collapse { keep, .. } => {
                            if !keep.contains(&loc.node) {
                                loc.node = keep[0];
                            }
                            loc.replicas = if keep.len() > 1 { keep.clone() } else { vec![] };
                        }
                        Decision::Freeze { .. } => {}
                    }
                }
            }
        }
    }

    fn reads(vm: u32, gfn: u64, node: usize, n: usize) -> Vec<AccessSample> {
        vec![AccessSample::read(vm, gfn, node); n]
    }

    fn writes(vm: u32, gfn: u64, node: usize, n: usize) -> Vec<AccessSample> {
        vec![AccessSample::write(vm, gfn, node); n]
    }

    fn one_epoch(e: &mut PolicyEngine, facts: &Sim, samples: &[AccessSample]) -> Vec<Decision> {
        e.observe(samples);
        e.decide(facts)
    }

    #[test]
    fn hot_private_page_migrates_to_its_user() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([
            ((1, 10), PageLocation::private(0)),
            ((1, 11), PageLocation::private(0)),
        ]
        .into());
        let mut s = reads(1, 10, 2, 10);
        s.extend(reads(1, 11, 2, 3)); // cold: below hot_threshold
        let d = one_epoch(&mut e, &sim, &s);
        assert_eq!(
            d,
            vec![Decision::Migrate {
                vm: 1,
                gfn: 10,
                to: 2
            }]
        );
        assert_eq!(e.last_epoch().hot_pages, 1);
        assert_eq!(e.last_epoch().migrations, 1);
    }

    /// VM `vm`'s pages `0..n` on `node`, each sampled once from `from`.
    fn spread(vm: u32, n: u64, node: usize, from: usize) -> (Sim, Vec<AccessSample>) {
        let sim = Sim((0..n)
            .map(|g| ((vm, g), PageLocation::private(node)))
            .collect());
        let samples = (0..n).map(|g| AccessSample::read(vm, g, from)).collect();
        (sim, samples)
    }

    #[test]
    fn memory_of_a_vm_used_from_one_other_node_follows_it() {
        // 40 pages sampled once each: none hot (hot_threshold 8), but the
        // VM as a whole is, from node 2, with its pages on node 0.
        let mut e = PolicyEngine::new(params(), 4);
        let (sim, s) = spread(3, 40, 0, 2);
        assert!(one_epoch(&mut e, &sim, &s).is_empty(), "no page is hot");
        assert_eq!(
            e.follow(),
            &[Follow {
                vm: 3,
                from: 0,
                to: 2
            }]
        );
        assert_eq!(e.last_epoch().hot_pages, 0);
        // With its pages on node 2 already, nothing follows.
        let mut e = PolicyEngine::new(params(), 4);
        let (sim, s) = spread(3, 40, 2, 2);
        one_epoch(&mut e, &sim, &s);
        assert!(e.follow().is_empty());
        // Nor with migration off.
        let mut e = PolicyEngine::new(
            NumaPolicy {
                migrate: false,
                ..params()
            },
            4,
        );
        let (sim, s) = spread(3, 40, 0, 2);
        one_epoch(&mut e, &sim, &s);
        assert!(e.follow().is_empty());
    }

    #[test]
    fn memory_does_not_follow_a_vm_used_from_two_nodes_or_barely_sampled() {
        // Half the uses from node 1, half from node 2: no node dominates.
        let mut e = PolicyEngine::new(params(), 4);
        let (sim, mut s) = spread(3, 40, 0, 2);
        for x in s.iter_mut().step_by(2) {
            x.node = 1;
        }
        one_epoch(&mut e, &sim, &s);
        assert!(e.follow().is_empty());
        // Fewer uses than hot_threshold for the whole VM.
        let mut e = PolicyEngine::new(params(), 4);
        let (sim, s) = spread(3, 5, 0, 2);
        one_epoch(&mut e, &sim, &s);
        assert!(e.follow().is_empty());
        // Pages shared across VMs are left to replication.
        let mut e = PolicyEngine::new(params(), 4);
        let (mut sim, s) = spread(3, 40, 0, 2);
        for loc in sim.0.values_mut() {
            loc.shared_across_vms = true;
        }
        one_epoch(&mut e, &sim, &s);
        assert!(e.follow().is_empty());
    }

    #[test]
    fn memory_keeps_following_until_a_tenth_of_its_uses_is_remote() {
        // 30 of 40 sampled pages already on node 2: a quarter remote.
        let mut e = PolicyEngine::new(params(), 4);
        let (mut sim, s) = spread(3, 40, 2, 2);
        for g in 0..10 {
            sim.0.get_mut(&(3, g)).unwrap().node = 1;
        }
        one_epoch(&mut e, &sim, &s);
        assert_eq!(
            e.follow(),
            &[Follow {
                vm: 3,
                from: 1,
                to: 2
            }]
        );
        // 3 of 40: below a tenth, done.
        let mut e = PolicyEngine::new(params(), 4);
        let (mut sim, s) = spread(3, 40, 2, 2);
        for g in 0..3 {
            sim.0.get_mut(&(3, g)).unwrap().node = 1;
        }
        one_epoch(&mut e, &sim, &s);
        assert!(e.follow().is_empty());
    }

    #[test]
    fn page_already_local_stays() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::private(2))].into());
        assert!(one_epoch(&mut e, &sim, &reads(1, 10, 2, 50)).is_empty());
    }

    #[test]
    fn no_dominant_node_means_no_migration() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::private(0))].into());
        let mut s = reads(1, 10, 2, 6);
        s.extend(reads(1, 10, 3, 4));
        assert!(one_epoch(&mut e, &sim, &s).is_empty());
    }

    #[test]
    fn counts_decay_and_accumulate() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::private(2))].into());
        one_epoch(&mut e, &sim, &reads(1, 10, 2, 6));
        assert_eq!(e.counts(1, 10).unwrap().reads[2], 3.0);
        one_epoch(&mut e, &sim, &reads(1, 10, 2, 6));
        assert_eq!(e.counts(1, 10).unwrap().reads[2], 4.5);
        // 6 per epoch settles at 12 (>= 8: hot) before decay: a page on node
        // 0 sampled 6 times per epoch from node 3 is cold in its first epoch
        // (6) and hot in its second (3 + 6).
        let sim = Sim([((1, 11), PageLocation::private(0))].into());
        let mut e = PolicyEngine::new(params(), 4);
        assert!(one_epoch(&mut e, &sim, &reads(1, 11, 3, 6)).is_empty());
        assert_eq!(
            one_epoch(&mut e, &sim, &reads(1, 11, 3, 6)),
            vec![Decision::Migrate {
                vm: 1,
                gfn: 11,
                to: 3
            }]
        );
        // Unsampled pages are forgotten.
        let mut e = PolicyEngine::new(params(), 4);
        one_epoch(&mut e, &sim, &reads(1, 11, 0, 1));
        for _ in 0..10 {
            one_epoch(&mut e, &sim, &[]);
        }
        assert_eq!(e.tracked(), 0);
    }

    #[test]
    fn read_shared_page_is_replicated_on_its_readers() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::shared(0))].into());
        let mut s = Vec::new();
        for n in 0..4 {
            s.extend(reads(1, 10, n, 3 + n));
        }
        let d = one_epoch(&mut e, &sim, &s);
        assert_eq!(
            d,
            vec![Decision::Replicate {
                vm: 1,
                gfn: 10,
                nodes: vec![1, 2, 3]
            }]
        );
        assert_eq!(e.last_epoch().replicas_made, 3);
    }

    #[test]
    fn private_read_shared_page_is_not_replicated() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::private(0))].into());
        let s: Vec<_> = (0..4).flat_map(|n| reads(1, 10, n, 4)).collect();
        assert!(one_epoch(&mut e, &sim, &s).is_empty());
    }

    #[test]
    fn any_write_prevents_replication() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::shared(0))].into());
        let mut s: Vec<_> = (0..4).flat_map(|n| reads(1, 10, n, 4)).collect();
        s.push(AccessSample::write(1, 10, 1));
        assert!(one_epoch(&mut e, &sim, &s).is_empty());
    }

    #[test]
    fn write_shared_page_is_left_alone_even_when_dominated() {
        let mut e = PolicyEngine::new(params(), 4);
        let sim = Sim([((1, 10), PageLocation::private(0))].into());
        let mut s = writes(1, 10, 2, 40);
        s.extend(writes(1, 10, 3, 1));
        assert!(one_epoch(&mut e, &sim, &s).is_empty());
        // Written from one node only, it migrates.
        let mut e = PolicyEngine::new(params(), 4);
        assert_eq!(
            one_epoch(&mut e, &sim, &writes(1, 10, 2, 40)),
            vec![Decision::Migrate {
                vm: 1,
                gfn: 10,
                to: 2
            }]
        );
    }

    #[test]
    fn replicas_collapse_when_unused_or_written() {
        let mut e = PolicyEngine::new(params(), 4);
        let mut loc = PageLocation::shared(0);
        loc.replicas = vec![0, 1, 2, 3];
        let sim = Sim([((1, 10), loc)].into());
        // Nodes 1 and 3 still read it; 0 and 2 stopped.
        let mut s = reads(1, 10, 1, 6);
        s.extend(reads(1, 10, 3, 6));
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Collapse {
                vm: 1,
                gfn: 10,
                keep: vec![1, 3]
            }]
        );
        // A write collapses to the copy of the heaviest user.
        let mut e = PolicyEngine::new(params(), 4);
        s.extend(reads(1, 10, 0, 2));
        s.extend(reads(1, 10, 2, 2));
        s.extend(reads(1, 10, 3, 1));
        s.push(AccessSample::write(1, 10, 0));
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Collapse {
                vm: 1,
                gfn: 10,
                keep: vec![3]
            }]
        );
    }

    #[test]
    fn cold_replicas_collapse_to_home_even_unsampled() {
        let mut e = PolicyEngine::new(params(), 4);
        let mut loc = PageLocation::shared(2);
        loc.replicas = vec![0, 2];
        let mut sim = Sim([((1, 10), loc)].into());
        let s: Vec<_> = [0, 2].iter().flat_map(|&n| reads(1, 10, n, 8)).collect();
        assert!(one_epoch(&mut e, &sim, &s).is_empty());
        let mut got = Vec::new();
        // The move history keeps the page tracked for freeze_window_epochs.
        for _ in 0..30 {
            let d = one_epoch(&mut e, &sim, &[]);
            sim.apply(&d);
            got.extend(d);
        }
        assert_eq!(
            got,
            vec![Decision::Collapse {
                vm: 1,
                gfn: 10,
                keep: vec![2]
            }]
        );
        assert_eq!(e.tracked(), 0, "a collapsed, cold page is forgotten");
    }

    #[test]
    fn replication_extends_to_new_readers() {
        let mut e = PolicyEngine::new(params(), 4);
        let mut loc = PageLocation::shared(0);
        loc.replicas = vec![0, 1];
        let sim = Sim([((1, 10), loc)].into());
        let s: Vec<_> = [0, 1, 3].iter().flat_map(|&n| reads(1, 10, n, 4)).collect();
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Replicate {
                vm: 1,
                gfn: 10,
                nodes: vec![3]
            }]
        );
    }

    #[test]
    fn groups_add_up_counts_of_vms_sharing_a_page() {
        // VM 1 on node 0 and VM 2 on node 2 map one shared machine page on
        // node 0. Judged alone, each looks private to its node.
        let group = |node| PageLocation {
            group: Some(77),
            ..PageLocation::shared(node)
        };
        let mut s = reads(1, 10, 0, 10);
        s.extend(reads(2, 40, 2, 10));
        let sim = Sim([((1, 10), group(0)), ((2, 40), group(0))].into());
        let mut e = PolicyEngine::new(params(), 4);
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Replicate {
                vm: 1,
                gfn: 10,
                nodes: vec![2]
            }]
        );
        // Without grouping the VM on node 2 would pull the page over.
        let sim = Sim([
            ((1, 10), PageLocation::shared(0)),
            ((2, 40), PageLocation::shared(0)),
        ]
        .into());
        let mut e = PolicyEngine::new(params(), 4);
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Migrate {
                vm: 2,
                gfn: 40,
                to: 2
            }]
        );
    }

    #[test]
    fn ping_pong_page_is_frozen() {
        // decay 0: only the last epoch counts, so the latest user dominates.
        let mut p = params();
        p.decay = 0.0;
        let mut e = PolicyEngine::new(p, 4);
        let mut sim = Sim([((1, 10), PageLocation::private(0))].into());
        let mut all = Vec::new();
        for i in 0..12 {
            // The user alternates between node 1 and node 2 every epoch.
            let node = 1 + i % 2;
            let d = one_epoch(&mut e, &sim, &reads(1, 10, node, 20));
            sim.apply(&d);
            all.push(d);
        }
        let moves: usize = all
            .iter()
            .flatten()
            .filter(|d| matches!(d, Decision::Migrate { .. }))
            .count();
        assert_eq!(moves, 3, "{all:?}");
        assert_eq!(
            all[3],
            vec![Decision::Freeze {
                vm: 1,
                gfn: 10,
                epochs: 10
            }]
        );
        assert!(all[4..].iter().take(10).all(|d| d.is_empty()), "{all:?}");
        assert_eq!(e.totals().freezes, 1);
        assert!(e.totals().frozen_pages >= 8);
    }

    #[test]
    fn freeze_ends_and_history_restarts() {
        let mut p = params();
        p.freeze_epochs = 2;
        p.freeze_after_moves = 1;
        p.decay = 0.0;
        let mut e = PolicyEngine::new(p, 4);
        let mut sim = Sim([((1, 10), PageLocation::private(0))].into());
        let mut kinds = Vec::new();
        for i in 0..7 {
            let node = 1 + i % 2;
            let d = one_epoch(&mut e, &sim, &reads(1, 10, node, 20));
            sim.apply(&d);
            kinds.push(d.first().map(|d| match d {
                Decision::Migrate { .. } => 'm',
                Decision::Freeze { .. } => 'f',
                _ => '?',
            }));
        }
        // move, freeze, frozen x2, already on node 1 at epoch 4, then move
        // again (the history restarted) and freeze.
        assert_eq!(
            kinds,
            vec![Some('m'), Some('f'), None, None, None, Some('m'), Some('f')]
        );
    }

    #[test]
    fn copy_budget_serves_the_hottest_first() {
        let mut p = params();
        p.copy_budget_pages = 3;
        let mut e = PolicyEngine::new(p, 4);
        let sim = Sim((0..6).map(|g| ((1, g), PageLocation::private(0))).collect());
        let s: Vec<_> = (0..6)
            .flat_map(|g| reads(1, g, 2, 10 + g as usize))
            .collect();
        let d = one_epoch(&mut e, &sim, &s);
        assert_eq!(
            d,
            vec![
                Decision::Migrate {
                    vm: 1,
                    gfn: 5,
                    to: 2
                },
                Decision::Migrate {
                    vm: 1,
                    gfn: 4,
                    to: 2
                },
                Decision::Migrate {
                    vm: 1,
                    gfn: 3,
                    to: 2
                },
            ]
        );
        assert_eq!(e.last_epoch().deferred, 3);
        assert_eq!(e.last_epoch().pages_copied, 3);
    }

    #[test]
    fn replication_is_cut_to_the_budget_most_used_nodes_first() {
        let mut p = params();
        p.copy_budget_pages = 2;
        let mut e = PolicyEngine::new(p, 4);
        let sim = Sim([((1, 10), PageLocation::shared(0))].into());
        let mut s = reads(1, 10, 1, 3);
        s.extend(reads(1, 10, 2, 5));
        s.extend(reads(1, 10, 3, 4));
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Replicate {
                vm: 1,
                gfn: 10,
                nodes: vec![2, 3]
            }]
        );
        assert_eq!(e.last_epoch().deferred, 1);
    }

    #[test]
    fn unmapped_pages_are_forgotten_and_bad_nodes_ignored() {
        let mut e = PolicyEngine::new(params(), 2);
        let sim = Sim::default();
        e.observe(&reads(1, 10, 1, 20));
        e.observe(&reads(1, 11, 5, 20));
        assert!(e.decide(&sim).is_empty());
        assert_eq!(e.tracked(), 0);
        assert_eq!(e.last_epoch().ignored_samples, 20);
        assert_eq!(e.last_epoch().samples, 20);
    }

    #[test]
    fn migrate_only_and_replicate_only() {
        let shared_many: Vec<_> = (0..4).flat_map(|n| reads(1, 10, n, 4)).collect();
        let sim = Sim([
            ((1, 10), PageLocation::shared(0)),
            ((1, 11), PageLocation::shared(0)),
        ]
        .into());
        let mut s = shared_many.clone();
        s.extend(reads(1, 11, 3, 20));
        let mut p = params();
        p.replicate = false;
        let mut e = PolicyEngine::new(p, 4);
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Migrate {
                vm: 1,
                gfn: 11,
                to: 3
            }]
        );
        let mut p = params();
        p.migrate = false;
        let mut e = PolicyEngine::new(p, 4);
        // Page 11 is read only from node 3: one user, below replicate_min_nodes.
        assert_eq!(
            one_epoch(&mut e, &sim, &s),
            vec![Decision::Replicate {
                vm: 1,
                gfn: 10,
                nodes: vec![1, 2, 3]
            }]
        );
    }

    // ---- properties -------------------------------------------------------

    fn arb_params() -> impl Strategy<Value = NumaPolicy> {
        (
            any::<bool>(),
            any::<bool>(),
            1.0f64..20.0,
            0.5f64..1.0,
            0.5f64..4.0,
            2u64..5,
            0.0f64..0.9,
            0u64..6,
            0u64..4,
            1u64..6,
            1u64..5,
            0.05f64..2.0,
        )
            .prop_map(
                |(m, r, hot, dom, reader, min, decay, budget, fam, few, fe, writer)| NumaPolicy {
                    migrate: m,
                    replicate: r,
                    hot_threshold: hot,
                    dominant_share: dom,
                    reader_threshold: reader.min(hot),
                    replicate_min_nodes: min,
                    decay,
                    copy_budget_pages: budget,
                    freeze_after_moves: fam,
                    freeze_window_epochs: few,
                    freeze_epochs: fe,
                    writer_threshold: writer,
                    ..params()
                },
            )
    }

    /// Pages (vm 0..2, gfn 0..4) with random homes and sharing; epochs of
    /// random samples.
    fn arb_world() -> impl Strategy<Value = (Sim, Vec<Vec<AccessSample>>)> {
        // (node, replica mask) of a page's content; a group's members share it.
        let place = (0usize..4, proptest::bool::weighted(0.3), 0u8..16);
        let loc = (place.clone(), any::<bool>(), proptest::option::of(0u64..2));
        let sample = (
            0u32..2,
            0u64..4,
            0usize..4,
            proptest::bool::weighted(0.2),
            1usize..8,
        )
            .prop_map(|(vm, gfn, node, write, n)| {
                vec![
                    AccessSample {
                        vm,
                        gfn,
                        node,
                        write,
                        vcpu: 0
                    };
                    n
                ]
            });
        (
            proptest::collection::vec(loc, 8),
            proptest::collection::vec(place, 2),
            proptest::collection::vec(proptest::collection::vec(sample, 0..10), 1..14),
        )
            .prop_map(|(locs, group_places, epochs)| {
                let make = |(node, replicated, mask): (usize, bool, u8), shared: bool| {
                    let mut copies: BTreeSet<usize> =
                        (0..4).filter(|b| mask & (1 << b) != 0).collect();
                    copies.insert(node);
                    PageLocation {
                        node,
                        shared_across_vms: shared,
                        // Only shared pages have replicas.
                        replicas: if replicated && shared && copies.len() > 1 {
                            copies.into_iter().collect()
                        } else {
                            vec![]
                        },
                        group: None,
                    }
                };
                let sim = Sim(locs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (place, shared, group))| {
                        let loc = match group {
                            Some(g) => PageLocation {
                                group: Some(g),
                                ..make(group_places[g as usize], true)
                            },
                            None => make(place, shared),
                        };
                        (((i / 4) as u32, (i % 4) as u64), loc)
                    })
                    .collect());
                let epochs = epochs
                    .into_iter()
                    .map(|e| e.into_iter().flatten().collect())
                    .collect();
                (sim, epochs)
            })
    }

    fn run(p: &NumaPolicy, sim: &Sim, epochs: &[Vec<AccessSample>]) -> Vec<Vec<Decision>> {
        let mut sim = sim.clone();
        let mut e = PolicyEngine::new(p.clone(), 4);
        epochs
            .iter()
            .map(|s| {
                let d = one_epoch(&mut e, &sim, s);
                sim.apply(&d);
                d
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn decisions_are_well_formed_and_within_the_rules(p in arb_params(), (sim0, epochs) in arb_world()) {
            let mut sim = sim0.clone();
            let mut e = PolicyEngine::new(p.clone(), 4);
            let mut moves: BTreeMap<PageKey, Vec<u64>> = BTreeMap::new();
            let mut frozen_until: BTreeMap<PageKey, u64> = BTreeMap::new();
            for (epoch, samples) in epochs.iter().enumerate() {
                let epoch = epoch as u64;
                e.observe(samples);
                // Counts before deciding, per page (groups are checked summed).
                let counts: BTreeMap<PageKey, PageCounts> = sim.0.keys()
                    .filter_map(|k| e.counts(k.0, k.1).map(|c| (*k, c.clone())))
                    .collect();
                let group_counts = |k: &PageKey| -> PageCounts {
                    let g = sim.0[k].group;
                    let mut sum = PageCounts { reads: vec![0.0; 4], writes: vec![0.0; 4] };
                    for (k2, c) in &counts {
                        if k2 == k || (g.is_some() && sim.0[k2].group == g) {
                            for i in 0..4 { sum.reads[i] += c.reads[i]; sum.writes[i] += c.writes[i]; }
                        }
                    }
                    sum
                };
                let d = e.decide(&sim);
                let copied: usize = d.iter().map(Decision::copies).sum();
                prop_assert!(copied as u64 <= p.copy_budget_pages, "budget: {d:?}");
                let pages: BTreeSet<PageKey> = d.iter().map(Decision::page).collect();
                prop_assert_eq!(pages.len(), d.len(), "one decision per page: {:?}", d);
                if !p.migrate && !p.replicate {
                    prop_assert!(d.is_empty());
                }
                for dec in &d {
                    let k = dec.page();
                    let loc = &sim.0[&k];
                    let have = sim.copies(k);
                    let members = sim.members(k);
                    for m in &members {
                        prop_assert!(frozen_until.get(m).is_none_or(|&u| epoch >= u), "frozen page decided: {dec:?}");
                    }
                    let c = group_counts(&k);
                    let total: f64 = c.reads.iter().chain(&c.writes).sum();
                    let writers = c.writes.iter().filter(|&&w| w >= p.writer_threshold).count();
                    match dec {
                        Decision::Migrate { to, .. } => {
                            prop_assert!(p.migrate);
                            prop_assert!(*to < 4 && *to != loc.node && have.len() == 1);
                            prop_assert!(total >= p.hot_threshold);
                            prop_assert!(writers <= 1, "write-shared page migrated");
                            prop_assert!(c.reads[*to] + c.writes[*to] >= p.dominant_share * total);
                        }
                        Decision::Replicate { nodes, .. } => {
                            prop_assert!(p.replicate);
                            prop_assert!(!nodes.is_empty());
                            prop_assert!(nodes.windows(2).all(|w| w[0] < w[1]));
                            prop_assert!(nodes.iter().all(|n| *n < 4 && !have.contains(n)));
                            prop_assert!(loc.shared_across_vms || loc.group.is_some());
                            prop_assert!(writers == 0, "written page replicated");
                            prop_assert!(total >= p.hot_threshold);
                        }
                        Decision::Collapse { keep, .. } => {
                            prop_assert!(p.replicate);
                            prop_assert!(!keep.is_empty() && keep.len() < have.len());
                            prop_assert!(keep.iter().all(|n| have.contains(n)));
                        }
                        Decision::Freeze { epochs, .. } => {
                            prop_assert_eq!(*epochs, p.freeze_epochs);
                            for m in &members {
                                frozen_until.insert(*m, epoch + 1 + p.freeze_epochs);
                                moves.remove(m);
                            }
                        }
                    }
                    if !matches!(dec, Decision::Freeze { .. }) {
                        for m in &members {
                            let h = moves.entry(*m).or_default();
                            h.push(epoch);
                            if p.freeze_after_moves > 0 {
                                let recent = h.iter().filter(|&&e| e + p.freeze_window_epochs > epoch).count();
                                prop_assert!(recent as u64 <= p.freeze_after_moves, "too many moves: {h:?}");
                            }
                        }
                    }
                }
                sim.apply(&d);
            }
            // Deterministic: the same run decides the same.
            prop_assert_eq!(run(&p, &sim0, &epochs), run(&p, &sim0, &epochs));
        }
    }
}
