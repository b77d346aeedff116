//! The API's JSON request bodies, as the controller parses them.

use vmm::api::config::{parse, DiskConfigBody, NetConfigBody, VmConfigBody};
use vmm::api::{RestoreConfig, VmSnapshotConfig};
use vmm::snapshot::{dir_from_url, MemoryRestore};

/// The endpoint a body goes to: the input's first byte modulo the count.
pub const ENDPOINTS: [&str; 5] = [
    "vm.create",
    "vm.add-disk",
    "vm.add-net",
    "vm.restore",
    "vm.snapshot",
];

/// First byte: the endpoint ([`ENDPOINTS`]); the rest: the body.
pub fn api_body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match usize::from(which) % ENDPOINTS.len() {
        0 => {
            if let Ok((cfg, ids)) = parse::<VmConfigBody>(body).and_then(|b| b.into_config()) {
                // What into_config hands on must be valid and complete.
                assert!(
                    cfg.validate().is_ok(),
                    "into_config returned an invalid config"
                );
                assert_eq!(ids.len(), cfg.devices.len());
            }
        }
        1 => {
            let _ = parse::<DiskConfigBody>(body).and_then(|d| d.into_device("disk"));
        }
        2 => {
            let _ = parse::<NetConfigBody>(body).and_then(|d| d.into_device("net"));
        }
        3 => {
            if let Ok(cfg) = parse::<RestoreConfig>(body) {
                let _ = dir_from_url(&cfg.source_url);
                let _ = cfg
                    .memory_restore_mode
                    .as_deref()
                    .map(str::parse::<MemoryRestore>);
            }
        }
        _ => {
            if let Ok(cfg) = parse::<VmSnapshotConfig>(body) {
                let _ = dir_from_url(&cfg.destination_url);
            }
        }
    }
}
