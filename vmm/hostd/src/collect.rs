//! One reading of every running vmm: its vm.info and vm.counters, asked
//! over its API socket with a short timeout, all VMs at once (one thread
//! each), so a vmm that hangs delays a scrape by [`TIMEOUT`] at most and
//! hides no other VM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use thiserror::Error;
use vmm::api::client::{self, ClientError};
use vmm::api::counters::Counters;
use vmm::api::registry::{self, Found};

/// How long one vmm may take to answer one request.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Errors asking one vmm.
#[derive(Debug, Error)]
pub enum CollectError {
    #[error("Cannot reach the vmm")]
    Client(#[source] ClientError),
    #[error("The vmm answered HTTP {0}: {1}")]
    Status(u16, String),
    #[error("The vmm's answer is not the expected JSON")]
    Json(#[source] serde_json::Error),
}

/// What one vmm told us.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub name: String,
    pub socket: PathBuf,
    /// vm.info (None: no VM, or it did not answer).
    pub info: Option<Value>,
    /// vm.counters by entry (empty without a VM).
    pub counters: BTreeMap<String, Counters>,
    /// Why the vmm could not be read, if it could not.
    pub error: Option<String>,
}

impl Reading {
    /// vm.info's state: `Created`, `Running`, `Paused`, `Shutdown`, or
    /// `NoVm` when the vmm has none.
    pub fn state(&self) -> &str {
        self.info
            .as_ref()
            .and_then(|i| i.get("state")?.as_str())
            .unwrap_or("NoVm")
    }

    /// The device ids of one kind in vm.info's config (`disks`, `net`).
    pub fn device_ids(&self, kind: &str) -> Vec<String> {
        self.info
            .as_ref()
            .and_then(|i| i.pointer(&format!("/config/{kind}"))?.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|d| Some(d.get("id")?.as_str()?.to_string()))
            .collect()
    }

    /// A number in vm.info's config, by JSON pointer below `/config`.
    pub fn config_u64(&self, pointer: &str) -> Option<u64> {
        self.info
            .as_ref()?
            .pointer(&format!("/config{pointer}"))?
            .as_u64()
    }

    /// One counter of one entry (0 when absent).
    pub fn counter(&self, entry: &str, name: &str) -> u64 {
        self.counters
            .get(entry)
            .and_then(|c| c.get(name))
            .copied()
            .unwrap_or(0)
    }
}

/// Sends `method endpoint` to the vmm at `socket`; 2xx bodies only.
pub fn ask(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &[u8],
) -> Result<String, CollectError> {
    let reply =
        client::raw_with_body(socket, method, endpoint, body).map_err(CollectError::Client)?;
    if reply.status / 100 != 2 {
        return Err(CollectError::Status(
            reply.status,
            reply.body.trim().to_string(),
        ));
    }
    Ok(reply.body)
}

fn get_json(socket: &Path, endpoint: &str) -> Result<Option<Value>, CollectError> {
    let reply = client::get(
        socket,
        &format!("{}{endpoint}", vmm::api::http::API_PREFIX),
        TIMEOUT,
    )
    .map_err(CollectError::Client)?;
    match reply.status {
        200 => serde_json::from_str(&reply.body)
            .map(Some)
            .map_err(CollectError::Json),
        404 => Ok(None),
        s => Err(CollectError::Status(s, reply.body.trim().to_string())),
    }
}

/// Reads one vmm.
pub fn read(found: &Found) -> Reading {
    let mut r = Reading {
        name: found.name.clone(),
        socket: found.socket.clone(),
        ..Default::default()
    };
    let info = get_json(&found.socket, "vm.info");
    let counters = get_json(&found.socket, "vm.counters").and_then(|c| {
        c.map(|v| serde_json::from_value(v).map_err(CollectError::Json))
            .transpose()
    });
    match (info, counters) {
        (Ok(info), Ok(counters)) => {
            r.info = info;
            r.counters = counters.unwrap_or_default();
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(vm = %r.name, error = %vmm::error_chain(&e), "cannot read a vmm");
            r.error = Some(vmm::error_chain(&e));
        }
    }
    r
}

/// Reads every vmm [`registry::discover`] finds, in parallel.
pub fn read_all() -> Vec<Reading> {
    let found = registry::discover();
    std::thread::scope(|s| {
        let handles: Vec<_> = found.iter().map(|f| s.spawn(move || read(f))).collect();
        handles
            .into_iter()
            .zip(&found)
            .map(|(h, f)| {
                h.join().unwrap_or_else(|_| Reading {
                    name: f.name.clone(),
                    socket: f.socket.clone(),
                    error: Some("reader panicked".into()),
                    ..Default::default()
                })
            })
            .collect()
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
