//! virtio-pci devices served by vhost-user backends, driven by the test
//! guest's own virtio driver: real I/O through blk-backend and through
//! qemu-storage-daemon (a backend nobody here wrote), the data path kept
//! off the VMM (no notify ever exits to it), backend crash and restart with
//! the guest carrying on, and bad device options rejected up front.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use common::{
    assert_pattern, run, stat, test_guest, vmm, wait, workspace_bin, Daemon, Run, Scratch,
};

const LIMIT: Duration = Duration::from_secs(120);
const DISK_SIZE: u64 = 64 << 20;

fn blk_backend(image: &Path, socket: &Path) -> Daemon {
    let mut c = Command::new(workspace_bin("blk-backend"));
    c.arg("--socket").arg(socket).arg("--image").arg(image);
    Daemon::start(c, socket)
}

fn disk_image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
}

fn guest_with(cmdline: &str, devices: &[(&str, String)]) -> Command {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--memory", "128M", "--cpus", "2", "--cmdline", cmdline])
        .env("VMM_LOG", "info");
    for (flag, spec) in devices {
        c.arg(flag).arg(spec);
    }
    c
}

fn assert_blk_ok(r: &Run) {
    assert!(!r.timed_out, "timed out:\n{}", r.stdout);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.stdout);
    let lines = r.lines();
    for l in [
        "TG: ecam ok",
        "TG: blk write ok",
        "TG: blk read ok",
        "TG: blk reinit ok",
        "TG: PASS",
    ] {
        assert!(lines.contains(&l), "missing {l:?}:\n{}", r.stdout);
    }
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);
    assert_eq!(stat(&r.stderr, "notify_exits"), Some(0), "{}", r.stderr);
}

#[test]
fn blk_backend_disk_does_real_io_with_the_vmm_off_the_data_path() {
    let s = Scratch::new("virtio-blk");
    let (img, sock) = (s.path("disk.img"), s.path("blk.sock"));
    disk_image(&img);
    let _b = blk_backend(&img, &sock);
    let disk = format!("socket={}", sock.display());
    let r = run(
        guest_with("tg.virtio tg.seed=7 tg.blkburst=32", &[("--disk", disk)]),
        LIMIT,
    );
    assert_blk_ok(&r);
    let lines = r.lines();
    assert!(
        lines.contains(&"TG: pci 00:01.0 1af4:1042 class=018000"),
        "{}",
        r.stdout
    );
    assert!(lines.contains(&"TG: blk capacity=131072"), "{}", r.stdout);
    assert!(lines.contains(&"TG: blk flush ok"), "{}", r.stdout);
    assert!(lines.contains(&"TG: blk id=blk-backend"), "{}", r.stdout);
    assert!(lines.contains(&"TG: blk burst ok n=32"), "{}", r.stdout);
    assert_pattern(&img, 4096, 4096 * 33, 7);
}

#[test]
fn io_burst_adds_no_vmm_exits() {
    let s = Scratch::new("virtio-exits");
    let (img, sock) = (s.path("disk.img"), s.path("blk.sock"));
    disk_image(&img);
    let _b = blk_backend(&img, &sock);
    let disk = format!("socket={}", sock.display());
    let quiet = run(guest_with("tg.virtio", &[("--disk", disk.clone())]), LIMIT);
    let busy = run(
        guest_with("tg.virtio tg.blkburst=200", &[("--disk", disk)]),
        LIMIT,
    );
    assert_blk_ok(&quiet);
    assert_blk_ok(&busy);
    // 400 more requests, not one more MMIO exit: every notify went to the
    // backend through its ioeventfd and every completion came back by irqfd.
    assert_eq!(
        stat(&quiet.stderr, "mmio_exits"),
        stat(&busy.stderr, "mmio_exits"),
        "quiet: {}\nbusy: {}",
        quiet.stderr,
        busy.stderr
    );
}

