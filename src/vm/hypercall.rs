//! The micro-guest hypercalls: port I/O to ports the monitor reserves.
//!
//! Port I/O is the one exit a CPL 3 guest can make without any kernel-side
//! setup (IOPL 3 lets it execute `in`/`out`); the arguments travel in
//! registers the monitor reads with `KVM_GET_REGS`. Each hypercall costs an
//! exit to user space (~30 µs on the build hosts, docs/host-facts.md), so guests use them only to
//! start, log and finish; progress goes through guest memory instead.
//!
//! | port | instruction | meaning |
//! |---|---|---|
//! | [`WHOAMI_PORT`] | `in eax, dx` | returns the vCPU's index in its VM |
//! | [`DONE_PORT`] | `out dx, al` | the vCPU is done; `rdi` = 64-bit result |
//! | [`LOG_PORT`] | `out dx, al` | log the string at guest address `rdi`, `rsi` bytes |
//!
//! Any other port is an error that stops the VM.

use super::ram::GuestRam;

/// `in eax, dx`: the vCPU's index.
pub const WHOAMI_PORT: u16 = 0x0510;
/// `out dx, al`: done, result in `rdi`.
pub const DONE_PORT: u16 = 0x0511;
/// `out dx, al`: log `rsi` bytes at guest address `rdi` (identity-mapped).
pub const LOG_PORT: u16 = 0x0512;
/// Longest log line accepted, in bytes.
pub const MAX_LOG_LEN: u64 = 1024;

/// What a guest asked for with port I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    WhoAmI,
    Done,
    Log,
}

impl Hypercall {
    /// The hypercall a port access is, given its direction; `None` for an
    /// unknown port or the wrong direction.
    pub fn decode(port: u16, is_in: bool) -> Option<Hypercall> {
        match (port, is_in) {
            (WHOAMI_PORT, true) => Some(Hypercall::WhoAmI),
            (DONE_PORT, false) => Some(Hypercall::Done),
            (LOG_PORT, false) => Some(Hypercall::Log),
            _ => None,
        }
    }
}

/// Reads the LOG hypercall's string (lossily decoded as UTF-8).
pub fn read_log_line(ram: &GuestRam, addr: u64, len: u64) -> Result<String, String> {
    if len > MAX_LOG_LEN {
        return Err(format!(
            "LOG hypercall with {len} bytes (at most {MAX_LOG_LEN})"
        ));
    }
    let bytes = ram
        .read(addr, len as usize)
        .ok_or_else(|| format!("LOG hypercall string at {addr:#x}+{len} is outside guest RAM"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
