//! SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE (VHOST_USER_PROTOCOL_F_DEVICE_STATE).
//!
//! Both directions are accepted only while the device is stopped: no queue
//! worker runs (each ring was stopped by GET_VRING_BASE or disabled with
//! SET_VRING_ENABLE 0, which drains its in-flight requests first, or was
//! never started). SET_DEVICE_STATE_FD answers at once and a transfer
//! thread moves the bytes ([`crate::transfer`]); CHECK_DEVICE_STATE waits
//! for it and reports.
//!
//! - SAVE: the state ([`SavedState`]: the common part below plus
//!   [`Device::save_state`]) is encoded when SET_DEVICE_STATE_FD arrives and
//!   written to the fd, which is then closed. CHECK fails if the write did.
//! - LOAD: the bytes are read to EOF; CHECK then decodes them, checks them
//!   against this device and applies them, on the protocol thread. A bad
//!   header, version or checksum, another device kind, another queue count,
//!   other features or a device refusal ([`Device::load_state`], e.g. a
//!   disk of another capacity) fail CHECK and change nothing: the backend
//!   goes on serving what it had.
//!
//! Ring positions: SET_VRING_NUM and SET_VRING_BASE from the frontend are
//! authoritative, as the spec says. The saved size and next available
//! index fill in a ring the frontend has not set yet (so the ring resumes
//! where it was saved even if the base is never sent), and a value the
//! frontend did set before the LOAD must equal the saved one, or the LOAD
//! fails (the frontend's and the backend's states are then from different
//! moments). A SET_VRING_BASE after the LOAD wins; one that differs from
//! the loaded value is logged.
//!
//! A new SET_DEVICE_STATE_FD replaces a transfer still under way: its thread
//! ends by itself (EOF, a closed pipe or the idle timeout) and its result
//! is dropped.

use thiserror::Error;

use super::{Handler, VringSlot};
use crate::device::Device;
use crate::dirty_log::LOG_ALL;
use crate::state::{self, CommonState, InflightInfo, QueueState, SavedState, StateError};
use crate::transfer::{Direction, Transfer, TransferError};

