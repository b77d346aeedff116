//! The event monitor (`--event-monitor path=PATH|fd=N`), as Cloud
//! Hypervisor's: one JSON object per line, written as it happens, e.g.
//!
//! ```text
//! {"timestamp":{"secs":0,"nanos":81234},"source":"vm","event":"booted","properties":null}
//! ```
//!
//! `timestamp` is the time since the monitor started; `properties` is
//! `null` or an object of strings. [`emit`] only queues the event on a
//! bounded channel (never blocking: a full queue drops the event); a
//! dedicated thread writes and flushes each line, so a reader that is slow
//! or gone never stalls the VMM loop, the API or the vCPUs. If the reader
//! goes away the writer logs once and drops everything after.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

/// Events queued before the writer falls behind and new ones are dropped.
const QUEUE: usize = 4096;
/// How long [`finish`] waits for the writer to drain the queue.
const FINISH_WAIT: Duration = Duration::from_secs(1);

/// Errors of the event monitor.
#[derive(Debug, Error)]
pub enum EventError {
    #[error("Expected path=PATH or fd=N, not '{0}'")]
    Syntax(String),
    #[error("Cannot open the event monitor {0}")]
    Open(String, #[source] io::Error),
    #[error("The event monitor fd {0} is not open")]
    BadFd(RawFd, #[source] io::Error),
    #[error("Cannot start the event monitor thread")]
    Thread(#[source] io::Error),
}

/// Where events go, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    Fd(RawFd),
}

impl FromStr for Target {
    type Err = EventError;

    fn from_str(s: &str) -> Result<Self, EventError> {
        let syntax = || EventError::Syntax(s.to_string());
        match s.split_once('=') {
            Some(("path", p)) if !p.is_empty() => Ok(Self::Path(PathBuf::from(p))),
            Some(("fd", n)) => n.parse().map(Self::Fd).map_err(|_| syntax()),
            _ => Err(syntax()),
        }
    }
}

impl Target {
    /// Opens the target for writing; an `fd` is validated and then owned.
    fn open(&self) -> Result<File, EventError> {
        match self {
            // A FIFO with no reader yet blocks here, as Cloud Hypervisor's.
            Self::Path(p) => OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|e| EventError::Open(p.display().to_string(), e)),
            Self::Fd(fd) => {
                // SAFETY: F_GETFD only reads the descriptor's flags; an
                // invalid fd makes it fail with EBADF and nothing else.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(EventError::BadFd(*fd, io::Error::last_os_error()));
                }
                // SAFETY: the fd is open (checked above) and, by the
                // contract of `--event-monitor fd=N`, handed to us to own:
                // nothing else in the process uses or closes it.
                Ok(unsafe { File::from_raw_fd(*fd) })
            }
        }
    }
}

/// One event, serialized as one line.
#[derive(Debug, Serialize)]
struct Event {
    timestamp: Duration,
    source: &'static str,
    event: &'static str,
    properties: Option<BTreeMap<&'static str, String>>,
}

/// The running monitor: the queue into the writer thread.
struct Monitor {
    start: Instant,
    tx: SyncSender<Event>,
    thread: JoinHandle<()>,
    done: Receiver<()>,
    /// Set by [`detach`]: write nothing more, close the target.
    abandoned: Arc<AtomicBool>,
}

static MONITOR: Mutex<Option<Monitor>> = Mutex::new(None);

/// Opens `target` and starts the writer thread; events emitted before
/// this (or without it) are dropped.
pub fn start(target: &Target) -> Result<(), EventError> {
    let file = target.open()?;
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let (done_tx, done) = mpsc::channel();
    let abandoned = Arc::new(AtomicBool::new(false));
    let flag = abandoned.clone();
    let thread = std::thread::Builder::new()
        .name("vmm-events".into())
        .spawn(move || {
            block_signals();
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Events);
            write_all(file, rx, &flag);
            let _ = done_tx.send(());
        })
        .map_err(EventError::Thread)?;
    *MONITOR.lock().unwrap_or_else(PoisonError::into_inner) = Some(Monitor {
        start: Instant::now(),
        tx,
        thread,
        done,
        abandoned,
    });
    Ok(())
}

