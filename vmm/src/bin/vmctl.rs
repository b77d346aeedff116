//! `vmctl`: drives a running `vmm` through its control API socket. See
//! `vmctl --help`; the requests live in `vmm::api::client`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmm::api::client::{self, ClientError};
use vmm::api::controller::PciDeviceInfo;
use vmm::api::{ApiRequest, VmInfo, VmmPingResponse};

#[derive(Parser, Debug)]
#[command(version, about = "Control a running vmm through its API socket")]
struct Cli {
    /// The socket given to `vmm --api-socket`.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the server's JSON as is.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Check that the VMM answers (vmm.ping).
    Ping,
    /// Show the VM's configuration and state (vm.info).
    Info,
    /// Pause every vCPU (vm.pause).
    Pause,
    /// Resume a paused VM (vm.resume).
    Resume,
    /// Press the guest's ACPI power button (vm.power-button).
    PowerButton,
    /// Reboot the VM in the same vmm process (vm.reboot).
    Reboot,
    /// Stop the VM at once (vm.shutdown); vmm exits if it was started
    /// with --kernel, else it serves on with the VM in Shutdown.
    Shutdown,
    /// Stop the VMM process (vmm.shutdown).
    ShutdownVmm,
    /// Create a VM from a Cloud Hypervisor VmConfig JSON file (vm.create).
    Create {
        /// The VmConfig JSON file.
        file: PathBuf,
    },
    /// Boot the created VM (vm.boot).
    Boot,
    /// Delete the VM, stopping it if it runs (vm.delete).
    Delete,
    /// Add a vhost-user disk before boot (vm.add-disk):
    /// vhost_socket=PATH[,num_queues=N][,queue_size=N][,id=ID]
    AddDisk {
        /// key=value list, as ch-remote takes it.
        spec: String,
    },
    /// Add a vhost-user NIC before boot (vm.add-net):
    /// vhost_socket=PATH[,mac=MAC][,num_queues=N][,queue_size=N][,id=ID]
    AddNet {
        /// key=value list, as ch-remote takes it.
        spec: String,
    },
    /// Show the VM's and every device's counters, backends' included
    /// (vm.counters); a table, or the JSON map with --json.
    Counters,
    /// Save the paused VM into a directory (vm.snapshot).
    Snapshot {
        /// file:///DIR, or a plain absolute directory path.
        destination: String,
    },
    /// Restore a snapshot into this vmm, which must have no VM
    /// (vm.restore); the VM stays paused unless --resume.
    Restore {
        /// file:///DIR, or a plain absolute directory path.
        source: String,
        /// Run the VM once restored.
        #[arg(long)]
        resume: bool,
    },
    /// Live-migrate the VM to a vmm waiting in receive-migration
    /// (vm.send-migration); prints pre-copy progress on stderr. This vmm
    /// exits once the destination runs the VM.
    SendMigration {
        /// unix:/PATH or tcp:IP:PORT
        destination: String,
        /// Same host: hand guest memory over instead of copying it
        /// (live upgrade; unix: only).
        #[arg(long)]
        local: bool,
        /// The pause the guest may see.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Give up, leaving the VM running here, after this long.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
        /// Pre-copy sends at most this many MiB/s (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_bandwidth_mibps: u64,
    },
    /// Move a device of the running VM to another vhost-user backend,
    /// under I/O (vm.swap-backend).
    SwapBackend {
        /// The device id (see `vmctl info`).
        id: String,
        /// The socket the new backend listens on.
        vhost_socket: PathBuf,
    },
    /// Wait for a migration and run the VM it brings; this vmm must have
    /// no VM (vm.receive-migration).
    ReceiveMigration {
        /// unix:/PATH or tcp:IP:PORT to listen on.
        receiver: String,
        /// A backend listening elsewhere here: DEVICE_ID=SOCKET (repeat).
        #[arg(long = "vhost-socket")]
        vhost_sockets: Vec<String>,
    },
}

/// `file:///dir` as given, or a plain path made into one.
fn file_url(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        format!("file://{s}")
    }
}

