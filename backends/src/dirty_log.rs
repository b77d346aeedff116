//! Dirty-page logging for live migration: `VHOST_F_LOG_ALL` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, as the vhost-user specification's
//! "Migration" section defines it.
//!
//! The frontend hands over a shared bitmap with SET_LOG_BASE (a memfd, its
//! size and offset). Bit `page % 8` of byte `page / 8`, with
//! `page = gpa / 4096`, stands for the guest page at guest physical address
//! `gpa`. While the acked features (SET_FEATURES) hold LOG_ALL, every write
//! the backend makes to guest memory sets the bits of the pages it touched:
//!
//! - with an atomic OR, since the frontend clears bits at the same time;
//! - after the data is written and before the used ring publishes it, so
//!   that a page the frontend copied and cleared in between is marked again,
//!   and the frontend's last round (after GET_VRING_BASE stopped the rings)
//!   finds every write;
//! - writes to a used ring at the ring's `log_guest_addr`, when its
//!   SET_VRING_ADDR carried VHOST_VRING_F_LOG ([`UsedRingLog`]).
//!
//! [`DirtyLog`] is one connection's side: the protocol thread maps the
//! bitmap and switches logging on and off. Each queue worker (the vring and
//! the device's queue handler) holds a [`DirtyLogger`]; while logging is off
//! [`DirtyLogger::mark`] costs one relaxed atomic load. A logger keeps the
//! map it last used alive, so SET_LOG_BASE can replace the map while
//! workers write into it: the old one is unmapped when the last worker that
//! used it notices the change (at its next mark) or stops.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, MmapRegion, VolatileMemory};

use crate::desc::Descriptor;
use crate::memory::{check_file_range, MemoryError};
use crate::ratelimit::LogLimiter;

/// Bytes of guest memory one bit of the log stands for (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;
/// VHOST_F_LOG_ALL: the virtio feature bit that switches logging on.
pub const LOG_ALL: u64 = 1 << 26;

/// Bit 0 of the shared state word: logging is on and a log is mapped.
const ACTIVE: u64 = 1;
/// What [`UsedRingLog`] holds while the ring is not logged.
const NOT_LOGGED: u64 = u64::MAX;

/// Errors setting the log base.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// The log area is empty.
    #[error("Dirty log area is empty")]
    Empty,
    /// The area does not fit the file, or the file cannot be examined.
    #[error("Dirty log area does not fit its file")]
    Range(#[source] MemoryError),
    /// The area does not fit this process's address space.
    #[error("Dirty log area of {0:#x} bytes is too large to map")]
    TooLarge(u64),
    /// mmap failed.
    #[error("Cannot map the dirty log")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
}

/// A mapped log bitmap.
#[derive(Debug)]
struct LogMap {
    map: MmapRegion<()>,
    /// Offset of the log's first byte in `map`, which starts on a page.
    start: usize,
    /// Bytes of bitmap.
    len: u64,
}

impl LogMap {
    fn new(file: File, size: u64, offset: u64) -> Result<Self, DirtyLogError> {
        if size == 0 {
            return Err(DirtyLogError::Empty);
        }
        check_file_range(&file, offset, size).map_err(DirtyLogError::Range)?;
        let page = page_size();
        let start = offset % page;
        let map_len = size
            .checked_add(start)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(DirtyLogError::TooLarge(size))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset - start), map_len)
            .map_err(DirtyLogError::Mmap)?;
        Ok(LogMap {
            map,
            start: start as usize,
            len: size,
        })
    }

    /// Sets the bits of every page of `[gpa, gpa + len)`, `len > 0`;
    /// false if part of the range lies past the end of the log (that part
    /// is not marked).
    fn mark(&self, gpa: u64, len: u64) -> bool {
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let mut page = first;
        while page <= last {
            let byte = page / 8;
            if byte >= self.len {
                return false;
            }
            let low = page % 8;
            let high = (last - byte * 8).min(7);
            let mask = (0xffu8 << low) & (0xffu8 >> (7 - high));
            let Ok(cell) = self
                .map
                .get_atomic_ref::<AtomicU8>(self.start + byte as usize)
            else {
                return false;
            };
            // Release: whoever sees the bit (and copies the page) sees the
            // data written before it.
            cell.fetch_or(mask, Ordering::Release);
            page = (byte + 1) * 8;
        }
        true
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects; _SC_PAGESIZE is always valid.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096).max(1)
}

