//! The VM controller: the one state machine above [`Machine`] that answers
//! every API request whatever the state, with or without a VM.
//!
//! States: no VM → `Created` (vm.create) → `Running` (vm.boot) →
//! `Shutdown` (the guest powers off or resets, vm.shutdown) → `Running`
//! again (vm.boot) or no VM (vm.delete, from any state). `Paused` is a
//! sub-state of `Running` kept by the running VM's event loop.
//!
//! The controller runs on the main thread. A booted VM runs its event loop
//! on its own thread (`vmm-vm`) with its own API channel: the controller
//! forwards the requests that concern a running VM ([`ApiRequest::
//! for_running_vm`]) to it and answers the rest itself. When the VM's
//! loop returns, its thread writes an eventfd and the controller reaps it.
//!
//! A VM that reboots (vm.reboot, or a guest reset when the VM came from
//! vm.create) is reaped and built again from its config in this process:
//! fresh memory and devices, new connections to the same backends. A
//! request forwarded to a VM whose loop had just ended is given back with
//! its thread and answered after the reap, so none is lost.
//!
//! Both this loop and the VM's are `mio::Poll`s with typed tokens; API
//! requests wake them through a `mio::Waker`.
//!
//! With `exit_with_vm` (`--kernel` given on the command line) the
//! controller returns as soon as the VM ends, as vmm always did; without
//! it the process serves on with the VM in `Shutdown` until vmm.shutdown
//! or SIGINT/SIGTERM.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::snapshot::{MemoryRestore, SnapshotState};
use std::sync::mpsc;
use std::thread::JoinHandle;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use thiserror::Error;
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::EventFd;

use super::config::{parse, DiskConfigBody, NetConfigBody, VmConfigBody};
use super::counters::{reserved_id, CountersPlan, LiveCounters};
use super::{
    ApiError, ApiFailure, ApiMessage, ApiReceiver, ApiReply, ApiRequest, ApiResponse, ApiSender,
    VmInfo, VmInfoConfig, VmState, VmmPingResponse,
};
use crate::exit::ExitReason;
use crate::machine::{SignalFd, VMM_SIGNALS};
use crate::{Machine, MachineError, Outcome, VmConfig};

/// Errors running the controller.
#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("Cannot {0}")]
    Io(&'static str, #[source] io::Error),
    #[error("Cannot set up the VM's API channel")]
    Channel(#[source] ApiError),
    #[error("Cannot block the VMM's signals")]
    Signals(#[source] MachineError),
    /// The VM given on the command line failed to build or run.
    #[error(transparent)]
    Machine(MachineError),
    #[error("The VM thread panicked")]
    Panicked,
}

type Result<T> = std::result::Result<T, ControllerError>;

/// The VM the controller holds, if any.
enum Vm {
    None,
    Created(Spec),
    Running(Spec, Running),
    Shutdown(Spec),
}

/// What a VM is built from instead of its config alone.
enum Restore {
    Snapshot(PathBuf, Box<SnapshotState>, MemoryRestore),
    Migrated(Box<SnapshotState>, crate::machine::Prepared),
}

/// A VM's config and the API ids of its devices (in `devices` order).
#[derive(Clone)]
struct Spec {
    cfg: VmConfig,
    ids: Vec<String>,
}

/// A booted VM: its API channel, its counters and its thread.
struct Running {
    api: ApiSender,
    counters: LiveCounters,
    /// `None` when the machine was never built (the error went to boot).
    thread: JoinHandle<Option<VmEnd>>,
}

impl Running {
    /// Lets the (restored, paused) VM run; answered by its loop, which
    /// only fails if the VM has ended.
    fn resume(&self) {
        let (reply, answer) = oneshot::channel();
        let _ = self.api.forward(ApiMessage {
            request: ApiRequest::VmResume,
            body: Vec::new(),
            reply,
        });
        let _ = answer.blocking_recv();
    }
}

/// How a VM thread ended, and the requests forwarded to it too late.
type VmEnd = (
    std::result::Result<Outcome, MachineError>,
    Option<ApiReceiver>,
);

/// The controller; see the module documentation.
pub struct Controller {
    poll: Poll,
    api: ApiReceiver,
    vm: Vm,
    exit_with_vm: bool,
    signals: SignalFd,
    vm_done: EventFd,
    /// vmm.shutdown seen while a VM ran: return once it has stopped.
    quitting: bool,
    /// Set when the process must end, with the VM's outcome if any.
    exit: Option<Option<Outcome>>,
    /// Requests forwarded to a VM whose loop had already ended: they are
    /// answered once it is reaped.
    backlog: Vec<ApiMessage>,
}

/// Event sources of the controller's loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Api,
    Signal,
    VmDone,
}

impl Token {
    const ALL: [Self; 3] = [Self::Api, Self::Signal, Self::VmDone];

    fn mio(self) -> mio::Token {
        mio::Token(self as usize)
    }

    fn from_mio(t: mio::Token) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.mio() == t)
    }
}

