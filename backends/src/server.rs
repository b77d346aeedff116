//! Serving frontends: listen on a unix socket and serve one connection after
//! another, so the daemon outlives VM restarts; or connect to a frontend's
//! socket and reconnect after each disconnect.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};

use crate::device::Device;
use crate::handler::Handler;
use crate::metrics::{QueueMetrics, QueueMetricsSnapshot};
use crate::metrics_server::{bind_private, PrivateBindError};

/// Errors of the server loop.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Binding the socket failed.
    #[error("Cannot listen on {0}")]
    Bind(String, #[source] std::io::Error),
    /// Accepting a connection failed.
    #[error("Cannot accept a frontend")]
    Accept(#[source] std::io::Error),
}

/// A device served over vhost-user, one frontend at a time.
pub struct Server<D: Device> {
    device: Arc<D>,
    metrics: Arc<Vec<Arc<QueueMetrics>>>,
    poll: Duration,
}

/// Default busy-poll window of queue workers.
pub const DEFAULT_POLL: Duration = Duration::ZERO;

impl<D: Device> Server<D> {
    /// Wraps `device`; metrics start at zero and survive reconnects.
    pub fn new(device: Arc<D>) -> Self {
        let metrics = (0..device.num_queues()).map(|_| Arc::default()).collect();
        Server {
            device,
            metrics: Arc::new(metrics),
            poll: DEFAULT_POLL,
        }
    }

    /// Sets how long queue workers busy-poll after the last work found
    /// (zero disables polling).
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The per-queue counters themselves, for a reader that outlives this
    /// call (the metrics endpoint): the same atomics for every connection.
    pub fn metrics_handle(&self) -> Arc<Vec<Arc<QueueMetrics>>> {
        self.metrics.clone()
    }

    /// Per-queue counters.
    pub fn metrics(&self) -> Vec<QueueMetricsSnapshot> {
        self.metrics.iter().map(|m| m.snapshot()).collect()
    }

    /// Binds `path` with mode 0600 (replacing a stale socket file).
    pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
        bind_private(path).map_err(|e| match e {
            PrivateBindError::Bind(e) | PrivateBindError::Place(e) => {
                ServerError::Bind(path.display().to_string(), e)
            }
        })
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
        let handler = Arc::new(Mutex::new(Handler::new(
            self.device.clone(),
            self.metrics.clone(),
            self.poll,
        )));
        let mut req = BackendReqHandler::from_stream(stream, handler.clone());
        loop {
            match req.handle_request() {
                Ok(()) => {}
                // QEMU sends SET_VRING_ENABLE before SET_FEATURES; the vhost
                // crate refuses it (no reply is expected): carry on.
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
            h.stop_all();
        }
        for (q, m) in self.metrics().iter().enumerate() {
            tracing::info!(queue = q, ?m, "queue metrics");
        }
        self.device.disconnected();
    }
}
