//! The default storage: a file or block device driven through io_uring, one
//! ring per queue worker. Reads and writes use the guest's buffers directly.
//!
//! The hot path allocates nothing once warm: every operation takes a slot
//! whose index is the io_uring user data, and the slot keeps the iovec array
//! (its capacity reused) until the completion is reaped. The file is
//! registered with the ring, so operations skip the per-call fd lookup.
//!
//! Submission policy: requests reach the kernel in batches, but not behind a
//! whole queue notification's worth of preparation. The first request pushed
//! while nothing is in flight is submitted at once, so an idle device starts
//! on it while the rest are prepared; after that, every [`SUBMIT_CHUNK`]
//! requests are submitted together, and the rest at [`StorageQueue::submit`].
//! One big batch would sit behind the kernel's block plug until all of it was
//! prepared, leaving the device idle meanwhile (fio, by default, submits each
//! request on its own for the same reason).
//!
//! With `O_DIRECT`, the kernel refuses buffers that are not aligned to the
//! device's block size. A guest may hand such buffers (firmware and boot
//! loaders do): their request goes through an aligned bounce buffer instead
//! of failing, as qemu-storage-daemon does; aligned requests stay zero-copy.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use backends::uring::{Restrictions, Uring, UringError};
use io_uring::{opcode, types};

use super::{Completion, Storage, StorageQueue};

/// Requests submitted together once a batch has started (see the module doc).
pub const SUBMIT_CHUNK: usize = 8;

/// Index of the file in the ring's registered file table.
const FILE_INDEX: types::Fixed = types::Fixed(0);
/// Every opcode a queue's ring submits (its restrictions).
const OPS: [u8; 6] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fallocate::CODE,
    opcode::Fsync::CODE,
];

/// Alignment of buffer addresses and lengths that `O_DIRECT` takes as is.
const DIRECT_ALIGN: usize = 512;
/// Alignment of bounce buffers (enough for 4K-sector devices too).
const BOUNCE_ALIGN: usize = 4096;

/// A file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: Arc<File>,
    capacity: u64,
    ring_entries: u32,
    direct: bool,
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
            direct,
        })
    }
}

impl Storage for FileStorage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn open_queue(&self) -> io::Result<Box<dyn StorageQueue>> {
        let ring = Uring::new(
            self.ring_entries,
            Restrictions {
                ops: &OPS,
                fixed_files: &[self.file.as_raw_fd()],
            },
        )
        .map_err(uring_io)?;
        Ok(Box::new(FileQueue {
            _file: self.file.clone(),
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            batch: 0,
            direct: self.direct,
        }))
    }
}

fn uring_io(e: UringError) -> io::Error {
    io::Error::other(e)
}

/// One operation in flight.
#[derive(Default)]
struct Slot {
    /// The caller's token.
    token: u64,
    /// Bytes a read or write must transfer to succeed (None: other operations).
    expected: Option<u64>,
    /// The iovec array of a vectored read or write, which the kernel may read
    /// until completion. Emptied, not freed, when the slot is reused. For a
    /// bounced read, the guest buffers to copy the data into at completion.
    iovecs: Vec<libc::iovec>,
    /// The aligned buffer of a bounced read or write.
    bounce: Option<Bounce>,
}

