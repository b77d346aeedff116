//! One real `vmm` process serving its control API: started booted (with
//! `--kernel`) or empty, its console lines stamped when they were read,
//! its log (stderr) kept, timed requests on its socket. Stopped with
//! SIGTERM and reaped when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long one API request may take by default (a 4 GiB snapshot is a
/// few seconds).
pub const REQUEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a VMM may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How long a VMM may take to answer `vmm.ping` once started.
const PING_LIMIT: Duration = Duration::from_secs(10);

/// What can go wrong driving a VMM.
#[derive(Debug, Error)]
pub enum VmmError {
    #[error("Cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("The VMM ended: {0}")]
    Ended(String),
    #[error("The guest failed: {0}")]
    GuestFailed(String),
    #[error("No console line starting with '{0}' within {1:?}")]
    Timeout(String, Duration),
    #[error("No API answer on {0}")]
    NoSocket(PathBuf),
    #[error("API request failed")]
    Api(#[source] std::io::Error),
    #[error("{endpoint} answered HTTP {status}: {body}")]
    Status {
        endpoint: &'static str,
        status: u16,
        body: String,
    },
    #[error("The VMM was still running {0:?} after it should have ended")]
    StillRunning(Duration),
}

/// One console line (or the unterminated tail the VMM left at exit).
#[derive(Clone, Debug)]
pub struct ConsoleLine {
    /// When the read that completed it returned.
    pub at: Instant,
    /// Without the `\n`.
    pub text: String,
    /// False for a tail without `\n`, read at end of output.
    pub complete: bool,
}

/// A running `vmm`.
pub struct Vmm {
    child: Child,
    socket: PathBuf,
    lines: Receiver<ConsoleLine>,
    log: Arc<Mutex<Vec<String>>>,
    log_reader: Option<JoinHandle<()>>,
}

impl Vmm {
    /// Runs `cmd` (a vmm command line, `--kernel ...` or nothing) with
    /// `--api-socket socket`, console and log piped; returns once it
    /// answers `vmm.ping`.
    pub fn start(mut cmd: Command, socket: PathBuf) -> Result<Self, VmmError> {
        let _ = std::fs::remove_file(&socket);
        let program = PathBuf::from(cmd.get_program());
        let mut child = cmd
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| VmmError::Spawn(program, e))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_reader = keep_lines(child.stderr.take().expect("piped stderr"), log.clone());
        let lines = stamp_lines(child.stdout.take().expect("piped stdout"));
        let mut me = Self {
            child,
            socket,
            lines,
            log,
            log_reader: Some(log_reader),
        };
        let deadline = Instant::now() + PING_LIMIT;
        loop {
            if let Ok((200, _)) = exchange(&me.socket, "GET", "vmm.ping", "", PING_LIMIT) {
                return Ok(me);
            }
            if !matches!(me.child.try_wait(), Ok(None)) {
                return Err(me.ended());
            }
            if Instant::now() > deadline {
                return Err(VmmError::NoSocket(me.socket.clone()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Boots the test guest `guest` with `memory` of RAM (vmm's size
    /// syntax) and `cmdline`.
    pub fn boot(
        vmm: &Path,
        guest: &Path,
        memory: &str,
        cmdline: &str,
        socket: PathBuf,
    ) -> Result<Self, VmmError> {
        Self::start(boot_command(vmm, guest, memory, cmdline), socket)
    }

    /// A VMM with no VM.
    pub fn empty(vmm: &Path, socket: PathBuf) -> Result<Self, VmmError> {
        Self::start(Command::new(vmm), socket)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The console lines, in order, as they were read.
    pub fn console(&self) -> &Receiver<ConsoleLine> {
        &self.lines
    }

    /// Waits for a console line starting with `prefix`; returns when it was
    /// read. A `TG: FAIL` line or the VMM ending is an error.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<Instant, VmmError> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.text.starts_with(prefix) => return Ok(l.at),
                Ok(l) if l.text.starts_with("TG: FAIL") => {
                    return Err(VmmError::GuestFailed(l.text))
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VmmError::Timeout(prefix.to_string(), limit))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.ended()),
            }
        }
    }

    /// Drops the console lines read so far.
    pub fn skip_lines(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// The log (stderr) lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sends `method endpoint` with `body`, checks the status is `expect`,
    /// and returns when the request was sent and how long the whole
    /// exchange took (connect to end of response).
    pub fn timed(
        &self,
        method: &'static str,
        endpoint: &'static str,
        body: &str,
        expect: u16,
    ) -> Result<(Instant, Duration), VmmError> {
        timed(&self.socket, method, endpoint, body, expect, REQUEST_LIMIT)
    }

    /// `GET endpoint`'s body, whatever the status.
    pub fn get(&self, endpoint: &str) -> Result<String, VmmError> {
        exchange(&self.socket, "GET", endpoint, "", REQUEST_LIMIT)
            .map(|(_, body)| body)
            .map_err(VmmError::Api)
    }

    /// Waits up to `limit` for the process to end by itself; its status.
    /// Its log is then complete.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, VmmError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                if let Some(h) = self.log_reader.take() {
                    let _ = h.join();
                }
                return Ok(st);
            }
            if Instant::now() > deadline {
                return Err(VmmError::StillRunning(limit));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process has ended (or is ending): reaps it and says why, from
    /// the last line of its log.
    fn ended(&mut self) -> VmmError {
        let _ = self.child.wait();
        if let Some(h) = self.log_reader.take() {
            let _ = h.join();
        }
        VmmError::Ended(self.log().last().cloned().unwrap_or_default())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid of our own child, which try_wait
            // just found not yet reaped, so the pid is still its own.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_LIMIT;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                eprintln!(
                    "vmm (pid {}) still running {STOP_LIMIT:?} after SIGTERM; killing it",
                    self.child.id()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The vmm command line that boots the test guest `guest` with `memory`
/// of RAM (vmm's size syntax) and `cmdline`, for [`Vmm::start`].
pub fn boot_command(vmm: &Path, guest: &Path, memory: &str, cmdline: &str) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(guest)
        .args(["--memory", memory, "--cmdline", cmdline]);
    cmd
}

/// Set when a console reader could not get a real-time priority.
static STAMPS_LATE: AtomicBool = AtomicBool::new(false);

/// Whether every console reader so far ran at a real-time priority
/// (`SCHED_FIFO`): then a line's stamp is its arrival even on a busy host,
/// not when the scheduler next got round to the reader.
pub fn stamps_realtime() -> bool {
    !STAMPS_LATE.load(Ordering::Relaxed)
}

/// Puts the calling thread in `SCHED_FIFO` at the lowest priority; it
/// then preempts ordinary threads as soon as it wakes. Needs
/// CAP_SYS_NICE or an RLIMIT_RTPRIO; false without.
fn realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets the scheduling policy of the calling thread
    // (pthread_self is always valid) from a valid sched_param that the
    // call only reads.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) == 0 }
}

/// Stamps each line of `out` as it arrives, on a real-time thread (see
/// [`stamps_realtime`]) that blocks in `read` between lines and keeps
/// draining after the receiver is gone so the VMM never blocks on a full
/// pipe.
fn stamp_lines(out: impl Read + Send + 'static) -> Receiver<ConsoleLine> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if !realtime() {
            STAMPS_LATE.store(true, Ordering::Relaxed);
        }
        let mut out = BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match out.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let at = Instant::now();
            let complete = buf.last() == Some(&b'\n');
            if complete {
                buf.pop();
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let _ = tx.send(ConsoleLine { at, text, complete });
        }
    });
    rx
}

/// Appends each line of `err` to `log` until it ends.
fn keep_lines(err: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut l) = log.lock() {
                l.push(line);
            }
        }
    })
}

/// [`exchange`] with the status checked against `expect`; returns when
/// the request was sent and how long the exchange took.
pub fn timed(
    socket: &Path,
    method: &'static str,
    endpoint: &'static str,
    body: &str,
    expect: u16,
    limit: Duration,
) -> Result<(Instant, Duration), VmmError> {
    let start = Instant::now();
    let (status, text) = exchange(socket, method, endpoint, body, limit).map_err(VmmError::Api)?;
    let took = start.elapsed();
    if status != expect {
        return Err(VmmError::Status {
            endpoint,
            status,
            body: text.trim().to_string(),
        });
    }
    Ok((start, took))
}

/// One request per connection, as `vmctl` does: connect, send with
/// `Connection: close`, read to EOF, each step bounded by `limit`.
/// Returns the status and the body.
pub fn exchange(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
    limit: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    let kind = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    write!(
        s,
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n{kind}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let malformed =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_string()))
}
