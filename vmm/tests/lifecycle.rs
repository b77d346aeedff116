//! The VM's life cycle as a user sees it: stopping it with a signal (and
//! SIGPWR, which does not stop it), guest failures turned into an exit
//! status, the serial sinks and stdin input.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{read_until, run, test_guest, vmm, wait};

const LIMIT: Duration = Duration::from_secs(60);

/// Starts the test guest with `tg.hold` and waits until it is idle.
fn held_vm(cpus: u32) -> (Child, Vec<String>) {
    held_vm_from(vmm(), cpus)
}

fn held_vm_from(mut c: Command, cpus: u32) -> (Child, Vec<String>) {
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cpus", &cpus.to_string(), "--cmdline", "tg.hold"]);
    let mut child = c.spawn().unwrap();
    let (mut out, lines) = read_until(&mut child, "TG: HOLD");
    // Keep draining stdout so the VMM never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, lines)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn sigterm_stops_a_running_vm_with_status_zero() {
    let (child, lines) = held_vm(2);
    assert!(lines.contains(&"TG: PASS".to_string()), "{lines:?}");
    signal(&child, libc::SIGTERM);
    let r = wait(child, Duration::from_secs(10));
    assert!(!r.timed_out, "VM did not stop on SIGTERM");
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
}

#[test]
fn sigint_stops_a_running_vm_with_status_zero() {
    let (child, _) = held_vm(1);
    signal(&child, libc::SIGINT);
    let r = wait(child, Duration::from_secs(10));
    assert!(!r.timed_out, "VM did not stop on SIGINT");
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
}

#[test]
fn sigpwr_presses_the_power_button_and_leaves_the_vm_running() {
    let mut c = vmm();
    c.env("VMM_LOG", "info");
    let (mut child, _) = held_vm_from(c, 1);

    signal(&child, libc::SIGPWR);
    std::thread::sleep(Duration::from_millis(500));
    let running = child.try_wait().unwrap().is_none();

    signal(&child, libc::SIGTERM);
    let r = wait(child, Duration::from_secs(10));
    assert!(running, "VM stopped on SIGPWR: {}", r.stderr);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("power button pressed"), "{}", r.stderr);
}

#[test]
fn each_vcpu_runs_in_its_own_named_thread() {
    let (child, _) = held_vm(4);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let mut names: Vec<String> = tasks
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("vcpu"))
        .collect();
    names.sort();
    signal(&child, libc::SIGTERM);
    let r = wait(child, Duration::from_secs(10));
    assert_eq!(names, ["vcpu0", "vcpu1", "vcpu2", "vcpu3"]);
    assert_eq!(r.code(), Some(0));
}

#[test]
fn guest_triple_fault_exits_nonzero_with_reason() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.triplefault"]);
    let r = run(c, LIMIT);
    assert!(r.stdout.contains("TG: triple fault"), "{}", r.stdout);
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.stderr.trim(), "vmm: guest triple fault on vCPU 0");
}

#[test]
fn serial_to_file_writes_the_console_there() {
    let path = std::env::temp_dir().join(format!("vmm-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .arg("--serial")
        .arg(format!("file:{}", path.display()));
    let r = run(c, LIMIT);
    let log = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert!(
        log.starts_with("TG: hello\n") && log.contains("TG: PASS"),
        "{log}"
    );
}

#[test]
fn serial_off_discards_output_and_still_boots() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--serial", "off"]);
    let r = run(c, LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
fn stdin_reaches_the_guest_serial_port() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.echo"])
        .stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed into the console\n").unwrap();
    let r = wait(child, LIMIT);
    drop(stdin);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(
        r.lines().contains(&"TG: got typed into the console"),
        "{}",
        r.stdout
    );
}

#[test]
fn guest_reset_without_the_api_ends_the_vmm_with_status_zero() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.reset"]);

    let r = run(c, LIMIT);

    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.lines().contains(&"TG: reset"), "{}", r.stdout);
    assert_eq!(
        r.lines().iter().filter(|l| **l == "TG: hello").count(),
        1,
        "{}",
        r.stdout
    );
}
