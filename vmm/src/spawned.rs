//! Backends vmm starts itself: a disk given as an image (`--disk
//! path=FILE`, or `disks: [{"path": ...}]` as libvirt sends it) is served
//! by a `blk-backend` process on a private socket, a NIC given as a tap
//! (`--net tap=NAME`, `net: [{"tap": ...}]`) by a `net-backend`, and the
//! VM connects to that socket like to any vhost-user device. The VMM still
//! emulates no device.
//!
//! Each backend has a supervisor thread that starts it, waits for it and,
//! should it die, starts it again on the same socket: the VM's vhost-user
//! frontend reconnects and resumes the rings from the inflight region, as
//! with any backend that restarts. The backend gets SIGKILL if that thread
//! goes away (`PR_SET_PDEATHSIG`), so a vmm that is killed leaves none
//! behind; [`stop_all`] stops them on a clean exit or vm.delete.
//!
//! Supervisor threads are started by one launcher thread (`vmm-spawn`,
//! [`start_launcher`]) that `main` starts before it confines itself, when
//! any backend may be started (an image or a tap on the command line, or
//! the API; a VM with neither has no launcher thread at all): a
//! process inherits the seccomp filters of the thread that forks it, across
//! `execve`, so the backends run under the launcher's list
//! ([`crate::seccomp::ThreadKind::Spawn`]) and their own, never under the
//! controller's or the API's. They are started with vmm's `--seccomp` mode
//! ([`crate::seccomp::mode`]), so `log` or `false` reaches them too.
//!
//! The backends are looked up beside the vmm binary, then in `PATH`. The
//! sockets (vhost-user and metrics) live in a directory of this process's
//! own (mode 0700) under `$XDG_RUNTIME_DIR`, or the temporary directory,
//! removed by [`stop_all`]. Each backend serves its counters on its
//! metrics socket, so vm.counters and vm.metrics show them.
//!
//! Bad input is refused before anything starts, with the reason: an image
//! that does not exist or cannot be opened, one another VM uses (vmm holds
//! an advisory `flock` on each image for as long as its backend runs:
//! exclusive, shared when read-only), a tap fd that is not a tap. A backend
//! that exits before it serves is reported with the last line it wrote on
//! stderr.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::devices_config::{ImageDisk, TapNet};
use crate::vhost_user::{DeviceConfig, Kind};

/// How long a backend may take to create its socket.
const READY_WAIT: Duration = Duration::from_secs(10);
/// Restart delays after a backend dies: doubling from the first to the last.
const RESTART_FIRST: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(5);

/// Errors starting a backend.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("Disk image {0} does not exist")]
    NoImage(String),
    #[error("Cannot open disk image {0}")]
    OpenImage(String, #[source] io::Error),
    #[error("Disk image {0} is in use by another VM")]
    InUse(String),
    #[error("Fd {0} given for a tap is not a tap")]
    NotTap(RawFd),
    #[error("Cannot find {0} beside vmm or in PATH")]
    NotFound(&'static str),
    #[error("Cannot create the backends' socket directory {0}")]
    Dir(String, #[source] io::Error),
    #[error("Cannot start {0}")]
    Start(&'static str, #[source] io::Error),
    #[error("{0} for {1} exited before creating its socket: {2}")]
    Exited(&'static str, String, String),
    #[error("{0} for {1} did not create its socket in time")]
    Timeout(&'static str, String),
    #[error("{0} tap fds given for {1} queue pairs: give one per pair")]
    TapFds(usize, u16),
}

/// One supervised backend.
struct Supervised {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicI32>,
    thread: JoinHandle<()>,
}

static BACKENDS: Mutex<Vec<Supervised>> = Mutex::new(Vec::new());
static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
/// The number in the next backend's socket names.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Work for the launcher thread: starting a supervisor thread.
type Launch = Box<dyn FnOnce() + Send>;

static LAUNCHER: Mutex<Option<mpsc::Sender<Launch>>> = Mutex::new(None);

/// Starts the launcher thread (`vmm-spawn`), which starts every supervisor
/// thread from then on, so that they and their backends inherit its filter
/// rather than their requester's. Call it before the calling thread
/// confines itself; without it, supervisors start on the requesting thread.
pub fn start_launcher() -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Launch>();
    std::thread::Builder::new()
        .name("vmm-spawn".into())
        .spawn(move || {
            crate::events::block_signals();
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Spawn);
            for launch in rx {
                launch();
            }
        })?;
    *LAUNCHER.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    Ok(())
}

/// Starts thread `name` running `f`, from the launcher if it runs.
fn spawn_thread(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    let launcher = LAUNCHER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let Some(launcher) = launcher else {
        return std::thread::Builder::new().name(name).spawn(f);
    };
    let gone = || io::Error::other("the backend launcher thread has ended");
    let (tx, rx) = mpsc::channel();
    launcher
        .send(Box::new(move || {
            let _ = tx.send(std::thread::Builder::new().name(name).spawn(f));
        }))
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// This process's socket directory, created on first use.
fn socket_dir() -> Result<PathBuf, SpawnError> {
    let mut dir = DIR.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(d) = dir.as_ref() {
        return Ok(d.clone());
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("vmm-{}", std::process::id()));
    // A directory left by an earlier process with our pid is stale.
    let _ = std::fs::remove_dir_all(&d);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&d)
        .map_err(|e| SpawnError::Dir(d.display().to_string(), e))?;
    *dir = Some(d.clone());
    Ok(d)
}

/// `name` beside the running vmm, else in PATH.
fn find(name: &'static str) -> Result<PathBuf, SpawnError> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join(name)));
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name));
    beside
        .into_iter()
        .chain(in_path)
        .find(|p| p.is_file())
        .ok_or(SpawnError::NotFound(name))
}

/// What vmm starts a backend for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Disk(ImageDisk),
    Tap(TapNet),
    /// Tap queues opened by the API client (libvirt), one per queue pair:
    /// fds of this process, open for the duration of the call.
    TapFds(TapNet, Vec<RawFd>),
}

