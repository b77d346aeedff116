//! QEMU as the reference frontend, for the backends' interop tests: boots the
//! Debian test guest from `scripts/guest-image` in `qemu-system-x86_64 -accel
//! tcg` with shared memfd memory and a vhost-user device, runs a shell script
//! in it and collects its serial console; optionally with a human monitor
//! (HMP) on a unix socket, for commands such as `migrate`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// True if QEMU is installed. Without it, prints why the test is skipped,
/// or panics if the environment variable `require` is `1` (CI sets it).
pub fn have_qemu(require: &str) -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            std::env::var(require).as_deref() != Ok("1"),
            "qemu-system-x86_64 is required ({require}=1)"
        );
        eprintln!("SKIPPED: qemu-system-x86_64 not installed (set {require}=1 to fail instead)");
    }
    ok
}

/// Builds (or finds cached) the guest kernel and initramfs; returns their directory.
pub fn guest_image() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/guest-image"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/guest-image");
    assert!(out.status.success(), "scripts/guest-image failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("guest-image output").trim())
}

/// Runs `cmd args` with `input` on stdin; returns its trimmed stdout.
pub fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect(cmd);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to child");
    let out = child.wait_with_output().expect("child output");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// SHA-256 of `data` in hex, as the guest's `sha256sum` prints it.
pub fn sha256(data: &[u8]) -> String {
    let sum = pipe("sha256sum", &[], data);
    sum.split(' ').next().unwrap_or_default().to_string()
}

/// The rest of the first console line starting with `key`.
pub fn value<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing from guest output:\n{console}"))
}

/// A QEMU guest whose console is collected as it arrives; killed on drop.
pub struct QemuGuest {
    child: Child,
    console: Arc<Mutex<String>>,
    /// QEMU's own messages (its stderr), e.g. why a vhost-user reconnect
    /// failed.
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    monitor: Option<PathBuf>,
    /// Held while the guest lives: see [`ONE_GUEST`].
    _slot: MutexGuard<'static, ()>,
}

/// One QEMU TCG guest at a time per test process. Two of them (2 vCPU
/// threads each) on a 2-core machine slow each other's boots beyond any
/// sane limit: MTTCG vCPUs spin on each other's IPIs when descheduled, and
/// one CI run saw a guest still short of userspace after 5 minutes. A test
/// that panicked leaves the lock poisoned; the next one takes it anyway.
static ONE_GUEST: Mutex<()> = Mutex::new(());

impl QemuGuest {
    /// Boots the guest (512 MiB of shared memfd memory, 2 vCPUs) with the
    /// vhost-user chardev `c0` on `socket` (reconnecting), the frontend
    /// arguments `device` that use it, and `script` run by its /init.
    pub fn boot(socket: &Path, device: &[&str], script: &str) -> QemuGuest {
        Self::spawn(socket, device, script, None)
    }

    /// Like [`Self::boot`], with the human monitor on the unix socket
    /// `monitor` (see [`Self::hmp`]).
    pub fn boot_with_monitor(
        socket: &Path,
        device: &[&str],
        script: &str,
        monitor: &Path,
    ) -> QemuGuest {
        Self::spawn(socket, device, script, Some(monitor))
    }

    fn spawn(socket: &Path, device: &[&str], script: &str, monitor: Option<&Path>) -> QemuGuest {
        let slot = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
        let guest = guest_image();
        let monitor_arg = match monitor {
            Some(path) => format!("unix:{},server=on,wait=off", path.display()),
            None => "none".into(),
        };
        let append = format!(
            "console=ttyS0 reboot=k panic=-1 quiet runb64={}",
            pipe("base64", &["-w0"], script.as_bytes())
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "2"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem", "-chardev"])
            .arg(format!(
                "socket,id=c0,path={},reconnect=1",
                socket.display()
            ))
            .args(device)
            .args(["-nographic", "-no-reboot", "-monitor", &monitor_arg])
            .args(["-serial", "stdio", "-kernel"])
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(append)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu");
        let console = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let reader = collect(child.stdout.take().expect("qemu stdout"), console.clone());
        // Joined by nobody: it ends when QEMU does.
        drop(collect(
            child.stderr.take().expect("qemu stderr"),
            stderr.clone(),
        ));
        QemuGuest {
            child,
            console,
            stderr,
            reader: Some(reader),
            monitor: monitor.map(Path::to_path_buf),
            _slot: slot,
        }
    }

    /// Runs one human monitor command and returns its output (the terminal
    /// echo included). Panics without a monitor or if QEMU does not answer.
    pub fn hmp(&self, command: &str) -> String {
        let path = self
            .monitor
            .as_ref()
            .expect("QEMU booted without a monitor");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match UnixStream::connect(path) {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => panic!("QEMU monitor: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("monitor timeout");
        let prompt = |conn: &mut UnixStream| {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while !out.ends_with(b"(qemu) ") {
                let n = conn.read(&mut buf).expect("QEMU monitor reply");
                assert!(n > 0, "QEMU monitor closed");
                out.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        prompt(&mut conn);
        conn.write_all(format!("{command}\n").as_bytes())
            .expect("QEMU monitor command");
        prompt(&mut conn)
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// What QEMU printed on its stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for the console to show `text` and the end of
    /// the line it is on (a value printed after it is then whole); returns
    /// the console, which may lack `text` if the time ran out.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            let line_done = console
                .find(text)
                .is_some_and(|at| console[at + text.len()..].contains('\n'));
            if line_done || Instant::now() >= deadline {
                return console;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for QEMU to exit, then returns the whole console.
    pub fn finish(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.console()
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A thread appending what `from` yields to `sink` until its end.
fn collect(mut from: impl Read + Send + 'static, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut c) = sink.lock() {
                c.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    })
}

/// Random moments for a crash loop's kills: a xorshift generator seeded
/// from the environment variable `env` (hex, to repeat a run) or else the
/// clock. The seed is printed on stderr.
pub struct KillMoments(u64);

impl KillMoments {
    /// A generator seeded from `env` or the clock.
    pub fn new(env: &str) -> Self {
        let seed = match std::env::var(env) {
            Ok(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .unwrap_or_else(|e| panic!("{env}={s}: {e}")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        };
        eprintln!("kill moments: seed {seed:#x} ({env} to repeat)");
        KillMoments(seed | 1)
    }

    /// The next delay, below `max`.
    pub fn below(&mut self, max: Duration) -> Duration {
        Duration::from_millis(self.next_u64() % max.as_millis().max(1) as u64)
    }

    /// The next raw number, for the other random choices of a crash loop.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
