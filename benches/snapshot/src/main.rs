//! Snapshot and restore of a real `vmm` running the test guest with all of
//! its RAM dirty (`tg.touch` writes every 4 KiB page above 1 MiB, then
//! `tg.count` prints `TG: count N` forever), at several guest sizes:
//!
//! 1. `PUT vm.snapshot` to a directory on /dev/shm (tmpfs), the VM paused
//!    beforehand: request sent to its 204 (the VMM answers once the memory
//!    file and the state are written), and the bytes the memory file
//!    really holds (`st_blocks * 512`; it is sparse).
//! 2. Restore to running, in a fresh `vmm --api-socket` that already
//!    answers `vmm.ping`: `PUT vm.restore` with `resume: true` sent to its
//!    204 (answered after the vCPUs are set running), and to the first
//!    whole `TG: count` line the restored guest prints. `Copy` fills a new
//!    memfd from the snapshot; `Map` makes the memory file itself guest RAM
//!    (it is consumed, so each run maps its own copy, made untimed).
//! 3. The limit for Copy, in the same run: the same memory file copied
//!    into a fresh memfd the way the VMM copies it (`copy_file_range` per
//!    data range), and `cp --sparse=always` tmpfs to tmpfs.
//!
//! Targets (the issue): restore to running <= 5 ms in Map mode at every
//! size (Firecracker published < 8 ms, without vhost-user); Copy >= 1 GB/s.
//! No peer: Cloud Hypervisor is not installed and, per the issue, fails
//! KVM_GET_NESTED_STATE on this host. A benchmark: nothing is asserted.

mod copy;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use thiserror::Error;

use bench_harness::stats::{gbps, ms, Summary};
use bench_harness::vmm::{Vmm, VmmError};
use bench_harness::Scratch;

/// The Map-mode restore-to-running target.
const MAP_TARGET: Duration = Duration::from_millis(5);
/// The Copy-mode throughput target, GB/s.
const COPY_TARGET_GBPS: f64 = 1.0;
/// Firecracker's published restore time (quoted, not measured here).
const FIRECRACKER_MS: f64 = 8.0;
/// Where snapshots go: tmpfs, so that Map can use them.
const SHM: &str = "/dev/shm";
/// Guest options: every page dirty, then a console line per round.
const CMDLINE: &str = "console=ttyS0 tg.touch tg.count";

#[derive(Parser)]
#[command(about = "Snapshot and restore-to-running time (Copy and Map) on dirty guest RAM")]
struct Args {
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
    /// Repetitions of each measurement per size.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Fewer repetitions for sizes of this many GiB and more (0: no cap).
    #[arg(long, default_value_t = 0)]
    big_gib: u64,
    /// Repetitions for the sizes `--big-gib` selects.
    #[arg(long, default_value_t = 3)]
    big_runs: usize,
    /// Longest wait for the booted guest to have touched its RAM.
    #[arg(long, default_value_t = 300)]
    boot_limit_s: u64,
}

/// Everything that stops the benchmark.
#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("Cannot use the scratch path {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    #[error("Copying {0} failed")]
    Copy(PathBuf, #[source] std::io::Error),
    #[error("'{0}' is not a size like 256M or 4G")]
    Size(String),
}

/// One restore mode's series at one size.
struct Restore {
    to_204: Summary,
    to_line: Summary,
}

/// Everything measured at one guest size.
struct Row {
    label: String,
    bytes: u64,
    runs: usize,
    snapshot: Summary,
    allocated: u64,
    copy: Restore,
    map: Restore,
    limit: Summary,
    limit_buffered: bool,
    one_copy: Summary,
    cp: Summary,
}

fn main() -> ExitCode {
    bench_harness::exit("snapshot-bench", run(&Args::parse()))
}

