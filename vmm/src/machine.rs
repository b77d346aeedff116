//! Builds a VM from a [`VmConfig`] and runs its event loop until the guest
//! resets or powers off, a vCPU fails, or SIGINT/SIGTERM arrives. SIGPWR
//! presses the guest's ACPI power button instead.
//!
//! The event loop (this thread) owns stdin and the exit sources; vCPU
//! threads only touch the buses. Tokens name every event source. With a
//! control API attached ([`Machine::with_api`]), API requests arrive as
//! messages woken by `Token::Api` and are handled here (see [`crate::api`]).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use thiserror::Error;

use crate::api::{
    ApiError, ApiFailure, ApiMessage, ApiReceiver, ApiReply, ApiRequest, ApiResponse, ApiSender,
    VmInfo, VmInfoConfig, VmState, VmmPingResponse,
};
use crate::arch::x86_64::acpi::{self, AcpiError};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid::{self, feature_by_name, Topology};
use crate::arch::x86_64::layout::ram_ranges;
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::arch::x86_64::regs::{self, Entry, RegsError};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::console::{input_available, read_input, serial_input, RawStdin};
use crate::devices::bus::lock;
use crate::events;
use crate::exit::{ExitNotifier, ExitReason};
use crate::memory::{Memory, MemoryError};
use crate::migration::send::Outgoing;
use crate::platform::{Platform, PlatformError};
use crate::snapshot::{self, MemoryRestore, SnapshotError, SnapshotState};
use crate::state::{self, finish_pending_io, VcpuStateError, VmStateError};
use crate::vcpu::{VcpuContext, VcpuError, VcpuHandle, VcpuMetrics, VcpuState};
use crate::virtio::pci::TransportMetrics;
use crate::vm::{self, VmError};
use tokio::sync::oneshot;

mod migration;