#[test]
fn two_disks_on_two_backends() {
    let s = Scratch::new("virtio-2disks");
    let (a, b) = (s.path("a.img"), s.path("b.img"));
    disk_image(&a);
    disk_image(&b);
    let _da = blk_backend(&a, &s.path("a.sock"));
    let _db = blk_backend(&b, &s.path("b.sock"));
    let r = run(
        guest_with(
            "tg.virtio tg.seed=3",
            &[
                ("--disk", format!("socket={}", s.path("a.sock").display())),
                ("--disk", format!("socket={}", s.path("b.sock").display())),
            ],
        ),
        LIMIT,
    );
    assert_blk_ok(&r);
    assert_eq!(
        r.lines()
            .iter()
            .filter(|l| **l == "TG: blk write ok")
            .count(),
        2
    );
    assert_pattern(&a, 4096, 4096, 3);
    assert_pattern(&b, 4096, 4096, 3);
}

#[test]
fn qemu_storage_daemon_serves_a_disk() {
    let s = Scratch::new("virtio-qsd");
    let (img, sock) = (s.path("disk.img"), s.path("qsd.sock"));
    disk_image(&img);
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f0",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,writable=on,addr.type=unix,addr.path={}",
            sock.display()
        ));
    let _q = Daemon::start(c, &sock);
    let disk = format!("socket={}", sock.display());
    let r = run(
        guest_with("tg.virtio tg.seed=11 tg.blkburst=8", &[("--disk", disk)]),
        LIMIT,
    );
    assert_blk_ok(&r);
    assert_pattern(&img, 4096, 4096 * 9, 11);
}

