//! Live migration: `vm.send-migration` on the source, `vm.receive-migration`
//! on a vmm started with `--api-socket` and no VM.
//!
//! # Pre-copy (`local: false`, over `tcp:host:port` or `unix:/path`)
//! 1. The source connects, says hello ([`stream`]) and sends `Start` (the
//!    VM's config); the destination checks it, creates guest memory and
//!    answers `Ok`.
//! 2. The source turns dirty logging on ([`dirty`]): KVM's per slot, and
//!    each vhost-user backend's (`VHOST_F_LOG_ALL` in a shared memfd),
//!    since the backends write guest memory too. A backend that cannot log
//!    makes the migration fail before anything is sent.
//! 3. Round 0 sends every page the memfd holds data for (never-touched
//!    pages are holes: zero on both sides); each later round sends the pages
//!    dirtied during the one before. Rounds stop when what is dirty could
//!    be sent within `downtime_ms` at the bandwidth the last round measured.
//! 4. The source's event loop pauses the VM, saves the vCPUs', the VM's and
//!    every device's state (the backends' own DEVICE_STATE included: that
//!    stops their rings), sends the last dirty pages and `State`; the
//!    destination checks it and answers `Ok`.
//! 5. The source lets go of its backends and sends `Complete`; the
//!    destination builds the VM on that memory and state, connects to the
//!    backends (the same sockets, or others its request names), resumes it
//!    if the source was running and answers `Ok`: the source exits.
//!
//! Any failure before the last `Ok` (the destination refusing, a broken
//! connection, `timeout_s`) leaves the VM running on the source as before:
//! logging off, backends taken back, the VM resumed if it ran.
//!
//! # Local live upgrade (`local: true`, unix socket only)
//! No page is copied: the guest memfd goes to the destination with
//! `SCM_RIGHTS` right after the hello, and the VM goes straight to step 4
//! with no memory to send; both processes then map the same pages.

pub mod dirty;
pub mod receive;
pub mod send;
pub mod stream;

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use thiserror::Error;

/// Errors of a migration, on either side.
#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("Migration URL must be unix:/path or tcp:IP:port, not '{0}'")]
    Url(String),
    #[error("A local migration needs a unix: URL")]
    LocalNeedsUnix,
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] io::Error),
    #[error("Connection lost")]
    Io(#[source] io::Error),
    #[error("Not a migration stream from this VMM")]
    Magic,
    #[error("Migration stream version {found} (this vmm reads {expected})")]
    Version { found: u32, expected: u32 },
    #[error("Unexpected {found} message (expected {expected})")]
    Unexpected {
        found: &'static str,
        expected: &'static str,
    },
    #[error("Unknown message kind {0:#x}")]
    UnknownKind(u32),
    #[error("{what} message of {len} bytes is too large")]
    TooLarge { what: &'static str, len: u64 },
    #[error("Memory message for {len} bytes at {gpa:#x} is outside guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("Invalid state in the stream")]
    State(#[from] crate::state::StateFileError),
    #[error("The destination refused: {0}")]
    Refused(String),
    #[error("The source abandoned the migration")]
    Abandoned,
    #[error("The local migration carried no memory file descriptor")]
    NoMemoryFd,
    #[error("Cannot set up guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("Cannot set up dirty logging")]
    DirtyLog(#[source] io::Error),
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Backend {0} cannot log dirty pages: {1}")]
    Backend(String, String),
    #[error("Migration did not converge within {0} s; the VM goes on here")]
    Timeout(u64),
    #[error("{0}")]
    Vm(String),
    #[error("The VM stopped during the migration")]
    VmStopped,
    #[error("Stopped by a signal while waiting for the source")]
    Interrupted,
}

/// Where a migration goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    Unix(PathBuf),
    /// An IP address: a host name is refused rather than resolved (vmm's
    /// seccomp lists allow no resolver, and a migration should not depend
    /// on one).
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for Url {
    type Err = MigrationError;

    fn from_str(s: &str) -> Result<Self, MigrationError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(Self::Unix(PathBuf::from(p)));
            }
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if let Ok(a) = a.parse() {
                return Ok(Self::Tcp(a));
            }
        }
        Err(MigrationError::Url(s.to_string()))
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A migration connection.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    /// Connects to the destination.
    pub fn connect(url: &Url) -> Result<Self, MigrationError> {
        let e = |err| MigrationError::Connect(url.to_string(), err);
        Ok(match url {
            Url::Unix(p) => Self::Unix(UnixStream::connect(p).map_err(e)?),
            Url::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(e)?;
                // Headers go out at once, not behind Nagle.
                s.set_nodelay(true).map_err(e)?;
                Self::Tcp(s)
            }
        })
    }

    /// Bounds every blocking read (`None`: no bound).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn unix(&self) -> Option<&UnixStream> {
        match self {
            Self::Unix(s) => Some(s),
            Self::Tcp(_) => None,
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Progress of an outgoing migration, for vm.info and vmctl.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Pre-copy round being sent: 0 is the first pass over memory.
    pub round: u32,
    /// Bytes of guest RAM sent so far.
    pub sent_bytes: u64,
    /// Bytes of this round still to send.
    pub remaining_bytes: u64,
    /// Bytes per second the guest and backends dirtied in the last round.
    pub dirty_rate_bps: u64,
    /// Bytes per second the last round sent.
    pub bandwidth_bps: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_unix_and_tcp_and_refuse_the_rest() {
        assert_eq!(
            "unix:/run/m.sock".parse::<Url>().unwrap(),
            Url::Unix("/run/m.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:6000".parse::<Url>().unwrap(),
            Url::Tcp(([127, 0, 0, 1], 6000).into())
        );
        assert_eq!(
            "tcp:[::1]:7".parse::<Url>().unwrap().to_string(),
            "tcp:[::1]:7"
        );
        for bad in [
            "unix:",
            "tcp:host",
            "tcp:localhost:6000",
            "tcp::80",
            "tcp:h:99999",
            "file:///x",
            "",
        ] {
            assert!(bad.parse::<Url>().is_err(), "{bad} accepted");
        }
    }
}
