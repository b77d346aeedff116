//! vhost-user frontends: the control half of a device whose data path runs
//! in a backend process. The guest's queue notifications reach the backend
//! through the queue's ioeventfd (SET_VRING_KICK), completions come back
//! through the vector's irqfd (SET_VRING_CALL); the VMM only negotiates.
//!
//! If the backend goes away the VM keeps running; a monitor thread
//! reconnects when the socket accepts again and restores the rings (and
//! the inflight region, when negotiated) so the guest carries on.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

mod device_state;
mod migration;
mod watchdog;
use migration::ring_config;
pub use migration::LogShare;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use watchdog::{Busy, Watchdog, STUCK_AFTER};

use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::virtio::{
    ActivateError, ActiveQueue, VirtioDevice, F_ACCESS_PLATFORM, F_NOTIFICATION_DATA,
    F_RING_PACKED, F_RING_RESET, F_VERSION_1, TYPE_BLOCK, TYPE_NET,
};

/// VHOST_USER_F_PROTOCOL_FEATURES.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL: dirty logging, not offered to the guest.
const F_LOG_ALL: u64 = 1 << 26;
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
const NET_F_CTRL_VQ: u64 = 1 << 17;
const NET_F_MQ: u64 = 1 << 22;
const NET_S_LINK_UP: u16 = 1;
/// virtio-fs device type; its config is a 36-byte tag and a queue count.
const TYPE_FS: u32 = 26;
const FS_TAG_LEN: usize = 36;
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// The longest a backend may take to answer a request: one that accepts
/// and then never answers must not stop the VMM (a boot, a pause).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors connecting a vhost-user backend.
#[derive(Debug, Error)]
pub enum VhostUserError {
    #[error("Cannot connect to vhost-user backend at {0}")]
    Connect(String, #[source] vhost::Error),
    #[error("vhost-user {0} failed")]
    Request(&'static str, #[source] vhost::Error),
    #[error("Backend at {0} does not offer VIRTIO_F_VERSION_1")]
    NotModern(String),
    #[error("Backend at {path} serves {max} queues, {wanted} requested")]
    TooManyQueues {
        path: String,
        max: u64,
        wanted: usize,
    },
    #[error("Block backend at {0} lacks the CONFIG protocol feature")]
    NoConfig(String),
    #[error("Cannot start the reconnect thread")]
    Thread(#[source] std::io::Error),
    #[error("Cannot duplicate a queue eventfd")]
    Dup(#[source] std::io::Error),
    #[error("Cannot set the reply timeout on the backend socket")]
    Timeout(#[source] std::io::Error),
    #[error("Cannot transfer the backend's device state")]
    StateTransfer(#[source] std::io::Error),
    #[error("The backend at {0} is not connected")]
    NotConnected(String),
    #[error("Backend at {0} cannot log its writes to guest memory (VHOST_F_LOG_ALL, LOG_SHMFD)")]
    NoDirtyLog(String),
    #[error("vhost-user SET_LOG_BASE failed")]
    LogBase(#[source] std::io::Error),
    #[error("Backend at {0} lacks features the guest uses: {1:#x}")]
    MissingFeatures(String, u64),
    #[error("Cannot move to {0} while a migration logs the backend's writes")]
    Busy(String),
}

/// Bounds every blocking receive on the connection `fd`.
fn set_reply_timeout(fd: RawFd, t: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `fd` is an open socket owned by the caller; `tv` is a valid
    // timeval whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What kind of device the backend serves.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Block,
    Net {
        mac: Option<[u8; 6]>,
        queue_pairs: u16,
    },
    /// virtio-fs; the tag is put in the config space when given.
    Fs {
        tag: Option<String>,
    },
    /// Any virtio device type, by ID.
    Generic(u32),
}

/// One `--disk`, `--net` or `--vhost-user` device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfig {
    pub kind: Kind,
    pub socket: PathBuf,
    /// Queues the guest sees (net: queue pairs x 2, plus the control queue
    /// when the backend offers one).
    pub queues: u16,
    pub queue_size: u16,
    /// The backend's `--metrics-socket`, read for vm.counters (disk and
    /// net only; never used to drive the device).
    pub metrics_socket: Option<PathBuf>,
}

struct Queue {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
}

struct Active {
    features: u64,
    queues: Vec<Queue>,
    inflight: Option<(File, VhostUserInflight)>,
}

struct Inner {
    cfg: DeviceConfig,
    conn: Option<Frontend>,
    protocol: VhostUserProtocolFeatures,
    has_protocol: bool,
    mem: GuestMemory,
    active: Option<Active>,
    config_cache: Vec<u8>,
    /// The VM is paused: the rings stay disabled, across a reconnect too.
    paused: bool,
    /// The rings were stopped (GET_VRING_BASE) to save the backend's
    /// state: running again needs them set up anew.
    rings_stopped: bool,
    /// Backend state from a snapshot, loaded before the rings start.
    pending_state: Option<Vec<u8>>,
    /// The backend's own feature bits (VHOST_F_LOG_ALL among them).
    backend_features: u64,
    /// The dirty log the backend writes while a migration runs.
    log: Option<LogShare>,
    /// Handed over to another VMM (migration): not connected, and the
    /// monitor does not reconnect until [`VhostUser::reattach`].
    detached: bool,
}

/// A vhost-user device seen through virtio-pci.
pub struct VhostUser {
    inner: Arc<Mutex<Inner>>,
    watch: Arc<Watchdog>,
    device_type: u32,
    features: u64,
    queues: usize,
    queue_size: u16,
    stop: Arc<AtomicBool>,
    monitor: Option<JoinHandle<()>>,
}

fn req<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|e| VhostUserError::Request(what, e))
}

/// Connects and negotiates; returns the connection, backend features and
/// protocol features.
fn handshake(
    cfg: &DeviceConfig,
) -> Result<(Frontend, u64, VhostUserProtocolFeatures, bool), VhostUserError> {
    let path = cfg.socket.display().to_string();
    let mut fe = Frontend::connect(&cfg.socket, u64::from(cfg.queues))
        .map_err(|e| VhostUserError::Connect(path.clone(), e))?;
    set_reply_timeout(fe.as_raw_fd(), REPLY_TIMEOUT).map_err(VhostUserError::Timeout)?;
    req("SET_OWNER", fe.set_owner())?;
    let features = req("GET_FEATURES", fe.get_features())?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    let has_protocol = features & F_PROTOCOL_FEATURES != 0;
    if has_protocol {
        let offered = req("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::LOG_SHMFD;
        protocol = offered & wanted;
        req("SET_PROTOCOL_FEATURES", fe.set_protocol_features(protocol))?;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = req("GET_QUEUE_NUM", fe.get_queue_num())?;
            if max < u64::from(cfg.queues) {
                return Err(VhostUserError::TooManyQueues {
                    path,
                    max,
                    wanted: cfg.queues.into(),
                });
            }
        }
    }
    if features & F_VERSION_1 == 0 {
        return Err(VhostUserError::NotModern(path));
    }
    Ok((fe, features, protocol, has_protocol))
}

impl VhostUser {
    /// Connects to the backend (it must be there when the VM starts) and
    /// starts the reconnect monitor.
    pub fn new(mut cfg: DeviceConfig, mem: GuestMemory) -> Result<Self, VhostUserError> {
        let (fe, backend_features, protocol, has_protocol) = handshake(&cfg)?;
        let path = cfg.socket.display().to_string();
        let device_type = match cfg.kind {
            Kind::Block => TYPE_BLOCK,
            Kind::Net { .. } => TYPE_NET,
            Kind::Fs { .. } => TYPE_FS,
            Kind::Generic(t) => t,
        };
        if device_type == TYPE_BLOCK && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::NoConfig(path));
        }
        let mut features = backend_features
            & !(F_PROTOCOL_FEATURES
                | F_LOG_ALL
                | F_ACCESS_PLATFORM
                | F_RING_PACKED
                | F_NOTIFICATION_DATA
                | F_RING_RESET);
        if let Kind::Net { mac, queue_pairs } = cfg.kind {
            if mac.is_some() {
                features |= NET_F_MAC;
            }
            if queue_pairs <= 1 {
                features &= !NET_F_MQ;
            }
            features |= NET_F_STATUS;
            cfg.queues = queue_pairs * 2 + u16::from(features & NET_F_CTRL_VQ != 0);
        }
        let inner = Arc::new(Mutex::new(Inner {
            cfg: cfg.clone(),
            conn: Some(fe),
            protocol,
            has_protocol,
            mem,
            active: None,
            config_cache: Vec::new(),
            paused: false,
            rings_stopped: false,
            pending_state: None,
            backend_features,
            log: None,
            detached: false,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let watch = Arc::new(Watchdog::default());
        let (i, w, s) = (inner.clone(), watch.clone(), stop.clone());
        let monitor = std::thread::Builder::new()
            .name(format!("vhost-user-{device_type}"))
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Reconnect);
                monitor(&i, &w, &s)
            })
            .map_err(VhostUserError::Thread)?;
        Ok(Self {
            inner,
            watch,
            device_type,
            features,
            queues: cfg.queues.into(),
            queue_size: cfg.queue_size,
            stop,
            monitor: Some(monitor),
        })
    }

    /// Backend state saved in a snapshot, loaded into the backend before
    /// its rings are set up on restore.
    pub fn load_state_on_restore(&self, state: Vec<u8>) {
        self.busy().pending_state = Some(state);
    }

    /// Whether the backend is connected now.
    pub fn connected(&self) -> bool {
        self.busy().conn.is_some()
    }
}

impl VhostUser {
    /// The device state, locked, with the watchdog armed for the exchanges
    /// the caller makes.
    fn busy(&self) -> Busy<'_, Inner> {
        Busy::new(&self.inner, &self.watch, |g| {
            g.conn.as_ref().map_or(-1, |c| c.as_raw_fd())
        })
    }
}

impl Drop for VhostUser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}

