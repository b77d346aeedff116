use std::path::PathBuf;
use std::process::ExitCode;

use backends::daemon::Confinement;
use backends::privileges::UserSpec;
use backends::seccomp::SeccompMode;
use blk_backend::{BlkConfig, StorageKind};
use clap::Parser;

/// vhost-user-blk daemon on io_uring.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// vhost-user socket path (listened on, unless --client).
    #[arg(long)]
    socket: PathBuf,
    /// Connect to the socket instead of listening on it.
    #[arg(long)]
    client: bool,
    /// Disk image or block device.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Read-only disk.
    #[arg(long)]
    readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Number of queues, one worker thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Device id returned to GET_ID (20 bytes max).
    #[arg(long, default_value = "blk-backend")]
    serial: String,
    /// Largest adaptive busy-poll window of queue workers in microseconds
    /// after the last work found; it grows while sleeps are short and
    /// shrinks on an idle queue (0: never poll). Helps only with a spare CPU
    /// per queue. Default: 32 on storage at RAM speed (memory, an image on
    /// tmpfs), 0 on anything else.
    #[arg(long)]
    poll_us: Option<u64>,
    /// `file` (io_uring on --image; an image on tmpfs, ramfs or hugetlbfs is
    /// mapped) or `memory:SIZE` (e.g. memory:1G).
    #[arg(long, default_value = "file")]
    storage: StorageKind,
    /// Serve per-queue counters over HTTP on this unix socket
    /// (`GET /counters`: JSON, `GET /metrics`: Prometheus text).
    #[arg(long)]
    metrics_socket: Option<PathBuf>,
    /// seccomp filters per thread: `true` (a forbidden system call ends the
    /// daemon with status 159 and one line on stderr), `log` (allowed, logged
    /// by the kernel) or `false` (none).
    #[arg(long, default_value = "true")]
    seccomp: SeccompMode,
    /// Become USER (and GROUP, default USER's group) once the image and the
    /// sockets are open; the sockets are handed to that user.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<UserSpec>,
}

fn main() -> ExitCode {
    backends::daemon::init_logging();
    let a = Args::parse();
    let cfg = BlkConfig {
        socket: a.socket,
        client: a.client,
        image: a.image,
        storage: a.storage,
        read_only: a.readonly,
        direct: a.direct,
        queues: a.queues.max(1),
        queue_size: a.queue_size,
        serial: a.serial,
        poll_us: a.poll_us,
        metrics_socket: a.metrics_socket,
        confinement: Confinement {
            seccomp: a.seccomp,
            user: a.user,
        },
    };
    backends::daemon::exit_code(blk_backend::run(&cfg))
}
