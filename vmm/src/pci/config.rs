//! A type-0 PCI configuration space: read-only identity, writable command
//! and BARs (with size probing), a capability list, 4 KiB so that ECAM sees
//! the extended space too.

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

/// The place of a BAR in guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}
