//! Memory tables a frontend gets wrong, against blk-backend as a real
//! process (seccomp on, as by default): refused without killing the daemon.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use backends::frontend::VERSION_1;
use backends::memory::memfd_create;
use common::*;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const DISK: u64 = 1 << 20;
const FILE_LEN: u64 = 1 << 20;
/// Where the frontend claims its memory lies (never dereferenced by the daemon).
const USER_ADDR: u64 = 0x7f00_0000_0000;

#[test]
fn region_larger_than_its_file_is_refused_and_the_daemon_keeps_serving() {
    let dir = TempDir::new("bigregion");
    let (mut backend, _) = Backend::with_image(&dir, DISK, &[]);
    let ram = memfd_create("short-ram").unwrap();
    ram.set_len(FILE_LEN).unwrap();
    let stream = connect(&backend.socket);
    let vu = Frontend::from_stream(stream, 1);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    // Twice the file, the ring in the second half: mapped as asked, the
    // queue start would read its used index past the end of the file.
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 2 * FILE_LEN,
        userspace_addr: USER_ADDR,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    };
    let ring = USER_ADDR + FILE_LEN + 0x1000;
    let rings = VringConfigData {
        queue_max_size: 128,
        queue_size: 128,
        flags: 0,
        desc_table_addr: ring,
        used_ring_addr: ring + 0x2000,
        avail_ring_addr: ring + 0x800,
        log_addr: None,
    };

    vu.set_owner().unwrap();
    vu.set_features(VERSION_1).unwrap();
    let _ = vu.set_mem_table(&[region]);
    // Whatever the frontend sends next goes to a closed connection.
    let _ = vu.set_vring_num(0, 128);
    let _ = vu.set_vring_base(0, 0);
    let _ = vu.set_vring_addr(0, &rings);
    let _ = vu.set_vring_call(0, &call);
    let _ = vu.set_vring_kick(0, &kick);
    let after = vu.get_features();
    let mut d = driver(&backend.socket, config(1));
    let status = d.write(0, 0, &pattern(3, 4096), TIMEOUT).unwrap();

    assert!(after.is_err(), "the connection should be closed");
    assert_eq!(status, backends::frontend::blk::S_OK);
    assert!(backend.is_running());
}

fn connect(socket: &std::path::Path) -> UnixStream {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                return s;
            }
            Err(e) if std::time::Instant::now() > deadline => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
