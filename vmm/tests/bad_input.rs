//! Bad command-line input gets one clear line on stderr and a non-zero exit,
//! before any VM runs.

mod common;

use std::time::Duration;

use common::{run, test_guest, vmm, Run};

fn vmm_with(args: &[&str]) -> Run {
    let mut c = vmm();
    c.args(args);
    run(c, Duration::from_secs(30))
}

fn assert_rejected(r: &Run, needle: &str) {
    assert!(!r.timed_out);
    assert_ne!(r.code(), Some(0), "accepted; stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "expected {needle:?} in stderr: {}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "guest output: {}", r.stdout);
}

#[test]
fn missing_kernel_file_is_reported() {
    let r = vmm_with(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_rejected(&r, "Cannot open /nonexistent/vmlinuz: No such file");
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn text_file_as_kernel_is_reported() {
    let path = std::env::temp_dir().join(format!("vmm-text-kernel-{}", std::process::id()));
    std::fs::write(&path, "this is not a kernel\n".repeat(100)).unwrap();
    let r = vmm_with(&["--kernel", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_rejected(&r, "is not a bzImage or ELF kernel");
}

#[test]
fn zero_cpus_are_rejected() {
    let g = test_guest();
    let r = vmm_with(&["--kernel", g.to_str().unwrap(), "--cpus", "0"]);
    assert_rejected(&r, "vCPU count must be between 1 and 254, got 0");
}

#[test]
fn too_many_cpus_are_rejected() {
    let g = test_guest();
    let r = vmm_with(&["--kernel", g.to_str().unwrap(), "--cpus", "300"]);
    assert_rejected(&r, "vCPU count must be between 1 and 254");
}

#[test]
fn one_kilobyte_of_memory_is_rejected() {
    let g = test_guest();
    let r = vmm_with(&["--kernel", g.to_str().unwrap(), "--memory", "1K"]);
    assert_rejected(&r, "below the minimum of 16 MiB");
}

#[test]
fn unparsable_memory_size_is_rejected() {
    let g = test_guest();
    let r = vmm_with(&["--kernel", g.to_str().unwrap(), "--memory", "lots"]);
    assert_rejected(&r, "Invalid size 'lots'");
}

#[test]
fn bad_serial_spec_is_rejected() {
    let g = test_guest();
    let r = vmm_with(&["--kernel", g.to_str().unwrap(), "--serial", "tcp:1234"]);
    assert_rejected(&r, "Invalid serial 'tcp:1234'");
}

#[test]
fn pvh_forced_on_a_bzimage_like_kernel_without_note_is_rejected() {
    let path = std::env::temp_dir().join(format!("vmm-elf-nonote-{}", std::process::id()));
    // An ELF header alone: valid magic, no program headers.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&path, &elf).unwrap();
    let r = vmm_with(&["--kernel", path.to_str().unwrap(), "--boot", "pvh"]);
    std::fs::remove_file(&path).unwrap();
    assert_rejected(&r, "Cannot load kernel");
}
