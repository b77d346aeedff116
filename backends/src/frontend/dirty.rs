//! Dirty page logging driven as a migrating VMM drives it (QEMU's order):
//! SET_LOG_BASE with a memfd bitmap covering guest memory, then
//! SET_FEATURES with LOG_ALL, then SET_VRING_ADDR of every ring with
//! VHOST_VRING_F_LOG and the used ring's guest address; rounds of reading
//! and clearing the bitmap with atomic swaps while the backend sets bits;
//! the rings stopped ([`SyntheticFrontend::stop_queues`]: SET_VRING_ENABLE
//! 0, GET_VRING_BASE) for the last round; SET_FEATURES without LOG_ALL and
//! SET_VRING_ADDR without the flag to stop logging.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use super::{FrontendError, SyntheticFrontend};
use crate::dirty_log::{LOG_ALL, LOG_PAGE};
use crate::memory::memfd_create;

/// A dirty log bitmap in a memfd, one bit per guest page.
pub struct DirtyBitmap {
    file: File,
    map: MmapRegion<()>,
}

impl DirtyBitmap {
    /// A zeroed bitmap of `bytes` bytes (covering `bytes * 8` pages).
    pub fn new(bytes: usize) -> Result<Self, FrontendError> {
        let file = memfd_create("dirty-log").map_err(FrontendError::Memory)?;
        file.set_len(bytes as u64)
            .map_err(|e| FrontendError::Memory(crate::memory::MemoryError::Truncate(e)))?;
        let dup = file.try_clone().map_err(FrontendError::Socket)?;
        let map = MmapRegion::from_file(FileOffset::new(dup, 0), bytes)
            .map_err(|e| FrontendError::Memory(crate::memory::MemoryError::Mmap(e)))?;
        Ok(DirtyBitmap { file, map })
    }

    /// A bitmap covering guest addresses up to `mem_size`.
    pub fn covering(mem_size: u64) -> Result<Self, FrontendError> {
        Self::new(mem_size.div_ceil(LOG_PAGE).div_ceil(8) as usize)
    }

    /// The memfd, as sent with SET_LOG_BASE.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// True if the bitmap has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pages (guest address / 4096) marked since the last call, in
    /// order; their bits are cleared with an atomic swap per byte, as a VMM
    /// does while the backend goes on setting bits.
    pub fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for byte in 0..self.len() {
            let Ok(cell) = self.map.get_atomic_ref::<AtomicU8>(byte) else {
                break;
            };
            let bits = cell.swap(0, Ordering::AcqRel);
            pages.extend(
                (0..8)
                    .filter(|b| bits & (1 << b) != 0)
                    .map(|b| byte as u64 * 8 + b),
            );
        }
        pages
    }
}

impl SyntheticFrontend {
    fn frontend_conn(&self) -> Result<&vhost::vhost_user::Frontend, FrontendError> {
        self.vu.as_ref().ok_or(FrontendError::NotConnected)
    }

    /// SET_LOG_BASE with a fresh bitmap covering guest memory, kept for
    /// [`Self::take_dirty`] (also across a reconnect, which does not hand it
    /// over again). Needs [`super::FrontendConfig::dirty_log`].
    pub fn set_log_base(&mut self) -> Result<(), FrontendError> {
        let log = DirtyBitmap::covering(self.mem_size())?;
        self.send_log_base(log.file(), log.len() as u64, 0)?;
        self.dirty = Some(log);
        Ok(())
    }

    /// SET_LOG_BASE naming `size` bytes at `offset` of `file` as they are
    /// (for tests of values a backend must refuse). The backend's reply
    /// is awaited: a refusal closes the connection.
    pub fn send_log_base(
        &mut self,
        file: &File,
        size: u64,
        offset: u64,
    ) -> Result<(), FrontendError> {
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        };
        self.frontend_conn()?
            .set_log_base(0, Some(region))
            .map_err(FrontendError::Vhost)
    }

    /// Switches logging on or off: SET_FEATURES with or without LOG_ALL,
    /// then SET_VRING_ADDR of every ring with or without VHOST_VRING_F_LOG
    /// (its used ring's guest address as the log address), then a request
    /// with a reply, so the backend has handled all of it on return.
    pub fn set_logging(&mut self, on: bool) -> Result<(), FrontendError> {
        self.set_logging_parts(on, on)
    }

    /// Like [`Self::set_logging`], with LOG_ALL (`features`) and the rings'
    /// VHOST_VRING_F_LOG (`rings`) set apart, as no VMM would.
    pub fn set_logging_parts(&mut self, features: bool, rings: bool) -> Result<(), FrontendError> {
        let vh = FrontendError::Vhost;
        let features = if features {
            self.acked | LOG_ALL
        } else {
            self.acked & !LOG_ALL
        };
        self.logging = rings;
        let vu = self.frontend_conn()?;
        vu.set_features(features).map_err(vh)?;
        for i in 0..self.queues.len() {
            let data = self.ring_config(i)?;
            self.frontend_conn()?.set_vring_addr(i, &data).map_err(vh)?;
        }
        self.frontend_conn()?.get_features().map_err(vh)?;
        Ok(())
    }

    /// Pages marked in the log since the last call (cleared now); empty
    /// without a log.
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty
            .as_ref()
            .map(DirtyBitmap::take)
            .unwrap_or_default()
    }
}
