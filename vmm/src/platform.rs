//! The devices the VMM emulates, as one set: built for a fresh boot, or
//! rebuilt from a snapshot's [`DevicesState`] in the order its restore
//! contract gives, and saved back into one.
//!
//! PIO: COM1, the i8042, the CMOS clock, the debug console, the ACPI sleep
//! and reset registers and the GED, the PCI config ports. MMIO: the ECAM
//! and one virtio-pci transport per vhost-user device.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::console::{serial_sink, ConsoleError};
use crate::devices::acpi::{AcpiPm, Ged, GED_GSI, GED_LEN, GED_PORT, PM_BASE, PM_LEN};
use crate::devices::bus::{lock, Bus, BusError};
use crate::devices::legacy::{DebugCon, ResetTrigger, DEBUGCON_PORT, I8042, I8042_BASE, I8042_LEN};
use crate::devices::rtc::{host_clock, Rtc, RtcError, RTC_BASE, RTC_LEN};
use crate::devices::serial::{Serial, SerialError, COM1_BASE, COM1_GSI, COM1_LEN};
use crate::exit::ExitNotifier;
use crate::interrupts::Router;
use crate::memory::Memory;
use crate::pci::{BarAllocator, PciConfigIo, PciEcam, PciError, PciRoot};
use crate::state::{DevicesState, DevicesStateError};
use crate::vhost_user::{VhostUser, VhostUserError};
use crate::virtio::pci::{VirtioPci, VirtioPciError, BAR_SIZE};

