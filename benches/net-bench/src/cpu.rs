//! CPU time per thread, to say what a frame costs each side of the
//! benchmark (the backend's worker, the driver, the raw reader or writer,
//! the thread on the namespace's socket).

use std::collections::HashMap;

/// CPU nanoseconds the calling thread has used so far.
pub fn thread_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill in.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU nanoseconds of this process's threads whose name starts with
/// `prefix`, by thread id (from `/proc/self/task/*/schedstat`).
pub fn threads_named(prefix: &str) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        let tid = entry.file_name().to_string_lossy().parse().ok();
        if let (Some(tid), Some(ns)) = (tid, ns) {
            out.insert(tid, ns);
        }
    }
    out
}

/// CPU nanoseconds the threads in `after` used since `before` (a thread
/// that was not there before counts from its start).
pub fn used_since(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_spinning_thread_is_found_and_charged_its_time() {
        let before = threads_named("cpu-test-spin");
        let (spun, done) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (spun_tx, exit_rx) = (spun.0, done.1);
        let t = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(move || {
                let start = thread_ns();
                let mut x = 0u64;
                while thread_ns() - start < 30_000_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                spun_tx.send(()).unwrap();
                let _ = exit_rx.recv();
                x
            })
            .unwrap();
        spun.1.recv().unwrap();
        let after = threads_named("cpu-test-spin");
        assert_eq!(after.len(), 1, "{after:?}");
        let used = used_since(&before, &after);
        assert!(
            (30_000_000..1_000_000_000).contains(&used),
            "{used} ns for a thread that spun 30 ms"
        );
        done.0.send(()).unwrap();
        t.join().unwrap();
        assert!(threads_named("cpu-test-spin").is_empty());
    }
}
