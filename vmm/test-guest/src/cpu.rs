//! Descriptor tables, page tables, LAPIC/IOAPIC access and the exception handler.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::serial;
use crate::x86::{self, cpuid, mmio_read32, mmio_write32};

pub const LAPIC_BASE: u64 = 0xFEE0_0000;
pub const LAPIC_ID: u64 = LAPIC_BASE + 0x20;
pub const LAPIC_TPR: u64 = LAPIC_BASE + 0x80;
pub const LAPIC_SVR: u64 = LAPIC_BASE + 0xF0;
pub const LAPIC_ICR_LO: u64 = LAPIC_BASE + 0x300;
pub const LAPIC_ICR_HI: u64 = LAPIC_BASE + 0x310;
pub const LAPIC_LVT_TIMER: u64 = LAPIC_BASE + 0x320;
pub const LAPIC_TIMER_INIT: u64 = LAPIC_BASE + 0x380;
pub const LAPIC_TIMER_DIV: u64 = LAPIC_BASE + 0x3E0;
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;

pub const VEC_SERIAL: u8 = 0x24;
pub const VEC_TIMER: u8 = 0x28;
pub const VEC_SPURIOUS: u8 = 0x2F;
/// First MSI-X vector (virtio.rs); each has its own counting stub in asm.rs.
pub const VEC_MSIX_BASE: u8 = 0x40;
pub const MSIX_VECTORS: usize = 32;
/// Vectors 0..IDT_ENTRIES are described; anything above raises #GP.
const IDT_ENTRIES: usize = VEC_MSIX_BASE as usize + MSIX_VECTORS;

/// A page-aligned cell written only by the BSP before the APs start.
#[repr(C, align(4096))]
pub struct Page<T>(UnsafeCell<T>);
// SAFETY: written by the BSP alone, before any other CPU runs; read-only afterwards.
unsafe impl<T> Sync for Page<T> {}
impl<T> Page<T> {
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

static IDT: Page<[u64; IDT_ENTRIES * 2]> = Page::new([0; IDT_ENTRIES * 2]);

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

extern "C" {
    static gdt_ptr: u8;
    static exc_stub_table: [u64; 32];
    static msix_stub_table: [u64; MSIX_VECTORS];
    fn reload_segments();
    fn irq_serial();
    fn irq_other();
    fn irq_spurious();
}

fn gate(handler: u64) -> (u64, u64) {
    let lo =
        (handler & 0xFFFF) | (0x10 << 16) | (0x8E00 << 32) | (((handler >> 16) & 0xFFFF) << 48);
    (lo, handler >> 32)
}

/// Loads our GDT (same selectors as the Linux boot GDT) and reloads the segments.
pub fn load_gdt() {
    // SAFETY: gdt_ptr describes the static GDT in asm.rs whose 0x10/0x18 entries are
    // flat 64-bit code and data, so reloading CS/DS keeps addressing unchanged.
    unsafe {
        asm!("lgdt [{}]", in(reg) core::ptr::addr_of!(gdt_ptr), options(nostack, readonly));
        reload_segments();
    }
}

/// Builds the IDT (BSP only).
pub fn build_idt() {
    let idt = IDT.get();
    // SAFETY: the table is immutable data emitted in asm.rs.
    let stubs = unsafe { &exc_stub_table };
    // SAFETY: as above.
    let msix = unsafe { &msix_stub_table };
    let msix_base = VEC_MSIX_BASE as usize;
    for v in 0..IDT_ENTRIES {
        let h = if v < stubs.len() {
            stubs[v]
        } else if v >= msix_base {
            msix[v - msix_base]
        } else if v == VEC_SERIAL as usize {
            irq_serial as *const () as u64
        } else if v == VEC_SPURIOUS as usize {
            irq_spurious as *const () as u64
        } else {
            irq_other as *const () as u64
        };
        let (lo, hi) = gate(h);
        // SAFETY: only the BSP writes the IDT, before loading it anywhere else.
        unsafe {
            (*idt)[v * 2] = lo;
            (*idt)[v * 2 + 1] = hi;
        }
    }
}

/// Loads the IDT on this CPU.
pub fn load_idt() {
    let ptr = DescPtr {
        limit: (IDT_ENTRIES * 16 - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: the IDT was built by `build_idt` and lives forever.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(nostack, readonly)) }
}

/// Frame pushed by the exception stubs.
#[repr(C)]
pub struct ExcFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
}

