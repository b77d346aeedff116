//! The host side of the serial console: stdin in raw mode while the VM
//! runs (restored on drop), the process's pseudo-terminal ([`Pty`]), the
//! output sink chosen by `--serial` and the input fd the VMM loop reads.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

use crate::config::SerialConfig;

/// Errors setting up the console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("Cannot open serial output file {0}")]
    OpenFile(String, #[source] io::Error),
    #[error("Cannot create the serial pty ({0})")]
    Pty(&'static str, #[source] io::Error),
}

/// Puts stdin in raw mode when it is a terminal; restores it on drop.
pub struct RawStdin {
    saved: Option<libc::termios>,
}

impl RawStdin {
    pub fn enable() -> Self {
        if !io::stdin().is_terminal() {
            return Self { saved: None };
        }
        let mut t = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: fd 0 is a terminal; `t` is a valid out-pointer.
        if unsafe { libc::tcgetattr(0, t.as_mut_ptr()) } != 0 {
            return Self { saved: None };
        }
        // SAFETY: tcgetattr succeeded and initialised `t`.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL);
        // SAFETY: `raw` is a fully initialised termios for fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Self { saved: Some(saved) }
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: `t` is the termios read from fd 0 at enable time.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Unbuffered stdout: every byte the guest writes shows at once.
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// How much of the guest's recent serial output [`output_since`] keeps.
pub const LOG_BYTES: usize = 64 << 10;

/// The last [`LOG_BYTES`] of serial output, and how many bytes came in all.
struct OutputLog {
    data: std::collections::VecDeque<u8>,
    total: u64,
}

static LOG: Mutex<OutputLog> = Mutex::new(OutputLog {
    data: std::collections::VecDeque::new(),
    total: 0,
});

/// The guest's serial output from byte `from` on (counted since vmm
/// started, across reboots), as far as it is still kept: (offset of the
/// first byte returned, the bytes, the total so far).
pub fn output_since(from: u64) -> (u64, Vec<u8>, u64) {
    let log = LOG.lock().unwrap_or_else(PoisonError::into_inner);
    let first = log.total - log.data.len() as u64;
    let start = from.clamp(first, log.total);
    let skip = (start - first) as usize;
    (
        start,
        log.data.iter().skip(skip).copied().collect(),
        log.total,
    )
}

/// Copies what the guest writes into the output log, then to `inner`.
struct Logged(Box<dyn Write + Send>);

impl Write for Logged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut log = LOG.lock().unwrap_or_else(PoisonError::into_inner);
            let kept = log.data.len();
            let over = (kept + buf.len()).saturating_sub(LOG_BYTES);
            log.data.drain(..over.min(kept));
            log.data.extend(&buf[buf.len().saturating_sub(LOG_BYTES)..]);
            log.total += buf.len() as u64;
        }
        self.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The writer for the guest's serial output (kept in the output log too,
/// see [`output_since`]).
pub fn serial_sink(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, ConsoleError> {
    Ok(Box::new(Logged(sink(cfg)?)))
}

fn sink(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, ConsoleError> {
    Ok(match cfg {
        SerialConfig::Stdio => Box::new(Stdout),
        SerialConfig::Off => Box::new(io::sink()),
        SerialConfig::Pty => Box::new(PtyOut(Pty::shared()?)),
        SerialConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| ConsoleError::OpenFile(p.display().to_string(), e))?,
        ),
    })
}

/// Dropped output is logged when the total crosses a multiple of this.
const DROP_LOG_EVERY: u64 = 64 << 10;

/// The process's serial pseudo-terminal (`--serial pty`, `"mode": "Pty"`):
/// the guest's output is written to the master, what is written to the
/// slave (the path vm.info gives) is the guest's input. One per process,
/// opened on first use and kept until exit, so its path stays the same
/// across reboots of the VM.
///
/// The master is non-blocking: when nobody reads the slave, output fills
/// the pty's buffer (tens of KiB, kept for the next reader) and what does
/// not fit is dropped and counted, so an unread pty never stalls a vCPU.
/// vmm holds the slave open itself, so a reader that comes and goes never
/// leaves the master hung up.
pub struct Pty {
    master: OwnedFd,
    _slave: OwnedFd,
    path: PathBuf,
    dropped: AtomicU64,
}

static PTY: Mutex<Option<Arc<Pty>>> = Mutex::new(None);

fn check(rc: libc::c_int, what: &'static str) -> Result<libc::c_int, ConsoleError> {
    if rc < 0 {
        Err(ConsoleError::Pty(what, io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

impl Pty {
    /// The process's pty, opened now if it was not yet.
    pub fn shared() -> Result<Arc<Self>, ConsoleError> {
        let mut guard = PTY.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let pty = Arc::new(Self::open()?);
        eprintln!("vmm: serial console on {}", pty.path.display());
        *guard = Some(pty.clone());
        Ok(pty)
    }

    /// The process's pty if one was opened.
    pub fn opened() -> Option<Arc<Self>> {
        PTY.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .cloned()
    }

    fn open() -> Result<Self, ConsoleError> {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: posix_openpt takes flags only and returns a new fd or -1.
        let raw = check(unsafe { libc::posix_openpt(flags) }, "posix_openpt")?;
        // SAFETY: `raw` was just created and is owned by nobody else.
        let master = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: both take the master fd we own and touch nothing else.
        check(unsafe { libc::grantpt(master.as_raw_fd()) }, "grantpt")?;
        // SAFETY: as above.
        check(unsafe { libc::unlockpt(master.as_raw_fd()) }, "unlockpt")?;
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name of at most
        // `name.len()` bytes into `name`.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(ConsoleError::Pty(
                "ptsname",
                io::Error::from_raw_os_error(rc),
            ));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) };
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let raw = check(unsafe { libc::open(name.as_ptr(), flags) }, "open")?;
        // SAFETY: `raw` was just opened and is owned by nobody else.
        let slave = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut t = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: the slave is a terminal; `t` is a valid out-pointer.
        let rc = unsafe { libc::tcgetattr(slave.as_raw_fd(), t.as_mut_ptr()) };
        check(rc, "tcgetattr")?;
        // SAFETY: tcgetattr succeeded and initialised `t`.
        let mut t = unsafe { t.assume_init() };
        // SAFETY: `t` is a valid termios; cfmakeraw only edits it.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: `t` is a fully initialised termios for the slave.
        let rc = unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) };
        check(rc, "tcsetattr")?;
        // SAFETY: F_SETFL on the master we own only changes its status flags.
        let rc = unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        check(rc, "fcntl")?;
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
        Ok(Self {
            master,
            _slave: slave,
            path,
            dropped: AtomicU64::new(0),
        })
    }

    /// The slave's path, e.g. /dev/pts/3.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Output bytes dropped because nobody read the pty.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn drop_output(&self, n: usize) {
        let before = self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        let after = before + n as u64;
        if before == 0 || before / DROP_LOG_EVERY != after / DROP_LOG_EVERY {
            tracing::warn!(dropped_bytes = after, pty = %self.path.display(), "nobody reads the serial pty: output dropped");
        }
    }
}

