//! `GET /vm.counters`: Cloud Hypervisor's `{ "<device id>": { "<counter>":
//! u64 } }` map, with what it cannot give for vhost-user devices.
//!
//! The controller answers at once with a [`CountersPlan`]: the VM-wide
//! counters it reads from the running VM's atomics (entry `vm`: exits by
//! reason and vCPU CPU time summed over the vCPUs, and
//! `memory_allocated_bytes`, the guest RAM the host has backed, and with a
//! serial pty `serial_dropped_bytes`, the output nobody read; entries
//! `vcpu0`.. the same per vCPU), and per device its
//! id, the VMM's own `notify_exits` and the backend's metrics socket if
//! one was named. The HTTP thread then resolves the plan on tokio's
//! blocking pool ([`CountersPlan::resolve`]), so neither the controller nor
//! a VM's event loop nor a vCPU waits on a backend: each socket is asked
//! `GET /counters` on its own thread with a [`FETCH_TIMEOUT`] bound, and its
//! `totals` are merged into the device's entry, a labelled counter
//! (`dropped_frames: {reason: n}`) as its sum plus one `dropped_<reason>`
//! each. A backend that does not answer gets `backend_unreachable: 1` and
//! a debug log line, never a failed request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::client::{self, ClientError};
use crate::vcpu::VcpuMetrics;
use crate::virtio::pci::TransportMetrics;

/// How long one backend may take to answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_millis(500);

/// The entry of the VM-wide counters.
pub const VM_ENTRY: &str = "vm";
/// The prefix of the per-vCPU entries: `vcpu0`, `vcpu1`, ...
pub const VCPU_ENTRY: &str = "vcpu";

/// Errors fetching a backend's counters.
#[derive(Debug, Error)]
pub enum CountersError {
    #[error("Cannot reach the backend's metrics socket")]
    Client(#[source] ClientError),
    #[error("The backend's metrics socket answered HTTP {0}")]
    Status(u16),
    #[error("The backend's counters are not the expected JSON")]
    Json(#[source] serde_json::Error),
    #[error("The backend's counters have no totals")]
    NoTotals,
}

/// Counters of one entry, by name.
pub type Counters = BTreeMap<String, u64>;

/// The running VM's shared counters, handed to the controller at boot.
#[derive(Clone, Debug)]
pub struct LiveCounters {
    /// Per vCPU, in id order.
    pub vcpus: Vec<Arc<VcpuMetrics>>,
    /// Guest RAM's memfd.
    pub memory: Arc<std::fs::File>,
    /// One per device, in device order.
    pub transports: Vec<Arc<TransportMetrics>>,
}

/// One device of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    pub id: String,
    /// Counters the VMM keeps itself.
    pub own: Counters,
    pub metrics_socket: Option<PathBuf>,
}

/// What the controller knows; [`Self::resolve`] adds the backends' part.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CountersPlan {
    /// VM-wide counters (absent when no VM runs).
    pub vm: Option<Counters>,
    /// Per vCPU (entries `vcpu0`, `vcpu1`, ...; empty when no VM runs).
    pub vcpus: Vec<Counters>,
    pub devices: Vec<DevicePlan>,
}

impl CountersPlan {
    /// Builds the plan from device ids and configs and, while the VM runs,
    /// its live counters.
    pub fn new(
        devices: impl Iterator<Item = (String, Option<PathBuf>)>,
        live: Option<&LiveCounters>,
    ) -> Self {
        let vm = live.map(|l| {
            let per_vcpu: Vec<Counters> = l.vcpus.iter().map(|m| vcpu_counters(m)).collect();
            let mut vm = Counters::new();
            for c in &per_vcpu {
                for (k, v) in c {
                    *vm.entry(k.clone()).or_default() += v;
                }
            }
            if let Some(bytes) = crate::memory::allocated_bytes(&l.memory) {
                vm.insert("memory_allocated_bytes".into(), bytes);
            }
            if let Some(pty) = crate::console::Pty::opened() {
                vm.insert("serial_dropped_bytes".into(), pty.dropped());
            }
            (vm, per_vcpu)
        });
        let (vm, vcpus) = match vm {
            Some((vm, vcpus)) => (Some(vm), vcpus),
            None => (None, Vec::new()),
        };
        let devices = devices
            .enumerate()
            .map(|(i, (id, metrics_socket))| DevicePlan {
                id,
                own: live
                    .and_then(|l| l.transports.get(i))
                    .map(|t| {
                        Counters::from([(
                            "notify_exits".into(),
                            t.notify_exits.load(Ordering::Relaxed),
                        )])
                    })
                    .unwrap_or_default(),
                metrics_socket,
            })
            .collect();
        Self { vm, vcpus, devices }
    }

