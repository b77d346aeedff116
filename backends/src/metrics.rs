//! Per-queue counters, shared between a worker thread and whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for one virtqueue. They live across frontend connections.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Requests taken from the available ring.
    pub requests: AtomicU64,
    /// Bytes read from storage into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to storage.
    pub write_bytes: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Requests currently in flight (a gauge).
    pub in_flight: AtomicU64,
    /// Used-ring notifications sent to the frontend.
    pub notifications: AtomicU64,
    /// Read requests completed by storage.
    pub read_requests: AtomicU64,
    /// Write requests completed by storage.
    pub write_requests: AtomicU64,
    /// Flush requests completed by storage.
    pub flush_requests: AtomicU64,
    /// Time read requests spent from submission to completion, in nanoseconds.
    pub read_time_ns: AtomicU64,
    /// Time write requests spent from submission to completion, in nanoseconds.
    pub write_time_ns: AtomicU64,
    /// Time flush requests spent from submission to completion, in nanoseconds.
    pub flush_time_ns: AtomicU64,
}

/// A plain copy of [`QueueMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueMetricsSnapshot {
    /// See [`QueueMetrics::requests`].
    pub requests: u64,
    /// See [`QueueMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`QueueMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`QueueMetrics::errors`].
    pub errors: u64,
    /// See [`QueueMetrics::in_flight`].
    pub in_flight: u64,
    /// See [`QueueMetrics::notifications`].
    pub notifications: u64,
    /// See [`QueueMetrics::read_requests`].
    pub read_requests: u64,
    /// See [`QueueMetrics::write_requests`].
    pub write_requests: u64,
    /// See [`QueueMetrics::flush_requests`].
    pub flush_requests: u64,
    /// See [`QueueMetrics::read_time_ns`].
    pub read_time_ns: u64,
    /// See [`QueueMetrics::write_time_ns`].
    pub write_time_ns: u64,
    /// See [`QueueMetrics::flush_time_ns`].
    pub flush_time_ns: u64,
}

impl QueueMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge.
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> QueueMetricsSnapshot {
        QueueMetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            notifications: self.notifications.load(Ordering::Relaxed),
            read_requests: self.read_requests.load(Ordering::Relaxed),
            write_requests: self.write_requests.load(Ordering::Relaxed),
            flush_requests: self.flush_requests.load(Ordering::Relaxed),
            read_time_ns: self.read_time_ns.load(Ordering::Relaxed),
            write_time_ns: self.write_time_ns.load(Ordering::Relaxed),
            flush_time_ns: self.flush_time_ns.load(Ordering::Relaxed),
        }
    }
}
