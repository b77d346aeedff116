//! The daemon confines itself: every thread under a seccomp filter once the
//! queues run, `--user` drops root, the listening socket is private.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use backends::frontend::blk::{BlkDriver, S_OK};
use backends::seccomp::thread_modes;
use common::*;

/// The daemon's threads once `count` of them (io_uring's kernel workers
/// aside) exist and have their own names, or whatever there is at the
/// timeout. A thread just cloned still carries the daemon's name until it
/// names itself, so a duplicate name means one is still starting.
fn threads(backend: &Backend, count: usize) -> Vec<(String, u32)> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let modes = thread_modes(backend.child.id()).unwrap();
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

/// The value fields of a `/proc/PID/status` line such as `Uid:`.
fn status_field(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
    line.split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Writes and reads back on each of `queues` queues, so every worker runs;
/// the returned frontend keeps them running.
fn exercise(backend: &Backend, queues: usize) -> BlkDriver {
    let mut drv = driver(&backend.socket, config(queues));
    for q in 0..queues {
        let data = pattern(q as u8, 4096);
        assert_eq!(drv.write(q, 8 * q as u64, &data, TIMEOUT).unwrap(), S_OK);
        let (st, back) = drv.read(q, 8 * q as u64, 4096, TIMEOUT).unwrap();
        assert_eq!((st, back), (S_OK, data));
    }
    drv
}

#[test]
fn every_thread_is_under_a_seccomp_filter_while_queues_run() {
    let dir = TempDir::new("sc");
    let metrics = dir.path("metrics.sock");
    let args = [
        "--queues",
        "2",
        "--metrics-socket",
        metrics.to_str().unwrap(),
    ];
    let (backend, _) = Backend::with_image(&dir, DISK, &args);

    let _drv = exercise(&backend, 2);
    let modes = threads(&backend, 4);

    // io_uring's kernel workers (iou-wrk-*) come and go and run no user code.
    let names: Vec<&str> = modes
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with("iou-"))
        .collect();
    assert_eq!(names, ["blk-backend", "metrics", "queue0", "queue1"]);
    assert!(modes.iter().all(|(_, m)| *m == 2), "{modes:?}");
}

#[test]
fn seccomp_false_leaves_every_thread_unfiltered() {
    let dir = TempDir::new("scoff");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--seccomp", "false"]);

    let _drv = exercise(&backend, 1);
    let modes = threads(&backend, 2);

    let names: Vec<&str> = modes
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with("iou-"))
        .collect();
    assert_eq!(names, ["blk-backend", "queue0"]);
    assert!(modes.iter().all(|(_, m)| *m == 0), "{modes:?}");
}

#[test]
fn user_nobody_runs_the_daemon_without_root() {
    let dir = TempDir::new("user");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--user", "nobody"]);

    let _drv = exercise(&backend, 1);
    let pid = backend.child.id();
    let (uids, gids) = (status_field(pid, "Uid:"), status_field(pid, "Gid:"));
    let groups = status_field(pid, "Groups:");

    assert_eq!(uids, [65534; 4]);
    assert_eq!(gids, [65534; 4]);
    assert_eq!(groups, [65534]);
}

#[test]
fn listening_socket_is_private_and_handed_to_the_user() {
    let dir = TempDir::new("sockmode");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--user", "nobody"]);

    let _drv = exercise(&backend, 1);
    let meta = std::fs::metadata(&backend.socket).unwrap();

    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid()),
        (0o600, 65534)
    );
}
