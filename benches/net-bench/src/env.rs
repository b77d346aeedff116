//! The benchmark's surroundings: a network namespace, packet sockets on a
//! tap inside it, frames.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;

/// Errors setting the environment up.
#[derive(Debug, Error)]
pub enum EnvError {
    /// A command failed.
    #[error("Command failed: {0}")]
    Command(String),
    /// A system call failed.
    #[error("{0} failed")]
    Sys(&'static str, #[source] std::io::Error),
}

fn sys(what: &'static str) -> EnvError {
    EnvError::Sys(what, std::io::Error::last_os_error())
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    /// Its name.
    pub name: String,
}

impl NetNs {
    /// Creates `name` with IPv6 off (no autoconfiguration noise).
    pub fn new(name: &str) -> Result<Self, EnvError> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs { name: name.into() };
        // /proc/sys/net belongs to the namespace of the thread that opens it.
        ns.enter(|| {
            for conf in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                let _ = std::fs::write(path, "1");
            }
        })?;
        Ok(ns)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), EnvError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, EnvError> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(|e| EnvError::Sys("open netns", e))?;
            // SAFETY: `ns` is an open namespace file; setns only affects this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(sys("setns"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| EnvError::Command("namespace thread panicked".into()))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(cmd: &mut Command) -> Result<(), EnvError> {
    let out = cmd
        .output()
        .map_err(|e| EnvError::Sys("spawning a command", e))?;
    if !out.status.success() {
        return Err(EnvError::Command(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// An AF_PACKET socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

const PACKET_OUTGOING: u8 = 4;

impl PacketSocket {
    /// Opens it on `ifname` in `ns`; `vnet` adds PACKET_VNET_HDR.
    pub fn open(ns: &NetNs, ifname: &str, vnet: bool) -> Result<Self, EnvError> {
        let ifname = ifname.to_string();
        ns.enter(move || Self::open_here(&ifname, vnet))?
    }

    fn open_here(ifname: &str, vnet: bool) -> Result<Self, EnvError> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(sys("socket"));
        }
        // SAFETY: `fd` is a fresh socket nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap_or_default();
        // SAFETY: `name` is NUL-terminated.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data; zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(sys("bind"));
        }
        let opts: [(libc::c_int, libc::c_int, libc::c_int); 3] = [
            (libc::SOL_PACKET, libc::PACKET_VNET_HDR, i32::from(vnet)),
            (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 64 << 20),
            (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 64 << 20),
        ];
        for (level, opt, val) in opts {
            // SAFETY: each option takes an int.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    level,
                    opt,
                    (&val as *const libc::c_int).cast(),
                    4,
                )
            };
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(PacketSocket { fd })
    }

    /// Sends one frame; false if the kernel refused it (e.g. queue full).
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        n == frame.len() as isize
    }

    /// Counts incoming frames of exactly `len` bytes until `stop`; returns (frames, bytes).
    pub fn count(&self, len: usize, stop: &AtomicBool) -> (u64, u64) {
        let mut buf = vec![0u8; 128 << 10];
        let (mut frames, mut bytes) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: sockaddr_ll is plain data; zero is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `sll` are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n as usize == len && sll.sll_pkttype != PACKET_OUTGOING {
                frames += 1;
                bytes += len as u64;
            }
        }
        (frames, bytes)
    }
}

/// A thread counting frames on a packet socket until stopped.
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, u64)>,
}

impl Sink {
    /// Starts counting frames of `len` bytes on `sock`.
    pub fn start(sock: Arc<PacketSocket>, len: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || sock.count(len, &flag));
        Sink { stop, thread }
    }

    /// Stops and returns (frames, bytes).
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// MAC the benchmark frames are addressed to on TX (nobody's: the host
/// stack drops them early, so nothing comes back).
pub const NOBODY: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
/// The guest's MAC.
pub const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

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
    let c = csum(&ip);
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
