//! The backends' vhost-user message handler ([`backends::handler`] behind
//! the `vhost` crate's request parsing) driven by a fuzzed frontend over a
//! socketpair: message sequences with file descriptors attached (eventfds
//! and a memfd standing for guest RAM), guest RAM written and queues kicked
//! in between, as a VMM would. Serves a virtio-blk device on RAM storage.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backends::handler::Handler;
use backends::memory::memfd_create;
use backends::QueueMetrics;
use blk_backend::device::{BlkDevice, BlkOptions};
use blk_backend::storage::memory::MemoryStorage;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::input::Input;

/// Size of the memfd sent as guest RAM (and as the inflight and log fds).
pub const RAM_LEN: u64 = 0x40000;
/// Highest front-end request code (CHECK_DEVICE_STATE) plus one.
const CODES: u8 = 44;
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// Operation bytes at or above this are not messages.
const OP_KICK: u8 = 0xf0;
const OP_RAM_WRITE: u8 = 0xf1;

/// One input, one connection. Operations:
/// - a message: request code (u8 below [`OP_KICK`], modulo 44), flags
///   (u8: bit 0 NEED_REPLY; bit 1 sends the byte itself as the flags),
///   fds (u8: bits 0-1 how many, bits 2-4 each one's kind, set for the
///   memfd, clear for a new eventfd), payload length (u8), payload;
/// - [`OP_KICK`], queue (u8): the last kick eventfd sent for that queue
///   is written, as the guest's notify would;
/// - [`OP_RAM_WRITE`], offset (u16, in 4-byte units), length (u8), bytes:
///   written into guest RAM, so rings can be laid out.
///
/// A request the handler fails ends the connection, as the daemon does.
pub fn vhost_user(data: &[u8]) {
    let mut inp = Input::new(data);
    let (front, back) = UnixStream::pair().expect("socketpair");
    front.set_nonblocking(true).expect("non-blocking");
    let ram = memfd_create("fuzz-ram").expect("memfd");
    ram.set_len(RAM_LEN).expect("memfd size");
    let device = Arc::new(BlkDevice::new(
        Arc::new(MemoryStorage::new(64 * 512).unwrap()),
        BlkOptions {
            queues: 2,
            queue_size: 256,
            ..BlkOptions::default()
        },
    ));
    let metrics = Arc::new(
        (0..2)
            .map(|_| Arc::new(QueueMetrics::default()))
            .collect::<Vec<_>>(),
    );
    let handler = Arc::new(Mutex::new(Handler::new(device, metrics, Duration::ZERO)));
    let mut req = BackendReqHandler::from_stream(back, handler.clone());
    let mut kicks: Vec<Option<EventFd>> = vec![None, None];

    while !inp.is_empty() {
        let op = inp.u8();
        if op == OP_KICK {
            let q = usize::from(inp.u8() & 1);
            if let Some(k) = &kicks[q] {
                let _ = k.write(1);
            }
            continue;
        }
        if op > OP_KICK {
            let off = u64::from(inp.u16()) * 4;
            let n = usize::from(inp.u8());
            let _ = ram.write_at(inp.bytes(n), off);
            continue;
        }
        let code = u32::from(op % CODES);
        let f = inp.u8();
        let flags = if f & 2 != 0 {
            u32::from(f)
        } else {
            VERSION | if f & 1 != 0 { NEED_REPLY } else { 0 }
        };
        let fd_spec = inp.u8();
        let mut owned: Vec<Fd> = Vec::new();
        for i in 0..usize::from(fd_spec & 3) {
            owned.push(if fd_spec & (4 << i) != 0 {
                Fd::File(ram.try_clone().expect("dup memfd"))
            } else {
                Fd::Event(EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            });
        }
        let len = usize::from(inp.u8());
        let payload = inp.bytes(len);
        // The kick fd the backend now holds, for OP_KICK.
        if code == 12 {
            if let (Some(Fd::Event(e)), Some(&q)) = (owned.first(), payload.first()) {
                kicks[usize::from(q & 1)] = e.try_clone().ok();
            }
        }
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        let fds: Vec<RawFd> = owned.iter().map(Fd::raw).collect();
        if front.send_with_fds(&[&msg[..]], &fds).is_err() {
            break;
        }
        drop(owned);
        match req.handle_request() {
            Ok(()) | Err(VhostUserError::InactiveFeature(_)) => {}
            Err(_) => break,
        }
        drain(&front);
    }
    drop(req);
    handler.lock().expect("handler lock").stop_all();
}

/// Reads whatever the backend replied (attached fds are dropped by the
/// kernel with the control data we do not ask for).
fn drain(mut front: &UnixStream) {
    let mut buf = [0u8; 4096];
    while matches!(front.read(&mut buf), Ok(n) if n > 0) {}
    let _ = front.flush();
}

enum Fd {
    Event(EventFd),
    File(File),
}

impl Fd {
    fn raw(&self) -> RawFd {
        match self {
            Fd::Event(e) => e.as_raw_fd(),
            Fd::File(f) => f.as_raw_fd(),
        }
    }
}

/// Seed inputs: a VMM's start-up sequence for a two-queue disk, then
/// requests made and the queues stopped.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut s = Seq::default();
    s.msg(3, 0, &[]) // SET_OWNER
        .msg(1, 0, &[]) // GET_FEATURES
        .msg(15, 0, &[]) // GET_PROTOCOL_FEATURES
        // MQ | REPLY_ACK | CONFIG | INFLIGHT | CONFIGURE_MEM_SLOTS | STATUS
        .msg(
            16,
            0,
            &((1u64 << 0) | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 15) | (1 << 16)).to_le_bytes(),
        )
        .msg(17, 0, &[]) // GET_QUEUE_NUM
        .msg(
            2,
            0,
            &((1u64 << 32) | (1 << 30) | (1 << 29) | (1 << 28)).to_le_bytes(),
        );
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, RAM_LEN, 0x7f00_0000_0000, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    s.msg_fds(5, 0, 0b1_01, &table); // SET_MEM_TABLE, the memfd
    let mut inflight = Vec::new();
    for v in [0u64, 0] {
        inflight.extend_from_slice(&v.to_le_bytes());
    }
    inflight.extend_from_slice(&2u16.to_le_bytes());
    inflight.extend_from_slice(&256u16.to_le_bytes());
    inflight.extend_from_slice(&[0; 4]);
    s.msg(31, 0, &inflight); // GET_INFLIGHT_FD
    let mut cfg = Vec::new();
    cfg.extend_from_slice(&0u32.to_le_bytes());
    cfg.extend_from_slice(&60u32.to_le_bytes());
    cfg.extend_from_slice(&0u32.to_le_bytes());
    cfg.extend_from_slice(&[0u8; 60]);
    s.msg(24, 0, &cfg); // GET_CONFIG
    for q in 0..2u32 {
        let mut num = Vec::new();
        num.extend_from_slice(&q.to_le_bytes());
        num.extend_from_slice(&16u32.to_le_bytes());
        s.msg(8, 1, &num); // SET_VRING_NUM
        let base = 0x7f00_0000_0000u64 + u64::from(q) * 0x1000;
        let mut addr = Vec::new();
        addr.extend_from_slice(&q.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [base, base + 0x800, base + 0x100, 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        s.msg(9, 0, &addr); // SET_VRING_ADDR
        let mut base_msg = Vec::new();
        base_msg.extend_from_slice(&q.to_le_bytes());
        base_msg.extend_from_slice(&0u32.to_le_bytes());
        s.msg(10, 0, &base_msg); // SET_VRING_BASE
        let idx = u64::from(q).to_le_bytes();
        s.msg_fds(13, 0, 0b0_01, &idx); // SET_VRING_CALL
        s.msg_fds(12, 0, 0b0_01, &idx); // SET_VRING_KICK
        let mut en = Vec::new();
        en.extend_from_slice(&q.to_le_bytes());
        en.extend_from_slice(&1u32.to_le_bytes());
        s.msg(18, 0, &en); // SET_VRING_ENABLE
    }
    let started = s.0.clone();
    // A read request on queue 0: header, data, status; avail idx 1.
    let mut r = Seq(started.clone());
    let mut desc = Vec::new();
    for (addr, len, flags, next) in [
        (0x2000u64, 16u32, 1u16, 1u16),
        (0x3000, 512, 3, 2),
        (0x3400, 1, 2, 0),
    ] {
        desc.extend_from_slice(&addr.to_le_bytes());
        desc.extend_from_slice(&len.to_le_bytes());
        desc.extend_from_slice(&flags.to_le_bytes());
        desc.extend_from_slice(&next.to_le_bytes());
    }
    r.ram(0, &desc)
        .ram(0x2000, &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
        .ram(0x800, &[0, 0, 1, 0, 0, 0])
        .kick(0);
    let mut q0 = Vec::new();
    q0.extend_from_slice(&0u32.to_le_bytes());
    q0.extend_from_slice(&0u32.to_le_bytes());
    r.msg(11, 0, &q0); // GET_VRING_BASE
    let mut region = Vec::new();
    for v in [0x10_0000u64, 0x1000, 0x7f00_1000_0000, 0x1000] {
        region.extend_from_slice(&v.to_le_bytes());
    }
    let mut single = vec![0u8; 8];
    single.extend_from_slice(&region);
    r.msg(36, 0, &[]) // GET_MAX_MEM_SLOTS
        .msg_fds(37, 1, 0b1_01, &single) // ADD_MEM_REG
        .msg(38, 1, &single) // REM_MEM_REG
        .msg(34, 0, &[]); // RESET_DEVICE
    vec![("startup", started), ("request-and-stop", r.0)]
}

#[derive(Default)]
struct Seq(Vec<u8>);

impl Seq {
    fn msg(&mut self, code: u8, flags: u8, payload: &[u8]) -> &mut Self {
        self.msg_fds(code, flags, 0, payload)
    }
    fn msg_fds(&mut self, code: u8, flags: u8, fds: u8, payload: &[u8]) -> &mut Self {
        self.0
            .extend_from_slice(&[code, flags, fds, payload.len() as u8]);
        self.0.extend_from_slice(payload);
        self
    }
    fn kick(&mut self, q: u8) -> &mut Self {
        self.0.extend_from_slice(&[OP_KICK, q]);
        self
    }
    fn ram(&mut self, off: u16, bytes: &[u8]) -> &mut Self {
        self.0.push(OP_RAM_WRITE);
        self.0.extend_from_slice(&(off / 4).to_le_bytes());
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }
}
