//! net-bench: net-backend vs the raw-tap limit, side by side in one run.
//!
//! Everything happens in a network namespace the benchmark makes. Two taps
//! live there: one served by net-backend (in this process, the same code
//! as the daemon) and driven by the synthetic frontend, and one a plain
//! host process reads and writes directly (the limit). The other end of
//! each tap is an AF_PACKET socket in the namespace.
//!
//! - TX: the guest (or the raw writer) sends frames into the tap as fast as
//!   it can; the socket counts what arrives.
//! - RX: the socket sends frames out of the tap as fast as it can; the guest
//!   (or the raw reader) counts what arrives.
//!
//! Sizes: 64 B and 1500 B frames, and 64 KiB TCP TSO frames (one virtio
//! header, split over mergeable RX buffers). Each repetition runs the
//! subject and the limit back to back; the table gives min/median/max and
//! the ratio per repetition.

pub mod cpu;
pub mod env;

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::frontend::net::NetDriver;
use backends::frontend::{FrontendConfig, FrontendError, SyntheticFrontend};
use clap::Parser;
use env::{frame, vnet_hdr, EnvError, NetNs, PacketSocket, Sink, GUEST, NOBODY};
use net_backend::server::NetServer;
use net_backend::NetConfig;
use thiserror::Error;

/// Errors of the benchmark.
#[derive(Debug, Error)]
pub enum Error {
    /// Setting up the namespace, taps or sockets failed.
    #[error("Environment setup failed")]
    Env(#[from] EnvError),
    /// The backend could not be built.
    #[error("Cannot build net-backend")]
    Backend(#[from] net_backend::Error),
    /// The synthetic frontend failed.
    #[error("Synthetic frontend failed")]
    Frontend(#[from] FrontendError),
    /// The raw tap could not be opened.
    #[error("Cannot open the raw tap")]
    Tap(#[from] net_backend::tap::TapError),
    /// Binding the socket failed.
    #[error("Cannot serve")]
    Serve(#[from] backends::server::ServerError),
}

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "net-backend vs raw tap: TX/RX pps and throughput, ratio table")]
pub struct Cli {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Repetitions (each runs net-backend and raw tap back to back).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Workloads, comma separated: tx64,tx1500,tx64k,rx64,rx1500,rx64k.
    #[arg(long, default_value = "tx64,tx1500,tx64k,rx64,rx1500,rx64k")]
    pub workloads: String,
    /// Bytes per RX buffer the driver posts. Linux's virtio-net with
    /// mergeable buffers sizes them by the average frame it received,
    /// between 1518 bytes plus the header and one page: a guest receiving
    /// large frames posts 4096-byte buffers, which is the default here.
    #[arg(long, default_value_t = 4096)]
    pub rx_buf_len: u32,
    /// Frame buffers the raw tap writer cycles through on TX. One (the
    /// default) is always in cache; the driver's ring holds up to 256
    /// frames in guest memory, so 128 or more makes the writer's kernel
    /// copy read from memory as the backend's does.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub raw_tx_buffers: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    dir: Dir,
    len: usize,
    tso: bool,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "tx64",
        dir: Dir::Tx,
        len: 64,
        tso: false,
    },
    Workload {
        name: "tx1500",
        dir: Dir::Tx,
        len: 1514,
        tso: false,
    },
    Workload {
        name: "tx64k",
        dir: Dir::Tx,
        len: 65034,
        tso: true,
    },
    Workload {
        name: "rx64",
        dir: Dir::Rx,
        len: 64,
        tso: false,
    },
    Workload {
        name: "rx1500",
        dir: Dir::Rx,
        len: 1514,
        tso: false,
    },
    Workload {
        name: "rx64k",
        dir: Dir::Rx,
        len: 65034,
        tso: true,
    },
];

/// CPU nanoseconds one measurement used, by role.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    /// net-backend's queue workers (0 for the raw tap).
    worker: u64,
    /// The main thread: the driver, or the raw tap's reader or writer.
    main: u64,
    /// The thread on the namespace's packet socket (source or sink).
    traffic: u64,
}

/// Frames and bytes over a duration, and the CPU they took.
#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    pps: f64,
    gbps: f64,
    frames: u64,
    secs: f64,
    cpu: Cpu,
}

