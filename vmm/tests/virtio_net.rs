//! A virtio-net NIC served by net-backend over a tap that lives in a network
//! namespace this test creates: the guest's frame shows up on the tap, and
//! a frame written to the tap reaches the guest. No traffic leaves the
//! namespace.

mod common;

use std::time::Duration;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use common::{read_until, run, stat, test_guest, vmm, wait, workspace_bin, Netns, Scratch};
use vmm::api::client;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GUEST_MAC: &str = "52:54:00:aa:bb:cc";

#[test]
fn frames_cross_between_guest_and_tap_through_net_backend() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun on this machine");
        return;
    }
    let ns = Netns::new().expect("cannot create a network namespace (needs root and iproute2)");
    let s = Scratch::new("virtio-net");
    let sock = s.path("net.sock");
    let _nb = ns.net_backend(&sock, "vmtap0");
    // The guest sends its frame once: the peer must be listening first.
    let (mut peer, mut out) = ns.tap_peer(&s.0, "vmtap0", GUEST_MAC);

    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--memory", "128M", "--cmdline", "tg.virtio tg.netrx"])
        .arg("--net")
        .arg(format!("socket={},mac={GUEST_MAC}", sock.display()))
        .env("VMM_LOG", "info");
    let r = run(c, Duration::from_secs(120));
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut out, &mut seen).unwrap();
    let _ = peer.wait();

    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.stdout);
    let lines = r.lines();
    assert!(
        lines.contains(&"TG: pci 00:01.0 1af4:1041 class=020000"),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&format!("TG: net mac={GUEST_MAC}").as_str()),
        "{}",
        r.stdout
    );
    assert!(lines.contains(&"TG: net tx ok"), "{}", r.stdout);
    assert_eq!(
        seen.trim(),
        "seen ffffffffffff 525400aabbcc 88b5 TG virtio-net hello"
    );
    assert!(
        lines.contains(&"TG: net rx len=60 type=88b5"),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&"TG: net rx payload=hello from the tap side"),
        "{}",
        r.stdout
    );
    assert_eq!(stat(&r.stderr, "notify_exits"), Some(0));
}

/// A tap made by hand in `ns`, as net-backend opens it (multi-queue, with
/// a virtio-net header), up and quiet.
fn persistent_tap(ns: &Netns, tap: &str) {
    ns.run(&[
        "ip",
        "tuntap",
        "add",
        "dev",
        tap,
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ]);
    ns.quiet_link_up(tap);
}

#[test]
fn nic_given_as_a_tap_is_served_by_a_net_backend_vmm_starts() {
    let ns = Netns::new().expect("cannot create a network namespace (needs root and iproute2)");
    let s = Scratch::new("virtio-net-tap");
    persistent_tap(&ns, "vmtap1");
    workspace_bin("net-backend");
    let (mut peer, mut out) = ns.tap_peer(&s.0, "vmtap1", GUEST_MAC);
    let mut c = ns.exec(&[env!("CARGO_BIN_EXE_vmm")]);
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--memory", "128M", "--cmdline", "tg.virtio tg.netrx"])
        .arg("--net")
        .arg(format!("tap=vmtap1,mac={GUEST_MAC}"))
        .env("VMM_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());

    let r = run(c, Duration::from_secs(120));

    let mut seen = String::new();
    std::io::Read::read_to_string(&mut out, &mut seen).unwrap();
    let _ = peer.wait();
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stderr, r.stdout);
    let lines = r.lines();
    assert!(lines.contains(&"TG: net tx ok"), "{}", r.stdout);
    assert_eq!(
        seen.trim(),
        "seen ffffffffffff 525400aabbcc 88b5 TG virtio-net hello"
    );
    assert!(
        lines.contains(&"TG: net rx payload=hello from the tap side"),
        "{}",
        r.stdout
    );
    assert!(!net_backend_on("vmtap1"), "net-backend outlived vmm");
}

/// Whether a net-backend for `tap` runs.
fn net_backend_on(tap: &str) -> bool {
    let needle = format!("--tap\0{tap}\0");
    std::fs::read_dir("/proc").unwrap().any(|e| {
        let Some(pid) = e
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            return false;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        alive && String::from_utf8_lossy(&cmdline).contains(&needle)
    })
}

/// Opens tap `name` in `ns` (from a thread that enters the namespace) as
/// libvirt does, and returns its queue fd; the tap lives while it is open.
fn open_tap_in(ns: &Netns, name: &str) -> std::fs::File {
    let path = format!("/run/netns/{}", ns.0);
    let name = name.to_string();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a netns fd we hold; it moves this thread only.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads the ifreq `req` points at.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .unwrap()
}

/// libvirt's way: vm.add-net with the tap's fd sent over the API socket
/// (`SCM_RIGHTS`); vmm starts a net-backend on that fd.
#[test]
fn nic_given_as_a_tap_fd_over_the_api_is_served_by_a_net_backend() {
    let ns = Netns::new().expect("cannot create a network namespace (needs root and iproute2)");
    let s = Scratch::new("virtio-net-tapfd");
    let tap = open_tap_in(&ns, "vmtap2");
    ns.quiet_link_up("vmtap2");
    workspace_bin("net-backend");
    let (mut peer, mut peer_out) = ns.tap_peer(&s.0, "vmtap2", GUEST_MAC);
    let api = s.path("api.sock");
    let mut c = vmm();
    c.arg("--api-socket").arg(&api).env("VMM_LOG", "info");
    let mut child = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !api.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let create = serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": "tg.virtio tg.netrx"},
        "memory": {"size": 128u64 << 20},
        "serial": {"mode": "Tty"},
    })
    .to_string();
    client::call_with(&api, vmm::api::ApiRequest::VmCreate, create.as_bytes()).unwrap();
    let body = format!(r#"{{"id":"net_0","mac":"{GUEST_MAC}","num_queues":2}}"#);
    let request = format!(
        "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );

    let mut conn = UnixStream::connect(&api).unwrap();
    conn.send_with_fds(&[request.as_bytes()], &[tap.as_raw_fd()])
        .unwrap();
    drop(tap);
    let mut answer = [0u8; 512];
    let n = conn.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    client::call(&api, vmm::api::ApiRequest::VmBoot).unwrap();
    let (_, lines) = read_until(&mut child, "TG: PASS");
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut peer_out, &mut seen).unwrap();
    let _ = peer.wait();
    client::call(&api, vmm::api::ApiRequest::VmmShutdown).unwrap();
    let r = wait(child, Duration::from_secs(20));

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(lines.contains(&"TG: net tx ok".to_string()), "{lines:?}");
    assert_eq!(
        seen.trim(),
        "seen ffffffffffff 525400aabbcc 88b5 TG virtio-net hello"
    );
    assert!(
        lines.contains(&"TG: net rx payload=hello from the tap side".to_string()),
        "{lines:?}"
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
}

#[test]
fn fds_written_in_an_add_net_body_are_refused() {
    let s = Scratch::new("virtio-net-fdbody");
    let api = s.path("api.sock");
    let mut c = vmm();
    c.arg("--api-socket").arg(&api);
    let child = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !api.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    let r = client::raw_with_body(&api, "PUT", "vm.add-net", br#"{"fds":[0,1]}"#).unwrap();

    let _ = client::call(&api, vmm::api::ApiRequest::VmmShutdown);
    let _ = wait(child, Duration::from_secs(20));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("SCM_RIGHTS"), "{}", r.body);
}