#[derive(Debug, Default)]
struct Inner {
    map: Option<Arc<LogMap>>,
    enabled: bool,
    generation: u64,
}

#[derive(Debug, Default)]
struct Shared {
    /// `generation << 1 | ACTIVE`: changes whenever the map or the switch
    /// does, so a logger knows when its cached map is stale.
    state: AtomicU64,
    inner: Mutex<Inner>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Inner)) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner);
        inner.generation += 1;
        let active = u64::from(inner.enabled && inner.map.is_some());
        self.state
            .store(inner.generation << 1 | active, Ordering::Release);
    }
}

/// One connection's dirty log: the protocol thread's side.
#[derive(Debug, Default)]
pub struct DirtyLog {
    shared: Arc<Shared>,
}

impl DirtyLog {
    /// No log mapped, logging off.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle for a queue worker.
    pub fn logger(&self) -> DirtyLogger {
        DirtyLogger {
            shared: self.shared.clone(),
            cache: None,
            warn: LogLimiter::default(),
        }
    }

    /// SET_LOG_BASE: maps `size` bytes of `file` from `offset` as the log,
    /// replacing (and, once no worker uses it, unmapping) the previous one.
    /// A refused log leaves the previous one in place.
    pub fn set_base(&self, file: File, size: u64, offset: u64) -> Result<(), DirtyLogError> {
        let map = Arc::new(LogMap::new(file, size, offset)?);
        self.shared.update(|inner| inner.map = Some(map));
        Ok(())
    }

    /// Logging on or off (LOG_ALL in SET_FEATURES). The log stays mapped.
    pub fn set_enabled(&self, enabled: bool) {
        if self.is_enabled() != enabled {
            self.shared.update(|inner| inner.enabled = enabled);
        }
    }

    /// Logging is switched on (a log may still be missing).
    pub fn is_enabled(&self) -> bool {
        self.shared.inner.lock().map(|i| i.enabled).unwrap_or(false)
    }

    /// A log is mapped.
    pub fn has_base(&self) -> bool {
        self.shared
            .inner
            .lock()
            .map(|i| i.map.is_some())
            .unwrap_or(false)
    }

    /// Logging off and the log dropped (RESET_DEVICE, RESET_OWNER).
    pub fn clear(&self) {
        self.shared.update(|inner| {
            inner.enabled = false;
            inner.map = None;
        });
    }
}

/// A queue worker's handle on the connection's dirty log.
#[derive(Debug)]
pub struct DirtyLogger {
    shared: Arc<Shared>,
    /// The state word and map seen at the last refresh.
    cache: Option<(u64, Option<Arc<LogMap>>)>,
    warn: LogLimiter,
}

impl Clone for DirtyLogger {
    fn clone(&self) -> Self {
        DirtyLogger {
            shared: self.shared.clone(),
            cache: None,
            warn: LogLimiter::default(),
        }
    }
}

impl Default for DirtyLogger {
    /// A logger of no connection: it never logs (unit tests, fuzzing).
    fn default() -> Self {
        DirtyLog::new().logger()
    }
}

