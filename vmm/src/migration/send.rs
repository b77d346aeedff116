//! The source side: the pre-copy rounds on their own thread (`vmm-migrate`)
//! while the VM runs, and the pieces the VM's event loop uses for the last
//! step (see the module documentation of [`super`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::dirty::{ram_end, Bitmap, DirtyLog, PAGE};
use super::stream::{self, Kind, Start, MAX_MEMORY};
use super::{Conn, MigrationError, Progress, Url};
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::virtio::pci::VirtioPci;

type Result<T> = std::result::Result<T, MigrationError>;

/// How long the source waits for the destination to answer, and for a
/// write to go out.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages are sent in frames of at most this size, so a cancel or timeout
/// is noticed within one frame.
const CHUNK: u64 = 32 << 20;

/// `PUT /vm.send-migration`: Cloud Hypervisor's `SendMigrationData`, with
/// the downtime and timeout bounds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationConfig {
    /// `unix:/path` or `tcp:host:port`.
    pub destination_url: String,
    /// Hand guest memory over instead of copying it (same host, unix).
    #[serde(default)]
    pub local: bool,
    /// The pause the guest may see.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Give up (the VM goes on here) if pre-copy has not converged by then.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Ours: pre-copy sends at most this many MiB per second (0: no
    /// limit), so a migration does not take the whole link; the last
    /// round, with the VM paused, is never limited.
    #[serde(default)]
    pub max_bandwidth_mibps: u64,
}

fn default_downtime_ms() -> u64 {
    300
}

fn default_timeout_s() -> u64 {
    3600
}

/// A checked request.
#[derive(Clone, Debug)]
pub struct Request {
    pub url: Url,
    pub local: bool,
    pub downtime: Duration,
    pub timeout: Duration,
    /// Bytes per second pre-copy may send.
    pub max_bandwidth: Option<u64>,
}

impl SendMigrationConfig {
    pub fn check(&self) -> Result<Request> {
        let url: Url = self.destination_url.parse()?;
        if self.local && !matches!(url, Url::Unix(_)) {
            return Err(MigrationError::LocalNeedsUnix);
        }
        Ok(Request {
            url,
            local: self.local,
            downtime: Duration::from_millis(self.downtime_ms),
            timeout: Duration::from_secs(self.timeout_s),
            max_bandwidth: (self.max_bandwidth_mibps > 0)
                .then(|| self.max_bandwidth_mibps.saturating_mul(1 << 20)),
        })
    }
}

/// What the pre-copy thread needs from the VM.
pub struct Source {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemory,
    pub memfd: Arc<File>,
    pub config: VmConfig,
    pub devices: Vec<Arc<Mutex<VirtioPci>>>,
    /// The devices' API ids, for messages.
    pub ids: Vec<String>,
}

/// Where pre-copy left things for the last step: the connection, the
/// logs (still on) and the pages dirty since the last round.
pub struct Converged {
    pub conn: Conn,
    pub log: Option<DirtyLog>,
    pub pending: Bitmap,
    pub started: Instant,
}

/// An outgoing migration, as the VM's event loop holds it.
pub struct Outgoing {
    pub request: Request,
    thread: Option<JoinHandle<Result<Converged>>>,
    /// Written when the thread ends.
    pub done: EventFd,
    cancel: Arc<AtomicBool>,
    pub progress: Arc<Mutex<Progress>>,
}

impl Outgoing {
    /// Starts pre-copy on its own thread.
    pub fn start(request: Request, source: Source) -> Result<Self> {
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(MigrationError::DirtyLog)?;
        let signal = done.try_clone().map_err(MigrationError::DirtyLog)?;
        let cancel = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(Progress::default()));
        let (r, c, p) = (request.clone(), cancel.clone(), progress.clone());
        let thread = std::thread::Builder::new()
            .name("vmm-migrate".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migrate);
                let result = precopy(&r, &source, &c, &p);
                if result.is_err() {
                    stop_backend_logs(&source.devices);
                }
                let _ = signal.write(1);
                result
            })
            .map_err(MigrationError::DirtyLog)?;
        Ok(Self {
            request,
            thread: Some(thread),
            done,
            cancel,
            progress,
        })
    }

    /// Waits for the pre-copy thread (asking it to stop first if
    /// `cancel`) and returns what it reached.
    pub fn join(&mut self, cancel: bool) -> Result<Converged> {
        if cancel {
            self.cancel.store(true, Ordering::Relaxed);
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(MigrationError::VmStopped),
        }
    }
}