/// Errors building or running the VM.
#[derive(Debug, Error)]
pub enum MachineError {
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("Cannot create guest memory")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("Cannot set up vCPU boot state")]
    Regs(#[from] RegsError),
    #[error("Cannot write the ACPI tables")]
    Acpi(#[from] AcpiError),
    #[error("Cannot write the MP table")]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Cannot {0}")]
    Io(&'static str, #[source] io::Error),
    #[error("Cannot set up the VM's API channel")]
    Api(#[source] ApiError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("Cannot restore a vCPU")]
    VcpuState(#[from] VcpuStateError),
    #[error("Cannot restore the VM's interrupt controllers and clock")]
    VmState(#[from] VmStateError),
}

type Result<T> = std::result::Result<T, MachineError>;

/// The signals the VMM takes through a signalfd: SIGINT/SIGTERM stop it,
/// SIGPWR presses the power button.
pub(crate) const VMM_SIGNALS: &[libc::c_int] = &[libc::SIGINT, libc::SIGTERM, libc::SIGPWR];

/// Event sources of the VMM event loop (`mio` tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Exit,
    Signal,
    Stdin,
    SerialDrained,
    Api,
    /// The pre-copy thread of an outgoing migration ended.
    Migration,
}

impl Token {
    const ALL: [Self; 6] = [
        Self::Exit,
        Self::Signal,
        Self::Stdin,
        Self::SerialDrained,
        Self::Api,
        Self::Migration,
    ];

    fn mio(self) -> mio::Token {
        mio::Token(self as usize)
    }

    fn from_mio(t: mio::Token) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.mio() == t)
    }
}

/// Serial input read from stdin but not yet taken by the UART's FIFO.
const STDIN_PENDING_MAX: usize = 4096;

/// How the VM ended and what it did.
#[derive(Debug)]
pub struct Outcome {
    pub reason: ExitReason,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    /// Queue notifications that exited to the VMM instead of going
    /// through an ioeventfd: the data path must keep this at 0.
    pub notify_exits: u64,
}

/// A KVM VM with its irqchip and PIT, and guest RAM registered as its
/// memory slots: the part of building a VM that does not depend on its
/// state.
pub struct Prepared {
    kvm: Arc<Kvm>,
    vm: Arc<VmFd>,
    memory: Memory,
}

impl Prepared {
    pub fn new(cfg: &VmConfig, memory: Memory) -> Result<Self> {
        let kvm = Arc::new(vm::open_kvm()?);
        let vm = Arc::new(vm::create_vm(&kvm, cfg.cpus, &memory.guest)?);
        Ok(Self { kvm, vm, memory })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Memory {
        &self.memory
    }
}

/// A built VM, ready to run. Field order is drop order: the VM (and its
/// memory slots) goes before the guest memory it maps.
pub struct Machine {
    vcpus: Vec<VcpuHandle>,
    transports: Vec<Arc<TransportMetrics>>,
    platform: Platform,
    kvm: Arc<Kvm>,
    vm: Arc<VmFd>,
    config: VmConfig,
    /// The API ids of the devices (saved in snapshots).
    ids: Vec<String>,
    restored_ids: Option<Vec<String>>,
    memory: Memory,
    exit: Arc<ExitNotifier>,
    /// Per vCPU, in id order.
    metrics: Vec<Arc<VcpuMetrics>>,
    /// Where the guest's serial input comes from (stdin, the pty).
    input: Option<std::os::fd::RawFd>,
    signals: SignalFd,
    poll: Poll,
    api: Option<ApiReceiver>,
    info: VmInfoConfig,
    started: bool,
    paused: bool,
    /// An outgoing migration and the vm.send-migration reply it owes.
    outgoing: Option<(Outgoing, oneshot::Sender<ApiResponse>)>,
}

impl Machine {
    /// Builds the VM: memory, kernel, boot tables, devices, vCPU threads.
    pub fn new(cfg: &VmConfig) -> Result<Self> {
        Self::build(cfg, None)
    }

    /// Builds the VM a snapshot directory holds, paused: its memory, its
    /// vCPUs' and the VM's KVM state. Everything is checked first.
    pub fn restore(dir: &Path, memory: MemoryRestore) -> Result<Self> {
        Self::restore_state(dir, snapshot::load(dir)?, memory)
    }

    /// Like [`Self::restore`], with the state already read and checked
    /// (and perhaps given new backend sockets).
    pub fn restore_state(dir: &Path, state: SnapshotState, memory: MemoryRestore) -> Result<Self> {
        state.config.validate()?;
        let memory = match memory {
            MemoryRestore::Map => {
                Memory::with_file(snapshot::open_memory_for_map(dir)?, state.config.memory)?
            }
            MemoryRestore::Copy => {
                let m = Memory::new(state.config.memory, state.config.hugepages)?;
                snapshot::load_memory(dir, &m.file, m.size)?;
                m
            }
        };
        Self::restore_with_memory(state, memory)
    }

    /// Builds the VM `state` describes on guest RAM that already holds its
    /// memory (restored, or received by a migration), paused.
    pub fn restore_with_memory(state: SnapshotState, memory: Memory) -> Result<Self> {
        let cfg = state.config.clone();
        let mut m = Self::build(&cfg, Some((state, memory)))?;
        m.ids = m.restored_ids.take().unwrap_or_default();
        m.info = VmInfoConfig::new(&cfg, &m.ids);
        Ok(m)
    }

    /// Builds the VM `state` describes on a KVM VM already made with its
    /// guest RAM registered ([`Prepared`]: a migration destination makes
    /// it before the source pauses), paused.
    pub fn restore_prepared(state: SnapshotState, prepared: Prepared) -> Result<Self> {
        let cfg = state.config.clone();
        let mut m = Self::build_on(&cfg, Some(state), prepared)?;
        m.ids = m.restored_ids.take().unwrap_or_default();
        m.info = VmInfoConfig::new(&cfg, &m.ids);
        Ok(m)
    }

    fn build(cfg: &VmConfig, restore: Option<(SnapshotState, Memory)>) -> Result<Self> {
        cfg.validate()?;
        let (memory, restore) = match restore {
            Some((state, memory)) => (memory, Some(state)),
            None => (Memory::new(cfg.memory, cfg.hugepages)?, None),
        };
        let prepared = Prepared::new(cfg, memory)?;
        Self::build_on(cfg, restore, prepared)
    }

    fn build_on(
        cfg: &VmConfig,
        restore: Option<SnapshotState>,
        prepared: Prepared,
    ) -> Result<Self> {
        cfg.validate()?;
        events::emit(
            "vm",
            if restore.is_some() {
                "restoring"
            } else {
                "booting"
            },
            &[],
        );
        // Before any thread exists, so that every vCPU thread inherits the mask.
        let signals = SignalFd::new(VMM_SIGNALS)?;
        let t0 = std::time::Instant::now();
        let us = |t: std::time::Instant| t.elapsed().as_micros() as u64;
        let Prepared { kvm, vm, memory } = prepared;

        let ram_end = ram_ranges(memory.size).last().map_or(0, |r| r.end());
        let entry = match &restore {
            Some(state) => {
                state.vm.restore(&vm)?;
                None
            }
            None => {
                let rsdp = acpi::write(&memory.guest, cfg.cpus, ram_end)?;
                let kernel = boot::load(
                    &memory.guest,
                    memory.size,
                    &cfg.kernel,
                    cfg.initramfs.as_deref(),
                    &cfg.cmdline,
                    cfg.boot,
                    rsdp,
                )?;
                regs::write_gdt(&memory.guest)?;
                regs::write_page_tables(&memory.guest, ram_end)?;
                mptable::write(&memory.guest, cfg.cpus)?;
                Some(kernel.entry)
            }
        };

        let exit =
            Arc::new(ExitNotifier::new().map_err(|e| MachineError::Io("create eventfd", e))?);
        let saved = restore.as_ref().map(|s| (&s.devices, &s.backends[..]));
        let t_state = us(t0);
        let platform = Platform::new(cfg, &vm, &memory, &exit, ram_end, saved)?;
        let t_platform = us(t0);
        let transports = platform
            .virtio
            .iter()
            .map(|d| lock(d).metrics.clone())
            .collect();
        let ctx = VcpuContext {
            pio: platform.pio.clone(),
            mmio: platform.mmio.clone(),
            exit: exit.clone(),
            metrics: Arc::default(),
        };

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| MachineError::Kvm("get supported CPUID", e))?;
        let hidden: Vec<_> = cfg
            .hidden_cpu_features
            .iter()
            .map(|n| feature_by_name(n))
            .collect::<std::result::Result<_, _>>()?;
        let mut vcpus = Vec::with_capacity(cfg.cpus.into());
        let mut metrics = Vec::with_capacity(cfg.cpus.into());
        for id in 0..cfg.cpus {
            let fd = create_vcpu(&kvm, &vm, id, cfg.cpus, &supported, &hidden, entry)?;
            if let Some(state) = &restore {
                state.vcpus[usize::from(id)].restore(&fd, &kvm)?;
            }
            let own = Arc::new(VcpuMetrics::default());
            metrics.push(own.clone());
            let ctx = VcpuContext {
                metrics: own,
                ..ctx.clone()
            };
            vcpus.push(VcpuHandle::spawn(id, fd, ctx)?);
        }
        tracing::debug!(
            boot_or_state_us = t_state,
            platform_us = t_platform,
            vcpus_us = us(t0),
            "VM built"
        );
        let restored = restore.is_some();
        Ok(Self {
            vcpus,
            transports,
            platform,
            kvm,
            vm,
            config: cfg.clone(),
            ids: Vec::new(),
            restored_ids: restore.map(|s| s.ids),
            memory,
            exit,
            metrics,
            input: serial_input(&cfg.serial).map_err(PlatformError::from)?,
            signals,
            poll: Poll::new().map_err(|e| MachineError::Io("create the poll", e))?,
            api: None,
            info: VmInfoConfig::new(cfg, &[]),
            // A restored VM comes back paused: resume lets it run.
            started: restored,
            paused: restored,
            outgoing: None,
        })
    }

    /// The API ids of the devices, for vm.info and snapshots.
    pub fn set_ids(&mut self, cfg: &VmConfig, ids: Vec<String>) {
        self.info = VmInfoConfig::new(cfg, &ids);
        self.ids = ids;
    }

    /// The API ids of the devices.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Stops the vCPUs (each out of `KVM_RUN` and parked), then the
    /// devices' rings.
    fn pause(&mut self) {
        events::emit("vm", "pausing", &[]);
        for v in &self.vcpus {
            v.set_state(VcpuState::Paused);
        }
        for v in &self.vcpus {
            v.wait_parked();
        }
        // With the vCPUs parked no register write races these.
        for d in &self.platform.virtio {
            lock(d).pause();
        }
        self.paused = true;
        events::emit("vm", "paused", &[]);
        tracing::info!("VM paused");
    }

    /// Lets a paused (or restored) VM run again: its rings first, then
    /// its vCPUs.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        events::emit("vm", "resuming", &[]);
        for d in &self.platform.virtio {
            lock(d).resume();
        }
        for v in &self.vcpus {
            v.set_state(VcpuState::Running);
        }
        self.paused = false;
        events::emit("vm", "resumed", &[]);
        tracing::info!("VM resumed");
    }

    /// Saves the paused VM into `dir` (see [`crate::snapshot`]); returns
    /// the bytes of RAM written.
    pub fn snapshot(&self, dir: &Path) -> std::result::Result<u64, String> {
        let state = self.save_state()?;
        snapshot::save(dir, &state, &self.memory.file, self.memory.size)
            .map_err(|e| crate::error_chain(&e))
    }

    /// The paused VM's state: each vCPU's, taken on its own thread once
    /// its last I/O instruction is complete, the VM-wide state, every
    /// device's, and the backends' own (which stops their rings).
    fn save_state(&self) -> std::result::Result<SnapshotState, String> {
        if !self.paused {
            return Err("The VM must be paused first".into());
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let kvm = self.kvm.clone();
            let state = v
                .on_thread(move |fd| {
                    finish_pending_io(fd)?;
                    state::VcpuState::save(fd, &kvm)
                })
                .map_err(|e| crate::error_chain(&e))?
                .map_err(|e| crate::error_chain(&e))?;
            vcpus.push(state);
        }
        let backends = self
            .platform
            .virtio
            .iter()
            .map(|d| lock(d).save_backend_state())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(SnapshotState {
            config: self.config.clone(),
            ids: self.ids.clone(),
            vcpus,
            vm: state::VmState::save(&self.vm),
            devices: self.platform.state(),
            backends,
        })
    }

    /// Serves control API requests in the event loop: returns the sender
    /// whose messages the loop answers.
    pub fn api_channel(&mut self) -> Result<ApiSender> {
        let (tx, rx) = crate::api::channel(self.poll.registry(), Token::Api.mio())
            .map_err(MachineError::Api)?;
        self.api = Some(rx);
        Ok(tx)
    }

    /// The counters vm.counters reads while the VM runs.
    pub fn live_counters(&self) -> crate::api::counters::LiveCounters {
        crate::api::counters::LiveCounters {
            vcpus: self.metrics.clone(),
            memory: self.memory.file.clone(),
            transports: self.transports.clone(),
        }
    }

    /// Guest RAM size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory.size
    }

    /// Runs the VM until it ends; stops and joins every vCPU thread.
    pub fn run(mut self) -> Result<Outcome> {
        self.run_to_end()
    }

    /// Like [`Self::run`], and gives back the API receiver of
    /// [`Self::api_channel`]: requests sent after the loop ended wait
    /// there, unanswered, for whoever handles them next.
    pub fn run_served(mut self) -> (Result<Outcome>, Option<ApiReceiver>) {
        let result = self.run_to_end();
        (result, self.api.take())
    }

    /// Lets the vCPUs run (once): the VM is booted. [`Self::run`] does it
    /// if nobody did before.
    pub fn start_vcpus(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        for v in &self.vcpus {
            v.set_state(VcpuState::Running);
        }
        events::emit("vm", "booted", &[]);
    }

    fn run_to_end(&mut self) -> Result<Outcome> {
        let _raw = (self.config.serial == SerialConfig::Stdio).then(RawStdin::enable);
        // The vCPUs (confined already) start first: installing this
        // thread's filter takes ~0.15 ms, and this thread reads nothing the
        // guest wrote before its event loop, which runs confined.
        self.start_vcpus();
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Vm);
        let reason = self.event_loop();
        self.cancel_migration();
        let mut result: Result<()> = Ok(());
        for v in self.vcpus.drain(..) {
            if let Err(e) = v.join() {
                result = Err(e.into());
            }
        }
        let reason = reason?;
        // The controller says "rebooted" once the VM is back, or
        // "shutdown" if it does not restart it.
        let event = if reason.is_reboot() {
            "rebooting"
        } else if reason == ExitReason::Migrated {
            "migrated"
        } else {
            "shutdown"
        };
        events::emit("vm", event, &[]);
        result?;
        Ok(Outcome {
            reason,
            pio_exits: self
                .metrics
                .iter()
                .map(|m| m.pio_exits.load(Ordering::Relaxed))
                .sum(),
            mmio_exits: self
                .metrics
                .iter()
                .map(|m| m.mmio_exits.load(Ordering::Relaxed))
                .sum(),
            notify_exits: self
                .transports
                .iter()
                .map(|t| t.notify_exits.load(Ordering::Relaxed))
                .sum(),
        })
    }

    fn event_loop(&mut self) -> Result<ExitReason> {
        let registry = self.poll.registry();
        let add =
            |fd: i32, t: Token| registry.register(&mut SourceFd(&fd), t.mio(), Interest::READABLE);
        add(self.exit.evt.as_raw_fd(), Token::Exit)
            .map_err(|e| MachineError::Io("poll exit", e))?;
        add(self.signals.fd.as_raw_fd(), Token::Signal)
            .map_err(|e| MachineError::Io("poll signals", e))?;
        add(
            self.platform.serial_drained.as_raw_fd(),
            Token::SerialDrained,
        )
        .map_err(|e| MachineError::Io("poll serial", e))?;
        // stdin may be /dev/null or a file, which epoll refuses: no input then.
        let input = self.input.unwrap_or(-1);
        let mut stdin_on = self.input.is_some() && add(input, Token::Stdin).is_ok();
        let mut pending: Vec<u8> = Vec::new();
        let mut events = Events::with_capacity(8);
        // Signals that arrived before the loop: edge-triggered polling
        // would not report them.
        if let Some(r) = self.take_signals() {
            return Ok(r);
        }
        loop {
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(MachineError::Io("wait for events", e)),
            }
            let mut stdin_closed = false;
            for ev in events.iter() {
                match Token::from_mio(ev.token()) {
                    Some(Token::Exit) => {
                        let _ = self.exit.evt.read();
                        if let Some(r) = self.exit.reason() {
                            return Ok(r);
                        }
                    }
                    Some(Token::Signal) => {
                        if let Some(r) = self.take_signals() {
                            return Ok(r);
                        }
                    }
                    Some(Token::Stdin) => stdin_closed |= ev.is_read_closed(),
                    Some(Token::SerialDrained) => {
                        let _ = self.platform.serial_drained.read();
                    }
                    Some(Token::Migration) => {
                        if let Some(r) = self.migration_ended() {
                            return Ok(r);
                        }
                    }
                    Some(Token::Api) => {
                        let messages = self.api.as_ref().map(|a| a.drain()).unwrap_or_default();
                        for ApiMessage {
                            request,
                            body,
                            reply,
                        } in messages
                        {
                            if request == ApiRequest::VmSendMigration {
                                // Answered when the migration ends.
                                self.start_migration(&body, reply);
                                continue;
                            }
                            let (response, stop) = self.api_request(request, &body);
                            // The client may have gone; the action stands.
                            let _ = reply.send(response);
                            if let Some(r) = stop {
                                return Ok(r);
                            }
                        }
                    }
                    None => {}
                }
            }
            // Feed what the FIFO takes, then read what stdin holds up to the
            // cap; whatever stays is read once the FIFO drains (edge-
            // triggered polling reports only new input).
            if stdin_on {
                loop {
                    if !pending.is_empty() {
                        let k = lock(&self.platform.serial).enqueue(&pending);
                        pending.drain(..k);
                    }
                    let room = STDIN_PENDING_MAX - pending.len();
                    let want = input_available(input).min(room);
                    if want == 0 {
                        break;
                    }
                    let mut buf = vec![0u8; want];
                    match read_input(input, &mut buf) {
                        Ok(0) | Err(_) => {
                            stdin_closed = true;
                            break;
                        }
                        Ok(k) => pending.extend_from_slice(&buf[..k]),
                    }
                }
                if stdin_closed && input_available(input) == 0 {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&input));
                    stdin_on = false;
                }
            }
        }
    }

    /// Reads every pending signal: SIGPWR presses the power button,
    /// SIGINT/SIGTERM end the VM.
    fn take_signals(&self) -> Option<ExitReason> {
        let mut stop = None;
        loop {
            match self.signals.read() {
                0 => return stop,
                libc::SIGPWR => lock(&self.platform.ged).press_power_button(),
                s => stop = stop.or(Some(ExitReason::Signal(s))),
            }
        }
    }
}

