//! An event-driven KVM virtual machine monitor. This crate does vCPU and
//! memory virtualization and the few devices a guest needs to boot; disk
//! and network are served by vhost-user backend processes.

pub mod api;
pub mod arch;
pub mod config;
pub mod console;
pub mod devices;
pub mod devices_config;
pub mod exit;
pub mod interrupts;
pub mod machine;
pub mod memory;
pub mod pci;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod vm;

pub use config::VmConfig;
pub use machine::{Machine, MachineError, Outcome};
