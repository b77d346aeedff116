//! Live migration between real vmm processes running the test guest: over
//! TCP and a unix socket, local (memfd hand-over) and with a blk-backend
//! disk; the guest goes on where it was with its memory intact. Failures
//! (a garbage stream, a destination that dies, a guest that outruns the
//! link) leave the source running and the destination empty.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{blk_backend, workspace_bin, ApiVmm as Vmm, Daemon, Scratch, API_LIMIT as LIMIT};

/// Starts vm.receive-migration on `dest` (it blocks until the migration
/// ends) on a thread; returns its answer when joined.
fn receive(dest: &Vmm, url: &str) -> JoinHandle<(u16, String)> {
    let socket = dest.socket.clone();
    let body = serde_json::json!({ "receiver_url": url }).to_string();
    let t = std::thread::spawn(move || {
        let r = vmm::api::client::raw_with_body(
            &socket,
            "PUT",
            "vm.receive-migration",
            body.as_bytes(),
        );
        r.map(|r| (r.status, r.body))
            .unwrap_or_else(|e| (0, e.to_string()))
    });
    // The listener is up once the request is being served.
    std::thread::sleep(Duration::from_millis(300));
    t
}

fn send(source: &Vmm, body: serde_json::Value) -> (u16, String) {
    let r = vmm::api::client::call_with_timeout(
        &source.socket,
        vmm::api::ApiRequest::VmSendMigration,
        body.to_string().as_bytes(),
        Duration::from_secs(120),
    );
    match r {
        Ok(b) => (204, b),
        Err(vmm::api::client::ClientError::Server { status, message }) => (status, message),
        Err(e) => (0, e.to_string()),
    }
}

