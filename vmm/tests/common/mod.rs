//! Shared helpers for the integration tests: build the test guest, fetch the
//! Debian guest image, run the real `vmm` binary with a deadline.

#![allow(dead_code)]

pub mod hostd;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the test guest (once per test binary) and returns its ELF.
pub fn test_guest() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let manifest = root().join("vmm/test-guest/Cargo.toml");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-none",
                "--manifest-path",
            ])
            .arg(&manifest)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .expect("run cargo for the test guest");
        assert!(status.success(), "test guest build failed");
        root().join("vmm/test-guest/target/x86_64-unknown-none/release/test-guest")
    })
    .clone()
}

/// Builds (or finds cached) the Debian kernel + initramfs; returns the dir.
pub fn guest_image() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(root().join("scripts/guest-image"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/guest-image");
        assert!(out.status.success(), "scripts/guest-image failed");
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("guest-image prints its dir")
                .trim(),
        )
    })
    .clone()
}

/// What a finished `vmm` run left behind.
pub struct Run {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Lines of serial output, without carriage returns.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect()
    }
}

pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Reads `child`'s stdout up to and including the first line starting with
/// `ready`; panics, naming the lines so far, if the pipe ends first.
/// Returns the rest of the pipe and the lines read, without line ends.
pub fn read_until(child: &mut Child, ready: &str) -> (BufReader<ChildStdout>, Vec<String>) {
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        assert_ne!(out.read_line(&mut l).unwrap(), 0, "vmm exited: {lines:?}");
        lines.push(l.trim_end().to_string());
        if l.starts_with(ready) {
            return (out, lines);
        }
    }
}

/// Spawns `cmd`, a vmm serving the API on `socket` with stdout piped, and
/// waits until the API answers; returns it and its console, line by line
/// (line ends trimmed).
pub fn serve(mut cmd: Command, socket: &Path) -> (Child, Receiver<String>) {
    let mut child = cmd.spawn().expect("spawn vmm");
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (tx, console) = mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l.trim_end().to_string());
        }
    });
    let deadline = Instant::now() + API_LIMIT;
    while vmm::api::client::raw(socket, "GET", "vmm.ping").is_err() {
        assert!(child.try_wait().unwrap().is_none(), "vmm exited");
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, console)
}

/// The next line of `console` that starts with `prefix`; panics on a line
/// reporting a failure (`FAIL`) or after `limit`.
pub fn next_line(console: &Receiver<String>, prefix: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = console
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {prefix:?} line"));
        assert!(!l.contains("FAIL"), "{l}");
        if l.starts_with(prefix) {
            return l;
        }
    }
}

/// Runs `cmd` to completion or kills it after `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Run {
    let child = cmd.spawn().expect("spawn vmm");
    wait(child, limit)
}

/// Runs `cmd` until its stdout contains a line with `stop_at` (then kills
/// it), it exits, or `limit` passes (`timed_out`).
pub fn run_until(mut cmd: Command, limit: Duration, stop_at: &str) -> Run {
    let mut child = cmd.spawn().expect("spawn vmm");
    let stdout = child.stdout.take().expect("piped stdout");
    let t_err = drain(child.stderr.take());
    let (tx, rx) = std::sync::mpsc::channel();
    let stop_at = stop_at.to_string();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        for line in std::io::BufRead::split(std::io::BufReader::new(stdout), b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            out.push_str(&line);
            out.push('\n');
            if line.contains(&stop_at) {
                let _ = tx.send(());
            }
        }
        out
    });
    let seen = rx.recv_timeout(limit).is_ok();
    let _ = child.kill();
    let status = child.wait().ok();
    Run {
        status,
        stdout: reader.join().unwrap(),
        stderr: t_err.join().unwrap(),
        timed_out: !seen,
    }
}

/// Waits for `child` for at most `limit`, collecting its output.
pub fn wait(mut child: Child, limit: Duration) -> Run {
    let t_out = drain(child.stdout.take());
    let t_err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        timed_out,
    }
}

