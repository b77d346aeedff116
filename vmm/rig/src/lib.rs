//! The nested-virtualization rig: real Linux guests under `vmm` on a host
//! whose own `/dev/kvm` cannot run them.
//!
//! `qemu-system-x86_64 -accel tcg -cpu max` gives its guest (L1) the `svm`
//! and `npt` flags. L1 runs the Debian cloud kernel from `scripts/guest-image`,
//! loads that kernel's own `kvm` modules and gets a working `/dev/kvm`; the
//! workspace's release `vmm`, `vmctl` and backends (with the shared libraries they
//! need) then boot the same kernel as L2. The L1 initramfs is the guest
//! image's initramfs with one uncompressed cpio archive appended: the
//! binaries, the libraries, the kvm modules, the L2 kernel and initramfs,
//! one small archive per L2 script, and the L1 script itself, which runs as
//! the guest image's `run=` command.
//!
//! Protocol on L1's console (the host reads it line by line):
//! - `RIG-READY` once `/dev/kvm` exists, `RIG-ERROR <why>` if it never does;
//! - `RIG-L2-BEGIN <name>` / `RIG-L2-END <name> rc=<vmm exit status>`
//!   around each L2 boot made with the shell function `l2` (below);
//! - `GUEST-RUN-END rc=<n>` when the L1 script ends (from the guest image's
//!   `/init`), after which L1 reboots and QEMU exits (`-no-reboot`);
//! - `RIG-GROUP-BEGIN <name>` / `RIG-GROUP-END <name>` around a group of
//!   steps that `group NAME && { ...; group_end NAME; }` runs, and
//!   `RIG-GROUP-SKIP <name>` instead when [`Rig::skip_groups`] named it:
//!   a caller whose L1 died boots it again and skips what is done
//!   ([`Console::done_groups`], [`Console::splice`]);
//! - `RIG-L2-SHUTDOWN <L1 trace record>` for each L2 triple fault that
//!   `triple_faulted` found: L1's KVM's `kvm_exit` record of it (RIP, and
//!   the event being delivered).
//!
//! Inside the L1 script, `l2 NAME VMM-ARGS...` boots L2 with `vmm` and the
//! initramfs extended by the L2 script registered as NAME (run as `/init`'s
//! `run=` command); `$L2_KERNEL`, `$L2_VMLINUX`, `$RIG` name the files.

pub mod cpio;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Errors building or running the rig.
#[derive(Debug, Error)]
pub enum RigError {
    #[error("Cannot run {0}")]
    Spawn(String, #[source] io::Error),
    #[error("{0} failed: {1}")]
    Failed(String, String),
    #[error("Cannot write the L1 initramfs")]
    Initramfs(#[source] io::Error),
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("No {0} in PATH")]
    NotFound(String),
}

type Result<T> = std::result::Result<T, RigError>;

/// `error: source: source ...` on one line, for the binaries' last words.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// The workspace root, from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("vmm/rig is two levels below the workspace root")
        .to_path_buf()
}

/// Whether this host's CPU has hardware virtualization (vmx or svm), in
/// which case Linux runs under `vmm` directly and the rig is not needed.
pub fn has_hw_virt() -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| RigError::Spawn(what.into(), e))?;
    if !out.status.success() {
        return Err(RigError::Failed(what.into(), out.status.to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds (or finds cached) the Debian guest image; returns its directory.
pub fn guest_image(root: &Path) -> Result<PathBuf> {
    let out = output(
        &mut Command::new(root.join("scripts/guest-image")),
        "scripts/guest-image",
    )?;
    let dir = out.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(dir))
}

/// Builds the workspace's release binaries that go into L1; returns the
/// directory holding them.
pub fn build_release(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    output(
        Command::new(cargo)
            .args(["build", "--release", "-q", "--bins"])
            .args(["-p", "vmm", "-p", "blk-backend", "-p", "net-backend"])
            .current_dir(root),
        "cargo build --release",
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release"))
}

/// Finds `name` in PATH.
pub fn which(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| RigError::NotFound(name.into()))
}

/// The shared libraries `bin` loads, as `ldd` resolves them on this host.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(bin), "ldd")?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// What goes into L1 besides the guest image.
#[derive(Default)]
pub struct Payload {
    /// Host binaries copied to `/rig/bin` with their shared libraries.
    pub bins: Vec<PathBuf>,
    /// Host files copied to the same path (QEMU's firmware).
    pub files: Vec<PathBuf>,
    /// L2 scripts by name: `l2 NAME ...` runs NAME in L2.
    pub l2_scripts: BTreeMap<String, String>,
    /// The L1 script (sourced after the rig's prelude).
    pub script: String,
}

const PRELUDE: &str = r#"
RIG=/rig
export PATH=$RIG/bin:$PATH
L2_KERNEL=$RIG/l2/vmlinuz L2_VMLINUX=$RIG/l2/vmlinux L2_INITRD=$RIG/l2/initramfs.cpio.gz
for m in $(cat $RIG/kvm/load-order); do
    case $m in
        kvm_amd) grep -qw svm /proc/cpuinfo || continue ;;
        kvm_intel) grep -qw vmx /proc/cpuinfo || continue ;;
    esac
    insmod $RIG/kvm/$m.ko || echo "RIG-NOTE cannot load $m"
