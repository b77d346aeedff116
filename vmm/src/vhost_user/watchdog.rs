//! Bounds every exchange with a backend in time, including a reply that
//! stops half-way: the vhost crate's frontend retries a receive timeout
//! forever once part of a reply has arrived, so the socket's own timeout
//! is not enough. Each exchange arms the watchdog (under the device lock);
//! the reconnect monitor, which does not need that lock to check it, shuts
//! the socket down when an exchange outlives [`STUCK_AFTER`]: the blocked
//! receive then ends with an error, and the connection is dropped and
//! made again like after a backend crash.

use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longer than any exchange takes (each reply has 10 s, a device
/// state transfer has its own bound).
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(30);

pub(super) struct Watchdog {
    epoch: Instant,
    /// When the exchange in progress began (ms since `epoch`, plus one),
    /// 0 when idle.
    since: AtomicU64,
    fd: AtomicI32,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            since: AtomicU64::new(0),
            fd: AtomicI32::new(-1),
        }
    }
}

impl Watchdog {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Shuts down the socket of an exchange older than `limit`; `true` if
    /// it did.
    pub(super) fn cut_if_stuck(&self, limit: Duration) -> bool {
        let since = self.since.load(Ordering::Acquire);
        if since == 0 || self.now() - since < limit.as_millis() as u64 {
            return false;
        }
        let fd = self.fd.load(Ordering::Acquire);
        if fd < 0 {
            return false;
        }
        // SAFETY: shutdown on the socket of the exchange in progress, which
        // its owner keeps open while the watchdog is armed (it disarms
        // before the connection can be dropped); it only ends the
        // connection, it frees nothing.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        self.since.store(0, Ordering::Release);
        true
    }
}

/// The device state, locked, with the watchdog armed on `fd`.
pub(super) struct Busy<'a, T> {
    guard: MutexGuard<'a, T>,
    watch: &'a Watchdog,
}

impl<'a, T> Busy<'a, T> {
    pub(super) fn new(m: &'a Mutex<T>, watch: &'a Watchdog, fd: impl Fn(&T) -> RawFd) -> Self {
        let guard = crate::devices::bus::lock(m);
        watch.fd.store(fd(&guard), Ordering::Release);
        watch.since.store(watch.now(), Ordering::Release);
        Self { guard, watch }
    }
}

impl<T> Drop for Busy<'_, T> {
    fn drop(&mut self) {
        self.watch.since.store(0, Ordering::Release);
        self.watch.fd.store(-1, Ordering::Release);
    }
}

impl<T> Deref for Busy<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for Busy<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_stuck_exchange_has_its_socket_shut_down_and_an_idle_one_not() {
        let (mut ours, _peer) = UnixStream::pair().unwrap();
        let m = Mutex::new(ours.as_raw_fd());
        let w = Watchdog::default();

        assert!(!w.cut_if_stuck(Duration::ZERO));
        let busy = Busy::new(&m, &w, |fd| *fd);
        std::thread::sleep(Duration::from_millis(5));
        let cut = w.cut_if_stuck(Duration::from_millis(1));
        drop(busy);

        assert!(cut);
        // The peer never wrote: only a shutdown ends this read.
        assert_eq!(ours.read(&mut [0u8; 4]).unwrap(), 0);
    }
}
