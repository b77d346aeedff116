//! A synthetic vhost-user frontend: one host process plays both the VMM and
//! the guest driver. Guest memory is a memfd shared with the backend, the
//! connection is the `vhost` crate's [`Frontend`], split virtqueues are laid
//! out here, kicks and calls go through eventfds. Tests and benchmarks use it
//! to drive any vhost-user backend by socket path.

pub mod blk;
mod dirty;
pub mod flood;
pub mod net;
mod state;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::Used;
use crate::dirty_log::LOG_ALL;
use crate::memory::{memfd_memory, GuestMem, MemoryError};

pub use dirty::DirtyBitmap;

/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const INDIRECT_DESC: u64 = 1 << 28;

const F_NEXT: u16 = 1;
/// How long to wait for a vhost-user reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const F_WRITE: u16 = 2;

/// Errors of the synthetic frontend.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// A vhost-user request failed.
    #[error("vhost-user request failed")]
    Vhost(#[source] vhost::Error),
    /// Guest memory setup failed.
    #[error("Cannot create guest memory")]
    Memory(#[source] MemoryError),
    /// Guest memory access failed.
    #[error("Guest memory access failed")]
    Access(#[source] vm_memory::GuestMemoryError),
    /// Setting up the socket failed.
    #[error("Cannot configure the vhost-user socket")]
    Socket(#[source] std::io::Error),
    /// An eventfd operation failed.
    #[error("Eventfd operation failed")]
    EventFd(#[source] std::io::Error),
    /// The backend lacks a required feature.
    #[error("Backend lacks feature bits {0:#x}")]
    MissingFeatures(u64),
    /// No completion arrived in time.
    #[error("No completion within {0:?}")]
    Timeout(Duration),
    /// Guest memory is exhausted.
    #[error("Guest memory exhausted")]
    OutOfMemory,
    /// The vhost-user connection is closed.
    #[error("Not connected to a backend")]
    NotConnected,
    /// Moving a device state over its pipe failed.
    #[error("Device state transfer failed")]
    StateIo(#[source] std::io::Error),
    /// CHECK_DEVICE_STATE reported a failure.
    #[error("Backend reported a failed device state transfer")]
    StateCheck(#[source] vhost::Error),
}

/// What the frontend negotiates and lays out.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// Guest memory size in bytes.
    pub mem_size: usize,
    /// Queues to set up.
    pub num_queues: usize,
    /// Descriptors per queue (a power of two).
    pub queue_size: u16,
    /// Device feature bits wanted (acked if offered).
    pub features: u64,
    /// Feature bits that must be offered.
    pub required: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Use inflight tracking (GET/SET_INFLIGHT_FD) if offered.
    pub inflight: bool,
    /// Hand memory over with CONFIGURE_MEM_SLOTS (ADD_MEM_REG) if offered,
    /// as two regions, the upper one first, instead of SET_MEM_TABLE.
    pub mem_slots: bool,
    /// Negotiate VHOST_USER_PROTOCOL_F_LOG_SHMFD if offered, for dirty page
    /// logging ([`SyntheticFrontend::set_log_base`]). LOG_ALL itself is
    /// never acked at set-up, whatever `features` says, only by
    /// [`SyntheticFrontend::set_logging`].
    pub dirty_log: bool,
    /// Send SET_VRING_CALL after SET_VRING_KICK (and SET_VRING_ENABLE),
    /// this long after them, as QEMU orders them, instead of before: a
    /// queue then runs for a while with no call eventfd.
    pub call_after_kick: Option<std::time::Duration>,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            mem_size: 64 << 20,
            num_queues: 1,
            queue_size: 128,
            features: u64::MAX,
            required: VERSION_1,
            event_idx: true,
            inflight: false,
            mem_slots: false,
            dirty_log: false,
            call_after_kick: None,
        }
    }
}

/// One descriptor a driver places in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Guest address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Seg {
    pub fn new(addr: GuestAddress, len: u32, writable: bool) -> Self {
        Self {
            addr,
            len,
            writable,
        }
    }
}

/// A split virtqueue driven from the guest side.
pub struct VirtQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
    outstanding: usize,
    spurious: u64,
    kicked_avail: u16,
}

impl VirtQueue {
    fn new(size: u16, base: GuestAddress) -> Result<(Self, u64), FrontendError> {
        let n = u64::from(size);
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * n);
        let used = GuestAddress((avail.0 + 6 + 2 * n).div_ceil(4096) * 4096);
        let end = (used.0 + 6 + 8 * n).div_ceil(4096) * 4096;
        let q = VirtQueue {
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); size as usize],
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
            outstanding: 0,
            spurious: 0,
            kicked_avail: 0,
        };
        Ok((q, end))
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Chains added and not yet returned.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Waits up to `timeout` for the device to signal the call eventfd;
    /// true if it did (the signal is consumed).
    pub fn call_signalled(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n == 1 && self.call.read().is_ok()
    }

    /// Used entries naming a chain that was not outstanding (a device bug).
    pub fn spurious_used(&self) -> u64 {
        self.spurious
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes a chain and publishes it in the available ring (without a kick).
    /// Returns its head, or `None` if there are not enough free descriptors.
    pub fn add(&mut self, mem: &GuestMem, segs: &[Seg]) -> Result<Option<u16>, FrontendError> {
        if segs.is_empty() || segs.len() > self.free.len() {
            return Ok(None);
        }
        let ids: Vec<u16> = (0..segs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (seg, id)) in segs.iter().zip(&ids).enumerate() {
            self.write_desc(mem, *id, seg, ids.get(i + 1).copied())?;
        }
        let head = ids[0];
        self.chains[head as usize] = ids;
        self.publish(mem, head)?;
        self.outstanding += 1;
        Ok(Some(head))
    }

    /// Publishes `head` in the available ring as is, whatever it names (an
    /// index past the queue, say), as a broken or hostile driver would;
    /// nothing is tracked for it. Without a kick.
    pub fn publish_raw(&mut self, mem: &GuestMem, head: u16) -> Result<(), FrontendError> {
        self.publish(mem, head)
    }

    /// Writes one descriptor chained to itself, as a hostile driver would,
    /// and publishes it (without a kick). Returns its head, or `None` if no
    /// descriptor is free.
    pub fn add_loop(&mut self, mem: &GuestMem, seg: &Seg) -> Result<Option<u16>, FrontendError> {
        let Some(id) = self.free.pop() else {
            return Ok(None);
        };
        self.write_desc(mem, id, seg, Some(id))?;
        self.chains[id as usize] = vec![id];
        self.publish(mem, id)?;
        self.outstanding += 1;
        Ok(Some(id))
    }

    /// Writes descriptor `id` for `seg`, chained to `next` if given.
    fn write_desc(
        &self,
        mem: &GuestMem,
        id: u16,
        seg: &Seg,
        next: Option<u16>,
    ) -> Result<(), FrontendError> {
        let mut flags = if seg.writable { F_WRITE } else { 0 };
        if next.is_some() {
            flags |= F_NEXT;
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&seg.addr.0.to_le_bytes());
        raw[8..12].copy_from_slice(&seg.len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        mem.write_slice(&raw, GuestAddress(self.desc.0 + 16 * u64::from(id)))
            .map_err(FrontendError::Access)
    }

    fn publish(&mut self, mem: &GuestMem, head: u16) -> Result<(), FrontendError> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot))
            .map_err(FrontendError::Access)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.store(
            self.avail_idx,
            GuestAddress(self.avail.0 + 2),
            Ordering::Release,
        )
        .map_err(FrontendError::Access)
    }

    /// Kicks the backend.
    pub fn notify(&self) {
        let _ = self.kick.write(1);
    }

    /// Kicks the backend unless, with EVENT_IDX, it said it does not need a
    /// kick for the chains published since `old_avail` (as Linux drivers do).
    pub fn notify_if_needed(&mut self, mem: &GuestMem) {
        let new = self.avail_idx;
        let old = std::mem::replace(&mut self.kicked_avail, new);
        if self.event_idx {
            fence(Ordering::SeqCst);
            let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size));
            let event: u16 = mem
                .load(at, Ordering::Acquire)
                .unwrap_or(new.wrapping_sub(1));
            // vring_need_event(event, new, old)
            if new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old) {
                return;
            }
        }
        self.notify();
    }

    /// Appends returned chains to `out` without blocking.
    pub fn poll_used(&mut self, mem: &GuestMem, out: &mut Vec<Used>) -> Result<(), FrontendError> {
        let idx: u16 = mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .map_err(FrontendError::Access)?;
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let elem = GuestAddress(self.used.0 + 4 + 8 * slot);
            let id: u32 = mem.read_obj(elem).map_err(FrontendError::Access)?;
            let len: u32 = mem
                .read_obj(GuestAddress(elem.0 + 4))
                .map_err(FrontendError::Access)?;
            self.last_used = self.last_used.wrapping_add(1);
            match self.chains.get_mut(id as usize) {
                Some(chain) if !chain.is_empty() => {
                    self.free.append(chain);
                    self.outstanding = self.outstanding.saturating_sub(1);
                }
                // Linux would log "id N is not a head!" and mark the queue
                // broken.
                _ => self.spurious += 1,
            }
            out.push(Used {
                head: id as u16,
                len,
            });
        }
        Ok(())
    }

    /// Waits until at least one chain is returned, up to `timeout`.
    pub fn wait_used(
        &mut self,
        mem: &GuestMem,
        timeout: Duration,
        out: &mut Vec<Used>,
    ) -> Result<(), FrontendError> {
        self.wait_used_batch(mem, timeout, out, 1)
    }

    /// Waits until `batch` chains (at most all outstanding, at least one)
    /// are returned, up to `timeout`, then takes every returned chain. With
    /// EVENT_IDX the device is asked to notify only then, as Linux's
    /// `virtqueue_enable_cb_delayed` does for transmit completions.
    pub fn wait_used_batch(
        &mut self,
        mem: &GuestMem,
        timeout: Duration,
        out: &mut Vec<Used>,
        batch: u16,
    ) -> Result<(), FrontendError> {
        let deadline = Instant::now() + timeout;
        let want = batch.min(self.outstanding as u16).max(1);
        loop {
            let ready = self.used_idx(mem)?.wrapping_sub(self.last_used);
            if ready >= want {
                return self.poll_used(mem, out);
            }
            if self.event_idx {
                // The device notifies once it publishes entry `used_event`.
                let at = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size));
                let used_event = self.last_used.wrapping_add(want - 1);
                mem.store(used_event, at, Ordering::Release)
                    .map_err(FrontendError::Access)?;
                fence(Ordering::SeqCst);
                if self.used_idx(mem)?.wrapping_sub(self.last_used) >= want {
                    return self.poll_used(mem, out);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout(timeout));
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
            let _ = self.call.read();
        }
    }

    /// Publishes `idx` as the available index without adding chains, as a
    /// broken or hostile driver would; [`Self::restore_avail_idx`] undoes it.
    pub fn set_raw_avail_idx(&self, mem: &GuestMem, idx: u16) -> Result<(), FrontendError> {
        mem.store(idx, GuestAddress(self.avail.0 + 2), Ordering::Release)
            .map_err(FrontendError::Access)
    }

    /// Publishes the available index this driver really reached.
    pub fn restore_avail_idx(&self, mem: &GuestMem) -> Result<(), FrontendError> {
        self.set_raw_avail_idx(mem, self.avail_idx)
    }

    /// The available index this driver reached.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Guest address and length in bytes of the used ring (flags, index,
    /// elements and avail_event).
    pub fn used_ring(&self) -> (GuestAddress, u64) {
        (self.used, 6 + 8 * u64::from(self.size))
    }

    /// The used ring index as the backend last wrote it.
    pub fn used_idx(&self, mem: &GuestMem) -> Result<u16, FrontendError> {
        mem.load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .map_err(FrontendError::Access)
    }
}

