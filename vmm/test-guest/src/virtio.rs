//! virtio-pci (modern, VIRTIO 1.x) transport: capabilities, feature
//! negotiation, MSI-X, split virtqueues. The device drivers are in vdev.rs.
//!
//! Everything runs on the BSP, one request at a time; completions are waited
//! for with `sti; hlt`, each halt bounded by a LAPIC one-shot timer.

use core::sync::atomic::{compiler_fence, AtomicU32, Ordering};

use crate::cpu::{self, Page, MSIX_VECTORS, VEC_MSIX_BASE};
use crate::pci::{self, Bdf, Bus, CMD_INTX_OFF, CMD_MASTER, CMD_MEM};
use crate::serial::{line, out};
use crate::vdev;
use crate::x86::{
    self, mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8,
};

/// Per-vector interrupt counts, incremented by the MSI-X stubs (asm.rs).
#[no_mangle]
pub static MSIX_COUNT: [AtomicU32; MSIX_VECTORS] = [const { AtomicU32::new(0) }; MSIX_VECTORS];

/// TSC at the entry of each vector's last interrupt (asm.rs).
#[no_mangle]
pub static MSIX_TSC: [core::sync::atomic::AtomicU64; MSIX_VECTORS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; MSIX_VECTORS];

pub const VENDOR_VIRTIO: u16 = 0x1AF4;
pub const F_VERSION_1: u64 = 1 << 32;

const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;

// Common configuration layout.
const C_DFSELECT: u64 = 0;
const C_DF: u64 = 4;
const C_GFSELECT: u64 = 8;
const C_GF: u64 = 12;
const C_MSIX: u64 = 16;
const C_NUMQ: u64 = 18;
const C_STATUS: u64 = 20;
const C_GENERATION: u64 = 21;
const C_Q_SELECT: u64 = 22;
const C_Q_SIZE: u64 = 24;
const C_Q_MSIX: u64 = 26;
const C_Q_ENABLE: u64 = 28;
const C_Q_NOFF: u64 = 30;
const C_Q_DESC: u64 = 32;
const C_Q_DRIVER: u64 = 40;
const C_Q_DEVICE: u64 = 48;

const NO_VECTOR: u16 = 0xFFFF;

/// Devices handled; each gets 4 MSI-X vectors (config + up to 3 queues) and
/// `QUEUES_PER_DEV` queue pages.
pub const MAX_DEV: usize = MSIX_VECTORS / 4;
const QUEUES_PER_DEV: usize = 2;
pub const MAX_QUEUE_SIZE: u16 = 16;

// Split virtqueue layout inside its 4 KiB page (queue size <= 16).
const VQ_DESC: u64 = 0;
const VQ_AVAIL: u64 = 256;
const VQ_USED: u64 = 512;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

static QUEUE_PAGES: Page<[[u8; 4096]; MAX_DEV * QUEUES_PER_DEV]> =
    Page::new([[0; 4096]; MAX_DEV * QUEUES_PER_DEV]);

/// Options from the kernel command line.
#[derive(Clone, Copy)]
pub struct Opts {
    /// `tg.seed=N` (default 1): seeds the disk pattern.
    pub seed: u64,
    /// `tg.blkburst=N`: extra write+read pairs.
    pub burst: u64,
    /// `tg.blklat=N`: N timed 4 KiB reads (notify to interrupt handler).
    pub lat: u64,
    /// `tg.netrx`: wait for one received frame.
    pub netrx: bool,
    /// `tg.keepdev`: leave the devices running after their checks (no
    /// reset), so the host sees active queues while the guest idles.
    pub keep: bool,
    /// `tg.blkcount`: after every device's checks, write and read back a
    /// block per round forever, printing `TG: blkcount N`.
    pub blkcount: bool,
    /// `tg.netcount`: after every device's checks, send the TX frame again
    /// per round forever (with `tg.blkcount`: one frame per block round).
    pub netcount: bool,
    /// `tg.msixmask`: virtio-blk MSI-X per-vector mask test.
    pub msixmask: bool,
    /// `tg.ecam=ADDR`: ECAM base of bus 0 when there is no MCFG.
    pub ecam: Option<u64>,
    /// `tg.barbase=ADDR`: start of the window for BARs the guest assigns.
    pub barbase: Option<u64>,
    /// `tg.pciassign`: assign the virtio BARs even if already assigned.
    pub assign: bool,
    /// BSP APIC ID (MSI-X destination).
    pub apic: u32,
}

