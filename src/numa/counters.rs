//! Counter sources: where the policy engine's access samples come from.
//!
//! Every source yields [`AccessSample`]s (which VM touched which guest frame,
//! from which node, reading or writing) through one trait,
//! [`CounterSource`], and says in [`CounterSource::describe`] which source it
//! is and why it was chosen, so the monitor's report can state the source in
//! force. The sources:
//!
//! 1. **hardware perf events** per vCPU thread (LLC / cache / node-load
//!    misses, on a host with a PMU; [`super::hardware`]). They count per
//!    thread and do not name pages, so they steer the page sampler's effort
//!    toward the VMs that miss most rather than yield samples themselves.
//!    [`probe_hardware_pmu`] opens them through `perf-event2` and, when there
//!    is no PMU (as on the build machines, see docs/host-facts.md: the open fails with
//!    `ENOENT`), returns the reason, which [`choose_source`] turns into a
//!    fallback;
//! 2. **page-level samples** (hinting faults on a sample of pages), which work
//!    everywhere; the source lives with the fault handlers;
//! 3. **a replayed trace file** ([`super::trace::TraceSource`]), for
//!    deterministic tests and for researchers.

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use crate::config::Sampling;
pub use crate::memory::sampler::AccessSample;

/// A source of access samples, polled once per policy epoch.
pub trait CounterSource: Send {
    /// Short name: `hardware`, `page-faults`, `trace`, ...
    fn name(&self) -> &str;
    /// Which source this is and why it is the one in use (e.g. the reason
    /// the hardware source was not available), for the run report.
    fn describe(&self) -> String;
    /// Appends the samples gathered since the last poll to `out`.
    fn poll(&mut self, out: &mut Vec<AccessSample>) -> anyhow::Result<()>;
}

/// Which source to build, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceChoice {
    pub kind: SourceKind,
    /// One sentence for the report: what was asked for and what is used.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    Hardware,
    PageFaults,
    Trace(PathBuf),
}

/// Resolves the policy's `sampling` knob against what the host offers.
/// `pmu` is the outcome of [`probe_hardware_pmu`] (passed in so this stays
/// pure and testable). `auto` falls back to page-fault sampling with the
/// PMU's failure as the stated reason; an explicit `hardware` without a PMU
/// is an error, since an experiment asking for it should not silently
/// measure something else.
pub fn choose_source(
    sampling: Sampling,
    trace_file: Option<&Path>,
    pmu: Result<(), String>,
) -> Result<SourceChoice, String> {
    match sampling {
        Sampling::Trace => {
            let path = trace_file.ok_or_else(|| {
                "sampling = \"trace\" needs `trace_file` (the trace to replay)".to_string()
            })?;
            Ok(SourceChoice {
                kind: SourceKind::Trace(path.to_path_buf()),
                reason: format!(
                    "replaying trace file {} (sampling = \"trace\")",
                    path.display()
                ),
            })
        }
        Sampling::PageFaults => Ok(SourceChoice {
            kind: SourceKind::PageFaults,
            reason: "page-level samples from hinting faults (sampling = \"page-faults\")".into(),
        }),
        Sampling::Hardware => match pmu {
            Ok(()) => Ok(SourceChoice {
                kind: SourceKind::Hardware,
                reason: "hardware miss counters per vCPU thread steer page sampling \
                         (sampling = \"hardware\")"
                    .into(),
            }),
            Err(why) => Err(format!(
                "sampling = \"hardware\" but the hardware counters are unusable: {why}; \
                 use sampling = \"auto\" to fall back to page-fault samples"
            )),
        },
        Sampling::Auto => Ok(match pmu {
            Ok(()) => SourceChoice {
                kind: SourceKind::Hardware,
                reason: "hardware miss counters per vCPU thread steer page sampling \
                         (sampling = \"auto\", PMU present)"
                    .into(),
            },
            Err(why) => SourceChoice {
                kind: SourceKind::PageFaults,
                reason: format!(
                    "page-level samples from hinting faults (sampling = \"auto\"; \
                     hardware counters unusable: {why})"
                ),
            },
        }),
    }
}

/// Tries to open the hardware counters of [`super::hardware::EventSet::hardware`]
/// (LLC read misses, cache misses, node load misses) for the calling thread
/// through `perf-event2`, and closes them again. `Ok` when at least one
/// opens; `Err` carries a sentence saying why hardware counters cannot be
/// used here (on the build machines: no PMU, `ENOENT`).
pub fn probe_hardware_pmu() -> Result<(), String> {
    super::hardware::probe(&super::hardware::EventSet::hardware()).map(|_| ())
}

