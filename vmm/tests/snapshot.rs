//! vm.snapshot / vm.restore on real vmm processes running the test guest:
//! a guest that checks its own memory and counts goes on where it was,
//! with its vhost-user disk (blk-backend and qemu-storage-daemon), in two
//! VMs from one snapshot, paused until resumed; and every bad snapshot is
//! refused before anything is built, leaving the vmm serving.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{test_guest, vmm, workspace_bin, ApiVmm as Vmm, Daemon, Scratch, API_LIMIT as LIMIT};

/// vm.snapshot and vm.restore as the tests use them.
trait Snap {
    fn snapshot(&self, prefix: &str, dir: &Path) -> u64;
    fn restore(&self, dir: &Path, resume: bool) -> (u16, String);
}

impl Snap for Vmm {
    /// Pauses and snapshots into `dir`; returns the last count printed.
    fn snapshot(&self, prefix: &str, dir: &Path) -> u64 {
        let mut last = self.next_count(prefix);
        assert_eq!(self.put("vm.pause", "").0, 204);
        while let Ok(l) = self.console.recv_timeout(Duration::from_millis(300)) {
            if let Some(n) = l.strip_prefix(prefix) {
                last = n.trim().parse().unwrap();
            }
        }
        let body = serde_json::json!({"destination_url": url(dir)}).to_string();
        let r = self.put("vm.snapshot", &body);
        assert_eq!(r.0, 204, "{r:?}");
        last
    }

