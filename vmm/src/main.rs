//! `vmm`: boots a kernel in a KVM VM. See `vmm --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::{LevelFilter, Targets};
use vmm::api::controller::Controller;
use vmm::api::http::ApiSocket;
use vmm::api::manager::{self, SocketArg};
use vmm::config::{self, BootProtocol, SerialConfig, VmConfig};
use vmm::devices_config::{parse_disk_arg, parse_net_arg, parse_vhost_user, DiskArg, NetArg};
use vmm::events;
use vmm::seccomp::{self, SeccompMode, ThreadKind};
use vmm::vhost_user::DeviceConfig;

#[derive(Parser, Debug)]
#[command(
    version = manager::VERSION,
    about = "Boot a Linux kernel (bzImage or ELF/PVH) in a KVM virtual machine"
)]
struct Cli {
    /// Kernel image: bzImage, or ELF vmlinux (PVH entry used when present).
    /// Without it (only with --api-socket) no VM is started: one is
    /// created and booted through the API (vm.create, vm.boot).
    #[arg(long, required_unless_present_any = ["api_socket", "restore"])]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) loaded at the top of low RAM.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM, e.g. 512M, 2G.
    #[arg(long, default_value = "512M", value_parser = config::parse_size)]
    memory: u64,
    /// Back guest RAM with 2 MiB huge pages (hugetlbfs memfd).
    #[arg(long)]
    hugepages: bool,
    /// COM1: stdio, pty (a pseudo-terminal; its path goes to stderr), off,
    /// or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// Boot protocol for ELF kernels.
    #[arg(long, value_enum, default_value_t = BootProtocol::Auto)]
    boot: BootProtocol,
    /// CPUID features to hide from the guest, e.g. -cx16,-clwb.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_hidden)]
    cpu_features: Option<Hidden>,
    /// A virtio-blk disk (repeatable) served by a vhost-user backend:
    /// socket=PATH[,queues=N][,queue-size=N]; or an image served by a
    /// blk-backend vmm starts (beside vmm or in PATH), restarts if it dies
    /// and stops on exit: path=FILE[,readonly=on][,queues=N][,queue-size=N]
    #[arg(long, value_parser = parse_disk_arg)]
    disk: Vec<DiskArg>,
    /// A virtio-net NIC (repeatable) served by a vhost-user backend:
    /// socket=PATH[,mac=MAC][,queue-pairs=N][,queue-size=N]; or a tap
    /// (created if missing) served by a net-backend vmm starts:
    /// tap=NAME[,mac=MAC][,queue-pairs=N][,queue-size=N]
    #[arg(long, value_parser = parse_net_arg)]
    net: Vec<NetArg>,
    /// Any virtio device served by a vhost-user backend (repeatable):
    /// type=NAME|ID,socket=PATH[,queues=N][,queue-size=N]
    #[arg(long = "vhost-user", value_parser = parse_vhost_user)]
    vhost_user: Vec<DeviceConfig>,
    /// Serve the control API (Cloud Hypervisor's REST subset) on a unix
    /// socket: path=PATH (or just PATH), created mode 0600 and removed on
    /// exit; or fd=N, a listening socket bound by a manager such as
    /// libvirt, which keeps its path: once the manager removes that path
    /// vmm stops the VM and exits.
    #[arg(long)]
    api_socket: Option<SocketArg>,
    /// Write life-cycle events as JSON lines (Cloud Hypervisor's shape) to
    /// a file or FIFO, or to an inherited fd that vmm then owns:
    /// path=PATH or fd=N
    #[arg(long)]
    event_monitor: Option<events::Target>,
    /// Restore the VM a snapshot directory holds instead of booting one:
    /// source_url=file:///DIR[,resume=on|off][,memory_restore_mode=copy|map].
    /// It stays paused (for
    /// vm.resume) unless resume=on; without --api-socket resume=on is
    /// required.
    #[arg(long, conflicts_with = "kernel", value_parser = parse_restore)]
    restore: Option<Restore>,
    /// seccomp filters per thread: `true` (a forbidden system call ends
    /// vmm with status 159 and one line on stderr), `log` (allowed, logged
    /// by the kernel) or `false` (none); the backends vmm starts get the
    /// same mode.
    #[arg(long, default_value = "true")]
    seccomp: SeccompMode,
    /// Tests: a thread of this kind makes a forbidden system call once
    /// confined (controller, vm, vcpu, api, events, reconnect, migrate,
    /// watch, spawn).
    #[arg(long, hide = true)]
    seccomp_probe: Option<ThreadKind>,
}

