//! A virtio-net driver on top of [`SyntheticFrontend`]: RX buffers kept
//! posted (mergeable frames reassembled from `num_buffers`), TX frames sent
//! from per-queue slots, and control queue commands. Queue `2k` is RX and
//! `2k + 1` TX of pair `k`; the control queue, if set up, comes last.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::{FrontendError, Seg, SyntheticFrontend};
use crate::device::Used;

/// Size of `struct virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;

/// RX descriptors left unposted, for tests that add chains of their own.
pub const RX_SPARE: usize = 4;

/// A frame received on an RX queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// The virtio-net header the device wrote.
    pub hdr: [u8; HDR_LEN],
    /// The frame, without the header.
    pub data: Vec<u8>,
    /// Buffers (chains) the frame spanned.
    pub buffers: u16,
    /// Where the device wrote it: each buffer's guest address and the
    /// bytes written there (its used length), in order.
    pub placed: Vec<(GuestAddress, u32)>,
}

impl RxFrame {
    /// The header's `num_buffers` field.
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

struct Partial {
    hdr: [u8; HDR_LEN],
    data: Vec<u8>,
    left: u16,
    got: u16,
    placed: Vec<(GuestAddress, u32)>,
}

struct RxState {
    bufs: Vec<GuestAddress>,
    by_head: Vec<Option<usize>>,
    partial: Option<Partial>,
}

struct TxState {
    slots: Vec<GuestAddress>,
    free: Vec<usize>,
    by_head: Vec<Option<usize>>,
}

/// Totals from a non-copying RX poll.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxCount {
    /// Complete frames.
    pub frames: u64,
    /// Frame bytes, headers excluded.
    pub bytes: u64,
    /// Used entries of zero length (returned without a frame).
    pub empty: u64,
}

/// The virtio-net driver.
pub struct NetDriver {
    fe: SyntheticFrontend,
    pairs: usize,
    rx_buf_len: u32,
    tx_slot_len: u32,
    rx: Vec<RxState>,
    tx: Vec<TxState>,
    ctrl_buf: Option<GuestAddress>,
    used: Vec<Used>,
    bufs_scratch: Vec<(usize, u32)>,
}

impl NetDriver {
    /// Sets up `pairs` queue pairs (plus the control queue if the frontend
    /// has one more queue): all but [`RX_SPARE`] RX descriptors get a buffer
    /// of `rx_buf_len` bytes, posted and kicked; each TX queue gets
    /// `tx_slots` slots of `tx_slot_len` bytes.
    pub fn new(
        mut fe: SyntheticFrontend,
        pairs: usize,
        rx_buf_len: u32,
        tx_slots: usize,
        tx_slot_len: u32,
    ) -> Result<Self, FrontendError> {
        let mut rx = Vec::with_capacity(pairs);
        let mut tx = Vec::with_capacity(pairs);
        for p in 0..pairs {
            let size = fe.queue(2 * p).0.size() as usize;
            let bufs = (0..size.saturating_sub(RX_SPARE).max(1))
                .map(|_| fe.alloc(u64::from(rx_buf_len), 64))
                .collect::<Result<Vec<_>, _>>()?;
            rx.push(RxState {
                bufs,
                by_head: vec![None; size],
                partial: None,
            });
            let size = fe.queue(2 * p + 1).0.size() as usize;
            let slots = (0..tx_slots.min(size))
                .map(|_| fe.alloc(u64::from(tx_slot_len), 64))
                .collect::<Result<Vec<_>, _>>()?;
            tx.push(TxState {
                free: (0..slots.len()).rev().collect(),
                slots,
                by_head: vec![None; size],
            });
        }
        let ctrl_buf = if fe.num_queues() > 2 * pairs {
            Some(fe.alloc(4096, 64)?)
        } else {
            None
        };
        let mut d = NetDriver {
            fe,
            pairs,
            rx_buf_len,
            tx_slot_len,
            rx,
            tx,
            ctrl_buf,
            used: Vec::new(),
            bufs_scratch: Vec::new(),
        };
        for p in 0..pairs {
            for i in 0..d.rx[p].bufs.len() {
                d.post_rx(p, i)?;
            }
            d.fe.queue(2 * p).0.notify();
        }
        Ok(d)
    }

