//! Saved state for snapshot/restore: the vCPU and VM-wide KVM state of a
//! paused VM, and the file format those are written in.
//!
//! - [`vcpu::VcpuState`]: one vCPU's registers, FPU/XSAVE, LAPIC, MSRs,
//!   pending events, MP state and TSC frequency.
//! - [`vm::VmState`]: the in-kernel PIC pair, IOAPIC, PIT and kvm-clock.
//! - [`file`]: a versioned, checksummed container for any serde type.
//!
//! Every type here is plain data (`serde`), so snapshot, migration and live
//! upgrade can share it. KVM's FFI structs are serialized by kvm-bindings'
//! own `serde` feature (raw bytes of the C struct, which KVM keeps ABI
//! stable); the few it does not cover are mirrored here.
//!
//! Restore contract: the caller creates the VM and vCPUs exactly as for a
//! fresh boot (same irqchip and PIT, same CPUID on each vCPU, guest memory
//! registered and filled), then restores [`vm::VmState`] and then each
//! [`vcpu::VcpuState`] before the first `KVM_RUN`.

pub mod file;
pub mod vcpu;
pub mod vm;

pub use file::{read_state_file, write_state_file, StateFileError};
pub use vcpu::{VcpuState, VcpuStateError};
pub use vm::{VmState, VmStateError};
