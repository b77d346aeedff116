//! `vmctl`: drives a running `vmm` through its control API socket. See
//! `vmctl --help`; the requests live in `vmm::api::client`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::api::client::{self, ClientError};
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

#[derive(Subcommand, Debug, Clone, Copy)]
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
    /// Stop the VM at once; vmm then exits (vm.shutdown).
    Shutdown,
    /// Stop the VMM process (vmm.shutdown).
    ShutdownVmm,
}

impl Command {
    fn request(self) -> ApiRequest {
        match self {
            Self::Ping => ApiRequest::VmmPing,
            Self::Info => ApiRequest::VmInfo,
            Self::Pause => ApiRequest::VmPause,
            Self::Resume => ApiRequest::VmResume,
            Self::PowerButton => ApiRequest::VmPowerButton,
            Self::Shutdown => ApiRequest::VmShutdown,
            Self::ShutdownVmm => ApiRequest::VmmShutdown,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match client::call(&cli.api_socket, cli.command.request()) {
        Ok(body) => {
            let out = if cli.json {
                body
            } else {
                human(cli.command, &body)
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
fn human(command: Command, body: &str) -> String {
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
        Command::Shutdown => "VM shutting down".into(),
        Command::ShutdownVmm => "VMM shutting down".into(),
    }
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
