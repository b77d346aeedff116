//! net-backend against the synthetic frontend over a real vhost-user socket,
//! with a real multi-queue tap inside a network namespace the test creates.

mod common;

use backends::frontend::net::NetDriver;
use backends::frontend::net::HDR_LEN;
use backends::frontend::{FrontendConfig, Seg};
use common::*;
use net_backend::vnet::{F_NEEDS_CSUM, GSO_TCPV4};
use vm_memory::GuestAddress;

/// A virtio-net header for a TCP/IPv4 TSO frame with a partial checksum.
fn tso4_header() -> [u8; 12] {
    let mut hdr = [0u8; 12];
    hdr[0] = F_NEEDS_CSUM;
    hdr[1] = GSO_TCPV4;
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    hdr
}

#[test]
fn tx_frame_appears_on_tap() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("tx");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(1);
    let frame = test_frame(PEER_MAC, GUEST_MAC, 1000, 1);

    d.send_wait(0, &PLAIN, &frame, TIMEOUT).unwrap();

    let seen = sock.recv_matching(TIMEOUT, is_test_frame);
    assert_eq!(seen, frame);
    assert_eq!(be.device.metrics()[1].frames, 1);
    assert_eq!(be.device.metrics()[1].bytes, 1000);
}

#[test]
fn memory_added_as_slots_out_of_address_order_carries_frames() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("slots");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    // 4 MiB in two slots of 2 MiB, the upper one added first: the RX buffers
    // lie in the lower slot, the 32 TX slots of 70 KiB run into the upper one.
    let fe = be.frontend_cfg(FrontendConfig {
        mem_size: 4 << 20,
        num_queues: 3,
        queue_size: QUEUE_SIZE,
        mem_slots: true,
        ..Default::default()
    });
    let mut d = NetDriver::new(fe, 1, RX_BUF, 32, 70 << 10).unwrap();
    let frames: Vec<Vec<u8>> = (0..32)
        .map(|i| test_frame(PEER_MAC, GUEST_MAC, 1400, i))
        .collect();

    for f in &frames {
        assert!(d.send(0, &PLAIN, f).unwrap());
    }
    d.kick_tx(0);
    let mut seen = Vec::new();
    while seen.len() < frames.len() {
        seen.push(sock.recv_matching(TIMEOUT, is_test_frame));
    }
    let incoming = test_frame(GUEST_MAC, PEER_MAC, 1000, 99);
    sock.send(&incoming);
    let got = recv_matching(&mut d, 0, |f| is_test_frame(&f.data));

    assert_eq!(seen, frames);
    assert_eq!(got.data, incoming);
}

#[test]
fn frame_written_into_tap_arrives_on_rx() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("rx");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(1);
    let frame = test_frame(GUEST_MAC, PEER_MAC, 1400, 2);

    sock.send(&frame);

    let got = recv_matching(&mut d, 0, |f| is_test_frame(&f.data));
    assert_eq!(got.data, frame);
    assert_eq!((got.num_buffers(), got.buffers), (1, 1));
    assert!(be.device.metrics()[0].frames >= 1);
}

#[test]
fn tso_frame_from_tap_spans_mergeable_buffers() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("tso");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, true);
    let mut d = be.driver(1);
    let frame = ipv4_frame(6, 4000, 5001, 65000);
    let hdr = tso4_header();

    sock.send(&[&hdr[..10], &frame[..]].concat());

    let got = recv_matching(&mut d, 0, |f| f.data.len() == frame.len());
    let expected_buffers = (HDR_LEN + frame.len()).div_ceil(RX_BUF as usize) as u16;
    assert_eq!(got.hdr[1], GSO_TCPV4);
    assert_eq!(u16::from_le_bytes([got.hdr[4], got.hdr[5]]), 1448);
    assert_eq!(
        (got.num_buffers(), got.buffers),
        (expected_buffers, expected_buffers)
    );
    let differ: Vec<usize> = (0..frame.len())
        .filter(|&i| got.data[i] != frame[i])
        .collect();
    assert!(
        differ.is_empty(),
        "{} bytes differ, from {:?}",
        differ.len(),
        differ.first()
    );
}

#[test]
fn driver_without_guest_tso_or_mergeable_buffers_gets_segments() {
    if !have_tun() {
        return;
    }
    use net_backend::vnet::features::*;
    let ns = NetNs::new("nogso");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, true);
    let no_gso = !(GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | GUEST_UFO | MRG_RXBUF);
    let fe = be.frontend_with(1, no_gso);
    let mut d = backends::frontend::net::NetDriver::new(fe, 1, RX_BUF, 32, 70 << 10).unwrap();
    let frame = ipv4_frame(6, 4000, 5001, 65000);

    sock.send(&[&tso4_header()[..10], &frame[..]].concat());

    let mut segments = Vec::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let payload = |s: &[backends::frontend::net::RxFrame]| -> usize {
        s.iter().map(|f| f.data.len() - 54).sum()
    };
    while payload(&segments) < 65000 - 20 && std::time::Instant::now() < deadline {
        let mut out = Vec::new();
        let _ = d.wait_rx(0, std::time::Duration::from_millis(100), Some(&mut out));
        segments.extend(
            out.into_iter()
                .filter(|f| f.data.len() > 54 && f.data[23] == 6),
        );
    }
    assert_eq!(segments.len(), (65000 - 20usize).div_ceil(1448));
    assert!(segments
        .iter()
        .all(|f| f.data.len() <= 1514 && f.hdr[1] == 0 && f.buffers == 1));
    assert_eq!(be.device.acked_features() & (GUEST_TSO4 | MRG_RXBUF), 0);
}

