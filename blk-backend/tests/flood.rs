//! A guest flooding one queue with malformed requests: blk-backend as a
//! process, driven by the synthetic frontend, takes 10^6 bad requests on
//! queue 0 (sectors past the end, unknown types, short or device-writable
//! headers, missing or read-only status bytes, buffers outside guest memory,
//! bad discard flags, descriptor loops, available ring entries past the
//! queue) while queue 1 writes and reads back real data. Measured: the log
//! lines the daemon writes (rate-limited), its resident memory (flat), and
//! the valid requests served on queue 1 and their latency.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use backends::frontend::blk::{BlkDriver, BlkReq, Done, S_OK, T_IN};
use backends::frontend::flood::{Bad, Flood, LogLines};
use backends::frontend::{FrontendConfig, Seg, SyntheticFrontend};
use common::*;
use vm_memory::{Bytes, GuestAddress};

/// Guest buffers the malformed requests point at.
struct Bufs {
    /// A header per request type used, prewritten.
    read_past_end: GuestAddress,
    unknown_type: GuestAddress,
    read: GuestAddress,
    discard: GuestAddress,
    discard_seg: GuestAddress,
    status: GuestAddress,
    data: GuestAddress,
    /// An address past the end of guest memory.
    outside: GuestAddress,
}

impl Bufs {
    fn new(fe: &mut SyntheticFrontend) -> Self {
        let mut header = |kind: u32, sector: u64| {
            let at = fe.alloc(16, 16).unwrap();
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            fe.mem().write_slice(&h, at).unwrap();
            at
        };
        let read_past_end = header(T_IN, DISK / 512);
        let unknown_type = header(0x7777, 0);
        let read = header(T_IN, 0);
        let discard = header(backends::frontend::blk::T_DISCARD, 0);
        let discard_seg = fe.alloc(16, 16).unwrap();
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&0x80u32.to_le_bytes());
        fe.mem().write_slice(&seg, discard_seg).unwrap();
        let status = fe.alloc(1, 1).unwrap();
        let data = fe.alloc(4096, 4096).unwrap();
        let outside = GuestAddress(fe.mem_size() + (1 << 20));
        Bufs {
            read_past_end,
            unknown_type,
            read,
            discard,
            discard_seg,
            status,
            data,
            outside,
        }
    }

    /// The `i`th malformed request of the flood.
    fn request(&self, i: usize) -> Bad {
        let seg = Seg::new;
        let status = seg(self.status, 1, true);
        let data_in = seg(self.data, 4096, true);
        let header = seg(self.read, 16, false);
        Bad::Chain(match i % 11 {
            0 => vec![seg(self.read_past_end, 16, false), data_in, status],
            1 => vec![seg(self.unknown_type, 16, false), status],
            2 => vec![seg(self.read, 8, false), status],
            3 => vec![header, seg(self.outside, 4096, true), status],
            4 => vec![seg(self.read, 16, true), data_in, status],
            5 => vec![header, data_in],
            6 => vec![header, data_in, seg(self.status, 1, false)],
            7 => vec![
                seg(self.discard, 16, false),
                seg(self.discard_seg, 16, false),
                status,
            ],
            8 => vec![header, seg(self.data, 100, true), status],
            9 => return Bad::Loop(header),
            _ => return Bad::HeadPastQueue,
        })
    }
}

/// One valid request on queue 1: even `n` writes block `n / 2`'s pattern,
/// odd `n` reads it back. Returns its latency; panics unless it succeeds
/// with the right data.
fn valid_request(drv: &mut BlkDriver, n: usize) -> Duration {
    let block = (n / 2 % 512) as u64;
    let data = pattern((n / 2) as u8, 4096);
    let req = if n % 2 == 0 {
        BlkReq {
            kind: backends::frontend::blk::T_OUT,
            sector: block * 8,
            len: 4096,
            data: Some(&data),
            flags: 0,
        }
    } else {
        BlkReq::read(block * 8, 4096)
    };
    let start = Instant::now();
    let done: Done = drv.run(1, &req, TIMEOUT).expect("valid request served");
    let latency = start.elapsed();
    assert_eq!(done.status, S_OK, "valid request {n}");
    if n % 2 == 1 {
        assert_eq!(drv.slot_data(1, done.slot, 4096).unwrap(), data, "read {n}");
    }
    latency
}

#[test]
fn malformed_flood_on_one_queue_leaves_log_memory_and_other_queue_intact() {
    let dir = TempDir::new("flood");
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let mut backend = Backend::spawn_with_stderr(
        &dir.path("blk.sock"),
        &["--image", image.to_str().unwrap(), "--queues", "2"],
        Stdio::piped(),
    );
    let lines = LogLines::watch(backend.child.stderr.take().unwrap());
    let pid = backend.child.id();
    let cfg = FrontendConfig {
        queue_size: 256,
        ..config(2)
    };
    let mut fe = None;
    let deadline = Instant::now() + TIMEOUT;
    while fe.is_none() {
        fe = SyntheticFrontend::connect(&backend.socket, cfg.clone()).ok();
        assert!(Instant::now() < deadline, "backend socket never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut drv = BlkDriver::new(fe.unwrap(), 8, 4096).unwrap();
    let bufs = Bufs::new(drv.frontend());

    let flood = Flood::default();
    let mut report = flood
        .run(
            &mut drv,
            BlkDriver::frontend,
            (pid, &lines),
            |i| bufs.request(i),
            valid_request,
            TIMEOUT,
        )
        .expect("flood");
    // A last valid request: the flood left queue 1 working.
    let n = report.latencies.len() | 1;
    report.latencies.push(valid_request(&mut drv, n));
    std::thread::sleep(Duration::from_millis(200));
    let logged = lines.count();
    let alive = backend.is_running();
    drop(drv);

    let bound = flood.log_bound(&report);
    eprintln!(
        "flood: {}, log bound {bound}; last lines: {:#?}",
        report.summary(logged),
        lines.tail()
    );
    assert!(alive, "blk-backend died under the flood");
    assert_eq!(flood.uncontained(&report, logged), None);
    let served = report.latencies.len();
    assert_eq!(served, flood.total / flood.batch + 1);
}