/// `--restore`: the snapshot directory and whether to run it at once.
#[derive(Clone, Debug)]
struct Restore {
    dir: PathBuf,
    resume: bool,
    memory: vmm::snapshot::MemoryRestore,
}

fn parse_restore(s: &str) -> Result<Restore, String> {
    let mut dir = None;
    let mut resume = false;
    let mut memory = vmm::snapshot::MemoryRestore::Copy;
    for item in s.split(',') {
        match item.split_once('=') {
            Some(("source_url", url)) => {
                dir = Some(vmm::snapshot::dir_from_url(url).map_err(|e| e.to_string())?)
            }
            Some(("resume", "on")) => resume = true,
            Some(("resume", "off")) => resume = false,
            Some(("prefault", "on" | "off")) => {}
            Some(("memory_restore_mode", m)) => memory = m.parse()?,
            _ => {
                return Err(format!(
                    "'{item}': expected source_url=file:///DIR, resume=on|off, prefault=on|off or memory_restore_mode=copy|map"
                ))
            }
        }
    }
    let dir = dir.ok_or("source_url=file:///DIR is required")?;
    Ok(Restore {
        dir,
        resume,
        memory,
    })
}

/// Feature names to hide (a newtype: clap treats a bare `Vec` as many values).
#[derive(Clone, Debug)]
struct Hidden(Vec<String>);

fn parse_hidden(s: &str) -> Result<Hidden, config::ConfigError> {
    config::parse_cpu_features(s).map(Hidden)
}

/// Run as `cloud-hypervisor` (libvirt's ch driver runs the first one in
/// PATH), `--version` prints the line the driver parses.
fn cloud_hypervisor_version() -> bool {
    let mut args = std::env::args_os();
    let named = args
        .next()
        .map(PathBuf::from)
        .is_some_and(|p| p.file_name().is_some_and(|n| n == "cloud-hypervisor"));
    named && args.any(|a| a == "--version" || a == "-V")
}