    /// Fetches every backend's counters, one thread each, and returns the
    /// whole map. Blocks up to about [`FETCH_TIMEOUT`] per read.
    pub fn resolve(self) -> BTreeMap<String, Counters> {
        let mut out = BTreeMap::new();
        std::thread::scope(|scope| {
            let fetches: Vec<_> = self
                .devices
                .into_iter()
                .map(|d| {
                    let fetch = d
                        .metrics_socket
                        .clone()
                        .map(|s| scope.spawn(move || fetch(&s)));
                    (d, fetch)
                })
                .collect();
            for (d, fetch) in fetches {
                let mut entry = d.own;
                if let Some(fetch) = fetch {
                    match fetch.join() {
                        Ok(Ok(backend)) => entry.extend(backend),
                        Ok(Err(e)) => {
                            tracing::debug!(
                                id = %d.id,
                                error = %crate::error_chain(&e),
                                "backend counters unavailable"
                            );
                            entry.insert("backend_unreachable".into(), 1);
                        }
                        Err(_) => {
                            entry.insert("backend_unreachable".into(), 1);
                        }
                    }
                }
                out.insert(d.id, entry);
            }
        });
        if let Some(vm) = self.vm {
            out.insert(VM_ENTRY.into(), vm);
        }
        for (i, c) in self.vcpus.into_iter().enumerate() {
            out.insert(format!("{VCPU_ENTRY}{i}"), c);
        }
        out
    }
}

/// One vCPU's entry: exits by reason and its thread's CPU time.
fn vcpu_counters(m: &VcpuMetrics) -> Counters {
    let mut c = Counters::from([
        ("pio_exits".into(), m.pio_exits.load(Ordering::Relaxed)),
        ("mmio_exits".into(), m.mmio_exits.load(Ordering::Relaxed)),
        ("hlt_exits".into(), m.hlt_exits.load(Ordering::Relaxed)),
        (
            "interrupted_exits".into(),
            m.interrupted.load(Ordering::Relaxed),
        ),
    ]);
    if let Some(us) = m.cpu_time_us() {
        c.insert("cpu_time_us".into(), us);
    }
    c
}

/// Whether `id` names a VM-wide entry (`vm`, `vcpuN`), which device ids
/// may not take.
pub fn reserved_id(id: &str) -> bool {
    id == VM_ENTRY
        || id
            .strip_prefix(VCPU_ENTRY)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `GET /counters` on `socket`, its totals flattened.
fn fetch(socket: &Path) -> Result<Counters, CountersError> {
    let reply = client::get(socket, "/counters", FETCH_TIMEOUT).map_err(CountersError::Client)?;
    if reply.status != 200 {
        return Err(CountersError::Status(reply.status));
    }
    let doc: Value = serde_json::from_str(&reply.body).map_err(CountersError::Json)?;
    let totals = doc.get("totals").ok_or(CountersError::NoTotals)?;
    Ok(flatten(totals))
}

/// A backend's `totals` as flat counters: a number as is, a labelled
/// object (`dropped_frames: {bad_chain: 1}`) as its sum plus
/// `dropped_bad_chain`.
pub fn flatten(totals: &Value) -> Counters {
    let mut out = Counters::new();
    let Some(obj) = totals.as_object() else {
        return out;
    };
    for (name, v) in obj {
        if let Some(n) = v.as_u64() {
            out.insert(name.clone(), n);
        } else if let Some(labels) = v.as_object() {
            let prefix = name.strip_suffix("_frames").unwrap_or(name);
            let mut sum = 0u64;
            for (label, n) in labels {
                let n = n.as_u64().unwrap_or(0);
                sum = sum.saturating_add(n);
                out.insert(format!("{prefix}_{label}"), n);
            }
            out.insert(name.clone(), sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labelled_totals_become_a_sum_and_one_counter_per_label() {
        let totals = json!({"rx_bytes": 10, "dropped_frames": {"bad_chain": 1, "no_buffers": 2}});

        let c = flatten(&totals);

        assert_eq!(c["rx_bytes"], 10);
        assert_eq!(c["dropped_frames"], 3);
        assert_eq!(c["dropped_bad_chain"], 1);
        assert_eq!(c["dropped_no_buffers"], 2);
    }

    #[test]
    fn a_missing_backend_is_marked_unreachable() {
        let plan = CountersPlan::new(
            [("_disk0".to_string(), Some(PathBuf::from("/nonexistent/m")))].into_iter(),
            None,
        );

        let map = plan.resolve();

        assert_eq!(map["_disk0"]["backend_unreachable"], 1);
        assert!(!map.contains_key(VM_ENTRY));
    }
}
