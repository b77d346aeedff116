//! blk-bench: the block benchmark driver.
//!
//! - `vhost`: drive any vhost-user-blk socket through the synthetic frontend.
//! - `fio`: run host fio (io_uring, O_DIRECT or buffered) on a file with the same workloads.
//! - `report`: read result lines and print min/median/max plus ratio tables.
//!
//! Results are tab-separated lines: `label workload iops mbps p50_us p99_us cpu_s_per_mio`.

pub mod fio;
pub mod report;
pub mod vhost;
pub mod workload;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use thiserror::Error;

pub use workload::{Sample, Workload};

/// Errors of the benchmark driver.
#[derive(Debug, Error)]
pub enum Error {
    /// Driving the vhost-user socket failed.
    #[error("vhost-user run failed")]
    Vhost(#[from] vhost::VhostBenchError),
    /// Running fio failed.
    #[error("fio run failed")]
    Fio(#[from] fio::FioError),
    /// Reading or writing results failed.
    #[error("Cannot access results file")]
    Io(#[from] std::io::Error),
    /// An unknown workload name.
    #[error("Unknown workload {0:?}")]
    Workload(String),
}

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "Block benchmarks: vhost-user-blk backends vs host fio")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Drive a vhost-user-blk socket with the synthetic frontend.
    Vhost {
        /// Socket of the backend.
        #[arg(long)]
        socket: PathBuf,
        /// Backend pid, to measure its CPU time.
        #[arg(long)]
        pid: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Run host fio with io_uring (and O_DIRECT unless --buffered) on a file.
    Fio {
        /// File to benchmark.
        #[arg(long)]
        file: PathBuf,
        /// Through the page cache, for files on tmpfs (no O_DIRECT there).
        #[arg(long)]
        buffered: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Print min/median/max per label and workload, and ratio tables.
    Report {
        /// Results file.
        results: PathBuf,
        /// Label the others are compared against, e.g. blk-backend; may be
        /// given more than once, for one ratio table each.
        #[arg(long, default_value = "blk-backend")]
        subject: Vec<String>,
        /// Also write a bar chart (IOPS relative to the first label) here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Label written with each result.
    #[arg(long)]
    label: String,
    /// Comma-separated workloads (default: all).
    #[arg(long)]
    workloads: Option<String>,
    /// Seconds per workload run.
    #[arg(long, default_value_t = 3)]
    runtime: u64,
    /// Repetitions of each workload.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Results file to append to (stdout if absent).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn workloads(spec: &Option<String>) -> Result<Vec<Workload>, Error> {
    match spec {
        None => Ok(Workload::all().to_vec()),
        Some(s) => s
            .split(',')
            .map(|n| Workload::by_name(n).ok_or_else(|| Error::Workload(n.into())))
            .collect(),
    }
}

fn emit(out: &Option<PathBuf>, s: &Sample) -> Result<(), Error> {
    let line = s.to_line();
    if let Some(path) = out {
        eprintln!("{line}");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Runs the command.
pub fn main(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Vhost {
            socket,
            pid,
            common,
        } => {
            let mut bench = vhost::VhostBench::connect(&socket)?;
            for _ in 0..common.repeat {
                for w in workloads(&common.workloads)? {
                    let s = bench.run(&w, &common.label, common.runtime, pid)?;
                    emit(&common.out, &s)?;
                }
            }
        }
        Cmd::Fio {
            file,
            buffered,
            common,
        } => {
            for _ in 0..common.repeat {
                for w in workloads(&common.workloads)? {
                    let s = fio::run(&file, &w, &common.label, common.runtime, !buffered)?;
                    emit(&common.out, &s)?;
                }
            }
        }
        Cmd::Report {
            results,
            subject,
            svg,
        } => {
            let text = std::fs::read_to_string(results)?;
            print!("{}", report::render(&text, &subject));
            if let Some(path) = svg {
                std::fs::write(path, report::svg(&text))?;
            }
        }
    }
    Ok(())
}
