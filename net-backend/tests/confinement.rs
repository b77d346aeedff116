//! The daemon confines itself: every thread under a seccomp filter once the
//! queues run, `--user` drops root.

mod common;

use std::time::{Duration, Instant};

use backends::seccomp::thread_modes;
use common::*;

/// The daemon's threads once `count` of them (io_uring's kernel workers
/// aside) exist and have their own names, or whatever there is at the
/// timeout. A thread just cloned still carries the daemon's name until it
/// names itself, so a duplicate name means one is still starting.
fn threads(daemon: &Daemon, count: usize) -> Vec<(String, u32)> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let modes = thread_modes(daemon.child.id()).unwrap();
        let user: Vec<&str> = modes
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !n.starts_with("iou-"))
            .collect();
        let named = user.windows(2).all(|w| w[0] != w[1]);
        if (user.len() >= count && named) || Instant::now() > deadline {
            return modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_thread_is_under_a_seccomp_filter_while_queues_run() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("sc");
    let dir = TempDir::new("sc");
    let mut daemon = Daemon::start_with(&ns, &dir, &["--metrics-interval", "1"]);
    let mut d = daemon.driver();

    let frame = test_frame(PEER_MAC, GUEST_MAC, 1000, 1);
    d.send_wait(0, &PLAIN, &frame, TIMEOUT).unwrap();
    let modes = threads(&daemon, 6);
    // The metrics logger wakes up once under its filter.
    std::thread::sleep(Duration::from_millis(1500));
    let exited = daemon.child.try_wait().unwrap();

    // io_uring's kernel workers (iou-wrk-*) come and go and run no user code.
    let names: Vec<&str> = modes
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with("iou-"))
        .collect();
    assert_eq!(
        names,
        [
            "metrics",
            "metrics-log",
            "net-backend",
            "queue0",
            "queue1",
            "queue2"
        ]
    );
    assert!(modes.iter().all(|(_, m)| *m == 2), "{modes:?}");
    assert_eq!(exited, None);
}

#[test]
fn user_nobody_runs_the_daemon_without_root() {
    if !have_tun() {
        return;
    }
    let ns = NetNs::new("us");
    let dir = TempDir::new("us");
    let daemon = Daemon::start_with(&ns, &dir, &["--user", "nobody"]);
    let mut d = daemon.driver();

    let frame = test_frame(PEER_MAC, GUEST_MAC, 1000, 2);
    d.send_wait(0, &PLAIN, &frame, TIMEOUT).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();

    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (field("Uid:"), field("Gid:")),
        (
            "Uid:\t65534\t65534\t65534\t65534".to_string(),
            "Gid:\t65534\t65534\t65534\t65534".to_string()
        )
    );
}
