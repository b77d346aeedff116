//! A custom storage for blk-backend: a copy-on-write overlay over a read-only
//! base image. Writes go to a sparse overlay file, a per-sector bitmap says
//! which sectors live there, reads take each run of sectors from the overlay
//! or the base. Operations run synchronously and report completions on an
//! eventfd, which is all the [`StorageQueue`] contract asks for.
//!
//! cargo run --example cow_overlay -- SOCKET BASE_IMAGE OVERLAY_FILE
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::ptr::copy_nonoverlapping;
use std::slice::from_raw_parts;
use std::sync::{Arc, Mutex};

use backends::server::Server;
use blk_backend::storage::{Completion, Storage, StorageQueue};
use blk_backend::{BlkDevice, BlkOptions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SECTOR: usize = 512;

/// Shared by every queue: base, overlay and the "sector is in the overlay" bitmap.
struct Cow(File, File, Mutex<Vec<bool>>);

struct CowStorage(Arc<Cow>, u64);

impl Storage for CowStorage {
    fn capacity(&self) -> u64 {
        self.1
    }
    fn open_queue(&self) -> io::Result<Box<dyn StorageQueue>> {
        let (cow, notifier, done) = (self.0.clone(), EventFd::new(EFD_NONBLOCK)?, Vec::new());
        Ok(Box::new(CowQueue {
            cow,
            notifier,
            done,
        }))
    }
}

struct CowQueue {
    cow: Arc<Cow>,
    notifier: EventFd,
    done: Vec<Completion>,
}

impl CowQueue {
    fn finish(&mut self, token: u64, result: io::Result<usize>) -> io::Result<()> {
        let result = result.map(|n| n as u32);
        self.done.push(Completion { token, result });
        self.notifier.write(1)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let map = self.cow.2.lock().unwrap_or_else(|e| e.into_inner());
        let first = offset as usize / SECTOR;
        let sectors = &map[first..first + buf.len() / SECTOR];
        let mut i = 0;
        while i < sectors.len() {
            let mut run = 1;
            while i + run < sectors.len() && sectors[i + run] == sectors[i] {
                run += 1;
            }
            let file = if sectors[i] { &self.cow.1 } else { &self.cow.0 };
            let (a, b) = (i * SECTOR, (i + run) * SECTOR);
            file.read_exact_at(&mut buf[a..b], offset + a as u64)?;
            i += run;
        }
        Ok(buf.len())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.cow.1.write_all_at(buf, offset)?;
        let mut map = self.cow.2.lock().unwrap_or_else(|e| e.into_inner());
        let first = offset as usize / SECTOR;
        map[first..first + buf.len() / SECTOR].fill(true);
        Ok(buf.len())
    }
}

impl StorageQueue for CowQueue {
    fn notifier(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }
    unsafe fn read(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        let mut buf = vec![0u8; iovecs.iter().map(|v| v.iov_len).sum()];
        let res = self.read_at(&mut buf, offset);
        let mut pos = 0;
        for v in iovecs.iter().filter(|_| res.is_ok()) {
            // SAFETY: the caller keeps each iovec valid until completion (trait contract).
            unsafe { copy_nonoverlapping(buf[pos..].as_ptr(), v.iov_base.cast(), v.iov_len) };
            pos += v.iov_len;
        }
        self.finish(token, res)
    }
    unsafe fn write(&mut self, offset: u64, iovecs: &[libc::iovec], token: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        for v in iovecs {
            // SAFETY: as in `read`; the buffers are only read here.
            buf.extend_from_slice(unsafe { from_raw_parts(v.iov_base.cast(), v.iov_len) });
        }
        let res = self.write_at(&buf, offset);
        self.finish(token, res)
    }
    fn flush(&mut self, token: u64) -> io::Result<()> {
        let res = self.cow.1.sync_data().map(|()| 0);
        self.finish(token, res)
    }
    fn discard(&mut self, offset: u64, len: u64, token: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true, token) // the base must keep its data
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool, token: u64) -> io::Result<()> {
        let res = self.write_at(&vec![0u8; len as usize], offset).map(|_| 0);
        self.finish(token, res)
    }
    fn submit(&mut self) -> io::Result<()> {
        Ok(()) // every operation already ran
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }
    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves a COW overlay of `base` (changes go to `overlay`) on `socket`, forever.
pub fn serve(socket: &str, base: &str, overlay: &str) -> Result<(), Box<dyn std::error::Error>> {
    let base = File::open(base)?;
    let capacity = base.metadata()?.len() & !(SECTOR as u64 - 1);
    File::create(overlay)?.set_len(capacity)?;
    let overlay = File::options().read(true).write(true).open(overlay)?;
    let bitmap = Mutex::new(vec![false; capacity as usize / SECTOR]);
    let storage = Arc::new(CowStorage(Arc::new(Cow(base, overlay, bitmap)), capacity));
    let server = Server::new(Arc::new(BlkDevice::new(storage, BlkOptions::default())));
    server.serve(&Server::<BlkDevice>::bind(socket.as_ref())?)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [socket, base, overlay] => serve(socket, base, overlay),
        _ => Err("usage: cow_overlay SOCKET BASE_IMAGE OVERLAY_FILE".into()),
    }
}
