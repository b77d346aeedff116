//! The control API: a subset of Cloud Hypervisor's REST API (same paths,
//! JSON and status codes; `openapi.yaml` beside this file lists what is
//! served) on a unix socket, and the client half used by `vmctl`.
//!
//! # Protocol between the HTTP thread and the VMM event loop
//!
//! The HTTP server ([`http`]) runs a tokio runtime on its own thread. It
//! never touches the VM: for each request it builds an [`ApiRequest`],
//! pairs it with a fresh one-shot reply channel in an [`ApiMessage`],
//! sends that over an `mpsc` channel ([`ApiSender`]) and then wakes the
//! receiver's `mio::Poll` through a `mio::Waker` registered under the
//! receiver's API token. The [`controller`] polls; when the token fires it
//! drains every queued message ([`ApiReceiver::drain`]), handles each in
//! order on its own thread, and
//! answers on the message's reply channel with an [`ApiResponse`]. While
//! a VM runs, the controller forwards the requests about the running VM
//! ([`ApiRequest::for_running_vm`]), reply channel and all, over a second
//! channel of the same kind into that VM's event loop (`Token::Api` in
//! `machine.rs`), which answers them. A reply channel is used exactly
//! once; if the receiver is gone the sender sees the channel closed and
//! answers 503 itself.
//!
//! vm.counters is answered by the controller with a plan that the HTTP
//! thread completes by asking the backends ([`counters`]), so no VMM
//! thread waits on a backend.
//!
//! State changes are made by the controller and the VM's loop only, one
//! request at a time: a pause is complete (every vCPU out of `KVM_RUN`
//! and parked) before the next request is looked at.

pub mod client;
pub mod config;
pub mod controller;
pub mod counters;
pub mod fd_stream;
pub mod http;
pub mod manager;
pub mod metrics;
pub mod registry;

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::oneshot;

/// Errors of the message channel between the HTTP thread and the VMM.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("Cannot create the API waker")]
    Waker(#[source] std::io::Error),
    #[error("The VMM is no longer serving requests")]
    VmmGone,
}

/// What a client asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmInfo,
    VmPause,
    VmResume,
    VmPowerButton,
    VmReboot,
    VmSnapshot,
    VmRestore,
    VmShutdown,
    VmCreate,
    VmBoot,
    VmDelete,
    VmAddDisk,
    VmAddNet,
    VmCounters,
    /// vm.counters and vm.info as Prometheus text (ours; answered by the
    /// HTTP server from those two).
    VmMetrics,
    /// The guest's recent serial output (ours; answered by the HTTP server).
    VmConsole,
    VmSendMigration,
    VmReceiveMigration,
    VmSwapBackend,
}

impl ApiRequest {
    /// Requests the running VM's event loop answers (the controller
    /// forwards them while a VM runs).
    pub fn for_running_vm(self) -> bool {
        matches!(
            self,
            Self::VmInfo
                | Self::VmPause
                | Self::VmResume
                | Self::VmPowerButton
                | Self::VmReboot
                | Self::VmSnapshot
                | Self::VmShutdown
                | Self::VmSendMigration
        )
    }
}

/// A failed request: the HTTP status and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    pub message: String,
}

impl ApiFailure {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// A successful answer: nothing (204) or a JSON body (200).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiReply {
    Empty,
    Json(String),
    /// vm.counters: the HTTP thread completes it with the backends'
    /// counters, off the VMM's threads, and answers the JSON map.
    Counters(counters::CountersPlan),
}

pub type ApiResponse = Result<ApiReply, ApiFailure>;

/// One request and the one-shot channel its answer goes back on.
pub struct ApiMessage {
    pub request: ApiRequest,
    /// The request body (empty for requests without one).
    pub body: Vec<u8>,
    pub reply: oneshot::Sender<ApiResponse>,
}

/// The HTTP side of the channel.
pub struct ApiSender {
    tx: mpsc::Sender<ApiMessage>,
    waker: Arc<mio::Waker>,
}

