//! The frontend's part in a migration: the backend's dirty log
//! (`VHOST_F_LOG_ALL` with `LOG_SHMFD`: the backend sets a bit per guest
//! page it writes, in a shared memfd the migration reads) and handing the
//! backend over to another VMM (detach, and reattach if that VMM failed).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VringConfigData};

use super::{
    handshake, req, Inner, Queue, VhostUser, VhostUserError, F_LOG_ALL, F_PROTOCOL_FEATURES,
};

/// The dirty log shared with backends: a bitmap with one bit per 4 KiB
/// guest-physical page, `size` bytes of `file`.
#[derive(Clone, Debug)]
pub struct LogShare {
    pub file: Arc<File>,
    pub size: u64,
}

/// A ring's addresses; with `log`, the backend logs its used-ring writes
/// at the used ring's guest address (VHOST_VRING_F_LOG).
pub(super) fn ring_config(
    queue_max_size: u16,
    q: &Queue,
    (desc, avail, used): (u64, u64, u64),
    log: bool,
) -> VringConfigData {
    VringConfigData {
        queue_max_size,
        queue_size: q.size,
        flags: u32::from(log),
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: log.then_some(q.used),
    }
}

/// VHOST_USER_SET_LOG_BASE, with the log memfd attached.
const SET_LOG_BASE: u32 = 6;
/// Header flags: protocol version 1, and the reply bit.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;

/// Sends `SET_LOG_BASE` with the log's memfd and waits for the reply.
///
/// Written here rather than through the vhost crate's frontend: that one
/// insists on a 16-byte reply, while libvhost-user (qemu-storage-daemon)
/// answers with 8 (a u64, as QEMU reads it), and then waits forever for
/// the rest. Any reply size up to 64 bytes is taken. The connection is
/// idle between requests and has the frontend's reply timeout.
pub(super) fn set_log_base(fd: RawFd, log: &LogShare) -> Result<(), VhostUserError> {
    let io = VhostUserError::LogBase;
    // SAFETY: `fd` is the open frontend socket, borrowed for this call
    // only: ManuallyDrop keeps it from being closed here.
    let sock = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
    let mut msg = [0u8; 12 + 16];
    msg[0..4].copy_from_slice(&SET_LOG_BASE.to_le_bytes());
    msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    msg[8..12].copy_from_slice(&16u32.to_le_bytes());
    msg[12..20].copy_from_slice(&log.size.to_le_bytes());
    // mmap_offset 0: bytes 20..28 stay zero.
    let sent = sock
        .send_with_fd(&msg[..], log.file.as_raw_fd())
        .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
    if sent != msg.len() {
        return Err(io(std::io::ErrorKind::WriteZero.into()));
    }
    let mut hdr = [0u8; 12];
    (&*sock).read_exact(&mut hdr).map_err(io)?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if request != SET_LOG_BASE || flags & REPLY == 0 || size > 64 {
        return Err(io(std::io::ErrorKind::InvalidData.into()));
    }
    let mut body = [0u8; 64];
    (&*sock)
        .read_exact(&mut body[..size as usize])
        .map_err(io)?;
    Ok(())
}

