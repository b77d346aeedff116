//! The default storage: a file or block device driven through io_uring, one
//! ring per queue worker. Reads and writes use the guest's buffers directly.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use backends::uring::{Uring, UringError};
use io_uring::{opcode, types};

use super::{Completion, Storage, StorageQueue};

/// A file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: Arc<File>,
    capacity: u64,
    ring_entries: u32,
}

impl FileStorage {
    /// Opens `path`; `direct` bypasses the host page cache (O_DIRECT).
    pub fn open(path: &Path, read_only: bool, direct: bool, ring_entries: u32) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path)?;
        let capacity = file.seek(SeekFrom::End(0))? & !511;
        Ok(FileStorage {
            file: Arc::new(file),
            capacity,
            ring_entries,
        })
    }
}

impl Storage for FileStorage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn open_queue(&self) -> io::Result<Box<dyn StorageQueue>> {
        let ring = Uring::new(self.ring_entries).map_err(uring_io)?;
        Ok(Box::new(FileQueue {
            file: self.file.clone(),
            ring,
            iovecs: HashMap::new(),
        }))
    }
}

fn uring_io(e: UringError) -> io::Error {
    io::Error::other(e)
}

struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs only carry addresses of guest memory that the submitter
// keeps mapped until completion; they are handed to the kernel, never
// dereferenced by this thread or another.
unsafe impl Send for IoVecs {}

struct FileQueue {
    file: Arc<File>,
    ring: Uring,
    iovecs: HashMap<u64, IoVecs>,
}

impl FileQueue {
    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer the entry refers to is either owned by
        // `self.iovecs` until reaped or guaranteed valid by our caller's
        // contract on `read`/`write`.
        unsafe { self.ring.push(&entry) }.map_err(uring_io)
    }

    fn rw(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        token: u64,
        write: bool,
    ) -> io::Result<()> {
        let v = IoVecs(iovecs.to_vec());
        let (ptr, len) = (v.0.as_ptr(), v.0.len() as u32);
        // Keep the iovec array alive until the completion: the kernel may read
        // it after submission on older kernels.
        self.iovecs.insert(token, v);
        let entry = if write {
            opcode::Writev::new(self.fd(), ptr, len)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(self.fd(), ptr, len)
                .offset(offset)
                .build()
        };
        self.push(entry.user_data(token))
    }

    fn fallocate(&mut self, offset: u64, len: u64, mode: i32, token: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(self.fd(), len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(token);
        self.push(entry)
    }
}

impl StorageQueue for FileQueue {
    fn notifier(&self) -> RawFd {
        self.ring.notifier()
    }

    unsafe fn read(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        self.rw(offset, iovecs, token, false)
    }

    unsafe fn write(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        self.rw(offset, iovecs, token, true)
    }

    fn flush(&mut self, token: u64) -> io::Result<()> {
        let entry = opcode::Fsync::new(self.fd()).build().user_data(token);
        self.push(entry)
    }

    fn discard(&mut self, offset: u64, len: u64, token: u64) -> io::Result<()> {
        self.fallocate(
            offset,
            len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            token,
        )
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, token: u64) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate(offset, len, mode, token)
    }

    fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(|_| ()).map_err(uring_io)
    }

    fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let iovecs = &mut self.iovecs;
        self.ring.reap(|token, res| {
            let expected = iovecs
                .remove(&token)
                .map(|v| v.0.iter().map(|i| i.iov_len as u64).sum::<u64>());
            let result = match (res, expected) {
                (r, _) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                (r, Some(n)) if r as u64 != n => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                (r, _) => Ok(r as u32),
            };
            out.push(Completion { token, result });
        });
    }

    fn wait(&mut self) -> io::Result<()> {
        self.ring.wait().map_err(uring_io)
    }
}
