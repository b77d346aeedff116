//! Per-queue metrics, with the server running in-process.

mod common;

use std::sync::Arc;

use backends::frontend::blk::{BlkReq, S_IOERR, S_OK, T_FLUSH};
use backends::server::Server;
use blk_backend::storage::MemoryStorage;
use blk_backend::{BlkDevice, BlkOptions};
use common::*;

#[test]
fn counters_track_requests_bytes_errors_and_notifications() {
    let dir = TempDir::new("metrics");
    let socket = dir.path("blk.sock");
    let device = BlkDevice::new(
        Arc::new(MemoryStorage::new(1 << 20).unwrap()),
        BlkOptions::default(),
    );
    let server = Arc::new(Server::new(Arc::new(device)));
    let listener = Server::<BlkDevice>::bind(&socket).unwrap();
    let s = server.clone();
    std::thread::spawn(move || s.serve(&listener));
    let mut drv = driver(&socket, config(1));

    let w = drv.write(0, 0, &pattern(1, 4096), TIMEOUT).unwrap();
    let (r, _) = drv.read(0, 0, 8192, TIMEOUT).unwrap();
    let (bad, _) = drv.read(0, 1 << 20, 512, TIMEOUT).unwrap();
    let flush = BlkReq {
        kind: T_FLUSH,
        ..BlkReq::read(0, 0)
    };
    let f = drv.run(0, &flush, TIMEOUT).unwrap().status;
    let m = server.metrics()[0];

    assert_eq!((w, r, bad, f), (S_OK, S_OK, S_IOERR, S_OK));
    // The request past the end never reaches storage: not a read.
    assert_eq!(
        (m.read_requests, m.write_requests, m.flush_requests),
        (1, 1, 1)
    );
    assert!(m.read_time_ns > 0 && m.write_time_ns > 0 && m.flush_time_ns > 0);
    assert_eq!(
        (
            m.requests,
            m.write_bytes,
            m.read_bytes,
            m.errors,
            m.in_flight
        ),
        (4, 4096, 8192, 1, 0)
    );
    assert!(m.notifications >= 1);
}
