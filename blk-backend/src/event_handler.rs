//! Executing virtio-blk requests of one queue on a [`StorageQueue`].
//!
//! Chains are walked and parsed ([`crate::request`]), checked against the
//! disk (read-only, bounds), turned into iovecs that point straight into
//! guest memory, and submitted with the chain head as the token. Every
//! malformed chain completes at once with VIRTIO_BLK_S_IOERR.
//!
//! Every write to guest memory is marked in the dirty log (live migration):
//! the data of a read once storage reaped it (whatever the storage did on
//! the way, a bounce buffer included), GET_ID's string, and the status
//! byte, each before the request is handed back for the used ring.

use std::sync::Arc;
use std::time::Instant;

use backends::desc::{walk_chain, Descriptor};
use backends::memory::GuestMemRef;
use backends::ratelimit::LogLimiter;
use backends::{DirtyLogger, QueueHandler, QueueMetrics, Used};
use vm_memory::{Bytes, GuestAddress};

use crate::request::{parse_into, status, RequestType, ID_LEN, SECTOR};
use crate::storage::{Completion, StorageQueue};

/// What every queue needs to know about the disk.
#[derive(Debug)]
pub struct DiskInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// Reject writes, discards and write-zeroes.
    pub read_only: bool,
    /// GET_ID answer, zero padded.
    pub serial: [u8; ID_LEN],
    /// Storage can discard.
    pub discard: bool,
}

struct Pending {
    _mem: GuestMemRef,
    status: GuestAddress,
    used_len: u32,
    kind: RequestType,
    bytes: u64,
    /// When it went to storage.
    started: Instant,
    /// The guest buffers a read fills, to mark dirty once it is reaped
    /// (empty for other requests).
    data: Vec<Descriptor>,
}

/// The request processor of one queue.
pub struct BlkQueue {
    storage: Box<dyn StorageQueue>,
    disk: Arc<DiskInfo>,
    metrics: Arc<QueueMetrics>,
    pending: Vec<Option<Pending>>,
    in_flight: usize,
    descs: Vec<Descriptor>,
    /// Scratch for the data descriptors of the request being started.
    data: Vec<Descriptor>,
    /// Scratch for the iovecs of the request being started.
    iov: IovScratch,
    completions: Vec<Completion>,
    log: LogLimiter,
    dirty: DirtyLogger,
    /// Descriptor vectors handed back by reaped reads, reused by the next.
    spare: Vec<Vec<Descriptor>>,
}

/// Reused iovec storage; it holds nothing between two requests.
struct IovScratch(Vec<libc::iovec>);

// SAFETY: the vector is filled and handed to storage within one `start` call
// on the worker thread, then left unused; the addresses it holds are never
// dereferenced through it, on this thread or another.
unsafe impl Send for IovScratch {}

enum Outcome {
    Done(u8, u32),
    Submitted,
}

impl BlkQueue {
    /// A processor over `storage`.
    pub fn new(
        storage: Box<dyn StorageQueue>,
        disk: Arc<DiskInfo>,
        metrics: Arc<QueueMetrics>,
    ) -> Self {
        BlkQueue {
            storage,
            disk,
            metrics,
            pending: Vec::new(),
            in_flight: 0,
            descs: Vec::new(),
            data: Vec::new(),
            iov: IovScratch(Vec::new()),
            completions: Vec::new(),
            log: LogLimiter::default(),
            dirty: DirtyLogger::default(),
            spare: Vec::new(),
        }
    }

    /// Marks what this queue writes to guest memory in `dirty`.
    pub fn with_dirty_log(mut self, dirty: DirtyLogger) -> Self {
        self.dirty = dirty;
        self
    }

    fn warn(&mut self, head: u16, what: &dyn std::fmt::Display) {
        if self.log.allow() {
            tracing::warn!(
                head,
                suppressed = self.log.suppressed(),
                "bad request: {what}"
            );
        }
    }