impl Rate {
    fn new(frames: u64, bytes: u64, secs: f64, cpu: Cpu) -> Self {
        Rate {
            pps: frames as f64 / secs,
            gbps: bytes as f64 * 8.0 / secs / 1e9,
            frames,
            secs,
            cpu,
        }
    }

    /// Microseconds of CPU per frame that `ns` stands for.
    fn us_per_frame(&self, ns: u64) -> f64 {
        if self.frames == 0 {
            return 0.0;
        }
        ns as f64 / 1e3 / self.frames as f64
    }

    /// Cores kept busy on average by the three roles together.
    fn cores(&self) -> f64 {
        (self.cpu.worker + self.cpu.main + self.cpu.traffic) as f64 / 1e9 / self.secs
    }
}

/// Name prefix of net-backend's queue worker threads.
const WORKER: &str = "queue";

struct Setup {
    ns: NetNs,
    driver: NetDriver,
    raw: std::fs::File,
    sub_plain: Arc<PacketSocket>,
    sub_vnet: Arc<PacketSocket>,
    raw_plain: Arc<PacketSocket>,
    raw_vnet: Arc<PacketSocket>,
    _socket: PathBuf,
}

fn setup(rx_buf_len: u32) -> Result<Setup, Error> {
    let id = std::process::id();
    let ns = NetNs::new(&format!("nbbench{id}"))?;
    let (sub, raw) = ("nbsub0", "nbraw0");
    let socket = std::env::temp_dir().join(format!("nbbench{id}.sock"));
    let mut cfg = NetConfig::new(socket.clone(), sub);
    cfg.create_tap = true;
    cfg.queue_size = 256;
    let device = ns.enter(move || net_backend::build_device(&cfg))??;
    let raw_tap = ns.enter(move || {
        net_backend::tap::Tap::open(raw, 1, true, net_backend::vnet::tun_offload_for(u64::MAX))
    })??;
    let raw_file = raw_tap
        .queue(0)
        .ok_or(EnvError::Command("raw tap has no queue".into()))?
        .try_clone()
        .map_err(|e| EnvError::Sys("dup", e))?;
    std::mem::forget(raw_tap);
    for tap in [sub, raw] {
        ns.ip(&["link", "set", tap, "up"])?;
        ns.ip(&["link", "set", tap, "txqueuelen", "10000"])?;
    }
    let listener = NetServer::bind(&socket)?;
    let server = NetServer::new(Arc::new(device));
    std::thread::spawn(move || server.serve(&listener));
    let fe = SyntheticFrontend::connect(
        &socket,
        FrontendConfig {
            mem_size: 64 << 20,
            num_queues: 3,
            queue_size: 256,
            ..Default::default()
        },
    )?;
    let driver = NetDriver::new(fe, 1, rx_buf_len, 256, 70 << 10)?;
    Ok(Setup {
        sub_plain: Arc::new(PacketSocket::open(&ns, sub, false)?),
        sub_vnet: Arc::new(PacketSocket::open(&ns, sub, true)?),
        raw_plain: Arc::new(PacketSocket::open(&ns, raw, false)?),
        raw_vnet: Arc::new(PacketSocket::open(&ns, raw, true)?),
        ns,
        driver,
        raw: raw_file,
        _socket: socket,
    })
}

fn tx_subject(s: &mut Setup, w: Workload, secs: f64) -> Result<Rate, Error> {
    let f = frame(NOBODY, GUEST, w.len, w.tso);
    let hdr = vnet_hdr(w.tso);
    let sink = Sink::start(s.sub_plain.clone(), w.len);
    let d = &mut s.driver;
    while d.reclaim_tx(0)? > 0 {}
    d.prefill_tx(0, &hdr, &f)?;
    let (workers, main) = (cpu::threads_named(WORKER), cpu::thread_ns());
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        while d.tx_free(0) > 0 {
            d.send_prefilled(0, f.len() as u32)?;
        }
        d.kick_tx(0);
        // Sleep until the device returns frames (as a guest driver waits
        // for its interrupt) rather than spin on the used ring.
        let _ = d.wait_tx(0, Duration::from_millis(10));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let main = cpu::thread_ns() - main;
    std::thread::sleep(Duration::from_millis(150));
    let worker = cpu::used_since(&workers, &cpu::threads_named(WORKER));
    while d.reclaim_tx(0)? > 0 {}
    let (frames, bytes, traffic) = sink.finish();
    let cpu = Cpu {
        worker,
        main,
        traffic,
    };
    Ok(Rate::new(frames, bytes, elapsed, cpu))
}