#[test]
fn tso_frame_from_guest_reaches_the_tap_whole() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("gso");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(1);
    let frame = ipv4_frame(6, 5001, 4000, 65000);
    let hdr = tso4_header();

    d.send_wait(0, &hdr, &frame, TIMEOUT).unwrap();

    let seen = sock.recv_matching(TIMEOUT, |f| f.len() == frame.len());
    assert!(seen[54..] == frame[54..], "payload differs");
    assert_eq!(be.device.metrics()[1].bytes, frame.len() as u64);
}

#[test]
fn malformed_tx_chains_are_dropped_counted_and_queue_goes_on() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("bad");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(1);
    let fe = d.frontend();
    let buf = fe.alloc(4096, 64).unwrap();
    let seg = |addr: GuestAddress, len: u32, writable: bool| Seg {
        addr,
        len,
        writable,
    };
    let bad_chains = [
        vec![seg(GuestAddress(1 << 40), 100, false)],
        vec![seg(buf, 100, true)],
        vec![seg(buf, 8, false)],
        vec![seg(buf, 3000, false)],
    ];
    let (vq, mem) = fe.queue(1);
    for chain in &bad_chains {
        vq.add(mem, chain).unwrap().unwrap();
    }
    vq.notify();
    let good = test_frame(PEER_MAC, GUEST_MAC, 200, 3);

    d.send_wait(0, &PLAIN, &good, TIMEOUT).unwrap();

    assert_eq!(sock.recv_matching(TIMEOUT, is_test_frame), good);
    let m = be.device.metrics()[1];
    assert_eq!(
        (
            m.drop_bad_address,
            m.drop_bad_chain,
            m.drop_bad_header,
            m.drop_oversize
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(m.frames, 1);
}

/// A malformed chain behind frames still being written is handed back after
/// them, not at once: a restarted backend starts at the used index, so the
/// used ring must hold the chains in the order they were taken.
#[test]
fn tx_chains_come_back_in_the_order_they_were_taken_a_malformed_one_too() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("order");
    let be = TestBackend::start(&ns, 1, |_| {});
    let mut d = be.driver(1);
    let fe = d.frontend();
    let hdr = fe.alloc(HDR_LEN as u64, 64).unwrap();
    let frame = fe.alloc(1500, 64).unwrap();
    let short = fe.alloc(64, 64).unwrap();
    let mut taken = Vec::new();
    let (vq, mem) = fe.queue(1);
    for round in 0..20 {
        let good = [
            Seg::new(hdr, HDR_LEN as u32, false),
            Seg::new(frame, 1500, false),
        ];
        // Too short to be Ethernet: dropped as soon as it is read.
        let bad = [Seg::new(short, HDR_LEN as u32 + 5, false)];
        for chain in [&good[..], &good[..], &bad[..]] {
            taken.push(vq.add(mem, chain).unwrap().unwrap());
        }
        vq.notify();
        let mut used = Vec::new();
        while used.len() < 3 {
            vq.wait_used(mem, TIMEOUT, &mut used).unwrap();
        }
        let heads: Vec<u16> = used.iter().map(|u| u.head).collect();
        assert_eq!(heads, taken, "round {round}");
        taken.clear();
    }
    assert_eq!(be.device.metrics()[1].drop_bad_header, 20);
}

#[test]
fn readable_rx_chain_is_dropped_and_counted() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("badrx");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(1);
    let fe = d.frontend();
    let buf = fe.alloc(4096, 64).unwrap();
    let (vq, mem) = fe.queue(0);
    let readable = Seg {
        addr: buf,
        len: 4096,
        writable: false,
    };
    vq.add(mem, &[readable]).unwrap().unwrap();
    vq.notify();
    let frame = test_frame(GUEST_MAC, PEER_MAC, 100, 4);

    sock.send(&frame);

    let got = recv_matching(&mut d, 0, |f| is_test_frame(&f.data));
    assert_eq!(got.data, frame);
    // The worker may fill an earlier buffer before it reaches the bad chain.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while be.device.metrics()[0].drop_bad_chain == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(be.device.metrics()[0].drop_bad_chain, 1);
}

