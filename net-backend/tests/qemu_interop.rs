//! Interop with QEMU as the frontend: `qemu-system-x86_64 -accel tcg` with
//! `-netdev vhost-user,queues=2` + `virtio-net-pci,mq=on` on net-backend,
//! booting the Debian guest from `scripts/guest-image`. The backend's tap
//! (persistent, multi-queue) lives in a namespace the test makes, with the
//! peer address 10.200.1.1 there. The guest sets 10.200.1.2, pings the
//! peer, sends 4 MiB over TCP with busybox nc and receives 4 MiB back; the
//! test compares both SHA-256 sums. Then the test restarts the backend
//! while the guest runs and checks that traffic resumes.
//!
//! Needs `qemu-system-x86_64` and the guest image. Without QEMU the test
//! prints why and passes, unless `NET_REQUIRE_QEMU=1` (set it in CI).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backends::qemu::{have_qemu, sha256, value, QemuGuest};

use common::*;

const PEER: &str = "10.200.1.1";
const SIZE: usize = 4 << 20;

const GUEST_SCRIPT: &str = r#"ip link set eth0 up
ip addr add 10.200.1.2/24 dev eth0
echo "PING=$(ping -c 3 10.200.1.1 | grep -o '[0-9]* packets received')"
echo "RXQ=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
dd if=/dev/urandom of=/tmp/up bs=64k count=64 2>/dev/null
echo "UP=$(sha256sum < /tmp/up | cut -d' ' -f1)"
nc 10.200.1.1 5001 < /tmp/up
nc 10.200.1.1 5002 > /tmp/down
echo "DOWN=$(sha256sum < /tmp/down | cut -d' ' -f1)"
echo PHASE1-DONE
i=0
until echo hello-again | nc -w 2 10.200.1.1 5003; do
  i=$((i+1)); [ $i -gt 90 ] && break; sleep 1
done
echo "RESUMED=$i"
"#;

/// A net-backend process inside the namespace, killed on drop.
struct BackendProc(Child);

impl BackendProc {
    fn spawn(ns: &NetNs, socket: &Path, tap: &str) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(env!("CARGO_BIN_EXE_net-backend"))
            .arg("--socket")
            .arg(socket)
            .args(["--tap", tap, "--queue-pairs", "2"])
            .env(
                "RUST_LOG",
                std::env::var("NET_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn net-backend");
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        BackendProc(child)
    }
}

impl Drop for BackendProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU with `pairs` queue pairs on the backend at `socket` (1: QEMU's
/// default netdev, no `mq`), running `script`.
fn boot(socket: &Path, script: &str, pairs: u16) -> Qemu {
    let netdev = format!("vhost-user,id=n0,chardev=c0,queues={pairs}");
    let nic = if pairs > 1 {
        "virtio-net-pci,netdev=n0,mq=on,vectors=0,romfile="
    } else {
        "virtio-net-pci,netdev=n0,vectors=0,romfile="
    };
    Qemu(QemuGuest::boot(
        socket,
        &["-netdev", &netdev, "-device", nic],
        script,
    ))
}

/// The guest, failing the test if it does not print what is awaited in time.
struct Qemu(QemuGuest);

impl Qemu {
    fn wait_for(&self, text: &str) -> String {
        let console = self.0.wait_for(text, Duration::from_secs(120));
        assert!(
            console.contains(text),
            "guest did not print {text}:\n{console}"
        );
        console
    }
}

/// A namespace with a tap holding the peer address, up.
fn peer_tap(ns_tag: &str, tap_tag: &str) -> (NetNs, String) {
    let ns = NetNs::new(ns_tag);
    let tap = ns.tap(tap_tag);
    ns.ip(&["addr", "add", &format!("{PEER}/24"), "dev", &tap]);
    ns.ip(&["link", "set", &tap, "up"]);
    (ns, tap)
}

/// Ping replies the guest reported (`PING=N packets received`).
fn pings(console: &str) -> u32 {
    value(console, "PING=")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Accepts one connection on `port` in `ns` and returns what it sent.
fn receive_one(ns: &NetNs, port: u16) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = ns.enter(move || TcpListener::bind((PEER, port)).expect("bind peer"));
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut data = Vec::new();
        c.read_to_end(&mut data).unwrap();
        data
    })
}

/// Accepts one connection on `port` in `ns` and sends `data`.
fn send_one(ns: &NetNs, port: u16, data: Vec<u8>) -> std::thread::JoinHandle<()> {
    let listener = ns.enter(move || TcpListener::bind((PEER, port)).expect("bind peer"));
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(&data).unwrap();
    })
}

#[test]
fn qemu_guest_pings_moves_data_both_ways_and_survives_backend_restart() {
    if !have_tun() || !have_qemu("NET_REQUIRE_QEMU") {
        return;
    }
    let (ns, tap) = peer_tap("qemu", "q");
    let dir = TempDir::new("qemu");
    let socket = dir.path("net.sock");
    let backend = BackendProc::spawn(&ns, &socket, &tap);
    let down: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let down_sha = sha256(&down);
    let upload = receive_one(&ns, 5001);
    let download = send_one(&ns, 5002, down);

    let qemu = boot(&socket, GUEST_SCRIPT, 2);
    let console = qemu.wait_for("PHASE1-DONE");
    let up = upload.join().unwrap();
    download.join().unwrap();
    drop(backend);
    let again = receive_one(&ns, 5003);
    let _backend = BackendProc::spawn(&ns, &socket, &tap);
    let hello = again.join().unwrap();
    let console_end = qemu.wait_for("RESUMED=");

    let pings = pings(&console);
    assert!(pings > 0, "no ping reply:\n{console}");
    assert_eq!(value(&console, "RXQ="), "2");
    assert_eq!(up.len(), SIZE);
    assert_eq!(value(&console, "UP="), sha256(&up));
    assert_eq!(value(&console, "DOWN="), down_sha);
    assert_eq!(hello, b"hello-again\n");
    assert_ne!(value(&console_end, "RESUMED="), "91");
}

/// QEMU's default single-queue-pair netdev enables its rings before
/// SET_FEATURES and never again: traffic must flow all the same.
#[test]
fn qemu_guest_with_one_queue_pair_pings() {
    if !have_tun() || !have_qemu("NET_REQUIRE_QEMU") {
        return;
    }
    let (ns, tap) = peer_tap("qemu1", "s");
    let dir = TempDir::new("qemu1");
    let socket = dir.path("net.sock");
    let _backend = BackendProc::spawn(&ns, &socket, &tap);
    let script = format!(
        "ip link set eth0 up\nip addr add 10.200.1.2/24 dev eth0\n\
         echo \"PING=$(ping -c 3 {PEER} | grep -o '[0-9]* packets received')\"\n\
         echo SINGLE-DONE\n"
    );
    let qemu = boot(&socket, &script, 1);
    let console = qemu.wait_for("SINGLE-DONE");
    let pings = pings(&console);
    assert!(pings > 0, "no ping reply:\n{console}");
}