/// A free TCP port on the loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for the vmm process to end; its exit code.
fn exit_code(vm: &mut Vmm) -> Option<i32> {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if let Some(s) = vm.child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The last `prefix` count a VM printed before it stopped printing.
fn last_count(vm: &Vmm, prefix: &str) -> Option<u64> {
    let mut last = None;
    while let Ok(l) = vm.console.recv_timeout(Duration::from_millis(300)) {
        assert!(!l.contains("FAIL"), "{l}");
        // A count only grows: a smaller one is the first half of a line
        // the hand-over split ("... 7" on the source of "... 757").
        if let Some(n) = l.strip_prefix(prefix).and_then(|n| n.trim().parse().ok()) {
            last = last.max(Some(n));
        }
    }
    last
}

/// Migrates a VM running `cmdline` (whose rounds print `prefix` N, with
/// `disks`) to a new vmm through `url` and checks that it goes on there
/// from where it was: the source exits 0, the destination's next round
/// follows.
fn migrates_in(
    dir: &Scratch,
    cmdline: &str,
    cpus: u8,
    disks: serde_json::Value,
    prefix: &str,
    url: &str,
    local: bool,
) {
    let mut source = Vmm::start(dir, "source");
    source.boot(cmdline, cpus, disks);
    let before = source.next_count(prefix);
    let dest = Vmm::start(dir, "dest");
    let receiving = receive(&dest, url);

    let sent = send(
        &source,
        serde_json::json!({"destination_url": url, "local": local}),
    );
    let received = receiving.join().unwrap();
    assert_eq!(sent.0, 204, "{sent:?}");
    assert_eq!(received.0, 204, "{received:?}");
    let last = last_count(&source, prefix).unwrap_or(before);
    let code = exit_code(&mut source);
    let first = dest.next_count(prefix);
    let later = dest.next_count(prefix);

    assert_eq!(
        code,
        Some(0),
        "the source vmm must exit after the migration"
    );
    assert!(
        first == last + 1 || first == last + 2,
        "{last} on the source, then {first}"
    );
    assert_eq!(later, first + 1);
    assert_eq!(dest.state(), "Running");
}

fn vm_migrates(tag: &str, cmdline: &str, prefix: &str, url: &str, local: bool) {
    let dir = Scratch::new(tag);
    migrates_in(&dir, cmdline, 2, serde_json::json!([]), prefix, url, local);
}

#[test]
fn a_vm_dirtying_64_mib_migrates_over_tcp_with_every_page_intact() {
    let url = format!("tcp:127.0.0.1:{}", free_port());
    vm_migrates("mig-tcp", "tg.dirty=64", "TG: dirty ", &url, false);
}

#[test]
fn a_counting_vm_migrates_over_a_unix_socket() {
    let dir = Scratch::new("mig-unix-url");
    let url = format!("unix:{}", dir.path("m.sock").display());
    vm_migrates("mig-unix", "tg.count", "TG: count ", &url, false);
}

#[test]
fn a_local_migration_hands_memory_over_without_copying() {
    let dir = Scratch::new("mig-local-url");
    let url = format!("unix:{}", dir.path("m.sock").display());
    vm_migrates("mig-local", "tg.dirty=64", "TG: dirty ", &url, true);
}

/// A VM writing and reading back a block per round on blk-backend moves
/// to `url` (pre-copy with the backend's dirty log, or local) and its
/// rounds go on there, on the same backend.
fn disk_vm_migrates(tag: &str, url: &str, local: bool, qsd: bool) {
    let dir = Scratch::new(tag);
    let (blk, socket) = blk_backend(&dir, &[]);
    let (_backend, socket) = if qsd {
        drop(blk);
        second_backend(&dir, true)
    } else {
        (blk, socket)
    };
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    migrates_in(
        &dir,
        "tg.virtio tg.blkcount",
        1,
        disks,
        "TG: blkcount ",
        url,
        local,
    );
}

#[test]
fn a_vm_with_a_blk_backend_disk_migrates_over_tcp_and_goes_on_writing() {
    let url = format!("tcp:127.0.0.1:{}", free_port());
    disk_vm_migrates("mig-blk-tcp", &url, false, false);
}

#[test]
fn a_vm_with_a_qemu_storage_daemon_disk_migrates_over_tcp() {
    let url = format!("tcp:127.0.0.1:{}", free_port());
    disk_vm_migrates("mig-qsd-tcp", &url, false, true);
}

#[test]
fn a_vm_with_a_blk_backend_disk_is_upgraded_in_place() {
    let dir = Scratch::new("mig-blk-local-url");
    let url = format!("unix:{}", dir.path("m.sock").display());
    disk_vm_migrates("mig-blk-local", &url, true, false);
}

#[test]
fn a_garbage_stream_is_refused_and_nothing_is_started() {
    let dir = Scratch::new("mig-garbage");
    let dest = Vmm::start(&dir, "dest");
    let path = dir.path("m.sock");
    let receiving = receive(&dest, &format!("unix:{}", path.display()));

    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let received = receiving.join().unwrap();

    assert_eq!(received.0, 500, "{received:?}");
    assert!(
        received.1.contains("Not a migration stream"),
        "{received:?}"
    );
    assert_eq!(dest.state(), "404");
    let ping = vmm::api::client::raw(&dest.socket, "GET", "vmm.ping").unwrap();
    assert_eq!(ping.status, 200);
}

#[test]
fn a_truncated_or_wrong_version_stream_is_refused() {
    let dir = Scratch::new("mig-version");
    let dest = Vmm::start(&dir, "dest");
    let path = dir.path("m.sock");

    let receiving = receive(&dest, &format!("unix:{}", path.display()));
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut hello = Vec::new();
    vmm::migration::stream::write_hello(&mut hello, false).unwrap();
    hello[8] = 99;
    s.write_all(&hello).unwrap();
    let wrong_version = receiving.join().unwrap();

    let receiving = receive(&dest, &format!("unix:{}", path.display()));
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    vmm::migration::stream::write_hello(&mut s, false).unwrap();
    vmm::migration::stream::write_header(&mut s, vmm::migration::stream::Kind::Start, 1000)
        .unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    drop(s);
    let truncated = receiving.join().unwrap();

    assert_eq!(wrong_version.0, 500, "{wrong_version:?}");
    assert!(wrong_version.1.contains("version 99"), "{wrong_version:?}");
    assert_eq!(truncated.0, 500, "{truncated:?}");
    assert_eq!(dest.state(), "404");
}

#[test]
fn a_destination_killed_mid_migration_leaves_the_vm_running_on_the_source() {
    let dir = Scratch::new("mig-killed");
    let source = Vmm::start(&dir, "source");
    source.boot("tg.count", 1, serde_json::json!([]));
    let path = dir.path("m.sock");
    // A destination that takes the connection and the hello, then dies.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let killer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 16];
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        drop(s);
    });

    let sent = send(
        &source,
        serde_json::json!({"destination_url": format!("unix:{}", path.display())}),
    );
    killer.join().unwrap();
    let a = source.next_count("TG: count ");
    let b = source.next_count("TG: count ");

    assert_eq!(sent.0, 500, "{sent:?}");
    assert_eq!(b, a + 1);
    assert_eq!(source.state(), "Running");
}

#[test]
fn a_guest_that_never_converges_hits_the_timeout_and_runs_on() {
    let dir = Scratch::new("mig-timeout");
    let source = Vmm::start(&dir, "source");
    source.boot("tg.dirty=64", 1, serde_json::json!([]));
    let dest = Vmm::start(&dir, "dest");
    let url = format!("unix:{}", dir.path("m.sock").display());
    let receiving = receive(&dest, &url);

    // A 4 MiB/s link under a guest dirtying 64 MiB many times a second.
    let sent = send(
        &source,
        serde_json::json!({
            "destination_url": url,
            "downtime_ms": 10,
            "timeout_s": 3,
            "max_bandwidth_mibps": 4,
        }),
    );
    let received = receiving.join().unwrap();
    let a = source.next_count("TG: dirty ");
    let b = source.next_count("TG: dirty ");

    assert_eq!(sent.0, 500, "{sent:?}");
    assert!(sent.1.contains("did not converge"), "{sent:?}");
    assert_eq!(received.0, 500, "{received:?}");
    assert_eq!(b, a + 1);
    assert_eq!(dest.state(), "404");
}

