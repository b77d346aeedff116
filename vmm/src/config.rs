//! The typed VM configuration shared by the command line and the control
//! API (`vm.create`, see `api::config`).

use std::path::PathBuf;

use thiserror::Error;

use crate::devices_config::{check_unique, DeviceSpecError};
use crate::vhost_user::DeviceConfig;

/// Smallest guest RAM we accept: room for the boot structures below 1 MiB
/// and a kernel above it.
pub const MIN_MEMORY: u64 = 16 << 20;
/// vCPU count ceiling: APIC IDs are 8 bits and 0xFF is broadcast; the
/// IOAPIC takes the ID after the last vCPU.
pub const MAX_CPUS: u8 = 254;
/// Default kernel command line: console on COM1, reboot through the i8042
/// (the VMM exits when the guest reboots or powers off).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors in a configuration value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("Invalid size '{0}': expected a number with an optional K, M, G or T suffix")]
    InvalidSize(String),
    #[error("Memory size {0} bytes is below the minimum of 16 MiB")]
    MemoryTooSmall(u64),
    #[error("Memory size {0} bytes is not a multiple of {1} bytes")]
    MemoryUnaligned(u64, u64),
    #[error("vCPU count must be between 1 and {MAX_CPUS}, got {0}")]
    InvalidCpus(u32),
    #[error("Invalid serial '{0}': expected stdio, pty, off or file:PATH")]
    InvalidSerial(String),
    #[error("Unknown CPU feature '{0}' (known: {1})")]
    UnknownCpuFeature(String, String),
    #[error("Invalid CPU feature item '{0}': expected -NAME to hide a feature")]
    InvalidCpuFeatureItem(String),
    #[error(transparent)]
    Device(#[from] DeviceSpecError),
    #[error("Backend socket {0} does not exist")]
    NoSocket(String),
}

/// Where the guest's COM1 output goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SerialConfig {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Port present, output discarded.
    Off,
    /// A pseudo-terminal: output to it, input from it; its path is in
    /// vm.info (`config.serial.file`) and on stderr.
    Pty,
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "off" | "null" => Ok(Self::Off),
            "pty" => Ok(Self::Pty),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::InvalidSerial(s.to_string())),
            },
        }
    }
}

/// Which boot protocol to use for an ELF kernel.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH note, the Linux 64-bit protocol otherwise
    /// (a bzImage always uses the Linux 64-bit protocol).
    #[default]
    Auto,
    /// Linux 64-bit boot protocol: long mode, zero page in RSI.
    Linux,
    /// PVH: 32-bit protected mode, `hvm_start_info` in EBX.
    Pvh,
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub hugepages: bool,
    pub serial: SerialConfig,
    pub boot: BootProtocol,
    /// CPUID feature names hidden from the guest.
    pub hidden_cpu_features: Vec<String>,
    /// vhost-user devices (disks, NICs, others), in PCI slot order.
    pub devices: Vec<DeviceConfig>,
}

impl VmConfig {
    /// Checks the values that no type can express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::InvalidCpus(self.cpus.into()));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        let align = if self.hugepages { 2 << 20 } else { 4096 };
        if self.memory % align != 0 {
            return Err(ConfigError::MemoryUnaligned(self.memory, align));
        }
        for name in &self.hidden_cpu_features {
            crate::arch::x86_64::cpuid::feature_by_name(name)?;
        }
        check_unique(&self.devices)?;
        for d in &self.devices {
            if !d.socket.exists() {
                return Err(ConfigError::NoSocket(d.socket.display().to_string()));
            }
        }
        Ok(())
    }
}

/// Parses `512M`, `4G`, `65536`, `64KiB`... into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::InvalidSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Parses `-cx16,-clwb` into feature names to hide.
pub fn parse_cpu_features(s: &str) -> Result<Vec<String>, ConfigError> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(|item| {
            let name = item
                .strip_prefix('-')
                .ok_or_else(|| ConfigError::InvalidCpuFeatureItem(item.to_string()))?;
            crate::arch::x86_64::cpuid::feature_by_name(name)?;
            Ok(name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("k"),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory: 128 << 20,
            hugepages: false,
            serial: SerialConfig::Stdio,
            boot: BootProtocol::Auto,
            hidden_cpu_features: vec![],
            devices: vec![],
        }
    }

    #[test]
    fn sizes_with_suffixes_parse_to_bytes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for s in ["", "M", "12X", "-1G", "99999999999999999999G", "1.5G"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    #[test]
    fn serial_specs_parse() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!("pty".parse(), Ok(SerialConfig::Pty));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn tiny_memory_is_rejected() {
        let c = VmConfig {
            memory: 1024,
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(1024)));
    }

    #[test]
    fn missing_backend_socket_is_rejected() {
        let c = VmConfig {
            devices: vec![crate::devices_config::parse_disk("socket=/nonexistent.sock").unwrap()],
            ..config()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::NoSocket("/nonexistent.sock".into()))
        );
    }

    #[test]
    fn zero_cpus_are_rejected() {
        let c = VmConfig {
            cpus: 0,
            ..config()
        };
        assert_eq!(c.validate(), Err(ConfigError::InvalidCpus(0)));
    }

    #[test]
    fn hugepage_memory_must_be_2m_aligned() {
        let c = VmConfig {
            hugepages: true,
            memory: (64 << 20) + 4096,
            ..config()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryUnaligned(_, 0x200000))
        ));
    }

    #[test]
    fn cpu_feature_list_parses_known_names_only() {
        assert_eq!(
            parse_cpu_features("-cx16,-clwb"),
            Ok(vec!["cx16".to_string(), "clwb".to_string()])
        );
        assert!(matches!(
            parse_cpu_features("-nosuch"),
            Err(ConfigError::UnknownCpuFeature(..))
        ));
        assert!(matches!(
            parse_cpu_features("cx16"),
            Err(ConfigError::InvalidCpuFeatureItem(_))
        ));
    }
}