#[no_mangle]
extern "C" fn exception_handler(f: &ExcFrame) -> ! {
    let id = mmio_read32(LAPIC_ID) >> 24;
    serial::puts_raw("TG: FAIL exception ");
    // Print without the lock: the faulting CPU may hold it.
    let mut o = serial::Out::unlocked();
    o.dec(f.vector)
        .s(" err=")
        .hex(f.error)
        .s(" rip=")
        .hex(f.rip)
        .s(" cr2=")
        .hex(x86::read_cr2())
        .s(" cpu=")
        .dec(u64::from(id))
        .nl();
    x86::power_off()
}

// ---------------------------------------------------------------------------
// Page tables.

/// 2 MiB-page fallback covers up to this many GiB.
const MAX_PD_GIB: usize = 16;
/// One PDPT of 1 GiB pages covers 512 GiB.
const MAX_1G_GIB: usize = 512;

static PML4: Page<[u64; 512]> = Page::new([0; 512]);
static PDPT: Page<[u64; 512]> = Page::new([0; 512]);
static PDS: Page<[[u64; 512]; MAX_PD_GIB]> = Page::new([[0; 512]; MAX_PD_GIB]);
/// Spare table pages for `map_mmio` (PDPTs above 512 GiB, or PDs without 1 GiB pages).
const EXTRA_TABLES: usize = 4;
static EXTRA: Page<[[u64; 512]; EXTRA_TABLES]> = Page::new([[0; 512]; EXTRA_TABLES]);
static EXTRA_USED: AtomicUsize = AtomicUsize::new(0);
static HUGE: AtomicBool = AtomicBool::new(false);

/// Builds identity page tables covering `[0, max(limit, 4 GiB))` and loads them.
/// Returns (bytes mapped, whether 1 GiB pages were used).
pub fn setup_paging(limit: u64) -> (u64, bool) {
    const GIB: u64 = 1 << 30;
    const PRESENT_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    const PCD_PWT: u64 = 0x18;
    let want = limit.max(4 * GIB).div_ceil(GIB) as usize;
    let (_, _, _, edx) = cpuid(0x8000_0001, 0);
    let huge = cpuid(0x8000_0000, 0).0 >= 0x8000_0001 && edx & (1 << 26) != 0;
    let pdpt = PDPT.get();
    let gibs;
    // SAFETY: the BSP builds these tables before any AP runs; no other references exist.
    unsafe {
        if huge {
            gibs = want.min(MAX_1G_GIB);
            for i in 0..gibs {
                let uc = if i == 3 { PCD_PWT } else { 0 };
                (*pdpt)[i] = ((i as u64) * GIB) | PRESENT_RW | PS | uc;
            }
        } else {
            gibs = want.min(MAX_PD_GIB);
            let pds = PDS.get();
            for i in 0..gibs {
                let uc = if i == 3 { PCD_PWT } else { 0 };
                let base = ((i as u64) * GIB) | PRESENT_RW | PS | uc;
                let pd = &mut (*pds)[i];
                for (j, e) in pd.iter_mut().enumerate() {
                    *e = base + ((j as u64) << 21);
                }
                (*pdpt)[i] = pd.as_ptr() as u64 | PRESENT_RW;
            }
        }
        (*PML4.get())[0] = pdpt as u64 | PRESENT_RW;
        x86::write_cr3(PML4.get() as u64);
    }
    HUGE.store(huge, Ordering::Relaxed);
    (gibs as u64 * GIB, huge)
}

