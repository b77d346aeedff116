//! The control API on a real `vmm` running the test guest: through `vmctl`
//! and through raw HTTP written on the socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use common::{read_until, test_guest, vmm, wait, Scratch};

const LIMIT: Duration = Duration::from_secs(20);

/// A vmm serving the API, killed when dropped: booted with `--kernel`
/// ([`Vm::start`], [`Vm::held`]) or, with only `--api-socket`, holding no
/// VM until vm.create ([`Vm::empty`]).
struct Vm {
    child: Option<Child>,
    socket: PathBuf,
    /// Console lines: those after the ready line for [`Vm::start`], every
    /// line the guest prints for [`Vm::empty`].
    console: Receiver<String>,
    dir: Scratch,
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
        let (out, _) = read_until(&mut child, ready);
        let console = forward(out);
        assert!(socket.exists(), "no API socket");
        Self {
            child: Some(child),
            socket,
            console,
            dir,
        }
    }

    fn held(tag: &str) -> Self {
        Self::start(tag, "tg.hold", "TG: HOLD", Stdio::null())
    }

    /// Starts a vmm with only `--api-socket` (stderr to `<dir>/stderr`)
    /// and waits until it answers.
    fn empty(tag: &str) -> Self {
        let dir = Scratch::new(tag);
        let socket = dir.path("api.sock");
        let err = std::fs::File::create(dir.path("stderr")).unwrap();
        let mut c = vmm();
        c.arg("--api-socket").arg(&socket).stderr(err);
        let mut child = c.spawn().unwrap();
        let console = forward(BufReader::new(child.stdout.take().unwrap()));
        // The socket file appears at bind(), just before listen(): ping.
        let deadline = std::time::Instant::now() + LIMIT;
        while vmm::api::client::raw(&socket, "GET", "vmm.ping").is_err() {
            assert!(child.try_wait().unwrap().is_none(), "vmm exited");
            assert!(std::time::Instant::now() < deadline, "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            socket,
            console,
            dir,
        }
    }

    /// `PUT endpoint` with `body`: (status, body).
    fn put(&self, endpoint: &str, body: &str) -> (u16, String) {
        let r = vmm::api::client::raw_with_body(&self.socket, "PUT", endpoint, body.as_bytes())
            .unwrap();
        (r.status, r.body)
    }

    fn get(&self, endpoint: &str) -> (u16, String) {
        let r = vmm::api::client::raw(&self.socket, "GET", endpoint).unwrap();
        (r.status, r.body)
    }

    /// The VM's state, or the status when vm.info is not 200.
    fn state(&self) -> String {
        match self.get("vm.info") {
            (200, b) => serde_json::from_str::<serde_json::Value>(&b).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string(),
            (s, _) => s.to_string(),
        }
    }

    /// Waits for the state to become `want`.
    fn wait_state(&self, want: &str) {
        let deadline = std::time::Instant::now() + LIMIT;
        while self.state() != want {
            assert!(std::time::Instant::now() < deadline, "never {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Console lines up to and including the first starting with `until`.
    fn console_until(&self, until: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.console.recv_timeout(LIMIT) {
                Ok(l) => {
                    let done = l.starts_with(until);
                    lines.push(l);
                    if done {
                        return lines;
                    }
                }
                Err(_) => panic!("no {until:?} on the console: {lines:?}"),
            }
        }
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

/// Sends each line of `out` (line end trimmed) down the returned channel,
/// from a thread, until the pipe ends.
fn forward(out: BufReader<ChildStdout>) -> Receiver<String> {
    let (tx, console) = mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l.trim_end().to_string());
        }
    });
    console
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

/// The VM's state as `vmctl --json info` reports it (which must succeed).
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

// --- Creating and booting VMs through the API (no --kernel) -------------

/// A VmConfig for the test guest with `cmdline` and the console on stdout.
fn guest_config(cmdline: &str, cpus: u8, memory: u64) -> serde_json::Value {
    serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": cmdline},
        "cpus": {"boot_vcpus": cpus, "max_vcpus": cpus},
        "memory": {"size": memory, "shared": true},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    })
}