impl Machine {
    /// Handles one API request; the reason when the VM must stop now.
    fn api_request(
        &mut self,
        request: ApiRequest,
        body: &[u8],
    ) -> (ApiResponse, Option<ExitReason>) {
        let json = |v: std::result::Result<String, serde_json::Error>| {
            v.map(ApiReply::Json)
                .map_err(|e| ApiFailure::new(500, format!("Cannot encode the answer: {e}")))
        };
        match request {
            ApiRequest::VmmPing => (
                json(serde_json::to_string(&VmmPingResponse::current())),
                None,
            ),
            ApiRequest::VmInfo => {
                let state = if self.paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                let mut info = VmInfo::new(self.info.clone(), state, self.memory.size);
                info.migration = self
                    .outgoing
                    .as_ref()
                    .map(|(o, _)| lock(&o.progress).clone());
                (json(serde_json::to_string(&info)), None)
            }
            ApiRequest::VmPause if self.paused => {
                (Err(ApiFailure::new(405, "The VM is already paused")), None)
            }
            ApiRequest::VmPause => {
                self.pause();
                (Ok(ApiReply::Empty), None)
            }
            ApiRequest::VmResume if !self.paused => {
                (Err(ApiFailure::new(405, "The VM is not paused")), None)
            }
            ApiRequest::VmResume => {
                self.resume();
                (Ok(ApiReply::Empty), None)
            }
            ApiRequest::VmPowerButton => {
                lock(&self.platform.ged).press_power_button();
                (Ok(ApiReply::Empty), None)
            }
            ApiRequest::VmShutdown | ApiRequest::VmmShutdown => {
                tracing::info!(?request, "shutdown requested through the API");
                (Ok(ApiReply::Empty), Some(ExitReason::ApiShutdown))
            }
            ApiRequest::VmReboot => {
                tracing::info!("reboot requested through the API");
                (Ok(ApiReply::Empty), Some(ExitReason::ApiReboot))
            }
            ApiRequest::VmSnapshot => (self.api_snapshot(body), None),
            ApiRequest::VmSwapBackend => (self.swap_backend(body), None),
            // The controller answers these; they never reach a running VM.
            ApiRequest::VmCreate
            | ApiRequest::VmBoot
            | ApiRequest::VmDelete
            | ApiRequest::VmAddDisk
            | ApiRequest::VmAddNet
            | ApiRequest::VmRestore
            | ApiRequest::VmReceiveMigration
            | ApiRequest::VmSendMigration
            | ApiRequest::VmMetrics
            | ApiRequest::VmConsole
            | ApiRequest::VmCounters => (
                Err(ApiFailure::new(405, "Not a request for the running VM")),
                None,
            ),
        }
    }
}

