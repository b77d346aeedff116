//! COM1: a 16550A UART, its interrupt delivered through an irqfd, output to
//! a writer, input queued by the VMM event loop.
//!
//! Hand-written rather than `vm_superio::Serial`: that model ORs every
//! pending cause into IIR (received data plus THR empty reads as 0x06,
//! "line status") and clears them all on any IIR read, and it reports the
//! FIFO bits whether or not the driver enabled the FIFOs. A 16550A reports
//! the one cause of highest priority (line status > received data > THR
//! empty > modem status); reading IIR clears only a THR-empty report. The
//! Linux 8250 driver transmits from the THR-empty interrupt and tests for it
//! when a port opens (`serial8250_do_startup`: IER = THRI, read IIR, IER = 0,
//! IER = THRI, read IIR), so this model follows the datasheet (and QEMU's
//! `hw/char/serial.c`) there:
//!
//! - The transmitter is always empty (a byte written to THR is on the
//!   writer at once), so LSR always shows THRE and TEMT.
//! - The THR-empty interrupt is armed when IER.THRI goes from 0 to 1 and
//!   after each byte written to THR; an IIR read that reports it disarms it.
//! - The interrupt line is the OR of the enabled pending causes; the irqfd
//!   (an edge into the IOAPIC pin) is written on each rising edge of that
//!   line, and a THR write drops and raises it, as a real byte would.
//!
//! Deliberate differences from a real 16550A: the receive buffer holds 64
//! bytes whether or not FIFOs are enabled and raises the received-data
//! interrupt from the first byte (no trigger levels, so no character
//! timeout); an FCR "clear receive FIFO" does not discard input the VMM
//! queued, which came from the user rather than from a noisy line. The
//! loopback mode works as in `vm-superio`: THR bytes come back on RBR,
//! MCR drives the modem status inputs, and host input is held off.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1's I/O base and interrupt line.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Receive buffer size, in bytes.
const RX_CAPACITY: usize = 64;

// Register offsets.
const DATA: u8 = 0; // RBR / THR, DLL with LCR.DLAB
const IER: u8 = 1; // DLM with LCR.DLAB
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;

const IIR_NONE: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_FIFOS_ON: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
/// The modem inputs of a connected line: carrier, data set ready, clear to send.
const MSR_CONNECTED: u8 = MSR_DCD | MSR_DSR | MSR_CTS;

/// Failed host writes logged in full before only every 4096th is.
const LOG_FIRST: u64 = 8;

/// Errors restoring a UART from saved state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SerialError {
    #[error("Saved receive buffer holds {0} bytes, more than the {RX_CAPACITY} it can")]
    RxOverflow(usize),
}

/// What a UART holds, for snapshot and migration: every register the guest
/// can read or that changes what it reads, the receive buffer, and the
/// interrupt state.
///
/// `line` is the interrupt line as last signalled. It is restored as is
/// and never re-signalled: a rising edge already went through the irqfd
/// into the in-kernel irqchip, whose state (IOAPIC, LAPIC IRR) is saved
/// with the VM and vCPUs, so raising it again would deliver it twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub fcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    /// MSR delta bits not yet read.
    pub msr_delta: u8,
    /// Overrun error not yet read from LSR.
    pub overrun: bool,
    /// The THR-empty interrupt is armed.
    pub thr_pending: bool,
    /// Received bytes the guest has not read, oldest first.
    pub rx: Vec<u8>,
    /// The interrupt line as last signalled.
    pub line: bool,
}

/// The COM1 device on the PIO bus.
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    fcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// MSR delta bits (DCTS, DDSR, TERI, DDCD), cleared by an MSR read.
    msr_delta: u8,
    /// Loopback bytes were lost to a full buffer; cleared by an LSR read.
    overrun: bool,
    /// The THR-empty interrupt is armed.
    thr_pending: bool,
    rx: VecDeque<u8>,
    /// The interrupt line as last signalled.
    line: bool,
    irq: EventFd,
    drained: EventFd,
    out: Box<dyn Write + Send>,
    failures: u64,
}

