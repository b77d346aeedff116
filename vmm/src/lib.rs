//! An event-driven KVM virtual machine monitor. This crate does vCPU and
//! memory virtualization and the few devices a guest needs to boot; disk
//! and network are served by vhost-user backend processes.

pub mod arch;
pub mod config;
pub mod console;
pub mod devices;
pub mod exit;
pub mod machine;
pub mod memory;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use machine::{Machine, MachineError, Outcome};