/// The frontend: guest memory, the vhost-user connection, the virtqueues.
pub struct SyntheticFrontend {
    vu: Option<Frontend>,
    mem: GuestMem,
    memfd: File,
    queues: Vec<VirtQueue>,
    cfg: FrontendConfig,
    acked: u64,
    config_space: Vec<u8>,
    inflight: Option<(VhostUserInflight, File)>,
    next_free: u64,
    /// The dirty log handed to the backend with SET_LOG_BASE, if any.
    dirty: Option<DirtyBitmap>,
    /// Whether the rings are set up with VHOST_VRING_F_LOG.
    logging: bool,
}

impl SyntheticFrontend {
    /// Creates guest memory and virtqueues, connects to `socket` and sets the device up.
    pub fn connect(socket: &Path, cfg: FrontendConfig) -> Result<Self, FrontendError> {
        let vu = connect_retry(socket, cfg.num_queues as u64)?;
        Self::with_frontend(vu, cfg)
    }

    /// Like [`Self::connect`], over a backend connection accepted from our
    /// own listening socket (for backends in client mode).
    pub fn from_stream(stream: UnixStream, cfg: FrontendConfig) -> Result<Self, FrontendError> {
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(FrontendError::Socket)?;
        let vu = Frontend::from_stream(stream, cfg.num_queues as u64);
        Self::with_frontend(vu, cfg)
    }

