//! RAM storage: a zero-filled buffer that lives as long as the daemon.
//! Operations complete synchronously; completions are still reported through
//! the queue's eventfd like any other storage.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, Storage, StorageQueue};

/// A RAM disk.
#[derive(Debug, Clone)]
pub struct MemoryStorage {
    data: Arc<Mutex<Vec<u8>>>,
}

impl MemoryStorage {
    /// A RAM disk of `size` bytes (rounded down to 512).
    pub fn new(size: u64) -> Self {
        MemoryStorage {
            data: Arc::new(Mutex::new(vec![0u8; (size & !511) as usize])),
        }
    }
}

impl Storage for MemoryStorage {
    fn capacity(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn open_queue(&self) -> io::Result<Box<dyn StorageQueue>> {
        Ok(Box::new(MemoryQueue {
            data: self.data.clone(),
            notifier: EventFd::new(EFD_NONBLOCK)?,
            done: Vec::new(),
        }))
    }
}

struct MemoryQueue {
    data: Arc<Mutex<Vec<u8>>>,
    notifier: EventFd,
    done: Vec<Completion>,
}

impl MemoryQueue {
    fn finish(&mut self, token: u64, result: io::Result<u32>) -> io::Result<()> {
        self.done.push(Completion { token, result });
        self.notifier.write(1)
    }

    fn range(&self, data: &[u8], offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset.checked_add(len).filter(|&e| e <= data.len() as u64);
        end.map(|e| offset as usize..e as usize)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn copy(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        token: u64,
        write: bool,
    ) -> io::Result<()> {
        let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let result = {
            let mut data = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
            self.range(&data, offset, total).map(|r| {
                let mut pos = r.start;
                for v in iovecs {
                    let chunk = &mut data[pos..pos + v.iov_len];
                    if write {
                        // SAFETY: the caller guarantees `v` describes valid
                        // memory not aliased by Rust references (read/write contract).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                v.iov_base as *const u8,
                                chunk.as_mut_ptr(),
                                v.iov_len,
                            )
                        };
                    } else {
                        // SAFETY: as above; `chunk` has exactly `iov_len` bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                chunk.as_ptr(),
                                v.iov_base as *mut u8,
                                v.iov_len,
                            )
                        };
                    }
                    pos += v.iov_len;
                }
                total as u32
            })
        };
        self.finish(token, result)
    }

    fn zero(&mut self, offset: u64, len: u64, token: u64) -> io::Result<()> {
        let result = {
            let mut data = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
            self.range(&data, offset, len).map(|r| {
                data[r].fill(0);
                0
            })
        };
        self.finish(token, result)
    }
}

impl StorageQueue for MemoryQueue {
    fn notifier(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    unsafe fn read(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        self.copy(offset, iovecs, token, false)
    }

    unsafe fn write(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        self.copy(offset, iovecs, token, true)
    }

    fn flush(&mut self, token: u64) -> io::Result<()> {
        self.finish(token, Ok(0))
    }

    fn discard(&mut self, offset: u64, len: u64, token: u64) -> io::Result<()> {
        self.zero(offset, len, token)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool, token: u64) -> io::Result<()> {
        self.zero(offset, len, token)
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.notifier.read();
        out.append(&mut self.done);
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }
}
