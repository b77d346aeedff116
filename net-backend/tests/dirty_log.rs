//! Dirty page logging for live migration, net-backend against the synthetic
//! frontend with a real tap in a network namespace: frames written into the
//! tap land in the guest's RX buffers, and exactly the pages the backend
//! wrote (headers with `num_buffers`, frames, the RX used ring) are marked
//! in the log the frontend handed over with SET_LOG_BASE.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use backends::dirty_log::LOG_PAGE;
use backends::frontend::net::{NetDriver, RxFrame};
use backends::frontend::FrontendConfig;
use common::*;
use net_backend::event_handler::ctrl::{CLASS_MQ, MQ_VQ_PAIRS_SET, OK};
use net_backend::vnet::{F_NEEDS_CSUM, GSO_TCPV4};
use vm_memory::{Bytes, GuestAddress};

/// A virtio-net header (10 bytes, as the packet socket takes it) for a
/// TCP/IPv4 TSO frame with a partial checksum.
fn tso4_header() -> [u8; 10] {
    let mut hdr = [0u8; 10];
    hdr[0] = F_NEEDS_CSUM;
    hdr[1] = GSO_TCPV4;
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    hdr
}

fn pages(addr: GuestAddress, len: u64) -> BTreeSet<u64> {
    if len == 0 {
        return BTreeSet::new();
    }
    (addr.0 / LOG_PAGE..=(addr.0 + len - 1) / LOG_PAGE).collect()
}

fn logging_driver(be: &TestBackend) -> NetDriver {
    let fe = be.frontend_cfg(FrontendConfig {
        mem_size: 48 << 20,
        num_queues: 3,
        queue_size: QUEUE_SIZE,
        dirty_log: true,
        ..Default::default()
    });
    NetDriver::new(fe, 1, RX_BUF, 32, 70 << 10).unwrap()
}

/// Waits until the RX worker has taken every posted buffer and re-enabled
/// notifications (avail_event caught up with the available index): from
/// then on only a frame's delivery writes the RX used ring.
fn wait_rx_idle(d: &mut NetDriver) {
    let deadline = Instant::now() + TIMEOUT;
    let (vq, mem) = d.frontend().queue(0);
    let (used, len) = vq.used_ring();
    let avail_event = GuestAddress(used.0 + len - 2);
    while mem.load::<u16>(avail_event, Ordering::Acquire).unwrap() != vq.avail_idx() {
        assert!(Instant::now() < deadline, "RX never took its buffers");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits until `buffers` more RX buffers are used than `from`, and a little
/// longer for stragglers (frames the kernel sends on its own).
fn wait_rx_used(d: &mut NetDriver, from: u16, buffers: u16) {
    let deadline = Instant::now() + TIMEOUT;
    let (vq, mem) = d.frontend().queue(0);
    while vq.used_idx(mem).unwrap().wrapping_sub(from) < buffers {
        assert!(Instant::now() < deadline, "frames never arrived");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
}

/// Every frame received on pair 0 since the last call, without waiting.
fn drain_rx(d: &mut NetDriver) -> Vec<RxFrame> {
    let mut frames = Vec::new();
    d.poll_rx(0, Some(&mut frames)).unwrap();
    frames
}

#[test]
fn received_frames_dirty_exactly_their_buffers_and_the_rx_used_ring() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("dlrx");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, true);
    let mut d = logging_driver(&be);
    wait_rx_idle(&mut d);
    // Frames from before logging (there should be none: IPv6 is off in the
    // namespace) are no part of this.
    if !drain_rx(&mut d).is_empty() {
        wait_rx_idle(&mut d);
    }
    d.frontend().set_log_base().unwrap();
    d.frontend().set_logging(true).unwrap();
    let plain: Vec<Vec<u8>> = (0..3)
        .map(|i| test_frame(GUEST_MAC, PEER_MAC, 600 + 400 * i, i as u8))
        .collect();
    let tso = ipv4_frame(6, 4000, 5001, 20000);
    let (vq, mem) = d.frontend().queue(0);
    let from = vq.used_idx(mem).unwrap();
    let tso_buffers = (12 + tso.len()).div_ceil(RX_BUF as usize) as u16;

    for f in &plain {
        sock.send(&[&[0u8; 10][..], f].concat());
    }
    sock.send(&[&tso4_header()[..], &tso[..]].concat());
    wait_rx_used(&mut d, from, 3 + tso_buffers);
    d.frontend().stop_queues().unwrap();
    let dirty: BTreeSet<u64> = d.frontend().take_dirty().into_iter().collect();
    let frames = drain_rx(&mut d);

    let (used, len) = d.frontend().queue(0).0.used_ring();
    let mut expected = pages(used, len);
    for f in &frames {
        for &(addr, n) in &f.placed {
            expected.extend(pages(addr, u64::from(n)));
        }
    }
    let big = frames.iter().find(|f| f.data.len() == tso.len()).unwrap();
    assert_eq!(big.buffers, tso_buffers);
    assert!(plain.iter().all(|p| frames.iter().any(|f| &f.data == p)));
    assert_eq!(dirty, expected);
}

#[test]
fn frames_received_after_logging_is_switched_off_set_no_bits() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("dloff");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = logging_driver(&be);
    d.frontend().set_log_base().unwrap();
    d.frontend().set_logging(true).unwrap();
    d.frontend().set_logging(false).unwrap();
    d.frontend().stop_queues().unwrap();
    d.frontend().take_dirty();
    d.frontend().resume_queues().unwrap();
    let frame = test_frame(GUEST_MAC, PEER_MAC, 1000, 7);

    sock.send(&frame);
    let got = recv_matching(&mut d, 0, |f| is_test_frame(&f.data));
    d.frontend().stop_queues().unwrap();

    assert_eq!(got.data, frame);
    assert_eq!(d.frontend().take_dirty(), Vec::<u64>::new());
}

#[test]
fn control_queue_ack_dirties_its_page_and_the_control_used_ring() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("dlctl");
    let be = TestBackend::start(&ns, 1, |_| {});
    let mut d = logging_driver(&be);
    wait_rx_idle(&mut d);
    d.frontend().set_log_base().unwrap();
    d.frontend().set_logging(true).unwrap();

    let ack = d.ctrl(CLASS_MQ, MQ_VQ_PAIRS_SET, &[1, 0], TIMEOUT).unwrap();
    d.frontend().stop_queues().unwrap();
    let dirty: BTreeSet<u64> = d.frontend().take_dirty().into_iter().collect();

    let (used, len) = d.frontend().queue(2).0.used_ring();
    let mut expected = pages(used, len);
    expected.extend(pages(d.ctrl_ack_addr().unwrap(), 1));
    assert_eq!(ack, OK);
    assert_eq!(dirty, expected);
}
