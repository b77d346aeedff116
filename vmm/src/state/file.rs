//! The state file format: a small fixed header, then a postcard payload.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "VMMSTATE"
//! 8       4     format_version (u32 LE), FORMAT_VERSION
//! 12      2     vmm_version length n (u16 LE)
//! 14      n     vmm_version (UTF-8, the writer's crate version; informational)
//! 14+n    8     payload length (u64 LE)
//! 22+n    4     CRC-32 (IEEE) of the payload (u32 LE)
//! 26+n    ...   payload: the state, postcard-encoded
//! ```
//!
//! Payload encoding: postcard. Its wire format is specified and frozen at
//! 1.0, it is compact (the XSAVE area and LAPIC page are stored as raw
//! bytes with a varint length, where JSON would spell every byte as a
//! decimal number), and it is serde-based, so the state types need nothing
//! but `#[derive(Serialize, Deserialize)]`. It is not self-describing:
//! `FORMAT_VERSION` must be bumped whenever any saved type changes shape,
//! and a reader refuses every version but its own.
//!
//! The header is parsed by hand, before the payload, so that a file from
//! another format version, a truncated file and a corrupted file are each
//! refused with their own error instead of a generic decode failure.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tracing::debug;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"VMMSTATE";
/// The payload schema version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The version of the VMM that writes the file, recorded for diagnostics.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors writing or reading state files.
#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("Cannot write state file {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("Cannot read state file {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("Not a state file (bad magic)")]
    NotStateFile,
    #[error(
        "State format version {found} is not supported (this build reads version {supported})"
    )]
    Version { found: u32, supported: u32 },
    #[error("State file is truncated: {found} of {expected} bytes")]
    Truncated { expected: u64, found: u64 },
    #[error("State file has {0} unexpected bytes after the payload")]
    TrailingBytes(u64),
    #[error("State payload checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("VMM version string is {0} bytes, more than a state header can hold")]
    VmmVersionTooLong(usize),
    #[error("Cannot encode state")]
    Encode(#[source] postcard::Error),
    #[error("Cannot decode state payload")]
    Decode(#[source] postcard::Error),
}

/// What a state file's header says, besides the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub vmm_version: String,
}

/// Encodes `state` with its header, ready to be written or sent.
pub fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    encode_with(state, FORMAT_VERSION, VMM_VERSION)
}

fn encode_with<T: Serialize>(
    state: &T,
    format_version: u32,
    vmm_version: &str,
) -> Result<Vec<u8>, StateFileError> {
    let payload = postcard::to_allocvec(state).map_err(StateFileError::Encode)?;
    let version_len = u16::try_from(vmm_version.len())
        .map_err(|_| StateFileError::VmmVersionTooLong(vmm_version.len()))?;
    let mut out = Vec::with_capacity(26 + vmm_version.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&format_version.to_le_bytes());
    out.extend_from_slice(&version_len.to_le_bytes());
    out.extend_from_slice(vmm_version.as_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header and checksum of `bytes` and decodes the payload.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<(Header, T), StateFileError> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(StateFileError::NotStateFile);
    }
    let format_version = u32::from_le_bytes(r.array()?);
    if format_version != FORMAT_VERSION {
        return Err(StateFileError::Version {
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    let version_len = u16::from_le_bytes(r.array()?);
    let vmm_version = String::from_utf8_lossy(r.take(version_len.into())?).into_owned();
    let payload_len = u64::from_le_bytes(r.array()?);
    let stored = u32::from_le_bytes(r.array()?);
    let rest = (bytes.len() - r.pos) as u64;
    if rest < payload_len {
        return Err(StateFileError::Truncated {
            // The length is the file's word: it may be anything up to u64::MAX.
            expected: (r.pos as u64).saturating_add(payload_len),
            found: bytes.len() as u64,
        });
    }
    if rest > payload_len {
        return Err(StateFileError::TrailingBytes(rest - payload_len));
    }
    let payload = &bytes[r.pos..];
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return Err(StateFileError::Checksum { stored, computed });
    }
    if vmm_version != VMM_VERSION {
        debug!(%vmm_version, "State was written by another VMM version");
    }
    let state = postcard::from_bytes(payload).map_err(StateFileError::Decode)?;
    let header = Header {
        format_version,
        vmm_version,
    };
    Ok((header, state))
}

/// Writes `state` to `path`: to a temporary file beside it, synced, then
/// renamed over `path`, so a crash never leaves a half-written file under
/// the final name.
pub fn write_state_file<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let bytes = encode_state(state)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| StateFileError::Write(path.to_owned(), e))
}

