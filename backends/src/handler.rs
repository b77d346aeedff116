//! Our vhost-user request handler: the layer between the `vhost` crate's
//! protocol code and the device. It owns guest memory mappings, vring
//! configuration, inflight tracking (GET/SET_INFLIGHT_FD) and the worker
//! threads, one per started queue.
//!
//! A queue starts when it has addresses, a kick eventfd and is enabled; it
//! stops (draining in-flight requests) on GET_VRING_BASE, disable, a new kick
//! eventfd, reset or disconnect.
//!
//! Dirty-page logging (LOG_ALL, SET_LOG_BASE, VHOST_VRING_F_LOG) lives here
//! for the protocol side and in [`crate::dirty_log`] for the bitmap: a new
//! connection starts without a log, and logging runs while the acked
//! features hold LOG_ALL.
//!
//! Saving and loading the backend's own state (SET_DEVICE_STATE_FD,
//! CHECK_DEVICE_STATE) is in [`device_state`].

pub mod device_state;

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::{
    Backend, Error as VhostUserError, Result as VhostUserResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use crate::daemon::error_chain;
use crate::device::Device;
use crate::dirty_log::{DirtyLog, UsedRingLog, LOG_ALL};
use crate::inflight::InflightRegion;
use crate::memory::GuestMemoryShared;
use crate::metrics::QueueMetrics;
use crate::ratelimit::LogLimiter;
use crate::transfer::{Direction, Transfer};
use crate::vring::{CallFd, Vring, VringConfig};
use crate::worker::{self, Worker, WorkerHandle};

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const MAX_MEM_SLOTS: u64 = 32;

#[derive(Clone)]
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
    region: Arc<GuestRegionMmap<()>>,
    /// Times ADD_MEM_REG named this very region: QEMU's multi-queue net has
    /// one vhost device per queue pair on one connection, and each adds
    /// (and removes) every region itself.
    refs: u32,
}

impl Mapping {
    fn is(&self, r: &VhostUserSingleMemoryRegion) -> bool {
        self.gpa == r.guest_phys_addr && self.size == r.memory_size && self.vmm_addr == r.user_addr
    }
}

#[derive(Default)]
struct VringSlot {
    size: u16,
    addrs: Option<(GuestAddress, GuestAddress, GuestAddress)>,
    next_avail: u16,
    kick: Option<EventFd>,
    call: CallFd,
    enabled: bool,
    worker: Option<WorkerHandle>,
    /// SET_VRING_BASE was sent (the base is the frontend's, not ours).
    base_set: bool,
    /// The next available index a device state LOAD set, until SET_VRING_BASE.
    loaded_base: Option<u16>,
    /// Where the worker logs its used ring writes (VHOST_VRING_F_LOG).
    used_log: UsedRingLog,
}

/// The per-connection vhost-user state of one device.
pub struct Handler<D: Device> {
    device: Arc<D>,
    metrics: Arc<Vec<Arc<QueueMetrics>>>,
    mem: GuestMemoryShared,
    mappings: Vec<Mapping>,
    owned: bool,
    features: Option<u64>,
    protocol: VhostUserProtocolFeatures,
    vrings: Vec<VringSlot>,
    inflight: Option<Arc<InflightRegion>>,
    poll: std::time::Duration,
    /// Whether the frontend has sent SET_VRING_ENABLE itself.
    explicit_enable: bool,
    /// A device state transfer under way (SET_DEVICE_STATE_FD).
    transfer: Option<Transfer>,
    /// Features in a state loaded before SET_FEATURES, to compare with it.
    loaded_features: Option<u64>,
    /// Device state transfer outcomes, which the frontend can trigger at will.
    state_log: LogLimiter,
    /// The dirty page log of this connection.
    dirty: DirtyLog,
    /// Dirty log set-up outcomes, which the frontend can trigger at will.
    dirty_note: LogLimiter,
}

