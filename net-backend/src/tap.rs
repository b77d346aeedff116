//! The tap device: one `/dev/net/tun` file per queue (`IFF_MULTI_QUEUE`), each
//! carrying a virtio-net header (`IFF_VNET_HDR`) in front of every frame.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Errors opening or configuring the tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// `/dev/net/tun` cannot be opened.
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// The tap does not exist and creation was not asked for.
    #[error("Tap {0} does not exist (use --create-tap)")]
    Missing(String),
    /// The kernel refused to attach (owner, flags or privilege mismatch).
    #[error("Cannot attach to tap {0}: it may be owned by another user, lack multi_queue/vnet_hdr, or need CAP_NET_ADMIN")]
    Attach(String, #[source] std::io::Error),
    /// An ioctl configuring the tap failed.
    #[error("Cannot configure tap {0} ({1})")]
    Ioctl(String, &'static str, #[source] std::io::Error),
    /// A `--tap-fd` is not an open fd.
    #[error("Tap fd {0} is not open")]
    BadFd(RawFd, #[source] std::io::Error),
    /// A `--tap-fd` is not a tap queue this daemon can use.
    #[error("Fd {0} is not a tap with a virtio-net header ({1})")]
    NotTap(RawFd, &'static str),
}

const FLAGS: libc::c_int =
    libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

/// The vnet header size we configure with TUNSETVNETHDRSZ (virtio 1.0 header).
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A multi-queue tap: one file per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    offload: libc::c_uint,
}

fn ifreq(name: &str, flags: libc::c_int) -> IfReq {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    req
}

fn ioctl_int(fd: RawFd, req: libc::Ioctl, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: every request we pass takes an int by value and `fd` is an open tun fd.
    let r = unsafe { libc::ioctl(fd, req, value as libc::c_ulong) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: *const T) -> std::io::Result<()> {
    // SAFETY: `arg` points to a live value of the type the request expects.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// True if interface `name` exists in the calling thread's network namespace.
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Opens `queues` queues of tap `name` (creating it if `create`), sets the
    /// vnet header size and the offloads the kernel accepts out of `wanted`
    /// (`TUN_F_*`; whatever the kernel refuses is left out).
    pub fn open(
        name: &str,
        queues: usize,
        create: bool,
        wanted: libc::c_uint,
    ) -> Result<Self, TapError> {
        if !create && !exists(name) {
            return Err(TapError::Missing(name.into()));
        }
        let mut files = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let req = ifreq(name, FLAGS);
            ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &req)
                .map_err(|e| TapError::Attach(name.into(), e))?;
            files.push(file);
        }
        Self::configure(name.into(), files, wanted)
    }

    /// Uses the tap queues others opened (one fd per queue pair, as libvirt
    /// passes them); this daemon owns the fds from now on. Each must be a
    /// tap with `IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` when there are several).
    pub fn from_fds(fds: &[RawFd], wanted: libc::c_uint) -> Result<Self, TapError> {
        let mut files = Vec::with_capacity(fds.len());
        let mut name = String::new();
        for &fd in fds {
            // SAFETY: F_GETFD only reads the fd's flags; a closed fd fails.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(TapError::BadFd(fd, std::io::Error::last_os_error()));
            }
            // SAFETY: the fd is open and, by the contract of `--tap-fd`,
            // handed to this daemon to own; nothing else uses it.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: F_SETFD on an fd we own only sets close-on-exec.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let mut req = ifreq("", 0);
            ioctl_ptr(fd, libc::TUNGETIFF, &mut req as *mut IfReq)
                .map_err(|_| TapError::NotTap(fd, "TUNGETIFF failed"))?;
            let flags = libc::c_int::from(req.flags);
            if flags & libc::IFF_TAP == 0 {
                return Err(TapError::NotTap(fd, "a tun, not a tap"));
            }
            if flags & libc::IFF_VNET_HDR == 0 {
                return Err(TapError::NotTap(fd, "no IFF_VNET_HDR"));
            }
            if fds.len() > 1 && flags & libc::IFF_MULTI_QUEUE == 0 {
                return Err(TapError::NotTap(fd, "several fds but no IFF_MULTI_QUEUE"));
            }
            let end = req
                .name
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(req.name.len());
            name = String::from_utf8_lossy(&req.name[..end]).into_owned();
            files.push(file);
        }
        Self::configure(name, files, wanted)
    }

    /// Sets the vnet header size and the best offloads on opened queues.
    fn configure(name: String, files: Vec<File>, wanted: libc::c_uint) -> Result<Self, TapError> {
        let fd = files[0].as_raw_fd();
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(fd, libc::TUNSETVNETHDRSZ, &hdr_len)
            .map_err(|e| TapError::Ioctl(name.clone(), "TUNSETVNETHDRSZ", e))?;
        let offload = Self::set_best_offload(fd, wanted)
            .map_err(|e| TapError::Ioctl(name.clone(), "TUNSETOFFLOAD", e))?;
        tracing::info!(tap = %name, queues = files.len(), offload, "tap opened");
        Ok(Tap {
            name,
            queues: files,
            offload,
        })
    }

    /// Tries `wanted`, then without UFO, then without anything.
    fn set_best_offload(fd: RawFd, wanted: libc::c_uint) -> std::io::Result<libc::c_uint> {
        let mut last = None;
        for flags in [wanted, wanted & !libc::TUN_F_UFO, 0] {
            match ioctl_int(fd, libc::TUNSETOFFLOAD, flags as libc::c_int) {
                Ok(()) => return Ok(flags),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL)))
    }

    /// Sets the vnet header length the tap reads and writes (10 or 12).
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let len = len as libc::c_int;
        ioctl_ptr(self.queues[0].as_raw_fd(), libc::TUNSETVNETHDRSZ, &len)
            .map_err(|e| TapError::Ioctl(self.name.clone(), "TUNSETVNETHDRSZ", e))
    }

    /// Sets the offloads the tap may hand us, limited to those it accepted at open.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        ioctl_int(
            self.queues[0].as_raw_fd(),
            libc::TUNSETOFFLOAD,
            (flags & self.offload) as libc::c_int,
        )
        .map_err(|e| TapError::Ioctl(self.name.clone(), "TUNSETOFFLOAD", e))
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUN_F_*` offloads the tap accepted.
    pub fn offload(&self) -> libc::c_uint {
        self.offload
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The file of queue `i`.
    pub fn queue(&self, i: usize) -> Option<&File> {
        self.queues.get(i)
    }
}