/// Reads a state file written by [`write_state_file`], refusing another
/// format version, a truncated file and a bad checksum.
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let bytes = fs::read(path).map_err(|e| StateFileError::Read(path.to_owned(), e))?;
    decode_state(&bytes).map(|(_, state)| state)
}

/// A cursor whose short reads are `Truncated` errors.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateFileError> {
        let end = self.pos + n;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(StateFileError::Truncated {
                expected: end as u64,
                found: self.bytes.len() as u64,
            })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateFileError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        counter: u64,
        name: String,
        blob: Vec<u8>,
    }

    fn sample() -> Sample {
        Sample {
            counter: 0x1234_5678_9abc,
            name: "vcpu0".into(),
            blob: (0..=255).collect(),
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-state-{}-{name}", std::process::id()))
    }

    #[test]
    fn written_file_reads_back_equal() {
        let path = temp_path("roundtrip");

        write_state_file(&path, &sample()).unwrap();
        let back: Sample = read_state_file(&path).unwrap();

        assert_eq!(back, sample());
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn header_records_format_and_vmm_version() {
        let bytes = encode_state(&sample()).unwrap();

        let (header, _): (Header, Sample) = decode_state(&bytes).unwrap();

        assert_eq!(header.format_version, FORMAT_VERSION);
        assert_eq!(header.vmm_version, VMM_VERSION);
    }

    #[test]
    fn other_format_version_is_refused() {
        let bytes = encode_with(&sample(), FORMAT_VERSION + 1, VMM_VERSION).unwrap();

        let err = decode_state::<Sample>(&bytes).unwrap_err();

        assert!(
            matches!(err, StateFileError::Version { found, supported }
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{err:?}"
        );
    }

    #[test]
    fn flipped_payload_bit_is_a_checksum_error() {
        let mut bytes = encode_state(&sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;

        let err = decode_state::<Sample>(&bytes).unwrap_err();

        assert!(matches!(err, StateFileError::Checksum { .. }), "{err:?}");
    }

    #[test]
    fn truncated_payload_is_refused_with_sizes() {
        let bytes = encode_state(&sample()).unwrap();
        let cut = &bytes[..bytes.len() - 10];

        let err = decode_state::<Sample>(cut).unwrap_err();

        assert!(
            matches!(err, StateFileError::Truncated { expected, found }
                if expected == bytes.len() as u64 && found == cut.len() as u64),
            "{err:?}"
        );
    }

    #[test]
    fn payload_length_near_u64_max_is_refused_as_truncated() {
        let mut bytes = encode_state(&sample()).unwrap();
        let len_at = 14 + VMM_VERSION.len();
        bytes[len_at..len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());

        let err = decode_state::<Sample>(&bytes).unwrap_err();

        assert!(
            matches!(err, StateFileError::Truncated { expected: u64::MAX, found }
                if found == bytes.len() as u64),
            "{err:?}"
        );
    }

    #[test]
    fn truncated_header_is_refused() {
        let bytes = encode_state(&sample()).unwrap();

        let err = decode_state::<Sample>(&bytes[..10]).unwrap_err();

        assert!(matches!(err, StateFileError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn truncated_file_on_disk_is_refused() {
        let path = temp_path("truncated");
        write_state_file(&path, &sample()).unwrap();
        let len = fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();

        let err = read_state_file::<Sample>(&path).unwrap_err();

        assert!(matches!(err, StateFileError::Truncated { .. }), "{err:?}");
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn appended_bytes_are_refused() {
        let mut bytes = encode_state(&sample()).unwrap();
        bytes.extend_from_slice(&[0; 3]);

        let err = decode_state::<Sample>(&bytes).unwrap_err();

        assert!(matches!(err, StateFileError::TrailingBytes(3)), "{err:?}");
    }

    #[test]
    fn other_file_is_not_a_state_file() {
        let err = decode_state::<Sample>(b"{\"json\": true}").unwrap_err();

        assert!(matches!(err, StateFileError::NotStateFile), "{err:?}");
    }

    #[test]
    fn missing_file_is_a_read_error_naming_the_path() {
        let path = temp_path("missing");

        let err = read_state_file::<Sample>(&path).unwrap_err();

        assert!(
            matches!(&err, StateFileError::Read(p, _) if *p == path),
            "{err:?}"
        );
    }
}