/// Starts the backend for `b`; returns the vhost-user device on it.
pub fn start(b: &Backend) -> Result<DeviceConfig, SpawnError> {
    match b {
        Backend::Disk(d) => disk(d),
        Backend::Tap(t) => tap(t, &[]),
        Backend::TapFds(t, fds) => tap(t, fds),
    }
}

/// Starts a net-backend on the tap `net` names (created if missing), or
/// on the tap queues `fds` when given (dup'ed: the backend gets them again
/// when it restarts), and returns the vhost-user NIC that connects to it.
pub fn tap(net: &TapNet, fds: &[RawFd]) -> Result<DeviceConfig, SpawnError> {
    const NAME: &str = "net-backend";
    if !fds.is_empty() && fds.len() != usize::from(net.queue_pairs) {
        return Err(SpawnError::TapFds(fds.len(), net.queue_pairs));
    }
    if let Some(&bad) = fds.iter().find(|&&fd| !is_tap(fd)) {
        return Err(SpawnError::NotTap(bad));
    }
    let (mut cmd, socket, metrics) = command(NAME, "net")?;
    cmd.arg("--queue-pairs").arg(net.queue_pairs.to_string());
    let mut keep = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: F_DUPFD_CLOEXEC only duplicates `fd`, which the caller
        // keeps open for this call; a bad fd fails.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(SpawnError::Start(NAME, io::Error::last_os_error()));
        }
        // SAFETY: `dup` was just created and is owned by nobody else.
        keep.push(unsafe { OwnedFd::from_raw_fd(dup) });
        cmd.arg("--tap-fd").arg(dup.to_string());
    }
    if keep.is_empty() {
        cmd.arg("--tap").arg(&net.tap).arg("--create-tap");
    } else {
        let raw: Vec<RawFd> = keep.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: runs in the child between fork and exec; F_SETFD only
        // clears close-on-exec on the child's copies of our tap fds, so
        // net-backend inherits them under the numbers its arguments name.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &raw {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    if let Some(m) = net.mac {
        let mac: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
        cmd.arg("--mac").arg(mac.join(":"));
    }
    supervise(NAME, cmd, &socket, Path::new(&net.tap), keep)?;
    Ok(DeviceConfig {
        kind: Kind::Net {
            mac: net.mac,
            queue_pairs: net.queue_pairs,
        },
        socket,
        queues: net.queue_pairs * 2,
        queue_size: net.queue_size,
        metrics_socket: Some(metrics),
    })
}

/// The command for backend `name` on a new vhost-user socket and metrics
/// socket in this process's directory, named `<kind><n>.sock` and
/// `<kind><n>.metrics`.
fn command(name: &'static str, kind: &str) -> Result<(Command, PathBuf, PathBuf), SpawnError> {
    let binary = find(name)?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = socket_dir()?;
    let socket = dir.join(format!("{kind}{n}.sock"));
    let metrics = dir.join(format!("{kind}{n}.metrics"));
    let mut cmd = Command::new(binary);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--metrics-socket")
        .arg(&metrics);
    // vmm's own --seccomp reaches its backends: `log` or `false` for
    // debugging a VM should not stop at their filters.
    if let Some(mode) = crate::seccomp::mode() {
        cmd.arg("--seccomp").arg(mode.as_arg());
    }
    Ok((cmd, socket, metrics))
}

