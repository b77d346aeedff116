//! Integration tests: blk-backend as a real process, driven by the synthetic
//! frontend over a real vhost-user socket with memfd memory and eventfds.

mod common;

use backends::frontend::blk::{
    BlkReq, Done, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_WRITE_ZEROES,
};
use backends::frontend::{FrontendConfig, Seg};
use blk_backend::device::features;
use common::*;
use vm_memory::GuestAddress;

#[test]
fn pattern_written_on_each_queue_reads_back() {
    let dir = TempDir::new("rw");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--queues", "2"]);
    let mut drv = driver(&backend.socket, config(2));

    for q in 0..2 {
        let data = pattern(q as u8, 64 << 10);
        assert_eq!(drv.write(q, 128 * q as u64, &data, TIMEOUT).unwrap(), S_OK);
    }
    for q in 0..2 {
        let (st, back) = drv.read(1 - q, 128 * q as u64, 64 << 10, TIMEOUT).unwrap();
        assert_eq!((st, back == pattern(q as u8, 64 << 10)), (S_OK, true));
    }
}

#[test]
fn memory_added_as_slots_out_of_address_order_serves_requests() {
    let dir = TempDir::new("slots");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    // 8 MiB in two slots of 4 MiB, the upper one added first; the 32 request
    // buffers of 128 KiB fill the lower slot and spill into the upper one.
    let cfg = FrontendConfig {
        mem_slots: true,
        mem_size: 8 << 20,
        ..config(1)
    };
    let mut drv = driver(&backend.socket, cfg);
    let data: Vec<Vec<u8>> = (0..32).map(|i| pattern(i, 128 << 10)).collect();

    let mut slots = Vec::new();
    for (i, d) in data.iter().enumerate() {
        let req = BlkReq {
            data: Some(d),
            ..BlkReq::write(i as u64 * 256, d.len() as u32)
        };
        slots.push(drv.submit(0, &req).unwrap().unwrap());
    }
    drv.kick(0);
    let mut done = Vec::new();
    while done.len() < data.len() {
        drv.wait(0, TIMEOUT, &mut done).unwrap();
    }
    assert!(done.iter().all(|d| d.status == S_OK));
    for (i, d) in data.iter().enumerate() {
        let (st, back) = drv.read(0, i as u64 * 256, 128 << 10, TIMEOUT).unwrap();
        assert_eq!((i, st, back == *d), (i, S_OK, true));
    }
}

#[test]
fn bogus_available_index_stalls_the_queue_without_flooding_the_log() {
    let dir = TempDir::new("availidx");
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let log = dir.path("stderr.log");
    let mut backend = Backend::spawn_with_stderr(
        &dir.path("blk.sock"),
        &["--image", image.to_str().unwrap()],
        std::fs::File::create(&log).unwrap().into(),
    );
    let mut drv = driver(&backend.socket, config(1));
    let data = pattern(9, 4096);
    assert_eq!(drv.write(0, 0, &data, TIMEOUT).unwrap(), S_OK);

    // The driver claims 1000 more chains than the queue holds, and kicks on.
    let (vq, mem) = drv.frontend().queue(0);
    vq.set_raw_avail_idx(mem, vq.avail_idx().wrapping_add(1000))
        .unwrap();
    for _ in 0..300 {
        vq.notify();
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    vq.restore_avail_idx(mem).unwrap();
    let (st, back) = drv.read(0, 0, 4096, TIMEOUT).unwrap();

    assert_eq!((st, back == data), (S_OK, true));
    assert!(backend.is_running());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("available")).count();
    assert!(
        (1..=20).contains(&lines),
        "{lines} log lines about the index:\n{text}"
    );
}

#[test]
fn queue_with_a_bogus_available_index_still_stops() {
    let dir = TempDir::new("availstop");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    assert_eq!(drv.write(0, 0, &pattern(3, 4096), TIMEOUT).unwrap(), S_OK);
    let (vq, mem) = drv.frontend().queue(0);
    vq.set_raw_avail_idx(mem, vq.avail_idx().wrapping_add(1000))
        .unwrap();
    vq.notify();
    let (tx, rx) = std::sync::mpsc::channel();

    // GET_VRING_BASE stops the queue's worker: it must not be spinning.
    std::thread::spawn(move || {
        let vhost = drv.frontend().vhost().unwrap();
        let _ = tx.send(vhost::VhostBackend::get_vring_base(vhost, 0).is_ok());
    });

    assert_eq!(rx.recv_timeout(TIMEOUT), Ok(true));
    assert!(backend.is_running());
}

#[test]
fn written_data_lands_in_the_host_file() {
    let dir = TempDir::new("host");
    let (backend, image) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    let data = pattern(7, 4096);

    let st = drv.write(0, 10, &data, TIMEOUT).unwrap();

    let file = std::fs::read(image).unwrap();
    assert_eq!((st, &file[5120..5120 + 4096]), (S_OK, &data[..]));
}