/// The VMM side of the channel: its waker fires the token it was
/// created with in the receiver's `mio::Poll`.
pub struct ApiReceiver {
    rx: mpsc::Receiver<ApiMessage>,
}

/// A connected sender/receiver pair whose sender wakes `registry`'s poll
/// with `token`.
pub fn channel(
    registry: &mio::Registry,
    token: mio::Token,
) -> Result<(ApiSender, ApiReceiver), ApiError> {
    let waker = Arc::new(mio::Waker::new(registry, token).map_err(ApiError::Waker)?);
    let (tx, rx) = mpsc::channel();
    Ok((ApiSender { tx, waker }, ApiReceiver { rx }))
}

impl ApiSender {
    /// Queues `request`, wakes the VMM loop and waits for the answer.
    pub async fn call(&self, request: ApiRequest, body: Vec<u8>) -> Result<ApiResponse, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.forward(ApiMessage {
            request,
            body,
            reply,
        })
        .map_err(|_| ApiError::VmmGone)?;
        answer.await.map_err(|_| ApiError::VmmGone)
    }

    /// Queues `message` as is and wakes the receiver; gives it back if
    /// the receiver is gone.
    #[allow(clippy::result_large_err)]
    pub fn forward(&self, message: ApiMessage) -> Result<(), ApiMessage> {
        self.tx.send(message).map_err(|e| e.0)?;
        // A failed wake (the poll is gone) leaves the message unread; the
        // caller's reply channel then closes and it answers 503.
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "cannot wake the VMM loop");
        }
        Ok(())
    }
}

impl ApiReceiver {
    /// Every queued message (call it when the waker's token fires).
    pub fn drain(&self) -> Vec<ApiMessage> {
        self.rx.try_iter().collect()
    }
}

/// `PUT /vm.snapshot`'s body: Cloud Hypervisor's `VmSnapshotConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    /// `file:///dir`
    pub destination_url: String,
}

/// `PUT /vm.restore`'s body: Cloud Hypervisor's `RestoreConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file:///dir`
    pub source_url: String,
    /// Accepted; guest memory is always read in full before the VM runs.
    #[serde(default)]
    pub prefault: bool,
    /// Run the VM once restored (else it stays paused until vm.resume).
    #[serde(default)]
    pub resume: bool,
    /// `Copy` (Cloud Hypervisor's default) or ours, `Map`: the memory
    /// file becomes guest RAM (see [`crate::snapshot::MemoryRestore`]).
    #[serde(default)]
    pub memory_restore_mode: Option<String>,
    /// Ours: new vhost-user socket paths by device id, for backends that
    /// listen elsewhere than when the snapshot was taken.
    #[serde(default)]
    pub vhost_sockets: std::collections::BTreeMap<String, std::path::PathBuf>,
}

/// `PUT /vm.swap-backend`'s body (ours): move the device `id` to the
/// vhost-user backend listening on `vhost_socket`, under I/O.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapBackendConfig {
    pub id: String,
    pub vhost_socket: std::path::PathBuf,
}

/// `GET /vmm.ping`: Cloud Hypervisor's `VmmPingResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

impl VmmPingResponse {
    pub fn current() -> Self {
        Self {
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id().into(),
            features: Vec::new(),
        }
    }
}

/// `GET /vm.info`: the part of Cloud Hypervisor's `VmInfo` we have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmInfoConfig,
    pub state: VmState,
    pub memory_actual_size: u64,
    /// Every device by id, with its PCI address.
    #[serde(default)]
    pub device_tree: BTreeMap<String, DeviceNode>,
    /// Ours: an outgoing migration's progress, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::Progress>,
}

impl VmInfo {
    pub fn new(config: VmInfoConfig, state: VmState, memory_actual_size: u64) -> Self {
        let device_tree = config
            .disks
            .iter()
            .map(|d| (&d.id, d.pci_slot))
            .chain(config.net.iter().map(|n| (&n.id, n.pci_slot)))
            .map(|(id, slot)| {
                let node = DeviceNode {
                    id: id.clone(),
                    pci_bdf: Some(format!("0000:00:{slot:02x}.0")),
                    children: Vec::new(),
                    resources: Vec::new(),
                };
                (id.clone(), node)
            })
            .collect();
        Self {
            config,
            state,
            memory_actual_size,
            device_tree,
            migration: None,
        }
    }
}

