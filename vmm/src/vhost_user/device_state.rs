//! The frontend half of `VHOST_USER_PROTOCOL_F_DEVICE_STATE`: a backend's
//! own state (negotiated features, ring positions, device settings such as
//! a NIC's control-queue state) moved through a pipe, with the rings
//! stopped. SAVE: `SET_DEVICE_STATE_FD` with the pipe's write end, read to
//! EOF, `CHECK_DEVICE_STATE`. LOAD: `SET_DEVICE_STATE_FD` with the read
//! end, write the bytes, close, `CHECK_DEVICE_STATE`. The backend may hand
//! back an fd of its own to use instead of the pipe.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use super::{req, VhostUserError};

/// The longest a backend may take to write its state.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest state accepted from a backend.
const MAX_STATE: usize = 16 << 20;

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads `f` to EOF, giving up after [`TRANSFER_TIMEOUT`] without data or
/// past [`MAX_STATE`] bytes.
fn read_bounded(mut f: File) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let mut deadline = Instant::now() + TRANSFER_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the backend sent no state",
            ));
        }
        match f.read(&mut buf)? {
            0 => return Ok(out),
            k if out.len() + k > MAX_STATE => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the backend's state is too large",
                ))
            }
            k => out.extend_from_slice(&buf[..k]),
        }
        deadline = Instant::now() + TRANSFER_TIMEOUT;
    }
}

/// Saves the backend's state (its rings stopped).
pub(super) fn save(fe: &mut Frontend) -> Result<Vec<u8>, VhostUserError> {
    let (read_end, write_end) = pipe().map_err(VhostUserError::StateTransfer)?;
    let theirs = req(
        "SET_DEVICE_STATE_FD",
        fe.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            write_end,
        ),
    )?;
    let reader = theirs.unwrap_or_else(|| File::from(read_end));
    let state = read_bounded(reader).map_err(VhostUserError::StateTransfer)?;
    req("CHECK_DEVICE_STATE", fe.check_device_state())?;
    Ok(state)
}

/// Loads `state` into the backend (its rings not started yet).
pub(super) fn load(fe: &mut Frontend, state: &[u8]) -> Result<(), VhostUserError> {
    let (read_end, write_end) = pipe().map_err(VhostUserError::StateTransfer)?;
    let theirs = req(
        "SET_DEVICE_STATE_FD",
        fe.set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            read_end,
        ),
    )?;
    let mut writer = theirs.unwrap_or_else(|| File::from(write_end));
    writer
        .write_all(state)
        .map_err(VhostUserError::StateTransfer)?;
    drop(writer);
    req("CHECK_DEVICE_STATE", fe.check_device_state())
}
