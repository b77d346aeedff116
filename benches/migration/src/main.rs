//! Live migration of a real `vmm` running the test guest, VMM to VMM on
//! this host, at several guest sizes, idle and dirtying memory, over TCP
//! on the loopback, a unix socket, and locally (the guest memfd handed
//! over: a live upgrade):
//!
//! - downtime as the VMM measures it (the source's `migration`
//!   `completed` event: its VM paused to the destination's `Ok` that the
//!   VM runs there) and as the guest shows it: the largest gap between
//!   its `t N` tick lines (`tg.tick`) as the host reads them from the
//!   source's console and then the destination's, stamped on arrival
//!   (the guest's own clocks are restored across a migration, so it
//!   cannot see the pause itself); next to it, the guest's normal gap
//!   (median before the migration);
//! - total time (the same event: `vm.send-migration` accepted to done)
//!   and the guest RAM bytes the destination received (its log);
//! - where the downtime went, from both logs (wall-clock stamped).
//!
//! The guest writes every page of its RAM at boot (`tg.touch`), so a
//! remote migration copies the whole size. Idle: tick lines only.
//! Dirtying: `tg.dirty` rewrites a word in every page of min(RAM/2,
//! 512 MiB) in a loop, a tick every `--dirty-tick` pages. Each size and
//! load boots once; the VM then moves from VMM to VMM, `--runs` times
//! over each transport.
//!
//! Targets (the issue): local live upgrade downtime <= 10 ms at 4 GiB
//! (Cloud Hypervisor's prototype: 50 ms; the HyperFresh paper: 10 ms;
//! quoted, not measured); remote downtime <= the `downtime_ms` asked for.
//! A benchmark: nothing is asserted.

mod logs;
mod migrate;
mod report;
mod ticks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bench_harness::vmm::VmmError;
use bench_harness::Scratch;
use clap::{Parser, ValueEnum};
use thiserror::Error;

use migrate::{Chain, Sample};

/// Where the scratch files go.
const SHM: &str = "/dev/shm";
/// Most of the RAM `tg.dirty` rewrites, MiB.
const DIRTY_MAX_MIB: u64 = 512;

#[derive(Parser)]
#[command(about = "Live migration downtime (VMM and guest-seen), total time and bytes")]
pub struct Args {
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// The test guest ELF.
    #[arg(
        long,
        default_value = "vmm/test-guest/target/x86_64-unknown-none/release/test-guest"
    )]
    guest: PathBuf,
    /// Guest RAM sizes (vmm --memory syntax).
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    sizes: Vec<String>,
    /// Guest loads.
    #[arg(long, value_delimiter = ',', default_value = "idle,dirtying")]
    loads: Vec<Load>,
    /// Transports.
    #[arg(long, value_delimiter = ',', default_value = "tcp,unix,local")]
    transports: Vec<Transport>,
    /// Migrations per case.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// vm.send-migration's downtime_ms, and the remote target.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Idle guest: a tick line every this many turns of an empty loop.
    #[arg(long, default_value_t = 0)]
    idle_tick: u64,
    /// Dirtying guest: a tick line every this many pages written.
    #[arg(long, default_value_t = 4)]
    dirty_tick: u64,
    /// Tick lines read before and after each migration, ms.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Longest wait for the booted guest's first tick (it writes all of
    /// its RAM first).
    #[arg(long, default_value_t = 600)]
    boot_limit_s: u64,
    /// Longest a migration request may take.
    #[arg(long, default_value_t = 600)]
    migration_limit_s: u64,
}

/// What the guest does while it migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Load {
    Idle,
    Dirtying,
}

/// How the VM travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Pre-copy over TCP on 127.0.0.1.
    Tcp,
    /// Pre-copy over a unix socket.
    Unix,
    /// The memfd handed over on a unix socket (`local: true`).
    Local,
}

/// Everything that stops the benchmark.
#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("The source vmm exited with {0} after the migration")]
    SourceExit(String),
    #[error("The destination is not listening on {0}")]
    NotListening(String),
    #[error("Cannot find a free TCP port")]
    Port(#[source] std::io::Error),
    #[error("A request thread panicked")]
    Thread,
    #[error("Cannot measure: {0}")]
    Measure(&'static str),
    #[error("Cannot use the scratch path {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    #[error("'{0}' is not a size like 256M or 4G")]
    Size(String),
}

/// One case's migrations.
pub struct Case {
    pub size: String,
    pub bytes: u64,
    pub load: Load,
    pub transport: Transport,
    /// The guest's command line.
    pub cmdline: String,
    pub samples: Vec<Sample>,
}

fn main() -> ExitCode {
    bench_harness::exit("migration-bench", run(&Args::parse()))
}

fn run(a: &Args) -> Result<(), BenchError> {
    let sizes = bench_harness::parse_sizes(&a.sizes).map_err(BenchError::Size)?;
    let scratch = Scratch::new(Path::new(SHM), "migration-bench")
        .map_err(|e| BenchError::Scratch(SHM.into(), e))?;
    let load_before = load_average();
    let mut cases = Vec::new();
    let mut result = Ok(());
    'all: for (size, bytes) in sizes {
        for &load in &a.loads {
            if let Err(e) = measure(a, scratch.path(), &size, bytes, load, &mut cases) {
                result = Err(e);
                break 'all;
            }
        }
    }
    report::print(a, &cases, [load_before, load_average()]);
    result
}

/// The host's 1-minute load average (other work on this host shows in
/// every timing here).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The guest's command line for `load` in `bytes` of RAM.
fn cmdline(a: &Args, bytes: u64, load: Load) -> String {
    match load {
        Load::Idle => format!("console=ttyS0 tg.touch tg.tick={}", a.idle_tick),
        Load::Dirtying => format!(
            "console=ttyS0 tg.touch tg.dirty={} tg.tick={}",
            (bytes >> 21).min(DIRTY_MAX_MIB),
            a.dirty_tick
        ),
    }
}

/// Boots one VM of `size` running `load` and migrates it `runs` times
/// over each transport, adding a case per transport to `cases`.
fn measure(
    a: &Args,
    scratch: &Path,
    size: &str,
    bytes: u64,
    load: Load,
    cases: &mut Vec<Case>,
) -> Result<(), BenchError> {
    let cmdline = cmdline(a, bytes, load);
    let first = cases.len();
    for &transport in &a.transports {
        cases.push(Case {
            size: size.to_string(),
            bytes,
            load,
            transport,
            cmdline: cmdline.clone(),
            samples: Vec::new(),
        });
    }
    let mut chain = Chain {
        vmm: &a.vmm,
        scratch,
        next: 0,
    };
    eprintln!("migration-bench: {size} {load:?}: booting `{cmdline}`");
    let mut node = chain.boot(&a.guest, size, &cmdline)?;
    node.vmm
        .wait_line("t ", Duration::from_secs(a.boot_limit_s))?;
    let settle = Duration::from_millis(a.settle_ms);
    let limit = Duration::from_secs(a.migration_limit_s);
    for run in 0..a.runs {
        for (i, &transport) in a.transports.iter().enumerate() {
            eprintln!(
                "migration-bench: {size} {load:?} {transport:?} {}/{}",
                run + 1,
                a.runs
            );
            let (next, sample) = chain.migrate(node, transport, a.downtime_ms, settle, limit)?;
            eprintln!("migration-bench:   {}", sample.line());
            node = next;
            cases[first + i].samples.push(sample);
        }
    }
    Ok(())
}