#[test]
fn send_migration_without_a_vm_or_with_a_bad_url_is_refused() {
    let dir = Scratch::new("mig-bad");
    let vm = Vmm::start(&dir, "vm");
    let no_vm = send(&vm, serde_json::json!({"destination_url": "unix:/x"}));
    vm.boot("tg.count", 1, serde_json::json!([]));

    let bad_url = send(&vm, serde_json::json!({"destination_url": "file:///x"}));
    let local_tcp = send(
        &vm,
        serde_json::json!({"destination_url": "tcp:127.0.0.1:1", "local": true}),
    );
    let nobody = send(
        &vm,
        serde_json::json!({"destination_url": format!("unix:{}", dir.path("none").display())}),
    );

    assert_eq!(no_vm.0, 404, "{no_vm:?}");
    assert_eq!(bad_url.0, 400, "{bad_url:?}");
    assert_eq!(local_tcp.0, 400, "{local_tcp:?}");
    assert_eq!(nobody.0, 500, "{nobody:?}");
    assert_eq!(vm.state(), "Running");
}

#[test]
fn twenty_live_upgrades_in_a_row_under_disk_io_lose_no_round() {
    let dir = Scratch::new("mig-upgrades");
    let (_backend, socket) = blk_backend(&dir, &[]);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    let mut current = Vmm::start(&dir, "vmm0");
    current.boot("tg.virtio tg.blkcount", 1, disks);
    let mut last = current.next_count("TG: blkcount ");
    let url = format!("unix:{}", dir.path("m.sock").display());

    for i in 1..=20 {
        let next = Vmm::start(&dir, &format!("vmm{i}"));
        let receiving = receive(&next, &url);
        let sent = send(
            &current,
            serde_json::json!({"destination_url": url, "local": true}),
        );
        let received = receiving.join().unwrap();
        assert_eq!(sent.0, 204, "upgrade {i}: {sent:?}");
        assert_eq!(received.0, 204, "upgrade {i}: {received:?}");
        let seen = last_count(&current, "TG: blkcount ").unwrap_or(last);
        assert_eq!(exit_code(&mut current), Some(0), "upgrade {i}");
        let first = next.next_count("TG: blkcount ");
        assert!(
            first == seen + 1 || first == seen + 2,
            "upgrade {i}: {seen} before, then {first}"
        );
        last = first;
        current = next;
    }

    let later = current.next_count("TG: blkcount ");
    assert!(later > last);
}

/// A second backend on the same image: blk-backend on `<dir>/NAME.sock`,
/// or qemu-storage-daemon.
fn second_backend(dir: &Scratch, qsd: bool) -> (Daemon, PathBuf) {
    let image = dir.path("disk.img");
    let socket = dir.path(if qsd { "qsd.sock" } else { "blk2.sock" });
    let cmd = if qsd {
        common::qsd_command(&image, &socket)
    } else {
        let mut c = Command::new(workspace_bin("blk-backend"));
        c.arg("--socket").arg(&socket).arg("--image").arg(&image);
        c
    };
    (Daemon::start(cmd, &socket), socket)
}

/// A guest writing and verifying a block per round keeps going when its
/// disk moves to another backend, and the old backend can then go away.
fn disk_moves_under_io(tag: &str, qsd: bool) {
    let dir = Scratch::new(tag);
    let (mut old, socket) = blk_backend(&dir, &[]);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket, "id": "disk0"}]);
    let vm = Vmm::start(&dir, "vm");
    vm.boot("tg.virtio tg.blkcount", 1, disks);
    let before = vm.next_count("TG: blkcount ");
    let (_new, new_socket) = second_backend(&dir, qsd);

    let body = serde_json::json!({"id": "disk0", "vhost_socket": new_socket}).to_string();
    let swapped = vm.put("vm.swap-backend", &body);
    old.kill();
    let after = vm.next_count("TG: blkcount ");
    let later = vm.next_count("TG: blkcount ");
    let info = vmm::api::client::raw(&vm.socket, "GET", "vm.info").unwrap();

    assert_eq!(swapped.0, 204, "{swapped:?}");
    assert!(after > before);
    assert_eq!(later, after + 1);
    assert!(
        info.body.contains(new_socket.to_str().unwrap()),
        "{}",
        info.body
    );
}

