//! Polled COM1 output, serialised across CPUs by a spinlock.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::x86::{inb, outb, pause};

pub const COM1: u16 = 0x3F8;
pub const THR: u16 = COM1;
pub const IER: u16 = COM1 + 1;
pub const MCR: u16 = COM1 + 4;
pub const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Writes one byte once the transmit holding register is empty (bounded poll).
pub fn putc(b: u8) {
    let mut tries = 0u32;
    while inb(LSR) & LSR_THRE == 0 && tries < 100_000 {
        tries += 1;
    }
    outb(THR, b);
}

/// Writes a string without taking the lock (early boot, fatal paths).
/// Reads one input byte, polling the line status (bounded: None when
/// nothing arrives within `tries` polls).
pub fn getc(tries: u64) -> Option<u8> {
    for _ in 0..tries {
        if crate::x86::inb(LSR) & 1 != 0 {
            return Some(crate::x86::inb(THR));
        }
    }
    None
}

pub fn puts_raw(s: &str) {
    for &b in s.as_bytes() {
        putc(b);
    }
}

/// A locked output line; the lock is released on drop.
pub struct Out {
    locked: bool,
}

/// Takes the output lock.
pub fn out() -> Out {
    while LOCK.swap(true, Ordering::Acquire) {
        while LOCK.load(Ordering::Relaxed) {
            pause();
        }
    }
    Out { locked: true }
}

impl Drop for Out {
    fn drop(&mut self) {
        if self.locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}

impl Out {
    /// Output without the lock, for fatal paths where this CPU may hold it.
    pub fn unlocked() -> Out {
        Out { locked: false }
    }

    pub fn s(&mut self, s: &str) -> &mut Self {
        puts_raw(s);
        self
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            putc(b);
        }
        self
    }

    /// `0x`-prefixed lowercase hex, no padding.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        putc(b'0');
        putc(b'x');
        let mut shift = 60i32;
        while shift > 0 && (v >> shift) & 0xF == 0 {
            shift -= 4;
        }
        while shift >= 0 {
            let d = ((v >> shift) & 0xF) as u8;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            shift -= 4;
        }
        self
    }

    /// Exactly `digits` lowercase hex digits, no prefix.
    pub fn hexw(&mut self, v: u64, digits: u32) -> &mut Self {
        for i in (0..digits).rev() {
            let d = ((v >> (i * 4)) & 0xF) as u8;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
        self
    }

    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&buf[i..])
    }

    pub fn nl(&mut self) -> &mut Self {
        putc(b'\n');
        self
    }
}

/// Prints a whole line under the lock.
pub fn line(s: &str) {
    out().s(s).nl();
}
