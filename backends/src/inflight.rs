//! Inflight I/O tracking in a memfd shared with the frontend
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split virtqueue layout from the
//! vhost-user specification:
//!
//! ```text
//! per queue (aligned to 64 bytes):
//!   u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//!   DescStateSplit desc[desc_num] { u8 inflight; u8 pad[5]; u16 next; u64 counter; }
//! ```
//!
//! The frontend keeps the memfd across backend restarts and hands it to the
//! new backend with SET_INFLIGHT_FD; the new backend resubmits every entry
//! still marked in flight, oldest first.

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::memory::{memfd_create, MemoryError};

const HEADER: usize = 16;
const DESC_STATE: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;

/// Errors of the inflight region.
#[derive(Debug, Error)]
pub enum InflightError {
    /// The memfd could not be created or sized.
    #[error("Cannot create the inflight memfd")]
    Create(#[source] MemoryError),
    /// Sizing the memfd failed.
    #[error("Cannot size the inflight memfd")]
    Truncate(#[source] std::io::Error),
    /// Mapping failed.
    #[error("Cannot map the inflight region")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// The frontend's region does not fit the queues.
    #[error("Inflight region too small: {0} bytes")]
    TooSmall(u64),
    /// The queue size is zero.
    #[error("Invalid inflight queue size {0}")]
    QueueSize(u16),
}

/// Bytes of the region used by one queue of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * queue_size as usize).div_ceil(ALIGN) * ALIGN
}

/// The mapped inflight region of all queues.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Creates a zeroed region for GET_INFLIGHT_FD; returns it and its memfd.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        if queue_size == 0 {
            return Err(InflightError::QueueSize(queue_size));
        }
        let size = queue_region_size(queue_size) * num_queues as usize;
        let file = memfd_create("vhost-inflight").map_err(InflightError::Create)?;
        file.set_len(size as u64).map_err(InflightError::Truncate)?;
        let region = Self::map(&file, 0, size as u64, num_queues, queue_size)?;
        for q in 0..num_queues as usize {
            let base = q * queue_region_size(queue_size);
            region.put(base + OFF_VERSION, VERSION);
            region.put(base + OFF_DESC_NUM, queue_size);
        }
        Ok((region, file))
    }

    /// Maps the region received with SET_INFLIGHT_FD.
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        if queue_size == 0 {
            return Err(InflightError::QueueSize(queue_size));
        }
        let needed = queue_region_size(queue_size) as u64 * u64::from(num_queues);
        if size < needed || needed == 0 {
            return Err(InflightError::TooSmall(size));
        }
        let file = file.try_clone().map_err(InflightError::Truncate)?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
            .map_err(InflightError::Mmap)?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Total mapped size in bytes.
    pub fn size(&self) -> u64 {
        self.map.size() as u64
    }

    /// Number of queues in the region.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue size the region was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn put<T: vm_memory::ByteValued>(&self, off: usize, val: T) {
        // Offsets are computed from validated queue/descriptor indices.
        let _ = self.map.as_volatile_slice().write_obj(val, off);
    }

    fn get<T: vm_memory::ByteValued + Default>(&self, off: usize) -> T {
        self.map
            .as_volatile_slice()
            .read_obj(off)
            .unwrap_or_default()
    }

    /// The tracking view of queue `index`, if the region has one.
    pub fn queue(self: &Arc<Self>, index: usize) -> Option<InflightQueue> {
        (index < self.num_queues as usize).then(|| InflightQueue {
            region: self.clone(),
            base: index * queue_region_size(self.queue_size),
            size: self.queue_size,
            counter: 1,
        })
    }
}

/// Inflight tracking of one queue.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
    size: u16,
    counter: u64,
}

impl InflightQueue {
    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.size).then(|| self.base + HEADER + head as usize * DESC_STATE)
    }

    /// Marks `head` as taken from the available ring.
    pub fn start(&mut self, head: u16) {
        if let Some(d) = self.desc(head) {
            self.region.put(d + 8, self.counter);
            self.counter += 1;
            self.region.put(d, 1u8);
        }
    }

    /// Undoes [`Self::start`] for a head given back to the available ring
    /// unused (the ring is rewound over it).
    pub fn abandon(&mut self, head: u16) {
        if let Some(d) = self.desc(head) {
            self.region.put(d, 0u8);
        }
    }

    /// First half of completing `head`: link it into the last batch. Call
    /// before publishing it in the used ring.
    pub fn complete_begin(&mut self, head: u16) {
        if let Some(d) = self.desc(head) {
            let last: u16 = self.region.get(self.base + OFF_LAST_BATCH_HEAD);
            self.region.put(d + 6, last);
            self.region.put(self.base + OFF_LAST_BATCH_HEAD, head);
        }
    }

    /// Second half of completing `head`, after the used ring index became `used_idx`.
    pub fn complete_end(&mut self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            self.region.put(d, 0u8);
            self.region.put(self.base + OFF_USED_IDX, used_idx);
        }
    }

    /// Number of descriptors currently marked in flight.
    pub fn count(&self) -> usize {
        (0..self.size)
            .filter_map(|h| self.desc(h))
            .filter(|&d| self.region.get::<u8>(d) == 1)
            .count()
    }

    /// Repairs the last batch against the used ring index the guest sees and
    /// returns the heads still in flight, oldest first.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        let used_idx: u16 = self.region.get(self.base + OFF_USED_IDX);
        let mut batch = ring_used_idx.wrapping_sub(used_idx);
        let mut head: u16 = self.region.get(self.base + OFF_LAST_BATCH_HEAD);
        while batch > 0 {
            let Some(d) = self.desc(head) else { break };
            self.region.put(d, 0u8);
            head = self.region.get(d + 6);
            batch -= 1;
        }
        self.region.put(self.base + OFF_USED_IDX, ring_used_idx);
        let mut pending: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|h| {
                let d = self.desc(h)?;
                let inflight: u8 = self.region.get(d);
                (inflight == 1).then(|| (self.region.get::<u64>(d + 8), h))
            })
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(1, |(c, _)| c + 1);
        pending.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> InflightQueue {
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        Arc::new(region).queue(0).unwrap()
    }

    #[test]
    fn started_heads_are_recovered_oldest_first() {
        let mut q = queue();
        q.start(5);
        q.start(2);
        q.start(7);

        assert_eq!(q.recover(0), vec![5, 2, 7]);
    }

    #[test]
    fn completed_heads_are_not_recovered() {
        let mut q = queue();
        q.start(1);
        q.start(2);
        q.complete_begin(1);
        q.complete_end(1, 1);

        assert_eq!(q.recover(1), vec![2]);
    }

    #[test]
    fn completion_published_but_not_recorded_is_repaired() {
        let mut q = queue();
        q.start(3);
        q.start(4);
        q.complete_begin(3);
        // Crash here: the used ring already shows head 3 (idx 1), the region does not.

        assert_eq!(q.recover(1), vec![4]);
    }

    #[test]
    fn region_too_small_for_queues_is_rejected() {
        let (region, file) = InflightRegion::create(1, 8).unwrap();

        let err = InflightRegion::map(&file, 0, region.size(), 2, 8).unwrap_err();

        assert!(matches!(err, InflightError::TooSmall(_)));
    }
}
