//! L2's `RIGFIO-RUN` lines: parsed, checked against the plan, summarised.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::plan::{Disk, Plan, WARMUP};

/// What one good fio run measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One `RIGFIO-RUN` line: a sample, or why the run does not count.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub round: u32,
    pub disk: Disk,
    pub workload: String,
    pub result: Result<Sample, String>,
}

/// The `key=value` tokens of a line.
fn fields(s: &str) -> BTreeMap<&str, &str> {
    s.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .collect()
}

/// Parses `RIGFIO-RUN round=R disk=D dev=V workload=W rc=N err=E iops=I
/// p50_us=P p99_us=Q` anywhere in `line` (a kernel message may come first
/// on the same console line). `None` if the line is not a run line or lacks
/// round, disk or workload; a run line that does not show a clean run
/// (rc and fio's error field 0, positive IOPS, both latencies) is a `Run`
/// whose result says what is wrong.
pub fn parse_run(line: &str) -> Option<Run> {
    let (_, rest) = line.split_once("RIGFIO-RUN ")?;
    let f = fields(rest);
    let round = f.get("round")?.parse().ok()?;
    let disk = Disk::from_key(f.get("disk")?)?;
    let workload = f.get("workload")?.to_string();
    let number = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
    let result = if f.get("rc") != Some(&"0") {
        Err(format!(
            "fio exit status {}",
            f.get("rc").unwrap_or(&"missing")
        ))
    } else if let Some(t) = f.get("terse") {
        Err(format!("fio terse output {t}"))
    } else if f.get("err") != Some(&"0") {
        Err(format!("fio error {}", f.get("err").unwrap_or(&"missing")))
    } else {
        match (number("iops"), number("p50_us"), number("p99_us")) {
            (Some(iops), Some(p50_us), Some(p99_us)) if iops > 0.0 => Ok(Sample {
                iops,
                p50_us,
                p99_us,
            }),
            _ => Err("no IOPS or latency figures".to_string()),
        }
    };
    Some(Run {
        round,
        disk,
        workload,
        result,
    })
}

/// Everything wrong with `runs` against `plan`: failed runs (warm-up
/// included), planned runs with no line, runs seen twice.
pub fn problems(plan: &Plan, runs: &[Run]) -> Vec<String> {
    let mut out = Vec::new();
    for r in runs {
        if let Err(why) = &r.result {
            out.push(format!(
                "round {} {} on {}: {why}",
                r.round,
                r.workload,
                r.disk.label()
            ));
        }
    }
    let count = |round: u32, disk: Disk, workload: &str| {
        runs.iter()
            .filter(|r| r.round == round && r.disk == disk && r.workload == workload)
            .count()
    };
    let mut expected: Vec<(u32, Disk, String)> = plan
        .steps()
        .into_iter()
        .map(|s| (s.round, s.disk, s.workload.name().to_string()))
        .collect();
    if plan.warmup_s > 0 {
        for disk in Disk::ALL {
            expected.push((crate::plan::WARMUP_ROUND, disk, WARMUP.to_string()));
        }
    }
    for (round, disk, workload) in expected {
        match count(round, disk, &workload) {
            1 => {}
            0 => out.push(format!(
                "round {round} {workload} on {}: no result",
                disk.label()
            )),
            n => out.push(format!(
                "round {round} {workload} on {}: {n} results",
                disk.label()
            )),
        }
    }
    out
}

/// min, median, max (the mean of the middle two for an even count).
pub fn summary(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((v[0], median, v[n - 1]))
}

/// The good samples of `disk` for `workload` (warm-up excluded).
fn samples<'a>(
    runs: &'a [Run],
    disk: Disk,
    workload: &'a str,
) -> impl Iterator<Item = Sample> + 'a {
    runs.iter()
        .filter(move |r| r.disk == disk && r.workload == workload && r.workload != WARMUP)
        .filter_map(|r| r.result.as_ref().ok().copied())
}

