//! Interop with QEMU as the frontend: `qemu-system-x86_64 -accel tcg` with a
//! `vhost-user-blk-pci` device (2 queues) on blk-backend boots the Debian
//! guest from `scripts/guest-image`. The guest writes random data with dd,
//! drops its caches, reads it back and prints both SHA-256 sums; the test
//! checks the host image file holds exactly what the guest wrote.
//!
//! Needs `qemu-system-x86_64` and the guest image. Without QEMU the test
//! prints why and passes, unless `BLK_REQUIRE_QEMU=1` (set it in CI).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn guest_image() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/guest-image"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/guest-image");
    assert!(out.status.success(), "scripts/guest-image failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("guest-image printed its directory")
            .trim(),
    )
}

fn value<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing from guest output:\n{console}"))
}

fn sha256_of(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), bytes).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

fn base64(data: &[u8]) -> String {
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("base64");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), data).unwrap();
    drop(child.stdin.take());
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
}

/// A QEMU guest whose console is collected as it arrives.
struct Qemu {
    child: std::process::Child,
    console: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Qemu {
    /// Boots the guest with `script` on a vhost-user-blk device at `socket`.
    fn boot(socket: &std::path::Path, script: &str) -> Qemu {
        let guest = guest_image();
        let append = format!(
            "console=ttyS0 reboot=k panic=-1 quiet runb64={}",
            base64(script.as_bytes())
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "2"])
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=c0,path={},reconnect=1",
                socket.display()
            ))
            .args([
                "-device",
                "vhost-user-blk-pci,chardev=c0,num-queues=2,romfile=",
            ])
            .args([
                "-nographic",
                "-no-reboot",
                "-monitor",
                "none",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(append)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start qemu");
        let mut stdout = child.stdout.take().unwrap();
        let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = console.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Qemu {
            child,
            console,
            reader: Some(reader),
        }
    }

    /// Waits (bounded) until the console shows `text`.
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !self.console.lock().unwrap().contains(text) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for QEMU to exit and returns the whole console.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let console = self.console.lock().unwrap().clone();
        console
    }
}

fn qemu_missing() -> bool {
    if !have_qemu() && std::env::var_os("BLK_REQUIRE_QEMU").is_none() {
        eprintln!(
            "skipped: qemu-system-x86_64 not installed (set BLK_REQUIRE_QEMU=1 to fail instead)"
        );
        return true;
    }
    false
}

#[test]
fn qemu_guest_writes_reach_the_host_file_through_blk_backend() {
    if qemu_missing() {
        return;
    }
    let dir = TempDir::new("qemu");
    let (backend, image) = Backend::with_image(&dir, 64 << 20, &["--queues", "2"]);

    let console = Qemu::boot(&backend.socket, GUEST_SCRIPT).finish();

    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    assert_eq!(value(&console, "SIZE="), "131072");
    assert_eq!(value(&console, "HWQ="), "2");
    assert_eq!(value(&console, "READ-A="), value(&console, "WROTE-A="));
    assert_eq!(value(&console, "READ-B="), value(&console, "WROTE-B="));
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(
        sha256_of(&disk[1 << 20..2 << 20]),
        value(&console, "WROTE-A=")
    );
    assert_eq!(
        sha256_of(&disk[3 << 20..4 << 20]),
        value(&console, "WROTE-B=")
    );
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
    let qemu = Qemu::boot(&backend.socket, KILL_SCRIPT);
    qemu.wait_for("WRITING");
    std::thread::sleep(Duration::from_millis(300));

    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    let _restarted = Backend::spawn(
        &backend.socket,
        &["--queues", "2", "--image", image.to_str().unwrap()],
    );
    let console = qemu.finish();

    assert!(
        console.contains("GUEST-RUN-END rc=0"),
        "guest script failed:\n{console}"
    );
    assert_eq!(value(&console, "DD-RC="), "0");
    assert_eq!(value(&console, "IOERRORS="), "0");
    assert_eq!(value(&console, "READ="), value(&console, "WROTE="));
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(sha256_of(&disk[..16 << 20]), value(&console, "WROTE="));
}
