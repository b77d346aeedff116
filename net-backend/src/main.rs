use std::path::PathBuf;
use std::process::ExitCode;

use backends::daemon::Confinement;
use backends::privileges::UserSpec;
use backends::seccomp::SeccompMode;
use clap::Parser;
use net_backend::{MacAddr, NetConfig};

/// vhost-user-net daemon over a multi-queue tap, on io_uring.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// vhost-user socket path (listened on, unless --client).
    #[arg(long)]
    socket: PathBuf,
    /// Connect to the socket instead of listening on it.
    #[arg(long)]
    client: bool,
    /// Tap interface name.
    #[arg(long, required_unless_present = "tap_fd")]
    tap: Option<String>,
    /// A tap queue already open in this process, one per queue pair
    /// (repeatable; as libvirt hands them over): used instead of --tap.
    #[arg(long = "tap-fd", conflicts_with_all = ["tap", "create_tap"])]
    tap_fd: Vec<std::os::fd::RawFd>,
    /// Create the tap if it does not exist.
    #[arg(long)]
    create_tap: bool,
    /// MAC address offered to the guest.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    mac: MacAddr,
    /// MTU offered to the guest.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Queue pairs (tap queues, two worker threads each).
    #[arg(long, default_value_t = 1)]
    queue_pairs: usize,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Do not offer checksum and segmentation offloads.
    #[arg(long)]
    no_offloads: bool,
    /// Do not offer mergeable RX buffers.
    #[arg(long)]
    no_mrg_rxbuf: bool,
    /// Log per-queue metrics every N seconds (0: only at disconnect).
    #[arg(long, default_value_t = 0)]
    metrics_interval: u64,
    /// Serve per-queue counters over HTTP on this unix socket
    /// (`GET /counters`: JSON, `GET /metrics`: Prometheus text).
    #[arg(long)]
    metrics_socket: Option<PathBuf>,
    /// seccomp filters per thread: `true` (a forbidden system call ends the
    /// daemon with status 159 and one line on stderr), `log` (allowed, logged
    /// by the kernel) or `false` (none).
    #[arg(long, default_value = "true")]
    seccomp: SeccompMode,
    /// Become USER (and GROUP, default USER's group) once the tap and the
    /// sockets are open; the sockets are handed to that user.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<UserSpec>,
}

fn main() -> ExitCode {
    backends::daemon::init_logging();
    let a = Args::parse();
    let mut cfg = NetConfig::new(a.socket, a.tap.as_deref().unwrap_or_default());
    cfg.tap_fds = a.tap_fd;
    cfg.client = a.client;
    cfg.create_tap = a.create_tap;
    cfg.mac = a.mac;
    cfg.mtu = a.mtu;
    cfg.queue_pairs = a.queue_pairs;
    cfg.queue_size = a.queue_size;
    cfg.offloads = !a.no_offloads;
    cfg.mrg_rxbuf = !a.no_mrg_rxbuf;
    cfg.metrics_interval = a.metrics_interval;
    cfg.metrics_socket = a.metrics_socket;
    cfg.confinement = Confinement {
        seccomp: a.seccomp,
        user: a.user,
    };
    backends::daemon::exit_code(net_backend::run(&cfg))
}
