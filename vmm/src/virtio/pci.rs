//! The modern (VIRTIO 1.x) virtio-pci transport: common, notify, ISR and
//! device configuration structures in BAR 0, one ioeventfd per queue at its
//! own notify address, MSI-X with a vector per queue plus one for config.
//!
//! Saved state ([`VirtioPciState`]) is the transport's half of the device:
//! the configuration space (BAR 0's place included), MSI-X, the common
//! configuration registers and each queue as the driver set it up.
//! [`VirtioPci::restore`] rebuilds the transport around a device half
//! connected afresh (a new vhost-user connection): it registers the queue
//! notify ioeventfds at BAR 0's saved address, re-routes MSI-X, and, when
//! the driver had the device running, hands the queues to
//! [`VirtioDevice::restore_activated`]. The device half's own state (the
//! rings' positions, which live in guest memory, and a backend's device
//! configuration) is not in here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::interrupts::{InterruptError, Router};
use crate::pci::msix::{Msix, MsixError, MsixState, MSIX_CAP_ID};
use crate::pci::{BarMove, PciConfig, PciConfigError, PciConfigState, PciDevice, PciId};

/// Errors creating a virtio-pci device.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    #[error("Cannot set up MSI-X")]
    Msix(#[source] InterruptError),
    #[error("Cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot register queue notify ioeventfd")]
    IoEvent(#[source] kvm_ioctls::Error),
    #[error("Saved state is for device type {saved}, the device is type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("Saved state has {saved} queues, the device {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("Saved queue {index} has size {size}, more than the device's {max}")]
    QueueSize { index: usize, size: u16, max: u16 },
    #[error("Driver accepted features {missing:#x} the device no longer offers")]
    Features { missing: u64 },
    #[error("Saved configuration space has no BAR 0")]
    NoBar,
    #[error("Saved configuration space has no MSI-X capability at {0:#x}")]
    MsixCap(usize),
    #[error("Cannot restore the configuration space")]
    Config(#[source] PciConfigError),
    #[error("Cannot restore MSI-X")]
    MsixState(#[source] MsixError),
    #[error("Cannot restart the device")]
    Activate(#[source] ActivateError),
}

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const NO_VECTOR: u16 = 0xffff;

/// BAR 0 layout.
pub const BAR_SIZE: u64 = 0x10000;
const COMMON_OFF: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFF: u64 = 0x3000;
/// Each queue notifies at its own 4-byte slot (its own ioeventfd).
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFF: u32 = 0x8000;
const MSIX_PBA_OFF: u32 = 0xc000;

/// A virtqueue as the driver set it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    /// MSI-X vector, or 0xffff for none.
    pub vector: u16,
    pub enabled: bool,
    /// Guest physical addresses of the descriptor table, driver (avail)
    /// and device (used) areas.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What the transport holds, for snapshot and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// The virtio device type, checked against the device on restore.
    pub device_type: u32,
    pub config: PciConfigState,
    pub msix: MsixState,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub msix_config: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueState>,
}

/// Notifications that reached the VMM instead of an ioeventfd; expected 0.
#[derive(Debug, Default)]
pub struct TransportMetrics {
    pub notify_exits: AtomicU64,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfig,
    msix: Msix,
    device: Box<dyn VirtioDevice>,
    vm: Arc<VmFd>,
    bar_addr: u64,
    kicks: Vec<EventFd>,
    no_vector: EventFd,
    queues: Vec<QueueState>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    pub metrics: Arc<TransportMetrics>,
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        TYPE_NET => 0x020000,
        TYPE_BLOCK => 0x018000,
        _ => 0xff0000,
    }
}

impl VirtioPci {
    /// Wraps `device`; BAR 0 lives at `bar_addr` (a 64-bit BAR).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        vm: Arc<VmFd>,
        router: Arc<Router>,
    ) -> Result<Self, VirtioPciError> {
        let dev = Self::build(device, bar_addr, vm, router)?;
        dev.register_kicks(bar_addr, true)?;
        Ok(dev)
    }

    /// The transport as at power-on, its notify ioeventfds not registered.
    fn build(
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        vm: Arc<VmFd>,
        router: Arc<Router>,
    ) -> Result<Self, VirtioPciError> {
        let dtype = device.device_type();
        let nq = device.num_queues();
        let mut config = PciConfig::new(
            PciId {
                vendor: VIRTIO_VENDOR,
                device: VIRTIO_DEVICE_BASE + dtype as u16,
                revision: 1,
                class: class_of(dtype),
                subsystem_vendor: VIRTIO_VENDOR,
                subsystem: 0x40,
            },
            0,
        );
        config.set_bar(0, bar_addr, BAR_SIZE, true);
        let cap = |cfg_type: u8, off: u64, len: u64, extra: &[u8]| {
            let mut b = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(off as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        config.add_capability(
            CAP_VENDOR,
            &cap(CAP_COMMON, COMMON_OFF, COMMON_LEN, &[]),
            &[],
        );
        config.add_capability(
            CAP_VENDOR,
            &cap(
                CAP_NOTIFY,
                NOTIFY_OFF,
                nq as u64 * u64::from(NOTIFY_MULTIPLIER),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        config.add_capability(CAP_VENDOR, &cap(CAP_ISR, ISR_OFF, 1, &[]), &[]);
        config.add_capability(
            CAP_VENDOR,
            &cap(CAP_DEVICE, DEVICE_OFF, DEVICE_LEN, &[]),
            &[],
        );
        let msix = Msix::new(
            nq as u16 + 1,
            &mut config,
            0,
            MSIX_TABLE_OFF,
            MSIX_PBA_OFF,
            vm.clone(),
            router,
        )
        .map_err(VirtioPciError::Msix)?;
        let evt = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VirtioPciError::EventFd)
        };
        let kicks = (0..nq).map(|_| evt()).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            msix,
            queues: vec![Self::fresh_queue(device.queue_max_size()); nq],
            device,
            vm,
            bar_addr,
            kicks,
            no_vector: evt()?,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            metrics: Arc::default(),
        })
    }

    /// The transport's state, for a snapshot. The VM must be paused and
    /// the device quiesced ([`Self::pause`]).
    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            device_type: self.device.device_type(),
            config: self.config.state(),
            msix: self.msix.state(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            msix_config: self.msix_config,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
        }
    }

    /// A transport carrying on from `state` around `device`, which must be
    /// the same kind of device (type, queue count, and at least the
    /// features the driver accepted) freshly connected. BAR 0 keeps its
    /// saved address (the caller maps it there through
    /// [`crate::pci::PciRoot::add_at`]), the queue notify ioeventfds are
    /// registered there, MSI-X routes and irqfds are re-established, and
    /// a device the driver had started is restarted with
    /// [`VirtioDevice::restore_activated`].
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        state: &VirtioPciState,
        vm: Arc<VmFd>,
        router: Arc<Router>,
    ) -> Result<Self, VirtioPciError> {
        check_device(device.as_ref(), state)?;
        let bar = state
            .config
            .bars
            .first()
            .copied()
            .flatten()
            .ok_or(VirtioPciError::NoBar)?;
        let mut dev = Self::build(device, bar.addr, vm, router)?;
        dev.config
            .check_identity(&state.config)
            .map_err(VirtioPciError::Config)?;
        dev.config = PciConfig::restore(&state.config).map_err(VirtioPciError::Config)?;
        // MSI-X follows its message control at the offset this build put
        // the capability: the saved space must have it there too.
        let mut cap = [0u8];
        dev.config.read_bytes(dev.msix.cap_offset(), &mut cap);
        if cap[0] != MSIX_CAP_ID {
            return Err(VirtioPciError::MsixCap(dev.msix.cap_offset()));
        }
        dev.msix
            .restore(&state.msix)
            .map_err(VirtioPciError::MsixState)?;
        dev.device_feature_select = state.device_feature_select;
        dev.driver_feature_select = state.driver_feature_select;
        dev.driver_features = state.driver_features;
        dev.msix_config = state.msix_config;
        dev.status = state.status;
        dev.config_generation = state.config_generation;
        dev.queue_select = state.queue_select;
        dev.queues.clone_from(&state.queues);
        dev.register_kicks(dev.bar_addr, true)?;
        let running = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        if dev.status & (running | STATUS_NEEDS_RESET) == running {
            let queues = active_queues(&dev.queues, &dev.kicks, &dev.msix, &dev.no_vector);
            dev.device
                .restore_activated(dev.driver_features, &queues)
                .map_err(VirtioPciError::Activate)?;
        }
        Ok(dev)
    }

    fn fresh_queue(max: u16) -> QueueState {
        QueueState {
            size: max,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    fn register_kicks(&self, bar: u64, add: bool) -> Result<(), VirtioPciError> {
        for (i, k) in self.kicks.iter().enumerate() {
            let addr =
                IoEventAddress::Mmio(bar + NOTIFY_OFF + i as u64 * u64::from(NOTIFY_MULTIPLIER));
            if add {
                self.vm
                    .register_ioevent(k, &addr, NoDatamatch)
                    .map_err(VirtioPciError::IoEvent)?;
            } else {
                self.vm
                    .unregister_ioevent(k, &addr, NoDatamatch)
                    .map_err(VirtioPciError::IoEvent)?;
            }
        }
        Ok(())
    }

    fn vector_ok(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.count() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn reset(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.device.reset();
        }
        let max = self.device.queue_max_size();
        for q in &mut self.queues {
            *q = Self::fresh_queue(max);
        }
        self.driver_features = 0;
        self.msix_config = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
    }

    fn set_status(&mut self, s: u8) {
        if s == 0 {
            self.reset();
            return;
        }
        let newly = s & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device.features() != 0 {
            // The driver accepted features we never offered.
            self.status = s & !STATUS_FEATURES_OK;
            return;
        }
        self.status = s;
        if newly & STATUS_DRIVER_OK != 0 && s & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let active = active_queues(&self.queues, &self.kicks, &self.msix, &self.no_vector);
        if let Err(e) = self.device.activate(self.driver_features, &active) {
            tracing::error!(error = %e, "virtio device activation failed");
            self.status |= STATUS_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Some(irq) = self.msix.irqfds.get(usize::from(self.msix_config)) {
                let _ = irq.write(1);
            }
        }
    }

    /// The common configuration structure as the driver reads it.
    /// Stops the device's queues while the VM is paused.
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// The device's backend state for a snapshot (see
    /// [`VirtioDevice::save_backend_state`]).
    pub fn save_backend_state(&mut self) -> Result<Option<Vec<u8>>, String> {
        self.device.save_backend_state()
    }

    /// The device behind the transport (migration hooks).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Restarts the queues [`Self::pause`] stopped.
    pub fn resume(&mut self) {
        self.device.resume();
    }

    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let q = self.queues.get(usize::from(self.queue_select));
        let features = self.device.features();
        let dev_features = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let drv_features = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &dev_features.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &drv_features.to_le_bytes());
        put(0x10, &self.msix_config.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status, self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        put(0x18, &q.map_or(0, |q| q.size).to_le_bytes());
        put(0x1a, &q.map_or(NO_VECTOR, |q| q.vector).to_le_bytes());
        put(0x1c, &u16::from(q.is_some_and(|q| q.enabled)).to_le_bytes());
        put(0x1e, &self.queue_select.to_le_bytes());
        put(0x20, &q.map_or(0, |q| q.desc).to_le_bytes());
        put(0x28, &q.map_or(0, |q| q.avail).to_le_bytes());
        put(0x30, &q.map_or(0, |q| q.used).to_le_bytes());
        b
    }

    fn common_write(&mut self, off: u64, v: u64) {
        let live = self.status & STATUS_DRIVER_OK != 0;
        let sel = usize::from(self.queue_select);
        let max = self.device.queue_max_size();
        let set_lo = |old: u64, v: u64| (old & !0xffff_ffff) | (v & 0xffff_ffff);
        let set_hi = |old: u64, v: u64| (old & 0xffff_ffff) | (v << 32);
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = set_lo(self.driver_features, v),
                1 => self.driver_features = set_hi(self.driver_features, v),
                _ => {}
            },
            0x10 => self.msix_config = self.vector_ok(v as u16),
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            _ if live => {} // queue fields are frozen once the device runs
            0x18 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let n = v as u16;
                    q.size = if n.is_power_of_two() && n <= max {
                        n
                    } else {
                        q.size
                    };
                }
            }
            0x1a => {
                let v = self.vector_ok(v as u16);
                if let Some(q) = self.queues.get_mut(sel) {
                    q.vector = v;
                }
            }
            0x1c => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let field = match off & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = if off & 4 == 0 {
                        set_lo(*field, v)
                    } else {
                        set_hi(*field, v)
                    };
                }
            }
            _ => {}
        }
    }
}

