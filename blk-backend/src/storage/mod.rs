//! The storage trait: how blk-backend reaches the bytes of a disk.
//!
//! Storage is completion-based so that io_uring, a network protocol or
//! anything else asynchronous fits without threads:
//!
//! 1. [`Storage::open_queue`] gives each queue worker its own
//!    [`StorageQueue`] (for io_uring: its own ring).
//! 2. The worker calls `read`/`write`/`flush`/`discard`/`write_zeroes`, each
//!    with a caller-chosen `token`, then [`StorageQueue::submit`] once per batch.
//! 3. When the eventfd returned by [`StorageQueue::notifier`] becomes
//!    readable, the worker calls [`StorageQueue::reap`] and gets a
//!    [`Completion`] per finished operation, carrying its token. The worker
//!    polls the eventfd edge-triggered: write it for every batch of
//!    completions; reading it back is optional.
//!
//! A synchronous implementation may finish operations inside the submitting
//! call: it queues the completion and either writes its eventfd or, with no
//! system call, reports it from [`StorageQueue::has_completions`], which the
//! worker asks after every [`StorageQueue::submit`] before it sleeps (see
//! [`memory::MemoryStorage`]). To plug in your own storage, implement both
//! traits and pass an `Arc<dyn Storage>` to [`crate::BlkDevice::new`]; see
//! `examples/cow_overlay.rs`.

pub mod file;
pub mod memory;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

pub use file::FileStorage;
pub use memory::MemoryStorage;

/// Opens the image at `path`. A file on a memory filesystem (tmpfs, ramfs,
/// hugetlbfs) is served from its mapping ([`MemoryStorage::map_file`]:
/// io_uring would hand each of its requests to a worker thread) unless
/// `direct` asks for O_DIRECT, which those filesystems refuse anyway;
/// anything else goes through io_uring ([`FileStorage`]) with
/// `ring_entries` per queue ring.
pub fn open_image(
    path: &Path,
    read_only: bool,
    direct: bool,
    ring_entries: u32,
) -> io::Result<Arc<dyn Storage>> {
    if !direct {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        if memory::on_memory_fs(&file)? && file.metadata()?.len() >= 512 {
            tracing::info!(image = %path.display(), "image on a memory filesystem: served from its mapping");
            return Ok(Arc::new(MemoryStorage::map_file(file, read_only)?));
        }
    }
    Ok(Arc::new(FileStorage::open(
        path,
        read_only,
        direct,
        ring_entries,
    )?))
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The token passed at submission.
    pub token: u64,
    /// Bytes transferred, or the error.
    pub result: io::Result<u32>,
}

/// A disk: its size and a way to open per-worker queues.
pub trait Storage: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn capacity(&self) -> u64;
    /// A new submission/completion queue for one worker thread.
    fn open_queue(&self) -> io::Result<Box<dyn StorageQueue>>;
    /// True if discard and write-zeroes-with-unmap may deallocate.
    fn supports_discard(&self) -> bool {
        true
    }
    /// The largest adaptive polling window of its queue workers, in µs,
    /// unless `--poll-us` says otherwise. The default, 0, suits storage
    /// with a device behind it: polling takes the CPU its completions and
    /// the driver need (measured on a virtio disk: 0.84x at 4k randread
    /// QD32). Storage that completes inside the submitting call can catch
    /// the driver's next request by polling instead of a wake-up.
    fn default_poll_us(&self) -> u64 {
        0
    }
}

/// One worker's view of a disk. Operations complete asynchronously.
pub trait StorageQueue: Send {
    /// Eventfd that becomes readable when completions are ready.
    fn notifier(&self) -> RawFd;

    /// Reads at `offset` into the buffers of `iovecs`.
    ///
    /// # Safety
    /// The memory the iovecs describe must stay valid and unaliased by Rust
    /// references until the completion for `token` is reaped.
    unsafe fn read(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()>;

    /// Writes the buffers of `iovecs` at `offset`.
    ///
    /// # Safety
    /// As for [`StorageQueue::read`].
    unsafe fn write(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()>;

    /// Makes completed writes durable.
    fn flush(&mut self, token: u64) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset`; later reads return zeroes.
    fn discard(&mut self, offset: u64, len: u64, token: u64) -> io::Result<()>;

    /// Zeroes `len` bytes at `offset`, deallocating them if `unmap`.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, token: u64) -> io::Result<()>;

    /// Hands the operations queued since the last call to the storage.
    fn submit(&mut self) -> io::Result<()>;

    /// True if [`Self::reap`] would return something, checked without a
    /// system call. The default, false, leaves completions to the notifier.
    /// Asked after every [`Self::submit`]: a completion reported here needs
    /// no notifier write.
    fn has_completions(&mut self) -> bool {
        false
    }

    /// The io_uring this queue's operations complete on, if the worker may
    /// sleep in it instead of polling [`Self::notifier`] with epoll: return
    /// it only if [`Self::reap`] reaps that ring (see
    /// `backends::QueueHandler::uring`). The default is `None`.
    fn uring(&mut self) -> Option<&mut backends::uring::Uring> {
        None
    }

    /// Appends finished operations to `out`; never blocks.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Blocks until at least one completion can be reaped.
    fn wait(&mut self) -> io::Result<()>;
}

#[cfg(test)]
mod tests;
