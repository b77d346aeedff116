//! Walking split-virtqueue descriptor chains (direct and indirect) from guest
//! memory, with every guest-controlled value checked.
//!
//! We walk chains ourselves, from a head index, so that requests recovered from
//! the inflight region can be re-parsed exactly like freshly popped ones.

use thiserror::Error;
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;
/// Upper bound on the descriptors of one chain, indirect tables included.
pub const MAX_CHAIN_LEN: usize = 1024;

/// A descriptor of a chain, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// True if the device may write the buffer.
    pub writable: bool,
}

/// Errors walking a descriptor chain.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor index is past the table.
    #[error("Descriptor index {0} out of range")]
    Index(u16),
    /// A descriptor cannot be read from guest memory.
    #[error("Descriptor table not in guest memory")]
    Memory,
    /// The chain loops or is too long.
    #[error("Descriptor chain too long")]
    TooLong,
    /// An indirect descriptor is malformed or nested.
    #[error("Invalid indirect descriptor")]
    Indirect,
}

/// A descriptor table being read: one host slice when the table lies in
/// one guest memory region (always, in practice), else a lookup per read.
struct Table<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    addr: GuestAddress,
    slice: Option<VolatileSlice<'a, BS<'a, M::Bitmap>>>,
}

impl<'a, M: GuestMemory + ?Sized> Table<'a, M> {
    fn new(mem: &'a M, addr: GuestAddress, len: u16) -> Self {
        let bytes = usize::from(len) * DESC_SIZE as usize;
        let slice = mem
            .get_slices(addr, bytes, Permissions::Read)
            .ok()
            .and_then(|mut it| it.next())
            .and_then(Result::ok)
            .filter(|s| s.len() == bytes);
        Table { mem, addr, slice }
    }

    fn read(&self, index: u16) -> Result<(u64, u32, u16, u16), ChainError> {
        let offset = u64::from(index) * DESC_SIZE;
        let mut raw = [0u8; 16];
        match &self.slice {
            Some(slice) => slice
                .read_slice(&mut raw, offset as usize)
                .map_err(|_| ChainError::Memory)?,
            None => {
                let base = self
                    .addr
                    .0
                    .checked_add(offset)
                    .map(GuestAddress)
                    .ok_or(ChainError::Memory)?;
                self.mem
                    .read_slice(&mut raw, base)
                    .map_err(|_| ChainError::Memory)?;
            }
        }
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        Ok((addr, len, flags, next))
    }
}

/// Collects the descriptors of the chain starting at `head` into `out`.
pub fn walk_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = Table::new(mem, desc_table, queue_size);
    let mut table_len = queue_size;
    let mut index = head;
    let mut in_indirect = false;
    loop {
        if index >= table_len {
            return Err(ChainError::Index(index));
        }
        if out.len() >= MAX_CHAIN_LEN {
            return Err(ChainError::TooLong);
        }
        let (addr, len, flags, next) = table.read(index)?;
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if in_indirect || flags & VRING_DESC_F_NEXT != 0 || len == 0 || len % 16 != 0 {
                return Err(ChainError::Indirect);
            }
            let count = len / 16;
            if count as usize > MAX_CHAIN_LEN {
                return Err(ChainError::Indirect);
            }
            in_indirect = true;
            table_len = count as u16;
            table = Table::new(mem, GuestAddress(addr), table_len);
            index = 0;
            continue;
        }
        out.push(Descriptor {
            addr: GuestAddress(addr),
            len,
            writable: flags & VRING_DESC_F_WRITE != 0,
        });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(
        mem: &GuestMemoryMmap<()>,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    #[test]
    fn walks_direct_chain_in_order() {
        let m = mem();
        put(&m, 0, 0, 0x1000, 16, VRING_DESC_F_NEXT, 2);
        put(&m, 0, 2, 0x2000, 1, VRING_DESC_F_WRITE, 0);
        let mut out = Vec::new();

        walk_chain(&m, GuestAddress(0), 4, 0, &mut out).unwrap();

        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1],
            Descriptor {
                addr: GuestAddress(0x2000),
                len: 1,
                writable: true
            }
        );
    }

    #[test]
    fn walks_indirect_table() {
        let m = mem();
        put(&m, 0, 0, 0x800, 32, VRING_DESC_F_INDIRECT, 0);
        put(&m, 0x800, 0, 0x1000, 16, VRING_DESC_F_NEXT, 1);
        put(&m, 0x800, 1, 0x2000, 1, VRING_DESC_F_WRITE, 0);
        let mut out = Vec::new();

        walk_chain(&m, GuestAddress(0), 4, 0, &mut out).unwrap();

        assert_eq!(out.len(), 2);
    }

    #[test]
    fn looping_chain_is_rejected() {
        let m = mem();
        put(&m, 0, 0, 0x1000, 16, VRING_DESC_F_NEXT, 1);
        put(&m, 0, 1, 0x1000, 16, VRING_DESC_F_NEXT, 0);
        let mut out = Vec::new();

        assert_eq!(
            walk_chain(&m, GuestAddress(0), 4, 0, &mut out),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn next_past_table_is_rejected() {
        let m = mem();
        put(&m, 0, 0, 0x1000, 16, VRING_DESC_F_NEXT, 9);
        let mut out = Vec::new();

        assert_eq!(
            walk_chain(&m, GuestAddress(0), 4, 0, &mut out),
            Err(ChainError::Index(9))
        );
    }
}
