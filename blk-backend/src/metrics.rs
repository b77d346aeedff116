//! The disk's counters for the metrics endpoint: the generic per-queue
//! [`QueueMetrics`] the server keeps (shared with every frontend connection)
//! as `vmm_blk_*` metrics.

use std::sync::Arc;

use backends::counters::{CounterSource, Counters, Metric, QueueCounters, Sample};
use backends::QueueMetrics;

static REQUESTS: Metric = Metric::counter("requests", "Requests taken from the available ring.");
static READ_BYTES: Metric =
    Metric::counter("read_bytes", "Bytes read from storage into guest memory.");
static WRITE_BYTES: Metric =
    Metric::counter("write_bytes", "Bytes written from guest memory to storage.");
static ERRORS: Metric = Metric::counter("errors", "Requests completed with an error status.");
static NOTIFICATIONS: Metric = Metric::counter(
    "notifications",
    "Used-ring notifications sent to the frontend.",
);
static READ_REQUESTS: Metric =
    Metric::counter("read_requests", "Read requests completed by storage.");
static WRITE_REQUESTS: Metric =
    Metric::counter("write_requests", "Write requests completed by storage.");
static FLUSH_REQUESTS: Metric =
    Metric::counter("flush_requests", "Flush requests completed by storage.");
static READ_TIME: Metric = Metric::counter(
    "read_time_ns",
    "Nanoseconds read requests spent in storage, summed.",
);
static WRITE_TIME: Metric = Metric::counter(
    "write_time_ns",
    "Nanoseconds write requests spent in storage, summed.",
);
static FLUSH_TIME: Metric = Metric::counter(
    "flush_time_ns",
    "Nanoseconds flush requests spent in storage, summed.",
);
static IN_FLIGHT: Metric = Metric::gauge("in_flight", "Requests taken and not yet completed.");

/// Reads the server's per-queue counters (see
/// [`backends::server::Server::metrics_handle`]).
pub struct BlkCounters {
    queues: Arc<Vec<Arc<QueueMetrics>>>,
}

impl BlkCounters {
    /// Counters over the server's per-queue metrics.
    pub fn new(queues: Arc<Vec<Arc<QueueMetrics>>>) -> Self {
        BlkCounters { queues }
    }
}

impl CounterSource for BlkCounters {
    fn counters(&self) -> Counters {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(queue, m)| {
                let s = m.snapshot();
                QueueCounters {
                    queue,
                    kind: None,
                    samples: vec![
                        Sample::new(&REQUESTS, s.requests),
                        Sample::new(&READ_BYTES, s.read_bytes),
                        Sample::new(&WRITE_BYTES, s.write_bytes),
                        Sample::new(&ERRORS, s.errors),
                        Sample::new(&NOTIFICATIONS, s.notifications),
                        Sample::new(&IN_FLIGHT, s.in_flight),
                        Sample::new(&READ_REQUESTS, s.read_requests),
                        Sample::new(&WRITE_REQUESTS, s.write_requests),
                        Sample::new(&FLUSH_REQUESTS, s.flush_requests),
                        Sample::new(&READ_TIME, s.read_time_ns),
                        Sample::new(&WRITE_TIME, s.write_time_ns),
                        Sample::new(&FLUSH_TIME, s.flush_time_ns),
                    ],
                }
            })
            .collect();
        Counters {
            device: "blk",
            queues,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_queue_reports_its_own_atomics() {
        let queues: Vec<Arc<QueueMetrics>> = (0..2).map(|_| Arc::default()).collect();
        QueueMetrics::add(&queues[1].write_bytes, 4096);
        QueueMetrics::add(&queues[1].in_flight, 2);

        let c = BlkCounters::new(Arc::new(queues)).counters();

        let q1: Vec<_> = c.queues[1]
            .samples
            .iter()
            .map(|s| (s.metric.name, s.value))
            .collect();
        assert_eq!(c.device, "blk");
        assert_eq!(
            q1,
            [
                ("requests", 0),
                ("read_bytes", 0),
                ("write_bytes", 4096),
                ("errors", 0),
                ("notifications", 0),
                ("in_flight", 2),
                ("read_requests", 0),
                ("write_requests", 0),
                ("flush_requests", 0),
                ("read_time_ns", 0),
                ("write_time_ns", 0),
                ("flush_time_ns", 0)
            ]
        );
    }
}
