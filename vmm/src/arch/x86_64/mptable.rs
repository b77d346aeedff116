//! Intel MultiProcessor Specification 1.4 table: tells the guest about
//! every vCPU, the ISA bus and the IOAPIC with its interrupt pins.
//!
//! Written by hand: the structures are small and fixed, and no maintained
//! crate builds them.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BIOS_END, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};
use crate::memory::GuestMemory;

/// Errors writing the MP table.
#[derive(Debug, Error)]
pub enum MpTableError {
    #[error("MP table for {0} vCPUs does not fit below 1 MiB")]
    TooLarge(u8),
    #[error("Cannot write MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA IRQs routed through the IOAPIC (KVM's IOAPIC has 24 pins).
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature; FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table for `cpus` vCPUs with APIC IDs 0..cpus, located at `addr`.
pub fn build(cpus: u8, addr: u32) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[
            0,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = addr + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec rev 1.4, checksum
    header.extend_from_slice(b"RUSTVMM ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&[0; 4]); // OEM table pointer
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&header);
    fp
}

/// Writes the MP table into the reserved BIOS area.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MpTableError> {
    let table = build(cpus, MPTABLE_ADDR as u32);
    if MPTABLE_ADDR + table.len() as u64 > BIOS_END {
        return Err(MpTableError::TooLarge(cpus));
    }
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_valid() {
        let t = build(4, 0xf0000);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(sum(&t[16..16 + len]), 0);
        assert_eq!(16 + len, t.len());
    }

    #[test]
    fn one_processor_entry_per_vcpu_with_bsp_first() {
        let t = build(3, 0xf0000);
        let entries = &t[16 + 44..];
        let cpus: Vec<_> = entries.chunks(20).take(3).collect();
        assert_eq!(cpus[0][..4], [0, 0, APIC_VERSION, 3]);
        assert_eq!(cpus[2][..4], [0, 2, APIC_VERSION, 1]);
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 3 + 2 + 24 + 2);
    }

    #[test]
    fn largest_table_fits_in_the_bios_area() {
        assert!(MPTABLE_ADDR + build(254, 0xf0000).len() as u64 <= BIOS_END);
    }
}