/// The guest's output into the pty (never blocking, see [`Pty`]).
struct PtyOut(Arc<Pty>);

impl Write for PtyOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes from `buf`, valid for its length, to the
            // master fd the `Pty` keeps open.
            let n =
                unsafe { libc::write(self.0.master.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if let Ok(n) = usize::try_from(n) {
                if n < buf.len() {
                    self.0.drop_output(buf.len() - n);
                }
                return Ok(buf.len());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.0.drop_output(buf.len());
                    return Ok(buf.len());
                }
                _ => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The fd the VMM loop reads the guest's serial input from: stdin for
/// `stdio`, the pty's master for `pty`, none otherwise.
pub fn serial_input(cfg: &SerialConfig) -> Result<Option<RawFd>, ConsoleError> {
    Ok(match cfg {
        SerialConfig::Stdio => Some(0),
        SerialConfig::Pty => Some(Pty::shared()?.master.as_raw_fd()),
        SerialConfig::File(_) | SerialConfig::Off => None,
    })
}

/// How many bytes can be read from `fd` now without blocking (FIONREAD;
/// 0 when unknown).
pub fn input_available(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the valid pointer `n`.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Reads serial input from `fd` (see [`serial_input`]).
pub fn read_input(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads into `buf`, a writable buffer of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn guest_output_reaches_the_pty_reader() {
        let pty = Pty::shared().unwrap();
        let mut reader = std::fs::File::open(pty.path()).unwrap();
        let mut out = serial_sink(&SerialConfig::Pty).unwrap();

        out.write_all(b"hello pty").unwrap();

        let mut buf = [0u8; 9];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello pty");
    }

    #[test]
    fn unread_output_is_dropped_and_counted_without_blocking() {
        let pty = Arc::new(Pty::open().unwrap());
        let mut out = PtyOut(pty.clone());
        let chunk = [b'x'; 4096];

        for _ in 0..1024 {
            out.write_all(&chunk).unwrap();
        }

        assert!(pty.dropped() > 0);
        assert!(pty.dropped() < 4 << 20);
    }

    #[test]
    fn input_written_to_the_pty_is_readable_by_the_vmm() {
        let pty = Arc::new(Pty::open().unwrap());
        let mut writer = OpenOptions::new().write(true).open(pty.path()).unwrap();

        writer.write_all(b"in").unwrap();

        let fd = pty.master.as_raw_fd();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while input_available(fd) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut buf = [0u8; 2];
        assert_eq!(read_input(fd, &mut buf).unwrap(), 2);
        assert_eq!(&buf, b"in");
    }
}
