//! net-backend: a vhost-user-net daemon over a multi-queue tap, with io_uring
//! and virtio-net offloads.
//!
//! - [`tap`]: opening/creating the multi-queue tap, vnet header, offloads.
//! - [`vnet`]: feature bits, the virtio-net header, offload translation.
//! - [`event_handler`]: RX, TX and control queue processing.
//! - [`device`]: features, config space, queue processors.
//! - [`metrics`]: per-queue frames, bytes and drops by reason.
//! - [`state`]: the net part of a saved backend state (DEVICE_STATE).
//! - [`server`]: `backends`' server for this device.
//! - [`testnet`]: namespaces and packet sockets for tests and benchmarks.
//! - [`config`]: the typed configuration; [`run`] is the daemon's entry point.

pub mod config;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod server;
pub mod state;
pub mod tap;
pub mod testnet;
pub mod vnet;

use std::sync::Arc;
use std::time::Duration;

use backends::daemon::ConfineError;
use backends::metrics_server::{BoundMetrics, MetricsServer, MetricsServerError};
use backends::seccomp::{self, ThreadKind};
use backends::server::ServerError;
use backends::uring::{self, UringError};
use server::NetServer;
use thiserror::Error;

pub use config::{MacAddr, NetConfig};
pub use device::{NetDevice, NetOptions};

/// Errors running the daemon.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("Invalid configuration")]
    Config(#[from] config::ConfigError),
    /// The tap could not be opened.
    #[error("Cannot set up the tap")]
    Tap(#[from] tap::TapError),
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
    /// The metrics logger thread could not be spawned.
    #[error("Cannot spawn the metrics logger")]
    Logger(#[source] std::io::Error),
}

/// Opens the tap and builds the device the configuration describes.
pub fn build_device(cfg: &NetConfig) -> Result<NetDevice, Error> {
    cfg.validate()?;
    let wanted = if cfg.offloads {
        vnet::tun_offload_for(u64::MAX)
    } else {
        0
    };
    let tap = if cfg.tap_fds.is_empty() {
        tap::Tap::open(&cfg.tap, cfg.queue_pairs, cfg.create_tap, wanted)?
    } else {
        tap::Tap::from_fds(&cfg.tap_fds, wanted)?
    };
    let opts = NetOptions {
        mac: cfg.mac,
        mtu: cfg.mtu,
        queue_size: cfg.queue_size,
        offloads: cfg.offloads,
        mrg_rxbuf: cfg.mrg_rxbuf,
    };
    Ok(NetDevice::new(tap, opts))
}

/// Runs the daemon until a fatal error: serves one frontend after another.
///
/// Opens the tap and the sockets, drops privileges, starts the helper
/// threads, confines the main thread, then serves (see `backends::seccomp`).
pub fn run(cfg: &NetConfig) -> Result<(), Error> {
    cfg.confinement.check()?;
    let device = Arc::new(build_device(cfg)?);
    uring::check_restrictions()?;
    tracing::info!(tap = %cfg.tap, pairs = cfg.queue_pairs, mac = %cfg.mac, socket = %cfg.socket.display(), "net-backend starting");
    let server = NetServer::new(device.clone());
    let listener = match cfg.client {
        true => None,
        false => Some(NetServer::bind(&cfg.socket)?),
    };
    let metrics = match &cfg.metrics_socket {
        Some(path) => Some(MetricsServer::bind_for_daemon(
            path,
            Arc::new(metrics::NetCounters::new(
                device.clone(),
                server.metrics_handle(),
            )),
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
    if cfg.metrics_interval > 0 {
        let every = Duration::from_secs(cfg.metrics_interval);
        std::thread::Builder::new()
            .name("metrics-log".into())
            .spawn(move || {
                seccomp::apply_or_exit(ThreadKind::Logger);
                loop {
                    std::thread::sleep(every);
                    for (q, m) in device.metrics().iter().enumerate() {
                        tracing::info!(queue = q, kind = ?device.kind(q), ?m, "net metrics");
                    }
                }
            })
            .map_err(Error::Logger)?;
    }
    // Dropped (socket removed) when serving fails; SIGTERM/SIGINT remove it too.
    let _metrics = metrics.map(BoundMetrics::start).transpose()?;
    cfg.confinement.confine_main()?;
    match listener {
        None => server.serve_client(&cfg.socket),
        Some(listener) => server.serve(&listener)?,
    }
    Ok(())
}
