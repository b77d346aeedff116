//! What a device plugs into the generic vhost-user layer.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestAddress;

use crate::dirty_log::DirtyLogger;
use crate::memory::GuestMemRef;
use crate::metrics::QueueMetrics;
use crate::uring::Uring;

/// A finished request: the chain head and the bytes written into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Bytes the device wrote into the chain's buffers.
    pub len: u32,
}

/// Fills `buf` with `config` from `offset` on, zeros past its end: what
/// [`Device::read_config`] answers for a config space held as bytes.
pub fn read_config_bytes(config: &[u8], offset: u32, buf: &mut [u8]) {
    let start = (offset as usize).min(config.len());
    let n = (config.len() - start).min(buf.len());
    buf[..n].copy_from_slice(&config[start..start + n]);
    buf[n..].fill(0);
}

/// The device model a backend daemon serves.
pub trait Device: Send + Sync + 'static {
    /// Number of virtqueues offered.
    fn num_queues(&self) -> usize;
    /// Largest queue size accepted.
    fn max_queue_size(&self) -> u16;
    /// Virtio feature bits offered (the vhost-user layer adds PROTOCOL_FEATURES
    /// and LOG_ALL, and never passes LOG_ALL on).
    fn features(&self) -> u64;
    /// vhost-user protocol features handled (REPLY_ACK is added by the
    /// protocol layer, LOG_SHMFD by the vhost-user layer).
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// Fills `buf` with config space bytes starting at `offset` (zeros past the end).
    fn read_config(&self, offset: u32, buf: &mut [u8]);
    /// Builds the request processor for one queue; called in the control
    /// thread each time the queue starts. The processor marks every byte it
    /// writes to guest memory (data, status, headers) in `dirty` once the
    /// write is done and before it reports the request finished (see
    /// [`crate::dirty_log`]); the used ring is the vhost-user layer's.
    fn queue_handler(
        &self,
        queue_index: usize,
        metrics: Arc<QueueMetrics>,
        dirty: DirtyLogger,
    ) -> io::Result<Box<dyn QueueHandler>>;
    /// The virtio features the driver accepted (SET_FEATURES, without the
    /// vhost-user bit), before any queue starts.
    fn set_acked_features(&self, _features: u64) -> io::Result<()> {
        Ok(())
    }
    /// How many leading queues to enable at SET_FEATURES when the frontend
    /// has not enabled any itself. QEMU's vhost-user net enables queue pair 0
    /// with SET_VRING_ENABLE *before* SET_FEATURES, which the vhost crate
    /// refuses, and with one queue pair never again; a net device answers 2.
    fn queues_enabled_at_features(&self) -> usize {
        0
    }
    /// Called when a frontend has gone, after the generic metrics are logged.
    fn disconnected(&self) {}
    /// Names the device type in a saved state, so that one type's state is
    /// never loaded into another.
    fn state_kind(&self) -> &'static str {
        "device"
    }
    /// The device's own part of a saved state (SET_DEVICE_STATE_FD, SAVE),
    /// taken with every queue stopped. The device versions its bytes itself.
    fn save_state(&self) -> io::Result<Vec<u8>> {
        Ok(Vec::new())
    }
    /// Checks `state` (from [`Self::save_state`] of a device of the same
    /// kind, possibly in another process) against this device and applies
    /// it, with every queue stopped. On error nothing has changed.
    fn load_state(&self, _state: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// Per-queue request processing, driven by the queue's worker thread.
pub trait QueueHandler: Send {
    /// Eventfd the worker polls for completions, if the handler is asynchronous.
    fn completion_fd(&self) -> Option<RawFd>;
    /// Starts the request whose chain begins at `head`. Returns the used
    /// length when the request finished at once (including every malformed one).
    fn start(
        &mut self,
        mem: &GuestMemRef,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Option<u32>;
    /// Hands the requests started since the last call to storage in one batch.
    fn submit(&mut self);
    /// Appends finished requests to `done`.
    fn reap(&mut self, done: &mut Vec<Used>);
    /// True if [`Self::reap`] would find something, checked without a system
    /// call. The default, false, leaves completions to the eventfd wake-up.
    /// The worker asks after every [`Self::submit`], before it sleeps, so a
    /// request finished inside `start` or `submit` and reported here needs
    /// no eventfd write.
    fn has_completions(&mut self) -> bool {
        false
    }
    /// The io_uring the handler's requests complete on, if the worker may
    /// sleep in it: the worker then watches its kick and stop eventfds
    /// through the ring ([`Uring::watch`]) and waits in `io_uring_enter`
    /// instead of epoll, and [`Self::reap`] must reap that ring (which is how
    /// the worker learns that a watched fd fired). The default, `None`, keeps
    /// the epoll loop over [`Self::completion_fd`].
    fn uring(&mut self) -> Option<&mut Uring> {
        None
    }
    /// Requests started and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Blocks until a completion can be reaped.
    fn wait(&mut self);
    /// On stop, after the drain: the heads started but never to be used
    /// (the newest taken, in the order taken), which the worker gives back
    /// to the available ring. The default gives back none: every started
    /// request completes.
    fn unused(&mut self) -> Vec<u16> {
        Vec::new()
    }
}