/// Watches the connection; reconnects and restores state after a loss,
/// and cuts an exchange that is stuck (see [`watchdog`]).
fn monitor(inner: &Mutex<Inner>, watch: &Watchdog, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if watch.cut_if_stuck(STUCK_AFTER) {
            tracing::warn!(
                "vhost-user backend stopped answering mid-reply; dropping the connection"
            );
        }
        let fd = match inner.try_lock() {
            Ok(g) => g.conn.as_ref().map(|c| c.as_raw_fd()),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().conn.as_ref().map(|c| c.as_raw_fd())
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(RECONNECT_INTERVAL);
                continue;
            }
        };
        match fd {
            Some(fd) if peer_closed(fd, RECONNECT_INTERVAL) => {
                let mut g = lock(inner);
                g.conn = None;
                let socket = g.cfg.socket.display().to_string();
                crate::events::emit("vhost-user", "disconnected", &[("socket", socket)]);
                tracing::warn!(socket = %g.cfg.socket.display(), "vhost-user backend disconnected; will reconnect");
            }
            Some(_) => {}
            None => {
                std::thread::sleep(RECONNECT_INTERVAL);
                let mut g = lock(inner);
                if g.detached {
                    continue;
                }
                match g.reconnect() {
                    Ok(()) => {
                        let socket = g.cfg.socket.display().to_string();
                        crate::events::emit("vhost-user", "reconnected", &[("socket", socket)]);
                        tracing::info!(socket = %g.cfg.socket.display(), "vhost-user backend reconnected")
                    }
                    Err(e) => tracing::debug!(error = %e, "reconnect attempt failed"),
                }
            }
        }
    }
}

