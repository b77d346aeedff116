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
    write_read_discard_zero(&MemoryStorage::new(1 << 20).unwrap());
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
    let storage = MemoryStorage::new(4096).unwrap();
    let mut q = storage.open_queue().unwrap();
    let mut buf = vec![0u8; 512];

    // SAFETY: `buf` outlives the synchronous operation.
    unsafe { q.read(4096, &iov(&mut buf), 9) }.unwrap();

    assert!(run(q.as_mut()).result.is_err());
}

/// A file on a memory filesystem, removed on drop.
struct ShmFile(std::path::PathBuf);

impl ShmFile {
    fn new(name: &str, data: &[u8]) -> Self {
        let path = std::path::PathBuf::from("/dev/shm")
            .join(format!("blk-storage-{name}-{}", std::process::id()));
        std::fs::write(&path, data).unwrap();
        ShmFile(path)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn tmpfs_is_a_memory_filesystem_and_the_crate_directory_is_not() {
    let shm = ShmFile::new("probe", &[0u8; 512]);
    let here = std::fs::File::open(env!("CARGO_MANIFEST_DIR")).unwrap();

    assert!(memory::on_memory_fs(&std::fs::File::open(&shm.0).unwrap()).unwrap());
    assert!(!memory::on_memory_fs(&here).unwrap());
}

#[test]
fn image_on_tmpfs_is_mapped_and_writes_reach_the_file() {
    let shm = ShmFile::new("mapped", &vec![0x11u8; 1 << 20]);
    let storage = open_image(&shm.0, false, false, 16).unwrap();
    let mut q = storage.open_queue().unwrap();
    let mut data = vec![0xc3u8; 4096];

    // SAFETY: `data` outlives the synchronous operation.
    unsafe { q.write(16384, &iov(&mut data), 1) }.unwrap();
    assert_eq!(run(q.as_mut()).result.unwrap(), 4096);
    write_read_discard_zero(storage.as_ref());

    // Served from the mapping: no io_uring ring, and the file has the data.
    assert!(q.uring().is_none());
    let file = std::fs::read(&shm.0).unwrap();
    assert!(file[..4096].iter().all(|&b| b == 0x11));
    assert!(file[4096..12288].iter().all(|&b| b == 0));
    assert!(file[12288..16384].iter().all(|&b| b == 0x11));
    assert!(file[16384..20480].iter().all(|&b| b == 0xc3));
}

#[test]
fn mapped_image_opened_read_only_refuses_writes_and_zeroes() {
    let shm = ShmFile::new("ro", &[0x22u8; 8192]);
    let storage = open_image(&shm.0, true, false, 16).unwrap();
    let mut q = storage.open_queue().unwrap();
    let mut buf = vec![0u8; 4096];

    // SAFETY: `buf` outlives the synchronous operation.
    unsafe { q.write(0, &iov(&mut buf), 1) }.unwrap();
    assert!(run(q.as_mut()).result.is_err());
    q.write_zeroes(0, 4096, true, 2).unwrap();
    assert!(run(q.as_mut()).result.is_err());
    // SAFETY: as above.
    unsafe { q.read(4096, &iov(&mut buf), 3) }.unwrap();
    assert_eq!(run(q.as_mut()).result.unwrap(), 4096);
    assert!(buf.iter().all(|&b| b == 0x22));
    assert_eq!(std::fs::read(&shm.0).unwrap(), vec![0x22u8; 8192]);
}

#[test]
fn unaligned_zeroing_keeps_the_bytes_around_it() {
    let storage = MemoryStorage::new(64 << 10).unwrap();
    let mut q = storage.open_queue().unwrap();
    let mut ones = vec![1u8; 64 << 10];
    // SAFETY: `ones` outlives the synchronous operation.
    unsafe { q.write(0, &iov(&mut ones), 1) }.unwrap();
    run(q.as_mut()).result.unwrap();

    // 512 bytes into the first page to 512 bytes before the end of the
    // fourth page: whole pages two and three are handed back.
    q.discard(512, 4 * 4096 - 1024, 2).unwrap();
    run(q.as_mut()).result.unwrap();
    let mut back = vec![9u8; 64 << 10];
    // SAFETY: as above.
    unsafe { q.read(0, &iov(&mut back), 3) }.unwrap();
    run(q.as_mut()).result.unwrap();

    assert!(back[..512].iter().all(|&b| b == 1));
    assert!(back[512..4 * 4096 - 512].iter().all(|&b| b == 0));
    assert!(back[4 * 4096 - 512..].iter().all(|&b| b == 1));
}
