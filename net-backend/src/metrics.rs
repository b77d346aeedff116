//! Per-queue net counters: frames and bytes, drops by reason. They live in
//! the device, so they survive frontend reconnects. [`NetCounters`] serves
//! them, with the generic queue counters, to the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use backends::counters::{CounterSource, Counters, Metric, MetricKind, QueueCounters, Sample};
use backends::QueueMetrics;

use crate::device::{NetDevice, QueueKind};

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

static RX_FRAMES: Metric =
    Metric::counter("rx_frames", "Frames delivered into the guest's RX buffers.");
static RX_BYTES: Metric = Metric::counter(
    "rx_bytes",
    "Bytes delivered to the guest, headers excluded.",
);
static TX_FRAMES: Metric =
    Metric::counter("tx_frames", "Frames the guest sent, written to the tap.");
static TX_BYTES: Metric = Metric::counter("tx_bytes", "Bytes the guest sent, headers excluded.");
static CTRL_COMMANDS: Metric = Metric::counter("ctrl_commands", "Control queue commands answered.");
static DROPPED: Metric = Metric {
    name: "dropped_frames",
    help: "Frames or chains dropped, by reason.",
    kind: MetricKind::Counter,
    label: Some("reason"),
};
static CHAINS: Metric =
    Metric::counter("chains", "Descriptor chains taken from the available ring.");
static NOTIFICATIONS: Metric = Metric::counter(
    "notifications",
    "Used-ring notifications sent to the frontend.",
);
static IN_FLIGHT: Metric =
    Metric::gauge("in_flight", "Descriptor chains taken and not yet returned.");
static CTRL_QUEUE_PAIRS: Metric = Metric::gauge(
    "ctrl_queue_pairs",
    "Queue pairs in use as the driver set them (0: not set, one pair).",
);
static CTRL_RX_MODE: Metric = Metric::gauge(
    "ctrl_rx_mode",
    "RX mode bits the driver set (promisc 1, allmulti 2, alluni 4, nomulti 8, nouni 16, nobcast 32).",
);
static CTRL_MAC_FILTERS: Metric = Metric::gauge(
    "ctrl_mac_filters",
    "Unicast and multicast MAC filter entries the driver set.",
);

/// The net device's counters and the server's generic per-queue ones (see
/// [`backends::server::Server::metrics_handle`]), as `vmm_net_*` metrics.
/// Every queue has every field; the RX, TX or control ones of the other
/// kinds stay 0.
pub struct NetCounters {
    device: Arc<NetDevice>,
    queues: Arc<Vec<Arc<QueueMetrics>>>,
}

impl NetCounters {
    /// Counters of `device` and the server's `queues`.
    pub fn new(device: Arc<NetDevice>, queues: Arc<Vec<Arc<QueueMetrics>>>) -> Self {
        NetCounters { device, queues }
    }
}

/// One queue's samples, `kind` telling which direction its frames count
/// for; `generic` is the queue's chains, notifications and chains in
/// flight; `settings` the control queue's settings (pairs in use, RX mode, MAC
/// filter entries), shown on the control queue only.
pub fn queue_samples(
    kind: QueueKind,
    net: &NetQueueSnapshot,
    generic: [u64; 3],
    settings: [u64; 3],
) -> Vec<Sample> {
    let (rx, tx, ctrl) = match kind {
        QueueKind::Rx(_) => ((net.frames, net.bytes), (0, 0), 0),
        QueueKind::Tx(_) => ((0, 0), (net.frames, net.bytes), 0),
        QueueKind::Ctrl => ((0, 0), (0, 0), net.frames),
    };
    let [chains, notifications, in_flight] = generic;
    let [pairs, rx_mode, mac_filters] = match kind {
        QueueKind::Ctrl => settings,
        _ => [0; 3],
    };
    vec![
        Sample::new(&RX_FRAMES, rx.0),
        Sample::new(&RX_BYTES, rx.1),
        Sample::new(&TX_FRAMES, tx.0),
        Sample::new(&TX_BYTES, tx.1),
        Sample::new(&CTRL_COMMANDS, ctrl),
        Sample::labelled(&DROPPED, "bad_chain", net.drop_bad_chain),
        Sample::labelled(&DROPPED, "bad_header", net.drop_bad_header),
        Sample::labelled(&DROPPED, "oversize", net.drop_oversize),
        Sample::labelled(&DROPPED, "bad_address", net.drop_bad_address),
        Sample::labelled(&DROPPED, "tap_error", net.drop_tap_error),
        Sample::labelled(&DROPPED, "no_buffers", net.drop_no_buffers),
        Sample::new(&CHAINS, chains),
        Sample::new(&NOTIFICATIONS, notifications),
        Sample::new(&IN_FLIGHT, in_flight),
        Sample::new(&CTRL_QUEUE_PAIRS, pairs),
        Sample::new(&CTRL_RX_MODE, rx_mode),
        Sample::new(&CTRL_MAC_FILTERS, mac_filters),
    ]
}

impl CounterSource for NetCounters {
    fn counters(&self) -> Counters {
        let c = self.device.ctrl_settings();
        let ctrl = [
            u64::from(c.queue_pairs),
            u64::from(c.rx_mode),
            (c.unicast.len() + c.multicast.len()) as u64,
        ];
        let queues = self
            .device
            .metrics()
            .iter()
            .enumerate()
            .map(|(queue, net)| {
                let generic = self.queues.get(queue).map_or([0; 3], |m| {
                    let s = m.snapshot();
                    [s.requests, s.notifications, s.in_flight]
                });
                let kind = self.device.kind(queue);
                QueueCounters {
                    queue,
                    kind: Some(match kind {
                        QueueKind::Rx(_) => "rx",
                        QueueKind::Tx(_) => "tx",
                        QueueKind::Ctrl => "ctrl",
                    }),
                    samples: queue_samples(kind, net, generic, ctrl),
                }
            })
            .collect();
        Counters {
            device: "net",
            queues,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_queue_frames_count_as_tx_and_drops_carry_their_reason() {
        let net = NetQueueMetrics::default();
        net.frame(1000);
        net.dropped(DropReason::BadChain);

        let s = queue_samples(QueueKind::Tx(0), &net.snapshot(), [2, 1, 0], [2, 1, 3]);

        let get = |name: &str, label: &str| {
            s.iter()
                .find(|x| x.metric.name == name && x.label_value == label)
                .map(|x| x.value)
        };
        assert_eq!(
            (
                get("tx_frames", ""),
                get("tx_bytes", ""),
                get("rx_frames", "")
            ),
            (Some(1), Some(1000), Some(0))
        );
        assert_eq!(get("dropped_frames", "bad_chain"), Some(1));
        assert_eq!(get("chains", ""), Some(2));
        assert_eq!(get("ctrl_queue_pairs", ""), Some(0));
    }

    #[test]
    fn control_queue_shows_the_driver_settings() {
        let net = NetQueueMetrics::default();

        let s = queue_samples(QueueKind::Ctrl, &net.snapshot(), [0; 3], [2, 1, 3]);

        let get = |name: &str| s.iter().find(|x| x.metric.name == name).map(|x| x.value);
        assert_eq!(
            (
                get("ctrl_queue_pairs"),
                get("ctrl_rx_mode"),
                get("ctrl_mac_filters")
            ),
            (Some(2), Some(1), Some(3))
        );
    }

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
