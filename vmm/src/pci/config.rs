//! A type-0 PCI configuration space: read-only identity, writable command
//! and BARs (with size probing), a capability list, 4 KiB so that ECAM sees
//! the extended space too.
//!
//! Saved state ([`PciConfigState`]) is the whole space with its write
//! masks and the BARs' current places, so a restored function answers
//! every read as before, even in the middle of a BAR size probe.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Dwords in the (extended) configuration space.
pub const CONFIG_DWORDS: usize = 1024;
const COMMAND: usize = 1;
const BAR0: usize = 4;
const CAP_PTR: usize = 0xd;
const FIRST_CAP: usize = 0x40;
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command bits the guest may change: I/O, memory, bus master, INTx disable.
const COMMAND_WMASK: u32 = 0x0407;
const BAR_MEM64: u32 = 0x4;

/// Errors restoring a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciConfigError {
    #[error("Saved configuration space has {0} dwords, not {CONFIG_DWORDS}")]
    Size(usize),
    #[error("Saved configuration space has {0} BAR slots, not 6")]
    BarCount(usize),
    #[error("Saved BAR {0} has a size that is not a power of two of at least 16 bytes")]
    BarSize(usize),
    #[error("Saved capability offset {0:#x} is outside the standard space")]
    CapOffset(u32),
    #[error("Saved configuration space is for another function (vendor/device {saved:#010x}, expected {expected:#010x})")]
    Identity { saved: u32, expected: u32 },
}

/// The place of a BAR in guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub addr: u64,
    pub size: u64,
    pub is64: bool,
}

/// A BAR that the guest moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub index: usize,
    pub from: u64,
    pub to: u64,
}

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass, programming interface.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// What a configuration space holds, for snapshot and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// Every dword of the 4 KiB space, as the guest reads it.
    pub regs: Vec<u32>,
    /// The bits of each dword the guest may write.
    pub wmask: Vec<u32>,
    /// The six BAR slots: where each BAR is mapped now (a BAR the guest
    /// moved has its new address; one being size-probed its old one).
    pub bars: Vec<Option<Bar>>,
    /// Where the next capability would go, and the last one added.
    pub next_cap: u32,
    pub last_cap: Option<u32>,
}

/// Dwords that identify a function: vendor/device, class/revision,
/// header type, subsystem.
const IDENTITY: [usize; 4] = [0, 2, 3, 0xb];
const HEADER_TYPE_MASK: u32 = 0x00ff_0000;

