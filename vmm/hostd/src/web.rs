//! The dashboard's routes: the page and its assets (built into the
//! binary), the JSON the page polls, and the VM actions its buttons send.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the page |
//! | `GET /assets/NAME` | `app.js`, `app.css`, uPlot's `uPlot.iife.min.js` and `uPlot.min.css` |
//! | `GET /metrics` | the exporter ([`crate::exporter`]) |
//! | `GET /api/vms` | every VM: name, state, devices and one reading of its counters |
//! | `GET /api/vms/NAME/console?from=N` | the VM's serial output from byte N (vmm's vm.console) |
//! | `POST /api/vms/NAME/ACTION` | `pause`, `resume`, `reboot`, `shutdown` (ACPI power button), `power-off` (vm.shutdown: stops at once), `snapshot` (pauses if running, snapshots into a new directory below the snapshot directory, resumes) |
//!
//! Pause and resume of a VM that libvirt started (its API socket in one of
//! libvirt's ch directories) go through libvirt (`virsh -c ch:///session
//! suspend|resume NAME`, `ch:///system` for the system daemon's), as
//! virt-manager's would: libvirt's ch driver does not follow a pause from
//! vmm's events, so a pause behind its back would leave `virsh domstate`
//! saying running. `virsh` must be in vmm-hostd's PATH then.
//!
//! Actions need the header `X-Vmm-Hostd: 1`: a page of another origin
//! cannot send it without the browser asking first (and we never allow
//! it), so a site the user visits cannot press the buttons.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use thiserror::Error;
use vmm::api::registry::{self, Found};

use crate::collect::{self, ask, CollectError, Reading};

/// The header every action must carry.
pub const ACTION_HEADER: &str = "x-vmm-hostd";

/// Errors of a dashboard request.
#[derive(Debug, Error)]
pub enum WebError {
    #[error("No running vmm named {0}")]
    NoVm(String),
    #[error("Unknown action {0}")]
    UnknownAction(String),
    #[error("{0}")]
    Vmm(String, #[source] CollectError),
    #[error("Cannot create the snapshot directory {0}")]
    SnapshotDir(String, #[source] std::io::Error),
    #[error("Cannot run virsh")]
    VirshRun(#[source] std::io::Error),
    #[error("virsh {0} failed: {1}")]
    Virsh(String, String),
}

impl WebError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoVm(_) | Self::UnknownAction(_) => 404,
            Self::Vmm(_, CollectError::Status(s, _)) => *s,
            Self::Vmm(..) | Self::Virsh(..) => 502,
            Self::SnapshotDir(..) | Self::VirshRun(_) => 500,
        }
    }
}

/// A static asset: content type and bytes.
pub fn asset(name: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match name {
        "" | "index.html" => (
            "text/html; charset=utf-8",
            include_bytes!("../assets/index.html"),
        ),
        "app.js" => ("text/javascript", include_bytes!("../assets/app.js")),
        "app.css" => ("text/css", include_bytes!("../assets/app.css")),
        "uPlot.iife.min.js" => (
            "text/javascript",
            include_bytes!("../assets/vendor/uplot/uPlot.iife.min.js"),
        ),
        "uPlot.min.css" => (
            "text/css",
            include_bytes!("../assets/vendor/uplot/uPlot.min.css"),
        ),
        _ => return None,
    })
}