/// Waits up to `timeout` for the peer to hang up.
fn peer_closed(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n == 1 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl Inner {
    fn reconnect(&mut self) -> Result<(), VhostUserError> {
        let (fe, backend_features, protocol, has_protocol) = handshake(&self.cfg)?;
        self.conn = Some(fe);
        self.protocol = protocol;
        self.has_protocol = has_protocol;
        self.backend_features = backend_features;
        // A new connection sets every ring up from the start.
        self.rings_stopped = false;
        if self.active.is_some() {
            if let Err(e) = self.apply(true) {
                self.conn = None;
                return Err(e);
            }
        }
        Ok(())
    }

    fn hva(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map_or(0, |p| p as u64)
    }

    /// Sends features, memory table, inflight region and rings. After a
    /// reconnect each ring restarts from the index the guest last saw used.
    fn apply(&mut self, resume: bool) -> Result<(), VhostUserError> {
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect();
        let bases: Vec<u16> = {
            let a = self.active.as_ref().expect("apply needs an active device");
            a.queues
                .iter()
                .map(|q| {
                    if resume {
                        self.mem
                            .read_obj::<u16>(GuestAddress(q.used + 2))
                            .unwrap_or(0)
                    } else {
                        0
                    }
                })
                .collect()
        };
        let addrs: Vec<(u64, u64, u64)> = {
            let a = self.active.as_ref().expect("active");
            a.queues
                .iter()
                .map(|q| (self.hva(q.desc), self.hva(q.avail), self.hva(q.used)))
                .collect()
        };
        let inflight_wanted = self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let state = self.pending_state.take();
        let can_load = self
            .protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE);
        let socket = self.cfg.socket.display().to_string();
        let has_protocol = self.has_protocol;
        let nq = self.cfg.queues;
        let queue_size = self.cfg.queue_size;
        let log = self.log.clone();
        let (Some(fe), Some(a)) = (self.conn.as_mut(), self.active.as_mut()) else {
            return Ok(());
        };
        let logging = log.is_some();
        let features = a.features
            | if has_protocol { F_PROTOCOL_FEATURES } else { 0 }
            | if logging { F_LOG_ALL } else { 0 };
        req("SET_FEATURES", fe.set_features(features))?;
        req("SET_MEM_TABLE", fe.set_mem_table(&regions))?;
        if let Some(l) = &log {
            migration::set_log_base(fe.as_raw_fd(), l)?;
        }
        if inflight_wanted {
            if a.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, nq, queue_size);
                let (info, file) = req("GET_INFLIGHT_FD", fe.get_inflight_fd(&ask))?;
                a.inflight = Some((file, info));
            }
            if let Some((file, info)) = &a.inflight {
                req(
                    "SET_INFLIGHT_FD",
                    fe.set_inflight_fd(info, file.as_raw_fd()),
                )?;
            }
        }
        match (state, can_load) {
            (Some(s), true) => device_state::load(fe, &s)?,
            (Some(_), false) => tracing::warn!(
                %socket,
                "the snapshot holds this backend's state but it no longer offers DEVICE_STATE: restarting from the rings alone"
            ),
            (None, _) => {}
        }
        for (q, (base, (desc, avail, used))) in a.queues.iter().zip(bases.iter().zip(&addrs)) {
            req("SET_VRING_NUM", fe.set_vring_num(q.index, q.size))?;
            let ring = ring_config(queue_size, q, (*desc, *avail, *used), logging);
            req("SET_VRING_ADDR", fe.set_vring_addr(q.index, &ring))?;
            req("SET_VRING_BASE", fe.set_vring_base(q.index, *base))?;
            req("SET_VRING_CALL", fe.set_vring_call(q.index, &q.call))?;
            req("SET_VRING_KICK", fe.set_vring_kick(q.index, &q.kick))?;
        }
        if self.paused {
            // Ring addresses and bases are set; they start on resume. A
            // backend without protocol features starts a ring at its kick.
            if !has_protocol {
                self.stop_rings();
            }
            return Ok(());
        }
        if has_protocol {
            for q in &a.queues {
                req("SET_VRING_ENABLE", fe.set_vring_enable(q.index, true))?;
            }
            // Rings start disabled, and a backend may consume a kick that
            // arrives between SET_VRING_KICK and SET_VRING_ENABLE and drop it
            // (vhost-user-backend before 0.22 does): the guest then waits
            // forever. A request with a reply is a barrier (the backend
            // answers messages in order): once it is answered the rings are
            // enabled, and the kick below covers whatever came before.
            req("GET_FEATURES", fe.get_features())?;
        }
        // Anything the guest queued before the rings were enabled, or while
        // the backend was away. A kick with nothing new is harmless.
        if has_protocol || resume {
            for q in &a.queues {
                let _ = q.kick.write(1);
            }
        }
        Ok(())
    }

    fn stop_rings(&mut self) {
        let has_protocol = self.has_protocol;
        let (Some(fe), Some(a)) = (self.conn.as_mut(), self.active.as_ref()) else {
            return;
        };
        for q in &a.queues {
            if has_protocol {
                let _ = fe.set_vring_enable(q.index, false);
            }
            if let Err(e) = fe.get_vring_base(q.index) {
                tracing::warn!(error = %e, queue = q.index, "GET_VRING_BASE failed");
            }
        }
    }

    /// Pauses (`false`) or resumes (`true`) every ring. Disabled, a
    /// backend finishes what it took from the ring and takes nothing more;
    /// the reply to GET_FEATURES, sent after, says it has done so (messages
    /// are answered in order). Without protocol features a ring can only
    /// be stopped (GET_VRING_BASE) and set up again.
    fn set_running(&mut self, run: bool) -> Result<(), VhostUserError> {
        self.paused = !run;
        if self.active.is_none() || self.conn.is_none() {
            return Ok(());
        }
        if run && self.rings_stopped {
            // Stopped for a state save: set every ring up again.
            self.rings_stopped = false;
            return self.apply(true);
        }
        if !self.has_protocol {
            if run {
                return self.apply(true);
            }
            self.stop_rings();
            return Ok(());
        }
        let (Some(fe), Some(a)) = (self.conn.as_mut(), self.active.as_ref()) else {
            return Ok(());
        };
        for q in &a.queues {
            req("SET_VRING_ENABLE", fe.set_vring_enable(q.index, run))?;
        }
        req("GET_FEATURES", fe.get_features())?;
        if run {
            // What the guest queued before the pause took effect.
            for q in &a.queues {
                let _ = q.kick.write(1);
            }
        }
        Ok(())
    }

    /// Stops the (already disabled) rings and saves the backend's own
    /// state, if it offers DEVICE_STATE; `None` if it does not.
    fn save_state(&mut self) -> Result<Option<Vec<u8>>, VhostUserError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
        {
            return Ok(None);
        }
        let socket = self.cfg.socket.display().to_string();
        let Some(a) = self.active.as_ref() else {
            return Ok(None);
        };
        let Some(fe) = self.conn.as_mut() else {
            return Err(VhostUserError::NotConnected(socket));
        };
        for q in &a.queues {
            req("GET_VRING_BASE", fe.get_vring_base(q.index))?;
        }
        self.rings_stopped = true;
        device_state::save(fe).map(Some)
    }

    /// Config space built here, for backends without the CONFIG feature.
    fn local_config(&self) -> Vec<u8> {
        match &self.cfg.kind {
            Kind::Net { mac, queue_pairs } => {
                let mut c = vec![0u8; 12];
                c[..6].copy_from_slice(&mac.unwrap_or_default());
                c[6..8].copy_from_slice(&NET_S_LINK_UP.to_le_bytes());
                c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
                c[10..12].copy_from_slice(&1500u16.to_le_bytes());
                c
            }
            Kind::Fs { tag } => {
                let mut c = vec![0u8; FS_TAG_LEN + 4];
                let t = tag.as_deref().unwrap_or_default().as_bytes();
                let n = t.len().min(FS_TAG_LEN);
                c[..n].copy_from_slice(&t[..n]);
                let requests = u32::from(self.cfg.queues.saturating_sub(1));
                c[FS_TAG_LEN..].copy_from_slice(&requests.to_le_bytes());
                c
            }
            _ => Vec::new(),
        }
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let end = offset as usize + data.len();
        let from_backend = self.protocol.contains(VhostUserProtocolFeatures::CONFIG);
        let mut image = if from_backend {
            let got = self.conn.as_mut().and_then(|fe| {
                fe.get_config(
                    0,
                    end as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &vec![0u8; end],
                )
                .ok()
            });
            match got {
                Some((_, bytes)) => {
                    self.config_cache = bytes.clone();
                    bytes
                }
                None => self.config_cache.clone(),
            }
        } else {
            self.local_config()
        };
        overlay_config(&self.cfg, &mut image);
        if let Kind::Fs { tag: Some(_) } = &self.cfg.kind {
            // The user's tag wins over the backend's.
            let local = self.local_config();
            image.resize(image.len().max(FS_TAG_LEN), 0);
            image[..FS_TAG_LEN].copy_from_slice(&local[..FS_TAG_LEN]);
        }
        image.resize(image.len().max(end), 0);
        data.copy_from_slice(&image[offset as usize..end]);
    }
}

