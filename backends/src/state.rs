//! The backend's own saved state (VHOST_USER_PROTOCOL_F_DEVICE_STATE): what
//! SET_DEVICE_STATE_FD hands the frontend on SAVE and takes back on LOAD.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "VUBSTATE"
//! 8       4     format_version (u32 LE), FORMAT_VERSION
//! 12      8     payload length (u64 LE)
//! 20      4     CRC-32 (IEEE) of the payload (u32 LE)
//! 24      ...   payload: SavedState, postcard-encoded
//! ```
//!
//! The same choices as the VMM's own state files (`vmm/src/state/file.rs`):
//! postcard is compact, frozen at 1.0 and serde-based, but not
//! self-describing, so `FORMAT_VERSION` is bumped whenever [`SavedState`]
//! or [`CommonState`] change shape and a reader refuses every version but
//! its own. The device part is opaque bytes here; each device versions its
//! own (see `Device::save_state`). The header is parsed by hand first, so a
//! foreign, truncated or corrupted blob each gets its own error.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// First bytes of every saved backend state.
pub const MAGIC: [u8; 8] = *b"VUBSTATE";
/// The envelope version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state accepted on LOAD: far above what any device saves, low
/// enough that a frontend cannot make the backend allocate without bound.
pub const MAX_STATE_LEN: usize = 1 << 20;
const HEADER_LEN: usize = 24;

/// Errors encoding, decoding or checking a saved state.
#[derive(Debug, Error)]
pub enum StateError {
    /// The blob does not start with [`MAGIC`].
    #[error("Not a backend state (bad magic)")]
    BadMagic,
    /// Another envelope version.
    #[error("State format version {found} is not supported (this build reads {supported})")]
    Version {
        /// Version in the blob.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// Shorter than its header says.
    #[error("State is truncated: {found} of {expected} bytes")]
    Truncated {
        /// Length the header announces (header included).
        expected: u64,
        /// Length received.
        found: u64,
    },
    /// Bytes after the payload.
    #[error("State has {0} unexpected bytes after the payload")]
    TrailingBytes(u64),
    /// The payload does not match its checksum.
    #[error("State checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the payload received.
        computed: u32,
    },
    /// More than [`MAX_STATE_LEN`] bytes.
    #[error("State is larger than {MAX_STATE_LEN} bytes")]
    TooLarge,
    /// postcard could not encode the state.
    #[error("Cannot encode state")]
    Encode(#[source] postcard::Error),
    /// The payload is not a valid state.
    #[error("Cannot decode state payload")]
    Decode(#[source] postcard::Error),
}

/// One vring as the backend saw it when saving (every ring stopped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// SET_VRING_NUM (0: never set).
    pub size: u16,
    /// The next available-ring index the backend would have taken: the
    /// value GET_VRING_BASE returned.
    pub next_avail: u16,
    /// Whether the ring was enabled (the frontend disables rings before a
    /// snapshot, so normally false; informational, not applied).
    pub enabled: bool,
}

/// The inflight region's geometry (GET/SET_INFLIGHT_FD), if one was in use.
/// The region itself belongs to the frontend and is handed over again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightInfo {
    /// Queues the region covers.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

/// What every device saves: the vhost-user layer's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonState {
    /// Virtio features acked with SET_FEATURES (vhost-user bit included), if any.
    pub features: Option<u64>,
    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub protocol_features: u64,
    /// One entry per queue the device offers.
    pub queues: Vec<QueueState>,
    /// Inflight tracking in use.
    pub inflight: Option<InflightInfo>,
}

/// The whole saved state: common part and the device's own bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The device type that wrote it (`Device::state_kind`).
    pub kind: String,
    /// The vhost-user layer's part.
    pub common: CommonState,
    /// The device's part (`Device::save_state`), opaque here.
    pub device: Vec<u8>,
}

/// Encodes `state` with its header.
pub fn encode(state: &SavedState) -> Result<Vec<u8>, StateError> {
    let payload = postcard::to_allocvec(state).map_err(StateError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header and checksum of `bytes` and decodes the payload.
pub fn decode(bytes: &[u8]) -> Result<SavedState, StateError> {
    if bytes.len() > MAX_STATE_LEN {
        return Err(StateError::TooLarge);
    }
    let field = |at: usize, len: usize| {
        bytes.get(at..at + len).ok_or(StateError::Truncated {
            expected: HEADER_LEN as u64,
            found: bytes.len() as u64,
        })
    };
    if field(0, 8)? != MAGIC {
        return Err(StateError::BadMagic);
    }
    let le = |b: &[u8]| {
        b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    };
    let found = le(field(8, 4)?) as u32;
    if found != FORMAT_VERSION {
        return Err(StateError::Version {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let payload_len = le(field(12, 8)?);
    let stored = le(field(20, 4)?) as u32;
    let rest = (bytes.len() - HEADER_LEN) as u64;
    if rest < payload_len {
        return Err(StateError::Truncated {
            expected: HEADER_LEN as u64 + payload_len,
            found: bytes.len() as u64,
        });
    }
    if rest > payload_len {
        return Err(StateError::TrailingBytes(rest - payload_len));
    }
    let payload = &bytes[HEADER_LEN..];
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return Err(StateError::Checksum { stored, computed });
    }
    postcard::from_bytes(payload).map_err(StateError::Decode)
}

/// postcard-encodes a device's part of the state (for `Device::save_state`).
pub fn to_bytes<T: Serialize>(part: &T) -> Result<Vec<u8>, StateError> {
    postcard::to_allocvec(part).map_err(StateError::Encode)
}

/// Decodes a device's part of the state (for `Device::load_state`).
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    postcard::from_bytes(bytes).map_err(StateError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        SavedState {
            kind: "test".into(),
            common: CommonState {
                features: Some(1 << 32),
                protocol_features: 0x8_0000,
                queues: vec![QueueState {
                    size: 128,
                    next_avail: 7,
                    enabled: false,
                }],
                inflight: None,
            },
            device: vec![1, 2, 3],
        }
    }

    #[test]
    fn encoded_state_decodes_to_the_same_value() {
        let state = sample();

        let back = decode(&encode(&state).unwrap()).unwrap();

        assert_eq!(back, state);
    }

    #[test]
    fn flipped_payload_byte_fails_the_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;

        let err = decode(&bytes).unwrap_err();

        assert!(matches!(err, StateError::Checksum { .. }), "{err}");
    }

    #[test]
    fn other_format_version_is_refused_with_both_versions() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8] = 9;

        let err = decode(&bytes).unwrap_err();

        assert!(matches!(
            err,
            StateError::Version {
                found: 9,
                supported: FORMAT_VERSION
            }
        ));
    }

    #[test]
    fn garbage_and_truncated_blobs_get_their_own_errors() {
        let bytes = encode(&sample()).unwrap();

        let garbage = decode(b"not a state at all, just bytes").unwrap_err();
        let short = decode(&bytes[..bytes.len() - 2]).unwrap_err();
        let empty = decode(&[]).unwrap_err();

        assert!(matches!(garbage, StateError::BadMagic));
        assert!(matches!(short, StateError::Truncated { .. }));
        assert!(matches!(empty, StateError::Truncated { .. }));
    }
}
