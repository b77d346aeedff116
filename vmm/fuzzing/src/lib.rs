//! Fuzz target bodies.
//!
//! Each target is one plain function `fn(&[u8])` here, in [`TARGETS`]. Two
//! callers share it:
//! - the cargo-fuzz project in `vmm/fuzzing/fuzz/` (nightly, libFuzzer,
//!   sanitizers): one `fuzz_target!` per entry, run with
//!   `scripts/fuzz TARGET [SECONDS]`;
//! - the replay test `tests/replay.rs` (stable, part of
//!   `cargo test --workspace`): every file of `fuzzing/corpus/TARGET/`
//!   through its body, so CI replays the committed corpora and every crash
//!   ever found (each crash input is kept in the corpus once fixed).
//!
//! A body panics only on a bug: inputs the code under test refuses are
//! fine, a panic (an arithmetic overflow, an out-of-bounds index, a broken
//! invariant asserted here) is not.

pub mod api;
pub mod blk;
pub mod desc;
pub mod input;
pub mod mem;
pub mod migration;
pub mod net;
pub mod pci;
pub mod serial;
pub mod state;
pub mod vhost_user;

/// A target's body: takes any bytes, panics only on a bug.
pub type Body = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and the corpus
/// directory) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("api_body", api::api_body),
    ("state_file", state::state_file),
    ("serial", serial::serial),
    ("pci_devices", pci::pci_devices),
    ("desc_chain", desc::desc_chain),
    ("blk_request", blk::blk_request),
    ("net_tx", net::net_tx),
    ("net_ctrl", net::net_ctrl),
    ("vhost_user", vhost_user::vhost_user),
    ("migration_stream", migration::migration_stream),
];
