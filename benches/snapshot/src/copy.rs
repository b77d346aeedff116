//! The limit for a Copy restore: the same sparse memory file copied into a
//! fresh memfd of the guest's size, as `vmm` does it (`SEEK_DATA` /
//! `SEEK_HOLE`, `copy_file_range` per data range, a 1 MiB buffer where the
//! kernel refuses), with nothing else around it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes the file really holds (`st_blocks * 512`).
pub fn allocated(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// A memfd of `size` bytes, like the one a Copy restore allocates.
pub fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd it returns
    // is new and owned by the File below.
    let fd = unsafe { libc::memfd_create(c"snapshot-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// The VMM's own copy of a snapshot's memory into a memfd
/// ([`vmm::snapshot::copy_sparse`]), alone.
pub use vmm::snapshot::copy_sparse as copy_data;

/// The one-copy alternative: the data ranges of `src` read straight into a
/// shared mapping of `dst` (`pread` into guest RAM as the VMM maps it), no
/// bounce buffer. Returns the bytes copied.
pub fn read_into_mapping(src: &File, dst: &File, size: u64) -> io::Result<u64> {
    let len = usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a new shared mapping of `len` bytes of `dst`, which is at
    // least `size` long; unmapped below and never aliased by a reference.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            dst.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        let mut copied = 0;
        for r in vmm::snapshot::data_ranges(src, size)? {
            let (start, end) = (r.start, r.end);
            let mut at = start;
            while at < end {
                let n = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
                // SAFETY: `[at, at + n)` is inside the `len`-byte mapping
                // (`end` <= `size`); pread writes only there.
                let r = unsafe {
                    libc::pread(
                        src.as_raw_fd(),
                        base.cast::<u8>().add(at as usize).cast(),
                        n,
                        at as libc::off_t,
                    )
                };
                match r {
                    r if r > 0 => at += r as u64,
                    0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
            copied += end - start;
        }
        Ok(copied)
    })();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    result
}
