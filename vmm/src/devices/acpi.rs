//! The registers of a hardware-reduced ACPI platform, as Cloud Hypervisor
//! has them:
//!
//! - [`AcpiPm`]: the FADT's sleep control/status register (one byte, both
//!   fields) and reset register. Entering S5 powers the VM off, the reset
//!   value reboots it (which ends the VM, as the i8042 reset does).
//! - [`Ged`]: the Generic Event Device (`ACPI0013`). The host presses the
//!   power button; the GED raises its interrupt, and the guest's `_EVT`
//!   reads (and so clears) the event register and notifies `\_SB_.PWRB`.
//!
//! The AML that names these registers is in `arch::x86_64::dsdt`.
//!
//! Saved state: [`AcpiPmState`] and [`GedState`]. Neither restore raises
//! anything: a power-button press the guest has not read yet is still in
//! the event register, and its interrupt already went into the in-kernel
//! irqchip, whose state is saved with the VM.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// Sleep control/status register (offset 0) and reset register (offset 1).
pub const PM_BASE: u64 = 0x600;
pub const PM_LEN: u64 = 2;
pub const SLEEP_REG: u64 = PM_BASE;
pub const RESET_REG: u64 = PM_BASE + 1;
/// What the guest writes to the reset register to reboot.
pub const RESET_VALUE: u8 = 1;
/// The SLP_TYP of S5 (soft off): `\_S5_` hands it to the guest.
pub const S5_SLP_TYP: u8 = 5;
/// Sleep control register: SLP_EN, and SLP_TYP in bits 2..=4.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The GED's event register (one byte, read clears).
pub const GED_PORT: u64 = 0x602;
pub const GED_LEN: u64 = 1;
/// The GED's interrupt: a free ISA line (COM1 has 4), edge-triggered,
/// through KVM's IOAPIC.
pub const GED_GSI: u32 = 5;
/// Event register bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1 << 0;

/// Whether a guest-triggered log line may be written: the first few, then
/// one in 4096.
fn log_allowed(count: &mut u64) -> bool {
    *count += 1;
    *count <= 8 || *count % 4096 == 0
}

/// What the sleep and reset registers hold, for snapshot and migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// The guest entered S5 (the VM is on its way down).
    pub powered_off: bool,
}

/// What the GED holds, for snapshot and migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Event register bits the guest has not read yet.
    pub pending: u8,
}

/// The sleep and reset registers.
pub struct AcpiPm {
    exit: Arc<ExitNotifier>,
    powered_off: bool,
    ignored: u64,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            exit,
            powered_off: false,
            ignored: 0,
        }
    }

    /// The registers' state, for a snapshot.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            powered_off: self.powered_off,
        }
    }

    /// Registers carrying on from `state`, ending the VM through `exit`.
    pub fn restore(state: &AcpiPmState, exit: Arc<ExitNotifier>) -> Self {
        Self {
            powered_off: state.powered_off,
            ..Self::new(exit)
        }
    }

    fn sleep_control(&mut self, v: u8) {
        // A write without SLP_EN is the WAK_STS clear that comes first.
        if v & SLP_EN == 0 {
            return;
        }
        let slp_typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if slp_typ == S5_SLP_TYP {
            if !self.powered_off {
                tracing::info!("guest powered off (ACPI S5)");
                self.powered_off = true;
            }
            self.exit.notify(ExitReason::GuestShutdown);
        } else if log_allowed(&mut self.ignored) {
            tracing::debug!(slp_typ, "guest asked for a sleep state we do not offer");
        }
    }
}

impl BusDevice for AcpiPm {
    /// WAK_STS never sets: the VM does not wake from S5.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (port, &v) in (PM_BASE + offset..).zip(data) {
            match port {
                SLEEP_REG => self.sleep_control(v),
                RESET_REG if v == RESET_VALUE => self.exit.notify(ExitReason::GuestReset),
                _ => {
                    if log_allowed(&mut self.ignored) {
                        tracing::debug!(port, value = v, "ignored ACPI register write");
                    }
                }
            }
        }
    }
}

/// The Generic Event Device's event register and interrupt.
pub struct Ged {
    pending: AtomicU8,
    irq: EventFd,
}

impl Ged {
    /// `irq` is an irqfd on [`GED_GSI`].
    pub fn new(irq: EventFd) -> Self {
        Self {
            pending: AtomicU8::new(0),
            irq,
        }
    }

