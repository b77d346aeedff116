//! An API socket handed over by a manager: `--api-socket fd=N`, as
//! libvirt's Cloud Hypervisor driver starts us (it binds and listens on
//! the socket itself, passes the fd, and removes the socket's path when it
//! stops or destroys the domain).
//!
//! The manager owns that path: vmm never removes it, and once the manager
//! has removed it nobody can reach the API again, so vmm then stops the VM
//! and exits as on SIGTERM (libvirt neither kills the process nor asks it
//! to exit; Cloud Hypervisor itself is left running there). The removal is
//! seen by an inotify watch on the socket's directory, on its own thread.
//! The event monitor is closed first, without another event: libvirt's
//! reader of the old run would otherwise apply a late `vm:shutdown` to
//! the domain's next run.
//!
//! Also here: the Cloud Hypervisor release whose API vmm serves (a subset,
//! listed in `openapi.yaml`), which `--version` prints for libvirt.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// The Cloud Hypervisor release whose REST API (paths, bodies, status
/// codes, events) vmm follows. libvirt's ch driver picks its requests by
/// it: at 41 it sends `payload` (since 28), tap fds with vm.add-net (22)
/// and new tap fds on restore (40).
pub const CLOUD_HYPERVISOR_API: &str = "41.0.0";

/// `vmm --version`: ours, and the Cloud Hypervisor API level served.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (Cloud Hypervisor API v41.0.0)");

/// What `--version` prints when vmm runs under the name
/// `cloud-hypervisor` (libvirt requires `cloud-hypervisor vN.M.P`).
pub fn cloud_hypervisor_version_line() -> String {
    format!(
        "cloud-hypervisor v{CLOUD_HYPERVISOR_API} (vmm {})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Errors taking over or watching a manager's socket.
#[derive(Debug, Error)]
pub enum ManagerError {
    #[error("Expected path=PATH, fd=N or a path, not '{0}'")]
    Syntax(String),
    #[error("The API socket fd {0} is not open")]
    BadFd(RawFd, #[source] io::Error),
    #[error("The API socket fd {0} is not a listening unix stream socket")]
    NotListening(RawFd),
    #[error("Cannot watch the API socket path {0}")]
    Watch(String, #[source] io::Error),
}

/// `--api-socket`: a path vmm binds, or an fd bound by someone else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketArg {
    Path(PathBuf),
    Fd(RawFd),
}

impl FromStr for SocketArg {
    type Err = ManagerError;

    fn from_str(s: &str) -> Result<Self, ManagerError> {
        let syntax = || ManagerError::Syntax(s.to_string());
        if let Some(p) = s.strip_prefix("path=") {
            return if p.is_empty() {
                Err(syntax())
            } else {
                Ok(Self::Path(p.into()))
            };
        }
        if let Some(n) = s.strip_prefix("fd=") {
            return n.parse().map(Self::Fd).map_err(|_| syntax());
        }
        if s.is_empty() {
            return Err(syntax());
        }
        Ok(Self::Path(s.into()))
    }
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a c_int
    // whose size `len` holds; an fd that is not a socket only fails.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

/// Takes ownership of the inherited listening socket `fd` (close-on-exec
/// from now on, so no backend vmm starts inherits it).
pub fn take_listener(fd: RawFd) -> Result<UnixListener, ManagerError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid fd
    // makes it fail with EBADF and nothing else.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ManagerError::BadFd(fd, io::Error::last_os_error()));
    }
    let listening = sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && sockopt(fd, libc::SO_ACCEPTCONN) == Some(1);
    if !listening {
        return Err(ManagerError::NotListening(fd));
    }
    // SAFETY: the fd is open (checked above) and, by the contract of
    // `--api-socket fd=N`, handed to us to own: nothing else uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on an fd we own only sets its close-on-exec flag.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixListener::from(owned))
}

/// The filesystem path `listener` is bound to, if any.
pub fn bound_path(listener: &UnixListener) -> Option<PathBuf> {
    let addr = listener.local_addr().ok()?;
    addr.as_pathname().map(Path::to_path_buf)
}

/// Which file a path names: (device, inode).
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Watches `path` (the manager's socket) on a thread of its own; once it
/// is removed or replaced, sends SIGTERM to this process: read by the
/// VMM's signalfd once it runs, or, before that (vmm still waiting for the
/// event monitor's reader, say), the default action ends the process.
pub fn stop_when_removed(path: PathBuf) -> Result<(), ManagerError> {
    let shown = path.display().to_string();
    let err = |e| ManagerError::Watch(shown.clone(), e);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir_c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just created and is owned by nobody else.
    let inotify = unsafe { OwnedFd::from_raw_fd(raw) };
    let mask = libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_CREATE
        | libc::IN_MOVED_TO
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: `dir_c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), dir_c.as_ptr(), mask) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // Taken after the watch exists, so a removal in between is seen.
    let original = identity(&path);
    std::thread::Builder::new()
        .name("vmm-api-watch".into())
        .spawn(move || {
            crate::events::block_signals();
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Watch);
            let mut buf = [0u8; 4096];
            while original.is_some() && identity(&path) == original {
                // SAFETY: reads into `buf`, a writable buffer of its length.
                let n =
                    unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %io::Error::last_os_error(), "API socket watch failed");
                    return;
                }
            }
            tracing::info!(path = %path.display(), "API socket removed by its owner: stopping");
            // Nothing more for the manager: it has stopped the domain.
            crate::events::detach();
            // SAFETY: kill with our own pid and a valid signal number; the
            // VMM reads SIGTERM from its signalfd and stops cleanly.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        })
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_arg_parses_path_fd_and_bare_path() {
        assert_eq!(
            "path=/run/a.sock".parse::<SocketArg>().unwrap(),
            SocketArg::Path("/run/a.sock".into())
        );
        assert_eq!("fd=3".parse::<SocketArg>().unwrap(), SocketArg::Fd(3));
        assert_eq!(
            "/run/b.sock".parse::<SocketArg>().unwrap(),
            SocketArg::Path("/run/b.sock".into())
        );
    }

    #[test]
    fn socket_arg_rejects_empty_and_bad_fd() {
        for s in ["", "path=", "fd=", "fd=x"] {
            assert!(s.parse::<SocketArg>().is_err(), "{s}");
        }
    }

    #[test]
    fn version_line_is_what_libvirt_parses() {
        let line = cloud_hypervisor_version_line();

        let rest = line.strip_prefix("cloud-hypervisor v").unwrap();
        let major: u32 = rest.split('.').next().unwrap().parse().unwrap();
        assert!(major >= 40, "{line}");
    }

    #[test]
    fn vmm_version_names_the_api_level() {
        assert!(VERSION.contains(&format!("API v{CLOUD_HYPERVISOR_API})")));
    }

    #[test]
    fn a_connected_stream_is_not_a_listener() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();

        let r = take_listener(a.as_raw_fd());

        assert!(matches!(r, Err(ManagerError::NotListening(_))));
    }
}
