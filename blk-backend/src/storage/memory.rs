//! RAM-speed storage served by copies to and from a mapping: an anonymous
//! one (`--storage memory:SIZE`, a RAM disk that lives as long as the
//! daemon), or a whole image file on a memory filesystem (tmpfs, ramfs,
//! hugetlbfs; see [`on_memory_fs`]).
//!
//! Such files have no non-blocking read or write, so io_uring hands every
//! request on them to its worker threads: a thread hand-off and a wake-up per
//! request, which cost more than the copy itself (measured: 57% of the
//! daemon's CPU in io_uring's workers at 4k random reads, QD32). Copying
//! from the mapping costs no system call at all.
//!
//! Operations complete synchronously, inside the submitting call, and are
//! reported through `has_completions`, which the worker asks after every
//! batch: the queue's eventfd is never written.
//!
//! A mapped image must not be truncated by anyone else while the daemon
//! runs: an access past the new end of the file would kill the daemon with
//! SIGBUS (the guest cannot cause that: every request is checked against
//! the size the image had at start).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, Storage, StorageQueue};

/// `statfs` magic numbers of the filesystems whose files live in memory.
const MEMORY_FS: [libc::c_long; 3] = [
    0x0102_1994, // TMPFS_MAGIC (also shmem and memfd)
    0x8584_58f6, // RAMFS_MAGIC
    0x9584_58f6, // HUGETLBFS_MAGIC
];

/// True if `file` lives on a memory filesystem (tmpfs, ramfs, hugetlbfs).
pub fn on_memory_fs(file: &File) -> io::Result<bool> {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable statfs and the fd is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(MEMORY_FS.contains(&(st.f_type as libc::c_long)))
}

/// The bytes of the disk: a mapping no Rust reference ever covers; every
/// access goes through raw pointers.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// The mapped file (None: anonymous memory).
    file: Option<File>,
    /// Mapped for writing too.
    writable: bool,
}

// The mapping is plain memory owned by this value until drop, only reached
// through raw-pointer copies, from any thread. Concurrent requests on
// overlapping ranges race on its bytes as they would on a real disk (the
// result is one of the writes, or a mix, which virtio-blk allows for
// requests a driver did not order).
// SAFETY: see above: no Rust reference to the bytes, owned until drop.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `ptr`/`len` are exactly the mapping made in `Mapping::new`,
        // and no access can follow: every queue holds an `Arc` to us.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Mapping {
    fn new(len: usize, file: Option<File>, writable: bool) -> io::Result<Self> {
        if len == 0 {
            // An empty disk: nothing to map, and no request reaches it.
            return Ok(Mapping {
                ptr: NonNull::dangling(),
                len,
                file,
                writable,
            });
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a fresh mapping chosen by the kernel overlaps nothing of
        // ours; the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping {
            ptr,
            len,
            file,
            writable,
        })
    }
}

/// A disk served from memory: anonymous (a RAM disk) or a file's mapping.
#[derive(Debug, Clone)]
pub struct MemoryStorage {
    map: Arc<Mapping>,
    capacity: u64,
}

impl MemoryStorage {
    /// A zero-filled RAM disk of `size` bytes (rounded down to 512), which
    /// takes memory only as it is written.
    pub fn new(size: u64) -> io::Result<Self> {
        let capacity = size & !511;
        let len =
            usize::try_from(capacity).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(MemoryStorage {
            map: Arc::new(Mapping::new(len, None, true)?),
            capacity,
        })
    }

    /// The whole of `file` (opened for writing unless `read_only`), mapped
    /// shared: writes go to the file. Meant for files on a memory
    /// filesystem ([`on_memory_fs`]); on any other, every first touch of a
    /// page would block a queue worker on the disk.
    pub fn map_file(file: File, read_only: bool) -> io::Result<Self> {
        let len = file.metadata()?.len();
        let capacity = len & !511;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(MemoryStorage {
            map: Arc::new(Mapping::new(len, Some(file), !read_only)?),
            capacity,
        })
    }
}

