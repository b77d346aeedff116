//! Snapshot directories: what `vm.snapshot` writes and `vm.restore` /
//! `--restore` read.
//!
//! A snapshot is a directory with two files:
//! - `state`: a [`SnapshotState`] (the VM's config and device ids, every
//!   vCPU's and the VM-wide KVM state, every emulated device's state,
//!   virtio-pci transports included) in the versioned, checksummed
//!   container of [`crate::state::file`];
//! - `memory`: guest RAM as the memfd holds it, byte for byte at the same
//!   offsets, written sparsely: only the memfd's data ranges (`SEEK_DATA`
//!   / `SEEK_HOLE`) are copied, so pages the guest never touched stay
//!   holes on both sides.
//!
//! Everything is checked before anything is created on restore: the state
//! file's version and checksum, the vCPU count, and the memory file's size.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::VmConfig;
use crate::state::{
    read_state_file, write_state_file, DevicesState, StateFileError, VcpuState, VmState,
};

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The guest RAM file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors writing or reading a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("Snapshot URL must be file:///<absolute dir>, not '{0}'")]
    Url(String),
    #[error("Cannot create snapshot directory {0}")]
    CreateDir(String, #[source] io::Error),
    #[error("Cannot write {0}")]
    Write(String, #[source] io::Error),
    #[error("Cannot read {0}")]
    Read(String, #[source] io::Error),
    #[error("Invalid snapshot state file")]
    State(#[from] StateFileError),
    #[error("Memory file {path} has {found} bytes; the snapshot's VM has {expected}")]
    MemorySize {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("The snapshot has {found} vCPU states for {expected} vCPUs")]
    VcpuCount { found: usize, expected: usize },
    #[error("The snapshot has no device '{0}'")]
    NoSuchDevice(String),
    #[error("Memory file {0} is not on tmpfs or hugetlbfs: it cannot be mapped as guest RAM (restore with copy)")]
    NotSharedMemory(String),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// How guest RAM comes back on restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryRestore {
    /// Into a new memfd, from the memory file's data ranges: the snapshot
    /// stays as it is and can be restored again.
    #[default]
    Copy,
    /// The memory file itself becomes guest RAM (`MAP_SHARED`; it must be
    /// on tmpfs or hugetlbfs): nothing is copied, and the snapshot is
    /// consumed (the guest writes into it).
    Map,
}

impl std::str::FromStr for MemoryRestore {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "copy" => Ok(Self::Copy),
            "map" => Ok(Self::Map),
            _ => Err(format!(
                "memory_restore_mode '{s}' is not supported: Copy or Map"
            )),
        }
    }
}

/// Everything but guest RAM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub config: VmConfig,
    /// The API ids of the devices, in `config.devices` order.
    pub ids: Vec<String>,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// Every device the VMM emulates.
    pub devices: DevicesState,
    /// Per device (in `config.devices` order), its vhost-user backend's
    /// own state when the backend offers DEVICE_STATE.
    pub backends: Vec<Option<Vec<u8>>>,
}

/// The directory a `file:///dir` URL names.
pub fn dir_from_url(url: &str) -> Result<PathBuf> {
    url.strip_prefix("file://")
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .ok_or_else(|| SnapshotError::Url(url.to_string()))
}

/// Writes `state` and the memory behind `memfd` (`size` bytes) into `dir`,
/// created if needed; returns the bytes of RAM copied.
pub fn save(dir: &Path, state: &SnapshotState, memfd: &File, size: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SnapshotError::CreateDir(dir.display().to_string(), e))?;
    let mem_path = dir.join(MEMORY_FILE);
    let shown = || mem_path.display().to_string();
    let out = File::create(&mem_path).map_err(|e| SnapshotError::Write(shown(), e))?;
    out.set_len(size)
        .map_err(|e| SnapshotError::Write(shown(), e))?;
    let copied = copy_sparse(memfd, &out, size)
        .map_err(|e| SnapshotError::Write(shown(), e))?
        .bytes;
    out.sync_all()
        .map_err(|e| SnapshotError::Write(shown(), e))?;
    // The state goes last: a directory with a state file is complete.
    write_state_file(&dir.join(STATE_FILE), state)?;
    Ok(copied)
}

/// Reads and checks a snapshot's state; the memory file is checked too,
/// not read.
pub fn load(dir: &Path) -> Result<SnapshotState> {
    let state: SnapshotState = read_state_file(&dir.join(STATE_FILE))?;
    let expected = usize::from(state.config.cpus);
    if state.vcpus.len() != expected {
        return Err(SnapshotError::VcpuCount {
            found: state.vcpus.len(),
            expected,
        });
    }
    let mem_path = dir.join(MEMORY_FILE);
    let found = std::fs::metadata(&mem_path)
        .map_err(|e| SnapshotError::Read(mem_path.display().to_string(), e))?
        .len();
    if found != state.config.memory {
        return Err(SnapshotError::MemorySize {
            path: mem_path.display().to_string(),
            found,
            expected: state.config.memory,
        });
    }
    Ok(state)
}

