//! The DSDT: the AML namespace in which an ACPI guest on a hardware-reduced
//! platform finds its devices. Linux enumerates PCI only through a host
//! bridge here (the MCFG alone is not enough), trusts the MCFG only when a
//! motherboard resource reserves the ECAM, and can only power off when
//! `\_S5_` names the SLP_TYP the FADT's sleep control register expects.
//!
//! ```text
//! \_S5_        Package {5, 5, 0, 0}: the SLP_TYP of soft-off
//! \_SB_.PCI0   PNP0A08 host bridge: bus 0, ports 0xCF8.., I/O and MMIO windows, _OSC
//! \_SB_.MBRD   PNP0C02 motherboard resources: the ECAM and the ACPI register ports
//! \_SB_.COM1   PNP0501 serial port 0x3F8, GSI 4
//! \_SB_.RTC_   PNP0B00 CMOS clock 0x70 (no interrupt: none is emulated)
//! \_SB_.PWRB   PNP0C0C power button
//! \_SB_.GED_   ACPI0013 generic event device: an interrupt whose _EVT reads
//!              the event register and notifies PWRB
//! ```
//!
//! Without an IRQ in `RTC_`'s resources Linux's rtc-cmos runs without
//! alarms; with the legacy PIC bypassed (hardware-reduced ACPI) it would
//! otherwise not guess IRQ 8. `COM1` gives the 8250 driver its interrupt
//! the same way, as QEMU, Cloud Hypervisor and Firecracker declare it.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, CreateDWordField, Device, EISAName, Equal,
    Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local,
    Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Or, Package, Path,
    ResourceTemplate, Return, Store, Uuid, IO, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::acpi::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::acpi::{
    GED_GSI, GED_LEN, GED_PORT, GED_POWER_BUTTON, PM_BASE, PM_LEN, S5_SLP_TYP,
};
use crate::devices::rtc::{RTC_BASE, RTC_LEN};
use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN};
use crate::pci::{
    CONFIG_IO_BASE, CONFIG_IO_LEN, ECAM_BASE, ECAM_SIZE, MMIO32_END, MMIO32_START, MMIO64_END,
};

