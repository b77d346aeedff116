//! The limit for a Copy restore: the same sparse memory file copied into a
//! fresh memfd of the guest's size, as `vmm` does it (`SEEK_DATA` /
//! `SEEK_HOLE`, `copy_file_range` per data range, a 1 MiB buffer where the
//! kernel refuses), with nothing else around it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Bytes the file really holds (`st_blocks * 512`).
pub fn allocated(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// How one copy went: bytes copied, and whether the kernel copied them
/// (`copy_file_range`) or the buffer did.
pub struct Copied {
    pub bytes: u64,
    pub buffered: bool,
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

/// Copies the data ranges of `src`'s first `size` bytes to the same offsets
/// in `dst`.
pub fn copy_data(src: &File, dst: &File, size: u64) -> io::Result<Copied> {
    let mut c = Copied {
        bytes: 0,
        buffered: false,
    };
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(src, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        c.buffered |= copy_range(src, dst, start, end - start)?;
        c.bytes += end - start;
        pos = end;
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

/// Copies `len` bytes at `off`; true when it fell back to the buffer.
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
                copy_buffered(src, dst, off + done, len - done)?;
                return Ok(true);
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
    Ok(false)
}

fn copy_buffered(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
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
        let mut pos = 0;
        while pos < size {
            let Some(start) = seek(src, pos, libc::SEEK_DATA)? else {
                break;
            };
            if start >= size {
                break;
            }
            let end = seek(src, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
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
            pos = end;
        }
        Ok(copied)
    })();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    result
}
