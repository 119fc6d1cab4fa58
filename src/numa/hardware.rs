//! Per-vCPU perf-event counters: which vCPUs and VMs miss most, to steer
//! the page sampler's effort.
//!
//! For every vCPU thread, [`MissCounters`] opens one perf-event group
//! (`perf-event2`, a `Software::DUMMY` leader observing that thread) with the
//! events of an [`EventSet`]. [`EventSet::hardware`] asks for LLC read
//! misses, cache misses and NUMA node load misses; an event the PMU does not
//! offer is recorded as absent with the reason and the others are kept. Each
//! epoch [`MissCounters::read_epoch`] reads every group once and returns the
//! per-thread deltas (scaled up when the kernel multiplexed the counters) and
//! their sums per VM.
//!
//! The counts name threads, not pages: a PMU sample's data address taken in
//! guest mode is a guest-virtual address, which the monitor cannot turn into
//! a guest frame without walking the guest's page tables. So the counters
//! only say *where to look*: [`scale_sample_budget`] gives each VM a share of
//! the page-sampling budget in proportion to its misses in the last epoch
//! (with a floor), and the page sampler still names the pages.
//!
//! The code is generic over the event set: [`EventSet::software`] builds the
//! same groups from software events (task-clock, page faults), which is how
//! it is exercised on hosts without a PMU (the build machines, docs/host-facts.md "NUMA").

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;
use perf_event::events::{Cache, CacheId, CacheOp, CacheResult, Hardware};
use perf_event::{Builder, Counter, Group};

/// The software events [`EventSet::software`] takes (re-exported so callers
/// need not depend on `perf-event2` themselves).
pub use perf_event::events::Software as SoftwareEvent;
use serde::Serialize;

/// What one event of a set counts.
#[derive(Clone)]
enum EventKind {
    Hardware(Hardware),
    Cache(CacheId, CacheOp, CacheResult),
    Software(SoftwareEvent),
}

/// One event of an [`EventSet`], with the name the report uses.
#[derive(Clone)]
pub struct EventSpec {
    pub name: &'static str,
    kind: EventKind,
}

impl EventSpec {
    /// `PERF_COUNT_HW_CACHE_MISSES`: the PMU's generic "cache misses" (on
    /// x86 usually last-level misses of any kind).
    pub fn cache_misses() -> EventSpec {
        EventSpec {
            name: "cache-misses",
            kind: EventKind::Hardware(Hardware::CACHE_MISSES),
        }
    }

    /// Last-level cache read misses (`LLC-load-misses` in `perf list`).
    pub fn llc_read_misses() -> EventSpec {
        EventSpec {
            name: "llc-read-misses",
            kind: EventKind::Cache(CacheId::LL, CacheOp::READ, CacheResult::MISS),
        }
    }

    /// NUMA node load misses (`node-load-misses`): loads served by another
    /// node's memory, where the PMU can tell.
    pub fn node_load_misses() -> EventSpec {
        EventSpec {
            name: "node-load-misses",
            kind: EventKind::Cache(CacheId::NODE, CacheOp::READ, CacheResult::MISS),
        }
    }

    /// A kernel software event under `name`.
    pub fn software(name: &'static str, event: SoftwareEvent) -> EventSpec {
        EventSpec {
            name,
            kind: EventKind::Software(event),
        }
    }

    pub fn is_hardware(&self) -> bool {
        !matches!(self.kind, EventKind::Software(_))
    }

    fn builder(&self, kernel: bool) -> Builder<'static> {
        let mut b = match &self.kind {
            EventKind::Hardware(e) => Builder::new(*e),
            EventKind::Cache(which, operation, result) => Builder::new(Cache {
                which: *which,
                operation: *operation,
                result: *result,
            }),
            EventKind::Software(e) => Builder::new(*e),
        };
        // Count what the thread does in the guest and in the host kernel
        // (KVM emulates the guest's kernel mode on the build hosts); without
        // the permission for that, user mode only (see `open_member`).
        b.exclude_kernel(!kernel).exclude_hv(true);
        b
    }
}

/// The events counted per vCPU thread, in order of preference for the
/// "misses" figure that steers sampling: the first event of the set that
/// opened is the one summed per VM.
#[derive(Clone)]
pub struct EventSet {
    /// `hardware` or `software`, for the report.
    pub kind: &'static str,
    pub events: Vec<EventSpec>,
}

