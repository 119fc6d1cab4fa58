//! NUMA placement: where access samples come from and what to do about them.
//!
//! - [`counters`]: the [`CounterSource`] trait every sample source
//!   implements, the hardware PMU probe and the choice of source (with the
//!   reason the report states);
//! - [`hardware`]: perf-event counter groups per vCPU thread (hardware
//!   misses where the PMU offers them, software events elsewhere), read
//!   per epoch and summed per VM, and the split of the page-sampling budget
//!   by each VM's share of misses;
//! - [`trace`]: a line-oriented trace format of access samples, its parser,
//!   writer, replaying source and recorder;
//! - [`policy`]: the [`PolicyEngine`], Disco's rules (migrate, replicate,
//!   leave write-shared pages alone, freeze ping-pong pages, copy budget)
//!   over decayed per-page per-node counts. Pure logic: the monitor feeds it
//!   samples, answers [`PageFacts`] from the pmap, and carries out the
//!   [`Decision`]s through the mapper.
//!
//! Every knob comes from the `[numa]` section of the policy file
//! ([`crate::config::NumaPolicy`]; `policies/*.toml` explain each one).

pub mod cap;
pub mod counters;
pub mod hardware;
pub mod policy;
pub mod runner;
pub mod sampler;
pub mod trace;

pub use counters::{
    choose_source, probe_hardware_pmu, AccessSample, CounterSource, ReplaySource, Sampling,
    SourceChoice, SourceKind,
};
pub use hardware::{scale_sample_budget, EventSet, MissCounters};
pub use policy::{
    Decision, EpochStats, PageCounts, PageFacts, PageKey, PageLocation, PolicyEngine,
};
pub use trace::{Recorder, Trace, TraceError, TraceSource, TraceWriter};
