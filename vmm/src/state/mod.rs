//! Saved state for snapshot/restore: the vCPU and VM-wide KVM state of a
//! paused VM, and the file format those are written in.
//!
//! - [`vcpu::VcpuState`]: one vCPU's registers, FPU/XSAVE, XCRs, LAPIC,
//!   MSRs, pending events, MP state, debug registers, TSC frequency and
//!   nested-virtualization state.
//! - [`vm::VmState`]: the in-kernel PIC pair, IOAPIC, PIT and kvm-clock.
//! - [`devices::DevicesState`]: every device the VMM emulates (serial,
//!   RTC, i8042, ACPI, PCI, virtio-pci transports), each device's state
//!   type defined beside the device.
//! - [`mod@file`]: a versioned, checksummed container for any serde type.
//!
//! Every type here is plain data (`serde`), so snapshot, migration and live
//! upgrade can share it. KVM's FFI structs are serialized by kvm-bindings'
//! own `serde` feature (raw bytes of the C struct, which KVM keeps ABI
//! stable); the few it does not cover are mirrored here.
//!
//! Save contract: every vCPU is paused, out of `KVM_RUN`, and has finished
//! its last I/O instruction ([`vcpu::finish_pending_io`]); guest memory is
//! copied separately.
//!
//! Restore contract: the caller creates the VM and vCPUs exactly as for a
//! fresh boot (same irqchip and PIT, same CPUID on each vCPU, guest memory
//! registered and filled), then restores [`vm::VmState`] and then each
//! [`vcpu::VcpuState`] before the first `KVM_RUN`.

pub mod devices;
pub mod file;
pub mod vcpu;
pub mod vm;

pub use devices::{DevicesState, DevicesStateError};
pub use file::{read_state_file, write_state_file, StateFileError};
pub use vcpu::{finish_pending_io, VcpuState, VcpuStateError};
pub use vm::{VmState, VmStateError};
