//! `GET /metrics`: every VM's readings in the Prometheus text format, under
//! the names the libvirt exporters use, so existing dashboards and alerts
//! work: `libvirt_domain_info_*`, `libvirt_domain_vcpu_*`,
//! `libvirt_domain_block_stats_*` and `libvirt_domain_interface_stats_*`,
//! each with a `domain` label (the VM's name) and, for devices,
//! `target_device` (the device id in vm.info). What libvirt has no name
//! for is `vmm_domain_*`.
//!
//! Sources: vCPU time and exits from vmm's own counters; memory from
//! vm.info (maximum) and the host pages backing guest RAM (usage); disk
//! and NIC figures are the backends' own counters (blk-backend: requests,
//! bytes, time, flushes, errors; net-backend: frames, bytes, drops by
//! reason). A NIC's `receive_drops` are frames the guest had no buffer
//! for, `transmit_drops` oversized frames, `transmit_errors` bad chains
//! and headers and tap write errors; net-backend counts no receive errors.

use std::collections::BTreeMap;
use std::fmt::Write;

use vmm::api::metrics::label;

use crate::collect::Reading;

/// libvirt's `virDomainState` for a vm.info state: running 1, paused 3,
/// shut off 5 (created, shut down, or no VM in the vmm).
pub fn vstate(state: &str) -> u8 {
    match state {
        "Running" => 1,
        "Paused" => 3,
        _ => 5,
    }
}

/// Families in order of first use, each with its type and help.
#[derive(Default)]
struct Families {
    order: Vec<&'static str>,
    by_name: BTreeMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &str,
        value: f64,
    ) {
        let entry = self.by_name.entry(name).or_insert_with(|| {
            self.order.push(name);
            (kind, help, Vec::new())
        });
        entry.2.push(format!("{name}{{{labels}}} {value}"));
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: &str, value: f64) {
        self.add(name, "counter", help, labels, value);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &str, value: f64) {
        self.add(name, "gauge", help, labels, value);
    }

    fn text(self) -> String {
        let mut out = String::new();
        for name in self.order {
            let (kind, help, samples) = &self.by_name[name];
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in samples {
                let _ = writeln!(out, "{s}");
            }
        }
        out
    }
}

const NS: f64 = 1e-9;
const US: f64 = 1e-6;

fn block(f: &mut Families, r: &Reading, l: &str, id: &str) {
    let c = |n: &str| r.counter(id, n) as f64;
    f.counter(
        "libvirt_domain_block_stats_read_requests_total",
        "Read requests completed.",
        l,
        c("read_requests"),
    );
    f.counter(
        "libvirt_domain_block_stats_read_bytes_total",
        "Bytes read.",
        l,
        c("read_bytes"),
    );
    f.counter(
        "libvirt_domain_block_stats_read_time_seconds_total",
        "Time spent on reads.",
        l,
        c("read_time_ns") * NS,
    );
    f.counter(
        "libvirt_domain_block_stats_write_requests_total",
        "Write requests completed.",
        l,
        c("write_requests"),
    );
    f.counter(
        "libvirt_domain_block_stats_write_bytes_total",
        "Bytes written.",
        l,
        c("write_bytes"),
    );
    f.counter(
        "libvirt_domain_block_stats_write_time_seconds_total",
        "Time spent on writes.",
        l,
        c("write_time_ns") * NS,
    );
    f.counter(
        "libvirt_domain_block_stats_flush_requests_total",
        "Flush requests completed.",
        l,
        c("flush_requests"),
    );
    f.counter(
        "libvirt_domain_block_stats_flush_time_seconds_total",
        "Time spent on flushes.",
        l,
        c("flush_time_ns") * NS,
    );
    f.counter(
        "vmm_domain_block_errors_total",
        "Requests completed with an error status.",
        l,
        c("errors"),
    );
}

