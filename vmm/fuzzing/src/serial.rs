//! The 8250 UART as the guest drives it through its eight ports, with host
//! input queued in between and snapshots taken and restored mid-way.

use std::io;

use vmm::devices::bus::BusDevice;
use vmm::devices::serial::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

fn evt() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// A sequence of operations, one byte each plus operands: bits 0-1 the
/// kind (read, write, host input, save and restore), bits 2-4 the port.
pub fn serial(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut s = Serial::new(evt(), evt(), Box::new(io::sink()));
    while !inp.is_empty() {
        let op = inp.u8();
        let port = u64::from((op >> 2) & 7);
        match op & 3 {
            0 => {
                let mut b = [0u8; 1];
                s.read(port, &mut b);
            }
            1 => s.write(port, &[inp.u8()]),
            2 => {
                let n = usize::from(inp.u8() & 0x3f);
                let input = inp.bytes(n);
                let taken = s.enqueue(input);
                assert!(taken <= input.len());
            }
            _ => {
                // A snapshot restored carries on with the same state.
                let saved = s.state();
                s = Serial::restore(&saved, evt(), evt(), Box::new(io::sink()))
                    .expect("a UART's own state restores");
                assert_eq!(s.state(), saved);
            }
        }
    }
}
