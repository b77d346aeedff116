//! VHOST_USER_PROTOCOL_F_DEVICE_STATE between real blk-backend processes
//! (seccomp on): the synthetic frontend stops the rings as the VMM does
//! before a snapshot (SET_VRING_ENABLE 0, GET_VRING_BASE), saves the
//! backend's state through a pipe, and loads it into a new backend before
//! setting the rings up again.

mod common;

use std::io::Read;
use std::process::Stdio;

use backends::frontend::blk::{BlkDriver, S_OK};
use backends::frontend::FrontendError;
use common::*;

const WRITES: u64 = 10;
const BLOCK: usize = 4096;

fn image_args(image: &std::path::Path) -> Vec<&str> {
    vec!["--image", image.to_str().unwrap(), "--seccomp", "true"]
}

/// Writes blocks `from..to`, each with its own pattern, and checks each OK.
fn write_blocks(drv: &mut BlkDriver, from: u64, to: u64) {
    for i in from..to {
        let status = drv.write(0, i * 8, &pattern(i as u8, BLOCK), TIMEOUT);
        assert_eq!(status.unwrap(), S_OK, "write {i}");
    }
}

/// A backend on a fresh image with `WRITES` blocks written, its rings
/// stopped; returns it, its image, the driver and the saved state.
fn saved_after_io(dir: &TempDir) -> (Backend, std::path::PathBuf, BlkDriver, Vec<u8>) {
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let backend = Backend::spawn(&dir.path("a.sock"), &image_args(&image));
    let mut drv = driver(&backend.socket, config(1));
    write_blocks(&mut drv, 0, WRITES);
    drv.frontend().stop_queues().unwrap();
    let state = drv.frontend().save_device_state().unwrap();
    (backend, image, drv, state)
}

#[test]
fn state_loaded_into_a_new_backend_resumes_io_at_the_saved_ring_position() {
    let dir = TempDir::new("ds-resume");
    let (first, image, mut drv, state) = saved_after_io(&dir);
    drop(first);
    let second = Backend::spawn(&dir.path("b.sock"), &image_args(&image));

    drv.frontend()
        .reconnect_with_state(&second.socket, &state)
        .unwrap();
    write_blocks(&mut drv, WRITES, WRITES + 5);
    let (status, data) = drv.read(0, 3 * 8, BLOCK as u32, TIMEOUT).unwrap();
    let bases = drv.frontend().stop_queues().unwrap();

    assert_eq!((status, data), (S_OK, pattern(3, BLOCK)));
    // Every request took one available entry: 10 before, 6 after the restore.
    assert_eq!(bases, vec![WRITES as u16 + 6]);
    assert_eq!(drv.frontend().queue(0).0.spurious_used(), 0);
}

#[test]
fn corrupted_state_fails_the_check_and_the_backend_keeps_serving() {
    let dir = TempDir::new("ds-corrupt");
    let (mut backend, _image, mut drv, mut state) = saved_after_io(&dir);
    let last = state.len() - 1;
    state[last] ^= 0xff;

    let loaded = drv.frontend().load_device_state(&state);
    drv.frontend().resume_queues().unwrap();
    let (status, data) = drv.read(0, 0, BLOCK as u32, TIMEOUT).unwrap();

    assert!(matches!(loaded, Err(FrontendError::StateCheck(_))));
    assert_eq!((status, data), (S_OK, pattern(0, BLOCK)));
    assert!(backend.is_running());
}

#[test]
fn state_of_a_disk_of_another_capacity_is_refused_with_a_clear_error() {
    let dir = TempDir::new("ds-capacity");
    let (first, _image, mut drv, state) = saved_after_io(&dir);
    drop(first);
    let bigger = dir.path("bigger.img");
    std::fs::File::create(&bigger)
        .unwrap()
        .set_len(2 * DISK)
        .unwrap();
    let mut second =
        Backend::spawn_with_stderr(&dir.path("b.sock"), &image_args(&bigger), Stdio::piped());

    let loaded = drv.frontend().reconnect_with_state(&second.socket, &state);
    drv.frontend().disconnect();
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    let mut log = String::new();
    second
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();

    assert!(matches!(loaded, Err(FrontendError::StateCheck(_))));
    assert!(
        log.contains("Disk capacity 16777216 bytes differs from the saved 8388608 bytes"),
        "{log}"
    );
}

#[test]
fn save_while_a_ring_runs_is_refused() {
    let dir = TempDir::new("ds-running");
    let (backend, _image) = Backend::with_image(&dir, DISK, &["--seccomp", "true"]);
    let mut drv = driver(&backend.socket, config(1));

    let saved = drv.frontend().save_device_state();

    assert!(matches!(saved, Err(FrontendError::Vhost(_))));
}

#[test]
fn state_disagreeing_with_the_frontend_ring_base_is_refused() {
    let dir = TempDir::new("ds-base");
    let (first, image, _drv, state) = saved_after_io(&dir);
    drop(first);
    let second = Backend::spawn(&dir.path("b.sock"), &image_args(&image));
    // A fresh driver sets its ring up from index 0, the state says 10.
    let mut fresh = driver(&second.socket, config(1));
    fresh.frontend().stop_queues().unwrap();

    let loaded = fresh.frontend().load_device_state(&state);
    fresh.frontend().resume_queues().unwrap();
    let status = fresh.write(0, 0, &pattern(9, BLOCK), TIMEOUT).unwrap();

    assert!(matches!(loaded, Err(FrontendError::StateCheck(_))));
    assert_eq!(status, S_OK);
}
