//! Parsing of `--disk`, `--net` and `--vhost-user` device specifications:
//! comma-separated `key=value` lists, checked before the VM starts.

use std::path::PathBuf;

use thiserror::Error;

use crate::vhost_user::{DeviceConfig, Kind};

/// Largest virtqueue the transport accepts.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues one device may ask for.
pub const MAX_QUEUES: u16 = 64;
pub(crate) const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Errors in a device specification.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceSpecError {
    #[error("'{0}': expected key=value")]
    NotKeyValue(String),
    #[error("Unknown key '{key}' for {what} (known: {known})")]
    UnknownKey {
        key: String,
        what: &'static str,
        known: &'static str,
    },
    #[error("{0} needs socket=PATH")]
    NoSocket(&'static str),
    #[error("Invalid {key} '{value}': {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--vhost-user needs type=NAME or type=ID")]
    NoType,
    #[error("tag= is for type=fs only")]
    TagNotFs,
    #[error("Socket {0} is used by two devices")]
    SharedSocket(String),
}

/// Device type names accepted by `--vhost-user type=`.
const TYPES: &[(&str, u32)] = &[
    ("net", 1),
    ("blk", 2),
    ("console", 3),
    ("rng", 4),
    ("scsi", 8),
    ("gpu", 16),
    ("input", 18),
    ("vsock", 19),
    ("crypto", 20),
    ("sound", 25),
    ("fs", 26),
    ("scmi", 32),
    ("i2c", 34),
    ("can", 36),
    ("gpio", 41),
];

fn pairs(s: &str) -> Result<Vec<(&str, &str)>, DeviceSpecError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| DeviceSpecError::NotKeyValue(p.to_string()))
        })
        .collect()
}

pub(crate) fn number(
    key: &'static str,
    v: &str,
    max: u16,
    pow2: bool,
) -> Result<u16, DeviceSpecError> {
    let invalid = |why| DeviceSpecError::Invalid {
        key,
        value: v.to_string(),
        why,
    };
    let n: u16 = v.parse().map_err(|_| invalid("not a number"))?;
    if n == 0 || n > max {
        return Err(invalid("out of range"));
    }
    if pow2 && !n.is_power_of_two() {
        return Err(invalid("not a power of two"));
    }
    Ok(n)
}

pub(crate) fn mac(v: &str) -> Result<[u8; 6], DeviceSpecError> {
    let invalid = || DeviceSpecError::Invalid {
        key: "mac",
        value: v.to_string(),
        why: "expected six hex bytes like 52:54:00:12:34:56",
    };
    let bytes: Vec<u8> = v
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(invalid)?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| invalid())?;
    if mac[0] & 1 != 0 {
        return Err(DeviceSpecError::Invalid {
            key: "mac",
            value: v.to_string(),
            why: "multicast address",
        });
    }
    Ok(mac)
}

/// A disk given as an image: vmm serves it with a blk-backend it starts
/// (see [`crate::spawned`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDisk {
    pub path: PathBuf,
    pub readonly: bool,
    pub queues: u16,
    pub queue_size: u16,
}

impl ImageDisk {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            readonly: false,
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// `--disk`: a vhost-user backend's socket, or an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskArg {
    Socket(DeviceConfig),
    Image(ImageDisk),
}

/// `path=FILE[,readonly=on|off][,queues=N][,queue-size=N]`, or what
/// [`parse_disk`] takes.
pub fn parse_disk_arg(s: &str) -> Result<DiskArg, DeviceSpecError> {
    let kv = pairs(s)?;
    if !kv.iter().any(|(k, _)| *k == "path") {
        return parse_disk(s).map(DiskArg::Socket);
    }
    let mut disk = ImageDisk::new(PathBuf::new());
    for (k, v) in kv {
        match k {
            "path" => disk.path = PathBuf::from(v),
            "readonly" => {
                disk.readonly = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => {
                        return Err(DeviceSpecError::Invalid {
                            key: "readonly",
                            value: v.into(),
                            why: "expected on or off",
                        })
                    }
                }
            }
            "queues" => disk.queues = number("queues", v, MAX_QUEUES, false)?,
            "queue-size" => disk.queue_size = number("queue-size", v, MAX_QUEUE_SIZE, true)?,
            _ => {
                return Err(DeviceSpecError::UnknownKey {
                    key: k.into(),
                    what: "--disk path=",
                    known: "path, readonly, queues, queue-size",
                })
            }
        }
    }
    Ok(DiskArg::Image(disk))
}

