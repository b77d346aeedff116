//! The PIO and MMIO buses: address ranges mapped to devices, shared by all
//! vCPU threads. Accesses to unmapped addresses read as all ones and are
//! counted, with a rate-limited log line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device on a bus. `offset` is relative to the range's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("Bus range {base:#x}+{len:#x} is empty or wraps")]
    InvalidRange { base: u64, len: u64 },
}

struct Range {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (I/O ports or MMIO). Ranges can be added and removed
/// while vCPUs run (a guest moving a PCI BAR).
pub struct Bus {
    name: &'static str,
    ranges: RwLock<BTreeMap<u64, Range>>,
    unhandled: AtomicU64,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ranges: RwLock::new(BTreeMap::new()),
            unhandled: AtomicU64::new(0),
        }
    }

    /// Maps `[base, base + len)` to `dev`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let before = ranges.range(..end).next_back();
        if before.is_some_and(|(b, r)| b + r.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, Range { len, dev });
        Ok(())
    }

    /// Unmaps the range starting at `base`; returns its device.
    pub fn remove(&self, base: u64) -> Option<Arc<Mutex<dyn BusDevice>>> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).map(|r| r.dev)
    }

    /// The device and offset for an access, if one is mapped there.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, r) = ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off + size as u64 <= r.len).then(|| (off, r.dev.clone()))
    }

    /// Dispatches a read; unmapped addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((off, dev)) => lock(&dev).read(off, data),
            None => {
                data.fill(0xff);
                self.miss(addr, "read");
            }
        }
    }

    /// Dispatches a write; writes to unmapped addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((off, dev)) => lock(&dev).write(off, data),
            None => self.miss(addr, "write"),
        }
    }

    /// Accesses that hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn miss(&self, addr: u64, what: &str) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        // The guest controls this: log the first few, then every 4096th.
        if n < 8 || n % 4096 == 0 {
            tracing::debug!(
                bus = self.name,
                addr,
                what,
                count = n + 1,
                "unhandled access"
            );
        }
    }
}

/// Locks a device, carrying on if a vCPU thread panicked while holding it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let bus = Bus::new("pio");
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(0x3f8, &[7]);
        assert_eq!(lock(&dev).0, vec![(0, vec![7])]);
    }

    #[test]
    fn unmapped_reads_are_all_ones_and_counted() {
        let bus = Bus::new("mmio");
        let mut b = [0u8; 4];
        bus.read(0x1000, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(bus.unhandled(), 1);
    }

    #[test]
    fn access_straddling_the_end_is_unhandled() {
        let bus = Bus::new("pio");
        bus.insert(0x60, 1, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        let mut b = [0u8; 2];
        bus.read(0x60, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let bus = Bus::new("pio");
        let d = || Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x10, 0x10, d()).unwrap();
        assert!(bus.insert(0x18, 4, d()).is_err());
        assert!(bus.insert(0x8, 0x9, d()).is_err());
        assert!(bus.insert(0x20, 4, d()).is_ok());
        assert!(bus.insert(0x0, 0, d()).is_err());
    }
}
