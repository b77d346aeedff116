//! Flooding a queue with malformed requests, as a hostile guest would, and
//! watching the backend daemon meanwhile: the lines it writes on stderr,
//! counted as they come, and its resident memory.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{FrontendError, Seg, SyntheticFrontend};
use crate::device::Used;
use crate::ratelimit::DEFAULT_BURST;

/// A malformed request.
#[derive(Clone, Debug)]
pub enum Bad {
    /// A chain as given (malformed by its content, lengths or directions);
    /// the device hands it back.
    Chain(Vec<Seg>),
    /// One descriptor chained to itself; the device hands it back.
    Loop(Seg),
    /// An available ring entry naming no descriptor (past the queue); the
    /// device can only drop it.
    HeadPastQueue,
}

/// Posts `bad` on queue `q` and kicks it; returns how many of them the
/// device must hand back. The caller keeps the chains in flight below the
/// queue size (wait for them with [`wait_returned`] between batches).
pub fn post(fe: &mut SyntheticFrontend, q: usize, bad: &[Bad]) -> Result<usize, FrontendError> {
    let (vq, mem) = fe.queue(q);
    let mut returned = 0;
    for b in bad {
        match b {
            Bad::Chain(segs) => {
                vq.add(mem, segs)?.ok_or(FrontendError::OutOfMemory)?;
                returned += 1;
            }
            Bad::Loop(seg) => {
                vq.add_loop(mem, seg)?.ok_or(FrontendError::OutOfMemory)?;
                returned += 1;
            }
            Bad::HeadPastQueue => vq.publish_raw(mem, vq.size().wrapping_add(7))?,
        }
    }
    vq.notify();
    Ok(returned)
}

/// A flood as issue 15 sets it: 10^6 malformed requests on one queue, 64
/// per kick, one valid request elsewhere between two batches; the daemon's
/// memory read after the first 20 000 and at the end, and allowed to grow
/// by 1 MiB; its log allowed two limiters' worth of lines.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    /// Queue the malformed requests go to.
    pub queue: usize,
    /// Malformed requests in all.
    pub total: usize,
    /// Malformed requests per kick.
    pub batch: usize,
    /// Requests taken before the first memory reading (allocators warm).
    pub warm_up: usize,
    /// Log limiters the flooded queue has (each lets
    /// [`DEFAULT_BURST`] lines a second through).
    pub limiters: usize,
    /// Lines the daemon may write apart from the flood (start-up, the
    /// frontend going away).
    pub other_lines: usize,
    /// Allowed growth of the daemon's VmRSS over the flood, KiB.
    pub rss_bound_kib: i64,
}

impl Default for Flood {
    fn default() -> Self {
        Flood {
            queue: 0,
            total: 1_000_000,
            batch: 64,
            warm_up: 20_000,
            // A queue's request handler and its vring.
            limiters: 2,
            other_lines: 20,
            rss_bound_kib: 1024,
        }
    }
}

/// What a flood measured.
#[derive(Debug)]
pub struct FloodReport {
    /// Malformed requests posted.
    pub posted: usize,
    /// Of those, handed back by the device.
    pub returned: usize,
    /// Time the flood took.
    pub elapsed: Duration,
    /// The daemon's log lines when its memory was first read.
    pub lines_before: usize,
    /// The daemon's VmRSS in KiB after the warm-up and at the end.
    pub rss_kib: (i64, i64),
    /// Latency of each valid request, in order.
    pub latencies: Vec<Duration>,
}

impl FloodReport {
    /// Growth of VmRSS over the flood, KiB.
    pub fn rss_growth_kib(&self) -> i64 {
        self.rss_kib.1 - self.rss_kib.0
    }

    /// The figures, for the test's output (`logged`: log lines in all).
    pub fn summary(&self, logged: usize) -> String {
        let mut sorted = self.latencies.clone();
        let [min, median, p99, max] = percentiles(&mut sorted);
        format!(
            "{} malformed requests ({} handed back) in {:.1?}; {logged} log lines ({} \
             before the warm-up point); VmRSS {} KiB after the warm-up, {} KiB at the end; \
             {} valid requests, latency min {min:?} median {median:?} p99 {p99:?} max {max:?}",
            self.posted,
            self.returned,
            self.elapsed,
            self.lines_before,
            self.rss_kib.0,
            self.rss_kib.1,
            self.latencies.len()
        )
    }
}

impl Flood {
    /// The most log lines the flood of `report` may leave.
    pub fn log_bound(&self, report: &FloodReport) -> usize {
        let seconds = report.elapsed.as_secs() as usize + 2;
        self.limiters * DEFAULT_BURST as usize * seconds + self.other_lines
    }

