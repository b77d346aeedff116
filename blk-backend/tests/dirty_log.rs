//! Dirty page logging for live migration, against blk-backend as a real
//! process (seccomp on, as by default): the synthetic frontend negotiates
//! LOG_SHMFD, hands a memfd bitmap over with SET_LOG_BASE, switches LOG_ALL
//! and the rings' VHOST_VRING_F_LOG on, and reads the bitmap after
//! stopping the rings, as a VMM's last pre-copy round does.

mod common;

use std::collections::BTreeSet;

use backends::dirty_log::{LOG_ALL, LOG_PAGE};
use backends::frontend::blk::{BlkDriver, BlkReq, S_OK, T_GET_ID, T_IN};
use backends::frontend::{FrontendConfig, FrontendError, Seg, SyntheticFrontend};
use backends::memory::memfd_create;
use common::*;
use vm_memory::{Bytes, GuestAddress};

const IO: u32 = 128 << 10;

fn logging_driver(socket: &std::path::Path) -> BlkDriver {
    let cfg = FrontendConfig {
        dirty_log: true,
        ..config(1)
    };
    let fe = SyntheticFrontend::connect(socket, cfg).unwrap();
    BlkDriver::new(fe, 32, IO).unwrap()
}

/// SET_LOG_BASE, then LOG_ALL and VHOST_VRING_F_LOG on.
fn start_logging(drv: &mut BlkDriver) {
    drv.frontend().set_log_base().unwrap();
    drv.frontend().set_logging(true).unwrap();
}

/// The pages of `len` bytes at `addr`.
fn pages(addr: GuestAddress, len: u64) -> BTreeSet<u64> {
    (addr.0 / LOG_PAGE..=(addr.0 + len - 1) / LOG_PAGE).collect()
}

fn used_ring_pages(drv: &mut BlkDriver) -> BTreeSet<u64> {
    let (used, len) = drv.frontend().queue(0).0.used_ring();
    pages(used, len)
}

/// Stops the rings (the last round), then reads and clears the log.
fn last_round(drv: &mut BlkDriver) -> BTreeSet<u64> {
    drv.frontend().stop_queues().unwrap();
    drv.frontend().take_dirty().into_iter().collect()
}

/// Submits every request, kicks once and waits for all; returns the slots.
fn run_all(drv: &mut BlkDriver, reqs: &[BlkReq]) -> Vec<usize> {
    let slots: Vec<usize> = reqs
        .iter()
        .map(|r| drv.submit(0, r).unwrap().unwrap())
        .collect();
    drv.kick(0);
    let mut done = Vec::new();
    while done.len() < reqs.len() {
        drv.wait(0, TIMEOUT, &mut done).unwrap();
    }
    assert!(done.iter().all(|d| d.status == S_OK), "{done:?}");
    slots
}

#[test]
fn reads_dirty_exactly_their_buffers_their_status_bytes_and_the_used_ring() {
    let dir = TempDir::new("dl-read");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = logging_driver(&backend.socket);
    drv.write(0, 0, &pattern(1, IO as usize), TIMEOUT).unwrap();
    start_logging(&mut drv);
    let lens = [512u32, 4096, 8192, 3 * 4096 + 512, IO];
    let reqs: Vec<BlkReq> = lens.iter().map(|&l| BlkReq::read(8, l)).collect();

    let slots = run_all(&mut drv, &reqs);
    let dirty = last_round(&mut drv);

    let mut expected = used_ring_pages(&mut drv);
    for (&slot, &len) in slots.iter().zip(&lens) {
        let (data, status) = drv.slot_addrs(0, slot);
        expected.extend(pages(data, u64::from(len)));
        expected.extend(pages(status, 1));
    }
    assert_eq!(dirty, expected);
}

#[test]
fn writes_dirty_their_status_bytes_but_not_their_buffers() {
    let dir = TempDir::new("dl-write");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = logging_driver(&backend.socket);
    start_logging(&mut drv);
    let reqs: Vec<BlkReq> = (0..4).map(|i| BlkReq::write(i * 256, IO)).collect();

    let slots = run_all(&mut drv, &reqs);
    let dirty = last_round(&mut drv);

    let mut expected = used_ring_pages(&mut drv);
    let mut buffers = BTreeSet::new();
    for &slot in &slots {
        let (data, status) = drv.slot_addrs(0, slot);
        expected.extend(pages(status, 1));
        buffers.extend(pages(data, u64::from(IO)));
    }
    assert_eq!(dirty, expected);
    assert!(dirty.is_disjoint(&buffers));
}

#[test]
fn get_id_dirties_the_page_of_its_string() {
    let dir = TempDir::new("dl-getid");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--serial", "dirty-serial"]);
    let mut drv = logging_driver(&backend.socket);
    start_logging(&mut drv);
    let req = BlkReq {
        kind: T_GET_ID,
        len: 20,
        ..BlkReq::read(0, 0)
    };

    let done = drv.run(0, &req, TIMEOUT).unwrap();
    let dirty = last_round(&mut drv);

    let (data, status) = drv.slot_addrs(0, done.slot);
    let mut expected = used_ring_pages(&mut drv);
    expected.extend(pages(data, 20));
    expected.extend(pages(status, 1));
    assert_eq!(dirty, expected);
}

