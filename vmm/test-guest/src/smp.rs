//! MP table discovery and AP start-up by INIT/SIPI/SIPI.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpu::{self, Page};
use crate::serial::{self, out};
use crate::x86::{self, cpuid, rdtsc};

/// Where the trampoline is copied; the SIPI vector is this >> 12.
pub const TRAMPOLINE_BASE: usize = 0x30000;
pub const MAX_APS: usize = 63;
pub const AP_STACK_SIZE: usize = 8192;

/// How many APs entered 64-bit code (also their stack index).
#[no_mangle]
static AP_STARTED: AtomicU32 = AtomicU32::new(0);
/// How many APs reported in.
static AP_UP: AtomicU32 = AtomicU32::new(0);
/// How many APs saw a CPUID/LAPIC ID mismatch.
static AP_BAD: AtomicU32 = AtomicU32::new(0);

#[no_mangle]
static AP_STACKS: Page<[[u8; AP_STACK_SIZE]; MAX_APS]> = Page::new([[0; AP_STACK_SIZE]; MAX_APS]);

extern "C" {
    static tramp_start: u8;
    static tramp_data: u8;
    static tramp_end: u8;
    static gdt_ptr: [u8; 10];
    fn ap_entry64();
}

fn rd8(a: u64) -> u8 {
    // SAFETY: reads of identity-mapped low memory / BIOS area.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    // SAFETY: as in rd8.
    unsafe { core::ptr::read_unaligned(a as *const u16) }
}
fn rd32(a: u64) -> u32 {
    // SAFETY: as in rd8.
    unsafe { core::ptr::read_unaligned(a as *const u32) }
}

fn sum(addr: u64, len: u64) -> u8 {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(rd8(addr + i));
    }
    s
}

/// Scans `[start, end)` on 16-byte boundaries for a valid "_MP_" floating pointer.
fn scan(start: u64, end: u64) -> Option<u64> {
    let mut a = start;
    while a + 16 <= end {
        if rd32(a) == 0x5F50_4D5F && sum(a, 16) == 0 {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn find_mp() -> Option<u64> {
    let ebda = u64::from(rd16(0x40E)) << 4;
    let fp = scan(0x9FC00, 0xA0000)
        .or_else(|| {
            if (0x80000..0xA0000).contains(&ebda) && ebda != 0x9FC00 {
                scan(ebda, ebda + 1024)
            } else {
                None
            }
        })
        .or_else(|| scan(0xF0000, 0x100000))?;
    let table = u64::from(rd32(fp + 4));
    if table == 0 || rd32(table) != 0x504D_4350 {
        // "PCMP" missing (or a default configuration): treat as no table.
        return None;
    }
    Some(table)
}

/// Enabled processor entries of the MP configuration table; returns how many.
/// Walks by the base table length (some tables leave the entry count 0).
fn processors(table: u64, ids: &mut [u8; MAX_APS + 1]) -> usize {
    let end = table + u64::from(rd16(table + 4));
    let mut p = table + 0x2C;
    let mut n = 0;
    while p < end {
        match rd8(p) {
            0 => {
                if rd8(p + 3) & 1 != 0 && n < ids.len() {
                    ids[n] = rd8(p + 1);
                    n += 1;
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break,
        }
    }
    n
}

fn tsc_hz() -> u64 {
    let max = cpuid(0, 0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return u64::from(crystal) * u64::from(num) / u64::from(den);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).0 & 0xFFFF;
        if mhz != 0 {
            return u64::from(mhz) * 1_000_000;
        }
    }
    3_000_000_000
}

fn delay(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        x86::pause();
    }
}

fn copy_trampoline() {
    let cr3 = x86::read_cr3();
    // SAFETY: [tramp_start, tramp_end) is the assembled trampoline (a few hundred bytes);
    // 0x30000.. is RAM reserved for it by the boot contract, unused by anything else.
    unsafe {
        let src = core::ptr::addr_of!(tramp_start);
        let len = core::ptr::addr_of!(tramp_end) as usize - src as usize;
        let dst = TRAMPOLINE_BASE as *mut u8;
        core::ptr::copy_nonoverlapping(src, dst, len);
        let data = dst.add(core::ptr::addr_of!(tramp_data) as usize - src as usize);
        // gdtr: limit u16 + base u32 (the GDT is below 4 GiB).
        let gp = core::ptr::addr_of!(gdt_ptr) as *const u8;
        core::ptr::copy_nonoverlapping(gp, data, 6);
        core::ptr::write_unaligned(data.add(8) as *mut u32, cr3 as u32);
        core::ptr::write_unaligned(data.add(16) as *mut u64, ap_entry64 as *const () as u64);
    }
}

/// Starts every AP listed in the MP table and waits for each to report in.
/// Returns Ok(None) without an MP table, Ok(Some(cpus)) when all reported in,
/// Err((up, total)) otherwise.
pub fn start_aps(bsp: u32) -> Result<Option<u32>, (u32, u32)> {
    let Some(table) = find_mp() else {
        return Ok(None);
    };
    let mut ids = [0u8; MAX_APS + 1];
    let n = processors(table, &mut ids);
    out()
        .s("TG: mp table ")
        .hex(table)
        .s(" processors=")
        .dec(n as u64)
        .nl();
    let mut aps = [0u8; MAX_APS];
    let mut naps = 0;
    for &id in &ids[..n] {
        if u32::from(id) != bsp && naps < MAX_APS {
            aps[naps] = id;
            naps += 1;
        }
    }
    if naps > 0 {
        copy_trampoline();
        let hz = tsc_hz();
        for &id in &aps[..naps] {
            cpu::lapic_ipi(u32::from(id), 0x4500); // INIT, level assert
        }
        // Modern CPUs (and KVM) need no 10 ms INIT-to-SIPI wait; Linux skips it too.
        delay(hz / 1000);
        let sipi = 0x4600 | (TRAMPOLINE_BASE >> 12) as u32;
        for &id in &aps[..naps] {
            cpu::lapic_ipi(u32::from(id), sipi);
        }
        delay(hz / 5000);
        for &id in &aps[..naps] {
            cpu::lapic_ipi(u32::from(id), sipi);
        }
        let start = rdtsc();
        while (AP_UP.load(Ordering::Acquire) as usize) < naps
            && rdtsc().wrapping_sub(start) < 2 * hz
        {
            x86::pause();
        }
    }
    let up = AP_UP.load(Ordering::Acquire) + 1;
    let total = naps as u32 + 1;
    if up != total || AP_BAD.load(Ordering::Acquire) != 0 {
        return Err((up, total));
    }
    Ok(Some(total))
}

/// 64-bit AP main, called by `ap_entry64` on the AP's own stack.
#[no_mangle]
extern "C" fn ap_main() -> ! {
    cpu::load_idt();
    let lapic = cpu::lapic_id();
    let apic = cpuid(1, 0).1 >> 24;
    {
        let mut o = serial::out();
        o.s("TG: cpu ").dec(u64::from(lapic)).s(" up").nl();
        if apic != lapic {
            o.s("TG: FAIL cpu ")
                .dec(u64::from(lapic))
                .s(" cpuid apic=")
                .dec(u64::from(apic))
                .nl();
            AP_BAD.fetch_add(1, Ordering::AcqRel);
        }
    }
    AP_UP.fetch_add(1, Ordering::AcqRel);
    x86::halt_forever()
}
