//! An event-driven KVM virtual machine monitor. This crate does vCPU and
//! memory virtualization and the few devices a guest needs to boot; disk
//! and network are served by vhost-user backend processes.

pub mod api;
pub mod arch;
pub mod config;
pub mod console;
pub mod devices;
pub mod devices_config;
pub mod events;
pub mod exit;
pub mod interrupts;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod platform;
pub mod seccomp;
pub mod snapshot;
pub mod spawned;
pub mod state;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod vm;

pub use config::VmConfig;
pub use machine::{Machine, MachineError, Outcome};

/// "outer: inner: innermost" on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
