//! The KVM VM: opening /dev/kvm with clear errors, the capabilities we rely
//! on, the in-kernel irqchip and PIT, and guest memory slots.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::GuestMemory;

/// Errors setting up the VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: KVM is not available on this host")]
    NoKvm,
    #[error("Permission denied opening /dev/kvm (add the user to the kvm group)")]
    KvmPermission,
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM supports at most {max} vCPUs, {wanted} requested")]
    TooManyCpus { max: usize, wanted: u8 },
    #[error("Guest memory region has no host mapping")]
    HostAddress(#[source] vm_memory::GuestMemoryError),
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// Capabilities the VMM uses, with the names shown in errors.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
];

/// Opens /dev/kvm and checks the API version and every capability used.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::OpenKvm(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM with guest RAM `mem` registered as its memory slots,
/// then its in-kernel irqchip and PIT.
///
/// The slots go in before the irqchip: a memory slot change waits for an
/// SRCU grace period on the VM (`synchronize_srcu_expedited`), and once
/// the irqchip's devices are on the VM's I/O bus that wait queues behind
/// the normal grace period their registration started, a few jiffies
/// (4-12 ms at HZ=250 here, against ~0.1 ms before it).
pub fn create_vm(kvm: &Kvm, cpus: u8, mem: &GuestMemory) -> Result<VmFd, VmError> {
    let max = kvm.get_max_vcpus();
    if usize::from(cpus) > max {
        return Err(VmError::TooManyCpus { max, wanted: cpus });
    }
    let vm = kvm.create_vm().map_err(|e| VmError::Kvm("create VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| VmError::Kvm("set TSS address", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmError::Kvm("set identity map address", e))?;
    register_memory(&vm, mem)?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create PIT", e))?;
    Ok(vm)
}

/// Registers every guest RAM region as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    register_slots(vm, mem, 0)
}

fn register_slots(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(VmError::HostAddress)?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags,
        };
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`; the machine keeps guest memory mapped until every vCPU
        // thread has been joined, so the guest never runs on a slot whose
        // mapping is gone.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmError::Kvm("register memory slot", e))?;
    }
    Ok(())
}

/// Turns KVM's dirty-page logging on or off for every guest RAM slot
/// (the slots are registered again with the flag set or clear).
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemory, on: bool) -> Result<(), VmError> {
    register_slots(vm, mem, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
}

/// Removes every guest RAM slot: KVM then writes nothing more into guest
/// memory for this VM (steal time and pvclock updates on a vCPU's next
/// load or its teardown), which another VM may own by now (a local
/// migration hands the same memfd over). [`register_memory`] undoes it.
pub fn unregister_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is
        // handed to KVM.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmError::Kvm("remove memory slot", e))?;
    }
    Ok(())
}