impl Machine {
    /// vm.swap-backend: moves one device to another backend while the
    /// guest runs (see [`crate::vhost_user::VhostUser::swap_backend`]).
    fn swap_backend(&mut self, body: &[u8]) -> ApiResponse {
        let cfg: crate::api::SwapBackendConfig = crate::api::config::parse(body)
            .map_err(|e| ApiFailure::new(400, crate::error_chain(&e)))?;
        let i = self
            .ids
            .iter()
            .position(|d| *d == cfg.id)
            .ok_or_else(|| ApiFailure::new(404, format!("No device '{}'", cfg.id)))?;
        if self.outgoing.is_some() {
            return Err(ApiFailure::new(405, "A migration is running"));
        }
        let started = std::time::Instant::now();
        lock(&self.platform.virtio[i])
            .device_mut()
            .swap_backend(cfg.vhost_socket.clone())
            .map_err(|e| ApiFailure::new(500, format!("Cannot move '{}': {e}", cfg.id)))?;
        self.config.devices[i].socket = cfg.vhost_socket.clone();
        self.info = VmInfoConfig::new(&self.config, &self.ids);
        let socket = cfg.vhost_socket.display().to_string();
        events::emit(
            "vhost-user",
            "swapped",
            &[("id", cfg.id.clone()), ("socket", socket)],
        );
        tracing::info!(id = %cfg.id, socket = %cfg.vhost_socket.display(), us = started.elapsed().as_micros() as u64, "device moved to another backend");
        Ok(ApiReply::Empty)
    }

