//! The devices kept in the VMM, saved together in one [`DevicesState`].
//! Each device defines its own state type beside it; this module only
//! gathers them and versions the whole.
//!
//! Save contract: as for the vCPUs (see the [module doc](super)), and the
//! virtio devices quiesced ([`crate::virtio::pci::VirtioPci::pause`]), so
//! no backend signals an interrupt while MSI-X pending bits are read.
//!
//! Restore contract: the caller rebuilds the VM as for a fresh boot up to
//! the devices (memory filled, irqchip created, [`super::VmState`]
//! restored), then rebuilds each device from its part, with the handles
//! the boot path gives it (irqfds registered on the same GSIs, the exit
//! notifier, the output sink, a freshly connected vhost-user frontend per
//! virtio device), in this order:
//!
//! 1. the PIO devices, in any order: [`Serial::restore`], [`Rtc::restore`]
//!    (on [`crate::devices::rtc::host_clock`]), [`I8042::restore`],
//!    [`AcpiPm::restore`], [`Ged::restore`];
//! 2. [`PciRoot::restore`] on the MMIO bus, one [`crate::interrupts::Router`];
//! 3. for each slot in `pci.slots` with the `virtio` entry at the same
//!    position: [`VirtioPci::restore`] (GSIs are allocated in this order,
//!    ioeventfds registered, the device restarted if it was running),
//!    then [`PciRoot::add_at`] at that slot, which maps BAR 0 where the
//!    guest left it;
//! 4. [`PciConfigIo::restore`] and a new `PciEcam` in front of the root;
//!
//! and then the vCPU states, before the first `KVM_RUN`.
//!
//! [`Serial::restore`]: crate::devices::serial::Serial::restore
//! [`Rtc::restore`]: crate::devices::rtc::Rtc::restore
//! [`I8042::restore`]: crate::devices::legacy::I8042::restore
//! [`AcpiPm::restore`]: crate::devices::acpi::AcpiPm::restore
//! [`Ged::restore`]: crate::devices::acpi::Ged::restore
//! [`PciRoot::restore`]: crate::pci::PciRoot::restore
//! [`PciRoot::add_at`]: crate::pci::PciRoot::add_at
//! [`PciConfigIo::restore`]: crate::pci::PciConfigIo::restore
//! [`VirtioPci::restore`]: crate::virtio::pci::VirtioPci::restore

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::file::{read_state_file, StateFileError};
use crate::devices::acpi::{AcpiPmState, GedState};
use crate::devices::legacy::I8042State;
use crate::devices::rtc::RtcState;
use crate::devices::serial::SerialState;
use crate::pci::{PciConfigIoState, PciRootState};
use crate::virtio::pci::VirtioPciState;

/// Errors reading or checking the devices' state.
#[derive(Debug, Error)]
pub enum DevicesStateError {
    #[error(
        "Devices state version {found} is not supported (this build reads version {supported})"
    )]
    Version { found: u32, supported: u32 },
    #[error("Devices state has {virtio} virtio devices for {slots} PCI slots")]
    Slots { virtio: usize, slots: usize },
    #[error("Cannot read the devices state")]
    File(#[source] StateFileError),
}

/// Every device the VMM emulates, as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// [`DevicesState::VERSION`] of the writer. The state file's own
    /// format version already guards the encoding; this one says what the
    /// device set means (which devices, which semantics), so a reader can
    /// refuse a state it would misinterpret even if it decodes.
    pub version: u32,
    pub serial: SerialState,
    pub rtc: RtcState,
    pub i8042: I8042State,
    pub acpi_pm: AcpiPmState,
    pub ged: GedState,
    pub pci: PciRootState,
    pub pci_io: PciConfigIoState,
    /// One transport per slot in `pci.slots`, in the same order.
    pub virtio: Vec<VirtioPciState>,
}

impl DevicesState {
    /// The version this build writes and reads.
    pub const VERSION: u32 = 1;

    /// Checks that this build can restore the state: its version, and a
    /// transport for every occupied slot.
    pub fn check(&self) -> Result<(), DevicesStateError> {
        if self.version != Self::VERSION {
            return Err(DevicesStateError::Version {
                found: self.version,
                supported: Self::VERSION,
            });
        }
        if self.virtio.len() != self.pci.slots.len() {
            return Err(DevicesStateError::Slots {
                virtio: self.virtio.len(),
                slots: self.pci.slots.len(),
            });
        }
        Ok(())
    }

    /// The (virtio slot, transport state) pairs, in restore order.
    pub fn virtio_slots(&self) -> impl Iterator<Item = (u8, &VirtioPciState)> {
        self.pci.slots.iter().copied().zip(&self.virtio)
    }