impl Command {
    fn request(&self) -> ApiRequest {
        match self {
            Self::Ping => ApiRequest::VmmPing,
            Self::Info => ApiRequest::VmInfo,
            Self::Pause => ApiRequest::VmPause,
            Self::Resume => ApiRequest::VmResume,
            Self::PowerButton => ApiRequest::VmPowerButton,
            Self::Reboot => ApiRequest::VmReboot,
            Self::Shutdown => ApiRequest::VmShutdown,
            Self::ShutdownVmm => ApiRequest::VmmShutdown,
            Self::Create { .. } => ApiRequest::VmCreate,
            Self::Boot => ApiRequest::VmBoot,
            Self::Delete => ApiRequest::VmDelete,
            Self::AddDisk { .. } => ApiRequest::VmAddDisk,
            Self::AddNet { .. } => ApiRequest::VmAddNet,
            Self::Counters => ApiRequest::VmCounters,
            Self::Snapshot { .. } => ApiRequest::VmSnapshot,
            Self::Restore { .. } => ApiRequest::VmRestore,
            Self::SendMigration { .. } => ApiRequest::VmSendMigration,
            Self::ReceiveMigration { .. } => ApiRequest::VmReceiveMigration,
            Self::SwapBackend { .. } => ApiRequest::VmSwapBackend,
        }
    }