/// Identity-maps, uncached, every 1 GiB slot of `[addr, addr + len)` that is
/// not mapped yet (device BARs above RAM). Returns false when the address is
/// beyond 48 bits or the spare table pages run out.
pub fn map_mmio(addr: u64, len: u64) -> bool {
    const GIB: u64 = 1 << 30;
    const PRESENT_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    const PCD_PWT: u64 = 0x18;
    const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
    let end = addr.saturating_add(len.max(1));
    if end > 1 << 47 {
        return false;
    }
    let huge = HUGE.load(Ordering::Relaxed);
    let alloc = || -> Option<*mut [u64; 512]> {
        let i = EXTRA_USED.fetch_add(1, Ordering::Relaxed);
        // Page i of EXTRA is handed out once; it is zeroed static memory.
        (i < EXTRA_TABLES).then(|| EXTRA.get().cast::<[u64; 512]>().wrapping_add(i))
    };
    let mut a = addr & !(GIB - 1);
    let mut changed = false;
    // SAFETY: only the BSP edits the tables; the APs are parked in `cli; hlt`
    // and never touch these addresses. Present entries are never changed.
    unsafe {
        let pml4 = PML4.get();
        while a < end {
            let i4 = ((a >> 39) & 511) as usize;
            if (*pml4)[i4] & 1 == 0 {
                let Some(t) = alloc() else { return false };
                (*pml4)[i4] = t as u64 | PRESENT_RW;
            }
            let pdpt = ((*pml4)[i4] & ADDR) as *mut [u64; 512];
            let i3 = ((a >> 30) & 511) as usize;
            if (*pdpt)[i3] & 1 == 0 {
                if huge {
                    (*pdpt)[i3] = a | PRESENT_RW | PS | PCD_PWT;
                } else {
                    let Some(pd) = alloc() else { return false };
                    for (j, e) in (*pd).iter_mut().enumerate() {
                        *e = (a + ((j as u64) << 21)) | PRESENT_RW | PS | PCD_PWT;
                    }
                    (*pdpt)[i3] = pd as u64 | PRESENT_RW;
                }
                changed = true;
            }
            a += GIB;
        }
        if changed {
            x86::write_cr3(x86::read_cr3());
        }
    }
    true
}

// ---------------------------------------------------------------------------
// LAPIC / IOAPIC.

pub fn lapic_id() -> u32 {
    mmio_read32(LAPIC_ID) >> 24
}

pub fn lapic_enable() {
    mmio_write32(LAPIC_TPR, 0);
    mmio_write32(LAPIC_SVR, 0x100 | u32::from(VEC_SPURIOUS));
}

/// Arms a one-shot LAPIC timer (vector VEC_TIMER) so that a `hlt` cannot hang.
pub fn lapic_timer_oneshot(count: u32) {
    mmio_write32(LAPIC_TIMER_DIV, 0xB); // divide by 1
    mmio_write32(LAPIC_LVT_TIMER, u32::from(VEC_TIMER));
    mmio_write32(LAPIC_TIMER_INIT, count);
}

pub fn lapic_timer_stop() {
    mmio_write32(LAPIC_TIMER_INIT, 0);
    mmio_write32(LAPIC_LVT_TIMER, 1 << 16);
}

/// Sends an IPI; waits (bounded) for the delivery-status bit to clear.
pub fn lapic_ipi(dest: u32, low: u32) {
    mmio_write32(LAPIC_ICR_HI, dest << 24);
    mmio_write32(LAPIC_ICR_LO, low);
    let mut tries = 0;
    while mmio_read32(LAPIC_ICR_LO) & (1 << 12) != 0 && tries < 1000 {
        x86::pause();
        tries += 1;
    }
}

pub fn ioapic_write(reg: u32, val: u32) {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, val);
}

/// Programs IOAPIC redirection entry `pin`: fixed, physical, edge, active high.
pub fn ioapic_route(pin: u32, vector: u8, dest: u32, masked: bool) {
    ioapic_write(0x11 + 2 * pin, dest << 24);
    ioapic_write(
        0x10 + 2 * pin,
        u32::from(vector) | if masked { 1 << 16 } else { 0 },
    );
}
