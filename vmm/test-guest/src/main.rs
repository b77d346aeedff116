//! Test guest for the VMM: checks the boot contract and the devices, prints
//! `TG: ...` lines on COM1 and powers off through the i8042. See README.md.
#![no_std]
#![no_main]

mod asm;
mod boot;
mod cpu;
mod pci;
mod serial;
mod smp;
mod vdev;
mod virtio;
mod x86;

use core::sync::atomic::{AtomicU32, Ordering};

use boot::{BootInfo, PROTO_LINUX};
use serial::{line, out};
use x86::{cpuid, inb, mmio_read32, outb};

/// Incremented by the serial interrupt handler (asm.rs).
#[no_mangle]
static SERIAL_IRQ_COUNT: AtomicU32 = AtomicU32::new(0);

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

const MIB: u64 = 1 << 20;
const E820_RAM: u32 = 1;
const DEBUGCON: u16 = 0xE9;
const UNASSIGNED_MMIO: u64 = 0xFEB0_0000;

/// Prints `TG: FAIL <what>` and powers off.
fn fail(what: &str) -> ! {
    out().s("TG: FAIL ").s(what).nl();
    x86::power_off()
}

#[no_mangle]
extern "C" fn tg_main(proto: u64, info: u64) -> ! {
    serial::puts_raw("TG: hello\n");
    cpu::load_gdt();
    cpu::build_idt();
    cpu::load_idt();

    let linux = proto == PROTO_LINUX;
    line(if linux {
        "TG: boot protocol=linux"
    } else {
        "TG: boot protocol=pvh"
    });
    if let Err(what) = boot::check_entry(proto, info) {
        fail(what);
    }
    let bi = boot::parse(proto, info);
    out().s("TG: cmdline=").bytes(bi.cmdline).nl();
    let has = |w: &[u8]| bi.cmdline.split(|b| *b == b' ').any(|t| t == w);
    let param = |p: &[u8]| {
        bi.cmdline
            .split(|b| *b == b' ')
            .find_map(|t| t.strip_prefix(p))
            .map(parse_num)
    };
    if has(b"tg.nommio") {
        NO_MMIO_CHECK.store(true, Ordering::Relaxed);
    }
    if has(b"tg.hold") {
        x86::HOLD.store(true, Ordering::Relaxed);
    }
    if has(b"tg.triplefault") {
        line("TG: triple fault");
        x86::triple_fault();
    }

    let top = memory_map(&bi);
    let (mapped, huge) = cpu::setup_paging(top);
    memory_test(&bi, mapped, huge);
    if has(b"tg.touch") {
        touch_pages(&bi);
    }

    let bsp = check_cpuid();
    io_exits();
    serial_irq(bsp);

    match smp::start_aps(bsp) {
        Ok(Some(n)) => {
            out().s("TG: cpus=").dec(u64::from(n)).nl();
        }
        Ok(None) => line("TG: cpus=1 (no mp table)"),
        Err((up, total)) => {
            out()
                .s("TG: FAIL smp ")
                .dec(u64::from(up))
                .s("/")
                .dec(u64::from(total))
                .nl();
            x86::power_off();
        }
    }

    if has(b"tg.virtio") {
        let opts = virtio::Opts {
            seed: param(b"tg.seed=").unwrap_or(1),
            burst: param(b"tg.blkburst=").unwrap_or(0),
            lat: param(b"tg.blklat=").unwrap_or(0),
            netrx: has(b"tg.netrx"),
            keep: has(b"tg.keepdev"),
            blkcount: has(b"tg.blkcount"),
            netcount: has(b"tg.netcount"),
            msixmask: has(b"tg.msixmask"),
            ecam: param(b"tg.ecam="),
            barbase: param(b"tg.barbase="),
            assign: has(b"tg.pciassign"),
            apic: bsp,
        };
        virtio::run(&opts, bi.rsdp);
    }

    line("TG: PASS");
    if has(b"tg.echo") {
        // Each poll is a VM exit (~10 us here): about 10 s by default.
        echo_line(param(b"tg.echowait=").unwrap_or(1_000_000));
    }
    if has(b"tg.count") {
        count_forever();
    }
    let tick = param(b"tg.tick=");
    if let Some(mib) = param(b"tg.dirty=") {
        dirty_forever(top, mib, tick);
    }
    if let Some(every) = tick {
        tick_forever(every);
    }
    if has(b"tg.reset") {
        line("TG: reset");
        x86::reset();
    }
    x86::power_off()
}

