//! The virtio-net part of a saved backend state (see `backends::state`).
//!
//! Saved: the features the driver acked (so its offloads: informational
//! here, since the frontend's SET_FEATURES sets the tap's offloads again on
//! every connection and the common part refuses a LOAD after other features
//! were acked), and what the driver set through the control queue
//! ([`CtrlSettings`]: queue pairs in use, RX mode, MAC address and filters),
//! which LOAD applies. A state whose pairs in use exceed this device's
//! queue pairs is refused.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use backends::state::{self, StateError};

use crate::event_handler::ctrl::CtrlSettings;

/// Version of [`NetState`]'s layout; bumped when it changes shape.
pub const NET_STATE_VERSION: u32 = 1;
/// `Device::state_kind` of the net device.
pub const KIND: &str = "virtio-net";

/// What a net backend saves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`NET_STATE_VERSION`] of the writer.
    pub version: u32,
    /// Virtio features the driver acked (offloads among them).
    pub acked_features: u64,
    /// The control queue's settings.
    pub ctrl: CtrlSettings,
}

/// Why a net state is refused.
#[derive(Debug, Error)]
pub enum NetStateError {
    /// Not a net state payload.
    #[error("Invalid net state")]
    Decode(#[source] StateError),
    /// Another layout version.
    #[error("Net state version {found} is not supported (this build reads {supported})")]
    Version {
        /// Version in the state.
        found: u32,
        /// [`NET_STATE_VERSION`].
        supported: u32,
    },
    /// More queue pairs in use than this device has.
    #[error("Saved {saved} queue pairs in use, the device has {ours}")]
    QueuePairs {
        /// Pairs in use in the state.
        saved: u16,
        /// Pairs of this device.
        ours: u16,
    },
}

impl NetState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        state::to_bytes(self)
    }

    /// Decodes `bytes` and checks them against a device of `pairs` queue pairs.
    pub fn check(bytes: &[u8], pairs: u16) -> Result<NetState, NetStateError> {
        let saved: NetState = state::from_bytes(bytes).map_err(NetStateError::Decode)?;
        if saved.version != NET_STATE_VERSION {
            return Err(NetStateError::Version {
                found: saved.version,
                supported: NET_STATE_VERSION,
            });
        }
        if saved.ctrl.queue_pairs > pairs {
            return Err(NetStateError::QueuePairs {
                saved: saved.ctrl.queue_pairs,
                ours: pairs,
            });
        }
        Ok(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pairs: u16) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            acked_features: 1 << 32,
            ctrl: CtrlSettings {
                queue_pairs: pairs,
                rx_mode: 1,
                ..Default::default()
            },
        }
    }

    #[test]
    fn state_round_trips_through_check() {
        let bytes = state(2).to_bytes().unwrap();

        let saved = NetState::check(&bytes, 2).unwrap();

        assert_eq!(saved, state(2));
    }

    #[test]
    fn more_pairs_in_use_than_the_device_has_is_refused() {
        let bytes = state(4).to_bytes().unwrap();

        let err = NetState::check(&bytes, 2).unwrap_err();

        assert!(matches!(
            err,
            NetStateError::QueuePairs { saved: 4, ours: 2 }
        ));
    }
}
