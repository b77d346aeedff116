//! One real `vmm` process: booted with the test guest, or started empty to
//! restore a snapshot through the API; timed requests on its socket and
//! its console lines, each stamped when it was read.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::BenchError;

/// How long one API request may take (a 4 GiB snapshot is a few seconds).
const REQUEST_LIMIT: Duration = Duration::from_secs(120);
/// How long a VMM may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How long an empty VMM may take to answer `vmm.ping`.
const PING_LIMIT: Duration = Duration::from_secs(10);

/// A running `vmm`; stopped with SIGTERM and reaped when dropped.
pub struct Vmm {
    child: Child,
    socket: PathBuf,
    lines: Receiver<(Instant, String)>,
    stderr: Option<JoinHandle<String>>,
}

impl Vmm {
    /// Boots the test guest in `memory` of RAM with `cmdline`, serving the
    /// API on `socket`.
    pub fn boot(
        vmm: &Path,
        guest: &Path,
        memory: &str,
        cmdline: &str,
        socket: PathBuf,
    ) -> Result<Self, BenchError> {
        let mut cmd = Command::new(vmm);
        cmd.arg("--kernel")
            .arg(guest)
            .args(["--memory", memory, "--cmdline", cmdline]);
        Self::spawn(cmd, vmm, socket)
    }

    /// A VMM with no VM, answering `vmm.ping` on `socket`.
    pub fn empty(vmm: &Path, socket: PathBuf) -> Result<Self, BenchError> {
        let me = Self::spawn(Command::new(vmm), vmm, socket)?;
        let deadline = Instant::now() + PING_LIMIT;
        loop {
            if let Ok((200, _)) = exchange(&me.socket, "GET", "vmm.ping", "") {
                return Ok(me);
            }
            if Instant::now() > deadline {
                return Err(BenchError::NoSocket(me.socket.clone()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn spawn(mut cmd: Command, vmm: &Path, socket: PathBuf) -> Result<Self, BenchError> {
        let _ = std::fs::remove_file(&socket);
        let mut child = cmd
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Spawn(vmm.into(), e))?;
        let stderr = drain(child.stderr.take());
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, lines) = mpsc::channel();
        // Stamps each console line as it arrives; keeps draining after the
        // receiver is gone so the VMM never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                let _ = tx.send((Instant::now(), line));
            }
        });
        Ok(Self {
            child,
            socket,
            lines,
            stderr: Some(stderr),
        })
    }

    /// Waits for a console line starting with `prefix`; returns when it was
    /// read. A `TG: FAIL` line or the VMM ending is an error.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.starts_with(prefix) => return Ok(at),
                Ok((_, line)) if line.starts_with("TG: FAIL") => {
                    return Err(BenchError::GuestFailed(line))
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(BenchError::Timeout(prefix.to_string(), limit))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    let err = self
                        .stderr
                        .take()
                        .and_then(|h| h.join().ok())
                        .unwrap_or_default();
                    return Err(BenchError::Ended(
                        err.lines().last().unwrap_or("").to_string(),
                    ));
                }
            }
        }
    }

    /// Drops the console lines read so far.
    pub fn skip_lines(&self) {
        while self.lines.try_recv().is_ok() {}
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
    ) -> Result<(Instant, Duration), BenchError> {
        let start = Instant::now();
        let (status, text) =
            exchange(&self.socket, method, endpoint, body).map_err(BenchError::Api)?;
        let took = start.elapsed();
        if status != expect {
            return Err(BenchError::Status {
                endpoint,
                status,
                body: text.trim().to_string(),
            });
        }
        Ok((start, took))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_LIMIT;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                eprintln!(
                    "snapshot-bench: vmm (pid {}) still running {STOP_LIMIT:?} after SIGTERM; killing it",
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

/// One request per connection, as `vmctl` does (`vmm::api::client::raw`,
/// not linked here so this bench builds whatever state `vmm/` is in):
/// connect, send with `Connection: close`, read to EOF. Returns the status
/// and the body.
fn exchange(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(REQUEST_LIMIT))?;
    s.set_write_timeout(Some(REQUEST_LIMIT))?;
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

fn drain(r: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}