    /// The event register, for a snapshot.
    pub fn state(&self) -> GedState {
        GedState {
            pending: self.pending.load(Ordering::SeqCst),
        }
    }

    /// A GED carrying on from `state`, raising `irq` (an irqfd on
    /// [`GED_GSI`]) for new events only.
    pub fn restore(state: &GedState, irq: EventFd) -> Self {
        Self {
            pending: AtomicU8::new(state.pending),
            irq,
        }
    }

    /// Presses the guest's ACPI power button: an orderly shutdown request
    /// the guest may act on (or ignore).
    pub fn press_power_button(&self) {
        let before = self.pending.fetch_or(GED_POWER_BUTTON, Ordering::SeqCst);
        if before & GED_POWER_BUTTON == 0 {
            tracing::info!("power button pressed");
        } else {
            tracing::debug!("power button pressed again before the guest saw the last press");
        }
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot raise the GED interrupt");
        }
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(b)) = (offset, data.first_mut()) {
            *b = self.pending.swap(0, Ordering::SeqCst);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, Arc<ExitNotifier>) {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        (AcpiPm::new(exit.clone()), exit)
    }

    fn ged() -> (Ged, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Ged::new(irq.try_clone().unwrap()), irq)
    }

    #[test]
    fn entering_s5_shuts_the_guest_down() {
        let (mut pm, exit) = pm();

        // What Linux's acpi_hw_extended_sleep writes: WAK_STS, then SLP_EN | SLP_TYP.
        pm.write(0, &[0x80]);
        pm.write(0, &[SLP_EN | (S5_SLP_TYP << SLP_TYP_SHIFT)]);

        assert_eq!(exit.reason(), Some(ExitReason::GuestShutdown));
    }

    #[test]
    fn clearing_wake_status_does_not_end_the_vm() {
        let (mut pm, exit) = pm();

        pm.write(0, &[0x80]);

        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn other_sleep_states_are_ignored() {
        let (mut pm, exit) = pm();

        pm.write(0, &[SLP_EN | (3 << SLP_TYP_SHIFT)]);

        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn reset_register_reboots() {
        let (mut pm, exit) = pm();

        pm.write(RESET_REG - PM_BASE, &[RESET_VALUE]);

        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn sleep_status_never_shows_a_wake() {
        let (mut pm, _) = pm();
        let mut b = [0xffu8];

        pm.read(0, &mut b);

        assert_eq!(b, [0]);
    }

    #[test]
    fn power_button_press_sets_the_event_bit_and_fires_the_irqfd() {
        let (mut ged, irq) = ged();

        ged.press_power_button();

        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        ged.read(0, &mut b);
        assert_eq!(b, [GED_POWER_BUTTON]);
    }

    #[test]
    fn reading_the_event_register_clears_it() {
        let (mut ged, _irq) = ged();
        ged.press_power_button();
        let mut b = [0u8];
        ged.read(0, &mut b);

        ged.read(0, &mut b);

        assert_eq!(b, [0]);
    }

    #[test]
    fn restored_ged_keeps_an_unread_press_without_raising_it_again() {
        let (old, _old_irq) = ged();
        old.press_power_button();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::restore(&old.state(), irq.try_clone().unwrap());

        let mut b = [0u8];
        ged.read(0, &mut b);

        assert_eq!(b, [GED_POWER_BUTTON]);
        assert!(irq.read().is_err(), "no second interrupt");
    }

    #[test]
    fn restored_ged_raises_its_new_irqfd_for_a_new_press() {
        let (old, _old_irq) = ged();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Ged::restore(&old.state(), irq.try_clone().unwrap());

        ged.press_power_button();

        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn restored_pm_keeps_the_powered_off_flag_and_still_powers_off() {
        let (mut old, _) = pm();
        old.write(0, &[SLP_EN | (S5_SLP_TYP << SLP_TYP_SHIFT)]);
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut pm = AcpiPm::restore(&old.state(), exit.clone());

        pm.write(0, &[SLP_EN | (S5_SLP_TYP << SLP_TYP_SHIFT)]);

        assert_eq!(pm.state(), AcpiPmState { powered_off: true });
        assert_eq!(exit.reason(), Some(ExitReason::GuestShutdown));
    }
}
