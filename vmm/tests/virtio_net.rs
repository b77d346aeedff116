//! A virtio-net NIC served by net-backend over a tap that lives in a network
//! namespace this test creates: the guest's frame shows up on the tap, and
//! a frame written to the tap reaches the guest. No traffic leaves the
//! namespace.

mod common;

use std::time::Duration;

use common::{run, stat, test_guest, vmm, workspace_bin, Netns, Scratch};

const GUEST_MAC: &str = "52:54:00:aa:bb:cc";

/// Waits for the guest's frame on the tap, then answers with one of its own.
const PEER: &str = r#"
import socket, sys, time
iface, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((iface, 0))
print("ready", flush=True)
s.settimeout(60)
f = s.recv(2048)
print("seen", f[:6].hex(), f[6:12].hex(), f[12:14].hex(), f[14:33].decode(), flush=True)
time.sleep(0.2)
s.send(mac + bytes.fromhex('020000000099') + b'\x88\xb5' + b'hello from the tap side'.ljust(46, b'\0'))
"#;

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
    let script = s.path("peer.py");
    std::fs::write(&script, PEER).unwrap();
    let mut peer = ns
        .exec(&["python3", script.to_str().unwrap(), "vmtap0", GUEST_MAC])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The guest sends its frame once: the peer must be listening first.
    let mut out = std::io::BufReader::new(peer.stdout.take().unwrap());
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut out, &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");

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
    let script = s.path("peer.py");
    std::fs::write(&script, PEER).unwrap();
    let mut peer = ns
        .exec(&["python3", script.to_str().unwrap(), "vmtap1", GUEST_MAC])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(peer.stdout.take().unwrap());
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut out, &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
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