    fn with_frontend(vu: Frontend, cfg: FrontendConfig) -> Result<Self, FrontendError> {
        let (mem, memfd) = memfd_memory(cfg.mem_size).map_err(FrontendError::Memory)?;
        let mut queues = Vec::with_capacity(cfg.num_queues);
        let mut next = 0;
        for _ in 0..cfg.num_queues {
            let (q, end) = VirtQueue::new(cfg.queue_size, GuestAddress(next))?;
            queues.push(q);
            next = end;
        }
        let mut fe = SyntheticFrontend {
            vu: None,
            mem,
            memfd,
            queues,
            cfg,
            acked: 0,
            config_space: Vec::new(),
            inflight: None,
            next_free: next,
            dirty: None,
            logging: false,
        };
        fe.setup(vu, false, None)?;
        Ok(fe)
    }

    /// Connects again (to a restarted or new backend) keeping memory, rings
    /// and the inflight region, as QEMU does on reconnect.
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), FrontendError> {
        self.vu = None;
        let vu = connect_retry(socket, self.cfg.num_queues as u64)?;
        self.setup(vu, true, None)
    }

    /// Like [`Self::reconnect`], loading `state` (from
    /// [`Self::save_device_state`]) into the backend after SET_MEM_TABLE
    /// and before any ring is set up, as a VMM restoring a snapshot does.
    pub fn reconnect_with_state(
        &mut self,
        socket: &Path,
        state: &[u8],
    ) -> Result<(), FrontendError> {
        self.vu = None;
        let vu = connect_retry(socket, self.cfg.num_queues as u64)?;
        self.setup(vu, true, Some(state))
    }

    /// Closes the vhost-user connection.
    pub fn disconnect(&mut self) {
        self.vu = None;
    }

    fn setup(
        &mut self,
        mut vu: Frontend,
        restart: bool,
        state: Option<&[u8]>,
    ) -> Result<(), FrontendError> {
        let vh = FrontendError::Vhost;
        vu.set_owner().map_err(vh)?;
        let offered = vu.get_features().map_err(vh)?;
        if offered & self.cfg.required != self.cfg.required {
            return Err(FrontendError::MissingFeatures(self.cfg.required & !offered));
        }
        let mut want = (self.cfg.features | PROTOCOL_FEATURES | VERSION_1) & !LOG_ALL;
        self.logging = false;
        if !self.cfg.event_idx {
            want &= !EVENT_IDX;
        }
        self.acked = offered & want;
        let mut slots = false;
        if offered & PROTOCOL_FEATURES != 0 {
            let proto = vu.get_protocol_features().map_err(vh)?;
            let mut wanted = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::DEVICE_STATE;
            if self.cfg.inflight {
                wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            if self.cfg.mem_slots {
                wanted |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            }
            if self.cfg.dirty_log {
                wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
            }
            vu.set_protocol_features(proto & wanted).map_err(vh)?;
            slots = self.cfg.mem_slots
                && proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
            if slots && vu.get_max_mem_slots().map_err(vh)? < 2 {
                return Err(FrontendError::MissingFeatures(0));
            }
            if proto.contains(VhostUserProtocolFeatures::MQ) {
                let n = vu.get_queue_num().map_err(vh)?;
                if (n as usize) < self.cfg.num_queues {
                    return Err(FrontendError::MissingFeatures(0));
                }
            }
            if proto.contains(VhostUserProtocolFeatures::CONFIG) {
                let (_, payload) = vu
                    .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
                    .map_err(vh)?;
                self.config_space = payload.to_vec();
            }
            if self.cfg.inflight && proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                if self.inflight.is_none() {
                    let ask = VhostUserInflight {
                        mmap_size: 0,
                        mmap_offset: 0,
                        num_queues: self.cfg.num_queues as u16,
                        queue_size: self.cfg.queue_size,
                    };
                    self.inflight = Some(vu.get_inflight_fd(&ask).map_err(vh)?);
                }
                if let Some((info, file)) = &self.inflight {
                    vu.set_inflight_fd(info, file.as_raw_fd()).map_err(vh)?;
                }
            }
        }
        vu.set_features(self.acked).map_err(vh)?;
        let region = self.mem.iter().next().ok_or(FrontendError::OutOfMemory)?;
        let info = |start: u64, end: u64| VhostUserMemoryRegionInfo {
            guest_phys_addr: start,
            memory_size: end - start,
            userspace_addr: region.as_ptr() as u64 + start,
            mmap_offset: start,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        if slots {
            let half = (region.len() / 2) & !0xf_ffff;
            vu.add_mem_region(&info(half, region.len())).map_err(vh)?;
            vu.add_mem_region(&info(0, half)).map_err(vh)?;
        } else {
            vu.set_mem_table(&[info(0, region.len())]).map_err(vh)?;
        }
        if let Some(state) = state {
            state::load(&vu, state)?;
        }
        let event_idx = self.acked & EVENT_IDX != 0;
        for i in 0..self.queues.len() {
            let q = &mut self.queues[i];
            q.event_idx = event_idx;
            let base = if restart { q.used_idx(&self.mem)? } else { 0 };
            vu.set_vring_num(i, q.size).map_err(vh)?;
            vu.set_vring_base(i, base).map_err(vh)?;
            vu.set_vring_addr(i, &self.ring_config(i)?).map_err(vh)?;
            let q = &self.queues[i];
            if self.cfg.call_after_kick.is_none() {
                vu.set_vring_call(i, &q.call).map_err(vh)?;
            }
            vu.set_vring_kick(i, &q.kick).map_err(vh)?;
            if self.acked & PROTOCOL_FEATURES != 0 {
                vu.set_vring_enable(i, true).map_err(vh)?;
            }
            if let Some(pause) = self.cfg.call_after_kick {
                std::thread::sleep(pause);
                vu.set_vring_call(i, &q.call).map_err(vh)?;
            }
        }
        self.vu = Some(vu);
        Ok(())
    }

    /// SET_VRING_ADDR's payload for queue `i`: host addresses of its
    /// parts and, while logging, VHOST_VRING_F_LOG with the used ring's
    /// guest address.
    fn ring_config(&self, i: usize) -> Result<VringConfigData, FrontendError> {
        let region = self.mem.iter().next().ok_or(FrontendError::OutOfMemory)?;
        let host = region.as_ptr() as u64;
        let q = &self.queues[i];
        Ok(VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: u32::from(self.logging),
            desc_table_addr: host + q.desc.0,
            used_ring_addr: host + q.used.0,
            avail_ring_addr: host + q.avail.0,
            log_addr: self.logging.then_some(q.used.0),
        })
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Feature bits acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Config space read at connect time (60 bytes), empty without CONFIG.
    pub fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i` together with guest memory.
    pub fn queue(&mut self, i: usize) -> (&mut VirtQueue, &GuestMem) {
        (&mut self.queues[i], &self.mem)
    }

    /// Reserves `len` bytes of guest memory aligned to `align`.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress, FrontendError> {
        let start = self.next_free.div_ceil(align) * align;
        let end = start.checked_add(len).ok_or(FrontendError::OutOfMemory)?;
        if end > self.cfg.mem_size as u64 {
            return Err(FrontendError::OutOfMemory);
        }
        self.next_free = end;
        Ok(GuestAddress(start))
    }

    /// The vhost-user connection, for protocol-level tests.
    pub fn vhost(&mut self) -> Option<&mut Frontend> {
        self.vu.as_mut()
    }

    /// The inflight region the backend handed out (GET_INFLIGHT_FD), kept across reconnects.
    pub fn inflight(&self) -> Option<(&VhostUserInflight, &File)> {
        self.inflight.as_ref().map(|(i, f)| (i, f))
    }

    /// Guest memory size.
    pub fn mem_size(&self) -> u64 {
        self.cfg.mem_size as u64
    }
}

fn connect_retry(socket: &Path, queues: u64) -> Result<Frontend, FrontendError> {
    let path: PathBuf = socket.to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(&path) {
            Ok(stream) => {
                // A backend that stops answering fails the caller instead of hanging it.
                stream
                    .set_read_timeout(Some(REPLY_TIMEOUT))
                    .map_err(FrontendError::Socket)?;
                return Ok(Frontend::from_stream(stream, queues));
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(FrontendError::Vhost(vhost::Error::VhostUserProtocol(
                    vhost::vhost_user::Error::SocketConnect(e),
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
