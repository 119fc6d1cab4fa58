//! What happened in a monitor, in order: VMs started, finished, failed,
//! stopped, removed, moved; policy changes. Readers (the API's event
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
    /// `vm-added`, `vm-started`, `vm-finished`, `vm-failed`, `vm-paused`,
    /// `vm-resumed`, `vm-stopped`, `vm-removed`, `vm-moved`, `policy-changed`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub detail: String,
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
        if self.events.len() == KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            seq: self.next,
            ms: self.started.elapsed().as_millis() as u64,
            kind: kind.to_string(),
            vm: vm.map(str::to_string),
            detail,
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
}
