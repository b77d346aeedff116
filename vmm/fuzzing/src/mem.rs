//! Guest memory built from fuzz bytes, laid out like a small guest: two
//! adjacent regions (buffers may straddle them) and a third after a hole.

use std::sync::Arc;

use backends::memory::{GuestMem, GuestMemRef};
use vm_memory::{Bytes, GuestAddress};

/// Region A: [0, 0x4000), region B: [0x4000, 0x8000), a hole, region C:
/// [0x10000, 0x11000).
pub const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x4000), (0x10000, 0x1000)];
/// The bytes of regions A and B together, which `image` fills.
pub const LOW_LEN: usize = 0x8000;

/// Guest memory whose low 32 KiB start with `image` (the rest zero).
pub fn guest_memory(image: &[u8]) -> GuestMemRef {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMem::from_ranges(&ranges).expect("fixed layout is valid");
    let n = image.len().min(LOW_LEN);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("the low regions are contiguous");
    Arc::new(mem)
}
