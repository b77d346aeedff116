//! Host-side failures get one clear line and a non-zero exit: no KVM, no
//! permission on /dev/kvm. Also guest RAM on 2 MiB huge pages. These need
//! root (a private mount namespace, another uid, the huge page pool); as
//! another user they print why they were skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run, test_guest, vmm};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn vmm_path() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

#[test]
fn missing_dev_kvm_is_reported() {
    if !is_root() {
        eprintln!("skipped: needs root for a private mount namespace");
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {}",
        vmm_path(),
        test_guest().display()
    );
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c", &script]);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr.trim(),
        "vmm: /dev/kvm does not exist: KVM is not available on this host"
    );
}

#[test]
fn dev_kvm_without_permission_is_reported() {
    if !is_root() {
        eprintln!("skipped: needs root to run as another user");
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            vmm_path(),
            "--kernel",
        ])
        .arg(test_guest())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("Permission denied opening /dev/kvm"),
        "{stderr}"
    );
}

/// Reserves `pages` more 2 MiB huge pages; gives them back on drop.
struct HugePool(u64);

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePool {
    fn reserve(pages: u64) -> Option<Self> {
        let now: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        std::fs::write(NR_HUGEPAGES, (now + pages).to_string()).ok()?;
        Some(Self(now))
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.0.to_string());
    }
}

#[test]
fn guest_ram_on_huge_pages_boots() {
    let Some(_pool) = HugePool::reserve(40).filter(|_| is_root()) else {
        eprintln!("skipped: cannot reserve huge pages (needs root)");
        return;
    };
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--hugepages", "--memory", "64M", "--cpus", "2"]);
    let r = run(c, Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.lines().contains(&"TG: PASS"), "{}", r.stdout);
}

#[test]
fn huge_pages_without_a_pool_are_reported() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--hugepages", "--memory", "100G"]);
    let r = run(c, Duration::from_secs(60));
    assert_eq!(r.code(), Some(1));
    assert!(
        r.stderr
            .contains("Not enough free 2 MiB huge pages: need 51200"),
        "{}",
        r.stderr
    );
}
