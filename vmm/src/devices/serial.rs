//! COM1: a 16550A from `vm-superio`, its interrupt delivered through an
//! irqfd, output to a writer, input queued by the VMM event loop.

use std::io::{self, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1's I/O base and interrupt line.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Raises the serial interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the event loop when the guest has drained the input FIFO, so
/// that it can queue more input.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::warn!(error = %e, "cannot signal serial input drained");
        }
    }
}

/// The COM1 device on the PIO bus.
pub struct Serial {
    uart: Uart<IrqTrigger, InputDrained, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(irq: EventFd, drained: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Uart::with_events(IrqTrigger(irq), InputDrained(drained), out),
        }
    }

    /// Queues guest input; returns how many bytes fit in the FIFO.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                tracing::debug!(error = ?e, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial(out: Buf) -> (Serial, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let s = Serial::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(out),
        );
        (s, irq, drained)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let out = Buf::default();
        let (mut s, _, _) = serial(out.clone());
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn input_raises_irq_when_enabled_and_drain_is_signalled() {
        let (mut s, irq, drained) = serial(Buf::default());
        s.write(1, &[1]); // IER: received data available
        assert_eq!(s.enqueue(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b, [b'a']);
        s.read(0, &mut b);
        assert_eq!(b, [b'b']);
        assert_eq!(drained.read().unwrap(), 1);
    }

    #[test]
    fn full_fifo_accepts_nothing_more() {
        let (mut s, _, _) = serial(Buf::default());
        let big = [b'x'; 200];
        let n = s.enqueue(&big);
        assert!(n > 0 && n < 200);
        assert_eq!(s.enqueue(b"y"), 0);
    }
}
