//! The monitor's side of live migration (`crate::migration` drives the
//! stream): on the source, the VMs that leave (dirty logging on and off,
//! their states once paused, stopped and removed once the target runs
//! them); on the target, the VMs that arrive (admitted, built on the guest
//! spaces the stream filled, started on commit).

use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::guest::Guest;
use super::snapshot::{vm_config, vm_meta};
use super::{AddError, Monitor, MonitorVm, VmError};
use crate::config::VmConfig;
use crate::memory::{GuestPause, VmId};
use crate::snapshot::VmMeta;
use crate::vm::{MicroVm, MicroVmState};
use crate::PAGE_SIZE;

/// A VM leaving this monitor, as the migration's driver holds it.
pub struct Outgoing {
    pub name: String,
    pub space: VmId,
    pub frames: u64,
    pub meta: VmMeta,
    pub pauser: Arc<dyn GuestPause>,
}

impl Monitor {
    fn micro(&self, name: &str) -> Result<&MicroVm> {
        let i = self
            .index_of(name)
            .ok_or_else(|| anyhow!("VM `{name}` is gone"))?;
        match &self.vms[i].guest {
            Some(Guest::Micro(vm)) => Ok(vm),
            _ => Err(anyhow!("VM `{name}` no longer runs")),
        }
    }

    /// The VMs `names` (running micro-VMs, each named once) about to
    /// migrate, with KVM's dirty logging turned on for each. On an error
    /// nothing is left turned on.
    pub fn migration_start(&mut self, names: &[String]) -> Result<Vec<Outgoing>, VmError> {
        if names.is_empty() {
            return Err(VmError::Invalid {
                field: "vms".into(),
                message: "no VM named; allowed: one or more running micro-VMs".into(),
            });
        }
        let mut out: Vec<Outgoing> = Vec::new();
        for (k, name) in names.iter().enumerate() {
            if names[..k].contains(name) {
                return Err(VmError::Invalid {
                    field: "vms".into(),
                    message: format!("VM `{name}` is named twice"),
                });
            }
            let i = self.live(name)?;
            let v = &self.vms[i];
            let (Some(Guest::Micro(vm)), Some(space)) = (v.guest.as_ref(), v.space) else {
                return Err(VmError::Failed(format!(
                    "VM `{name}` is a Linux guest: live migration is for micro-VMs only \
                     (a Linux guest's devices are not captured)"
                )));
            };
            out.push(Outgoing {
                name: name.clone(),
                space,
                frames: (v.config.memory_mib << 20) / PAGE_SIZE as u64,
                meta: vm_meta(&v.config),
                pauser: vm.pauser(),
            });
        }
        for (k, o) in out.iter().enumerate() {
            if let Err(e) = self
                .micro(&o.name)
                .and_then(|vm| vm.set_dirty_logging(true))
            {
                self.migration_abandon(&out[..k], "");
                return Err(VmError::Failed(format!("{e:#}")));
            }
        }
        Ok(out)
    }

    /// The frames VM `name` wrote since the last call (and clears the log).
    pub fn migration_dirty(&self, name: &str) -> Result<Vec<u64>> {
        self.micro(name)?.take_dirty_log()
    }

    /// The states of the VMs, which the caller has paused.
    pub fn migration_states(&self, out: &[Outgoing]) -> Result<Vec<MicroVmState>> {
        out.iter()
            .map(|o| self.micro(&o.name)?.capture_state())
            .collect()
    }

    /// A migration that failed: dirty logging off again (the VMs run on
    /// here); `why` goes to the event log.
    pub fn migration_abandon(&mut self, out: &[Outgoing], why: &str) {
        for o in out {
            if let Err(e) = self
                .micro(&o.name)
                .and_then(|vm| vm.set_dirty_logging(false))
            {
                tracing::warn!("after a failed migration: {e:#}");
            }
            if !why.is_empty() {
                self.events
                    .push("vm-migration-failed", Some(&o.name), why.to_string());
            }
        }
    }

    /// The target runs the VMs: each is stopped ("migrated to ADDR"), its
    /// pause (held by the caller) ended, and removed with its memory.
    pub fn migration_done(&mut self, out: &[Outgoing], to: &str) {
        let reason = format!("migrated to {to}");
        for o in out {
            if let Err(e) = self.stop(&o.name, &reason) {
                tracing::warn!("stopping migrated VM {}: {e}", o.name);
            }
            o.pauser.resume();
            match self.remove(&o.name) {
                Ok(_) => self
                    .events
                    .push("vm-migrated", Some(&o.name), reason.clone()),
                Err(e) => tracing::warn!("removing migrated VM {}: {e}", o.name),
            }
        }
    }

    /// Target: the configs of VMs arriving as `metas`, admitted (new
    /// names, room in the pools and host memory), with the fault handler
    /// started (pages they share are write-protected).
    pub fn incoming_admit(&mut self, metas: &[VmMeta]) -> Result<Vec<VmConfig>, AddError> {
        let vcs: Vec<VmConfig> = metas.iter().map(|m| vm_config(m, &m.name)).collect();
        self.admit(&vcs, false)?;
        self.services
            .require_fault_handler(&self.memory)
            .map_err(AddError::Host)?;
        Ok(vcs)
    }

    /// Target: a KVM VM per arriving VM on its filled guest space, with
    /// its state; not started. On an error none is left (the caller
    /// destroys the spaces).
    pub fn incoming_build(
        &self,
        vcs: &[VmConfig],
        spaces: &[(VmId, usize)],
        states: &[MicroVmState],
    ) -> Result<Vec<MicroVm>> {
        vcs.iter()
            .zip(spaces)
            .zip(states)
            .map(|((vc, &(space, base)), state)| {
                self.restore_one(vc, space, base, state)
                    .map_err(|e| e.context(format!("building arriving VM {}", vc.name)))
            })
            .collect()
    }

    /// Target: the built VMs join the monitor and start. A name taken
    /// meanwhile refuses all (nothing joins).
    pub fn incoming_start(
        &mut self,
        vcs: &[VmConfig],
        spaces: &[(VmId, usize)],
        vms: Vec<MicroVm>,
        from: &str,
    ) -> Result<(), AddError> {
        if let Some(vc) = vcs.iter().find(|vc| self.index_of(&vc.name).is_some()) {
            return Err(AddError::Exists(vc.name.clone()));
        }
        let first = self.vms.len();
        for ((vc, &(space, _)), vm) in vcs.iter().zip(spaces).zip(vms) {
            let mut v = MonitorVm::new(vc.clone());
            v.ram_base = Some(vm.ram().host_addr);
            v.space = Some(space);
            v.guest = Some(Guest::Micro(Box::new(vm)));
            self.vms.push(v);
            self.events
                .push("vm-migrated-in", Some(&vc.name), format!("from {from}"));
        }
        for i in first..self.vms.len() {
            // A start that fails marks its VM failed (its report says why).
            let _ = self.start_vm(i);
        }
        Ok(())
    }

    /// Target: a migration from `peer` ended without its VMs (`names`).
    pub fn incoming_failed(&mut self, peer: &str, names: &[&str]) {
        self.events.push(
            "vm-migration-failed",
            None,
            format!("incoming from {peer}: {} not taken", names.join(", ")),
        );
    }
}