    fn api_snapshot(&self, body: &[u8]) -> ApiResponse {
        let cfg: crate::api::VmSnapshotConfig = crate::api::config::parse(body)
            .map_err(|e| ApiFailure::new(400, crate::error_chain(&e)))?;
        let dir = snapshot::dir_from_url(&cfg.destination_url)
            .map_err(|e| ApiFailure::new(400, e.to_string()))?;
        if !self.paused {
            return Err(ApiFailure::new(405, "The VM must be paused first"));
        }
        events::emit("vm", "snapshotting", &[]);
        let started = std::time::Instant::now();
        let copied = self
            .snapshot(&dir)
            .map_err(|e| ApiFailure::new(500, format!("Cannot snapshot the VM: {e}")))?;
        tracing::info!(dir = %dir.display(), memory_bytes = copied, ms = started.elapsed().as_millis() as u64, "VM snapshotted");
        events::emit("vm", "snapshotted", &[]);
        Ok(ApiReply::Empty)
    }
}

fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    id: u8,
    cpus: u8,
    supported: &kvm_bindings::CpuId,
    hidden: &[&'static cpuid::Feature],
    entry: Option<Entry>,
) -> Result<VcpuFd> {
    let fd = vm
        .create_vcpu(id.into())
        .map_err(|e| MachineError::Kvm("create vCPU", e))?;
    let timing = cpuid::timing(kvm, &fd, id);
    let entries = cpuid::vcpu_cpuid(supported, Topology { apic_id: id, cpus }, timing, hidden);
    let cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(|_| {
        MachineError::Io("build CPUID", io::Error::from(io::ErrorKind::InvalidData))
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| MachineError::Kvm("set CPUID", e))?;
    regs::setup_msrs(&fd)?;
    regs::setup_fpu(&fd)?;
    regs::setup_lint(&fd)?;
    if let (0, Some(entry)) = (id, entry) {
        regs::setup_boot_regs(&fd, entry)?;
    }
    Ok(fd)
}

/// SIGINT/SIGTERM/SIGPWR as a pollable fd. The signals are blocked in this thread
/// before any vCPU thread starts, so every thread inherits the mask.
pub(crate) struct SignalFd {
    pub(crate) fd: OwnedFd,
}

impl SignalFd {
    pub(crate) fn new(signals: &[libc::c_int]) -> Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `set` is a valid out-pointer; sigemptyset initialises it.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: initialised just above.
        let mut set = unsafe { set.assume_init() };
        for s in signals {
            // SAFETY: `set` is initialised and `s` a valid signal number.
            unsafe { libc::sigaddset(&mut set, *s) };
        }
        // SAFETY: `set` is a valid sigset; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(MachineError::Io(
                "block signals",
                io::Error::from_raw_os_error(rc),
            ));
        }
        // SAFETY: `set` is valid; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(MachineError::Io(
                "create signalfd",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The number of the pending signal (0 if none could be read).
    pub(crate) fn read(&self) -> i32 {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `size` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n as usize == size {
            // SAFETY: the kernel filled the whole struct.
            unsafe { info.assume_init() }.ssi_signo as i32
        } else {
            0
        }
    }
}
