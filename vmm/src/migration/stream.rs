//! The migration stream: a hello, then frames.
//!
//! Hello (source → destination, 16 bytes): [`MAGIC`], the stream
//! [`VERSION`] (u32 LE) and flags (u32 LE; bit 0: local, then the guest
//! memfd follows alone with `SCM_RIGHTS` and one byte).
//!
//! A frame: kind (u32 LE), 4 reserved bytes, payload length (u64 LE), the
//! payload. Source → destination: `Start` ([`Start`] in the checksummed
//! state container of [`crate::state::file`]), `Memory` (guest-physical
//! address u64 LE, then the bytes), `State` (a
//! [`crate::snapshot::SnapshotState`] in the same container), `Complete`
//! (one byte: resume the VM), `Abandon`. Destination → source: `Ok`, or
//! `Error` with a UTF-8 message, after `Start`, `State` and `Complete`.
//!
//! Every length is checked against a bound before anything is allocated,
//! and every memory frame against guest RAM before a byte is written.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::MigrationError;
use crate::config::VmConfig;

pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
/// Bumped whenever the frames or their payloads change incompatibly (the
/// state container carries its own version too).
pub const VERSION: u32 = 1;
const FLAG_LOCAL: u32 = 1;
/// The largest `Start`/`State` payload accepted.
pub const MAX_STATE: u64 = 64 << 20;
/// The largest `Error` message accepted.
const MAX_ERROR: u64 = 64 << 10;
/// The largest memory frame sent (and accepted).
pub const MAX_MEMORY: u64 = 1 << 30;

type Result<T> = std::result::Result<T, MigrationError>;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Start,
    Memory,
    State,
    Complete,
    Abandon,
    Ok,
    Error,
}

impl Kind {
    const ALL: [(Self, u32, &'static str); 7] = [
        (Self::Start, 1, "Start"),
        (Self::Memory, 2, "Memory"),
        (Self::State, 3, "State"),
        (Self::Complete, 4, "Complete"),
        (Self::Abandon, 5, "Abandon"),
        (Self::Ok, 0x10, "Ok"),
        (Self::Error, 0x11, "Error"),
    ];

    fn code(self) -> u32 {
        Self::ALL.iter().find(|k| k.0 == self).map_or(0, |k| k.1)
    }

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|k| k.0 == self).map_or("?", |k| k.2)
    }

    fn from_code(c: u32) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|k| k.1 == c)
            .map(|k| k.0)
            .ok_or(MigrationError::UnknownKind(c))
    }
}

/// What the destination needs before any memory arrives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Start {
    pub config: VmConfig,
    /// The sending vmm's version, for the log.
    pub vmm_version: String,
}

fn io(e: std::io::Error) -> MigrationError {
    MigrationError::Io(e)
}

pub fn write_hello(w: &mut impl Write, local: bool) -> Result<()> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..].copy_from_slice(&(if local { FLAG_LOCAL } else { 0 }).to_le_bytes());
    w.write_all(&b).map_err(io)
}

/// Reads and checks the hello; `true` for a local migration.
pub fn read_hello(r: &mut impl Read) -> Result<bool> {
    let mut b = [0u8; 16];
    r.read_exact(&mut b).map_err(io)?;
    if b[..8] != MAGIC {
        return Err(MigrationError::Magic);
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(MigrationError::Version {
            found: version,
            expected: VERSION,
        });
    }
    let flags = u32::from_le_bytes(b[12..].try_into().unwrap_or_default());
    Ok(flags & FLAG_LOCAL != 0)
}

pub fn write_header(w: &mut impl Write, kind: Kind, len: u64) -> Result<()> {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&kind.code().to_le_bytes());
    b[8..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&b).map_err(io)
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<()> {
    write_header(w, kind, payload.len() as u64)?;
    w.write_all(payload).map_err(io)
}

pub fn read_header(r: &mut impl Read) -> Result<(Kind, u64)> {
    let mut b = [0u8; 16];
    r.read_exact(&mut b).map_err(io)?;
    let kind = Kind::from_code(u32::from_le_bytes(b[..4].try_into().unwrap_or_default()))?;
    Ok((
        kind,
        u64::from_le_bytes(b[8..].try_into().unwrap_or_default()),
    ))
}

/// Reads a payload of `len` bytes, refused above `max`.
pub fn read_payload(r: &mut impl Read, kind: Kind, len: u64, max: u64) -> Result<Vec<u8>> {
    if len > max {
        return Err(MigrationError::TooLarge {
            what: kind.name(),
            len,
        });
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v).map_err(io)?;
    Ok(v)
}

/// Sends a serde value in the checksummed, versioned state container.
pub fn write_state<T: Serialize>(w: &mut impl Write, kind: Kind, v: &T) -> Result<()> {
    let bytes = crate::state::file::encode_state(v)?;
    write_frame(w, kind, &bytes)
}

/// Reads the payload of a `Start` or `State` frame.
pub fn read_state<T: serde::de::DeserializeOwned>(
    r: &mut impl Read,
    kind: Kind,
    len: u64,
) -> Result<T> {
    let bytes = read_payload(r, kind, len, MAX_STATE)?;
    Ok(crate::state::file::decode_state(&bytes)?.1)
}

/// Waits for the destination's answer: `Ok`, or its `Error` message.
pub fn expect_ok(r: &mut impl Read) -> Result<()> {
    match read_header(r)? {
        (Kind::Ok, 0) => Ok(()),
        (Kind::Error, len) => {
            let msg = read_payload(r, Kind::Error, len, MAX_ERROR)?;
            Err(MigrationError::Refused(
                String::from_utf8_lossy(&msg).into_owned(),
            ))
        }
        (k, _) => Err(MigrationError::Unexpected {
            found: k.name(),
            expected: "Ok",
        }),
    }
}

/// What the destination answers on failure.
pub fn write_error(w: &mut impl Write, e: &MigrationError) -> Result<()> {
    write_frame(w, Kind::Error, crate::error_chain(e).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_garbage_or_other_versions_are_refused() {
        let mut b = Vec::new();
        write_hello(&mut b, true).unwrap();
        assert!(read_hello(&mut &b[..]).unwrap());

        let mut other = b.clone();
        other[8] = 9;
        assert!(matches!(
            read_hello(&mut &other[..]),
            Err(MigrationError::Version { found: 9, .. })
        ));
        assert!(matches!(
            read_hello(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]),
            Err(MigrationError::Magic)
        ));
        assert!(matches!(
            read_hello(&mut &b[..10]),
            Err(MigrationError::Io(_))
        ));
    }

    #[test]
    fn unknown_kinds_and_oversized_payloads_are_refused_before_allocating() {
        let mut b = Vec::new();
        write_header(&mut b, Kind::State, u64::MAX).unwrap();
        let (kind, len) = read_header(&mut &b[..]).unwrap();
        assert!(matches!(
            read_payload(&mut &b[16..], kind, len, MAX_STATE),
            Err(MigrationError::TooLarge { what: "State", .. })
        ));
        b[0] = 0x77;
        assert!(matches!(
            read_header(&mut &b[..]),
            Err(MigrationError::UnknownKind(0x77))
        ));
    }

    #[test]
    fn refusal_message_reaches_the_source() {
        let mut b = Vec::new();
        write_error(&mut b, &MigrationError::Abandoned).unwrap();
        let err = expect_ok(&mut &b[..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "The destination refused: The source abandoned the migration"
        );
    }
}
