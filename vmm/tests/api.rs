//! The control API on a real `vmm` running the test guest: through `vmctl`
//! and through raw HTTP written on the socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use common::{test_guest, vmm, wait, Scratch};

const LIMIT: Duration = Duration::from_secs(20);

/// A vmm serving the API, killed when dropped.
struct Vm {
    child: Option<Child>,
    socket: PathBuf,
    /// Console lines after the ready line.
    console: Receiver<String>,
    _dir: Scratch,
}

impl Vm {
    /// Boots the test guest with `cmdline` and waits for `ready` on the
    /// console and for the socket.
    fn start(tag: &str, cmdline: &str, ready: &str, stdin: Stdio) -> Self {
        let dir = Scratch::new(tag);
        let socket = dir.path("api.sock");
        let mut c = vmm();
        c.arg("--kernel")
            .arg(test_guest())
            .args(["--cmdline", cmdline, "--api-socket"])
            .arg(&socket)
            .stdin(stdin);
        let mut child = c.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            assert_ne!(out.read_line(&mut l).unwrap(), 0, "vmm exited: {lines:?}");
            lines.push(l.trim_end().to_string());
            if l.starts_with(ready) {
                break;
            }
        }
        let (tx, console) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                let _ = tx.send(l.trim_end().to_string());
            }
        });
        assert!(socket.exists(), "no API socket");
        Self {
            child: Some(child),
            socket,
            console,
            _dir: dir,
        }
    }

    fn held(tag: &str) -> Self {
        Self::start(tag, "tg.hold", "TG: HOLD", Stdio::null())
    }

    fn vmctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn take(&mut self) -> Child {
        self.child.take().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `request` as is and returns everything the server sends back.
fn raw(socket: &Path, request: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn http(socket: &Path, method: &str, path: &str) -> String {
    raw(
        socket,
        &format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

fn status(response: &str) -> &str {
    response.split(' ').nth(1).unwrap_or("")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn state(vm: &Vm) -> String {
    json(&vm.vmctl(&["--json", "info"]))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn ping_answers_version_and_pid_through_vmctl_and_raw_http() {
    let vm = Vm::held("api-ping");

    let ping = json(&vm.vmctl(&["--json", "ping"]));
    let human = vm.vmctl(&["ping"]);
    let r = http(&vm.socket, "GET", "/api/v1/vmm.ping");

    assert_eq!(ping["pid"], vm.child.as_ref().unwrap().id());
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ping["features"], serde_json::json!([]));
    assert!(stdout(&human).starts_with("vmm "), "{}", stdout(&human));
    assert_eq!(status(&r), "200", "{r}");
    assert!(r.contains("application/json"), "{r}");
    assert!(r.contains("\"build_version\""), "{r}");
}

#[test]
fn info_reports_the_config_and_running_state() {
    let vm = Vm::held("api-info");

    let info = json(&vm.vmctl(&["--json", "info"]));
    let human = stdout(&vm.vmctl(&["info"]));
    let r = http(&vm.socket, "GET", "/api/v1/vm.info");

    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);
    assert_eq!(info["config"]["cpus"]["max_vcpus"], 1);
    assert_eq!(info["config"]["memory"]["size"], 512u64 << 20);
    assert_eq!(info["memory_actual_size"], 512u64 << 20);
    assert_eq!(info["config"]["payload"]["cmdline"], "tg.hold");
    assert_eq!(
        info["config"]["payload"]["kernel"],
        test_guest().display().to_string()
    );
    assert!(human.contains("state:   Running"), "{human}");
    assert_eq!(status(&r), "200", "{r}");
}

#[test]
fn pause_and_resume_change_the_state_and_repeats_are_405() {
    let vm = Vm::held("api-pause");

    let pause = vm.vmctl(&["pause"]);
    let paused = state(&vm);
    let again = vm.vmctl(&["pause"]);
    let still_paused = state(&vm);
    let resume = vm.vmctl(&["resume"]);
    let running = state(&vm);
    let resume_again = http(&vm.socket, "PUT", "/api/v1/vm.resume");

    assert!(pause.status.success());
    assert_eq!(paused, "Paused");
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already paused") && err.contains("405"),
        "{err}"
    );
    assert_eq!(still_paused, "Paused");
    assert!(resume.status.success());
    assert_eq!(running, "Running");
    assert_eq!(status(&resume_again), "405", "{resume_again}");
    assert!(resume_again.contains("not paused"), "{resume_again}");
}

/// `tg.echo` polls the serial port for a line: while paused it must not
/// see the input waiting there; once resumed it echoes it and powers off.
#[test]
fn a_paused_guest_does_not_run_until_resumed() {
    let mut vm = Vm::start(
        "api-frozen",
        "tg.echo",
        "TG: ready for input",
        Stdio::piped(),
    );
    let mut stdin = vm.child.as_mut().unwrap().stdin.take().unwrap();

    assert!(vm.vmctl(&["pause"]).status.success());
    stdin.write_all(b"sent while paused\n").unwrap();
    let while_paused = vm.console.recv_timeout(Duration::from_secs(1));
    assert!(vm.vmctl(&["resume"]).status.success());
    let after = vm.console.recv_timeout(LIMIT);
    let r = wait(vm.take(), LIMIT);
    drop(stdin);

    assert!(while_paused.is_err(), "guest ran: {while_paused:?}");
    assert_eq!(after.as_deref(), Ok("TG: got sent while paused"));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
}

#[test]
fn power_button_answers_204_and_the_vm_keeps_running() {
    let mut vm = Vm::held("api-button");

    let r = http(&vm.socket, "PUT", "/api/v1/vm.power-button");
    let human = vm.vmctl(&["power-button"]);
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(status(&r), "204", "{r}");
    assert!(human.status.success());
    assert!(vm.running());
}

#[test]
fn vm_shutdown_ends_vmm_with_status_zero_and_removes_the_socket() {
    let mut vm = Vm::held("api-shutdown");

    let out = vm.vmctl(&["shutdown"]);
    let r = wait(vm.take(), LIMIT);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(!vm.socket.exists());
}

#[test]
fn vmm_shutdown_answers_204_and_ends_vmm_with_status_zero() {
    let mut vm = Vm::held("api-vmm-shutdown");

    let resp = http(&vm.socket, "PUT", "/api/v1/vmm.shutdown");
    let r = wait(vm.take(), LIMIT);

    assert_eq!(status(&resp), "204", "{resp}");
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(!vm.socket.exists());
}

#[test]
fn unknown_path_is_404_wrong_method_405_and_garbage_400() {
    let vm = Vm::held("api-errors");

    let unknown = http(&vm.socket, "GET", "/api/v1/vm.nonsense");
    let outside = http(&vm.socket, "GET", "/elsewhere");
    let method = http(&vm.socket, "GET", "/api/v1/vm.pause");
    let garbage = raw(&vm.socket, "\x01\x02 not http at all\r\n\r\n");

    assert_eq!(status(&unknown), "404", "{unknown}");
    assert_eq!(status(&outside), "404", "{outside}");
    assert_eq!(status(&method), "405", "{method}");
    assert_eq!(status(&garbage), "400", "{garbage}");
    assert_eq!(state(&vm), "Running");
}

#[test]
fn a_silent_client_does_not_block_another() {
    let vm = Vm::held("api-silent");
    let _silent = UnixStream::connect(&vm.socket).unwrap();

    let r = http(&vm.socket, "GET", "/api/v1/vmm.ping");

    assert_eq!(status(&r), "200", "{r}");
}

#[test]
fn the_socket_is_mode_0600() {
    let vm = Vm::held("api-mode");

    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode();

    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_live_socket_makes_a_second_vmm_fail_with_one_line() {
    let vm = Vm::held("api-live");
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.hold", "--api-socket"])
        .arg(&vm.socket);

    let r = common::run(c, LIMIT);

    assert_eq!(r.code(), Some(1));
    assert_eq!(
        r.stderr.trim(),
        format!(
            "vmm: API socket {} is in use by another process",
            vm.socket.display()
        )
    );
    assert_eq!(state(&vm), "Running");
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = Scratch::new("api-stale");
    let socket = dir.path("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--api-socket"])
        .arg(&socket);

    let r = common::run(c, LIMIT);

    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(!socket.exists());
}
