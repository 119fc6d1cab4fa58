//! The `page-faults` counter source: the page sampler seen by the policy
//! engine. The mechanism (zap a page's mapping, catch its next touch as a
//! userfaultfd minor fault, continue it) is the memory layer's
//! ([`crate::memory::sampler`]), since only the memory layer changes guest
//! mappings; the NUMA runner asks `Memory::zap_frames` for each round's
//! zaps and polls the samples here once per epoch.

use std::sync::Arc;

use super::counters::{AccessSample, CounterSource};
use crate::memory::sampler::PageSampler;

const DESCRIPTION: &str = "page-level samples: guest pages zapped with MADV_DONTNEED, \
                           first touches caught as userfaultfd minor faults";

impl CounterSource for PageSampler {
    fn name(&self) -> &str {
        "page-faults"
    }

    fn describe(&self) -> String {
        DESCRIPTION.to_string()
    }

    fn poll(&mut self, out: &mut Vec<AccessSample>) -> anyhow::Result<()> {
        self.drain(out);
        Ok(())
    }
}

/// The shared handle is a source too, so the policy engine can own one
/// `Arc` while the fault handler holds another.
impl CounterSource for Arc<PageSampler> {
    fn name(&self) -> &str {
        "page-faults"
    }

    fn describe(&self) -> String {
        DESCRIPTION.to_string()
    }

    fn poll(&mut self, out: &mut Vec<AccessSample>) -> anyhow::Result<()> {
        self.drain(out);
        Ok(())
    }
}
