//! VM-wide KVM state: what the VM created in `crate::vm::create_vm` holds
//! in the kernel. That is the full in-kernel irqchip (two 8259 PICs and
//! the IOAPIC; the LAPICs are per vCPU, in [`super::vcpu::VcpuState`]),
//! the in-kernel PIT (`KVM_CREATE_PIT2`), and the kvm-clock.
//!
//! A part the VM does not have (no irqchip or PIT created, so KVM answers
//! `ENXIO`) or that this host's KVM refuses is left out with one log line,
//! and left alone on restore.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;
use zerocopy::IntoBytes;

/// Errors restoring the VM-wide state.
#[derive(Debug, Error)]
pub enum VmStateError {
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// The in-kernel devices and clock of one VM.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: Option<kvm_irqchip>,
    pub pic_slave: Option<kvm_irqchip>,
    pub ioapic: Option<kvm_irqchip>,
    pub pit: Option<kvm_pit_state2>,
    /// kvm-clock as `KVM_GET_CLOCK` returned it (nanoseconds, flags).
    pub clock: Option<kvm_clock_data>,
}

impl std::fmt::Debug for VmState {
    // `kvm_irqchip` (a union) has no Debug: show which parts are present.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("pic_master", &self.pic_master.is_some())
            .field("pic_slave", &self.pic_slave.is_some())
            .field("ioapic", &self.ioapic.is_some())
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish()
    }
}

impl PartialEq for VmState {
    // `kvm_irqchip` (a union) has no PartialEq: compare its bytes.
    fn eq(&self, other: &Self) -> bool {
        let chip = |c: &Option<kvm_irqchip>| c.as_ref().map(|c| c.as_bytes().to_vec());
        chip(&self.pic_master) == chip(&other.pic_master)
            && chip(&self.pic_slave) == chip(&other.pic_slave)
            && chip(&self.ioapic) == chip(&other.ioapic)
            && self.pit == other.pit
            && self.clock == other.clock
    }
}

impl VmState {
    /// Reads the VM-wide state of a VM whose vCPUs are all paused.
    pub fn save(vm: &VmFd) -> Self {
        Self {
            pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
            pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
            ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
            pit: vm
                .get_pit2()
                .inspect_err(|e| warn!(error = %e, "KVM cannot give the PIT state; not saved"))
                .ok(),
            clock: vm
                .get_clock()
                .inspect_err(|e| warn!(error = %e, "KVM cannot give the kvm-clock; not saved"))
                .ok(),
        }
    }

    /// Puts the saved state into a fresh VM created like the saved one
    /// (same irqchip and PIT), before any vCPU state is restored and
    /// before any vCPU runs.
    ///
    /// Order (Firecracker's): PIT, clock, then the irqchip; KVM keeps them
    /// independent, and the vCPUs, whose LAPICs route through the irqchip,
    /// are restored after all three.
    ///
    /// The clock is set with no flags: kvm-clock resumes at the saved
    /// value, so the guest sees no time pass while it was saved, as after a
    /// pause. (`KVM_CLOCK_REALTIME` would instead advance it by the wall
    /// time elapsed since the save; `KVM_CLOCK_TSC_STABLE` and
    /// `KVM_CLOCK_HOST_TSC` are output-only and refused on input.)
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit)
                .map_err(|e| VmStateError::Kvm("set PIT state", e))?;
        }
        if let Some(clock) = &self.clock {
            let clock = kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            vm.set_clock(&clock)
                .map_err(|e| VmStateError::Kvm("set kvm-clock", e))?;
        }
        for (chip, what) in [
            (&self.pic_master, "set PIC master state"),
            (&self.pic_slave, "set PIC slave state"),
            (&self.ioapic, "set IOAPIC state"),
        ] {
            if let Some(chip) = chip {
                vm.set_irqchip(chip)
                    .map_err(|e| VmStateError::Kvm(what, e))?;
            }
        }
        Ok(())
    }
}

fn get_irqchip(vm: &VmFd, chip_id: u32, what: &str) -> Option<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .inspect_err(|e| warn!(error = %e, "KVM cannot give the {what} state; not saved"))
        .ok()
        .map(|()| chip)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::Kvm;

    use super::*;

    /// A VM with the VMM's in-kernel irqchip and PIT.
    fn vm_with_devices(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).unwrap();
        vm
    }

    #[test]
    fn vm_without_irqchip_or_pit_saves_and_restores_only_the_clock() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let plain = kvm.create_vm().unwrap();

        let state = VmState::save(&vm);
        let restored = state.restore(&plain);

        assert!(state.pic_master.is_none() && state.pic_slave.is_none());
        assert!(state.ioapic.is_none() && state.pit.is_none());
        assert!(state.clock.is_some());
        assert!(restored.is_ok(), "{restored:?}");
    }

    #[test]
    fn vm_with_irqchip_and_pit_saves_all_five_parts() {
        let kvm = Kvm::new().unwrap();
        let vm = vm_with_devices(&kvm);

        let state = VmState::save(&vm);

        assert!(state.pic_master.is_some() && state.pic_slave.is_some());
        assert!(state.ioapic.is_some() && state.pit.is_some() && state.clock.is_some());
    }

    #[test]
    fn programmed_pit_channel_is_restored() {
        let kvm = Kvm::new().unwrap();
        let first = vm_with_devices(&kvm);
        let mut pit = first.get_pit2().unwrap();
        pit.channels[2].count = 0x1234;
        pit.channels[2].mode = 3;
        first.set_pit2(&pit).unwrap();
        let state = VmState::save(&first);
        let second = vm_with_devices(&kvm);

        state.restore(&second).unwrap();

        let restored = second.get_pit2().unwrap().channels[2];
        assert_eq!((restored.count, restored.mode), (0x1234, 3));
    }

    #[test]
    fn ioapic_redirection_entry_is_restored() {
        let kvm = Kvm::new().unwrap();
        let first = vm_with_devices(&kvm);
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        first.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: chip_id IOAPIC selects the `ioapic` member of the union.
        unsafe { ioapic.chip.ioapic.redirtbl[5].bits = 0x0000_0000_0000_a031 };
        first.set_irqchip(&ioapic).unwrap();
        let state = VmState::save(&first);
        let second = vm_with_devices(&kvm);

        state.restore(&second).unwrap();

        let mut restored = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        second.get_irqchip(&mut restored).unwrap();
        // SAFETY: chip_id IOAPIC selects the `ioapic` member of the union.
        let bits = unsafe { restored.chip.ioapic.redirtbl[5].bits };
        assert_eq!(bits, 0xa031);
    }
}
