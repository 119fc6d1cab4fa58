//! What happened in a monitor, in order: VMs started, finished, failed,
//! stopped, removed, moved; policy changes; each second in which memory
//! changed hands, the rates of merges, copy-on-write breaks, migrations
//! and replications ([`Rates`]). Readers (the API's event
//! stream) ask for the events after the last sequence number they saw, so
//! a slow reader holds nothing up; the log keeps the last [`KEPT`] events.

use std::collections::VecDeque;
use std::time::Instant;

use serde::Serialize;

/// Events kept for readers that fall behind.
pub const KEPT: usize = 4096;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// 1, 2, ... in the order they happened.
    pub seq: u64,
    /// Milliseconds since the monitor started.
    pub ms: u64,
    /// `vm-waiting` (queued for memory), `vm-added`, `vm-started`,
    /// `vm-finished`, `vm-failed`, `vm-paused`, `vm-resumed`, `vm-stopped`,
    /// `vm-removed`, `vm-moved`, `vm-snapshot`, `vm-restored`, `vm-cloned`,
    /// `vm-migrated`, `vm-migrated-in`, `vm-migration-failed`,
    /// `policy-changed`, `rates`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub detail: String,
    /// With `rates`: the figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

/// Monitor-wide counts per second over the last interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rates {
    /// The interval the rates are over.
    pub interval_ms: u64,
    pub merges_per_s: f64,
    pub cow_breaks_per_s: f64,
    /// Pages the NUMA engine decided to migrate, and the frames that went
    /// with them (their regions).
    pub migrations_per_s: f64,
    pub frames_moved_per_s: f64,
    pub replications_per_s: f64,
}

/// The counters rates are computed from (monotonic totals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub merges: u64,
    pub cow_breaks: u64,
    pub migrations: u64,
    pub frames_moved: u64,
    pub replications: u64,
}

/// Turns counter totals into a [`Rates`] event once per interval, when
/// some count changed.
pub struct RateClock {
    every: std::time::Duration,
    last: Option<(Instant, Counts)>,
}

impl RateClock {
    pub fn new(every: std::time::Duration) -> RateClock {
        RateClock { every, last: None }
    }

    /// Whether an interval has passed since the last reading (or none was
    /// taken): reading the counters costs something, so callers ask first.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|(t, _)| now.duration_since(t) >= self.every)
    }

    /// Takes a reading; returns the rates since the last one when any
    /// count changed. Counters that went back (a policy swap restarts the
    /// NUMA runner's) count from their new value.
    pub fn reading(&mut self, now: Instant, counts: Counts) -> Option<Rates> {
        let (then, before) = self.last.replace((now, counts))?;
        if counts == before {
            return None;
        }
        let secs = now.duration_since(then).as_secs_f64().max(1e-3);
        let rate = |now: u64, before: u64| {
            let delta = if now >= before { now - before } else { now };
            delta as f64 / secs
        };
        Some(Rates {
            interval_ms: (secs * 1e3).round() as u64,
            merges_per_s: rate(counts.merges, before.merges),
            cow_breaks_per_s: rate(counts.cow_breaks, before.cow_breaks),
            migrations_per_s: rate(counts.migrations, before.migrations),
            frames_moved_per_s: rate(counts.frames_moved, before.frames_moved),
            replications_per_s: rate(counts.replications, before.replications),
        })
    }
}

pub struct EventLog {
    started: Instant,
    next: u64,
    events: VecDeque<Event>,
}

impl EventLog {
    pub fn new(started: Instant) -> EventLog {
        EventLog {
            started,
            next: 1,
            events: VecDeque::new(),
        }
    }

    pub fn push(&mut self, kind: &str, vm: Option<&str>, detail: String) {
        self.push_event(kind, vm, detail, None);
    }

    /// A `rates` event.
    pub fn push_rates(&mut self, rates: Rates) {
        let detail = format!(
            "{:.0} merges/s, {:.0} copy-on-write breaks/s, {:.0} migrations/s ({:.0} frames/s), \
             {:.0} replications/s",
            rates.merges_per_s,
            rates.cow_breaks_per_s,
            rates.migrations_per_s,
            rates.frames_moved_per_s,
            rates.replications_per_s
        );
        self.push_event("rates", None, detail, Some(rates));
    }

    fn push_event(&mut self, kind: &str, vm: Option<&str>, detail: String, rates: Option<Rates>) {
        if self.events.len() == KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            seq: self.next,
            ms: self.started.elapsed().as_millis() as u64,
            kind: kind.to_string(),
            vm: vm.map(str::to_string),
            detail,
            rates,
        });
        self.next += 1;
    }

    /// The events after sequence number `seq` (0: all kept).
    pub fn after(&self, seq: u64) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// The sequence number of the last event (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.next - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_get_what_they_missed_and_old_events_go() {
        let mut log = EventLog::new(Instant::now());
        log.push("vm-added", Some("a"), String::new());
        log.push("vm-started", Some("a"), String::new());
        assert_eq!(log.after(1).len(), 1);
        assert_eq!(log.after(1)[0].kind, "vm-started");
        for _ in 0..KEPT {
            log.push("vm-moved", Some("a"), String::new());
        }
        assert_eq!(log.after(0).len(), KEPT);
        assert_eq!(log.after(0)[0].seq, 3);
        assert_eq!(log.last_seq(), KEPT as u64 + 2);
    }

    #[test]
    fn rates_come_only_when_counts_change() {
        let mut clock = RateClock::new(std::time::Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(clock.due(t0));
        let c = Counts {
            merges: 10,
            ..Counts::default()
        };
        assert_eq!(clock.reading(t0, c), None, "the first reading is a base");
        let t1 = t0 + std::time::Duration::from_millis(500);
        assert!(!clock.due(t1));
        let t2 = t0 + std::time::Duration::from_secs(2);
        assert_eq!(clock.reading(t2, c), None, "nothing changed");
        let more = Counts {
            merges: 30,
            migrations: 4,
            ..c
        };
        let t3 = t2 + std::time::Duration::from_secs(2);
        let r = clock.reading(t3, more).unwrap();
        assert_eq!((r.merges_per_s, r.migrations_per_s), (10.0, 2.0));
        assert_eq!(r.interval_ms, 2000);
        // A restarted counter counts from its new value.
        let restarted = Counts {
            migrations: 1,
            ..more
        };
        let r = clock
            .reading(t3 + std::time::Duration::from_secs(1), restarted)
            .unwrap();
        assert_eq!(r.migrations_per_s, 1.0);
        let mut log = EventLog::new(t0);
        log.push_rates(r);
        let e = &log.after(0)[0];
        assert_eq!(e.kind, "rates");
        assert!(e.detail.contains("1 migrations/s"), "{}", e.detail);
    }
}
