//! Virtio devices as the guest sees them: the virtio-pci transport in this
//! process, the device half behind the [`VirtioDevice`] trait (a vhost-user
//! frontend, whose backend is another process).

pub mod pci;

use vmm_sys_util::eventfd::EventFd;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Feature bits the transport itself knows about.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_RING_PACKED: u64 = 1 << 34;
pub const F_NOTIFICATION_DATA: u64 = 1 << 38;
pub const F_RING_RESET: u64 = 1 << 40;

/// Device type IDs.
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// Why a device could not start (the transport then reports NEEDS_RESET).
pub type ActivateError = Box<dyn std::error::Error + Send + Sync>;

/// A queue as the driver set it up, with the eventfds wired to it.
pub struct ActiveQueue<'a> {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Signalled by KVM (ioeventfd) when the guest notifies the queue.
    pub kick: &'a EventFd,
    /// Raises the queue's interrupt (an MSI-X irqfd).
    pub call: &'a EventFd,
}

/// The device half of a virtio device.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Number of queues and the largest size of each.
    fn queue_max_size(&self) -> u16;
    fn num_queues(&self) -> usize;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving `queues` with `features`.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue]) -> Result<(), ActivateError>;
    /// The transport was restored from saved state with the driver running
    /// (DRIVER_OK): serve `queues` with `features`, carrying on from where
    /// the rings are in the restored guest memory, not from index 0. The
    /// default treats this as a fresh activation, which suits a device
    /// that keeps no position of its own; one that does (a vhost-user
    /// frontend: `SET_VRING_BASE` to the used index in guest memory, not
    /// 0) must override it.
    fn restore_activated(
        &mut self,
        features: u64,
        queues: &[ActiveQueue],
    ) -> Result<(), ActivateError> {
        self.activate(features, queues)
    }
    /// The driver reset the device: stop serving the queues.
    fn reset(&mut self);
    /// The VM pauses: stop touching guest memory and the queues until
    /// [`Self::resume`]. Requests already taken complete first.
    fn pause(&mut self) {}
    /// The VM resumes: serve the queues again from where they stopped.
    fn resume(&mut self) {}
    /// The paused device's backend state for a snapshot, if it keeps one
    /// outside guest memory (a vhost-user backend with DEVICE_STATE).
    fn save_backend_state(&mut self) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    /// Starts (`Some`) or stops the logging of the device's own writes to
    /// guest memory, for a migration; an error if it cannot log them.
    fn set_dirty_log(&mut self, _log: Option<crate::vhost_user::LogShare>) -> Result<(), String> {
        Ok(())
    }
    /// Moves the device to another backend while the guest runs.
    fn swap_backend(&mut self, _socket: std::path::PathBuf) -> Result<(), String> {
        Err("This device has no backend to move".into())
    }
    /// Hands the device's backend over to another VMM (its rings stopped).
    fn detach_backend(&mut self) {}
    /// Takes the backend back after [`Self::detach_backend`], loading
    /// `state` into it.
    fn reattach_backend(&mut self, _state: Option<Vec<u8>>) {}
}