/// Reads a pipe to its end in a thread (empty if already taken).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Builds a binary of another workspace package (debug, like the tests)
/// and returns its path.
pub fn workspace_bin(pkg: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", pkg, "--bin", pkg])
        .current_dir(root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cannot build {pkg}");
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("debug")
        .join(pkg)
}

/// A new 64 MiB image of zeros at `<dir>/<name>`.
pub fn blank_image(dir: &Scratch, name: &str) -> PathBuf {
    let image = dir.path(name);
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    image
}

/// blk-backend serving a new 64 MiB image on `<dir>/blk.sock`, with
/// `args`: the daemon and its socket.
pub fn blk_backend(dir: &Scratch, args: &[&str]) -> (Daemon, PathBuf) {
    let image = blank_image(dir, "disk.img");
    let socket = dir.path("blk.sock");
    let mut cmd = Command::new(workspace_bin("blk-backend"));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .args(args);
    (Daemon::start(cmd, &socket), socket)
}

/// A backend process, killed when dropped.
pub struct Daemon(pub Child);

impl Daemon {
    /// Starts `cmd` and waits until `socket` exists.
    pub fn start(mut cmd: Command, socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn backend");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("backend exited early: {s}");
            }
            assert!(
                Instant::now() < deadline,
                "backend did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch directory for sockets and images, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of `key=N` in a `VMM_LOG=info` "VM stopped" line.
pub fn stat(stderr: &str, key: &str) -> Option<u64> {
    let line = stderr.lines().rev().find(|l| l.contains("VM stopped"))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A peer on a tap in a namespace: waits for the guest's frame (EtherType
/// 0x88b5), prints it, then answers with one of its own to `mac`.
const TAP_PEER: &str = r#"
import socket, sys, time
iface, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((iface, 0))
print("ready", flush=True)
s.settimeout(60)
f = s.recv(2048)
print("seen", f[:6].hex(), f[6:12].hex(), f[12:14].hex(), f[14:33].decode(), flush=True)
time.sleep(0.2)
s.send(mac + bytes.fromhex('020000000099') + b'\x88\xb5' + b'hello from the tap side'.ljust(46, b'\0'))
"#;

/// A network namespace, deleted (with everything in it) on drop.
pub struct Netns(pub String);

impl Netns {
    /// Starts [`TAP_PEER`] on `tap` (its script written in `dir`) and
    /// waits until it listens: the guest sends its frame once. Its output
    /// (the `seen` line) is read from the returned reader.
    #[allow(dead_code)]
    pub fn tap_peer(
        &self,
        dir: &Path,
        tap: &str,
        mac: &str,
    ) -> (Child, BufReader<std::process::ChildStdout>) {
        let script = dir.join("peer.py");
        std::fs::write(&script, TAP_PEER).unwrap();
        let mut peer = self
            .exec(&["python3", script.to_str().unwrap(), tap, mac])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(peer.stdout.take().unwrap());
        let mut ready = String::new();
        out.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
        (peer, out)
    }

    pub fn new() -> Option<Self> {
        // One per test: tests of one binary run in parallel.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vmmtest{}n{n}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        ok.then_some(Self(name))
    }

    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    pub fn run(&self, args: &[&str]) {
        let s = self.exec(args).status().unwrap();
        assert!(s.success(), "{args:?} failed");
    }

    /// net-backend serving `socket` on a new tap `tap` in the namespace,
    /// the link up and quiet.
    pub fn net_backend(&self, socket: &Path, tap: &str) -> Daemon {
        self.net_backend_with(socket, tap, &[])
    }

    /// [`Self::net_backend`] with more options.
    pub fn net_backend_with(&self, socket: &Path, tap: &str, args: &[&str]) -> Daemon {
        let mut cmd = self.exec(&[]);
        cmd.arg(workspace_bin("net-backend"))
            .arg("--socket")
            .arg(socket)
            .args(["--tap", tap, "--create-tap"])
            .args(args);
        let daemon = Daemon::start(cmd, socket);
        self.quiet_link_up(tap);
        daemon
    }

    /// Brings `iface` up with IPv6 off, so that only the test's own frames
    /// cross it (no autoconfiguration chatter).
    pub fn quiet_link_up(&self, iface: &str) {
        self.run(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ]);
        self.run(&["ip", "link", "set", iface, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// How long the API tests wait for a step.
pub const API_LIMIT: Duration = Duration::from_secs(30);

/// A vmm serving the API on `<dir>/<name>.sock`, killed when dropped.
pub struct ApiVmm {
    pub child: Child,
    pub socket: PathBuf,
    pub console: Receiver<String>,
}

impl ApiVmm {
    pub fn start(dir: &Scratch, name: &str) -> Self {
        Self::start_with(dir, name, vmm())
    }

    /// As [`Self::start`], running `cmd` (the vmm binary, perhaps under
    /// `ip netns exec` or with its own environment).
    pub fn start_with(dir: &Scratch, name: &str, mut cmd: Command) -> Self {
        let socket = dir.path(&format!("{name}.sock"));
        let err = std::fs::File::create(dir.path(&format!("{name}.stderr"))).unwrap();
        cmd.arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err);
        let (child, console) = serve(cmd, &socket);
        Self {
            child,
            socket,
            console,
        }
    }

    pub fn put(&self, endpoint: &str, body: &str) -> (u16, String) {
        let r = vmm::api::client::raw_with_body(&self.socket, "PUT", endpoint, body.as_bytes())
            .unwrap();
        (r.status, r.body)
    }

    pub fn state(&self) -> String {
        let r = vmm::api::client::raw(&self.socket, "GET", "vm.info").unwrap();
        match r.status {
            200 => serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string(),
            s => s.to_string(),
        }
    }

    /// The number on the next console line starting with `prefix`.
    pub fn next_count(&self, prefix: &str) -> u64 {
        let l = next_line(&self.console, prefix, API_LIMIT);
        l[prefix.len()..].trim().parse().unwrap()
    }

    /// Creates and boots the test guest with `cmdline` and `disks`.
    pub fn boot(&self, cmdline: &str, cpus: u8, disks: serde_json::Value) {
        let cfg = serde_json::json!({
            "payload": {"kernel": test_guest(), "cmdline": cmdline},
            "cpus": {"boot_vcpus": cpus, "max_vcpus": cpus},
            "memory": {"size": 128 << 20},
            "serial": {"mode": "Tty"},
            "disks": disks,
        });
        assert_eq!(self.put("vm.create", &cfg.to_string()).0, 204);
        assert_eq!(self.put("vm.boot", "").0, 204);
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test guest's disk pattern at byte offset `o` for `seed`.
pub fn pattern(o: u64, seed: u64) -> u64 {
    (o | seed << 48).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

pub fn assert_pattern(image: &Path, from: u64, len: u64, seed: u64) {
    let f = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, from).unwrap();
    for (i, w) in buf.chunks(8).enumerate() {
        let o = from + 8 * i as u64;
        assert_eq!(
            u64::from_le_bytes(w.try_into().unwrap()),
            pattern(o, seed),
            "disk byte {o} of {}",
            image.display()
        );
    }
}

/// qemu-storage-daemon exporting `image` as a writable vhost-user-blk
/// disk on `socket`.
pub fn qsd_command(image: &Path, socket: &Path) -> Command {
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=d0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    c
}
