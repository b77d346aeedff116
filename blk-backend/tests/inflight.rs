//! Inflight tracking: the backend is killed with SIGKILL while writes are in
//! flight, restarted on the same socket and image, and the frontend
//! reconnects with the inflight region it kept. Every write must complete
//! with OK and be on disk.

mod common;

use backends::frontend::blk::{BlkReq, Done, S_OK, T_OUT};
use backends::frontend::FrontendConfig;
use backends::inflight::InflightRegion;
use common::*;

const BLOCK: u32 = 64 << 10;
const WRITES: u64 = 192;

#[test]
fn writes_in_flight_at_kill_9_complete_after_restart() {
    let dir = TempDir::new("inflight");
    let (mut backend, image) = Backend::with_image(&dir, WRITES * u64::from(BLOCK), &["--direct"]);
    let cfg = FrontendConfig {
        inflight: true,
        ..config(1)
    };
    let mut drv = driver(&backend.socket, cfg);
    let mut done: Vec<Done> = Vec::new();
    let mut next = 0u64;
    let submit_batch = |drv: &mut backends::frontend::blk::BlkDriver, next: &mut u64| {
        while *next < WRITES && drv.free_slots(0) > 0 {
            let data = pattern(*next as u8, BLOCK as usize);
            let req = BlkReq {
                kind: T_OUT,
                sector: *next * u64::from(BLOCK / 512),
                len: BLOCK,
                data: Some(&data),
                flags: 0,
            };
            drv.submit(0, &req).unwrap().unwrap();
            *next += 1;
        }
        drv.kick(0);
    };
    while done.len() < 64 {
        submit_batch(&mut drv, &mut next);
        drv.wait(0, TIMEOUT, &mut done).unwrap();
    }
    while done.len() < next as usize {
        drv.wait(0, TIMEOUT, &mut done).unwrap();
    }
    // A full queue of O_DIRECT writes; kill once the backend has taken some.
    let (info, file) = drv.frontend().inflight().unwrap();
    let region =
        InflightRegion::map(file, info.mmap_offset, info.mmap_size, 1, info.queue_size).unwrap();
    let tracked = std::sync::Arc::new(region).queue(0).unwrap();
    submit_batch(&mut drv, &mut next);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while tracked.count() == 0 && std::time::Instant::now() < deadline {
        std::hint::spin_loop();
    }

    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    let restarted = Backend::spawn(
        &backend.socket,
        &["--image", image.to_str().unwrap(), "--direct"],
    );
    drv.frontend().reconnect(&restarted.socket).unwrap();
    drv.kick(0);
    while done.len() < WRITES as usize {
        drv.wait(0, TIMEOUT, &mut done).unwrap();
        submit_batch(&mut drv, &mut next);
    }

    assert_eq!(next, WRITES);
    assert!(done.iter().all(|d| d.status == S_OK));
    assert_eq!(drv.frontend().queue(0).0.spurious_used(), 0);
    let disk = std::fs::read(&image).unwrap();
    for (i, chunk) in disk.chunks(BLOCK as usize).enumerate() {
        assert!(chunk == pattern(i as u8, BLOCK as usize), "block {i} lost");
    }
}

/// The state a backend leaves when killed after popping requests: they are
/// in the available ring and marked in flight in the region. A new backend
/// must run each of them exactly once.
#[test]
fn requests_marked_in_flight_by_a_dead_backend_run_exactly_once() {
    marked_in_flight_run_exactly_once(TempDir::new("inflight-det"));
}

/// The same on an image in tmpfs, served from its mapping: the resubmitted
/// requests finish inside their start, with no eventfd, and must still be
/// published without waiting for a kick that never comes.
#[test]
fn requests_marked_in_flight_on_a_tmpfs_image_run_exactly_once() {
    marked_in_flight_run_exactly_once(TempDir::on_tmpfs("inflight-det-shm"));
}

fn marked_in_flight_run_exactly_once(dir: TempDir) {
    let (mut first, image) = Backend::with_image(&dir, 8 << 20, &[]);
    let mut drv = driver(
        &first.socket,
        FrontendConfig {
            inflight: true,
            ..config(1)
        },
    );
    drv.frontend().disconnect();
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let (info, file) = drv.frontend().inflight().unwrap();
    let region =
        InflightRegion::map(file, info.mmap_offset, info.mmap_size, 1, info.queue_size).unwrap();
    let mut tracked = std::sync::Arc::new(region).queue(0).unwrap();
    for i in 0..8u64 {
        let data = pattern(i as u8 + 100, 4096);
        let req = BlkReq {
            kind: T_OUT,
            sector: i * 8,
            len: 4096,
            data: Some(&data),
            flags: 0,
        };
        drv.submit(0, &req).unwrap().unwrap();
    }
    // Each request takes three descriptors from a fresh ring: heads 0, 3, 6, ...
    for head in (0..8u16).map(|i| i * 3) {
        tracked.start(head);
    }

    let _second = restart(&mut drv, &first.socket, &image);
    let mut done = Vec::new();
    while done.len() < 8 {
        drv.wait(0, TIMEOUT, &mut done).unwrap();
    }

    assert!(done.iter().all(|d| d.status == S_OK));
    assert_eq!(drv.frontend().queue(0).0.spurious_used(), 0);
    let disk = std::fs::read(&image).unwrap();
    for i in 0..8usize {
        assert_eq!(
            &disk[i * 4096..(i + 1) * 4096],
            &pattern(i as u8 + 100, 4096)[..]
        );
    }
}