/// Offset of `num_queues` in the virtio-blk config space.
const BLK_NUM_QUEUES_OFF: usize = 34;
/// Offset of `max_virtqueue_pairs` in the virtio-net config space.
const NET_MAX_PAIRS_OFF: usize = 8;

/// Puts what this VMM set up over the backend's config image: the queue
/// count the guest can really use (a backend reports its own maximum, and a
/// driver that asks for queues the transport lacks fails to probe) and the
/// user's MAC.
fn overlay_config(cfg: &DeviceConfig, image: &mut Vec<u8>) {
    let put16 = |image: &mut Vec<u8>, off: usize, v: u16| {
        if image.len() >= off + 2 {
            image[off..off + 2].copy_from_slice(&v.to_le_bytes());
        }
    };
    match cfg.kind {
        Kind::Block => put16(image, BLK_NUM_QUEUES_OFF, cfg.queues),
        Kind::Net { mac, queue_pairs } => {
            put16(image, NET_MAX_PAIRS_OFF, queue_pairs);
            if let Some(mac) = mac {
                if image.len() < 6 {
                    image.resize(6, 0);
                }
                image[..6].copy_from_slice(&mac);
            }
        }
        Kind::Fs { .. } | Kind::Generic(_) => {}
    }
}

fn dup(e: &EventFd) -> Result<EventFd, VhostUserError> {
    e.try_clone().map_err(VhostUserError::Dup)
}

