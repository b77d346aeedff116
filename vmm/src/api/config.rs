//! Cloud Hypervisor's `VmConfig`, `DiskConfig` and `NetConfig` request
//! bodies, mapped onto the one typed [`crate::VmConfig`] the command line
//! also builds (and validated by it).
//!
//! Unknown fields are refused. Fields Cloud Hypervisor has but we do not
//! implement are accepted only at Cloud Hypervisor's default value (so a
//! whole config as `ch-remote` sends it passes) and refused, naming the
//! field, otherwise.
//!
//! Our extension: `DiskConfig` and `NetConfig` take `metrics_socket`, the
//! path of the vhost-user backend's `--metrics-socket`, which vm.counters
//! reads.
//!
//! A disk given by `path` (as libvirt gives them) is an image served by a
//! backend that vmm starts ([`crate::spawned`]), a NIC given by `tap` a
//! tap served the same way; the mapping takes the function that starts
//! them ([`Starter`]), so parsing alone starts nothing.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

use crate::config::{BootProtocol, ConfigError, SerialConfig, DEFAULT_CMDLINE};
use crate::devices_config::{self, DeviceSpecError, ImageDisk, TapNet, MAX_QUEUES, MAX_QUEUE_SIZE};
use crate::spawned::{Backend, SpawnError};
use crate::vhost_user::{DeviceConfig, Kind};

