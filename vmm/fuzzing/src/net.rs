//! The net backend's guest-facing parsers: TX chains with their virtio-net
//! header (written to a sink instead of a tap), and the control queue.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};

use backends::{QueueHandler, QueueMetrics};
use net_backend::event_handler::ctrl::{answer, CtrlQueue, CtrlSettings};
use net_backend::event_handler::tx::{TxLimits, TxQueue};
use net_backend::metrics::NetQueueMetrics;
use net_backend::vnet::{VnetHdr, HDR_LEN};
use vm_memory::GuestAddress;

use crate::input::Input;
use crate::mem::guest_memory;

/// Queue size (u16), descriptor table address (u16), the number of chain
/// heads (u8, at most 16) and the heads, then the memory image.
struct Chains {
    size: u16,
    table: GuestAddress,
    heads: Vec<u16>,
}

fn chains(inp: &mut Input) -> Chains {
    let size = inp.u16();
    let table = GuestAddress(u64::from(inp.u16()));
    let n = usize::from(inp.u8() & 0xf);
    Chains {
        size,
        table,
        heads: (0..n).map(|_| inp.u16()).collect(),
    }
}

/// MTU (u16), offered features (u64), a raw header (12 bytes) checked on
/// its own, then chains (see [`Chains`]) sent to /dev/null.
pub fn net_tx(data: &[u8]) {
    let mut inp = Input::new(data);
    let limits = TxLimits {
        mtu: inp.u16(),
        features: inp.u64(),
    };
    let mut raw = [0u8; HDR_LEN];
    let hdr_bytes = inp.bytes(HDR_LEN);
    raw[..hdr_bytes.len()].copy_from_slice(hdr_bytes);
    let hdr = VnetHdr::parse(&raw);
    let _ = hdr.check_tx(usize::from(inp.u16()), limits.mtu, limits.features);
    assert_eq!(VnetHdr::parse(&hdr.to_bytes()), hdr);
    let c = chains(&mut inp);
    let mem = guest_memory(inp.rest());
    let sink = OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let mut q = TxQueue::new(
        sink,
        limits,
        256,
        Arc::new(NetQueueMetrics::default()),
        Arc::new(QueueMetrics::default()),
    )
    .expect("TX queue");
    let mut done = Vec::new();

    for head in c.heads {
        let _ = q.start(&mem, c.table, c.size, head);
        q.submit();
    }
    while q.in_flight() > 0 {
        q.wait();
        q.reap(&mut done);
    }
}

/// Queue pairs offered (u16), then chains (see [`Chains`]); each command
/// is also answered on its own.
pub fn net_ctrl(data: &[u8]) {
    let mut inp = Input::new(data);
    let max_pairs = inp.u16();
    let c = chains(&mut inp);
    let image = inp.rest();
    let _ = answer(
        image.get(..8).unwrap_or(image),
        max_pairs,
        &mut CtrlSettings::default(),
    );
    let mem = guest_memory(image);
    let settings = Arc::new(Mutex::new(CtrlSettings::default()));
    let mut q = CtrlQueue::new(max_pairs, settings, Arc::new(NetQueueMetrics::default()));

    for head in c.heads {
        let used = q.start(&mem, c.table, c.size, head);
        assert!(
            matches!(used, Some(0 | 1)),
            "control answers at once, one byte"
        );
    }
}
