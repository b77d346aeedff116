//! PCI: a host bridge on bus 0 reached through configuration mechanism #1
//! (ports 0xCF8/0xCFC) and ECAM, BAR allocation in the MMIO hole (64-bit
//! BARs above RAM), and the device model that virtio-pci builds on.
//!
//! Saved state: [`PciRootState`] (the host bridge's configuration space
//! and which slots are taken) and [`PciConfigIoState`] (the 0xCF8 address
//! latch). Each function saves its own configuration space. Restore order:
//! [`PciRoot::restore`], then each function rebuilt from its state and
//! plugged back with [`PciRoot::add_at`] into its saved slot, which maps
//! its BARs where its restored configuration space says (a BAR the guest
//! moved is mapped at its new address), then [`PciConfigIo::restore`].

pub mod config;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use config::{Bar, BarMove, PciConfig, PciConfigError, PciConfigState, PciId};

use crate::devices::bus::{lock, Bus, BusDevice, BusError};

/// Configuration mechanism #1 ports.
pub const CONFIG_IO_BASE: u64 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
/// ECAM for bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;
/// 32-bit BAR window, below ECAM.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_END: u64 = ECAM_BASE;
/// Top of the 64-bit BAR window (guest physical addresses stay below 1 TiB).
pub const MMIO64_END: u64 = 1 << 40;

/// Errors building the PCI bus.
#[derive(Debug, Error)]
pub enum PciError {
    #[error("No room for a {0:#x}-byte BAR")]
    NoBarSpace(u64),
    #[error("PCI bus 0 is full")]
    BusFull,
    #[error("Cannot map a BAR")]
    Map(#[source] BusError),
    #[error("The MMIO bus is gone")]
    BusGone,
    #[error("PCI slot {0} is taken or not a device slot")]
    Slot(u8),
    #[error("Cannot restore the host bridge")]
    Bridge(#[source] PciConfigError),
}

/// What the PCI root holds, for snapshot and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    pub bridge: PciConfigState,
    /// The slots holding a function, in ascending order.
    pub slots: Vec<u8>,
}

/// What the configuration mechanism #1 ports hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    /// The last dword written to 0xCF8.
    pub address: u32,
}

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// An access to BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// A configuration write landed (capabilities may react).
    fn config_written(&mut self, _reg: usize) {}
    /// The guest moved a BAR: re-register anything tied to its address.
    fn bar_moved(&mut self, _m: BarMove) {}
}

/// Bump allocator for BAR space, naturally aligned.
pub struct BarAllocator {
    next32: u64,
    next64: u64,
}

impl BarAllocator {
    /// `ram_end` is the top of guest RAM; 64-bit BARs go above it.
    pub fn new(ram_end: u64) -> Self {
        Self {
            next32: MMIO32_START,
            next64: ram_end.max(1 << 32).next_multiple_of(1 << 30),
        }
    }

    pub fn allocate(&mut self, size: u64, is64: bool) -> Result<u64, PciError> {
        let (next, end) = if is64 {
            (&mut self.next64, MMIO64_END)
        } else {
            (&mut self.next32, MMIO32_END)
        };
        let addr = next.next_multiple_of(size);
        if addr + size > end {
            return Err(PciError::NoBarSpace(size));
        }
        *next = addr + size;
        Ok(addr)
    }
}

/// Routes MMIO accesses in one BAR to its device.
struct BarWindow {
    dev: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data)
    }
}

/// The host bridge and the functions on bus 0.
pub struct PciRoot {
    bridge: PciConfig,
    slots: BTreeMap<u8, Arc<Mutex<dyn PciDevice>>>,
    /// Weak: the bus holds the ECAM window, which holds this root; a strong
    /// reference would keep every device (and its backend connection)
    /// alive after the VM is dropped.
    mmio: Weak<Bus>,
}

const HOST_BRIDGE: PciId = PciId {
    vendor: 0x8086,
    device: 0x0d57,
    revision: 0,
    class: 0x060000,
    subsystem_vendor: 0,
    subsystem: 0,
};

