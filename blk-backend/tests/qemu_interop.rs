//! Interop with QEMU as the frontend: `qemu-system-x86_64 -accel tcg` with a
//! `vhost-user-blk-pci` device (2 queues) on blk-backend boots the Debian
//! guest from `scripts/guest-image`. The guest writes random data with dd,
//! drops its caches, reads it back and prints both SHA-256 sums; the test
//! checks the host image file holds exactly what the guest wrote. A third
//! test live-migrates (to nowhere) a guest reading its disk: QEMU migrates
//! a vhost-user device only with a backend offering LOG_ALL, and drives
//! our dirty log (SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG, then off).
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

const READ_LOOP: &str = r#"echo READING
i=0
while true; do
  i=$((i+1))
  echo "READ-$i=$(dd if=/dev/vda bs=64k count=256 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
done
"#;

/// The sums the guest printed (`READ-n=...`), in order.
fn read_sums(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("READ-"))
        .filter_map(|l| l.split_once('=').map(|(_, sum)| sum.to_string()))
        .collect()
}

/// QEMU live-migrates (into `cat > /dev/null`) a guest reading its disk in
/// a loop: the migration completes (QEMU refuses it for a vhost-user device
/// without LOG_ALL), the guest, resumed on the source, reads on, and every
/// read returns the disk's content.
#[test]
fn qemu_live_migrates_a_guest_reading_through_blk_backend() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu-migrate");
    let (backend, image) = Backend::with_image(&dir, 64 << 20, &[]);
    let data = pattern(42, 16 << 20);
    std::fs::write(&image, [&data[..], &vec![0u8; 48 << 20][..]].concat()).unwrap();
    let device = [
        "-device",
        "vhost-user-blk-pci,chardev=c0,num-queues=1,romfile=",
    ];
    let qemu = QemuGuest::boot_with_monitor(
        &backend.socket,
        &device,
        READ_LOOP,
        &dir.path("monitor.sock"),
    );
    qemu.wait_for("READ-2=", GUEST_TIMEOUT);

    qemu.hmp("migrate \"exec:cat > /dev/null\"");
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    let status = loop {
        let info = qemu.hmp("info migrate");
        let status = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("Migration status: "))
            .unwrap_or_default()
            .to_string();
        if status != "active" && status != "setup" || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = read_sums(&qemu.console()).len();
    qemu.hmp("cont");
    let after_cont = format!("READ-{}=", before + 2);
    let console = qemu.wait_for(&after_cont, GUEST_TIMEOUT);

    assert_eq!(status, "completed", "{}", qemu.hmp("info migrate"));
    let sums = read_sums(&console);
    assert!(
        sums.len() >= before + 2,
        "no reads after the migration:\n{console}"
    );
    let expected = sha256(&data);
    assert!(sums.iter().all(|s| *s == expected), "{sums:?}");
}