fn interface(f: &mut Families, r: &Reading, l: &str, id: &str) {
    let c = |n: &str| r.counter(id, n) as f64;
    let tx_errors = [
        "dropped_bad_chain",
        "dropped_bad_header",
        "dropped_bad_address",
        "dropped_tap_error",
    ]
    .iter()
    .map(|n| c(n))
    .sum();
    f.counter(
        "libvirt_domain_interface_stats_receive_bytes_total",
        "Bytes received by the guest.",
        l,
        c("rx_bytes"),
    );
    f.counter(
        "libvirt_domain_interface_stats_receive_packets_total",
        "Frames received by the guest.",
        l,
        c("rx_frames"),
    );
    f.counter(
        "libvirt_domain_interface_stats_receive_errors_total",
        "Receive errors.",
        l,
        0.0,
    );
    f.counter(
        "libvirt_domain_interface_stats_receive_drops_total",
        "Frames dropped for lack of guest buffers.",
        l,
        c("dropped_no_buffers"),
    );
    f.counter(
        "libvirt_domain_interface_stats_transmit_bytes_total",
        "Bytes sent by the guest.",
        l,
        c("tx_bytes"),
    );
    f.counter(
        "libvirt_domain_interface_stats_transmit_packets_total",
        "Frames sent by the guest.",
        l,
        c("tx_frames"),
    );
    f.counter(
        "libvirt_domain_interface_stats_transmit_errors_total",
        "Frames lost to bad chains or headers or tap errors.",
        l,
        tx_errors,
    );
    f.counter(
        "libvirt_domain_interface_stats_transmit_drops_total",
        "Oversized frames dropped.",
        l,
        c("dropped_oversize"),
    );
}

