//! Shared helpers: a network namespace made (and removed) by the test, the
//! net-backend device serving in this process with its tap inside that
//! namespace, packet sockets on the tap, and synthetic net drivers.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backends::frontend::net::{NetDriver, RxFrame};
use backends::frontend::{FrontendConfig, SyntheticFrontend};
use net_backend::server::NetServer;
use net_backend::{testnet, NetConfig, NetDevice};

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const RX_BUF: u32 = 2048;
pub const QUEUE_SIZE: u16 = 256;

/// True if the machine can make taps; otherwise prints why the test is skipped.
pub fn have_tun() -> bool {
    let ok = Path::new("/dev/net/tun").exists();
    if !ok {
        eprintln!("SKIPPED: /dev/net/tun is missing on this machine");
    }
    ok
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("nb{tag}{}x{n}", std::process::id() % 100_000)
}

/// The test's network namespace (see [`testnet::NetNs`]); setup failures panic.
pub struct NetNs(pub testnet::NetNs);

impl std::ops::Deref for NetNs {
    type Target = testnet::NetNs;
    fn deref(&self) -> &testnet::NetNs {
        &self.0
    }
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        NetNs(testnet::NetNs::new(&unique(tag)).expect("create network namespace"))
    }

    /// Runs `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        self.0.ip(args).unwrap();
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        self.0.exec(args).unwrap();
    }

    /// Creates a persistent multi-queue tap with a vnet header in the
    /// namespace (deleted with it) and returns its name.
    pub fn tap(&self, tag: &str) -> String {
        let name = unique(tag);
        self.0.tap(&name).unwrap();
        name
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.0.enter(f).expect("enter network namespace")
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// net-backend serving in this process over a fresh socket, its tap created
/// in `ns`, brought up there. Stopped on drop.
pub struct TestBackend {
    pub device: Arc<NetDevice>,
    pub socket: PathBuf,
    pub tap: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestBackend {
    pub fn start(ns: &NetNs, pairs: usize, tweak: impl FnOnce(&mut NetConfig)) -> Self {
        let tap = unique("t");
        let socket = std::env::temp_dir().join(format!("{tap}.sock"));
        let mut cfg = NetConfig::new(socket.clone(), &tap);
        cfg.create_tap = true;
        cfg.queue_pairs = pairs;
        cfg.queue_size = QUEUE_SIZE;
        tweak(&mut cfg);
        let device = Arc::new(ns.enter(move || net_backend::build_device(&cfg).unwrap()));
        ns.ip(&["link", "set", &tap, "up"]);
        let listener = NetServer::bind(&socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = NetServer::new(device.clone());
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                if let Ok((stream, _)) = listener.accept() {
                    server.serve_connection(stream);
                }
            }
        });
        TestBackend {
            device,
            socket,
            tap,
            stop,
            thread: Some(thread),
        }
    }

    pub fn frontend(&self, pairs: usize) -> SyntheticFrontend {
        self.frontend_with(pairs, u64::MAX)
    }

    /// A frontend acking only the offered features within `features`.
    pub fn frontend_with(&self, pairs: usize, features: u64) -> SyntheticFrontend {
        self.frontend_cfg(FrontendConfig {
            mem_size: 48 << 20,
            num_queues: 2 * pairs + 1,
            queue_size: QUEUE_SIZE,
            features,
            ..Default::default()
        })
    }

    /// A frontend with the given configuration, set up.
    pub fn frontend_cfg(&self, cfg: FrontendConfig) -> SyntheticFrontend {
        let mut fe = SyntheticFrontend::connect(&self.socket, cfg).unwrap();
        // A request with a reply: everything sent before it (SET_FEATURES
        // and the offloads it sets on the tap) has been handled.
        vhost::VhostBackend::get_features(fe.vhost().unwrap()).unwrap();
        fe
    }

    pub fn driver(&self, pairs: usize) -> NetDriver {
        NetDriver::new(self.frontend(pairs), pairs, RX_BUF, 32, 70 << 10).unwrap()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A packet socket on a tap of the test's namespace; failures panic.
pub struct PacketSocket(testnet::PacketSocket);

impl PacketSocket {
    /// Opens a socket on `ifname` inside `ns`; with `vnet`, frames carry a
    /// 10-byte virtio-net header (PACKET_VNET_HDR).
    pub fn open(ns: &NetNs, ifname: &str, vnet: bool) -> Self {
        let timeout = Duration::from_millis(200);
        PacketSocket(testnet::PacketSocket::open(ns, ifname, vnet, timeout).expect("packet socket"))
    }

    /// Sends one frame out of the interface (into the tap, towards the guest).
    pub fn send(&self, frame: &[u8]) {
        assert!(
            self.0.send(frame),
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Receives frames until `pred` accepts one (not counting frames the
    /// kernel sent), or panics after `timeout`.
    pub fn recv_matching(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70 << 10];
        while Instant::now() < deadline {
            if let Some((n, false)) = self.0.recv(&mut buf) {
                if pred(&buf[..n]) {
                    return buf[..n].to_vec();
                }
            }
        }
        panic!("no matching frame on the tap within {timeout:?}");
    }
}

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// IEEE local experimental ethertype, used to tell test frames from noise.
pub const ETH_TEST: u16 = 0x88b5;

/// An Ethernet frame of `len` bytes with the test ethertype and a pattern.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_TEST.to_be_bytes());
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

pub fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 14 && f[12..14] == ETH_TEST.to_be_bytes()
}

/// An IPv4 frame carrying `l4` (protocol `proto`) from 10.200.0.2:sport to
/// 10.200.0.1:dport; `l4_len` is the L4 length including its header.
pub fn ipv4_frame(proto: u8, sport: u16, dport: u16, l4_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4_len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&[10, 200, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 200, 0, 1]);
    let c = testnet::ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == 17 {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        l4[12] = 5 << 4; // TCP data offset
        l4[13] = 0x10; // ACK
    }
    for (i, b) in l4.iter_mut().enumerate().skip(20) {
        *b = (i as u8).wrapping_mul(13);
    }
    f.extend_from_slice(&l4);
    f
}

/// Receives on `pair` until a frame matching `pred` arrives.
pub fn recv_matching(d: &mut NetDriver, pair: usize, pred: impl Fn(&RxFrame) -> bool) -> RxFrame {
    let deadline = Instant::now() + TIMEOUT;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        let _ = d.wait_rx(pair, Duration::from_millis(200), Some(&mut out));
        if let Some(i) = out.iter().position(&pred) {
            return out.swap_remove(i);
        }
        out.clear();
    }
    panic!("no matching frame on RX queue {pair} within {TIMEOUT:?}");
}

/// A plain TX header: no offloads.
pub const PLAIN: [u8; 12] = [0; 12];

/// net-backend serving the tap `tap` of `ns`, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub metrics: PathBuf,
    pub tap: String,
}