#[test]
fn flush_succeeds() {
    let dir = TempDir::new("flush");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    drv.write(0, 0, &pattern(1, 4096), TIMEOUT).unwrap();

    let done = drv
        .run(
            0,
            &BlkReq {
                kind: T_FLUSH,
                sector: 0,
                len: 0,
                data: None,
                flags: 0,
            },
            TIMEOUT,
        )
        .unwrap();

    assert_eq!(done.status, S_OK);
}

#[test]
fn discard_then_read_returns_zeroes() {
    let dir = TempDir::new("discard");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    drv.write(0, 64, &pattern(3, 8192), TIMEOUT).unwrap();

    let done = drv
        .run(
            0,
            &BlkReq {
                kind: T_DISCARD,
                sector: 64,
                len: 16,
                data: None,
                flags: 0,
            },
            TIMEOUT,
        )
        .unwrap();
    let (st, back) = drv.read(0, 64, 8192, TIMEOUT).unwrap();

    assert_eq!((done.status, st), (S_OK, S_OK));
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn write_zeroes_with_and_without_unmap_clear_data() {
    let dir = TempDir::new("wz");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    drv.write(0, 0, &pattern(9, 16384), TIMEOUT).unwrap();

    let a = drv
        .run(
            0,
            &BlkReq {
                kind: T_WRITE_ZEROES,
                sector: 0,
                len: 16,
                data: None,
                flags: 0,
            },
            TIMEOUT,
        )
        .unwrap();
    let b = drv
        .run(
            0,
            &BlkReq {
                kind: T_WRITE_ZEROES,
                sector: 16,
                len: 16,
                data: None,
                flags: 1,
            },
            TIMEOUT,
        )
        .unwrap();
    let (st, back) = drv.read(0, 0, 16384, TIMEOUT).unwrap();

    assert_eq!((a.status, b.status, st), (S_OK, S_OK, S_OK));
    assert!(back.iter().all(|&x| x == 0));
}

#[test]
fn read_only_disk_rejects_writes_and_advertises_ro() {
    let dir = TempDir::new("ro");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--readonly"]);
    let mut drv = driver(&backend.socket, config(1));

    let st = drv.write(0, 0, &pattern(1, 512), TIMEOUT).unwrap();
    let (read_st, _) = drv.read(0, 0, 512, TIMEOUT).unwrap();

    assert_eq!((st, read_st), (S_IOERR, S_OK));
    assert_ne!(drv.frontend().acked_features() & features::RO, 0);
}

#[test]
fn out_of_range_sector_gets_ioerr_and_daemon_stays_up() {
    let dir = TempDir::new("oor");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    let last = DISK / 512;

    let past_end = drv.read(0, last - 1, 1024, TIMEOUT).unwrap().0;
    let overflow = drv.read(0, u64::MAX, 512, TIMEOUT).unwrap().0;
    let in_range = drv.read(0, last - 1, 512, TIMEOUT).unwrap().0;

    assert_eq!((past_end, overflow, in_range), (S_IOERR, S_IOERR, S_OK));
    assert!(backend.is_running());
}

#[test]
fn get_id_returns_the_serial() {
    let dir = TempDir::new("id");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--serial", "disk-42"]);
    let mut drv = driver(&backend.socket, config(1));

    let done = drv
        .run(
            0,
            &BlkReq {
                kind: T_GET_ID,
                sector: 0,
                len: 20,
                data: None,
                flags: 0,
            },
            TIMEOUT,
        )
        .unwrap();
    let id = drv.slot_data(0, done.slot, 20).unwrap();

    assert_eq!((done.status, &id[..8]), (S_OK, &b"disk-42\0"[..]));
}

#[test]
fn unknown_request_type_gets_unsupp() {
    let dir = TempDir::new("unsupp");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));

    let done = drv
        .run(
            0,
            &BlkReq {
                kind: 99,
                sector: 0,
                len: 0,
                data: None,
                flags: 0,
            },
            TIMEOUT,
        )
        .unwrap();

    assert_eq!(done.status, S_UNSUPP);
}

/// Puts a raw chain on queue 0, kicks, and returns (status byte, used len).
fn raw_chain(
    drv: &mut backends::frontend::blk::BlkDriver,
    segs: &[Seg],
    status: GuestAddress,
) -> (u8, u32) {
    use vm_memory::Bytes;
    let fe = drv.frontend();
    fe.mem().write_obj(0xffu8, status).unwrap();
    let (vq, mem) = fe.queue(0);
    vq.add(mem, segs).unwrap().unwrap();
    vq.notify();
    let mut used = Vec::new();
    vq.wait_used(mem, TIMEOUT, &mut used).unwrap();
    (mem.read_obj(status).unwrap(), used[0].len)
}