    fn in_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        (offset.checked_add(len)? <= self.disk.capacity).then_some(offset)
    }

    fn execute(&mut self, mem: &GuestMemRef, head: u16, req: &crate::request::Request) -> Outcome {
        let kind = req.kind;
        let writes = matches!(
            kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.disk.read_only {
            return Outcome::Done(status::IOERR, 1);
        }
        let token = u64::from(head);
        let submitted = match kind {
            RequestType::Unsupported(_) => return Outcome::Done(status::UNSUPP, 1),
            RequestType::GetId => return self.get_id(mem, req),
            RequestType::In | RequestType::Out => {
                let Some(offset) = self.in_range(req.sector, req.data_len) else {
                    self.warn(head, &"access past the end of the disk");
                    return Outcome::Done(status::IOERR, 1);
                };
                if req.data_len == 0 {
                    return Outcome::Done(status::OK, 1);
                }
                let mut iov = std::mem::take(&mut self.iov.0);
                if !iovecs(mem, &req.data, &mut iov) {
                    self.iov.0 = iov;
                    self.warn(head, &"buffer outside guest memory");
                    return Outcome::Done(status::IOERR, 1);
                }
                let submitted = if kind == RequestType::In {
                    // SAFETY: the iovecs point into guest memory that the
                    // `Pending` entry keeps mapped until this token is reaped.
                    unsafe { self.storage.read(offset, &iov, token) }
                } else {
                    // SAFETY: as above.
                    unsafe { self.storage.write(offset, &iov, token) }
                };
                self.iov.0 = iov;
                submitted
            }
            RequestType::Flush => self.storage.flush(token),
            RequestType::Discard | RequestType::WriteZeroes => {
                match self.discard_segment(mem, req) {
                    Ok((offset, len, unmap)) if kind == RequestType::Discard => {
                        if !self.disk.discard || unmap {
                            return Outcome::Done(status::UNSUPP, 1);
                        }
                        self.storage.discard(offset, len, token)
                    }
                    Ok((offset, len, unmap)) => {
                        self.storage.write_zeroes(offset, len, unmap, token)
                    }
                    Err(st) => return Outcome::Done(st, 1),
                }
            }
        };
        match submitted {
            Ok(()) => Outcome::Submitted,
            Err(e) => {
                self.warn(head, &e);
                Outcome::Done(status::IOERR, 1)
            }
        }
    }

    fn get_id(&mut self, mem: &GuestMemRef, req: &crate::request::Request) -> Outcome {
        let mut written = 0usize;
        for d in &req.data {
            let n = (d.len as usize).min(ID_LEN - written);
            if mem
                .write_slice(&self.disk.serial[written..written + n], d.addr)
                .is_err()
            {
                return Outcome::Done(status::IOERR, 1);
            }
            self.dirty.mark(d.addr, n as u64);
            written += n;
            if written == ID_LEN {
                break;
            }
        }
        Outcome::Done(status::OK, written as u32 + 1)
    }

    /// Reads the single discard/write-zeroes segment: (offset, bytes, unmap).
    fn discard_segment(
        &self,
        mem: &GuestMemRef,
        req: &crate::request::Request,
    ) -> Result<(u64, u64, bool), u8> {
        let first = req.data.first().ok_or(status::IOERR)?;
        if req.data_len != 16 || first.len != 16 {
            return Err(status::IOERR);
        }
        let mut seg = [0u8; 16];
        mem.read_slice(&mut seg, first.addr)
            .map_err(|_| status::IOERR)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        if flags & !1 != 0 {
            return Err(status::UNSUPP);
        }
        let len = sectors * SECTOR;
        let offset = self.in_range(sector, len).ok_or(status::IOERR)?;
        Ok((offset, len, flags & 1 != 0))
    }

    fn finish(&mut self, mem: &GuestMemRef, addr: GuestAddress, st: u8) {
        if st != status::OK {
            QueueMetrics::add(&self.metrics.errors, 1);
        }
        if mem.write_obj(st, addr).is_ok() {
            self.dirty.mark(addr, 1);
        }
    }
}

/// Guest buffers as host iovecs in `iov` (cleared first); false if any byte
/// is outside guest memory.
fn iovecs(mem: &GuestMemRef, data: &[Descriptor], iov: &mut Vec<libc::iovec>) -> bool {
    iov.clear();
    backends::memory::host_iovecs(mem, data, iov)
}