    fn restore(&self, dir: &Path, resume: bool) -> (u16, String) {
        let body = serde_json::json!({"source_url": url(dir), "resume": resume}).to_string();
        self.put("vm.restore", &body)
    }
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Whether `first`, the first whole count line of a restored VM, goes on
/// from `last`, the last whole one before the pause: the next, or the one
/// after when the pause split a line (its start went to the old console).
fn continues(last: u64, first: u64) -> bool {
    first == last + 1 || first == last + 2
}

/// blk-backend serving `image` on `<dir>/blk.sock`.
fn start_blk(dir: &Scratch, image: &Path) -> (Daemon, PathBuf) {
    let socket = dir.path("blk.sock");
    let mut cmd = Command::new(workspace_bin("blk-backend"));
    cmd.arg("--socket").arg(&socket).arg("--image").arg(image);
    (Daemon::start(cmd, &socket), socket)
}

/// A new image of `size` bytes in `dir`.
fn image(dir: &Scratch, name: &str, size: u64) -> PathBuf {
    let image = dir.path(name);
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    image
}

/// A 64 MiB image served by blk-backend on `<dir>/blk.sock`.
fn blk_backend(dir: &Scratch) -> (Daemon, PathBuf) {
    start_blk(dir, &image(dir, "disk.img", 64 << 20))
}

/// A guest doing `tg.blkcount` on blk-backend, snapshotted into
/// `<dir>/snap` and its vmm killed; returns the backend, the snapshot and
/// the last round before the pause.
fn blkcount_snapshot(dir: &Scratch) -> (Daemon, PathBuf, u64) {
    let (backend, socket) = blk_backend(dir);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    let source = Vmm::start(dir, "source");
    source.boot("tg.virtio tg.blkcount", 1, disks);
    let snap = dir.path("snap");
    let last = source.snapshot("TG: blkcount ", &snap);
    (backend, snap, last)
}

/// A guest counting with `tg.count` (2 vCPUs), snapshotted into a
/// directory; returns the directory and the last count before the pause.
fn counting_snapshot(dir: &Scratch) -> (PathBuf, u64) {
    let source = Vmm::start(dir, "source");
    source.boot("tg.count", 2, serde_json::json!([]));
    let snap = dir.path("snap");
    let last = source.snapshot("TG: count ", &snap);
    (snap, last)
}

#[test]
fn a_restored_vm_goes_on_counting_with_its_memory_intact() {
    let dir = Scratch::new("snap-count");
    let (snap, last) = counting_snapshot(&dir);

    let target = Vmm::start(&dir, "target");
    let restore = target.restore(&snap, true);
    let first = target.next_count("TG: count ");
    let later = target.next_count("TG: count ");

    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(continues(last, first), "{last} then {first}");
    assert_eq!(later, first + 1);
    assert_eq!(target.state(), "Running");
}

#[test]
fn a_restored_vm_stays_paused_until_resumed() {
    let dir = Scratch::new("snap-paused");
    let (snap, last) = counting_snapshot(&dir);

    let target = Vmm::start(&dir, "target");
    let restore = target.restore(&snap, false);
    let state = target.state();
    let quiet = target.console.recv_timeout(Duration::from_millis(500));
    let resume = target.put("vm.resume", "");
    let first = target.next_count("TG: count ");

    assert_eq!(restore.0, 204, "{restore:?}");
    assert_eq!(state, "Paused");
    assert!(quiet.is_err(), "the paused VM printed {quiet:?}");
    assert_eq!(resume.0, 204);
    assert!(continues(last, first), "{last} then {first}");
}

#[test]
fn one_snapshot_restores_into_two_vms() {
    let dir = Scratch::new("snap-twice");
    let (snap, last) = counting_snapshot(&dir);

    let a = Vmm::start(&dir, "a");
    let b = Vmm::start(&dir, "b");
    let ra = a.restore(&snap, true);
    let rb = b.restore(&snap, true);

    assert_eq!(ra.0, 204, "{ra:?}");
    assert_eq!(rb.0, 204, "{rb:?}");
    let (fa, fb) = (a.next_count("TG: count "), b.next_count("TG: count "));
    assert!(continues(last, fa), "{last} then {fa}");
    assert_eq!(fa, fb);
}

#[test]
fn a_restored_vm_drives_its_blk_backend_disk_from_where_it_was() {
    let dir = Scratch::new("snap-blk");
    let (_backend, snap, last) = blkcount_snapshot(&dir);
    let saved: vmm::snapshot::SnapshotState =
        vmm::state::read_state_file(&snap.join("state")).unwrap();

    let target = Vmm::start(&dir, "target");
    let restore = target.restore(&snap, true);
    let first = target.next_count("TG: blkcount ");
    let later = target.next_count("TG: blkcount ");

    // blk-backend offers DEVICE_STATE: its own state is in the snapshot.
    assert!(saved.backends[0].as_ref().is_some_and(|s| !s.is_empty()));
    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(continues(last, first), "{last} then {first}");
    assert_eq!(later, first + 1);
}

#[test]
fn a_restored_vm_drives_its_qemu_storage_daemon_disk_from_where_it_was() {
    let dir = Scratch::new("snap-qsd");
    let image = image(&dir, "disk.img", 64 << 20);
    let socket = dir.path("qsd.sock");
    let cmd = common::qsd_command(&image, &socket);
    let _qsd = Daemon::start(cmd, &socket);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    let source = Vmm::start(&dir, "source");
    source.boot("tg.virtio tg.blkcount", 1, disks);
    let snap = dir.path("snap");
    let last = source.snapshot("TG: blkcount ", &snap);
    drop(source);
    let saved: vmm::snapshot::SnapshotState =
        vmm::state::read_state_file(&snap.join("state")).unwrap();
    // qemu-storage-daemon has no DEVICE_STATE: rings and memory suffice.
    assert_eq!(saved.backends, [None]);

    let target = Vmm::start(&dir, "target");
    let restore = target.restore(&snap, true);
    let first = target.next_count("TG: blkcount ");

    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(continues(last, first), "{last} then {first}");
}

#[test]
fn snapshot_of_a_running_vm_is_405_and_a_bad_url_400() {
    let dir = Scratch::new("snap-running");
    let source = Vmm::start(&dir, "source");
    source.boot("tg.count", 1, serde_json::json!([]));
    let body = serde_json::json!({"destination_url": url(&dir.path("snap"))}).to_string();

    let running = source.put("vm.snapshot", &body);
    source.put("vm.pause", "");
    let bad_url = source.put("vm.snapshot", r#"{"destination_url":"tcp:1.2.3.4:5"}"#);
    let unknown_field = source.put("vm.snapshot", r#"{"destination":"file:///tmp"}"#);

    assert_eq!(running.0, 405, "{running:?}");
    assert_eq!(bad_url.0, 400, "{bad_url:?}");
    assert_eq!(unknown_field.0, 400, "{unknown_field:?}");
    assert!(!dir.path("snap").exists());
}

/// Restores `snap` into a fresh vmm: the status, the message, and the
/// state after (it must still have no VM).
fn refused(dir: &Scratch, snap: &Path) -> (u16, String, String) {
    let target = Vmm::start(dir, "refused");
    let (status, body) = target.restore(snap, true);
    (status, body, target.state())
}

#[test]
fn bad_snapshots_are_refused_before_anything_is_built() {
    let dir = Scratch::new("snap-bad");
    let (snap, _) = counting_snapshot(&dir);
    let copy = |name: &str| {
        let to = dir.path(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(snap.join(f), to.join(f)).unwrap();
        }
        to
    };
    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let last = state.len() - 1;
    state[last] ^= 0x55;
    std::fs::write(flipped.join("state"), state).unwrap();
    let version = copy("version");
    let mut state = std::fs::read(version.join("state")).unwrap();
    state[8] ^= 0x7f;
    std::fs::write(version.join("state"), state).unwrap();
    let short = copy("short");
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(short.join("memory"))
        .unwrap();
    mem.set_len((128 << 20) - 4096).unwrap();
    let missing = dir.path("missing");

    for (snap, want) in [
        (&flipped, "checksum"),
        (&version, "version"),
        (&short, "bytes"),
        (&missing, "Cannot read"),
    ] {
        let (status, body, state) = refused(&dir, snap);
        assert_eq!(status, 400, "{}: {body}", snap.display());
        assert!(body.contains(want), "{}: {body}", snap.display());
        assert_eq!(state, "404", "{}", snap.display());
    }
}

#[test]
fn vmctl_snapshots_and_vmm_restore_runs_the_snapshot() {
    let dir = Scratch::new("snap-cli");
    let source = Vmm::start(&dir, "source");
    source.boot("tg.count", 1, serde_json::json!([]));
    let mut last = source.next_count("TG: count ");
    let vmctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&source.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let pause = vmctl(&["pause"]);
    while let Ok(l) = source.console.recv_timeout(Duration::from_millis(300)) {
        if let Some(n) = l.strip_prefix("TG: count ") {
            last = n.trim().parse().unwrap();
        }
    }
    let snap = dir.path("snap");
    let saved = vmctl(&["snapshot", snap.to_str().unwrap()]);

    let mut restored = vmm()
        .arg("--restore")
        .arg(format!("source_url={},resume=on", url(&snap)))
        .spawn()
        .unwrap();
    let (out, _) = common::read_until(&mut restored, "TG: count ");
    let mut lines = out.lines().map_while(Result::ok);
    let later = lines.next().unwrap();
    let _ = restored.kill();
    let _ = restored.wait();

    assert!(pause.status.success(), "{pause:?}");
    assert!(saved.status.success(), "{saved:?}");
    let later: u64 = later.strip_prefix("TG: count ").unwrap().parse().unwrap();
    assert!(continues(last + 1, later), "{last} then {later}");
}

#[test]
fn restore_without_the_api_must_resume() {
    let out = vmm()
        .args(["--restore", "source_url=file:///nonexistent"])
        .output()
        .unwrap();

    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resume=on"),
        "{out:?}"
    );
}

#[test]
fn map_mode_runs_the_guest_on_the_snapshot_file_itself() {
    let dir = Scratch::new("snap-map");
    let (snap, last) = counting_snapshot(&dir);
    let shm = Path::new("/dev/shm").join(format!("vmm-snap-map-{}", std::process::id()));
    std::fs::create_dir_all(&shm).unwrap();
    for f in ["state", "memory"] {
        std::fs::copy(snap.join(f), shm.join(f)).unwrap();
    }
    let before = std::fs::read(shm.join("memory")).unwrap();

    let target = Vmm::start(&dir, "target");
    let body = serde_json::json!({
        "source_url": url(&shm), "resume": true, "memory_restore_mode": "Map",
    });
    let restore = target.put("vm.restore", &body.to_string());
    let first = target.next_count("TG: count ");
    let later = target.next_count("TG: count ");
    drop(target);
    let after = std::fs::read(shm.join("memory")).unwrap();
    let _ = std::fs::remove_dir_all(&shm);

    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(continues(last, first), "{last} then {first}");
    assert_eq!(later, first + 1);
    // The guest ran on the file: its pattern rounds are in it now.
    assert_ne!(before, after);
}

#[test]
fn map_mode_refuses_a_snapshot_on_a_disk_file_system() {
    let dir = Scratch::new("snap-map-disk");
    let (snap, _) = counting_snapshot(&dir);
    // The build tree is on a disk file system, unlike /dev/shm.
    let on_disk =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snap-map-{}", std::process::id()));
    std::fs::create_dir_all(&on_disk).unwrap();
    for f in ["state", "memory"] {
        std::fs::copy(snap.join(f), on_disk.join(f)).unwrap();
    }
    assert!(!is_tmpfs(&on_disk));

    let target = Vmm::start(&dir, "target");
    let body = serde_json::json!({
        "source_url": url(&on_disk), "resume": true, "memory_restore_mode": "Map",
    });
    let restore = target.put("vm.restore", &body.to_string());
    let bad_mode = target.put(
        "vm.restore",
        &serde_json::json!({"source_url": url(&snap), "memory_restore_mode": "OnDemand"})
            .to_string(),
    );
    let state = target.state();
    let _ = std::fs::remove_dir_all(&on_disk);

    assert_eq!(restore.0, 400, "{restore:?}");
    assert!(restore.1.contains("tmpfs"), "{restore:?}");
    assert_eq!(bad_mode.0, 400, "{bad_mode:?}");
    assert_eq!(state, "404");
}

/// Whether `p` is on tmpfs (the temp dir may be, on some machines).
fn is_tmpfs(p: &Path) -> bool {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "tmpfs"
}

/// Sends one frame to the guest's MAC on the tap.
const SEND_ONE: &str = r#"
import socket, sys
iface, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((iface, 0))
s.send(mac + bytes.fromhex('020000000099') + b'\x88\xb5' + b'after the restore'.ljust(46, b'\0'))
"#;

#[test]
fn a_restored_vm_receives_frames_through_its_net_backend() {
    let ns = common::Netns::new().expect("cannot create a network namespace");
    let dir = Scratch::new("snap-net");
    let sock = dir.path("net.sock");
    let _nb = ns.net_backend(&sock, "vmtap0");
    let mac = "52:54:00:aa:bb:dd";
    let source = Vmm::start(&dir, "source");
    let cfg = serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": "tg.virtio tg.netrx"},
        "memory": {"size": 128 << 20},
        "serial": {"mode": "Tty"},
        "net": [{"vhost_user": true, "vhost_socket": sock, "mac": mac}],
    });
    assert_eq!(source.put("vm.create", &cfg.to_string()).0, 204);
    assert_eq!(source.put("vm.boot", "").0, 204);
    let deadline = Instant::now() + LIMIT;
    while source.console.recv_timeout(LIMIT).unwrap() != "TG: net tx ok" {
        assert!(Instant::now() < deadline, "no TG: net tx ok");
    }
    // The guest now waits (about 5 s) for a frame.
    assert_eq!(source.put("vm.pause", "").0, 204);
    let snap = dir.path("snap");
    let body = serde_json::json!({"destination_url": url(&snap)}).to_string();
    assert_eq!(source.put("vm.snapshot", &body).0, 204);
    drop(source);

