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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn guest_image() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/guest-image"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/guest-image");
    assert!(out.status.success(), "scripts/guest-image failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("guest-image output").trim())
}

fn have_qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            std::env::var("NET_REQUIRE_QEMU").as_deref() != Ok("1"),
            "qemu-system-x86_64 is required (NET_REQUIRE_QEMU=1)"
        );
        eprintln!("SKIPPED: qemu-system-x86_64 not found");
    }
    ok
}

fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect(cmd);
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sha256(data: &[u8]) -> String {
    pipe("sha256sum", &[], data)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

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

/// QEMU with its console collected as it arrives; killed on drop.
struct Qemu {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Qemu {
    /// Boots the guest with `pairs` queue pairs (1: QEMU's default netdev,
    /// no `mq`).
    fn boot(socket: &Path, script: &str, pairs: u16) -> Qemu {
        let guest = guest_image();
        let append = format!(
            "console=ttyS0 reboot=k panic=-1 quiet runb64={}",
            pipe("base64", &["-w0"], script.as_bytes())
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "2"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem", "-chardev"])
            .arg(format!(
                "socket,id=c0,path={},reconnect=1",
                socket.display()
            ))
            .args([
                "-netdev",
                &format!("vhost-user,id=n0,chardev=c0,queues={pairs}"),
            ])
            .args([
                "-device",
                if pairs > 1 {
                    "virtio-net-pci,netdev=n0,mq=on,vectors=0,romfile="
                } else {
                    "virtio-net-pci,netdev=n0,vectors=0,romfile="
                },
            ])
            .args([
                "-nographic",
                "-no-reboot",
                "-monitor",
                "none",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(append)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu");
        let mut stdout = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Qemu { child, console }
    }

    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let console = self.console.lock().unwrap().clone();
            if console.contains(text) {
                return console;
            }
            assert!(
                Instant::now() < deadline,
                "guest did not print {text}:\n{console}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing from guest output:\n{console}"))
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
    if !have_tun() || !have_qemu() {
        return;
    }
    let ns = NetNs::new("qemu");
    let tap = ns.tap("q");
    ns.ip(&["addr", "add", &format!("{PEER}/24"), "dev", &tap]);
    ns.ip(&["link", "set", &tap, "up"]);
    let dir = TempDir::new("qemu");
    let socket = dir.path("net.sock");
    let backend = BackendProc::spawn(&ns, &socket, &tap);
    let down: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let down_sha = sha256(&down);
    let upload = receive_one(&ns, 5001);
    let download = send_one(&ns, 5002, down);

    let qemu = Qemu::boot(&socket, GUEST_SCRIPT, 2);
    let console = qemu.wait_for("PHASE1-DONE");
    let up = upload.join().unwrap();
    download.join().unwrap();
    drop(backend);
    let again = receive_one(&ns, 5003);
    let _backend = BackendProc::spawn(&ns, &socket, &tap);
    let hello = again.join().unwrap();
    let console_end = qemu.wait_for("RESUMED=");

    let pings: u32 = value(&console, "PING=")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
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
    if !have_tun() || !have_qemu() {
        return;
    }
    let ns = NetNs::new("qemu1");
    let tap = ns.tap("s");
    ns.ip(&["addr", "add", &format!("{PEER}/24"), "dev", &tap]);
    ns.ip(&["link", "set", &tap, "up"]);
    let dir = TempDir::new("qemu1");
    let socket = dir.path("net.sock");
    let _backend = BackendProc::spawn(&ns, &socket, &tap);
    let script = format!(
        "ip link set eth0 up\nip addr add 10.200.1.2/24 dev eth0\n\
         echo \"PING=$(ping -c 3 {PEER} | grep -o '[0-9]* packets received')\"\n\
         echo SINGLE-DONE\n"
    );
    let qemu = Qemu::boot(&socket, &script, 1);
    let console = qemu.wait_for("SINGLE-DONE");
    let pings: u32 = value(&console, "PING=")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(pings > 0, "no ping reply:\n{console}");
}
