//! Boots the Debian cloud kernel from `scripts/guest-image`, with a disk
//! served by blk-backend and a NIC served by net-backend (on a tap in a
//! private network namespace).
//!
//! On this project's machines KVM is a software nested hypervisor whose
//! instruction emulator stops a stock kernel in early boot, so the test
//! asserts on what the kernel prints before then: its banner, our exact
//! command line, the E820 map matching `--memory`, and the vCPUs found in
//! ACPI. Where the CPU has vmx or svm it also requires the full boot: /init
//! runs a script that reads the disk and checks its data, pings the host
//! over the NIC, and the guest powers off.

mod common;

use std::time::Duration;

use std::process::Command;

use common::{guest_image, has_hw_virt, run, vmm, workspace_bin, Daemon, Run, Scratch};

/// The backends a Linux guest gets: a disk with known data and, as root,
/// a NIC whose tap (10.77.0.1/24) lives in a namespace of its own.
struct Devices {
    args: Vec<String>,
    _scratch: Scratch,
    _daemons: Vec<Daemon>,
    netns: Option<String>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        self._daemons.clear();
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// 4 KiB of known data at offset 4096 of the disk.
fn disk_block() -> Vec<u8> {
    (0..4096u32).map(|i| (i * 7 + 3) as u8).collect()
}

fn devices(tag: &str) -> Devices {
    let scratch = Scratch::new(&format!("linux-{tag}"));
    let img = scratch.path("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &disk_block(), 4096).unwrap();
    let blk_sock = scratch.path("blk.sock");
    let mut c = Command::new(workspace_bin("blk-backend"));
    c.arg("--socket").arg(&blk_sock).arg("--image").arg(&img);
    let mut daemons = vec![Daemon::start(c, &blk_sock)];
    let mut args = vec![
        "--disk".to_string(),
        format!("socket={}", blk_sock.display()),
    ];
    let ns = format!("vmmlinux{tag}{}", std::process::id());
    let netns = std::path::Path::new("/dev/net/tun").exists()
        && Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .is_ok_and(|s| s.success());
    if netns {
        let net_sock = scratch.path("net.sock");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns])
            .arg(workspace_bin("net-backend"))
            .arg("--socket")
            .arg(&net_sock)
            .args(["--tap", "vmtap0", "--create-tap"]);
        daemons.push(Daemon::start(c, &net_sock));
        for cmd in [
            &["ip", "addr", "add", "10.77.0.1/24", "dev", "vmtap0"][..],
            &["ip", "link", "set", "vmtap0", "up"],
        ] {
            assert!(Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(cmd)
                .status()
                .unwrap()
                .success());
        }
        args.push("--net".into());
        args.push(format!(
            "socket={},mac=52:54:00:12:34:56",
            net_sock.display()
        ));
    }
    Devices {
        args,
        _scratch: scratch,
        _daemons: daemons,
        netns: netns.then_some(ns),
    }
}

/// What /init runs on a full boot: disk data and a ping over the NIC.
fn guest_script() -> String {
    let sum: String = {
        let out = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&disk_block())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let script = format!(
        "set -e\n\
         test \"$(dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)\" = {sum}\n\
         echo disk data ok\n\
         ip link set eth0 up\n\
         ip addr add 10.77.0.2/24 dev eth0\n\
         ping -c 3 -W 5 10.77.0.1\n\
         echo ping ok\n"
    );
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

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

fn boot_linux(memory: &str, cpus: u32, cmdline: &str, devices: &Devices) -> Run {
    let dir = guest_image();
    let mut c = vmm();
    c.args(&devices.args);
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
            r.stdout.contains("GUEST-RUN-END rc=0") && r.stdout.contains("disk data ok"),
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
fn debian_kernel_512m_two_cpus_with_disk_and_nic() {
    let devices = devices("512m");
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k runb64={}",
        guest_script()
    );
    let r = boot_linux("512M", 2, &cmdline, &devices);
    check_early_boot(&r, 512 << 20, 2, &cmdline);
    check_full_boot_or_skip(&r);
    if has_hw_virt() && devices.netns.is_some() {
        assert!(r.stdout.contains("ping ok"), "{}", r.stdout);
    }
}

#[test]
fn debian_kernel_4g_sees_ram_above_the_hole() {
    let devices = devices("4g");
    let cmdline =
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k run=/bin/true vmm.test=4g";
    let r = boot_linux("4G", 1, cmdline, &devices);
    check_early_boot(&r, 4 << 30, 1, cmdline);
    check_full_boot_or_skip(&r);
}
