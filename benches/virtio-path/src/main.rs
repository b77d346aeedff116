//! The I/O path through the VMM, side by side with QEMU: both boot the same
//! test guest with a `vhost-user-blk-pci` disk served by the same
//! blk-backend, and the guest times N one-at-a-time 4 KiB reads.
//!
//! - Exits per guest I/O: `perf stat` counts `kvm:kvm_userspace_exit` of the
//!   whole VM process, MMIO exits and all exits, for a run with N timed reads
//!   and a run with 1; the difference divided by N-1 is what the I/O cost
//!   in exits to the VMM (target 0: notifies go to an ioeventfd, completions
//!   come back through an irqfd).
//! - Round trip: TSC from just before the guest's queue notify to the entry
//!   of its MSI-X handler (notify -> backend -> completion -> interrupt),
//!   converted to microseconds with the host TSC rate.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    #[arg(long, default_value = "target/release/blk-backend")]
    blk_backend: PathBuf,
    #[arg(
        long,
        default_value = "vmm/test-guest/target/x86_64-unknown-none/release/test-guest"
    )]
    guest: PathBuf,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Repetitions per VMM.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Timed reads per run.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
}

/// One VM run: exits counted by perf and the guest's latency line.
struct Sample {
    mmio_exits: u64,
    all_exits: u64,
    /// min, p50, p99, max in TSC cycles.
    lat: Option<[u64; 4]>,
}

fn perf_wrapped(cmd: &[String], csv: &std::path::Path) -> Command {
    let mut c = Command::new("perf");
    c.args(["stat", "-x,", "-o"])
        .arg(csv)
        .args(["-e", "kvm:kvm_userspace_exit", "--filter", "reason == 6"])
        .args(["-e", "kvm:kvm_userspace_exit", "--"])
        .args(cmd);
    c
}

fn run_one(cmd: &[String], work: &std::path::Path) -> Sample {
    let csv = work.join("perf.csv");
    let mut child: Child = perf_wrapped(cmd, &csv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run perf (apt-get install linux-perf)");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lat = None;
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(rest) = line.trim().strip_prefix("TG: blk lat n=") {
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|f| f.split_once('=').and_then(|(_, v)| v.parse().ok()))
                .collect();
            lat = v.try_into().ok();
        }
        if line.contains("TG: FAIL") {
            panic!("guest failed: {line}");
        }
        if line.contains("TG: HOLD") || line.contains("TG: PASS") {
            // QEMU microvm has no i8042: stop the VM ourselves.
            std::thread::sleep(Duration::from_millis(100));
            kill_children(child.id());
        }
    }
    let _ = child.wait();
    let text = std::fs::read_to_string(&csv).unwrap_or_default();
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("kvm:kvm_userspace_exit"))
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .collect();
    Sample {
        mmio_exits: counts.first().copied().unwrap_or(0),
        all_exits: counts.get(1).copied().unwrap_or(0),
        lat,
    }
}

/// SIGTERM to the VM process under perf (perf then prints its counts).
fn kill_children(pid: u32) {
    let path = format!("/proc/{pid}/task/{pid}/children");
    for c in std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Ok(c) = c.parse::<i32>() {
            // SAFETY: kill(2) on a process we started.
            unsafe { libc::kill(c, libc::SIGTERM) };
        }
    }
}

fn tsc_per_us() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let i0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / i0.elapsed().as_secs_f64() / 1e6
}

/// Per VMM: name, then per run MMIO exits/IO, all exits/IO, p50 us, p99 us.
type Row = (&'static str, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let a = Args::parse();
    let work = std::env::temp_dir().join(format!("virtio-path-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = work.join("blk.sock");
    let mut backend = Command::new(&a.blk_backend)
        .arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .stderr(Stdio::null())
        .spawn()
        .expect("start blk-backend");
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let guest = a.guest.display().to_string();
    let sock_s = sock.display().to_string();
    let ours = |n: u64| -> Vec<String> {
        vec![
            a.vmm.display().to_string(),
            "--kernel".into(),
            guest.clone(),
            "--memory".into(),
            "128M".into(),
            "--cmdline".into(),
            format!("tg.virtio tg.blklat={n}"),
            "--disk".into(),
            format!("socket={sock_s}"),
        ]
    };
    let qemu = |n: u64| -> Vec<String> {
        [
            a.qemu.as_str(),
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-M",
            "microvm,pcie=on,memory-backend=mem",
            "-m",
            "128M",
            "-object",
            "memory-backend-memfd,id=mem,size=128M,share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-debugcon",
            "file:/dev/null",
            "-no-reboot",
            "-chardev",
            &format!("socket,id=c0,path={sock_s}"),
            "-device",
            "vhost-user-blk-pci,chardev=c0,num-queues=1",
            "-kernel",
            &guest,
            "-append",
            &format!("tg.virtio tg.nommio tg.hold tg.ecam=0xe0000000 tg.barbase=0xc0000000 tg.blklat={n}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let rate = tsc_per_us();
    let n = a.requests;
    let mut rows: Vec<Row> = vec![];
    for (name, cmd) in [
        ("vmm", &ours as &dyn Fn(u64) -> Vec<String>),
        ("qemu microvm", &qemu),
    ] {
        let (mut mmio, mut all, mut p50, mut p99) = (vec![], vec![], vec![], vec![]);
        for _ in 0..a.runs {
            let base = run_one(&cmd(1), &work);
            let busy = run_one(&cmd(n), &work);
            let per = |b: u64, x: u64| (b as f64 - x as f64) / (n - 1) as f64;
            mmio.push(per(busy.mmio_exits, base.mmio_exits));
            all.push(per(busy.all_exits, base.all_exits));
            let l = busy.lat.expect("no latency line from the guest");
            p50.push(l[1] as f64 / rate);
            p99.push(l[2] as f64 / rate);
        }
        rows.push((name, mmio, all, p50, p99));
    }
    let _ = backend.kill();
    let _ = backend.wait();
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "virtio-blk through blk-backend: {n} timed 4 KiB reads per run, {} runs per VMM, TSC {:.0} MHz",
        a.runs, rate
    );
    println!(
        "{:<14} {:>22} {:>22} {:>26} {:>26}",
        "",
        "MMIO exits/IO min/med/max",
        "all exits/IO min/med/max",
        "round trip p50 us min/med/max",
        "p99 us min/med/max"
    );
    let mut med = vec![];
    for (name, mmio, all, p50, p99) in rows {
        let f = |v: Vec<f64>, d: usize| {
            let (lo, m, hi) = stats(v);
            (format!("{lo:.d$}/{m:.d$}/{hi:.d$}"), m)
        };
        let (m1, _) = f(mmio, 3);
        let (m2, _) = f(all, 3);
        let (m3, p50m) = f(p50, 1);
        let (m4, p99m) = f(p99, 1);
        println!("{name:<14} {m1:>22} {m2:>22} {m3:>26} {m4:>26}");
        med.push((p50m, p99m));
    }
    println!(
        "ratio vmm/qemu round trip: p50 {:.2}x, p99 {:.2}x",
        med[0].0 / med[1].0,
        med[0].1 / med[1].1
    );
}