/// Whether `fd` is a tap (or tun) queue: TUNGETIFF answers only on those.
fn is_tap(fd: RawFd) -> bool {
    // struct ifreq: 40 bytes on x86_64.
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most one `struct ifreq` (40 bytes) into
    // the buffer, which is that large; any other fd only fails.
    unsafe { libc::ioctl(fd, libc::TUNGETIFF, ifreq.as_mut_ptr()) == 0 }
}

/// Opens `disk`'s image as its backend will (read-write unless
/// read-only) and takes the advisory lock that tells other VMs it is in
/// use; the returned fd holds the lock.
fn lock_image(disk: &ImageDisk) -> Result<OwnedFd, SpawnError> {
    let shown = || disk.path.display().to_string();
    if !disk.path.exists() {
        return Err(SpawnError::NoImage(shown()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!disk.readonly)
        .open(&disk.path)
        .map_err(|e| SpawnError::OpenImage(shown(), e))?;
    let mode = if disk.readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file we own; it changes no memory.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            SpawnError::InUse(shown())
        } else {
            SpawnError::OpenImage(shown(), e)
        });
    }
    Ok(file.into())
}

/// Starts a blk-backend serving `disk` and returns the vhost-user disk
/// that connects to it.
pub fn disk(disk: &ImageDisk) -> Result<DeviceConfig, SpawnError> {
    const NAME: &str = "blk-backend";
    let lock = lock_image(disk)?;
    let (mut cmd, socket, metrics) = command(NAME, "disk")?;
    cmd.arg("--image")
        .arg(&disk.path)
        .arg("--queues")
        .arg(disk.queues.to_string());
    if disk.readonly {
        cmd.arg("--readonly");
    }
    supervise(NAME, cmd, &socket, &disk.path, vec![lock])?;
    Ok(DeviceConfig {
        kind: Kind::Block,
        socket,
        queues: disk.queues,
        queue_size: disk.queue_size,
        metrics_socket: Some(metrics),
    })
}

/// Runs `cmd` under a supervisor thread until its `socket` exists; `keep`
/// (fds the command's children inherit) lives as long as that thread.
fn supervise(
    name: &'static str,
    mut cmd: Command,
    socket: &Path,
    what: &Path,
    keep: Vec<OwnedFd>,
) -> Result<(), SpawnError> {
    cmd.stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and
    // only calls prctl, sigemptyset and pthread_sigmask, which are
    // async-signal-safe, on a set on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            // Dies with the supervisor thread (and so with vmm).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // vmm's threads block the signals it reads from a signalfd:
            // the backend must not inherit that (SIGTERM would not stop it).
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.stderr(Stdio::piped());
    let stop = Arc::new(AtomicBool::new(false));
    let pid = Arc::new(AtomicI32::new(0));
    let last_line = Arc::new(Mutex::new(String::new()));
    let (started_tx, started) = mpsc::channel();
    let (s, p, sock) = (stop.clone(), pid.clone(), socket.to_path_buf());
    let shown = what.display().to_string();
    let last = last_line.clone();
    let thread = spawn_thread(format!("vmm-{name}"), move || {
        let _keep = keep;
        run(name, cmd, &sock, &shown, &s, &p, &last, started_tx)
    })
    .map_err(|e| SpawnError::Start(name, e))?;
    let supervised = Supervised {
        socket: socket.to_path_buf(),
        stop,
        pid,
        thread,
    };
    let shown = what.display().to_string();
    let exited = |supervised: Supervised| {
        stop_one(supervised);
        let said = last_line
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        SpawnError::Exited(name, shown.clone(), said)
    };
    match started.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            stop_one(supervised);
            return Err(SpawnError::Start(name, e));
        }
        Err(_) => return Err(exited(supervised)),
    }
    let deadline = Instant::now() + READY_WAIT;
    while !socket.exists() {
        if supervised.thread.is_finished() || supervised.pid.load(Ordering::SeqCst) == 0 {
            return Err(exited(supervised));
        }
        if Instant::now() > deadline {
            stop_one(supervised);
            return Err(SpawnError::Timeout(name, shown));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    BACKENDS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(supervised);
    Ok(())
}

/// Copies the backend's stderr to ours, keeping its last non-empty line
/// in `last`, on a thread that ends at the pipe's end.
fn forward_stderr(
    from: std::process::ChildStderr,
    last: Arc<Mutex<String>>,
) -> Option<JoinHandle<()>> {
    use std::io::BufRead;
    let spawned = std::thread::Builder::new()
        .name("vmm-backend-log".into())
        .spawn(move || {
            for line in io::BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let plain = strip_ansi(&line);
                if !plain.trim().is_empty() {
                    *last.lock().unwrap_or_else(PoisonError::into_inner) = plain;
                }
            }
        });
    spawned
        .inspect_err(|e| tracing::warn!(error = %e, "cannot forward a backend's stderr"))
        .ok()
}

