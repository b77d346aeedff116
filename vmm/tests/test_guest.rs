//! Boots the purpose-built test guest under the real `vmm` binary and checks
//! what it reports over the serial port: the boot contract, memory, PIO and
//! MMIO exits, the serial interrupt, SMP bring-up and power-off.

mod common;

use std::time::Duration;

use common::{run, test_guest, vmm, Run};

const LIMIT: Duration = Duration::from_secs(60);

fn boot(cpus: u32, memory: &str, protocol: &str, cmdline: &str) -> Run {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args([
            "--cpus",
            &cpus.to_string(),
            "--memory",
            memory,
            "--boot",
            protocol,
        ])
        .args(["--cmdline", cmdline]);
    run(c, LIMIT)
}

/// Usable RAM the guest should see: all of it but the 0x9fc00..1 MiB area.
fn usable(bytes: u64) -> u64 {
    bytes - (0x10_0000 - 0x9fc00)
}

fn assert_passed(r: &Run, cpus: u32, memory: u64, protocol: &str, cmdline: &str) {
    let lines = r.lines();
    assert!(!r.timed_out, "timed out; output:\n{}", r.stdout);
    assert_eq!(
        r.code(),
        Some(0),
        "stderr: {}\noutput:\n{}",
        r.stderr,
        r.stdout
    );
    assert_eq!(lines.first(), Some(&"TG: hello"), "{}", r.stdout);
    assert!(
        lines.contains(&format!("TG: boot protocol={protocol}").as_str()),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&format!("TG: cmdline={cmdline}").as_str()),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&format!("TG: ram={}", usable(memory)).as_str()),
        "{}",
        r.stdout
    );
    for l in [
        "TG: memory ok",
        "TG: pio ok",
        "TG: mmio ok",
        "TG: irq ok",
        "TG: PASS",
    ] {
        assert!(lines.contains(&l), "missing {l:?} in:\n{}", r.stdout);
    }
    for id in 1..cpus {
        assert!(
            lines.contains(&format!("TG: cpu {id} up").as_str()),
            "{}",
            r.stdout
        );
    }
    if cpus > 1 {
        assert!(
            lines.contains(&format!("TG: cpus={cpus}").as_str()),
            "{}",
            r.stdout
        );
    }
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);
}

#[test]
fn one_vcpu_64m_linux_protocol() {
    let r = boot(1, "64M", "linux", "console=ttyS0 one");
    assert_passed(&r, 1, 64 << 20, "linux", "console=ttyS0 one");
}

#[test]
fn two_vcpus_512m_pvh() {
    let r = boot(2, "512M", "pvh", "two cpus");
    assert_passed(&r, 2, 512 << 20, "pvh", "two cpus");
}

#[test]
fn four_vcpus_4g_spans_the_mmio_hole() {
    let r = boot(4, "4G", "auto", "big");
    assert_passed(&r, 4, 4 << 30, "pvh", "big");
    assert!(
        r.lines().contains(&"TG: e820 0x100000000 0x140000000 1"),
        "RAM above 4 GiB missing:\n{}",
        r.stdout
    );
}

#[test]
fn four_vcpus_linux_protocol() {
    let r = boot(4, "256M", "linux", "x");
    assert_passed(&r, 4, 256 << 20, "linux", "x");
}

#[test]
fn hidden_cpu_features_vanish_and_2m_paging_covers_6g() {
    let mut c = vmm();
    c.arg("--kernel").arg(test_guest()).args([
        "--memory",
        "6G",
        "--cpus",
        "2",
        "--cpu-features",
        "-cx16,-pdpe1gb",
    ]);
    let r = run(c, LIMIT);
    assert_passed(&r, 2, 6 << 30, "pvh", "console=ttyS0 reboot=k panic=1");
    assert!(
        r.lines()
            .contains(&"TG: cpuid apic=0 x2apic=0 cx16=0 pdpe1gb=0"),
        "{}",
        r.stdout
    );
}

#[test]
fn cpuid_features_are_passed_through_by_default() {
    let mut c = vmm();
    c.arg("--kernel").arg(test_guest());
    let r = run(c, LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    // Every x86-64 host KVM advertises CMPXCHG16B.
    assert!(
        r.stdout.contains("TG: cpuid apic=0 x2apic=0 cx16=1 "),
        "{}",
        r.stdout
    );
}
