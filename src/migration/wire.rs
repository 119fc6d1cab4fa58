//! The migration stream's messages and their framing.
//!
//! A frame is `header length (u32 LE) | body length (u32 LE) | CRC-32 of
//! header and body (u32 LE) | header | body`: the header a [`Msg`]
//! serialised with postcard, the body raw page bytes (only [`Msg::Pages`]
//! has one: the pages it carries, in order, `PAGE_SIZE` each), kept out of
//! postcard so 4 KiB pages are copied, not visited byte by byte. Lengths are
//! bounded ([`MAX_HEADER`], [`MAX_BODY`]) before anything is allocated; a
//! frame whose checksum does not match is refused.

use std::io::{Read, Write};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// The first eight bytes of a [`Msg::Hello`].
pub const MAGIC: [u8; 8] = *b"DISCOMIG";

/// The protocol version this build speaks; a target refuses any other.
pub const VERSION: u32 = 1;

/// Largest header (a batch of page descriptions, a VM's state as JSON).
pub const MAX_HEADER: usize = 4 << 20;

/// Largest body (a batch of pages).
pub const MAX_BODY: usize = 16 << 20;

/// One page of a [`Msg::Pages`] batch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WirePage {
    /// `(VM index in the migration, frame)`: every frame the page fills.
    pub owners: Vec<(u32, u64)>,
    /// xxh3-128 of the page's bytes.
    pub hash: u128,
    /// The bytes are in the frame's body; otherwise the target already
    /// holds a page of this hash (sent earlier in this migration, or one
    /// it said it has).
    pub carried: bool,
}

/// The messages of a migration, source to target unless said otherwise.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Msg {
    /// Opens the stream.
    Hello {
        magic: [u8; 8],
        version: u32,
        /// Who sends (e.g. "disco 0.1.0").
        sender: String,
    },
    /// Target: the version is spoken.
    Welcome { version: u32 },
    /// Target: no (a foreign stream, another version, the VMs do not fit,
    /// a name in use, a failure while building); the reason is for people.
    Refuse { reason: String },
    /// The VMs to migrate: `Vec<crate::snapshot::VmMeta>` as JSON (the
    /// snapshot format's description of a VM, reused).
    Begin { vms_json: Vec<u8> },
    /// Target: the VMs are admitted; it holds `indexed_pages` distinct
    /// pages of its own VMs that a query may find.
    Accept { indexed_pages: u64 },
    /// Which of these pages does the target hold already?
    Query { hashes: Vec<u128> },
    /// Target: per queried hash, whether it holds that page (confirmed
    /// against its bytes, which it then keeps for this migration).
    Have { held: Vec<bool> },
    /// A batch of pages; the carried ones' bytes are the frame's body.
    Pages { pages: Vec<WirePage> },
    /// Frames of VM `vm` that now hold zeros (or nothing).
    Zero { vm: u32, frames: Vec<u64> },
    /// Round `round` is over; after round 0 the target builds the guest
    /// spaces and applies later rounds to them.
    RoundEnd { round: u32 },
    /// Target: round `round` is applied (after round 0: the spaces are
    /// built). The source waits for it, so the target never lags a round
    /// behind and the stop-and-copy does not wait for its backlog.
    Applied { round: u32 },
    /// The VMs are paused and every page sent: their states
    /// (`Vec<crate::vm::MicroVmState>` as JSON, in VM order).
    Final { states_json: Vec<u8> },
    /// Target: the VMs are built (not started).
    Ready,
    /// Start them.
    Commit,
    /// Target: they run.
    Started,
}

impl Msg {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Welcome { .. } => "Welcome",
            Msg::Refuse { .. } => "Refuse",
            Msg::Begin { .. } => "Begin",
            Msg::Accept { .. } => "Accept",
            Msg::Query { .. } => "Query",
            Msg::Have { .. } => "Have",
            Msg::Pages { .. } => "Pages",
            Msg::Zero { .. } => "Zero",
            Msg::RoundEnd { .. } => "RoundEnd",
            Msg::Applied { .. } => "Applied",
            Msg::Final { .. } => "Final",
            Msg::Ready => "Ready",
            Msg::Commit => "Commit",
            Msg::Started => "Started",
        }
    }
}