    let target = Vmm::start(&dir, "target");
    let restore = target.restore(&snap, true);
    let script = dir.path("send.py");
    std::fs::write(&script, SEND_ONE).unwrap();
    let sent = ns
        .exec(&["python3", script.to_str().unwrap(), "vmtap0", mac])
        .status()
        .unwrap();
    let mut lines = Vec::new();
    while let Ok(l) = target.console.recv_timeout(LIMIT) {
        let done = l.starts_with("TG: net rx payload") || l.contains("FAIL");
        lines.push(l);
        if done {
            break;
        }
    }

    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(sent.success());
    assert!(
        lines.contains(&"TG: net rx payload=after the restore".to_string()),
        "{lines:?}"
    );
}

#[test]
fn the_source_vm_goes_on_with_its_disk_after_a_snapshot() {
    let dir = Scratch::new("snap-source");
    let (_backend, socket) = blk_backend(&dir);
    let disks = serde_json::json!([{"vhost_user": true, "vhost_socket": socket}]);
    let source = Vmm::start(&dir, "source");
    source.boot("tg.virtio tg.blkcount", 1, disks);
    let last = source.snapshot("TG: blkcount ", &dir.path("snap"));

    let resume = source.put("vm.resume", "");
    let first = source.next_count("TG: blkcount ");
    let later = source.next_count("TG: blkcount ");

    assert_eq!(resume.0, 204, "{resume:?}");
    assert!(continues(last, first), "{last} then {first}");
    assert_eq!(later, first + 1);
}

