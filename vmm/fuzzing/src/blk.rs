//! virtio-blk requests, parsed and executed against RAM storage: what a
//! blk-backend queue worker does with each chain the guest makes
//! available.

use std::sync::Arc;

use backends::{QueueHandler, QueueMetrics};
use blk_backend::event_handler::{BlkQueue, DiskInfo};
use blk_backend::request::parse;
use blk_backend::storage::memory::MemoryStorage;
use blk_backend::storage::Storage;
use vm_memory::GuestAddress;

use crate::input::Input;
use crate::mem::guest_memory;

/// Disk size in sectors (u8), flags (u8: bit 0 read-only, bit 1 discard
/// offered), queue size (u16), descriptor table address (u16), the number
/// of chain heads (u8, at most 16) and the heads (u16 each), then the
/// guest memory image.
pub fn blk_request(data: &[u8]) {
    let mut inp = Input::new(data);
    let sectors = u64::from(inp.u8());
    let flags = inp.u8();
    let size = inp.u16();
    let table = GuestAddress(u64::from(inp.u16()));
    let n = usize::from(inp.u8() & 0xf);
    let heads: Vec<u16> = (0..n).map(|_| inp.u16()).collect();
    let mem = guest_memory(inp.rest());
    let storage = MemoryStorage::new(sectors * 512).unwrap();
    let disk = Arc::new(DiskInfo {
        capacity: storage.capacity(),
        read_only: flags & 1 != 0,
        serial: *b"fuzz-serial-00000000",
        discard: flags & 2 != 0,
    });
    let mut q = BlkQueue::new(
        storage.open_queue().expect("RAM storage queue"),
        disk,
        Arc::new(QueueMetrics::default()),
    );
    let mut done = Vec::new();

    for head in heads {
        let mut chain = Vec::new();
        if backends::desc::walk_chain(mem.as_ref(), table, size, head, &mut chain).is_ok() {
            let _ = parse(mem.as_ref(), &chain);
        }
        let _ = q.start(&mem, table, size, head);
        q.submit();
        q.reap(&mut done);
    }

    // RAM storage completes every request at once: nothing stays in flight.
    assert_eq!(q.in_flight(), 0);
}