/// Errors in a request body.
#[derive(Debug, Error)]
pub enum BodyError {
    #[error("Invalid JSON body")]
    Json(#[source] serde_json::Error),
    #[error("{0}: {1}")]
    Unsupported(String, &'static str),
    #[error("{0} is required")]
    Missing(String),
    #[error("{0}")]
    Device(String, #[source] DeviceSpecError),
    #[error("Invalid configuration")]
    Config(#[source] ConfigError),
    #[error("{0}: cannot start its backend")]
    Spawn(String, #[source] crate::spawned::SpawnError),
}

/// Starts the backend for a disk image or a tap; returns its device.
pub type Starter<'a> = &'a mut dyn FnMut(&Backend) -> std::result::Result<DeviceConfig, SpawnError>;

/// The [`Starter`] of a body that is only parsed: images and taps are
/// refused.
pub fn no_images(_: &Backend) -> std::result::Result<DeviceConfig, SpawnError> {
    Err(SpawnError::NotFound("a running vmm to start the backend"))
}

type Result<T> = std::result::Result<T, BodyError>;

/// Refuses `field` unless absent or equal to one of `defaults`.
fn only_default(field: &str, v: &Option<Value>, defaults: &[Value]) -> Result<()> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(v) if defaults.contains(v) => Ok(()),
        Some(_) => Err(BodyError::Unsupported(
            field.to_string(),
            "not supported by this VMM",
        )),
    }
}

/// Values that mean "nothing asked for": false, 0, "", [] and {}.
fn empty() -> Vec<Value> {
    vec![json!(false), json!(0), json!(""), json!([]), json!({})]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigBody {
    pub payload: Option<PayloadBody>,
    pub cpus: Option<CpusBody>,
    pub memory: Option<MemoryBody>,
    pub disks: Option<Vec<DiskConfigBody>>,
    pub net: Option<Vec<NetConfigBody>>,
    pub serial: Option<ConsoleBody>,
    pub console: Option<ConsoleBody>,
    rate_limit_groups: Option<Value>,
    rng: Option<Value>,
    balloon: Option<Value>,
    fs: Option<Value>,
    pmem: Option<Value>,
    debug_console: Option<Value>,
    devices: Option<Value>,
    user_devices: Option<Value>,
    vdpa: Option<Value>,
    vsock: Option<Value>,
    sgx_epc: Option<Value>,
    numa: Option<Value>,
    iommu: Option<Value>,
    watchdog: Option<Value>,
    pvpanic: Option<Value>,
    pci_segments: Option<Value>,
    platform: Option<Value>,
    tpm: Option<Value>,
    landlock_enable: Option<Value>,
    landlock_rules: Option<Value>,
    pvmemcontrol: Option<Value>,
    preserved_fds: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadBody {
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub cmdline: Option<String>,
    firmware: Option<Value>,
    igvm: Option<Value>,
    host_data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusBody {
    pub boot_vcpus: u8,
    pub max_vcpus: Option<u8>,
    topology: Option<Value>,
    kvm_hyperv: Option<Value>,
    max_phys_bits: Option<Value>,
    affinity: Option<Value>,
    features: Option<Value>,
    nested: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBody {
    pub size: u64,
    pub shared: Option<bool>,
    pub hugepages: Option<bool>,
    hugepage_size: Option<Value>,
    mergeable: Option<Value>,
    hotplug_method: Option<Value>,
    hotplug_size: Option<Value>,
    hotplugged_size: Option<Value>,
    prefault: Option<Value>,
    zones: Option<Value>,
    thp: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleBody {
    pub mode: String,
    pub file: Option<String>,
    iommu: Option<Value>,
    socket: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfigBody {
    pub id: Option<String>,
    pub vhost_user: Option<bool>,
    pub vhost_socket: Option<String>,
    /// Our extension: the backend's metrics socket (vm.counters).
    pub metrics_socket: Option<String>,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub readonly: Option<bool>,
    path: Option<Value>,
    direct: Option<Value>,
    iommu: Option<Value>,
    rate_limit_group: Option<Value>,
    rate_limiter_config: Option<Value>,
    pci_segment: Option<Value>,
    serial: Option<Value>,
    queue_affinity: Option<Value>,
    disable_io_uring: Option<Value>,
    disable_aio: Option<Value>,
    sparse: Option<Value>,
    image_type: Option<Value>,
    backing_files: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfigBody {
    pub id: Option<String>,
    pub vhost_user: Option<bool>,
    pub vhost_socket: Option<String>,
    /// Our extension: the backend's metrics socket (vm.counters).
    pub metrics_socket: Option<String>,
    pub mac: Option<String>,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    tap: Option<Value>,
    ip: Option<Value>,
    mask: Option<Value>,
    host_mac: Option<Value>,
    mtu: Option<Value>,
    iommu: Option<Value>,
    vhost_mode: Option<Value>,
    fds: Option<Value>,
    rate_limiter_config: Option<Value>,
    pci_segment: Option<Value>,
    offload_tso: Option<Value>,
    offload_ufo: Option<Value>,
    offload_csum: Option<Value>,
}

/// Parses a JSON body, naming the unknown field when there is one.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(BodyError::Json)
}

/// A device and the id the API knows it by.
pub struct NamedDevice {
    pub id: Option<String>,
    pub device: DeviceConfig,
}

fn queues(field: &str, v: Option<u16>, default: u16) -> Result<u16> {
    v.map_or(Ok(default), |n| {
        devices_config::number("num_queues", &n.to_string(), MAX_QUEUES, false)
            .map_err(|e| BodyError::Device(field.into(), e))
    })
}

fn queue_size(field: &str, v: Option<u16>) -> Result<u16> {
    v.map_or(Ok(devices_config::DEFAULT_QUEUE_SIZE), |n| {
        devices_config::number("queue_size", &n.to_string(), MAX_QUEUE_SIZE, true)
            .map_err(|e| BodyError::Device(field.into(), e))
    })
}

fn vhost_socket(field: &str, vhost_user: Option<bool>, socket: Option<String>) -> Result<PathBuf> {
    if vhost_user != Some(true) {
        return Err(BodyError::Unsupported(
            format!("{field}.vhost_user"),
            "only vhost-user devices are supported (set vhost_user and vhost_socket)",
        ));
    }
    socket
        .map(PathBuf::from)
        .ok_or_else(|| BodyError::Missing(format!("{field}.vhost_socket")))
}

impl DiskConfigBody {
    /// The disk as a vhost-user block device; `field` names it in errors.
    /// A disk given as an image is refused (see [`Self::into_device_with`]).
    pub fn into_device(self, field: &str) -> Result<NamedDevice> {
        self.into_device_with(field, &mut no_images)
    }

    /// The disk as a vhost-user block device: the backend's socket as
    /// given, or, for a `path`, the one `start` serves the image on.
    pub fn into_device_with(self, field: &str, start: Starter) -> Result<NamedDevice> {
        let f = |n: &str| format!("{field}.{n}");
        let image = match &self.path {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if self.vhost_user != Some(true) => Some(p.clone()),
            Some(Value::String(_)) => {
                return Err(BodyError::Unsupported(
                    f("path"),
                    "give either path (an image) or vhost_user with vhost_socket",
                ))
            }
            Some(_) => return Err(BodyError::Unsupported(f("path"), "must be a string")),
        };
        if image.is_none() {
            only_default(
                &f("readonly"),
                &self.readonly.map(Value::from),
                &[json!(false)],
            )?;
        }
        for (n, v) in [
            ("direct", &self.direct),
            ("iommu", &self.iommu),
            ("rate_limit_group", &self.rate_limit_group),
            ("rate_limiter_config", &self.rate_limiter_config),
            ("pci_segment", &self.pci_segment),
            ("serial", &self.serial),
            ("queue_affinity", &self.queue_affinity),
            ("disable_io_uring", &self.disable_io_uring),
            ("disable_aio", &self.disable_aio),
            ("backing_files", &self.backing_files),
        ] {
            only_default(&f(n), v, &empty())?;
        }
        only_default(&f("sparse"), &self.sparse, &[json!(true)])?;
        only_default(
            &f("image_type"),
            &self.image_type,
            &[json!("Unknown"), json!("Raw")],
        )?;
        if let Some(path) = image {
            only_default(
                &f("metrics_socket"),
                &self.metrics_socket.map(Value::from),
                &[],
            )?;
            let disk = ImageDisk {
                path: path.into(),
                readonly: self.readonly.unwrap_or(false),
                queues: queues(&f("num_queues"), self.num_queues, 1)?,
                queue_size: queue_size(&f("queue_size"), self.queue_size)?,
            };
            let device = start(&Backend::Disk(disk)).map_err(|e| BodyError::Spawn(f("path"), e))?;
            return Ok(NamedDevice {
                id: self.id,
                device,
            });
        }
        let socket = vhost_socket(field, self.vhost_user, self.vhost_socket)?;
        Ok(NamedDevice {
            id: self.id,
            device: DeviceConfig {
                kind: Kind::Block,
                socket,
                queues: queues(&f("num_queues"), self.num_queues, 1)?,
                queue_size: queue_size(&f("queue_size"), self.queue_size)?,
                metrics_socket: self.metrics_socket.map(PathBuf::from),
            },
        })
    }
}

impl NetConfigBody {
    /// The NIC as a vhost-user net device; `field` names it in errors. A
    /// NIC given as a tap is refused (see [`Self::into_device_with`]).
    pub fn into_device(self, field: &str) -> Result<NamedDevice> {
        self.into_device_with(field, &mut no_images)
    }

    /// The NIC as a vhost-user net device: the backend's socket as given,
    /// or, for a `tap`, the one `start` serves it on.
    pub fn into_device_with(self, field: &str, start: Starter) -> Result<NamedDevice> {
        let f = |n: &str| format!("{field}.{n}");
        let tap = match &self.tap {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if self.vhost_user != Some(true) => Some(t.clone()),
            Some(Value::String(_)) => {
                return Err(BodyError::Unsupported(
                    f("tap"),
                    "give either tap or vhost_user with vhost_socket",
                ))
            }
            Some(_) => return Err(BodyError::Unsupported(f("tap"), "must be a string")),
        };
        // Only the API server writes fds here: those sent with the request.
        let fds: Vec<std::os::fd::RawFd> = match &self.fds {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| BodyError::Unsupported(f("fds"), "must be a list of fds"))?,
        };
        if !fds.is_empty() && (tap.is_some() || self.vhost_user == Some(true)) {
            return Err(BodyError::Unsupported(
                f("fds"),
                "give either tap fds, tap or vhost_user with vhost_socket",
            ));
        }
        for (n, v) in [
            ("host_mac", &self.host_mac),
            ("mtu", &self.mtu),
            ("iommu", &self.iommu),
            ("rate_limiter_config", &self.rate_limiter_config),
            ("pci_segment", &self.pci_segment),
        ] {
            only_default(&f(n), v, &empty())?;
        }
        // Cloud Hypervisor's defaults, sent whole by its clients.
        only_default(&f("ip"), &self.ip, &[json!("192.168.249.1")])?;
        only_default(&f("mask"), &self.mask, &[json!("255.255.255.0")])?;
        only_default(&f("vhost_mode"), &self.vhost_mode, &[json!("Client")])?;
        for (n, v) in [
            ("offload_tso", &self.offload_tso),
            ("offload_ufo", &self.offload_ufo),
            ("offload_csum", &self.offload_csum),
        ] {
            only_default(&f(n), v, &[json!(true)])?;
        }
        let mac = self
            .mac
            .as_deref()
            .map(devices_config::mac)
            .transpose()
            .map_err(|e| BodyError::Device(f("mac"), e))?;
        // num_queues counts both directions, as in Cloud Hypervisor.
        let total = queues(&f("num_queues"), self.num_queues, 2)?;
        if total % 2 != 0 {
            return Err(BodyError::Unsupported(
                f("num_queues"),
                "must be even (one RX and one TX queue per pair)",
            ));
        }
        if tap.is_some() || !fds.is_empty() {
            only_default(
                &f("metrics_socket"),
                &self.metrics_socket.map(Value::from),
                &[],
            )?;
            let named = tap.is_some();
            let net = TapNet {
                tap: tap.unwrap_or_default(),
                mac,
                queue_pairs: total / 2,
                queue_size: queue_size(&f("queue_size"), self.queue_size)?,
            };
            let (backend, what) = if named {
                (Backend::Tap(net), "tap")
            } else {
                (Backend::TapFds(net, fds), "fds")
            };
            let device = start(&backend).map_err(|e| BodyError::Spawn(f(what), e))?;
            return Ok(NamedDevice {
                id: self.id,
                device,
            });
        }
        let socket = vhost_socket(field, self.vhost_user, self.vhost_socket)?;
        Ok(NamedDevice {
            id: self.id,
            device: DeviceConfig {
                kind: Kind::Net {
                    mac,
                    queue_pairs: total / 2,
                },
                socket,
                queues: total,
                queue_size: queue_size(&f("queue_size"), self.queue_size)?,
                metrics_socket: self.metrics_socket.map(PathBuf::from),
            },
        })
    }
}

fn serial(c: Option<ConsoleBody>) -> Result<SerialConfig> {
    let Some(c) = c else {
        return Ok(SerialConfig::Off);
    };
    only_default("serial.iommu", &c.iommu, &empty())?;
    only_default("serial.socket", &c.socket, &[])?;
    match c.mode.as_str() {
        "Tty" => Ok(SerialConfig::Stdio),
        "Pty" => Ok(SerialConfig::Pty),
        "Off" | "Null" => Ok(SerialConfig::Off),
        "File" => c
            .file
            .map(|f| SerialConfig::File(f.into()))
            .ok_or_else(|| BodyError::Missing("serial.file".into())),
        _ => Err(BodyError::Unsupported(
            "serial.mode".into(),
            "only Tty, Pty, File, Off and Null are supported",
        )),
    }
}

fn console(c: Option<ConsoleBody>) -> Result<()> {
    match c {
        None => Ok(()),
        Some(c) if c.mode == "Off" || c.mode == "Null" => {
            only_default("console.iommu", &c.iommu, &empty())
        }
        Some(_) => Err(BodyError::Unsupported(
            "console.mode".into(),
            "there is no virtio-console: only Off or Null",
        )),
    }
}

impl VmConfigBody {
    /// The typed config (validated) and the ids of its devices; disks
    /// given as images are refused (see [`Self::into_config_with`]).
    pub fn into_config(self) -> Result<(crate::VmConfig, Vec<Option<String>>)> {
        self.into_config_with(&mut no_images)
    }

    /// [`Self::into_config`], with disk images served by what `start`
    /// starts (after every other field is checked).
    pub fn into_config_with(
        self,
        start: Starter,
    ) -> Result<(crate::VmConfig, Vec<Option<String>>)> {
        for (n, v) in [
            ("rate_limit_groups", &self.rate_limit_groups),
            ("balloon", &self.balloon),
            ("fs", &self.fs),
            ("pmem", &self.pmem),
            ("devices", &self.devices),
            ("user_devices", &self.user_devices),
            ("vdpa", &self.vdpa),
            ("vsock", &self.vsock),
            ("sgx_epc", &self.sgx_epc),
            ("numa", &self.numa),
            ("iommu", &self.iommu),
            ("watchdog", &self.watchdog),
            ("pvpanic", &self.pvpanic),
            ("pci_segments", &self.pci_segments),
            ("platform", &self.platform),
            ("tpm", &self.tpm),
            ("landlock_enable", &self.landlock_enable),
            ("landlock_rules", &self.landlock_rules),
            ("pvmemcontrol", &self.pvmemcontrol),
            ("preserved_fds", &self.preserved_fds),
        ] {
            only_default(n, v, &empty())?;
        }
        only_default(
            "rng",
            &self.rng,
            &[
                json!({"src": "/dev/urandom"}),
                json!({"src": "/dev/urandom", "iommu": false}),
            ],
        )?;
        only_default(
            "debug_console",
            &self.debug_console,
            &[
                json!({"mode": "Off"}),
                json!({"file": null, "mode": "Off", "iobase": 233}),
            ],
        )?;
        let payload = self
            .payload
            .ok_or_else(|| BodyError::Missing("payload".into()))?;
        only_default("payload.firmware", &payload.firmware, &[])?;
        only_default("payload.igvm", &payload.igvm, &[])?;
        only_default("payload.host_data", &payload.host_data, &[])?;
        let kernel = payload
            .kernel
            .ok_or_else(|| BodyError::Missing("payload.kernel".into()))?;

        let cpus = match self.cpus {
            None => 1,
            Some(c) => {
                if c.max_vcpus.is_some_and(|m| m != c.boot_vcpus) {
                    return Err(BodyError::Unsupported(
                        "cpus.max_vcpus".into(),
                        "vCPU hot-plug is not supported: must equal boot_vcpus",
                    ));
                }
                only_default("cpus.topology", &c.topology, &[])?;
                only_default("cpus.kvm_hyperv", &c.kvm_hyperv, &empty())?;
                only_default("cpus.max_phys_bits", &c.max_phys_bits, &[json!(46)])?;
                only_default("cpus.affinity", &c.affinity, &empty())?;
                only_default(
                    "cpus.features",
                    &c.features,
                    &[json!({}), json!({"amx": false})],
                )?;
                only_default("cpus.nested", &c.nested, &[json!(true)])?;
                c.boot_vcpus
            }
        };
        let (memory, hugepages) = match self.memory {
            None => (512 << 20, false),
            Some(m) => {
                if m.shared == Some(false) {
                    return Err(BodyError::Unsupported(
                        "memory.shared".into(),
                        "guest memory is always shared here: give true or leave it out",
                    ));
                }
                only_default("memory.hugepage_size", &m.hugepage_size, &[])?;
                only_default("memory.mergeable", &m.mergeable, &empty())?;
                only_default("memory.hotplug_method", &m.hotplug_method, &[json!("Acpi")])?;
                only_default("memory.hotplug_size", &m.hotplug_size, &[json!(0)])?;
                only_default("memory.hotplugged_size", &m.hotplugged_size, &[json!(0)])?;
                only_default("memory.prefault", &m.prefault, &empty())?;
                only_default("memory.zones", &m.zones, &empty())?;
                only_default("memory.thp", &m.thp, &[json!(true)])?;
                (m.size, m.hugepages.unwrap_or(false))
            }
        };
        let serial = serial(self.serial)?;
        console(self.console)?;
        let mut devices = Vec::new();
        for (i, d) in self.disks.into_iter().flatten().enumerate() {
            devices.push(d.into_device_with(&format!("disks[{i}]"), start)?);
        }
        for (i, d) in self.net.into_iter().flatten().enumerate() {
            devices.push(d.into_device_with(&format!("net[{i}]"), start)?);
        }
        let ids = devices.iter().map(|d| d.id.clone()).collect();
        let cfg = crate::VmConfig {
            kernel: kernel.into(),
            initramfs: payload.initramfs.map(PathBuf::from),
            cmdline: payload.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            cpus,
            memory,
            hugepages,
            serial,
            boot: BootProtocol::Auto,
            hidden_cpu_features: Vec::new(),
            devices: devices.into_iter().map(|d| d.device).collect(),
        };
        cfg.validate().map_err(BodyError::Config)?;
        Ok((cfg, ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(v: Value) -> Result<(crate::VmConfig, Vec<Option<String>>)> {
        parse::<VmConfigBody>(v.to_string().as_bytes())?.into_config()
    }

    #[test]
    fn a_minimal_config_maps_onto_vm_config() {
        let (c, ids) = config(json!({
            "payload": {"kernel": "/k", "cmdline": "x"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 64u64 << 20, "shared": true},
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
        }))
        .unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 64 << 20);
        assert_eq!(c.cmdline, "x");
        assert_eq!(c.serial, SerialConfig::Stdio);
        assert!(ids.is_empty());
    }

    #[test]
    fn libvirts_config_maps_onto_vm_config() {
        let (c, _) = config(json!({
            "serial": {"mode": "Pty"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 67108864},
            "payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
        }))
        .unwrap();

        assert_eq!(c.serial, SerialConfig::Pty);
        assert_eq!(c.memory, 64 << 20);
    }

    #[test]
    fn unsupported_fields_are_named() {
        for (v, field) in [
            (
                json!({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 4}}),
                "cpus.max_vcpus",
            ),
            (
                json!({"payload": {"kernel": "/k"}, "memory": {"size": 1u64 << 30, "shared": false}}),
                "memory.shared",
            ),
            (json!({"payload": {"kernel": "/k"}, "iommu": true}), "iommu"),
            (
                json!({"payload": {"kernel": "/k"}, "disks": [{"path": "/img", "vhost_user": true, "vhost_socket": "/s"}]}),
                "disks[0].path",
            ),
            (
                json!({"payload": {"kernel": "/k"}, "disks": [{"vhost_user": true, "vhost_socket": "/s", "rate_limiter_config": {"bandwidth": {"size": 1, "refill_time": 1}}}]}),
                "disks[0].rate_limiter_config",
            ),
            (
                json!({"payload": {"kernel": "/k"}, "console": {"mode": "Tty"}}),
                "console.mode",
            ),
        ] {
            let e = config(v).unwrap_err().to_string();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn a_disk_image_is_served_by_what_the_starter_starts() {
        let body = json!({"payload": {"kernel": "/k"},
                          "disks": [{"path": "/img.raw", "readonly": true}]});
        let mut asked = Vec::new();
        let mut start = |b: &Backend| {
            asked.push(b.clone());
            Ok(DeviceConfig {
                kind: Kind::Block,
                socket: "/".into(),
                queues: 1,
                queue_size: 256,
                metrics_socket: None,
            })
        };

        let (c, _) = parse::<VmConfigBody>(body.to_string().as_bytes())
            .unwrap()
            .into_config_with(&mut start)
            .unwrap();

        assert_eq!(
            asked,
            vec![Backend::Disk(ImageDisk {
                path: "/img.raw".into(),
                readonly: true,
                queues: 1,
                queue_size: 256,
            })]
        );
        assert_eq!(c.devices[0].socket, PathBuf::from("/"));
    }

    #[test]
    fn a_disk_image_is_refused_when_only_parsed() {
        let e = config(json!({"payload": {"kernel": "/k"}, "disks": [{"path": "/img"}]}))
            .unwrap_err()
            .to_string();

        assert!(
            e.starts_with("disks[0].path: cannot start its backend"),
            "{e}"
        );
    }

    #[test]
    fn a_tap_nic_is_served_by_what_the_starter_starts() {
        let nic = json!({"tap": "vmtap0", "mac": "52:54:00:00:00:01", "num_queues": 4});
        let mut asked = Vec::new();
        let mut start = |b: &Backend| {
            asked.push(b.clone());
            Ok(DeviceConfig {
                kind: Kind::Block,
                socket: "/".into(),
                queues: 1,
                queue_size: 256,
                metrics_socket: None,
            })
        };

        parse::<NetConfigBody>(nic.to_string().as_bytes())
            .unwrap()
            .into_device_with("net", &mut start)
            .unwrap();

        assert_eq!(
            asked,
            vec![Backend::Tap(TapNet {
                tap: "vmtap0".into(),
                mac: Some([0x52, 0x54, 0, 0, 0, 1]),
                queue_pairs: 2,
                queue_size: 256,
            })]
        );
    }

    #[test]
    fn metrics_socket_is_accepted_on_disks_and_nics() {
        let disk = json!({"vhost_user": true, "vhost_socket": "/b", "metrics_socket": "/bm"});
        let nic = json!({"vhost_user": true, "vhost_socket": "/n", "metrics_socket": "/nm"});

        let d = parse::<DiskConfigBody>(disk.to_string().as_bytes())
            .and_then(|d| d.into_device("disk"))
            .unwrap();
        let n = parse::<NetConfigBody>(nic.to_string().as_bytes())
            .and_then(|n| n.into_device("net"))
            .unwrap();

        assert_eq!(d.device.metrics_socket, Some(PathBuf::from("/bm")));
        assert_eq!(n.device.metrics_socket, Some(PathBuf::from("/nm")));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = config(json!({"payload": {"kernel": "/k"}, "bogus": 1})).unwrap_err();
        let BodyError::Json(j) = e else { panic!("{e}") };
        assert!(j.to_string().contains("bogus"), "{j}");
    }

    #[test]
    fn defaults_sent_whole_are_accepted() {
        config(json!({
            "payload": {"kernel": "/k", "firmware": null},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "max_phys_bits": 46, "kvm_hyperv": false},
            "memory": {"size": 64u64 << 20, "mergeable": false, "hotplug_method": "Acpi",
                       "shared": true, "hugepages": false, "prefault": false, "thp": true},
            "rng": {"src": "/dev/urandom", "iommu": false},
            "iommu": false, "watchdog": false, "pvpanic": false,
        }))
        .unwrap();
    }
}
