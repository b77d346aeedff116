//! Boots the Debian cloud kernel from `scripts/guest-image`.
//!
//! On this project's machines KVM is a software nested hypervisor whose
//! instruction emulator stops a stock kernel in early boot, so the test
//! asserts on what the kernel prints before then: its banner, our exact
//! command line, the E820 map matching `--memory`, and the vCPUs found in
//! ACPI. Where the CPU has vmx or svm it also requires the full boot: /init
//! runs the command from the command line and the guest powers off.

mod common;

use std::time::Duration;

use common::{guest_image, has_hw_virt, run, vmm, Run};

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

fn boot_linux(memory: &str, cpus: u32, cmdline: &str) -> Run {
    let dir = guest_image();
    let mut c = vmm();
    c.arg("--kernel")
        .arg(dir.join("vmlinuz"))
        .arg("--initramfs")
        .arg(dir.join("initramfs.cpio.gz"))
        .args([
            "--memory",
            memory,
            "--cpus",
            &cpus.to_string(),
            "--cmdline",
            cmdline,
        ]);
    run(c, Duration::from_secs(240))
}

fn check_early_boot(r: &Run, memory: u64, cpus: u32, cmdline: &str) {
    let out = &r.stdout;
    assert!(
        out.contains("Linux version "),
        "no banner:\n{out}\n{}",
        r.stderr
    );
    assert!(
        out.contains(&format!("Command line: {cmdline}\r\n"))
            || out.contains(&format!("Command line: {cmdline}\n")),
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

fn check_full_boot_or_skip(r: &Run) {
    if has_hw_virt() {
        assert!(
            r.stdout.contains("GUEST-RUN-END rc=0"),
            "guest did not run /init to the end:\n{}\n{}",
            r.stdout,
            r.stderr
        );
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
    } else {
        // Under the emulating nested hypervisor the kernel stops early; the
        // VMM must say why in one line and fail.
        assert_ne!(r.code(), Some(0));
        assert!(r.stderr.starts_with("vmm: vCPU "), "{}", r.stderr);
        println!("skipped full boot: no hardware virtualization (no vmx/svm in /proc/cpuinfo)");
        eprintln!("skipped full boot: no hardware virtualization (no vmx/svm in /proc/cpuinfo)");
    }
}

#[test]
fn debian_kernel_512m_two_cpus() {
    let cmdline =
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k run=/bin/true vmm.test=512m";
    let r = boot_linux("512M", 2, cmdline);
    check_early_boot(&r, 512 << 20, 2, cmdline);
    check_full_boot_or_skip(&r);
}

#[test]
fn debian_kernel_4g_sees_ram_above_the_hole() {
    let cmdline =
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k run=/bin/true vmm.test=4g";
    let r = boot_linux("4G", 1, cmdline);
    check_early_boot(&r, 4 << 30, 1, cmdline);
    check_full_boot_or_skip(&r);
}
