//! The virtio-blk device: features, config space, per-queue processors.

use std::io;
use std::sync::Arc;

use backends::{Device, DirtyLogger, QueueHandler, QueueMetrics};
use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::event_handler::{BlkQueue, DiskInfo};
use crate::request::{ID_LEN, SECTOR};
use crate::state::{BlkState, BLK_STATE_VERSION, KIND};
use crate::storage::Storage;

/// virtio-blk feature bits.
pub mod features {
    /// VIRTIO_BLK_F_SIZE_MAX.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// VIRTIO_BLK_F_SEG_MAX.
    pub const SEG_MAX: u64 = 1 << 2;
    /// VIRTIO_BLK_F_RO.
    pub const RO: u64 = 1 << 5;
    /// VIRTIO_BLK_F_BLK_SIZE.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// VIRTIO_BLK_F_FLUSH.
    pub const FLUSH: u64 = 1 << 9;
    /// VIRTIO_BLK_F_TOPOLOGY.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// VIRTIO_BLK_F_MQ.
    pub const MQ: u64 = 1 << 12;
    /// VIRTIO_BLK_F_DISCARD.
    pub const DISCARD: u64 = 1 << 13;
    /// VIRTIO_BLK_F_WRITE_ZEROES.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and padding.
pub const CONFIG_LEN: usize = 60;
const SIZE_MAX: u32 = 1 << 20;
const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> 9) & !7;

/// Device options.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Refuse writes and advertise VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Number of queues.
    pub queues: usize,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// GET_ID answer (truncated to 20 bytes).
    pub serial: String,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            read_only: false,
            queues: 1,
            queue_size: 1024,
            serial: String::from("blk-backend"),
        }
    }
}

/// A virtio-blk device over a [`Storage`].
pub struct BlkDevice {
    storage: Arc<dyn Storage>,
    disk: Arc<DiskInfo>,
    opts: BlkOptions,
}

impl BlkDevice {
    /// A device serving `storage`.
    pub fn new(storage: Arc<dyn Storage>, opts: BlkOptions) -> Self {
        let mut serial = [0u8; ID_LEN];
        let n = opts.serial.len().min(ID_LEN);
        serial[..n].copy_from_slice(&opts.serial.as_bytes()[..n]);
        let disk = Arc::new(DiskInfo {
            capacity: storage.capacity(),
            read_only: opts.read_only,
            serial,
            discard: storage.supports_discard(),
        });
        BlkDevice {
            storage,
            disk,
            opts,
        }
    }

    fn seg_max(&self) -> u32 {
        u32::from(self.opts.queue_size.min(128))
            .saturating_sub(2)
            .max(1)
    }

    /// The config space (`struct virtio_blk_config`).
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.disk.capacity / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&self.seg_max().to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[24] = 3; // physical_block_exp: 4 KiB physical blocks
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size
        c[34..36].copy_from_slice(&(self.opts.queues as u16).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = u8::from(self.disk.discard);
        c
    }

    /// The device's part of a saved state: the disk's identity.
    pub fn state(&self) -> BlkState {
        BlkState {
            version: BLK_STATE_VERSION,
            capacity: self.disk.capacity,
            read_only: self.disk.read_only,
            queues: self.opts.queues as u16,
            serial: self.opts.serial.clone(),
        }
    }
}

impl Device for BlkDevice {
    fn num_queues(&self) -> usize {
        self.opts.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn features(&self) -> u64 {
        use features::*;
        let mut f = VERSION_1
            | SEG_MAX
            | SIZE_MAX
            | BLK_SIZE
            | TOPOLOGY
            | FLUSH
            | MQ
            | EVENT_IDX
            | INDIRECT_DESC;
        if self.opts.read_only {
            f |= RO;
        } else {
            f |= WRITE_ZEROES;
            if self.disk.discard {
                f |= DISCARD;
            }
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        backends::device::read_config_bytes(&self.config(), offset, buf);
    }

    fn state_kind(&self) -> &'static str {
        KIND
    }

    fn save_state(&self) -> io::Result<Vec<u8>> {
        self.state().to_bytes().map_err(io::Error::other)
    }

    fn load_state(&self, state: &[u8]) -> io::Result<()> {
        // Nothing to apply: the check is the whole load.
        BlkState::check(state, &self.state())
            .map(|_| ())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    fn queue_handler(
        &self,
        _queue_index: usize,
        metrics: Arc<QueueMetrics>,
        dirty: DirtyLogger,
    ) -> io::Result<Box<dyn QueueHandler>> {
        let storage = self.storage.open_queue()?;
        let queue = BlkQueue::new(storage, self.disk.clone(), metrics).with_dirty_log(dirty);
        Ok(Box::new(queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn config_reports_capacity_in_sectors_and_queues() {
        let dev = BlkDevice::new(
            Arc::new(MemoryStorage::new(1 << 20).unwrap()),
            BlkOptions {
                queues: 3,
                ..Default::default()
            },
        );

        let c = dev.config();

        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
    }

    #[test]
    fn read_only_device_advertises_ro_and_no_discard() {
        let dev = BlkDevice::new(
            Arc::new(MemoryStorage::new(4096).unwrap()),
            BlkOptions {
                read_only: true,
                ..Default::default()
            },
        );

        let f = dev.features();

        assert_eq!((f & features::RO, f & features::DISCARD), (features::RO, 0));
    }

    #[test]
    fn config_read_past_the_end_is_zero_padded() {
        let dev = BlkDevice::new(
            Arc::new(MemoryStorage::new(4096).unwrap()),
            BlkOptions::default(),
        );
        let mut buf = [0xffu8; 8];

        dev.read_config(56, &mut buf);

        assert_eq!(buf, [1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
