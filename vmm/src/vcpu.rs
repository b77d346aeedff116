//! vCPU threads: one per vCPU (named `vcpu<N>`), each driven by an explicit
//! state machine. PIO and MMIO exits go to the device buses; a state
//! change kicks the thread out of `KVM_RUN` with `immediate_exit` plus a
//! signal.
//!
//! ```text
//! Created --start--> Running <--pause/resume--> Paused
//!    |                  |                          |
//!    +-------stop-------+----------stop------------+--> Stopped
//! ```

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::{lock, Bus};
use crate::exit::{ExitNotifier, ExitReason};
use crate::seccomp::{self, ThreadKind};

/// Errors managing vCPU threads.
#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("Cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("Cannot spawn thread for vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("vCPU {0} thread panicked")]
    Panicked(u8),
    #[error("vCPU {0} is not paused")]
    NotParked(u8),
    #[error("vCPU {0} thread has ended")]
    Gone(u8),
}

/// Work for a parked vCPU's thread (saving its state, for one).
type Task = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// The life cycle of a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Created,
    Running,
    Paused,
    Stopped,
}

impl VcpuState {
    /// Whether `self -> next` is a legal transition.
    pub fn can_become(self, next: VcpuState) -> bool {
        use VcpuState::*;
        matches!(
            (self, next),
            (Created, Running) | (Running, Paused) | (Paused, Running) | (_, Stopped)
        ) && self != Stopped
    }
}

/// One vCPU's exit counters by reason, and its thread's CPU clock.
#[derive(Debug)]
pub struct VcpuMetrics {
    pub pio_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    /// HLT exits (none with the in-kernel LAPIC, which handles HLT).
    pub hlt_exits: AtomicU64,
    /// `KVM_RUN` returned EINTR/EAGAIN: a kick (pause, stop) or a retry.
    pub interrupted: AtomicU64,
    /// The thread's CPU-time clock (`pthread_getcpuclockid`), once the
    /// thread exists; `i64::MIN` before.
    cpu_clock: AtomicI64,
}

impl Default for VcpuMetrics {
    fn default() -> Self {
        Self {
            pio_exits: AtomicU64::new(0),
            mmio_exits: AtomicU64::new(0),
            hlt_exits: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
            cpu_clock: AtomicI64::new(i64::MIN),
        }
    }
}

impl VcpuMetrics {
    /// CPU time the vCPU thread has used (user + system, KVM_RUN included),
    /// in microseconds; `None` before it started or after it ended.
    pub fn cpu_time_us(&self) -> Option<u64> {
        let clock = libc::clockid_t::try_from(self.cpu_clock.load(Ordering::Relaxed)).ok()?;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer; a stale clock id only makes
        // the call fail.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        let us =
            u64::try_from(ts.tv_sec).ok()? * 1_000_000 + u64::try_from(ts.tv_nsec).ok()? / 1_000;
        Some(us)
    }
}

/// What the vCPU thread and its controller share.
struct Control {
    state: Mutex<VcpuState>,
    changed: Condvar,
    /// Run by the thread while parked ([`VcpuHandle::on_thread`]); set
    /// under `state` and announced on `changed`.
    task: Mutex<Option<Task>>,
    /// Whether the thread is outside `KVM_RUN` and will not re-enter it
    /// (waiting while Created or Paused, or ended). Changed by the thread
    /// only while it holds `state`, and announced on `changed`, so that
    /// [`VcpuHandle::wait_parked`] waits on the same lock and condvar.
    parked: AtomicBool,
    /// `kvm_run.immediate_exit` of this vCPU: the mapping lives as long as
    /// the `VcpuFd`, which the thread hands back only when it ends.
    immediate_exit: *mut u8,
}

// SAFETY: `immediate_exit` points into the vCPU's kvm_run mapping, which
// stays mapped until the thread returns its VcpuFd at join time; it is
// written only with the `state` mutex held.
unsafe impl Send for Control {}
// SAFETY: as above; all access to the pointee is serialised by `state`.
unsafe impl Sync for Control {}

impl Control {
    /// Called on every pass of the run loop with the state lock held: one
    /// atomic load, and a store and wake-up only on change.
    fn set_parked(&self, _guard: &VcpuState, v: bool) {
        if self.parked.load(Ordering::Relaxed) != v {
            self.parked.store(v, Ordering::Relaxed);
            self.changed.notify_all();
        }
    }

    fn set_immediate_exit(&self, _guard: &VcpuState, v: u8) {
        // SAFETY: see the field's invariant; the caller holds the state lock.
        unsafe { self.immediate_exit.write_volatile(v) };
    }
}

/// Buses and notifier shared by all vCPU threads.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitNotifier>,
    pub metrics: Arc<VcpuMetrics>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    ctl: Arc<Control>,
    thread: Option<JoinHandle<VcpuFd>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| res = register_signal_handler(kick_signal(), kick_handler));
    res.map_err(VcpuError::SignalHandler)
}

