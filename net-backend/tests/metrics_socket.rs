//! `--metrics-socket`: net-backend as a process in the test's network
//! namespace (`ip netns exec`), on a tap there, counters fetched over its
//! HTTP endpoint while the synthetic frontend sends frames.

mod common;

use std::path::Path;
use std::time::Duration;

use backends::counters::check_prometheus_text;
use backends::metrics_server::get;
use common::*;
use serde_json::Value;

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

fn counters(metrics: &Path) -> Value {
    let reply = get(metrics, "/counters", HTTP_TIMEOUT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

#[test]
fn tx_frames_move_the_tx_queue_counters_and_the_totals() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("mj");
    let dir = TempDir::new("mj");
    let daemon = Daemon::start(&ns, &dir);
    let mut d = daemon.driver();
    let before = counters(&daemon.metrics);

    for i in 0..3 {
        let frame = test_frame(PEER_MAC, GUEST_MAC, 1000, i);
        d.send_wait(0, &PLAIN, &frame, TIMEOUT).unwrap();
    }
    let after = counters(&daemon.metrics);

    let at = |v: &Value, pointer: &str| v.pointer(pointer).and_then(Value::as_u64).unwrap();
    let delta = |pointer: &str| at(&after, pointer) - at(&before, pointer);
    assert_eq!(after["device"], "net");
    assert_eq!(
        (
            &after["queues"][0]["kind"],
            &after["queues"][1]["kind"],
            &after["queues"][2]["kind"]
        ),
        (&Value::from("rx"), &Value::from("tx"), &Value::from("ctrl"))
    );
    assert_eq!(
        (delta("/queues/1/tx_frames"), delta("/queues/1/tx_bytes")),
        (3, 3000)
    );
    assert_eq!(
        (delta("/totals/tx_frames"), delta("/totals/tx_bytes")),
        (3, 3000)
    );
    assert_eq!(delta("/queues/1/chains"), 3);
    assert_eq!(at(&after, "/queues/1/dropped_frames/bad_chain"), 0);
    assert_eq!(
        at(&after, "/totals/rx_frames"),
        at(&after, "/queues/0/rx_frames")
    );
}

#[test]
fn oversize_frame_is_a_labelled_drop_in_well_formed_prometheus_text() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("mp");
    let dir = TempDir::new("mp");
    let daemon = Daemon::start(&ns, &dir);
    let mut d = daemon.driver();
    d.send_wait(
        0,
        &PLAIN,
        &test_frame(PEER_MAC, GUEST_MAC, 1000, 1),
        TIMEOUT,
    )
    .unwrap();
    d.send_wait(
        0,
        &PLAIN,
        &test_frame(PEER_MAC, GUEST_MAC, 3000, 2),
        TIMEOUT,
    )
    .unwrap();

    let reply = get(&daemon.metrics, "/metrics", HTTP_TIMEOUT).unwrap();

    assert_eq!(reply.status, 200);
    // 17 samples on each of the 3 queues.
    assert_eq!(check_prometheus_text(&reply.body), Ok(51), "{}", reply.body);
    for line in [
        "# TYPE vmm_net_tx_frames_total counter",
        "vmm_net_tx_frames_total{queue=\"1\"} 1",
        "vmm_net_tx_bytes_total{queue=\"1\"} 1000",
        "vmm_net_dropped_frames_total{queue=\"1\",reason=\"oversize\"} 1",
        "vmm_net_dropped_frames_total{queue=\"0\",reason=\"bad_chain\"} 0",
        "# TYPE vmm_net_in_flight gauge",
        "vmm_net_in_flight{queue=\"1\"} 0",
    ] {
        assert!(
            reply.body.lines().any(|l| l == line),
            "{line:?} missing in\n{}",
            reply.body
        );
    }
}
