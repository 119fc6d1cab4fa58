//! Live migration of running micro-VMs between two disco monitors over
//! TCP (on one host or two).
//!
//! * [`wire`]: the stream's messages (postcard) in checksummed frames, and
//!   the versioned handshake's constants.
//! * [`source`]: [`migrate`] sends VMs of a monitor: pre-copy rounds with
//!   KVM's dirty log (round 0 every page that holds data, then the pages
//!   written meanwhile), the guest throttled when the rounds stop
//!   shrinking, then pause, the rest and the vCPU states, commit, and the
//!   VMs stopped and removed here once the target runs them.
//! * [`target`]: [`Listener`] (`disco serve --migrate-listen ADDR`) takes
//!   migrations in: round 0 is staged, then built into guest spaces with
//!   the sharing it carried (pages the VMs share are mapped shared); later
//!   rounds are written into those spaces; the VMs join the monitor only
//!   on commit. Any failure destroys what the session built.
//!
//! Sharing-aware transfer: each page content goes once per migration
//! (frames of a VM that map one machine page are listed as its owners;
//! a page whose xxh3-128 was sent before, in this VM or another migrating
//! with it, goes as a reference), zero pages are not sent (round 0) or go
//! as a list of frames (later rounds), and pages the target holds already
//! (asked by hash in batches; the target re-reads and re-hashes its
//! candidate before it says yes) are not sent at all.

pub mod source;
pub mod target;
pub mod wire;

use serde::{Deserialize, Serialize};

pub use source::{migrate, MigrateError, MigrateOptions};
pub use target::Listener;

/// What a migration did (the API's answer, `disco ctl migrate`'s lines).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub vms: Vec<String>,
    pub to: String,
    /// Pre-copy rounds (round 0 included) plus the final stop-and-copy.
    pub rounds: u32,
    /// Pages found written in each round after round 0, then in the final
    /// one (all VMs).
    pub dirty_pages: Vec<u64>,
    /// The migrated VMs' RAM, bytes.
    pub guest_ram_bytes: u64,
    /// Every byte the source wrote to the stream.
    pub bytes_sent: u64,
    /// Pages whose bytes went over the wire.
    pub pages_carried: u64,
    /// Pages sent as a reference to one sent before in this migration.
    pub pages_referenced: u64,
    /// Pages the target held already (by hash, confirmed there).
    pub pages_target_had: u64,
    /// Frames that held zeros or nothing in round 0 (not sent).
    pub zero_frames: u64,
    /// Distinct non-zero page contents in round 0 (the yardstick of
    /// `bytes_sent`).
    pub distinct_pages: u64,
    /// `bytes_sent` / (`distinct_pages` x 4096).
    pub bytes_per_distinct_page: f64,
    /// Pages the guests wrote per second before round 0 (watched 40 ms).
    pub dirty_pages_per_s: f64,
    /// Highest throttle (share of time the guests were held) used.
    pub throttle_percent: u32,
    pub total_ms: f64,
    /// From pausing the VMs here until the target said they run.
    pub downtime_ms: f64,
    /// Within the downtime, ms from the pause: the VMs held; the last
    /// pages and the states sent; the target's VMs built.
    pub downtime_parts_ms: Vec<f64>,
}

impl MigrationReport {
    /// The report as lines for people.
    pub fn lines(&self) -> Vec<String> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        vec![
            format!("migrated {} to {}", self.vms.join(", "), self.to),
            format!(
                "rounds {} (dirty pages per round after the first: {})",
                self.rounds,
                self.dirty_pages
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            format!(
                "sent {:.1} MiB for {:.1} MiB of guest RAM ({:.2} x its {} distinct non-zero pages)",
                mib(self.bytes_sent),
                mib(self.guest_ram_bytes),
                self.bytes_per_distinct_page,
                self.distinct_pages
            ),
            format!(
                "pages: {} carried, {} by reference, {} already on the target, {} zero frames skipped",
                self.pages_carried, self.pages_referenced, self.pages_target_had, self.zero_frames
            ),
            format!(
                "total {:.0} ms, downtime {:.1} ms, guests wrote {:.0} pages/s, throttle up to {} %",
                self.total_ms, self.downtime_ms, self.dirty_pages_per_s, self.throttle_percent
            ),
        ]
    }
}
