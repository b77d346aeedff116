//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) through `acpi_tables`:
//! kernels built without MP table support (Debian's cloud kernel among
//! them) find their vCPUs and the IOAPIC in the MADT. The platform is
//! declared hardware-reduced: no PM timer, GPEs or fixed buttons.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::memory::GuestMemory;

/// Errors writing ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit their reserved area")]
    TooLarge(u64),
    #[error("Cannot write ACPI tables")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const OEM_ID: [u8; 6] = *b"RSTVMM";
const OEM_TABLE_ID: [u8; 8] = *b"VMMTABLE";
const OEM_REVISION: u32 = 1;

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Writes the tables for `cpus` vCPUs; returns the RSDP address.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<u64, AcpiError> {
    let mut tables: Vec<Vec<u8>> = Vec::new();

    let dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    tables.push(dsdt.as_slice().to_vec());

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

    // Layout: RSDP, XSDT, DSDT, MADT, FADT (the FADT needs the DSDT address).
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
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(placed[0])
        .finalize();
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
        let rsdp = write(&m.guest, 3).unwrap();
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
}