#[test]
fn misaligned_buffers_with_direct_io_are_bounced() {
    use backends::frontend::blk::{T_IN, T_OUT};
    use vm_memory::Bytes;
    let dir = TempDir::new("bounce");
    let (backend, image) = Backend::with_image(&dir, DISK, &["--direct"]);
    let mut drv = driver(&backend.socket, config(1));
    let fe = drv.frontend();
    let hdr = fe.alloc(16, 16).unwrap();
    let st = fe.alloc(1, 1).unwrap();
    // Odd addresses and a split at an odd length, as firmware may hand out.
    let out = GuestAddress(fe.alloc(8192, 4096).unwrap().0 + 3);
    let back = GuestAddress(fe.alloc(8192, 4096).unwrap().0 + 101);
    let data = pattern(5, 4096);
    fe.mem().write_slice(&data, out).unwrap();
    let header = |kind: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let seg = |addr, len, writable| Seg {
        addr,
        len,
        writable,
    };

    drv.frontend()
        .mem()
        .write_slice(&header(T_OUT, 24), hdr)
        .unwrap();
    let wrote = raw_chain(
        &mut drv,
        &[
            seg(hdr, 16, false),
            seg(out, 1000, false),
            seg(GuestAddress(out.0 + 1000), 3096, false),
            seg(st, 1, true),
        ],
        st,
    );
    drv.frontend()
        .mem()
        .write_slice(&header(T_IN, 24), hdr)
        .unwrap();
    let read = raw_chain(
        &mut drv,
        &[seg(hdr, 16, false), seg(back, 4096, true), seg(st, 1, true)],
        st,
    );
    let mut got = vec![0u8; 4096];
    drv.frontend().mem().read_slice(&mut got, back).unwrap();
    let file = std::fs::read(image).unwrap();

    assert_eq!((wrote.0, read), (S_OK, (S_OK, 4097)));
    assert!(got == data, "data read back differs");
    assert!(
        file[24 * 512..25 * 512 + 3584] == data[..],
        "host file differs"
    );
}

#[test]
fn malformed_chains_get_ioerr_and_the_queue_goes_on() {
    use vm_memory::Bytes;
    let dir = TempDir::new("malformed");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    let fe = drv.frontend();
    let hdr = fe.alloc(16, 16).unwrap();
    let buf = fe.alloc(4096, 4096).unwrap();
    let st = fe.alloc(1, 1).unwrap();
    fe.mem().write_slice(&[0u8; 16], hdr).unwrap(); // IN, sector 0
    let outside = GuestAddress(fe.mem_size() + 0x1000);
    let seg = |addr, len, writable| Seg {
        addr,
        len,
        writable,
    };

    let no_header = raw_chain(&mut drv, &[seg(st, 1, true)], st);
    let wrong_dir = raw_chain(
        &mut drv,
        &[seg(hdr, 16, false), seg(buf, 512, false), seg(st, 1, true)],
        st,
    );
    let out_of_mem = raw_chain(
        &mut drv,
        &[
            seg(hdr, 16, false),
            seg(outside, 512, true),
            seg(st, 1, true),
        ],
        st,
    );
    let header_outside = raw_chain(&mut drv, &[seg(outside, 16, false), seg(st, 1, true)], st);
    let no_status = raw_chain(&mut drv, &[seg(hdr, 16, false), seg(buf, 512, false)], st);
    let (ok, _) = drv.read(0, 0, 512, TIMEOUT).unwrap();

    assert_eq!(no_header.0, S_IOERR);
    assert_eq!(wrong_dir.0, S_IOERR);
    assert_eq!(out_of_mem.0, S_IOERR);
    assert_eq!(header_outside.0, S_IOERR);
    assert_eq!(no_status, (0xff, 1));
    assert_eq!(ok, S_OK);
    assert!(backend.is_running());
}

#[test]
fn a_new_frontend_is_served_after_a_disconnect() {
    let dir = TempDir::new("reconnect");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut first = driver(&backend.socket, config(1));
    first.write(0, 8, &pattern(5, 4096), TIMEOUT).unwrap();
    drop(first);

    let mut second = driver(&backend.socket, config(1));
    let (st, back) = second.read(0, 8, 4096, TIMEOUT).unwrap();

    assert_eq!((st, back == pattern(5, 4096)), (S_OK, true));
    assert!(backend.is_running());
}