    /// Why the flood of `report` was not contained, if it was not: `logged`
    /// lines in all (none, or more than [`Self::log_bound`]), or VmRSS grown
    /// by more than `rss_bound_kib`.
    pub fn uncontained(&self, report: &FloodReport, logged: usize) -> Option<String> {
        let bound = self.log_bound(report);
        if logged == 0 {
            return Some("the malformed requests were never logged".into());
        }
        if logged > bound {
            return Some(format!(
                "{logged} log lines for {} malformed requests, bound {bound}",
                report.posted
            ));
        }
        (report.rss_growth_kib() > self.rss_bound_kib).then(|| {
            format!(
                "VmRSS grew from {} to {} KiB",
                report.rss_kib.0, report.rss_kib.1
            )
        })
    }

    /// Runs the flood through the driver `drv` (`fe` gives its frontend):
    /// `bad(i)` is the `i`th malformed request, `valid(drv, n)` makes the
    /// `n`th valid request and returns its latency. `pid` is the daemon's.
    pub fn run<D>(
        &self,
        drv: &mut D,
        fe: fn(&mut D) -> &mut SyntheticFrontend,
        (pid, lines): (u32, &LogLines),
        bad: impl Fn(usize) -> Bad,
        mut valid: impl FnMut(&mut D, usize) -> Duration,
        timeout: Duration,
    ) -> Result<FloodReport, FrontendError> {
        let start = std::time::Instant::now();
        let mut report = FloodReport {
            posted: 0,
            returned: 0,
            elapsed: Duration::ZERO,
            lines_before: 0,
            rss_kib: (0, 0),
            latencies: Vec::new(),
        };
        while report.posted < self.total {
            if report.posted >= self.warm_up && report.rss_kib.0 == 0 {
                report.rss_kib.0 = rss_kib(pid).unwrap_or(0);
                report.lines_before = lines.count();
            }
            let end = (report.posted + self.batch).min(self.total);
            let batch: Vec<Bad> = (report.posted..end).map(&bad).collect();
            let returned = post(fe(drv), self.queue, &batch)?;
            let n = report.latencies.len();
            report.latencies.push(valid(drv, n));
            wait_returned(fe(drv), self.queue, returned, timeout)?;
            report.posted = end;
            report.returned += returned;
        }
        report.elapsed = start.elapsed();
        report.rss_kib.1 = rss_kib(pid).unwrap_or(0);
        Ok(report)
    }
}

/// Waits until `n` chains came back on queue `q`, each wait up to `timeout`.
pub fn wait_returned(
    fe: &mut SyntheticFrontend,
    q: usize,
    n: usize,
    timeout: Duration,
) -> Result<(), FrontendError> {
    let mut used: Vec<Used> = Vec::new();
    let (vq, mem) = fe.queue(q);
    while used.len() < n {
        let want = u16::try_from(n - used.len()).unwrap_or(u16::MAX);
        vq.wait_used_batch(mem, timeout, &mut used, want)?;
    }
    Ok(())
}

/// Lines kept for a failure message.
const TAIL: usize = 8;

/// The lines a daemon writes, counted by a thread reading its stderr.
pub struct LogLines {
    count: Arc<AtomicUsize>,
    tail: Arc<Mutex<Vec<String>>>,
}

impl LogLines {
    /// Starts counting the lines `stderr` delivers, until it closes.
    pub fn watch(stderr: impl Read + Send + 'static) -> Self {
        let count = Arc::new(AtomicUsize::new(0));
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (c, t) = (count.clone(), tail.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                c.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut t) = t.lock() {
                    if t.len() == TAIL {
                        t.remove(0);
                    }
                    t.push(line);
                }
            }
        });
        LogLines { count, tail }
    }

    /// Lines so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The last few lines.
    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of /proc/PID/status),
/// or None if it cannot be read.
pub fn rss_kib(pid: u32) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Minimum, median, 99th percentile and maximum of `samples` (sorted here).
pub fn percentiles(samples: &mut [Duration]) -> [Duration; 4] {
    samples.sort();
    let at = |p: usize| {
        samples
            .get(samples.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or_default()
    };
    [at(0), at(50), at(99), at(100)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_and_the_last_kept() {
        let text: String = (0..10).map(|i| format!("line {i}\n")).collect();

        let lines = LogLines::watch(std::io::Cursor::new(text.into_bytes()));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lines.count() < 10 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }

        assert_eq!(lines.count(), 10);
        assert_eq!(lines.tail().first().map(String::as_str), Some("line 2"));
    }

    #[test]
    fn own_rss_is_read() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn percentiles_of_a_hundred_and_one() {
        let mut s: Vec<Duration> = (0..=100).rev().map(Duration::from_millis).collect();

        let p = percentiles(&mut s);

        assert_eq!(p.map(|d| d.as_millis()), [0, 50, 99, 100]);
    }
}
