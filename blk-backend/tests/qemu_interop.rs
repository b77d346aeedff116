//! Interop with QEMU as the frontend: `qemu-system-x86_64 -accel tcg` with a
//! `vhost-user-blk-pci` device (2 queues) on blk-backend boots the Debian
//! guest from `scripts/guest-image`. The guest writes random data with dd,
//! drops its caches, reads it back and prints both SHA-256 sums; the test
//! checks the host image file holds exactly what the guest wrote.
//!
//! Needs `qemu-system-x86_64` and the guest image. Without QEMU the test
//! prints why and passes, unless `BLK_REQUIRE_QEMU=1` (set it in CI).

mod common;

use std::time::Duration;

use backends::qemu::{have_qemu, sha256, value, QemuGuest};
use common::*;

const GUEST_SCRIPT: &str = r#"set -e
echo "SIZE=$(cat /sys/block/vda/size)"
echo "HWQ=$(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null
dd if=/dev/urandom of=/tmp/b bs=64k count=16 2>/dev/null
taskset 1 dd if=/tmp/a of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null &
taskset 2 dd if=/tmp/b of=/dev/vda bs=64k seek=48 conv=fsync 2>/dev/null &
wait
sync
echo 3 > /proc/sys/vm/drop_caches
echo "WROTE-A=$(sha256sum < /tmp/a | cut -d' ' -f1)"
echo "WROTE-B=$(sha256sum < /tmp/b | cut -d' ' -f1)"
echo "READ-A=$(dd if=/dev/vda bs=64k skip=16 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "READ-B=$(dd if=/dev/vda bs=64k skip=48 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

/// Five minutes per guest run: TCG on a loaded 2-CPU machine is slow.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Boots the guest with `script` on a 2-queue vhost-user-blk device at `socket`.
fn boot(socket: &std::path::Path, script: &str) -> QemuGuest {
    let device = [
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=2,romfile=",
    ];
    QemuGuest::boot(socket, &device, script)
}

fn qemu_missing() -> bool {
    !have_qemu("BLK_REQUIRE_QEMU")
}

#[test]
fn qemu_guest_writes_reach_the_host_file_through_blk_backend() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu");
    let (backend, image) = Backend::with_image(&dir, 64 << 20, &["--queues", "2"]);

    let console = boot(&backend.socket, GUEST_SCRIPT).finish(GUEST_TIMEOUT);

    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    assert_eq!(value(&console, "SIZE="), "131072");
    assert_eq!(value(&console, "HWQ="), "2");
    assert_eq!(value(&console, "READ-A="), value(&console, "WROTE-A="));
    assert_eq!(value(&console, "READ-B="), value(&console, "WROTE-B="));
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(sha256(&disk[1 << 20..2 << 20]), value(&console, "WROTE-A="));
    assert_eq!(sha256(&disk[3 << 20..4 << 20]), value(&console, "WROTE-B="));
}

const KILL_SCRIPT: &str = r#"dd if=/dev/urandom of=/tmp/a bs=64k count=256 2>/dev/null
echo WRITING
dd if=/tmp/a of=/dev/vda bs=4k oflag=direct conv=fsync 2>/dev/null
echo "DD-RC=$?"
echo 3 > /proc/sys/vm/drop_caches
echo "WROTE=$(sha256sum < /tmp/a | cut -d' ' -f1)"
echo "READ=$(dd if=/dev/vda bs=64k count=256 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "IOERRORS=$(dmesg | grep -c -i 'I/O error')"
"#;

/// QEMU reconnects (`reconnect=1`) to a blk-backend restarted after kill -9
/// during the guest's dd, passing back the inflight region: the guest sees
/// no error and the host file holds every byte.
#[test]
fn qemu_guest_survives_backend_kill_9_mid_write() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu-kill");
    let (mut backend, image) = Backend::with_image(&dir, 64 << 20, &["--queues", "2"]);
    let qemu = boot(&backend.socket, KILL_SCRIPT);
    qemu.wait_for("WRITING", GUEST_TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));

    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    let _restarted = Backend::spawn(
        &backend.socket,
        &["--queues", "2", "--image", image.to_str().unwrap()],
    );
    let console = qemu.finish(GUEST_TIMEOUT);

    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    assert_eq!(value(&console, "DD-RC="), "0");
    assert_eq!(value(&console, "IOERRORS="), "0");
    assert_eq!(value(&console, "READ="), value(&console, "WROTE="));
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(sha256(&disk[..16 << 20]), value(&console, "WROTE="));
}
