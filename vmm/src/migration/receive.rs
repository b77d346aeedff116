//! The destination side: accept one migration, receive guest memory and
//! state, and hand them to the controller, which builds the VM from them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::stream::{self, Kind, Start};
use super::{Conn, MigrationError, Url};
use crate::config::VmConfig;
use crate::machine::Prepared;
use crate::memory::Memory;
use crate::snapshot::SnapshotState;

type Result<T> = std::result::Result<T, MigrationError>;

/// How long the destination waits for the next byte once the source has
/// connected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `PUT /vm.receive-migration`: Cloud Hypervisor's `ReceiveMigrationData`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationConfig {
    /// `unix:/path` or `tcp:host:port` to listen on.
    pub receiver_url: String,
    /// Ours: vhost-user sockets by device id for backends that listen
    /// elsewhere here than on the source.
    #[serde(default)]
    pub vhost_sockets: BTreeMap<String, PathBuf>,
}

/// Listens on `url` and takes the first connection; gives up when
/// `stop` (the VMM's signalfd) becomes readable. A unix socket path is
/// removed again once connected.
pub fn accept(url: &Url, stop: RawFd) -> Result<Conn> {
    let e = |err| MigrationError::Listen(url.to_string(), err);
    let conn = match url {
        Url::Unix(p) => {
            let l = UnixListener::bind(p).map_err(e)?;
            let r = wait_readable(l.as_raw_fd(), stop).and_then(|()| l.accept().map_err(e));
            let _ = std::fs::remove_file(p);
            let s = r?.0;
            s.set_nonblocking(false).map_err(e)?;
            Conn::Unix(s)
        }
        Url::Tcp(a) => {
            let l = std::net::TcpListener::bind(a).map_err(e)?;
            wait_readable(l.as_raw_fd(), stop)?;
            let (s, _) = l.accept().map_err(e)?;
            s.set_nonblocking(false).map_err(e)?;
            s.set_nodelay(true).map_err(e)?;
            Conn::Tcp(s)
        }
    };
    conn.set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(MigrationError::Io)?;
    Ok(conn)
}

