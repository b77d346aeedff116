//! net-backend killed with `kill -9` at random moments while frames flow
//! both ways, and started again on the same tap, as the nested rig's crash
//! loop does under a Linux guest.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use backends::qemu::KillMoments;

use common::*;

const KILLS: usize = 30;
/// TX slots of [`Daemon::driver`].
const TX_SLOTS: usize = 32;

/// A restarted backend starts each ring where the used index says (vmm and
/// QEMU do so when a backend without inflight tracking comes back). So it
/// must never hand back a chain the driver already got back: Linux logs
/// "id N is not a head!", marks the queue broken, and its transmit path
/// then spins for good with the queue lock held. And frames must still
/// move both ways after the last restart.
#[test]
fn a_backend_killed_30_times_under_traffic_never_returns_a_chain_twice() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("kill");
    let dir = TempDir::new("kill");
    // Every daemon warns of the frames it drops: their logs are dropped.
    let mut daemon = Daemon::start_with_stderr(&ns, &dir, &[], Stdio::null());
    let sock = PacketSocket::open(&ns, &daemon.tap, false);
    let mut d = daemon.driver();
    let mut moments = KillMoments::new("NET_KILL_SEED");
    let mut sent = 0u64;
    let mut received = 0u64;
    for kill in 0..KILLS {
        let until = Instant::now() + moments.below(Duration::from_millis(30));
        let mut seq = 0u8;
        loop {
            // Both directions, with odd lengths so that the TX ring holds
            // chains of different sizes when the kill lands.
            let len = 60 + (moments.next_u64() % 1400) as usize;
            // Now and then a frame too short to be Ethernet, which the
            // backend drops at once while the frames before it are still
            // being written.
            let frame = match moments.next_u64() % 8 {
                0 => vec![0u8; 5],
                _ => test_frame(PEER_MAC, GUEST_MAC, len, seq),
            };
            while d.send(0, &PLAIN, &frame).unwrap() {
                seq = seq.wrapping_add(1);
                sent += 1;
            }
            d.kick_tx(0);
            sock.send(&test_frame(GUEST_MAC, PEER_MAC, len, seq));
            d.reclaim_tx(0).unwrap();
            received += d.poll_rx(0, None).unwrap().frames;
            if Instant::now() >= until {
                break;
            }
        }
        daemon.restart(&ns, &dir);
        d.frontend()
            .reconnect(&daemon.socket)
            .unwrap_or_else(|e| panic!("reconnect after kill {kill}: {e}"));
    }
    let last = test_frame(PEER_MAC, GUEST_MAC, 700, 0xee);
    // Every chain the dead backends left is resent or refilled by the new
    // one: wait for every TX slot to come back, then for one more frame.
    let deadline = Instant::now() + TIMEOUT;
    while d.tx_free(0) < TX_SLOTS {
        assert!(Instant::now() < deadline, "TX chains never came back");
        d.kick_tx(0);
        let _ = d.wait_tx(0, Duration::from_millis(100));
    }
    d.send_wait(0, &PLAIN, &last, TIMEOUT).unwrap();
    assert_eq!(sock.recv_matching(TIMEOUT, |f| f == last.as_slice()), last);
    let rx = test_frame(GUEST_MAC, PEER_MAC, 800, 0xef);
    sock.send(&rx);
    assert_eq!(
        recv_matching(&mut d, 0, |f| f.data == rx).data,
        rx,
        "no frame received after the last restart"
    );
    println!("{KILLS} kills: {sent} frames sent, {received} received in between");

    let fe = d.frontend();
    assert_eq!(fe.queue(1).0.spurious_used(), 0, "TX chains returned twice");
    assert_eq!(fe.queue(0).0.spurious_used(), 0, "RX chains returned twice");
}