/// QEMU sends SET_VRING_CALL after SET_VRING_KICK, and a reconnected queue
/// starts on the kick: requests resubmitted from the inflight region (or
/// already in the available ring) can complete before the queue has a call
/// eventfd. The backend signals the call eventfd once it arrives, or the
/// driver would wait forever for a completion it was never told of (a QEMU
/// guest in the crash loop stalled that way).
#[test]
fn completions_before_the_call_eventfd_arrives_are_signalled_on_it() {
    let dir = TempDir::new("late-call");
    let (mut first, image) = Backend::with_image(&dir, 8 << 20, &[]);
    let cfg = FrontendConfig {
        inflight: true,
        call_after_kick: Some(std::time::Duration::from_millis(300)),
        ..config(1)
    };
    let mut drv = driver(&first.socket, cfg);
    drv.frontend().disconnect();
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let (info, file) = drv.frontend().inflight().unwrap();
    let region =
        InflightRegion::map(file, info.mmap_offset, info.mmap_size, 1, info.queue_size).unwrap();
    let mut tracked = std::sync::Arc::new(region).queue(0).unwrap();
    let data = submit_block_0(&mut drv, 7);
    tracked.start(0);
    take_signals(&mut drv);

    let _second = restart(&mut drv, &first.socket, &image);

    // The write was done well before the call eventfd came (300 ms later).
    assert_signalled_and_written(
        &mut drv,
        &image,
        &data,
        "a completion published before SET_VRING_CALL was never signalled",
    );
}

/// A completion the previous backend published in the used ring but never
/// signalled (it died between the two) is signalled by the next backend as
/// soon as its queue starts, although the call eventfd came before the
/// kick, as QEMU can send them. Without it the driver (O_DIRECT, queue
/// depth 1) waits forever: a QEMU guest of the crash loop was seen halted
/// on both vCPUs with its read pending and the new backend idle.
#[test]
fn a_completion_never_signalled_is_signalled_when_the_restarted_queue_starts() {
    let dir = TempDir::new("unsignalled");
    let (mut first, image) = Backend::with_image(&dir, 8 << 20, &[]);
    let cfg = FrontendConfig {
        inflight: true,
        ..config(1)
    };
    let mut drv = driver(&first.socket, cfg);
    let data = submit_block_0(&mut drv, 9);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (q, mem) = drv.frontend().queue(0);
        if q.used_idx(mem).unwrap() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The signal is taken and the used entry left unread: to the driver,
    // a completion nobody told it of.
    std::thread::sleep(std::time::Duration::from_millis(100));
    take_signals(&mut drv);
    drv.frontend().disconnect();
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let _second = restart(&mut drv, &first.socket, &image);
    assert_signalled_and_written(
        &mut drv,
        &image,
        &data,
        "a completion published but never signalled stayed unsignalled after the restart",
    );
}

/// Submits a 4 KiB write of `pattern(seed)` at sector 0 and kicks, as a
/// driver must (a running worker past its polling window sleeps until
/// kicked); returns the data.
fn submit_block_0(drv: &mut backends::frontend::blk::BlkDriver, seed: u8) -> Vec<u8> {
    let data = pattern(seed, 4096);
    let req = BlkReq {
        kind: T_OUT,
        sector: 0,
        len: 4096,
        data: Some(&data),
        flags: 0,
    };
    drv.submit(0, &req).unwrap().unwrap();
    drv.kick(0);
    data
}

/// Starts a new backend on `image` at `socket` and reconnects the driver
/// to it; the backend runs until the returned value is dropped.
fn restart(
    drv: &mut backends::frontend::blk::BlkDriver,
    socket: &std::path::Path,
    image: &std::path::Path,
) -> Backend {
    let backend = Backend::spawn(socket, &["--image", image.to_str().unwrap()]);
    drv.frontend().reconnect(&backend.socket).unwrap();
    backend
}

/// Consumes every signal already on queue 0's call eventfd.
fn take_signals(drv: &mut backends::frontend::blk::BlkDriver) {
    while drv
        .frontend()
        .queue(0)
        .0
        .call_signalled(std::time::Duration::ZERO)
    {}
}

/// The one write of [`submit_block_0`] is in the used ring, its call
/// eventfd is signalled (`why` if not), it completed OK and `data` is on disk.
fn assert_signalled_and_written(
    drv: &mut backends::frontend::blk::BlkDriver,
    image: &std::path::Path,
    data: &[u8],
    why: &str,
) {
    let (q, mem) = drv.frontend().queue(0);
    assert_eq!(q.used_idx(mem).unwrap(), 1);
    assert!(q.call_signalled(TIMEOUT), "{why}");
    let mut done = Vec::new();
    drv.poll(0, &mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, S_OK);
    assert_eq!(&std::fs::read(image).unwrap()[..4096], data);
}