impl Serial {
    /// A UART that raises `irq` (an irqfd) and writes `drained` when the
    /// guest empties the receive buffer, so the event loop can queue more.
    pub fn new(irq: EventFd, drained: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            ier: 0,
            lcr: 0x03, // 8 data bits
            mcr: MCR_OUT2,
            fcr: 0,
            scr: 0,
            dll: 0x0c, // 9600 baud
            dlm: 0,
            msr_delta: 0,
            overrun: false,
            thr_pending: false,
            rx: VecDeque::with_capacity(RX_CAPACITY),
            line: false,
            irq,
            drained,
            out,
            failures: 0,
        }
    }

    /// The UART's state, for a snapshot. The VM must be paused (no vCPU in
    /// the middle of an access).
    pub fn state(&self) -> SerialState {
        SerialState {
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            fcr: self.fcr,
            scr: self.scr,
            dll: self.dll,
            dlm: self.dlm,
            msr_delta: self.msr_delta,
            overrun: self.overrun,
            thr_pending: self.thr_pending,
            rx: self.rx.iter().copied().collect(),
            line: self.line,
        }
    }

    /// A UART that carries on from `state`, with the same handles as
    /// [`Self::new`]. Nothing is signalled: see [`SerialState`] for why
    /// the interrupt line is not raised again. `drained` is not written
    /// either; the event loop feeds input once the guest reads the buffer.
    pub fn restore(
        state: &SerialState,
        irq: EventFd,
        drained: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialError> {
        if state.rx.len() > RX_CAPACITY {
            return Err(SerialError::RxOverflow(state.rx.len()));
        }
        let mut rx = VecDeque::with_capacity(RX_CAPACITY);
        rx.extend(&state.rx);
        Ok(Self {
            // The masks the register writes apply, so that a hand-edited
            // state cannot set bits the guest never could.
            ier: state.ier & 0x0f,
            lcr: state.lcr,
            mcr: state.mcr & 0x1f,
            fcr: state.fcr & 0xc9,
            scr: state.scr,
            dll: state.dll,
            dlm: state.dlm,
            msr_delta: state.msr_delta & 0x0f,
            overrun: state.overrun,
            thr_pending: state.thr_pending,
            rx,
            line: state.line,
            irq,
            drained,
            out,
            failures: 0,
        })
    }

    /// Queues guest input; returns how many bytes fit in the buffer.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        if self.loopback() {
            return 0;
        }
        let n = input.len().min(RX_CAPACITY - self.rx.len());
        self.rx.extend(&input[..n]);
        self.update_irq();
        n
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    /// The modem status inputs: wired to MCR in loopback mode.
    fn modem_inputs(&self) -> u8 {
        if !self.loopback() {
            return MSR_CONNECTED;
        }
        let m = self.mcr;
        let wire = |out: u8, input: u8| if m & out != 0 { input } else { 0 };
        wire(MCR_DTR, MSR_DSR)
            | wire(MCR_RTS, MSR_CTS)
            | wire(MCR_OUT1, MSR_RI)
            | wire(MCR_OUT2, MSR_DCD)
    }

    /// The enabled pending cause of highest priority, as IIR bits 3:0.
    fn cause(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_pending {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr_delta != 0 {
            IIR_MSI
        } else {
            IIR_NONE
        }
    }

    /// Follows the interrupt line; a rising edge writes the irqfd.
    fn update_irq(&mut self) {
        let line = self.cause() != IIR_NONE;
        if line && !self.line {
            if let Err(e) = self.irq.write(1) {
                self.failed("raise serial interrupt", &e);
            }
        }
        self.line = line;
    }

    /// Logs a host-side failure the guest may cause at any rate: the first
    /// few, then every 4096th.
    fn failed(&mut self, what: &str, e: &std::io::Error) {
        self.failures += 1;
        if self.failures <= LOG_FIRST || self.failures % 4096 == 0 {
            tracing::warn!(error = %e, count = self.failures, "cannot {what}");
        }
    }

    fn transmit(&mut self, b: u8) {
        if self.loopback() {
            if self.rx.len() < RX_CAPACITY {
                self.rx.push_back(b);
            } else {
                self.overrun = true;
            }
            return;
        }
        if let Err(e) = self.out.write_all(&[b]).and_then(|()| self.out.flush()) {
            self.failed("write serial output", &e);
        }
    }

    fn write_thr(&mut self, b: u8) {
        self.thr_pending = false;
        self.update_irq();
        self.transmit(b);
        self.thr_pending = true;
        self.update_irq();
    }

    fn write_ier(&mut self, v: u8) {
        let enabled = v & !self.ier & IER_THRI != 0;
        self.ier = v & 0x0f;
        if enabled {
            // THR is always empty: turning the interrupt on arms it.
            self.thr_pending = true;
        } else if self.ier & IER_THRI == 0 {
            self.thr_pending = false;
        }
        self.update_irq();
    }

    fn write_mcr(&mut self, v: u8) {
        let before = self.modem_inputs();
        self.mcr = v & 0x1f;
        let after = self.modem_inputs();
        let changed = before ^ after;
        // DCTS, DDSR and DDCD on any change; TERI on RI's trailing edge.
        self.msr_delta |= (changed & (MSR_CTS | MSR_DSR | MSR_DCD)) >> 4;
        if before & !after & MSR_RI != 0 {
            self.msr_delta |= MSR_RI >> 4;
        }
        self.update_irq();
    }

    fn read_rbr(&mut self) -> u8 {
        let Some(b) = self.rx.pop_front() else {
            return 0;
        };
        if self.rx.is_empty() {
            if let Err(e) = self.drained.write(1) {
                self.failed("signal serial input drained", &e);
            }
        }
        self.update_irq();
        b
    }

    fn read_iir(&mut self) -> u8 {
        let cause = self.cause();
        if cause == IIR_THRI {
            self.thr_pending = false;
            self.update_irq();
        }
        let fifos = if self.fcr & FCR_ENABLE != 0 {
            IIR_FIFOS_ON
        } else {
            0
        };
        cause | fifos
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        match reg {
            DATA if self.dlab() => self.dll,
            DATA => self.read_rbr(),
            IER if self.dlab() => self.dlm,
            IER => self.ier,
            IIR_FCR => self.read_iir(),
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let lsr = self.lsr();
                self.overrun = false;
                self.update_irq();
                lsr
            }
            MSR => {
                let msr = self.modem_inputs() | self.msr_delta;
                self.msr_delta = 0;
                self.update_irq();
                msr
            }
            SCR => self.scr,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        match reg {
            DATA if self.dlab() => self.dll = v,
            DATA => self.write_thr(v),
            IER if self.dlab() => self.dlm = v,
            IER => self.write_ier(v),
            // FIFO enable and trigger level; the clear bits self-clear.
            IIR_FCR => self.fcr = v & 0xc9,
            LCR => self.lcr = v,
            MCR => self.write_mcr(v),
            SCR => self.scr = v,
            // LSR and MSR are read-only (factory-test writes are ignored).
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.read_reg((offset & 7) as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            self.write_reg((offset & 7) as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
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

    fn reg(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    /// Interrupts raised since the last call.
    fn raised(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
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
        assert_eq!(reg(&mut s, 0), b'a');
        assert_eq!(reg(&mut s, 0), b'b');
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

    #[test]
    fn enabling_thri_with_empty_transmitter_raises_thre_once() {
        let (mut s, irq, _) = serial(Buf::default());
        s.write(1, &[0x02]);
        assert_eq!(raised(&irq), 1);
        assert_eq!(reg(&mut s, 2), 0x02);
        assert_eq!(reg(&mut s, 2), 0x01);
    }

    #[test]
    fn writing_a_byte_with_thri_enabled_raises_thre_again() {
        let (mut s, irq, _) = serial(Buf::default());
        s.write(1, &[0x02]);
        raised(&irq);
        reg(&mut s, 2);
        s.write(0, b"x");
        assert_eq!(raised(&irq), 1);
        assert_eq!(reg(&mut s, 2), 0x02);
    }

    #[test]
    fn received_data_has_priority_over_thre() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(1, &[0x03]);
        s.enqueue(b"a");
        assert_eq!(reg(&mut s, 2), 0x04);
        assert_eq!(reg(&mut s, 0), b'a');
        assert_eq!(reg(&mut s, 2), 0x02);
        assert_eq!(reg(&mut s, 2), 0x01);
    }

    #[test]
    fn linux_thre_self_test_sees_thre_reasserted() {
        // serial8250_do_startup: IER=THRI, IIR, IER=0, IER=THRI, IIR.
        let (mut s, _, _) = serial(Buf::default());
        s.write(1, &[0x02]);
        let iir1 = reg(&mut s, 2);
        s.write(1, &[0x00]);
        s.write(1, &[0x02]);
        let iir2 = reg(&mut s, 2);
        assert_eq!((iir1, iir2), (0x02, 0x02));
    }

    #[test]
    fn rewriting_ier_with_thri_already_set_does_not_rearm() {
        let (mut s, irq, _) = serial(Buf::default());
        s.write(1, &[0x02]);
        reg(&mut s, 2);
        raised(&irq);
        s.write(1, &[0x03]);
        assert_eq!(raised(&irq), 0);
        assert_eq!(reg(&mut s, 2), 0x01);
    }

    #[test]
    fn interrupt_line_raises_the_irqfd_on_rising_edges_only() {
        let (mut s, irq, _) = serial(Buf::default());
        s.write(1, &[0x01]);
        s.enqueue(b"a");
        s.enqueue(b"b");
        assert_eq!(raised(&irq), 1);
        reg(&mut s, 0);
        reg(&mut s, 0);
        s.enqueue(b"c");
        assert_eq!(raised(&irq), 1);
    }

    #[test]
    fn enabling_rx_interrupt_with_data_waiting_raises_it() {
        let (mut s, irq, _) = serial(Buf::default());
        s.enqueue(b"a");
        s.write(1, &[0x01]);
        assert_eq!(raised(&irq), 1);
        assert_eq!(reg(&mut s, 2), 0x04);
    }

    #[test]
    fn iir_reports_fifos_only_once_enabled() {
        let (mut s, _, _) = serial(Buf::default());
        let before = reg(&mut s, 2);
        s.write(2, &[0x07]); // FCR: enable, clear both FIFOs
        assert_eq!((before, reg(&mut s, 2)), (0x01, 0xc1));
    }

    #[test]
    fn fifo_clear_keeps_queued_input() {
        let (mut s, _, _) = serial(Buf::default());
        s.enqueue(b"a");
        s.write(2, &[0x03]);
        assert_eq!(reg(&mut s, 5) & 0x01, 0x01);
        assert_eq!(reg(&mut s, 0), b'a');
    }

    #[test]
    fn lsr_shows_transmitter_empty_and_data_ready() {
        let (mut s, _, _) = serial(Buf::default());
        let idle = reg(&mut s, 5);
        s.enqueue(b"a");
        assert_eq!((idle, reg(&mut s, 5)), (0x60, 0x61));
    }

    #[test]
    fn dlab_maps_the_divisor_latch_over_data_and_ier() {
        let (mut s, irq, _) = serial(Buf::default());
        s.write(3, &[0x83]);
        s.write(0, &[0x01]);
        s.write(1, &[0x02]);
        let latch = (reg(&mut s, 0), reg(&mut s, 1));
        s.write(3, &[0x03]);
        assert_eq!(latch, (0x01, 0x02));
        assert_eq!(reg(&mut s, 1), 0x00);
        assert_eq!(raised(&irq), 0);
    }

    #[test]
    fn loopback_returns_written_bytes_and_mirrors_modem_lines() {
        let out = Buf::default();
        let (mut s, _, _) = serial(out.clone());
        s.write(4, &[0x10 | 0x0a]); // loop, RTS, OUT2
        s.write(0, b"z");
        assert_eq!(reg(&mut s, 6) & 0xf0, 0x90); // CTS, DCD
        assert_eq!(reg(&mut s, 0), b'z');
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(s.enqueue(b"host"), 0);
    }

    #[test]
    fn loopback_modem_changes_raise_modem_status_last() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(4, &[0x10]);
        reg(&mut s, 6); // clears the deltas of entering loopback
        s.write(1, &[0x0a]); // IER: THRI, MSI
        s.write(4, &[0x10 | 0x01]); // DTR -> DSR
        assert_eq!(reg(&mut s, 2), 0x02);
        assert_eq!(reg(&mut s, 2), 0x00);
        assert_eq!(reg(&mut s, 6), 0x22); // DSR, DDSR
        assert_eq!(reg(&mut s, 2), 0x01);
    }

    #[test]
    fn loopback_overrun_is_reported_before_received_data() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(4, &[0x10]);
        s.write(1, &[0x05]); // IER: RDI, RLSI
        for _ in 0..=RX_CAPACITY {
            s.write(0, b"o");
        }
        assert_eq!(reg(&mut s, 2), 0x06);
        assert_eq!(reg(&mut s, 5), 0x63); // OE, DR, THRE, TEMT
        assert_eq!(reg(&mut s, 2), 0x04);
    }

    #[test]
    fn failing_output_is_dropped_and_thre_still_fires() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), drained, Box::new(Broken));
        s.write(1, &[0x02]);
        reg(&mut s, 2);
        raised(&irq);
        s.write(0, b"x");
        assert_eq!(raised(&irq), 1);
    }

    /// A UART restored from `s`'s state, with fresh handles.
    fn restored(s: &Serial, out: Buf) -> (Serial, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let r = Serial::restore(
            &s.state(),
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(out),
        )
        .unwrap();
        (r, irq, drained)
    }

    /// Every register as the guest reads it without side effects (not
    /// RBR, IIR, LSR or MSR, whose reads change state).
    fn quiet_registers(s: &mut Serial) -> [u8; 5] {
        [reg(s, 1), reg(s, 3), reg(s, 4), reg(s, 7), s.fcr]
    }

    #[test]
    fn restored_uart_reads_back_the_same_registers() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        s.write(3, &[0x1b]); // 8E1
        s.write(1, &[0x0f]);
        s.write(2, &[0xc1]);
        s.write(4, &[0x0b]);
        s.write(7, &[0x5a]);
        let (mut r, _, _) = restored(&s, Buf::default());

        let regs = (quiet_registers(&mut r), reg(&mut r, 5), reg(&mut r, 2));

        assert_eq!(
            regs,
            (quiet_registers(&mut s), reg(&mut s, 5), reg(&mut s, 2))
        );
        assert_eq!(r.state(), s.state());
    }

    #[test]
    fn restored_uart_keeps_unread_input_and_its_interrupt() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(1, &[IER_RDI]);
        s.enqueue(b"abc");
        reg(&mut s, 0);
        let (mut r, irq, drained) = restored(&s, Buf::default());

        let iir = reg(&mut r, 2);
        let input = [reg(&mut r, 0), reg(&mut r, 0)];

        assert_eq!(iir, IIR_RDI);
        assert_eq!(&input, b"bc");
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(raised(&irq), 0, "the edge was delivered before the save");
    }

    #[test]
    fn restored_uart_keeps_a_pending_thre_interrupt() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(1, &[IER_THRI]);
        let (mut r, irq, _) = restored(&s, Buf::default());

        let iirs = [reg(&mut r, 2), reg(&mut r, 2)];

        assert_eq!(iirs, [IIR_THRI, IIR_NONE]);
        assert_eq!(raised(&irq), 0);
    }

    #[test]
    fn restored_raised_line_gives_no_second_edge_for_more_input() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(1, &[IER_RDI]);
        s.enqueue(b"a");
        let (mut r, irq, _) = restored(&s, Buf::default());

        r.enqueue(b"b");

        assert_eq!(raised(&irq), 0);
    }

    #[test]
    fn restored_uart_continues_a_half_written_divisor() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(3, &[0x83]);
        s.write(0, &[0x01]);
        let (mut r, _, _) = restored(&s, Buf::default());

        r.write(1, &[0x02]);
        let latch = (reg(&mut r, 0), reg(&mut r, 1));

        assert_eq!(latch, (0x01, 0x02));
    }

    #[test]
    fn restored_uart_writes_to_the_new_sink() {
        let (s, _, _) = serial(Buf::default());
        let out = Buf::default();
        let (mut r, _, _) = restored(&s, out.clone());

        r.write(0, b"k");

        assert_eq!(*out.0.lock().unwrap(), b"k");
    }

    #[test]
    fn restored_loopback_overrun_is_still_reported() {
        let (mut s, _, _) = serial(Buf::default());
        s.write(4, &[MCR_LOOP]);
        s.write(1, &[IER_RLSI]);
        for _ in 0..=RX_CAPACITY {
            s.write(0, b"o");
        }
        let (mut r, _, _) = restored(&s, Buf::default());

        let iir = reg(&mut r, 2);

        assert_eq!((iir, reg(&mut r, 5) & LSR_OE), (IIR_RLSI, LSR_OE));
    }

    #[test]
    fn saved_receive_buffer_larger_than_the_fifo_is_refused() {
        let (s, _, _) = serial(Buf::default());
        let mut state = s.state();
        state.rx = vec![0; RX_CAPACITY + 1];
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();

        let err = Serial::restore(&state, evt(), evt(), Box::new(Buf::default())).err();

        assert_eq!(err, Some(SerialError::RxOverflow(RX_CAPACITY + 1)));
    }
}
