//! The host side of the serial console: stdin in raw mode while the VM
//! runs (restored on drop), and the output sink chosen by `--serial`.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::mem::MaybeUninit;

use thiserror::Error;

use crate::config::SerialConfig;

/// Errors setting up the console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("Cannot open serial output file {0}")]
    OpenFile(String, #[source] io::Error),
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

/// How many bytes can be read from stdin now without blocking (FIONREAD;
/// 0 when unknown). Lets an edge-triggered loop drain a blocking stdin.
pub fn stdin_available() -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the valid pointer `n`.
    let rc = unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
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

/// The writer for the guest's serial output.
pub fn serial_sink(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, ConsoleError> {
    Ok(match cfg {
        SerialConfig::Stdio => Box::new(Stdout),
        SerialConfig::Off => Box::new(io::sink()),
        SerialConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| ConsoleError::OpenFile(p.display().to_string(), e))?,
        ),
    })
}
