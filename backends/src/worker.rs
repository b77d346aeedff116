//! One worker thread per queue, sleeping either in the handler's io_uring
//! (when [`QueueHandler::uring`] offers one: the ring polls the kick and stop
//! eventfds itself, and one `io_uring_enter` both submits and waits), or in an
//! epoll loop over the queue's kick eventfd, the handler's completion eventfd
//! and a stop eventfd.
//!
//! Kick: pop every available chain, start it, submit the batch once (a long
//! batch every [`PUBLISH_EVERY`] chains, publishing what finished meanwhile).
//! Completion: reap, publish in the used ring, notify once.
//! Stop: drain what is in flight, then return the next available index.
//!
//! Adaptive polling (as QEMU's iothreads do), up to [`Worker::poll`]: after
//! the last piece of work the worker busy-polls the completion queue and
//! the available ring for a window before it sleeps; a completion or a new
//! request found by polling costs no wake-up, on either side, since the
//! driver is told (notifications disabled) that it need not kick a queue
//! being polled. The window follows how long the worker really slept: it
//! grows (doubling from [`POLL_START`]) while sleeps were short enough for a
//! longer window to have caught their work, and shrinks when a sleep was
//! longer than the largest window (an idle queue polls not at all).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{QueueHandler, Used};
use crate::memory::GuestMemoryShared;
use crate::seccomp::{self, ThreadKind};
use crate::uring::Uring;
use crate::vring::Vring;

/// Errors starting a worker.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// epoll or eventfd setup failed.
    #[error("Cannot set up worker polling")]
    Poll(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("Cannot spawn worker thread")]
    Spawn(#[source] std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Kick,
    Completion,
    Stop,
}

impl Token {
    fn from_u64(v: u64) -> Option<Token> {
        [Token::Kick, Token::Completion, Token::Stop]
            .into_iter()
            .find(|t| *t as u64 == v)
    }
}

/// Chains popped in one go before the batch so far is submitted and what
/// finished is published.
const PUBLISH_EVERY: usize = 32;

/// The first polling window once sleeps turn out short.
pub const POLL_START: Duration = Duration::from_micros(4);

/// The adaptive busy-poll window of one worker.
#[derive(Clone, Copy, Debug)]
pub struct PollWindow {
    max: Duration,
    now: Duration,
}

impl PollWindow {
    /// A window that may grow up to `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            now: Duration::ZERO,
        }
    }

    /// How long to poll after the last work found.
    pub fn get(&self) -> Duration {
        self.now
    }

    /// Adapts the window to a sleep of `slept` that followed it.
    pub fn slept(&mut self, slept: Duration) {
        if self.max.is_zero() {
            return;
        }
        if slept > self.max {
            // Nothing came for longer than any window: polling was waste.
            self.now /= 2;
            if self.now < POLL_START {
                self.now = Duration::ZERO;
            }
        } else if self.now < slept {
            // A longer window would have caught it without a wake-up.
            self.now = (self.now * 2).max(POLL_START).min(self.max);
        }
    }
}

/// The bits of the kick and stop watches in [`Uring::take_fired`].
#[derive(Clone, Copy)]
struct RingWatches {
    kick: u64,
    stop: u64,
}

/// A running worker.
pub struct WorkerHandle {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<u16>,
}

impl WorkerHandle {
    /// Drains in-flight requests, stops the thread and returns the next available index.
    pub fn stop(self) -> Option<u16> {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

/// Everything a worker owns.
pub struct Worker {
    /// The queue.
    pub vring: Vring,
    /// The queue's kick eventfd.
    pub kick: EventFd,
    /// Guest memory, swapped by the control thread on SET_MEM_TABLE.
    pub mem: GuestMemoryShared,
    /// The device's request processing.
    pub handler: Box<dyn QueueHandler>,
    /// Heads recovered from the inflight region, to start first.
    pub resubmit: Vec<u16>,
    /// The adaptive polling window (see the module documentation).
    pub poll: PollWindow,
}

/// Starts a worker thread named `name`.
pub fn spawn(name: String, worker: Worker) -> Result<WorkerHandle, WorkerError> {
    let stop = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Poll)?;
    let epoll = Epoll::new().map_err(WorkerError::Poll)?;
    let mut fds: Vec<(RawFd, Token)> = vec![
        (worker.kick.as_raw_fd(), Token::Kick),
        (stop.as_raw_fd(), Token::Stop),
    ];
    if let Some(fd) = worker.handler.completion_fd() {
        fds.push((fd, Token::Completion));
    }
    for (fd, token) in fds {
        // Kick and completion eventfds are edge-triggered and never read:
        // every write wakes us, and a read would be one more system call.
        let events = match token {
            Token::Kick | Token::Completion => EventSet::IN | EventSet::EDGE_TRIGGERED,
            Token::Stop => EventSet::IN,
        };
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, token as u64),
            )
            .map_err(WorkerError::Poll)?;
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    let stop_fd = stop.as_raw_fd();
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // Confined before the first look at the queue.
            seccomp::apply_or_exit(ThreadKind::Worker);
            worker.run(epoll, stop_fd, &flag)
        })
        .map_err(WorkerError::Spawn)?;
    Ok(WorkerHandle {
        stop,
        stopping,
        thread,
    })
}