/// Turns every backend's dirty log off.
pub fn stop_backend_logs(devices: &[Arc<Mutex<VirtioPci>>]) {
    for d in devices {
        if let Err(e) = lock(d).device_mut().set_dirty_log(None) {
            tracing::warn!(error = %e, "cannot turn a backend's dirty log off");
        }
    }
}

fn precopy(
    req: &Request,
    src: &Source,
    cancel: &AtomicBool,
    progress: &Mutex<Progress>,
) -> Result<Converged> {
    let started = Instant::now();
    let mut conn = Conn::connect(&req.url)?;
    let io = MigrationError::Io;
    conn.set_read_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
    set_write_timeout(&conn, PEER_TIMEOUT).map_err(io)?;
    stream::write_hello(&mut conn, req.local)?;
    if req.local {
        let unix = conn.unix().ok_or(MigrationError::LocalNeedsUnix)?;
        unix.send_with_fd(&[0u8][..], src.memfd.as_raw_fd())
            .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    let start = Start {
        config: src.config.clone(),
        vmm_version: crate::state::file::VMM_VERSION.to_string(),
    };
    stream::write_state(&mut conn, Kind::Start, &start)?;
    stream::expect_ok(&mut conn)?;
    let pending = Bitmap::new(ram_end(&src.mem));
    if req.local {
        return Ok(Converged {
            conn,
            log: None,
            pending,
            started,
        });
    }

    let mut log = DirtyLog::new(src.vm.clone(), src.mem.clone())?;
    log.start_kvm()?;
    for (i, d) in src.devices.iter().enumerate() {
        lock(d)
            .device_mut()
            .set_dirty_log(Some(log.share()))
            .map_err(|e| {
                let id = src.ids.get(i).cloned().unwrap_or_else(|| i.to_string());
                MigrationError::Backend(id, e)
            })?;
    }
    // Everything dirty from here on is in the logs; round 0 sends every
    // page that holds data now.
    let mut t = Instant::now();
    let pace = Pace {
        limit: req.max_bandwidth,
        cancel,
        deadline: Some((started + req.timeout, req.timeout.as_secs())),
        progress: Some(progress),
    };
    let mut sent = send_data(&mut conn, src, &pace)?;
    let mut round = 0u32;
    loop {
        let took = t.elapsed().max(Duration::from_millis(1));
        let mut dirty = pending.clone();
        log.take(&mut dirty)?;
        let remaining = dirty.count() * PAGE;
        let total = lock(progress).sent_bytes;
        let bandwidth = (sent as f64 / took.as_secs_f64()) as u64;
        let rate = (remaining as f64 / took.as_secs_f64()) as u64;
        *lock(progress) = Progress {
            round: round + 1,
            sent_bytes: total,
            remaining_bytes: remaining,
            dirty_rate_bps: rate,
            bandwidth_bps: bandwidth,
        };
        crate::events::emit(
            "migration",
            "round",
            &[
                ("round", round.to_string()),
                ("remaining_bytes", remaining.to_string()),
                ("bandwidth_bps", bandwidth.to_string()),
            ],
        );
        tracing::info!(round, sent, remaining, bandwidth, "pre-copy round done");
        if (remaining as f64) <= bandwidth as f64 * req.downtime.as_secs_f64() {
            return Ok(Converged {
                conn,
                log: Some(log),
                pending: dirty,
                started,
            });
        }
        if started.elapsed() >= req.timeout {
            return Err(MigrationError::Timeout(req.timeout.as_secs()));
        }
        round += 1;
        t = Instant::now();
        sent = send_runs(&mut conn, &src.mem, &src.memfd, &dirty.runs(), &pace)?;
    }
}

/// How pages go out: the bandwidth limit, and when to stop.
pub struct Pace<'a> {
    /// Bytes per second, if limited.
    pub limit: Option<u64>,
    pub cancel: &'a AtomicBool,
    /// When pre-copy gives up, and `timeout_s` for the message.
    pub deadline: Option<(Instant, u64)>,
    /// Updated as frames go out.
    pub progress: Option<&'a Mutex<Progress>>,
}

