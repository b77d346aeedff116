//! The daemon's typed configuration, built by the command line.

use std::path::PathBuf;
use std::str::FromStr;

use backends::daemon::Confinement;
use thiserror::Error;

/// Where the disk's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// io_uring on `--image`.
    File,
    /// A RAM disk of this many bytes.
    Memory(u64),
}

/// Errors parsing configuration values.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--storage` is not `file` or `memory:SIZE`.
    #[error("Invalid storage {0:?}: expected file or memory:SIZE")]
    Storage(String),
    /// `--storage file` without `--image`.
    #[error("--image is required with file storage")]
    NoImage,
}

impl FromStr for StorageKind {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "file" {
            return Ok(StorageKind::File);
        }
        let size = s
            .strip_prefix("memory:")
            .ok_or_else(|| ConfigError::Storage(s.into()))?;
        parse_size(size)
            .map(StorageKind::Memory)
            .ok_or_else(|| ConfigError::Storage(s.into()))
    }
}

/// Parses `123`, `64K`, `512M`, `2G`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Everything `blk-backend` needs to run.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Connect to the socket instead of listening on it.
    pub client: bool,
    /// Disk image or block device (file storage).
    pub image: Option<PathBuf>,
    /// Storage kind.
    pub storage: StorageKind,
    /// Read-only disk.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Number of queues (one worker thread each).
    pub queues: usize,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// GET_ID answer.
    pub serial: String,
    /// Largest adaptive busy-poll window of queue workers in microseconds
    /// (0: never poll; None: [`crate::storage::Storage::default_poll_us`]).
    pub poll_us: Option<u64>,
    /// Unix socket of the HTTP metrics endpoint (none: no endpoint).
    pub metrics_socket: Option<PathBuf>,
    /// seccomp and `--user`, applied once the image and sockets are open.
    pub confinement: Confinement,
}

impl BlkConfig {
    /// Checks combinations the parser cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.storage == StorageKind::File && self.image.is_none() {
            return Err(ConfigError::NoImage);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_storage_size_is_parsed() {
        assert_eq!("memory:64M".parse(), Ok(StorageKind::Memory(64 << 20)));
    }

    #[test]
    fn unknown_storage_is_rejected() {
        assert!("nbd".parse::<StorageKind>().is_err());
    }
}