    /// The JSON body the request carries.
    fn body(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::Create { file } => {
                std::fs::read(file).map_err(|e| format!("Cannot read {}: {e}", file.display()))
            }
            Self::AddDisk { spec } => device_body(
                spec,
                &[
                    "vhost_socket",
                    "num_queues",
                    "queue_size",
                    "id",
                    "metrics_socket",
                ],
            ),
            Self::AddNet { spec } => device_body(
                spec,
                &[
                    "vhost_socket",
                    "mac",
                    "num_queues",
                    "queue_size",
                    "id",
                    "metrics_socket",
                ],
            ),
            Self::Snapshot { destination } => Ok(
                serde_json::json!({ "destination_url": file_url(destination) })
                    .to_string()
                    .into_bytes(),
            ),
            Self::Restore { source, resume } => Ok(serde_json::json!({
                "source_url": file_url(source),
                "resume": resume,
            })
            .to_string()
            .into_bytes()),
            Self::SendMigration {
                destination,
                local,
                downtime_ms,
                timeout_s,
                max_bandwidth_mibps,
            } => Ok(serde_json::json!({
                "destination_url": destination,
                "local": local,
                "downtime_ms": downtime_ms,
                "timeout_s": timeout_s,
                "max_bandwidth_mibps": max_bandwidth_mibps,
            })
            .to_string()
            .into_bytes()),
            Self::SwapBackend { id, vhost_socket } => Ok(serde_json::json!({
                "id": id,
                "vhost_socket": vhost_socket,
            })
            .to_string()
            .into_bytes()),
            Self::ReceiveMigration {
                receiver,
                vhost_sockets,
            } => {
                let mut sockets = serde_json::Map::new();
                for s in vhost_sockets {
                    let (id, path) = s
                        .split_once('=')
                        .ok_or_else(|| format!("'{s}': expected DEVICE_ID=SOCKET"))?;
                    sockets.insert(id.into(), path.into());
                }
                Ok(serde_json::json!({
                    "receiver_url": receiver,
                    "vhost_sockets": sockets,
                })
                .to_string()
                .into_bytes())
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// `key=value,...` as a DiskConfig/NetConfig JSON object with
/// `vhost_user: true`; numbers for the queue keys.
fn device_body(spec: &str, known: &[&str]) -> Result<Vec<u8>, String> {
    let mut obj = serde_json::Map::new();
    obj.insert("vhost_user".into(), true.into());
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}': expected key=value"))?;
        if !known.contains(&k) {
            return Err(format!("Unknown key '{k}' (known: {})", known.join(", ")));
        }
        let value = if k == "num_queues" || k == "queue_size" {
            v.parse::<u16>()
                .map(Into::into)
                .map_err(|_| format!("Invalid {k} '{v}': not a number"))?
        } else {
            v.into()
        };
        obj.insert(k.into(), value);
    }
    if !obj.contains_key("vhost_socket") {
        return Err("vhost_socket=PATH is required".into());
    }
    serde_json::to_vec(&obj).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match cli.command.body() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vmctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match &cli.command {
        Command::SendMigration { timeout_s, .. } => {
            let progress = ProgressPrinter::start(cli.api_socket.clone());
            let r = client::call_with_timeout(
                &cli.api_socket,
                cli.command.request(),
                &request,
                Duration::from_secs(timeout_s.saturating_add(300)),
            );
            progress.stop();
            r
        }
        Command::ReceiveMigration { .. } => client::call_with_timeout(
            &cli.api_socket,
            cli.command.request(),
            &request,
            Duration::from_secs(365 * 86400),
        ),
        _ => client::call_with(&cli.api_socket, cli.command.request(), &request),
    };
    match result {
        Ok(body) => {
            let out = if cli.json {
                body
            } else {
                human(&cli.command, &body)
            };
            if !out.is_empty() {
                println!("{}", out.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmctl: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A few readable lines for `command`'s answer.
fn human(command: &Command, body: &str) -> String {
    match command {
        Command::Ping => match serde_json::from_str::<VmmPingResponse>(body) {
            Ok(p) => format!("vmm {} (pid {})", p.version, p.pid),
            Err(_) => body.to_string(),
        },
        Command::Info => match serde_json::from_str::<VmInfo>(body) {
            Ok(i) => {
                let c = &i.config;
                let mut s = format!(
                    "state:   {}\nvcpus:   {} (max {})\nmemory:  {} MiB\n",
                    i.state,
                    c.cpus.boot_vcpus,
                    c.cpus.max_vcpus,
                    c.memory.size >> 20
                );
                if let Some(k) = &c.payload.kernel {
                    s.push_str(&format!("kernel:  {k}\n"));
                }
                if let Some(r) = &c.payload.initramfs {
                    s.push_str(&format!("initrd:  {r}\n"));
                }
                if let Some(l) = &c.payload.cmdline {
                    s.push_str(&format!("cmdline: {l}\n"));
                }
                s
            }
            Err(_) => body.to_string(),
        },
        Command::Pause => "VM paused".into(),
        Command::Resume => "VM resumed".into(),
        Command::PowerButton => "Power button pressed".into(),
        Command::Reboot => "VM rebooting".into(),
        Command::Snapshot { destination } => format!("VM saved to {destination}"),
        Command::Restore { resume: true, .. } => "VM restored and running".into(),
        Command::Restore { .. } => "VM restored, paused".into(),
        Command::SendMigration { destination, .. } => {
            format!("VM migrated to {destination}; this vmm exits")
        }
        Command::ReceiveMigration { .. } => "Migrated VM running here".into(),
        Command::SwapBackend { id, vhost_socket } => {
            format!("{id} now on {}", vhost_socket.display())
        }
        Command::Shutdown => "VM shutting down".into(),
        Command::ShutdownVmm => "VMM shutting down".into(),
        Command::Create { .. } => "VM created".into(),
        Command::Boot => "VM booted".into(),
        Command::Delete => "VM deleted".into(),
        Command::AddDisk { .. } | Command::AddNet { .. } => {
            match serde_json::from_str::<PciDeviceInfo>(body) {
                Ok(d) => format!("Added {} at {}", d.id, d.bdf),
                Err(_) => body.to_string(),
            }
        }
        Command::Counters => counters_table(body),
    }
}

/// vm.counters as `entry  counter  value` rows.
fn counters_table(body: &str) -> String {
    type Map = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;
    let Ok(map) = serde_json::from_str::<Map>(body) else {
        return body.to_string();
    };
    let width = map.keys().map(String::len).max().unwrap_or(0).max(6);
    let name_width = map
        .values()
        .flat_map(|c| c.keys().map(String::len))
        .max()
        .unwrap_or(0)
        .max(7);
    let mut s = format!("{:width$}  {:name_width$}  value\n", "device", "counter");
    for (entry, counters) in &map {
        for (name, value) in counters {
            s.push_str(&format!("{entry:width$}  {name:name_width$}  {value}\n"));
        }
    }
    s
}

fn error_chain(e: &ClientError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Polls vm.info while a migration runs and prints each new pre-copy
/// round on stderr.
struct ProgressPrinter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl ProgressPrinter {
    fn start(socket: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(body) = client::call(&socket, ApiRequest::VmInfo) else {
                    continue;
                };
                let Some(p) = serde_json::from_str::<VmInfo>(&body)
                    .ok()
                    .and_then(|i| i.migration)
                else {
                    continue;
                };
                if last.as_ref() != Some(&p) {
                    const MIB: f64 = (1 << 20) as f64;
                    eprintln!(
                        "round {}: sent {:.1} MiB, {:.1} MiB dirty, dirtied at {:.1} MiB/s, sending at {:.1} MiB/s",
                        p.round,
                        p.sent_bytes as f64 / MIB,
                        p.remaining_bytes as f64 / MIB,
                        p.dirty_rate_bps as f64 / MIB,
                        p.bandwidth_bps as f64 / MIB
                    );
                    last = Some(p);
                }
            }
        });
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