/// A virtio-pci function with its capabilities resolved.
pub struct Transport {
    pub bdf: Bdf,
    slot: usize,
    common: u64,
    notify: u64,
    notify_mult: u32,
    pub device_cfg: u64,
    /// MSI-X: (capability offset, table address, table size, PBA address).
    msix: Option<(u8, u64, u16, u64)>,
    /// MSI-X destination APIC ID.
    apic: u32,
}

/// Prints `TG: FAIL <what> BB:DD.F` and powers off.
pub fn fail_dev(what: &str, bdf: Bdf) -> ! {
    let mut o = out();
    o.s("TG: FAIL ").s(what).s(" ");
    bdf.print(&mut o);
    o.nl();
    drop(o);
    x86::power_off()
}

/// Halts until an interrupt or the LAPIC one-shot timer (`ticks` at divide-by-1;
/// 1 GHz under KVM and QEMU, so 1_000_000 is 1 ms).
fn nap(ticks: u32) {
    cpu::lapic_timer_oneshot(ticks);
    x86::wait_for_interrupt();
}

impl Transport {
    /// Resolves the capabilities of a virtio function; assigns BARs if needed.
    fn new(bdf: Bdf, slot: usize, opts: &Opts) -> Transport {
        if pci::read16(bdf, 0x06) & (1 << 4) == 0 {
            fail_dev("virtio no capability list", bdf);
        }
        let mut bars: [Option<u64>; 6] = [None; 6];
        let mut bar = |idx: u8| -> u64 {
            if let Some(Some(a)) = bars.get(idx as usize) {
                return *a;
            }
            match pci::bar_address(bdf, idx, opts.assign) {
                Ok(a) => {
                    bars[idx as usize] = Some(a);
                    a
                }
                Err(e) => fail_dev(e, bdf),
            }
        };
        let mut t = Transport {
            bdf,
            slot,
            common: 0,
            notify: 0,
            notify_mult: 0,
            device_cfg: 0,
            msix: None,
            apic: opts.apic,
        };
        let mut isr = 0;
        let mut cap = pci::read8(bdf, 0x34) & 0xFC;
        let mut guard = 0;
        while cap != 0 && guard < 48 {
            let id = pci::read8(bdf, cap);
            if id == 0x09 {
                let cfg_type = pci::read8(bdf, cap + 3);
                let bidx = pci::read8(bdf, cap + 4);
                let offset = u64::from(pci::read32(bdf, cap + 8));
                let length = u64::from(pci::read32(bdf, cap + 12));
                let slot_addr = match cfg_type {
                    1 => Some(&mut t.common),
                    2 => Some(&mut t.notify),
                    3 => Some(&mut isr),
                    4 => Some(&mut t.device_cfg),
                    _ => None,
                };
                if let Some(dst) = slot_addr {
                    if *dst == 0 && bidx <= 5 {
                        let a = bar(bidx) + offset;
                        if !cpu::map_mmio(a, length) {
                            fail_dev("virtio bar not mappable", bdf);
                        }
                        *dst = a;
                        if cfg_type == 2 {
                            t.notify_mult = pci::read32(bdf, cap + 16);
                        }
                    }
                }
            } else if id == 0x11 && t.msix.is_none() {
                let ctrl = pci::read16(bdf, cap + 2);
                let table = pci::read32(bdf, cap + 4);
                let size = (ctrl & 0x7FF) + 1;
                let pba = pci::read32(bdf, cap + 8);
                let a = bar((table & 7) as u8) + u64::from(table & !7);
                let p = bar((pba & 7) as u8) + u64::from(pba & !7);
                if !cpu::map_mmio(a, u64::from(size) * 16) || !cpu::map_mmio(p, 8) {
                    fail_dev("msix table not mappable", bdf);
                }
                t.msix = Some((cap, a, size, p));
            }
            cap = pci::read8(bdf, cap + 1) & 0xFC;
            guard += 1;
        }
        if t.common == 0 || t.notify == 0 || isr == 0 {
            fail_dev("virtio caps missing (common/notify/isr)", bdf);
        }
        pci::command_set(bdf, CMD_MEM | CMD_MASTER | CMD_INTX_OFF, 0);
        t
    }