fn run(a: &Args) -> Result<(), BenchError> {
    let sizes = bench_harness::parse_sizes(&a.sizes).map_err(BenchError::Size)?;
    let scratch = Scratch::new(Path::new(SHM), "snapshot-bench")
        .map_err(|e| BenchError::Scratch(SHM.into(), e))?;
    let mut rows = Vec::new();
    let mut result = Ok(());
    for (label, bytes) in sizes {
        let runs = if a.big_gib > 0 && bytes >= a.big_gib << 30 {
            a.big_runs
        } else {
            a.runs
        };
        match measure(a, scratch.path(), label, bytes, runs.max(1)) {
            Ok(r) => rows.push(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    report(&rows);
    result
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn measure(
    a: &Args,
    scratch: &Path,
    label: String,
    bytes: u64,
    runs: usize,
) -> Result<Row, BenchError> {
    let snap = scratch.join(format!("snap-{label}"));
    let mem = snap.join("memory");
    let socket = scratch.join("vmm.sock");

    // 1. Boot, dirty every page, snapshot `runs` times.
    eprintln!("snapshot-bench: {label}: booting, touching every page");
    let mut src = Vmm::boot(&a.vmm, &a.guest, &label, CMDLINE, socket.clone())?;
    src.wait_line("TG: count", Duration::from_secs(a.boot_limit_s))?;
    let body = format!("{{\"destination_url\":\"{}\"}}", url(&snap));
    let mut snaps = Vec::with_capacity(runs);
    let mut allocated = 0;
    for i in 0..runs {
        let _ = std::fs::remove_dir_all(&snap);
        src.timed("PUT", "vm.pause", "", 204)?;
        snaps.push(src.timed("PUT", "vm.snapshot", &body, 204)?.1);
        allocated = copy::allocated(&mem).map_err(|e| BenchError::Scratch(mem.clone(), e))?;
        src.timed("PUT", "vm.resume", "", 204)?;
        if i + 1 < runs {
            src.skip_lines();
            src.wait_line("TG: count", Duration::from_secs(10))?;
        }
    }
    drop(src);
    eprintln!("snapshot-bench: {label}: snapshot {allocated} bytes allocated; limits");

    // 2. The limit: the same copy as Copy restore's, and cp.
    let file = File::open(&mem).map_err(|e| BenchError::Copy(mem.clone(), e))?;
    let (mut limit, mut buffered) = (Vec::with_capacity(runs), false);
    for _ in 0..runs {
        let dst = copy::memfd(bytes).map_err(|e| BenchError::Copy(mem.clone(), e))?;
        let t = Instant::now();
        let c =
            copy::copy_data(&file, &dst, bytes).map_err(|e| BenchError::Copy(mem.clone(), e))?;
        limit.push(t.elapsed());
        buffered |= c.buffered;
    }
    let mut one_copy = Vec::with_capacity(runs);
    for _ in 0..runs {
        let dst = copy::memfd(bytes).map_err(|e| BenchError::Copy(mem.clone(), e))?;
        let t = Instant::now();
        copy::read_into_mapping(&file, &dst, bytes)
            .map_err(|e| BenchError::Copy(mem.clone(), e))?;
        one_copy.push(t.elapsed());
    }
    drop(file);
    let cp_dst = scratch.join("cp-memory");
    let mut cp = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        cp_sparse(&mem, &cp_dst)?;
        cp.push(t.elapsed());
        let _ = std::fs::remove_file(&cp_dst);
    }

    // 3. Restores.
    eprintln!("snapshot-bench: {label}: Copy restores");
    let copy = restores(a, &socket, runs, || Ok((snap.clone(), "Copy")))?;
    eprintln!("snapshot-bench: {label}: Map restores");
    let map_dir = scratch.join("map");
    let map = restores(a, &socket, runs, || {
        let _ = std::fs::remove_dir_all(&map_dir);
        std::fs::create_dir_all(&map_dir).map_err(|e| BenchError::Scratch(map_dir.clone(), e))?;
        for f in ["state", "memory"] {
            cp_sparse(&snap.join(f), &map_dir.join(f))?;
        }
        Ok((map_dir.clone(), "Map"))
    })?;
    let _ = std::fs::remove_dir_all(&map_dir);
    let _ = std::fs::remove_dir_all(&snap);

    let sum = |v| Summary::of(v).expect("at least one run");
    Ok(Row {
        label,
        bytes,
        runs,
        snapshot: sum(snaps),
        allocated,
        copy,
        map,
        limit: sum(limit),
        limit_buffered: buffered,
        one_copy: sum(one_copy),
        cp: sum(cp),
    })
}

/// `runs` restores, each in a fresh VMM, of the snapshot `prepare` names
/// (untimed) in the mode it names.
fn restores(
    a: &Args,
    socket: &Path,
    runs: usize,
    mut prepare: impl FnMut() -> Result<(PathBuf, &'static str), BenchError>,
) -> Result<Restore, BenchError> {
    let (mut to_204, mut to_line) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let (dir, mode) = prepare()?;
        let body = format!(
            "{{\"source_url\":\"{}\",\"resume\":true,\"memory_restore_mode\":\"{mode}\"}}",
            url(&dir)
        );
        let mut vmm = Vmm::empty(&a.vmm, socket.to_path_buf())?;
        let (sent, took) = vmm.timed("PUT", "vm.restore", &body, 204)?;
        let line = vmm.wait_line("TG: count", Duration::from_secs(30))?;
        to_204.push(took);
        to_line.push(line - sent);
    }
    Ok(Restore {
        to_204: Summary::of(to_204).expect("at least one run"),
        to_line: Summary::of(to_line).expect("at least one run"),
    })
}

fn cp_sparse(from: &Path, to: &Path) -> Result<(), BenchError> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| BenchError::Copy(from.into(), e))?;
    if st.success() {
        Ok(())
    } else {
        Err(BenchError::Copy(
            from.into(),
            std::io::Error::other(format!("cp: {st}")),
        ))
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

fn report(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!("# Snapshot and restore (vmm, test guest `{CMDLINE}`, snapshots on {SHM})\n");
    println!(
        "min / median / max in ms. memory = bytes the sparse memory file holds \
         (st_blocks*512). GB/s: snapshot = memory / median snapshot; Copy = \
         memory / median restore->204.\n"
    );
    println!(
        "| size | runs | mode | snapshot ms | snapshot GB/s | memory bytes | restore->204 ms | restore->first line ms | GB/s | target | |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|");
    for r in rows {
        let snap_gbps = gbps(r.allocated, r.snapshot.p50);
        let copy_gbps = gbps(r.allocated, r.copy.to_204.p50);
        println!(
            "| {} | {} | Copy | {} | {snap_gbps:.2} | {} | {} | {} | {copy_gbps:.2} | >= {COPY_TARGET_GBPS} GB/s | {} |",
            r.label,
            r.runs,
            r.snapshot.ms3(),
            r.allocated,
            r.copy.to_204.ms3(),
            r.copy.to_line.ms3(),
            met(copy_gbps >= COPY_TARGET_GBPS)
        );
        println!(
            "| {} | {} | Map | (same) | | | {} | {} | - | <= {} ms | {} |",
            r.label,
            r.runs,
            r.map.to_204.ms3(),
            r.map.to_line.ms3(),
            ms(MAP_TARGET),
            met(r.map.to_204.p50 <= MAP_TARGET)
        );
    }
    println!(
        "\nThe limit for Copy, same memory file, same run: the VMM's copy alone \
         (SEEK_DATA/SEEK_HOLE + copy_file_range into a fresh memfd of the guest's size) \
         (\"(buffered)\": the kernel refused it across the two tmpfs mounts and the 1 MiB \
         buffer did it, as in the VMM), `pread` straight into a shared mapping of the memfd \
         (one copy, no buffer), and `cp --sparse=always` tmpfs to tmpfs:\n"
    );
    println!(
        "| size | VMM's copy into memfd ms | GB/s | pread into mapped memfd ms | GB/s | cp --sparse=always ms | GB/s | Copy restore->204 / VMM's copy | / pread | / cp |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {}{} | {:.2} | {} | {:.2} | {} | {:.2} | {:.2}x | {:.2}x | {:.2}x |",
            r.label,
            r.limit.ms3(),
            if r.limit_buffered { " (buffered)" } else { "" },
            gbps(r.allocated, r.limit.p50),
            r.one_copy.ms3(),
            gbps(r.allocated, r.one_copy.p50),
            r.cp.ms3(),
            gbps(r.allocated, r.cp.p50),
            ms(r.copy.to_204.p50) / ms(r.limit.p50),
            ms(r.copy.to_204.p50) / ms(r.one_copy.p50),
            ms(r.copy.to_204.p50) / ms(r.cp.p50)
        );
    }
    println!();
    let map_all = rows.iter().all(|r| r.map.to_204.p50 <= MAP_TARGET);
    let copy_all = rows
        .iter()
        .all(|r| gbps(r.allocated, r.copy.to_204.p50) >= COPY_TARGET_GBPS);
    println!(
        "- Map restore->running <= {} ms at every size (median): {}; worst median {:.2} ms \
         (Firecracker published < {FIRECRACKER_MS} ms without vhost-user; quoted, not measured)",
        ms(MAP_TARGET),
        met(map_all),
        rows.iter()
            .map(|r| ms(r.map.to_204.p50))
            .fold(0.0, f64::max)
    );
    println!(
        "- Copy >= {COPY_TARGET_GBPS} GB/s at every size (median): {}",
        met(copy_all)
    );
    println!(
        "- restore->first line includes up to one `tg.count` round of the guest (it prints \
         once per round), so it bounds, not measures, the time to the first guest instruction"
    );
    println!(
        "- no peer: Cloud Hypervisor is not installed and, per the issue, fails \
         KVM_GET_NESTED_STATE on this host; ours against the limit and the targets"
    );
    for r in rows {
        if r.bytes != 0 && r.allocated < r.bytes / 2 {
            println!(
                "- {}: only {} of {} bytes were allocated: is the guest's RAM dirty?",
                r.label, r.allocated, r.bytes
            );
        }
    }
}
