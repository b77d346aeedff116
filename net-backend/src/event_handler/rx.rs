//! Receive: frames read from the tap queue land in bounce buffers (several
//! reads posted at once through io_uring), then are copied into the guest's
//! RX chains in the order the guest posted them. A frame larger than one
//! chain spans several (VIRTIO_NET_F_MRG_RXBUF) and the header's
//! `num_buffers` says how many. Chains are consumed in order, so the used
//! ring follows the available ring. Every byte copied into guest memory
//! (header, `num_buffers` and frame) is marked in the dirty log right after
//! it is written, before its chain is handed back for the used ring.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use backends::desc::{walk_chain, Descriptor};
use backends::memory::{GuestMem, GuestMemRef};
use backends::ratelimit::LogLimiter;
use backends::uring::{Restrictions, Uring};
use backends::{DirtyLogger, QueueHandler, QueueMetrics, Used};
use io_uring::{opcode, types};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::metrics::{DropReason as Why, NetQueueMetrics};
use crate::vnet::{HDR_LEN, MAX_GSO_FRAME};

/// Errors copying a frame into RX chains.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ScatterError {
    /// The chains offered cannot hold the frame.
    #[error("Not enough RX buffer space")]
    NotEnough,
    /// A buffer lies outside guest memory.
    #[error("RX buffer outside guest memory")]
    BadAddress,
    /// Without mergeable buffers, the frame does not fit the first chain.
    #[error("Frame larger than the RX buffer")]
    TooBig,
}

/// How frames are laid out in RX buffers, from the acked features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxFormat {
    /// virtio-net header length (10 or 12).
    pub hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several chains.
    pub mergeable: bool,
}

impl RxFormat {
    /// The layout for the acked `features`.
    pub fn for_features(features: u64) -> Self {
        RxFormat {
            hdr_len: crate::vnet::hdr_len(features),
            mergeable: features & crate::vnet::features::MRG_RXBUF != 0,
        }
    }
}

/// Bytes per bounce buffer: header plus the largest GSO frame.
pub const BOUNCE_LEN: usize = HDR_LEN + MAX_GSO_FRAME;
/// Tap reads kept posted per queue.
pub const READS: usize = 16;
/// User data of cancel requests (kept below bit 63, which the ring may reserve).
const CANCEL: u64 = 1 << 62;
/// User data of the no-op that wakes the worker for frames delivered outside a completion.
const WAKE: u64 = 1 << 61;

