//! The io_uring engine: one ring per worker thread.
//!
//! Requests are pushed to the submission queue and handed to the kernel in one
//! `io_uring_enter` per batch ([`Uring::submit`]), normally once per queue
//! notification. Completions are signalled on an eventfd registered with the
//! ring, for a worker that sleeps in epoll and calls [`Uring::reap`].
//!
//! A worker can instead sleep in the ring itself: [`Uring::watch`] polls its
//! other eventfds (queue kick, stop) from inside the ring with a multishot
//! poll, [`Uring::wait`] submits and sleeps in one `io_uring_enter`, and
//! [`Uring::reap`] sets the watched fds that fired in [`Uring::take_fired`]
//! instead of handing their completions to the caller. A completion then
//! costs one system call return instead of an epoll wake-up interrupted by
//! io_uring task work (EINTR) and a second `epoll_wait`.
//!
//! Every ring is restricted ([`Restrictions`]): created disabled, its
//! completion eventfd and fixed files registered, then limited to the opcodes
//! its owner submits (and the poll of [`Uring::watch`]), to the FIXED_FILE
//! submission flag if it has fixed files and to no flag otherwise, and to no
//! further `io_uring_register` operation, before it is enabled. Anything
//! else completes with -EACCES. A kernel without ring restrictions (before
//! 5.10) is refused: [`check_restrictions`] finds that out at startup.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors of the io_uring engine.
#[derive(Debug, Error)]
pub enum UringError {
    /// Ring setup failed.
    #[error("Cannot create io_uring")]
    Setup(#[source] std::io::Error),
    /// The completion eventfd could not be created or registered.
    #[error("Cannot set up the completion eventfd")]
    EventFd(#[source] std::io::Error),
    /// Registering files with the ring failed.
    #[error("Cannot register files with io_uring")]
    Register(#[source] std::io::Error),
    /// The kernel refused the ring's restrictions or enabling the ring.
    #[error("Cannot restrict io_uring (needs Linux 5.10)")]
    Restrict(#[source] std::io::Error),
    /// io_uring_enter failed.
    #[error("Cannot submit to io_uring")]
    Submit(#[source] std::io::Error),
}

/// User data bit of a watch's poll completions; callers' user data must stay below it.
pub const WATCH_BIT: u64 = 1 << 63;
/// Most fds one ring can watch (bits of [`Uring::take_fired`]).
pub const MAX_WATCHES: usize = 64;

/// What a ring may be used for, fixed when it is created.
#[derive(Clone, Copy, Debug, Default)]
pub struct Restrictions<'a> {
    /// Opcodes the owner submits (`opcode::Read::CODE`, ...); the poll of
    /// [`Uring::watch`] is always allowed.
    pub ops: &'a [u8],
    /// Files registered as the fixed file table: entries name them by index
    /// (`types::Fixed(i)`), sparing the kernel an fd lookup per operation.
    pub fixed_files: &'a [RawFd],
}

/// Creates and drops a small restricted ring: an error if the kernel cannot
/// restrict rings, for a daemon to report at startup rather than when a
/// frontend starts a queue.
pub fn check_restrictions() -> Result<(), UringError> {
    Uring::new(
        1,
        Restrictions {
            ops: &[opcode::Nop::CODE],
            fixed_files: &[],
        },
    )
    .map(drop)
}

/// One io_uring with a completion eventfd.
pub struct Uring {
    ring: IoUring,
    notifier: EventFd,
    queued: usize,
    /// Watched fds, by watch id.
    watches: Vec<RawFd>,
    /// Watch ids whose fd fired since the last [`Uring::take_fired`], as bits.
    fired: u64,
    /// Watch ids whose multishot poll ended and must be armed again, as bits.
    rearm: u64,
}

impl Uring {
    /// Creates a ring with room for `entries` submissions, restricted to `allowed`.
    pub fn new(entries: u32, allowed: Restrictions<'_>) -> Result<Self, UringError> {
        let entries = entries.max(1).next_power_of_two();
        // Default task-run mode. A worker sleeping in epoll gets EINTR when a
        // completion's task work runs, then the eventfd fires; a worker
        // sleeping in the ring (Uring::watch) is simply woken with the
        // completions posted. DEFER_TASKRUN + SINGLE_ISSUER measured worse
        // here (more io_uring_enter calls and context switches per I/O:
        // completions arriving while the worker runs need an extra enter),
        // COOP_TASKRUN no better.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .setup_r_disabled()
            .build(entries)
            .map_err(UringError::Setup)?;
        let notifier = EventFd::new(EFD_NONBLOCK).map_err(UringError::EventFd)?;
        let submitter = ring.submitter();
        submitter
            .register_eventfd(notifier.as_raw_fd())
            .map_err(UringError::EventFd)?;
        if !allowed.fixed_files.is_empty() {
            submitter
                .register_files(allowed.fixed_files)
                .map_err(UringError::Register)?;
        }
        // Watches poll eventfds by number, so FIXED_FILE is allowed on a
        // ring with fixed files but cannot be required.
        let flags = if allowed.fixed_files.is_empty() {
            0
        } else {
            squeue::Flags::FIXED_FILE.bits()
        };
        let mut restrictions: Vec<Restriction> = allowed
            .ops
            .iter()
            .chain(&[opcode::PollAdd::CODE])
            .map(|&op| Restriction::sqe_op(op))
            .chain([Restriction::sqe_flags_allowed(flags)])
            .collect();
        submitter
            .register_restrictions(&mut restrictions)
            .and_then(|()| submitter.register_enable_rings())
            .map_err(UringError::Restrict)?;
        Ok(Uring {
            ring,
            notifier,
            queued: 0,
            watches: Vec::new(),
            fired: 0,
            rearm: 0,
        })
    }

    /// Watches `fd` for readability from inside the ring; returns its watch
    /// id. Each time the fd is signalled, [`Self::reap`] sets bit `id` of
    /// [`Self::take_fired`] (edge-triggered: the fd is never read, and an fd
    /// that is readable when watched fires once at once). The poll is
    /// submitted with the next [`Self::submit`] or [`Self::wait`].
    pub fn watch(&mut self, fd: RawFd) -> Result<u32, UringError> {
        if self.watches.len() >= MAX_WATCHES {
            return Err(UringError::Submit(std::io::Error::from_raw_os_error(
                libc::ENOSPC,
            )));
        }
        self.watches.push(fd);
        let id = self.watches.len() as u32 - 1;
        self.arm(id)?;
        Ok(id)
    }

    fn arm(&mut self, id: u32) -> Result<(), UringError> {
        let fd = self.watches[id as usize];
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(WATCH_BIT | u64::from(id));
        // SAFETY: a poll entry refers to no memory, only to `fd`, which the
        // caller of `watch` keeps open while the ring exists.
        unsafe { self.push(&entry) }
    }

    /// The watch ids that fired since the last call, as bits (bit `id`).
    pub fn take_fired(&mut self) -> u64 {
        std::mem::take(&mut self.fired)
    }

    /// True if a watch fired since the last [`Self::take_fired`] (a reap
    /// between two waits can see it): the caller must act before waiting.
    pub fn has_fired(&self) -> bool {
        self.fired != 0
    }

    /// The eventfd that becomes readable when completions are posted.
    pub fn notifier(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    /// Queues one submission; it reaches the kernel at the next [`Self::submit`]
    /// (or now, if the submission queue is full).
    ///
    /// # Safety
    /// Every buffer and iovec array the entry points to must stay valid and
    /// must not be otherwise accessed until its completion is reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), UringError> {
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive the operation.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hands every queued submission to the kernel in one system call.
    pub fn submit(&mut self) -> Result<usize, UringError> {
        if self.queued == 0 {
            return Ok(0);
        }
        loop {
            match self.ring.submit() {
                Ok(n) => {
                    self.queued = self.queued.saturating_sub(n);
                    return Ok(n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: drain it from the caller's reap.
                    return Ok(0);
                }
                Err(e) => return Err(UringError::Submit(e)),
            }
        }
    }

    /// Submits what is queued and blocks until at least one completion is
    /// posted (or the completion queue is full).
    pub fn wait(&mut self) -> Result<(), UringError> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(n) => {
                    self.queued = self.queued.saturating_sub(n);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: there is something to reap.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(UringError::Submit(e)),
            }
        }
    }

    /// True if completions are waiting (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Calls `f(user_data, result)` for every posted completion, except the
    /// watches' (see [`Self::take_fired`]). The notifier is not read: poll it
    /// edge-triggered (EPOLLET), every completion writes it.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            if data & WATCH_BIT == 0 {
                f(data, cqe.result());
                continue;
            }
            // A watch reports as fired even when its poll failed, so that the
            // owner looks at what the fd guards rather than missing an event.
            let bit = 1u64 << (data & !WATCH_BIT).min(MAX_WATCHES as u64 - 1);
            self.fired |= bit;
            if !cqueue::more(cqe.flags()) {
                self.rearm |= bit;
            }
        }
        while self.rearm != 0 {
            let id = self.rearm.trailing_zeros();
            self.rearm &= !(1 << id);
            if let Err(e) = self.arm(id) {
                tracing::error!(error = %e, watch = id, "cannot re-arm io_uring watch");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use std::io::Write;

    #[test]
    fn batched_reads_complete_and_signal_the_eventfd() {
        let mut file = tempfile();
        file.write_all(&[7u8; 8192]).unwrap();
        let mut ring = Uring::new(
            8,
            Restrictions {
                ops: &[opcode::Read::CODE],
                fixed_files: &[],
            },
        )
        .unwrap();
        let mut bufs = vec![vec![0u8; 4096]; 2];
        for (i, buf) in bufs.iter_mut().enumerate() {
            let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), 4096)
                .offset(i as u64 * 4096)
                .build()
                .user_data(i as u64);
            // SAFETY: `bufs` outlives the operations; we wait for both below.
            unsafe { ring.push(&entry) }.unwrap();
        }

        ring.submit().unwrap();
        let mut done = Vec::new();
        while done.len() < 2 {
            ring.wait().unwrap();
            ring.reap(|token, res| done.push((token, res)));
        }

        done.sort();
        assert_eq!(done, vec![(0, 4096), (1, 4096)]);
        assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 7)));
    }

    #[test]
    fn watched_eventfd_fires_once_per_signal_and_is_not_reaped_as_io() {
        let mut ring = Uring::new(4, Restrictions::default()).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let id = ring.watch(kick.as_raw_fd()).unwrap();
        ring.submit().unwrap();
        let mut io = Vec::new();

        kick.write(1).unwrap();
        ring.wait().unwrap();
        ring.reap(|token, res| io.push((token, res)));
        let first = ring.take_fired();
        kick.write(1).unwrap();
        ring.wait().unwrap();
        ring.reap(|token, res| io.push((token, res)));
        let second = ring.take_fired();

        assert_eq!((first, second, io), (1 << id, 1 << id, vec![]));
    }

    #[test]
    fn restricted_ring_refuses_an_opcode_outside_its_list() {
        let mut ring = Uring::new(
            4,
            Restrictions {
                ops: &[opcode::Read::CODE],
                fixed_files: &[],
            },
        )
        .unwrap();
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1);

        // SAFETY: `path` is a static string; we wait for the completion below.
        unsafe { ring.push(&open) }.unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            ring.wait().unwrap();
            ring.reap(|token, res| done.push((token, res)));
        }

        assert_eq!(done, vec![(1, -libc::EACCES)]);
    }

    #[test]
    fn ring_without_fixed_files_refuses_the_fixed_file_flag() {
        let file = tempfile();
        let mut ring = Uring::new(
            4,
            Restrictions {
                ops: &[opcode::Read::CODE],
                fixed_files: &[],
            },
        )
        .unwrap();
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 8)
            .build()
            .user_data(2);

        // SAFETY: `buf` outlives the operation; we wait for the completion below.
        unsafe { ring.push(&read) }.unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            ring.wait().unwrap();
            ring.reap(|token, res| done.push((token, res)));
        }
        drop(file);

        assert_eq!(done, vec![(2, -libc::EACCES)]);
    }

    #[test]
    fn restricted_ring_refuses_registering_more_files() {
        let file = tempfile();
        let ring = Uring::new(4, Restrictions::default()).unwrap();

        let err = ring
            .ring
            .submitter()
            .register_files(&[file.as_raw_fd()])
            .unwrap_err();

        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }

    fn tempfile() -> std::fs::File {
        crate::memory::memfd_create("uring-test").unwrap()
    }
}