/// Words of memory `tg.count` rewrites each round.
const COUNT_WORDS: usize = 2048;
static mut COUNT_BUF: [u64; COUNT_WORDS] = [0; COUNT_WORDS];

/// The word `i` holds after round `round`.
fn count_word(round: u64, i: usize) -> u64 {
    (round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64)).rotate_left((i % 61) as u32)
}

/// `tg.count`: forever, checks that memory still holds the last round's
/// pattern, writes the next, and prints `TG: count N`. A VM restored from
/// a snapshot must go on from the saved round with its memory intact.
fn count_forever() -> ! {
    let mut round: u64 = 0;
    loop {
        let buf = core::ptr::addr_of_mut!(COUNT_BUF).cast::<u64>();
        for i in 0..COUNT_WORDS {
            let want = if round == 0 {
                0
            } else {
                count_word(round - 1, i)
            };
            // SAFETY: `i` < COUNT_WORDS, inside the static buffer, which
            // only this CPU touches.
            if unsafe { buf.add(i).read_volatile() } != want {
                out().s("TG: FAIL count memory round ").dec(round).nl();
                x86::power_off();
            }
            // SAFETY: as above.
            unsafe { buf.add(i).write_volatile(count_word(round, i)) };
        }
        out().s("TG: count ").dec(round).nl();
        round += 1;
    }
}

/// Where `tg.dirty` starts: above the image and the page tables.
const DIRTY_BASE: u64 = 16 * MIB;

/// `tg.dirty=MIB`: forever, rewrites one word in each 4 KiB page of `MIB`
/// MiB of RAM from 16 MiB, checking first that each page still holds the
/// last round's word, and prints `TG: dirty N` after each pass. A
/// migrated VM whose memory lost a dirty page fails the next pass.
/// With `tg.tick=T` it also prints a tick line (see [`Ticker`]) every `T`
/// pages, so the host sees any pause of the guest within a few hundred µs.
fn dirty_forever(top: u64, mib: u64, tick: Option<u64>) -> ! {
    const PAGE: u64 = 4096;
    let end = DIRTY_BASE + mib * MIB;
    if end > top {
        fail("tg.dirty beyond RAM");
    }
    let pages = mib * MIB / PAGE;
    let mut ticker = tick.map(Ticker::new);
    let mut round: u64 = 0;
    loop {
        for p in 0..pages {
            if let Some(t) = &mut ticker {
                t.step();
            }
            let a = (DIRTY_BASE + p * PAGE) as *mut u64;
            let want = if round == 0 {
                None
            } else {
                Some(count_word(round - 1, p as usize))
            };
            // SAFETY: `a` is page-aligned RAM below `top` (checked above),
            // identity mapped, above this image; only this CPU uses it.
            let got = unsafe { a.read_volatile() };
            if want.is_some_and(|w| w != got) {
                out()
                    .s("TG: FAIL dirty page ")
                    .hex(a as u64)
                    .s(" round ")
                    .dec(round)
                    .nl();
                x86::power_off();
            }
            // SAFETY: as above.
            unsafe { a.write_volatile(count_word(round, p as usize)) };
        }
        out().s("TG: dirty ").dec(round).nl();
        round += 1;
    }
}

/// Prints `t N` (N = 0, 1, 2, ...) once every `every` steps: a progress
/// line short enough (a VM exit per byte and per status poll) that the
/// host can time the guest's pauses, such as a migration's downtime, by
/// the gaps between lines. The guest's own clocks cannot: TSC and
/// kvm-clock are restored across a migration.
struct Ticker {
    every: u64,
    left: u64,
    n: u64,
}

impl Ticker {
    fn new(every: u64) -> Self {
        Self {
            every,
            left: every,
            n: 0,
        }
    }

    /// One unit of work done; prints when `every` of them are.
    fn step(&mut self) {
        if self.left > 1 {
            self.left -= 1;
            return;
        }
        self.left = self.every;
        out().s("t ").dec(self.n).nl();
        self.n += 1;
    }
}

/// `tg.tick=N` alone: an otherwise idle guest (it writes only its two
/// counters and the output lock) that prints a tick line every `N` turns
/// of an empty loop (`0` or `1`: back to back).
fn tick_forever(every: u64) -> ! {
    let mut ticker = Ticker::new(every);
    loop {
        ticker.step();
    }
}

