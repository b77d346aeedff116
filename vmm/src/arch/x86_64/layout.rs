//! Guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info + memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, then PDPT, then page directories (2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables, RSDP first (reserved, where Linux scans)
//! 0x000f_0000  MP table (reserved, the BIOS area Linux scans)
//! 0x0010_0000  kernel (its own load address), initramfs at the top of low RAM
//! 0xc000_0000  MMIO hole (PCI, IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000)
//! 0x1_0000_0000 RAM above 4 GiB when RAM exceeds 3 GiB
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
/// Page directories live between the PDPT and the command line.
pub const PAGE_TABLES_END: u64 = CMDLINE_ADDR;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = MPTABLE_ADDR;
pub const MPTABLE_ADDR: u64 = 0xf0000;
pub const BIOS_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Addresses KVM needs for its own use on Intel hosts, inside the hole.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Linux's default `initrd_addr_max` for kernels that do not state one.
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

/// One guest RAM range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub len: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Splits `size` bytes of RAM around the MMIO hole below 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_HOLE_START {
        vec![RamRange {
            start: 0,
            len: size,
        }]
    } else {
        vec![
            RamRange {
                start: 0,
                len: MMIO_HOLE_START,
            },
            RamRange {
                start: MMIO_HOLE_END,
                len: size - MMIO_HOLE_START,
            },
        ]
    }
}

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map handed to the guest (E820 or PVH): RAM around the
/// reserved BIOS areas and the MMIO hole.
pub fn memory_map(size: u64) -> Vec<MemMapEntry> {
    let ranges = ram_ranges(size);
    let low_end = ranges[0].end();
    let mut map = vec![
        MemMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemMapEntry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
        MemMapEntry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820_RESERVED,
        },
        MemMapEntry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    // PCI ECAM (bus 0), described in ACPI MCFG.
    map.push(MemMapEntry {
        addr: crate::pci::ECAM_BASE,
        size: crate::pci::ECAM_SIZE,
        kind: E820_RESERVED,
    });
    if let Some(high) = ranges.get(1) {
        map.push(MemMapEntry {
            addr: high.start,
            size: high.len,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usable(map: &[MemMapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                start: 0,
                len: 512 << 20
            }]
        );
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
        assert_eq!(r[1].start, 1 << 32);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
    }

    #[test]
    fn memory_map_covers_ram_less_bios_areas() {
        for size in [64u64 << 20, 3 << 30, 4 << 30] {
            let map = memory_map(size);
            let bios_hole = 0x10_0000 - EBDA_START;
            assert_eq!(usable(&map), size - bios_hole, "size {size:#x}");
            assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        }
    }
}