/// Pids of the blk-backends serving `image`.
fn backends_of(image: &Path) -> Vec<i32> {
    let needle = format!("--image\0{}\0", image.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .filter(|pid| {
            // A zombie has ended.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        })
        .collect()
}

#[test]
fn disk_given_as_an_image_is_served_by_a_backend_vmm_starts_and_stops() {
    let s = Scratch::new("virtio-image");
    let img = s.path("disk.img");
    disk_image(&img);
    workspace_bin("blk-backend");
    let disk = format!("path={}", img.display());

    let r = run(
        guest_with("tg.virtio tg.seed=9 tg.blkburst=32", &[("--disk", disk)]),
        LIMIT,
    );

    assert_blk_ok(&r);
    assert!(r.lines().contains(&"TG: blk burst ok n=32"), "{}", r.stdout);
    assert_pattern(&img, 4096, 4096 * 33, 9);
    assert_eq!(backends_of(&img), Vec::<i32>::new());
}

#[test]
fn backend_vmm_started_is_restarted_when_killed_and_the_guest_goes_on() {
    let s = Scratch::new("virtio-image-restart");
    let img = s.path("disk.img");
    disk_image(&img);
    workspace_bin("blk-backend");
    let disk = format!("path={}", img.display());
    let mut child = guest_with("tg.virtio tg.seed=6 tg.blkburst=1500", &[("--disk", disk)])
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("TG: blk burst start") {
        let n = std::io::BufRead::read_line(&mut out, &mut seen).unwrap();
        assert_ne!(n, 0, "guest ended early:\n{seen}");
    }
    std::thread::sleep(Duration::from_millis(700));
    let backend = backends_of(&img);
    assert_eq!(backend.len(), 1, "{backend:?}");

    // SAFETY: kill with the pid of the blk-backend serving our image.
    unsafe { libc::kill(backend[0], libc::SIGKILL) };

    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    let r = wait(child, LIMIT);
    let rest = drain.join().unwrap();
    assert_eq!(r.code(), Some(0), "{}\n{seen}{rest}", r.stderr);
    assert!(rest.contains("TG: blk burst ok n=1500"), "{seen}{rest}");
    assert!(
        rest.contains("TG: PASS") && !rest.contains("FAIL"),
        "{seen}{rest}"
    );
    assert!(
        r.stderr.contains("backend exited; restarting it"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("backend reconnected"), "{}", r.stderr);
    assert_pattern(&img, 4096, 4096 * 1501, 6);
    assert_eq!(backends_of(&img), Vec::<i32>::new());
}

/// Reads the guest's console up to its `TG: blk burst start` line;
/// returns what it read.
fn read_to_burst_start(out: &mut impl std::io::BufRead) -> String {
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        let n = out.read_line(&mut l).unwrap();
        assert_ne!(n, 0, "guest ended early:\n{seen}");
        seen.push_str(&l);
        if l.starts_with("TG: blk burst start") {
            return seen;
        }
    }
}

#[test]
fn backend_killed_mid_burst_comes_back_and_the_guest_goes_on() {
    let s = Scratch::new("virtio-reconnect");
    let (img, sock) = (s.path("disk.img"), s.path("blk.sock"));
    disk_image(&img);
    let mut backend = blk_backend(&img, &sock);
    let disk = format!("socket={}", sock.display());
    let mut cmd = guest_with("tg.virtio tg.seed=5 tg.blkburst=1500", &[("--disk", disk)]);
    let mut child = cmd.spawn().unwrap();
    // Wait for the burst to start, then crash the backend and restart it.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let seen = read_to_burst_start(&mut out);
    std::thread::sleep(Duration::from_millis(700));
    backend.kill();
    backend = blk_backend(&img, &sock);
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    let r = wait(child, LIMIT);
    let rest = drain.join().unwrap();
    drop(backend);
    assert_eq!(r.code(), Some(0), "{}\n{seen}{rest}", r.stderr);
    assert!(rest.contains("TG: blk burst ok n=1500"), "{seen}{rest}");
    assert!(
        rest.contains("TG: PASS") && !rest.contains("FAIL"),
        "{seen}{rest}"
    );
    assert!(r.stderr.contains("backend disconnected"), "{}", r.stderr);
    assert!(r.stderr.contains("backend reconnected"), "{}", r.stderr);
    assert_pattern(&img, 4096, 4096 * 1501, 5);
}

#[test]
fn missing_backend_socket_is_rejected_before_boot() {
    let r = run(
        guest_with(
            "tg.virtio",
            &[("--disk", "socket=/nonexistent/blk.sock".into())],
        ),
        LIMIT,
    );
    assert_eq!(r.code(), Some(1));
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr
            .contains("Backend socket /nonexistent/blk.sock does not exist"),
        "{}",
        r.stderr
    );
}

#[test]
fn socket_with_no_backend_listening_is_rejected() {
    let s = Scratch::new("virtio-deaf");
    let sock = s.path("deaf.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(listener); // the path stays, nobody accepts
    let r = run(
        guest_with(
            "tg.virtio",
            &[("--disk", format!("socket={}", sock.display()))],
        ),
        LIMIT,
    );
    assert_eq!(r.code(), Some(1));
    assert!(
        r.stderr.contains("Cannot connect to vhost-user backend"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_device_options_are_rejected() {
    for (flag, spec, needle) in [
        ("--disk", "queues=2", "--disk needs socket=PATH"),
        ("--disk", "socket=/s,queue-size=100", "not a power of two"),
        (
            "--net",
            "socket=/s,mac=01:02:03:04:05:06",
            "multicast address",
        ),
        (
            "--vhost-user",
            "socket=/s",
            "--vhost-user needs type=NAME or type=ID",
        ),
        (
            "--vhost-user",
            "type=toaster,socket=/s",
            "not a virtio device name or ID",
        ),
    ] {
        let r = run(guest_with("x", &[(flag, spec.to_string())]), LIMIT);
        assert_ne!(r.code(), Some(0), "{flag} {spec}");
        assert!(r.stderr.contains(needle), "{flag} {spec}: {}", r.stderr);
    }
}

/// A backend from crates.io, installed by `scripts/setup`.
fn tool(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("VMM_TOOLS")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| Path::new(&c).join("vmm-tools")))
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cache/vmm-tools"));
    let bin = dir.join("bin").join(name);
    assert!(bin.exists(), "{} missing: run scripts/setup", bin.display());
    bin
}

/// vhost-device-rng listening in `s`; returns it and its socket.
fn rng_daemon(s: &Scratch) -> (Daemon, std::path::PathBuf) {
    let base = s.path("rng.sock");
    // It appends the socket index to the path.
    let sock = s.path("rng.sock0");
    let mut c = Command::new(tool("vhost-device-rng"));
    c.arg("--socket-path").arg(&base);
    (Daemon::start(c, &sock), sock)
}

/// The test guest's virtio test with an rng device on `socket`.
fn rng_guest(socket: &Path) -> Run {
    run(
        guest_with(
            "tg.virtio",
            &[(
                "--vhost-user",
                format!("type=rng,socket={}", socket.display()),
            )],
        ),
        LIMIT,
    )
}

#[test]
fn generic_frontend_drives_third_party_vhost_device_rng() {
    let s = Scratch::new("virtio-rng");
    let (_rng, sock) = rng_daemon(&s);
    let r = rng_guest(&sock);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.stdout);
    let lines = r.lines();
    assert!(
        lines.contains(&"TG: pci 00:01.0 1af4:1044 class=ff0000"),
        "{}",
        r.stdout
    );
    let rng = lines
        .iter()
        .find_map(|l| l.strip_prefix("TG: rng bytes=64 nonzero="))
        .unwrap_or_else(|| panic!("no rng line:\n{}", r.stdout));
    // 64 random bytes: all zero with probability 2^-512.
    assert!(rng.parse::<u32>().unwrap() > 32, "{}", r.stdout);
    assert!(lines.contains(&"TG: PASS"));
    assert_eq!(stat(&r.stderr, "notify_exits"), Some(0));
}

/// Forwards vhost-user messages (with their fds) from `from` to `to` until
/// `from` closes, sleeping `hold` before passing on a message of type `held`.
fn forward_messages(from: UnixStream, to: UnixStream, held: Option<u32>, hold: Duration) {
    loop {
        let mut hdr = [0u8; 12];
        let mut fds: [RawFd; 32] = [-1; 32];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        }];
        // SAFETY: the iovec points to `hdr`, which lives across the call and
        // takes any bytes written.
        let got = unsafe { from.recv_with_fds(&mut iov, &mut fds) };
        let Ok((n, nfds)) = got else { return };
        // SAFETY: recvmsg handed us these fds; nothing else owns them.
        let owned: Vec<OwnedFd> = fds[..nfds]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 || (&from).read_exact(&mut hdr[n..]).is_err() {
            return;
        }
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut body = vec![0u8; size];
        if (&from).read_exact(&mut body).is_err() {
            return;
        }
        if held == Some(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]])) {
            std::thread::sleep(hold);
        }
        let raw: Vec<RawFd> = owned.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let mut msg = hdr.to_vec();
        msg.extend_from_slice(&body);
        if to.send_with_fds(&[&msg[..]], &raw).is_err() {
            return;
        }
    }
}