impl Daemon {
    /// With a metrics socket; ready when that answers.
    pub fn start(ns: &NetNs, dir: &TempDir) -> Self {
        Self::start_with(ns, dir, &[])
    }

    /// Like [`Self::start`], with more command-line arguments.
    pub fn start_with(ns: &NetNs, dir: &TempDir, args: &[&str]) -> Self {
        Self::start_with_stderr(ns, dir, args, Stdio::inherit())
    }

    /// Like [`Self::start_with`], the daemon's log going to `stderr`.
    pub fn start_with_stderr(ns: &NetNs, dir: &TempDir, args: &[&str], stderr: Stdio) -> Self {
        let tap = ns.tap("t");
        ns.ip(&["link", "set", &tap, "up"]);
        Self::spawn(ns, dir, tap, args, stderr)
    }

    /// Kills the daemon (`kill -9`) and starts a new one on the same tap
    /// and sockets, as a supervisor restarting a crashed backend would; its
    /// log is dropped.
    pub fn restart(&mut self, ns: &NetNs, dir: &TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.metrics);
        let fresh = Self::spawn(ns, dir, self.tap.clone(), &[], Stdio::null());
        *self = fresh;
    }

    fn spawn(ns: &NetNs, dir: &TempDir, tap: String, args: &[&str], stderr: Stdio) -> Self {
        let socket = dir.path("net.sock");
        let metrics = dir.path("metrics.sock");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_net-backend")])
            .args(["--tap", &tap, "--queue-size", &QUEUE_SIZE.to_string()])
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-socket")
            .arg(&metrics)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            socket,
            metrics,
            tap,
        };
        wait_for_socket(&daemon.metrics);
        daemon
    }

    pub fn driver(&self) -> NetDriver {
        self.driver_pairs(1)
    }

    /// A driver of `pairs` queue pairs and the control queue.
    pub fn driver_pairs(&self, pairs: usize) -> NetDriver {
        let cfg = FrontendConfig {
            mem_size: 48 << 20,
            num_queues: 2 * pairs + 1,
            queue_size: QUEUE_SIZE,
            ..Default::default()
        };
        let fe = SyntheticFrontend::connect(&self.socket, cfg).unwrap();
        NetDriver::new(fe, pairs, RX_BUF, 32, 70 << 10).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "no metrics socket at {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
