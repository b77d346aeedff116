//! `vmm-hostd` for the tests: run it, ask it over HTTP, read its
//! Prometheus text, and drive its dashboard in headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{root, workspace_bin, API_LIMIT};

/// A running vmm-hostd, killed when dropped.
pub struct Hostd {
    child: Child,
    pub addr: String,
}

impl Hostd {
    /// Starts vmm-hostd on a free loopback port with `run` as its
    /// `XDG_RUNTIME_DIR` (where it looks for vmm) and `args`.
    pub fn start(run: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(workspace_bin("vmm-hostd"));
        cmd.args(args).env("XDG_RUNTIME_DIR", run);
        Self::spawn(cmd)
    }

    /// Runs `cmd` (vmm-hostd, perhaps as another user with its own
    /// environment) on a free loopback port.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("vmm-hostd: serving http://")
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, addr }
    }

    /// `GET path` with extra header lines; (status, body).
    pub fn get(&self, path: &str, headers: &str) -> (u16, String) {
        self.request("GET", path, headers)
    }

    pub fn request(&self, method: &str, path: &str, headers: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(API_LIMIT)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let status = reply[9..12].parse().unwrap();
        let body = reply.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// `node dashboard.cjs` on this service's page, keeping its
    /// screenshot in `shot`, with the script's `options` (see there).
    pub fn browser(&self, shot: &Path, options: &[&str]) -> Command {
        let mut c = Command::new("node");
        c.arg(root().join("vmm/hostd/tests/dashboard.cjs"))
            .arg(format!("http://{}/", self.addr))
            .arg(shot)
            .args(options)
            .env("NODE_PATH", npm_modules());
        c
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `line_prefix ` in Prometheus `text`.
pub fn sample(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in\n{text}"))
}

/// Polls `f` until it holds or [`API_LIMIT`] passes.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + API_LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where scripts/setup installs playwright-core.
fn npm_modules() -> PathBuf {
    let cache = std::env::var_os("VMM_NPM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
                .join("vmm-npm")
        });
    let modules = cache.join("node_modules");
    assert!(
        modules.join("playwright-core").is_dir(),
        "playwright-core is not in {}: run scripts/setup",
        modules.display()
    );
    modules
}