    fn r8(&self, off: u64) -> u8 {
        mmio_read8(self.common + off)
    }
    fn w8(&self, off: u64, v: u8) {
        mmio_write8(self.common + off, v)
    }
    fn r16(&self, off: u64) -> u16 {
        mmio_read16(self.common + off)
    }
    fn w16(&self, off: u64, v: u16) {
        mmio_write16(self.common + off, v)
    }
    fn r32(&self, off: u64) -> u32 {
        mmio_read32(self.common + off)
    }
    fn w32(&self, off: u64, v: u32) {
        mmio_write32(self.common + off, v)
    }
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.r8(C_STATUS)
    }

    fn set_status(&self, bits: u8) {
        let s = self.status();
        self.w8(C_STATUS, s | bits);
    }

    pub fn num_queues(&self) -> u16 {
        self.r16(C_NUMQ)
    }

    /// Writes status 0 and waits (bounded, ~1 s) until it reads back 0.
    pub fn reset(&self) {
        self.w8(C_STATUS, 0);
        let mut tries = 0;
        while self.status() != 0 {
            tries += 1;
            if tries > 1000 {
                fail_dev("virtio reset (status != 0)", self.bdf);
            }
            nap(1_000_000);
        }
        cpu::lapic_timer_stop();
    }

    /// MSI-X vector of table entry `entry` (0 = config, 1 + q = queue q).
    pub fn vector(&self, entry: u16) -> Option<u8> {
        self.msix
            .map(|_| VEC_MSIX_BASE + (self.slot * 4) as u8 + entry as u8)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 plus the
    /// offered bits of `wanted`), FEATURES_OK, MSI-X. Returns the features.
    pub fn init(&self, wanted: u64, nqueues: u16) -> u64 {
        self.reset();
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_DRIVER);
        self.w32(C_DFSELECT, 0);
        let lo = self.r32(C_DF);
        self.w32(C_DFSELECT, 1);
        let hi = self.r32(C_DF);
        let offered = (u64::from(hi) << 32) | u64::from(lo);
        if offered & F_VERSION_1 == 0 {
            fail_dev("virtio VERSION_1 not offered", self.bdf);
        }
        let accepted = F_VERSION_1 | (wanted & offered);
        self.w32(C_GFSELECT, 0);
        self.w32(C_GF, accepted as u32);
        self.w32(C_GFSELECT, 1);
        self.w32(C_GF, (accepted >> 32) as u32);
        self.set_status(S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            fail_dev("virtio FEATURES_OK not kept", self.bdf);
        }
        if self.num_queues() < nqueues {
            fail_dev("virtio too few queues", self.bdf);
        }
        self.setup_msix(nqueues);
        accepted
    }

    fn setup_msix(&self, nqueues: u16) {
        let Some((cap, table, size, _)) = self.msix else {
            let mut o = out();
            o.s("TG: virtio ");
            self.bdf.print(&mut o);
            o.s(" no msix, polling").nl();
            return;
        };
        if size < 1 + nqueues {
            fail_dev("msix table too small", self.bdf);
        }
        let apic = self.apic;
        for e in 0..=nqueues {
            let a = table + u64::from(e) * 16;
            let v = self.vector(e).unwrap_or(0);
            mmio_write32(a, 0xFEE0_0000 | (apic << 12));
            mmio_write32(a + 4, 0);
            mmio_write32(a + 8, u32::from(v));
            mmio_write32(a + 12, 0); // unmasked
        }
        // Message control is the upper half of the capability's first dword.
        let d = pci::read32(self.bdf, cap);
        let ctrl = ((d >> 16) | (1 << 15)) & !(1 << 14);
        pci::write32(self.bdf, cap, (d & 0xFFFF) | (ctrl << 16));
        self.w16(C_MSIX, 0);
        if self.r16(C_MSIX) != 0 {
            fail_dev("msix_config vector not accepted", self.bdf);
        }
    }

    /// Sets up queue `q` (size min(device, 16)) in its static page.
    pub fn setup_queue(&self, q: u16) -> Vq {
        if q as usize >= QUEUES_PER_DEV {
            fail_dev("virtio queue index", self.bdf);
        }
        self.w16(C_Q_SELECT, q);
        let max = self.r16(C_Q_SIZE);
        if max == 0 {
            fail_dev("virtio queue size 0", self.bdf);
        }
        let size = max.min(MAX_QUEUE_SIZE);
        // Page slot * QUEUES_PER_DEV + q of the static array (slot < MAX_DEV,
        // q < QUEUES_PER_DEV): used by this device's queue q only.
        let page = self.slot * QUEUES_PER_DEV + q as usize;
        let base = QUEUE_PAGES.get() as u64 + page as u64 * 4096;
        let mut a = base;
        while a < base + 4096 {
            x86::ram_write64(a, 0);
            a += 8;
        }
        self.w16(C_Q_SIZE, size);
        if self.msix.is_some() {
            self.w16(C_Q_MSIX, 1 + q);
            let got = self.r16(C_Q_MSIX);
            if got != 1 + q {
                let mut o = out();
                o.s("TG: FAIL queue_msix_vector read ")
                    .hex(u64::from(got))
                    .s(if got == NO_VECTOR {
                        " (NO_VECTOR) "
                    } else {
                        " "
                    });
                self.bdf.print(&mut o);
                o.nl();
                drop(o);
                x86::power_off();
            }
        }
        self.w64(C_Q_DESC, base + VQ_DESC);
        self.w64(C_Q_DRIVER, base + VQ_AVAIL);
        self.w64(C_Q_DEVICE, base + VQ_USED);
        let noff = self.r16(C_Q_NOFF);
        self.w16(C_Q_ENABLE, 1);
        let mut vq = Vq {
            bdf: self.bdf,
            index: q,
            size,
            base,
            notify: self.notify + u64::from(noff) * u64::from(self.notify_mult),
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            vector: self.vector(1 + q),
            irq_seen: 0,
        };
        vq.sync_irqs();
        vq
    }

    pub fn has_msix(&self) -> bool {
        self.msix.is_some()
    }

    /// Sets or clears the per-vector mask bit of MSI-X table entry `entry`.
    pub fn msix_mask(&self, entry: u16, masked: bool) {
        if let Some((_, table, _, _)) = self.msix {
            mmio_write32(table + u64::from(entry) * 16 + 12, u32::from(masked));
        }
    }

    /// The Pending Bit Array bit of `entry`.
    pub fn msix_pending(&self, entry: u16) -> bool {
        match self.msix {
            Some((_, _, _, pba)) => {
                let dw = mmio_read32(pba + u64::from(entry / 32) * 4);
                dw & (1 << (entry % 32)) != 0
            }
            None => false,
        }
    }

    pub fn driver_ok(&self) {
        self.set_status(S_DRIVER_OK);
    }

    /// Reads a 32-bit device config field consistently (config_generation).
    pub fn cfg_read64(&self, off: u64) -> u64 {
        for _ in 0..10 {
            let g = self.r8(C_GENERATION);
            let lo = mmio_read32(self.device_cfg + off);
            let hi = mmio_read32(self.device_cfg + off + 4);
            if self.r8(C_GENERATION) == g {
                return (u64::from(hi) << 32) | u64::from(lo);
            }
        }
        fail_dev("virtio config generation unstable", self.bdf)
    }

    pub fn cfg_read8(&self, off: u64) -> u8 {
        mmio_read8(self.device_cfg + off)
    }
}

