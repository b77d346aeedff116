//! Replays every committed corpus file of every fuzz target through its
//! body, on stable, as part of `cargo test --workspace`: what a fuzzer once
//! found (crashes included, kept once fixed) stays fixed.

use std::path::PathBuf;

fn replay(target: &str) {
    let (_, body) = fuzzing::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("target is registered");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();

    for f in &files {
        let data = std::fs::read(f).expect("corpus file");
        body(&data);
    }

    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_replay_test() {
            let mut tested = [$(stringify!($name)),*];
            let mut registered: Vec<&str> = fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
            tested.sort();
            registered.sort();
            assert_eq!(tested.to_vec(), registered);
        }
    };
}

replay_tests!(
    api_body,
    state_file,
    serial,
    pci_devices,
    desc_chain,
    blk_request,
    net_tx,
    net_ctrl,
    vhost_user,
    migration_stream,
);
