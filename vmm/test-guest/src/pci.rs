//! PCI bus 0: configuration mechanism #1 (ports 0xCF8/0xCFC, 32-bit accesses),
//! ECAM found through the ACPI MCFG table, and BAR discovery/assignment.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::serial::out;
use crate::x86::{inl, mmio_read32, mmio_read8, mmio_write32, outl};
use crate::{cpu, fail};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

pub const CMD_MEM: u32 = 1 << 1;
pub const CMD_MASTER: u32 = 1 << 2;
pub const CMD_INTX_OFF: u32 = 1 << 10;

/// Bus/device/function.
#[derive(Clone, Copy, Default)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// Prints `BB:DD.F`.
    pub fn print(self, o: &mut crate::serial::Out) {
        o.hexw(u64::from(self.bus), 2)
            .s(":")
            .hexw(u64::from(self.dev), 2)
            .s(".")
            .hexw(u64::from(self.func), 1);
    }
}

/// One present function.
#[derive(Clone, Copy, Default)]
pub struct Func {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass, prog-if (24 bits).
    pub class: u32,
}

pub const MAX_FUNCS: usize = 64;

/// The functions found on bus 0.
pub struct Bus {
    pub funcs: [Func; MAX_FUNCS],
    pub n: usize,
}

fn address(d: Bdf, off: u8) -> u32 {
    0x8000_0000
        | (u32::from(d.bus) << 16)
        | (u32::from(d.dev & 31) << 11)
        | (u32::from(d.func & 7) << 8)
        | u32::from(off & 0xFC)
}

/// Configuration access: 0 = mechanism #1, else the ECAM base of bus 0
/// (used for everything when mechanism #1 finds no device).
static ECAM_ONLY: AtomicU64 = AtomicU64::new(0);

fn ecam_addr(base: u64, d: Bdf, off: u8) -> u64 {
    base + (u64::from(d.bus) << 20)
        + (u64::from(d.dev & 31) << 15)
        + (u64::from(d.func & 7) << 12)
        + u64::from(off & 0xFC)
}

pub fn read32(d: Bdf, off: u8) -> u32 {
    match ECAM_ONLY.load(Ordering::Relaxed) {
        0 => {
            outl(CONFIG_ADDRESS, address(d, off));
            inl(CONFIG_DATA)
        }
        base => mmio_read32(ecam_addr(base, d, off)),
    }
}

pub fn write32(d: Bdf, off: u8, v: u32) {
    match ECAM_ONLY.load(Ordering::Relaxed) {
        0 => {
            outl(CONFIG_ADDRESS, address(d, off));
            outl(CONFIG_DATA, v);
        }
        base => mmio_write32(ecam_addr(base, d, off), v),
    }
}

pub fn read16(d: Bdf, off: u8) -> u16 {
    (read32(d, off & !3) >> ((off & 2) * 8)) as u16
}

pub fn read8(d: Bdf, off: u8) -> u8 {
    (read32(d, off & !3) >> ((off & 3) * 8)) as u8
}

/// Sets bits in the command register (the status half is written as 0: its
/// bits are write-1-to-clear).
pub fn command_set(d: Bdf, set: u32, clear: u32) {
    let cmd = read32(d, 0x04) & 0xFFFF;
    write32(d, 0x04, (cmd | set) & !clear);
}

/// Vendor/device dword of an empty slot: all ones normally; 0 or a half of
/// ones are treated the same (as Linux does), so a host that reads unclaimed
/// ports as 0 shows no devices.
fn absent(id: u32) -> bool {
    matches!(id, 0xFFFF_FFFF | 0 | 0x0000_FFFF | 0xFFFF_0000)
}