#[test]
fn a_restored_vm_carries_on_with_a_freshly_started_blk_backend() {
    let dir = Scratch::new("snap-new-backend");
    let (mut backend, snap, last) = blkcount_snapshot(&dir);
    backend.kill();
    let _fresh = start_blk(&dir, &dir.path("disk.img"));

    let target = Vmm::start(&dir, "target");
    let restore = target.restore(&snap, true);
    let first = target.next_count("TG: blkcount ");
    let later = target.next_count("TG: blkcount ");

    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(continues(last, first), "{last} then {first}");
    assert_eq!(later, first + 1);
}

#[test]
fn restore_against_a_backend_with_another_disk_is_refused() {
    let dir = Scratch::new("snap-other-disk");
    let (mut backend, snap, _) = blkcount_snapshot(&dir);
    backend.kill();
    let _other = start_blk(&dir, &image(&dir, "other.img", 32 << 20));

    let target = Vmm::start(&dir, "target");
    let (status, body) = target.restore(&snap, true);

    assert_eq!(status, 400, "{body}");
    assert!(body.contains("CHECK_DEVICE_STATE"), "{body}");
    assert_eq!(target.state(), "404");
}

#[test]
fn a_restore_can_point_a_disk_at_a_new_backend_socket() {
    let dir = Scratch::new("snap-moved");
    let (mut backend, snap, last) = blkcount_snapshot(&dir);
    backend.kill();
    let moved = dir.path("moved.sock");
    let mut cmd = Command::new(workspace_bin("blk-backend"));
    cmd.arg("--socket")
        .arg(&moved)
        .arg("--image")
        .arg(dir.path("disk.img"));
    let _moved = Daemon::start(cmd, &moved);

    let target = Vmm::start(&dir, "target");
    let unknown = target.put(
        "vm.restore",
        &serde_json::json!({"source_url": url(&snap), "vhost_sockets": {"nope": moved}})
            .to_string(),
    );
    let restore = target.put(
        "vm.restore",
        &serde_json::json!({
            "source_url": url(&snap), "resume": true, "vhost_sockets": {"_disk0": moved},
        })
        .to_string(),
    );
    let first = target.next_count("TG: blkcount ");
    let info = vmm::api::client::raw(&target.socket, "GET", "vm.info").unwrap();

    assert_eq!(unknown.0, 400, "{unknown:?}");
    assert!(unknown.1.contains("no device 'nope'"), "{unknown:?}");
    assert_eq!(restore.0, 204, "{restore:?}");
    assert!(continues(last, first), "{last} then {first}");
    assert!(info.body.contains("moved.sock"), "{}", info.body);
}