/// Cloud Hypervisor's `DeviceNode`: a device and its PCI address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    #[serde(default)]
    pub pci_bdf: Option<String>,
    #[serde(default)]
    pub children: Vec<String>,
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
}

/// The VM's life-cycle state as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created => "Created",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Shutdown => "Shutdown",
        })
    }
}

/// `VmConfig` in Cloud Hypervisor's schema, only the fields we have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfoConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    #[serde(default)]
    pub net: Vec<NetInfo>,
    pub serial: ConsoleInfo,
    pub console: ConsoleInfo,
}

/// A disk as `VmConfig.disks` has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: String,
    pub vhost_user: bool,
    pub vhost_socket: String,
    pub num_queues: u16,
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_socket: Option<String>,
    /// Where it sits on PCI bus 0 (for the device tree).
    #[serde(skip)]
    pci_slot: usize,
}

/// A NIC as `VmConfig.net` has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    pub id: String,
    pub vhost_user: bool,
    pub vhost_socket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Queues: two per pair, as Cloud Hypervisor counts them.
    pub num_queues: u16,
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_socket: Option<String>,
    #[serde(skip)]
    pci_slot: usize,
}

/// `ConsoleConfig`: the serial port's or console's mode and file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    #[serde(default)]
    pub hugepages: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl VmInfoConfig {
    /// The config of `c`, whose devices have the API ids `ids` (generated
    /// ones where `ids` is short).
    pub fn new(c: &crate::VmConfig, ids: &[String]) -> Self {
        use crate::vhost_user::Kind;
        let mut disks = Vec::new();
        let mut net = Vec::new();
        for (i, d) in c.devices.iter().enumerate() {
            let id = ids.get(i).cloned().unwrap_or_else(|| format!("_dev{i}"));
            let socket = d.socket.display().to_string();
            let metrics_socket = d.metrics_socket.as_ref().map(|p| p.display().to_string());
            match &d.kind {
                Kind::Net { mac, queue_pairs } => net.push(NetInfo {
                    id,
                    vhost_user: true,
                    vhost_socket: socket,
                    mac: mac.map(|m| {
                        m.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    }),
                    num_queues: queue_pairs * 2,
                    queue_size: d.queue_size,
                    metrics_socket,
                    pci_slot: i + 1,
                }),
                _ => disks.push(DiskInfo {
                    id,
                    vhost_user: true,
                    vhost_socket: socket,
                    num_queues: d.queues,
                    queue_size: d.queue_size,
                    metrics_socket,
                    pci_slot: i + 1,
                }),
            }
        }
        let serial = match &c.serial {
            crate::config::SerialConfig::Stdio => ConsoleInfo {
                mode: "Tty".into(),
                file: None,
            },
            crate::config::SerialConfig::File(p) => ConsoleInfo {
                mode: "File".into(),
                file: Some(p.display().to_string()),
            },
            crate::config::SerialConfig::Off => ConsoleInfo {
                mode: "Off".into(),
                file: None,
            },
            crate::config::SerialConfig::Pty => ConsoleInfo {
                mode: "Pty".into(),
                file: crate::console::Pty::opened().map(|p| p.path().display().to_string()),
            },
        };
        Self {
            cpus: CpusConfig {
                boot_vcpus: c.cpus,
                max_vcpus: c.cpus,
            },
            memory: MemoryConfig {
                size: c.memory,
                hugepages: c.hugepages,
            },
            payload: PayloadConfig {
                kernel: Some(c.kernel.display().to_string()),
                initramfs: c.initramfs.as_ref().map(|p| p.display().to_string()),
                cmdline: Some(c.cmdline.clone()),
            },
            disks,
            net,
            serial,
            console: ConsoleInfo {
                mode: "Off".into(),
                file: None,
            },
        }
    }
}