/// Listens on `front` for one frontend and joins it to the backend at
/// `back`, holding every SET_VRING_ENABLE back for `hold`: a slow backend,
/// as seen by the frontend.
fn enable_delaying_proxy(front: &Path, back: &Path, hold: Duration) {
    let listener = UnixListener::bind(front).expect("bind proxy socket");
    let back = back.to_path_buf();
    std::thread::spawn(move || {
        let Ok((vmm_side, _)) = listener.accept() else {
            return;
        };
        let backend = UnixStream::connect(&back).expect("connect to backend");
        let (v2, b2) = (
            vmm_side.try_clone().expect("clone"),
            backend.try_clone().expect("clone"),
        );
        std::thread::spawn(move || forward_messages(b2, v2, None, Duration::ZERO));
        let enable = u32::from(FrontendReq::SET_VRING_ENABLE);
        forward_messages(vmm_side, backend, Some(enable), hold);
    });
}

/// vhost-device-rng (vhost-user-backend 0.10) drops a kick that arrives
/// before its ring is enabled. With SET_VRING_ENABLE held back 300 ms on
/// the way, the guest's first kick, right after DRIVER_OK, would land in
/// that window every time unless activation waits for the backend.
#[test]
fn kick_right_after_driver_ok_survives_a_slow_ring_enable() {
    let s = Scratch::new("virtio-rng-slow");
    let (_rng, sock) = rng_daemon(&s);
    let front = s.path("proxy.sock");
    enable_delaying_proxy(&front, &sock, Duration::from_millis(300));
    let r = rng_guest(&front);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.stdout);
    let lines = r.lines();
    assert!(
        lines.iter().any(|l| l.starts_with("TG: rng bytes=64 ")),
        "{}",
        r.stdout
    );
    assert!(lines.contains(&"TG: PASS"), "{}", r.stdout);
}