fn tx_limit(s: &Setup, w: Workload, secs: f64, buffers: u32) -> Rate {
    let f = [&vnet_hdr(w.tso)[..], &frame(NOBODY, GUEST, w.len, w.tso)].concat();
    let bufs = vec![f; buffers as usize];
    let mut next = bufs.iter().cycle();
    let sink = Sink::start(s.raw_plain.clone(), w.len);
    let main = cpu::thread_ns();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        for f in next.by_ref().take(64) {
            // SAFETY: `f` is valid for its length; the fd is the raw tap's.
            unsafe { libc::write(s.raw.as_raw_fd(), f.as_ptr().cast(), f.len()) };
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let main = cpu::thread_ns() - main;
    std::thread::sleep(Duration::from_millis(150));
    let (frames, bytes, traffic) = sink.finish();
    let cpu = Cpu {
        worker: 0,
        main,
        traffic,
    };
    Rate::new(frames, bytes, elapsed, cpu)
}

/// Sends `w`'s frames out of a tap from the namespace until stopped; the
/// thread returns the CPU nanoseconds it used.
fn source(
    sock: Arc<PacketSocket>,
    w: Workload,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let f = frame(GUEST, NOBODY, w.len, w.tso);
    let msg = if w.tso {
        [&vnet_hdr(true)[..10], &f[..]].concat()
    } else {
        f
    };
    std::thread::spawn(move || {
        let cpu = cpu::thread_ns();
        while !stop.load(Ordering::Relaxed) {
            if !sock.send(&msg) {
                std::thread::yield_now();
            }
        }
        cpu::thread_ns() - cpu
    })
}

fn rx_subject(s: &mut Setup, w: Workload, secs: f64) -> Result<Rate, Error> {
    let sock = if w.tso { &s.sub_vnet } else { &s.sub_plain };
    let d = &mut s.driver;
    while d.poll_rx(0, None)?.frames > 0 {}
    let stop = Arc::new(AtomicBool::new(false));
    let (workers, main) = (cpu::threads_named(WORKER), cpu::thread_ns());
    let src = source(sock.clone(), w, stop.clone());
    let (mut frames, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        if let Ok(c) = d.wait_rx(0, Duration::from_millis(20), None) {
            frames += c.frames;
            bytes += c.bytes;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (main, worker) = (
        cpu::thread_ns() - main,
        cpu::used_since(&workers, &cpu::threads_named(WORKER)),
    );
    stop.store(true, Ordering::Relaxed);
    let traffic = src.join().unwrap_or_default();
    std::thread::sleep(Duration::from_millis(100));
    while d.poll_rx(0, None)?.frames > 0 {}
    let cpu = Cpu {
        worker,
        main,
        traffic,
    };
    Ok(Rate::new(frames, bytes, elapsed, cpu))
}

fn rx_limit(s: &Setup, w: Workload, secs: f64) -> Rate {
    let sock = if w.tso { &s.raw_vnet } else { &s.raw_plain };
    let fd = s.raw.as_raw_fd();
    let mut buf = vec![0u8; 128 << 10];
    let stop = Arc::new(AtomicBool::new(false));
    let src = source(sock.clone(), w, stop.clone());
    let want = w.len + 12;
    let (mut frames, mut bytes) = (0u64, 0u64);
    let main = cpu::thread_ns();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        if read_within(fd, &mut buf, 20) == Some(want) {
            frames += 1;
            bytes += w.len as u64;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let main = cpu::thread_ns() - main;
    stop.store(true, Ordering::Relaxed);
    let traffic = src.join().unwrap_or_default();
    // Drain what is left so the next run starts empty.
    while read_within(fd, &mut buf, 50).is_some() {}
    let cpu = Cpu {
        worker: 0,
        main,
        traffic,
    };
    Rate::new(frames, bytes, elapsed, cpu)
}

/// Reads one frame from `fd` if one arrives within `ms` milliseconds.
fn read_within(fd: RawFd, buf: &mut [u8], ms: i32) -> Option<usize> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).ok()
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

/// One row of the CPU table: what a frame cost each thread, both sides.
fn cpu_row(w: &Workload, sub: &[Rate], lim: &[Rate]) -> String {
    let med = |rates: &[Rate], f: &dyn Fn(&Rate) -> f64| {
        stats(&rates.iter().map(f).collect::<Vec<_>>()).1
    };
    let worker = med(sub, &|r| r.us_per_frame(r.cpu.worker));
    let driver = med(sub, &|r| r.us_per_frame(r.cpu.main));
    let both = med(sub, &|r| r.us_per_frame(r.cpu.worker + r.cpu.main));
    let raw = med(lim, &|r| r.us_per_frame(r.cpu.main));
    format!(
        "| {} | {worker:.2} | {driver:.2} | {:.2} | {both:.2} | {:.2} | {raw:.2} | {:.2} | {:.2} | {:.2}x |",
        w.name,
        med(sub, &|r| r.us_per_frame(r.cpu.traffic)),
        med(sub, &Rate::cores),
        med(lim, &|r| r.us_per_frame(r.cpu.traffic)),
        med(lim, &Rate::cores),
        if raw > 0.0 { both / raw } else { 0.0 },
    )
}

/// Runs the benchmark and prints the table.
pub fn run(cli: &Cli) -> Result<(), Error> {
    let mut s = setup(cli.rx_buf_len)?;
    let wanted: Vec<&str> = cli.workloads.split(',').map(str::trim).collect();
    println!(
        "net-bench: {} s per run, {} repetitions, RX buffers of {} bytes, raw TX buffers: {}, namespace {}",
        cli.seconds, cli.repeat, cli.rx_buf_len, cli.raw_tx_buffers, s.ns.name
    );
    println!(
        "| workload | net-backend Mpps min/med/max | net-backend Gbit/s med | raw tap Mpps min/med/max | raw tap Gbit/s med | ratio min/med/max |"
    );
    println!("|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    for w in WORKLOADS.iter().filter(|w| wanted.contains(&w.name)) {
        let (mut sub, mut lim, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cli.repeat {
            let (a, b) = match w.dir {
                Dir::Tx => (
                    tx_subject(&mut s, *w, cli.seconds)?,
                    tx_limit(&s, *w, cli.seconds, cli.raw_tx_buffers),
                ),
                Dir::Rx => (
                    rx_subject(&mut s, *w, cli.seconds)?,
                    rx_limit(&s, *w, cli.seconds),
                ),
            };
            ratio.push(if b.pps > 0.0 { a.pps / b.pps } else { 0.0 });
            sub.push(a);
            lim.push(b);
        }
        let sp = stats(&sub.iter().map(|r| r.pps / 1e6).collect::<Vec<_>>());
        let sg = stats(&sub.iter().map(|r| r.gbps).collect::<Vec<_>>());
        let lp = stats(&lim.iter().map(|r| r.pps / 1e6).collect::<Vec<_>>());
        let lg = stats(&lim.iter().map(|r| r.gbps).collect::<Vec<_>>());
        let r = stats(&ratio);
        println!(
            "| {} | {:.3}/{:.3}/{:.3} | {:.2} | {:.3}/{:.3}/{:.3} | {:.2} | {:.2}/{:.2}/{:.2} |",
            w.name, sp.0, sp.1, sp.2, sg.1, lp.0, lp.1, lp.2, lg.1, r.0, r.1, r.2
        );
        cpu_rows.push(cpu_row(w, &sub, &lim));
    }
    println!();
    println!("CPU per frame, µs (medians over the repetitions); cores: the three threads' CPU over the run's length");
    println!(
        "| workload | net-backend worker | driver | socket thread | worker + driver | cores | raw tap reader/writer | socket thread | cores | (worker + driver) / raw |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }
    Ok(())
}
