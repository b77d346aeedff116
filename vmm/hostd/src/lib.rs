//! `vmm-hostd`: one service per host beside the vmm processes. It finds
//! every running vmm (the registry and libvirt's socket directories, see
//! `vmm::api::registry`), serves their counters together as Prometheus
//! text under the libvirt exporters' names ([`exporter`]) and a web
//! dashboard with live plots and lifecycle buttons ([`web`]), over HTTP on
//! a loopback address by default and, if asked, on a unix socket.
//!
//! Access ([`auth`]): a unix socket is created mode 0600; a TCP address
//! other than loopback needs a token (`--token-file`), which then guards
//! every request.

pub mod auth;
pub mod collect;
pub mod exporter;
mod server;
pub mod web;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use thiserror::Error;

pub use server::run;

/// Errors starting the service.
#[derive(Debug, Error)]
pub enum HostdError {
    #[error("Listening on {0}, beyond the loopback, needs --token-file")]
    TokenRequired(SocketAddr),
    #[error("Cannot read the token file {0}")]
    TokenFile(String, #[source] io::Error),
    #[error("The token file {0} is empty")]
    EmptyToken(String),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] io::Error),
    #[error("Cannot start the server")]
    Runtime(#[source] io::Error),
}

/// The command line.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Serve every running vmm's metrics (libvirt exporter names) and a web dashboard"
)]
pub struct Cli {
    /// TCP address for the dashboard and /metrics (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9178")]
    pub listen: SocketAddr,
    /// A file holding the token every request must then carry (required
    /// for an address beyond the loopback).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Also serve on this unix socket (created mode 0600).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where the dashboard's snapshot button writes (default: the
    /// registry directory's `snapshots/`).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
}

/// What [`run`] needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub socket: Option<PathBuf>,
    pub snapshot_dir: PathBuf,
}

impl Cli {
    /// Checks the options and reads the token.
    pub fn into_config(self) -> Result<Config, HostdError> {
        let token = self
            .token_file
            .map(|p| {
                let shown = p.display().to_string();
                let t = std::fs::read_to_string(&p)
                    .map_err(|e| HostdError::TokenFile(shown.clone(), e))?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(HostdError::EmptyToken(shown));
                }
                Ok(t)
            })
            .transpose()?;
        if token.is_none() && !self.listen.ip().is_loopback() {
            return Err(HostdError::TokenRequired(self.listen));
        }
        Ok(Config {
            listen: self.listen,
            token,
            socket: self.socket,
            snapshot_dir: self
                .snapshot_dir
                .unwrap_or_else(|| vmm::api::registry::registry_dir().join("snapshots")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_beyond_loopback_needs_a_token() {
        let cli = Cli::parse_from(["vmm-hostd", "--listen", "0.0.0.0:9178"]);

        let r = cli.into_config();

        assert!(matches!(r, Err(HostdError::TokenRequired(_))), "{r:?}");
    }

    #[test]
    fn loopback_needs_none() {
        let cli = Cli::parse_from(["vmm-hostd", "--listen", "127.0.0.1:0"]);

        let cfg = cli.into_config().unwrap();

        assert!(cfg.token.is_none());
    }
}
