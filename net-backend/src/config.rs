//! The daemon's typed configuration, built by the command line.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use backends::daemon::Confinement;
use thiserror::Error;

/// Errors parsing or checking configuration values.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--mac` is not six colon-separated hex bytes.
    #[error("Invalid MAC address {0:?}")]
    Mac(String),
    /// `--mtu` is out of range.
    #[error("MTU {0} out of range 68..=65535")]
    Mtu(u16),
    /// `--queue-pairs` is 0 or too large.
    #[error("Queue pairs {0} out of range 1..=16")]
    QueuePairs(usize),
    /// `--queue-size` is not a power of two in range.
    #[error("Queue size {0} is not a power of two in 64..=32768")]
    QueueSize(u16),
    /// The tap name is empty or too long.
    #[error("Invalid tap name {0:?}")]
    TapName(String),
    /// `--tap-fd` count differs from the queue pairs.
    #[error("{0} tap fds given for {1} queue pairs: give one per pair")]
    TapFds(usize, usize),
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Mac(s.into());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Everything `net-backend` needs to run.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Connect to the socket instead of listening on it.
    pub client: bool,
    /// Tap interface name.
    pub tap: String,
    /// Create the tap if it does not exist (it vanishes when the daemon exits).
    pub create_tap: bool,
    /// Tap queues opened by someone else, one per queue pair, used instead
    /// of opening `tap` (which is then unused).
    pub tap_fds: Vec<std::os::fd::RawFd>,
    /// MAC address offered in config space.
    pub mac: MacAddr,
    /// MTU offered in config space; frames above it are dropped on TX.
    pub mtu: u16,
    /// Queue pairs (one tap queue and two workers each).
    pub queue_pairs: usize,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Offer checksum and segmentation offloads.
    pub offloads: bool,
    /// Offer VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Seconds between metrics log lines (0: only at disconnect).
    pub metrics_interval: u64,
    /// Unix socket of the HTTP metrics endpoint (none: no endpoint).
    pub metrics_socket: Option<PathBuf>,
    /// seccomp and `--user`, applied once the tap and sockets are open.
    pub confinement: Confinement,
}

impl NetConfig {
    /// A configuration with defaults for everything but the socket and tap.
    pub fn new(socket: PathBuf, tap: &str) -> Self {
        NetConfig {
            socket,
            client: false,
            tap: tap.into(),
            create_tap: false,
            tap_fds: Vec::new(),
            mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            mtu: 1500,
            queue_pairs: 1,
            queue_size: 256,
            offloads: true,
            mrg_rxbuf: true,
            metrics_interval: 0,
            metrics_socket: None,
            confinement: Confinement::default(),
        }
    }

    /// Checks ranges the parser cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let named = self.tap_fds.is_empty();
        if named
            && (self.tap.is_empty() || self.tap.len() >= libc::IFNAMSIZ || self.tap.contains('/'))
        {
            return Err(ConfigError::TapName(self.tap.clone()));
        }
        if !named && self.tap_fds.len() != self.queue_pairs {
            return Err(ConfigError::TapFds(self.tap_fds.len(), self.queue_pairs));
        }
        if self.mtu < 68 {
            return Err(ConfigError::Mtu(self.mtu));
        }
        if self.queue_pairs == 0 || self.queue_pairs > 16 {
            return Err(ConfigError::QueuePairs(self.queue_pairs));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 64 {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let mac: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();

        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
    }

    #[test]
    fn short_mac_is_rejected() {
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
    }

    #[test]
    fn zero_queue_pairs_is_rejected() {
        let mut cfg = NetConfig::new("/tmp/s".into(), "tap0");
        cfg.queue_pairs = 0;

        assert_eq!(cfg.validate(), Err(ConfigError::QueuePairs(0)));
    }
}
