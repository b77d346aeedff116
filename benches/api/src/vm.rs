//! One real `vmm` serving the control API with the test guest held idle
//! (`tg.hold`), and timed requests on its socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::BenchError;

/// How long one API request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// How long a VMM may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// What the VM is started with.
pub struct VmSpec<'a> {
    pub vmm: &'a Path,
    pub guest: &'a Path,
    pub cpus: u8,
    pub memory: &'a str,
    pub cpu_features: Option<&'a str>,
}

/// A running `vmm`; stopped with SIGTERM and reaped when dropped.
pub struct Vm {
    child: Child,
    socket: PathBuf,
}

impl Vm {
    /// Starts the VMM and waits until the guest is idle (`TG: HOLD`) and
    /// the API socket exists.
    pub fn start(spec: &VmSpec, socket: PathBuf) -> Result<Self, BenchError> {
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(spec.vmm);
        cmd.arg("--api-socket")
            .arg(&socket)
            .arg("--kernel")
            .arg(spec.guest)
            .args(["--cpus", &spec.cpus.to_string(), "--memory", spec.memory])
            .args(["--cmdline", "console=ttyS0 tg.hold"]);
        if let Some(f) = spec.cpu_features {
            cmd.args(["--cpu-features", f]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Spawn(spec.vmm.into(), e))?;
        let stderr = drain(child.stderr.take());
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                let err = stderr.join().unwrap_or_default();
                return Err(BenchError::GuestEnded {
                    cpus: spec.cpus,
                    stderr: err.lines().last().unwrap_or("").to_string(),
                });
            }
            if line.starts_with("TG: HOLD") {
                break;
            }
        }
        // Keep draining the console so the VMM never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let vm = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vm.socket.exists() {
            if Instant::now() > deadline {
                return Err(BenchError::NoSocket(vm.socket.clone()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(vm)
    }

    /// Sends `method endpoint`, checks the status is `expect`, and returns
    /// the time from connect to the end of the response.
    pub fn timed(
        &self,
        method: &'static str,
        endpoint: &'static str,
        expect: u16,
    ) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let (status, body) = exchange(&self.socket, method, endpoint).map_err(BenchError::Api)?;
        let took = start.elapsed();
        if status != expect {
            return Err(BenchError::Status {
                endpoint,
                status,
                body: body.trim().to_string(),
            });
        }
        Ok(took)
    }

    /// The body of `GET vm.info`.
    pub fn info(&self) -> Result<String, BenchError> {
        exchange(&self.socket, "GET", "vm.info")
            .map(|(_, body)| body)
            .map_err(BenchError::Api)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_LIMIT;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                eprintln!(
                    "api-bench: vmm (pid {}) still running {STOP_LIMIT:?} after SIGTERM; killing it",
                    self.child.id()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One request per connection, as `vmctl` does (`vmm::api::client::raw`,
/// not linked here so this bench builds whatever state `vmm/` is in):
/// connect, send with `Connection: close`, read to EOF. Returns the status
/// and the body.
fn exchange(socket: &Path, method: &str, endpoint: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(REQUEST_LIMIT))?;
    s.set_write_timeout(Some(REQUEST_LIMIT))?;
    write!(
        s,
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
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