impl Inner {
    /// Starts (`Some`) or stops (`None`) the backend's dirty logging.
    fn set_log(&mut self, log: Option<LogShare>) -> Result<(), VhostUserError> {
        let socket = self.cfg.socket.display().to_string();
        if log.is_some()
            && (self.backend_features & F_LOG_ALL == 0
                || !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD))
        {
            return Err(VhostUserError::NoDirtyLog(socket));
        }
        self.log = log;
        let logging = self.log.is_some();
        let addrs: Vec<_> = self
            .active
            .iter()
            .flat_map(|a| &a.queues)
            .map(|q| (self.hva(q.desc), self.hva(q.avail), self.hva(q.used)))
            .collect();
        let queue_size = self.cfg.queue_size;
        let has_protocol = self.has_protocol;
        let (Some(fe), Some(a)) = (self.conn.as_mut(), self.active.as_ref()) else {
            // Not running: the next set-up (apply) sends the log.
            return if logging && self.conn.is_none() {
                Err(VhostUserError::NotConnected(socket))
            } else {
                Ok(())
            };
        };
        if let Some(l) = &self.log {
            set_log_base(fe.as_raw_fd(), l)?;
        }
        let features = a.features
            | if has_protocol { F_PROTOCOL_FEATURES } else { 0 }
            | if logging { F_LOG_ALL } else { 0 };
        req("SET_FEATURES", fe.set_features(features))?;
        for (q, addr) in a.queues.iter().zip(addrs) {
            let ring = ring_config(queue_size, q, addr, logging);
            req("SET_VRING_ADDR", fe.set_vring_addr(q.index, &ring))?;
        }
        // A reply orders it: once answered, every later write is logged.
        req("GET_FEATURES", fe.get_features())?;
        Ok(())
    }
}

impl VhostUser {
    /// Starts or stops the backend's dirty logging; an error if it cannot
    /// log (then nothing changed).
    pub fn set_dirty_log(&self, log: Option<LogShare>) -> Result<(), VhostUserError> {
        self.busy().set_log(log)
    }

    /// Lets go of the backend so that another VMM can connect: the rings
    /// must be stopped (the state saved). No reconnect until
    /// [`Self::reattach`].
    pub fn detach(&self) {
        let mut g = self.busy();
        g.detached = true;
        g.conn = None;
        g.log = None;
    }

    /// Takes the backend back after a migration failed: connects again
    /// (the monitor retries if that fails now), loading `state` first.
    pub fn reattach(&self, state: Option<Vec<u8>>) {
        let mut g = self.busy();
        g.detached = false;
        g.pending_state = state;
        if let Err(e) = g.reconnect() {
            tracing::warn!(socket = %g.cfg.socket.display(), error = %crate::error_chain(&e), "cannot reconnect to the backend after the migration failed; retrying");
        }
    }
}

impl VhostUser {
    /// Moves the device to the backend listening on `socket` while the
    /// guest runs: the new backend is connected and checked first (on
    /// failure nothing changes), then the old one's rings are disabled and
    /// stopped (it finishes what it took), its state and the inflight
    /// region go to the new one, whose rings start at the used index the
    /// guest last saw.
    pub fn swap_backend(&self, socket: std::path::PathBuf) -> Result<(), VhostUserError> {
        let mut g = self.busy();
        let mut cfg = g.cfg.clone();
        cfg.socket = socket;
        let shown = cfg.socket.display().to_string();
        let (fe, backend_features, protocol, has_protocol) = handshake(&cfg)?;
        if let Some(a) = &g.active {
            let missing = a.features & !backend_features & !F_LOG_ALL;
            if missing != 0 {
                return Err(VhostUserError::MissingFeatures(shown, missing));
            }
        }
        if g.log.is_some() {
            return Err(VhostUserError::Busy(shown));
        }
        let was_paused = g.paused;
        let state = if g.conn.is_some() && g.active.is_some() {
            // An old backend that fails here is as good as gone: the new
            // one restarts from the rings (and the inflight region) alone.
            match g.set_running(false).and_then(|()| g.save_state()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "the old backend did not stop cleanly");
                    None
                }
            }
        } else {
            None
        };
        // The old connection closes here; the monitor watches the new one.
        g.conn = Some(fe);
        g.cfg = cfg;
        g.protocol = protocol;
        g.has_protocol = has_protocol;
        g.backend_features = backend_features;
        g.rings_stopped = false;
        g.paused = was_paused;
        g.pending_state =
            state.filter(|_| protocol.contains(VhostUserProtocolFeatures::DEVICE_STATE));
        g.config_cache.clear();
        if g.active.is_some() {
            if let Err(e) = g.apply(true) {
                g.conn = None;
                return Err(e);
            }
        }
        Ok(())
    }
}
