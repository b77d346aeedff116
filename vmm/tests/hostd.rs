//! `vmm-hostd` against real vmm processes running the test guest with a
//! disk image (served by the blk-backend vmm starts) and a tap NIC (a
//! net-backend in a private network namespace): the exporter's libvirt
//! names and values, vmm's own vm.metrics, who may connect, and the
//! dashboard driven by headless Chromium.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::hostd::*;
use common::*;

/// A VM named `name` (its API socket `<name>.sock`) with `XDG_RUNTIME_DIR`
/// `run`, in namespace `ns` with a NIC on tap `tg0` and then a disk image:
/// the test guest writes and reads a block per round (`tg.blkcount`).
fn start_vm(dir: &Scratch, run: &Path, ns: &Netns, name: &str) -> ApiVmm {
    let image = dir.path(&format!("{name}.img"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut cmd = ns.exec(&[env!("CARGO_BIN_EXE_vmm")]);
    cmd.env("XDG_RUNTIME_DIR", run);
    let vm = ApiVmm::start_with(dir, name, cmd);
    let cfg = serde_json::json!({
        "payload": {"kernel": test_guest(), "cmdline": "tg.virtio tg.blkcount"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128 << 20},
        "serial": {"mode": "Tty"},
        "net": [{"tap": "tg0", "mac": "52:54:00:aa:bb:cc"}],
    });
    let (status, body) = vm.put("vm.create", &cfg.to_string());
    assert_eq!(status, 204, "{body}");
    // After the NIC: the guest sends its frame before its endless disk loop.
    let disk = serde_json::json!({ "path": image }).to_string();
    let (status, body) = vm.put("vm.add-disk", &disk);
    assert_eq!(status, 200, "{body}");
    assert_eq!(vm.put("vm.boot", "").0, 204);
    vm
}

/// A network namespace with the tap `tg0` up in it.
fn netns_with_tap() -> Netns {
    let ns = Netns::new().expect("ip netns add (the test runs as root)");
    ns.run(&[
        "ip",
        "tuntap",
        "add",
        "dev",
        "tg0",
        "mode",
        "tap",
        "vnet_hdr",
        "multi_queue",
    ]);
    ns.quiet_link_up("tg0");
    ns
}

/// A VM named `name` in a scratch directory of its own, with
/// `XDG_RUNTIME_DIR` `run` inside it; dropped VM first.
struct Setup {
    vm: ApiVmm,
    _ns: Netns,
    run: PathBuf,
    dir: Scratch,
}

fn setup(tag: &str, name: &str) -> Setup {
    let dir = Scratch::new(tag);
    let run = dir.path("run");
    std::fs::create_dir_all(&run).unwrap();
    let ns = netns_with_tap();
    let vm = start_vm(&dir, &run, &ns, name);
    Setup {
        vm,
        _ns: ns,
        run,
        dir,
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn exporter_serves_each_vm_under_libvirt_names() {
    let setup = setup("hostd-exporter", "web");
    let (web, run, dir) = (&setup.vm, &setup.run, &setup.dir);
    let hostd = Hostd::start(run, &["--socket", dir.path("hostd.sock").to_str().unwrap()]);
    let disk = "domain=\"web\",target_device=\"_disk1\"";
    let nic = "domain=\"web\",target_device=\"_net0\"";

    web.next_count("TG: blkcount");
    eventually("disk writes in /metrics", || {
        let m = hostd.get("/metrics", "").1;
        sample(
            &m,
            &format!("libvirt_domain_block_stats_write_requests_total{{{disk}}}"),
        ) > 0.0
    });
    let (status, running) = hostd.get("/metrics", "");
    assert_eq!(web.put("vm.pause", "").0, 204);
    let paused = hostd.get("/metrics", "").1;
    let own = vmm::api::client::raw(&web.socket, "GET", "vm.metrics").unwrap();

    println!("exporter output for one VM:\n{running}");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&running, "libvirt_domain_info_vstate{domain=\"web\"}"),
        1.0
    );
    assert_eq!(
        sample(&paused, "libvirt_domain_info_vstate{domain=\"web\"}"),
        3.0
    );
    assert!(
        sample(
            &running,
            "libvirt_domain_info_cpu_time_seconds_total{domain=\"web\"}"
        ) > 0.0
    );
    assert!(
        sample(
            &running,
            "libvirt_domain_info_memory_usage_bytes{domain=\"web\"}"
        ) > 0.0
    );
    assert_eq!(
        sample(
            &running,
            "libvirt_domain_info_maximum_memory_bytes{domain=\"web\"}"
        ),
        (128u64 << 20) as f64
    );
    for name in [
        "write_bytes_total",
        "read_requests_total",
        "read_bytes_total",
        "write_time_seconds_total",
    ] {
        let v = sample(
            &running,
            &format!("libvirt_domain_block_stats_{name}{{{disk}}}"),
        );
        assert!(v > 0.0, "{name} is {v}");
    }
    assert_eq!(
        sample(
            &running,
            &format!("vmm_domain_block_errors_total{{{disk}}}")
        ),
        0.0
    );
    // The guest sends one frame on its NIC, into the tap.
    assert_eq!(
        sample(
            &running,
            &format!("libvirt_domain_interface_stats_transmit_packets_total{{{nic}}}")
        ),
        1.0
    );
    assert!(
        sample(
            &running,
            &format!("libvirt_domain_interface_stats_transmit_bytes_total{{{nic}}}")
        ) >= 60.0
    );
    assert_eq!(own.status, 200);
    assert!(
        own.body.contains("vmm_vm_state{state=\"Paused\"} 1\n"),
        "{}",
        own.body
    );
    assert!(own
        .body
        .contains("vmm_device_write_bytes_total{device=\"_disk1\"}"));
    // Owner-only: vmm's API socket, the registry, hostd's own socket.
    assert_eq!(mode(&web.socket), 0o600);
    assert_eq!(mode(&run.join("vmm")), 0o700);
    assert_eq!(mode(&dir.path("hostd.sock")), 0o600);
}

#[test]
fn a_vm_that_exits_leaves_the_exporter() {
    let setup = setup("hostd-exit", "brief");
    let (vm, run) = (&setup.vm, &setup.run);
    let hostd = Hostd::start(run, &[]);
    assert!(hostd.get("/metrics", "").1.contains("domain=\"brief\""));

    assert_eq!(vm.put("vmm.shutdown", "").0, 204);
    eventually("the VM gone from /metrics", || {
        !hostd.get("/metrics", "").1.contains("domain=\"brief\"")
    });

    assert!(std::fs::read_dir(run.join("vmm")).unwrap().next().is_none());
}

#[test]
fn beyond_loopback_hostd_needs_a_token() {
    let out = Command::new(workspace_bin("vmm-hostd"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();

    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vmm-hostd: Listening on 0.0.0.0:0, beyond the loopback, needs --token-file"
    );
}

#[test]
fn with_a_token_every_request_must_carry_it() {
    let dir = Scratch::new("hostd-token");
    let token = dir.path("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let hostd = Hostd::start(&dir.0, &["--token-file", token.to_str().unwrap()]);

    let none = hostd.get("/metrics", "").0;
    let wrong = hostd.get("/metrics", "Authorization: Bearer nope\r\n").0;
    let bearer = hostd
        .get("/metrics", "Authorization: Bearer s3cret-token\r\n")
        .0;
    let page = hostd.get("/?token=s3cret-token", "").0;
    let action = hostd.request(
        "POST",
        "/api/vms/x/pause",
        "Authorization: Bearer s3cret-token\r\n",
    );

    assert_eq!((none, wrong, bearer, page), (401, 401, 200, 200));
    assert_eq!(action.0, 403, "an action without X-Vmm-Hostd: {}", action.1);
}

#[test]
fn a_page_of_another_host_name_is_refused_without_a_token() {
    let dir = Scratch::new("hostd-rebind");
    let hostd = Hostd::start(&dir.0, &[]);
    let mut s = TcpStream::connect(&hostd.addr).unwrap();

    write!(
        s,
        "GET /api/vms HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();

    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
}

#[test]
fn dashboard_in_chromium_pauses_and_resumes_a_vm() {
    let setup = setup("hostd-browser", "web");
    let (vm, run) = (&setup.vm, &setup.run);
    let hostd = Hostd::start(run, &[]);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);

    let out = hostd
        .browser(&shot, &[])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    println!("{said}");
    println!("screenshot: {}", shot.display());

    assert!(out.status.success(), "the browser script failed:\n{said}");
    let steps: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("step: "))
        .collect();
    assert_eq!(
        steps,
        [
            "running, disk busy",
            "paused, disk idle",
            "running, disk busy",
            "console shows the guest"
        ]
    );
    assert_eq!(vm.state(), "Running");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}