fn invalid(msg: &'static str) -> VhostUserError {
    VhostUserError::InvalidOperation(msg)
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> VhostUserError {
    VhostUserError::ReqHandlerError(std::io::Error::other(e))
}

impl<D: Device> Handler<D> {
    /// A fresh handler for a new connection.
    pub fn new(
        device: Arc<D>,
        metrics: Arc<Vec<Arc<QueueMetrics>>>,
        poll: std::time::Duration,
    ) -> Self {
        let vrings = (0..device.num_queues())
            .map(|_| VringSlot::default())
            .collect();
        Handler {
            device,
            metrics,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
            owned: false,
            features: None,
            protocol: VhostUserProtocolFeatures::empty(),
            vrings,
            inflight: None,
            poll,
            explicit_enable: false,
            transfer: None,
            loaded_features: None,
            state_log: LogLimiter::default(),
            dirty: DirtyLog::new(),
            dirty_note: LogLimiter::default(),
        }
    }

    fn slot(&mut self, index: u32) -> VhostUserResult<&mut VringSlot> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn va_to_gpa(&self, va: u64) -> VhostUserResult<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| GuestAddress(m.gpa + (va - m.vmm_addr)))
            .ok_or(VhostUserError::InvalidParam)
    }

    fn rebuild_memory(&mut self) -> VhostUserResult<()> {
        let mut regions = self
            .mappings
            .iter()
            .map(|m| m.region.clone())
            .collect::<Vec<_>>();
        // ADD_MEM_REG comes in no particular address order (QEMU adds
        // regions as its memory listener sees them); vm-memory wants them sorted.
        regions.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(r.as_ref()));
        let mem = GuestMemoryMmap::from_arc_regions(regions).map_err(internal)?;
        self.mem
            .lock()
            .map_err(|_| invalid("memory lock poisoned"))?
            .replace(mem);
        Ok(())
    }

    fn stop_worker(&mut self, index: usize) {
        let Some(slot) = self.vrings.get_mut(index) else {
            return;
        };
        if let Some(w) = slot.worker.take() {
            if let Some(next) = w.stop() {
                slot.next_avail = next;
            }
            tracing::debug!(queue = index, next_avail = slot.next_avail, "queue stopped");
        }
    }

    /// Stops every worker, draining in-flight requests.
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_worker(i);
        }
    }

    fn try_start(&mut self, index: usize) -> VhostUserResult<()> {
        let Some(features) = self.features else {
            return Ok(());
        };
        let slot = &self.vrings[index];
        let (Some(kick), Some((desc, avail, used)), true, None) = (
            slot.kick.as_ref(),
            slot.addrs,
            slot.enabled,
            slot.worker.as_ref(),
        ) else {
            return Ok(());
        };
        let cfg = VringConfig {
            size: slot.size,
            desc_table: desc,
            avail_ring: avail,
            used_ring: used,
            next_avail: slot.next_avail,
            event_idx: features & VIRTIO_RING_F_EVENT_IDX != 0,
        };
        let kick = kick.try_clone().map_err(VhostUserError::ReqHandlerError)?;
        let metrics = self.metrics[index].clone();
        let inflight = self.inflight.as_ref().and_then(|r| r.queue(index));
        let mem = self.mem.memory();
        let used_log = (self.dirty.logger(), slot.used_log.clone());
        let (vring, resubmit) = Vring::new(
            &cfg,
            &mem,
            slot.call.clone(),
            inflight,
            metrics.clone(),
            used_log,
        )
        .map_err(internal)?;
        let handler = self
            .device
            .queue_handler(index, metrics, self.dirty.logger())
            .map_err(VhostUserError::ReqHandlerError)?;
        let worker = Worker {
            vring,
            kick,
            mem: self.mem.clone(),
            handler,
            resubmit,
            poll: worker::PollWindow::new(self.poll),
        };
        // A ring that already has completions (a restart: the used index
        // is not 0) may hold one the driver was never told of: the
        // previous backend published it and died before signalling. QEMU
        // can send SET_VRING_CALL before SET_VRING_KICK (when it unmasks
        // the vectors first), so the call eventfd is already here and
        // `set_vring_call` does not signal it. It is signalled once now;
        // a spurious interrupt is harmless to a virtio driver.
        let restarted = mem
            .read_obj::<u16>(used.checked_add(2).unwrap_or(used))
            .is_ok_and(|idx| idx != 0);
        let handle = worker::spawn(format!("queue{index}"), worker).map_err(internal)?;
        tracing::debug!(queue = index, size = cfg.size, "queue started");
        let slot = &mut self.vrings[index];
        slot.worker = Some(handle);
        if restarted {
            if let Some(call) = slot.call.lock().ok().as_ref().and_then(|c| c.as_ref()) {
                let _ = call.write(1);
            }
        }
        Ok(())
    }

    fn try_start_all(&mut self) -> VhostUserResult<()> {
        (0..self.vrings.len()).try_for_each(|i| self.try_start(i))
    }

    /// LOG_ALL acked or not: logging on or off, the log kept either way.
    fn set_logging(&mut self, on: bool) {
        if on == self.dirty.is_enabled() {
            return;
        }
        self.dirty.set_enabled(on);
        if !self.dirty_note.allow() {
            return;
        }
        if on && !self.dirty.has_base() {
            tracing::warn!(
                "LOG_ALL acked before SET_LOG_BASE: nothing is logged until a log comes"
            );
        } else {
            tracing::info!(on, "dirty page logging");
        }
    }

    /// Drops the dirty log and every ring's log address (a reset).
    fn clear_dirty_log(&mut self) {
        self.dirty.clear();
        for slot in &self.vrings {
            slot.used_log.set(None);
        }
    }
}

