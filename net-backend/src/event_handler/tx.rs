//! Transmit: each chain (virtio-net header + frame, device-readable) is
//! checked, turned into iovecs pointing straight into guest memory and
//! written to the tap queue with io_uring; the header goes to the tap as is
//! (its vnet header size is the guest's). Malformed chains are counted and
//! complete with nothing written.
//!
//! Chains are handed back in the order they were taken, a malformed one
//! too: a backend without inflight tracking that is restarted starts at the
//! used index (vmm and QEMU do so), which is only right if every chain
//! before that index in the available ring is done. Published out of order,
//! a chain still being written would be skipped for good and a finished one
//! taken twice (Linux: "id N is not a head!", and the queue is dead).

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use backends::desc::{walk_chain, Descriptor};
use backends::memory::GuestMemRef;
use backends::ratelimit::LogLimiter;
use backends::uring::{Restrictions, Uring};
use backends::{QueueHandler, QueueMetrics, Used};
use io_uring::{opcode, types};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::metrics::{DropReason as Why, NetQueueMetrics};
use crate::vnet::{HdrError, VnetHdr, HDR_LEN};

const MAX_IOVS: usize = 1024;
/// The tap queue, registered as the ring's only fixed file.
const TAP: types::Fixed = types::Fixed(0);

struct Pending {
    /// Its place in [`TxQueue::order`], counted from the first chain taken.
    seq: u64,
    iovs: Vec<libc::iovec>,
    frame_len: usize,
    _mem: GuestMemRef,
}

// SAFETY: the iovecs point into guest memory kept alive by `_mem`; they are
// only dereferenced by the kernel, never by another thread of ours.
unsafe impl Send for Pending {}

/// What TX checks frames against.
#[derive(Clone, Copy, Debug)]
pub struct TxLimits {
    /// MTU; plain frames above it are dropped.
    pub mtu: u16,
    /// Features acked (GSO types allowed, header length).
    pub features: u64,
}

/// The TX processor of one queue.
pub struct TxQueue {
    /// Kept open for the ring's fixed file table.
    _tap: File,
    ring: Uring,
    limits: TxLimits,
    hdr_len: usize,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    spare: Vec<Vec<libc::iovec>>,
    descs: Vec<Descriptor>,
    cqes: Vec<(usize, i32)>,
    /// Every chain taken and not handed back, oldest first: its head and
    /// whether it is done.
    order: VecDeque<(u16, bool)>,
    /// The sequence number of `order`'s front.
    first_seq: u64,
    net: Arc<NetQueueMetrics>,
    metrics: Arc<QueueMetrics>,
    log: LogLimiter,
}

// SAFETY: `spare` holds only empty iovec vectors (no live pointers); the
// rest is Send.
unsafe impl Send for TxQueue {}

impl TxQueue {
    /// A TX processor writing to `tap` (one tap queue).
    pub fn new(
        tap: File,
        limits: TxLimits,
        queue_size: u16,
        net: Arc<NetQueueMetrics>,
        metrics: Arc<QueueMetrics>,
    ) -> std::io::Result<Self> {
        let ring = Uring::new(
            u32::from(queue_size),
            Restrictions {
                ops: &[opcode::Write::CODE, opcode::Writev::CODE],
                fixed_files: &[tap.as_raw_fd()],
            },
        )
        .map_err(std::io::Error::other)?;
        Ok(TxQueue {
            _tap: tap,
            ring,
            limits,
            hdr_len: crate::vnet::hdr_len(limits.features),
            pending: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            descs: Vec::new(),
            cqes: Vec::new(),
            order: VecDeque::new(),
            first_seq: 0,
            net,
            metrics,
            log: LogLimiter::default(),
        })
    }

    fn reject(&mut self, why: Why, head: u16) -> Option<u32> {
        self.net.dropped(why);
        QueueMetrics::add(&self.metrics.errors, 1);
        if self.log.allow() {
            tracing::warn!(?why, head, "TX frame dropped");
        }
        if self.order.is_empty() {
            return Some(0);
        }
        // Behind frames still being written: handed back after them.
        self.order.push_back((head, true));
        None
    }

    /// Hands back, in order, the chains at the front that are done.
    fn release(&mut self, done: &mut Vec<Used>) {
        while let Some(&(head, true)) = self.order.front() {
            self.order.pop_front();
            self.first_seq += 1;
            done.push(Used { head, len: 0 });
        }
    }