    /// Reads a file written with [`super::write_state_file`] and checks it.
    pub fn read_file(path: &Path) -> Result<Self, DevicesStateError> {
        let state: Self = read_state_file(path).map_err(DevicesStateError::File)?;
        state.check()?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::acpi::{AcpiPm, Ged, GED_POWER_BUTTON};
    use crate::devices::bus::{Bus, BusDevice};
    use crate::devices::legacy::{ResetTrigger, I8042};
    use crate::devices::rtc::{host_clock, Rtc};
    use crate::devices::serial::Serial;
    use crate::exit::ExitNotifier;
    use crate::pci::{PciConfigIo, PciRoot};
    use crate::state::write_state_file;

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn exit() -> Arc<ExitNotifier> {
        Arc::new(ExitNotifier::new().unwrap())
    }

    /// The legacy and ACPI devices, the PCI root and its ports, each
    /// changed by the guest.
    struct Devices {
        serial: Serial,
        rtc: Rtc,
        i8042: I8042,
        pm: AcpiPm,
        ged: Ged,
        root: Arc<Mutex<PciRoot>>,
        io: PciConfigIo,
    }

    fn devices() -> Devices {
        let mut serial = Serial::new(evt(), evt(), Box::new(std::io::sink()));
        serial.write(1, &[0x01]);
        serial.enqueue(b"in");
        let mut rtc = Rtc::new();
        rtc.write(0, &[0x30]);
        rtc.write(1, &[0x77]);
        let ged = Ged::new(evt());
        ged.press_power_button();
        let root = Arc::new(Mutex::new(PciRoot::new(Arc::new(Bus::new("mmio")))));
        let mut io = PciConfigIo::new(root.clone());
        io.write(0, &0x8000_0004u32.to_le_bytes());
        io.write(4, &[0x06]);
        Devices {
            serial,
            rtc,
            i8042: I8042::new(ResetTrigger(exit())),
            pm: AcpiPm::new(exit()),
            ged,
            root,
            io,
        }
    }

    fn state(d: &Devices) -> DevicesState {
        DevicesState {
            version: DevicesState::VERSION,
            serial: d.serial.state(),
            rtc: d.rtc.state(),
            i8042: d.i8042.state(),
            acpi_pm: d.pm.state(),
            ged: d.ged.state(),
            pci: d.root.lock().unwrap().state(),
            pci_io: d.io.state(),
            virtio: vec![],
        }
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vmm-devices-{}-{name}", std::process::id()))
    }

    /// The devices rebuilt from `s` as the restore contract says.
    fn restore(s: &DevicesState) -> Devices {
        let root = PciRoot::restore(Arc::new(Bus::new("mmio")), &s.pci).unwrap();
        let root = Arc::new(Mutex::new(root));
        Devices {
            serial: Serial::restore(&s.serial, evt(), evt(), Box::new(std::io::sink())).unwrap(),
            rtc: Rtc::restore(&s.rtc, Box::new(host_clock)).unwrap(),
            i8042: I8042::restore(&s.i8042, ResetTrigger(exit())),
            pm: AcpiPm::restore(&s.acpi_pm, exit()),
            ged: Ged::restore(&s.ged, evt()),
            io: PciConfigIo::restore(root.clone(), &s.pci_io),
            root,
        }
    }

    #[test]
    fn devices_restored_from_a_file_carry_on_as_saved() {
        let d = devices();
        let path = temp_path("roundtrip");
        write_state_file(&path, &state(&d)).unwrap();

        let mut r = restore(&DevicesState::read_file(&path).unwrap());
        let restored = state(&r);
        let (mut input, mut event, mut command) = ([0u8], [0u8], [0u8; 4]);
        r.serial.read(0, &mut input);
        r.ged.read(0, &mut event);
        r.io.read(4, &mut command);

        assert_eq!(restored, state(&d));
        assert_eq!((input, event), ([b'i'], [GED_POWER_BUTTON]));
        assert_eq!(u32::from_le_bytes(command) & 0x6, 0x6);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn another_devices_version_is_refused() {
        let mut s = state(&devices());
        s.version += 1;

        let err = s.check().unwrap_err();

        assert!(
            matches!(
                err,
                DevicesStateError::Version {
                    found: 2,
                    supported: 1
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_slot_without_its_transport_is_refused() {
        let mut s = state(&devices());
        s.pci.slots.push(1);

        let err = s.check().unwrap_err();

        assert!(
            matches!(
                err,
                DevicesStateError::Slots {
                    virtio: 0,
                    slots: 1
                }
            ),
            "{err:?}"
        );
    }
}