#[test]
fn a_disk_moves_from_blk_backend_to_another_blk_backend_under_io() {
    disk_moves_under_io("swap-blk", false);
}

#[test]
fn a_disk_moves_from_blk_backend_to_qemu_storage_daemon_under_io() {
    disk_moves_under_io("swap-qsd", true);
}

#[test]
fn a_move_to_a_socket_nobody_listens_on_leaves_the_disk_where_it_was() {
    let dir = Scratch::new("swap-none");
    let (_backend, socket) = blk_backend(&dir, &[]);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket, "id": "disk0"}]);
    let vm = Vmm::start(&dir, "vm");
    vm.boot("tg.virtio tg.blkcount", 1, disks);
    let before = vm.next_count("TG: blkcount ");

    let nowhere = serde_json::json!({"id": "disk0", "vhost_socket": dir.path("none")});
    let refused = vm.put("vm.swap-backend", &nowhere.to_string());
    let no_device = vm.put(
        "vm.swap-backend",
        &serde_json::json!({"id": "disk9", "vhost_socket": socket}).to_string(),
    );
    let after = vm.next_count("TG: blkcount ");

    assert_eq!(refused.0, 500, "{refused:?}");
    assert_eq!(no_device.0, 404, "{no_device:?}");
    assert!(after > before);
}

#[test]
fn a_destination_vmm_killed_during_pre_copy_leaves_the_vm_and_its_disk_running() {
    let dir = Scratch::new("mig-dest-killed");
    let (_backend, socket) = blk_backend(&dir, &[]);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    let source = Vmm::start(&dir, "source");
    // Every page touched: pre-copy has 128 MiB to send.
    source.boot("tg.touch tg.virtio tg.blkcount", 1, disks);
    source.next_count("TG: blkcount ");
    let mut dest = Vmm::start(&dir, "dest");
    let url = format!("unix:{}", dir.path("m.sock").display());
    let receiving = receive(&dest, &url);
    let src_socket = source.socket.clone();
    // 1 MiB/s: pre-copy takes minutes.
    let body = serde_json::json!({"destination_url": url, "max_bandwidth_mibps": 1});
    let sending = std::thread::spawn(move || {
        let r = vmm::api::client::call_with_timeout(
            &src_socket,
            vmm::api::ApiRequest::VmSendMigration,
            body.to_string().as_bytes(),
            Duration::from_secs(120),
        );
        r.map_err(|e| e.to_string())
    });

    std::thread::sleep(Duration::from_millis(1500));
    let info = vmm::api::client::raw(&source.socket, "GET", "vm.info").unwrap();
    let _ = dest.child.kill();
    let _ = dest.child.wait();
    let sent = sending.join().unwrap();
    let _ = receiving.join();
    let a = source.next_count("TG: blkcount ");
    let b = source.next_count("TG: blkcount ");

    let progress: serde_json::Value = serde_json::from_str(&info.body).unwrap();
    assert!(
        progress["migration"]["sent_bytes"].as_u64() > Some(0),
        "{}",
        info.body
    );
    assert!(sent.is_err(), "{sent:?}");
    assert_eq!(b, a + 1);
    assert_eq!(source.state(), "Running");
}

#[test]
fn a_vm_migrated_mid_write_burst_finishes_it_with_every_block_on_disk() {
    let dir = Scratch::new("mig-burst");
    let (_backend, socket) = blk_backend(&dir, &[]);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    let n = 600u64;
    let mut source = Vmm::start(&dir, "source");
    source.boot(&format!("tg.virtio tg.seed=4 tg.blkburst={n}"), 1, disks);
    let deadline = Instant::now() + LIMIT;
    while source.console.recv_timeout(LIMIT).unwrap() != "TG: blk burst start n=600" {
        assert!(Instant::now() < deadline);
    }
    let dest = Vmm::start(&dir, "dest");
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let receiving = receive(&dest, &url);

    let sent = send(&source, serde_json::json!({"destination_url": url}));
    let received = receiving.join().unwrap();
    assert_eq!(sent.0, 204, "{sent:?}");
    assert_eq!(received.0, 204, "{received:?}");
    assert_eq!(exit_code(&mut source), Some(0));
    let mut rest = Vec::new();
    while let Ok(l) = dest.console.recv_timeout(Duration::from_secs(120)) {
        let done = l == "TG: PASS";
        rest.push(l);
        if done {
            break;
        }
    }

    assert!(
        rest.contains(&format!("TG: blk burst ok n={n}")),
        "{rest:#?}"
    );
    assert!(!rest.iter().any(|l| l.contains("FAIL")), "{rest:#?}");
    common::assert_pattern(&dir.path("disk.img"), 4096 * 2, 4096 * n, 4);
}
