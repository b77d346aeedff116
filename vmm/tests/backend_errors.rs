//! Bad disk and NIC input through the API, as libvirt sends it: a disk
//! image that does not exist, cannot be opened or is in use by another
//! VM, a tap fd that is not a tap, a backend that cannot start. Each is a
//! 400 naming the reason; the vmm serves on with nothing created, no
//! backend left running, and the other VM undisturbed.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A VM config with the test guest and `disks`.
fn config(disks: serde_json::Value) -> String {
    serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": "tg.virtio tg.blkcount"},
        "memory": {"size": 128 << 20},
        "serial": {"mode": "Tty"},
        "disks": disks,
    })
    .to_string()
}

/// Backend processes whose parent is `vmm`.
fn backends_of(vmm: &ApiVmm) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-P", &vmm.child.id().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// vm.create is refused with 400 and `needle`, and the vmm has no VM and
/// no backend afterwards.
fn assert_create_refused(vm: &ApiVmm, disks: serde_json::Value, needle: &str) {
    let (status, body) = vm.put("vm.create", &config(disks));

    assert_eq!(status, 400, "{body}");
    assert!(body.contains(needle), "expected {needle:?} in {body:?}");
    assert_eq!(body.trim().lines().count(), 1, "{body}");
    assert_eq!(vm.state(), "404");
    assert!(backends_of(vm).is_empty());
}

fn image(dir: &Scratch, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

#[test]
fn missing_disk_image_is_a_400() {
    let dir = Scratch::new("err-missing");
    let vm = ApiVmm::start(&dir, "vm");
    let path = dir.path("nope.img");

    assert_create_refused(
        &vm,
        serde_json::json!([{ "path": path }]),
        &format!("Disk image {} does not exist", path.display()),
    );
}

#[test]
fn disk_image_that_cannot_be_opened_is_a_400() {
    let dir = Scratch::new("err-open");
    let vm = ApiVmm::start(&dir, "vm");
    let path = dir.path("a-directory");
    std::fs::create_dir(&path).unwrap();

    assert_create_refused(
        &vm,
        serde_json::json!([{ "path": path }]),
        &format!("Cannot open disk image {}: Is a directory", path.display()),
    );
}

#[test]
fn disk_image_in_use_by_another_vm_is_a_400_and_that_vm_runs_on() {
    let dir = Scratch::new("err-inuse");
    let path = image(&dir, "shared.img");
    let first = ApiVmm::start(&dir, "first");
    first.boot(
        "tg.virtio tg.blkcount",
        1,
        serde_json::json!([{ "path": path }]),
    );
    let before = first.next_count("TG: blkcount");
    let second = ApiVmm::start(&dir, "second");

    assert_create_refused(
        &second,
        serde_json::json!([{ "path": path }]),
        &format!("Disk image {} is in use by another VM", path.display()),
    );
    assert!(first.next_count("TG: blkcount") > before);
    assert_eq!(first.state(), "Running");
    // Read-only users share the lock with each other, not with a writer.
    assert_create_refused(
        &second,
        serde_json::json!([{ "path": path, "readonly": true }]),
        "is in use by another VM",
    );
}

/// Sends vm.add-net with `fd` attached (`SCM_RIGHTS`), as libvirt does;
/// returns the raw HTTP answer.
fn add_net_with_fd(socket: &Path, fd: i32) -> String {
    let body = r#"{"id":"net0","mac":"52:54:00:aa:bb:cc","num_queues":2}"#;
    let request = format!(
        "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = UnixStream::connect(socket).unwrap();
    s.send_with_fds(&[request.as_bytes()], &[fd]).unwrap();
    s.flush().unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn tap_fd_that_is_not_a_tap_is_a_400() {
    let dir = Scratch::new("err-tapfd");
    let vm = ApiVmm::start(&dir, "vm");
    assert_eq!(vm.put("vm.create", &config(serde_json::json!([]))).0, 204);
    let file = std::fs::File::create(dir.path("not-a-tap")).unwrap();

    let reply = add_net_with_fd(&vm.socket, file.as_raw_fd());

    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("given for a tap is not a tap"), "{reply}");
    assert!(backends_of(&vm).is_empty());
    let info = vmm::api::client::raw(&vm.socket, "GET", "vm.info").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info.body).unwrap();
    assert_eq!(info["config"]["net"], serde_json::json!([]));
}

#[test]
fn backend_that_cannot_start_is_a_400_with_its_reason() {
    let dir = Scratch::new("err-backend");
    // vmm looks for blk-backend beside itself: give this copy a broken one.
    let bin = dir.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let vmm_copy = bin.join("vmm");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_vmm"), &vmm_copy).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_vmm"), &vmm_copy).unwrap();
    }
    let fake = bin.join("blk-backend");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'blk-backend: cannot start: out of test luck' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = image(&dir, "disk.img");
    // Under vmm's filters (the default) the shell dies of SIGSYS at its
    // first call outside them, and the error says so.
    let mut cmd = std::process::Command::new(&vmm_copy);
    cmd.env_remove("PATH");
    let filtered = ApiVmm::start_with(&dir, "filtered", cmd);
    assert_create_refused(
        &filtered,
        serde_json::json!([{ "path": path }]),
        vmm::spawned::SIGSYS_REASON,
    );
    drop(filtered);
    // A shell script runs as a backend once vmm's filters are off.
    let mut cmd = std::process::Command::new(&vmm_copy);
    cmd.env_remove("PATH").args(["--seccomp", "false"]);
    let vm = ApiVmm::start_with(&dir, "vm", cmd);

    assert_create_refused(
        &vm,
        serde_json::json!([{ "path": path }]),
        "blk-backend for",
    );
    let (_, body) = vm.put("vm.create", &config(serde_json::json!([{ "path": path }])));
    assert!(
        body.contains(
            "exited before creating its socket: blk-backend: cannot start: out of test luck"
        ),
        "{body}"
    );
    // The image is not left locked: a working vmm takes it.
    let other = ApiVmm::start(&dir, "other");
    assert_eq!(
        other
            .put("vm.create", &config(serde_json::json!([{ "path": path }])))
            .0,
        204
    );
}
