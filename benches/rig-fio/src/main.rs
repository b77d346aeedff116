//! fio inside a real Linux guest, in the nested rig: one Debian L2 under
//! `vmm` with two virtio-blk disks (one queue each), one served by our
//! `blk-backend`, the other by `qemu-storage-daemon` (vhost-user-blk export,
//! `aio=io_uring`), each backed by a file of the same size in L1's `/tmp`.
//!
//! `/tmp` in L1 is tmpfs: the storage runs at RAM speed, so what differs
//! between the disks is the daemons' own cost per request. fio (libaio,
//! direct=1, 4 KiB) runs on the two disks in turn, in rounds whose first
//! disk alternates, after a short warm-up; every run is checked (fio's exit
//! status and error field) and a failed or missing run is reported and
//! left out of the medians, and makes the benchmark fail.
//!
//! L1 runs under QEMU TCG and L2 inside it: absolute IOPS and latencies
//! mean little, the ratio blk-backend / qemu-storage-daemon is the figure.

mod plan;
mod report;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rig::{build_release, guest_image, which, workspace_root, Console, Payload, Rig, RigError};
use thiserror::Error;

use plan::{Plan, Workload};

#[derive(Parser)]
#[command(
    about = "fio in a Debian L2 guest in the nested rig: blk-backend disk vs qemu-storage-daemon disk"
)]
struct Args {
    /// Rounds; each runs every workload once on each disk.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Measured seconds per fio run.
    #[arg(long, default_value_t = 8)]
    runtime: u32,
    /// Seconds each fio run goes before it measures.
    #[arg(long, default_value_t = 1)]
    ramp: u32,
    /// Seconds of 4k random reads at QD32 on each disk before round 1 (0: none).
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Size of each disk's file in L1's /tmp, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u32,
    /// Workloads, in the order each round runs them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd32"
    )]
    workloads: Vec<Workload>,
    /// More blk-backend arguments, e.g. "--poll-us 0".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    blk_args: String,
    /// Where L1's whole console goes (default: target/rig-fio-console.log).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Run nothing: report from the console log of an earlier run, given
    /// the same --rounds, --warmup and --workloads as that run.
    #[arg(long, value_name = "LOG")]
    from_console: Option<PathBuf>,
}

#[derive(Debug, Error)]
enum BenchError {
    #[error("Invalid arguments: {0}")]
    Args(&'static str),
    #[error("Nested rig")]
    Rig(#[from] RigError),
    #[error("Cannot write the console log {0}")]
    Log(PathBuf, #[source] io::Error),
    #[error("Cannot read the console log {0}")]
    ReadLog(PathBuf, #[source] io::Error),
    #[error("{0} problem(s) with the run, listed above")]
    Problems(usize),
}

fn check(a: &Args) -> Result<(), BenchError> {
    if a.rounds == 0 {
        return Err(BenchError::Args("--rounds must be at least 1"));
    }
    if a.runtime == 0 {
        return Err(BenchError::Args("--runtime must be at least 1"));
    }
    if a.workloads.is_empty() {
        return Err(BenchError::Args("--workloads names no workload"));
    }
    // Two files in L1's tmpfs, which gets half of L1's 3 GiB.
    if !(16..=1024).contains(&a.size_mib) {
        return Err(BenchError::Args("--size-mib must be within 16..=1024"));
    }
    // They go into L1's shell script as they are.
    if !a
        .blk_args
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c.is_ascii_whitespace() || "_.,:=/-".contains(c))
    {
        return Err(BenchError::Args(
            "--blk-args takes words of letters, digits and _.,:=/- only",
        ));
    }
    Ok(())
}

fn run(a: Args) -> Result<(), BenchError> {
    check(&a)?;
    let mut workloads: Vec<Workload> = Vec::new();
    for w in &a.workloads {
        if !workloads.contains(w) {
            workloads.push(*w);
        }
    }
    let plan = Plan {
        rounds: a.rounds,
        runtime_s: a.runtime,
        ramp_s: a.ramp,
        warmup_s: a.warmup,
        size_mib: a.size_mib,
        workloads,
        blk_args: a.blk_args.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    let (console, elapsed, log_path) = match &a.from_console {
        Some(p) => (read_console(p)?, None, p.clone()),
        None => measure(&plan, a.console_log.clone())?,
    };
    report(&plan, &console, elapsed, &log_path)
}

/// A console log written by an earlier run, as the rig returned it.
fn read_console(path: &Path) -> Result<Console, BenchError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| BenchError::ReadLog(path.to_path_buf(), e))?;
    Ok(Console::from_lines(
        text.lines().map(str::to_string).collect(),
    ))
}

/// L1 boots at most for one run of the plan.
const L1_BOOTS: u32 = 3;

/// Boots the rig and runs the plan; returns L1's console, the wall time
/// and where the console was written.
fn measure(
    plan: &Plan,
    console_log: Option<PathBuf>,
) -> Result<(Console, Option<Duration>, PathBuf), BenchError> {
    let root = workspace_root();
    let image = guest_image(&root)?;
    let release = build_release(&root)?;
    let qsd = which("qemu-storage-daemon")?;
    let payload = Payload {
        bins: vec![qsd],
        files: Vec::new(),
        l2_scripts: BTreeMap::from([("fio".to_string(), plan.l2_script())]),
        script: plan.l1_script(),
    };
    let rig = Rig::build(&image, &release, &payload)?;
    let log_path = console_log.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("rig-fio-console.log")
    });
    eprintln!(
        "rig-fio: L1 boots under QEMU TCG, then one L2 runs {} fio runs of {} s (+{} s ramp) and a warm-up; console in {}",
        plan.steps().len(),
        plan.runtime_s,
        plan.ramp_s,
        log_path.display()
    );
    let t0 = Instant::now();
    // Whole-run limit: L1's boot plus the L2's own limit; a silent stall
    // of 5 minutes (no step is silent that long) ends it early.
    let limit = plan.l2_limit() + Duration::from_secs(900);
    // L1's own kernel dies now and then under QEMU TCG's nested SVM (see
    // vmm/tests/linux_rig.rs), most often under heavy I/O: then the whole
    // plan runs again in a new L1, up to L1_BOOTS times. The log keeps the
    // last boot (what the report reads); a dead boot's console is kept
    // beside it.
    let mut attempt = 1;
    let console = loop {
        let mut log = File::create(&log_path).map_err(|e| BenchError::Log(log_path.clone(), e))?;
        let mut log_err = None;
        let console = rig.run_watched(&[], limit, Duration::from_secs(300), |l| {
            if let Err(e) = writeln!(log, "{l}") {
                log_err.get_or_insert(e);
            }
            if ["RIG-", "RIGFIO-", "L1-"].iter().any(|p| l.contains(p)) {
                eprintln!("rig-fio: [{:5.0} s] {l}", t0.elapsed().as_secs_f64());
            }
        })?;
        if let Some(e) = log_err {
            return Err(BenchError::Log(log_path, e));
        }
        if console.finished() || console.timed_out || attempt == L1_BOOTS {
            break console;
        }
        let dead = log_path.with_extension(format!("l1-died-{attempt}.log"));
        std::fs::copy(&log_path, &dead).map_err(|e| BenchError::Log(dead.clone(), e))?;
        eprintln!(
            "rig-fio: L1 ended before its script (stalled: {}; its console: {}); booting it again",
            console.stalled,
            dead.display()
        );
        attempt += 1;
    };
    let elapsed = t0.elapsed();
    Ok((console, Some(elapsed), log_path))
}

