//! virtio device drivers on top of virtio.rs: blk (type 2), net (type 1),
//! rng (type 4). Each does a little real I/O and prints what it saw.

use crate::cpu::Page;
use crate::serial::{line, out};
use crate::virtio::{fail_dev, Buf, Opts, Transport, Vq};
use crate::x86::{self, mmio_read8, mmio_write32, mmio_write8, ram_read64};

/// DMA buffers (identity mapped: guest virtual == guest physical).
const BUF_PAGES: usize = 6;
static BUFS: Page<[u8; BUF_PAGES * 4096]> = Page::new([0; BUF_PAGES * 4096]);

const OFF_HDR: u64 = 0; // blk request header, 16 bytes
const OFF_STATUS: u64 = 16; // blk status byte
const OFF_ID: u64 = 64; // blk GET_ID, 20 bytes
const OFF_RNG: u64 = 128; // rng, 64 bytes
const OFF_FS_IN: u64 = 192; // fs FUSE_INIT request, 56 bytes
const OFF_FS_OUT: u64 = 256; // fs FUSE_INIT reply, 80 bytes
const OFF_WBUF: u64 = 4096; // blk write data, 4 KiB
const OFF_RBUF: u64 = 8192; // blk read data, 4 KiB
const OFF_NET_TX: u64 = 12288; // net TX: vnet header + frame
const OFF_NET_RX: u64 = 16384; // net RX: 4 x 1600
const NET_RX_STRIDE: u64 = 1600;

fn buf(off: u64) -> u64 {
    BUFS.get() as u64 + off
}

/// Every `wait` allows this many 10 ms halts (~3 s).
const WAIT_NAPS: u32 = 300;

// ---------------------------------------------------------------------------
// virtio-blk.

const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
const BLK_S_UNSUPP: u8 = 2;
/// 4 KiB per data request.
const BLK_LEN: u32 = 4096;
const SECTOR: u64 = 512;
/// First sector of the test data; the burst goes to 16, 24, ...
const BLK_SECTOR: u64 = 8;
const BURST_SECTOR: u64 = 16;

