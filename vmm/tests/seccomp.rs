//! seccomp in the vmm process: every thread runs under a filter while a VM
//! with a blk-backend disk and a net-backend NIC runs, after a reboot and
//! after a snapshot restored in the same process (the backends' threads
//! too); none with `--seccomp false`; a forbidden system call ends vmm
//! with one line and status 159 whichever kind of thread makes it
//! (`--seccomp-probe`), and `--seccomp log` lets it through.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{
    blank_image, blk_backend, read_until, test_guest, vmm, wait, workspace_bin, Netns, Scratch,
};
use vmm::seccomp::{thread_modes, PROBE_CALL, SIGSYS_EXIT_CODE};

const LIMIT: Duration = Duration::from_secs(30);

/// The test guest with a disk and a NIC: it drives both, leaves their
/// queues running and idles.
const CMDLINE: &str = "tg.virtio tg.seed=5 tg.keepdev tg.hold";

/// The threads of a vmm running a 2-vCPU VM with a NIC (vhost-user device
/// type 1) and a disk (type 2), an API socket and an event monitor.
const VMM_THREADS: &[&str] = &[
    "vcpu0",
    "vcpu1",
    "vhost-user-1",
    "vhost-user-2",
    "vmm",
    "vmm-api",
    "vmm-events",
    "vmm-spawn",
    "vmm-vm",
];

/// The API's blocking pool thread, which outlives a vm.counters for a while.
const API_POOL: &str = "tokio-rt-worker";

/// Kernel workers listed among a process's threads, which run no user code
/// and take their creator's filter: io_uring's, and KVM's huge page
/// recovery thread, started by the first `KVM_RUN`.
const KERNEL_WORKERS: &[&str] = &["iou-", "kvm-nx-lpage"];

/// Whether thread `name` is listed in the names the tests compare.
fn listed(name: &str, ignore: &[&str]) -> bool {
    !KERNEL_WORKERS.iter().any(|k| name.starts_with(k)) && !ignore.contains(&name)
}

/// A vmm with only `--api-socket` (and `args`), killed when dropped.
struct Served {
    child: Child,
    socket: PathBuf,
    console: Receiver<String>,
}

impl Served {
    fn start(dir: &Scratch, args: &[&str]) -> Self {
        let socket = dir.path("api.sock");
        let stderr = std::fs::File::create(dir.path("vmm.stderr")).unwrap();
        let mut cmd = vmm();
        cmd.arg("--api-socket")
            .arg(&socket)
            .args(args)
            .stderr(stderr);
        let (child, console) = common::serve(cmd, &socket);
        Self {
            child,
            socket,
            console,
        }
    }

    /// `method endpoint` with `body`: the status.
    fn call(&self, method: &str, endpoint: &str, body: &str) -> u16 {
        vmm::api::client::raw_with_body(&self.socket, method, endpoint, body.as_bytes())
            .unwrap()
            .status
    }

