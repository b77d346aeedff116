//! The modern (VIRTIO 1.x) virtio-pci transport: common, notify, ISR and
//! device configuration structures in BAR 0, one ioeventfd per queue at its
//! own notify address, MSI-X with a vector per queue plus one for config.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::interrupts::{InterruptError, Router};
use crate::pci::msix::Msix;
use crate::pci::{BarMove, PciConfig, PciDevice, PciId};

/// Errors creating a virtio-pci device.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    #[error("Cannot set up MSI-X")]
    Msix(#[source] InterruptError),
    #[error("Cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot register queue notify ioeventfd")]
    IoEvent(#[source] kvm_ioctls::Error),
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

#[derive(Clone, Copy, Debug)]
struct QueueState {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
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
        let dev = Self {
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
        };
        dev.register_kicks(bar_addr, true)?;
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
        let active: Vec<ActiveQueue> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| ActiveQueue {
                index: i,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &self.kicks[i],
                call: self
                    .msix
                    .irqfds
                    .get(usize::from(q.vector))
                    .unwrap_or(&self.no_vector),
            })
            .collect();
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
