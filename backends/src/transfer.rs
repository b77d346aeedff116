//! Moving a saved state over the fd of SET_DEVICE_STATE_FD, on a thread of
//! its own.
//!
//! The protocol thread must answer SET_DEVICE_STATE_FD before the bytes
//! move: the frontend reads (SAVE) or writes (LOAD) only once it has the
//! reply, and a state larger than the pipe's buffer would otherwise block
//! both sides. So a short-lived thread does the I/O and ends at EOF (LOAD)
//! or after writing everything and closing the fd (SAVE); CHECK_DEVICE_STATE
//! joins it. Only I/O happens there: encoding, decoding and applying a
//! state stay on the protocol thread.
//!
//! The fd is made non-blocking and each wait for it is bounded by
//! [`IDLE_TIMEOUT`], so a frontend that never closes its end cannot leave
//! CHECK_DEVICE_STATE (and with it the connection) hanging for ever.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::seccomp::{self, ThreadKind};
use crate::state::MAX_STATE_LEN;

/// Longest wait for the fd to become readable or writable.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a transfer.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The transfer thread could not be spawned.
    #[error("Cannot spawn the state transfer thread")]
    Spawn(#[source] io::Error),
    /// Reading or writing the fd failed.
    #[error("State transfer I/O failed")]
    Io(#[source] io::Error),
    /// Nothing moved for [`IDLE_TIMEOUT`].
    #[error("State transfer stalled for {0:?}")]
    Stalled(Duration),
    /// The frontend sent more than [`MAX_STATE_LEN`] bytes.
    #[error("State is larger than {MAX_STATE_LEN} bytes")]
    TooLarge,
    /// The transfer thread panicked.
    #[error("State transfer thread panicked")]
    Panicked,
}

/// Which way a transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Backend to frontend.
    Save,
    /// Frontend to backend.
    Load,
}

/// A transfer under way; [`Self::finish`] waits for it.
#[derive(Debug)]
pub struct Transfer {
    direction: Direction,
    thread: JoinHandle<Result<Vec<u8>, TransferError>>,
}

impl Transfer {
    /// Writes `bytes` to `fd` and closes it, on a new thread.
    pub fn save(fd: File, bytes: Vec<u8>) -> Result<Self, TransferError> {
        Self::spawn(Direction::Save, "state-save", move || {
            write_all(fd, &bytes).map(|()| Vec::new())
        })
    }

    /// Reads `fd` to EOF on a new thread.
    pub fn load(fd: File) -> Result<Self, TransferError> {
        Self::spawn(Direction::Load, "state-load", move || read_to_end(fd))
    }

    fn spawn(
        direction: Direction,
        name: &str,
        io: impl FnOnce() -> Result<Vec<u8>, TransferError> + Send + 'static,
    ) -> Result<Self, TransferError> {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                seccomp::apply_or_exit(ThreadKind::Transfer);
                io()
            })
            .map_err(TransferError::Spawn)?;
        Ok(Transfer { direction, thread })
    }

    /// The direction.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Waits for the thread: the bytes read (LOAD) or nothing (SAVE).
    pub fn finish(self) -> Result<Vec<u8>, TransferError> {
        self.thread.join().map_err(|_| TransferError::Panicked)?
    }
}

fn set_nonblocking(fd: &File) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own, with the flags it had plus O_NONBLOCK.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` (or hung up), up to [`IDLE_TIMEOUT`].
fn wait(fd: &File, events: libc::c_short) -> Result<(), TransferError> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, IDLE_TIMEOUT.as_millis() as libc::c_int) };
        match rc {
            0 => return Err(TransferError::Stalled(IDLE_TIMEOUT)),
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(TransferError::Io(e));
                }
            }
        }
    }
}

fn write_all(mut fd: File, mut bytes: &[u8]) -> Result<(), TransferError> {
    set_nonblocking(&fd).map_err(TransferError::Io)?;
    while !bytes.is_empty() {
        match fd.write(bytes) {
            Ok(0) => return Err(TransferError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&fd, libc::POLLOUT)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::Io(e)),
        }
    }
    Ok(())
}

fn read_to_end(mut fd: File) -> Result<Vec<u8>, TransferError> {
    set_nonblocking(&fd).map_err(TransferError::Io)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match fd.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) if out.len() + n > MAX_STATE_LEN => return Err(TransferError::TooLarge),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&fd, libc::POLLIN)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn save_larger_than_the_pipe_buffer_arrives_whole() {
        let (mut rx, tx) = pipe();
        let bytes: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();

        let t = Transfer::save(tx, bytes.clone()).unwrap();
        let mut got = Vec::new();
        rx.read_to_end(&mut got).unwrap();

        assert_eq!(t.finish().unwrap(), Vec::<u8>::new());
        assert_eq!(got, bytes);
    }

    #[test]
    fn load_reads_until_the_writer_closes() {
        let (rx, mut tx) = pipe();
        let t = Transfer::load(rx).unwrap();

        tx.write_all(&[7u8; 100_000]).unwrap();
        drop(tx);

        assert_eq!(t.finish().unwrap(), vec![7u8; 100_000]);
    }

    #[test]
    fn load_over_the_size_limit_is_refused() {
        let (rx, mut tx) = pipe();
        let t = Transfer::load(rx).unwrap();

        let writer = std::thread::spawn(move || {
            let chunk = vec![0u8; 64 << 10];
            while tx.write_all(&chunk).is_ok() {}
        });

        assert!(matches!(t.finish(), Err(TransferError::TooLarge)));
        writer.join().unwrap();
    }
}
