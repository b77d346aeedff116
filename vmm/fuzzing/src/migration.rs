//! The migration stream as a destination vmm reads it: the hello, the
//! frames, the checksummed `Start`/`State` containers and every memory
//! frame written into guest RAM, through the same
//! [`vmm::migration::receive::receive`] a `vm.receive-migration` runs, over
//! a socketpair. Only the KVM VM is left out: the target prepares guest
//! memory alone ([`MemoryOnly`]), so a run costs no KVM ioctl.
//!
//! Input: one byte of mode, then chunks. Mode bit 0: the rest is the raw
//! stream, hello included (the magic and version checks). Otherwise a
//! valid hello (bit 1: local, a memfd [`LOCAL_MEMORY`] bytes long sent
//! along) and chunks, each a tag byte and a u32 length:
//! - [`RAW`]: the bytes as they are (lying headers, truncated frames);
//! - [`START`] / [`STATE`]: a `Start` / `State` frame holding the bytes in
//!   a valid state container (so mutations reach the payload decoder, not
//!   the checksum);
//! - [`MEMORY`]: a memory frame: a u64 guest-physical address, then the
//!   bytes;
//! - [`COMPLETE`]: `Complete`, the next byte saying whether to resume.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vmm::config::VmConfig;
use vmm::memory::Memory;
use vmm::migration::receive::{self, Target};
use vmm::migration::stream::{self, Kind};
use vmm::migration::{Conn, MigrationError};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::input::Input;
use crate::state::wrap;

/// The largest guest RAM the target prepares (a stream may ask for more:
/// refused, as a host without the memory would).
const MAX_MEMORY: u64 = 256 << 20;
/// The size of the memfd a local stream hands over (the seeds' RAM).
pub const LOCAL_MEMORY: u64 = 64 << 20;

/// Tags of the chunks.
pub const RAW: u8 = 0;
pub const START: u8 = 1;
pub const STATE: u8 = 2;
pub const MEMORY: u8 = 3;
pub const COMPLETE: u8 = 4;

/// Guest memory alone, where a destination would also make its KVM VM.
pub struct MemoryOnly(Memory);

impl Target for MemoryOnly {
    fn prepare(cfg: &VmConfig, memory: Memory) -> Result<Self, MigrationError> {
        if cfg.memory > MAX_MEMORY {
            return Err(MigrationError::Vm("more RAM than the fuzz target".into()));
        }
        Ok(Self(memory))
    }

    fn memory(&self) -> &Memory {
        &self.0
    }
}

/// The stream the input describes, and whether it is local.
fn build(data: &[u8]) -> (Vec<u8>, bool) {
    let mut input = Input::new(data);
    let mode = input.u8();
    if mode & 1 != 0 {
        return (input.rest().to_vec(), false);
    }
    let local = mode & 2 != 0;
    let mut out = Vec::new();
    stream::write_hello(&mut out, local).expect("writing to a Vec");
    while !input.is_empty() {
        let tag = input.u8() % 5;
        let len = input.u32() as usize;
        let (kind, payload) = match tag {
            RAW => {
                out.extend_from_slice(input.bytes(len));
                continue;
            }
            START => (Kind::Start, wrap(input.bytes(len))),
            STATE => (Kind::State, wrap(input.bytes(len))),
            MEMORY => {
                let mut p = input.u64().to_le_bytes().to_vec();
                p.extend_from_slice(input.bytes(len));
                (Kind::Memory, p)
            }
            _ => (Kind::Complete, vec![input.u8()]),
        };
        stream::write_frame(&mut out, kind, &payload).expect("writing to a Vec");
    }
    (out, local)
}

