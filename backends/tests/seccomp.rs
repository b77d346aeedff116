//! A system call outside a thread's list ends the process with one line on
//! stderr. The confined code runs in a child: this test binary re-run on an
//! ignored test that confines its thread and makes the call.

use std::process::Command;

use backends::seccomp::{self, SeccompMode, ThreadKind, SIGSYS_EXIT_CODE};

/// Runs the ignored test `name` of this binary in a child process.
fn run_child(name: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--ignored", "--nocapture"])
        .output()
        .unwrap()
}

#[test]
fn forbidden_call_ends_the_process_with_one_line_and_status_159() {
    let out = run_child("child_worker_opens_a_socket");

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), stderr.as_ref()),
        (
            Some(SIGSYS_EXIT_CODE),
            format!("seccomp: forbidden system call {}\n", libc::SYS_socket).as_str()
        )
    );
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let out = run_child("child_worker_opens_a_socket_in_log_mode");

    assert!(out.status.success(), "{out:?}");
}

#[test]
fn worker_filter_allows_eventfd_writes() {
    let out = run_child("child_worker_signals_an_eventfd");

    assert!(out.status.success(), "{out:?}");
}

fn confined_socket(mode: SeccompMode) -> i32 {
    seccomp::enable(mode).unwrap();
    seccomp::apply(ThreadKind::Worker).unwrap();
    // SAFETY: plain system call with integer arguments.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }
}

#[test]
#[ignore = "confines its thread; run by forbidden_call_ends_the_process_with_one_line_and_status_159"]
fn child_worker_opens_a_socket() {
    confined_socket(SeccompMode::Enforce);
}

#[test]
#[ignore = "confines its thread; run by log_mode_lets_a_forbidden_call_through"]
fn child_worker_opens_a_socket_in_log_mode() {
    assert!(confined_socket(SeccompMode::Log) >= 0);
}

#[test]
#[ignore = "confines its thread; run by worker_filter_allows_eventfd_writes"]
fn child_worker_signals_an_eventfd() {
    let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    seccomp::enable(SeccompMode::Enforce).unwrap();
    seccomp::apply(ThreadKind::Worker).unwrap();

    fd.write(1).unwrap();

    assert_eq!(fd.read().unwrap(), 1);
}
