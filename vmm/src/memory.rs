//! Guest RAM: one memfd, mapped `MAP_SHARED`, so that vhost-user backends
//! can map the very same pages from `SET_MEM_TABLE`.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// Guest memory type used across the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("Cannot create memfd")]
    Memfd(#[source] io::Error),
    #[error("Cannot size memfd to {0} bytes")]
    Truncate(u64, #[source] io::Error),
    #[error("Not enough free 2 MiB huge pages: need {need}, {free} free (see /proc/sys/vm/nr_hugepages)")]
    HugePages { need: u64, free: u64 },
    #[error("Cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest RAM and the memfd behind it.
pub struct Memory {
    pub guest: GuestMemory,
    pub size: u64,
    /// The memfd every region maps.
    pub file: std::sync::Arc<File>,
}

impl Memory {
    /// Creates `size` bytes of guest RAM laid out around the MMIO hole.
    pub fn new(size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        if hugepages {
            let free = free_huge_pages();
            let need = size.div_ceil(HUGE_PAGE_SIZE);
            if free < need {
                return Err(MemoryError::HugePages { need, free });
            }
        }
        let file = memfd(c"guest-ram", hugepages).map_err(MemoryError::Memfd)?;
        file.set_len(size)
            .map_err(|e| MemoryError::Truncate(size, e))?;
        Self::with_file(file, size)
    }

    /// Guest RAM that is `file` itself (`size` bytes, shared-memory
    /// capable: tmpfs or hugetlbfs), mapped `MAP_SHARED`: what the guest
    /// writes goes to the file.
    pub fn with_file(file: File, size: u64) -> Result<Self, MemoryError> {
        let file = std::sync::Arc::new(file);
        let mut offset = 0;
        let regions: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|r| {
                let fo = FileOffset::from_arc(file.clone(), offset);
                offset += r.len;
                (GuestAddress(r.start), r.len as usize, Some(fo))
            })
            .collect();
        let guest = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
        Ok(Self { guest, size, file })
    }
}

/// Bytes of guest RAM the host has backed so far: the memfd's allocated
/// pages (touched by the guest, the VMM or a backend), whether resident
/// or swapped out.
pub fn allocated_bytes(file: &File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| m.blocks() * 512)
}

fn memfd(name: &CStr, hugepages: bool) -> io::Result<File> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugepages {
        flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `name` is a valid NUL-terminated string; the call has no
    // other memory effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by no one else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Free 2 MiB huge pages, from /proc/meminfo (0 when unknown).
fn free_huge_pages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    if field("Hugepagesize:") == 2048 {
        field("HugePages_Free:")
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_shared_memfd_with_file_offsets() {
        let m = Memory::new(64 << 20, false).unwrap();
        let region = m.guest.iter().next().unwrap();
        let fo = region.file_offset().expect("memfd backed");
        assert_eq!(fo.start(), 0);
        m.guest
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(fo.file(), &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn high_ram_maps_at_its_file_offset() {
        let m = Memory::new(3 << 30 | 16 << 20, false).unwrap();
        let regions: Vec<_> = m.guest.iter().collect();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].start_addr(), GuestAddress(1 << 32));
        assert_eq!(regions[1].file_offset().unwrap().start(), 3 << 30);
    }
}