done
if [ -c /dev/kvm ]; then echo RIG-READY; else echo "RIG-ERROR no /dev/kvm in L1"; exit 1; fi
# L1's KVM keeps a trace record of every SVM SHUTDOWN exit (code 127, an
# L2 triple fault) with the guest's RIP and the event it was delivering
# (EXITINTINFO: intr_info, error_code); nothing else is traced.
# triple_faulted LOG...: whether an L2 of these logs died of a triple
# fault; if so it prints those records (RIG-L2-SHUTDOWN) and clears them.
TRACE=/sys/kernel/tracing
mount -t tracefs nodev $TRACE 2>/dev/null
{ echo 'exit_reason == 127' >$TRACE/events/kvm/kvm_exit/filter &&
  echo 1 >$TRACE/events/kvm/kvm_exit/enable; } 2>/dev/null || echo "RIG-NOTE no kvm_exit trace in L1"
triple_faulted() {
    cat "$@" 2>/dev/null | grep -q "guest triple fault" || return 1
    grep 'reason shutdown' $TRACE/trace 2>/dev/null | sed 's/^ */RIG-L2-SHUTDOWN /'
    echo >$TRACE/trace 2>/dev/null
    return 0
}
# group NAME: whether to run the group NAME (false when the host's
# rig.skip=A,B,... names it, as done in an earlier L1 boot); says which.
RIG_SKIP=" $(sed -n 's/.* rig\.skip=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ') "
group() {
    case "$RIG_SKIP" in *" $1 "*) echo "RIG-GROUP-SKIP $1"; return 1 ;; esac
    echo "RIG-GROUP-BEGIN $1"
}
group_end() { echo "RIG-GROUP-END $1"; }
# l2 NAME VMM-ARGS...: boots L2 under vmm with the L2 script NAME as its
# run= command; L2's console is also kept in /tmp/l2-NAME.log.
# A boot that dies of a triple fault is made again (up to L2_TRIES boots),
# and said so (RIG-L2-RETRY; Console::l2 then gives the last boot's lines):
# seen in about 1 of 10 boots with 4 L2 vCPUs here, mostly in kernel init
# with no device active yet, sometimes in userspace during disk I/O, and in
# up to half the boots of the crash loop on a busy CI host. L1 migrated,
# compacted and reclaimed no page in such a run (/proc/vmstat), so it is
# not L1 moving L2's memory. One traced in L1's KVM (an L2 10 s after a
# local migration, whose memory is the very memfd it ran on before): the
# SHUTDOWN came while the CPU delivered a #PF with error code 0x10 (an
# instruction fetch from a page not present) at a kernel-text RIP, right
# after an interrupt exit in the middle of delivering IRQ 0xfd; kernel
# text is always present in Linux's page tables. L1's own kernel dies the
# same way under load (recursive page faults in a vCPU thread, "stack
# guard page was hit"). Later records show a #PF for a fetch whose walk
# hit a reserved bit (error code 0x18), and external interrupts whose
# delivery shut the vCPU down (intr_info 0x800000ec, the local timer; and
# 0x80000024 with QEMU 10.0 as L0 too). That points at QEMU TCG's nested
# SVM, but it is not proven: every retry's RIG-L2-SHUTDOWN lines need a
# look (QEMU's own microvm guest in L1 hung in 1 of 4 boots). With
# L2_NO_RETRY set the caller retries a whole scenario itself, looping
# `for try in $L2_TRY_LIST`.
L2_TRY_LIST="1 2 3 4 5"
L2_TRIES=${L2_TRY_LIST##* }
l2() {
    name=$1; shift
    # A boot without a script of its own (a restore) gets the plain image.
    cat $L2_INITRD $(ls $RIG/l2/$name.cpio 2>/dev/null) >/tmp/l2-$name.initrd
    echo "RIG-L2-BEGIN $name"
    # Its own loop variable: sh has no locals, and callers loop on `try`.
    for l2_try in $L2_TRY_LIST; do
        { timeout -s KILL ${L2_TIMEOUT:-600} vmm --initramfs /tmp/l2-$name.initrd "$@" 2>&1
          echo $? >/tmp/l2-$name.rc; } | tee /tmp/l2-$name.log
        triple_faulted /tmp/l2-$name.log && [ $l2_try -lt $L2_TRIES ] && [ -z "$L2_NO_RETRY" ] || break
        echo "RIG-L2-RETRY $name: triple fault, booting once more"
    done
    echo "RIG-L2-END $name rc=$(cat /tmp/l2-$name.rc)"
    rm -f /tmp/l2-$name.initrd
}
# wait_for FILE TEXT [SECONDS]: waits until FILE contains TEXT.
wait_for() {
    n=0
    until grep -q "$2" "$1" 2>/dev/null; do
        n=$((n + 1)); [ $n -le ${3:-600} ] || return 1; sleep 1
    done
}
"#;

/// A prepared L1: kernel and initramfs on disk.
pub struct Rig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Groups the L1 script skips (see the module's protocol).
    skip: Vec<String>,
    /// More arguments for L1's kernel command line.
    l1_args: Vec<String>,
    _dir: TempDir,
}

impl Rig {
    /// Assembles the L1 initramfs from the guest image in `image`, the
    /// `vmm`, `blk-backend` and `net-backend` in `release`, and `payload`.
    pub fn build(image: &Path, release: &Path, payload: &Payload) -> Result<Self> {
        let dir = TempDir::new("vmm-rig")?;
        let initramfs = dir.0.join("l1-initramfs.cpio");
        let f = File::create(&initramfs).map_err(RigError::Initramfs)?;
        let mut out = BufWriter::new(f);
        let read = |p: &Path| fs::read(p).map_err(|e| RigError::Read(p.to_path_buf(), e));
        let base = read(&image.join("initramfs.cpio.gz"))?;
        // The kernel looks for the next archive at a 4-byte boundary and
        // skips zeros up to it.
        let pad = [0u8; 3][..(4 - base.len() % 4) % 4].to_vec();
        out.write_all(&base)
            .and_then(|()| out.write_all(&pad))
            .map_err(RigError::Initramfs)?;
        let mut w = cpio::Writer::new(out);
        let wr = |r: io::Result<()>| r.map_err(RigError::Initramfs);

        let mut bins: Vec<PathBuf> = ["vmm", "vmctl", "blk-backend", "net-backend"]
            .iter()
            .map(|b| release.join(b))
            .collect();
        bins.extend(payload.bins.iter().cloned());
        let mut libs = BTreeMap::new();
        for b in &bins {
            let name = b.file_name().unwrap_or_default().to_string_lossy();
            wr(w.file(&format!("rig/bin/{name}"), 0o755, &read(b)?))?;
            for l in libraries(b)? {
                let name = l
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                libs.insert(name, l);
            }
        }
        // The host's libraries replace the guest image's (the binaries were
        // linked against them).
        for (name, l) in &libs {
            wr(w.file(&format!("lib/x86_64-linux-gnu/{name}"), 0o755, &read(l)?))?;
        }
        for f in &payload.files {
            let rel = f.to_string_lossy().trim_start_matches('/').to_string();
            wr(w.file(&rel, 0o644, &read(f)?))?;
        }
        let kvm = image.join("kvm-modules");
        for e in fs::read_dir(&kvm).map_err(|e| RigError::Read(kvm.clone(), e))? {
            let p = e.map_err(|e| RigError::Read(kvm.clone(), e))?.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            wr(w.file(&format!("rig/kvm/{name}"), 0o644, &read(&p)?))?;
        }
        for f in ["vmlinuz", "vmlinux", "initramfs.cpio.gz"] {
            if image.join(f).exists() {
                wr(w.file(&format!("rig/l2/{f}"), 0o644, &read(&image.join(f))?))?;
            }
        }
        for (name, script) in &payload.l2_scripts {
            // Appended to the same base archive in L1, so padded the same way.
            let mut l2 = cpio::Writer::new(pad.clone());
            wr(l2.file(&format!("l2/{name}.sh"), 0o755, script.as_bytes()))?;
            let archive = l2.finish().map_err(RigError::Initramfs)?;
            wr(w.file(&format!("rig/l2/{name}.cpio"), 0o644, &archive))?;
        }
        let script = format!("{PRELUDE}\n{}\n", payload.script);
        wr(w.file("rig/run.sh", 0o755, script.as_bytes()))?;
        w.finish()
            .and_then(|mut o| o.flush())
            .map_err(RigError::Initramfs)?;
        Ok(Self {
            kernel: image.join("vmlinuz"),
            initramfs,
            skip: Vec::new(),
            l1_args: Vec::new(),
            _dir: dir,
        })
    }

    /// Adds `arg` to L1's kernel command line, e.g. `idle=poll`: L1's
    /// vCPUs then never halt. Under QEMU 7.2 TCG, an L1 on a loaded host
    /// was seen halted on both vCPUs for good (a wake-up lost: QEMU's
    /// vCPU threads waiting in `qemu_wait_io_event`, no CPU used for
    /// minutes); a vCPU that polls cannot wait for a wake-up. It costs
    /// two host cores while L1 runs.
    pub fn l1_arg(&mut self, arg: &str) {
        self.l1_args.push(arg.to_string());
    }

    /// From the next run on, the L1 script's `group` skips these groups.
    pub fn skip_groups(&mut self, names: &[String]) {
        self.skip = names.to_vec();
    }

    /// The QEMU command that boots L1; `disks` become L1's `/dev/vda`,
    /// `/dev/vdb`, ... in order.
    pub fn command(&self, disks: &[PathBuf]) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3G",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(&self.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 loglevel=4 panic=-1 reboot=k run=/rig/run.sh{}{}",
            if self.skip.is_empty() {
                String::new()
            } else {
                format!(" rig.skip={}", self.skip.join(","))
            },
            self.l1_args
                .iter()
                .map(|a| format!(" {a}"))
                .collect::<String>()
        ));
        for (i, d) in disks.iter().enumerate() {
            c.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=d{i},format=raw,cache=unsafe",
                    d.display()
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=d{i}"));
        }
        c
    }

    /// Boots L1, runs the script and returns its console once QEMU exits
    /// (or, marked `timed_out`, once `limit` has passed and QEMU is killed).
    /// `progress` sees every console line as it arrives.
    pub fn run(
        &self,
        disks: &[PathBuf],
        limit: Duration,
        progress: impl FnMut(&str),
    ) -> Result<Console> {
        self.run_watched(disks, limit, limit, progress)
    }

    /// Like [`Self::run`], and also gives up (QEMU killed, the console
    /// marked `stalled`) when L1 prints nothing but kernel messages for
    /// `stall`: under TCG an L1 (or the L2 inside it) can stop dead, still
    /// using CPU, with nothing on its console, or wedge inside its kernel
    /// and report soft lockups and RCU stalls for as long as it is let.
    pub fn run_watched(
        &self,
        disks: &[PathBuf],
        limit: Duration,
        stall: Duration,
        progress: impl FnMut(&str),
    ) -> Result<Console> {
        watch(self.command(disks), limit, stall, progress)
    }
}

