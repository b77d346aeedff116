//! The Debian cloud kernel's early boot under vmm, on any host: its banner,
//! our exact command line, the E820 map matching `--memory`, and the vCPUs
//! found in ACPI. The VM is stopped as soon as the last of those lines has
//! appeared (on this project's machines the software nested hypervisor would
//! stop the kernel a little later anyway). The full boot of the same kernel,
//! with disks, a NIC and power-off, is `linux_rig.rs`.

mod common;

use std::time::Duration;

use common::{guest_image, run_until, vmm, Run};

/// E820 lines as Linux prints them for our memory map.
fn expected_e820(memory: u64) -> Vec<String> {
    let low_end = memory.min(0xc000_0000);
    let mut v = vec![
        (0u64, 0x9fc00u64, "usable"),
        (0x9fc00, 0xa0000, "reserved"),
        (0xe0000, 0x10_0000, "reserved"),
        (0x10_0000, low_end, "usable"),
        (0xe000_0000, 0xe010_0000, "reserved"),
    ];
    if memory > 0xc000_0000 {
        v.push((1 << 32, (1 << 32) + memory - 0xc000_0000, "usable"));
    }
    v.into_iter()
        .map(|(s, e, t)| format!("BIOS-e820: [mem {s:#018x}-{:#018x}] {t}", e - 1))
        .collect()
}

/// Boots until Linux reports its CPUs (the last line checked), then stops.
/// The kernel is the uncompressed ELF entered through the 64-bit Linux boot
/// protocol (zero page, E820): decompressing the bzImage at CPL0 under this
/// machine's instruction emulator alone takes minutes. The bzImage itself
/// boots to userspace in `linux_rig.rs`.
fn early_boot(memory: &str, cpus: u32, cmdline: &str) -> Run {
    let dir = guest_image();
    let mut c = vmm();
    c.args(["--boot", "linux", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initramfs")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--memory", memory, "--cpus", &cpus.to_string()])
        .args(["--cmdline", cmdline]);
    run_until(c, Duration::from_secs(240), "smpboot: Allowing ")
}

fn check_early_boot(r: &Run, memory: u64, cpus: u32, cmdline: &str) {
    let out = &r.stdout;
    assert!(!r.timed_out, "no CPU line in time:\n{out}\n{}", r.stderr);
    assert!(
        out.contains("Linux version "),
        "no banner:\n{out}\n{}",
        r.stderr
    );
    assert!(
        r.lines()
            .iter()
            .any(|l| l.ends_with(&format!("] Command line: {cmdline}"))),
        "command line not echoed exactly:\n{out}"
    );
    let seen: Vec<&str> = out
        .lines()
        .filter_map(|l| l.find("BIOS-e820: ").map(|i| l[i..].trim_end()))
        .collect();
    assert_eq!(seen, expected_e820(memory), "E820 map:\n{out}");
    assert!(
        out.contains(&format!("smpboot: Allowing {cpus} CPUs")),
        "vCPUs not found through ACPI:\n{out}"
    );
}

#[test]
fn debian_kernel_512m_two_cpus_early_boot() {
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k vmm.test=512m";

    let r = early_boot("512M", 2, cmdline);

    check_early_boot(&r, 512 << 20, 2, cmdline);
}

#[test]
fn debian_kernel_4g_sees_ram_above_the_hole() {
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k vmm.test=4g";

    let r = early_boot("4G", 1, cmdline);

    check_early_boot(&r, 4 << 30, 1, cmdline);
}