/// Writes all of `bytes` without SIGPIPE (a fuzzer's process does not
/// ignore it); stops when the destination hangs up.
fn send_all(s: &UnixStream, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice of `bytes.len()` readable bytes
        // and `s` an open socket for the duration of the call.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

pub fn migration_stream(data: &[u8]) {
    let (got, sent, local) = run(data);
    if let Ok(r) = got {
        // What the destination would build from: consistent with itself.
        assert_eq!(r.state.vcpus.len(), usize::from(r.state.config.cpus));
        assert_eq!(r.state.ids.len(), r.state.config.devices.len());
        assert_eq!(r.prepared.0.size, r.state.config.memory);
        assert!(r.memory_bytes <= sent);
        assert_eq!(r.local, local);
    }
}

type Got = Result<receive::Received<MemoryOnly>, MigrationError>;

/// Feeds the stream the input describes to a destination: what it
/// received, the stream's length and whether it was local.
fn run(data: &[u8]) -> (Got, u64, bool) {
    let (bytes, local) = build(data);
    let sent = bytes.len() as u64;
    let (tx, rx) = UnixStream::pair().expect("socketpair");
    let writer = std::thread::spawn(move || {
        if local {
            let memfd = memfd(LOCAL_MEMORY);
            send_all(&tx, &bytes[..16]);
            if tx.send_with_fd(&[0u8][..], memfd.as_raw_fd()).is_ok() {
                send_all(&tx, &bytes[16..]);
            }
        } else {
            send_all(&tx, &bytes);
        }
        let _ = tx.shutdown(std::net::Shutdown::Write);
        // Kept open until the destination is done: its answers must not
        // meet a closed socket.
        tx
    });
    let mut conn = Conn::Unix(rx);
    let got = receive::receive::<MemoryOnly>(&mut conn, &BTreeMap::new());
    drop(conn);
    drop(writer.join().expect("the writer does not panic"));
    (got, sent, local)
}

/// A memfd of `size` bytes, as a source's guest RAM.
fn memfd(size: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: the name is a NUL-terminated C string; the call touches no
    // other memory.
    let fd = unsafe { libc::memfd_create(c"fuzz-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd size");
    f
}

fn push_chunk(out: &mut Vec<u8>, tag: u8, len: usize, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A seed: a whole migration, `Start` and `State` payloads (postcard)
/// with, unless local, a few memory frames into [`LOCAL_MEMORY`] of RAM.
pub fn seed(start_payload: &[u8], state_payload: &[u8], local: bool) -> Vec<u8> {
    let mut out = vec![if local { 2 } else { 0 }];
    push_chunk(&mut out, START, start_payload.len(), start_payload);
    if !local {
        for (gpa, fill) in [
            (0u64, 0x11u8),
            (0x10_0000, 0x22),
            (LOCAL_MEMORY - 4096, 0x33),
        ] {
            let mut b = gpa.to_le_bytes().to_vec();
            b.extend(std::iter::repeat_n(fill, 4096));
            // The chunk's length counts the bytes after the address.
            push_chunk(&mut out, MEMORY, 4096, &b);
        }
    }
    push_chunk(&mut out, STATE, state_payload.len(), state_payload);
    push_chunk(&mut out, COMPLETE, 0, &[1]);
    out
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn corpus(name: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/migration_stream/");
        std::fs::read(format!("{dir}{name}")).expect("seed")
    }

    #[test]
    fn the_seeds_are_whole_migrations_the_destination_accepts() {
        let (got, _, local) = run(&corpus("seed-tcp"));
        let r = got.expect("the tcp seed is accepted");
        assert!(!local && r.resume);
        assert_eq!(r.memory_bytes, 3 * 4096);
        let mut b = [0u8; 4096];
        r.prepared
            .0
            .guest
            .read_slice(&mut b, GuestAddress(0x10_0000))
            .unwrap();
        assert!(b.iter().all(|x| *x == 0x22));

        let (got, _, local) = run(&corpus("seed-local"));
        let r = got.expect("the local seed is accepted");
        assert!(local && r.local);
        assert_eq!(r.memory_bytes, 0);
    }

    #[test]
    fn garbage_and_frames_outside_ram_are_refused() {
        assert!(matches!(
            run(b"\x01GET / HTTP/1.1\r\n\r\n").0,
            Err(MigrationError::Magic)
        ));
        // A memory frame before any Start.
        assert!(run(&[0, MEMORY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .0
            .is_err());
        // The tcp seed with its last memory frame moved across the end of
        // RAM.
        let mut data = corpus("seed-tcp");
        let at = data
            .windows(8)
            .position(|w| w == (LOCAL_MEMORY - 4096).to_le_bytes())
            .expect("the last frame's address");
        data[at..at + 8].copy_from_slice(&(LOCAL_MEMORY - 2048).to_le_bytes());
        assert!(matches!(
            run(&data).0,
            Err(MigrationError::OutsideRam { .. })
        ));
    }
}
