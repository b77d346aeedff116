//! Where host-wide tools find every running vmm: each vmm with an API
//! socket registers it in a runtime directory of ours, and the libvirt ch
//! driver's own socket directories are looked at too.
//!
//! The registry is [`registry_dir`]: `$XDG_RUNTIME_DIR/vmm/` when that
//! variable is set, else `/run/vmm/` for root, else `vmm-<uid>/` in the
//! temporary directory; created mode 0700. A vmm serving its API on a
//! socket with a path (`--api-socket PATH`, or `fd=N` bound by a manager)
//! puts there a symbolic link named after its pid that points at that
//! socket, and removes it at exit ([`Registration`]); a link left by a
//! killed vmm is recognised by its pid being gone and removed by the next
//! [`discover`].
//!
//! libvirt's ch driver binds `<state dir>/<domain>-socket`: in session mode
//! the state dir is `$XDG_RUNTIME_DIR/libvirt/ch/run`, for the system
//! daemon `/run/libvirt/ch`. [`discover`] lists those too, so a vmm that
//! libvirt started is found even if its registration is elsewhere.
//!
//! A VM's name is its socket's file name without `-socket` (libvirt's
//! domain name) or `.sock`.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors registering an API socket.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("Cannot create the registry directory {0}")]
    Dir(String, #[source] io::Error),
    #[error("Cannot register the API socket in {0}")]
    Link(String, #[source] io::Error),
}

/// The registry directory of this user (see the module doc).
pub fn registry_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vmm");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/vmm")
    } else {
        std::env::temp_dir().join(format!("vmm-{uid}"))
    }
}

/// libvirt ch driver socket directories for this user.
fn libvirt_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d).join("libvirt/ch/run"));
    }
    dirs.push(PathBuf::from("/run/libvirt/ch"));
    dirs
}

/// This process's entry in the registry; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    link: PathBuf,
}

impl Registration {
    /// Registers the API socket at `socket` in [`registry_dir`].
    pub fn new(socket: &Path) -> Result<Self, RegistryError> {
        Self::in_dir(&registry_dir(), socket)
    }

    /// Registers `socket` in `dir` (created mode 0700 if missing).
    pub fn in_dir(dir: &Path, socket: &Path) -> Result<Self, RegistryError> {
        let shown = dir.display().to_string();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| RegistryError::Dir(shown.clone(), e))?;
        let socket =
            std::path::absolute(socket).map_err(|e| RegistryError::Link(shown.clone(), e))?;
        let link = dir.join(std::process::id().to_string());
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&socket, &link).map_err(|e| RegistryError::Link(shown, e))?;
        Ok(Self { link })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
    }
}

/// Makes an API socket someone else bound owner-only (libvirt creates its
/// sockets group-readable).
pub fn restrict(socket: &Path) -> io::Result<()> {
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
}

/// A running vmm found by [`discover`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// The VM's name (see the module doc).
    pub name: String,
    /// Its API socket.
    pub socket: PathBuf,
}

/// The VM name a socket path stands for.
pub fn name_of(socket: &Path) -> String {
    let file = socket
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.strip_suffix("-socket")
        .or_else(|| file.strip_suffix(".sock"))
        .unwrap_or(&file)
        .to_string()
}

fn is_socket(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Every vmm registered in `registry` or listening in one of libvirt's
/// directories, once each (by socket path), sorted by name. Links whose
/// pid is gone are removed.
pub fn discover_in(registry: &Path, libvirt: &[PathBuf]) -> Vec<Found> {
    let mut by_socket = BTreeMap::new();
    for entry in std::fs::read_dir(registry).into_iter().flatten().flatten() {
        let link = entry.path();
        let Ok(target) = std::fs::read_link(&link) else {
            continue;
        };
        let pid_alive = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !pid_alive || !is_socket(&target) {
            if !pid_alive {
                let _ = std::fs::remove_file(&link);
            }
            continue;
        }
        by_socket.insert(target.clone(), name_of(&target));
    }
    for dir in libvirt {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let libvirt_socket = p
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.ends_with("-socket"));
            if libvirt_socket && is_socket(&p) {
                by_socket.entry(p.clone()).or_insert_with(|| name_of(&p));
            }
        }
    }
    let mut found: Vec<Found> = by_socket
        .into_iter()
        .map(|(socket, name)| Found { name, socket })
        .collect();
    found.sort();
    found
}

/// [`discover_in`] this user's registry and libvirt's directories.
pub fn discover() -> Vec<Found> {
    discover_in(&registry_dir(), &libvirt_dirs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_drop_libvirt_and_sock_suffixes() {
        assert_eq!(name_of(Path::new("/run/libvirt/ch/web-socket")), "web");
        assert_eq!(name_of(Path::new("/tmp/db.sock")), "db");
        assert_eq!(name_of(Path::new("/tmp/api")), "api");
    }

    #[test]
    fn registered_socket_is_found_until_the_registration_drops() {
        let d = temp("reg");
        let sock = d.join("one.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let reg_dir = d.join("registry");

        let reg = Registration::in_dir(&reg_dir, &sock).unwrap();
        let found = discover_in(&reg_dir, &[]);
        drop(reg);
        let after = discover_in(&reg_dir, &[]);

        assert_eq!(
            found,
            [Found {
                name: "one".into(),
                socket: sock
            }]
        );
        assert!(after.is_empty());
        let mode = std::fs::metadata(&reg_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn link_of_a_dead_pid_is_removed_and_libvirt_sockets_are_found() {
        let d = temp("dead");
        let reg_dir = d.join("registry");
        let lv = d.join("libvirt");
        std::fs::create_dir_all(&reg_dir).unwrap();
        std::fs::create_dir_all(&lv).unwrap();
        let sock = lv.join("web-socket");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // Pids are below 2^22 on Linux.
        let stale = reg_dir.join("4294967294");
        std::os::unix::fs::symlink(&sock, &stale).unwrap();

        let found = discover_in(&reg_dir, &[lv]);

        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "web");
        assert!(std::fs::symlink_metadata(&stale).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
