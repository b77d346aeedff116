//! Boot-time vCPU state: GDT, identity page tables, segment and control
//! registers for long mode or PVH's 32-bit protected mode, MSRs, FPU and
//! the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PAGE_TABLES_END, PML4_ADDR};
use crate::memory::GuestMemory;

/// Errors setting up vCPU registers.
#[derive(Debug, Error)]
pub enum RegsError {
    #[error("Cannot write boot tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("Cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM set only {0} of {1} MSRs")]
    Msrs(usize, usize),
}

/// The GDT: Linux's boot protocol wants CS = 0x10, DS = 0x18.
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // 0x08: 32-bit code (PVH)
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(index: u16) -> kvm_segment {
    let e = GDT[index as usize];
    let flags = (e >> 40) as u16;
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: 0,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 { rip: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { rip: u64, start_info: u64 },
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(RegsError::GuestMemory)
}

/// Writes identity page tables (2 MiB pages) covering `[0, map_end)`,
/// at least 4 GiB, at most what fits below the command line.
pub fn write_page_tables(mem: &GuestMemory, map_end: u64) -> Result<(), RegsError> {
    let pdpt = PML4_ADDR + 0x1000;
    let pd0 = pdpt + 0x1000;
    let max_gib = (PAGE_TABLES_END - pd0) / 0x1000;
    let gib = map_end.div_ceil(1 << 30).clamp(4, max_gib.min(512));
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(RegsError::GuestMemory)
    };
    w(pdpt | 0x03, PML4_ADDR)?;
    for g in 0..gib {
        let pd = pd0 + g * 0x1000;
        w(pd | 0x03, pdpt + g * 8)?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) | (i << 21)) | 0x83).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(RegsError::GuestMemory)?;
    }
    Ok(())
}

/// Sets the general and segment registers for the chosen entry.
pub fn setup_boot_regs(vcpu: &VcpuFd, entry: Entry) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("get sregs", e))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.tr = segment(4);
    let data = segment(3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut regs = kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { rip, zero_page } => {
            sregs.cs = segment(2);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
        Entry::Pvh { rip, start_info } => {
            sregs.cs = segment(1);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = start_info;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("set sregs", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("set regs", e))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("set FPU", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_WB_ENABLED: u64 = (1 << 11) | 6;

/// Boot MSRs: syscall MSRs cleared, fast strings on, MTRRs write-back.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_WB_ENABLED),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs(0, entries.len()))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("set MSRs", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs(set, entries.len()));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// LINT0 delivers the PIC's ExtINT, LINT1 NMIs, as firmware leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("get LAPIC", e))?;
    let mut set = |off: usize, mode: u32| {
        let bytes: &mut [u8] =
            // SAFETY: `regs` is a plain `[c_char; 1024]`; viewing it as bytes of the
            // same length is always valid.
            unsafe { std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast(), lapic.regs.len()) };
        let mut v = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        v = (v & !0x700) | (mode << 8);
        bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    };
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("set LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Memory;

    #[test]
    fn gdt_segments_decode_to_flat_code_and_data() {
        let cs = segment(2);
        assert_eq!((cs.selector, cs.l, cs.db, cs.type_), (0x10, 1, 0, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(3);
        assert_eq!((ds.selector, ds.type_, ds.db), (0x18, 3, 1));
        let cs32 = segment(1);
        assert_eq!((cs32.selector, cs32.l, cs32.db), (0x08, 0, 1));
    }

    #[test]
    fn page_tables_identity_map_4g_with_2m_pages() {
        let m = Memory::new(64 << 20, false).unwrap();
        write_page_tables(&m.guest, 64 << 20).unwrap();
        let pml4: u64 = m.guest.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpt = pml4 & !0xfff;
        let pdpt3: u64 = m.guest.read_obj(GuestAddress(pdpt + 3 * 8)).unwrap();
        let last: u64 = m
            .guest
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
        let pdpt4: u64 = m.guest.read_obj(GuestAddress(pdpt + 4 * 8)).unwrap();
        assert_eq!(pdpt4, 0);
    }
}
