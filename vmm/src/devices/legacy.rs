//! Small legacy devices: the i8042 (the guest resets the machine through
//! it, `reboot=k`) and a debug console port.
//!
//! Saved state: `vm_superio::I8042Device` keeps nothing but its reset
//! trigger (reads return 0, only the CPU-reset command does anything), so
//! [`I8042State`] is empty; it exists so that the snapshot format has a
//! place for the controller when it grows state (a command byte, an output
//! buffer) without changing the shape of everything around it. The debug
//! console's half-logged line is host-side only and not saved.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// The debug console port (as QEMU's debugcon): bytes written are logged,
/// a read returns 0xE9 so a guest can detect it.
pub const DEBUGCON_PORT: u64 = 0xe9;

/// Reports the i8042 CPU reset as the guest asking to reboot.
pub struct ResetTrigger(pub Arc<ExitNotifier>);

impl Trigger for ResetTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.notify(ExitReason::GuestReset);
        Ok(())
    }
}

/// The keyboard controller, for reset only.
pub struct I8042(pub I8042Device<ResetTrigger>);

/// What the i8042 holds: nothing (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl I8042 {
    /// A controller that resets the VM through `reset`.
    pub fn new(reset: ResetTrigger) -> Self {
        Self(I8042Device::new(reset))
    }

    /// The controller's state, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {}
    }

    /// A controller carrying on from `state`.
    pub fn restore(_state: &I8042State, reset: ResetTrigger) -> Self {
        Self::new(reset)
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            // ResetTrigger never fails.
            let _ = self.0.write(offset as u8, b);
        }
    }
}

/// Debug console: counts and logs what the guest writes.
#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
    pub bytes: Arc<AtomicU64>,
}

const DEBUGCON_LINE_MAX: usize = 256;

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUGCON_PORT as u8);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        for &b in data {
            if b == b'\n' || self.line.len() >= DEBUGCON_LINE_MAX {
                tracing::debug!(target: "debugcon", "{}", String::from_utf8_lossy(&self.line));
                self.line.clear();
            }
            if b != b'\n' {
                self.line.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debugcon_reads_its_signature_and_counts_writes() {
        let mut d = DebugCon::default();
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b, [0xe9]);
        d.write(0, b"ok\n");
        assert_eq!(d.bytes.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn i8042_reset_command_notifies_guest_reset() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042(I8042Device::new(ResetTrigger(n.clone())));
        dev.write(4, &[0xfe]);
        assert_eq!(n.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn restored_i8042_still_resets_the_vm() {
        let old = I8042::new(ResetTrigger(Arc::new(ExitNotifier::new().unwrap())));
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042::restore(&old.state(), ResetTrigger(n.clone()));

        dev.write(4, &[0xfe]);

        assert_eq!(n.reason(), Some(ExitReason::GuestReset));
    }
}
