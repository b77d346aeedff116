//! Shared plumbing for vhost-user backend daemons.
//!
//! - [`daemon`]: logging, exit status and confinement for a daemon's `main`.
//! - [`seccomp`]: the per-thread-kind seccomp filters and the SIGSYS report.
//! - [`privileges`]: `--user`, dropping root after set-up.
//! - [`server`]: listen on a unix socket and serve one frontend after another.
//! - [`handler`]: our vhost-user request handler (memory table, vrings,
//!   inflight tracking) over the `vhost` crate's protocol layer.
//! - [`worker`]: one thread per queue, sleeping in the device's io_uring (which
//!   also polls the kick and stop eventfds) or in an epoll loop over the kick
//!   eventfd, the device's completion eventfd and a stop eventfd.
//! - [`uring`]: the io_uring engine, one ring per worker thread.
//! - [`state`]: the backend's saved state (DEVICE_STATE): format and types.
//! - [`dirty_log`]: dirty-page logging for live migration (LOG_ALL,
//!   SET_LOG_BASE): the shared bitmap and the workers' handles on it.
//! - [`transfer`]: moving a saved state over the frontend's fd on a thread.
//! - [`inflight`]: the shared inflight-tracking region (GET/SET_INFLIGHT_FD).
//! - [`metrics`]: per-queue atomic counters.
//! - [`counters`]: a device's counters as data, as JSON and as Prometheus text.
//! - [`metrics_server`]: the `--metrics-socket` HTTP endpoint serving them.
//! - [`qemu`]: QEMU booting the test guest, for the backends' interop tests.
//! - [`frontend`]: a synthetic vhost-user frontend (VMM + guest driver in one
//!   host process) used by tests and benchmarks.

pub mod counters;
pub mod daemon;
pub mod desc;
pub mod device;
pub mod dirty_log;
pub mod frontend;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod metrics;
pub mod metrics_server;
pub mod privileges;
pub mod qemu;
pub mod ratelimit;
pub mod seccomp;
pub mod server;
pub mod state;
pub mod transfer;
pub mod uring;
pub mod vring;
pub mod worker;

pub use device::{Device, QueueHandler, Used};
pub use dirty_log::DirtyLogger;
pub use memory::{GuestMem, GuestMemoryShared};
pub use metrics::QueueMetrics;