impl DirtyLogger {
    /// True while writes must be logged.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) & ACTIVE != 0
    }

    /// Marks the pages of the `len` bytes written at `gpa`. Call it once the
    /// bytes are written, before the used ring entry that publishes them.
    #[inline]
    pub fn mark(&mut self, gpa: GuestAddress, len: u64) {
        let state = self.shared.state.load(Ordering::Relaxed);
        if state & ACTIVE == 0 || len == 0 {
            return;
        }
        self.mark_active(state, gpa.0, len);
    }

    /// Marks the writable buffers of a chain, in order, up to `written`
    /// bytes (the device fills writable buffers front to back).
    #[inline]
    pub fn mark_descs(&mut self, descs: &[Descriptor], written: u64) {
        if !self.is_active() {
            return;
        }
        let mut left = written;
        for d in descs.iter().filter(|d| d.writable) {
            if left == 0 {
                break;
            }
            let n = u64::from(d.len).min(left);
            self.mark(d.addr, n);
            left -= n;
        }
    }

    #[inline(never)]
    fn mark_active(&mut self, state: u64, gpa: u64, len: u64) {
        if self.cache.as_ref().is_none_or(|(seen, _)| *seen != state) {
            let inner = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
            let now = self.shared.state.load(Ordering::Relaxed);
            self.cache = Some((now, inner.map.clone()));
        }
        let Some((now, Some(map))) = &self.cache else {
            return;
        };
        if now & ACTIVE == 0 {
            return;
        }
        if !map.mark(gpa, len) && self.warn.allow() {
            tracing::warn!(
                gpa = format_args!("{gpa:#x}"),
                len,
                log_bytes = map.len,
                suppressed = self.warn.suppressed(),
                "write past the end of the dirty log not logged"
            );
        }
    }
}

/// Where writes to one used ring are logged: the `log_guest_addr` of the
/// ring's SET_VRING_ADDR when it carried VHOST_VRING_F_LOG. The protocol
/// thread sets it while the ring's worker reads it.
#[derive(Clone, Debug)]
pub struct UsedRingLog(Arc<AtomicU64>);

impl Default for UsedRingLog {
    fn default() -> Self {
        UsedRingLog(Arc::new(AtomicU64::new(NOT_LOGGED)))
    }
}

impl UsedRingLog {
    /// Logs the used ring at `addr`, or not at all.
    pub fn set(&self, addr: Option<u64>) {
        self.0.store(addr.unwrap_or(NOT_LOGGED), Ordering::Relaxed);
    }