/// Configuration space contents and write masks.
pub struct PciConfig {
    regs: Box<[u32; CONFIG_DWORDS]>,
    wmask: Box<[u32; CONFIG_DWORDS]>,
    bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfig {
    pub fn new(id: PciId, header_type: u8) -> Self {
        let mut regs = Box::new([0u32; CONFIG_DWORDS]);
        let mut wmask = Box::new([0u32; CONFIG_DWORDS]);
        regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        regs[2] = u32::from(id.revision) | (id.class << 8);
        regs[3] = u32::from(header_type) << 16;
        regs[0xb] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        wmask[COMMAND] = COMMAND_WMASK;
        // Cache line size and latency timer are plain storage.
        wmask[3] = 0x0000_ffff;
        // Interrupt line is storage; pin 0 (no INTx).
        wmask[0xf] = 0xff;
        Self {
            regs,
            wmask,
            bars: [None; 6],
            next_cap: FIRST_CAP,
            last_cap: None,
        }
    }

    /// The space's state, for a snapshot.
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.to_vec(),
            wmask: self.wmask.to_vec(),
            bars: self.bars.to_vec(),
            next_cap: self.next_cap as u32,
            last_cap: self.last_cap.map(|c| c as u32),
        }
    }

    /// A configuration space carrying on from `state`.
    pub fn restore(state: &PciConfigState) -> Result<Self, PciConfigError> {
        let dwords = |v: &[u32]| -> Result<Box<[u32; CONFIG_DWORDS]>, PciConfigError> {
            let a: [u32; CONFIG_DWORDS] =
                v.try_into().map_err(|_| PciConfigError::Size(v.len()))?;
            Ok(Box::new(a))
        };
        let bars: [Option<Bar>; 6] = state
            .bars
            .as_slice()
            .try_into()
            .map_err(|_| PciConfigError::BarCount(state.bars.len()))?;
        if let Some(i) = bars
            .iter()
            .position(|b| b.is_some_and(|b| !b.size.is_power_of_two() || b.size < 16))
        {
            return Err(PciConfigError::BarSize(i));
        }
        for off in std::iter::once(state.next_cap).chain(state.last_cap) {
            if off > 0x100 {
                return Err(PciConfigError::CapOffset(off));
            }
        }
        Ok(Self {
            regs: dwords(&state.regs)?,
            wmask: dwords(&state.wmask)?,
            bars,
            next_cap: state.next_cap as usize,
            last_cap: state.last_cap.map(|c| c as usize),
        })
    }

    /// Checks that `state` was saved from a function with this one's
    /// identity (vendor, device, class, header type, subsystem).
    pub fn check_identity(&self, state: &PciConfigState) -> Result<(), PciConfigError> {
        let same = IDENTITY.iter().all(|&r| {
            let mask = if r == 3 { HEADER_TYPE_MASK } else { u32::MAX };
            state.regs.get(r).map(|v| v & mask) == Some(self.regs[r] & mask)
        });
        if same {
            return Ok(());
        }
        Err(PciConfigError::Identity {
            saved: state.regs.first().copied().unwrap_or(u32::MAX),
            expected: self.regs[0],
        })
    }

    /// Declares a memory BAR of `size` bytes (a power of two) at `addr`.
    pub fn set_bar(&mut self, index: usize, addr: u64, size: u64, is64: bool) {
        assert!(size.is_power_of_two() && size >= 16 && index + usize::from(is64) < 6);
        let reg = BAR0 + index;
        let mask = !(size - 1);
        self.regs[reg] = (addr as u32 & 0xffff_fff0) | if is64 { BAR_MEM64 } else { 0 };
        self.wmask[reg] = mask as u32 & 0xffff_fff0;
        if is64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.wmask[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(Bar { addr, size, is64 });
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars[index]
    }

    /// Appends a capability (`body` starts after the ID and next bytes);
    /// returns its offset. `wmask` covers the body's bytes.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        assert!(
            off + len <= 0x100,
            "capabilities overflow the standard space"
        );
        self.write_bytes(off, &[id, 0]);
        self.write_bytes(off + 2, body);
        for (i, m) in wmask.iter().enumerate() {
            let b = off + 2 + i;
            let shift = (b % 4) * 8;
            self.wmask[b / 4] |= u32::from(*m) << shift;
        }
        match self.last_cap {
            Some(prev) => self.write_bytes(prev + 1, &[off as u8]),
            None => {
                self.regs[CAP_PTR] = off as u32;
                self.regs[COMMAND] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(off);
        self.next_cap = off + len;
        off
    }

    fn write_bytes(&mut self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = off + i;
            let shift = (at % 4) * 8;
            let r = &mut self.regs[at / 4];
            *r = (*r & !(0xff << shift)) | (u32::from(*b) << shift);
        }
    }

    /// Reads the dword `reg` (all ones past the end).
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Reads bytes at a byte offset (for capability bodies).
    pub fn read_bytes(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = off + i;
            *b = (self.read(at / 4) >> ((at % 4) * 8)) as u8;
        }
    }

    /// Writes `data` at byte `offset` within dword `reg`, honouring the write
    /// masks. Returns the BAR move this caused, if any.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        if reg >= CONFIG_DWORDS || offset + data.len() > 4 {
            return None;
        }
        let mut val = 0u32;
        let mut bytes_mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            val |= u32::from(*b) << shift;
            bytes_mask |= 0xff << shift;
        }
        let m = self.wmask[reg] & bytes_mask;
        self.regs[reg] = (self.regs[reg] & !m) | (val & m);
        self.bar_written(reg)
    }

    /// After a BAR register write: follow the new address unless the guest
    /// is probing the size (all ones written).
    fn bar_written(&mut self, reg: usize) -> Option<BarMove> {
        if !(BAR0..BAR0 + 6).contains(&reg) {
            return None;
        }
        let (index, bar) = self.bars.iter().enumerate().find_map(|(i, b)| {
            let b = (*b)?;
            let regs = BAR0 + i..=BAR0 + i + usize::from(b.is64);
            regs.contains(&reg).then_some((i, b))
        })?;
        let lo = u64::from(self.regs[BAR0 + index] & 0xffff_fff0);
        let hi = if bar.is64 {
            u64::from(self.regs[BAR0 + index + 1])
        } else {
            0
        };
        let addr = (hi << 32) | lo;
        let probe = !(bar.size - 1) & if bar.is64 { u64::MAX } else { 0xffff_ffff } & !0xf;
        if addr == bar.addr || lo == probe & 0xffff_fff0 || addr == probe {
            return None;
        }
        self.bars[index] = Some(Bar { addr, ..bar });
        Some(BarMove {
            index,
            from: bar.addr,
            to: addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1042,
                revision: 1,
                class: 0x018000,
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            },
            0,
        )
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = cfg();
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
        assert_eq!(c.read(2) >> 8, 0x018000);
    }

    #[test]
    fn bar_size_probe_reads_back_the_size_mask() {
        let mut c = cfg();
        c.set_bar(0, 0x1_0000_0000, 0x10000, true);
        assert_eq!(c.write(4, 0, &[0xff; 4]), None);
        assert_eq!(c.write(5, 0, &[0xff; 4]), None);
        assert_eq!(c.read(4), 0xffff_0000 | BAR_MEM64);
        assert_eq!(c.read(5), 0xffff_ffff);
    }

    #[test]
    fn moving_a_bar_is_reported() {
        let mut c = cfg();
        c.set_bar(0, 0xc000_0000, 0x1000, false);
        let m = c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            m,
            Some(BarMove {
                index: 0,
                from: 0xc000_0000,
                to: 0xd000_0000
            })
        );
        assert_eq!(c.bar(0).unwrap().addr, 0xd000_0000);
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut c = cfg();
        let a = c.add_capability(0x09, &[16, 1, 0, 0], &[]);
        let b = c.add_capability(0x11, &[0, 0], &[0, 0xc0]);
        assert_eq!(c.read(0xd) & 0xff, a as u32);
        assert_ne!(c.read(1) & STATUS_CAP_LIST, 0);
        let mut next = [0u8];
        c.read_bytes(a + 1, &mut next);
        assert_eq!(next[0] as usize, b);
        c.write(b / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read(b / 4) >> 16, 0xc000);
    }

    #[test]
    fn restored_space_reads_back_every_dword() {
        let mut c = cfg();
        c.set_bar(0, 0xc000_0000, 0x1000, false);
        c.add_capability(0x11, &[0, 0], &[0, 0xc0]);
        c.write(1, 0, &[0x06]);
        c.write(0xf, 0, &[0x0b]);

        let r = PciConfig::restore(&c.state()).unwrap();

        assert!((0..CONFIG_DWORDS).all(|i| r.read(i) == c.read(i)));
        assert_eq!(r.state(), c.state());
    }

    #[test]
    fn restored_space_keeps_its_write_masks() {
        let c = cfg();
        let mut r = PciConfig::restore(&c.state()).unwrap();

        r.write(0, 0, &[0; 4]);
        r.write(1, 0, &[0xff, 0xff]);

        assert_eq!(r.read(0), 0x1042_1af4);
        assert_eq!(r.read(1) & 0xffff, COMMAND_WMASK);
    }

    #[test]
    fn restored_space_keeps_a_moved_bar_at_its_new_address() {
        let mut c = cfg();
        c.set_bar(0, 0xc000_0000, 0x1000, false);
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());

        let r = PciConfig::restore(&c.state()).unwrap();

        assert_eq!(r.bar(0).unwrap().addr, 0xd000_0000);
        assert_eq!(r.read(4), 0xd000_0000);
    }

    #[test]
    fn restored_space_finishes_a_size_probe_as_the_original_does() {
        let mut c = cfg();
        c.set_bar(0, 0x1_0000_0000, 0x10000, true);
        c.write(4, 0, &[0xff; 4]);
        c.write(5, 0, &[0xff; 4]);
        let mut r = PciConfig::restore(&c.state()).unwrap();
        let finish = |c: &mut PciConfig| {
            let probed = (c.read(4), c.read(5));
            let lo = c.write(4, 0, &0x2000_0000u32.to_le_bytes());
            let hi = c.write(5, 0, &1u32.to_le_bytes());
            (probed, lo, hi, c.bar(0))
        };

        let restored = finish(&mut r);

        assert_eq!(restored, finish(&mut c));
        assert_eq!(restored.0, (0xffff_0000 | BAR_MEM64, 0xffff_ffff));
        assert_eq!(restored.3.unwrap().addr, 0x1_2000_0000);
    }

    #[test]
    fn restored_space_takes_further_capabilities_after_the_last() {
        let mut c = cfg();
        let a = c.add_capability(0x09, &[16, 1, 0, 0], &[]);
        let mut r = PciConfig::restore(&c.state()).unwrap();

        let b = r.add_capability(0x11, &[0, 0], &[]);

        let mut next = [0u8];
        r.read_bytes(a + 1, &mut next);
        assert_eq!(next[0] as usize, b);
    }

    #[test]
    fn saved_space_of_the_wrong_size_is_refused() {
        let mut state = cfg().state();
        state.regs.truncate(64);

        let err = PciConfig::restore(&state).err();

        assert_eq!(err, Some(PciConfigError::Size(64)));
    }

    #[test]
    fn saved_bar_of_size_zero_is_refused() {
        let mut state = cfg().state();
        state.bars[2] = Some(Bar {
            addr: 0,
            size: 0,
            is64: false,
        });

        let err = PciConfig::restore(&state).err();

        assert_eq!(err, Some(PciConfigError::BarSize(2)));
    }

    #[test]
    fn state_of_another_function_fails_the_identity_check() {
        let other = PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1041,
                revision: 1,
                class: 0x020000,
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            },
            0,
        );

        let err = cfg().check_identity(&other.state()).err();

        assert_eq!(
            err,
            Some(PciConfigError::Identity {
                saved: 0x1041_1af4,
                expected: 0x1042_1af4
            })
        );
    }
}
