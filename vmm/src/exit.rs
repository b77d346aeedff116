//! Why the VM stops: the first reason reported wins, and an eventfd wakes
//! the VMM event loop.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, `reboot=k`): a clean exit.
    GuestReset,
    /// The guest shut down through a KVM system event: a clean exit.
    GuestShutdown,
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// `vm.shutdown` or `vmm.shutdown` on the control API.
    ApiShutdown,
    /// `vm.reboot` on the control API.
    ApiReboot,
    /// The VM now runs in another vmm (`vm.send-migration`).
    Migrated,
    /// A vCPU triple-faulted.
    TripleFault { cpu: u8 },
    /// KVM could not go on (emulation failure, entry failure...).
    KvmFailure { cpu: u8, detail: String },
}

impl ExitReason {
    /// Whether this is a normal end of the VM.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            Self::GuestReset
                | Self::GuestShutdown
                | Self::Signal(_)
                | Self::ApiShutdown
                | Self::ApiReboot
                | Self::Migrated
        )
    }

    /// Whether the VM asked to start again (guest reset, vm.reboot).
    pub fn is_reboot(&self) -> bool {
        matches!(self, Self::GuestReset | Self::ApiReboot)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestReset => write!(f, "guest reset"),
            Self::GuestShutdown => write!(f, "guest shut down"),
            Self::Signal(s) => write!(f, "stopped by signal {s}"),
            Self::ApiShutdown => write!(f, "shut down through the API"),
            Self::ApiReboot => write!(f, "rebooted through the API"),
            Self::Migrated => write!(f, "migrated to another vmm"),
            Self::TripleFault { cpu } => write!(f, "guest triple fault on vCPU {cpu}"),
            Self::KvmFailure { cpu, detail } => write!(f, "vCPU {cpu}: {detail}"),
        }
    }
}

/// Collects the first exit reason and wakes the event loop.
pub struct ExitNotifier {
    reason: Mutex<Option<ExitReason>>,
    pub evt: EventFd,
}

impl ExitNotifier {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `r` unless a reason was already recorded.
    pub fn notify(&self, r: ExitReason) {
        let mut g = crate::devices::bus::lock(&self.reason);
        if g.is_none() {
            *g = Some(r);
        }
        drop(g);
        if let Err(e) = self.evt.write(1) {
            tracing::error!(error = %e, "cannot wake the event loop");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.reason).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let n = ExitNotifier::new().unwrap();
        n.notify(ExitReason::TripleFault { cpu: 1 });
        n.notify(ExitReason::GuestReset);
        assert_eq!(n.reason(), Some(ExitReason::TripleFault { cpu: 1 }));
        assert_eq!(n.evt.read().unwrap(), 2);
    }
}
