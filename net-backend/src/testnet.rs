//! A private network for tests and benchmarks: a network namespace (with
//! the taps made in it, removed on drop) and AF_PACKET sockets on an
//! interface inside it. Used by net-backend's tests and by `net-bench`; the
//! daemon itself does not use it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use thiserror::Error;

/// Errors setting the network up.
#[derive(Debug, Error)]
pub enum TestNetError {
    /// A command failed.
    #[error("Command failed: {0}")]
    Command(String),
    /// A system call failed.
    #[error("{0} failed")]
    Sys(&'static str, #[source] std::io::Error),
}

fn sys(what: &'static str) -> TestNetError {
    TestNetError::Sys(what, std::io::Error::last_os_error())
}

fn run(cmd: &mut Command) -> Result<(), TestNetError> {
    let out = cmd
        .output()
        .map_err(|e| TestNetError::Sys("spawning a command", e))?;
    if !out.status.success() {
        return Err(TestNetError::Command(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A network namespace, deleted on drop with the taps made in it.
pub struct NetNs {
    /// Its name.
    pub name: String,
    taps: Mutex<Vec<String>>,
}

impl NetNs {
    /// Creates `name` (replacing a leftover of that name) with IPv6 off, so
    /// no autoconfiguration traffic shows up on its interfaces.
    pub fn new(name: &str) -> Result<Self, TestNetError> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs {
            name: name.into(),
            taps: Mutex::default(),
        };
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
    pub fn ip(&self, args: &[&str]) -> Result<(), TestNetError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), TestNetError> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Creates the persistent multi-queue tap `name` with a vnet header
    /// (deleted with the namespace).
    pub fn tap(&self, name: &str) -> Result<(), TestNetError> {
        let args = ["tuntap", "add", "dev", name, "mode", "tap"];
        self.ip(&[&args[..], &["multi_queue", "vnet_hdr"]].concat())?;
        if let Ok(mut taps) = self.taps.lock() {
            taps.push(name.into());
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered the namespace (sockets and
    /// taps it opens belong to the namespace).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TestNetError> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(|e| TestNetError::Sys("open netns", e))?;
            // SAFETY: `ns` is an open namespace file; setns only affects this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(sys("setns"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| TestNetError::Command("namespace thread panicked".into()))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(taps) = self.taps.lock() {
            for tap in taps.iter() {
                let _ = Command::new("ip")
                    .args(["-n", &self.name, "link", "del", tap])
                    .output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// PACKET_OUTGOING: a frame the kernel sent on the interface.
pub const PACKET_OUTGOING: u8 = 4;

/// An AF_PACKET socket bound to one interface, with 64 MiB buffers.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens it on `ifname` in `ns`; with `vnet`, frames carry a 10-byte
    /// virtio-net header (PACKET_VNET_HDR). Receives give up after `timeout`.
    pub fn open(
        ns: &NetNs,
        ifname: &str,
        vnet: bool,
        timeout: Duration,
    ) -> Result<Self, TestNetError> {
        let ifname = ifname.to_string();
        ns.enter(move || Self::open_here(&ifname, vnet, timeout))?
    }

    fn open_here(ifname: &str, vnet: bool, timeout: Duration) -> Result<Self, TestNetError> {
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
        if index == 0 {
            return Err(sys("if_nametoindex"));
        }
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
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        let vnet = libc::c_int::from(vnet);
        set_opt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &vnet)
            .map_err(|e| TestNetError::Sys("PACKET_VNET_HDR", e))?;
        // Big buffers are best effort (they need CAP_NET_ADMIN).
        let big: libc::c_int = 64 << 20;
        let _ = set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &big);
        let _ = set_opt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &big);
        set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
            .map_err(|e| TestNetError::Sys("SO_RCVTIMEO", e))?;
        Ok(PacketSocket { fd })
    }

    /// Sends one frame out of the interface; false if the kernel refused it
    /// (e.g. queue full).
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        n == frame.len() as isize
    }

    /// Receives one frame into `buf`: its length and whether the kernel sent
    /// it (PACKET_OUTGOING), or `None` on timeout or error.
    pub fn recv(&self, buf: &mut [u8]) -> Option<(usize, bool)> {
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
        (n >= 0).then_some((n as usize, sll.sll_pkttype == PACKET_OUTGOING))
    }
}

/// setsockopt with a value of the type the option takes.
fn set_opt<T>(fd: &OwnedFd, level: i32, opt: i32, val: &T) -> std::io::Result<()> {
    // SAFETY: `val` is a live `T` of the size passed, and every caller passes
    // the type its option expects (int or timeval).
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The IPv4 header checksum of `header`.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
