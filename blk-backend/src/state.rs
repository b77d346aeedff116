//! The virtio-blk part of a saved backend state (see `backends::state`).
//!
//! A blk device keeps no runtime setting a frontend can change (its config
//! space is read-only and writeback caching is not offered), so its part is
//! the disk's identity, checked on LOAD: a state is refused by a backend
//! whose disk has another capacity, another read-only setting or another
//! number of queues, since the guest's view of the disk would change under it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use backends::state::{self, StateError};

/// Version of [`BlkState`]'s layout; bumped when it changes shape.
pub const BLK_STATE_VERSION: u32 = 1;
/// `Device::state_kind` of the blk device.
pub const KIND: &str = "virtio-blk";

/// What a blk backend saves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    /// [`BLK_STATE_VERSION`] of the writer.
    pub version: u32,
    /// Disk size in bytes.
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO offered.
    pub read_only: bool,
    /// Queues offered.
    pub queues: u16,
    /// GET_ID answer (informational: a restored guest may see a new serial).
    pub serial: String,
}

/// Why a blk state is refused.
#[derive(Debug, Error)]
pub enum BlkStateError {
    /// Not a blk state payload.
    #[error("Invalid blk state")]
    Decode(#[source] StateError),
    /// Another layout version.
    #[error("Blk state version {found} is not supported (this build reads {supported})")]
    Version {
        /// Version in the state.
        found: u32,
        /// [`BLK_STATE_VERSION`].
        supported: u32,
    },
    /// The disk has another size.
    #[error("Disk capacity {ours} bytes differs from the saved {saved} bytes")]
    Capacity {
        /// Saved capacity.
        saved: u64,
        /// This backend's capacity.
        ours: u64,
    },
    /// Read-only in one, writable in the other.
    #[error("Disk read-only setting {ours} differs from the saved {saved}")]
    ReadOnly {
        /// Saved setting.
        saved: bool,
        /// This backend's setting.
        ours: bool,
    },
    /// Another number of queues.
    #[error("Device has {ours} queues, the saved state {saved}")]
    Queues {
        /// Saved count.
        saved: u16,
        /// This backend's count.
        ours: u16,
    },
}

impl BlkState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        state::to_bytes(self)
    }

    /// Decodes `bytes` and checks them against `ours`.
    pub fn check(bytes: &[u8], ours: &BlkState) -> Result<BlkState, BlkStateError> {
        let saved: BlkState = state::from_bytes(bytes).map_err(BlkStateError::Decode)?;
        if saved.version != BLK_STATE_VERSION {
            return Err(BlkStateError::Version {
                found: saved.version,
                supported: BLK_STATE_VERSION,
            });
        }
        if saved.capacity != ours.capacity {
            return Err(BlkStateError::Capacity {
                saved: saved.capacity,
                ours: ours.capacity,
            });
        }
        if saved.read_only != ours.read_only {
            return Err(BlkStateError::ReadOnly {
                saved: saved.read_only,
                ours: ours.read_only,
            });
        }
        if saved.queues != ours.queues {
            return Err(BlkStateError::Queues {
                saved: saved.queues,
                ours: ours.queues,
            });
        }
        Ok(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(capacity: u64) -> BlkState {
        BlkState {
            version: BLK_STATE_VERSION,
            capacity,
            read_only: false,
            queues: 2,
            serial: "s".into(),
        }
    }

    #[test]
    fn state_of_the_same_disk_is_accepted() {
        let bytes = disk(1 << 20).to_bytes().unwrap();

        let saved = BlkState::check(&bytes, &disk(1 << 20)).unwrap();

        assert_eq!(saved, disk(1 << 20));
    }

    #[test]
    fn state_of_a_disk_of_another_capacity_is_refused_naming_both() {
        let bytes = disk(1 << 20).to_bytes().unwrap();

        let err = BlkState::check(&bytes, &disk(2 << 20)).unwrap_err();

        assert_eq!(
            err.to_string(),
            "Disk capacity 2097152 bytes differs from the saved 1048576 bytes"
        );
    }

    #[test]
    fn state_with_another_queue_count_is_refused() {
        let bytes = disk(4096).to_bytes().unwrap();
        let ours = BlkState {
            queues: 1,
            ..disk(4096)
        };

        let err = BlkState::check(&bytes, &ours).unwrap_err();

        assert!(matches!(err, BlkStateError::Queues { saved: 2, ours: 1 }));
    }
}