/// Queues an event without blocking; a no-op without a monitor.
pub fn emit(source: &'static str, event: &'static str, properties: &[(&'static str, String)]) {
    let guard = MONITOR.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(m) = guard.as_ref() else { return };
    let e = Event {
        timestamp: m.start.elapsed(),
        source,
        event,
        properties: (!properties.is_empty()).then(|| properties.iter().cloned().collect()),
    };
    if let Err(TrySendError::Full(e)) = m.tx.try_send(e) {
        tracing::debug!(event = e.event, "event monitor queue full; event dropped");
    }
}

/// Emits vmm `shutdown`, then stops the monitor, waiting a little for the
/// queue to be written (not for a reader that never reads).
pub fn finish() {
    emit("vmm", "shutdown", &[]);
    let Some(m) = MONITOR
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    drop(m.tx);
    if m.done.recv_timeout(FINISH_WAIT).is_ok() {
        let _ = m.thread.join();
    }
}

/// Stops the monitor at once: events still queued or emitted from now
/// on are dropped and the target is closed (waiting a little for the
/// writer). For a manager that has let the VM go (see
/// [`crate::api::manager`]): libvirt must read nothing more from this
/// process once it has stopped the domain, or it applies the late event
/// to the domain's next run.
pub fn detach() {
    let Some(m) = MONITOR
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    m.abandoned.store(true, Ordering::SeqCst);
    drop(m.tx);
    if m.done.recv_timeout(FINISH_WAIT).is_ok() {
        let _ = m.thread.join();
    }
}

/// Blocks every signal but SIGSYS in this thread: the VMM's signals
/// (SIGINT, SIGTERM, ...) are read from a signalfd by the VMM loop and must
/// never be delivered here, which would run their default action; SIGSYS
/// must reach the seccomp report (a blocked one kills without it).
pub(crate) fn block_signals() {
    // SAFETY: `set` is a local sigset_t that sigfillset fully initializes
    // before sigdelset and pthread_sigmask read it; a null old-set pointer
    // is allowed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigdelset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The writer thread: one flushed line per event until the queue closes
/// or the reader goes away.
fn write_all(mut file: File, rx: Receiver<Event>, abandoned: &AtomicBool) {
    for e in &rx {
        if abandoned.load(Ordering::SeqCst) {
            return;
        }
        let mut line = match serde_json::to_vec(&e) {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(error = %err, "cannot encode an event");
                continue;
            }
        };
        line.push(b'\n');
        if let Err(err) = file.write_all(&line).and_then(|()| file.flush()) {
            tracing::warn!(error = %err, "event monitor closed; dropping further events");
            // Drain so senders never see a full queue.
            rx.iter().for_each(drop);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parses_path_and_fd() {
        assert_eq!(
            "path=/tmp/ev".parse::<Target>().unwrap(),
            Target::Path("/tmp/ev".into())
        );
        assert_eq!("fd=7".parse::<Target>().unwrap(), Target::Fd(7));
    }

    #[test]
    fn target_rejects_other_forms() {
        for s in ["/tmp/ev", "path=", "fd=x", "file=/tmp/ev"] {
            assert!(s.parse::<Target>().is_err(), "{s}");
        }
    }

    #[test]
    fn event_serializes_as_cloud_hypervisor_shape() {
        let e = Event {
            timestamp: Duration::new(1, 2),
            source: "vm",
            event: "booted",
            properties: None,
        };

        let s = serde_json::to_string(&e).unwrap();

        assert_eq!(
            s,
            r#"{"timestamp":{"secs":1,"nanos":2},"source":"vm","event":"booted","properties":null}"#
        );
    }
}