impl EventSet {
    /// LLC read misses first (memory traffic that page placement can
    /// change), then the generic cache-miss event, then node load misses
    /// (remote loads; zero on a one-node host).
    pub fn hardware() -> EventSet {
        EventSet {
            kind: "hardware",
            events: vec![
                EventSpec::llc_read_misses(),
                EventSpec::cache_misses(),
                EventSpec::node_load_misses(),
            ],
        }
    }

    /// Software events, e.g. `[("task-clock", SoftwareEvent::TASK_CLOCK)]`: the
    /// same groups and the same code path as the hardware set, on any host.
    pub fn software(events: &[(&'static str, SoftwareEvent)]) -> EventSet {
        EventSet {
            kind: "software",
            events: events
                .iter()
                .map(|&(name, e)| EventSpec::software(name, e))
                .collect(),
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.events.iter().map(|e| e.name).collect()
    }
}

/// Whether an event of the set could be opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventStatus {
    pub name: String,
    pub present: bool,
    /// Counting user mode only (no permission for kernel mode).
    pub user_only: bool,
    /// Why it is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn paranoid() -> Option<i64> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Opens `spec` for thread `tid` (`None`: the calling thread), in `group`
/// when given: first counting kernel mode too, then, if that is not
/// permitted, user mode only. `Err` is the errno and its explanation.
fn open_member(
    spec: &EventSpec,
    tid: Option<u32>,
    group: Option<&mut Group>,
) -> Result<(Counter, bool), (i32, String)> {
    let attempt = |kernel: bool, group: Option<&mut Group>| {
        let mut b = spec.builder(kernel);
        if let Some(tid) = tid {
            b.observe_pid(tid as libc::pid_t);
        }
        match group {
            Some(g) => g.add(&b),
            None => b.build(),
        }
    };
    let mut group = group;
    let first = attempt(true, group.as_deref_mut());
    let err = match first {
        Ok(c) => return Ok((c, false)),
        Err(e) => e,
    };
    let errno = err.raw_os_error().unwrap_or(0);
    if errno == libc::EACCES || errno == libc::EPERM {
        if let Ok(c) = attempt(false, group) {
            return Ok((c, true));
        }
    }
    Err((
        errno,
        super::counters::explain_perf_error(spec.name, spec.is_hardware(), errno, paranoid()),
    ))
}

/// Tries every event of `set` on the calling thread (and closes them
/// again). `Ok` lists the events that opened, with the absent ones and
/// their reasons; `Err` is one sentence saying why none can be used (the
/// same errno for all is said once, naming every event).
pub fn probe(set: &EventSet) -> Result<Vec<EventStatus>, String> {
    let mut status = Vec::new();
    let mut failures: Vec<(&'static str, i32, String)> = Vec::new();
    for spec in &set.events {
        match open_member(spec, None, None) {
            Ok((_, user_only)) => status.push(EventStatus {
                name: spec.name.into(),
                present: true,
                user_only,
                reason: None,
            }),
            Err((errno, why)) => {
                status.push(EventStatus {
                    name: spec.name.into(),
                    present: false,
                    user_only: false,
                    reason: Some(why.clone()),
                });
                failures.push((spec.name, errno, why));
            }
        }
    }
    if failures.len() < set.events.len() {
        return Ok(status);
    }
    let first = failures.first().map(|f| f.1);
    if failures.iter().all(|f| Some(f.1) == first) {
        let names: Vec<&str> = failures.iter().map(|f| f.0).collect();
        let hardware = set.events.iter().any(EventSpec::is_hardware);
        Err(super::counters::explain_perf_error(
            &names.join(", "),
            hardware,
            first.unwrap_or(0),
            paranoid(),
        ))
    } else {
        Err(failures
            .into_iter()
            .map(|f| f.2)
            .collect::<Vec<_>>()
            .join("; "))
    }
}

/// Last raw group reading of one thread.
#[derive(Clone, Copy, Default)]
struct Reading {
    enabled_ns: u64,
    running_ns: u64,
}

struct ThreadGroup {
    tid: u32,
    vm: u32,
    vcpu: usize,
    group: Group,
    /// One per event of the set; `None`: absent for this thread.
    members: Vec<Option<Counter>>,
    last_values: Vec<u64>,
    last: Reading,
}

impl ThreadGroup {
    /// Deltas since the last read, scaled by enabled / running time when
    /// the kernel multiplexed the group (hardware counters are few).
    fn read_delta(&mut self) -> std::io::Result<Vec<Option<u64>>> {
        let data = self.group.read()?;
        let now = Reading {
            enabled_ns: data.time_enabled().map_or(0, |d| d.as_nanos() as u64),
            running_ns: data.time_running().map_or(0, |d| d.as_nanos() as u64),
        };
        let enabled = now.enabled_ns.saturating_sub(self.last.enabled_ns);
        let running = now.running_ns.saturating_sub(self.last.running_ns);
        self.last = now;
        let mut out = Vec::with_capacity(self.members.len());
        for (member, last) in self.members.iter().zip(self.last_values.iter_mut()) {
            out.push(member.as_ref().map(|c| {
                let value = data.get(c).map_or(*last, |e| e.value());
                let delta = value.saturating_sub(*last);
                *last = value;
                if running > 0 && running < enabled {
                    (delta as u128 * enabled as u128 / running as u128) as u64
                } else {
                    delta
                }
            }));
        }
        Ok(out)
    }
}

/// One thread's counts over one epoch.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadDelta {
    pub tid: u32,
    pub vm: u32,
    pub vcpu: usize,
    /// One per event of the set (`None`: absent for this thread).
    pub counts: Vec<Option<u64>>,
}

/// One epoch's reading of every group.
#[derive(Clone, Debug, Serialize)]
pub struct EpochCounts {
    pub threads: Vec<ThreadDelta>,
    /// Per VM (index = VM id): the steering event's count (see
    /// [`MissCounters::steering_event`]); 0 for a VM without counted threads.
    pub misses_per_vm: Vec<u64>,
    /// Per VM, per event of the set: the sums (absent events count 0).
    pub per_vm_events: Vec<Vec<u64>>,
    /// Wall time of reading every group, in microseconds.
    pub read_us: f64,
}

struct Inner {
    threads: Vec<ThreadGroup>,
    /// Per event of the set: present on some thread, and the reason of the
    /// first failure otherwise.
    status: Vec<EventStatus>,
    /// Threads none of whose events could be opened, and why.
    failed: HashMap<u32, String>,
}

/// The perf-event groups of every registered vCPU thread.
pub struct MissCounters {
    set: EventSet,
    inner: Mutex<Inner>,
}

impl MissCounters {
    pub fn new(set: EventSet) -> MissCounters {
        let status = set
            .events
            .iter()
            .map(|e| EventStatus {
                name: e.name.into(),
                present: false,
                user_only: false,
                reason: Some("no vCPU thread registered yet".into()),
            })
            .collect();
        MissCounters {
            set,
            inner: Mutex::new(Inner {
                threads: Vec::new(),
                status,
                failed: HashMap::new(),
            }),
        }
    }

    pub fn event_set(&self) -> &EventSet {
        &self.set
    }

    /// Whether `tid` was registered (successfully or not).
    pub fn knows_thread(&self, tid: u32) -> bool {
        let inner = self.inner.lock();
        inner.failed.contains_key(&tid) || inner.threads.iter().any(|t| t.tid == tid)
    }

    /// Opens the group of vCPU `vcpu` of VM `vm`, run by thread `tid`, and
    /// starts counting. Events that fail to open are recorded as absent
    /// (with the reason) and the others kept; `Err` when none opened.
    /// Returns how many events count for this thread.
    pub fn add_thread(&self, tid: u32, vm: u32, vcpu: usize) -> Result<usize, String> {
        let mut inner = self.inner.lock();
        let result = self.open_group(&mut inner, tid, vm, vcpu);
        if let Err(why) = &result {
            inner.failed.insert(tid, why.clone());
        }
        result
    }

    fn open_group(
        &self,
        inner: &mut Inner,
        tid: u32,
        vm: u32,
        vcpu: usize,
    ) -> Result<usize, String> {
        let mut leader = Group::builder();
        leader.observe_pid(tid as libc::pid_t);
        let mut group = leader.build_group().map_err(|e| {
            format!(
                "cannot open a perf-event group for thread {tid}: {}",
                super::counters::explain_perf_error(
                    "dummy group leader",
                    false,
                    e.raw_os_error().unwrap_or(0),
                    paranoid()
                )
            )
        })?;
        let mut members = Vec::new();
        let mut reasons = Vec::new();
        for (i, spec) in self.set.events.iter().enumerate() {
            match open_member(spec, Some(tid), Some(&mut group)) {
                Ok((c, user_only)) => {
                    let st = &mut inner.status[i];
                    st.present = true;
                    st.user_only |= user_only;
                    st.reason = None;
                    members.push(Some(c));
                }
                Err((_, why)) => {
                    let st = &mut inner.status[i];
                    if !st.present {
                        st.reason = Some(why.clone());
                    }
                    reasons.push(why);
                    members.push(None);
                }
            }
        }
        let opened = members.iter().filter(|m| m.is_some()).count();
        if opened == 0 {
            return Err(reasons.join("; "));
        }
        group
            .enable()
            .map_err(|e| format!("enabling the counters of thread {tid}: {e}"))?;
        let mut t = ThreadGroup {
            tid,
            vm,
            vcpu,
            group,
            last_values: vec![0; members.len()],
            members,
            last: Reading::default(),
        };
        // Baseline: the first epoch's deltas start here.
        t.read_delta()
            .map_err(|e| format!("reading the counters of thread {tid}: {e}"))?;
        inner.threads.push(t);
        Ok(opened)
    }

    /// Per event: present or absent with the reason.
    pub fn status(&self) -> Vec<EventStatus> {
        self.inner.lock().status.clone()
    }

    /// Threads counted.
    pub fn threads(&self) -> usize {
        self.inner.lock().threads.len()
    }

    /// Threads whose group could not be opened, with the reasons.
    pub fn failed_threads(&self) -> Vec<(u32, String)> {
        let mut v: Vec<_> = self
            .inner
            .lock()
            .failed
            .iter()
            .map(|(&t, w)| (t, w.clone()))
            .collect();
        v.sort();
        v
    }

    /// Index of the event whose count steers sampling: the first event of
    /// the set present on some thread.
    pub fn steering_event(&self) -> Option<usize> {
        self.inner.lock().status.iter().position(|s| s.present)
    }

    /// Whether any event counts on any thread (hardware "active").
    pub fn is_active(&self) -> bool {
        self.steering_event().is_some()
    }

    /// One line for the report: the set, the events present and absent.
    pub fn describe(&self) -> String {
        let status = self.status();
        let present: Vec<String> = status
            .iter()
            .filter(|s| s.present)
            .map(|s| {
                if s.user_only {
                    format!("{} (user mode only)", s.name)
                } else {
                    s.name.clone()
                }
            })
            .collect();
        let absent: Vec<String> = status
            .iter()
            .filter(|s| !s.present)
            .map(|s| format!("{} ({})", s.name, s.reason.as_deref().unwrap_or("absent")))
            .collect();
        let mut line = format!(
            "{} counters per vCPU thread ({} threads): present {}",
            self.set.kind,
            self.threads(),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        );
        if !absent.is_empty() {
            line += &format!("; absent {}", absent.join(", "));
        }
        line
    }

    /// Reads every group once: per-thread deltas since the last read and
    /// their sums over the first `vms` VMs. A thread that has exited keeps
    /// its final count (its deltas are then 0).
    pub fn read_epoch(&self, vms: usize) -> EpochCounts {
        let started = Instant::now();
        let mut inner = self.inner.lock();
        let steer = inner.status.iter().position(|s| s.present);
        let events = self.set.events.len();
        let mut out = EpochCounts {
            threads: Vec::with_capacity(inner.threads.len()),
            misses_per_vm: vec![0; vms],
            per_vm_events: vec![vec![0; events]; vms],
            read_us: 0.0,
        };
        for t in inner.threads.iter_mut() {
            let counts = match t.read_delta() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("reading the counters of thread {}: {e}", t.tid);
                    continue;
                }
            };
            if let Some(sums) = out.per_vm_events.get_mut(t.vm as usize) {
                for (sum, c) in sums.iter_mut().zip(&counts) {
                    *sum = sum.saturating_add(c.unwrap_or(0));
                }
            }
            if let (Some(i), Some(m)) = (steer, out.misses_per_vm.get_mut(t.vm as usize)) {
                *m = m.saturating_add(counts[i].unwrap_or(0));
            }
            out.threads.push(ThreadDelta {
                tid: t.tid,
                vm: t.vm,
                vcpu: t.vcpu,
                counts,
            });
        }
        drop(inner);
        out.read_us = started.elapsed().as_secs_f64() * 1e6;
        out
    }
}

/// The smallest per-round sample budget a VM gets when counters steer the
/// effort: a quarter of `sample_pages` (at least one page), so a VM whose
/// counters read zero (idle, or not counted) is still sampled.
pub fn budget_floor(per_vm: u64) -> u64 {
    (per_vm / 4).max(1).min(per_vm)
}

/// Splits a round's page-sample budget, `per_vm` pages for each of the
/// `misses.len()` VMs, in proportion to each VM's misses: every VM gets at
/// least `floor` (capped at `per_vm`), the rest goes by share (largest
/// remainder, ties to the lower index), and the budgets add up to exactly
/// `per_vm * misses.len()`. With no misses at all every VM gets `per_vm`.
pub fn scale_sample_budget(misses: &[u64], per_vm: u64, floor: u64) -> Vec<u64> {
    let n = misses.len() as u128;
    let max = misses.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return vec![per_vm; misses.len()];
    }
    let floor = floor.min(per_vm) as u128;
    let budget = per_vm as u128 * n;
    let rest = budget - floor * n;
    // Drop low bits of the counts if `rest * misses` could overflow 128
    // bits (only with absurd budgets; the shares barely change).
    let shift = ((128 - rest.leading_zeros()) + (64 - max.leading_zeros())).saturating_sub(127);
    let misses: Vec<u128> = misses.iter().map(|&m| (m >> shift) as u128).collect();
    let total: u128 = misses.iter().sum();
    let mut out: Vec<u128> = misses.iter().map(|&m| floor + rest * m / total).collect();
    let given: u128 = out.iter().sum();
    let mut left = budget - given;
    if left > 0 {
        let mut order: Vec<usize> = (0..misses.len()).collect();
        // Largest remainder first; a stable sort keeps ties in index order.
        order.sort_by_key(|&i| std::cmp::Reverse(rest * misses[i] % total));
        for i in order {
            if left == 0 {
                break;
            }
            out[i] += 1;
            left -= 1;
        }
    }
    out.into_iter().map(|b| b as u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(misses: &[u64], per_vm: u64, floor: u64) -> Vec<u64> {
        let b = scale_sample_budget(misses, per_vm, floor);
        assert_eq!(b.len(), misses.len());
        assert_eq!(
            b.iter().map(|&x| x as u128).sum::<u128>(),
            per_vm as u128 * misses.len() as u128,
            "same total: {misses:?} -> {b:?}"
        );
        assert!(b.iter().all(|&x| x >= floor.min(per_vm)), "floor: {b:?}");
        b
    }

    #[test]
    fn all_zero_is_uniform() {
        assert_eq!(check(&[0, 0, 0], 64, 16), vec![64, 64, 64]);
        assert_eq!(check(&[], 64, 16), Vec::<u64>::new());
    }

    #[test]
    fn one_vm_gets_the_whole_budget() {
        assert_eq!(check(&[12345], 64, 16), vec![64]);
        assert_eq!(check(&[0], 64, 16), vec![64]);
    }

    #[test]
    fn budget_follows_the_share_above_the_floor() {
        // rest = 2 * 64 - 2 * 16 = 96, split 3:1.
        assert_eq!(check(&[300, 100], 64, 16), vec![16 + 72, 16 + 24]);
        // A VM with no misses keeps the floor.
        assert_eq!(check(&[0, 7], 64, 16), vec![16, 112]);
    }

    #[test]
    fn huge_skew_respects_floor_and_total() {
        let b = check(&[u64::MAX, 1, 0, u64::MAX / 3], 64, 16);
        assert_eq!(b[2], 16);
        assert_eq!(b[1], 16, "a share of 1 in 2^64 rounds to nothing");
        assert!(b[0] > b[3] && b[3] > 16, "{b:?}");
        // Huge budgets do not overflow either.
        check(&[u64::MAX, u64::MAX, 3], u64::MAX / 2, 5);
    }

    #[test]
    fn remainders_go_to_the_largest_fractions() {
        // rest = 3 * 10 - 3 * 2 = 24 split 1:1:1 -> 8 each, nothing left.
        assert_eq!(check(&[5, 5, 5], 10, 2), vec![10, 10, 10]);
        // rest = 3 * 3 = 9 (floor 0) split 1:1:2 -> 2.25, 2.25, 4.5: the
        // page left goes to the largest fraction (index 2).
        assert_eq!(check(&[1, 1, 2], 3, 0), vec![2, 2, 5]);
        // 4 pages over three equal shares: 1.33 each, the page left goes
        // to the lowest index.
        assert_eq!(check(&[1, 1, 1, 0], 1, 0), vec![2, 1, 1, 0]);
    }

    #[test]
    fn floor_above_the_budget_is_capped() {
        assert_eq!(check(&[1, 0], 4, 10), vec![4, 4]);
        assert_eq!(budget_floor(64), 16);
        assert_eq!(budget_floor(1), 1);
        assert_eq!(budget_floor(3), 1);
    }
}