/// `socket=PATH[,queues=N][,queue-size=N][,metrics-socket=PATH]`
pub fn parse_disk(s: &str) -> Result<DeviceConfig, DeviceSpecError> {
    let mut cfg = DeviceConfig {
        kind: Kind::Block,
        socket: PathBuf::new(),
        queues: 1,
        queue_size: DEFAULT_QUEUE_SIZE,
        metrics_socket: None,
    };
    for (k, v) in pairs(s)? {
        match k {
            "socket" => cfg.socket = PathBuf::from(v),
            "queues" => cfg.queues = number("queues", v, MAX_QUEUES, false)?,
            "queue-size" => cfg.queue_size = number("queue-size", v, MAX_QUEUE_SIZE, true)?,
            "metrics-socket" => cfg.metrics_socket = Some(PathBuf::from(v)),
            _ => {
                return Err(DeviceSpecError::UnknownKey {
                    key: k.into(),
                    what: "--disk",
                    known: "socket, queues, queue-size, metrics-socket",
                })
            }
        }
    }
    require_socket(cfg, "--disk")
}

/// A NIC given as a tap: vmm serves it with a net-backend it starts (see
/// [`crate::spawned`]), which opens the tap (creating it if missing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapNet {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub queue_pairs: u16,
    pub queue_size: u16,
}

/// `--net`: a vhost-user backend's socket, or a tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetArg {
    Socket(DeviceConfig),
    Tap(TapNet),
}

/// `tap=NAME[,mac=MAC][,queue-pairs=N][,queue-size=N]`, or what
/// [`parse_net`] takes.
pub fn parse_net_arg(s: &str) -> Result<NetArg, DeviceSpecError> {
    let kv = pairs(s)?;
    if !kv.iter().any(|(k, _)| *k == "tap") {
        return parse_net(s).map(NetArg::Socket);
    }
    let mut net = TapNet {
        tap: String::new(),
        mac: None,
        queue_pairs: 1,
        queue_size: DEFAULT_QUEUE_SIZE,
    };
    for (k, v) in kv {
        match k {
            "tap" => net.tap = v.to_string(),
            "mac" => net.mac = Some(mac(v)?),
            "queue-pairs" => net.queue_pairs = number("queue-pairs", v, MAX_QUEUES / 2, false)?,
            "queue-size" => net.queue_size = number("queue-size", v, MAX_QUEUE_SIZE, true)?,
            _ => {
                return Err(DeviceSpecError::UnknownKey {
                    key: k.into(),
                    what: "--net tap=",
                    known: "tap, mac, queue-pairs, queue-size",
                })
            }
        }
    }
    // IFNAMSIZ - 1.
    if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains('/') {
        return Err(DeviceSpecError::Invalid {
            key: "tap",
            value: net.tap,
            why: "expected an interface name of 1 to 15 characters",
        });
    }
    Ok(NetArg::Tap(net))
}

/// `socket=PATH[,mac=MAC][,queue-pairs=N][,queue-size=N][,metrics-socket=PATH]`
pub fn parse_net(s: &str) -> Result<DeviceConfig, DeviceSpecError> {
    let (mut m, mut pairs_n, mut qs, mut socket) = (None, 1, DEFAULT_QUEUE_SIZE, PathBuf::new());
    let mut metrics_socket = None;
    for (k, v) in pairs(s)? {
        match k {
            "socket" => socket = PathBuf::from(v),
            "metrics-socket" => metrics_socket = Some(PathBuf::from(v)),
            "mac" => m = Some(mac(v)?),
            "queue-pairs" => pairs_n = number("queue-pairs", v, MAX_QUEUES / 2, false)?,
            "queue-size" => qs = number("queue-size", v, MAX_QUEUE_SIZE, true)?,
            _ => {
                return Err(DeviceSpecError::UnknownKey {
                    key: k.into(),
                    what: "--net",
                    known: "socket, mac, queue-pairs, queue-size, metrics-socket",
                })
            }
        }
    }
    let cfg = DeviceConfig {
        kind: Kind::Net {
            mac: m,
            queue_pairs: pairs_n,
        },
        socket,
        queues: pairs_n * 2,
        queue_size: qs,
        metrics_socket,
    };
    require_socket(cfg, "--net")
}