fn fail(status: u16, msg: impl Into<String>) -> ApiResponse {
    Err(ApiFailure::new(status, msg))
}

fn json<T: serde::Serialize>(v: &T) -> ApiResponse {
    serde_json::to_string(v)
        .map(ApiReply::Json)
        .map_err(|e| ApiFailure::new(500, format!("Cannot encode the answer: {e}")))
}

impl Controller {
    /// Blocks the VMM's signals in this thread; call it before starting
    /// the API server thread so that thread inherits the mask. Returns the
    /// sender the API server hands its requests to.
    pub fn new(exit_with_vm: bool) -> Result<(Self, ApiSender)> {
        let poll = Poll::new().map_err(|e| ControllerError::Io("create the poll", e))?;
        let (tx, api) =
            super::channel(poll.registry(), Token::Api.mio()).map_err(ControllerError::Channel)?;
        let vm_done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| ControllerError::Io("create eventfd", e))?;
        poll.registry()
            .register(
                &mut SourceFd(&vm_done.as_raw_fd()),
                Token::VmDone.mio(),
                Interest::READABLE,
            )
            .map_err(|e| ControllerError::Io("poll the VM thread", e))?;
        let controller = Self {
            poll,
            api,
            vm: Vm::None,
            exit_with_vm,
            signals: SignalFd::new(VMM_SIGNALS).map_err(ControllerError::Signals)?,
            vm_done,
            quitting: false,
            exit: None,
            backlog: Vec::new(),
        };
        Ok((controller, tx))
    }

    /// Creates and boots `cfg` at once (the command-line VM). A failure
    /// is the machine's own error.
    pub fn boot_now(&mut self, cfg: VmConfig) -> Result<()> {
        let n = cfg.devices.len();
        let mut spec = Spec {
            cfg,
            ids: Vec::with_capacity(n),
        };
        for _ in 0..n {
            // Generated ids are unique: this cannot fail.
            let _ = spec.push_id(None);
        }
        let running = self.start(&spec, None)?.map_err(ControllerError::Machine)?;
        self.vm = Vm::Running(spec, running);
        Ok(())
    }

    /// Serves requests until vmm.shutdown, SIGINT/SIGTERM or, with
    /// `exit_with_vm`, the end of the VM; returns the VM's outcome when
    /// one ended the process.
    pub fn run(mut self) -> Result<Option<Outcome>> {
        let sig_fd = self.signals.fd.as_raw_fd();
        let mut polling_signals = false;
        let mut events = Events::with_capacity(8);
        loop {
            // A running VM's loop takes the signals; else the controller does.
            let want = !matches!(self.vm, Vm::Running(..));
            if want != polling_signals {
                let registry = self.poll.registry();
                let mut source = SourceFd(&sig_fd);
                if want {
                    registry.register(&mut source, Token::Signal.mio(), Interest::READABLE)
                } else {
                    registry.deregister(&mut source)
                }
                .map_err(|e| ControllerError::Io("poll signals", e))?;
                polling_signals = want;
                // Edge-triggered: take what arrived while nobody polled.
                if want && self.take_stop_signal() {
                    self.stop_vm();
                    return Ok(None);
                }
            }
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ControllerError::Io("wait for events", e)),
            }
            for e in events.iter() {
                match Token::from_mio(e.token()) {
                    Some(Token::Signal) if self.take_stop_signal() => {
                        // A VM booted earlier in this batch stops first.
                        self.stop_vm();
                        return Ok(None);
                    }
                    // Cleared after every join: a count means a VM is ending.
                    Some(Token::VmDone) if self.vm_done.read().is_ok() => self.reap()?,
                    Some(Token::Api) => self.backlog.extend(self.api.drain()),
                    _ => {}
                }
                while !self.backlog.is_empty() {
                    let m = self.backlog.remove(0);
                    if self.handle(m)? {
                        return Ok(None);
                    }
                }
                if let Some(outcome) = self.exit.take() {
                    return Ok(outcome);
                }
            }
        }
    }

    /// Reads every pending signal; `true` if one asks the VMM to stop.
    fn take_stop_signal(&self) -> bool {
        let mut stop = false;
        loop {
            match self.signals.read() {
                0 => return stop,
                libc::SIGINT | libc::SIGTERM => stop = true,
                _ => {}
            }
        }
    }

    /// Joins the VM thread, whose loop has returned (its thread wrote
    /// `vm_done` or dropped its API channel); the VM is then in
    /// `Shutdown`. Sets `exit` when the process must end with it.
    fn reap(&mut self) -> Result<()> {
        let (spec, running) = match std::mem::replace(&mut self.vm, Vm::None) {
            Vm::Running(s, r) => (s, r),
            other => {
                self.vm = other;
                return Ok(());
            }
        };
        self.vm = Vm::Shutdown(spec);
        let joined = running
            .thread
            .join()
            .map_err(|_| ControllerError::Panicked)?;
        // Written before the thread ended: clear it, it is handled.
        let _ = self.vm_done.read();
        let (joined, late) = match joined {
            Some((result, late)) => (Some(result), late),
            None => (None, None),
        };
        // Before anything answered now: they were sent first.
        if let Some(late) = late {
            let mut backlog = late.drain();
            backlog.append(&mut self.backlog);
            self.backlog = backlog;
        }
        let outcome = match joined {
            Some(Ok(o)) => {
                tracing::info!(reason = %o.reason, "VM stopped");
                Some(o)
            }
            Some(Err(e)) if self.exit_with_vm => return Err(ControllerError::Machine(e)),
            Some(Err(e)) => {
                tracing::error!(error = %crate::error_chain(&e), "VM failed");
                None
            }
            None => None,
        };
        let reason = outcome.as_ref().map(|o| &o.reason);
        // A migrated VM lives on in another process: this one is done.
        let signal = matches!(reason, Some(ExitReason::Signal(_) | ExitReason::Migrated));
        // vm.reboot always restarts; a guest reset does unless the process
        // lives for the command-line VM only (it exits on reset, as
        // without the API).
        let restart = !self.quitting
            && match reason {
                Some(ExitReason::ApiReboot) => true,
                Some(ExitReason::GuestReset) => !self.exit_with_vm,
                _ => false,
            };
        if restart {
            return self.restart();
        }
        if reason.is_some_and(ExitReason::is_reboot) {
            crate::events::emit("vm", "shutdown", &[]);
        }
        if self.exit_with_vm || self.quitting || signal {
            self.exit = Some(outcome);
        }
        Ok(())
    }

    /// Builds and boots the VM again from its config after a reboot; if
    /// that fails the VM stays in `Shutdown` (and the process ends with
    /// a command-line VM).
    fn restart(&mut self) -> Result<()> {
        let Vm::Shutdown(spec) = &self.vm else {
            return Ok(());
        };
        let spec = spec.clone();
        match self.start(&spec, None)? {
            Ok(running) => {
                tracing::info!("VM rebooted");
                self.vm = Vm::Running(spec, running);
                crate::events::emit("vm", "rebooted", &[]);
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "VM failed to reboot");
                crate::events::emit("vm", "shutdown", &[]);
                if self.exit_with_vm {
                    return Err(ControllerError::Machine(e));
                }
            }
        }
        Ok(())
    }

    /// Builds the VM on its thread and starts its loop; the outer error
    /// is the controller's, the inner one the machine's.
    fn start(
        &self,
        spec: &Spec,
        restore: Option<Restore>,
    ) -> Result<std::result::Result<Running, MachineError>> {
        let done = self
            .vm_done
            .try_clone()
            .map_err(|e| ControllerError::Io("clone eventfd", e))?;
        let (built_tx, built) = mpsc::channel();
        let cfg = spec.cfg.clone();
        let ids = spec.ids.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-vm".into())
            .spawn(move || {
                let machine = match restore {
                    Some(Restore::Snapshot(dir, state, memory)) => {
                        Machine::restore_state(&dir, *state, memory)
                    }
                    Some(Restore::Migrated(state, prepared)) => {
                        Machine::restore_prepared(*state, prepared)
                    }
                    None => Machine::new(&cfg),
                };
                let built = machine.and_then(|mut m| {
                    m.set_ids(&cfg, ids);
                    let tx = m.api_channel()?;
                    // Booted before vm.boot answers (and before "rebooted").
                    m.start_vcpus();
                    Ok((m, tx))
                });
                let result = match built {
                    Ok((m, tx)) => {
                        let _ = built_tx.send(Ok((m.live_counters(), tx)));
                        Some(m.run_served())
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        None
                    }
                };
                let _ = done.write(1);
                result
            })
            .map_err(|e| ControllerError::Io("start the VM thread", e))?;
        match built.recv() {
            Ok(Ok((counters, api))) => Ok(Ok(Running {
                api,
                counters,
                thread,
            })),
            Ok(Err(e)) => {
                let _ = thread.join();
                // Its done-write is for a VM that never ran.
                let _ = self.vm_done.read();
                Ok(Err(e))
            }
            Err(_) => Err(ControllerError::Panicked),
        }
    }

    /// Stops a running VM and waits for its thread; it is then in
    /// `Shutdown`.
    fn stop_vm(&mut self) {
        self.vm = match std::mem::replace(&mut self.vm, Vm::None) {
            Vm::Running(s, r) => {
                let (reply, _answer) = oneshot::channel();
                let _ = r.api.forward(ApiMessage {
                    request: ApiRequest::VmShutdown,
                    body: Vec::new(),
                    reply,
                });
                if let Ok(Some((_, Some(late)))) = r.thread.join() {
                    self.backlog.extend(late.drain());
                }
                // Written before the thread ended: clear it, it is handled.
                let _ = self.vm_done.read();
                Vm::Shutdown(s)
            }
            other => other,
        };
    }

    /// Answers (or forwards) one message; `true` when the VMM must exit.
    fn handle(&mut self, m: ApiMessage) -> Result<bool> {
        let ApiMessage {
            request,
            body,
            reply,
        } = m;
        if let Vm::Running(_, r) = &self.vm {
            if request.for_running_vm() || request == ApiRequest::VmmShutdown {
                if request == ApiRequest::VmmShutdown {
                    self.quitting = true;
                }
                match r.api.forward(ApiMessage {
                    request,
                    body,
                    reply,
                }) {
                    Ok(()) => return Ok(false),
                    // The VM has just ended: reap it and answer below.
                    Err(m) => {
                        self.reap()?;
                        return self.handle(m);
                    }
                }
            }
        }
        let (response, exit) = self.answer(request, &body)?;
        if let Err(f) = &response {
            tracing::debug!(?request, status = f.status, message = %f.message, "API request refused");
        }
        let _ = reply.send(response);
        Ok(exit)
    }

    fn answer(&mut self, request: ApiRequest, body: &[u8]) -> Result<(ApiResponse, bool)> {
        let no_vm = || fail(404, "No VM has been created");
        Ok(match request {
            ApiRequest::VmmPing => (json(&VmmPingResponse::current()), false),
            ApiRequest::VmmShutdown => {
                tracing::info!("VMM shutdown requested through the API");
                (Ok(ApiReply::Empty), true)
            }
            ApiRequest::VmCreate => (self.create(body), false),
            ApiRequest::VmRestore => (self.restore(body)?, false),
            ApiRequest::VmReceiveMigration => (self.receive_migration(body)?, false),
            ApiRequest::VmSwapBackend => (self.swap_backend(body), false),
            ApiRequest::VmBoot => (self.boot()?, false),
            ApiRequest::VmDelete => {
                self.stop_vm();
                if !matches!(self.vm, Vm::None) {
                    crate::events::emit("vm", "deleted", &[]);
                }
                self.vm = Vm::None;
                crate::spawned::stop_all();
                tracing::info!("VM deleted");
                (Ok(ApiReply::Empty), self.exit_with_vm)
            }
            ApiRequest::VmAddDisk | ApiRequest::VmAddNet => (self.add_device(request, body), false),
            ApiRequest::VmMetrics | ApiRequest::VmConsole => (
                Err(ApiFailure::new(405, "Answered by the HTTP server")),
                false,
            ),
            ApiRequest::VmCounters => {
                let (spec, live) = match &self.vm {
                    Vm::None => return Ok((no_vm(), false)),
                    Vm::Created(s) | Vm::Shutdown(s) => (s, None),
                    Vm::Running(s, r) => (s, Some(&r.counters)),
                };
                let devices = spec
                    .ids
                    .iter()
                    .cloned()
                    .zip(spec.cfg.devices.iter().map(|d| d.metrics_socket.clone()));
                (
                    Ok(ApiReply::Counters(CountersPlan::new(devices, live))),
                    false,
                )
            }
            ApiRequest::VmInfo => {
                let (spec, state) = match &self.vm {
                    Vm::None => return Ok((no_vm(), false)),
                    Vm::Created(s) => (s, VmState::Created),
                    Vm::Shutdown(s) => (s, VmState::Shutdown),
                    Vm::Running(s, _) => (s, VmState::Running),
                };
                let info = VmInfo::new(
                    VmInfoConfig::new(&spec.cfg, &spec.ids),
                    state,
                    spec.cfg.memory,
                );
                (json(&info), false)
            }
            ApiRequest::VmPause
            | ApiRequest::VmResume
            | ApiRequest::VmPowerButton
            | ApiRequest::VmReboot
            | ApiRequest::VmSnapshot
            | ApiRequest::VmSendMigration
            | ApiRequest::VmShutdown => match self.vm {
                Vm::None => (no_vm(), false),
                _ => (fail(405, "The VM is not running"), false),
            },
        })
    }

    fn create(&mut self, body: &[u8]) -> ApiResponse {
        if !matches!(self.vm, Vm::None) {
            return fail(405, "A VM is already created: delete it first");
        }
        let parsed = parse::<VmConfigBody>(body)
            .and_then(|b| b.into_config_with(&mut crate::spawned::start));
        let (cfg, ids) = match parsed {
            Ok(c) => c,
            Err(e) => {
                // There is no VM: whatever backend was started is unused.
                crate::spawned::stop_all();
                return fail(400, crate::error_chain(&e));
            }
        };
        let mut spec = Spec {
            cfg,
            ids: Vec::new(),
        };
        for id in ids {
            if let Err(e) = spec.push_id(id) {
                return fail(400, e);
            }
        }
        tracing::info!(cpus = spec.cfg.cpus, memory = spec.cfg.memory, "VM created");
        self.vm = Vm::Created(spec);
        Ok(ApiReply::Empty)
    }

    fn boot(&mut self) -> Result<ApiResponse> {
        let spec = match &self.vm {
            Vm::None => return Ok(fail(404, "No VM has been created")),
            Vm::Running(..) => return Ok(fail(405, "The VM is already running")),
            Vm::Created(s) | Vm::Shutdown(s) => s.clone(),
        };
        Ok(match self.start(&spec, None)? {
            Ok(running) => {
                tracing::info!("VM booted through the API");
                self.vm = Vm::Running(spec, running);
                Ok(ApiReply::Empty)
            }
            // Nothing changes: the VM stays as it was.
            Err(e) => fail(
                500,
                format!("Cannot boot the VM: {}", crate::error_chain(&e)),
            ),
        })
    }

    /// vm.restore: the snapshot's VM, built paused (resumed if asked).
    fn restore(&mut self, body: &[u8]) -> Result<ApiResponse> {
        let cfg: super::RestoreConfig = match parse(body) {
            Ok(c) => c,
            Err(e) => return Ok(fail(400, crate::error_chain(&e))),
        };
        let dir = match crate::snapshot::dir_from_url(&cfg.source_url) {
            Ok(d) => d,
            Err(e) => return Ok(fail(400, e.to_string())),
        };
        let memory = match cfg.memory_restore_mode.as_deref().map(str::parse) {
            None => MemoryRestore::Copy,
            Some(Ok(m)) => m,
            Some(Err(e)) => return Ok(fail(400, e)),
        };
        if !matches!(self.vm, Vm::None) {
            return Ok(fail(405, "A VM is already created: delete it first"));
        }
        Ok(
            match self.restore_now(dir, cfg.resume, memory, &cfg.vhost_sockets)? {
                Ok(()) => Ok(ApiReply::Empty),
                Err(e) => fail(
                    400,
                    format!("Cannot restore the VM: {}", crate::error_chain(&e)),
                ),
            },
        )
    }

    /// Restores the snapshot in `dir` as the VM (there must be none);
    /// the outer error is the controller's, the inner the machine's (a bad
    /// snapshot: nothing changes).
    pub fn restore_now(
        &mut self,
        dir: PathBuf,
        resume: bool,
        memory: MemoryRestore,
        sockets: &std::collections::BTreeMap<String, PathBuf>,
    ) -> Result<std::result::Result<(), MachineError>> {
        let state = match crate::snapshot::load(&dir)
            .and_then(|mut s| s.move_sockets(sockets).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => return Ok(Err(e.into())),
        };
        let spec = Spec {
            cfg: state.config.clone(),
            ids: state.ids.clone(),
        };
        let running =
            match self.start(&spec, Some(Restore::Snapshot(dir, Box::new(state), memory)))? {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
        crate::events::emit("vm", "restored", &[]);
        tracing::info!(resume, "VM restored");
        if resume {
            running.resume();
        }
        self.vm = Vm::Running(spec, running);
        Ok(Ok(()))
    }

    /// vm.swap-backend: the running VM moves the device; its config here
    /// follows, so a reboot or a snapshot uses the new backend.
    fn swap_backend(&mut self, body: &[u8]) -> ApiResponse {
        let Vm::Running(spec, running) = &mut self.vm else {
            return match self.vm {
                Vm::None => fail(404, "No VM has been created"),
                _ => fail(405, "The VM is not running"),
            };
        };
        let cfg: super::SwapBackendConfig = match parse(body) {
            Ok(c) => c,
            Err(e) => return fail(400, crate::error_chain(&e)),
        };
        let Some(i) = spec.ids.iter().position(|d| *d == cfg.id) else {
            return fail(404, format!("No device '{}'", cfg.id));
        };
        let (reply, answer) = oneshot::channel();
        let sent = running.api.forward(ApiMessage {
            request: ApiRequest::VmSwapBackend,
            body: body.to_vec(),
            reply,
        });
        let response = match sent {
            Ok(()) => answer
                .blocking_recv()
                .unwrap_or_else(|_| fail(503, "The VM has stopped")),
            Err(_) => fail(503, "The VM has stopped"),
        };
        if response.is_ok() {
            spec.cfg.devices[i].socket = cfg.vhost_socket;
        }
        response
    }

    /// vm.receive-migration: waits for the source, receives the VM and
    /// runs it here. Nothing is started unless everything arrived.
    fn receive_migration(&mut self, body: &[u8]) -> Result<ApiResponse> {
        use crate::migration::{receive, stream, Url};
        let cfg: receive::ReceiveMigrationConfig = match parse(body) {
            Ok(c) => c,
            Err(e) => return Ok(fail(400, crate::error_chain(&e))),
        };
        let url: Url = match cfg.receiver_url.parse() {
            Ok(u) => u,
            Err(e) => return Ok(fail(400, crate::error_chain(&e))),
        };
        if !matches!(self.vm, Vm::None) {
            return Ok(fail(405, "A VM is already created: delete it first"));
        }
        crate::events::emit("migration", "receiving", &[("url", url.to_string())]);
        let failed = |e: &dyn std::error::Error| {
            let msg = crate::error_chain(e);
            crate::events::emit("migration", "failed", &[("error", msg.clone())]);
            fail(500, format!("Migration failed: {msg}"))
        };
        let mut conn = match receive::accept(&url, self.signals.fd.as_raw_fd()) {
            Ok(c) => c,
            Err(e) => return Ok(failed(&e)),
        };
        let got = match receive::receive(&mut conn, &cfg.vhost_sockets) {
            Ok(g) => g,
            Err(e) => return Ok(failed(&e)),
        };
        let spec = Spec {
            cfg: got.state.config.clone(),
            ids: got.state.ids.clone(),
        };
        let running = match self.start(
            &spec,
            Some(Restore::Migrated(Box::new(got.state), got.prepared)),
        )? {
            Ok(r) => r,
            Err(e) => {
                let _ = stream::write_error(
                    &mut conn,
                    &crate::migration::MigrationError::Vm(crate::error_chain(&e)),
                );
                return Ok(failed(&e));
            }
        };
        if got.resume {
            running.resume();
        }
        self.vm = Vm::Running(spec, running);
        // Only once the source knows may both not run: if it cannot be
        // told, the VM stops here and the source resumes it.
        if let Err(e) = stream::write_frame(&mut conn, stream::Kind::Ok, &[]) {
            self.stop_vm();
            self.vm = Vm::None;
            return Ok(failed(&e));
        }
        crate::events::emit("migration", "received", &[]);
        tracing::info!(
            memory_bytes = got.memory_bytes,
            local = got.local,
            "migration received: the VM runs here"
        );
        Ok(Ok(ApiReply::Empty))
    }

    fn add_device(&mut self, request: ApiRequest, body: &[u8]) -> ApiResponse {
        let spec = match &mut self.vm {
            Vm::None => return fail(404, "No VM has been created"),
            Vm::Running(..) => {
                return fail(405, "Hot-plug is not supported: add devices before vm.boot")
            }
            Vm::Created(s) | Vm::Shutdown(s) => s,
        };
        let named = if request == ApiRequest::VmAddDisk {
            parse::<DiskConfigBody>(body)
                .and_then(|d| d.into_device_with("disk", &mut crate::spawned::start))
        } else {
            parse::<NetConfigBody>(body)
                .and_then(|d| d.into_device_with("net", &mut crate::spawned::start))
        };
        let named = match named {
            Ok(n) => n,
            Err(e) => return fail(400, crate::error_chain(&e)),
        };
        let socket = named.device.socket.clone();
        let mut next = spec.clone();
        next.cfg.devices.push(named.device);
        let refused = match next.push_id(named.id) {
            Err(e) => Some(e),
            Ok(()) => next.cfg.validate().err().map(|e| crate::error_chain(&e)),
        };
        if let Some(e) = refused {
            // A backend started for this device alone has nothing to serve.
            crate::spawned::stop(&socket);
            return fail(400, e);
        }
        let slot = next.cfg.devices.len();
        let id = next.ids[slot - 1].clone();
        *spec = next;
        tracing::info!(%id, slot, "device added");
        json(&PciDeviceInfo {
            id,
            bdf: format!("0000:00:{slot:02x}.0"),
        })
    }
}

/// Cloud Hypervisor's answer to vm.add-*: the device's id and PCI address.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

impl Spec {
    /// Records the id of the device just pushed (`_diskN`/`_netN` style
    /// when none is given); ids are unique.
    fn push_id(&mut self, id: Option<String>) -> std::result::Result<(), String> {
        let n = self.ids.len();
        let id = id.unwrap_or_else(|| {
            let kind = match self.cfg.devices.get(n).map(|d| &d.kind) {
                Some(crate::vhost_user::Kind::Net { .. }) => "_net",
                _ => "_disk",
            };
            (n..)
                .map(|i| format!("{kind}{i}"))
                .find(|c| !self.ids.contains(c))
                .unwrap_or_default()
        });
        if self.ids.contains(&id) {
            return Err(format!("Device id '{id}' is already in use"));
        }
        if reserved_id(&id) {
            return Err(format!("Device id '{id}' is reserved for vm.counters"));
        }
        self.ids.push(id);
        Ok(())
    }
}
