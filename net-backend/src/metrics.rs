//! Per-queue net counters: frames and bytes, drops by reason. They live in
//! the device, so they survive frontend reconnects.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a frame or chain was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The descriptor chain is malformed (loops, bad indirect, wrong direction).
    BadChain,
    /// The chain is too short for the header, or the header is invalid.
    BadHeader,
    /// The frame is over the MTU (or 64 KiB with GSO).
    Oversize,
    /// A buffer lies outside guest memory.
    BadAddress,
    /// The tap refused the frame.
    TapError,
    /// No RX buffers large enough for the frame.
    NoBuffers,
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct NetQueueMetrics {
    /// Frames moved (TX: to the tap; RX: into the guest).
    pub frames: AtomicU64,
    /// Bytes moved, headers excluded.
    pub bytes: AtomicU64,
    /// Dropped: malformed chain.
    pub drop_bad_chain: AtomicU64,
    /// Dropped: bad or short virtio-net header.
    pub drop_bad_header: AtomicU64,
    /// Dropped: over the MTU.
    pub drop_oversize: AtomicU64,
    /// Dropped: address outside guest memory.
    pub drop_bad_address: AtomicU64,
    /// Dropped: tap error.
    pub drop_tap_error: AtomicU64,
    /// Dropped: no room in the guest's RX buffers.
    pub drop_no_buffers: AtomicU64,
}

/// A plain copy of [`NetQueueMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetQueueSnapshot {
    /// See [`NetQueueMetrics::frames`].
    pub frames: u64,
    /// See [`NetQueueMetrics::bytes`].
    pub bytes: u64,
    /// See [`NetQueueMetrics::drop_bad_chain`].
    pub drop_bad_chain: u64,
    /// See [`NetQueueMetrics::drop_bad_header`].
    pub drop_bad_header: u64,
    /// See [`NetQueueMetrics::drop_oversize`].
    pub drop_oversize: u64,
    /// See [`NetQueueMetrics::drop_bad_address`].
    pub drop_bad_address: u64,
    /// See [`NetQueueMetrics::drop_tap_error`].
    pub drop_tap_error: u64,
    /// See [`NetQueueMetrics::drop_no_buffers`].
    pub drop_no_buffers: u64,
}

impl NetQueueSnapshot {
    /// Drops of every reason.
    pub fn drops(&self) -> u64 {
        self.drop_bad_chain
            + self.drop_bad_header
            + self.drop_oversize
            + self.drop_bad_address
            + self.drop_tap_error
            + self.drop_no_buffers
    }
}

impl NetQueueMetrics {
    /// Counts one frame of `bytes` bytes.
    pub fn frame(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts one drop.
    pub fn dropped(&self, why: DropReason) {
        let c = match why {
            DropReason::BadChain => &self.drop_bad_chain,
            DropReason::BadHeader => &self.drop_bad_header,
            DropReason::Oversize => &self.drop_oversize,
            DropReason::BadAddress => &self.drop_bad_address,
            DropReason::TapError => &self.drop_tap_error,
            DropReason::NoBuffers => &self.drop_no_buffers,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> NetQueueSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetQueueSnapshot {
            frames: l(&self.frames),
            bytes: l(&self.bytes),
            drop_bad_chain: l(&self.drop_bad_chain),
            drop_bad_header: l(&self.drop_bad_header),
            drop_oversize: l(&self.drop_oversize),
            drop_bad_address: l(&self.drop_bad_address),
            drop_tap_error: l(&self.drop_tap_error),
            drop_no_buffers: l(&self.drop_no_buffers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_drop_reason_has_its_counter() {
        let m = NetQueueMetrics::default();

        m.dropped(DropReason::Oversize);
        m.dropped(DropReason::NoBuffers);
        m.frame(60);

        let s = m.snapshot();
        assert_eq!((s.drop_oversize, s.drop_no_buffers, s.drops()), (1, 1, 2));
        assert_eq!((s.frames, s.bytes), (1, 60));
    }
}