/// `_OSC`'s UUID for PCI host bridges (PCI Firmware Specification 3.3).
const PCI_HOST_BRIDGE_OSC: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` status dword: the UUID is not one we know.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
/// The Notify value of a power button press.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The PCI host bridge's windows (inclusive ranges) handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub mmio32: (u32, u32),
    pub mmio64: (u64, u64),
}

impl PciWindows {
    /// The windows `pci::BarAllocator` allocates from: 32-bit BARs below
    /// the ECAM, 64-bit BARs from the end of RAM (at least 4 GiB) to the
    /// top of the guest's physical address space.
    pub fn new(ram_end: u64) -> Self {
        Self {
            mmio32: (MMIO32_START as u32, (MMIO32_END - 1) as u32),
            mmio64: (ram_end.max(1 << 32), MMIO64_END - 1),
        }
    }
}

/// `_OSC` of the host bridge: grants every control the OS asks for (the
/// capabilities buffer comes back as given), flags any other UUID.
struct PciOsc;

impl Aml for PciOsc {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let cdw1 = Path::new("CDW1");
        let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC);
        Method::new(
            "_OSC".into(),
            4,
            true,
            vec![
                &CreateDWordField::new(&cdw1, &Arg(3), &ZERO),
                &If::new(&Equal::new(&Arg(0), &uuid), vec![&Return::new(&Arg(3))]),
                &Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID),
                &Return::new(&Arg(3)),
            ],
        )
        .to_aml_bytes(sink);
    }
}

fn host_bridge(sink: &mut Vec<u8>, w: PciWindows) {
    let (io_base, io_len) = (CONFIG_IO_BASE as u16, CONFIG_IO_LEN as u8);
    Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &ZERO),
            &Name::new("_SEG".into(), &ZERO),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_BBN".into(), &ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AddressSpace::new_bus_number(0u16, 0u16),
                    &IO::new(io_base, io_base, 1, io_len),
                    &AddressSpace::new_io(0u16, io_base - 1, None),
                    &AddressSpace::new_io(0x0d00u16, 0xffffu16, None),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        w.mmio32.0,
                        w.mmio32.1,
                        None,
                    ),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        w.mmio64.0,
                        w.mmio64.1,
                        None,
                    ),
                ]),
            ),
            &PciOsc,
        ],
    )
    .to_aml_bytes(sink);
}

fn motherboard_resources(sink: &mut Vec<u8>) {
    let pm = PM_BASE as u16;
    let ged = GED_PORT as u16;
    Device::new(
        "_SB_.MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(true, ECAM_BASE as u32, ECAM_SIZE as u32),
                    &IO::new(pm, pm, 1, PM_LEN as u8),
                    &IO::new(ged, ged, 1, GED_LEN as u8),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

fn legacy_devices(sink: &mut Vec<u8>) {
    let com1 = COM1_BASE as u16;
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &Interrupt::new(true, true, false, false, COM1_GSI),
                    &IO::new(com1, com1, 1, COM1_LEN as u8),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    let rtc = RTC_BASE as u16;
    Device::new(
        "_SB_.RTC_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0B00")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&IO::new(rtc, rtc, 1, RTC_LEN as u8)]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

fn power_button(sink: &mut Vec<u8>) {
    Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &ZERO),
        ],
    )
    .to_aml_bytes(sink);
    let event = Path::new("GDAT");
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, GED_GSI)]),
            ),
            &OpRegion::new(
                "GDST".into(),
                OpRegionSpace::SystemIO,
                &(GED_PORT as usize),
                &(GED_LEN as usize),
            ),
            &Field::new(
                "GDST".into(),
                FieldAccessType::Byte,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 8)],
            ),
            // Reading GDAT clears it: read it once.
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &Store::new(&Local(0), &event),
                    &And::new(&Local(1), &Local(0), &GED_POWER_BUTTON),
                    &If::new(
                        &Equal::new(&Local(1), &GED_POWER_BUTTON),
                        vec![&Notify::new(
                            &Path::new("\\_SB_.PWRB"),
                            &NOTIFY_BUTTON_PRESSED,
                        )],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// The DSDT for a guest whose RAM ends at `ram_end`.
pub fn dsdt(ram_end: u64) -> Vec<u8> {
    let mut aml = Vec::new();
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &ZERO, &ZERO]),
    )
    .to_aml_bytes(&mut aml);
    host_bridge(&mut aml, PciWindows::new(ram_end));
    motherboard_resources(&mut aml);
    legacy_devices(&mut aml);
    power_button(&mut aml);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&aml);
    table.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::BarAllocator;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// `Name(_HID, EisaId(..))` as ASL compilers encode it.
    fn hid(eisa: [u8; 4]) -> Vec<u8> {
        [&[0x08][..], b"_HID", &[0x0c], &eisa].concat()
    }

    fn word_range(kind: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
        let mut v = vec![0x88, 13, 0, kind, 0x0c, type_flags, 0, 0];
        for x in [min, max, 0, max - min + 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn memory_window_32(min: u32, max: u32) -> Vec<u8> {
        let mut v = vec![0x87, 23, 0, 0, 0x0c, 0x01, 0, 0, 0, 0];
        for x in [min, max, 0, max - min + 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn memory_window_64(min: u64, max: u64) -> Vec<u8> {
        let mut v = vec![0x8a, 43, 0, 0, 0x0c, 0x01];
        for x in [0, min, max, 0, max - min + 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    #[test]
    fn table_is_a_dsdt_with_a_valid_checksum() {
        let t = dsdt(512 << 20);

        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn host_bridge_is_a_pci_express_root_on_bus_zero() {
        let t = dsdt(512 << 20);

        assert!(contains(&t, b"\x5b\x82"));
        assert!(contains(&t, b"\x2e_SB_PCI0"));
        assert!(contains(&t, &hid([0x41, 0xd0, 0x0a, 0x08])));
        assert!(contains(&t, b"\x08_CID\x0c\x41\xd0\x0a\x03"));
        for name in [b"_ADR", b"_SEG", b"_UID", b"_BBN"] {
            assert!(contains(&t, &[&[0x08][..], name, &[0x00]].concat()));
        }
    }

    #[test]
    fn host_bridge_resources_are_bus_zero_config_ports_and_bar_windows() {
        let ram_end = 512 << 20;
        let mut crs = word_range(2, 0, 0, 0);
        crs.extend_from_slice(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]);
        crs.extend(word_range(1, 3, 0, 0x0cf7));
        crs.extend(word_range(1, 3, 0x0d00, 0xffff));
        crs.extend(memory_window_32(0xc000_0000, 0xdfff_ffff));
        crs.extend(memory_window_64(1 << 32, (1 << 40) - 1));
        crs.extend_from_slice(&[0x79, 0x00]);

        let t = dsdt(ram_end);

        assert!(contains(&t, &crs));
    }

    #[test]
    fn bar_windows_hold_the_allocators_bars_and_leave_out_the_ecam() {
        let ram_end = 6 << 30;
        let mut bars = BarAllocator::new(ram_end);
        let bar32 = bars.allocate(1 << 20, false).unwrap();
        let bar64 = bars.allocate(1 << 20, true).unwrap();

        let w = PciWindows::new(ram_end);

        assert!(u64::from(w.mmio32.0) <= bar32 && bar32 < u64::from(w.mmio32.1));
        assert!(w.mmio64.0 <= bar64 && bar64 < w.mmio64.1);
        assert!(u64::from(w.mmio32.1) < ECAM_BASE);
        assert_eq!(w.mmio64.0, ram_end);
    }

    #[test]
    fn osc_returns_the_capabilities_it_was_given() {
        let uuid: [u8; 16] = [
            0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d,
            0xd7, 0x66,
        ];
        // CreateDWordField (Arg3, 0, CDW1); If (Arg0 == ToUUID(..)) { Return (Arg3) }
        let body = [
            &b"\x8a\x6b\x00CDW1\xa0\x19\x93\x68\x11\x13\x0a\x10"[..],
            &uuid,
            b"\xa4\x6b",
        ]
        .concat();

        let t = dsdt(512 << 20);

        assert!(contains(&t, b"_OSC\x0c"));
        assert!(contains(&t, &body));
        // CDW1 |= 4 (unrecognised UUID); Return (Arg3)
        assert!(contains(&t, b"\x7dCDW1\x0a\x04CDW1\xa4\x6b"));
    }

    #[test]
    fn ecam_is_reserved_as_a_motherboard_resource() {
        let mut ecam = vec![0x86, 0x09, 0x00, 0x01];
        ecam.extend_from_slice(&(ECAM_BASE as u32).to_le_bytes());
        ecam.extend_from_slice(&(ECAM_SIZE as u32).to_le_bytes());

        let t = dsdt(512 << 20);

        assert!(contains(&t, b"\x2e_SB_MBRD"));
        assert!(contains(&t, &hid([0x41, 0xd0, 0x0c, 0x02])));
        assert!(contains(&t, &ecam));
    }

    #[test]
    fn s5_package_holds_the_sleep_type_the_pm_device_expects() {
        let t = dsdt(512 << 20);

        assert!(contains(
            &t,
            &[
                &b"\x08_S5_\x12\x08\x04"[..],
                &[0x0a, S5_SLP_TYP, 0x0a, S5_SLP_TYP, 0, 0]
            ]
            .concat()
        ));
    }

    #[test]
    fn ged_interrupt_event_notifies_the_power_button() {
        let t = dsdt(512 << 20);

        assert!(contains(&t, b"\x2e_SB_GED_"));
        assert!(contains(&t, b"\x08_HID\x0dACPI0013\x00"));
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_GSI }
        assert!(contains(&t, &[0x89, 6, 0, 0x03, 1, GED_GSI as u8, 0, 0, 0]));
        // OperationRegion (GDST, SystemIO, GED_PORT, 1)
        let port = (GED_PORT as u16).to_le_bytes();
        assert!(contains(
            &t,
            &[&b"\x5b\x80GDST\x01\x0b"[..], &port, b"\x01"].concat()
        ));
        assert!(contains(&t, b"_EVT\x09"));
        // Notify (\_SB_.PWRB, 0x80)
        assert!(contains(&t, b"\x86\\\x2e_SB_PWRB\x0a\x80"));
        assert!(contains(&t, &hid([0x41, 0xd0, 0x0c, 0x0c])));
    }

    #[test]
    fn legacy_devices_declare_com1_and_the_rtc() {
        let t = dsdt(512 << 20);

        assert!(contains(&t, &hid([0x41, 0xd0, 0x05, 0x01])));
        assert!(contains(
            &t,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        assert!(contains(&t, &hid([0x41, 0xd0, 0x0b, 0x00])));
        assert!(contains(
            &t,
            &[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]
        ));
    }
}