/// A split virtqueue driven one request at a time.
pub struct Vq {
    bdf: Bdf,
    pub index: u16,
    size: u16,
    base: u64,
    notify: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    vector: Option<u8>,
    /// MSIX_COUNT of our vector when last checked.
    irq_seen: u32,
}

/// One buffer of a chain: (guest address, length, device-writable).
pub type Buf = (u64, u32, bool);

impl Vq {
    fn irq_count(&self) -> u32 {
        match self.vector {
            Some(v) => MSIX_COUNT[(v - VEC_MSIX_BASE) as usize].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Interrupts counted on this queue's vector so far.
    pub fn irqs(&self) -> u32 {
        self.irq_count()
    }

    /// TSC at the entry of this queue's last interrupt (0 without MSI-X).
    pub fn irq_tsc(&self) -> u64 {
        match self.vector {
            Some(v) => MSIX_TSC[(v - VEC_MSIX_BASE) as usize].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Writes a descriptor chain and publishes it in the avail ring; returns the head.
    pub fn push(&mut self, bufs: &[Buf]) -> u16 {
        if bufs.is_empty() || bufs.len() > self.size as usize {
            fail_dev("virtqueue chain length", self.bdf);
        }
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.next_desc;
            let next = (d + 1) % self.size;
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let a = self.base + VQ_DESC + u64::from(d) * 16;
            x86::ram_write64(a, addr);
            x86::ram_write64(
                a + 8,
                u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48,
            );
            self.next_desc = next;
        }
        let slot = self.avail_idx % self.size;
        mmio_write16(self.base + VQ_AVAIL + 4 + u64::from(slot) * 2, head);
        // The ring entry must be visible before the index (x86 keeps store
        // order; this keeps the compiler from reordering).
        compiler_fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio_write16(self.base + VQ_AVAIL + 2, self.avail_idx);
        compiler_fence(Ordering::SeqCst);
        head
    }

    /// Notifies the device (16-bit write of the queue index).
    pub fn kick(&self) {
        mmio_write16(self.notify, self.index);
    }

    /// Takes one used element if there is one: (id, len).
    pub fn poll_used(&mut self) -> Option<(u32, u32)> {
        let idx = mmio_read16(self.base + VQ_USED + 2);
        if idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let e = self.base + VQ_USED + 4 + u64::from(self.last_used % self.size) * 8;
        let id = mmio_read32(e);
        let len = mmio_read32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Waits for one used element and (with MSI-X) a new interrupt on this
    /// queue's vector, `sti; hlt` with a 10 ms timer per halt, at most `naps`
    /// halts. Fails with `what` on timeout.
    pub fn wait(&mut self, what: &str, naps: u32) -> (u32, u32) {
        let mut got = None;
        let mut n = 0;
        loop {
            if got.is_none() {
                got = self.poll_used();
            }
            let irq = self.vector.is_none() || self.irq_count() != self.irq_seen;
            if let (Some(e), true) = (got, irq) {
                self.irq_seen = self.irq_count();
                cpu::lapic_timer_stop();
                return e;
            }
            if n >= naps {
                cpu::lapic_timer_stop();
                let mut o = out();
                o.s("TG: FAIL ").s(what);
                o.s(if got.is_some() {
                    " (completed, no interrupt) "
                } else {
                    " (timeout) "
                });
                self.bdf.print(&mut o);
                o.nl();
                drop(o);
                x86::power_off();
            }
            nap(10_000_000);
            n += 1;
        }
    }

    /// Waits (bounded, `sti; hlt`) for a used element without requiring an
    /// interrupt; returns it and whether one was counted meanwhile.
    pub fn wait_polled(&mut self, what: &str, naps: u32) -> ((u32, u32), bool) {
        for _ in 0..naps {
            if let Some(e) = self.poll_used() {
                cpu::lapic_timer_stop();
                return (e, self.irq_count() != self.irq_seen);
            }
            nap(10_000_000);
        }
        cpu::lapic_timer_stop();
        let mut o = out();
        o.s("TG: FAIL ").s(what).s(" (timeout) ");
        self.bdf.print(&mut o);
        o.nl();
        drop(o);
        x86::power_off()
    }

    /// Whether an interrupt was counted since the last sync; naps (up to
    /// `naps` x 10 ms) waiting for one.
    pub fn wait_irq(&mut self, naps: u32) -> bool {
        let mut n = 0;
        while self.irq_count() == self.irq_seen && n < naps {
            nap(10_000_000);
            n += 1;
        }
        cpu::lapic_timer_stop();
        let got = self.irq_count() != self.irq_seen;
        self.irq_seen = self.irq_count();
        got
    }

    /// Forgets interrupts counted so far (before a new request).
    pub fn sync_irqs(&mut self) {
        self.irq_seen = self.irq_count();
    }
}

/// Whether the function has a virtio common-configuration capability.
fn has_common_cfg(bdf: Bdf) -> bool {
    if pci::read16(bdf, 0x06) & (1 << 4) == 0 {
        return false;
    }
    let mut cap = pci::read8(bdf, 0x34) & 0xFC;
    for _ in 0..48 {
        if cap == 0 {
            break;
        }
        if pci::read8(bdf, cap) == 0x09 && pci::read8(bdf, cap + 3) == 1 {
            return true;
        }
        cap = pci::read8(bdf, cap + 1) & 0xFC;
    }
    false
}

/// Enumerates bus 0, checks ECAM, and drives every virtio device found.
pub fn run(opts: &Opts, rsdp_hint: u64) {
    if let Some(b) = opts.barbase {
        pci::set_bar_base(b);
    }
    // tg.ecam= without MCFG: assume the full 256-bus window.
    let ecam = pci::find_ecam(rsdp_hint).or(opts.ecam.map(|b| (b, 256 << 20)));
    let bus: Bus = pci::scan(ecam);
    let mut slot = 0;
    // The devices that go on after the checks (tg.blkcount, tg.netcount).
    let mut counting_blk = None;
    let mut counting_net = None;
    for f in &bus.funcs[..bus.n] {
        if f.vendor != VENDOR_VIRTIO || !(0x1000..=0x107F).contains(&f.device) {
            continue;
        }
        // Transitional devices (0x1000..0x103f) carry the type in the
        // subsystem ID and are driven through their modern interface.
        let transitional = f.device < 0x1040;
        let dtype = if transitional {
            pci::read16(f.bdf, 0x2E)
        } else {
            f.device - 0x1040
        };
        let mut o = out();
        o.s("TG: virtio ");
        f.bdf.print(&mut o);
        o.s(" type=").dec(u64::from(dtype));
        if transitional {
            o.s(" (transitional ").hexw(u64::from(f.device), 4).s(")");
        }
        o.nl();
        drop(o);
        if transitional && !has_common_cfg(f.bdf) {
            out()
                .s("TG: virtio type=")
                .dec(u64::from(dtype))
                .s(" skipped (legacy only)")
                .nl();
            continue;
        }
        let known = matches!(dtype, 1 | 2 | 4 | 26);
        if !known || slot >= MAX_DEV {
            out()
                .s("TG: virtio type=")
                .dec(u64::from(dtype))
                .s(" skipped")
                .nl();
            continue;
        }
        let t = Transport::new(f.bdf, slot, opts);
        slot += 1;
        let counting = match dtype {
            1 => vdev::net(&t, opts).filter(|_| counting_net.is_none()),
            2 => vdev::blk(&t, opts).filter(|_| counting_blk.is_none()),
            26 => {
                vdev::fs(&t);
                None
            }
            _ => {
                vdev::rng(&t);
                None
            }
        };
        match counting {
            Some(q) if dtype == 1 => counting_net = Some((t, q)),
            Some(q) => counting_blk = Some((t, q)),
            // Quiesce: no more DMA into the shared buffers. A kept device
            // has nothing left in its queues, so the host has nothing to
            // write.
            None if !opts.keep => t.reset(),
            None => {}
        }
    }
    if slot == 0 {
        line("TG: virtio none");
    }
    if counting_blk.is_some() || counting_net.is_some() {
        vdev::count_forever(counting_blk, counting_net);
    }
}