    /// Waits for a console line starting with `prefix`.
    fn console_until(&self, prefix: &str) {
        common::next_line(&self.console, prefix, LIMIT);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The (name, Seccomp mode) of `pid`'s threads once their names, those
/// in `ignore` and the kernel workers aside, are `want`, or
/// whatever they are at the deadline: a thread is named a moment after it
/// starts, and one on its way out is still listed.
fn settled(pid: u32, want: &[&str], ignore: &[&str]) -> Vec<(String, u32)> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let modes = thread_modes(pid).unwrap();
        if names(&modes, ignore) == want || Instant::now() > deadline {
            return modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The threads of `modes` whose mode is not `mode`.
fn not_in_mode(modes: &[(String, u32)], mode: u32) -> Vec<&(String, u32)> {
    modes.iter().filter(|(_, m)| *m != mode).collect()
}

/// The names of `modes`, those in `ignore` and the kernel workers aside.
fn names<'a>(modes: &'a [(String, u32)], ignore: &[&str]) -> Vec<&'a str> {
    modes
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| listed(n, ignore))
        .collect()
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[test]
fn every_thread_is_filtered_while_running_after_a_reboot_and_after_a_restore() {
    let dir = Scratch::new("seccomp-all");
    let ns = Netns::new().expect("cannot create a network namespace (needs root and iproute2)");
    let net_socket = dir.path("net.sock");
    let (net_metrics, blk_metrics) = (dir.path("net.metrics"), dir.path("blk.metrics"));
    let net = ns.net_backend_with(
        &net_socket,
        "sctap0",
        &["--metrics-socket", net_metrics.to_str().unwrap()],
    );
    let (blk, blk_socket) = blk_backend(&dir, &["--metrics-socket", blk_metrics.to_str().unwrap()]);
    let events = format!("path={}", dir.path("events").display());
    let vmm = Served::start(&dir, &["--event-monitor", &events]);
    let pid = vmm.child.id();
    let cfg = serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": CMDLINE},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 128 << 20},
        "serial": {"mode": "Tty"},
        "disks": [{"vhost_user": true, "vhost_socket": blk_socket, "metrics_socket": blk_metrics}],
        "net": [{"vhost_user": true, "vhost_socket": net_socket, "mac": "52:54:00:aa:bb:ee",
                 "metrics_socket": net_metrics}],
    });
    let snap = dir.path("snap");

    assert_eq!(vmm.call("PUT", "vm.create", &cfg.to_string()), 204);
    assert_eq!(vmm.call("PUT", "vm.boot", ""), 204);
    vmm.console_until("TG: HOLD");
    let booted = settled(pid, VMM_THREADS, &[]);
    let counters = vmm.call("GET", "vm.counters", "");
    let with_pool = settled(pid, VMM_THREADS, &[API_POOL]);
    let blk_threads = settled(blk.0.id(), &["blk-backend", "metrics", "queue0"], &[]);
    let net_threads = thread_modes(net.0.id()).unwrap();
    assert_eq!(vmm.call("PUT", "vm.reboot", ""), 204);
    vmm.console_until("TG: HOLD");
    let rebooted = settled(pid, VMM_THREADS, &[API_POOL]);
    assert_eq!(vmm.call("PUT", "vm.pause", ""), 204);
    let body = serde_json::json!({"destination_url": url(&snap)}).to_string();
    assert_eq!(vmm.call("PUT", "vm.snapshot", &body), 204);
    assert_eq!(vmm.call("PUT", "vm.delete", ""), 204);
    let body = serde_json::json!({"source_url": url(&snap), "resume": true}).to_string();
    let restore = vmm.call("PUT", "vm.restore", &body);
    let restored = settled(pid, VMM_THREADS, &[API_POOL]);

    assert_eq!(counters, 200);
    assert_eq!(restore, 204);
    for modes in [&booted, &rebooted, &restored] {
        assert_eq!(names(modes, &[API_POOL]), VMM_THREADS);
        assert_eq!(not_in_mode(modes, 2), Vec::<&(String, u32)>::new());
    }
    assert!(names(&with_pool, &[]).contains(&API_POOL), "{with_pool:?}");
    assert_eq!(not_in_mode(&with_pool, 2), Vec::<&(String, u32)>::new());
    assert_eq!(
        names(&blk_threads, &[]),
        ["blk-backend", "metrics", "queue0"]
    );
    assert_eq!(not_in_mode(&blk_threads, 2), Vec::<&(String, u32)>::new());
    assert!(
        names(&net_threads, &[]).contains(&"queue0"),
        "{net_threads:?}"
    );
    assert_eq!(not_in_mode(&net_threads, 2), Vec::<&(String, u32)>::new());
}

#[test]
fn without_the_api_the_main_thread_runs_the_vm_loop_filtered() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cpus", "2", "--cmdline", "tg.hold"]);
    let mut child = c.spawn().unwrap();
    read_until(&mut child, "TG: HOLD");

    let modes = settled(child.id(), &["vcpu0", "vcpu1", "vmm"], &[]);
    let _ = child.kill();
    let _ = child.wait();

    // No backend can be started (no image, tap or API): no launcher.
    assert_eq!(names(&modes, &[]), ["vcpu0", "vcpu1", "vmm"]);
    assert_eq!(not_in_mode(&modes, 2), Vec::<&(String, u32)>::new());
}

#[test]
fn seccomp_false_leaves_every_thread_unfiltered() {
    let dir = Scratch::new("seccomp-off");
    let socket = dir.path("api.sock");
    let events = format!("path={}", dir.path("events").display());
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.hold", "--seccomp", "false"])
        .args(["--event-monitor", &events, "--api-socket"])
        .arg(&socket);
    let mut child = c.spawn().unwrap();
    read_until(&mut child, "TG: HOLD");

    let want = [
        "vcpu0",
        "vmm",
        "vmm-api",
        "vmm-events",
        "vmm-spawn",
        "vmm-vm",
    ];
    let modes = settled(child.id(), &want, &[]);
    let _ = child.kill();
    let _ = child.wait();

    assert_eq!(names(&modes, &[]), want);
    assert_eq!(not_in_mode(&modes, 0), Vec::<&(String, u32)>::new());
}

