//! `--event-monitor` on a real `vmm` running the test guest: the events,
//! their order and shape, `fd=`, a bad target, and a reader that never reads.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{test_guest, vmm, workspace_bin, Daemon, Scratch};
use vmm::api::client::{call, call_with};
use vmm::api::ApiRequest;

const LIMIT: Duration = Duration::from_secs(20);

/// A vmm holding the test guest with the API and `--event-monitor
/// <monitor>`, killed when dropped.
struct Vm {
    child: Child,
    socket: PathBuf,
}

impl Vm {
    fn start(dir: &Scratch, monitor: &str, mut cmd: Command) -> Self {
        let socket = dir.path("api.sock");
        cmd.arg("--kernel")
            .arg(test_guest())
            .args(["--cmdline", "tg.hold", "--api-socket"])
            .arg(&socket)
            .args(["--event-monitor", monitor]);
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = out.lines();
        assert!(
            lines.any(|l| l.unwrap().starts_with("TG: HOLD")),
            "vmm exited before the guest held"
        );
        // Keep draining the console so the guest never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, socket }
    }

    fn call(&self, request: ApiRequest) {
        call(&self.socket, request).unwrap();
    }

    /// Waits for the process to end on its own.
    fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses every line as JSON.
fn parse(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// `source/event` of each event.
fn names(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["source"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect()
}

fn nanos(e: &serde_json::Value) -> u128 {
    let t = &e["timestamp"];
    u128::from(t["secs"].as_u64().unwrap()) * 1_000_000_000
        + u128::from(t["nanos"].as_u64().unwrap())
}

/// The event names of a vmm whose guest boots, then has `then`, then the
/// vmm shuts down.
fn booted_then(then: &[&'static str]) -> Vec<&'static str> {
    let mut names = vec!["vmm/starting", "vm/booting", "vm/booted"];
    names.extend_from_slice(then);
    names.push("vmm/shutdown");
    names
}

/// Boot, pause, resume, shutdown.
fn life() -> Vec<&'static str> {
    booted_then(&[
        "vm/pausing",
        "vm/paused",
        "vm/resuming",
        "vm/resumed",
        "vm/shutdown",
    ])
}

fn pause_resume_shutdown(vm: &mut Vm) {
    vm.call(ApiRequest::VmPause);
    vm.call(ApiRequest::VmResume);
    vm.call(ApiRequest::VmShutdown);
    assert!(vm.exit().success());
}

#[test]
fn events_follow_boot_pause_resume_shutdown_in_order() {
    let dir = Scratch::new("events-order");
    let log = dir.path("events.json");
    let mut vm = Vm::start(&dir, &format!("path={}", log.display()), vmm());

    pause_resume_shutdown(&mut vm);
    let events = parse(&std::fs::read_to_string(&log).unwrap());

    assert_eq!(names(&events), life());
    assert!(events.iter().all(|e| e["properties"].is_null()));
    assert!(events.windows(2).all(|w| nanos(&w[0]) <= nanos(&w[1])));
}

#[test]
fn fd_target_writes_to_the_inherited_pipe() {
    let dir = Scratch::new("events-fd");
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let w = write.as_raw_fd();
    let mut cmd = vmm();
    // SAFETY: fcntl is async-signal-safe; in the child it clears
    // close-on-exec on the inherited write end only, so vmm gets it.
    unsafe {
        cmd.pre_exec(move || match libc::fcntl(w, libc::F_SETFD, 0) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    let mut vm = Vm::start(&dir, &format!("fd={w}"), cmd);
    drop(write);

    pause_resume_shutdown(&mut vm);
    let mut text = String::new();
    BufReader::new(read).read_to_string(&mut text).unwrap();

    assert_eq!(names(&parse(&text)), life());
}

fn fails_with_one_line(monitor: &str) -> String {
    let out = vmm()
        .arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.hold", "--event-monitor", monitor])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn unopenable_path_fails_with_one_line() {
    let stderr = fails_with_one_line("path=/nonexistent/dir/events");

    assert!(stderr.contains("/nonexistent/dir/events"), "{stderr}");
}

#[test]
fn closed_fd_fails_with_one_line() {
    let stderr = fails_with_one_line("fd=987");

    assert!(stderr.contains("fd 987"), "{stderr}");
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifo_nobody_reads_does_not_stall_the_api() {
    let dir = Scratch::new("events-stall");
    let fifo = dir.path("events.fifo");
    mkfifo(&fifo);
    // Open but never read: the pipe fills after 64 KiB.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut vm = Vm::start(&dir, &format!("path={}", fifo.display()), vmm());

    // Four events of about 70 bytes each per round: well over 64 KiB.
    for _ in 0..300 {
        vm.call(ApiRequest::VmPause);
        vm.call(ApiRequest::VmResume);
    }
    let t = Instant::now();
    vm.call(ApiRequest::VmmPing);
    let ping = t.elapsed();
    vm.call(ApiRequest::VmShutdown);
    let status = vm.exit();

    assert!(ping < Duration::from_secs(2), "ping took {ping:?}");
    assert!(status.success());
}

#[test]
fn api_boot_shutdown_delete_emit_their_events() {
    let dir = Scratch::new("events-api");
    let socket = dir.path("api.sock");
    let log = dir.path("events.json");
    let mut child = vmm()
        .arg("--api-socket")
        .arg(&socket)
        .arg("--event-monitor")
        .arg(format!("path={}", log.display()))
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || BufReader::new(out).lines().for_each(drop));
    let deadline = Instant::now() + LIMIT;
    while call(&socket, ApiRequest::VmmPing).is_err() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut vm = Vm { child, socket };
    let cfg = serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": "tg.hold"},
        "serial": {"mode": "Tty"},
    });

    call_with(&vm.socket, ApiRequest::VmCreate, cfg.to_string().as_bytes()).unwrap();
    vm.call(ApiRequest::VmBoot);
    vm.call(ApiRequest::VmShutdown);
    vm.call(ApiRequest::VmDelete);
    vm.call(ApiRequest::VmmShutdown);
    assert!(vm.exit().success());
    let events = parse(&std::fs::read_to_string(&log).unwrap());

    assert_eq!(names(&events), booted_then(&["vm/shutdown", "vm/deleted"]));
}

#[test]
fn vm_reboot_emits_rebooting_then_a_new_boot_then_rebooted() {
    let dir = Scratch::new("events-reboot");
    let log = dir.path("events.json");
    let mut vm = Vm::start(&dir, &format!("path={}", log.display()), vmm());

    vm.call(ApiRequest::VmReboot);
    let deadline = Instant::now() + LIMIT;
    while events_of(&log, "vm").last().map(|e| e["event"].clone()) != Some("rebooted".into()) {
        assert!(Instant::now() < deadline, "no vm/rebooted event");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.call(ApiRequest::VmShutdown);
    let status = vm.exit();
    let events = parse(&std::fs::read_to_string(&log).unwrap());

    assert!(status.success());
    assert_eq!(
        names(&events),
        booted_then(&[
            "vm/rebooting",
            "vm/booting",
            "vm/booted",
            "vm/rebooted",
            "vm/shutdown"
        ])
    );
}

#[test]
fn sigterm_ends_the_vm_with_its_events() {
    let dir = Scratch::new("events-sigterm");
    let log = dir.path("events.json");
    let mut vm = Vm::start(&dir, &format!("path={}", log.display()), vmm());
    let pid = libc::pid_t::try_from(vm.child.id()).unwrap();

    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = vm.exit();
    let events = parse(&std::fs::read_to_string(&log).unwrap());

    assert!(status.success());
    assert_eq!(names(&events), booted_then(&["vm/shutdown"]));
}

/// Events of `source` in the log so far.
fn events_of(log: &Path, source: &str) -> Vec<serde_json::Value> {
    parse(&std::fs::read_to_string(log).unwrap())
        .into_iter()
        .filter(|e| e["source"] == source)
        .collect()
}

#[test]
fn backend_restart_emits_vhost_user_disconnected_and_reconnected() {
    let dir = Scratch::new("events-vhost");
    let (img, sock, log) = (
        dir.path("disk.img"),
        dir.path("blk.sock"),
        dir.path("events.json"),
    );
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let blk = |img: &Path, sock: &Path| {
        let mut c = Command::new(workspace_bin("blk-backend"));
        c.arg("--socket").arg(sock).arg("--image").arg(img);
        Daemon::start(c, sock)
    };
    let mut backend = blk(&img, &sock);
    let mut cmd = vmm();
    cmd.arg("--disk").arg(format!("socket={}", sock.display()));
    let mut vm = Vm::start(&dir, &format!("path={}", log.display()), cmd);

    backend.kill();
    let _backend = blk(&img, &sock);
    let deadline = Instant::now() + LIMIT;
    while events_of(&log, "vhost-user").len() < 2 {
        assert!(Instant::now() < deadline, "no reconnect event");
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.call(ApiRequest::VmShutdown);
    assert!(vm.exit().success());
    let events = events_of(&log, "vhost-user");

    assert_eq!(
        names(&events),
        ["vhost-user/disconnected", "vhost-user/reconnected"]
    );
    let socket = sock.display().to_string();
    assert!(events
        .iter()
        .all(|e| e["properties"]["socket"] == socket.as_str()));
}