/// `type=NAME|ID,socket=PATH[,queues=N][,queue-size=N][,tag=TAG]`
pub fn parse_vhost_user(s: &str) -> Result<DeviceConfig, DeviceSpecError> {
    let mut kind = None;
    let mut tag = None;
    let mut queues = None;
    let mut cfg = DeviceConfig {
        kind: Kind::Generic(0),
        socket: PathBuf::new(),
        queues: 1,
        queue_size: DEFAULT_QUEUE_SIZE,
        metrics_socket: None,
    };
    for (k, v) in pairs(s)? {
        match k {
            "type" => {
                let id = TYPES
                    .iter()
                    .find(|(n, _)| *n == v)
                    .map(|(_, id)| *id)
                    .or_else(|| v.parse().ok().filter(|id| (1..64).contains(id)))
                    .ok_or_else(|| DeviceSpecError::Invalid {
                        key: "type",
                        value: v.to_string(),
                        why: "not a virtio device name or ID",
                    })?;
                kind = Some(match id {
                    2 => Kind::Block,
                    other => Kind::Generic(other),
                });
            }
            "socket" => cfg.socket = PathBuf::from(v),
            "queues" => queues = Some(number("queues", v, MAX_QUEUES, false)?),
            "queue-size" => cfg.queue_size = number("queue-size", v, MAX_QUEUE_SIZE, true)?,
            "tag" if !v.is_empty() && v.len() <= 36 => tag = Some(v.to_string()),
            "tag" => {
                return Err(DeviceSpecError::Invalid {
                    key: "tag",
                    value: v.to_string(),
                    why: "1 to 36 bytes",
                })
            }
            _ => {
                return Err(DeviceSpecError::UnknownKey {
                    key: k.into(),
                    what: "--vhost-user",
                    known: "type, socket, queues, queue-size, tag",
                })
            }
        }
    }
    cfg.kind = kind.ok_or(DeviceSpecError::NoType)?;
    // virtio-fs: a high-priority queue plus request queues.
    if cfg.kind == Kind::Generic(26) {
        cfg.kind = Kind::Fs { tag };
        cfg.queues = queues.unwrap_or(2).max(2);
    } else if tag.is_some() {
        return Err(DeviceSpecError::TagNotFs);
    } else {
        cfg.queues = queues.unwrap_or(1);
    }
    if let Kind::Generic(1) = cfg.kind {
        cfg.kind = Kind::Net {
            mac: None,
            queue_pairs: (cfg.queues / 2).max(1),
        };
    }
    require_socket(cfg, "--vhost-user")
}

fn require_socket(cfg: DeviceConfig, what: &'static str) -> Result<DeviceConfig, DeviceSpecError> {
    if cfg.socket.as_os_str().is_empty() {
        return Err(DeviceSpecError::NoSocket(what));
    }
    Ok(cfg)
}

