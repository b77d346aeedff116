//! Shared helpers: a blk-backend child process on a temporary socket, and a
//! synthetic frontend connected to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backends::frontend::blk::BlkDriver;
use backends::frontend::{FrontendConfig, SyntheticFrontend};

pub const TIMEOUT: Duration = Duration::from_secs(20);
pub const DISK: u64 = 8 << 20;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("blk-it-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// A scratch directory in /dev/shm, where blk-backend serves an image
    /// from its mapping (`MemoryStorage`) instead of through io_uring.
    pub fn on_tmpfs(tag: &str) -> Self {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            mounts.lines().any(|l| l.starts_with("tmpfs /dev/shm ")
                || l.split_whitespace().nth(1) == Some("/dev/shm")
                    && l.split_whitespace().nth(2) == Some("tmpfs")),
            "/dev/shm is not a tmpfs here"
        );
        let p = Path::new("/dev/shm").join(format!("blk-it-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running blk-backend process, killed on drop.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
}

impl Backend {
    pub fn spawn(socket: &Path, args: &[&str]) -> Self {
        Self::spawn_with_stderr(socket, args, Stdio::inherit())
    }

    /// Like [`Self::spawn`], the daemon's log going to `stderr`.
    pub fn spawn_with_stderr(socket: &Path, args: &[&str], stderr: Stdio) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(env!("CARGO_BIN_EXE_blk-backend"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("BLK_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Backend {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// A backend over a fresh zeroed image of `size` bytes in `dir`.
    pub fn with_image(dir: &TempDir, size: u64, args: &[&str]) -> (Self, PathBuf) {
        let image = dir.path("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size).unwrap();
        let mut all = vec!["--image", image.to_str().unwrap()];
        all.extend_from_slice(args);
        (Backend::spawn(&dir.path("blk.sock"), &all), image)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn config(queues: usize) -> FrontendConfig {
    FrontendConfig {
        num_queues: queues,
        mem_size: 32 << 20,
        ..Default::default()
    }
}

pub fn driver(socket: &Path, cfg: FrontendConfig) -> BlkDriver {
    let fe = SyntheticFrontend::connect(socket, cfg).unwrap();
    BlkDriver::new(fe, 32, 128 << 10).unwrap()
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