/// Runs `cmd` (L1's QEMU) and collects its output lines as a console: see
/// [`Rig::run_watched`].
fn watch(
    mut cmd: Command,
    limit: Duration,
    stall: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Console> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .map_err(|e| RigError::Spawn(cmd.get_program().to_string_lossy().into_owned(), e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let s = String::from_utf8_lossy(&line);
            for part in split_kernel_messages(s.trim_end_matches('\r')) {
                if tx.send(part.to_string()).is_err() {
                    return;
                }
            }
        }
    });
    let begun = Instant::now();
    let deadline = begun + limit;
    let mut lines = Vec::new();
    let guard = KillOnDrop(child);
    // The stall clock restarts on a line that is not a kernel message:
    // a wedged L1 (or L2) can print soft-lockup and RCU-stall reports
    // for as long as it is let, and one such boot once ran to its
    // time limit.
    let mut progress_at = begun;
    let mut line_at = begun;
    loop {
        let until = deadline.min(progress_at + stall);
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) => {
                line_at = Instant::now();
                if !is_kernel_message(&l) {
                    progress_at = line_at;
                }
                progress(&l);
                lines.push(l);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let timed_out = Instant::now() >= deadline;
                let line = if timed_out {
                    KILLED_AT_LIMIT
                } else if line_at > progress_at {
                    KILLED_KERNEL_ONLY
                } else {
                    KILLED_SILENT
                };
                progress(line);
                lines.push(line.to_string());
                return Ok(Console {
                    lines,
                    qemu_ok: false,
                    timed_out,
                    stalled: !timed_out,
                    secs: begun.elapsed().as_secs(),
                    ended: Vec::new(),
                });
            }
        }
    }
    let mut guard = guard;
    let status = guard.0.wait().ok();
    // For the reader of a failed run: how QEMU ended (an L1 that resets
    // ends it with status 0 under -no-reboot, printing nothing).
    let line = match status {
        Some(s) => format!("RIG-QEMU-EXIT {s}"),
        None => "RIG-QEMU-EXIT unknown".to_string(),
    };
    progress(&line);
    lines.push(line);
    Ok(Console {
        lines,
        qemu_ok: status.is_some_and(|s| s.success()),
        timed_out: false,
        stalled: false,
        secs: begun.elapsed().as_secs(),
        ended: Vec::new(),
    })
}

