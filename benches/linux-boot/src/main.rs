//! Time from VMM exec to the Debian guest's `/init`, measured in the nested
//! rig: `vmm` and `qemu-system-x86_64 -accel kvm -M microvm` boot the same
//! kernel and initramfs as L2 inside the same L1, interleaved run by run.
//!
//! The clock is the host's: L1 prints a start line right before it execs
//! the VMM, and L2's first instruction of userspace (an `rdinit` script)
//! prints a marker; both cross the same L1 serial port, so its latency is
//! the same for both VMMs. The kernel runs with `quiet`, so the figure is
//! boot work rather than console throughput.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rig::{build_release, guest_image, which, workspace_root, Payload, Rig, RigError};

#[derive(Parser)]
#[command(about = "vmm vs QEMU microvm: exec to the guest's /init, in the nested rig")]
struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
}

const INIT: &str = "#!/bin/sh\necho BENCH-INIT\n/bin/poweroff -f\n";

fn l1_script(runs: u32, memory: u32) -> String {
    format!(
        r#"
CMDLINE="console=ttyS0 reboot=k panic=1 quiet rdinit=/l2/init.sh"
cat $L2_INITRD $RIG/l2/init.cpio >/tmp/initrd
for i in $(seq {runs}); do
    echo "BENCH-START vmm $i"
    timeout -s KILL 120 vmm --kernel $L2_KERNEL --initramfs /tmp/initrd --memory {memory}M --cpus 1 \
        --cmdline "$CMDLINE" </dev/null
    echo "BENCH-END vmm $i rc=$?"
    echo "BENCH-START qemu $i"
    timeout -s KILL 120 qemu-system-x86_64 -L /usr/share/qemu -M microvm -accel kvm -cpu host -m {memory}M -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel $L2_KERNEL -initrd /tmp/initrd -append "$CMDLINE" </dev/null
    echo "BENCH-END qemu $i rc=$?"
done
"#
    )
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn run(a: Args) -> Result<(), RigError> {
    let root = workspace_root();
    let image = guest_image(&root)?;
    let release = build_release(&root)?;
    let qemu = which("qemu-system-x86_64")?;
    let firmware = ["bios-microvm.bin", "linuxboot_dma.bin", "kvmvapic.bin"]
        .iter()
        .map(|f| std::path::Path::new("/usr/share/qemu").join(f))
        .filter(|p| p.exists())
        .collect();
    let payload = Payload {
        bins: vec![qemu],
        files: firmware,
        l2_scripts: BTreeMap::from([("init".to_string(), INIT.to_string())]),
        script: l1_script(a.runs, a.memory),
    };
    let rig = Rig::build(&image, &release, &payload)?;
    eprintln!(
        "linux-boot: L1 boots under QEMU TCG, then {} boots per VMM (each tens of seconds)",
        a.runs
    );
    let mut started: Option<(String, Instant)> = None;
    let mut times: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let console = rig.run(&[], Duration::from_secs(7200), |l| {
        let now = Instant::now();
        if let Some(rest) = l.split("BENCH-START ").nth(1) {
            let who = rest.split_whitespace().next().unwrap_or_default();
            started = Some((who.to_string(), now));
        } else if l.contains("BENCH-INIT") {
            if let Some((who, t0)) = started.take() {
                let s = now.duration_since(t0).as_secs_f64();
                eprintln!("linux-boot: {who} {s:.2} s");
                times.entry(who).or_default().push(s);
            }
        } else if l.contains("BENCH-END") || l.contains("RIG-") {
            eprintln!("linux-boot: {l}");
        }
    })?;
    if console.timed_out || !console.finished() {
        eprintln!("{}", console.text());
        return Err(RigError::Failed("L1".into(), "did not finish".into()));
    }
    println!(
        "exec -> /init, Debian {} as L2 (1 vCPU, {} MiB, quiet) in the nested rig, {} runs each",
        std::fs::read_to_string(image.join("kernel-version"))
            .unwrap_or_default()
            .trim(),
        a.memory,
        a.runs
    );
    println!("| VMM | boots | min s | median s | max s |");
    println!("|---|---|---|---|---|");
    let mut medians = BTreeMap::new();
    for (who, v) in times.iter_mut() {
        let n = v.len();
        let (min, med, max) = stats(v);
        medians.insert(who.clone(), med);
        println!("| {who} | {n} | {min:.2} | {med:.2} | {max:.2} |");
    }
    if let (Some(v), Some(q)) = (medians.get("vmm"), medians.get("qemu")) {
        println!("ratio vmm / qemu microvm (medians): {:.2}x", v / q);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linux-boot: {}", rig::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
