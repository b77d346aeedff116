//! Dirty-page tracking for pre-copy: KVM's log of what the vCPUs wrote and
//! the vhost-user backends' log of what they wrote, merged into one
//! [`Bitmap`] over guest-physical pages.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::MigrationError;
use crate::memory::GuestMemory;
use crate::vhost_user::LogShare;

pub const PAGE: u64 = 4096;

type Result<T> = std::result::Result<T, MigrationError>;

/// One bit per guest-physical page, from address 0 to the end of RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// A clear bitmap for pages below `end` (a guest-physical address).
    pub fn new(end: u64) -> Self {
        Self {
            words: vec![0; end.div_ceil(PAGE).div_ceil(64) as usize],
        }
    }

    /// Marks the pages `[gpa, gpa + len)` touch.
    pub fn set_range(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in gpa / PAGE..=(gpa + len - 1) / PAGE {
            if let Some(w) = self.words.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// ORs `bits` (bit i: page `first_page + i`) in.
    fn or_at(&mut self, first_page: u64, bits: impl IntoIterator<Item = u64>) {
        for (i, word) in bits.into_iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                let page = first_page + i as u64 * 64 + b;
                if let Some(w) = self.words.get_mut((page / 64) as usize) {
                    *w |= 1 << (page % 64);
                }
            }
        }
    }

    pub fn or(&mut self, other: &Self) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of dirty pages as guest-physical `(address, length)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            let mut word = w;
            while word != 0 {
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                let gpa = (i as u64 * 64 + b) * PAGE;
                match runs.last_mut() {
                    Some((start, len)) if *start + *len == gpa => *len += PAGE,
                    _ => runs.push((gpa, PAGE)),
                }
            }
        }
        runs
    }
}

/// The end of guest RAM: the first address above every region.
pub fn ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// Both dirty logs of a VM while a migration runs; [`Self::stop`] (or
/// drop) turns KVM's off again.
pub struct DirtyLog {
    vm: Arc<VmFd>,
    mem: GuestMemory,
    share: LogShare,
    /// The backends' log, mapped here: `words` u64s at `map`.
    map: *mut AtomicU64,
    words: usize,
    kvm_on: bool,
}

// SAFETY: `map` points to a shared mapping owned by this value and only
// accessed through atomics; the rest is Send.
unsafe impl Send for DirtyLog {}

impl DirtyLog {
    /// Creates the backends' log (a memfd, one bit per page up to the end
    /// of RAM) and maps it; logging is not on yet.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemory) -> Result<Self> {
        let bytes = Bitmap::new(ram_end(&mem)).words.len() * 8;
        let size = (bytes as u64).div_ceil(PAGE) * PAGE;
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MigrationError::DirtyLog(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(MigrationError::DirtyLog)?;
        // SAFETY: a new shared mapping of `size` bytes of our memfd; the
        // result is checked and unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(MigrationError::DirtyLog(std::io::Error::last_os_error()));
        }
        Ok(Self {
            vm,
            mem,
            share: LogShare {
                file: Arc::new(file),
                size,
            },
            map: map.cast(),
            words: bytes / 8,
            kvm_on: false,
        })
    }

    /// The log the backends write (`SET_LOG_BASE`).
    pub fn share(&self) -> LogShare {
        self.share.clone()
    }

    /// Turns KVM's logging on for every memory slot.
    pub fn start_kvm(&mut self) -> Result<()> {
        crate::vm::set_dirty_logging(&self.vm, &self.mem, true)
            .map_err(|e| MigrationError::Vm(crate::error_chain(&e)))?;
        self.kvm_on = true;
        Ok(())
    }

    /// Turns KVM's logging off.
    pub fn stop(&mut self) {
        if self.kvm_on {
            if let Err(e) = crate::vm::set_dirty_logging(&self.vm, &self.mem, false) {
                tracing::warn!(error = %crate::error_chain(&e), "cannot turn dirty logging off");
            }
            self.kvm_on = false;
        }
    }

    fn backend_log(&self) -> &[AtomicU64] {
        // SAFETY: `map` is a live, page-aligned mapping of at least
        // `words` u64s, owned by self; other processes write it only with
        // atomic ORs, which is what AtomicU64 models.
        unsafe { std::slice::from_raw_parts(self.map, self.words) }
    }

    /// Adds the pages dirtied since the last call to `into` and clears
    /// both logs.
    pub fn take(&self, into: &mut Bitmap) -> Result<()> {
        for (slot, r) in self.mem.iter().enumerate() {
            let bits = self
                .vm
                .get_dirty_log(slot as u32, r.len() as usize)
                .map_err(|e| MigrationError::Kvm("get dirty log", e))?;
            into.or_at(r.start_addr().0 / PAGE, bits);
        }
        let words = self
            .backend_log()
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel));
        into.or_at(0, words);
        Ok(())
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        self.stop();
        // SAFETY: the mapping made in `new`, of `share.size` bytes; no
        // reference into it outlives self.
        unsafe { libc::munmap(self.map.cast(), self.share.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_pages_and_ranges_cover_every_touched_page() {
        let mut b = Bitmap::new(1 << 30);
        b.set_range(0x1000, 0x2000);
        b.set_range(0x3000, 1);
        b.set_range(0x10_0fff, 2);

        assert_eq!(b.count(), 5);
        assert_eq!(b.runs(), vec![(0x1000, 0x3000), (0x10_0000, 0x2000)]);
    }

    #[test]
    fn kvm_words_land_at_their_slot_offset() {
        let mut b = Bitmap::new(8 << 30);
        b.or_at((4u64 << 30) / PAGE, [0b101, 1 << 63]);

        assert_eq!(
            b.runs(),
            vec![
                (4 << 30, PAGE),
                ((4 << 30) + 2 * PAGE, PAGE),
                ((4 << 30) + 127 * PAGE, PAGE)
            ]
        );
    }
}