    /// Reads the header from the start of the chain.
    fn header(&self, mem: &GuestMemRef) -> Option<VnetHdr> {
        let mut raw = [0u8; HDR_LEN];
        let want = self.hdr_len;
        let mut got = 0usize;
        for d in &self.descs {
            let n = (d.len as usize).min(want - got);
            if n == 0 {
                continue;
            }
            // One region lookup, no slice iterator: this runs for every frame.
            let part = mem.get_slice(d.addr, n).ok()?;
            part.copy_to(&mut raw[got..got + n]);
            got += n;
            if got == want {
                return Some(VnetHdr::parse(&raw));
            }
        }
        None
    }

    fn iovecs(&mut self, mem: &GuestMemRef) -> Option<Vec<libc::iovec>> {
        let mut iovs = self.spare.pop().unwrap_or_default();
        if backends::memory::host_iovecs(mem, &self.descs, &mut iovs) {
            return Some(iovs);
        }
        iovs.clear();
        self.spare.push(iovs);
        None
    }
}

impl QueueHandler for TxQueue {
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.ring.notifier())
    }

    fn start(
        &mut self,
        mem: &GuestMemRef,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Option<u32> {
        if walk_chain(mem.as_ref(), desc_table, queue_size, head, &mut self.descs).is_err()
            || self.descs.iter().any(|d| d.writable)
        {
            return self.reject(Why::BadChain, head);
        }
        let Some(iovs) = self.iovecs(mem) else {
            return self.reject(Why::BadAddress, head);
        };
        let total: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
        let frame_len = (total as usize).saturating_sub(self.hdr_len);
        let checked = match self.header(mem) {
            _ if iovs.len() > MAX_IOVS => Err(Why::BadChain),
            None => Err(Why::BadHeader),
            Some(hdr) => match hdr.check_tx(frame_len, self.limits.mtu, self.limits.features) {
                Ok(()) => Ok(()),
                Err(HdrError::Oversize(_)) => Err(Why::Oversize),
                Err(_) => Err(Why::BadHeader),
            },
        };
        if let Err(why) = checked {
            let mut iovs = iovs;
            iovs.clear();
            self.spare.push(iovs);
            return self.reject(why, head);
        }
        let token = self.free.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        let entry = match iovs.as_slice() {
            // One buffer (Linux puts the header in front of a linear frame):
            // a plain write spares the kernel copying the iovec array.
            [one] => opcode::Write::new(TAP, one.iov_base.cast(), one.iov_len as u32).build(),
            _ => opcode::Writev::new(TAP, iovs.as_ptr(), iovs.len() as u32).build(),
        }
        .user_data(token as u64);
        let seq = self.first_seq + self.order.len() as u64;
        self.pending[token] = Some(Pending {
            seq,
            iovs,
            frame_len,
            _mem: mem.clone(),
        });
        // SAFETY: the iovec array lives in `pending[token]` (its heap buffer
        // does not move) and points into guest memory kept mapped by `_mem`;
        // both stay until the completion for `token` is reaped.
        if unsafe { self.ring.push(&entry) }.is_err() {
            let p = self.pending[token].take();
            self.free.push(token);
            if let Some(mut p) = p {
                p.iovs.clear();
                self.spare.push(p.iovs);
            }
            return self.reject(Why::TapError, head);
        }
        self.order.push_back((head, false));
        None
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::error!(error = %e, "TX submit failed");
        }
    }

    fn reap(&mut self, done: &mut Vec<Used>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(|ud, res| cqes.push((ud as usize, res)));
        for (token, res) in cqes.drain(..) {
            let Some(mut p) = self.pending.get_mut(token).and_then(Option::take) else {
                continue;
            };
            self.free.push(token);
            if let Some(slot) = usize::try_from(p.seq - self.first_seq)
                .ok()
                .and_then(|i| self.order.get_mut(i))
            {
                slot.1 = true;
            }
            if res < 0 {
                self.net.dropped(Why::TapError);
                QueueMetrics::add(&self.metrics.errors, 1);
                if self.log.allow() {
                    tracing::warn!(error = %std::io::Error::from_raw_os_error(-res), "tap write failed");
                }
            } else {
                self.net.frame(p.frame_len);
                QueueMetrics::add(&self.metrics.write_bytes, p.frame_len as u64);
            }
            p.iovs.clear();
            self.spare.push(p.iovs);
        }
        self.cqes = cqes;
        self.release(done);
    }

    fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    fn uring(&mut self) -> Option<&mut Uring> {
        Some(&mut self.ring)
    }

    fn in_flight(&self) -> usize {
        self.order.len()
    }

    fn wait(&mut self) {
        let _ = self.ring.wait();
    }
}