impl VhostUser {
    /// Records the active rings and sends them to the backend, from index
    /// 0, or (`resume`) from the used index guest memory holds.
    fn start(
        &mut self,
        features: u64,
        queues: &[ActiveQueue],
        resume: bool,
    ) -> Result<(), ActivateError> {
        let queues = queues
            .iter()
            .map(|q| {
                Ok(Queue {
                    index: q.index,
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    kick: dup(q.kick)?,
                    call: dup(q.call)?,
                })
            })
            .collect::<Result<Vec<_>, VhostUserError>>()?;
        let mut g = self.busy();
        g.active = Some(Active {
            features,
            queues,
            inflight: None,
        });
        // With the backend away, the rings start when it reconnects.
        Ok(g.apply(resume)?)
    }
}

impl VirtioDevice for VhostUser {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.busy().read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut g = self.busy();
        if !g.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        if let Some(fe) = g.conn.as_mut() {
            if let Err(e) = fe.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data) {
                tracing::debug!(error = %e, "SET_CONFIG failed");
            }
        }
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue]) -> Result<(), ActivateError> {
        self.start(features, queues, false)
    }

    /// A restored VM comes back paused: the rings are set up at the used
    /// index the restored guest memory holds (every request taken before
    /// the snapshot had completed: the pause drained them) and stay
    /// disabled until the VM resumes.
    fn restore_activated(
        &mut self,
        features: u64,
        queues: &[ActiveQueue],
    ) -> Result<(), ActivateError> {
        self.busy().paused = true;
        self.start(features, queues, true)
    }

    fn reset(&mut self) {
        let mut g = self.busy();
        g.stop_rings();
        g.active = None;
    }

    fn pause(&mut self) {
        let mut g = self.busy();
        if let Err(e) = g.set_running(false) {
            // The backend is gone, failing or too slow to answer: drop the
            // connection (replies may be out of step); the monitor
            // reconnects and keeps the rings disabled until the resume.
            tracing::warn!(socket = %g.cfg.socket.display(), error = %crate::error_chain(&e), "cannot stop the rings for the pause; reconnecting");
            g.conn = None;
        }
    }

    fn save_backend_state(&mut self) -> Result<Option<Vec<u8>>, String> {
        self.busy().save_state().map_err(|e| crate::error_chain(&e))
    }

    fn set_dirty_log(&mut self, log: Option<LogShare>) -> Result<(), String> {
        VhostUser::set_dirty_log(self, log).map_err(|e| crate::error_chain(&e))
    }

    fn swap_backend(&mut self, socket: PathBuf) -> Result<(), String> {
        VhostUser::swap_backend(self, socket).map_err(|e| crate::error_chain(&e))
    }

    fn detach_backend(&mut self) {
        self.detach();
    }

    fn reattach_backend(&mut self, state: Option<Vec<u8>>) {
        self.reattach(state);
    }

    fn resume(&mut self) {
        let mut g = self.busy();
        if let Err(e) = g.set_running(true) {
            tracing::warn!(socket = %g.cfg.socket.display(), error = %crate::error_chain(&e), "cannot restart the rings after the pause; reconnecting");
            g.conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: Kind, queues: u16) -> DeviceConfig {
        DeviceConfig {
            kind,
            socket: PathBuf::from("/nonexistent"),
            queues,
            queue_size: 256,
            metrics_socket: None,
        }
    }

    #[test]
    fn blk_config_reports_the_queues_the_transport_has() {
        let mut image = vec![0u8; 60];
        image[BLK_NUM_QUEUES_OFF..BLK_NUM_QUEUES_OFF + 2].copy_from_slice(&2u16.to_le_bytes());

        overlay_config(&cfg(Kind::Block, 1), &mut image);

        assert_eq!(&image[BLK_NUM_QUEUES_OFF..BLK_NUM_QUEUES_OFF + 2], &[1, 0]);
    }

    #[test]
    fn net_config_reports_configured_pairs_and_mac() {
        let mut image = vec![0u8; 12];
        image[NET_MAX_PAIRS_OFF..NET_MAX_PAIRS_OFF + 2].copy_from_slice(&8u16.to_le_bytes());
        let kind = Kind::Net {
            mac: Some([2, 0, 0, 0, 0, 9]),
            queue_pairs: 2,
        };

        overlay_config(&cfg(kind, 4), &mut image);

        assert_eq!(&image[..6], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&image[NET_MAX_PAIRS_OFF..NET_MAX_PAIRS_OFF + 2], &[2, 0]);
    }

    #[test]
    fn short_config_image_is_left_short() {
        let mut image = vec![0u8; 20];

        overlay_config(&cfg(Kind::Block, 1), &mut image);

        assert_eq!(image, vec![0u8; 20]);
    }
}