#[test]
fn a_forbidden_call_in_any_thread_ends_vmm_with_one_line_and_status_159() {
    let dir = Scratch::new("seccomp-probe");
    let (_blk, blk_socket) = blk_backend(&dir, &[]);
    let kinds = [
        "controller",
        "vm",
        "vcpu",
        "api",
        "events",
        "reconnect",
        "spawn",
    ];
    let line = format!("seccomp: forbidden system call {PROBE_CALL}\n");

    let ends: Vec<(&str, Option<i32>, String)> = kinds
        .iter()
        .map(|&kind| {
            let mut c = vmm();
            c.arg("--kernel")
                .arg(test_guest())
                .args(["--cmdline", CMDLINE, "--seccomp-probe", kind])
                .arg(format!("--disk=socket={}", blk_socket.display()))
                .arg(format!(
                    "--event-monitor=path={}",
                    dir.path("events").display()
                ))
                .arg("--api-socket")
                .arg(dir.path(&format!("{kind}.sock")));
            let r = wait(c.spawn().unwrap(), LIMIT);
            (kind, r.code(), r.stderr)
        })
        .collect();

    let want: Vec<_> = kinds
        .iter()
        .map(|&k| (k, Some(SIGSYS_EXIT_CODE), line.clone()))
        .collect();
    assert_eq!(ends, want);
}

#[test]
fn seccomp_log_lets_a_forbidden_call_through() {
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--seccomp", "log", "--seccomp-probe", "vcpu"]);

    let r = wait(c.spawn().unwrap(), LIMIT);

    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.lines().contains(&"TG: PASS"), "{}", r.stdout);
}

/// The children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The threads of vmm serving a disk image with its own blk-backend.
const SPAWNING: [&str; 6] = [
    "vcpu0",
    "vhost-user-2",
    "vmm",
    // Forwards the backend's stderr; started by its supervisor.
    "vmm-backend-log",
    "vmm-blk-backend",
    "vmm-spawn",
];
/// The backend's: it serves its counters on a metrics socket.
const BACKEND: [&str; 3] = ["blk-backend", "metrics", "queue0"];

/// Starts vmm with `args` and a disk image, which it serves with a
/// blk-backend of its own; returns the (name, Seccomp mode) of vmm's
/// threads and of each backend's.
fn with_a_spawned_backend(tag: &str, args: &[&str]) -> (Modes, Vec<Modes>) {
    let dir = Scratch::new(tag);
    let image = blank_image(&dir, "disk.img");
    workspace_bin("blk-backend");
    let mut c = vmm();
    c.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "tg.virtio tg.seed=3 tg.keepdev tg.hold"])
        .args(args)
        .arg(format!("--disk=path={}", image.display()));
    let mut child = c.spawn().unwrap();
    read_until(&mut child, "TG: HOLD");

    let modes = settled(child.id(), &SPAWNING, &[]);
    let backends = children(child.id())
        .into_iter()
        .map(|pid| settled(pid, &BACKEND, &[]))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    (modes, backends)
}

type Modes = Vec<(String, u32)>;

#[test]
fn a_backend_vmm_starts_and_its_supervisor_run_filtered() {
    let (modes, backends) = with_a_spawned_backend("seccomp-spawned", &[]);

    assert_eq!(names(&modes, &[]), SPAWNING);
    assert_eq!(not_in_mode(&modes, 2), Vec::<&(String, u32)>::new());
    assert_eq!(backends.len(), 1, "{backends:?}");
    assert_eq!(names(&backends[0], &[]), BACKEND);
    assert_eq!(not_in_mode(&backends[0], 2), Vec::<&(String, u32)>::new());
}

/// `--seccomp false` reaches the backend vmm starts: without it, the
/// backend would install its own filters, and debugging a VM with other
/// system calls would stop there.
#[test]
fn seccomp_false_reaches_the_backends_vmm_starts() {
    let (modes, backends) = with_a_spawned_backend("seccomp-spawned-off", &["--seccomp", "false"]);

    assert_eq!(names(&modes, &[]), SPAWNING);
    assert_eq!(not_in_mode(&modes, 0), Vec::<&(String, u32)>::new());
    assert_eq!(backends.len(), 1, "{backends:?}");
    assert_eq!(names(&backends[0], &[]), BACKEND);
    assert_eq!(not_in_mode(&backends[0], 0), Vec::<&(String, u32)>::new());
}
