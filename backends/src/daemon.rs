//! What every backend daemon's `main` does around its own configuration:
//! log to stderr (`RUST_LOG`, default `info`), report a fatal error as one
//! line with its causes, and confine itself once set up ([`Confinement`]).

use std::path::Path;
use std::process::ExitCode;

use thiserror::Error;

use crate::privileges::{self, PrivilegeError, UserSpec};
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};

/// Errors confining a daemon.
#[derive(Debug, Error)]
pub enum ConfineError {
    /// `--user` could not be applied.
    #[error("Cannot drop privileges")]
    Privileges(#[from] PrivilegeError),
    /// seccomp could not be turned on.
    #[error("Cannot enable seccomp")]
    Seccomp(#[from] SeccompError),
}

/// How a daemon confines itself after set-up (`--seccomp`, `--user`).
#[derive(Clone, Debug)]
pub struct Confinement {
    /// What a system call outside a thread's list does.
    pub seccomp: SeccompMode,
    /// The user to become after set-up (none: stay who we are).
    pub user: Option<UserSpec>,
}

impl Default for Confinement {
    fn default() -> Self {
        Confinement {
            seccomp: SeccompMode::Enforce,
            user: None,
        }
    }
}

impl Confinement {
    /// Looks `--user` up, so that a wrong name fails before anything is
    /// opened or bound.
    pub fn check(&self) -> Result<(), ConfineError> {
        if let Some(user) = &self.user {
            user.resolve()?;
        }
        Ok(())
    }

    /// Drops privileges (handing `sockets` to the user) and turns seccomp
    /// on; no thread is confined yet. Call with one thread, after opening
    /// everything that needs privileges.
    pub fn prepare(&self, sockets: &[&Path]) -> Result<(), ConfineError> {
        if let Some(user) = &self.user {
            privileges::drop_to(user.resolve()?, sockets)?;
        }
        seccomp::enable(self.seccomp)?;
        Ok(())
    }

    /// Confines the calling (main) thread; call after spawning the helper
    /// threads, before serving a frontend.
    pub fn confine_main(&self) -> Result<(), ConfineError> {
        seccomp::apply(ThreadKind::Main)?;
        if self.seccomp != SeccompMode::Off {
            tracing::info!(mode = ?self.seccomp, "seccomp filters installed");
        }
        Ok(())
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Success, or the error logged as "outer: inner: innermost" and failure.
pub fn exit_code<E: std::error::Error>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources on one line: "outer: inner: innermost".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