impl<D: Device> Drop for Handler<D> {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Refuses a memory region or inflight area reaching past the end of its
/// file: the first access past the end would kill the daemon with SIGBUS.
fn check_fits(file: &File, offset: u64, size: u64) -> VhostUserResult<()> {
    crate::memory::check_file_range(file, offset, size).map_err(internal)
}

fn eventfd_from(file: File) -> EventFd {
    // SAFETY: `into_raw_fd` transfers ownership of a valid fd the frontend sent us.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl<D: Device> VhostUserBackendReqHandlerMut for Handler<D> {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(invalid("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.stop_all();
        self.owned = false;
        self.features = None;
        self.clear_dirty_log();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.stop_all();
        for slot in &mut self.vrings {
            slot.enabled = false;
            slot.next_avail = 0;
            slot.base_set = false;
            slot.loaded_base = None;
        }
        self.features = None;
        self.loaded_features = None;
        self.clear_dirty_log();
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | LOG_ALL)
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // Logging switched on or off (a migration starting or ending)
        // changes nothing the device sees.
        let only_logging = self
            .features
            .is_some_and(|f| f & !LOG_ALL == features & !LOG_ALL);
        if !only_logging {
            self.device
                .set_acked_features(features & !protocol & !LOG_ALL)
                .map_err(VhostUserError::ReqHandlerError)?;
        }
        self.features = Some(features);
        self.set_logging(features & LOG_ALL != 0);
        if let Some(saved) = self
            .loaded_features
            .take()
            .filter(|&f| f & !LOG_ALL != features & !LOG_ALL)
        {
            if self.state_log.allow() {
                tracing::warn!(
                    saved = format_args!("{saved:#x}"),
                    acked = format_args!("{features:#x}"),
                    "features differ from the loaded device state"
                );
            }
        }
        let enabled = if features & protocol == 0 {
            self.vrings.len()
        } else if !self.explicit_enable {
            self.device.queues_enabled_at_features()
        } else {
            0
        };
        self.vrings
            .iter_mut()
            .take(enabled)
            .for_each(|s| s.enabled = true);
        self.try_start_all()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return Err(invalid("postcopy not supported"));
        }
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            tracing::debug!(
                gpa = format_args!("{:#x}", { region.guest_phys_addr }),
                size = format_args!("{:#x}", { region.memory_size }),
                "memory table region"
            );
            check_fits(&file, region.mmap_offset, region.memory_size)?;
            let map = region.mmap_region::<()>(file)?;
            let guest = GuestRegionMmap::new(map, GuestAddress(region.guest_phys_addr))
                .ok_or(VhostUserError::InvalidParam)?;
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
                region: Arc::new(guest),
                refs: 1,
            });
        }
        let old = std::mem::replace(&mut self.mappings, mappings);
        if let Err(e) = self.rebuild_memory() {
            // A table with overlapping regions is refused as a whole.
            self.mappings = old;
            return Err(e);
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let max = self.device.max_queue_size();
        let slot = self.slot(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(VhostUserError::InvalidParam);
        }
        slot.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostUserResult<()> {
        let addrs = (
            self.va_to_gpa(descriptor)?,
            self.va_to_gpa(available)?,
            self.va_to_gpa(used)?,
        );
        let slot = self.slot(index)?;
        slot.addrs = Some(addrs);
        // The running worker (the frontend switches this while the ring
        // runs) logs its next used ring writes there, or stops.
        let logged = flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG);
        slot.used_log.set(logged.then_some(log));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let slot = self.slot(index)?;
        slot.next_avail = base as u16;
        slot.base_set = true;
        let loaded = slot.loaded_base.take().filter(|&l| l != base as u16);
        if let Some(loaded) = loaded {
            if self.state_log.allow() {
                tracing::warn!(
                    queue = index,
                    base,
                    loaded,
                    "ring base differs from the loaded device state; the frontend's wins"
                );
            }
        }
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.slot(index)?;
        self.stop_worker(index as usize);
        let slot = self.slot(index)?;
        slot.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(slot.next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.slot(u32::from(index))?;
        self.stop_worker(index as usize);
        self.slot(u32::from(index))?.kick = fd.map(eventfd_from);
        self.try_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let slot = self.slot(u32::from(index))?;
        let call = fd.map(eventfd_from);
        // A running queue may have published completions while it had no
        // call eventfd, or the frontend's previous one: QEMU sends
        // SET_VRING_CALL after SET_VRING_KICK, which starts the queue, and
        // a reconnected queue resubmits its inflight requests at once. A
        // completion signalled nowhere leaves the driver waiting forever,
        // so the new eventfd is signalled once (a spurious interrupt is
        // harmless to a virtio driver).
        // Signalled after it is in place: a completion published meanwhile
        // already uses it.
        let running = slot.worker.is_some();
        let mut current = slot
            .call
            .lock()
            .map_err(|_| invalid("call lock poisoned"))?;
        *current = call;
        if let (Some(c), true) = (current.as_ref(), running) {
            let _ = c.write(1);
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostUserResult<()> {
        self.slot(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features() | VhostUserProtocolFeatures::LOG_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        self.explicit_enable = true;
        self.slot(index)?.enabled = enable;
        if enable {
            self.try_start(index as usize)
        } else {
            self.stop_worker(index as usize);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        self.device.read_config(offset, &mut buf);
        Ok(buf)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        Err(invalid("config space is read-only"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(invalid("gpu socket not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(invalid("shared objects not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let (region, file) =
            InflightRegion::create(inflight.num_queues, inflight.queue_size).map_err(internal)?;
        let reply = VhostUserInflight {
            mmap_size: region.size(),
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        check_fits(&file, inflight.mmap_offset, inflight.mmap_size)?;
        let region = InflightRegion::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(internal)?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy.is_some() {
            return Err(invalid("postcopy not supported"));
        }
        tracing::debug!(
            gpa = format_args!("{:#x}", { region.guest_phys_addr }),
            size = format_args!("{:#x}", { region.memory_size }),
            "add memory region"
        );
        if let Some(m) = self.mappings.iter_mut().find(|m| m.is(region)) {
            m.refs += 1;
            return Ok(None);
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(VhostUserError::InvalidParam);
        }
        check_fits(&fd, region.mmap_offset, region.memory_size)?;
        let map = region.mmap_region::<()>(fd)?;
        let guest = GuestRegionMmap::new(map, GuestAddress(region.guest_phys_addr))
            .ok_or(VhostUserError::InvalidParam)?;
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
            region: Arc::new(guest),
            refs: 1,
        });
        if let Err(e) = self.rebuild_memory() {
            // An overlapping region is refused and leaves the table as it was.
            self.mappings.pop();
            return Err(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        tracing::debug!(
            gpa = format_args!("{:#x}", { region.guest_phys_addr }),
            size = format_args!("{:#x}", { region.memory_size }),
            "remove memory region"
        );
        // Matched on guest range only: the spec lets the frontend leave the
        // user address out of a removal.
        let i = self
            .mappings
            .iter()
            .position(|m| m.gpa == region.guest_phys_addr && m.size == region.memory_size)
            .ok_or(VhostUserError::InvalidParam)?;
        self.mappings[i].refs -= 1;
        if self.mappings[i].refs > 0 {
            return Ok(());
        }
        self.mappings.remove(i);
        self.rebuild_memory()
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VhostUserResult<Option<File>> {
        // STOPPED is the only phase the protocol defines (and the vhost crate decodes).
        let VhostTransferStatePhase::STOPPED = phase;
        let direction = match direction {
            VhostTransferStateDirection::SAVE => Direction::Save,
            VhostTransferStateDirection::LOAD => Direction::Load,
        };
        match self.start_transfer(direction, fd) {
            Ok(()) => {
                tracing::debug!(?direction, "device state transfer started");
                Ok(None)
            }
            Err(e) => {
                if self.state_log.allow() {
                    tracing::warn!(?direction, "{}", error_chain(&e));
                }
                Err(internal(e))
            }
        }
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        match self.finish_transfer() {
            Ok(direction) => {
                if self.state_log.allow() {
                    tracing::info!(?direction, "device state transferred");
                }
                Ok(())
            }
            Err(e) => {
                if self.state_log.allow() {
                    tracing::warn!("device state check failed: {}", error_chain(&e));
                }
                Err(internal(e))
            }
        }
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(invalid("shared memory regions not supported"))
    }

    /// Maps the frontend's log. A refusal gets no reply (the vhost crate
    /// sends the reply only on success), so the connection is dropped and
    /// the frontend, waiting for that reply, sees it closed.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostUserResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        match self.dirty.set_base(file, size, offset) {
            Ok(()) => {
                if self.dirty_note.allow() {
                    tracing::info!(
                        size = format_args!("{size:#x}"),
                        offset = format_args!("{offset:#x}"),
                        "dirty log mapped"
                    );
                }
                Ok(())
            }
            Err(e) => {
                if self.dirty_note.allow() {
                    tracing::warn!(
                        size = format_args!("{size:#x}"),
                        offset = format_args!("{offset:#x}"),
                        "SET_LOG_BASE refused: {}",
                        error_chain(&e)
                    );
                }
                Err(internal(e))
            }
        }
    }
}

/// Shared handler type the protocol layer drives.
pub type SharedHandler<D> = Arc<Mutex<Handler<D>>>;

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::Duration;

    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::device::QueueHandler;
    use crate::memory::memfd_create;

    struct NoQueues;

    impl Device for NoQueues {
        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            0
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::empty()
        }
        fn read_config(&self, _offset: u32, _buf: &mut [u8]) {}
        fn queue_handler(
            &self,
            _index: usize,
            _metrics: Arc<QueueMetrics>,
            _dirty: crate::DirtyLogger,
        ) -> io::Result<Box<dyn QueueHandler>> {
            Err(io::Error::other("no queues"))
        }
    }

    fn handler() -> Handler<NoQueues> {
        let metrics = Arc::new(vec![Arc::new(QueueMetrics::default())]);
        Handler::new(Arc::new(NoQueues), metrics, Duration::ZERO)
    }

    fn memfd(len: u64) -> File {
        let f = memfd_create("test-ram").unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn memory_region_past_the_end_of_its_file_is_refused() {
        let mut h = handler();
        let past_end = VhostUserMemoryRegion::new(0, 0x2000, 0x7f00_0000_0000, 0);
        let offset_past_end = VhostUserMemoryRegion::new(0, 0x1000, 0x7f00_0000_0000, 0x1000);
        let overflowing = VhostUserMemoryRegion::new(0, 0x1000, 0x7f00_0000_0000, u64::MAX);
        let fits = VhostUserMemoryRegion::new(0, 0x1000, 0x7f00_0000_0000, 0);

        let refused = [past_end, offset_past_end, overflowing]
            .map(|r| h.set_mem_table(&[r], vec![memfd(0x1000)], None).is_err());
        let accepted = h.set_mem_table(&[fits], vec![memfd(0x1000)], None);

        assert_eq!(refused, [true, true, true]);
        assert!(accepted.is_ok());
        assert_eq!(h.va_to_gpa(0x7f00_0000_0fff).unwrap(), GuestAddress(0xfff));
    }

    #[test]
    fn added_region_past_the_end_of_its_file_is_refused_and_table_kept() {
        let mut h = handler();
        let fits = VhostUserSingleMemoryRegion::new(0, 0x1000, 0x7f00_0000_0000, 0);
        let past_end = VhostUserSingleMemoryRegion::new(0x1000, 0x2000, 0x7f00_0000_1000, 0);
        h.add_mem_region(&fits, memfd(0x1000), None).unwrap();

        let refused = h.add_mem_region(&past_end, memfd(0x1000), None);

        assert!(refused.is_err());
        assert_eq!(h.mappings.len(), 1);
        assert!(h.va_to_gpa(0x7f00_0000_1000).is_err());
    }

    #[test]
    fn inflight_area_past_the_end_of_its_file_is_refused() {
        let mut h = handler();
        let size = crate::inflight::queue_region_size(256) as u64;
        let area = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 256,
        };

        let refused = h.set_inflight_fd(&area, memfd(size - 1));
        let accepted = h.set_inflight_fd(&area, memfd(size));

        assert!(refused.is_err());
        assert!(accepted.is_ok());
    }
}
