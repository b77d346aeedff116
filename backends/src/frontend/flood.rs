//! Flooding a queue with malformed requests, as a hostile guest would, and
//! watching the backend daemon meanwhile: the lines it writes on stderr,
//! counted as they come, and its resident memory.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{FrontendError, Seg, SyntheticFrontend};
use crate::device::Used;

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
