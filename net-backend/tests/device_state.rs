//! VHOST_USER_PROTOCOL_F_DEVICE_STATE between real net-backend processes
//! (seccomp on, in the test's network namespace): the driver sets queue
//! pairs, RX mode and MAC filters through the control queue, the frontend
//! stops the rings and saves the state, and a new daemon loaded with it
//! shows the same settings on its metrics endpoint and moves frames.

mod common;

use std::path::Path;
use std::time::Duration;

use backends::frontend::FrontendError;
use backends::metrics_server::get;
use common::*;
use net_backend::event_handler::ctrl::{
    CLASS_MAC, CLASS_MQ, CLASS_RX, MAC_TABLE_SET, MQ_VQ_PAIRS_SET, OK,
};
use serde_json::Value;

const PAIRS: &[&str] = &["--queue-pairs", "2", "--seccomp", "true"];

/// `(pairs in use, RX mode bits, MAC filter entries)` on the metrics endpoint.
fn ctrl_settings(metrics: &Path) -> (u64, u64, u64) {
    let reply = get(metrics, "/counters", Duration::from_secs(5)).unwrap();
    let v: Value = serde_json::from_str(&reply.body).unwrap();
    let at = |name: &str| v["totals"][name].as_u64().unwrap();
    (
        at("ctrl_queue_pairs"),
        at("ctrl_rx_mode"),
        at("ctrl_mac_filters"),
    )
}

/// One unicast and two multicast entries.
fn mac_tables() -> Vec<u8> {
    let mut t = vec![1, 0, 0, 0];
    t.extend_from_slice(&PEER_MAC);
    t.extend_from_slice(&[2, 0, 0, 0]);
    t.extend_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1, 0x01, 0x00, 0x5e, 0, 0, 2]);
    t
}

#[test]
fn control_queue_settings_saved_from_one_daemon_apply_in_a_new_one() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("ds");
    let (dir_a, dir_b) = (TempDir::new("dsa"), TempDir::new("dsb"));
    let first = Daemon::start_with(&ns, &dir_a, PAIRS);
    let mut d = first.driver_pairs(2);
    let acks = [
        d.ctrl(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes(), TIMEOUT),
        d.ctrl(CLASS_RX, 0, &[1], TIMEOUT),
        d.ctrl(CLASS_MAC, MAC_TABLE_SET, &mac_tables(), TIMEOUT),
    ];
    assert!(acks.iter().all(|a| matches!(a, Ok(OK))), "{acks:?}");
    d.frontend().stop_queues().unwrap();
    let state = d.frontend().save_device_state().unwrap();
    let second = Daemon::start_with(&ns, &dir_b, PAIRS);
    let before = ctrl_settings(&second.metrics);

    d.frontend()
        .reconnect_with_state(&second.socket, &state)
        .unwrap();
    let after = ctrl_settings(&second.metrics);
    let sent = d.send_wait(1, &PLAIN, &test_frame(PEER_MAC, GUEST_MAC, 200, 1), TIMEOUT);

    assert_eq!(before, (0, 0, 0));
    assert_eq!(after, (2, 1, 3));
    assert!(sent.is_ok(), "{sent:?}");
}

#[test]
fn state_with_another_queue_count_is_refused_and_the_daemon_keeps_its_settings() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("dq");
    let (dir_a, dir_b) = (TempDir::new("dqa"), TempDir::new("dqb"));
    let first = Daemon::start_with(&ns, &dir_a, PAIRS);
    let mut d = first.driver_pairs(2);
    d.ctrl(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes(), TIMEOUT)
        .unwrap();
    d.frontend().stop_queues().unwrap();
    let state = d.frontend().save_device_state().unwrap();
    let single = Daemon::start_with(&ns, &dir_b, &["--seccomp", "true"]);
    let mut other = single.driver();
    other.ctrl(CLASS_RX, 0, &[1], TIMEOUT).unwrap();
    other.frontend().stop_queues().unwrap();

    let loaded = other.frontend().load_device_state(&state);

    assert!(matches!(loaded, Err(FrontendError::StateCheck(_))));
    assert_eq!(ctrl_settings(&single.metrics), (0, 1, 0));
}