/// Writes one frame; returns the bytes written.
pub fn send(out: &mut impl Write, msg: &Msg, body: &[u8]) -> Result<u64> {
    let header = postcard::to_allocvec(msg).context("encoding a migration message")?;
    ensure!(
        header.len() <= MAX_HEADER,
        "a {} message of {} bytes",
        msg.name(),
        header.len()
    );
    ensure!(body.len() <= MAX_BODY, "a body of {} bytes", body.len());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(body);
    let mut prefix = [0u8; 12];
    prefix[..4].copy_from_slice(&(header.len() as u32).to_le_bytes());
    prefix[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
    prefix[8..].copy_from_slice(&crc.finalize().to_le_bytes());
    out.write_all(&prefix)?;
    out.write_all(&header)?;
    out.write_all(body)?;
    Ok((12 + header.len() + body.len()) as u64)
}

/// Reads one frame: the message and its body. A short read is "the
/// connection closed"; a bad length or checksum names what is wrong.
pub fn recv(input: &mut impl Read) -> Result<(Msg, Vec<u8>)> {
    let mut prefix = [0u8; 12];
    input
        .read_exact(&mut prefix)
        .context("the connection closed or failed")?;
    let header_len = u32::from_le_bytes(prefix[..4].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(prefix[4..8].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(prefix[8..].try_into().unwrap());
    if header_len > MAX_HEADER || body_len > MAX_BODY {
        bail!(
            "not a disco migration frame: header {header_len} and body {body_len} bytes \
             (at most {MAX_HEADER} and {MAX_BODY})"
        );
    }
    let mut header = vec![0u8; header_len];
    input
        .read_exact(&mut header)
        .context("the connection closed or failed inside a frame")?;
    let mut body = vec![0u8; body_len];
    input
        .read_exact(&mut body)
        .context("the connection closed or failed inside a frame")?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header);
    hasher.update(&body);
    if hasher.finalize() != crc {
        bail!("a migration frame failed its CRC-32 check (corrupted in transit)");
    }
    let msg: Msg = postcard::from_bytes(&header).context("not a disco migration message")?;
    Ok((msg, body))
}

/// Reads one frame and refuses anything but what `want` accepts; a
/// [`Msg::Refuse`] becomes an error carrying its reason.
pub fn expect<T>(
    input: &mut impl Read,
    what: &str,
    want: impl FnOnce(Msg, Vec<u8>) -> Option<T>,
) -> Result<T> {
    let (msg, body) = recv(input).with_context(|| format!("waiting for {what}"))?;
    if let Msg::Refuse { reason } = &msg {
        bail!("the target refused: {reason}");
    }
    let name = msg.name();
    want(msg, body).ok_or_else(|| anyhow::anyhow!("expected {what}, got a {name} message"))
}

/// xxh3-128 of a page.
pub fn page_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let msg = Msg::Pages {
            pages: vec![WirePage {
                owners: vec![(0, 7), (1, 9)],
                hash: 42,
                carried: true,
            }],
        };
        let mut buf = Vec::new();
        let n = send(&mut buf, &msg, &[5u8; 4096]).unwrap();
        assert_eq!(n as usize, buf.len());
        let (back, body) = recv(&mut buf.as_slice()).unwrap();
        assert_eq!(back, msg);
        assert_eq!(body, vec![5u8; 4096]);
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let e = recv(&mut buf.as_slice()).unwrap_err();
        assert!(format!("{e:#}").contains("CRC-32"), "{e:#}");
        let e = recv(&mut &buf[..20]).unwrap_err();
        assert!(format!("{e:#}").contains("closed"), "{e:#}");
    }
}
