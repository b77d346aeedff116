//! A guest flooding a TX queue with malformed chains: net-backend as a
//! process in a network namespace, driven by the synthetic frontend, takes
//! 10^6 bad chains on the TX queue of pair 0 (short header, buffer outside
//! guest memory, unknown GSO type, checksum offset past the frame, frame
//! over the MTU, device-writable descriptor, frame shorter than an Ethernet
//! header, descriptor loop, available ring entry past the queue) while pair 1
//! sends real frames. Measured: the log lines the daemon writes
//! (rate-limited), its resident memory (flat), and the frames sent on pair 1,
//! their latency, and that the daemon wrote them all to the tap (its
//! `tx_frames` counter) and none of the malformed ones.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use backends::frontend::flood::{Bad, Flood, LogLines};
use backends::frontend::net::{NetDriver, HDR_LEN};
use backends::frontend::{Seg, SyntheticFrontend};
use backends::metrics_server::get;
use common::*;
use net_backend::vnet::F_NEEDS_CSUM;
use vm_memory::{Bytes, GuestAddress};

/// The frame pair 1 sends, and its size.
const FRAME: usize = 1000;
/// An oversize frame: more than the MTU plus the Ethernet header.
const BIG: u32 = 9000;

/// Guest buffers the malformed chains point at.
struct Bufs {
    plain: GuestAddress,
    bad_gso: GuestAddress,
    bad_csum: GuestAddress,
    frame: GuestAddress,
    outside: GuestAddress,
}

impl Bufs {
    fn new(fe: &mut SyntheticFrontend) -> Self {
        let mut header = |hdr: [u8; HDR_LEN]| {
            let at = fe.alloc(HDR_LEN as u64, 16).unwrap();
            fe.mem().write_slice(&hdr, at).unwrap();
            at
        };
        let plain = header(PLAIN);
        let mut gso = PLAIN;
        gso[1] = 0x55;
        let bad_gso = header(gso);
        let mut csum = PLAIN;
        csum[0] = F_NEEDS_CSUM;
        csum[6..8].copy_from_slice(&2000u16.to_le_bytes());
        let bad_csum = header(csum);
        let frame = fe.alloc(u64::from(BIG), 64).unwrap();
        let data = test_frame(PEER_MAC, GUEST_MAC, FRAME, 7);
        fe.mem().write_slice(&data, frame).unwrap();
        let outside = GuestAddress(fe.mem_size() + (1 << 20));
        Bufs {
            plain,
            bad_gso,
            bad_csum,
            frame,
            outside,
        }
    }

    /// The `i`th malformed chain of the flood.
    fn request(&self, i: usize) -> Bad {
        let seg = Seg::new;
        let hdr = |addr| seg(addr, HDR_LEN as u32, false);
        let frame = seg(self.frame, FRAME as u32, false);
        Bad::Chain(match i % 9 {
            0 => vec![seg(self.plain, 6, false)],
            1 => vec![hdr(self.plain), seg(self.outside, FRAME as u32, false)],
            2 => vec![hdr(self.bad_gso), frame],
            3 => vec![hdr(self.bad_csum), frame],
            4 => vec![hdr(self.plain), seg(self.frame, BIG, false)],
            5 => vec![hdr(self.plain), seg(self.frame, FRAME as u32, true)],
            6 => vec![hdr(self.plain), seg(self.frame, 8, false)],
            7 => return Bad::Loop(hdr(self.plain)),
            _ => return Bad::HeadPastQueue,
        })
    }
}

/// One frame sent on pair 1; returns its latency (posted to handed back).
fn send_valid(drv: &mut NetDriver, n: usize) -> Duration {
    let frame = test_frame(PEER_MAC, GUEST_MAC, FRAME, n as u8);
    let start = Instant::now();
    drv.send_wait(1, &PLAIN, &frame, TIMEOUT)
        .expect("valid frame sent");
    start.elapsed()
}

/// A queue's counter from the daemon's metrics endpoint.
fn counter(metrics: &std::path::Path, pointer: &str) -> u64 {
    let reply = get(metrics, "/counters", TIMEOUT).unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    v.pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing: {v}"))
}

#[test]
fn malformed_tx_flood_leaves_log_memory_and_other_pair_intact() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("flood");
    let dir = TempDir::new("flood");
    let mut daemon = Daemon::start_with_stderr(&ns, &dir, &["--queue-pairs", "2"], Stdio::piped());
    let lines = LogLines::watch(daemon.child.stderr.take().unwrap());
    let pid = daemon.child.id();
    let mut drv = daemon.driver_pairs(2);
    let bufs = Bufs::new(drv.frontend());

    let flood = Flood {
        queue: 1,
        ..Flood::default()
    };
    let mut report = flood
        .run(
            &mut drv,
            NetDriver::frontend,
            (pid, &lines),
            |i| bufs.request(i),
            send_valid,
            TIMEOUT,
        )
        .expect("flood");
    let n = report.latencies.len();
    report.latencies.push(send_valid(&mut drv, n));
    std::thread::sleep(Duration::from_millis(200));
    let logged = lines.count();
    let alive = daemon.child.try_wait().unwrap().is_none();
    let sent_frames = counter(&daemon.metrics, "/queues/3/tx_frames");
    let flood_frames = counter(&daemon.metrics, "/queues/1/tx_frames");

    let bound = flood.log_bound(&report);
    eprintln!(
        "net flood: {}, log bound {bound}, {sent_frames} frames written to the tap \
         from pair 1; last lines: {:#?}",
        report.summary(logged),
        lines.tail()
    );
    assert!(alive, "net-backend died under the flood");
    assert_eq!(flood.uncontained(&report, logged), None);
    let served = report.latencies.len();
    assert_eq!(served, flood.total / flood.batch + 1);
    assert_eq!(sent_frames, served as u64);
    assert_eq!(flood_frames, 0, "a malformed chain reached the tap");
}
