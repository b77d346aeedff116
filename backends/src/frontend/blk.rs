//! virtio-blk requests over the synthetic frontend, at any queue depth.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::{FrontendError, Seg, SyntheticFrontend};
use crate::device::Used;

/// VIRTIO_BLK_T_IN.
pub const T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT.
pub const T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH.
pub const T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID.
pub const T_GET_ID: u32 = 8;
/// VIRTIO_BLK_T_DISCARD.
pub const T_DISCARD: u32 = 11;
/// VIRTIO_BLK_T_WRITE_ZEROES.
pub const T_WRITE_ZEROES: u32 = 13;
/// VIRTIO_BLK_S_OK.
pub const S_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR.
pub const S_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP.
pub const S_UNSUPP: u8 = 2;
/// Status value written before submission, so an untouched status is visible.
pub const S_UNTOUCHED: u8 = 0xff;

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// Queue the request was on.
    pub queue: usize,
    /// Buffer slot it used (see [`BlkDriver::slot_data`]).
    pub slot: usize,
    /// Status byte the device wrote.
    pub status: u8,
    /// Used length the device reported.
    pub len: u32,
}

#[derive(Clone, Copy)]
struct Slot {
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

struct QueueSlots {
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_head: Vec<Option<usize>>,
}

/// A virtio-blk driver on top of [`SyntheticFrontend`].
pub struct BlkDriver {
    fe: SyntheticFrontend,
    queues: Vec<QueueSlots>,
    max_io: u32,
}

/// One request to submit.
#[derive(Clone, Copy, Debug)]
pub struct BlkReq<'a> {
    /// Request type (`T_*`).
    pub kind: u32,
    /// First sector.
    pub sector: u64,
    /// Data length in bytes for IN/OUT/GET_ID; sectors for DISCARD/WRITE_ZEROES.
    pub len: u32,
    /// Bytes to write for OUT (copied into the slot's buffer), if any.
    pub data: Option<&'a [u8]>,
    /// WRITE_ZEROES/DISCARD flags.
    pub flags: u32,
}

impl BlkReq<'_> {
    /// A read of `len` bytes.
    pub fn read(sector: u64, len: u32) -> Self {
        BlkReq {
            kind: T_IN,
            sector,
            len,
            data: None,
            flags: 0,
        }
    }
    /// A write of `len` bytes (buffer content left as is).
    pub fn write(sector: u64, len: u32) -> Self {
        BlkReq {
            kind: T_OUT,
            sector,
            len,
            data: None,
            flags: 0,
        }
    }
}

impl BlkDriver {
    /// Carves `slots_per_queue` request buffers of up to `max_io` bytes per queue.
    pub fn new(
        mut fe: SyntheticFrontend,
        slots_per_queue: usize,
        max_io: u32,
    ) -> Result<Self, FrontendError> {
        let mut queues = Vec::new();
        for q in 0..fe.num_queues() {
            let size = fe.queue(q).0.size() as usize;
            let mut slots = Vec::with_capacity(slots_per_queue);
            for _ in 0..slots_per_queue {
                let data = fe.alloc(u64::from(max_io), 4096)?;
                let hdr = fe.alloc(16, 16)?;
                let status = fe.alloc(1, 1)?;
                slots.push(Slot { hdr, data, status });
            }
            queues.push(QueueSlots {
                slots,
                free: (0..slots_per_queue).rev().collect(),
                by_head: vec![None; size],
            });
        }
        Ok(BlkDriver { fe, queues, max_io })
    }

    /// The underlying frontend.
    pub fn frontend(&mut self) -> &mut SyntheticFrontend {
        &mut self.fe
    }

    /// Free request slots on queue `q`.
    pub fn free_slots(&self, q: usize) -> usize {
        self.queues[q].free.len()
    }