/// Parses a decimal or `0x` hex number (stops at the first non-digit).
fn parse_num(s: &[u8]) -> u64 {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    digits
        .iter()
        .map_while(|&b| (b as char).to_digit(radix))
        .fold(0u64, |v, d| {
            v.wrapping_mul(u64::from(radix)).wrapping_add(u64::from(d))
        })
}

/// Reads one line of serial input and prints it back as `TG: got <line>`.
/// `tg.echo`: reads one line (waiting up to `polls` serial polls for each
/// byte) and prints it back.
fn echo_line(polls: u64) {
    line("TG: ready for input");
    let mut buf = [0u8; 64];
    let mut n = 0;
    while let Some(b) = serial::getc(polls) {
        if b == b'\n' || b == b'\r' || n == buf.len() {
            break;
        }
        buf[n] = b;
        n += 1;
    }
    out().s("TG: got ").bytes(&buf[..n]).nl();
}

/// Prints the memory map and the usable total; returns the highest RAM address.
fn memory_map(bi: &BootInfo) -> u64 {
    if bi.entries == 0 {
        fail("e820 empty");
    }
    let mut ram = 0u64;
    let mut top = 0u64;
    for i in 0..bi.entries {
        let e = bi.entry(i);
        let end = e.addr.wrapping_add(e.size);
        out()
            .s("TG: e820 ")
            .hex(e.addr)
            .s(" ")
            .hex(end)
            .s(" ")
            .dec(u64::from(e.kind))
            .nl();
        if e.kind == E820_RAM {
            ram += e.size;
            top = top.max(end);
        }
    }
    out().s("TG: ram=").dec(ram).nl();
    top
}

/// Writes and reads back the first and last 8 bytes of each usable region above
/// 1 MiB, outside the guest image.
fn memory_test(bi: &BootInfo, mapped: u64, huge: bool) {
    let img_lo = core::ptr::addr_of!(__image_start) as u64;
    let img_hi = core::ptr::addr_of!(__image_end) as u64;
    for i in 0..bi.entries {
        let e = bi.entry(i);
        if e.kind != E820_RAM {
            continue;
        }
        let end = (e.addr + e.size) & !7;
        let mut lo = (e.addr.max(MIB) + 7) & !7;
        if lo < img_hi && end > img_lo {
            lo = lo.max(img_hi);
        }
        if lo + 8 > end {
            continue;
        }
        if end > mapped {
            out()
                .s("TG: FAIL memory not mapped ")
                .hex(end)
                .s(if huge { " (1G pages)" } else { " (2M pages)" })
                .nl();
            x86::power_off();
        }
        for a in [lo, end - 8] {
            let p = a as *mut u64;
            let pat = 0xA55A_3CC3_0000_0000 ^ a;
            // SAFETY: `a` is 8-byte aligned usable RAM from the memory map, identity mapped,
            // outside this image; the old value is restored.
            let ok = unsafe {
                let old = core::ptr::read_volatile(p);
                core::ptr::write_volatile(p, pat);
                let ok = core::ptr::read_volatile(p) == pat;
                core::ptr::write_volatile(p, old);
                ok
            };
            if !ok {
                out().s("TG: FAIL memory at ").hex(a).nl();
                x86::power_off();
            }
        }
    }
    line("TG: memory ok");
}

/// `tg.touch`: writes one word to every 4 KiB page of RAM above 1 MiB
/// outside this image (already checked mapped by `memory_test`), so the
/// whole of guest memory is allocated and dirty (the snapshot benchmark).
/// Each guest instruction is costly under a nested hypervisor: the inner
/// loop is one store and an add.
fn touch_pages(bi: &BootInfo) {
    const PAGE: u64 = 4096;
    let img_lo = core::ptr::addr_of!(__image_start) as u64;
    let img_hi = core::ptr::addr_of!(__image_end) as u64;
    let mut pages = 0u64;
    for i in 0..bi.entries {
        let e = bi.entry(i);
        if e.kind != E820_RAM {
            continue;
        }
        let end = (e.addr + e.size) & !(PAGE - 1);
        let lo = (e.addr.max(MIB) + PAGE - 1) & !(PAGE - 1);
        // The image splits the range in two at most.
        let img_lo = img_lo & !(PAGE - 1);
        let img_hi = (img_hi + PAGE - 1) & !(PAGE - 1);
        for (a, b) in [(lo, end.min(img_lo)), (lo.max(img_hi), end)] {
            let mut p = a;
            while p < b {
                // SAFETY: `p` is page-aligned usable RAM from the memory map,
                // identity mapped, outside this image; nothing else uses it.
                unsafe { core::ptr::write_volatile(p as *mut u64, p) };
                p += PAGE;
            }
            pages += b.saturating_sub(a) / PAGE;
        }
    }
    out().s("TG: touched ").dec(pages).s(" pages").nl();
}