#[test]
fn create_and_boot_run_what_the_config_says() {
    let mut vmm = Vm::empty("api-create");
    let cfg = guest_config("tg.hold", 2, 128 << 20).to_string();

    let before = vmm.get("vm.info");
    let create = vmm.put("vm.create", &cfg);
    let created = vmm.get("vm.info");
    let boot = vmm.put("vm.boot", "");
    let console = vmm.console_until("TG: HOLD");
    let info = vmm.get("vm.info");

    assert_eq!(before.0, 404, "{before:?}");
    assert_eq!(create, (204, String::new()));
    assert_eq!(created.0, 200);
    let created: serde_json::Value = serde_json::from_str(&created.1).unwrap();
    assert_eq!(created["state"], "Created");
    assert_eq!(created["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(boot.0, 204, "{boot:?}");
    assert!(console.contains(&"TG: cpus=2".to_string()), "{console:?}");
    assert!(
        console.contains(&"TG: cmdline=tg.hold".to_string()),
        "{console:?}"
    );
    let ram: u64 = console
        .iter()
        .find_map(|l| l.strip_prefix("TG: ram="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(ram > (120 << 20) && ram <= (128 << 20), "{ram}");
    let info: serde_json::Value = serde_json::from_str(&info.1).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    assert!(vmm.running());
}

#[test]
fn invalid_transitions_are_4xx_and_the_vm_keeps_running() {
    let mut vmm = Vm::empty("api-transitions");
    let cfg = guest_config("tg.hold", 1, 64 << 20).to_string();
    let disk = r#"{"vhost_user": true, "vhost_socket": "/nonexistent.sock"}"#;

    let boot_first = vmm.put("vm.boot", "");
    let add_first = vmm.put("vm.add-disk", disk);
    let pause_first = vmm.put("vm.pause", "");
    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    let create_again = vmm.put("vm.create", &cfg);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: HOLD");
    let boot_again = vmm.put("vm.boot", "");
    let create_running = vmm.put("vm.create", &cfg);
    let add_running = vmm.put("vm.add-disk", disk);
    let net_running = vmm.put(
        "vm.add-net",
        r#"{"vhost_user": true, "vhost_socket": "/x"}"#,
    );

    assert_eq!(boot_first.0, 404, "{boot_first:?}");
    assert_eq!(add_first.0, 404, "{add_first:?}");
    assert_eq!(pause_first.0, 404, "{pause_first:?}");
    assert_eq!(create_again.0, 405, "{create_again:?}");
    assert!(
        create_again.1.contains("already created"),
        "{create_again:?}"
    );
    assert_eq!(boot_again.0, 405, "{boot_again:?}");
    assert!(boot_again.1.contains("already running"), "{boot_again:?}");
    assert_eq!(create_running.0, 405, "{create_running:?}");
    assert_eq!(add_running.0, 405, "{add_running:?}");
    assert!(
        add_running.1.contains("Hot-plug is not supported"),
        "{add_running:?}"
    );
    assert_eq!(net_running.0, 405, "{net_running:?}");
    assert_eq!(vmm.state(), "Running");
    assert!(vmm.running());
    let pause = vmm.put("vm.pause", "");
    assert_eq!(pause.0, 204, "{pause:?}");
    assert_eq!(vmm.state(), "Paused");
}

#[test]
fn unsupported_and_unknown_fields_are_400_naming_them() {
    let vmm = Vm::empty("api-fields");
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = guest_config("tg.hold", 1, 64 << 20);
        f(&mut c);
        vmm.put("vm.create", &c.to_string())
    };

    let hotplug = with(&|c| c["cpus"]["max_vcpus"] = 4.into());
    let private = with(&|c| c["memory"]["shared"] = false.into());
    let iommu = with(&|c| c["iommu"] = true.into());
    let image = with(&|c| c["disks"] = serde_json::json!([{"path": "/disk.img"}]));
    let unknown = with(&|c| c["frobnicate"] = 1.into());
    let unknown_inner = with(&|c| c["cpus"]["turbo"] = true.into());
    let not_json = vmm.put("vm.create", "{ not json");
    let defaults = with(&|c| {
        c["memory"]["mergeable"] = false.into();
        c["memory"]["hotplug_method"] = "Acpi".into();
        c["rng"] = serde_json::json!({"src": "/dev/urandom", "iommu": false});
        c["watchdog"] = false.into();
        c["pci_segments"] = serde_json::Value::Null;
    });

    for (r, field) in [
        (&hotplug, "cpus.max_vcpus"),
        (&private, "memory.shared"),
        (&iommu, "iommu"),
        (&image, "disks[0].path"),
        (&unknown, "frobnicate"),
        (&unknown_inner, "turbo"),
        (&not_json, "JSON"),
    ] {
        assert_eq!(r.0, 400, "{field}: {r:?}");
        assert!(r.1.contains(field), "{field}: {r:?}");
    }
    assert_eq!(defaults.0, 204, "{defaults:?}");
    assert_eq!(vmm.state(), "Created");
}

#[test]
fn a_10_mib_body_is_refused_and_the_vmm_stays_small() {
    let mut vmm = Vm::empty("api-big");
    let rss = || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", vmm.child.as_ref().unwrap().id()))
                .unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    let big = vec![b' '; 10 << 20];

    // Announced length: refused before the body is read.
    let mut s = UnixStream::connect(&vmm.socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    let _ = s.write_all(&big);
    let mut announced = String::new();
    let _ = s.read_to_string(&mut announced);
    // Chunked, no length: cut off at the limit.
    let mut s = UnixStream::connect(&vmm.socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for c in big.chunks(1 << 20) {
        if write!(s, "{:x}\r\n", c.len()).is_err() || s.write_all(c).is_err() {
            break;
        }
        let _ = s.write_all(b"\r\n");
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut chunked = String::new();
    let _ = s.read_to_string(&mut chunked);
    let after = rss();

    assert_eq!(status(&announced), "413", "{announced}");
    assert_eq!(status(&chunked), "413", "{chunked}");
    assert!(
        after < before + 4096,
        "RSS grew from {before} kB to {after} kB"
    );
    assert!(vmm.running());
    assert_eq!(vmm.state(), "404");
}

#[test]
fn after_the_guest_powers_off_the_vmm_serves_on_and_boots_again() {
    let mut vmm = Vm::empty("api-again");
    let cfg = guest_config("", 1, 64 << 20).to_string();

    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: PASS");
    vmm.wait_state("Shutdown");
    let alive = vmm.running();
    let create_over = vmm.put("vm.create", &cfg);
    let delete = vmm.put("vm.delete", "");
    let deleted = vmm.state();
    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    let boot = vmm.put("vm.boot", "");
    let second = vmm.console_until("TG: PASS");
    vmm.wait_state("Shutdown");
    let quit = vmm.put("vmm.shutdown", "");
    let r = wait(vmm.take(), LIMIT);

    assert!(alive);
    assert_eq!(create_over.0, 405, "{create_over:?}");
    assert_eq!(delete.0, 204, "{delete:?}");
    assert_eq!(deleted, "404");
    assert_eq!(boot.0, 204, "{boot:?}");
    assert!(second.contains(&"TG: hello".to_string()), "{second:?}");
    assert_eq!(quit.0, 204);
    assert_eq!(r.code(), Some(0));
    assert!(!vmm.socket.exists());
}

#[test]
fn vm_shutdown_without_kernel_leaves_the_vm_in_shutdown() {
    let mut vmm = Vm::empty("api-vm-shutdown");
    let cfg = guest_config("tg.hold", 1, 64 << 20).to_string();
    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: HOLD");

    let shutdown = vmm.put("vm.shutdown", "");
    vmm.wait_state("Shutdown");
    let again = vmm.put("vm.shutdown", "");

    assert_eq!(shutdown.0, 204);
    assert_eq!(again.0, 405, "{again:?}");
    assert!(vmm.running());
}

/// A blk-backend on a 64 MiB image in `vmm`'s dir, with `metrics` (if
/// any) as its `--metrics-socket`; returns it and its vhost-user socket.
fn blk_backend(vmm: &Vm, metrics: Option<&Path>) -> (common::Daemon, PathBuf) {
    let image = vmm.dir.path("disk.img");
    let socket = vmm.dir.path("blk.sock");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut backend = Command::new(common::workspace_bin("blk-backend"));
    backend
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image);
    if let Some(metrics) = metrics {
        backend.arg("--metrics-socket").arg(metrics);
    }
    let daemon = common::Daemon::start(backend, &socket);
    if let Some(metrics) = metrics {
        let deadline = std::time::Instant::now() + LIMIT;
        while !metrics.exists() {
            assert!(std::time::Instant::now() < deadline, "no metrics socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (daemon, socket)
}

#[test]
fn a_disk_added_through_the_api_is_driven_by_the_guest() {
    let vmm = Vm::empty("api-disk");
    let (_backend, socket) = blk_backend(&vmm, None);
    let cfg = guest_config("tg.virtio tg.seed=7", 2, 128 << 20).to_string();

    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    let add = vmm.vmctl(&[
        "--json",
        "add-disk",
        &format!("vhost_socket={},num_queues=1,id=data", socket.display()),
    ]);
    let boot = vmm.put("vm.boot", "");
    let console = vmm.console_until("TG: PASS");
    let info: serde_json::Value = serde_json::from_str(&vmm.get("vm.info").1).unwrap();

    let added = json(&add);
    assert_eq!(info["config"]["disks"][0]["id"], "data", "{info}");
    assert_eq!(
        info["config"]["disks"][0]["vhost_socket"],
        socket.to_str().unwrap()
    );
    assert_eq!(info["config"]["disks"][0]["num_queues"], 1, "{info}");
    assert_eq!(info["device_tree"]["data"]["pci_bdf"], "0000:00:01.0");
    assert_eq!(info["config"]["serial"]["mode"], "Tty", "{info}");
    assert_eq!(added["id"], "data");
    assert_eq!(added["bdf"], "0000:00:01.0");
    assert_eq!(boot.0, 204, "{boot:?}");
    for l in ["TG: blk write ok", "TG: blk read ok", "TG: PASS"] {
        assert!(console.contains(&l.to_string()), "missing {l}: {console:?}");
    }
    assert!(!console.iter().any(|l| l.contains("FAIL")), "{console:?}");
}

#[test]
fn vmctl_creates_boots_and_deletes() {
    let vmm = Vm::empty("api-vmctl");
    let file = vmm.dir.path("vm.json");
    std::fs::write(&file, guest_config("tg.hold", 1, 64 << 20).to_string()).unwrap();

    let create = vmm.vmctl(&["create", file.to_str().unwrap()]);
    let boot = vmm.vmctl(&["boot"]);
    vmm.console_until("TG: HOLD");
    let info = stdout(&vmm.vmctl(&["info"]));
    let delete = vmm.vmctl(&["delete"]);
    let gone = vmm.vmctl(&["info"]);
    let bad = vmm.vmctl(&["add-disk", "socket=/x"]);

    assert!(create.status.success(), "{create:?}");
    assert_eq!(stdout(&create).trim(), "VM created");
    assert!(boot.status.success(), "{boot:?}");
    assert!(info.contains("state:   Running"), "{info}");
    assert!(delete.status.success(), "{delete:?}");
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("404"),
        "{gone:?}"
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("Unknown key 'socket'"),
        "{bad:?}"
    );
}

// --- vm.counters ---------------------------------------------------------

fn counters(vmm: &Vm) -> (u16, serde_json::Value) {
    let (status, body) = vmm.get("vm.counters");
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[test]
fn vm_counters_move_with_the_guests_disk_io_and_count_vcpu_exits() {
    let vmm = Vm::empty("api-counters");
    let metrics = vmm.dir.path("blk.metrics");
    let (_backend, socket) = blk_backend(&vmm, Some(&metrics));
    let mut cfg = guest_config("tg.virtio tg.seed=7 tg.hold", 1, 128 << 20);
    cfg["disks"] = serde_json::json!([{
        "vhost_user": true,
        "vhost_socket": socket,
        "id": "data",
        "metrics_socket": metrics,
    }]);
    assert_eq!(vmm.put("vm.create", &cfg.to_string()).0, 204);
    let (_, before) = counters(&vmm);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: HOLD");

    let (status, after) = counters(&vmm);
    let table = stdout(&vmm.vmctl(&["counters"]));

    assert_eq!(status, 200, "{after}");
    assert!(before.get("vm").is_none(), "{before}");
    assert!(after["data"]["requests"].as_u64().unwrap() > 0, "{after}");
    assert!(
        after["data"]["write_bytes"].as_u64().unwrap() > 0,
        "{after}"
    );
    assert!(after["data"]["read_bytes"].as_u64().unwrap() > 0, "{after}");
    // Kicks go through ioeventfds: none needs the VMM.
    assert_eq!(after["data"]["notify_exits"], 0, "{after}");
    assert!(
        after["data"].get("backend_unreachable").is_none(),
        "{after}"
    );
    assert!(after["vm"]["pio_exits"].as_u64().unwrap() > 0, "{after}");
    assert!(after["vm"]["mmio_exits"].as_u64().unwrap() > 0, "{after}");
    // One vCPU: its entry is the VM's sum.
    assert_eq!(after["vcpu0"]["pio_exits"], after["vm"]["pio_exits"]);
    assert!(
        after["vcpu0"]["cpu_time_us"].as_u64().unwrap() > 0,
        "{after}"
    );
    assert!(after.get("vcpu1").is_none(), "{after}");
    let allocated = after["vm"]["memory_allocated_bytes"].as_u64().unwrap();
    assert!(allocated > 0 && allocated <= 128 << 20, "{after}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("data ") && l.contains("write_bytes")),
        "{table}"
    );
}

#[test]
fn a_device_whose_backend_metrics_socket_is_gone_still_gets_a_200_answer() {
    let vmm = Vm::empty("api-counters-gone");
    let metrics = vmm.dir.path("blk.metrics");
    let (mut backend, socket) = blk_backend(&vmm, Some(&metrics));
    let mut cfg = guest_config("", 1, 64 << 20);
    cfg["disks"] = serde_json::json!([{
        "vhost_user": true,
        "vhost_socket": socket,
        "metrics_socket": metrics,
    }]);
    assert_eq!(vmm.put("vm.create", &cfg.to_string()).0, 204);
    let (live_status, live) = counters(&vmm);

    backend.kill();
    let (gone_status, gone) = counters(&vmm);

    assert_eq!(live_status, 200, "{live}");
    assert_eq!(live["_disk0"]["requests"], 0, "{live}");
    assert_eq!(gone_status, 200, "{gone}");
    assert_eq!(gone["_disk0"]["backend_unreachable"], 1, "{gone}");
    assert!(gone["_disk0"].get("requests").is_none(), "{gone}");
}

#[test]
fn vm_reboot_boots_the_guest_again_in_the_same_process() {
    let mut vmm = Vm::empty("api-reboot");
    let cfg = guest_config("tg.hold", 2, 64 << 20).to_string();
    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: HOLD");

    let reboot = vmm.put("vm.reboot", "");
    let again = vmm.console_until("TG: HOLD");
    let state = vmm.state();
    let alive = vmm.running();
    let quit = vmm.put("vmm.shutdown", "");
    let r = wait(vmm.take(), LIMIT);

    assert_eq!(reboot, (204, String::new()));
    assert!(again.contains(&"TG: hello".to_string()), "{again:?}");
    assert!(again.contains(&"TG: cpus=2".to_string()), "{again:?}");
    assert_eq!(state, "Running");
    assert!(alive);
    assert_eq!(quit.0, 204);
    assert_eq!(r.code(), Some(0));
}

#[test]
fn a_guest_reset_under_the_api_reboots_the_vm() {
    let mut vmm = Vm::empty("api-reset");
    let cfg = guest_config("tg.reset", 1, 64 << 20).to_string();
    assert_eq!(vmm.put("vm.create", &cfg).0, 204);
    assert_eq!(vmm.put("vm.boot", "").0, 204);

    let first = vmm.console_until("TG: reset");
    let second = vmm.console_until("TG: reset");
    let shutdown = vmm.put("vm.shutdown", "");
    vmm.wait_state("Shutdown");
    let quit = vmm.put("vmm.shutdown", "");
    let r = wait(vmm.take(), LIMIT);

    assert!(first.contains(&"TG: hello".to_string()), "{first:?}");
    assert!(second.contains(&"TG: hello".to_string()), "{second:?}");
    assert_eq!(shutdown.0, 204, "{shutdown:?}");
    assert_eq!(quit.0, 204);
    assert_eq!(r.code(), Some(0));
}

#[test]
fn vm_reboot_without_a_running_vm_is_refused() {
    let vmm = Vm::empty("api-reboot-refused");
    let cfg = guest_config("tg.hold", 1, 64 << 20).to_string();

    let no_vm = vmm.put("vm.reboot", "");
    vmm.put("vm.create", &cfg);
    let created = vmm.put("vm.reboot", "");
    let state = vmm.state();

    assert_eq!(no_vm.0, 404, "{no_vm:?}");
    assert_eq!(created.0, 405, "{created:?}");
    assert_eq!(state, "Created");
}

/// Threads of `pid` serving a queue (blk-backend names them `queueN`).
fn queue_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("queue"))
        .count()
}

/// [`queue_workers`] once it is `want`, or what it is after a second: a
/// new thread names itself a moment after it starts.
fn queue_workers_settled(pid: u32, want: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let n = queue_workers(pid);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_stops_the_backends_rings_and_resume_restarts_them() {
    let vmm = Vm::empty("api-pause-rings");
    let (backend, socket) = blk_backend(&vmm, None);
    let mut cfg = guest_config("tg.virtio tg.seed=3 tg.keepdev tg.hold", 1, 128 << 20);
    cfg["disks"] = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    assert_eq!(vmm.put("vm.create", &cfg.to_string()).0, 204);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: HOLD");
    let pid = backend.0.id();

    let running = queue_workers_settled(pid, 1);
    let pause = vmm.put("vm.pause", "");
    // The worker is joined before the pause is answered.
    let paused = queue_workers(pid);
    let resume = vmm.put("vm.resume", "");
    let resumed = queue_workers_settled(pid, 1);

    assert_eq!(running, 1);
    assert_eq!(pause.0, 204, "{pause:?}");
    assert_eq!(paused, 0, "a queue worker runs while the VM is paused");
    assert_eq!(resume.0, 204, "{resume:?}");
    assert_eq!(resumed, 1);
}

#[test]
fn vm_reboot_reconnects_the_disk_and_the_guest_drives_it_again() {
    let vmm = Vm::empty("api-reboot-disk");
    let (_backend, socket) = blk_backend(&vmm, None);
    let mut cfg = guest_config("tg.virtio tg.seed=5 tg.hold", 1, 128 << 20);
    cfg["disks"] = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    assert_eq!(vmm.put("vm.create", &cfg.to_string()).0, 204);
    assert_eq!(vmm.put("vm.boot", "").0, 204);
    vmm.console_until("TG: HOLD");

    let reboot = vmm.put("vm.reboot", "");
    let again = vmm.console_until("TG: HOLD");

    assert_eq!(reboot.0, 204, "{reboot:?}");
    for l in ["TG: hello", "TG: blk write ok", "TG: blk read ok"] {
        assert!(again.contains(&l.to_string()), "missing {l}: {again:?}");
    }
    assert!(!again.iter().any(|l| l.contains("FAIL")), "{again:?}");
}

#[test]
fn a_device_id_naming_a_vcpu_entry_is_refused() {
    let vmm = Vm::empty("api-vcpu-id");
    let socket = vmm.dir.path("blk.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut cfg = guest_config("", 1, 64 << 20);
    cfg["disks"] = serde_json::json!([{"vhost_user": true, "vhost_socket": socket, "id": "vcpu0"}]);

    let create = vmm.put("vm.create", &cfg.to_string());

    assert_eq!(create.0, 400, "{create:?}");
    assert!(create.1.contains("reserved"), "{create:?}");
}