    /// Places a request on queue `q` without kicking. Returns its slot.
    pub fn submit(&mut self, q: usize, req: &BlkReq) -> Result<Option<usize>, FrontendError> {
        let Some(slot_id) = self.queues[q].free.pop() else {
            return Ok(None);
        };
        let slot = self.queues[q].slots[slot_id];
        let mem = self.fe.mem();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req.kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&req.sector.to_le_bytes());
        mem.write_slice(&hdr, slot.hdr)
            .map_err(FrontendError::Access)?;
        mem.write_obj(S_UNTOUCHED, slot.status)
            .map_err(FrontendError::Access)?;
        let mut segs = vec![Seg {
            addr: slot.hdr,
            len: 16,
            writable: false,
        }];
        match req.kind {
            T_IN | T_GET_ID => segs.push(Seg {
                addr: slot.data,
                len: req.len.min(self.max_io),
                writable: true,
            }),
            T_OUT => {
                if let Some(d) = req.data {
                    mem.write_slice(d, slot.data)
                        .map_err(FrontendError::Access)?;
                }
                segs.push(Seg {
                    addr: slot.data,
                    len: req.len.min(self.max_io),
                    writable: false,
                });
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&req.sector.to_le_bytes());
                seg[8..12].copy_from_slice(&req.len.to_le_bytes());
                seg[12..16].copy_from_slice(&req.flags.to_le_bytes());
                mem.write_slice(&seg, slot.data)
                    .map_err(FrontendError::Access)?;
                segs.push(Seg {
                    addr: slot.data,
                    len: 16,
                    writable: false,
                });
            }
            _ => {}
        }
        segs.push(Seg {
            addr: slot.status,
            len: 1,
            writable: true,
        });
        let (vq, mem) = self.fe.queue(q);
        match vq.add(mem, &segs)? {
            Some(head) => {
                self.queues[q].by_head[head as usize] = Some(slot_id);
                Ok(Some(slot_id))
            }
            None => {
                self.queues[q].free.push(slot_id);
                Ok(None)
            }
        }
    }

    /// Kicks queue `q`.
    pub fn kick(&mut self, q: usize) {
        self.fe.queue(q).0.notify();
    }

    /// Kicks queue `q` only if the device asked for it (EVENT_IDX).
    pub fn kick_if_needed(&mut self, q: usize) {
        let (vq, mem) = self.fe.queue(q);
        vq.notify_if_needed(mem);
    }

    /// Waits for completions on queue `q` and frees their slots. The data of
    /// a freed slot stays readable until the slot is reused.
    pub fn wait(
        &mut self,
        q: usize,
        timeout: Duration,
        out: &mut Vec<Done>,
    ) -> Result<(), FrontendError> {
        let mut used: Vec<Used> = Vec::new();
        let (vq, mem) = self.fe.queue(q);
        vq.wait_used(mem, timeout, &mut used)?;
        self.collect(q, &used, out)
    }

    /// Like [`Self::wait`] but never blocks.
    pub fn poll(&mut self, q: usize, out: &mut Vec<Done>) -> Result<(), FrontendError> {
        let mut used: Vec<Used> = Vec::new();
        let (vq, mem) = self.fe.queue(q);
        vq.poll_used(mem, &mut used)?;
        self.collect(q, &used, out)
    }

    fn collect(
        &mut self,
        q: usize,
        used: &[Used],
        out: &mut Vec<Done>,
    ) -> Result<(), FrontendError> {
        for u in used {
            let Some(slot_id) = self.queues[q]
                .by_head
                .get_mut(u.head as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            let status = self
                .fe
                .mem()
                .read_obj(self.queues[q].slots[slot_id].status)
                .map_err(FrontendError::Access)?;
            self.queues[q].free.push(slot_id);
            out.push(Done {
                queue: q,
                slot: slot_id,
                status,
                len: u.len,
            });
        }
        Ok(())
    }

    /// Guest addresses of slot `slot`'s data buffer and status byte on queue `q`.
    pub fn slot_addrs(&self, q: usize, slot: usize) -> (GuestAddress, GuestAddress) {
        let s = self.queues[q].slots[slot];
        (s.data, s.status)
    }

    /// Copies `len` bytes of slot data out of guest memory.
    pub fn slot_data(&self, q: usize, slot: usize, len: usize) -> Result<Vec<u8>, FrontendError> {
        let mut buf = vec![0u8; len];
        self.fe
            .mem()
            .read_slice(&mut buf, self.queues[q].slots[slot].data)
            .map_err(FrontendError::Access)?;
        Ok(buf)
    }

    /// Submits one request, kicks and waits for it (queue depth 1).
    pub fn run(
        &mut self,
        q: usize,
        req: &BlkReq,
        timeout: Duration,
    ) -> Result<Done, FrontendError> {
        self.submit(q, req)?.ok_or(FrontendError::OutOfMemory)?;
        self.kick(q);
        let mut out = Vec::new();
        while out.is_empty() {
            self.wait(q, timeout, &mut out)?;
        }
        Ok(out[0])
    }

    /// Writes `data` at `sector` and returns the status.
    pub fn write(
        &mut self,
        q: usize,
        sector: u64,
        data: &[u8],
        timeout: Duration,
    ) -> Result<u8, FrontendError> {
        let req = BlkReq {
            kind: T_OUT,
            sector,
            len: data.len() as u32,
            data: Some(data),
            flags: 0,
        };
        Ok(self.run(q, &req, timeout)?.status)
    }

    /// Reads `len` bytes at `sector`; returns the status and the data.
    pub fn read(
        &mut self,
        q: usize,
        sector: u64,
        len: u32,
        timeout: Duration,
    ) -> Result<(u8, Vec<u8>), FrontendError> {
        let done = self.run(q, &BlkReq::read(sector, len), timeout)?;
        Ok((done.status, self.slot_data(q, done.slot, len as usize)?))
    }
}
