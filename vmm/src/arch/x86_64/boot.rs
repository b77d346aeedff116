//! Loads the kernel (bzImage or ELF), the initramfs and the command line,
//! and writes the boot information for the chosen protocol: the Linux zero
//! page with its E820 map, or PVH's `hvm_start_info` with its memory map.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    memory_map, ram_ranges, MemMapEntry, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START,
    INITRD_ADDR_MAX_DEFAULT, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use super::regs::Entry;
use crate::config::BootProtocol;
use crate::memory::GuestMemory;

/// Errors loading the kernel and boot information.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("Cannot open {0}")]
    Open(String, #[source] io::Error),
    #[error("{0} is not a bzImage or ELF kernel")]
    UnknownKernelFormat(String),
    #[error("Cannot load kernel {0}")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    #[error("Kernel {0} has no PVH entry point")]
    NoPvhEntry(String),
    #[error("Kernel command line is too long for this kernel (at most {0} bytes)")]
    CmdlineTooLong(usize),
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Cannot write the command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("Initramfs {path} ({size} bytes) does not fit in guest RAM below {limit:#x}")]
    InitramfsTooLarge { path: String, size: u64, limit: u64 },
    #[error("Cannot load initramfs {0}")]
    LoadInitramfs(String, #[source] vm_memory::GuestMemoryError),
    #[error("Cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
/// x86 Linux's COMMAND_LINE_SIZE, for kernels that do not state theirs.
const LINUX_CMDLINE_SIZE: usize = 2048;
/// The bzImage 64-bit entry point is 0x200 past the protected-mode code.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const PVH_MAGIC: u32 = 0x336e_c578;

/// What was loaded and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: Entry,
    pub protocol: &'static str,
}

enum Format {
    Elf,
    BzImage,
}

fn detect(file: &mut File, name: &str) -> Result<Format, BootError> {
    let open = |e| BootError::Open(name.to_string(), e);
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|_| BootError::UnknownKernelFormat(name.to_string()))?;
    if magic == ELF_MAGIC {
        return Ok(Format::Elf);
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(open)?;
    if file.read_exact(&mut magic).is_ok() && magic == BZIMAGE_MAGIC {
        return Ok(Format::BzImage);
    }
    Err(BootError::UnknownKernelFormat(name.to_string()))
}

/// Loads everything and writes the boot information; returns the entry.
pub fn load(
    mem: &GuestMemory,
    ram: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    protocol: BootProtocol,
    rsdp: u64,
) -> Result<LoadedKernel, BootError> {
    let kname = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| BootError::Open(kname.clone(), e))?;
    let format = detect(&mut file, &kname)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        Format::Elf => Elf::load(mem, None, &mut file, himem),
        Format::BzImage => BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|e| BootError::LoadKernel(kname.clone(), e))?;

    let header = result.setup_header;
    let cmdline_cap = match header {
        Some(h) if h.version >= 0x206 => h.cmdline_size as usize + 1,
        Some(_) => LINUX_CMDLINE_SIZE,
        None => CMDLINE_MAX,
    };
    let cl = make_cmdline(cmdline, cmdline_cap)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(BootError::WriteCmdline)?;

    let initrd_max = header
        .filter(|h| h.version >= 0x203 && h.initrd_addr_max != 0)
        .map_or(INITRD_ADDR_MAX_DEFAULT, |h| u64::from(h.initrd_addr_max));
    let initrd = initramfs
        .map(|p| load_initramfs(mem, ram, p, result.kernel_end, initrd_max))
        .transpose()?;

    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    let map = memory_map(ram);
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    match (format, protocol, pvh_entry) {
        (Format::Elf, BootProtocol::Auto | BootProtocol::Pvh, Some(rip)) => {
            write_pvh(mem, &map, initrd, rsdp)?;
            Ok(LoadedKernel {
                entry: Entry::Pvh {
                    rip,
                    start_info: PVH_INFO_ADDR,
                },
                protocol: "pvh",
            })
        }
        (_, BootProtocol::Pvh, _) => Err(BootError::NoPvhEntry(kname)),
        (format, _, _) => {
            let (hdr, rip) = match (format, header) {
                (Format::BzImage, Some(h)) => (h, result.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET),
                _ => (elf_setup_header(), result.kernel_load.0),
            };
            write_zero_page(mem, hdr, &map, initrd, cmdline_len, rsdp)?;
            Ok(LoadedKernel {
                entry: Entry::Linux64 {
                    rip,
                    zero_page: ZERO_PAGE_ADDR,
                },
                protocol: "linux",
            })
        }
    }
}

fn make_cmdline(s: &str, cap: usize) -> Result<Cmdline, BootError> {
    if s.len() + 1 > cap {
        return Err(BootError::CmdlineTooLong(cap - 1));
    }
    let mut cl = Cmdline::new(cap).map_err(BootError::Cmdline)?;
    if !s.trim().is_empty() {
        cl.insert_str(s).map_err(BootError::Cmdline)?;
    }
    Ok(cl)
}

/// A setup header for an ELF kernel entered through the 64-bit protocol.
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        version: 0x20f,
        ..Default::default()
    }
}

