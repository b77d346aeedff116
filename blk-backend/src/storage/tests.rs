//! The same behaviour checks run against every shipped storage.

use super::*;
use std::time::Duration;

fn run(q: &mut dyn StorageQueue) -> Completion {
    q.submit().unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while out.is_empty() && std::time::Instant::now() < deadline {
        q.wait().unwrap();
        q.reap(&mut out);
    }
    out.pop().unwrap()
}

fn iov(buf: &mut [u8]) -> [libc::iovec; 1] {
    [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }]
}

fn write_read_discard_zero(storage: &dyn Storage) {
    let mut q = storage.open_queue().unwrap();
    let mut pattern = vec![0xa5u8; 8192];
    let mut back = vec![0u8; 8192];

    // SAFETY: `pattern` outlives the operation, which `run` waits for.
    unsafe { q.write(4096, &iov(&mut pattern), 1) }.unwrap();
    assert_eq!(run(q.as_mut()).result.unwrap(), 8192);
    q.flush(2).unwrap();
    assert!(run(q.as_mut()).result.is_ok());
    // SAFETY: as above for `back`.
    unsafe { q.read(4096, &iov(&mut back), 3) }.unwrap();
    let c = run(q.as_mut());
    assert_eq!((c.token, c.result.unwrap()), (3, 8192));
    assert_eq!(back, pattern);

    q.discard(4096, 4096, 4).unwrap();
    assert!(run(q.as_mut()).result.is_ok());
    q.write_zeroes(8192, 4096, false, 5).unwrap();
    assert!(run(q.as_mut()).result.is_ok());
    // SAFETY: as above.
    unsafe { q.read(4096, &iov(&mut back), 6) }.unwrap();
    run(q.as_mut()).result.unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn memory_storage_round_trips_and_zeroes() {
    write_read_discard_zero(&MemoryStorage::new(1 << 20));
}

#[test]
fn file_storage_round_trips_and_zeroes() {
    let dir = std::env::temp_dir().join(format!("blk-storage-{}", std::process::id()));
    std::fs::write(&dir, vec![0u8; 1 << 20]).unwrap();
    let storage = FileStorage::open(&dir, false, false, 16).unwrap();

    write_read_discard_zero(&storage);

    std::fs::remove_file(dir).unwrap();
}

#[test]
fn memory_read_past_capacity_fails() {
    let storage = MemoryStorage::new(4096);
    let mut q = storage.open_queue().unwrap();
    let mut buf = vec![0u8; 512];

    // SAFETY: `buf` outlives the synchronous operation.
    unsafe { q.read(4096, &iov(&mut buf), 9) }.unwrap();

    assert!(run(q.as_mut()).result.is_err());
}
