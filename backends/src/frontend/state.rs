//! Saving and loading the backend's own state (VHOST_USER_PROTOCOL_F_DEVICE_STATE),
//! in the order a VMM takes a snapshot and restores it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use super::{FrontendError, SyntheticFrontend};

fn pipe() -> Result<(File, File), FrontendError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(FrontendError::StateIo(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// SET_DEVICE_STATE_FD (SAVE), read to EOF, CHECK_DEVICE_STATE.
pub(super) fn save(vu: &Frontend) -> Result<Vec<u8>, FrontendError> {
    let (mut rx, tx) = pipe()?;
    let theirs = vu
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(tx),
        )
        .map_err(FrontendError::Vhost)?;
    let mut bytes = Vec::new();
    // A backend may answer with a channel of its own instead of ours.
    match theirs {
        Some(mut f) => f.read_to_end(&mut bytes),
        None => rx.read_to_end(&mut bytes),
    }
    .map_err(FrontendError::StateIo)?;
    vu.check_device_state().map_err(FrontendError::StateCheck)?;
    Ok(bytes)
}

/// SET_DEVICE_STATE_FD (LOAD), write and close, CHECK_DEVICE_STATE.
pub(super) fn load(vu: &Frontend, state: &[u8]) -> Result<(), FrontendError> {
    let (rx, tx) = pipe()?;
    let theirs = vu
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(rx),
        )
        .map_err(FrontendError::Vhost)?;
    let mut to = theirs.unwrap_or(tx);
    // A backend refusing early closes its end: CHECK then tells why.
    let _ = to.write_all(state);
    drop(to);
    vu.check_device_state().map_err(FrontendError::StateCheck)
}

impl SyntheticFrontend {
    /// Stops every ring as a VMM does before a snapshot: SET_VRING_ENABLE 0
    /// (the backend drains in-flight requests), then GET_VRING_BASE.
    /// Returns each ring's next available index.
    pub fn stop_queues(&mut self) -> Result<Vec<u16>, FrontendError> {
        let vu = self.vu.as_mut().ok_or(FrontendError::NotConnected)?;
        (0..self.queues.len())
            .map(|i| {
                vu.set_vring_enable(i, false)
                    .map_err(FrontendError::Vhost)?;
                vu.get_vring_base(i)
                    .map(|b| b as u16)
                    .map_err(FrontendError::Vhost)
            })
            .collect()
    }

    /// Starts every ring again after [`Self::stop_queues`]: SET_VRING_BASE
    /// (from the used index, everything having drained), SET_VRING_KICK,
    /// SET_VRING_ENABLE 1.
    pub fn resume_queues(&mut self) -> Result<(), FrontendError> {
        let vu = self.vu.as_mut().ok_or(FrontendError::NotConnected)?;
        for (i, q) in self.queues.iter().enumerate() {
            let base = q.used_idx(&self.mem)?;
            vu.set_vring_base(i, base).map_err(FrontendError::Vhost)?;
            vu.set_vring_kick(i, &q.kick)
                .map_err(FrontendError::Vhost)?;
            vu.set_vring_enable(i, true).map_err(FrontendError::Vhost)?;
        }
        Ok(())
    }

    /// Saves the backend's own state; call with the rings stopped.
    pub fn save_device_state(&mut self) -> Result<Vec<u8>, FrontendError> {
        save(self.vu.as_ref().ok_or(FrontendError::NotConnected)?)
    }

    /// Loads a state into the backend; call with the rings stopped.
    pub fn load_device_state(&mut self, state: &[u8]) -> Result<(), FrontendError> {
        load(self.vu.as_ref().ok_or(FrontendError::NotConnected)?, state)
    }
}
