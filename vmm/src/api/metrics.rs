//! `GET /vm.metrics` (ours): the VM's counters (the map vm.counters
//! answers) in the Prometheus text exposition format 0.0.4, for a
//! Prometheus that scrapes one vmm directly.
//!
//! Entry `vm` becomes `vmm_vm_<counter>`, entries `vcpuN` become
//! `vmm_vcpu_<counter>{vcpu="N"}` and each device entry
//! `vmm_device_<counter>{device="<id>"}`; counters get `_total`, the
//! few gauges ([`GAUGES`]) do not. `vmm_vm_state{state="..."} 1` carries
//! vm.info's state. The host-wide exporter (`vmm-hostd`) serves the same
//! counters under libvirt exporter names instead.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::counters::{Counters, VCPU_ENTRY, VM_ENTRY};

/// Counter names that go up and down.
pub const GAUGES: &[&str] = &[
    "in_flight",
    "memory_allocated_bytes",
    "ctrl_queue_pairs",
    "ctrl_rx_mode",
    "ctrl_mac_filters",
    "backend_unreachable",
];

/// Escapes a label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Keeps a metric name to `[a-zA-Z0-9_]`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The Prometheus text of `counters` (vm.counters' map) and `state`.
pub fn render(state: Option<&str>, counters: &BTreeMap<String, Counters>) -> String {
    // family name -> (type, samples)
    let mut families: BTreeMap<String, (&str, Vec<String>)> = BTreeMap::new();
    let mut add = |family: String, gauge: bool, labels: String, value: u64| {
        let name = if gauge {
            family
        } else {
            format!("{family}_total")
        };
        let kind = if gauge { "gauge" } else { "counter" };
        families
            .entry(name.clone())
            .or_insert_with(|| (kind, Vec::new()))
            .1
            .push(format!("{name}{labels} {value}"));
    };
    for (entry, values) in counters {
        let (prefix, labels) = if entry == VM_ENTRY {
            ("vmm_vm".to_string(), String::new())
        } else if let Some(n) = super::counters::reserved_id(entry)
            .then(|| entry.strip_prefix(VCPU_ENTRY))
            .flatten()
        {
            ("vmm_vcpu".to_string(), format!("{{vcpu=\"{n}\"}}"))
        } else {
            (
                "vmm_device".to_string(),
                format!("{{device=\"{}\"}}", label(entry)),
            )
        };
        for (name, v) in values {
            let gauge = GAUGES.contains(&name.as_str());
            add(
                format!("{prefix}_{}", sanitize(name)),
                gauge,
                labels.clone(),
                *v,
            );
        }
    }
    let mut out = String::new();
    if let Some(s) = state {
        let _ = writeln!(out, "# TYPE vmm_vm_state gauge");
        let _ = writeln!(out, "vmm_vm_state{{state=\"{}\"}} 1", label(s));
    }
    for (name, (kind, samples)) in families {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in samples {
            let _ = writeln!(out, "{s}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_labelled_families_with_one_type_line_each() {
        let counters = BTreeMap::from([
            (
                "vm".to_string(),
                Counters::from([
                    ("pio_exits".into(), 5),
                    ("memory_allocated_bytes".into(), 4096),
                ]),
            ),
            (
                "vcpu0".to_string(),
                Counters::from([("pio_exits".into(), 5)]),
            ),
            (
                "_disk0".to_string(),
                Counters::from([("read_bytes".into(), 512), ("in_flight".into(), 1)]),
            ),
            (
                "_disk1".to_string(),
                Counters::from([("read_bytes".into(), 0)]),
            ),
        ]);

        let text = render(Some("Running"), &counters);

        assert!(
            text.contains("vmm_vm_state{state=\"Running\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("vmm_vm_pio_exits_total 5\n"), "{text}");
        assert!(
            text.contains("vmm_vm_memory_allocated_bytes 4096\n"),
            "{text}"
        );
        assert!(
            text.contains("vmm_vcpu_pio_exits_total{vcpu=\"0\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("vmm_device_read_bytes_total{device=\"_disk0\"} 512\n"));
        assert!(text.contains("vmm_device_in_flight{device=\"_disk0\"} 1\n"));
        assert_eq!(
            text.matches("# TYPE vmm_device_read_bytes_total counter")
                .count(),
            1
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