impl VcpuHandle {
    /// Spawns the thread for a configured vCPU; it waits in `Created`.
    pub fn spawn(id: u8, mut fd: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let ctl = Arc::new(Control {
            state: Mutex::new(VcpuState::Created),
            changed: Condvar::new(),
            task: Mutex::new(None),
            parked: AtomicBool::new(false),
            immediate_exit: &mut fd.get_kvm_run().immediate_exit,
        });
        let c = ctl.clone();
        let metrics = ctx.metrics.clone();
        let (named_tx, named) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // std names the thread before this runs.
                let _ = named_tx.send(());
                seccomp::apply_or_exit(ThreadKind::Vcpu);
                run_loop(id, &mut fd, &c, &ctx);
                c.set_parked(&lock(&c.state), true);
                fd
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        // Until then the thread carries its creator's name: libvirt finds
        // vCPU threads by name ("vcpuN") as soon as vm.boot has answered.
        let _ = named.recv();
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the pthread_t is that of the thread just spawned, which
        // is not joined yet; `clock` is a valid out-pointer.
        if unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) } == 0 {
            metrics.cpu_clock.store(clock.into(), Ordering::Relaxed);
        }
        Ok(Self {
            id,
            ctl,
            thread: Some(thread),
        })
    }

    pub fn state(&self) -> VcpuState {
        *lock(&self.ctl.state)
    }

    /// Moves to `next` if legal, kicking the thread out of `KVM_RUN`.
    pub fn set_state(&self, next: VcpuState) -> bool {
        let mut s = lock(&self.ctl.state);
        if !s.can_become(next) {
            return false;
        }
        *s = next;
        if next != VcpuState::Running {
            self.ctl.set_immediate_exit(&s, 1);
        }
        drop(s);
        self.ctl.changed.notify_all();
        if next != VcpuState::Running {
            if let Some(t) = &self.thread {
                // The thread may be gone already; immediate_exit covers
                // the window before it re-enters KVM_RUN.
                let _ = t.kill(kick_signal());
            }
        }
        true
    }

    /// Waits until the thread is out of `KVM_RUN` and parked (after a
    /// move to Paused) or has ended.
    pub fn wait_parked(&self) {
        let mut s = lock(&self.ctl.state);
        while !self.ctl.parked.load(Ordering::Relaxed) {
            s = self.ctl.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs `f` with the vCPU's fd on its own thread while it is parked
    /// (Created, or Paused once [`Self::wait_parked`] returned), and
    /// returns what `f` returns. KVM wants vCPU ioctls from that thread.
    pub fn on_thread<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Result<R, VcpuError> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let s = lock(&self.ctl.state);
            if !matches!(*s, VcpuState::Created | VcpuState::Paused) {
                return Err(VcpuError::NotParked(self.id));
            }
            *lock(&self.ctl.task) = Some(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
        }
        self.ctl.changed.notify_all();
        rx.recv().map_err(|_| VcpuError::Gone(self.id))
    }

    /// Stops the vCPU and waits for its thread.
    pub fn join(mut self) -> Result<(), VcpuError> {
        self.set_state(VcpuState::Stopped);
        match self.thread.take().map(|t| t.join()) {
            Some(Err(_)) => Err(VcpuError::Panicked(self.id)),
            _ => Ok(()),
        }
    }
}

/// Waits while Created or Paused, running the tasks it is given; returns
/// false once Stopped.
fn wait_runnable(ctl: &Control, fd: &mut VcpuFd) -> bool {
    let mut s = lock(&ctl.state);
    loop {
        match *s {
            VcpuState::Running => {
                ctl.set_immediate_exit(&s, 0);
                ctl.set_parked(&s, false);
                return true;
            }
            VcpuState::Stopped => return false,
            VcpuState::Created | VcpuState::Paused => {
                // Out of KVM_RUN, and it stays out until Running: the
                // state lock is held from this check to the wait.
                ctl.set_parked(&s, true);
                if let Some(task) = lock(&ctl.task).take() {
                    task(fd);
                    continue;
                }
                s = ctl.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

fn run_loop(id: u8, fd: &mut VcpuFd, ctl: &Control, ctx: &VcpuContext) {
    while wait_runnable(ctl, fd) {
        let fail = |detail: String| Some(ExitReason::KvmFailure { cpu: id, detail });
        let stop = match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.metrics.pio_exits.fetch_add(1, Ordering::Relaxed);
                ctx.pio.read(port.into(), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.metrics.pio_exits.fetch_add(1, Ordering::Relaxed);
                ctx.pio.write(port.into(), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.write(addr, data);
                None
            }
            // The in-kernel LAPIC handles HLT; nothing to do if one leaks out.
            Ok(VcpuExit::Hlt) => {
                ctx.metrics.hlt_exits.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault { cpu: id }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::GuestShutdown),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::GuestReset),
                other => fail(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => fail(format!(
                "KVM entry failure, reason {reason:#x} on host CPU {cpu}"
            )),
            Ok(VcpuExit::InternalError) => {
                let internal = fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so
                // `internal` is the active member of the exit union.
                let suberror = unsafe { internal.__bindgen_anon_1.internal.suberror };
                fail(format!(
                    "KVM internal error {suberror}{}",
                    if suberror == 1 {
                        " (emulation failure)"
                    } else {
                        ""
                    }
                ))
            }
            Ok(other) => fail(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctx.metrics.interrupted.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => fail(format!("KVM_RUN failed: {e}")),
        };
        if let Some(reason) = stop {
            ctx.exit.notify(reason);
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::VcpuState::*;

    #[test]
    fn state_machine_allows_only_legal_transitions() {
        assert!(Created.can_become(Running));
        assert!(Running.can_become(Paused));
        assert!(Paused.can_become(Running));
        assert!(Paused.can_become(Stopped));
        assert!(Created.can_become(Stopped));
        assert!(!Created.can_become(Paused));
        assert!(!Stopped.can_become(Running));
        assert!(!Stopped.can_become(Stopped));
        assert!(!Running.can_become(Created));
    }
}
