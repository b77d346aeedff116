//! The snapshot state file (also the migration stream's payload): the
//! header and checksum, the postcard payload, and the devices rebuilt from
//! what it holds, as a restore does before any vCPU runs.

use std::sync::Arc;

use vmm::devices::acpi::{AcpiPm, Ged};
use vmm::devices::bus::{Bus, BusDevice};
use vmm::devices::legacy::{ResetTrigger, I8042};
use vmm::devices::rtc::Rtc;
use vmm::devices::serial::Serial;
use vmm::exit::ExitNotifier;
use vmm::pci::{PciConfig, PciConfigIo, PciRoot};
use vmm::snapshot::SnapshotState;
use vmm::state::file::{decode_state, encode_state, FORMAT_VERSION, MAGIC, VMM_VERSION};
use vmm::state::DevicesState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `payload` behind a valid header (this build's version, the right
/// length and checksum), so that mutations reach the payload decoder
/// instead of stopping at the checksum.
pub fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(26 + VMM_VERSION.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(VMM_VERSION.len() as u16).to_le_bytes());
    out.extend_from_slice(VMM_VERSION.as_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The input both as a whole state file and as a payload behind a valid
/// header; whatever decodes is checked and its devices restored.
pub fn state_file(data: &[u8]) {
    let wrapped = wrap(data);
    for bytes in [data, &wrapped] {
        if let Ok((_, s)) = decode_state::<SnapshotState>(bytes) {
            let _ = s.config.validate();
            restore_devices(&s.devices);
        }
        if let Ok((_, d)) = decode_state::<DevicesState>(bytes) {
            restore_devices(&d);
        }
    }
}

fn evt() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// What a restore does with the devices' part: check it, rebuild each
/// device the VMM emulates (its checks refuse what it cannot carry on
/// from), then let the guest read every register of the devices whose
/// registers are computed from the restored state.
fn restore_devices(d: &DevicesState) {
    let encoded = encode_state(d).expect("a decoded state encodes");
    let (_, again) = decode_state::<DevicesState>(&encoded).expect("an encoded state decodes");
    assert_eq!(&again, d, "the devices state does not survive a round trip");
    if d.check().is_err() {
        return;
    }
    let exit = Arc::new(ExitNotifier::new().expect("eventfd"));
    if let Ok(mut serial) = Serial::restore(&d.serial, evt(), evt(), Box::new(std::io::sink())) {
        for port in 0..8 {
            serial.read(port, &mut [0u8]);
        }
    }
    let offset = d.rtc.offset;
    if let Ok(mut rtc) = Rtc::restore(&d.rtc, Box::new(move || offset.wrapping_mul(3))) {
        for reg in 0..128u8 {
            rtc.write(0, &[reg]);
            rtc.read(1, &mut [0u8]);
        }
        // Register B: SET held, then released, commits the frozen time.
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[0x82]);
        rtc.write(1, &[0x02]);
    }
    let _ = I8042::restore(&d.i8042, ResetTrigger(exit.clone()));
    let _ = AcpiPm::restore(&d.acpi_pm, exit);
    let _ = Ged::restore(&d.ged, evt());
    if let Ok(root) = PciRoot::restore(Arc::new(Bus::new("mmio")), &d.pci) {
        let mut io = PciConfigIo::restore(Arc::new(std::sync::Mutex::new(root)), &d.pci_io);
        io.read(4, &mut [0u8; 4]);
    }
    for v in &d.virtio {
        if let Ok(c) = PciConfig::restore(&v.config) {
            for reg in 0..64 {
                let _ = c.read(reg);
            }
        }
    }
}