/// The console's last line when L1 was killed at its time limit.
pub const KILLED_AT_LIMIT: &str = "RIG-QEMU-KILLED at the time limit";
/// ... when it printed nothing for the stall limit.
pub const KILLED_SILENT: &str = "RIG-QEMU-KILLED after a silent stall";
/// ... when it printed only kernel messages for the stall limit.
pub const KILLED_KERNEL_ONLY: &str = "RIG-QEMU-KILLED after a stall with kernel messages only";

/// Whether `line` is a kernel message (L1's own or an L2's passed on):
/// `[  12.345678] ...`.
pub fn is_kernel_message(line: &str) -> bool {
    starts_with_kernel_stamp(line.trim_start())
}

fn starts_with_kernel_stamp(s: &str) -> bool {
    s.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(stamp, _)| stamp.trim())
        .is_some_and(|s| s.contains('.') && s.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// `line` cut before every kernel message glued to the text before it
/// (a message after a space is quoted on purpose: `L2-KERNEL-WARNING [...]`). A
/// guest's kernel writes the console synchronously while its userspace
/// output waits for the UART's transmit interrupt, so a kernel message can
/// land on the end of a userspace line whose newline is still queued
/// (CI saw `... sha=896b...4294[   85.399899] ACPI: PM: Preparing to
/// enter system sleep state S5`).
fn split_kernel_messages(line: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.match_indices('[').map(|(i, _)| i).find(|&i| {
        i > 0 && !rest[..i].ends_with(char::is_whitespace) && starts_with_kernel_stamp(&rest[i..])
    }) {
        parts.push(&rest[..i]);
        rest = &rest[i..];
    }
    parts.push(rest);
    parts
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What L1 printed.
pub struct Console {
    pub lines: Vec<String>,
    /// QEMU exited with status 0 (L1 ended by rebooting).
    pub qemu_ok: bool,
    /// L1 was killed at the time limit; `lines` is what it printed until then.
    pub timed_out: bool,
    /// L1 was killed after printing nothing but kernel messages for the
    /// stall limit.
    pub stalled: bool,
    /// How long the boot took (for a spliced console, the last boot).
    pub secs: u64,
    /// The boots before the last that ended early (`Console::splice`).
    pub ended: Vec<EndedBoot>,
}

/// An L1 boot that ended before its script did, as `Console::splice` keeps
/// it for a person reading a failed run: its groups completed are in the
/// spliced console, the rest is summed up here.
pub struct EndedBoot {
    /// 1 for the first boot.
    pub n: usize,
    pub secs: u64,
    /// The group it was in when it ended (`None`: between groups).
    pub group: Option<String>,
    /// Its console's last lines, with how QEMU ended last.
    pub tail: Vec<String>,
}

impl EndedBoot {
    /// One line: which boot, after how long, where, and how it ended.
    pub fn summary(&self) -> String {
        format!(
            "RIG-L1-RUN-ENDED {} after {} s in group {}: {}",
            self.n,
            self.secs,
            self.group.as_deref().unwrap_or("-"),
            self.tail.last().map_or("no output", String::as_str)
        )
    }
}

impl Console {
    /// A console read back from its lines (a log the rig wrote earlier):
    /// the flags come from the rig's own last lines.
    pub fn from_lines(lines: Vec<String>) -> Self {
        let has = |m: &str| lines.iter().any(|l| l == m);
        let qemu_ok = has("RIG-QEMU-EXIT exit status: 0");
        let timed_out = has(KILLED_AT_LIMIT);
        let stalled = has(KILLED_SILENT) || has(KILLED_KERNEL_ONLY);
        Console {
            lines,
            qemu_ok,
            timed_out,
            stalled,
            secs: 0,
            ended: Vec::new(),
        }
    }

    /// The whole console as text.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Whether the L1 script ran to its end.
    pub fn finished(&self) -> bool {
        self.lines.iter().any(|l| l.contains("GUEST-RUN-END rc="))
    }

    /// The lines between the last `RIG-L2-BEGIN name` and its end marker
    /// (a scenario run once more prints its sections again). After a
    /// `RIG-L2-RETRY` inside the section, only the last boot's lines.
    pub fn l2(&self, name: &str) -> Vec<&str> {
        let begin = format!("RIG-L2-BEGIN {name}");
        let retry = format!("RIG-L2-RETRY {name}:");
        let end = format!("RIG-L2-END {name} ");
        let start = self
            .lines
            .iter()
            .rposition(|l| l.ends_with(&begin))
            .map_or(self.lines.len(), |i| i + 1);
        let all: Vec<&str> = self.lines[start..]
            .iter()
            .take_while(|l| !l.contains(&end))
            .map(String::as_str)
            .collect();
        match all.iter().rposition(|l| l.starts_with(&retry)) {
            Some(i) => all[i + 1..].to_vec(),
            None => all,
        }
    }

    /// The exit status of `vmm` for the L2 boot `name` (its last run).
    pub fn l2_status(&self, name: &str) -> Option<i32> {
        let end = format!("RIG-L2-END {name} rc=");
        self.lines
            .iter()
            .rev()
            .find_map(|l| l.find(&end).map(|i| &l[i + end.len()..]))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Whether the L2 boot `name` ran to its end inside a group that L1
    /// completed: its last `RIG-L2-END` is followed by a `RIG-GROUP-END`
    /// before any other group begins or the run ends. A test can trust
    /// such a boot even when L1 died in a later group.
    pub fn l2_done(&self, name: &str) -> bool {
        let end = format!("RIG-L2-END {name} ");
        let Some(i) = self.lines.iter().rposition(|l| l.contains(&end)) else {
            return false;
        };
        self.lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| {
                l.starts_with("RIG-GROUP-END ")
                    || l.starts_with("RIG-GROUP-BEGIN ")
                    || l.starts_with("RIG-L1-RUN-ENDED ")
            })
            .is_some_and(|l| l.starts_with("RIG-GROUP-END "))
    }

    /// The groups this run completed (`RIG-GROUP-END`), in order.
    pub fn done_groups(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.trim().strip_prefix("RIG-GROUP-END "))
            .map(|g| g.trim().to_string())
            .collect()
    }

    /// One console from the runs of a script that each skipped the groups
    /// the runs before it completed: every earlier run's completed groups,
    /// then the whole last run (in which those groups are skipped). A group
    /// an L1 died in is thus read from the run that completed it, and
    /// every group's lines appear once. The run flags are the last run's.
    pub fn splice(runs: Vec<Console>) -> Option<Console> {
        let n = runs.len();
        let mut lines = Vec::new();
        let mut ended = Vec::new();
        let mut last = None;
        for (i, mut run) in runs.into_iter().enumerate() {
            if i + 1 == n {
                lines.append(&mut run.lines);
                last = Some(run);
                break;
            }
            let mut block: Option<Vec<String>> = None;
            let mut group = None;
            let tail = run.lines[run.lines.len().saturating_sub(TAIL)..].to_vec();
            for l in run.lines {
                let t = l.trim();
                if let Some(g) = t.strip_prefix("RIG-GROUP-BEGIN ") {
                    block = Some(Vec::new());
                    group = Some(g.trim().to_string());
                }
                if let Some(b) = block.as_mut() {
                    b.push(l.clone());
                }
                if t.starts_with("RIG-GROUP-END ") {
                    lines.extend(block.take().unwrap_or_default());
                    group = None;
                }
            }
            let boot = EndedBoot {
                n: i + 1,
                secs: run.secs,
                group,
                tail,
            };
            lines.push(boot.summary());
            ended.push(boot);
        }
        last.map(|c| Console { lines, ended, ..c })
    }

    /// The value of the first `key=value` token on a line of `lines`.
    pub fn value<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
        let pat = format!("{key}=");
        lines.iter().find_map(|l| {
            l.split_whitespace()
                .find_map(|t| t.strip_prefix(pat.as_str()))
        })
    }
}