#[test]
fn guest_moving_the_bar_and_masking_vectors_keeps_io_working() {
    let s = Scratch::new("virtio-move");
    let (img, sock) = (s.path("disk.img"), s.path("blk.sock"));
    disk_image(&img);
    let _b = blk_backend(&img, &sock);
    let mut c = guest_with(
        "tg.virtio tg.pciassign tg.msixmask tg.seed=9 tg.blkburst=16",
        &[("--disk", format!("socket={}", sock.display()))],
    );
    c.env("VMM_LOG", "vmm::pci=debug,info");
    let r = run(c, LIMIT);
    assert_blk_ok(&r);
    assert!(r.stderr.contains("guest moved a BAR"), "{}", r.stderr);
    // The masked vector's interrupt was held in the PBA and delivered on unmask.
    assert!(
        r.lines().contains(&"TG: blk msix mask ok pba=1"),
        "{}",
        r.stdout
    );
    assert_pattern(&img, 4096, 4096 * 17, 9);
}

#[test]
fn generic_frontend_drives_virtiofsd_with_a_vmm_given_tag() {
    let s = Scratch::new("virtio-fs");
    let (sock, dir) = (s.path("fs.sock"), s.path("shared"));
    std::fs::create_dir(&dir).unwrap();
    let mut c = Command::new(tool("virtiofsd"));
    c.arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&dir)
        .args(["--sandbox", "none"]);
    let _fs = Daemon::start(c, &sock);
    let r = run(
        guest_with(
            "tg.virtio",
            &[(
                "--vhost-user",
                format!("type=fs,socket={},tag=vmmshare", sock.display()),
            )],
        ),
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.stdout);
    let lines = r.lines();
    assert!(
        lines.contains(&"TG: pci 00:01.0 1af4:105a class=ff0000"),
        "{}",
        r.stdout
    );
    assert!(lines.contains(&"TG: fs tag=vmmshare"), "{}", r.stdout);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("TG: fs init ok major=7 minor=")),
        "{}",
        r.stdout
    );
    assert!(lines.contains(&"TG: PASS"));
    assert_eq!(stat(&r.stderr, "notify_exits"), Some(0));
}

/// 50 SIGKILLs of blk-backend at pseudo-random moments (40–140 ms apart,
/// restarted each time) while the guest writes and reads back checksummed
/// blocks: the burst completes with every block verified by the guest and
/// on the disk, and no guest I/O error. (A backend killed before the VMM
/// reconnected to it is a crash the VMM never saw: only most kills show
/// as a reconnect.)
#[test]
fn fifty_backend_crashes_under_a_write_verify_burst_lose_nothing() {
    let s = Scratch::new("virtio-crashloop");
    let (img, sock) = (s.path("disk.img"), s.path("blk.sock"));
    disk_image(&img);
    let backend = blk_backend(&img, &sock);
    let disk = format!("socket={}", sock.display());
    let n = 4_000u64;
    let mut cmd = guest_with(
        &format!("tg.virtio tg.seed=9 tg.blkburst={n}"),
        &[("--disk", disk)],
    );
    let mut child = cmd.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let seen = read_to_burst_start(&mut out);
    let (img2, sock2) = (img.clone(), sock.clone());
    let killer = std::thread::spawn(move || {
        let mut backend = backend;
        let mut x = u64::from(std::process::id()) | 1;
        for _ in 0..50 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_millis(40 + x % 100));
            backend.kill();
            backend = blk_backend(&img2, &sock2);
        }
        (backend, std::time::Instant::now())
    });
    let mut rest = String::new();
    let mut burst_done = None;
    loop {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut out, &mut l).unwrap_or(0) == 0 {
            break;
        }
        if l.starts_with("TG: blk burst ok") {
            burst_done = Some(std::time::Instant::now());
        }
        rest.push_str(&l);
    }
    let r = wait(child, LIMIT);
    let (backend, last_kill) = killer.join().unwrap();
    drop(backend);

    assert_eq!(r.code(), Some(0), "{}\n{seen}{rest}", r.stderr);
    assert!(
        rest.contains(&format!("TG: blk burst ok n={n}")),
        "{seen}{rest}"
    );
    assert!(!rest.contains("FAIL"), "{seen}{rest}");
    assert!(
        burst_done.is_some_and(|t| t > last_kill),
        "the burst ended before the 50th crash: make it longer"
    );
    let reconnects = r.stderr.matches("backend reconnected").count();
    assert!((10..=50).contains(&reconnects), "{reconnects} reconnects");
    assert_pattern(&img, 4096, 4096 * n, 9);
}