/// Waits until `fd` is readable; an error once `stop` is.
fn wait_readable(fd: RawFd, stop: RawFd) -> Result<()> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MigrationError::Io(err));
        }
        if fds[1].revents != 0 {
            return Err(MigrationError::Interrupted);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// What the destination builds as soon as the config arrives, and
/// receives guest memory into: the KVM VM with its RAM registered
/// ([`Prepared`], so that none of it falls in the downtime), or for the
/// stream's fuzz target only the memory.
pub trait Target: Sized {
    fn prepare(cfg: &VmConfig, memory: Memory) -> Result<Self>;
    fn memory(&self) -> &Memory;
}

impl Target for Prepared {
    fn prepare(cfg: &VmConfig, memory: Memory) -> Result<Self> {
        Prepared::new(cfg, memory).map_err(|e| MigrationError::Vm(crate::error_chain(&e)))
    }

    fn memory(&self) -> &Memory {
        Prepared::memory(self)
    }
}

/// What a complete migration delivered.
pub struct Received<T = Prepared> {
    pub state: SnapshotState,
    /// What [`Target::prepare`] made when the config arrived.
    pub prepared: T,
    /// Whether the VM ran on the source (it runs here once built).
    pub resume: bool,
    pub memory_bytes: u64,
    pub local: bool,
}

/// Receives one migration up to `Complete`; the source hears about any
/// refusal before this returns it.
pub fn receive<T: Target>(
    conn: &mut Conn,
    sockets: &BTreeMap<String, PathBuf>,
) -> Result<Received<T>> {
    let r = receive_inner(conn, sockets);
    if let Err(e) = &r {
        if !matches!(e, MigrationError::Io(_) | MigrationError::Abandoned) {
            let _ = stream::write_error(conn, e);
        }
    }
    r
}

fn receive_inner<T: Target>(
    conn: &mut Conn,
    sockets: &BTreeMap<String, PathBuf>,
) -> Result<Received<T>> {
    let local = stream::read_hello(conn)?;
    let memfd = if local {
        let unix = conn.unix().ok_or(MigrationError::LocalNeedsUnix)?;
        let mut b = [0u8; 1];
        let (_, fd) = unix
            .recv_with_fd(&mut b)
            .map_err(|e| MigrationError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        Some(fd.ok_or(MigrationError::NoMemoryFd)?)
    } else {
        None
    };
    let start: Start = match stream::read_header(conn)? {
        (Kind::Start, len) => stream::read_state(conn, Kind::Start, len)?,
        (k, _) => return Err(unexpected(k, "Start")),
    };
    start
        .config
        .validate()
        .map_err(|e| MigrationError::Vm(crate::error_chain(&e)))?;
    let memory = match memfd {
        Some(f) => local_memory(f, start.config.memory)?,
        None => Memory::new(start.config.memory, start.config.hugepages)?,
    };
    let prepared = T::prepare(&start.config, memory)?;
    let memory = prepared.memory();
    tracing::info!(local, from = %start.vmm_version, memory = start.config.memory, "receiving a migration");
    stream::write_frame(conn, Kind::Ok, &[])?;
    let mut memory_bytes = 0;
    let mut state: Option<SnapshotState> = None;
    loop {
        match stream::read_header(conn)? {
            (Kind::Memory, len) if !local && state.is_none() => {
                memory_bytes += read_memory(conn, memory, len)?;
            }
            (Kind::State, len) if state.is_none() => {
                let mut s: SnapshotState = stream::read_state(conn, Kind::State, len)?;
                check_state(&s, &start)?;
                s.move_sockets(sockets)
                    .map_err(|e| MigrationError::Vm(crate::error_chain(&e)))?;
                state = Some(s);
                stream::write_frame(conn, Kind::Ok, &[])?;
            }
            (Kind::Complete, 1) => {
                let Some(state) = state else {
                    return Err(unexpected(Kind::Complete, "State"));
                };
                let mut b = [0u8; 1];
                conn.read_exact(&mut b).map_err(MigrationError::Io)?;
                return Ok(Received {
                    state,
                    prepared,
                    resume: b[0] != 0,
                    memory_bytes,
                    local,
                });
            }
            (Kind::Abandon, _) => return Err(MigrationError::Abandoned),
            (k, _) => {
                return Err(unexpected(
                    k,
                    if state.is_some() {
                        "Complete"
                    } else {
                        "Memory or State"
                    },
                ))
            }
        }
    }
}

fn unexpected(found: Kind, expected: &'static str) -> MigrationError {
    MigrationError::Unexpected {
        found: found.name(),
        expected,
    }
}

/// The source's memfd, checked to be as large as the VM's RAM.
fn local_memory(f: File, size: u64) -> Result<Memory> {
    let len = f.metadata().map_err(MigrationError::Io)?.len();
    if len != size {
        return Err(MigrationError::Vm(format!(
            "The memory file has {len} bytes; the VM has {size}"
        )));
    }
    Ok(Memory::with_file(f, size)?)
}

fn check_state(s: &SnapshotState, start: &Start) -> Result<()> {
    if s.vcpus.len() != usize::from(s.config.cpus) {
        return Err(MigrationError::Vm(format!(
            "The state has {} vCPUs for {} configured",
            s.vcpus.len(),
            s.config.cpus
        )));
    }
    if s.config != start.config {
        return Err(MigrationError::Vm(
            "The state's config differs from the one the migration started with".into(),
        ));
    }
    if s.ids.len() != s.config.devices.len() || s.backends.len() != s.config.devices.len() {
        return Err(MigrationError::Vm(
            "The state's device list does not match its config".into(),
        ));
    }
    Ok(())
}

/// Reads one memory frame (`len` bytes: the address, then the data)
/// straight into guest RAM; the range must lie inside one RAM region.
fn read_memory(conn: &mut Conn, memory: &Memory, len: u64) -> Result<u64> {
    if len < 8 || len - 8 > stream::MAX_MEMORY {
        return Err(MigrationError::TooLarge {
            what: "Memory",
            len,
        });
    }
    let mut a = [0u8; 8];
    conn.read_exact(&mut a).map_err(MigrationError::Io)?;
    let gpa = u64::from_le_bytes(a);
    let n = len - 8;
    let outside = MigrationError::OutsideRam { gpa, len: n };
    let region = memory
        .guest
        .find_region(GuestAddress(gpa))
        .ok_or(MigrationError::OutsideRam { gpa, len: n })?;
    let in_region = region.start_addr().0 + region.len() - gpa;
    if n > in_region {
        return Err(outside);
    }
    let host = memory
        .guest
        .get_host_address(GuestAddress(gpa))
        .map_err(|_| MigrationError::OutsideRam { gpa, len: n })?;
    let mut done = 0usize;
    while (done as u64) < n {
        // SAFETY: [host, host + n) lies inside one mapped RAM region (checked
        // above) that `memory` keeps mapped; nothing else uses this memory
        // yet (no vCPU, no backend: the VM is built after the stream ends),
        // so the kernel writing into it aliases nothing.
        let r = unsafe { libc::read(conn.as_raw_fd(), host.add(done).cast(), n as usize - done) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MigrationError::Io(e));
        }
        if r == 0 {
            return Err(MigrationError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        done += r as usize;
    }
    Ok(n)
}