#[test]
fn queue_depth_32_random_writes_read_back() {
    let dir = TempDir::new("qd32");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let mut drv = driver(&backend.socket, config(1));
    let blocks: Vec<u64> = (0..256u64).map(|i| (i * 97) % 2048).collect();
    let mut done: Vec<Done> = Vec::new();
    let mut submitted = 0;
    while done.len() < blocks.len() {
        while submitted < blocks.len() && drv.free_slots(0) > 0 {
            let b = blocks[submitted];
            let data = pattern(b as u8, 4096);
            let req = BlkReq {
                kind: backends::frontend::blk::T_OUT,
                sector: b * 8,
                len: 4096,
                data: Some(&data),
                flags: 0,
            };
            drv.submit(0, &req).unwrap().unwrap();
            submitted += 1;
        }
        drv.kick(0);
        drv.wait(0, TIMEOUT, &mut done).unwrap();
    }

    assert!(done.iter().all(|d| d.status == S_OK));
    for &b in &blocks[blocks.len() - 64..] {
        let (st, back) = drv.read(0, b * 8, 4096, TIMEOUT).unwrap();
        assert_eq!((st, back == pattern(b as u8, 4096)), (S_OK, true));
    }
}

#[test]
fn memory_storage_serves_requests() {
    let dir = TempDir::new("mem");
    let socket = dir.path("blk.sock");
    let backend = Backend::spawn(&socket, &["--storage", "memory:4M"]);
    let mut drv = driver(&backend.socket, config(1));

    let st = drv.write(0, 0, &pattern(2, 8192), TIMEOUT).unwrap();
    let (rst, back) = drv.read(0, 0, 8192, TIMEOUT).unwrap();

    assert_eq!((st, rst, back == pattern(2, 8192)), (S_OK, S_OK, true));
}

#[test]
fn client_mode_connects_to_the_frontend_socket() {
    use backends::frontend::blk::BlkDriver;
    use backends::frontend::SyntheticFrontend;
    let dir = TempDir::new("client");
    let socket = dir.path("vmm.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let backend = std::process::Command::new(env!("CARGO_BIN_EXE_blk-backend"))
        .args([
            "--client",
            "--image",
            image.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(backend);

    let (stream, _) = listener.accept().unwrap();
    let fe = SyntheticFrontend::from_stream(stream, config(1)).unwrap();
    let mut drv = BlkDriver::new(fe, 4, 4096).unwrap();
    let st = drv.write(0, 0, &pattern(4, 4096), TIMEOUT).unwrap();

    assert_eq!(st, S_OK);
}

#[test]
fn config_space_answers_exactly_the_size_asked() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    let dir = TempDir::new("config");
    let (backend, _) = Backend::with_image(&dir, DISK, &["--queues", "3"]);
    let mut drv = driver(&backend.socket, config(1));
    let vu = drv.frontend().vhost().unwrap();

    let (_, small) = vu
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    let (_, large) = vu
        .get_config(0, 96, VhostUserConfigFlags::WRITABLE, &[0u8; 96])
        .unwrap();

    assert_eq!(small.len(), 8);
    assert_eq!(
        u64::from_le_bytes(small[..8].try_into().unwrap()),
        DISK / 512
    );
    assert_eq!(large.len(), 96);
    assert_eq!(u16::from_le_bytes([large[34], large[35]]), 3);
    assert!(large[60..].iter().all(|&b| b == 0));
}

#[test]
fn requests_work_without_event_idx() {
    let dir = TempDir::new("noevidx");
    let (backend, _) = Backend::with_image(&dir, DISK, &[]);
    let cfg = backends::frontend::FrontendConfig {
        event_idx: false,
        ..config(1)
    };
    let mut drv = driver(&backend.socket, cfg);

    let st = drv.write(0, 0, &pattern(6, 8192), TIMEOUT).unwrap();
    let (rst, back) = drv.read(0, 0, 8192, TIMEOUT).unwrap();

    assert_eq!(
        drv.frontend().acked_features() & backends::frontend::EVENT_IDX,
        0
    );
    assert_eq!((st, rst, back == pattern(6, 8192)), (S_OK, S_OK, true));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn head_published_twice_while_in_flight_does_not_wedge_the_queue() {
    use vm_memory::{Bytes, GuestAddress};
    let dir = TempDir::new("duphead");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &["--direct"]);
    let mut drv = driver(&backend.socket, config(1));
    drv.submit(0, &BlkReq::read(0, 128 << 10)).unwrap().unwrap();
    {
        // Publish the same head (0) a second time, as a buggy driver could.
        let fe = drv.frontend();
        let mem = fe.mem();
        let avail = GuestAddress(16 * 128);
        let idx: u16 = mem.read_obj(GuestAddress(avail.0 + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail.0 + 4 + 2 * u64::from(idx % 128)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail.0 + 2))
            .unwrap();
    }
    drv.kick(0);
    let mut done = Vec::new();
    drv.wait(0, TIMEOUT, &mut done).unwrap();
    drv.frontend().disconnect();

    let mut again = driver(&backend.socket, config(1));
    let (st, _) = again.read(0, 0, 512, TIMEOUT).unwrap();

    assert_eq!(st, S_OK);
    assert!(backend.is_running());
}
