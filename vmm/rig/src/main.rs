//! `rig`: boots L1 under QEMU TCG with the workspace's release binaries and
//! runs a shell script there (see the library docs for what the script can
//! use). L1's console goes to stdout; the exit status is the script's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rig::{build_release, guest_image, workspace_root, Payload, Rig, RigError};

#[derive(Parser)]
#[command(about = "Run a script in the nested-virtualization rig (L1 = QEMU TCG guest with svm)")]
struct Args {
    /// Raw images to attach to L1 as /dev/vda, /dev/vdb, ...
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// More host binaries to copy into L1's PATH, with their libraries.
    #[arg(long = "bin")]
    bins: Vec<PathBuf>,
    /// More host files to copy into L1 at the same path (e.g. QEMU firmware).
    #[arg(long = "file")]
    files: Vec<PathBuf>,
    /// More arguments for L1's kernel command line (e.g. idle=poll).
    #[arg(long = "l1-arg")]
    l1_args: Vec<String>,
    /// An L2 script: NAME=FILE, booted in L1 by `l2 NAME VMM-ARGS...`.
    #[arg(long = "l2")]
    l2: Vec<String>,
    /// The L1 shell script.
    script: PathBuf,
}

fn run(a: Args) -> Result<i32, RigError> {
    let root = workspace_root();
    let image = guest_image(&root)?;
    let release = build_release(&root)?;
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| RigError::Read(p.clone(), e));
    let mut l2_scripts = BTreeMap::new();
    for s in &a.l2 {
        let (name, file) = s.split_once('=').unwrap_or((s, s));
        l2_scripts.insert(name.to_string(), read(&PathBuf::from(file))?);
    }
    let payload = Payload {
        bins: a.bins,
        files: a.files,
        l2_scripts,
        script: read(&a.script)?,
    };
    let mut rig = Rig::build(&image, &release, &payload)?;
    for arg in &a.l1_args {
        rig.l1_arg(arg);
    }
    eprintln!("rig: booting L1 (QEMU TCG, -cpu max)");
    let console = rig.run(&a.disks, Duration::from_secs(a.timeout), |l| {
        println!("{l}")
    })?;
    if console.timed_out {
        eprintln!("rig: L1 did not finish within {} s: killed", a.timeout);
        return Ok(124);
    }
    let rc = console
        .lines
        .iter()
        .find_map(|l| {
            l.split_once("GUEST-RUN-END rc=")
                .map(|(_, v)| v.trim().parse().ok())
        })
        .flatten();
    Ok(rc.unwrap_or(1))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(rc) => ExitCode::from(rc.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("rig: {}", rig::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