impl Storage for MemoryStorage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Requests complete in the submitting call: polling the available
    /// ring catches the driver's next one without a wake-up (measured at 4k
    /// random reads on tmpfs, QD1: 57k IOPS without, 104k with 32 µs).
    fn default_poll_us(&self) -> u64 {
        32
    }

    fn open_queue(&self) -> io::Result<Box<dyn StorageQueue>> {
        Ok(Box::new(MemoryQueue {
            map: self.map.clone(),
            capacity: self.capacity,
            notifier: EventFd::new(EFD_NONBLOCK)?,
            done: Vec::new(),
        }))
    }
}

struct MemoryQueue {
    map: Arc<Mapping>,
    capacity: u64,
    notifier: EventFd,
    done: Vec<Completion>,
}

impl MemoryQueue {
    fn finish(&mut self, token: u64, result: io::Result<u32>) -> io::Result<()> {
        // No eventfd write: the worker asks `has_completions` after every
        // batch it submits. The write, the extra epoll wake-up it caused
        // and the reads were four system calls per batch for nothing.
        self.done.push(Completion { token, result });
        Ok(())
    }

    /// The mapping's address of `len` bytes at `offset`, if on the disk
    /// (and the mapping is writable, for a `write`).
    fn at(&self, offset: u64, len: u64, write: bool) -> io::Result<*mut u8> {
        if write && !self.map.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => {
                // SAFETY: `offset + len` is within the mapping (capacity <= len).
                Ok(unsafe { self.map.ptr.as_ptr().add(offset as usize) })
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// # Safety
    /// The iovecs must describe valid memory, as `StorageQueue::read` requires.
    unsafe fn copy(&mut self, offset: u64, iovecs: &[libc::iovec], write: bool) -> io::Result<u32> {
        let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let mut disk = self.at(offset, total, write)?;
        for v in iovecs {
            let buf = v.iov_base.cast::<u8>();
            // SAFETY: `disk` has `iov_len` bytes left inside the mapping (the
            // whole range was checked), and the caller vouches for `buf`;
            // guest memory and the mapping are distinct mappings.
            unsafe {
                if write {
                    std::ptr::copy_nonoverlapping(buf, disk, v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(disk, buf, v.iov_len);
                }
                disk = disk.add(v.iov_len);
            }
        }
        u32::try_from(total).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// Zeroes `len` bytes at `offset`; with `unmap`, hands the whole pages
    /// inside the range back (a hole in a tmpfs file, fresh zero pages in
    /// anonymous memory) where the kernel can, and writes zeroes elsewhere.
    fn zero(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<u32> {
        let start = self.at(offset, len, true)?;
        let len = len as usize;
        let page = 4096usize;
        let first = (start as usize).next_multiple_of(page) - start as usize;
        let whole = len.saturating_sub(first) / page * page;
        let advice = if self.map.file.is_some() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        let mut freed = false;
        if unmap && whole > 0 {
            // SAFETY: `start + first .. + whole` is page aligned and inside
            // the checked range of the mapping; the advice only drops its
            // contents, which read back as zeroes.
            freed = unsafe { libc::madvise(start.add(first).cast(), whole, advice) } == 0;
        }
        // SAFETY: every range written is inside the checked range.
        unsafe {
            if freed {
                std::ptr::write_bytes(start, 0, first.min(len));
                let tail = first + whole;
                std::ptr::write_bytes(start.add(tail), 0, len - tail);
            } else {
                std::ptr::write_bytes(start, 0, len);
            }
        }
        Ok(0)
    }
}

impl StorageQueue for MemoryQueue {
    fn notifier(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    unsafe fn read(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        let result = unsafe { self.copy(offset, iovecs, false) };
        self.finish(token, result)
    }

    unsafe fn write(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        let result = unsafe { self.copy(offset, iovecs, true) };
        self.finish(token, result)
    }

    fn flush(&mut self, token: u64) -> io::Result<()> {
        // Memory is all there is: nothing is more durable than the mapping
        // (a file on a memory filesystem is its page cache).
        self.finish(token, Ok(0))
    }

    fn discard(&mut self, offset: u64, len: u64, token: u64) -> io::Result<()> {
        let result = self.zero(offset, len, true);
        self.finish(token, result)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, token: u64) -> io::Result<()> {
        let result = self.zero(offset, len, unmap);
        self.finish(token, result)
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }
}