fn main() -> ExitCode {
    if cloud_hypervisor_version() {
        println!("{}", manager::cloud_hypervisor_version_line());
        return ExitCode::SUCCESS;
    }
    init_logging();
    let cli = Cli::parse();
    // Before any thread starts: each confines itself at its start.
    if let Err(e) = seccomp::enable(cli.seccomp, cli.seccomp_probe) {
        eprintln!("vmm: {}", vmm::error_chain(&e));
        return ExitCode::FAILURE;
    }
    // Backends are started from the command line (an image or a tap) or
    // through the API; otherwise no thread would ever use the launcher.
    let launches = cli.api_socket.is_some()
        || cli.disk.iter().any(|d| matches!(d, DiskArg::Image(_)))
        || cli.net.iter().any(|n| matches!(n, NetArg::Tap(_)));
    if launches {
        if let Err(e) = vmm::spawned::start_launcher() {
            eprintln!("vmm: cannot start the backend launcher thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Before the event monitor, whose FIFO blocks until a reader comes:
    // if the manager gives up first, its socket's removal ends us there.
    let api = match cli.api_socket.map(api_socket).transpose() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmm: {}", vmm::error_chain(e.as_ref()));
            return ExitCode::FAILURE;
        }
    };
    if let Some(target) = &cli.event_monitor {
        if let Err(e) = events::start(target) {
            eprintln!("vmm: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    events::emit("vmm", "starting", &[]);
    let mut devices = Vec::new();
    let disks = cli.disk.into_iter().map(|d| match d {
        DiskArg::Socket(d) => Ok(d),
        DiskArg::Image(i) => Err(vmm::spawned::Backend::Disk(i)),
    });
    let nets = cli.net.into_iter().map(|n| match n {
        NetArg::Socket(n) => Ok(n),
        NetArg::Tap(t) => Err(vmm::spawned::Backend::Tap(t)),
    });
    for d in disks.chain(nets) {
        match d.or_else(|b| vmm::spawned::start(&b)) {
            Ok(d) => devices.push(d),
            Err(e) => {
                eprintln!("vmm: {}", vmm::error_chain(&e));
                vmm::spawned::stop_all();
                return ExitCode::FAILURE;
            }
        }
    }
    let cfg = cli.kernel.map(|kernel| VmConfig {
        kernel,
        initramfs: cli.initramfs,
        cmdline: cli.cmdline,
        cpus: u8::try_from(cli.cpus).unwrap_or(0),
        memory: cli.memory,
        hugepages: cli.hugepages,
        serial: cli.serial,
        boot: cli.boot,
        hidden_cpu_features: cli.cpu_features.map(|h| h.0).unwrap_or_default(),
        devices: devices.into_iter().chain(cli.vhost_user).collect(),
    });
    let result = boot(cfg, cli.restore, api);
    vmm::spawned::stop_all();
    events::finish();
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(out)) if out.reason.is_clean() => {
            tracing::info!(
                reason = %out.reason,
                pio_exits = out.pio_exits,
                mmio_exits = out.mmio_exits,
                notify_exits = out.notify_exits,
                "VM stopped"
            );
            ExitCode::SUCCESS
        }
        Ok(Some(out)) => {
            eprintln!("vmm: {}", out.reason);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmm: {}", vmm::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at the level `VMM_LOG` gives (`info`, `vmm::pci=debug,info`,
/// ...; `warn` without it or if it does not parse). A per-target filter
/// ([`Targets`]) rather than `EnvFilter`: the same directives without span
/// and field matching, and without the regex engine in the binary (~0.25
/// MiB of code).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::WARN));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(stderr)
        .with(filter)
        .init();
}

/// The API socket: bound at `path=`, or the manager's (`fd=`), whose
/// path is watched from now on (see [`manager`]).
fn api_socket(arg: SocketArg) -> Result<ApiSocket, Box<dyn std::error::Error>> {
    Ok(match arg {
        SocketArg::Path(p) => ApiSocket::bind(&p)?,
        SocketArg::Fd(fd) => {
            let listener = manager::take_listener(fd)?;
            if let Some(path) = manager::bound_path(&listener) {
                manager::stop_when_removed(path)?;
            }
            ApiSocket::adopt(listener)
        }
    })
}

/// Builds and runs the VM, serving the API on `api_socket` if given. The
/// socket is bound first (a live one fails before anything boots) and
/// served once the signals are blocked, so the server thread inherits the
/// mask. With the API, the controller owns the VM: the one from the
/// command line (the process ends with it) or none, waiting for vm.create.
/// This thread confines itself once the API and event threads run, before
/// any VM is built (see [`vmm::seccomp`]).
fn boot(
    cfg: Option<VmConfig>,
    restore: Option<Restore>,
    api_socket: Option<ApiSocket>,
) -> Result<Option<vmm::Outcome>, Box<dyn std::error::Error>> {
    let Some(socket) = api_socket else {
        seccomp::apply(ThreadKind::Controller)?;
        if let Some(r) = restore {
            if !r.resume {
                return Err("--restore without --api-socket needs resume=on".into());
            }
            let mut m = vmm::Machine::restore(&r.dir, r.memory)?;
            m.resume();
            return Ok(Some(m.run()?));
        }
        let cfg = cfg.ok_or("--kernel is required without --api-socket")?;
        return Ok(Some(vmm::Machine::new(&cfg)?.run()?));
    };
    let exit_with_vm = cfg.is_some() || restore.is_some();
    let (mut controller, tx) = Controller::new(exit_with_vm)?;
    let server = socket.serve(tx)?;
    seccomp::apply(ThreadKind::Controller)?;
    if let Some(cfg) = cfg {
        controller.boot_now(cfg)?;
    }
    if let Some(r) = restore {
        controller
            .restore_now(r.dir, r.resume, r.memory, &Default::default())?
            .map_err(vmm::api::controller::ControllerError::Machine)?;
    }
    let outcome = controller.run();
    drop(server);
    Ok(outcome?)
}