#[test]
fn multi_queue_spreads_flows_over_rx_queues() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("mq");
    let be = TestBackend::start(&ns, 2, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(2);
    let flows = 64u16;

    for port in 0..flows {
        sock.send(&ipv4_frame(17, 10_000 + port, 7, 100));
    }

    let mut per_queue = [0usize; 2];
    let deadline = std::time::Instant::now() + TIMEOUT;
    while per_queue.iter().sum::<usize>() < usize::from(flows)
        && std::time::Instant::now() < deadline
    {
        for (pair, n) in per_queue.iter_mut().enumerate() {
            let mut out = Vec::new();
            let _ = d.wait_rx(pair, std::time::Duration::from_millis(50), Some(&mut out));
            *n += out.iter().filter(|f| f.data.len() == 134).count();
        }
    }
    assert_eq!(per_queue.iter().sum::<usize>(), usize::from(flows));
    assert!(per_queue.iter().all(|&n| n > 0), "{per_queue:?}");
}

#[test]
fn both_tx_queues_reach_the_tap() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("mqtx");
    let be = TestBackend::start(&ns, 2, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let mut d = be.driver(2);
    let f0 = test_frame(PEER_MAC, GUEST_MAC, 300, 10);
    let f1 = test_frame(PEER_MAC, GUEST_MAC, 300, 11);

    d.send_wait(0, &PLAIN, &f0, TIMEOUT).unwrap();
    d.send_wait(1, &PLAIN, &f1, TIMEOUT).unwrap();

    assert_eq!(sock.recv_matching(TIMEOUT, is_test_frame), f0);
    assert_eq!(sock.recv_matching(TIMEOUT, is_test_frame), f1);
    let m = be.device.metrics();
    assert_eq!((m[1].frames, m[3].frames), (1, 1));
}

#[test]
fn control_queue_accepts_valid_queue_pairs_only() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("ctl");
    let be = TestBackend::start(&ns, 2, |_| {});
    let mut d = be.driver(2);

    let ok = d.ctrl(4, 0, &2u16.to_le_bytes(), TIMEOUT).unwrap();
    let too_many = d.ctrl(4, 0, &3u16.to_le_bytes(), TIMEOUT).unwrap();

    assert_eq!((ok, too_many), (0, 1));
}

#[test]
fn config_space_has_mac_status_pairs_and_mtu() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("cfg");
    let be = TestBackend::start(&ns, 2, |c| c.mtu = 9000);

    let fe = be.frontend(2);

    let c = fe.config_space();
    assert_eq!(&c[0..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
}

#[test]
fn offloads_follow_what_the_tap_accepts() {
    if !have_tun() {
        return;
    }
    use net_backend::vnet::features::*;
    let ns = NetNs::new("off");
    let be = TestBackend::start(&ns, 1, |_| {});
    let plain = TestBackend::start(&ns, 1, |c| {
        c.offloads = false;
        c.mrg_rxbuf = false;
    });

    let acked = be.frontend(1).acked_features();
    let acked_plain = plain.frontend(1).acked_features();

    let want = CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4 | MRG_RXBUF | EVENT_IDX | MQ;
    assert_eq!(acked & want, want);
    assert_eq!(acked_plain & (CSUM | GUEST_CSUM | HOST_TSO4 | MRG_RXBUF), 0);
}

#[test]
fn traffic_resumes_after_frontend_reconnects() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("rec");
    let be = TestBackend::start(&ns, 1, |_| {});
    let sock = PacketSocket::open(&ns, &be.tap, false);
    let first = test_frame(PEER_MAC, GUEST_MAC, 500, 20);
    let second = test_frame(PEER_MAC, GUEST_MAC, 500, 21);
    let mut d = be.driver(1);
    d.send_wait(0, &PLAIN, &first, TIMEOUT).unwrap();
    assert_eq!(sock.recv_matching(TIMEOUT, is_test_frame), first);
    drop(d);

    let mut d = be.driver(1);
    d.send_wait(0, &PLAIN, &second, TIMEOUT).unwrap();
    let rx = test_frame(GUEST_MAC, PEER_MAC, 600, 22);
    sock.send(&rx);

    assert_eq!(sock.recv_matching(TIMEOUT, is_test_frame), second);
    assert_eq!(
        recv_matching(&mut d, 0, |f| is_test_frame(&f.data)).data,
        rx
    );
    assert_eq!(be.device.metrics()[1].frames, 2);
}

#[test]
fn missing_tap_without_create_is_a_clear_error() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("miss");
    let mut cfg = net_backend::NetConfig::new("/tmp/unused.sock".into(), "nbnosuch0");
    cfg.create_tap = false;

    let err = ns.enter(move || {
        net_backend::build_device(&cfg)
            .err()
            .map(|e| format!("{e}: {}", std::error::Error::source(&e).unwrap()))
    });

    assert_eq!(
        err.as_deref(),
        Some("Cannot set up the tap: Tap nbnosuch0 does not exist (use --create-tap)")
    );
}
