//! The tables: one row per case (size x load x transport), min / median /
//! max over its runs, against the targets; then where the downtime went.

use std::time::Duration;

use bench_harness::stats::{ms, us, Summary};

use crate::migrate::Sample;
use crate::{Args, Case, Transport};

/// The local live-upgrade downtime target (the HyperFresh paper's).
const LOCAL_TARGET: Duration = Duration::from_millis(10);
/// Cloud Hypervisor's local-migration prototype (quoted, not measured).
const CLOUD_HYPERVISOR: Duration = Duration::from_millis(50);
/// The size the local target is set at.
const LOCAL_TARGET_BYTES: u64 = 4 << 30;
const MIB: f64 = (1u64 << 20) as f64;

/// One series of a case's samples.
fn series(c: &Case, f: impl Fn(&Sample) -> Duration) -> Summary {
    Summary::of(c.samples.iter().map(f).collect()).expect("a case has samples")
}

/// The median of a case's byte counts (or any count).
fn median(c: &Case, f: impl Fn(&Sample) -> u64) -> u64 {
    let mut v: Vec<u64> = c.samples.iter().map(f).collect();
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// The median of a case's signed millisecond figures.
fn median_ms(c: &Case, f: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = c.samples.iter().map(f).collect();
    v.sort_unstable_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

fn target(a: &Args, t: Transport) -> Duration {
    match t {
        Transport::Local => LOCAL_TARGET,
        Transport::Tcp | Transport::Unix => Duration::from_millis(a.downtime_ms),
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

fn ratio(d: Duration, of: Duration) -> String {
    format!("{:.2}x", ms(d) / ms(of))
}

pub fn print(a: &Args, cases: &[Case], load: [String; 2]) {
    let cases: Vec<&Case> = cases.iter().filter(|c| !c.samples.is_empty()).collect();
    if cases.is_empty() {
        return;
    }
    println!("# Live migration (vmm to vmm on this host, test guest)\n");
    println!(
        "min / median / max over the runs. VMM downtime: the source's `migration completed` \
         event (VM paused -> the destination's Ok that it runs the VM). Guest max gap: the \
         largest gap between the guest's tick lines, read from the source's then the \
         destination's console, from the migration request on; at the switch: the gap \
         between the source's last tick and the destination's first. Normal gap: the median gap \
         before it (median over runs). Total: the same event's total_ms (request accepted -> \
         done). Sent: guest RAM bytes the destination received (its log; 0 when the memfd is \
         handed over). Targets: local {} ms (at 4 GiB; shown at every size), remote the \
         downtime_ms asked for ({} ms); met = the median is within it.\n",
        ms(LOCAL_TARGET),
        a.downtime_ms
    );
    println!(
        "| size | load | transport | runs | VMM downtime ms | guest gap at switch ms | guest max gap ms | normal gap µs | total ms | sent MiB | target | VMM / target | guest max / target | met (VMM) | met (guest) |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|");
    for c in &cases {
        let down = series(c, |s| s.completed.downtime);
        let gap = series(c, |s| s.gaps.max);
        let switch = series(c, |s| s.gaps.switch);
        let normal = series(c, |s| s.gaps.normal_p50);
        let total = series(c, |s| s.completed.total);
        let t = target(a, c.transport);
        let vs = match c.transport {
            Transport::Local => format!(
                "{} (CH 50 ms: {})",
                ratio(down.p50, t),
                ratio(down.p50, CLOUD_HYPERVISOR)
            ),
            _ => ratio(down.p50, t),
        };
        println!(
            "| {} | {:?} | {:?} | {} | {} | {} | {} | {:.0} | {} | {:.0} | <= {} ms | {vs} | {} | {} | {} |",
            c.size,
            c.load,
            c.transport,
            c.samples.len(),
            down.ms3(),
            switch.ms3(),
            gap.ms3(),
            us(normal.p50),
            total.ms3(),
            median(c, |s| s.breakdown.bytes) as f64 / MIB,
            ms(t),
            ratio(gap.p50, t),
            met(down.p50 <= t),
            met(gap.p50 <= t)
        );
    }
    println!(
        "\nWhere the downtime went (medians over the runs). Both VMMs' logs are stamped with \
         the wall clock, so are the tick lines' arrivals here: last source tick -> paused (the \
         source's `VM paused` line, once every vCPU is out; of which the pause: its \
         pausing -> paused events) -> dest resumed (the destination's `VM resumed`; of which \
         it builds the VM: its `VM built` line) -> first tick read from the destination; and \
         dest resumed -> source done (the Ok back: the end of the VMM's downtime). A log \
         line is written after what it reports, a ms or so late on a busy host, so a \
         difference can come out negative. Rounds: pre-copy rounds. Sent while paused: all \
         bytes received minus pre-copy's. Max gap at the switch: in how many runs the \
         largest gap was the switch, not a stall during pre-copy or after. Tick breaks: \
         tick numbers that did not follow (a lost or doubled line; should be 0).\n"
    );
    println!(
        "| size | load | transport | last source tick -> paused ms | of which the pause ms | paused -> dest resumed ms | of which dest builds the VM ms | dest resumed -> first tick ms | dest resumed -> source done ms | rounds | sent while paused MiB | last pre-copy round MB/s | max gap at the switch | tick breaks |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &cases {
        let p = series(c, |s| s.breakdown.paused_to_resumed);
        let b = series(c, |s| s.breakdown.build);
        let d = series(c, |s| s.breakdown.resumed_to_done);
        let at_switch = c.samples.iter().filter(|s| s.gaps.max_at_switch).count();
        let breaks: usize = c.samples.iter().map(|s| s.gaps.breaks).sum();
        println!(
            "| {} | {:?} | {:?} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.0} | {at_switch}/{} | {breaks} |",
            c.size,
            c.load,
            c.transport,
            median_ms(c, |s| s.before_pause_ms),
            ms(series(c, |s| s.completed.pause).p50),
            ms(p.p50),
            ms(b.p50),
            median_ms(c, |s| s.after_resume_ms),
            ms(d.p50),
            median(c, |s| u64::from(s.completed.rounds)),
            median(c, |s| s.breakdown.last_bytes) as f64 / MIB,
            median(c, |s| s.breakdown.bandwidth) as f64 / 1e6,
            c.samples.len()
        );
    }
    println!();
    for c in cases
        .iter()
        .filter(|c| c.transport == Transport::Local && c.bytes == LOCAL_TARGET_BYTES)
    {
        let down = series(c, |s| s.completed.downtime);
        let gap = series(c, |s| s.gaps.max);
        println!(
            "- local live upgrade at {} {:?}: VMM downtime median {:.2} ms = {} the {} ms target \
             ({}), {} Cloud Hypervisor's 50 ms; guest-seen {:.2} ms ({})",
            c.size,
            c.load,
            ms(down.p50),
            ratio(down.p50, LOCAL_TARGET),
            ms(LOCAL_TARGET),
            met(down.p50 <= LOCAL_TARGET),
            ratio(down.p50, CLOUD_HYPERVISOR),
            ms(gap.p50),
            met(gap.p50 <= LOCAL_TARGET)
        );
    }
    let remote: Vec<&&Case> = cases
        .iter()
        .filter(|c| c.transport != Transport::Local)
        .collect();
    if !remote.is_empty() {
        let t = Duration::from_millis(a.downtime_ms);
        let worst = remote
            .iter()
            .map(|c| series(c, |s| s.completed.downtime).p50)
            .max()
            .unwrap_or_default();
        println!(
            "- remote downtime <= downtime_ms ({} ms) in every case (median): {}; worst median {:.1} ms",
            a.downtime_ms,
            met(worst <= t),
            ms(worst)
        );
    }
    let mut guests: Vec<String> = cases
        .iter()
        .map(|c| format!("- {} {:?}: guest `{}`", c.size, c.load, c.cmdline))
        .collect();
    guests.dedup();
    for g in guests {
        println!("{g}");
    }
    println!(
        "- the guest-seen gap also holds up to one normal gap (the tick due during the pause) \
         and the host's read latency of two pipes; the VM moves between VMMs in a chain, each \
         size and load booted once"
    );
    println!(
        "- host load average (1 min) at start / end: {} / {} on {} CPUs: other work on this \
         host is in every number here",
        load[0],
        load[1],
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "- console lines stamped by a SCHED_FIFO reader thread (on arrival even on a busy \
         host): {}",
        if bench_harness::vmm::stamps_realtime() {
            "yes"
        } else {
            "no (no CAP_SYS_NICE): a stamp can be late by the reader's scheduling delay"
        }
    );
}
