//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG) through `acpi_tables`:
//! kernels built without MP table support (Debian's cloud kernel among
//! them) find their vCPUs and the IOAPIC in the MADT. The platform is
//! declared hardware-reduced: no PM timer, GPEs or fixed buttons; the FADT
//! names the sleep control/status and reset registers of
//! `devices::acpi`, and the DSDT (`dsdt.rs`) the devices.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::dsdt::dsdt;
use super::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::devices::acpi::{RESET_REG, RESET_VALUE, SLEEP_REG};
use crate::devices::rtc::CENTURY;
use crate::memory::GuestMemory;

/// Errors writing ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit their reserved area")]
    TooLarge(u64),
    #[error("Cannot write ACPI tables")]
    Write(#[source] vm_memory::GuestMemoryError),
}

pub(super) const OEM_ID: [u8; 6] = *b"RSTVMM";
pub(super) const OEM_TABLE_ID: [u8; 8] = *b"VMMTABLE";
pub(super) const OEM_REVISION: u32 = 1;

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A one-byte I/O port register.
fn io_byte(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// Writes the tables for `cpus` vCPUs and RAM ending at `ram_end` (where
/// the 64-bit PCI window starts); returns the RSDP address.
pub fn write(mem: &GuestMemory, cpus: u8, ram_end: u64) -> Result<u64, AcpiError> {
    let mut tables: Vec<Vec<u8>> = vec![dsdt(ram_end)];

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    tables.push(bytes(&madt));

    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(crate::pci::ECAM_BASE, 0, 0, 0);
    tables.push(bytes(&mcfg));

    // Layout: RSDP, XSDT, DSDT, MADT, MCFG, FADT (the FADT needs the DSDT address).
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * 3;
    let mut addr = align(xsdt_addr + xsdt_len);
    let mut placed = Vec::new();
    for t in &tables {
        placed.push(addr);
        addr = align(addr + t.len() as u64);
    }
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .dsdt_64(placed[0]);
    // Hardware-reduced sleep (Linux's acpi_hw_extended_sleep) and reset go
    // through one-byte ports; rtc-cmos takes the century byte from here.
    fadt.sleep_control_reg = io_byte(SLEEP_REG);
    fadt.sleep_status_reg = io_byte(SLEEP_REG);
    fadt.reset_reg = io_byte(RESET_REG);
    fadt.reset_value = RESET_VALUE;
    fadt.century = CENTURY;
    let fadt = fadt.finalize();
    let fadt_bytes = bytes(&fadt);
    let fadt_addr = addr;
    let end = fadt_addr + fadt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(placed[1]);
    xsdt.add_entry(placed[2]);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let w = |data: &[u8], a: u64| {
        mem.write_slice(data, GuestAddress(a))
            .map_err(AcpiError::Write)
    };
    w(&bytes(&rsdp), rsdp_addr)?;
    w(&bytes(&xsdt), xsdt_addr)?;
    for (t, a) in tables.iter().zip(&placed) {
        w(t, *a)?;
    }
    w(&fadt_bytes, fadt_addr)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn rsdp_leads_to_a_madt_listing_every_vcpu() {
        let m = Memory::new(64 << 20, false).unwrap();
        let rsdp = write(&m.guest, 3, 64 << 20).unwrap();
        let mut r = [0u8; 36];
        m.guest.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = table(&m.guest, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let madt = entries
            .iter()
            .map(|a| table(&m.guest, *a))
            .find(|t| &t[..4] == b"APIC")
            .unwrap();
        assert_eq!(sum(&madt), 0);
        let mut kinds = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(kinds, [0, 0, 0, 1]);
        let fadt = table(&m.guest, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
    }

    /// Every table the RSDP leads to: XSDT entries, then the FADT's DSDT.
    fn all_tables(mem: &GuestMemory, rsdp: u64) -> Vec<Vec<u8>> {
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let mut tables: Vec<Vec<u8>> = table(mem, xsdt)[36..]
            .chunks(8)
            .map(|c| table(mem, u64::from_le_bytes(c.try_into().unwrap())))
            .collect();
        let dsdt = u64::from_le_bytes(tables[0][140..148].try_into().unwrap());
        tables.push(table(mem, dsdt));
        tables
    }

    /// A GAS for a one-byte I/O port, as the FADT holds it.
    fn io_gas(port: u64) -> Vec<u8> {
        [&[1u8, 8, 0, 1][..], &port.to_le_bytes()].concat()
    }

    #[test]
    fn every_table_has_a_valid_checksum() {
        let m = Memory::new(64 << 20, false).unwrap();

        let rsdp = write(&m.guest, 2, 64 << 20).unwrap();

        let tables = all_tables(&m.guest, rsdp);
        let names: Vec<&[u8]> = tables.iter().map(|t| &t[..4]).collect();
        assert_eq!(names, [b"FACP", b"APIC", b"MCFG", b"DSDT"].map(|n| &n[..]));
        assert!(tables.iter().all(|t| sum(t) == 0));
    }

    #[test]
    fn fadt_names_the_sleep_and_reset_registers() {
        let m = Memory::new(64 << 20, false).unwrap();

        let rsdp = write(&m.guest, 1, 64 << 20).unwrap();

        let fadt = &all_tables(&m.guest, rsdp)[0];
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_eq!(
            flags & (Flags::ResetRegSup as u32),
            Flags::ResetRegSup as u32
        );
        assert_eq!(fadt[116..128], io_gas(RESET_REG));
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(fadt[244..256], io_gas(SLEEP_REG));
        assert_eq!(fadt[256..268], io_gas(SLEEP_REG));
        assert_eq!(fadt[108], CENTURY);
    }
}