/// The enabled queues with their eventfds, as the device gets them.
fn active_queues<'a>(
    queues: &[QueueState],
    kicks: &'a [EventFd],
    msix: &'a Msix,
    no_vector: &'a EventFd,
) -> Vec<ActiveQueue<'a>> {
    queues
        .iter()
        .enumerate()
        .filter(|(_, q)| q.enabled)
        .map(|(i, q)| ActiveQueue {
            index: i,
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            kick: &kicks[i],
            call: msix.irqfds.get(usize::from(q.vector)).unwrap_or(no_vector),
        })
        .collect()
}

/// Checks that `device` can carry on from `state`.
fn check_device(device: &dyn VirtioDevice, state: &VirtioPciState) -> Result<(), VirtioPciError> {
    if device.device_type() != state.device_type {
        return Err(VirtioPciError::DeviceType {
            saved: state.device_type,
            device: device.device_type(),
        });
    }
    if device.num_queues() != state.queues.len() {
        return Err(VirtioPciError::QueueCount {
            saved: state.queues.len(),
            device: device.num_queues(),
        });
    }
    let max = device.queue_max_size();
    if let Some((index, q)) = state.queues.iter().enumerate().find(|(_, q)| q.size > max) {
        return Err(VirtioPciError::QueueSize {
            index,
            size: q.size,
            max,
        });
    }
    // Accepted features are checked when the driver sets FEATURES_OK; one
    // still negotiating is checked then, against this device.
    let missing = state.driver_features & !device.features();
    if state.status & STATUS_FEATURES_OK != 0 && missing != 0 {
        return Err(VirtioPciError::Features { missing });
    }
    Ok(())
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, _reg: usize) {
        self.msix.config_written(&self.config);
    }

    fn bar_moved(&mut self, m: BarMove) {
        if m.index != 0 {
            return;
        }
        let res = self
            .register_kicks(m.from, false)
            .and_then(|_| self.register_kicks(m.to, true));
        match res {
            Ok(()) => self.bar_addr = m.to,
            Err(e) => tracing::warn!(error = %e, "cannot move queue notify ioeventfds"),
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFF + COMMON_LEN => {
                let img = self.common_image();
                let o = o as usize;
                let n = data.len().min(img.len() - o);
                data[..n].copy_from_slice(&img[o..o + n]);
            }
            ISR_OFF => data.fill(0),
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFF, data)
            }
            o if o >= u64::from(MSIX_PBA_OFF) => {
                self.msix.pba_read(o - u64::from(MSIX_PBA_OFF), data)
            }
            o if o >= u64::from(MSIX_TABLE_OFF) => {
                self.msix.table_read(o - u64::from(MSIX_TABLE_OFF), data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFF + COMMON_LEN => {
                if data.len() == 8 {
                    self.common_write(o, le(&data[..4]));
                    self.common_write(o + 4, le(&data[4..]));
                } else {
                    self.common_write(o, le(data));
                }
            }
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFF, data)
            }
            o if (NOTIFY_OFF..NOTIFY_OFF + 0x1000).contains(&o) => {
                // KVM's ioeventfd normally takes these; pass it on anyway.
                self.metrics.notify_exits.fetch_add(1, Ordering::Relaxed);
                let q = ((o - NOTIFY_OFF) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if o >= u64::from(MSIX_PBA_OFF) => {}
            o if o >= u64::from(MSIX_TABLE_OFF) => {
                self.msix.table_write(o - u64::from(MSIX_TABLE_OFF), data)
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        let _ = self.register_kicks(self.bar_addr, false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const FEATURES: u64 = F_VERSION_1 | 1;
    const BAR: u64 = 0x1_0000_0000;
    const MOVED_BAR: u64 = 0x2_0000_0000;

    /// One start of the device: restored or not, features, and each
    /// queue's (index, size, desc, avail, used).
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Started {
        restored: bool,
        features: u64,
        queues: Vec<(usize, u16, u64, u64, u64)>,
    }

    /// What a fake device was given: its starts, and the raw call fd of
    /// each queue at the last start.
    #[derive(Default)]
    struct Record {
        started: Mutex<Vec<Started>>,
        calls: Mutex<Vec<std::os::fd::RawFd>>,
    }

    type Log = Arc<Record>;

    struct Fake {
        dtype: u32,
        log: Log,
    }

    impl Fake {
        fn record(&self, restored: bool, features: u64, active: &[ActiveQueue]) {
            *self.log.calls.lock().unwrap() = active
                .iter()
                .map(|q| std::os::fd::AsRawFd::as_raw_fd(q.call))
                .collect();
            let queues = active
                .iter()
                .map(|q| (q.index, q.size, q.desc, q.avail, q.used))
                .collect();
            self.log.started.lock().unwrap().push(Started {
                restored,
                features,
                queues,
            });
        }
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            self.dtype
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn features(&self) -> u64 {
            FEATURES
        }
        fn read_config(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, features: u64, queues: &[ActiveQueue]) -> Result<(), ActivateError> {
            self.record(false, features, queues);
            Ok(())
        }
        fn restore_activated(
            &mut self,
            features: u64,
            queues: &[ActiveQueue],
        ) -> Result<(), ActivateError> {
            self.record(true, features, queues);
            Ok(())
        }
        fn reset(&mut self) {}
    }

    /// A VM with an irqchip, and its router.
    fn vm() -> (Arc<VmFd>, Arc<Router>) {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = Arc::new(Router::new(vm.clone()));
        (vm, router)
    }

    fn fake(dtype: u32) -> (Box<Fake>, Log) {
        let log = Log::default();
        (
            Box::new(Fake {
                dtype,
                log: log.clone(),
            }),
            log,
        )
    }

    fn transport() -> (VirtioPci, Log, Arc<Router>) {
        let (vm, router) = vm();
        let (dev, log) = fake(TYPE_BLOCK);
        let t = VirtioPci::new(dev, BAR, vm, router.clone()).unwrap();
        (t, log, router)
    }

    /// `t`'s state, through the wire format, restored around a fresh
    /// device of type `dtype` on a VM of its own.
    fn restore_as(
        t: &VirtioPci,
        dtype: u32,
    ) -> (
        Result<VirtioPci, VirtioPciError>,
        Log,
        Arc<VmFd>,
        Arc<Router>,
    ) {
        let bytes = postcard::to_allocvec(&t.state()).unwrap();
        let state: VirtioPciState = postcard::from_bytes(&bytes).unwrap();
        let (vm, router) = vm();
        let (dev, log) = fake(dtype);
        let r = VirtioPci::restore(dev, &state, vm.clone(), router.clone());
        (r, log, vm, router)
    }

    fn restored(t: &VirtioPci) -> (VirtioPci, Log, Arc<VmFd>, Arc<Router>) {
        let (r, log, vm, router) = restore_as(t, TYPE_BLOCK);
        (r.unwrap(), log, vm, router)
    }

    fn w(t: &mut VirtioPci, off: u64, v: u32, len: usize) {
        t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    /// What a driver does up to (not including) DRIVER_OK: features,
    /// queue 0 set up and enabled, queue 1 sized only, MSI-X on.
    fn set_up(t: &mut VirtioPci) {
        w(t, 0x08, 0, 4);
        w(t, 0x0c, 1, 4);
        w(t, 0x08, 1, 4);
        w(t, 0x0c, 1, 4);
        w(t, 0x14, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(t, 0x14, 0x0b, 1);
        w(t, 0x16, 0, 2);
        w(t, 0x18, 128, 2);
        w(t, 0x1a, 1, 2);
        w(t, 0x20, 0x1000, 4);
        w(t, 0x28, 0x2000, 4);
        w(t, 0x30, 0x3000, 4);
        w(t, 0x34, 0x1, 4);
        w(t, 0x1c, 1, 2);
        w(t, 0x16, 1, 2);
        w(t, 0x18, 64, 2);
        w(t, 0x10, 0, 2);
        for v in 0..2u64 {
            let e = u64::from(MSIX_TABLE_OFF) + v * 16;
            w(t, e, 0xfee0_0000, 4);
            w(t, e + 8, 0x40 + v as u32, 4);
            w(t, e + 12, 0, 4);
        }
        let off = t.msix.cap_offset() + 2;
        t.config_mut()
            .write(off / 4, off % 4, &0x8000u16.to_le_bytes());
        t.config_written(off / 4);
    }

    fn driver_ok(t: &mut VirtioPci) {
        w(t, 0x14, 0x0f, 1);
    }

    fn common(t: &mut VirtioPci, select: u16) -> Vec<u8> {
        w(t, 0x16, select.into(), 2);
        let mut b = vec![0u8; COMMON_LEN as usize];
        t.bar_read(0, 0, &mut b);
        b
    }

    /// Whether an ioeventfd is registered at `addr` (KVM refuses a second
    /// one at the same address).
    fn notify_registered(vm: &VmFd, addr: u64) -> bool {
        let probe = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let at = IoEventAddress::Mmio(addr);
        match vm.register_ioevent(&probe, &at, NoDatamatch) {
            Ok(()) => {
                vm.unregister_ioevent(&probe, &at, NoDatamatch).unwrap();
                false
            }
            Err(_) => true,
        }
    }

    #[test]
    fn restored_transport_reads_back_the_same_common_configuration() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        driver_ok(&mut t);
        let (mut r, _, _, _) = restored(&t);

        let queues = [common(&mut r, 0), common(&mut r, 1)];

        assert_eq!(queues, [common(&mut t, 0), common(&mut t, 1)]);
        assert_eq!(r.state(), t.state());
    }

    #[test]
    fn restored_running_transport_restarts_the_device_with_the_saved_queues() {
        let (mut t, log, _) = transport();
        set_up(&mut t);
        driver_ok(&mut t);

        let (_r, rlog, _, _) = restored(&t);

        let mut expected = log.started.lock().unwrap()[0].clone();
        expected.restored = true;
        assert_eq!(expected.queues, [(0, 128, 0x1000, 0x2000, 0x1_0000_3000)]);
        assert_eq!(*rlog.started.lock().unwrap(), [expected]);
    }

    #[test]
    fn restored_half_set_up_transport_starts_when_the_driver_finishes() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        let (mut r, rlog, _, _) = restored(&t);
        let before = rlog.started.lock().unwrap().len();

        driver_ok(&mut r);

        assert_eq!(before, 0);
        assert_eq!(
            *rlog.started.lock().unwrap(),
            [Started {
                restored: false,
                features: FEATURES,
                queues: vec![(0, 128, 0x1000, 0x2000, 0x1_0000_3000)],
            }]
        );
    }

    #[test]
    fn restored_transport_takes_notifications_at_the_moved_bar() {
        let (mut t, _, _) = transport();
        let moved = t
            .config_mut()
            .write(5, 0, &((MOVED_BAR >> 32) as u32).to_le_bytes())
            .unwrap();
        t.bar_moved(moved);

        let (r, _, vm, _) = restored(&t);

        assert_eq!(r.config().bar(0).unwrap().addr, MOVED_BAR);
        assert!(notify_registered(&vm, MOVED_BAR + NOTIFY_OFF + 4));
        assert!(!notify_registered(&vm, BAR + NOTIFY_OFF + 4));
    }

    #[test]
    fn restored_transport_routes_its_msix_vectors_again() {
        let (mut t, _, router) = transport();
        set_up(&mut t);

        let (_r, _, _, rrouter) = restored(&t);

        assert_eq!(rrouter.msi_routes(), router.msi_routes());
        assert_eq!(rrouter.msi_routes().len(), 3);
    }

    #[test]
    fn state_of_another_device_type_is_refused() {
        let (t, _, _) = transport();

        let (r, _, _, _) = restore_as(&t, TYPE_NET);

        assert!(
            matches!(
                r,
                Err(VirtioPciError::DeviceType {
                    saved: TYPE_BLOCK,
                    device: TYPE_NET
                })
            ),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn accepted_features_the_device_lacks_are_refused() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        let mut state = t.state();
        state.driver_features |= 1 << 5;
        let (vm, router) = vm();
        let (dev, _) = fake(TYPE_BLOCK);

        let r = VirtioPci::restore(dev, &state, vm, router);

        assert!(
            matches!(r, Err(VirtioPciError::Features { missing: 0x20 })),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn saved_space_without_msix_where_this_build_has_it_is_refused() {
        let (t, _, _) = transport();
        let mut state = t.state();
        let at = t.msix.cap_offset();
        state.config.regs[at / 4] &= !(0xff << ((at % 4) * 8));
        let (vm, router) = vm();
        let (dev, _) = fake(TYPE_BLOCK);

        let r = VirtioPci::restore(dev, &state, vm, router);

        assert!(
            matches!(r, Err(VirtioPciError::MsixCap(o)) if o == at),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn restarted_queue_signals_its_vector_through_the_restored_irqfd() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        driver_ok(&mut t);

        let (r, rlog, _, _) = restored(&t);

        let vector_1 = std::os::fd::AsRawFd::as_raw_fd(&r.msix.irqfds[1]);
        assert_eq!(*rlog.calls.lock().unwrap(), [vector_1]);
    }
}