impl QueueHandler for BlkQueue {
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.storage.notifier())
    }

    fn start(
        &mut self,
        mem: &GuestMemRef,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Option<u32> {
        if self.pending.len() < size as usize {
            self.pending.resize_with(size as usize, || None);
        }
        if self.pending.get(head as usize).is_some_and(Option::is_some) {
            // The driver reused a head that is still in flight: leave its
            // buffers alone, the earlier request owns them.
            self.warn(head, &"chain head already in flight");
            QueueMetrics::add(&self.metrics.errors, 1);
            return Some(0);
        }
        let mut descs = std::mem::take(&mut self.descs);
        let walked = walk_chain(mem.as_ref(), table, size, head, &mut descs);
        let data = std::mem::take(&mut self.data);
        let parsed = walked.map_err(|e| e.to_string()).and_then(|()| {
            parse_into(mem.as_ref(), &descs, data).map_err(|f| {
                if let Some(st) = f.status {
                    self.finish(mem, st, status::IOERR);
                }
                f.error.to_string()
            })
        });
        self.descs = descs;
        let mut req = match parsed {
            Ok(req) => req,
            Err(msg) => {
                self.warn(head, &msg);
                QueueMetrics::add(&self.metrics.errors, 1);
                return Some(1);
            }
        };
        let used = match self.execute(mem, head, &req) {
            Outcome::Done(st, len) => {
                self.finish(mem, req.status, st);
                Some(len)
            }
            Outcome::Submitted => {
                let used_len = if req.kind == RequestType::In {
                    req.data_len as u32 + 1
                } else {
                    1
                };
                // A read keeps its buffers (the parser gets a spare vector
                // instead: no copy, no allocation once warm).
                let data = if req.kind == RequestType::In {
                    let spare = self.spare.pop().unwrap_or_default();
                    std::mem::replace(&mut req.data, spare)
                } else {
                    Vec::new()
                };
                self.pending[head as usize] = Some(Pending {
                    _mem: mem.clone(),
                    status: req.status,
                    used_len,
                    kind: req.kind,
                    bytes: req.data_len,
                    started: Instant::now(),
                    data,
                });
                self.in_flight += 1;
                None
            }
        };
        self.data = req.data;
        used
    }

    fn submit(&mut self) {
        if let Err(e) = self.storage.submit() {
            tracing::error!(error = %e, "storage submit failed");
        }
    }

    fn reap(&mut self, done: &mut Vec<Used>) {
        let mut completions = std::mem::take(&mut self.completions);
        self.storage.reap(&mut completions);
        // One clock read per batch, not per request.
        let now = Instant::now();
        for c in completions.drain(..) {
            let head = c.token as u16;
            let Some(mut p) = self.pending.get_mut(head as usize).and_then(Option::take) else {
                continue;
            };
            // Even a failed read may have filled part of its buffers.
            self.dirty.mark_descs(&p.data, u64::MAX);
            if p.data.capacity() > 0 {
                p.data.clear();
                self.spare.push(std::mem::take(&mut p.data));
            }
            self.in_flight -= 1;
            let ok = c.result.is_ok();
            if let Err(e) = &c.result {
                self.warn(head, e);
            }
            let ns = u64::try_from(now.saturating_duration_since(p.started).as_nanos())
                .unwrap_or(u64::MAX);
            let m = &self.metrics;
            match p.kind {
                RequestType::In => {
                    QueueMetrics::add(&m.read_requests, 1);
                    QueueMetrics::add(&m.read_time_ns, ns);
                    if ok {
                        QueueMetrics::add(&m.read_bytes, p.bytes);
                    }
                }
                RequestType::Out => {
                    QueueMetrics::add(&m.write_requests, 1);
                    QueueMetrics::add(&m.write_time_ns, ns);
                    if ok {
                        QueueMetrics::add(&m.write_bytes, p.bytes);
                    }
                }
                RequestType::Flush => {
                    QueueMetrics::add(&m.flush_requests, 1);
                    QueueMetrics::add(&m.flush_time_ns, ns);
                }
                _ => {}
            }
            let st = if ok { status::OK } else { status::IOERR };
            self.finish(&p._mem, p.status, st);
            done.push(Used {
                head,
                len: if ok { p.used_len } else { 1 },
            });
        }
        self.completions = completions;
    }

    fn has_completions(&mut self) -> bool {
        self.storage.has_completions()
    }

    fn uring(&mut self) -> Option<&mut backends::uring::Uring> {
        self.storage.uring()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn wait(&mut self) {
        if let Err(e) = self.storage.wait() {
            tracing::error!(error = %e, "storage wait failed");
        }
    }
}
