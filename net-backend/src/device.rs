//! The virtio-net device: features, config space, and the processor of
//! each queue (RX 2k, TX 2k+1 on tap queue k; the control queue last).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backends::{Device, DirtyLogger, QueueHandler, QueueMetrics};
use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::config::MacAddr;
use crate::event_handler::ctrl::{CtrlQueue, CtrlSettings};
use crate::event_handler::rx::{RxFormat, RxQueue};
use crate::event_handler::tx::{TxLimits, TxQueue};
use crate::metrics::{NetQueueMetrics, NetQueueSnapshot};
use crate::state::{NetState, KIND, NET_STATE_VERSION};
use crate::tap::{Tap, TapError};
use crate::vnet::{features, hdr_len, offload_features, tun_offload_for};

/// Size of the config space we fill: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;
/// VIRTIO_NET_S_LINK_UP.
pub const S_LINK_UP: u16 = 1;

/// Device options.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// MAC address in config space.
    pub mac: MacAddr,
    /// MTU in config space.
    pub mtu: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Offer checksum/segmentation offloads.
    pub offloads: bool,
    /// Offer mergeable RX buffers.
    pub mrg_rxbuf: bool,
}

/// The kind of a queue, from its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// Receive queue of pair `n`.
    Rx(usize),
    /// Transmit queue of pair `n`.
    Tx(usize),
    /// The control queue.
    Ctrl,
}

/// A virtio-net device over a multi-queue tap.
pub struct NetDevice {
    tap: Tap,
    opts: NetOptions,
    metrics: Vec<Arc<NetQueueMetrics>>,
    acked: AtomicU64,
    /// What the driver set through the control queue; the control queue
    /// worker, the metrics endpoint and state save/load take it briefly.
    ctrl: Arc<Mutex<CtrlSettings>>,
}

impl NetDevice {
    /// A device over `tap` (one tap queue per queue pair).
    pub fn new(tap: Tap, opts: NetOptions) -> Self {
        let metrics = (0..tap.num_queues() * 2 + 1)
            .map(|_| Arc::default())
            .collect();
        NetDevice {
            tap,
            opts,
            metrics,
            acked: AtomicU64::new(0),
            ctrl: Arc::default(),
        }
    }

    /// Applies the features the driver acked: the tap's vnet header length
    /// and the offloads it may hand the driver. Queues started afterwards
    /// use them.
    pub fn set_acked_features(&self, acked: u64) -> Result<(), TapError> {
        let acked = acked & self.features();
        self.tap.set_vnet_hdr_len(hdr_len(acked))?;
        self.tap.set_offload(tun_offload_for(acked))?;
        self.acked.store(acked, Ordering::Release);
        tracing::info!(acked = format_args!("{acked:#x}"), "features acked");
        Ok(())
    }

    /// The features the driver acked (0 before negotiation).
    pub fn acked_features(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.tap.num_queues()
    }

    /// The kind of queue `index`.
    pub fn kind(&self, index: usize) -> QueueKind {
        if index >= self.queue_pairs() * 2 {
            QueueKind::Ctrl
        } else if index % 2 == 0 {
            QueueKind::Rx(index / 2)
        } else {
            QueueKind::Tx(index / 2)
        }
    }

    /// Per-queue net counters, by queue index.
    pub fn metrics(&self) -> Vec<NetQueueSnapshot> {
        self.metrics.iter().map(|m| m.snapshot()).collect()
    }

    /// The config space (`struct virtio_net_config` up to `mtu`).
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.opts.mac.0);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&(self.queue_pairs() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.opts.mtu.to_le_bytes());
        c
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// What the driver set through the control queue.
    pub fn ctrl_settings(&self) -> CtrlSettings {
        self.ctrl.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The device's part of a saved state.
    pub fn state(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            acked_features: self.acked_features(),
            ctrl: self.ctrl_settings(),
        }
    }

    /// Checks a saved state and applies its control queue settings.
    pub fn load(&self, bytes: &[u8]) -> io::Result<()> {
        let saved = NetState::check(bytes, self.queue_pairs() as u16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut ctrl = self
            .ctrl
            .lock()
            .map_err(|_| io::Error::other("control settings lock poisoned"))?;
        *ctrl = saved.ctrl;
        Ok(())
    }
}

impl Device for NetDevice {
    fn num_queues(&self) -> usize {
        self.queue_pairs() * 2 + 1
    }

    fn set_acked_features(&self, features: u64) -> std::io::Result<()> {
        NetDevice::set_acked_features(self, features).map_err(std::io::Error::other)
    }

    fn queues_enabled_at_features(&self) -> usize {
        2
    }

    fn state_kind(&self) -> &'static str {
        KIND
    }

    fn save_state(&self) -> io::Result<Vec<u8>> {
        self.state().to_bytes().map_err(io::Error::other)
    }

    fn load_state(&self, state: &[u8]) -> io::Result<()> {
        self.load(state)
    }

    fn disconnected(&self) {
        for (q, net) in self.metrics().iter().enumerate() {
            tracing::info!(queue = q, kind = ?self.kind(q), ?net, "net counters");
        }
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn features(&self) -> u64 {
        use features::*;
        let mut f = VERSION_1 | MAC | MTU | STATUS | CTRL_VQ | MQ | EVENT_IDX | INDIRECT_DESC;
        if self.opts.mrg_rxbuf {
            f |= MRG_RXBUF;
        }
        if self.opts.offloads {
            f |= offload_features(self.tap.offload());
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        backends::device::read_config_bytes(&self.config(), offset, buf);
    }

    /// RX and the control queue write guest memory and mark it in `dirty`;
    /// TX only reads it.
    fn queue_handler(
        &self,
        queue_index: usize,
        metrics: Arc<QueueMetrics>,
        dirty: DirtyLogger,
    ) -> io::Result<Box<dyn QueueHandler>> {
        let net = self.metrics[queue_index.min(self.metrics.len() - 1)].clone();
        let tap_queue = |pair: usize| {
            self.tap
                .queue(pair)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?
                .try_clone()
        };
        let acked = self.acked_features();
        Ok(match self.kind(queue_index) {
            QueueKind::Rx(pair) => Box::new(
                RxQueue::new(
                    tap_queue(pair)?,
                    RxFormat::for_features(acked),
                    net,
                    metrics,
                )?
                .with_dirty_log(dirty),
            ),
            QueueKind::Tx(pair) => {
                let limits = TxLimits {
                    mtu: self.opts.mtu,
                    features: acked,
                };
                Box::new(TxQueue::new(
                    tap_queue(pair)?,
                    limits,
                    self.opts.queue_size,
                    net,
                    metrics,
                )?)
            }
            QueueKind::Ctrl => Box::new(
                CtrlQueue::new(self.queue_pairs() as u16, self.ctrl.clone(), net)
                    .with_dirty_log(dirty),
            ),
        })
    }
}