/// Prints the BSP's CPUID APIC IDs and checks them against the LAPIC; returns the ID.
fn check_cpuid() -> u32 {
    let lapic = cpu::lapic_id();
    let apic = cpuid(1, 0).1 >> 24;
    let max = cpuid(0, 0).0;
    let mut o = out();
    o.s("TG: cpuid apic=").dec(u64::from(apic)).s(" x2apic=");
    let x2 = if max >= 0xB {
        Some(cpuid(0xB, 0).3)
    } else {
        None
    };
    match x2 {
        Some(v) => o.dec(u64::from(v)),
        None => o.s("none"),
    };
    let cx16 = (cpuid(1, 0).2 >> 13) & 1;
    let gb = (cpuid(0x8000_0001, 0).3 >> 26) & 1;
    o.s(" cx16=")
        .dec(u64::from(cx16))
        .s(" pdpe1gb=")
        .dec(u64::from(gb));
    o.nl();
    drop(o);
    if apic != lapic || x2.is_some_and(|v| v != lapic) {
        out()
            .s("TG: FAIL cpuid apic id != lapic id ")
            .dec(u64::from(lapic))
            .nl();
        x86::power_off();
    }
    lapic
}

/// `tg.nommio`: the unassigned-MMIO check is skipped (QEMU microvm has a
/// virtio-mmio device there).
static NO_MMIO_CHECK: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// One PIO read of the debug port and one MMIO read of an unassigned address.
fn io_exits() {
    let v = inb(DEBUGCON);
    if v != 0xE9 {
        out().s("TG: FAIL pio read ").hex(u64::from(v)).nl();
        x86::power_off();
    }
    line("TG: pio ok");
    let m = mmio_read32(UNASSIGNED_MMIO);
    if m != 0xFFFF_FFFF && (cfg!(feature = "qemu") || NO_MMIO_CHECK.load(Ordering::Relaxed)) {
        out()
            .s("TG: mmio read ")
            .hex(u64::from(m))
            .s(" (qemu feature: not checked)")
            .nl();
        return;
    }
    if m != 0xFFFF_FFFF {
        out().s("TG: FAIL mmio read ").hex(u64::from(m)).nl();
        x86::power_off();
    }
    line("TG: mmio ok");
}

/// Routes COM1 (IOAPIC pin 4) to the BSP, enables the THR-empty interrupt and
/// waits for it with `sti; hlt` (a LAPIC one-shot timer bounds each halt).
fn serial_irq(bsp: u32) {
    // Mask the legacy 8259s: firmware (QEMU/SeaBIOS) may leave the PIT unmasked.
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    cpu::lapic_enable();
    cpu::ioapic_route(4, cpu::VEC_SERIAL, bsp, false);
    outb(serial::MCR, 0x0B); // DTR | RTS | OUT2
    outb(serial::IER, 0x02); // THR empty
                             // Output while the interrupt is enabled: the THR-empty condition re-arms per byte.
    serial::puts_raw("TG: irq ");
    let mut tries = 0;
    while SERIAL_IRQ_COUNT.load(Ordering::Acquire) == 0 && tries < 20 {
        cpu::lapic_timer_oneshot(10_000_000);
        x86::wait_for_interrupt();
        tries += 1;
    }
    cpu::lapic_timer_stop();
    outb(serial::IER, 0);
    cpu::ioapic_route(4, cpu::VEC_SERIAL, bsp, true);
    if SERIAL_IRQ_COUNT.load(Ordering::Acquire) == 0 {
        serial::puts_raw("\n");
        fail("irq (no serial interrupt)");
    }
    serial::puts_raw("ok\n");
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut o = serial::Out::unlocked();
    o.s("TG: FAIL panic ");
    if let Some(m) = info.message().as_str() {
        o.s(m);
    }
    if let Some(l) = info.location() {
        o.s(" at ").s(l.file()).s(":").dec(u64::from(l.line()));
    }
    o.nl();
    x86::power_off()
}