/// The exporter's text for `readings`.
pub fn render(readings: &[Reading]) -> String {
    let mut f = Families::default();
    for r in readings {
        let domain = format!("domain=\"{}\"", label(&r.name));
        f.gauge(
            "libvirt_domain_info_vstate",
            "Domain state (libvirt virDomainState: 1 running, 3 paused, 5 shut off).",
            &domain,
            f64::from(vstate(r.state())),
        );
        f.gauge(
            "vmm_domain_up",
            "Whether the domain's vmm answered.",
            &domain,
            if r.error.is_none() { 1.0 } else { 0.0 },
        );
        if r.info.is_none() {
            continue;
        }
        f.gauge(
            "libvirt_domain_info_virtual_cpus",
            "Number of virtual CPUs.",
            &domain,
            r.config_u64("/cpus/boot_vcpus").unwrap_or(0) as f64,
        );
        f.gauge(
            "libvirt_domain_info_maximum_memory_bytes",
            "Guest memory size.",
            &domain,
            r.config_u64("/memory/size").unwrap_or(0) as f64,
        );
        f.gauge(
            "libvirt_domain_info_memory_usage_bytes",
            "Guest memory the host has backed.",
            &domain,
            r.counter("vm", "memory_allocated_bytes") as f64,
        );
        f.counter(
            "libvirt_domain_info_cpu_time_seconds_total",
            "CPU time of all vCPUs.",
            &domain,
            r.counter("vm", "cpu_time_us") as f64 * US,
        );
        for (entry, _) in r
            .counters
            .range("vcpu".to_string()..)
            .take_while(|(k, _)| k.starts_with("vcpu"))
        {
            let vcpu = &entry["vcpu".len()..];
            let l = format!("{domain},vcpu=\"{vcpu}\"");
            f.counter(
                "libvirt_domain_vcpu_time_seconds_total",
                "CPU time of one vCPU.",
                &l,
                r.counter(entry, "cpu_time_us") as f64 * US,
            );
            for reason in ["pio", "mmio", "hlt", "interrupted"] {
                let lr = format!("{l},reason=\"{reason}\"");
                f.counter(
                    "vmm_domain_vcpu_exits_total",
                    "Exits of one vCPU to the VMM, by reason.",
                    &lr,
                    r.counter(entry, &format!("{reason}_exits")) as f64,
                );
            }
        }
        for (kind, ids) in [
            ("disks", r.device_ids("disks")),
            ("net", r.device_ids("net")),
        ] {
            for id in ids {
                let l = format!("{domain},target_device=\"{}\"", label(&id));
                let reached = r
                    .counters
                    .get(&id)
                    .is_some_and(|c| c.contains_key("backend_unreachable"));
                f.gauge(
                    "vmm_domain_backend_up",
                    "Whether the device's backend answered (absent: no metrics socket).",
                    &l,
                    if reached { 0.0 } else { 1.0 },
                );
                f.counter(
                    "vmm_domain_device_notify_exits_total",
                    "Queue notifications the VMM handled itself.",
                    &l,
                    r.counter(&id, "notify_exits") as f64,
                );
                if kind == "disks" {
                    block(&mut f, r, &l, &id);
                } else {
                    interface(&mut f, r, &l, &id);
                }
            }
        }
    }
    let mut out = String::from(
        "# HELP libvirt_up Whether the exporter works.\n# TYPE libvirt_up gauge\nlibvirt_up 1\n",
    );
    out.push_str(&f.text());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmm::api::counters::Counters;

    fn reading() -> Reading {
        Reading {
            name: "web".into(),
            info: Some(json!({
                "state": "Paused",
                "config": {
                    "cpus": {"boot_vcpus": 1},
                    "memory": {"size": 134217728},
                    "disks": [{"id": "_disk0"}],
                    "net": [{"id": "_net1"}],
                }
            })),
            counters: BTreeMap::from([
                (
                    "vm".into(),
                    Counters::from([("cpu_time_us".into(), 1_500_000)]),
                ),
                (
                    "vcpu0".into(),
                    Counters::from([("cpu_time_us".into(), 1_500_000), ("pio_exits".into(), 7)]),
                ),
                (
                    "_disk0".into(),
                    Counters::from([
                        ("read_bytes".into(), 4096),
                        ("read_time_ns".into(), 2_000_000_000),
                    ]),
                ),
                (
                    "_net1".into(),
                    Counters::from([("rx_bytes".into(), 60), ("dropped_no_buffers".into(), 2)]),
                ),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn a_paused_vm_has_libvirt_names_and_values() {
        let text = render(&[reading()]);

        for line in [
            "libvirt_domain_info_vstate{domain=\"web\"} 3",
            "libvirt_domain_info_cpu_time_seconds_total{domain=\"web\"} 1.5",
            "libvirt_domain_info_maximum_memory_bytes{domain=\"web\"} 134217728",
            "libvirt_domain_vcpu_time_seconds_total{domain=\"web\",vcpu=\"0\"} 1.5",
            "vmm_domain_vcpu_exits_total{domain=\"web\",vcpu=\"0\",reason=\"pio\"} 7",
            "libvirt_domain_block_stats_read_bytes_total{domain=\"web\",target_device=\"_disk0\"} 4096",
            "libvirt_domain_block_stats_read_time_seconds_total{domain=\"web\",target_device=\"_disk0\"} 2",
            "libvirt_domain_interface_stats_receive_bytes_total{domain=\"web\",target_device=\"_net1\"} 60",
            "libvirt_domain_interface_stats_receive_drops_total{domain=\"web\",target_device=\"_net1\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE libvirt_domain_info_vstate gauge")
                .count(),
            1
        );
    }

    #[test]
    fn an_unreachable_vmm_is_shut_off_and_down() {
        let r = Reading {
            name: "gone".into(),
            error: Some("Cannot reach the vmm".into()),
            ..Default::default()
        };

        let text = render(&[r]);

        assert!(text.contains("libvirt_domain_info_vstate{domain=\"gone\"} 5\n"));
        assert!(text.contains("vmm_domain_up{domain=\"gone\"} 0\n"));
        assert!(!text.contains("cpu_time"));
    }
}