/// Prints the set-up, the table and the caveats; fails on any problem
/// with the run.
fn report(
    plan: &Plan,
    console: &Console,
    elapsed: Option<Duration>,
    log_path: &Path,
) -> Result<(), BenchError> {
    let l2 = console.l2("fio");
    let runs: Vec<report::Run> = l2.iter().filter_map(|l| report::parse_run(l)).collect();
    let all: Vec<&str> = console.lines.iter().map(String::as_str).collect();
    let mapped = all
        .iter()
        .any(|l| l.starts_with("L1-BLK-LOG") && l.contains("served from its mapping"));

    println!(
        "rig fio: Debian {} as L2 (2 vCPUs, 512 MiB) under vmm in the nested rig (L1: QEMU TCG, -cpu max)",
        l2.iter()
            .find_map(|l| l.split("Linux version ").nth(1)?.split_whitespace().next())
            .unwrap_or("Linux")
    );
    println!(
        "two virtio-blk disks, 1 queue each, each a {} MiB file in L1's /tmp (tmpfs: storage at RAM speed, so the daemons' own cost shows):",
        plan.size_mib
    );
    println!(
        "  blk-backend --queues 1{} ({}); qemu-storage-daemon vhost-user-blk, aio=io_uring, cache.direct=off (tmpfs has no O_DIRECT on this kernel)",
        if plan.blk_args.is_empty() {
            String::new()
        } else {
            format!(" {}", plan.blk_args)
        },
        if mapped {
            "image on tmpfs: served from its mapping"
        } else {
            "image through io_uring"
        }
    );
    println!(
        "fio in L2: libaio, direct=1, bs=4k, 1 job, {} s measured after {} s ramp per run; {} round(s), disks alternating, first disk rotating per round; {} s warm-up per disk",
        plan.runtime_s, plan.ramp_s, plan.rounds, plan.warmup_s
    );
    println!();
    print!("{}", report::table(plan, &runs));
    println!();
    println!(
        "Absolute figures mean little: L2 runs inside a QEMU TCG guest, every instruction emulated; the ratio is the figure."
    );
    match elapsed {
        Some(t) => println!(
            "wall time: {:.0} s (L1 boot, L2 boot, warm-up and {} runs)",
            t.as_secs_f64(),
            plan.steps().len()
        ),
        None => println!("reported from {}", log_path.display()),
    }

    let mut problems = report::problems(plan, &runs);
    if console.stalled || console.timed_out || !console.finished() {
        problems.push(format!(
            "L1 did not run its script to the end (stalled: {}, timed out: {})",
            console.stalled, console.timed_out
        ));
    }
    match console.l2_status("fio") {
        Some(0) => {}
        s => problems.push(format!("vmm exit status of the L2: {s:?}")),
    }
    if !l2.iter().any(|l| l.contains("RIGFIO-DONE")) {
        problems.push("L2 did not reach the end of its script".to_string());
    }
    if Console::value(&l2, "nproc") != Some("2") {
        problems.push("L2 does not show 2 CPUs (RIGFIO-L2 nproc=)".to_string());
    }
    match Console::value(&l2, "RIGFIO-IOERRORS") {
        Some("0") => {}
        n => problems.push(format!("I/O errors in L2's kernel log: {n:?}")),
    }
    problems.extend(
        all.iter()
            .filter(|l| l.contains("RIGFIO-ERROR") || l.contains("L1-ERROR"))
            .map(|l| l.to_string()),
    );
    if all.iter().any(|l| l.contains("RIG-L2-RETRY")) {
        println!("note: L2 died of a triple fault once and was booted again (the figures are from the second boot)");
    }
    if problems.is_empty() {
        return Ok(());
    }
    eprintln!("rig-fio: console in {}", log_path.display());
    for p in &problems {
        eprintln!("rig-fio: problem: {p}");
    }
    Err(BenchError::Problems(problems.len()))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rig-fio: {}", rig::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