/// Lines of an ended boot kept for the report.
const TAIL: usize = 12;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..1000u32 {
            let p = base.join(format!("{tag}-{}-{n}", std::process::id()));
            match fs::create_dir(&p) {
                Ok(()) => return Ok(Self(p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(RigError::Read(p, e)),
            }
        }
        Err(RigError::Read(
            base,
            io::Error::from(io::ErrorKind::AlreadyExists),
        ))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(text: &str, finished: bool) -> Console {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        if finished {
            lines.push("GUEST-RUN-END rc=0".into());
        }
        Console {
            lines,
            qemu_ok: finished,
            timed_out: false,
            stalled: false,
            secs: 7,
            ended: Vec::new(),
        }
    }

    #[test]
    fn splice_takes_each_group_from_the_run_that_completed_it() {
        // The first L1 completed `a` and died in `b`; the second skipped
        // `a` and ran `b` to its end.
        let first = console(
            "RIG-READY\nRIG-GROUP-BEGIN a\nRIG-L2-BEGIN a\nx=1\nRIG-L2-END a rc=0\nL1-A=1\n\
             RIG-GROUP-END a\nRIG-GROUP-BEGIN b\nRIG-L2-BEGIN b\ny=1\nKernel panic",
            false,
        );
        assert_eq!(first.done_groups(), ["a"]);
        let second = console(
            "RIG-READY\nRIG-GROUP-SKIP a\nRIG-GROUP-BEGIN b\nRIG-L2-BEGIN b\ny=2\n\
             RIG-L2-END b rc=0\nRIG-GROUP-END b",
            true,
        );
        assert_eq!(second.done_groups(), ["b"]);
        let c = Console::splice(vec![first, second]).unwrap();
        assert!(c.finished() && c.qemu_ok);
        assert_eq!(c.l2("a"), ["x=1"]);
        assert_eq!(c.l2("b"), ["y=2"]);
        assert_eq!(c.l2_status("b"), Some(0));
        // The dead run's partial group is gone, its completed one kept once.
        assert_eq!(c.lines.iter().filter(|l| l.as_str() == "y=1").count(), 0);
        assert_eq!(c.lines.iter().filter(|l| l.as_str() == "L1-A=1").count(), 1);
        assert!(c
            .lines
            .iter()
            .any(|l| l == "RIG-L1-RUN-ENDED 1 after 7 s in group b: Kernel panic"));
        assert_eq!(c.ended.len(), 1);
        assert_eq!(c.ended[0].tail.last().unwrap(), "Kernel panic");
    }

    #[test]
    fn a_boot_counts_as_done_only_inside_a_completed_group() {
        // `a` completed; `b`'s L2 ended but L1 died before its group did;
        // `c` never ended.
        let first = console(
            "RIG-GROUP-BEGIN a\nRIG-L2-BEGIN a\nRIG-L2-END a rc=0\nRIG-GROUP-END a\n\
             RIG-GROUP-BEGIN b\nRIG-L2-BEGIN b\nRIG-L2-END b rc=0\nRIG-L2-BEGIN c\nKernel panic",
            false,
        );
        assert!(first.l2_done("a"));
        assert!(!first.l2_done("b"));
        assert!(!first.l2_done("c"));
        let c = Console::splice(vec![
            first,
            console(
                "RIG-GROUP-SKIP a\nRIG-GROUP-BEGIN b\nRIG-L2-BEGIN b\n",
                false,
            ),
        ])
        .unwrap();
        assert!(c.l2_done("a"));
        assert!(!c.l2_done("b"));
    }

    #[test]
    fn kernel_messages_are_told_from_other_lines() {
        assert!(is_kernel_message(
            "[  354.769094] Kernel panic - not syncing"
        ));
        assert!(is_kernel_message("[    0.000000] Linux version 6.1"));
        assert!(!is_kernel_message("RIG-L2-BEGIN main"));
        assert!(!is_kernel_message("L2-NPROC=2"));
        assert!(!is_kernel_message("[ ok ] started"));
        assert!(!is_kernel_message("[]"));
        assert!(!is_kernel_message(
            "2026-12-03T10:00:00Z  INFO vmm: [1.5] ready"
        ));
    }

    #[test]
    fn a_kernel_message_glued_to_a_line_is_cut_off_it() {
        assert_eq!(
            split_kernel_messages("L2-X sha=896b[   85.399899] ACPI: PM: S5"),
            ["L2-X sha=896b", "[   85.399899] ACPI: PM: S5"]
        );
        assert_eq!(
            split_kernel_messages("a=1[ 1.5] k1[ 2.5] k2"),
            ["a=1", "[ 1.5] k1", "[ 2.5] k2"]
        );
        assert_eq!(
            split_kernel_messages("[   1.000000] x"),
            ["[   1.000000] x"]
        );
        assert_eq!(split_kernel_messages("  [ 1.0] x"), ["  [ 1.0] x"]);
        assert_eq!(split_kernel_messages("a [ok] b [x.y]"), ["a [ok] b [x.y]"]);
        assert_eq!(split_kernel_messages(""), [""]);
        assert_eq!(
            split_kernel_messages("L2-KERNEL-WARNING [   1.5] x"),
            ["L2-KERNEL-WARNING [   1.5] x"]
        );
        // Through the watchdog, as the rig reads L1's console.
        let c = watch_sh("echo 'L2-T sha=ab[  8.1] ACPI: down'", 60, 10);
        assert_eq!(c.lines[..2], ["L2-T sha=ab", "[  8.1] ACPI: down"]);
    }

    /// The console of `sh -c script` watched with these limits in seconds.
    fn watch_sh(script: &str, limit: u64, stall: u64) -> Console {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        watch(
            c,
            Duration::from_secs(limit),
            Duration::from_secs(stall),
            |_| {},
        )
        .unwrap()
    }

    #[test]
    fn a_console_of_kernel_messages_only_is_a_stall() {
        // A wedged kernel's reports, ten a second, restart no stall clock.
        let t = Instant::now();
        let c = watch_sh("echo RIG-READY; while :; do echo '[  12.000001] rcu: INFO: rcu_preempt detected stalls'; sleep 0.1; done", 60, 2);
        assert!(c.stalled && !c.timed_out && !c.qemu_ok);
        assert_eq!(c.lines.first().unwrap(), "RIG-READY");
        assert_eq!(c.lines.last().unwrap(), KILLED_KERNEL_ONLY);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }

    #[test]
    fn lines_other_than_kernel_messages_keep_a_boot_going() {
        // 4 s of output, each line within the 2 s stall limit, mixed.
        let c = watch_sh(
            "for i in 1 2 3 4 5 6 7 8; do echo \"[   1.0] x\"; echo L1-STEP=$i; sleep 0.5; done",
            60,
            2,
        );
        assert!(c.qemu_ok && !c.stalled && !c.timed_out);
        assert_eq!(c.lines.last().unwrap(), "RIG-QEMU-EXIT exit status: 0");
        assert_eq!(c.lines.len(), 17);
    }

    #[test]
    fn silence_is_a_stall_and_the_limit_ends_a_busy_boot() {
        let c = watch_sh("echo a; exec sleep 60", 60, 1);
        assert!(c.stalled && !c.timed_out);
        assert_eq!(c.lines, ["a", KILLED_SILENT]);
        let c = watch_sh("while :; do echo L1-BUSY; sleep 0.1; done", 2, 1);
        assert!(c.timed_out && !c.stalled);
        assert_eq!(c.lines.last().unwrap(), KILLED_AT_LIMIT);
        // Read back from its lines, a console keeps its flags.
        let back = Console::from_lines(c.lines.clone());
        assert!(back.timed_out && !back.stalled && !back.qemu_ok);
    }

    #[test]
    fn splice_of_one_run_is_that_run() {
        let c = Console::splice(vec![console("RIG-GROUP-BEGIN a\nz\n", false)]).unwrap();
        assert_eq!(c.lines, ["RIG-GROUP-BEGIN a", "z"]);
        assert!(!c.finished());
        assert!(Console::splice(Vec::new()).is_none());
    }

    #[test]
    fn skipped_groups_reach_the_l1_command_line() {
        let dir = TempDir::new("rig-test").unwrap();
        let mut rig = Rig {
            kernel: dir.0.join("k"),
            initramfs: dir.0.join("i"),
            skip: Vec::new(),
            l1_args: vec!["idle=poll".into()],
            _dir: dir,
        };
        let append = |rig: &Rig| {
            let c = rig.command(&[]);
            let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into()).collect();
            let i = args.iter().position(|a| a == "-append").unwrap();
            args[i + 1].clone()
        };
        assert!(!append(&rig).contains("rig.skip"));
        assert!(append(&rig).ends_with(" run=/rig/run.sh idle=poll"));
        rig.skip_groups(&["main".into(), "qsd".into()]);
        assert!(append(&rig).ends_with(" rig.skip=main,qsd idle=poll"));
        rig.l1_arg("x=1");
        assert!(append(&rig).ends_with(" idle=poll x=1"));
    }
}