/// Copies `packet` (virtio-net header + frame) into the writable buffers of
/// `chains`, filling each chain before the next (only the first without
/// mergeable buffers), and sets `num_buffers` (12-byte header) to the number
/// of chains used. `lens` receives the bytes written per chain. What is
/// written is marked in `dirty`, a failed copy's part included.
pub fn scatter<'a>(
    mem: &GuestMem,
    packet: &[u8],
    fmt: RxFormat,
    chains: impl Iterator<Item = &'a [Descriptor]> + Clone,
    lens: &mut Vec<u32>,
    dirty: &mut DirtyLogger,
) -> Result<(), ScatterError> {
    lens.clear();
    if packet.len() < fmt.hdr_len {
        return Err(ScatterError::NotEnough);
    }
    let mut room = 0u64;
    let mut needed = 0usize;
    for chain in chains.clone() {
        if room >= packet.len() as u64 {
            break;
        }
        if needed == 1 && !fmt.mergeable {
            return Err(ScatterError::TooBig);
        }
        room += chain.iter().map(|d| u64::from(d.len)).sum::<u64>();
        needed += 1;
    }
    if room < packet.len() as u64 {
        return Err(ScatterError::NotEnough);
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr[..fmt.hdr_len].copy_from_slice(&packet[..fmt.hdr_len]);
    if fmt.hdr_len == HDR_LEN {
        hdr[10..12].copy_from_slice(&(needed as u16).to_le_bytes());
    }
    let parts = [&hdr[..fmt.hdr_len], &packet[fmt.hdr_len..]];
    let (mut part, mut off) = (0usize, 0usize);
    for chain in chains.take(needed) {
        let mut used = 0u32;
        for d in chain {
            let mut pos = 0usize;
            while pos < d.len as usize && part < parts.len() {
                let src = &parts[part][off..];
                let n = src.len().min(d.len as usize - pos);
                let addr = d
                    .addr
                    .0
                    .checked_add(pos as u64)
                    .ok_or(ScatterError::BadAddress)?;
                mem.write_slice(&src[..n], GuestAddress(addr))
                    .map_err(|_| ScatterError::BadAddress)?;
                dirty.mark(GuestAddress(addr), n as u64);
                pos += n;
                off += n;
                used += n as u32;
                if off == parts[part].len() {
                    part += 1;
                    off = 0;
                }
            }
        }
        lens.push(used);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Idle,
    Reading,
    Full,
}

/// The RX processor of one queue.
pub struct RxQueue {
    tap: File,
    ring: Uring,
    bufs: Vec<Box<[u8]>>,
    slots: Vec<Slot>,
    full: VecDeque<(usize, usize)>,
    chains: VecDeque<(u16, Vec<Descriptor>)>,
    spare: Vec<Vec<Descriptor>>,
    ready: Vec<Used>,
    /// Heads of chains a stopping queue gives back unfilled.
    unused: Vec<u16>,
    lens: Vec<u32>,
    cqes: Vec<(u64, i32)>,
    mem: Option<GuestMemRef>,
    queue_size: u16,
    fmt: RxFormat,
    reading: usize,
    stopping: bool,
    net: Arc<NetQueueMetrics>,
    metrics: Arc<QueueMetrics>,
    log: LogLimiter,
    dirty: DirtyLogger,
}

impl RxQueue {
    /// An RX processor reading from `tap` (one tap queue).
    pub fn new(
        tap: File,
        fmt: RxFormat,
        net: Arc<NetQueueMetrics>,
        metrics: Arc<QueueMetrics>,
    ) -> std::io::Result<Self> {
        // Reads name the tap by number: no fixed files.
        let ring = Uring::new(
            READS as u32 * 2,
            Restrictions {
                ops: &[
                    opcode::Read::CODE,
                    opcode::AsyncCancel::CODE,
                    opcode::Nop::CODE,
                ],
                fixed_files: &[],
            },
        )
        .map_err(std::io::Error::other)?;
        Ok(RxQueue {
            tap,
            ring,
            bufs: (0..READS)
                .map(|_| vec![0u8; BOUNCE_LEN].into_boxed_slice())
                .collect(),
            slots: vec![Slot::Idle; READS],
            full: VecDeque::with_capacity(READS),
            chains: VecDeque::new(),
            spare: Vec::new(),
            ready: Vec::new(),
            unused: Vec::new(),
            lens: Vec::new(),
            cqes: Vec::new(),
            mem: None,
            queue_size: 0,
            fmt,
            reading: 0,
            stopping: false,
            net,
            metrics,
            log: LogLimiter::default(),
            dirty: DirtyLogger::default(),
        })
    }

    /// Marks the frames this queue copies into guest memory in `dirty`.
    pub fn with_dirty_log(mut self, dirty: DirtyLogger) -> Self {
        self.dirty = dirty;
        self
    }

    fn post_reads(&mut self) {
        if self.stopping {
            return;
        }
        for i in 0..self.slots.len() {
            if self.slots[i] != Slot::Idle {
                continue;
            }
            let buf = &mut self.bufs[i];
            let entry = opcode::Read::new(
                types::Fd(self.tap.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len() as u32,
            )
            .build()
            .user_data(i as u64);
            // SAFETY: `bufs[i]` is a heap buffer owned by self and never
            // touched while its slot is Reading; every Reading slot is
            // cancelled and reaped before the buffers are freed (Drop).
            if unsafe { self.ring.push(&entry) }.is_err() {
                return;
            }
            self.slots[i] = Slot::Reading;
            self.reading += 1;
        }
    }

    fn deliver(&mut self) {
        while let Some(&(slot, len)) = self.full.front() {
            let Some(mem) = self.mem.clone() else {
                return;
            };
            let packet = &self.bufs[slot][..len];
            let chains = self.chains.iter().map(|(_, d)| d.as_slice());
            match scatter(
                &mem,
                packet,
                self.fmt,
                chains,
                &mut self.lens,
                &mut self.dirty,
            ) {
                Ok(()) => {
                    for &len in &self.lens {
                        if let Some((head, descs)) = self.chains.pop_front() {
                            self.spare.push(descs);
                            self.ready.push(Used { head, len });
                        }
                    }
                    let frame = len - self.fmt.hdr_len;
                    self.net.frame(frame);
                    QueueMetrics::add(&self.metrics.read_bytes, frame as u64);
                }
                Err(ScatterError::NotEnough)
                    if self.chains.len() < usize::from(self.queue_size) =>
                {
                    return;
                }
                Err(ScatterError::TooBig) => self.drop_frame(Why::NoBuffers, len),
                Err(e) => {
                    let why = match e {
                        ScatterError::BadAddress => Why::BadAddress,
                        _ => Why::NoBuffers,
                    };
                    self.drop_frame(why, len);
                    if let Some((head, descs)) = self.chains.pop_front() {
                        self.spare.push(descs);
                        self.ready.push(Used { head, len: 0 });
                    }
                }
            }
            self.full.pop_front();
            self.slots[slot] = Slot::Idle;
        }
    }

    fn drop_frame(&mut self, why: Why, len: usize) {
        self.net.dropped(why);
        QueueMetrics::add(&self.metrics.errors, 1);
        if self.log.allow() {
            tracing::warn!(?why, len, "RX frame dropped");
        }
    }

    fn complete_read(&mut self, slot: usize, res: i32) {
        self.reading = self.reading.saturating_sub(1);
        let Some(state) = self.slots.get_mut(slot) else {
            return;
        };
        *state = Slot::Idle;
        if self.stopping {
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return;
        }
        if res < 0 {
            self.net.dropped(Why::TapError);
            if self.log.allow() {
                tracing::warn!(error = %std::io::Error::from_raw_os_error(-res), "tap read failed");
            }
            return;
        }
        if (res as usize) < self.fmt.hdr_len {
            self.net.dropped(Why::BadHeader);
            return;
        }
        // The tap reports a frame's whole length even when it cut the frame
        // to fit the buffer: one longer than the buffer is not all there.
        if res as usize > BOUNCE_LEN {
            self.drop_frame(Why::Oversize, res as usize);
            return;
        }
        self.slots[slot] = Slot::Full;
        self.full.push_back((slot, res as usize));
    }

    fn cancel_reads(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i] == Slot::Reading {
                let entry = opcode::AsyncCancel::new(i as u64).build().user_data(CANCEL);
                // SAFETY: a cancel request references no buffer.
                let _ = unsafe { self.ring.push(&entry) };
            }
        }
        let _ = self.ring.submit();
    }

    fn reap_ring(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(|ud, res| cqes.push((ud, res)));
        for &(ud, res) in &cqes {
            if ud != CANCEL && ud != WAKE {
                self.complete_read(ud as usize, res);
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }
}

impl QueueHandler for RxQueue {
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
        self.queue_size = queue_size;
        if !self.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem)) {
            self.mem = Some(mem.clone());
        }
        let mut descs = self.spare.pop().unwrap_or_default();
        let ok = walk_chain(mem.as_ref(), desc_table, queue_size, head, &mut descs).is_ok()
            && descs.iter().all(|d| d.writable);
        if !ok {
            self.net.dropped(Why::BadChain);
            QueueMetrics::add(&self.metrics.errors, 1);
            if self.log.allow() {
                tracing::warn!(head, "malformed RX chain dropped");
            }
            self.spare.push(descs);
            return Some(0);
        }
        self.chains.push_back((head, descs));
        None
    }

    fn submit(&mut self) {
        self.deliver();
        self.post_reads();
        if !self.ready.is_empty() {
            // Its completion wakes the worker (epoll on the ring's eventfd,
            // or asleep in the ring), which then reaps `ready`.
            let nop = opcode::Nop::new().build().user_data(WAKE);
            // SAFETY: a no-op references no memory.
            let _ = unsafe { self.ring.push(&nop) };
        }
        if let Err(e) = self.ring.submit() {
            tracing::error!(error = %e, "RX submit failed");
        }
    }

    fn reap(&mut self, done: &mut Vec<Used>) {
        self.reap_ring();
        self.deliver();
        done.append(&mut self.ready);
        self.post_reads();
        if let Err(e) = self.ring.submit() {
            tracing::error!(error = %e, "RX submit failed");
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || self.ring.has_completions()
    }

    fn uring(&mut self) -> Option<&mut Uring> {
        Some(&mut self.ring)
    }

    fn in_flight(&self) -> usize {
        self.chains.len() + self.ready.len() + self.reading
    }

    fn unused(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.unused)
    }

    fn wait(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.cancel_reads();
            // Buffers with no frame are given back to the available ring
            // (see `unused`), never completed empty: the driver would count
            // each as a receive error.
            while let Some((head, descs)) = self.chains.pop_front() {
                self.spare.push(descs);
                self.unused.push(head);
            }
        }
        if self.ready.is_empty() && self.reading > 0 {
            let _ = self.ring.wait();
        }
    }
}

