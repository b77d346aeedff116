//! x86-64 specifics: memory layout, boot, CPUID, registers, MP table, ACPI.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod dsdt;
pub mod layout;
pub mod mptable;
pub mod regs;