/// Why a backend killed by SIGSYS died: a backend vmm starts runs under
/// the filter of vmm's launcher thread, which allows what blk-backend and
/// net-backend do, not what any other program may.
pub const SIGSYS_REASON: &str = "killed by SIGSYS: a system call outside the seccomp filter it inherits from vmm (start vmm with --seccomp false to run other backends)";

/// How long the last words of a backend that exited may take to arrive.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// `line` without terminal escape sequences (`ESC [ ... letter`) and
/// without the log prefix before a level word, so an error reads as one
/// plain sentence.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    match out.find(" ERROR ") {
        Some(i) => out[i + " ERROR ".len()..].trim().to_string(),
        None => out.trim().to_string(),
    }
}

/// The supervisor: (re)starts the backend until told to stop. The first
/// start's result goes to `started`; a backend that dies before any start
/// succeeded is not restarted. The backend's stderr goes to ours, its last
/// line kept in `last`.
#[allow(clippy::too_many_arguments)]
fn run(
    name: &'static str,
    mut cmd: Command,
    socket: &Path,
    what: &str,
    stop: &AtomicBool,
    pid: &AtomicI32,
    last: &Arc<Mutex<String>>,
    started: mpsc::Sender<io::Result<()>>,
) {
    let mut started = Some(started);
    let mut delay = RESTART_FIRST;
    loop {
        let _ = std::fs::remove_file(socket);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                match started.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    None => {
                        tracing::warn!(error = %e, backend = name, device = what, "cannot restart the backend")
                    }
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(RESTART_MAX);
                continue;
            }
        };
        pid.store(child.id() as i32, Ordering::SeqCst);
        let forwarder = child
            .stderr
            .take()
            .and_then(|err| forward_stderr(err, last.clone()));
        let first = started.take();
        let up_since = Instant::now();
        if let Some(tx) = first.as_ref() {
            let _ = tx.send(Ok(()));
        }
        let status = child.wait();
        // Its last line is read before anyone is told it exited.
        let deadline = Instant::now() + LAST_WORDS;
        while forwarder
            .as_ref()
            .is_some_and(|f| !f.is_finished() && Instant::now() < deadline)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if status
            .as_ref()
            .is_ok_and(|s| s.signal() == Some(libc::SIGSYS))
        {
            // It inherited vmm's seccomp filter (that of the launcher
            // thread) and made a call outside it: say so, not nothing.
            *last.lock().unwrap_or_else(PoisonError::into_inner) = SIGSYS_REASON.into();
        }
        pid.store(0, Ordering::SeqCst);
        if stop.load(Ordering::SeqCst) || (first.is_some() && !socket.exists()) {
            return;
        }
        tracing::warn!(backend = name, device = what, status = ?status, "backend exited; restarting it");
        if up_since.elapsed() > RESTART_MAX {
            delay = RESTART_FIRST;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(RESTART_MAX);
        if stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// How long a backend may take to exit on SIGTERM before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(3);

fn signal(b: &Supervised, sig: libc::c_int) {
    let pid = b.pid.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill with the pid of our own child, not yet reaped (the
        // supervisor clears it as soon as wait returns).
        unsafe { libc::kill(pid, sig) };
    }
}

fn stop_one(b: Supervised) {
    b.stop.store(true, Ordering::SeqCst);
    signal(&b, libc::SIGTERM);
    let deadline = Instant::now() + STOP_WAIT;
    while !b.thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !b.thread.is_finished() {
        tracing::warn!("backend did not stop on SIGTERM; killing it");
        signal(&b, libc::SIGKILL);
    }
    let _ = b.thread.join();
}

/// Stops the backend serving `socket`, if vmm started one (a device that
/// was refused after its backend started).
pub fn stop(socket: &Path) {
    let mut all = BACKENDS.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(i) = all.iter().position(|b| b.socket == socket) else {
        return;
    };
    let b = all.remove(i);
    drop(all);
    stop_one(b);
}

/// Stops every backend started here and removes their sockets' directory.
pub fn stop_all() {
    let all = std::mem::take(&mut *BACKENDS.lock().unwrap_or_else(PoisonError::into_inner));
    for b in all {
        stop_one(b);
    }
    if let Some(d) = DIR.lock().unwrap_or_else(PoisonError::into_inner).take() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The pids of the backends running now (for tests and logs).
pub fn pids() -> Vec<i32> {
    BACKENDS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|b| b.pid.load(Ordering::SeqCst))
        .filter(|p| *p > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_log_line_becomes_its_message() {
        let line = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \u{1b}[2mbackends::daemon\u{1b}[0m\u{1b}[2m:\u{1b}[0m Cannot set up the tap";

        assert_eq!(strip_ansi(line), "backends::daemon: Cannot set up the tap");
        assert_eq!(
            strip_ansi("blk-backend: no such image"),
            "blk-backend: no such image"
        );
    }
}
