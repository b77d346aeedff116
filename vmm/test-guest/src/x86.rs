//! Thin wrappers over the privileged instructions the guest uses.

use core::arch::asm;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the guest owns the machine.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", out("al") val, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    val
}

/// Writes a dword to an I/O port.
#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let val: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") val, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    val
}

/// Volatile 8-bit read of an identity-mapped physical address.
#[inline(always)]
pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: callers pass identity-mapped MMIO or RAM addresses.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Volatile 8-bit write to an identity-mapped physical address.
#[inline(always)]
pub fn mmio_write8(addr: u64, val: u8) {
    // SAFETY: as in `mmio_read8`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, val) }
}

/// Volatile 16-bit read of an identity-mapped physical address.
#[inline(always)]
pub fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: callers pass identity-mapped, 2-byte aligned MMIO or RAM addresses.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Volatile 16-bit write to an identity-mapped physical address.
#[inline(always)]
pub fn mmio_write16(addr: u64, val: u16) {
    // SAFETY: as in `mmio_read16`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, val) }
}

/// Volatile 64-bit read of identity-mapped, 8-byte aligned RAM.
#[inline(always)]
pub fn ram_read64(addr: u64) -> u64 {
    // SAFETY: callers pass identity-mapped, 8-byte aligned RAM addresses.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Volatile 64-bit write to identity-mapped, 8-byte aligned RAM.
#[inline(always)]
pub fn ram_write64(addr: u64, val: u64) {
    // SAFETY: as in `ram_read64`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, val) }
}

/// Volatile 32-bit read of an identity-mapped physical address.
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: callers pass identity-mapped, 4-byte aligned MMIO or RAM addresses.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Volatile 32-bit write to an identity-mapped physical address.
#[inline(always)]
pub fn mmio_write32(addr: u64, val: u32) {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `pause` (spin-loop hint).
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Loads CR3.
///
/// # Safety
/// `pml4` must be a valid top-level table that maps the running code and stack.
#[inline(always)]
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) }
}

/// Reads CR3.
#[inline(always)]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reads CR2 (page-fault address).
#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// `sti; hlt; cli`: wait for one interrupt with interrupts enabled only around the halt.
#[inline(always)]
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is loaded before this is called; handlers preserve all registers.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
}

/// Powers the machine off (ACPI S5, else the i8042 reset line), then
/// halts forever.
pub fn power_off() -> ! {
    if HOLD.load(core::sync::atomic::Ordering::Relaxed) {
        crate::serial::puts_raw("TG: HOLD\n");
        halt_forever();
    }
    // ACPI S5: SLP_TYP 5 with SLP_EN in the FADT's sleep control register.
    outb(0x600, (5 << 2) | (1 << 5));
    // A VMM without that register: reset through the i8042 instead.
    outb(0x64, 0xFE);
    loop {
        // SAFETY: halting with interrupts off just stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Resets the machine through the i8042 reset line (a reboot).
pub fn reset() -> ! {
    outb(0x64, 0xFE);
    loop {
        // SAFETY: halting with interrupts off just stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Set by `tg.hold` on the command line: stay up, idle, instead of powering
/// off (for measuring a running VMM, or stopping it from outside).
pub static HOLD: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Triple-faults this CPU: an empty IDT, then a #GP from a non-canonical
/// load, which cannot be delivered (#GP -> #DF -> shutdown).
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct Empty {
        limit: u16,
        base: u64,
    }
    let empty = Empty { limit: 0, base: 0 };
    // SAFETY: deliberately makes this CPU unrecoverable; nothing runs after.
    unsafe {
        asm!(
            "lidt [{e}]",
            "mov rax, [{bad}]",
            e = in(reg) &empty,
            bad = in(reg) 0x8000_0000_0000_0000u64,
            out("rax") _,
            options(nostack),
        )
    }
    halt_forever()
}

/// Halts this CPU forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: as in `power_off`.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
