//! Guest memory types shared by backends and the synthetic frontend.

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};

use crate::desc::Descriptor;

/// The guest memory a backend sees, as mapped from SET_MEM_TABLE.
pub type GuestMem = GuestMemoryMmap<()>;
/// Guest memory that the control thread can swap while workers use it.
pub type GuestMemoryShared = GuestMemoryAtomic<GuestMem>;
/// A snapshot of guest memory kept alive by in-flight requests.
pub type GuestMemRef = Arc<GuestMem>;

/// Errors building guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("Cannot create memfd")]
    Memfd(#[source] std::io::Error),
    /// Resizing the memfd failed.
    #[error("Cannot size memfd")]
    Truncate(#[source] std::io::Error),
    /// Mapping failed.
    #[error("Cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// The region set is invalid.
    #[error("Invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// fstat on a file the frontend sent failed.
    #[error("Cannot read the size of the file")]
    Stat(#[source] std::io::Error),
    /// A mapping the frontend asked for reaches past the end of its file.
    #[error("Mapping of {size:#x} bytes at offset {offset:#x} reaches past the end of its {file_len:#x}-byte file")]
    PastEnd {
        /// Offset of the mapping in the file.
        offset: u64,
        /// Length of the mapping.
        size: u64,
        /// Size of the file.
        file_len: u64,
    },
}

/// Creates a memfd of `size` bytes, mapped shared at guest address 0.
pub fn memfd_memory(size: usize) -> Result<(GuestMem, File), MemoryError> {
    let memfd = memfd_create("guest-ram")?;
    memfd.set_len(size as u64).map_err(MemoryError::Truncate)?;
    let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
    let region =
        MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(MemoryError::Mmap)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Layout(
        vm_memory::GuestRegionCollectionError::NoMemoryRegion,
    ))?;
    let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Layout)?;
    Ok((mem, memfd))
}

/// Creates an anonymous memory file (sealed nowhere, close-on-exec).
pub fn memfd_create(name: &str) -> Result<File, MemoryError> {
    let name = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Refuses a mapping of `size` bytes at `offset` of `file` that reaches
/// past the end of the file, when the file is a regular one (a memfd, a
/// hugetlbfs or tmpfs file): touching a page past its end would kill the
/// daemon with SIGBUS. Other files (devices) are left to `mmap`.
///
/// The size comes from `fstat` (glibc's `newfstatat` with `AT_EMPTY_PATH`,
/// which the protocol thread's seccomp filter allows), not from
/// `File::metadata`, whose `statx` the filter does not.
pub fn check_file_range(file: &File, offset: u64, size: u64) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open fd for the duration of the call and `st` is
    // a valid, writable `stat`.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(MemoryError::Stat(std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(());
    }
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    let fits = offset.checked_add(size).is_some_and(|end| end <= file_len);
    if !fits {
        return Err(MemoryError::PastEnd {
            offset,
            size,
            file_len,
        });
    }
    Ok(())
}

/// Appends host iovecs covering the buffers of `descs` to `iov`; false if
/// any byte lies outside guest memory (`iov` then holds a partial list).
pub fn host_iovecs(mem: &GuestMem, descs: &[Descriptor], iov: &mut Vec<libc::iovec>) -> bool {
    for d in descs {
        let len = d.len as usize;
        if len == 0 {
            continue;
        }
        // Nearly every buffer lies within one region: one lookup, no iterator.
        if let Ok(slice) = mem.get_slice(d.addr, len) {
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len,
            });
            continue;
        }
        for slice in mem.get_slices(d.addr, len) {
            let Ok(slice) = slice else {
                return false;
            };
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    true
}