/// Errors of a device state transfer.
#[derive(Debug, Error)]
pub enum DeviceStateError {
    /// VHOST_USER_PROTOCOL_F_DEVICE_STATE was not acked.
    #[error("Device state transfer was not negotiated")]
    NotNegotiated,
    /// A queue worker is running.
    #[error("Queue {0} is running: the device must be stopped")]
    Running(usize),
    /// CHECK_DEVICE_STATE without a transfer.
    #[error("No device state transfer under way")]
    NoTransfer,
    /// The transfer itself failed.
    #[error("State transfer failed")]
    Transfer(#[source] TransferError),
    /// The bytes are not a valid state.
    #[error("Invalid state")]
    State(#[source] StateError),
    /// A state of another device type.
    #[error("State of a {saved:?} device cannot be loaded into a {ours:?} device")]
    Kind {
        /// Kind in the state.
        saved: String,
        /// This device's kind.
        ours: &'static str,
    },
    /// Another number of queues.
    #[error("State has {saved} queues, the device {ours}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of this device.
        ours: usize,
    },
    /// The frontend acked other features than the saved ones.
    #[error("State features {saved:#x} differ from the acked {acked:#x}")]
    Features {
        /// Features in the state.
        saved: u64,
        /// Features acked on this connection.
        acked: u64,
    },
    /// A saved ring is larger than this device accepts.
    #[error("Queue {queue}: saved size {size} is over the device's {max}")]
    QueueSize {
        /// Queue index.
        queue: usize,
        /// Saved size.
        size: u16,
        /// Largest size accepted.
        max: u16,
    },
    /// A value the frontend set differs from the saved one.
    #[error("Queue {queue}: frontend {what} {frontend} differs from the saved {saved}")]
    Ring {
        /// Queue index.
        queue: usize,
        /// `size` or `base`.
        what: &'static str,
        /// The frontend's value.
        frontend: u16,
        /// The saved value.
        saved: u16,
    },
    /// The device could not produce its part.
    #[error("Cannot save the device's state")]
    DeviceSave(#[source] std::io::Error),
    /// The device refused its part.
    #[error("Device refused the state")]
    DeviceLoad(#[source] std::io::Error),
}

/// What the vhost-user layer knows of a ring, for checking a loaded state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingView {
    /// Size from SET_VRING_NUM, if sent.
    pub size: Option<u16>,
    /// Base from SET_VRING_BASE, if sent.
    pub base: Option<u16>,
}

/// Checks a loaded common part against this connection: queue count,
/// acked features, ring sizes and values the frontend already set.
pub fn check_common(
    saved: &CommonState,
    acked: Option<u64>,
    max_queue_size: u16,
    rings: &[RingView],
) -> Result<(), DeviceStateError> {
    if saved.queues.len() != rings.len() {
        return Err(DeviceStateError::QueueCount {
            saved: saved.queues.len(),
            ours: rings.len(),
        });
    }
    let logless = |f: Option<u64>| f.map(|f| f & !LOG_ALL);
    if let (Some(saved), Some(acked)) = (logless(saved.features), logless(acked)) {
        if saved != acked {
            return Err(DeviceStateError::Features { saved, acked });
        }
    }
    for (queue, (q, ring)) in saved.queues.iter().zip(rings).enumerate() {
        if q.size > max_queue_size {
            return Err(DeviceStateError::QueueSize {
                queue,
                size: q.size,
                max: max_queue_size,
            });
        }
        let pairs = [
            ("size", ring.size, q.size),
            ("base", ring.base, q.next_avail),
        ];
        for (what, frontend, saved) in pairs {
            match frontend {
                Some(frontend) if q.size != 0 && frontend != saved => {
                    return Err(DeviceStateError::Ring {
                        queue,
                        what,
                        frontend,
                        saved,
                    })
                }
                _ => {}
            }
        }
    }
    Ok(())
}

impl RingView {
    fn of(slot: &VringSlot) -> Self {
        RingView {
            size: (slot.size != 0).then_some(slot.size),
            base: slot.base_set.then_some(slot.next_avail),
        }
    }
}

impl<D: Device> Handler<D> {
    fn stopped(&self) -> Result<(), DeviceStateError> {
        match self.vrings.iter().position(|s| s.worker.is_some()) {
            Some(q) => Err(DeviceStateError::Running(q)),
            None => Ok(()),
        }
    }

    fn saved_state(&self) -> Result<SavedState, DeviceStateError> {
        let queues = self
            .vrings
            .iter()
            .map(|s| QueueState {
                size: s.size,
                next_avail: s.next_avail,
                enabled: s.enabled,
            })
            .collect();
        let inflight = self.inflight.as_ref().map(|r| InflightInfo {
            num_queues: r.num_queues(),
            queue_size: r.queue_size(),
        });
        Ok(SavedState {
            kind: self.device.state_kind().into(),
            common: CommonState {
                // Whether this connection was logging is no device state:
                // the destination starts without.
                features: self.features.map(|f| f & !LOG_ALL),
                protocol_features: self.protocol.bits(),
                queues,
                inflight,
            },
            device: self
                .device
                .save_state()
                .map_err(DeviceStateError::DeviceSave)?,
        })
    }

    /// SET_DEVICE_STATE_FD: starts a transfer in `direction` over `fd`.
    pub(super) fn start_transfer(
        &mut self,
        direction: Direction,
        fd: std::fs::File,
    ) -> Result<(), DeviceStateError> {
        use vhost::vhost_user::VhostUserProtocolFeatures as P;
        if !self.protocol.contains(P::DEVICE_STATE) {
            return Err(DeviceStateError::NotNegotiated);
        }
        self.stopped()?;
        let transfer = match direction {
            Direction::Save => {
                let bytes = state::encode(&self.saved_state()?).map_err(DeviceStateError::State)?;
                Transfer::save(fd, bytes)
            }
            Direction::Load => Transfer::load(fd),
        }
        .map_err(DeviceStateError::Transfer)?;
        if self.transfer.replace(transfer).is_some() {
            tracing::debug!("earlier device state transfer abandoned");
        }
        Ok(())
    }

    /// CHECK_DEVICE_STATE: waits for the transfer; for LOAD, checks and
    /// applies the state.
    pub(super) fn finish_transfer(&mut self) -> Result<Direction, DeviceStateError> {
        let transfer = self.transfer.take().ok_or(DeviceStateError::NoTransfer)?;
        let direction = transfer.direction();
        let bytes = transfer.finish().map_err(DeviceStateError::Transfer)?;
        if direction == Direction::Load {
            self.load(&bytes)?;
        }
        Ok(direction)
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), DeviceStateError> {
        self.stopped()?;
        let saved = state::decode(bytes).map_err(DeviceStateError::State)?;
        let ours = self.device.state_kind();
        if saved.kind != ours {
            return Err(DeviceStateError::Kind {
                saved: saved.kind,
                ours,
            });
        }
        let rings: Vec<RingView> = self.vrings.iter().map(RingView::of).collect();
        check_common(
            &saved.common,
            self.features,
            self.device.max_queue_size(),
            &rings,
        )?;
        self.device
            .load_state(&saved.device)
            .map_err(DeviceStateError::DeviceLoad)?;
        for (slot, q) in self.vrings.iter_mut().zip(&saved.common.queues) {
            if slot.size == 0 {
                slot.size = q.size;
            }
            slot.next_avail = q.next_avail;
            slot.loaded_base = Some(q.next_avail);
        }
        if self.features.is_none() {
            self.loaded_features = saved.common.features;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(bases: &[u16]) -> CommonState {
        CommonState {
            features: Some(0x1_0000_0000),
            queues: bases
                .iter()
                .map(|&b| QueueState {
                    size: 128,
                    next_avail: b,
                    enabled: false,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_connection_accepts_a_state_with_its_queue_count() {
        let saved = common(&[5, 9]);

        let r = check_common(&saved, None, 256, &[RingView::default(); 2]);

        assert!(r.is_ok());
    }

    #[test]
    fn another_queue_count_is_refused() {
        let saved = common(&[5]);

        let r = check_common(&saved, None, 256, &[RingView::default(); 2]);

        assert!(matches!(
            r,
            Err(DeviceStateError::QueueCount { saved: 1, ours: 2 })
        ));
    }

    #[test]
    fn frontend_base_that_differs_from_the_saved_one_is_refused() {
        let saved = common(&[5]);
        let rings = [RingView {
            size: Some(128),
            base: Some(6),
        }];

        let r = check_common(&saved, None, 256, &rings);

        assert!(matches!(
            r,
            Err(DeviceStateError::Ring {
                what: "base",
                frontend: 6,
                saved: 5,
                ..
            })
        ));
    }

    #[test]
    fn other_acked_features_are_refused_and_equal_ones_accepted() {
        let saved = common(&[0]);

        let other = check_common(&saved, Some(0x3_0000_0000), 256, &[RingView::default()]);
        let same = check_common(&saved, Some(0x1_0000_0000), 256, &[RingView::default()]);

        assert!(matches!(other, Err(DeviceStateError::Features { .. })));
        assert!(same.is_ok());
    }

    #[test]
    fn state_saved_while_logging_loads_where_nothing_logs_and_vice_versa() {
        let logging = CommonState {
            features: Some(0x1_0000_0000 | LOG_ALL),
            ..common(&[0])
        };
        let quiet = common(&[0]);

        let into_quiet = check_common(&logging, Some(0x1_0000_0000), 256, &[RingView::default()]);
        let into_logging = check_common(
            &quiet,
            Some(0x1_0000_0000 | LOG_ALL),
            256,
            &[RingView::default()],
        );

        assert!(into_quiet.is_ok());
        assert!(into_logging.is_ok());
    }

    #[test]
    fn saved_ring_larger_than_the_device_accepts_is_refused() {
        let saved = common(&[0]);

        let r = check_common(&saved, None, 64, &[RingView::default()]);

        assert!(matches!(
            r,
            Err(DeviceStateError::QueueSize {
                size: 128,
                max: 64,
                ..
            })
        ));
    }
}