/// A heap buffer aligned for `O_DIRECT`.
struct Bounce {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl Bounce {
    fn new(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), BOUNCE_ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Bounce { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    /// Copies between the bounce buffer and `iovecs`, in order, up to `len`
    /// bytes; `into_bounce` gives the direction.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for its length (guest memory
    /// the submitter keeps mapped until completion).
    unsafe fn copy(&mut self, iovecs: &[libc::iovec], len: usize, into_bounce: bool) {
        let mut at = 0usize;
        for v in iovecs {
            let n = v.iov_len.min(len.min(self.len()) - at);
            if n == 0 {
                break;
            }
            let (b, g) = (
                // SAFETY: `at + n` is within the buffer (n is bounded by its length).
                unsafe { self.ptr.as_ptr().add(at) },
                v.iov_base.cast::<u8>(),
            );
            // SAFETY: `b` is valid for `n` bytes (above) and `g` by the
            // caller's contract; the two never overlap (heap vs guest memory).
            // The guest may change its bytes meanwhile: they are plain data.
            unsafe {
                if into_bounce {
                    std::ptr::copy_nonoverlapping(g, b, n);
                } else {
                    std::ptr::copy_nonoverlapping(b, g, n);
                }
            }
            at += n;
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A read or write of one contiguous buffer (no iovec array to import).
fn contiguous(ptr: *mut u8, len: u32, offset: u64, write: bool) -> io_uring::squeue::Entry {
    if write {
        opcode::Write::new(FILE_INDEX, ptr, len)
            .offset(offset)
            .build()
    } else {
        opcode::Read::new(FILE_INDEX, ptr, len)
            .offset(offset)
            .build()
    }
}

fn misaligned(iovecs: &[libc::iovec]) -> bool {
    iovecs
        .iter()
        .any(|v| v.iov_base as usize % DIRECT_ALIGN != 0 || v.iov_len % DIRECT_ALIGN != 0)
}

// SAFETY: the iovecs only carry addresses of guest memory that the submitter
// keeps mapped until completion; they are handed to the kernel or, for a
// bounced read, copied into by the thread that owns the queue at completion,
// never touched by another thread. The bounce buffer is owned by the slot.
unsafe impl Send for Slot {}

struct FileQueue {
    /// Keeps the registered file open as long as the ring can use it.
    _file: Arc<File>,
    ring: Uring,
    /// Indexed by io_uring user data.
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Operations pushed since the last submission.
    batch: usize,
    /// The file is opened with `O_DIRECT`: misaligned buffers are bounced.
    direct: bool,
}

impl FileQueue {
    fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes a free slot for `token`; returns its index.
    fn take_slot(&mut self, token: u64, expected: Option<u64>) -> u32 {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() as u32 - 1
        });
        let slot = &mut self.slots[index as usize];
        slot.token = token;
        slot.expected = expected;
        slot.iovecs.clear();
        slot.bounce = None;
        index
    }

    /// Queues `entry` for slot `index` and applies the submission policy.
    fn push(&mut self, index: u32, entry: io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer the entry refers to is either owned by slot
        // `index` until reaped or guaranteed valid by our caller's contract on
        // `read`/`write`.
        if let Err(e) = unsafe { self.ring.push(&entry.user_data(u64::from(index))) } {
            self.free.push(index);
            return Err(uring_io(e));
        }
        self.batch += 1;
        let idle_start = self.batch == 1 && self.in_use() == 1;
        if idle_start || self.batch >= SUBMIT_CHUNK {
            self.submit()?;
        }
        Ok(())
    }

    fn rw(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        token: u64,
        write: bool,
    ) -> io::Result<()> {
        let total = iovecs.iter().map(|v| v.iov_len as u64).sum::<u64>();
        let index = self.take_slot(token, Some(total));
        let entry = match iovecs {
            _ if self.direct && misaligned(iovecs) => {
                let ptr = self.bounce(index, iovecs, total as usize, write)?;
                contiguous(ptr, total as u32, offset, write)
            }
            [one] => contiguous(one.iov_base.cast(), one.iov_len as u32, offset, write),
            _ => {
                // Keep the iovec array alive until the completion: the kernel
                // may read it after submission.
                let kept = &mut self.slots[index as usize].iovecs;
                kept.extend_from_slice(iovecs);
                let (ptr, len) = (kept.as_ptr(), kept.len() as u32);
                if write {
                    opcode::Writev::new(FILE_INDEX, ptr, len)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Readv::new(FILE_INDEX, ptr, len)
                        .offset(offset)
                        .build()
                }
            }
        };
        self.push(index, entry)
    }

    /// Gives slot `index` an aligned buffer standing in for the guest's
    /// (filled from them for a write; for a read, the guest buffers are
    /// kept to copy into at completion); returns its address.
    fn bounce(
        &mut self,
        index: u32,
        iovecs: &[libc::iovec],
        len: usize,
        write: bool,
    ) -> io::Result<*mut u8> {
        let mut bounce = Bounce::new(len).inspect_err(|_| self.free.push(index))?;
        let slot = &mut self.slots[index as usize];
        if write {
            // SAFETY: the caller of `write` guarantees the iovecs are valid.
            unsafe { bounce.copy(iovecs, len, true) };
        } else {
            slot.iovecs.extend_from_slice(iovecs);
        }
        let ptr = bounce.ptr.as_ptr();
        slot.bounce = Some(bounce);
        Ok(ptr)
    }

    fn fallocate(&mut self, offset: u64, len: u64, mode: i32, token: u64) -> io::Result<()> {
        let index = self.take_slot(token, None);
        let entry = opcode::Fallocate::new(FILE_INDEX, len)
            .offset(offset)
            .mode(mode)
            .build();
        self.push(index, entry)
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
        let index = self.take_slot(token, None);
        self.push(index, opcode::Fsync::new(FILE_INDEX).build())
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
        self.batch = 0;
        self.ring.submit().map(|_| ()).map_err(uring_io)
    }

    fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    fn uring(&mut self) -> Option<&mut Uring> {
        Some(&mut self.ring)
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let (slots, free) = (&mut self.slots, &mut self.free);
        self.ring.reap(|data, res| {
            let Some(slot) = u32::try_from(data)
                .ok()
                .and_then(|i| Some((i, slots.get_mut(i as usize)?)))
            else {
                return;
            };
            let (index, slot) = slot;
            if let Some(mut bounce) = slot.bounce.take() {
                if res > 0 && !slot.iovecs.is_empty() {
                    // SAFETY: a bounced read keeps the guest iovecs the
                    // caller of `read` guaranteed valid until this completion.
                    unsafe { bounce.copy(&slot.iovecs, res as usize, false) };
                }
            }
            let result = match (res, slot.expected) {
                (r, _) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                (r, Some(n)) if r as u64 != n => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                (r, _) => Ok(r as u32),
            };
            out.push(Completion {
                token: slot.token,
                result,
            });
            free.push(index);
        });
    }

    fn wait(&mut self) -> io::Result<()> {
        self.ring.wait().map_err(uring_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn image(name: &str, len: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("blk-file-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; len]).unwrap();
        path
    }

    fn wait_readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 10_000) == 1 }
    }

    #[test]
    fn first_request_on_idle_queue_is_submitted_without_submit_call() {
        let path = image("idle", 4096);
        let storage = FileStorage::open(&path, true, false, 8).unwrap();
        let mut q = storage.open_queue().unwrap();
        let mut buf = vec![0u8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];

        // SAFETY: `buf` outlives the operation, which we reap below.
        unsafe { q.read(0, &iov, 42) }.unwrap();

        assert!(wait_readable(q.notifier()));
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(
            (out[0].token, out[0].result.as_ref().ok()),
            (42, Some(&4096))
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn batch_of_vectored_reads_reuses_slots_and_keeps_tokens() {
        let path = image("batch", 64 << 10);
        let storage = FileStorage::open(&path, true, false, 8).unwrap();
        let mut q = storage.open_queue().unwrap();
        let mut bufs = vec![vec![0u8; 1024]; 2 * SUBMIT_CHUNK + 2];
        let mut tokens = Vec::new();

        for round in 0..2u64 {
            for (i, pair) in bufs.chunks_mut(2).enumerate() {
                let iov: Vec<libc::iovec> = pair
                    .iter_mut()
                    .map(|b| libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: b.len(),
                    })
                    .collect();
                // SAFETY: `bufs` outlives the operations, all reaped below.
                unsafe { q.read(i as u64 * 2048, &iov, round * 100 + i as u64) }.unwrap();
            }
            q.submit().unwrap();
            let mut out = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while out.len() < SUBMIT_CHUNK + 1 && std::time::Instant::now() < deadline {
                q.wait().unwrap();
                q.reap(&mut out);
            }
            assert!(out.iter().all(|c| c.result.as_ref().ok() == Some(&2048)));
            tokens.extend(out.into_iter().map(|c| c.token));
        }

        tokens.sort_unstable();
        let expected: Vec<u64> = (0..2u64)
            .flat_map(|r| (0..SUBMIT_CHUNK as u64 + 1).map(move |i| r * 100 + i))
            .collect();
        assert_eq!(tokens, expected);
        assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0x5a)));
        std::fs::remove_file(path).unwrap();
    }
}