    /// The underlying frontend.
    pub fn frontend(&mut self) -> &mut SyntheticFrontend {
        &mut self.fe
    }

    /// Queue pairs.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    fn post_rx(&mut self, pair: usize, buf: usize) -> Result<(), FrontendError> {
        let seg = Seg {
            addr: self.rx[pair].bufs[buf],
            len: self.rx_buf_len,
            writable: true,
        };
        let (vq, mem) = self.fe.queue(2 * pair);
        if let Some(head) = vq.add(mem, &[seg])? {
            self.rx[pair].by_head[head as usize] = Some(buf);
        }
        Ok(())
    }

    /// Free TX slots on `pair`.
    pub fn tx_free(&self, pair: usize) -> usize {
        self.tx[pair].free.len()
    }

    /// Places `hdr` + `frame` on the TX queue of `pair` (header and frame in
    /// two descriptors) without kicking. False if no slot is free.
    pub fn send(
        &mut self,
        pair: usize,
        hdr: &[u8; HDR_LEN],
        frame: &[u8],
    ) -> Result<bool, FrontendError> {
        if HDR_LEN + frame.len() > self.tx_slot_len as usize {
            return Err(FrontendError::OutOfMemory);
        }
        let Some(slot) = self.tx[pair].free.pop() else {
            return Ok(false);
        };
        let addr = self.tx[pair].slots[slot];
        let data = GuestAddress(addr.0 + HDR_LEN as u64);
        let mem = self.fe.mem();
        mem.write_slice(hdr, addr).map_err(FrontendError::Access)?;
        mem.write_slice(frame, data)
            .map_err(FrontendError::Access)?;
        let segs = [
            Seg {
                addr,
                len: HDR_LEN as u32,
                writable: false,
            },
            Seg {
                addr: data,
                len: frame.len() as u32,
                writable: false,
            },
        ];
        self.post_tx(pair, slot, &segs)
    }

    /// Writes `hdr` + `frame` into every TX slot of `pair` once, so that
    /// [`Self::send_prefilled`] can post them without copying (benchmarks).
    pub fn prefill_tx(
        &mut self,
        pair: usize,
        hdr: &[u8; HDR_LEN],
        frame: &[u8],
    ) -> Result<(), FrontendError> {
        if HDR_LEN + frame.len() > self.tx_slot_len as usize {
            return Err(FrontendError::OutOfMemory);
        }
        let mem = self.fe.mem();
        for &addr in &self.tx[pair].slots {
            mem.write_slice(hdr, addr).map_err(FrontendError::Access)?;
            mem.write_slice(frame, GuestAddress(addr.0 + HDR_LEN as u64))
                .map_err(FrontendError::Access)?;
        }
        Ok(())
    }

    /// Posts a slot filled by [`Self::prefill_tx`] holding a frame of
    /// `frame_len` bytes, header and frame in one descriptor, without
    /// kicking. False if no slot is free.
    pub fn send_prefilled(&mut self, pair: usize, frame_len: u32) -> Result<bool, FrontendError> {
        let Some(slot) = self.tx[pair].free.pop() else {
            return Ok(false);
        };
        let addr = self.tx[pair].slots[slot];
        let seg = Seg {
            addr,
            len: HDR_LEN as u32 + frame_len,
            writable: false,
        };
        self.post_tx(pair, slot, &[seg])
    }

    /// Publishes TX slot `slot` of `pair` as the chain `segs`; false (and the
    /// slot free again) if the queue has no room.
    fn post_tx(&mut self, pair: usize, slot: usize, segs: &[Seg]) -> Result<bool, FrontendError> {
        let (vq, mem) = self.fe.queue(2 * pair + 1);
        match vq.add(mem, segs)? {
            Some(head) => {
                self.tx[pair].by_head[head as usize] = Some(slot);
                Ok(true)
            }
            None => {
                self.tx[pair].free.push(slot);
                Ok(false)
            }
        }
    }

    /// Kicks the TX queue of `pair`, unless with EVENT_IDX the device said
    /// it will see the new frames without a kick (as Linux drivers do).
    pub fn kick_tx(&mut self, pair: usize) {
        let (vq, mem) = self.fe.queue(2 * pair + 1);
        vq.notify_if_needed(mem);
    }

    /// Frees the slots of sent frames without blocking; returns how many.
    pub fn reclaim_tx(&mut self, pair: usize) -> Result<usize, FrontendError> {
        self.used.clear();
        let (vq, mem) = self.fe.queue(2 * pair + 1);
        vq.poll_used(mem, &mut self.used)?;
        Ok(self.release_tx(pair))
    }

    /// Waits until three quarters of the frames in flight (at least one) are
    /// returned, asking for one notification then, as Linux's virtio-net
    /// does for transmit completions; returns how many were freed.
    pub fn wait_tx(&mut self, pair: usize, timeout: Duration) -> Result<usize, FrontendError> {
        self.used.clear();
        let (vq, mem) = self.fe.queue(2 * pair + 1);
        let batch = (vq.outstanding() * 3 / 4) as u16;
        vq.wait_used_batch(mem, timeout, &mut self.used, batch)?;
        Ok(self.release_tx(pair))
    }

    fn release_tx(&mut self, pair: usize) -> usize {
        let t = &mut self.tx[pair];
        let mut n = 0;
        for u in &self.used {
            if let Some(slot) = t.by_head.get_mut(u.head as usize).and_then(Option::take) {
                t.free.push(slot);
                n += 1;
            }
        }
        n
    }

    /// Sends one frame, kicks and waits for it to be returned.
    pub fn send_wait(
        &mut self,
        pair: usize,
        hdr: &[u8; HDR_LEN],
        frame: &[u8],
        timeout: Duration,
    ) -> Result<(), FrontendError> {
        if !self.send(pair, hdr, frame)? {
            return Err(FrontendError::OutOfMemory);
        }
        self.kick_tx(pair);
        let deadline = Instant::now() + timeout;
        while self.tx[pair].free.len() < self.tx[pair].slots.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_tx(pair, left.max(Duration::from_millis(1)))?;
        }
        Ok(())
    }

    /// Collects frames received on `pair` without blocking, reposting their
    /// buffers. With `out`, frames are copied into it; otherwise only counted.
    pub fn poll_rx(
        &mut self,
        pair: usize,
        out: Option<&mut Vec<RxFrame>>,
    ) -> Result<RxCount, FrontendError> {
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        let (vq, mem) = self.fe.queue(2 * pair);
        let r = vq.poll_used(mem, &mut used);
        let count = r.and_then(|()| self.absorb(pair, &used, out));
        self.used = used;
        count
    }

    /// Like [`Self::poll_rx`] but waits up to `timeout` for used entries.
    pub fn wait_rx(
        &mut self,
        pair: usize,
        timeout: Duration,
        out: Option<&mut Vec<RxFrame>>,
    ) -> Result<RxCount, FrontendError> {
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        let (vq, mem) = self.fe.queue(2 * pair);
        let r = vq.wait_used(mem, timeout, &mut used);
        let count = r.and_then(|()| self.absorb(pair, &used, out));
        self.used = used;
        count
    }

    fn absorb(
        &mut self,
        pair: usize,
        used: &[Used],
        mut out: Option<&mut Vec<RxFrame>>,
    ) -> Result<RxCount, FrontendError> {
        let mut count = RxCount::default();
        // Map every head to its buffer before reposting any: reposting reuses
        // the descriptor ids just freed.
        let mut bufs = std::mem::take(&mut self.bufs_scratch);
        bufs.clear();
        for u in used {
            if let Some(buf) = self.rx[pair]
                .by_head
                .get_mut(u.head as usize)
                .and_then(Option::take)
            {
                bufs.push((buf, u.len));
            }
        }
        for &(buf, len) in &bufs {
            let addr = self.rx[pair].bufs[buf];
            let len = (len as usize).min(self.rx_buf_len as usize);
            self.take_rx(pair, addr, len, &mut count, out.as_deref_mut())?;
        }
        for &(buf, _) in &bufs {
            self.post_rx(pair, buf)?;
        }
        self.bufs_scratch = bufs;
        if !used.is_empty() {
            self.fe.queue(2 * pair).0.notify();
        }
        Ok(count)
    }

    fn take_rx(
        &mut self,
        pair: usize,
        addr: GuestAddress,
        len: usize,
        count: &mut RxCount,
        out: Option<&mut Vec<RxFrame>>,
    ) -> Result<(), FrontendError> {
        let copy = out.is_some();
        let mem = self.fe.mem();
        let mut p = match self.rx[pair].partial.take() {
            Some(p) => p,
            None => {
                if len < HDR_LEN {
                    count.empty += 1;
                    return Ok(());
                }
                let mut hdr = [0u8; HDR_LEN];
                mem.read_slice(&mut hdr, addr)
                    .map_err(FrontendError::Access)?;
                let n = u16::from_le_bytes([hdr[10], hdr[11]]).max(1);
                let mut p = Partial {
                    hdr,
                    data: Vec::new(),
                    left: n,
                    got: 0,
                    // Recorded only for frames handed out (not in benchmarks).
                    placed: if copy {
                        vec![(addr, len as u32)]
                    } else {
                        Vec::new()
                    },
                };
                p.left -= 1;
                p.got = 1;
                let body = len - HDR_LEN;
                count.bytes += body as u64;
                if copy {
                    p.data.resize(body, 0);
                    mem.read_slice(&mut p.data, GuestAddress(addr.0 + HDR_LEN as u64))
                        .map_err(FrontendError::Access)?;
                }
                return self.finish(pair, p, count, out);
            }
        };
        count.bytes += len as u64;
        if copy {
            p.placed.push((addr, len as u32));
            let start = p.data.len();
            p.data.resize(start + len, 0);
            mem.read_slice(&mut p.data[start..], addr)
                .map_err(FrontendError::Access)?;
        }
        p.left -= 1;
        p.got += 1;
        self.finish(pair, p, count, out)
    }

    fn finish(
        &mut self,
        pair: usize,
        p: Partial,
        count: &mut RxCount,
        out: Option<&mut Vec<RxFrame>>,
    ) -> Result<(), FrontendError> {
        if p.left > 0 {
            self.rx[pair].partial = Some(p);
            return Ok(());
        }
        count.frames += 1;
        if let Some(out) = out {
            out.push(RxFrame {
                hdr: p.hdr,
                data: p.data,
                buffers: p.got,
                placed: p.placed,
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` until `want` frames arrived on `pair`.
    pub fn recv(
        &mut self,
        pair: usize,
        want: usize,
        timeout: Duration,
    ) -> Result<Vec<RxFrame>, FrontendError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout(timeout));
            }
            match self.wait_rx(pair, left, Some(&mut out)) {
                Ok(_) | Err(FrontendError::Timeout(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Guest address of the control queue's ack byte, if there is a control queue.
    pub fn ctrl_ack_addr(&self) -> Option<GuestAddress> {
        self.ctrl_buf.map(|b| GuestAddress(b.0 + 2048))
    }

    /// Sends a control command (class, command, data) and returns the ack byte.
    pub fn ctrl(
        &mut self,
        class: u8,
        cmd: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<u8, FrontendError> {
        let buf = self
            .ctrl_buf
            .ok_or(FrontendError::MissingFeatures(1 << 17))?;
        let q = 2 * self.pairs;
        let mem = self.fe.mem();
        let mut msg = vec![class, cmd];
        msg.extend_from_slice(data);
        mem.write_slice(&msg, buf).map_err(FrontendError::Access)?;
        let ack = self.ctrl_ack_addr().unwrap_or(buf);
        mem.write_obj(0xffu8, ack).map_err(FrontendError::Access)?;
        let segs = [
            Seg {
                addr: buf,
                len: msg.len() as u32,
                writable: false,
            },
            Seg {
                addr: ack,
                len: 1,
                writable: true,
            },
        ];
        let (vq, mem) = self.fe.queue(q);
        vq.add(mem, &segs)?.ok_or(FrontendError::OutOfMemory)?;
        vq.notify();
        let mut used = Vec::new();
        vq.wait_used(mem, timeout, &mut used)?;
        mem.read_obj(ack).map_err(FrontendError::Access)
    }
}
