//! A virtqueue as a worker owns it: the `virtio-queue` state, the call
//! eventfd, inflight tracking, metrics, and the logging of its used ring
//! writes while the frontend migrates (see [`crate::dirty_log`]).

use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::Used;
use crate::dirty_log::{DirtyLogger, UsedRingLog};
use crate::inflight::InflightQueue;
use crate::memory::GuestMem;
use crate::metrics::QueueMetrics;
use crate::ratelimit::LogLimiter;

/// The call eventfd, replaceable while the worker runs.
pub type CallFd = Arc<Mutex<Option<EventFd>>>;

/// Errors setting up a vring.
#[derive(Debug, Error)]
pub enum VringError {
    /// The frontend's vring configuration is invalid.
    #[error("Invalid vring configuration")]
    Config(#[source] virtio_queue::Error),
    /// The used ring cannot be read.
    #[error("Cannot read the used ring")]
    UsedRing(#[source] virtio_queue::Error),
}

/// Addresses and state the frontend configured for a queue.
#[derive(Clone, Copy, Debug)]
pub struct VringConfig {
    /// Queue size.
    pub size: u16,
    /// Descriptor table guest address.
    pub desc_table: GuestAddress,
    /// Available ring guest address.
    pub avail_ring: GuestAddress,
    /// Used ring guest address.
    pub used_ring: GuestAddress,
    /// First available index to process (SET_VRING_BASE).
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
}

/// A running virtqueue.
pub struct Vring {
    queue: Queue,
    call: CallFd,
    inflight: Option<InflightQueue>,
    metrics: Arc<QueueMetrics>,
    log: LogLimiter,
    dirty: DirtyLogger,
    used_log: UsedRingLog,
    /// Bytes of the used ring: flags, idx, the elements, avail_event.
    used_len: u64,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    event_idx: bool,
}

impl Vring {
    /// Builds the queue; with inflight tracking, also returns the heads to
    /// resubmit, oldest first. Used ring writes are marked in `dirty` at
    /// the address `used_log` holds, if it holds one.
    pub fn new(
        cfg: &VringConfig,
        mem: &GuestMem,
        call: CallFd,
        mut inflight: Option<InflightQueue>,
        metrics: Arc<QueueMetrics>,
        (dirty, used_log): (DirtyLogger, UsedRingLog),
    ) -> Result<(Self, Vec<u16>), VringError> {
        let mut queue = Queue::new(cfg.size).map_err(VringError::Config)?;
        queue.try_set_size(cfg.size).map_err(VringError::Config)?;
        queue
            .try_set_desc_table_address(cfg.desc_table)
            .map_err(VringError::Config)?;
        queue
            .try_set_avail_ring_address(cfg.avail_ring)
            .map_err(VringError::Config)?;
        queue
            .try_set_used_ring_address(cfg.used_ring)
            .map_err(VringError::Config)?;
        queue.set_event_idx(cfg.event_idx);
        queue.set_ready(true);
        let used = queue
            .used_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(VringError::UsedRing)?
            .0;
        queue.set_next_used(used);
        let resubmit = match inflight.as_mut() {
            Some(q) => q.recover(used),
            None => Vec::new(),
        };
        let next_avail = match inflight {
            Some(_) => used.wrapping_add(resubmit.len() as u16),
            None => cfg.next_avail,
        };
        queue.set_next_avail(next_avail);
        QueueMetrics::add(&metrics.in_flight, resubmit.len() as u64);
        Ok((
            Vring {
                queue,
                call,
                inflight,
                metrics,
                log: LogLimiter::default(),
                dirty,
                used_log,
                used_len: 6 + 8 * u64::from(cfg.size),
                event_idx: cfg.event_idx,
            },
            resubmit,
        ))
    }

    /// Size of the queue.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Descriptor table address.
    pub fn desc_table(&self) -> GuestAddress {
        GuestAddress(self.queue.desc_table())
    }

    /// Next available index to process.
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Chains the driver published that we have not taken yet; `None` if
    /// the available index is unreadable or claims more than the queue holds
    /// (a broken driver: nothing is taken until it publishes a sane index).
    fn pending(&self, mem: &GuestMem) -> Option<u16> {
        let idx = self
            .queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .ok()?;
        let pending = idx.0.wrapping_sub(self.queue.next_avail());
        (pending <= self.queue.size()).then_some(pending)
    }

    /// True if the driver published chains we have not taken yet.
    pub fn has_avail(&self, mem: &GuestMem) -> bool {
        self.pending(mem).is_some_and(|n| n > 0)
    }

    /// Takes the next available chain head and marks it in flight.
    /// Entries naming no descriptor (an index past the queue) are consumed
    /// and dropped on the way, with a rate-limited warning: nothing can be
    /// executed for them, and the used ring may not name them.
    pub fn pop(&mut self, mem: &GuestMem) -> Option<u16> {
        loop {
            // Checked here so that a bogus index costs one rate-limited
            // warning, not an error line from the queue crate on every kick.
            match self.pending(mem) {
                Some(0) => return None,
                Some(_) => {}
                None => {
                    if self.log.allow() {
                        tracing::warn!(
                            next_avail = self.queue.next_avail(),
                            suppressed = self.log.suppressed(),
                            "invalid available index, queue stalled until the driver fixes it"
                        );
                    }
                    return None;
                }
            }
            let head = self.queue.pop_descriptor_chain(mem)?.head_index();
            QueueMetrics::add(&self.metrics.requests, 1);
            if head < self.queue.size() {
                if let Some(q) = self.inflight.as_mut() {
                    q.start(head);
                }
                QueueMetrics::add(&self.metrics.in_flight, 1);
                return Some(head);
            }
            // Completing it would make virtio-queue log an unlimited error
            // line per entry.
            QueueMetrics::add(&self.metrics.errors, 1);
            if self.log.allow() {
                tracing::warn!(
                    head,
                    suppressed = self.log.suppressed(),
                    "available ring entry past the queue, dropped"
                );
            }
        }
    }

    /// Gives back the last `heads` taken (newest last) without using them:
    /// the next pops take them again. For chains a stopping queue never
    /// filled (receive buffers with no frame yet), which the driver must
    /// not see completed.
    pub fn unpop(&mut self, heads: &[u16]) {
        for &head in heads {
            if let Some(q) = self.inflight.as_mut() {
                q.abandon(head);
            }
        }
        let n = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        let next = self.queue.next_avail().wrapping_sub(n);
        self.queue.set_next_avail(next);
        QueueMetrics::sub(&self.metrics.in_flight, u64::from(n));
    }

    /// Suppresses guest notifications while draining the available ring.
    pub fn disable_notification(&mut self, mem: &GuestMem) {
        let _ = self.queue.disable_notification(mem);
        // Without EVENT_IDX this wrote the used ring's flags.
        self.log_used();
    }

    /// Asks the driver not to kick at all while the worker polls the
    /// available ring; [`Self::enable_notification`] ends it. With
    /// EVENT_IDX, [`Self::disable_notification`] leaves `avail_event` where
    /// the last enable put it, so the next chain still kicks: here it is
    /// set one behind the next available index, which no chain published
    /// from now on crosses.
    pub fn suppress_kicks(&mut self, mem: &GuestMem) {
        if !self.event_idx {
            self.disable_notification(mem);
            return;
        }
        let at = self.queue.used_ring() + 4 + 8 * u64::from(self.queue.size());
        let behind = self.queue.next_avail().wrapping_sub(1);
        let _ = mem.store(
            behind.to_le(),
            GuestAddress(at),
            std::sync::atomic::Ordering::Release,
        );
        self.log_used();
    }

    /// Re-enables notifications; true if more buffers arrived meanwhile.
    pub fn enable_notification(&mut self, mem: &GuestMem) -> bool {
        let more = self.queue.enable_notification(mem).unwrap_or(false);
        // This wrote the used ring's flags or avail_event.
        self.log_used();
        more
    }

    /// Marks the used ring's pages in the dirty log, if the frontend asked
    /// for its writes to be logged: after [`Self::complete`] (a batch of
    /// them) and whatever else wrote the ring. The whole ring, which is
    /// small, rather than the entries written.
    #[inline]
    pub fn log_used(&mut self) {
        if !self.dirty.is_active() {
            return;
        }
        if let Some(addr) = self.used_log.get() {
            self.dirty.mark(GuestAddress(addr), self.used_len);
        }
    }

    /// Publishes a finished request in the used ring; the caller logs the
    /// ring with [`Self::log_used`] after the batch.
    pub fn complete(&mut self, mem: &GuestMem, used: Used) {
        QueueMetrics::sub(&self.metrics.in_flight, 1);
        if let Some(q) = self.inflight.as_mut() {
            q.complete_begin(used.head);
        }
        if self.queue.add_used(mem, used.head, used.len).is_err() && self.log.allow() {
            tracing::warn!(
                head = used.head,
                suppressed = self.log.suppressed(),
                "cannot write used ring"
            );
        }
        if let Some(q) = self.inflight.as_mut() {
            q.complete_end(used.head, self.queue.next_used());
        }
    }

    /// Signals the call eventfd if the driver asked for it.
    pub fn notify(&mut self, mem: &GuestMem) {
        if !self.queue.needs_notification(mem).unwrap_or(true) {
            return;
        }
        if let Ok(call) = self.call.lock() {
            if let Some(fd) = call.as_ref() {
                QueueMetrics::add(&self.metrics.notifications, 1);
                let _ = fd.write(1);
            }
        }
    }
}