/// The disk pattern: the little-endian u64 at disk byte offset `o` (a
/// multiple of 8) is `(o | seed << 48) * 0x9E3779B97F4A7C15` (wrapping).
pub fn pattern(seed: u64, o: u64) -> u64 {
    (o | seed << 48).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn fill(at: u64, seed: u64, sector: u64) {
    let disk = sector * SECTOR;
    for i in (0..u64::from(BLK_LEN)).step_by(8) {
        x86::ram_write64(at + i, pattern(seed, disk + i));
    }
}

fn zero(at: u64, len: u64) {
    for i in (0..len).step_by(8) {
        x86::ram_write64(at + i, 0);
    }
}

/// Compares the read buffer with the pattern; returns the first bad offset.
fn check(at: u64, seed: u64, sector: u64) -> Option<u64> {
    let disk = sector * SECTOR;
    (0..u64::from(BLK_LEN))
        .step_by(8)
        .find(|&i| ram_read64(at + i) != pattern(seed, disk + i))
}

/// Writes the request header and queues header, optional data, status; kicks.
/// Returns the head descriptor.
fn blk_submit(q: &mut Vq, typ: u32, sector: u64, data: Option<Buf>) -> u16 {
    let hdr = buf(OFF_HDR);
    mmio_write32(hdr, typ);
    mmio_write32(hdr + 4, 0);
    x86::ram_write64(hdr + 8, sector);
    mmio_write8(buf(OFF_STATUS), 0xFF);
    let h = (hdr, 16, false);
    let st = (buf(OFF_STATUS), 1, true);
    q.sync_irqs();
    let head = match data {
        Some(d) => q.push(&[h, d, st]),
        None => q.push(&[h, st]),
    };
    q.kick();
    head
}

/// One request, completion by interrupt. Returns the status byte.
fn blk_req(q: &mut Vq, t: &Transport, typ: u32, sector: u64, data: Option<Buf>) -> u8 {
    let head = blk_submit(q, typ, sector, data);
    let what = match typ {
        BLK_T_IN => "blk read",
        BLK_T_OUT => "blk write",
        BLK_T_FLUSH => "blk flush",
        _ => "blk get_id",
    };
    let (id, _len) = q.wait(what, WAIT_NAPS);
    if id != u32::from(head) {
        fail_dev("blk used id != head", t.bdf);
    }
    mmio_read8(buf(OFF_STATUS))
}

/// MSI-X per-vector masking: with the queue's entry masked a request
/// completes without an interrupt (and, per PCI, sets the pending bit);
/// unmasking delivers the pending interrupt.
fn blk_msix_mask(q: &mut Vq, t: &Transport, seed: u64) {
    if !t.has_msix() {
        line("TG: blk msix mask skipped (no msix)");
        return;
    }
    t.msix_mask(1, true);
    zero(buf(OFF_RBUF), u64::from(BLK_LEN));
    let head = blk_submit(
        q,
        BLK_T_IN,
        BLK_SECTOR,
        Some((buf(OFF_RBUF), BLK_LEN, true)),
    );
    let ((id, _), early) = q.wait_polled("blk masked read", WAIT_NAPS);
    // Give a wrongly delivered interrupt time to arrive (50 ms).
    let late = q.wait_irq(5);
    if early || late {
        t.msix_mask(1, false);
        fail_dev("blk msix interrupt while masked", t.bdf);
    }
    if id != u32::from(head) || mmio_read8(buf(OFF_STATUS)) != 0 {
        fail_dev("blk masked read", t.bdf);
    }
    if check(buf(OFF_RBUF), seed, BLK_SECTOR).is_some() {
        fail_dev("blk masked read mismatch", t.bdf);
    }
    let pba = t.msix_pending(1);
    t.msix_mask(1, false);
    if !q.wait_irq(100) {
        fail_dev("blk msix pending interrupt not delivered on unmask", t.bdf);
    }
    out()
        .s("TG: blk msix mask ok pba=")
        .dec(u64::from(pba))
        .nl();
}

fn blk_status_fail(what: &str, st: u8) -> ! {
    out()
        .s("TG: FAIL ")
        .s(what)
        .s(" status=")
        .dec(u64::from(st))
        .nl();
    x86::power_off()
}

fn blk_write(q: &mut Vq, t: &Transport, seed: u64, sector: u64) {
    fill(buf(OFF_WBUF), seed, sector);
    let st = blk_req(
        q,
        t,
        BLK_T_OUT,
        sector,
        Some((buf(OFF_WBUF), BLK_LEN, false)),
    );
    if st != 0 {
        blk_status_fail("blk write", st);
    }
}

fn blk_read_check(q: &mut Vq, t: &Transport, seed: u64, sector: u64, what: &str) {
    let st = blk_req(q, t, BLK_T_IN, sector, Some((buf(OFF_RBUF), BLK_LEN, true)));
    if st != 0 {
        blk_status_fail(what, st);
    }
    if let Some(off) = check(buf(OFF_RBUF), seed, sector) {
        out()
            .s("TG: FAIL ")
            .s(what)
            .s(" mismatch sector=")
            .dec(sector)
            .s(" offset=")
            .dec(off)
            .nl();
        x86::power_off();
    }
}

fn blk_setup(t: &Transport) -> (u64, Vq) {
    let feats = t.init(BLK_F_FLUSH, 1);
    let q = t.setup_queue(0);
    t.driver_ok();
    (feats, q)
}

/// Histogram bucket width and count for `tg.blklat` (TSC cycles).
const LAT_BUCKET: u64 = 512;
const LAT_BUCKETS: usize = 2048;
static LAT_HIST: Page<[u32; LAT_BUCKETS]> = Page::new([0; LAT_BUCKETS]);

/// `n` one-at-a-time 4 KiB reads of sector 8, each timed from just before
/// the notify to the entry of the queue's interrupt handler. Prints the
/// minimum, median, 99th percentile and maximum in TSC cycles (median and
/// p99 to within one histogram bucket, from above).
fn blk_latency(q: &mut Vq, t: &Transport, n: u64) {
    out().s("TG: blk lat start n=").dec(n).nl();
    let hist = LAT_HIST.get();
    let (mut min, mut max) = (u64::MAX, 0u64);
    for _ in 0..n {
        q.sync_irqs();
        blk_submit(
            q,
            BLK_T_IN,
            BLK_SECTOR,
            Some((buf(OFF_RBUF), BLK_LEN, true)),
        );
        let t0 = x86::rdtsc();
        q.kick();
        q.wait("blk lat read", 300);
        let d = q.irq_tsc().wrapping_sub(t0);
        min = min.min(d);
        max = max.max(d);
        let b = ((d / LAT_BUCKET) as usize).min(LAT_BUCKETS - 1);
        // SAFETY: only the BSP runs this; the histogram is private to it.
        unsafe { (*hist)[b] += 1 };
    }
    let quantile = |q: u64| {
        let want = (n * q).div_ceil(100);
        let mut seen = 0u64;
        for b in 0..LAT_BUCKETS {
            // SAFETY: as above.
            seen += u64::from(unsafe { (*hist)[b] });
            if seen >= want {
                return (b as u64 + 1) * LAT_BUCKET;
            }
        }
        max
    };
    let _ = t;
    out()
        .s("TG: blk lat n=")
        .dec(n)
        .s(" min=")
        .dec(min)
        .s(" p50=")
        .dec(quantile(50).min(max))
        .s(" p99=")
        .dec(quantile(99).min(max))
        .s(" max=")
        .dec(max)
        .s(" cycles")
        .nl();
}

/// Checks the disk; with `tg.blkcount` returns its queue to go on with.
pub fn blk(t: &Transport, o: &Opts) -> Option<Vq> {
    let (feats, mut q) = blk_setup(t);
    let irq0 = q.irqs();
    let cap = t.cfg_read64(0);
    out().s("TG: blk capacity=").dec(cap).nl();
    let need = BURST_SECTOR + o.burst * (u64::from(BLK_LEN) / SECTOR);
    if cap < need {
        fail_dev("blk capacity too small", t.bdf);
    }

    blk_write(&mut q, t, o.seed, BLK_SECTOR);
    line("TG: blk write ok");
    zero(buf(OFF_RBUF), u64::from(BLK_LEN));
    blk_read_check(&mut q, t, o.seed, BLK_SECTOR, "blk read");
    line("TG: blk read ok");

    if feats & BLK_F_FLUSH != 0 {
        let st = blk_req(&mut q, t, BLK_T_FLUSH, 0, None);
        if st != 0 {
            blk_status_fail("blk flush", st);
        }
        line("TG: blk flush ok");
    } else {
        line("TG: blk flush unsupported");
    }

    let id = buf(OFF_ID);
    zero(id, 24);
    let st = blk_req(&mut q, t, BLK_T_GET_ID, 0, Some((id, 20, true)));
    match st {
        0 => {
            let mut s = out();
            s.s("TG: blk id=");
            for i in 0..20 {
                let b = mmio_read8(id + i);
                if b == 0 {
                    break;
                }
                s.bytes(&[if (0x20..0x7F).contains(&b) { b } else { b'?' }]);
            }
            s.nl();
        }
        BLK_S_UNSUPP => line("TG: blk id unsupported"),
        _ => blk_status_fail("blk get_id", st),
    }
    out()
        .s("TG: blk irqs=")
        .dec(u64::from(q.irqs().wrapping_sub(irq0)))
        .nl();

    if o.msixmask {
        blk_msix_mask(&mut q, t, o.seed);
    }

    if o.burst > 0 {
        // Marks the burst for exit counting on the host side.
        out().s("TG: blk burst start n=").dec(o.burst).nl();
        for k in 0..o.burst {
            let sector = BURST_SECTOR + k * (u64::from(BLK_LEN) / SECTOR);
            blk_write(&mut q, t, o.seed, sector);
            blk_read_check(&mut q, t, o.seed, sector, "blk burst read");
        }
        out().s("TG: blk burst ok n=").dec(o.burst).nl();
    }

    if o.lat > 0 {
        blk_latency(&mut q, t, o.lat);
    }

    // Device reset and a second initialisation: the data must still be there.
    let (_, mut q) = blk_setup(t);
    zero(buf(OFF_RBUF), u64::from(BLK_LEN));
    blk_read_check(&mut q, t, o.seed, BLK_SECTOR, "blk reinit read");
    line("TG: blk reinit ok");

    // tg.blkcount goes on in count_forever with this queue.
    o.blkcount.then_some(q)
}

/// `tg.blkcount` and `tg.netcount`, once every device is checked: forever,
/// write a block whose pattern is the round, read it back, check it and
/// print `TG: blkcount N` (a VM restored from a snapshot must go on from
/// the saved round, with its rings and the disk where they were), and send
/// the NIC's frame again, so the host sees steady disk and network I/O.
pub fn count_forever(mut blk: Option<(Transport, Vq)>, mut net: Option<(Transport, Vq)>) -> ! {
    let mut round: u64 = 1;
    loop {
        if let Some((t, q)) = blk.as_mut() {
            blk_write(q, t, round, BURST_SECTOR);
            zero(buf(OFF_RBUF), u64::from(BLK_LEN));
            blk_read_check(q, t, round, BURST_SECTOR, "blk count read");
            out().s("TG: blkcount ").dec(round).nl();
        }
        if let Some((t, tx)) = net.as_mut() {
            net_send(tx, t, "net count tx");
        }
        round += 1;
    }
}

// ---------------------------------------------------------------------------
// virtio-rng.

pub fn rng(t: &Transport) {
    t.init(0, 1);
    let mut q = t.setup_queue(0);
    t.driver_ok();
    let b = buf(OFF_RNG);
    zero(b, 64);
    q.sync_irqs();
    let head = q.push(&[(b, 64, true)]);
    q.kick();
    let (id, len) = q.wait("rng read", WAIT_NAPS);
    if id != u32::from(head) || len > 64 {
        fail_dev("rng used element", t.bdf);
    }
    let nonzero = (0..u64::from(len))
        .filter(|&i| mmio_read8(b + i) != 0)
        .count();
    out()
        .s("TG: rng bytes=")
        .dec(u64::from(len))
        .s(" nonzero=")
        .dec(nonzero as u64)
        .nl();
}

// ---------------------------------------------------------------------------
// virtio-net.

const NET_F_MAC: u64 = 1 << 5;
/// virtio_net_hdr with VERSION_1 (num_buffers included), no MRG_RXBUF.
const VNET_HDR: u64 = 12;
const NET_RX_BUFS: usize = 4;
const NET_RX_LEN: u32 = 1526 + VNET_HDR as u32;
const ETHERTYPE: u16 = 0x88B5;
const PAYLOAD: &[u8] = b"TG virtio-net hello";
/// Minimum Ethernet frame without FCS: the payload is zero-padded to it.
const MIN_FRAME: u64 = 60;
/// `tg.netrx` waits up to this many 10 ms halts (~5 s).
const RX_NAPS: u32 = 500;

/// Checks the NIC; with `tg.netcount` returns its TX queue to go on with.
pub fn net(t: &Transport, o: &Opts) -> Option<Vq> {
    let feats = t.init(NET_F_MAC, 2);
    let mut rx = t.setup_queue(0);
    let mut tx = t.setup_queue(1);
    t.driver_ok();

    let mut mac = [0x02, 0, 0, 0, 0, 0x01];
    if feats & NET_F_MAC != 0 {
        for (i, m) in mac.iter_mut().enumerate() {
            *m = t.cfg_read8(i as u64);
        }
    }
    {
        let mut s = out();
        s.s("TG: net mac=");
        for (i, m) in mac.iter().enumerate() {
            if i > 0 {
                s.s(":");
            }
            s.hexw(u64::from(*m), 2);
        }
        if feats & NET_F_MAC == 0 {
            s.s(" (MAC not offered)");
        }
        s.nl();
    }

    let mut heads = [0u16; NET_RX_BUFS];
    for (i, h) in heads.iter_mut().enumerate() {
        let b = buf(OFF_NET_RX) + i as u64 * NET_RX_STRIDE;
        *h = rx.push(&[(b, NET_RX_LEN, true)]);
    }
    rx.sync_irqs();
    rx.kick();

    // TX: zeroed vnet header, then dst, src, ethertype, payload, padding.
    let p = buf(OFF_NET_TX);
    zero(p, VNET_HDR + MIN_FRAME + 4);
    let f = p + VNET_HDR;
    for i in 0..6 {
        mmio_write8(f + i, 0xFF);
        mmio_write8(f + 6 + i, mac[i as usize]);
    }
    mmio_write8(f + 12, (ETHERTYPE >> 8) as u8);
    mmio_write8(f + 13, ETHERTYPE as u8);
    for (i, b) in PAYLOAD.iter().enumerate() {
        mmio_write8(f + 14 + i as u64, *b);
    }
    net_send(&mut tx, t, "net tx");
    line("TG: net tx ok");

    if !o.netrx {
        return o.netcount.then_some(tx);
    }
    let (id, len) = rx.wait("net rx", RX_NAPS);
    let Some(i) = heads.iter().position(|&h| u32::from(h) == id) else {
        fail_dev("net rx used id", t.bdf)
    };
    if u64::from(len) < VNET_HDR + 14 || len > NET_RX_LEN {
        fail_dev("net rx length", t.bdf);
    }
    let frame = buf(OFF_NET_RX) + i as u64 * NET_RX_STRIDE + VNET_HDR;
    let flen = u64::from(len) - VNET_HDR;
    let etype = (u16::from(mmio_read8(frame + 12)) << 8) | u16::from(mmio_read8(frame + 13));
    out()
        .s("TG: net rx len=")
        .dec(flen)
        .s(" type=")
        .hexw(u64::from(etype), 4)
        .nl();
    // Payload as text: trailing zero padding dropped, printable ASCII only.
    let mut end = flen;
    while end > 14 && mmio_read8(frame + end - 1) == 0 {
        end -= 1;
    }
    let text = end > 14 && (14..end).all(|j| (0x20..0x7F).contains(&mmio_read8(frame + j)));
    if text {
        let mut s = out();
        s.s("TG: net rx payload=");
        for j in 14..end.min(14 + 80) {
            s.bytes(&[mmio_read8(frame + j)]);
        }
        s.nl();
    } else {
        out()
            .s("TG: net rx payload not text (")
            .dec(flen - 14)
            .s(" bytes)")
            .nl();
    }
    o.netcount.then_some(tx)
}

/// Sends the frame at `OFF_NET_TX` and waits for its completion.
fn net_send(tx: &mut Vq, t: &Transport, what: &str) {
    tx.sync_irqs();
    let head = tx.push(&[(buf(OFF_NET_TX), (VNET_HDR + MIN_FRAME) as u32, false)]);
    tx.kick();
    let (id, _) = tx.wait(what, WAIT_NAPS);
    if id != u32::from(head) {
        fail_dev("net tx used id != head", t.bdf);
    }
}

// ---------------------------------------------------------------------------
// virtio-fs: one FUSE_INIT on the first request queue.

const FUSE_INIT: u32 = 26;
const FUSE_MAJOR: u32 = 7;
const FUSE_MINOR: u32 = 31;
const FS_IN_LEN: u32 = 40 + 16;
const FS_OUT_LEN: u32 = 16 + 64;

pub fn fs(t: &Transport) {
    t.init(0, 2);
    let _hiprio = t.setup_queue(0);
    let mut q = t.setup_queue(1);
    t.driver_ok();
    let mut o = out();
    o.s("TG: fs tag=");
    for i in 0..36 {
        let b = t.cfg_read8(i);
        if b == 0 {
            break;
        }
        o.bytes(&[if (0x20..0x7F).contains(&b) { b } else { b'?' }]);
    }
    o.nl();
    drop(o);
    let (req, rep) = (buf(OFF_FS_IN), buf(OFF_FS_OUT));
    zero(req, u64::from(FS_IN_LEN));
    zero(rep, u64::from(FS_OUT_LEN));
    // fuse_in_header: len, opcode, unique; then fuse_init_in: major, minor.
    mmio_write32(req, FS_IN_LEN);
    mmio_write32(req + 4, FUSE_INIT);
    mmio_write32(req + 8, 1);
    mmio_write32(req + 40, FUSE_MAJOR);
    mmio_write32(req + 44, FUSE_MINOR);
    q.sync_irqs();
    let head = q.push(&[(req, FS_IN_LEN, false), (rep, FS_OUT_LEN, true)]);
    q.kick();
    let (id, _) = q.wait("fs FUSE_INIT", WAIT_NAPS);
    if id != u32::from(head) {
        fail_dev("fs used element", t.bdf);
    }
    // fuse_out_header: len, error (i32), unique; then fuse_init_out.
    let error = x86::mmio_read32(rep + 4) as i32;
    let unique = x86::mmio_read32(rep + 8);
    let major = x86::mmio_read32(rep + 16);
    let minor = x86::mmio_read32(rep + 20);
    if error != 0 || unique != 1 || major != FUSE_MAJOR {
        out()
            .s("TG: FAIL fs FUSE_INIT error=")
            .dec(u64::from(error.unsigned_abs()))
            .s(" major=")
            .dec(u64::from(major))
            .nl();
        x86::power_off();
    }
    out()
        .s("TG: fs init ok major=")
        .dec(u64::from(major))
        .s(" minor=")
        .dec(u64::from(minor))
        .nl();
}
