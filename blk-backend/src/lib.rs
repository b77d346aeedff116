//! blk-backend: a vhost-user-blk daemon on io_uring with a pluggable storage trait.
//!
//! - [`storage`]: the completion-based [`storage::Storage`] trait and its
//!   io_uring-file and RAM implementations.
//! - [`request`]: parsing descriptor chains into virtio-blk requests.
//! - [`event_handler`]: executing one queue's requests on storage.
//! - [`device`]: features, config space, queue processors.
//! - [`state`]: the blk part of a saved backend state (DEVICE_STATE).
//! - [`metrics`]: the per-queue counters as the metrics endpoint serves them.
//! - [`config`]: the typed configuration; [`run`] is the daemon's entry point.

pub mod config;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod request;
pub mod state;
pub mod storage;

use std::sync::Arc;

use backends::daemon::ConfineError;
use backends::metrics_server::{BoundMetrics, MetricsServer, MetricsServerError};
use backends::server::{Server, ServerError};
use backends::uring::{self, UringError};
use thiserror::Error;

pub use config::{BlkConfig, StorageKind};
pub use device::{BlkDevice, BlkOptions};

/// Errors running the daemon.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("Invalid configuration")]
    Config(#[from] config::ConfigError),
    /// The image could not be opened.
    #[error("Cannot open the disk image")]
    Open(#[source] std::io::Error),
    /// Serving failed.
    #[error("Serving vhost-user failed")]
    Serve(#[from] ServerError),
    /// The metrics endpoint could not start.
    #[error("Cannot start the metrics endpoint")]
    Metrics(#[from] MetricsServerError),
    /// The kernel cannot restrict io_uring rings.
    #[error("io_uring is unusable")]
    Uring(#[from] UringError),
    /// seccomp or `--user` could not be applied.
    #[error("Cannot confine the daemon")]
    Confine(#[from] ConfineError),
}

/// Opens the storage the configuration names.
pub fn open_storage(cfg: &BlkConfig) -> Result<Arc<dyn storage::Storage>, Error> {
    cfg.validate()?;
    Ok(match (&cfg.storage, &cfg.image) {
        (StorageKind::Memory(size), _) => {
            Arc::new(storage::MemoryStorage::new(*size).map_err(Error::Open)?)
        }
        (StorageKind::File, Some(path)) => {
            storage::open_image(path, cfg.read_only, cfg.direct, u32::from(cfg.queue_size))
                .map_err(Error::Open)?
        }
        (StorageKind::File, None) => return Err(config::ConfigError::NoImage.into()),
    })
}

/// Runs the daemon until a fatal error: serves one frontend after another.
///
/// Opens the storage and the sockets, drops privileges, starts the metrics
/// thread, confines the main thread, then serves (see `backends::seccomp`).
pub fn run(cfg: &BlkConfig) -> Result<(), Error> {
    cfg.confinement.check()?;
    let storage = open_storage(cfg)?;
    if cfg.storage == StorageKind::File {
        uring::check_restrictions()?;
    }
    let opts = BlkOptions {
        read_only: cfg.read_only,
        queues: cfg.queues,
        queue_size: cfg.queue_size,
        serial: cfg.serial.clone(),
    };
    tracing::info!(capacity = storage.capacity(), queues = cfg.queues, socket = %cfg.socket.display(), "blk-backend starting");
    let poll_us = cfg.poll_us.unwrap_or_else(|| storage.default_poll_us());
    let server = Server::new(Arc::new(BlkDevice::new(storage, opts)))
        .with_poll(std::time::Duration::from_micros(poll_us));
    let listener = match cfg.client {
        true => None,
        false => Some(Server::<BlkDevice>::bind(&cfg.socket)?),
    };
    let metrics = match &cfg.metrics_socket {
        Some(path) => Some(MetricsServer::bind_for_daemon(
            path,
            Arc::new(metrics::BlkCounters::new(server.metrics_handle())),
        )?),
        None => None,
    };
    let sockets: Vec<_> = listener
        .as_ref()
        .map(|_| cfg.socket.as_path())
        .into_iter()
        .chain(metrics.as_ref().map(BoundMetrics::path))
        .collect();
    cfg.confinement.prepare(&sockets)?;
    // Dropped (socket removed) when serving fails; SIGTERM/SIGINT remove it too.
    let _metrics = metrics.map(BoundMetrics::start).transpose()?;
    cfg.confinement.confine_main()?;
    match listener {
        None => server.serve_client(&cfg.socket),
        Some(listener) => server.serve(&listener)?,
    }
    Ok(())
}