impl Drop for RxQueue {
    fn drop(&mut self) {
        self.stopping = true;
        self.cancel_reads();
        while self.reading > 0 {
            if self.ring.wait().is_err() {
                break;
            }
            self.reap_ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap()
    }

    /// A dirty logger that logs nothing.
    fn quiet() -> DirtyLogger {
        DirtyLogger::default()
    }

    fn buf(addr: u64, len: u32) -> Vec<Descriptor> {
        vec![Descriptor {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }]
    }

    const MRG: RxFormat = RxFormat {
        hdr_len: HDR_LEN,
        mergeable: true,
    };

    fn packet(frame_len: usize) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN];
        p.extend((0..frame_len).map(|i| i as u8));
        p
    }

    #[test]
    fn small_frame_uses_one_buffer_with_num_buffers_one() {
        let m = mem();
        let chains = [buf(0x1000, 1526), buf(0x2000, 1526)];
        let p = packet(60);
        let mut lens = Vec::new();

        scatter(
            &m,
            &p,
            MRG,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut quiet(),
        )
        .unwrap();

        let mut out = vec![0u8; 72];
        m.read_slice(&mut out, GuestAddress(0x1000)).unwrap();
        assert_eq!(lens, vec![72]);
        assert_eq!(u16::from_le_bytes([out[10], out[11]]), 1);
        assert_eq!(&out[HDR_LEN..], &p[HDR_LEN..]);
    }

    #[test]
    fn large_frame_spans_buffers_in_order() {
        let m = mem();
        let chains: Vec<_> = (0..8).map(|i| buf(0x1000 + i * 0x1000, 1000)).collect();
        let p = packet(2988);
        let mut lens = Vec::new();

        scatter(
            &m,
            &p,
            MRG,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut quiet(),
        )
        .unwrap();

        let mut first = [0u8; HDR_LEN];
        m.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        let mut third = vec![0u8; 1000];
        m.read_slice(&mut third, GuestAddress(0x3000)).unwrap();
        assert_eq!(lens, vec![1000, 1000, 1000]);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3);
        assert_eq!(&third[..], &p[2000..3000]);
    }

    #[test]
    fn frame_larger_than_all_buffers_is_not_enough() {
        let m = mem();
        let chains = [buf(0x1000, 100)];
        let mut lens = Vec::new();

        let r = scatter(
            &m,
            &packet(200),
            MRG,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut quiet(),
        );

        assert_eq!(r, Err(ScatterError::NotEnough));
    }

    #[test]
    fn buffer_outside_guest_memory_is_bad_address() {
        let m = mem();
        let chains = [buf(0x1_0000_0000, 2000)];
        let mut lens = Vec::new();

        let r = scatter(
            &m,
            &packet(100),
            MRG,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut quiet(),
        );

        assert_eq!(r, Err(ScatterError::BadAddress));
    }

    #[test]
    fn chain_of_several_descriptors_is_filled_across_them() {
        let m = mem();
        let mut chain = buf(0x1000, HDR_LEN as u32);
        chain.extend(buf(0x5000, 4096));
        let p = packet(100);
        let mut lens = Vec::new();

        scatter(
            &m,
            &p,
            MRG,
            std::iter::once(chain.as_slice()),
            &mut lens,
            &mut quiet(),
        )
        .unwrap();

        let mut data = vec![0u8; 100];
        m.read_slice(&mut data, GuestAddress(0x5000)).unwrap();
        assert_eq!(lens, vec![112]);
        assert_eq!(&data[..], &p[HDR_LEN..]);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_must_fit_one_chain() {
        let m = mem();
        let chains = [buf(0x1000, 1000), buf(0x2000, 1000)];
        let fmt = RxFormat {
            hdr_len: HDR_LEN,
            mergeable: false,
        };
        let mut lens = Vec::new();

        let r = scatter(
            &m,
            &packet(1500),
            fmt,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut quiet(),
        );

        assert_eq!(r, Err(ScatterError::TooBig));
    }

    #[test]
    fn frame_spanning_buffers_is_logged_where_it_was_written() {
        use backends::dirty_log::DirtyLog;
        use backends::memory::memfd_create;
        use std::os::unix::fs::FileExt;
        let m = mem();
        let log_file = memfd_create("log").unwrap();
        log_file.set_len(8).unwrap();
        let log = DirtyLog::new();
        log.set_base(log_file.try_clone().unwrap(), 8, 0).unwrap();
        log.set_enabled(true);
        // Three buffers of 1000 bytes: at 0x1f00 (over a page boundary),
        // 0x5000 and 0x9000; the frame fills two and a bit of the third.
        let chains = [buf(0x1f00, 1000), buf(0x5000, 1000), buf(0x9000, 1000)];
        let mut lens = Vec::new();

        scatter(
            &m,
            &packet(2100),
            MRG,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut log.logger(),
        )
        .unwrap();

        let mut bitmap = [0u8; 2];
        log_file.read_exact_at(&mut bitmap, 0).unwrap();
        assert_eq!(lens, vec![1000, 1000, 112]);
        assert_eq!(bitmap, [0b0010_0110, 0b0000_0010]);
    }

    #[test]
    fn legacy_header_is_ten_bytes_without_num_buffers() {
        let m = mem();
        m.write_slice(&[0xaa; 16], GuestAddress(0x1000)).unwrap();
        let chains = [buf(0x1000, 2000)];
        let fmt = RxFormat {
            hdr_len: 10,
            mergeable: false,
        };
        let mut p = vec![0u8; 10];
        p.extend_from_slice(&[7u8; 60]);
        let mut lens = Vec::new();

        scatter(
            &m,
            &p,
            fmt,
            chains.iter().map(|c| c.as_slice()),
            &mut lens,
            &mut quiet(),
        )
        .unwrap();

        let mut out = [0u8; 12];
        m.read_slice(&mut out, GuestAddress(0x1000)).unwrap();
        assert_eq!(lens, vec![70]);
        assert_eq!(out[10..12], [7, 7]);
    }
}