impl SnapshotState {
    /// Points the devices named in `sockets` (API id → socket path) at
    /// new backend sockets; an id the snapshot does not have is an error.
    pub fn move_sockets(
        &mut self,
        sockets: &std::collections::BTreeMap<String, PathBuf>,
    ) -> Result<()> {
        for (id, path) in sockets {
            let i = self
                .ids
                .iter()
                .position(|d| d == id)
                .ok_or_else(|| SnapshotError::NoSuchDevice(id.clone()))?;
            self.config.devices[i].socket = path.clone();
        }
        Ok(())
    }
}

/// Opens the snapshot's memory file to become guest RAM
/// ([`MemoryRestore::Map`]); refused unless it is on tmpfs or hugetlbfs,
/// where a shared mapping of it is plain memory.
pub fn open_memory_for_map(dir: &Path) -> Result<File> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let path = dir.join(MEMORY_FILE);
    let shown = || path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| SnapshotError::Read(shown(), e))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the statfs `st` points to for an open fd.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(SnapshotError::Read(shown(), io::Error::last_os_error()));
    }
    // SAFETY: fstatfs succeeded, so `st` is initialised.
    let fs_type: i64 = unsafe { st.assume_init() }.f_type;
    if fs_type != TMPFS_MAGIC && fs_type != HUGETLBFS_MAGIC {
        return Err(SnapshotError::NotSharedMemory(shown()));
    }
    Ok(file)
}

/// Fills `memfd` (already `size` bytes) from the snapshot's memory file;
/// returns the bytes copied.
pub fn load_memory(dir: &Path, memfd: &File, size: u64) -> Result<u64> {
    let path = dir.join(MEMORY_FILE);
    let shown = || path.display().to_string();
    let src = File::open(&path).map_err(|e| SnapshotError::Read(shown(), e))?;
    copy_sparse(&src, memfd, size)
        .map(|c| c.bytes)
        .map_err(|e| SnapshotError::Read(shown(), e))
}

/// How a sparse copy went: bytes copied, and whether the kernel did not
/// copy them all itself (`copy_file_range` refused; a buffer did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub buffered: bool,
}

/// The data ranges of `f`'s first `size` bytes (`SEEK_DATA`/`SEEK_HOLE`).
pub fn data_ranges(f: &File, size: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        ranges.push(start..end);
        pos = end;
    }
    Ok(ranges)
}

/// Copies the data ranges of `src`'s first `size` bytes to the same
/// offsets in `dst`; holes are skipped.
pub fn copy_sparse(src: &File, dst: &File, size: u64) -> io::Result<Copied> {
    let mut c = Copied {
        bytes: 0,
        buffered: false,
    };
    for r in data_ranges(src, size)? {
        c.buffered |= copy_range(src, dst, r.start, r.end - r.start)?;
        c.bytes += r.end - r.start;
    }
    Ok(c)
}

/// `lseek(fd, pos, whence)`; `None` when there is no more data (ENXIO).
fn seek(f: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an fd we own; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Copies `len` bytes at `off` from `src` to `dst` in the kernel
/// (`copy_file_range`), or through a buffer where the kernel cannot
/// (across file systems); `true` if the buffer did.
fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<bool> {
    let mut done = 0u64;
    while done < len {
        let mut in_off = (off + done) as libc::loff_t;
        let mut out_off = in_off;
        let chunk = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both fds are open; the offsets are valid pointers to
        // loff_t the kernel updates; no memory of ours is written.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut in_off,
                dst.as_raw_fd(),
                &mut out_off,
                chunk,
                0,
            )
        };
        if n > 0 {
            done += n as u64;
            continue;
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
                return copy_buffered(src, dst, off + done, len - done).map(|()| true);
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
    Ok(false)
}

fn copy_buffered(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        src.read_exact_at(&mut buf[..n], off + done)?;
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn file_url_gives_its_directory_and_others_are_refused() {
        assert_eq!(dir_from_url("file:///a/b").unwrap(), PathBuf::from("/a/b"));
        assert!(dir_from_url("/a/b").is_err());
        assert!(dir_from_url("file://a/b").is_err());
        assert!(dir_from_url("tcp:1.2.3.4:5").is_err());
    }

    #[test]
    fn sparse_copy_keeps_data_at_its_offsets_and_holes_as_holes() {
        let dir = temp("sparse");
        let rw = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(name))
                .unwrap()
        };
        let src = rw("src");
        let size = 64 << 20;
        src.set_len(size).unwrap();
        src.write_all_at(b"first", 4096).unwrap();
        src.write_all_at(b"last", size - 4).unwrap();
        let dst = rw("dst");
        dst.set_len(size).unwrap();

        let copied = copy_sparse(&src, &dst, size).unwrap().bytes;

        let mut a = [0u8; 5];
        dst.read_exact_at(&mut a, 4096).unwrap();
        let mut b = [0u8; 4];
        dst.read_exact_at(&mut b, size - 4).unwrap();
        assert_eq!(&a, b"first");
        assert_eq!(&b, b"last");
        assert!(
            copied < 1 << 20,
            "copied {copied} bytes of a mostly empty file"
        );
        use std::os::unix::fs::MetadataExt;
        assert!(dst.metadata().unwrap().blocks() * 512 < 1 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
