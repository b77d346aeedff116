//! Start-up and memory overhead of `vmm` against QEMU `-M microvm`, both
//! booting the same test guest, in one run on the same machine.
//!
//! Start-up: from `exec` to the first byte the guest writes on its serial
//! port. RSS overhead: the process's resident memory minus the resident
//! part of guest RAM (every mapping of a `memfd:`, which both VMMs use
//! for guest RAM here), read once the guest has printed its last line and
//! is idle (`tg.hold` on its command line).
//!
//! `--baseline OLD_VMM` (repeatable) adds another vmm binary to the same
//! interleaved rounds (an A/B comparison of a change, with the ratio
//! new/old);
//! `--no-qemu` leaves QEMU out (A/B rounds only).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
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
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Repetitions per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Another vmm binary run in the same rounds, e.g. the one before a
    /// change (repeatable): its row (named by its file) and the ratio
    /// vmm/it are printed too.
    #[arg(long)]
    baseline: Vec<PathBuf>,
    /// Leave QEMU out (with --baseline: A/B rounds only).
    #[arg(long)]
    no_qemu: bool,
}

/// Start-up goal: vmm's median at most this fraction of QEMU microvm's.
const STARTUP_GOAL: f64 = 0.12;
/// The peer's row.
const QEMU: &str = "qemu microvm";
/// RSS overhead goal for vmm, MiB.
const RSS_GOAL_MIB: f64 = 3.3;

/// One measured boot.
struct Sample {
    first_byte: Duration,
    rss_overhead_kib: u64,
    anon_kib: u64,
}

/// Resident memory of a process, KiB, from its smaps.
#[derive(Debug, Default, PartialEq)]
struct Resident {
    /// Every mapping.
    total: u64,
    /// The memfd mappings (guest RAM).
    guest: u64,
    /// Anonymous pages outside guest RAM: heap, stacks, relocated and
    /// written data. Unlike the program's text and the shared libraries,
    /// no other process can share them, so they are what each further VM
    /// costs the host at least.
    anon: u64,
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn resident(pid: u32) -> Resident {
    parse_smaps(&std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default())
}

fn parse_smaps(smaps: &str) -> Resident {
    let (mut r, mut in_guest) = (Resident::default(), false);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next();
        let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            Some("Rss:") => {
                r.total += kib;
                if in_guest {
                    r.guest += kib;
                }
            }
            Some("Anonymous:") if !in_guest => r.anon += kib,
            Some(first) if first.contains('-') && line.split_whitespace().count() >= 5 => {
                in_guest = line.contains("/memfd:");
            }
            _ => {}
        }
    }
    r
}

fn measure(mut cmd: Command) -> Sample {
    let start = Instant::now();
    let mut child = spawn(&mut cmd);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = [0u8; 1];
    out.read_exact(&mut first).expect("guest wrote nothing");
    let first_byte = start.elapsed();
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("guest ended before finishing; is tg.hold supported?");
        }
        if line.contains("TG: PASS") || line.contains("TG: FAIL") || line.contains("TG: HOLD") {
            break;
        }
    }
    // Let the VMM settle after the guest went idle.
    std::thread::sleep(Duration::from_millis(200));
    let mem = resident(child.id());
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    Sample {
        first_byte,
        rss_overhead_kib: mem.total - mem.guest,
        anon_kib: mem.anon,
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let a = Args::parse();
    let mem = a.memory.to_string();
    let vmm = |bin: &PathBuf| {
        let mut c = Command::new(bin);
        c.arg("--kernel").arg(&a.guest).args([
            "--memory",
            &format!("{mem}M"),
            "--cmdline",
            "tg.hold",
        ]);
        c
    };
    let qemu = || {
        let mut c = Command::new(&a.qemu);
        c.args([
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-M",
            "microvm",
        ])
        .args(["-m", &format!("{mem}M"), "-nodefaults", "-no-user-config"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=ram,size={mem}M,share=on"),
        ])
        .args(["-machine", "memory-backend=ram"])
        .args(["-display", "none", "-serial", "stdio", "-debugcon", "null"])
        .arg("-kernel")
        .arg(&a.guest)
        .args(["-append", "tg.hold"]);
        c
    };
    let mut contenders: Vec<(String, Box<dyn Fn() -> Command>)> =
        vec![("vmm".into(), Box::new(|| vmm(&a.vmm)))];
    for old in &a.baseline {
        let name = old.file_name().unwrap_or_default().to_string_lossy();
        contenders.push((name.into_owned(), Box::new(move || vmm(old))));
    }
    if !a.no_qemu {
        contenders.push((QEMU.into(), Box::new(qemu)));
    }
    let mut results: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..a.runs {
        // Interleave so that all see the same machine state; rotate the
        // order so that none always runs first.
        for i in 0..contenders.len() {
            let k = (i + round) % contenders.len();
            results[k].push(measure(contenders[k].1()));
        }
    }
    println!(
        "startup: exec to first serial byte, {} runs each, {} MiB guest",
        a.runs, a.memory
    );
    println!(
        "KiB: resident memory outside guest RAM (min/med/max); anon: the median of its anonymous part, which no other process shares"
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9}   {:>10} {:>10} {:>10}   {:>10}",
        "", "min ms", "med ms", "max ms", "min KiB", "med KiB", "max KiB", "anon KiB"
    );
    let mut medians = vec![];
    for ((name, _), s) in contenders.iter().zip(&results) {
        let t = stats(s.iter().map(|x| x.first_byte.as_secs_f64() * 1e3).collect());
        let r = stats(s.iter().map(|x| x.rss_overhead_kib as f64).collect());
        let anon = stats(s.iter().map(|x| x.anon_kib as f64).collect());
        println!(
            "{name:<14} {:>9.2} {:>9.2} {:>9.2}   {:>10.0} {:>10.0} {:>10.0}   {:>10.0}",
            t.0, t.1, t.2, r.0, r.1, r.2, anon.1
        );
        medians.push((name.as_str(), t.1, r.1));
    }
    let (_, vmm_ms, vmm_kib) = medians[0];
    for &(name, ms, kib) in &medians[1..] {
        let goal = if name == QEMU {
            format!(" (goal <= {STARTUP_GOAL}x)")
        } else {
            String::new()
        };
        println!(
            "ratio vmm/{name}: start-up {:.3}x{goal}, RSS overhead {:.3}x",
            vmm_ms / ms,
            vmm_kib / kib,
        );
    }
    for &(name, _, kib) in medians.iter().filter(|m| m.0 != QEMU) {
        println!(
            "{name} RSS overhead {:.2} MiB (goal <= {RSS_GOAL_MIB} MiB: {})",
            kib / 1024.0,
            if kib / 1024.0 <= RSS_GOAL_MIB {
                "met"
            } else {
                "not met"
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_are_split_into_guest_ram_and_the_rest() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/vmm
Rss:                 800 kB
Anonymous:             0 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 5 /memfd:guest-ram (deleted)
Rss:                4096 kB
Anonymous:             0 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Rss:                 120 kB
Anonymous:           120 kB
";
        let r = parse_smaps(smaps);
        assert_eq!(
            r,
            Resident {
                total: 5016,
                guest: 4096,
                anon: 120
            }
        );
    }
}