/// The IOPS ratios blk-backend / qemu-storage-daemon of one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratio {
    pub workload: String,
    /// Of the two medians over all good runs.
    pub of_medians: Option<f64>,
    /// Per round whose two runs (back to back) are both good: min, median,
    /// max. Less exposed to a load change on the machine between rounds.
    pub paired: Option<(f64, f64, f64)>,
}

/// The ratios blk-backend / qemu-storage-daemon per workload.
pub fn ratios(plan: &Plan, runs: &[Run]) -> Vec<Ratio> {
    plan.workloads
        .iter()
        .map(|w| {
            let med =
                |d| summary(samples(runs, d, w.name()).map(|s| s.iops).collect()).map(|s| s.1);
            let of_medians = match (med(Disk::Blk), med(Disk::Qsd)) {
                (Some(b), Some(q)) if q > 0.0 => Some(b / q),
                _ => None,
            };
            let iops = |round: u32, disk: Disk| {
                runs.iter()
                    .find(|r| r.round == round && r.disk == disk && r.workload == w.name())
                    .and_then(|r| r.result.as_ref().ok())
                    .map(|s| s.iops)
            };
            let pairs = (1..=plan.rounds)
                .filter_map(|r| Some(iops(r, Disk::Blk)? / iops(r, Disk::Qsd)?))
                .collect();
            Ratio {
                workload: w.name().to_string(),
                of_medians,
                paired: summary(pairs),
            }
        })
        .collect()
}