/// Enumerates bus 0 and prints `TG: pci BB:DD.F VVVV:DDDD class=CCCCCC` per function.
pub fn enumerate() -> Bus {
    let mut bus = Bus {
        funcs: [Func::default(); MAX_FUNCS],
        n: 0,
    };
    for dev in 0..32u8 {
        let d0 = Bdf {
            bus: 0,
            dev,
            func: 0,
        };
        if read32(d0, 0) & 0xFFFF == 0xFFFF {
            continue;
        }
        let nfunc = if read8(d0, 0x0E) & 0x80 != 0 { 8 } else { 1 };
        for func in 0..nfunc {
            let bdf = Bdf { bus: 0, dev, func };
            let id = read32(bdf, 0);
            if absent(id) {
                continue;
            }
            let f = Func {
                bdf,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class: read32(bdf, 0x08) >> 8,
            };
            let mut o = out();
            o.s("TG: pci ");
            bdf.print(&mut o);
            o.s(" ")
                .hexw(u64::from(f.vendor), 4)
                .s(":")
                .hexw(u64::from(f.device), 4)
                .s(" class=")
                .hexw(u64::from(f.class), 6)
                .nl();
            drop(o);
            if bus.n < MAX_FUNCS {
                bus.funcs[bus.n] = f;
                bus.n += 1;
            }
        }
    }
    bus
}

// ---------------------------------------------------------------------------
// ACPI: RSDP -> XSDT/RSDT -> MCFG.

fn rd32(a: u64) -> u32 {
    // SAFETY: ACPI tables and the BIOS area are identity-mapped memory; the
    // read may be unaligned.
    unsafe { core::ptr::read_unaligned(a as *const u32) }
}

fn rd64(a: u64) -> u64 {
    // SAFETY: as in rd32.
    unsafe { core::ptr::read_unaligned(a as *const u64) }
}

fn checksum(a: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(mmio_read8(a + i)))
}

fn is_rsdp(a: u64) -> bool {
    rd64(a) == u64::from_le_bytes(*b"RSD PTR ") && checksum(a, 20) == 0
}

fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && hint < 1 << 32 && is_rsdp(hint) {
        return Some(hint);
    }
    let ebda = u64::from(crate::x86::mmio_read16(0x40E)) << 4;
    let mut ranges = [(0xE0000u64, 0x100000u64), (0, 0)];
    if (0x80000..0xA0000).contains(&ebda) {
        ranges[1] = (ebda, ebda + 1024);
    }
    for (lo, hi) in ranges {
        let mut a = lo;
        while a + 20 <= hi {
            if is_rsdp(a) {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

/// Returns the address of the ACPI table with `sig`, if any.
fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    let want = u32::from_le_bytes(*sig);
    let rev = mmio_read8(rsdp + 15);
    let xsdt = if rev >= 2 { rd64(rsdp + 24) } else { 0 };
    let (root, entry, rsig) = if xsdt != 0 {
        (xsdt, 8, b"XSDT")
    } else {
        (u64::from(rd32(rsdp + 16)), 4, b"RSDT")
    };
    if root == 0 || rd32(root) != u32::from_le_bytes(*rsig) {
        return None;
    }
    let len = u64::from(rd32(root + 4)).min(4096);
    let mut p = root + 36;
    while p + entry <= root + len {
        let t = if entry == 8 {
            rd64(p)
        } else {
            u64::from(rd32(p))
        };
        if t != 0 && rd32(t) == want {
            return Some(t);
        }
        p += entry;
    }
    None
}

/// ECAM window for bus 0 from the MCFG table: (base of bus 0).
/// Returns (base, length) of the bus 0.. window.
pub fn find_ecam(rsdp_hint: u64) -> Option<(u64, u64)> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let mcfg = find_table(rsdp, b"MCFG")?;
    let len = u64::from(rd32(mcfg + 4));
    if !(44..=4096).contains(&len) || checksum(mcfg, len) != 0 {
        fail("mcfg checksum");
    }
    let mut p = mcfg + 44;
    while p + 16 <= mcfg + len {
        let base = rd64(p);
        let seg = crate::x86::mmio_read16(p + 8);
        let start = mmio_read8(p + 10);
        let end = mmio_read8(p + 11);
        if seg == 0 && start == 0 {
            return Some((base, (u64::from(end) + 1) << 20));
        }
        p += 16;
    }
    None
}

/// Enumerates bus 0: mechanism #1, or only ECAM (at `ecam`, from MCFG or
/// `tg.ecam=`) when mechanism #1 finds nothing; in the first case each
/// function's ID is read back through ECAM and compared.
pub fn scan(ecam: Option<(u64, u64)>) -> Bus {
    if let Some((base, len)) = ecam {
        if !cpu::map_mmio(base, 1 << 20) {
            fail("ecam not mappable");
        }
        // BARs the guest assigns must not land on the ECAM window.
        ECAM_RESERVED.store(base, Ordering::Relaxed);
        ECAM_RESERVED_LEN.store(len, Ordering::Relaxed);
    }
    let ecam = ecam.map(|(base, _)| base);
    let bus = enumerate();
    match ecam {
        Some(base) if bus.n == 0 => {
            out()
                .s("TG: pci no devices via 0xcf8, using ecam ")
                .hex(base)
                .nl();
            ECAM_ONLY.store(base, Ordering::Relaxed);
            enumerate()
        }
        Some(base) => {
            check_ecam(&bus, base);
            bus
        }
        None => {
            crate::serial::line("TG: ecam none");
            bus
        }
    }
}

/// Reads each function's ID through ECAM and compares with mechanism #1.
fn check_ecam(bus: &Bus, base: u64) {
    for f in &bus.funcs[..bus.n] {
        let id = mmio_read32(ecam_addr(base, f.bdf, 0));
        let want = u32::from(f.vendor) | (u32::from(f.device) << 16);
        if id != want {
            let mut o = out();
            o.s("TG: FAIL ecam ");
            f.bdf.print(&mut o);
            o.s(" read ").hex(u64::from(id)).s(" base=").hex(base).nl();
            drop(o);
            crate::x86::power_off();
        }
    }
    crate::serial::line("TG: ecam ok");
}

// ---------------------------------------------------------------------------
// BARs.

/// Next free address of the window used for BARs the guest assigns itself
/// (`tg.barbase=` moves it).
static NEXT_BAR: AtomicU64 = AtomicU64::new(0xE000_0000);

/// The ECAM window, skipped by the BAR allocator.
static ECAM_RESERVED: AtomicU64 = AtomicU64::new(0);
static ECAM_RESERVED_LEN: AtomicU64 = AtomicU64::new(0);

pub fn set_bar_base(base: u64) {
    NEXT_BAR.store(base, Ordering::Relaxed);
}
const BAR_WINDOW_END: u64 = 0xFEC0_0000;

/// Returns the address of memory BAR `idx`; assigns it from the window at
/// 0xE0000000 when it reads 0 (or when `force`). Enables memory decoding and
/// bus mastering.
pub fn bar_address(d: Bdf, idx: u8, force: bool) -> Result<u64, &'static str> {
    if idx > 5 {
        return Err("bar index");
    }
    let off = 0x10 + 4 * idx;
    let lo = read32(d, off);
    if lo & 1 != 0 {
        return Err("io bar");
    }
    let is64 = (lo >> 1) & 3 == 2;
    if is64 && idx == 5 {
        return Err("64-bit bar 5");
    }
    let hi = if is64 { read32(d, off + 4) } else { 0 };
    let addr = (u64::from(hi) << 32) | u64::from(lo & !0xF);
    if addr != 0 && !force {
        command_set(d, CMD_MEM | CMD_MASTER, 0);
        return Ok(addr);
    }
    // Size it with decoding off.
    command_set(d, 0, CMD_MEM);
    write32(d, off, 0xFFFF_FFFF);
    let mlo = read32(d, off) & !0xF;
    let mhi = if is64 {
        write32(d, off + 4, 0xFFFF_FFFF);
        read32(d, off + 4)
    } else {
        0xFFFF_FFFF
    };
    let mask = (u64::from(mhi) << 32) | u64::from(mlo);
    let size = (!mask).wrapping_add(1);
    if mlo == 0 || size == 0 || size > 1 << 28 {
        return Err("bar size");
    }
    let mut base = NEXT_BAR.load(Ordering::Relaxed).next_multiple_of(size);
    let (rb, rl) = (
        ECAM_RESERVED.load(Ordering::Relaxed),
        ECAM_RESERVED_LEN.load(Ordering::Relaxed),
    );
    if rl != 0 && base < rb + rl && base + size > rb {
        base = (rb + rl).next_multiple_of(size);
    }
    if base + size > BAR_WINDOW_END {
        return Err("bar window full");
    }
    NEXT_BAR.store(base + size, Ordering::Relaxed);
    write32(d, off, (base as u32) | (lo & 0xF));
    if is64 {
        write32(d, off + 4, 0);
    }
    command_set(d, CMD_MEM | CMD_MASTER, 0);
    Ok(base)
}
