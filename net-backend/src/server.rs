//! Serving frontends, like `backends::server::Server`, with two differences
//! a net device needs:
//!
//! - QEMU sends `SET_VRING_ENABLE` for the queue pairs it does not use yet
//!   *before* `SET_FEATURES` (virtio-net sets the queue pair count at reset).
//!   The `vhost` crate answers that with `InactiveFeature`, and `backends`'
//!   loop drops the frontend on any error. A request refused that way needs
//!   no reply (QEMU 7.2 does not ask for one on `SET_VRING_ENABLE`), so here
//!   it is logged and the connection goes on.
//! - The device must know the acked features (vnet header length, tap
//!   offloads, mergeable buffers); `backends`' handler keeps them to itself,
//!   so [`NetHandler`] wraps it and passes `SET_FEATURES` on to the device
//!   first.
//!
//! Everything else (handler, workers, metrics) is `backends`'. Once the
//! shared handler and loop do both, this module reduces to a re-export.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backends::handler::Handler;
use backends::metrics::{QueueMetrics, QueueMetricsSnapshot};
use backends::server::{Server, ServerError};
use backends::Device;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};

use crate::device::NetDevice;
use crate::handler::NetHandler;

/// The net device served over vhost-user, one frontend at a time.
pub struct NetServer {
    device: Arc<NetDevice>,
    metrics: Arc<Vec<Arc<QueueMetrics>>>,
    poll: Duration,
}

impl NetServer {
    /// Wraps `device`; metrics start at zero and survive reconnects.
    pub fn new(device: Arc<NetDevice>) -> Self {
        let metrics = (0..device.num_queues()).map(|_| Arc::default()).collect();
        NetServer {
            device,
            metrics: Arc::new(metrics),
            poll: Duration::ZERO,
        }
    }

    /// Sets how long queue workers busy-poll after the last work found.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Generic per-queue counters (requests, bytes, notifications).
    pub fn metrics(&self) -> Vec<QueueMetricsSnapshot> {
        self.metrics.iter().map(|m| m.snapshot()).collect()
    }

    /// Binds `path` (replacing a stale socket file).
    pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
        Server::<NetDevice>::bind(path)
    }

    /// Accepts and serves frontends forever, one at a time.
    pub fn serve(&self, listener: &UnixListener) -> Result<(), ServerError> {
        loop {
            let (stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServerError::Accept(e)),
            };
            tracing::info!("frontend connected");
            self.serve_connection(stream);
        }
    }

    /// Connects to a frontend listening on `path`, reconnecting after each disconnect.
    pub fn serve_client(&self, path: &Path) -> ! {
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => self.serve_connection(stream),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Serves one frontend until it disconnects, then stops every queue.
    pub fn serve_connection(&self, stream: UnixStream) {
        let inner = Handler::new(self.device.clone(), self.metrics.clone(), self.poll);
        let handler = Arc::new(Mutex::new(NetHandler::new(inner, self.device.clone())));
        let mut req = BackendReqHandler::from_stream(stream, handler.clone());
        loop {
            match req.handle_request() {
                Ok(()) => {}
                Err(VhostUserError::InactiveFeature(f)) => {
                    tracing::debug!(
                        feature = f.bits(),
                        "request before its feature was acked, ignored"
                    );
                }
                Err(VhostUserError::Disconnected | VhostUserError::PartialMessage) => {
                    tracing::info!("frontend disconnected");
                    break;
                }
                Err(VhostUserError::SocketBroken(_)) => {
                    tracing::info!("frontend connection broken");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user request failed, dropping frontend");
                    break;
                }
            }
        }
        drop(req);
        if let Ok(mut h) = handler.lock() {
            h.inner().stop_all();
        }
        for (q, (m, net)) in self.metrics().iter().zip(self.device.metrics()).enumerate() {
            tracing::info!(queue = q, kind = ?self.device.kind(q), ?net, ?m, "queue metrics");
        }
    }
}
