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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::qemu::{have_qemu, sha256, value, KillMoments, QemuGuest};

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
        Self::spawn_with(ns, socket, tap, &[])
    }

    /// Like [`Self::spawn`], with more arguments.
    fn spawn_with(ns: &NetNs, socket: &Path, tap: &str, args: &[&str]) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(env!("CARGO_BIN_EXE_net-backend"))
            .arg("--socket")
            .arg(socket)
            .args(["--tap", tap, "--queue-pairs", "2"])
            .args(args)
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

/// `len` bytes for the host to send to the guest.
fn download_data(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
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
    let down = download_data(SIZE);
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

/// Backend kills in [`qemu_guest_tcp_transfers_survive_a_crash_loop`].
const CRASH_KILLS: usize = 20;
/// Bytes each way in the crash loop.
const CRASH_SIZE: usize = 24 << 20;
/// While the backend is being killed the host moves 4 KiB every 20 ms each
/// way (~200 KB/s), so both transfers go on across every kill and end only
/// after the last one; then at full speed.
const PACE: (usize, Duration) = (4096, Duration::from_millis(20));

const CRASH_SCRIPT: &str = r#"ip link set eth0 up
ip addr add 10.200.1.2/24 dev eth0
dd if=/dev/urandom of=/tmp/up bs=64k count=384 2>/dev/null
echo "UP=$(sha256sum < /tmp/up | cut -d' ' -f1)"
echo MOVING
nc 10.200.1.1 5002 > /tmp/down &
nc 10.200.1.1 5001 < /tmp/up
echo "UP-RC=$?"
wait
echo "DOWN=$(sha256sum < /tmp/down | cut -d' ' -f1)"
echo "DOWN-LEN=$(wc -c < /tmp/down)"
"#;

/// The `rx_frames` and `tx_frames` totals of the backend's metrics endpoint
/// at `metrics` (zero while it does not answer).
fn frames(metrics: &Path) -> (u64, u64) {
    let Ok(reply) = backends::metrics_server::get(metrics, "/counters", Duration::from_secs(2))
    else {
        return (0, 0);
    };
    let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
    let at = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    (at("/totals/rx_frames"), at("/totals/tx_frames"))
}

/// Waits until the backend behind `metrics` has moved frames both ways:
/// QEMU has reconnected and the transfers flow. Panics after a minute.
fn wait_for_frames(metrics: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while frames(metrics).0 == 0 || frames(metrics).1 == 0 {
        assert!(
            Instant::now() < deadline,
            "no frames through the restarted backend: QEMU did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Accepts one connection on `port` in `ns` and reads it to the end, paced
/// by [`PACE`] until `paced` turns false; counts what it got in `got`.
fn receive_paced(
    ns: &NetNs,
    port: u16,
    paced: Arc<AtomicBool>,
    got: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = ns.enter(move || TcpListener::bind((PEER, port)).expect("bind peer"));
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut data = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let want = if paced.load(Ordering::SeqCst) {
                std::thread::sleep(PACE.1);
                PACE.0
            } else {
                buf.len()
            };
            let n = c.read(&mut buf[..want]).unwrap();
            if n == 0 {
                return data;
            }
            data.extend_from_slice(&buf[..n]);
            got.store(data.len(), Ordering::SeqCst);
        }
    })
}

/// Accepts one connection on `port` in `ns` and sends `data`, paced by
/// [`PACE`] until `paced` turns false; counts what it sent in `sent`.
fn send_paced(
    ns: &NetNs,
    port: u16,
    data: Vec<u8>,
    paced: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let listener = ns.enter(move || TcpListener::bind((PEER, port)).expect("bind peer"));
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut off = 0;
        while off < data.len() {
            let n = if paced.load(Ordering::SeqCst) {
                std::thread::sleep(PACE.1);
                PACE.0
            } else {
                64 << 10
            };
            let end = (off + n).min(data.len());
            c.write_all(&data[off..end]).unwrap();
            off = end;
            sent.store(off, Ordering::SeqCst);
        }
    })
}

/// QEMU's `reconnect=1` for vhost-user-net through a crash loop: while the
/// guest uploads 24 MiB to the host and downloads 24 MiB from it over TCP
/// (both paced by the host so they span every kill), net-backend is killed
/// with SIGKILL 20 times, each at a random moment (0–700 ms) after the
/// restarted backend moved frames both ways. The tap is persistent, so it
/// outlives each backend. Both transfers complete intact (SHA-256 on both
/// sides) and end after the last kill.
#[test]
fn qemu_guest_tcp_transfers_survive_a_crash_loop() {
    if !have_tun() || !have_qemu("NET_REQUIRE_QEMU") {
        return;
    }
    let (ns, tap) = peer_tap("qcrash", "c");
    let dir = TempDir::new("qcrash");
    let socket = dir.path("net.sock");
    let metrics = dir.path("metrics.sock");
    let args = ["--metrics-socket", metrics.to_str().unwrap()];
    let mut backend = BackendProc::spawn_with(&ns, &socket, &tap, &args);
    let down = download_data(CRASH_SIZE);
    let down_sha = sha256(&down);
    let paced = Arc::new(AtomicBool::new(true));
    let (got, sent) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let upload = receive_paced(&ns, 5001, paced.clone(), got.clone());
    let download = send_paced(&ns, 5002, down, paced.clone(), sent.clone());
    let mut moments = KillMoments::new("NET_CRASH_SEED");
    let qemu = boot(&socket, CRASH_SCRIPT, 2);
    qemu.wait_for("MOVING");
    let started = Instant::now();
    while got.load(Ordering::SeqCst) == 0 || sent.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no transfer began"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut reconnects = 0;
    for _ in 0..CRASH_KILLS {
        wait_for_frames(&metrics);
        reconnects += 1;
        std::thread::sleep(moments.below(Duration::from_millis(700)));
        drop(backend);
        backend = BackendProc::spawn_with(&ns, &socket, &tap, &args);
    }
    wait_for_frames(&metrics);
    let at_last_kill = (
        got.load(Ordering::SeqCst),
        sent.load(Ordering::SeqCst),
        started.elapsed(),
    );
    paced.store(false, Ordering::SeqCst);
    let up = upload.join().unwrap();
    download.join().unwrap();
    let console = qemu.0.wait_for("DOWN-LEN=", Duration::from_secs(180));
    let up_sha = sha256(&up);
    eprintln!(
        "net crash loop: {CRASH_KILLS} kills in {:.0?}, {reconnects} reconnects + 1; \
         at the last kill {} B up and {} B down of {CRASH_SIZE} each; \
         up {} B sha {up_sha}, down sha {down_sha}; total {:.0?}",
        at_last_kill.2,
        at_last_kill.0,
        at_last_kill.1,
        up.len(),
        started.elapsed()
    );

    assert!(
        console.contains("DOWN-LEN="),
        "guest did not finish:\n{console}"
    );
    assert_eq!(value(&console, "UP-RC="), "0");
    assert_eq!(up.len(), CRASH_SIZE);
    assert_eq!(value(&console, "UP="), up_sha);
    assert_eq!(value(&console, "DOWN-LEN="), CRASH_SIZE.to_string());
    assert_eq!(value(&console, "DOWN="), down_sha);
    assert!(at_last_kill.0 < CRASH_SIZE && at_last_kill.1 < CRASH_SIZE);
}