/// The sentence for a failed `perf_event_open` of `events` (one event name
/// or several, comma-separated); `hardware` says whether they are PMU
/// events. Separate so it is tested.
pub(crate) fn explain_perf_error(
    events: &str,
    hardware: bool,
    errno: i32,
    paranoid: Option<i64>,
) -> String {
    let call = format!("perf_event_open({events})");
    match errno {
        libc::ENOENT | libc::EOPNOTSUPP if hardware => format!(
            "no hardware PMU: {call} failed with {} (the CPU or hypervisor exposes no \
             such hardware event, e.g. a VM without a virtual PMU)",
            errno_name(errno)
        ),
        libc::ENOENT | libc::EOPNOTSUPP => format!(
            "{call} failed with {}: the kernel does not offer this event",
            errno_name(errno)
        ),
        libc::ENODEV if hardware => {
            format!("no hardware PMU: {call} failed with ENODEV (no PMU driver for this CPU)")
        }
        libc::ENOSYS => {
            format!("{call} failed with ENOSYS: the kernel is built without perf events")
        }
        libc::EACCES | libc::EPERM => format!(
            "{call} is not permitted ({}; kernel.perf_event_paranoid = {}): run as root \
             or lower kernel.perf_event_paranoid",
            errno_name(errno),
            paranoid.map_or("unknown".to_string(), |p| p.to_string())
        ),
        libc::ESRCH => format!("{call} failed with ESRCH: the thread has exited"),
        libc::EMFILE => format!("{call} failed with EMFILE: too many open files"),
        other => format!(
            "{call} failed: {}",
            std::io::Error::from_raw_os_error(other)
        ),
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ENODEV => "ENODEV",
        _ => "an error",
    }
}

/// A source that replays samples held in memory, one batch per poll; after
/// the last batch it yields nothing. For tests and for feeding the engine
/// from code.
pub struct ReplaySource {
    name: String,
    description: String,
    epochs: std::collections::VecDeque<Vec<AccessSample>>,
}

impl ReplaySource {
    pub fn new(description: &str, epochs: Vec<Vec<AccessSample>>) -> ReplaySource {
        ReplaySource {
            name: "replay".into(),
            description: description.into(),
            epochs: epochs.into(),
        }
    }

    /// Batches not yet polled.
    pub fn remaining(&self) -> usize {
        self.epochs.len()
    }
}

impl CounterSource for ReplaySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn poll(&mut self, out: &mut Vec<AccessSample>) -> anyhow::Result<()> {
        if let Some(batch) = self.epochs.pop_front() {
            out.extend(batch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_a_reason_or_succeeds() {
        match probe_hardware_pmu() {
            Ok(()) => {}
            Err(why) => {
                assert!(why.contains("perf_event_open"), "{why}");
                // docs/host-facts.md: the build machines have no PMU and fail with ENOENT.
                if std::path::Path::new("/sys/bus/event_source/devices/cpu").exists() {
                    return;
                }
                assert!(why.contains("no hardware PMU"), "{why}");
            }
        }
    }

    #[test]
    fn errors_are_explained() {
        let e = explain_perf_error("cache-misses", true, libc::ENOENT, None);
        assert!(e.contains("ENOENT") && e.contains("no hardware PMU"), "{e}");
        assert!(e.contains("perf_event_open(cache-misses)"), "{e}");
        // A software event the kernel lacks is not a missing PMU.
        let e = explain_perf_error("task-clock", false, libc::ENOENT, None);
        assert!(!e.contains("PMU") && e.contains("does not offer"), "{e}");
        let e = explain_perf_error("cache-misses", true, libc::EACCES, Some(3));
        assert!(
            e.contains("perf_event_paranoid = 3") && e.contains("root"),
            "{e}"
        );
        assert!(explain_perf_error("x", true, libc::ENOSYS, None).contains("without perf events"));
        assert!(explain_perf_error("x", true, libc::ESRCH, None).contains("exited"));
        assert!(explain_perf_error("x", true, libc::EINVAL, None).contains("failed"));
    }

    #[test]
    fn auto_falls_back_with_the_reason() {
        let c = choose_source(Sampling::Auto, None, Err("no hardware PMU: X".into())).unwrap();
        assert_eq!(c.kind, SourceKind::PageFaults);
        assert!(c.reason.contains("no hardware PMU: X"), "{}", c.reason);
        let c = choose_source(Sampling::Auto, None, Ok(())).unwrap();
        assert_eq!(c.kind, SourceKind::Hardware);
    }

    #[test]
    fn explicit_hardware_without_pmu_is_an_error() {
        let e = choose_source(Sampling::Hardware, None, Err("no PMU".into())).unwrap_err();
        assert!(e.contains("no PMU") && e.contains("auto"), "{e}");
        assert_eq!(
            choose_source(Sampling::Hardware, None, Ok(()))
                .unwrap()
                .kind,
            SourceKind::Hardware
        );
    }

    #[test]
    fn trace_needs_a_file() {
        assert!(choose_source(Sampling::Trace, None, Ok(())).is_err());
        let c = choose_source(Sampling::Trace, Some(Path::new("t.trace")), Ok(())).unwrap();
        assert_eq!(c.kind, SourceKind::Trace("t.trace".into()));
        assert_eq!(
            choose_source(Sampling::PageFaults, None, Ok(()))
                .unwrap()
                .kind,
            SourceKind::PageFaults
        );
    }

    #[test]
    fn sampling_names_round_trip() {
        for name in Sampling::NAMES {
            assert_eq!(Sampling::from_name(name).unwrap().as_str(), *name);
        }
        assert_eq!(Sampling::from_name("pmu"), None);
    }

    #[test]
    fn replay_source_yields_one_batch_per_poll() {
        let mut s = ReplaySource::new("test", vec![vec![AccessSample::read(1, 2, 3)], vec![]]);
        let mut out = Vec::new();
        s.poll(&mut out).unwrap();
        assert_eq!(out, vec![AccessSample::read(1, 2, 3)]);
        s.poll(&mut out).unwrap();
        s.poll(&mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(s.remaining(), 0);
        assert_eq!(s.name(), "replay");
    }
}