impl PciRoot {
    pub fn new(mmio: Arc<Bus>) -> Self {
        Self {
            bridge: PciConfig::new(HOST_BRIDGE, 0),
            slots: BTreeMap::new(),
            mmio: Arc::downgrade(&mmio),
        }
    }

    /// The root's state, for a snapshot (the functions save their own).
    pub fn state(&self) -> PciRootState {
        PciRootState {
            bridge: self.bridge.state(),
            slots: self.slots.keys().copied().collect(),
        }
    }

    /// A root with the host bridge of `state` and no functions yet: plug
    /// each one back with [`Self::add_at`] at its slot in `state.slots`.
    pub fn restore(mmio: Arc<Bus>, state: &PciRootState) -> Result<Self, PciError> {
        let mut root = Self::new(mmio);
        root.bridge
            .check_identity(&state.bridge)
            .map_err(PciError::Bridge)?;
        root.bridge = PciConfig::restore(&state.bridge).map_err(PciError::Bridge)?;
        Ok(root)
    }

    /// Plugs `dev` into the next free slot and maps its BARs; returns the slot.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = (1..32u8)
            .find(|s| !self.slots.contains_key(s))
            .ok_or(PciError::BusFull)?;
        self.add_at(slot, dev)?;
        Ok(slot)
    }

    /// Plugs `dev` into `slot` (1 to 31, free) and maps its BARs at the
    /// addresses its configuration space holds.
    pub fn add_at(&mut self, slot: u8, dev: Arc<Mutex<dyn PciDevice>>) -> Result<(), PciError> {
        if !(1..32).contains(&slot) || self.slots.contains_key(&slot) {
            return Err(PciError::Slot(slot));
        }
        let bars: Vec<(usize, Bar)> = {
            let d = lock(&dev);
            (0..6)
                .filter_map(|i| d.config().bar(i).map(|b| (i, b)))
                .collect()
        };
        let mmio = self.mmio.upgrade().ok_or(PciError::BusGone)?;
        for (bar, b) in bars {
            let window = Arc::new(Mutex::new(BarWindow {
                dev: dev.clone(),
                bar,
            }));
            mmio.insert(b.addr, b.size, window).map_err(PciError::Map)?;
        }
        self.slots.insert(slot, dev);
        Ok(())
    }

    fn read(&self, slot: u8, func: u8, reg: usize) -> u32 {
        match (slot, func) {
            (0, 0) => self.bridge.read(reg),
            (s, 0) => self
                .slots
                .get(&s)
                .map_or(u32::MAX, |d| lock(d).config().read(reg)),
            _ => u32::MAX,
        }
    }

    fn write(&mut self, slot: u8, func: u8, reg: usize, offset: usize, data: &[u8]) {
        if func != 0 {
            return;
        }
        if slot == 0 {
            self.bridge.write(reg, offset, data);
            return;
        }
        let Some(dev) = self.slots.get(&slot).cloned() else {
            return;
        };
        let mut d = lock(&dev);
        let moved = d.config_mut().write(reg, offset, data);
        d.config_written(reg);
        if let Some(m) = moved {
            let size = d.config().bar(m.index).map_or(0, |b| b.size);
            d.bar_moved(m);
            drop(d);
            self.move_window(&dev, m, size);
        }
    }

    fn move_window(&self, dev: &Arc<Mutex<dyn PciDevice>>, m: BarMove, size: u64) {
        // Guest-triggered, hence debug level only.
        tracing::debug!(bar = m.index, from = m.from, to = m.to, "guest moved a BAR");
        let Some(mmio) = self.mmio.upgrade() else {
            return;
        };
        let window = mmio.remove(m.from).unwrap_or_else(|| {
            Arc::new(Mutex::new(BarWindow {
                dev: dev.clone(),
                bar: m.index,
            }))
        });
        if let Err(e) = mmio.insert(m.to, size, window) {
            // The guest placed a BAR over another device: it stays unmapped
            // until moved again, as on real hardware with a conflict.
            tracing::warn!(error = %e, to = m.to, "guest moved a BAR onto another range");
        }
    }
}

