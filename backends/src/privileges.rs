//! Dropping root (`--user USER[:GROUP]`): after the daemon has opened what
//! needs privileges (image, tap, listening sockets) it becomes USER, with
//! GROUP (default: USER's login group) as its only group, and checks that
//! root cannot be regained.
//!
//! The drop must happen while the process has a single thread: glibc changes
//! every thread's credentials by signalling them, and a confined thread
//! would refuse the call.

use std::ffi::CString;
use std::path::Path;
use std::str::FromStr;

use thiserror::Error;

/// Errors resolving the user or dropping privileges.
#[derive(Debug, Error)]
pub enum PrivilegeError {
    /// `--user` is empty or has an empty part.
    #[error("Invalid user {0:?}: expected USER[:GROUP]")]
    Spec(String),
    /// No such user.
    #[error("Unknown user {0:?}")]
    User(String),
    /// No such group.
    #[error("Unknown group {0:?}")]
    Group(String),
    /// Handing a socket to the user failed.
    #[error("Cannot hand {0} to the user")]
    Chown(String, #[source] std::io::Error),
    /// setgroups, setgid or setuid failed.
    #[error("Cannot switch to uid {uid} gid {gid}")]
    Switch {
        /// Target user id.
        uid: u32,
        /// Target group id.
        gid: u32,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// setuid(0) still succeeds after the drop.
    #[error("Root can be regained after switching to uid {0}")]
    Regained(u32),
}

/// `USER[:GROUP]` as given; names or numeric ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    /// User name or uid.
    pub user: String,
    /// Group name or gid (none: the user's login group).
    pub group: Option<String>,
}

impl FromStr for UserSpec {
    type Err = PrivilegeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(PrivilegeError::Spec(s.into()));
        }
        Ok(UserSpec {
            user: user.into(),
            group: group.map(Into::into),
        })
    }
}

/// A resolved user and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl UserSpec {
    /// Looks the user and group up (numbers are taken as ids).
    pub fn resolve(&self) -> Result<Ids, PrivilegeError> {
        let (uid, login_gid) = match self.user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                let (uid, gid) = lookup_user(&self.user)
                    .ok_or_else(|| PrivilegeError::User(self.user.clone()))?;
                (uid, Some(gid))
            }
        };
        let gid = match &self.group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => lookup_group(g).ok_or_else(|| PrivilegeError::Group(g.clone()))?,
            },
            None => login_gid.unwrap_or(uid),
        };
        Ok(Ids { uid, gid })
    }
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero passwd is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

fn lookup_group(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero group is a valid out-parameter.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(gr.gr_gid)
}

fn check(rc: libc::c_int, ids: Ids) -> Result<(), PrivilegeError> {
    if rc == 0 {
        return Ok(());
    }
    Err(PrivilegeError::Switch {
        uid: ids.uid,
        gid: ids.gid,
        source: std::io::Error::last_os_error(),
    })
}

/// Makes the user the owner of `sockets` (so a frontend running as that
/// user can connect), then becomes the user: groups, gid, uid, in that order.
pub fn drop_to(ids: Ids, sockets: &[&Path]) -> Result<(), PrivilegeError> {
    for s in sockets {
        std::os::unix::fs::chown(s, Some(ids.uid), Some(ids.gid))
            .map_err(|e| PrivilegeError::Chown(s.display().to_string(), e))?;
    }
    let groups = [ids.gid as libc::gid_t];
    // SAFETY: `groups` holds one valid gid for the length passed.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) }, ids)?;
    // SAFETY: plain system calls with integer arguments.
    check(unsafe { libc::setgid(ids.gid) }, ids)?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(ids.uid) }, ids)?;
    // SAFETY: as above; these must fail unless the target is root itself.
    let regained = unsafe { libc::setuid(0) == 0 || libc::setgid(0) == 0 };
    if ids.uid != 0 && regained {
        return Err(PrivilegeError::Regained(ids.uid));
    }
    tracing::info!(uid = ids.uid, gid = ids.gid, "dropped privileges");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_group_are_split() {
        let spec: UserSpec = "nobody:nogroup".parse().unwrap();

        assert_eq!(
            spec,
            UserSpec {
                user: "nobody".into(),
                group: Some("nogroup".into())
            }
        );
    }

    #[test]
    fn empty_group_is_rejected() {
        assert!("nobody:".parse::<UserSpec>().is_err());
    }

    #[test]
    fn nobody_resolves_to_its_ids() {
        let ids = UserSpec::from_str("nobody").unwrap().resolve().unwrap();

        assert_eq!(ids.uid, 65534);
    }

    #[test]
    fn unknown_user_is_an_error() {
        let spec = UserSpec::from_str("no-such-user-here").unwrap();

        assert!(matches!(spec.resolve(), Err(PrivilegeError::User(_))));
    }
}
