//! The benchmark's surroundings: a network namespace, packet sockets on a
//! tap inside it, frames.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use net_backend::testnet::{ipv4_checksum, PacketSocket as Socket};
pub use net_backend::testnet::{NetNs, TestNetError as EnvError};

/// A packet socket on a tap of the benchmark's namespace.
pub struct PacketSocket(Socket);

impl PacketSocket {
    /// Opens it on `ifname` in `ns`; `vnet` adds PACKET_VNET_HDR.
    pub fn open(ns: &NetNs, ifname: &str, vnet: bool) -> Result<Self, EnvError> {
        Socket::open(ns, ifname, vnet, Duration::from_millis(100)).map(PacketSocket)
    }

    /// Sends one frame; false if the kernel refused it (e.g. queue full).
    pub fn send(&self, frame: &[u8]) -> bool {
        self.0.send(frame)
    }

    /// Counts incoming frames of exactly `len` bytes until `stop`; returns
    /// (frames, bytes, the CPU nanoseconds it used).
    pub fn count(&self, len: usize, stop: &AtomicBool) -> (u64, u64, u64) {
        let cpu = crate::cpu::thread_ns();
        let mut buf = vec![0u8; 128 << 10];
        let (mut frames, mut bytes) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            if self.0.recv(&mut buf) == Some((len, false)) {
                frames += 1;
                bytes += len as u64;
            }
        }
        (frames, bytes, crate::cpu::thread_ns() - cpu)
    }
}

/// A thread counting frames on a packet socket until stopped.
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, u64, u64)>,
}

impl Sink {
    /// Starts counting frames of `len` bytes on `sock`.
    pub fn start(sock: Arc<PacketSocket>, len: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || sock.count(len, &flag));
        Sink { stop, thread }
    }

    /// Stops and returns (frames, bytes, the counting thread's CPU ns).
    pub fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// MAC the benchmark frames are addressed to on TX (nobody's: the host
/// stack drops them early, so nothing comes back).
pub const NOBODY: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
/// The guest's MAC.
pub const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// An Ethernet + IPv4 frame of `len` bytes: UDP, or TCP with `tcp`.
pub fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tcp: bool) -> Vec<u8> {
    let len = len.max(60);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = if tcp { 6 } else { 17 };
    ip[12..16].copy_from_slice(&[10, 201, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 201, 0, 1]);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = vec![0u8; len - 34];
    l4[0..2].copy_from_slice(&4000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&5001u16.to_be_bytes());
    if tcp {
        l4[12] = 5 << 4;
        l4[13] = 0x10;
    } else {
        l4[4..6].copy_from_slice(&((len - 34) as u16).to_be_bytes());
    }
    f.extend_from_slice(&l4);
    f
}

/// A virtio-net header: plain, or TCP/IPv4 TSO with a partial checksum.
pub fn vnet_hdr(tso: bool) -> [u8; 12] {
    let mut h = [0u8; 12];
    if tso {
        h[0] = 1;
        h[1] = 1;
        h[2..4].copy_from_slice(&54u16.to_le_bytes());
        h[4..6].copy_from_slice(&1448u16.to_le_bytes());
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
    }
    h
}