/// Places the initramfs page-aligned at the top of low RAM.
fn load_initramfs(
    mem: &GuestMemory,
    ram: u64,
    path: &Path,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::Open(name.clone(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Open(name.clone(), e))?
        .len();
    let limit = ram_ranges(ram)[0].end().min(initrd_max + 1);
    let addr = limit.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(HIMEM_START) => a,
        _ => {
            return Err(BootError::InitramfsTooLarge {
                path: name,
                size,
                limit,
            })
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::LoadInitramfs(name, e))?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemory,
    hdr: setup_header,
    map: &[MemMapEntry],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::BootParams)
}

fn write_pvh(
    mem: &GuestMemory,
    map: &[MemMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = PVH_INFO_ADDR + info_size;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut bp = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        bp = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        bp.set_modules(&[module], GuestAddress(modlist_addr));
    }
    bp.set_sections(&entries, GuestAddress(memmap_addr));
    PvhBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Memory;

    fn tmp(contents: &[u8]) -> tempfile_path::TmpFile {
        tempfile_path::TmpFile::new(contents)
    }

    mod tempfile_path {
        pub struct TmpFile(pub std::path::PathBuf);
        impl TmpFile {
            pub fn new(contents: &[u8]) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmm-boot-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, contents).unwrap();
                Self(p)
            }
        }
        impl Drop for TmpFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and, optionally, a PVH note.
    fn elf(pvh: bool) -> Vec<u8> {
        let mut e = vec![0u8; 0x200];
        e[..4].copy_from_slice(&ELF_MAGIC);
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&(1 + pvh as u16).to_le_bytes());
        let mut ph = |i: usize, kind: u32, off: u64, addr: u64, size: u64| {
            let p = &mut e[64 + 56 * i..64 + 56 * (i + 1)];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            p[40..48].copy_from_slice(&size.to_le_bytes());
        };
        ph(0, 1, 0x180, 0x10_0000, 0x10);
        if pvh {
            ph(1, 4, 0x1a0, 0, 20);
        }
        e[0x180..0x184].copy_from_slice(&[0xf4; 4]);
        // Note: namesz 4 "Xen\0", descsz 4, type 18, desc = entry.
        let note = [4u32, 4, 18, u32::from_le_bytes(*b"Xen\0"), 0x10_0040];
        for (i, w) in note.iter().enumerate() {
            e[0x1a0 + 4 * i..0x1a4 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        e
    }

    #[test]
    fn text_file_is_not_a_kernel() {
        let m = Memory::new(64 << 20, false).unwrap();
        let f = tmp(b"hello, I am not a kernel\n");
        let err = load(&m.guest, m.size, &f.0, None, "", BootProtocol::Auto, 0).unwrap_err();
        assert!(matches!(err, BootError::UnknownKernelFormat(_)), "{err}");
    }

    #[test]
    fn elf_with_pvh_note_boots_pvh_with_memmap_and_cmdline() {
        let m = Memory::new(64 << 20, false).unwrap();
        let f = tmp(&elf(true));
        let k = load(&m.guest, m.size, &f.0, None, "a=b", BootProtocol::Auto, 0).unwrap();
        assert_eq!(
            k.entry,
            Entry::Pvh {
                rip: 0x10_0040,
                start_info: PVH_INFO_ADDR
            }
        );
        let info: hvm_start_info = m.guest.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!((info.magic, info.memmap_entries), (PVH_MAGIC, 5));
        let mut cl = [0u8; 4];
        m.guest
            .read_slice(&mut cl, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cl, b"a=b\0");
    }

    #[test]
    fn elf_forced_to_linux_protocol_gets_a_zero_page() {
        let m = Memory::new(64 << 20, false).unwrap();
        let f = tmp(&elf(true));
        let k = load(&m.guest, m.size, &f.0, None, "", BootProtocol::Linux, 0).unwrap();
        assert_eq!(
            k.entry,
            Entry::Linux64 {
                rip: 0x10_0000,
                zero_page: ZERO_PAGE_ADDR
            }
        );
        let bp: boot_params = m.guest.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ bp.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(bp.e820_entries, 5);
        let ptr = bp.hdr.cmd_line_ptr;
        assert_eq!(u64::from(ptr), CMDLINE_ADDR);
    }

    #[test]
    fn pvh_requested_without_note_is_an_error() {
        let m = Memory::new(64 << 20, false).unwrap();
        let f = tmp(&elf(false));
        let err = load(&m.guest, m.size, &f.0, None, "", BootProtocol::Pvh, 0).unwrap_err();
        assert!(matches!(err, BootError::NoPvhEntry(_)));
    }

    #[test]
    fn initramfs_lands_page_aligned_at_top_of_low_ram() {
        let m = Memory::new(64 << 20, false).unwrap();
        let k = tmp(&elf(false));
        let i = tmp(&[0x5a; 10_000]);
        load(
            &m.guest,
            m.size,
            &k.0,
            Some(&i.0),
            "",
            BootProtocol::Linux,
            0,
        )
        .unwrap();
        let bp: boot_params = m.guest.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let addr = u64::from(bp.hdr.ramdisk_image);
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= 64 << 20 && addr + 10_000 + 4096 > 64 << 20);
        assert_eq!(m.guest.read_obj::<u8>(GuestAddress(addr)).unwrap(), 0x5a);
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let m = Memory::new(64 << 20, false).unwrap();
        let f = tmp(&elf(false));
        let long = "x".repeat(CMDLINE_MAX + 1);
        let err = load(&m.guest, m.size, &f.0, None, &long, BootProtocol::Auto, 0).unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong(_)));
    }
}