/// Round 0: every range the memfd holds data for.
fn send_data(conn: &mut Conn, src: &Source, pace: &Pace) -> Result<u64> {
    let size = src.memfd.metadata().map_err(MigrationError::Io)?.len();
    let data = crate::snapshot::data_ranges(&src.memfd, size).map_err(MigrationError::Io)?;
    let mut runs = Vec::new();
    for r in src.mem.iter() {
        let Some(fo) = r.file_offset() else { continue };
        let (lo, hi) = (fo.start(), fo.start() + r.len());
        for d in &data {
            let (s, e) = (d.start.max(lo), d.end.min(hi));
            if s < e {
                runs.push((r.start_addr().0 + (s - lo), e - s));
            }
        }
    }
    if let Some(p) = pace.progress {
        lock(p).remaining_bytes = runs.iter().map(|r| r.1).sum();
    }
    send_runs(conn, &src.mem, &src.memfd, &runs, pace)
}

/// Sends the guest-physical runs `(address, length)` as memory frames
/// straight from the memfd (`sendfile`); returns the bytes sent.
pub fn send_runs(
    conn: &mut Conn,
    mem: &GuestMemory,
    memfd: &File,
    runs: &[(u64, u64)],
    pace: &Pace,
) -> Result<u64> {
    let mut sent = 0;
    let t0 = Instant::now();
    // A tenth of a second's worth per frame keeps a limit smooth.
    let chunk = pace.limit.map_or(CHUNK, |l| (l / 10).clamp(PAGE, CHUNK));
    for &(gpa, len) in runs {
        let mut off = 0;
        while off < len {
            if pace.cancel.load(Ordering::Relaxed) {
                return Err(MigrationError::VmStopped);
            }
            if let Some((_, secs)) = pace.deadline.filter(|d| Instant::now() >= d.0) {
                return Err(MigrationError::Timeout(secs));
            }
            if let Some(limit) = pace.limit {
                let due = Duration::from_secs_f64(sent as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let at = gpa + off;
            let (file_off, in_region) = file_offset(mem, at).ok_or(MigrationError::OutsideRam {
                gpa: at,
                len: len - off,
            })?;
            let n = (len - off).min(in_region).min(chunk).min(MAX_MEMORY);
            stream::write_header(conn, Kind::Memory, 8 + n)?;
            std::io::Write::write_all(conn, &at.to_le_bytes()).map_err(MigrationError::Io)?;
            sendfile_all(conn, memfd, file_off, n)?;
            off += n;
            sent += n;
            if let Some(p) = pace.progress {
                let mut p = lock(p);
                p.sent_bytes += n;
                p.remaining_bytes = p.remaining_bytes.saturating_sub(n);
            }
        }
    }
    Ok(sent)
}

/// The memfd offset of guest address `gpa` and the bytes left in its
/// region from there.
fn file_offset(mem: &GuestMemory, gpa: u64) -> Option<(u64, u64)> {
    mem.iter().find_map(|r| {
        let start = r.start_addr().0;
        let fo = r.file_offset()?;
        (gpa >= start && gpa < start + r.len())
            .then(|| (fo.start() + (gpa - start), start + r.len() - gpa))
    })
}

fn sendfile_all(conn: &Conn, file: &File, offset: u64, len: u64) -> Result<()> {
    let mut off = offset as libc::off_t;
    let end = offset + len;
    while (off as u64) < end {
        let n = (end - off as u64) as usize;
        // SAFETY: both fds are open for the call; `off` is a valid
        // off_t the kernel advances; no memory of ours is written.
        let r = unsafe { libc::sendfile(conn.as_raw_fd(), file.as_raw_fd(), &mut off, n) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MigrationError::Io(e));
        }
        if r == 0 {
            return Err(MigrationError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(())
}

fn set_write_timeout(conn: &Conn, t: Duration) -> std::io::Result<()> {
    match conn {
        Conn::Unix(s) => s.set_write_timeout(Some(t)),
        Conn::Tcp(s) => s.set_write_timeout(Some(t)),
    }
}

/// Best effort: tells the destination to drop what it received.
pub fn abandon(conn: &mut Conn) {
    let _ = stream::write_frame(conn, Kind::Abandon, &[]);
}