/// The table: per workload and disk, good runs, IOPS min/median/max and the
/// medians of p50 and p99; then the ratio of the IOPS medians.
pub fn table(plan: &Plan, runs: &[Run]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | disk served by | runs ok | IOPS min / median / max | p50 µs (median) | p99 µs (median) |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|");
    for w in &plan.workloads {
        for disk in Disk::ALL {
            let s: Vec<Sample> = samples(runs, disk, w.name()).collect();
            let iops = summary(s.iter().map(|s| s.iops).collect());
            let p50 = summary(s.iter().map(|s| s.p50_us).collect());
            let p99 = summary(s.iter().map(|s| s.p99_us).collect());
            let iops = iops.map_or("-".to_string(), |(a, m, b)| {
                format!("{a:.0} / {m:.0} / {b:.0}")
            });
            let p50 = p50.map_or("-".to_string(), |s| format!("{:.0}", s.1));
            let p99 = p99.map_or("-".to_string(), |s| format!("{:.0}", s.1));
            let _ = writeln!(
                t,
                "| {} | {} | {}/{} | {iops} | {p50} | {p99} |",
                w.name(),
                disk.label(),
                s.len(),
                plan.rounds,
            );
        }
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| workload | blk-backend / qemu-storage-daemon: ratio of median IOPS | per-round ratio min / median / max |"
    );
    let _ = writeln!(t, "|---|---:|---:|");
    for r in ratios(plan, runs) {
        let m = r.of_medians.map_or("-".to_string(), |r| format!("{r:.2}x"));
        let p = r.paired.map_or("-".to_string(), |(a, m, b)| {
            format!("{a:.2}x / {m:.2}x / {b:.2}x")
        });
        let _ = writeln!(t, "| {} | {m} | {p} |", r.workload);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Workload;

    fn plan(rounds: u32) -> Plan {
        Plan {
            rounds,
            runtime_s: 5,
            ramp_s: 1,
            warmup_s: 0,
            size_mib: 256,
            blk_args: String::new(),
            workloads: vec![Workload::RandRead4kQd32],
        }
    }

    fn line(round: u32, disk: &str, iops: u32) -> String {
        format!(
            "RIGFIO-RUN round={round} disk={disk} dev=vda workload=randread-4k-qd32 rc=0 err=0 iops={iops} p50_us=300 p99_us=900"
        )
    }

    #[test]
    fn clean_run_line_gives_its_figures() {
        let run = parse_run(&line(2, "qsd", 1234)).unwrap();

        assert_eq!(run.round, 2);
        assert_eq!(run.disk, Disk::Qsd);
        assert_eq!(run.workload, "randread-4k-qd32");
        assert_eq!(
            run.result,
            Ok(Sample {
                iops: 1234.0,
                p50_us: 300.0,
                p99_us: 900.0
            })
        );
    }

    #[test]
    fn run_line_after_a_kernel_message_on_the_same_line_is_found() {
        let run = parse_run(&format!(
            "[   12.3] random: crng init done{}",
            line(1, "blk", 5)
        ));

        assert_eq!(run.map(|r| r.disk), Some(Disk::Blk));
    }

    #[test]
    fn nonzero_exit_status_fails_the_run() {
        let run = parse_run(
            "RIGFIO-RUN round=1 disk=blk dev=vda workload=randread-4k-qd1 rc=1 err=5 iops=100 p50_us=1 p99_us=2",
        )
        .unwrap();

        assert_eq!(run.result, Err("fio exit status 1".to_string()));
    }

    #[test]
    fn fio_error_field_fails_a_run_that_exited_0() {
        let run = parse_run(
            "RIGFIO-RUN round=1 disk=blk dev=vda workload=randread-4k-qd1 rc=0 err=5 iops=100 p50_us=1 p99_us=2",
        )
        .unwrap();

        assert_eq!(run.result, Err("fio error 5".to_string()));
    }

    #[test]
    fn missing_terse_line_fails_the_run() {
        let run = parse_run(
            "RIGFIO-RUN round=1 disk=qsd dev=vdb workload=randread-4k-qd1 rc=0 terse=missing",
        )
        .unwrap();

        assert_eq!(run.result, Err("fio terse output missing".to_string()));
    }

    #[test]
    fn zero_iops_fails_the_run() {
        let run = parse_run(
            "RIGFIO-RUN round=1 disk=qsd dev=vdb workload=randread-4k-qd1 rc=0 err=0 iops=0 p50_us=0 p99_us=0",
        )
        .unwrap();

        assert!(run.result.is_err());
    }

    #[test]
    fn other_lines_are_not_runs() {
        assert_eq!(parse_run("RIGFIO-DISKS blk=vda qsd=vdb"), None);
    }

    #[test]
    fn failed_and_missing_runs_are_problems_and_are_left_out_of_the_median() {
        let runs: Vec<Run> = [
            line(1, "blk", 100),
            line(1, "qsd", 50),
            line(2, "qsd", 60),
            "RIGFIO-RUN round=2 disk=blk dev=vda workload=randread-4k-qd32 rc=1 terse=missing"
                .into(),
            line(3, "blk", 300),
        ]
        .iter()
        .filter_map(|l| parse_run(l))
        .collect();

        let problems = problems(&plan(3), &runs);
        let ratio = ratios(&plan(3), &runs)[0].of_medians.unwrap();

        assert_eq!(
            problems,
            [
                "round 2 randread-4k-qd32 on blk-backend: fio exit status 1",
                "round 3 randread-4k-qd32 on qemu-storage-daemon: no result",
            ]
        );
        // blk: median of 100 and 300; qsd: median of 50 and 60.
        assert!((ratio - 200.0 / 55.0).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn per_round_ratios_pair_the_two_disks_of_the_same_round() {
        let runs: Vec<Run> = [
            line(1, "blk", 100),
            line(1, "qsd", 50),
            line(2, "qsd", 400),
            line(2, "blk", 200),
            line(3, "blk", 300),
        ]
        .iter()
        .filter_map(|l| parse_run(l))
        .collect();

        let paired = ratios(&plan(3), &runs)[0].paired;

        // Rounds 1 and 2 only: round 3 has no qemu-storage-daemon run.
        assert_eq!(paired, Some((0.5, 1.25, 2.0)));
    }

    #[test]
    fn median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(summary(vec![3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
    }
}