/// One VM as the page shows it.
pub fn vm_json(r: &Reading, t: u64) -> Value {
    let devices: Vec<Value> = ["disks", "net"]
        .iter()
        .flat_map(|kind| {
            r.info
                .as_ref()
                .and_then(|i| i.pointer(&format!("/config/{kind}"))?.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .map(move |d| {
                    json!({
                        "kind": if *kind == "disks" { "disk" } else { "net" },
                        "id": d.get("id"),
                        "socket": d.get("vhost_socket"),
                        "mac": d.get("mac"),
                        "queues": d.get("num_queues"),
                    })
                })
        })
        .collect();
    let sum =
        |ids: &[String], name: &str| -> u64 { ids.iter().map(|id| r.counter(id, name)).sum() };
    let disks = r.device_ids("disks");
    let nics = r.device_ids("net");
    json!({
        "name": r.name,
        "socket": r.socket,
        "state": r.state(),
        "error": r.error,
        "cpus": r.config_u64("/cpus/boot_vcpus"),
        "memory": r.config_u64("/memory/size"),
        "serial": r.info.as_ref().and_then(|i| i.pointer("/config/serial").cloned()),
        "devices": devices,
        "t": t,
        "cpu_us": r.counter("vm", "cpu_time_us"),
        "mem_bytes": r.counter("vm", "memory_allocated_bytes"),
        "disk": {
            "reads": sum(&disks, "read_requests"),
            "writes": sum(&disks, "write_requests"),
            "read_bytes": sum(&disks, "read_bytes"),
            "write_bytes": sum(&disks, "write_bytes"),
        },
        "net": {
            "rx_packets": sum(&nics, "rx_frames"),
            "tx_packets": sum(&nics, "tx_frames"),
            "rx_bytes": sum(&nics, "rx_bytes"),
            "tx_bytes": sum(&nics, "tx_bytes"),
        },
    })
}

/// `GET /api/vms`.
pub fn vms() -> Value {
    let t = collect::now_ms();
    Value::Array(collect::read_all().iter().map(|r| vm_json(r, t)).collect())
}

fn find(name: &str) -> Result<Found, WebError> {
    registry::discover()
        .into_iter()
        .find(|f| f.name == name)
        .ok_or_else(|| WebError::NoVm(name.to_string()))
}

/// `GET /api/vms/NAME/console?from=N`: vmm's answer as is.
pub fn console(name: &str, from: u64) -> Result<String, WebError> {
    let vm = find(name)?;
    let reply = vmm::api::client::get(
        &vm.socket,
        &format!("{}vm.console?from={from}", vmm::api::http::API_PREFIX),
        collect::TIMEOUT,
    )
    .map_err(|e| WebError::Vmm("Cannot read the console".into(), CollectError::Client(e)))?;
    if reply.status != 200 {
        return Err(WebError::Vmm(
            "Cannot read the console".into(),
            CollectError::Status(reply.status, reply.body),
        ));
    }
    Ok(reply.body)
}

fn put(socket: &Path, endpoint: &str, body: &[u8]) -> Result<(), WebError> {
    ask(socket, "PUT", endpoint, body)
        .map(drop)
        .map_err(|e| WebError::Vmm(format!("{endpoint} failed"), e))
}

/// `POST /api/vms/NAME/ACTION`: what was done, as JSON.
pub fn action(name: &str, action: &str, snapshots: &Path) -> Result<Value, WebError> {
    let vm = find(name)?;
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    let by_libvirt = match action {
        "pause" => Some("suspend"),
        "resume" => Some("resume"),
        _ => None,
    };
    if let (Some(uri), Some(command)) = (libvirt_uri(&vm.socket, runtime.as_deref()), by_libvirt) {
        virsh(uri, command, &vm.name)?;
        tracing::info!(vm = name, action, uri, "done through libvirt");
        return Ok(json!({"done": action}));
    }
    let endpoint = match action {
        "pause" => "vm.pause",
        "resume" => "vm.resume",
        "reboot" => "vm.reboot",
        "shutdown" => "vm.power-button",
        "power-off" => "vm.shutdown",
        "snapshot" => return snapshot(&vm, snapshots),
        other => return Err(WebError::UnknownAction(other.to_string())),
    };
    put(&vm.socket, endpoint, &[])?;
    tracing::info!(vm = name, action, "done");
    Ok(json!({"done": action}))
}

/// The libvirt connection that manages the vmm on `socket`, if libvirt's
/// ch driver bound it: `ch:///session` below `runtime`
/// (`$XDG_RUNTIME_DIR`), `ch:///system` below `/run/libvirt/ch`.
fn libvirt_uri(socket: &Path, runtime: Option<&Path>) -> Option<&'static str> {
    let file = socket.file_name()?.to_str()?;
    if !file.ends_with("-socket") {
        return None;
    }
    let dir = socket.parent()?;
    if runtime.is_some_and(|r| dir == r.join("libvirt/ch/run")) {
        Some("ch:///session")
    } else if dir == Path::new("/run/libvirt/ch") {
        Some("ch:///system")
    } else {
        None
    }
}

/// `virsh -c uri command domain`.
fn virsh(uri: &str, command: &str, domain: &str) -> Result<(), WebError> {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri, command, domain])
        .stdin(Stdio::null())
        .output()
        .map_err(WebError::VirshRun)?;
    if !out.status.success() {
        return Err(WebError::Virsh(
            command.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Pauses `vm` if it runs, snapshots it into a new directory and resumes
/// it if it ran.
fn snapshot(vm: &Found, snapshots: &Path) -> Result<Value, WebError> {
    let reading = collect::read(vm);
    let running = reading.state() == "Running";
    let dir: PathBuf = snapshots.join(format!("{}-{}", vm.name, collect::now_ms()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| WebError::SnapshotDir(dir.display().to_string(), e))?;
    if running {
        put(&vm.socket, "vm.pause", &[])?;
    }
    let body = json!({"destination_url": format!("file://{}", dir.display())}).to_string();
    let taken = put(&vm.socket, "vm.snapshot", body.as_bytes());
    if running {
        put(&vm.socket, "vm.resume", &[])?;
    }
    taken?;
    tracing::info!(vm = %vm.name, dir = %dir.display(), "snapshot taken");
    Ok(json!({"done": "snapshot", "path": dir}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_libvirts_sockets_are_managed_through_libvirt() {
        let run = Path::new("/run/user/1000");

        let uris = [
            "/run/user/1000/libvirt/ch/run/web-socket",
            "/run/libvirt/ch/web-socket",
            "/run/user/1000/vmm/web.sock",
            "/run/user/1000/libvirt/ch/run/web.sock",
        ]
        .map(|s| libvirt_uri(Path::new(s), Some(run)));

        assert_eq!(
            uris,
            [Some("ch:///session"), Some("ch:///system"), None, None]
        );
    }
}