impl Worker {
    fn run(mut self, epoll: Epoll, stop: RawFd, stopping: &AtomicBool) -> u16 {
        let mut done = Vec::new();
        let resubmit = std::mem::take(&mut self.resubmit);
        if !resubmit.is_empty() {
            tracing::info!(count = resubmit.len(), "resubmitting inflight requests");
        }
        self.start_heads(&resubmit, &mut done);
        self.process_avail(&mut done);
        match self.watch_in_ring(stop) {
            Some(watches) => self.run_ring(watches, &mut done, stopping),
            None => self.run_epoll(&epoll, &mut done, stopping),
        }
    }

    /// Has the handler's ring poll the kick and stop eventfds; returns their
    /// bits in [`Uring::take_fired`], or `None` to use epoll.
    fn watch_in_ring(&mut self, stop: RawFd) -> Option<RingWatches> {
        let kick = self.kick.as_raw_fd();
        let ring = self.handler.uring()?;
        let ids = ring
            .watch(kick)
            .and_then(|kick| Ok((kick, ring.watch(stop)?)));
        match ids {
            Ok((kick, stop)) => Some(RingWatches {
                kick: 1 << kick,
                stop: 1 << stop,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot poll the kick eventfd in io_uring, using epoll");
                None
            }
        }
    }

    /// Sleeps in the handler's ring: one `io_uring_enter` submits what was
    /// queued and waits for a completion, a kick or a stop.
    fn run_ring(&mut self, w: RingWatches, done: &mut Vec<Used>, stopping: &AtomicBool) -> u16 {
        loop {
            let waited = match self.handler.uring() {
                // A reap while we were busy may have seen a kick or a stop:
                // handle it now, it will not wake the ring again.
                Some(ring) if ring.has_fired() => Ok(()),
                Some(ring) => {
                    let before = Instant::now();
                    let r = ring.wait();
                    self.poll.slept(before.elapsed());
                    r
                }
                None => return self.drain(done),
            };
            if let Err(e) = waited {
                tracing::error!(error = %e, "worker io_uring wait failed");
                return self.drain(done);
            }
            self.reap(done);
            let fired = self.handler.uring().map_or(0, Uring::take_fired);
            if fired & w.stop != 0 {
                return self.drain(done);
            }
            let mem = self.mem.memory();
            if fired & w.kick != 0 || self.vring.has_avail(&mem) {
                drop(mem);
                self.process_avail(done);
            }
            self.busy_poll(done, stopping);
        }
    }

    fn run_epoll(&mut self, epoll: &Epoll, done: &mut Vec<Used>, stopping: &AtomicBool) -> u16 {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let before = Instant::now();
            let waited = epoll.wait(-1, &mut events);
            self.poll.slept(before.elapsed());
            let n = match waited {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "worker epoll failed");
                    return self.drain(done);
                }
            };
            for ev in &events[..n] {
                match Token::from_u64(ev.data()) {
                    Some(Token::Kick) => {
                        self.process_avail(done);
                    }
                    Some(Token::Completion) => self.reap(done),
                    Some(Token::Stop) => return self.drain(done),
                    None => {}
                }
            }
            self.busy_poll(done, stopping);
        }
    }

    /// Picks up completions and requests that arrived meanwhile without
    /// waiting for their wake-up; keeps spinning for the polling window
    /// after the last one found. While nothing is in flight it polls the
    /// available ring only, with the driver's notifications disabled, and
    /// enables them again (taking what slipped in) before it sleeps.
    fn busy_poll(&mut self, done: &mut Vec<Used>, stopping: &AtomicBool) {
        let window = self.poll.get();
        let mut until = Instant::now() + window;
        let mut quiet = false;
        // A busy guest must not keep a stop request waiting.
        while !stopping.load(Ordering::Acquire) {
            let mut worked = false;
            if self.handler.has_completions() {
                self.reap(done);
                worked = true;
            }
            let mem = self.mem.memory();
            if self.vring.has_avail(&mem) {
                drop(mem);
                // A bogus available index pops nothing: do not spin on it.
                // Popping enables notifications again.
                quiet = false;
                worked |= self.process_avail(done) > 0;
            } else if !worked && !window.is_zero() && !quiet && self.handler.in_flight() == 0 {
                self.vring.suppress_kicks(&mem);
                quiet = true;
            }
            let now = Instant::now();
            if worked {
                until = now + window;
            } else if window.is_zero() || now >= until {
                if !quiet {
                    return;
                }
                quiet = false;
                let mem = self.mem.memory();
                if !self.vring.enable_notification(&mem) {
                    return;
                }
                // Chains came after the last look: take them and go on.
                until = now + window;
                continue;
            }
            std::hint::spin_loop();
        }
        if quiet {
            let mem = self.mem.memory();
            self.vring.enable_notification(&mem);
        }
    }

    fn start_heads(&mut self, heads: &[u16], done: &mut Vec<Used>) {
        let mem = self.mem.memory().into_inner();
        let (table, size) = (self.vring.desc_table(), self.vring.size());
        for &head in heads {
            if let Some(len) = self.handler.start(&mem, table, size, head) {
                done.push(Used { head, len });
            }
        }
        self.submit_and_publish(done);
    }

    fn process_avail(&mut self, done: &mut Vec<Used>) -> usize {
        let mem = self.mem.memory().into_inner();
        let (table, size) = (self.vring.desc_table(), self.vring.size());
        let mut popped = 0;
        let mut first_pass = true;
        loop {
            self.vring.disable_notification(&mem);
            let before = popped;
            while let Some(head) = self.vring.pop(&mem) {
                popped += 1;
                if let Some(len) = self.handler.start(&mem, table, size, head) {
                    done.push(Used { head, len });
                }
                if popped % PUBLISH_EVERY == 0 {
                    // A long batch: let storage start on what we have and
                    // hand back what finished, so the driver refills the
                    // ring while we go on instead of after the whole batch.
                    self.submit_and_publish(done);
                }
            }
            let more = self.vring.enable_notification(&mem);
            // The index said there was more after the last pass, yet this
            // one took nothing: the ring is invalid (an index too far
            // ahead, an entry outside guest memory). It stalls until the
            // driver fixes it and kicks again; spinning here would also
            // keep the queue from ever stopping.
            if !more || (!first_pass && popped == before) {
                break;
            }
            first_pass = false;
        }
        self.submit_and_publish(done);
        popped
    }

    /// Submits the batch started, takes what already finished (synchronous
    /// storage finishes inside `start` and reports it only through
    /// `has_completions`) and publishes it all with one notification.
    fn submit_and_publish(&mut self, done: &mut Vec<Used>) {
        self.handler.submit();
        if self.handler.has_completions() {
            self.handler.reap(done);
        }
        self.publish(done);
    }

    fn reap(&mut self, done: &mut Vec<Used>) {
        self.handler.reap(done);
        self.publish(done);
    }

    fn publish(&mut self, done: &mut Vec<Used>) {
        if done.is_empty() {
            return;
        }
        let mem = self.mem.memory();
        for used in done.drain(..) {
            self.vring.complete(&mem, used);
        }
        self.vring.log_used();
        self.vring.notify(&mem);
    }

    fn drain(&mut self, done: &mut Vec<Used>) -> u16 {
        while self.handler.in_flight() > 0 {
            self.handler.wait();
            self.reap(done);
        }
        let unused = self.handler.unused();
        if !unused.is_empty() {
            self.vring.unpop(&unused);
        }
        self.vring.next_avail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn window_grows_while_sleeps_are_short_up_to_its_max() {
        let mut w = PollWindow::new(50 * US);
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.slept(40 * US);
            seen.push(w.get().as_micros());
        }

        assert_eq!(seen, [4, 8, 16, 32, 50, 50]);
    }

    #[test]
    fn window_stays_once_it_covers_the_sleeps() {
        let mut w = PollWindow::new(50 * US);
        for _ in 0..3 {
            w.slept(10 * US);
        }

        assert_eq!(w.get(), 16 * US);
    }

    #[test]
    fn long_sleeps_shrink_the_window_to_nothing() {
        let mut w = PollWindow::new(50 * US);
        for _ in 0..5 {
            w.slept(40 * US);
        }
        let mut seen = Vec::new();
        for _ in 0..5 {
            w.slept(1000 * US);
            seen.push(w.get().as_micros());
        }

        assert_eq!(seen, [25, 12, 6, 0, 0]);
    }

    #[test]
    fn a_zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        w.slept(US);

        assert_eq!(w.get(), Duration::ZERO);
    }
}
