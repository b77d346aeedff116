//! `--metrics-socket`: blk-backend as a process, counters fetched over its
//! HTTP endpoint while the synthetic frontend does real I/O.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use backends::counters::check_prometheus_text;
use backends::frontend::blk::S_OK;
use backends::metrics_server::{get, request};
use common::*;
use serde_json::Value;

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A RAM-disk backend with `queues` queues and its metrics socket.
fn start(dir: &TempDir, queues: &str) -> (Backend, PathBuf) {
    let metrics = dir.path("metrics.sock");
    let backend = Backend::spawn(
        &dir.path("blk.sock"),
        &[
            "--storage",
            "memory:8M",
            "--queues",
            queues,
            "--metrics-socket",
            metrics.to_str().unwrap(),
        ],
    );
    wait_for_socket(&metrics);
    (backend, metrics)
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "no metrics socket at {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counters(metrics: &Path) -> Value {
    let reply = get(metrics, "/counters", HTTP_TIMEOUT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn field(v: &Value, name: &str) -> u64 {
    v[name].as_u64().unwrap()
}

#[test]
fn writes_move_the_json_counters_of_their_queue_and_the_totals() {
    let dir = TempDir::new("ms-json");
    let (backend, metrics) = start(&dir, "2");
    let mut drv = driver(&backend.socket, config(2));
    assert_eq!(drv.write(0, 0, &pattern(1, 4096), TIMEOUT).unwrap(), S_OK);
    let before = counters(&metrics);

    for i in 0..32 {
        assert_eq!(
            drv.write(1, 8 * i, &pattern(2, 4096), TIMEOUT).unwrap(),
            S_OK
        );
    }
    let after = counters(&metrics);

    let at = |v: &Value, pointer: &str| v.pointer(pointer).and_then(Value::as_u64).unwrap();
    let delta = |pointer: &str| at(&after, pointer) - at(&before, pointer);
    assert_eq!(after["device"], "blk");
    assert_eq!(
        (at(&after, "/queues/0/queue"), at(&after, "/queues/1/queue")),
        (0, 1)
    );
    assert_eq!(
        (delta("/queues/1/requests"), delta("/queues/1/write_bytes")),
        (32, 131072)
    );
    assert_eq!(
        (delta("/totals/requests"), delta("/totals/write_bytes")),
        (32, 131072)
    );
    assert_eq!(
        (delta("/queues/0/requests"), delta("/queues/0/write_bytes")),
        (0, 0)
    );
    assert_eq!(
        (
            at(&after, "/queues/1/in_flight"),
            at(&after, "/queues/1/errors")
        ),
        (0, 0)
    );
    assert!(delta("/queues/1/notifications") >= 1);
    assert_eq!(at(&after, "/totals/read_bytes"), 0);
}

#[test]
fn counters_go_on_across_a_frontend_reconnect() {
    let dir = TempDir::new("ms-reconnect");
    let (backend, metrics) = start(&dir, "1");
    let mut first = driver(&backend.socket, config(1));
    assert_eq!(first.write(0, 0, &pattern(1, 4096), TIMEOUT).unwrap(), S_OK);
    drop(first);

    let mut second = driver(&backend.socket, config(1));
    assert_eq!(
        second.write(0, 0, &pattern(2, 4096), TIMEOUT).unwrap(),
        S_OK
    );
    let v = counters(&metrics);

    assert_eq!(
        (
            field(&v["totals"], "requests"),
            field(&v["totals"], "write_bytes")
        ),
        (2, 8192)
    );
}

#[test]
fn metrics_endpoint_serves_well_formed_prometheus_text() {
    let dir = TempDir::new("ms-prom");
    let (backend, metrics) = start(&dir, "2");
    let mut drv = driver(&backend.socket, config(2));
    assert_eq!(drv.write(1, 0, &pattern(1, 4096), TIMEOUT).unwrap(), S_OK);

    let reply = get(&metrics, "/metrics", HTTP_TIMEOUT).unwrap();

    assert_eq!(reply.status, 200);
    assert!(
        reply.head.contains("text/plain; version=0.0.4"),
        "{}",
        reply.head
    );
    assert_eq!(check_prometheus_text(&reply.body), Ok(24), "{}", reply.body);
    for line in [
        "# TYPE vmm_blk_requests_total counter",
        "vmm_blk_requests_total{queue=\"0\"} 0",
        "vmm_blk_requests_total{queue=\"1\"} 1",
        "vmm_blk_write_bytes_total{queue=\"1\"} 4096",
        "vmm_blk_write_requests_total{queue=\"1\"} 1",
        "# TYPE vmm_blk_in_flight gauge",
        "vmm_blk_in_flight{queue=\"1\"} 0",
    ] {
        assert!(
            reply.body.lines().any(|l| l == line),
            "{line:?} missing in\n{}",
            reply.body
        );
    }
}

#[test]
fn unknown_path_is_404_post_is_405_and_garbage_is_400() {
    let dir = TempDir::new("ms-status");
    let (_backend, metrics) = start(&dir, "1");

    let missing = get(&metrics, "/nope", HTTP_TIMEOUT).unwrap();
    let post = request(
        &metrics,
        b"POST /counters HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        HTTP_TIMEOUT,
    )
    .unwrap();
    let garbage = request(&metrics, b"\x01\x02 not http\r\n\r\n", HTTP_TIMEOUT).unwrap();

    assert_eq!(
        (missing.status, post.status, garbage.status),
        (404, 405, 400)
    );
    assert!(
        post.head.to_ascii_lowercase().contains("allow: get"),
        "{}",
        post.head
    );
}

#[test]
fn silent_client_does_not_block_another() {
    let dir = TempDir::new("ms-silent");
    let (_backend, metrics) = start(&dir, "1");
    let _silent = UnixStream::connect(&metrics).unwrap();
    let t = Instant::now();

    let reply = get(&metrics, "/counters", HTTP_TIMEOUT).unwrap();

    assert_eq!(reply.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn socket_is_created_mode_0600() {
    let dir = TempDir::new("ms-mode");
    let (_backend, metrics) = start(&dir, "1");

    let mode = std::fs::metadata(&metrics).unwrap().permissions().mode();

    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn live_socket_is_refused_and_stale_one_replaced() {
    let dir = TempDir::new("ms-taken");
    let (_first, metrics) = start(&dir, "1");
    let stale = dir.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());

    let mut second = Backend::spawn_with_stderr(
        &dir.path("blk2.sock"),
        &[
            "--storage",
            "memory:1M",
            "--metrics-socket",
            metrics.to_str().unwrap(),
        ],
        Stdio::piped(),
    );
    let status = second.child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut second.child.stderr.take().unwrap(), &mut log).unwrap();
    let _third = Backend::spawn(
        &dir.path("blk3.sock"),
        &[
            "--storage",
            "memory:1M",
            "--metrics-socket",
            stale.to_str().unwrap(),
        ],
    );
    wait_for_socket(&stale);

    assert!(!status.success());
    assert!(log.contains("is in use"), "{log}");
    assert_eq!(get(&stale, "/counters", HTTP_TIMEOUT).unwrap().status, 200);
}

#[test]
fn sigterm_removes_the_socket() {
    let dir = TempDir::new("ms-term");
    let (mut backend, metrics) = start(&dir, "1");

    // SAFETY: sending a signal to our own child, which has not been reaped.
    let rc = unsafe { libc::kill(backend.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = backend.child.wait().unwrap();

    assert_eq!(rc, 0);
    assert!(status.success());
    assert!(!metrics.exists());
}