    /// The guest address the used ring is logged at, if it is.
    #[inline]
    pub fn get(&self) -> Option<u64> {
        let addr = self.0.load(Ordering::Relaxed);
        (addr != NOT_LOGGED).then_some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memfd_create;

    /// A log file of `len` bytes and a second handle to read it back.
    fn log_file(len: u64) -> (File, File) {
        let f = memfd_create("test-log").unwrap();
        f.set_len(len).unwrap();
        let g = f.try_clone().unwrap();
        (f, g)
    }

    fn bits(file: &File, offset: u64, len: usize) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        (0..len as u64 * 8)
            .filter(|&p| buf[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    fn active_log(len: u64) -> (DirtyLog, DirtyLogger, File) {
        let (f, g) = log_file(len);
        let log = DirtyLog::new();
        log.set_base(f, len, 0).unwrap();
        log.set_enabled(true);
        let logger = log.logger();
        (log, logger, g)
    }

    #[test]
    fn write_spanning_pages_sets_every_page_bit_and_no_other() {
        let (_log, mut logger, file) = active_log(16);

        logger.mark(GuestAddress(0x7ffc), 8);
        logger.mark(GuestAddress(0x1_0000), 0x9000);

        assert_eq!(
            bits(&file, 0, 16),
            [7, 8, 16, 17, 18, 19, 20, 21, 22, 23, 24]
        );
    }

    #[test]
    fn bit_is_page_mod_8_of_byte_page_div_8() {
        use std::os::unix::fs::FileExt;
        let (_log, mut logger, file) = active_log(4);

        logger.mark(GuestAddress(11 * LOG_PAGE + 5), 1);

        let mut raw = [0u8; 4];
        file.read_exact_at(&mut raw, 0).unwrap();
        assert_eq!(raw, [0, 1 << 3, 0, 0]);
    }

    #[test]
    fn nothing_is_marked_until_logging_is_switched_on() {
        let (f, g) = log_file(4);
        let log = DirtyLog::new();
        let mut logger = log.logger();
        log.set_base(f, 4, 0).unwrap();

        logger.mark(GuestAddress(0), 1);
        let before = bits(&g, 0, 4);
        log.set_enabled(true);
        logger.mark(GuestAddress(LOG_PAGE), 1);
        log.set_enabled(false);
        logger.mark(GuestAddress(2 * LOG_PAGE), 1);

        assert!(before.is_empty());
        assert_eq!(bits(&g, 0, 4), [1]);
    }

    #[test]
    fn replaced_log_receives_the_marks_that_follow() {
        let (log, mut logger, old) = active_log(4);
        let (f, new) = log_file(4);

        logger.mark(GuestAddress(0), 1);
        log.set_base(f, 4, 0).unwrap();
        logger.mark(GuestAddress(LOG_PAGE), 1);

        assert_eq!(bits(&old, 0, 4), [0]);
        assert_eq!(bits(&new, 0, 4), [1]);
    }

    #[test]
    fn log_at_an_unaligned_offset_starts_there() {
        let (f, g) = log_file(0x3000);
        let log = DirtyLog::new();
        log.set_base(f, 8, 0x1003).unwrap();
        log.set_enabled(true);
        let mut logger = log.logger();

        logger.mark(GuestAddress(9 * LOG_PAGE), 1);

        assert_eq!(bits(&g, 0x1003, 8), [9]);
        assert_eq!(bits(&g, 0, 0x1003), Vec::<u64>::new());
    }

    #[test]
    fn write_past_the_end_of_the_log_marks_what_fits() {
        let (_log, mut logger, file) = active_log(1);

        logger.mark(GuestAddress(6 * LOG_PAGE), 4 * LOG_PAGE);
        logger.mark(GuestAddress(u64::MAX - 1), 8);

        assert_eq!(bits(&file, 0, 1), [6, 7]);
    }

    #[test]
    fn area_past_the_end_of_its_file_or_empty_is_refused() {
        let log = DirtyLog::new();

        let too_big = log.set_base(log_file(0x1000).0, 0x1001, 0);
        let offset_past = log.set_base(log_file(0x1000).0, 1, 0x1000);
        let overflow = log.set_base(log_file(0x1000).0, 0x1000, u64::MAX);
        let empty = log.set_base(log_file(0x1000).0, 0, 0);

        assert!(matches!(
            too_big,
            Err(DirtyLogError::Range(MemoryError::PastEnd { .. }))
        ));
        assert!(matches!(offset_past, Err(DirtyLogError::Range(_))));
        assert!(matches!(overflow, Err(DirtyLogError::Range(_))));
        assert!(matches!(empty, Err(DirtyLogError::Empty)));
        assert!(!log.has_base());
    }

    #[test]
    fn descriptors_are_marked_in_order_up_to_the_bytes_written() {
        let (_log, mut logger, file) = active_log(8);
        let desc = |page: u64, len: u32, writable: bool| Descriptor {
            addr: GuestAddress(page * LOG_PAGE),
            len,
            writable,
        };
        let chain = [
            desc(1, 4096, false),
            desc(3, 4096, true),
            desc(5, 8192, true),
            desc(9, 4096, true),
        ];

        logger.mark_descs(&chain, 4096 + 4097);

        assert_eq!(bits(&file, 0, 8), [3, 5, 6]);
    }

    #[test]
    fn used_ring_log_address_is_none_until_set() {
        let used = UsedRingLog::default();

        let before = used.get();
        used.set(Some(0x3000));
        let set = used.get();
        used.set(None);

        assert_eq!((before, set, used.get()), (None, Some(0x3000), None));
    }
}