/// Errors building or restoring the device set.
#[derive(Debug, Error)]
pub enum PlatformError {
    #[error("Cannot place a device")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error("Cannot create a virtio-pci device")]
    VirtioPci(#[from] VirtioPciError),
    #[error("Cannot set up PCI")]
    Pci(#[from] PciError),
    #[error("Cannot restore the serial port")]
    Serial(#[from] SerialError),
    #[error("Cannot restore the CMOS clock")]
    Rtc(#[from] RtcError),
    #[error("Invalid devices state")]
    State(#[from] DevicesStateError),
    #[error("The devices state has {found} virtio devices; the config has {expected}")]
    DeviceCount { found: usize, expected: usize },
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
}

type Result<T> = std::result::Result<T, PlatformError>;

/// Handles to every emulated device (each also sits on its bus).
pub struct Platform {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<Serial>>,
    /// Written by the UART when its receive FIFO drains.
    pub serial_drained: EventFd,
    pub ged: Arc<Mutex<Ged>>,
    pub virtio: Vec<Arc<Mutex<VirtioPci>>>,
    rtc: Arc<Mutex<Rtc>>,
    i8042: Arc<Mutex<I8042>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    root: Arc<Mutex<PciRoot>>,
    pci_io: Arc<Mutex<PciConfigIo>>,
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| PlatformError::Io("create eventfd", e))
}

impl Platform {
    /// Builds the devices of `cfg`, fresh (`saved` is `None`) or as
    /// `saved` has them; the vhost-user backends are connected either way.
    pub fn new(
        cfg: &VmConfig,
        vm: &Arc<VmFd>,
        memory: &Memory,
        exit: &Arc<ExitNotifier>,
        ram_end: u64,
        saved: Option<(&DevicesState, &[Option<Vec<u8>>])>,
    ) -> Result<Self> {
        let backends = saved.map(|(_, b)| b).unwrap_or_default();
        let saved = saved.map(|(d, _)| d);
        if let Some(s) = saved {
            s.check()?;
            if s.virtio.len() != cfg.devices.len() {
                return Err(PlatformError::DeviceCount {
                    found: s.virtio.len(),
                    expected: cfg.devices.len(),
                });
            }
        }
        let pio = Arc::new(Bus::new("pio"));

        let irq = eventfd()?;
        vm.register_irqfd(&irq, COM1_GSI)
            .map_err(|e| PlatformError::Kvm("register serial irqfd", e))?;
        let drained = eventfd()?;
        let drained_dup = drained
            .try_clone()
            .map_err(|e| PlatformError::Io("clone eventfd", e))?;
        let sink = serial_sink(&cfg.serial)?;
        let serial = match saved {
            Some(s) => Serial::restore(&s.serial, irq, drained_dup, sink)?,
            None => Serial::new(irq, drained_dup, sink),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;

        let reset = ResetTrigger(exit.clone());
        let i8042 = Arc::new(Mutex::new(match saved {
            Some(s) => I8042::restore(&s.i8042, reset),
            None => I8042::new(reset),
        }));
        pio.insert(I8042_BASE, I8042_LEN, i8042.clone())?;
        let rtc = Arc::new(Mutex::new(match saved {
            Some(s) => Rtc::restore(&s.rtc, Box::new(host_clock))?,
            None => Rtc::new(),
        }));
        pio.insert(RTC_BASE, RTC_LEN, rtc.clone())?;
        pio.insert(DEBUGCON_PORT, 1, Arc::new(Mutex::new(DebugCon::default())))?;

        let ged_irq = eventfd()?;
        vm.register_irqfd(&ged_irq, GED_GSI)
            .map_err(|e| PlatformError::Kvm("register GED irqfd", e))?;
        let ged = Arc::new(Mutex::new(match saved {
            Some(s) => Ged::restore(&s.ged, ged_irq),
            None => Ged::new(ged_irq),
        }));
        let acpi_pm = Arc::new(Mutex::new(match saved {
            Some(s) => AcpiPm::restore(&s.acpi_pm, exit.clone()),
            None => AcpiPm::new(exit.clone()),
        }));
        pio.insert(PM_BASE, PM_LEN, acpi_pm.clone())?;
        pio.insert(GED_PORT, GED_LEN, ged.clone())?;

        let mmio = Arc::new(Bus::new("mmio"));
        let router = Arc::new(Router::new(vm.clone()));
        let root = Arc::new(Mutex::new(match saved {
            Some(s) => PciRoot::restore(mmio.clone(), &s.pci)?,
            None => PciRoot::new(mmio.clone()),
        }));
        let mut virtio = Vec::with_capacity(cfg.devices.len());
        match saved {
            Some(s) => {
                for (i, ((slot, state), d)) in s.virtio_slots().zip(&cfg.devices).enumerate() {
                    let backend = VhostUser::new(d.clone(), memory.guest.clone())?;
                    if let Some(Some(bytes)) = backends.get(i) {
                        backend.load_state_on_restore(bytes.clone());
                    }
                    let dev = Arc::new(Mutex::new(VirtioPci::restore(
                        Box::new(backend),
                        state,
                        vm.clone(),
                        router.clone(),
                    )?));
                    lock(&root).add_at(slot, dev.clone())?;
                    tracing::info!(slot, socket = %d.socket.display(), "vhost-user device restored");
                    virtio.push(dev);
                }
            }
            None => {
                let mut bars = BarAllocator::new(ram_end);
                for d in &cfg.devices {
                    let backend = VhostUser::new(d.clone(), memory.guest.clone())?;
                    let addr = bars.allocate(BAR_SIZE, true)?;
                    let dev = Arc::new(Mutex::new(VirtioPci::new(
                        Box::new(backend),
                        addr,
                        vm.clone(),
                        router.clone(),
                    )?));
                    let slot = lock(&root).add(dev.clone())?;
                    tracing::info!(slot, socket = %d.socket.display(), bar = addr, "vhost-user device");
                    virtio.push(dev);
                }
            }
        }
        let pci_io = Arc::new(Mutex::new(match saved {
            Some(s) => PciConfigIo::restore(root.clone(), &s.pci_io),
            None => PciConfigIo::new(root.clone()),
        }));
        pio.insert(
            crate::pci::CONFIG_IO_BASE,
            crate::pci::CONFIG_IO_LEN,
            pci_io.clone(),
        )?;
        mmio.insert(
            crate::pci::ECAM_BASE,
            crate::pci::ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        )?;
        Ok(Self {
            pio,
            mmio,
            serial,
            serial_drained: drained,
            ged,
            virtio,
            rtc,
            i8042,
            acpi_pm,
            root,
            pci_io,
        })
    }

    /// Every device's state (the VM paused, its virtio devices too).
    pub fn state(&self) -> DevicesState {
        DevicesState {
            version: DevicesState::VERSION,
            serial: lock(&self.serial).state(),
            rtc: lock(&self.rtc).state(),
            i8042: lock(&self.i8042).state(),
            acpi_pm: lock(&self.acpi_pm).state(),
            ged: lock(&self.ged).state(),
            pci: lock(&self.root).state(),
            pci_io: lock(&self.pci_io).state(),
            virtio: self.virtio.iter().map(|d| lock(d).state()).collect(),
        }
    }
}