/// Ports 0xCF8 (address) and 0xCFC..0xCFF (data).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// The address latch, for a snapshot.
    pub fn state(&self) -> PciConfigIoState {
        PciConfigIoState {
            address: self.address,
        }
    }

    /// Ports carrying on from `state` in front of `root`.
    pub fn restore(root: Arc<Mutex<PciRoot>>, state: &PciConfigIoState) -> Self {
        Self {
            root,
            address: state.address,
        }
    }

    /// (slot, function, dword) of the current address, if enabled on bus 0.
    fn target(&self) -> Option<(u8, u8, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        (enabled && bus == 0).then_some((
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0..=3 => self.address >> (offset * 8),
            _ => match self.target() {
                Some((s, f, r)) => lock(&self.root).read(s, f, r) >> ((offset - 4) * 8),
                None => u32::MAX,
            },
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (value >> (i * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().unwrap_or_default())
            }
            4..=7 => {
                if let Some((s, f, r)) = self.target() {
                    lock(&self.root).write(s, f, r, (offset - 4) as usize, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM (memory-mapped configuration) for bus 0.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> (u8, u8, usize, usize) {
        (
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            ((offset & 0xfff) >> 2) as usize,
            (offset & 3) as usize,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (s, f, r, byte) = Self::decode(offset);
        // Configuration accesses stay within one dword (as writes do); a
        // wider one (a 64-bit MMIO read) is unsupported: all ones.
        if byte + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let value = lock(&self.root).read(s, f, r) >> (byte * 8);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (value >> (i * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (s, f, r, byte) = Self::decode(offset);
        if byte + data.len() <= 4 {
            lock(&self.root).write(s, f, r, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy(PciConfig, Vec<(usize, u64, Vec<u8>)>);
    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.0
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.1.push((bar, offset, data.to_vec()));
        }
    }

    fn setup() -> (Arc<Bus>, Arc<Mutex<PciRoot>>, Arc<Mutex<Dummy>>) {
        let mmio = Arc::new(Bus::new("mmio"));
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
        let mut cfg = PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1041,
                revision: 1,
                class: 0x020000,
                subsystem_vendor: 0x1af4,
                subsystem: 1,
            },
            0,
        );
        cfg.set_bar(0, 0xc000_0000, 0x1000, false);
        let dev = Arc::new(Mutex::new(Dummy(cfg, vec![])));
        lock(&root).add(dev.clone()).unwrap();
        (mmio, root, dev)
    }

    fn cf8(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | (slot << 11) | (reg << 2)).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn config_io_finds_bridge_and_device() {
        let (_, root, _) = setup();
        let mut io = PciConfigIo::new(root);
        assert_eq!(cf8(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(cf8(&mut io, 1, 0), 0x1041_1af4);
        assert_eq!(cf8(&mut io, 2, 0), u32::MAX);
    }

    #[test]
    fn ecam_reads_match_config_io() {
        let (_, root, _) = setup();
        let mut ecam = PciEcam::new(root);
        let mut d = [0u8; 4];
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        let mut w = [0u8; 2];
        ecam.read((1 << 15) + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
    }

    #[test]
    fn ecam_read_wider_than_a_dword_reads_all_ones() {
        let (_, root, _) = setup();
        let mut ecam = PciEcam::new(root);
        let (mut q, mut across) = ([0u8; 8], [0u8; 2]);

        ecam.read(1 << 15, &mut q);
        ecam.read((1 << 15) + 3, &mut across);

        assert_eq!((q, across), ([0xff; 8], [0xff; 2]));
    }

    #[test]
    fn bar_accesses_reach_the_device_and_follow_a_move() {
        let (mmio, root, dev) = setup();
        mmio.write(0xc000_0010, &[1, 2]);
        assert_eq!(lock(&dev).1, vec![(0, 0x10, vec![1, 2])]);
        let mut ecam = PciEcam::new(root);
        ecam.write((1 << 15) + 0x10, &0xc100_0000u32.to_le_bytes());
        let mut d = [0u8; 1];
        mmio.read(0xc100_0004, &mut d);
        assert_eq!(d, [4]);
        mmio.read(0xc000_0004, &mut d);
        assert_eq!(d, [0xff]);
    }

    #[test]
    fn allocator_aligns_and_respects_windows() {
        let mut a = BarAllocator::new(512 << 20);
        assert_eq!(a.allocate(0x1000, false).unwrap(), MMIO32_START);
        assert_eq!(a.allocate(0x10000, false).unwrap(), MMIO32_START + 0x10000);
        assert_eq!(a.allocate(0x10000, true).unwrap(), 1 << 32);
        let mut big = BarAllocator::new(6 << 30);
        assert_eq!(big.allocate(0x4000, true).unwrap(), 6 << 30);
        assert!(a.allocate(1 << 30, false).is_err());
    }

    /// A root and device restored from `root` and `dev` onto a new bus.
    fn restored(
        root: &Arc<Mutex<PciRoot>>,
        dev: &Arc<Mutex<Dummy>>,
    ) -> (Arc<Bus>, Arc<Mutex<PciRoot>>, Arc<Mutex<Dummy>>) {
        let state = lock(root).state();
        let config = PciConfig::restore(&lock(dev).0.state()).unwrap();
        let mmio = Arc::new(Bus::new("mmio"));
        let r = Arc::new(Mutex::new(PciRoot::restore(mmio.clone(), &state).unwrap()));
        let d = Arc::new(Mutex::new(Dummy(config, vec![])));
        lock(&r).add_at(state.slots[0], d.clone()).unwrap();
        (mmio, r, d)
    }

    #[test]
    fn restored_root_maps_a_moved_bar_at_its_new_address() {
        let (_, root, dev) = setup();
        PciEcam::new(root.clone()).write((1 << 15) + 0x10, &0xc100_0000u32.to_le_bytes());
        let (mmio, _, d) = restored(&root, &dev);

        mmio.write(0xc100_0008, &[9]);
        let mut old = [0u8];
        mmio.read(0xc000_0000, &mut old);

        assert_eq!(lock(&d).1, vec![(0, 8, vec![9])]);
        assert_eq!(old, [0xff]);
    }

    #[test]
    fn restored_root_keeps_slots_and_the_bridge_registers() {
        let (_, root, dev) = setup();
        let mut io = PciConfigIo::new(root.clone());
        io.write(0, &0x8000_0004u32.to_le_bytes());
        io.write(4, &0x0006u16.to_le_bytes());
        let (_, r, _) = restored(&root, &dev);
        let mut rio = PciConfigIo::new(r);

        let regs = [cf8(&mut rio, 0, 1), cf8(&mut rio, 1, 0)];

        assert_eq!(regs, [cf8(&mut io, 0, 1), 0x1041_1af4]);
        assert_eq!(regs[0] & 0x6, 0x6);
    }

    #[test]
    fn restored_config_ports_keep_the_address_latch() {
        let (_, root, dev) = setup();
        let mut io = PciConfigIo::new(root.clone());
        io.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        let (_, r, _) = restored(&root, &dev);
        let mut rio = PciConfigIo::restore(r, &io.state());

        let mut d = [0u8; 4];
        rio.read(4, &mut d);

        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
    }

    #[test]
    fn adding_at_a_taken_slot_is_refused() {
        let (_, root, _) = setup();
        let cfg = PciConfig::new(HOST_BRIDGE, 0);
        let d = Arc::new(Mutex::new(Dummy(cfg, vec![])));

        let err = lock(&root).add_at(1, d).unwrap_err();

        assert!(matches!(err, PciError::Slot(1)), "{err:?}");
    }
}