/// Rejects two devices on one socket.
pub fn check_unique(devices: &[DeviceConfig]) -> Result<(), DeviceSpecError> {
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].iter().any(|o| o.socket == d.socket) {
            return Err(DeviceSpecError::SharedSocket(
                d.socket.display().to_string(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn disk_and_net_specs_take_a_metrics_socket() {
        let d = parse_disk("socket=/s,metrics-socket=/m").unwrap();
        let n = parse_net("socket=/t,metrics-socket=/n").unwrap();
        assert_eq!(d.metrics_socket, Some(PathBuf::from("/m")));
        assert_eq!(n.metrics_socket, Some(PathBuf::from("/n")));
    }

    #[test]
    fn disk_given_as_an_image_parses() {
        let d = parse_disk_arg("path=/img,readonly=on,queues=2").unwrap();

        assert_eq!(
            d,
            DiskArg::Image(ImageDisk {
                path: "/img".into(),
                readonly: true,
                queues: 2,
                queue_size: DEFAULT_QUEUE_SIZE,
            })
        );
    }

    #[test]
    fn disk_arg_without_path_is_a_backend_socket() {
        let d = parse_disk_arg("socket=/s").unwrap();

        assert!(matches!(d, DiskArg::Socket(c) if c.socket == Path::new("/s")));
    }

    #[test]
    fn nic_given_as_a_tap_parses() {
        let n = parse_net_arg("tap=vmtap0,mac=52:54:00:12:34:56,queue-pairs=2").unwrap();

        assert_eq!(
            n,
            NetArg::Tap(TapNet {
                tap: "vmtap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                queue_pairs: 2,
                queue_size: DEFAULT_QUEUE_SIZE,
            })
        );
    }

    #[test]
    fn tap_name_longer_than_ifnamsiz_is_refused() {
        let e = parse_net_arg("tap=a-very-long-tap-name").unwrap_err();

        assert!(
            matches!(e, DeviceSpecError::Invalid { key: "tap", .. }),
            "{e}"
        );
    }

    #[test]
    fn image_disk_refuses_socket_keys() {
        let e = parse_disk_arg("path=/img,metrics-socket=/m").unwrap_err();

        assert!(matches!(e, DeviceSpecError::UnknownKey { .. }), "{e}");
    }

    #[test]
    fn disk_spec_parses_with_defaults() {
        let d = parse_disk("socket=/tmp/b.sock,queues=2").unwrap();
        assert_eq!(d.kind, Kind::Block);
        assert_eq!((d.queues, d.queue_size), (2, 256));
        assert_eq!(d.socket, PathBuf::from("/tmp/b.sock"));
    }

    #[test]
    fn net_spec_parses_mac_and_pairs() {
        let n = parse_net("socket=/s,mac=52:54:00:12:34:56,queue-pairs=2").unwrap();
        assert_eq!(
            n.kind,
            Kind::Net {
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                queue_pairs: 2
            }
        );
        assert_eq!(n.queues, 4);
    }

    #[test]
    fn generic_spec_takes_names_and_ids() {
        assert_eq!(
            parse_vhost_user("type=rng,socket=/s").unwrap().kind,
            Kind::Generic(4)
        );
        assert_eq!(
            parse_vhost_user("type=41,socket=/s").unwrap().kind,
            Kind::Generic(41)
        );
        assert_eq!(
            parse_vhost_user("type=blk,socket=/s").unwrap().kind,
            Kind::Block
        );
    }

    #[test]
    fn fs_spec_takes_a_tag_and_counts_the_hiprio_queue() {
        let fs = parse_vhost_user("type=fs,socket=/s,tag=share").unwrap();
        assert_eq!(
            fs.kind,
            Kind::Fs {
                tag: Some("share".into())
            }
        );
        assert_eq!(fs.queues, 2);
        assert_eq!(
            parse_vhost_user("type=rng,socket=/s,tag=x"),
            Err(DeviceSpecError::TagNotFs)
        );
    }

    #[test]
    fn bad_specs_are_rejected_with_the_reason() {
        assert_eq!(
            parse_disk("queues=2"),
            Err(DeviceSpecError::NoSocket("--disk"))
        );
        assert!(matches!(
            parse_disk("socket=/s,queue-size=100"),
            Err(DeviceSpecError::Invalid {
                why: "not a power of two",
                ..
            })
        ));
        assert!(matches!(
            parse_disk("socket=/s,colour=red"),
            Err(DeviceSpecError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_net("socket=/s,mac=01:00:00:00:00:00"),
            Err(DeviceSpecError::Invalid {
                why: "multicast address",
                ..
            })
        ));
        assert!(matches!(
            parse_net("socket=/s,mac=zz"),
            Err(DeviceSpecError::Invalid { key: "mac", .. })
        ));
        assert_eq!(parse_vhost_user("socket=/s"), Err(DeviceSpecError::NoType));
        assert!(matches!(
            parse_vhost_user("type=toaster,socket=/s"),
            Err(DeviceSpecError::Invalid { key: "type", .. })
        ));
        assert!(matches!(
            parse_disk("socket=/s,queues=0"),
            Err(DeviceSpecError::Invalid {
                why: "out of range",
                ..
            })
        ));
    }

    #[test]
    fn one_socket_cannot_serve_two_devices() {
        let a = parse_disk("socket=/s").unwrap();
        let b = parse_vhost_user("type=rng,socket=/s").unwrap();
        assert!(check_unique(&[a, b]).is_err());
    }
}