#[test]
fn read_through_the_direct_io_bounce_buffer_dirties_its_guest_buffer() {
    let dir = TempDir::new("dl-bounce");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--direct"]);
    let mut drv = logging_driver(&backend.socket);
    drv.write(0, 24, &pattern(9, 8192), TIMEOUT).unwrap();
    let fe = drv.frontend();
    let hdr = fe.alloc(16, 16).unwrap();
    let status = fe.alloc(1, 1).unwrap();
    // An odd address straddling a page boundary: O_DIRECT refuses it, so
    // storage reads into its aligned buffer and copies into this one.
    let buf = GuestAddress(fe.alloc(3 * 4096, 4096).unwrap().0 + 4096 - 7);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&T_IN.to_le_bytes());
    header[8..16].copy_from_slice(&24u64.to_le_bytes());
    fe.mem().write_slice(&header, hdr).unwrap();
    let segs = [
        Seg {
            addr: hdr,
            len: 16,
            writable: false,
        },
        Seg {
            addr: buf,
            len: 4096,
            writable: true,
        },
        Seg {
            addr: status,
            len: 1,
            writable: true,
        },
    ];
    start_logging(&mut drv);

    let (vq, mem) = drv.frontend().queue(0);
    vq.add(mem, &segs).unwrap().unwrap();
    vq.notify();
    vq.wait_used(mem, TIMEOUT, &mut Vec::new()).unwrap();
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, buf).unwrap();
    let dirty = last_round(&mut drv);

    let mut expected = used_ring_pages(&mut drv);
    expected.extend(pages(buf, 4096));
    expected.extend(pages(status, 1));
    assert!(got == pattern(9, 8192)[..4096], "data read back differs");
    assert_eq!(dirty, expected);
}

#[test]
fn used_ring_without_the_log_flag_is_not_logged() {
    let dir = TempDir::new("dl-noflag");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = logging_driver(&backend.socket);
    drv.frontend().set_log_base().unwrap();
    drv.frontend().set_logging_parts(true, false).unwrap();

    let done = drv.run(0, &BlkReq::read(0, 4096), TIMEOUT).unwrap();
    let dirty = last_round(&mut drv);

    let (data, status) = drv.slot_addrs(0, done.slot);
    let mut expected = pages(data, 4096);
    expected.extend(pages(status, 1));
    assert_eq!(dirty, expected);
}

#[test]
fn logging_switched_off_sets_no_more_bits() {
    let dir = TempDir::new("dl-off");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = logging_driver(&backend.socket);
    start_logging(&mut drv);
    let (_, data) = drv.read(0, 0, 4096, TIMEOUT).unwrap();
    let while_on = drv.frontend().take_dirty();
    drv.frontend().set_logging(false).unwrap();
    // Whatever the workers were still marking is done once they stop.
    drv.frontend().stop_queues().unwrap();
    drv.frontend().take_dirty();
    drv.frontend().resume_queues().unwrap();

    drv.write(0, 8, &pattern(2, 8192), TIMEOUT).unwrap();
    drv.read(0, 8, 8192, TIMEOUT).unwrap();
    let after = last_round(&mut drv);

    assert_eq!(data.len(), 4096);
    assert!(!while_on.is_empty());
    assert_eq!(after, BTreeSet::new());
}

#[test]
fn bad_log_base_is_refused_and_the_daemon_keeps_serving() {
    let dir = TempDir::new("dl-bad");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let file = memfd_create("short-log").unwrap();
    file.set_len(4096).unwrap();
    // (size, offset): larger than the file, starting past its end, empty.
    let bad = [(8192, 0), (16, 4096), (16, u64::MAX - 8), (0, 0)];

    let refused: Vec<bool> = bad
        .iter()
        .map(|&(size, offset)| {
            let mut drv = logging_driver(&backend.socket);
            let sent = drv.frontend().send_log_base(&file, size, offset);
            matches!(sent, Err(FrontendError::Vhost(_)))
        })
        .collect();
    let mut drv = logging_driver(&backend.socket);
    start_logging(&mut drv);
    let (status, _) = drv.read(0, 0, 4096, TIMEOUT).unwrap();

    assert_eq!(refused, [true; 4]);
    assert_eq!(status, S_OK);
    assert!(!last_round(&mut drv).is_empty());
    assert!(backend.is_running());
}

#[test]
fn a_new_connection_starts_without_the_old_log() {
    let dir = TempDir::new("dl-reconnect");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = logging_driver(&backend.socket);
    start_logging(&mut drv);
    drv.read(0, 0, 4096, TIMEOUT).unwrap();
    drv.frontend().stop_queues().unwrap();
    drv.frontend().take_dirty();

    drv.frontend().reconnect(&backend.socket).unwrap();
    // LOG_ALL without a SET_LOG_BASE on this connection: nothing to log into.
    drv.frontend().set_logging(true).unwrap();
    let (status, _) = drv.read(0, 0, 4096, TIMEOUT).unwrap();
    let old_log = last_round(&mut drv);

    assert_eq!(status, S_OK);
    assert_eq!(old_log, BTreeSet::new());
    assert!(backend.is_running());
}

#[test]
fn state_saved_while_logging_loads_into_a_backend_that_does_not_log() {
    let dir = TempDir::new("dl-state");
    let (first, image) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = logging_driver(&first.socket);
    start_logging(&mut drv);
    drv.write(0, 0, &pattern(4, 4096), TIMEOUT).unwrap();
    drv.frontend().stop_queues().unwrap();
    let state = drv.frontend().save_device_state().unwrap();
    drop(first);
    let second = Backend::spawn(&dir.path("b.sock"), &["--image", image.to_str().unwrap()]);

    drv.frontend()
        .reconnect_with_state(&second.socket, &state)
        .unwrap();
    let (status, data) = drv.read(0, 0, 4096, TIMEOUT).unwrap();

    let saved = backends::state::decode(&state).unwrap();
    assert_eq!(saved.common.features.unwrap() & LOG_ALL, 0);
    assert_eq!((status, data), (S_OK, pattern(4, 4096)));
}
