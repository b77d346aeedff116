//! The two boot protocols: Linux `boot_params` and PVH `hvm_start_info`.

use core::ptr::read_unaligned;

pub const PROTO_LINUX: u64 = 1;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const PVH_MAGIC: u32 = 0x336e_c578;
const MAX_CMDLINE: usize = 4096;

/// Register state saved by the entry stubs (see `entry_state` in asm.rs).
#[repr(C)]
pub struct EntryState {
    pub cr0: u64,
    pub efer: u64,
    pub rflags: u64,
    pub cs: u64,
    pub ds: u64,
    pub ss: u64,
}

extern "C" {
    #[link_name = "entry_state"]
    static ENTRY_STATE: EntryState;
}

pub fn entry_state() -> &'static EntryState {
    // SAFETY: written only by the entry stub before Rust code runs.
    unsafe { &ENTRY_STATE }
}

/// Reads a little-endian value at a physical address (identity mapped).
fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses inside the boot structures the VMM provided,
    // which lie in identity-mapped RAM.
    unsafe { read_unaligned(addr as *const T) }
}

/// One memory-map entry.
#[derive(Clone, Copy)]
pub struct MapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the guest learnt from the boot structures.
pub struct BootInfo {
    pub cmdline: &'static [u8],
    map: u64,
    stride: u64,
    pub entries: u32,
    /// ACPI RSDP address from the boot structures (0 if not given).
    pub rsdp: u64,
}

impl BootInfo {
    pub fn entry(&self, i: u32) -> MapEntry {
        let p = self.map + u64::from(i) * self.stride;
        MapEntry {
            addr: rd(p),
            size: rd(p + 8),
            kind: rd(p + 16),
        }
    }
}

fn cstr(addr: u64, max: usize) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    let mut n = 0;
    while n < max && rd::<u8>(addr + n as u64) != 0 {
        n += 1;
    }
    // SAFETY: the n bytes were just read from identity-mapped RAM that nobody writes.
    unsafe { core::slice::from_raw_parts(addr as *const u8, n) }
}

/// Checks the entry contract; returns what was violated.
pub fn check_entry(proto: u64, info: u64) -> Result<(), &'static str> {
    let st = entry_state();
    if st.rflags & (1 << 9) != 0 {
        return Err("entry IF=1");
    }
    if proto == PROTO_LINUX {
        if rd::<u32>(info + 0x202) != HDRS_MAGIC {
            return Err("boot_params header magic");
        }
        if st.cr0 & (1 << 31) == 0 {
            return Err("entry CR0.PG=0");
        }
        if st.efer & (1 << 10) == 0 {
            return Err("entry EFER.LMA=0");
        }
        if st.cs != 0x10 {
            return Err("entry CS!=0x10");
        }
        if st.ds != 0x18 || st.ss != 0x18 {
            return Err("entry DS/SS!=0x18");
        }
    } else {
        if rd::<u32>(info) != PVH_MAGIC {
            return Err("start_info magic");
        }
        if rd::<u32>(info + 4) != 1 {
            return Err("start_info version");
        }
        if st.cr0 & 1 == 0 {
            return Err("entry CR0.PE=0");
        }
        if st.cr0 & (1 << 31) != 0 {
            return Err("entry CR0.PG=1");
        }
    }
    Ok(())
}

pub fn parse(proto: u64, info: u64) -> BootInfo {
    if proto == PROTO_LINUX {
        let ptr = u64::from(rd::<u32>(info + 0x228)) | (u64::from(rd::<u32>(info + 0x0C8)) << 32);
        let size = rd::<u32>(info + 0x238) as usize;
        let max = if size == 0 {
            MAX_CMDLINE
        } else {
            size.min(MAX_CMDLINE)
        };
        BootInfo {
            cmdline: cstr(ptr, max),
            map: info + 0x2D0,
            stride: 20,
            entries: u32::from(rd::<u8>(info + 0x1E8)).min(128),
            // acpi_rsdp_addr, boot protocol 2.14+.
            rsdp: if rd::<u16>(info + 0x206) >= 0x020E {
                rd::<u64>(info + 0x070)
            } else {
                0
            },
        }
    } else {
        BootInfo {
            cmdline: cstr(rd::<u64>(info + 24), MAX_CMDLINE),
            map: rd::<u64>(info + 40),
            stride: 24,
            entries: rd::<u32>(info + 48).min(128),
            rsdp: rd::<u64>(info + 32),
        }
    }
}
