//! seccomp filters of the backend daemons: one allow-list per kind of thread,
//! each installed by the thread itself before it reads anything a guest or a
//! frontend wrote. Compiling, installing and the SIGSYS report are
//! `thread_seccomp`'s, shared with vmm; the lists are here.
//!
//! Install order, since a thread inherits its creator's filter and a thread's
//! filters stack (a call must pass all of them):
//! 1. the daemon sets everything up unconfined (image, tap, sockets,
//!    privilege drop) and calls [`enable`]: the filters are compiled, the
//!    SIGSYS handler is installed;
//! 2. threads that the main thread spawns before confining itself (the
//!    metrics endpoint, the net metrics logger) confine themselves first thing;
//! 3. the main (vhost-user protocol) thread confines itself, then serves;
//! 4. queue workers and device state transfers, spawned by the confined
//!    main thread, confine themselves before touching the queue or the
//!    frontend's pipe. The main list therefore also holds what they need,
//!    and their own filters narrow it down.
//!
//! The lists were derived from `strace -ff` of the daemons under the whole
//! backend test suites (the QEMU interop tests included), by thread name.

pub use thread_seccomp::{
    apply, apply_or_exit, enabled_mode, thread_modes, SeccompError, SeccompMode, SIGSYS_EXIT_CODE,
};
use thread_seccomp::{BackendError, Rules};

/// The kinds of thread in a backend daemon, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The vhost-user protocol thread: accepts or reconnects, maps guest
    /// memory, creates rings and spawns the queue workers.
    Main,
    /// A queue worker: io_uring, eventfds, guest memory.
    Worker,
    /// The metrics endpoint: a tokio current-thread runtime serving HTTP.
    Metrics,
    /// A thread that only sleeps and logs (net-backend's `--metrics-interval`).
    Logger,
    /// A device state transfer (SET_DEVICE_STATE_FD): reads or writes the
    /// frontend's pipe, waiting for it with `poll`.
    Transfer,
}

/// Turns seccomp on for this process (see [`thread_seccomp::enable`]).
pub fn enable(mode: SeccompMode) -> Result<(), SeccompError> {
    thread_seccomp::enable::<ThreadKind>(mode, None)
}

/// `fcntl` commands: duplicating fds (main), flags, and the validity check
/// std makes before closing an fd in debug builds.
const FCNTLS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

/// A queue worker: sleeps in its ring or epoll, reads and signals eventfds.
const WORKER: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
];

/// A state transfer thread: the pipe (its flags through `fcntl`, writing
/// and closing through the basics) and waits on it.
const TRANSFER: &[i64] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];

/// The metrics endpoint besides [`Rules::tokio_unix_server`]: removing its
/// socket on SIGTERM/SIGINT.
const METRICS: &[i64] = &[libc::SYS_unlink];

/// The protocol thread: the vhost-user socket (messages with fds; `socket`
/// and `connect` for `--client`), guest memory, inflight regions and the
/// dirty log (each file's size checked with `fstat` first: glibc's is
/// `newfstatat(fd, "", AT_EMPTY_PATH)`, allowed with that flag only), rings
/// and eventfds for the workers, the worker threads themselves (with
/// [`Rules::spawn_threads`]; signal set-up and `getpid` by glibc); and what
/// the workers need, which they inherit.
const MAIN: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_rt_sigaction,
    libc::SYS_getpid,
    libc::SYS_unlink,
    libc::SYS_fstat,
];

/// `ioctl` requests of the protocol thread: the tap's offloads and vnet
/// header size, set when the frontend acks features; non-blocking mode.
const MAIN_IOCTLS: &[u64] = &[
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d8, // TUNSETVNETHDRSZ
    libc::FIONBIO,
];

impl thread_seccomp::ThreadKind for ThreadKind {
    const ALL: &'static [Self] = &[
        ThreadKind::Main,
        ThreadKind::Worker,
        ThreadKind::Metrics,
        ThreadKind::Logger,
        ThreadKind::Transfer,
    ];

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Worker => "worker",
            ThreadKind::Metrics => "metrics",
            ThreadKind::Logger => "logger",
            ThreadKind::Transfer => "transfer",
        }
    }

    fn rules(self) -> Result<Rules, BackendError> {
        let mut rules = Rules::thread_basics()?;
        rules.allow_args(libc::SYS_fcntl, 1, FCNTLS)?;
        // tokio's SIGTERM/SIGINT handler runs on whichever thread the signal
        // hits and wakes the metrics thread with a `sendto` on a connected
        // socket pair: every thread may `sendto` with no destination address.
        rules.sendto_connected()?;
        match self {
            ThreadKind::Main => {
                rules.allow(MAIN).allow(WORKER).allow(TRANSFER);
                rules.spawn_threads()?;
                rules.allow_args(libc::SYS_ioctl, 1, MAIN_IOCTLS)?;
                rules.allow_args(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
                rules.allow_flags_set(libc::SYS_newfstatat, 3, libc::AT_EMPTY_PATH as u64)?;
            }
            ThreadKind::Worker => {
                rules.allow(WORKER);
            }
            ThreadKind::Metrics => {
                rules.tokio_unix_server().allow(METRICS);
            }
            ThreadKind::Logger => {}
            ThreadKind::Transfer => {
                rules.allow(TRANSFER);
            }
        }
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thread_seccomp::ThreadKind as _;

    #[test]
    fn every_kind_compiles_in_both_modes_and_forbids_the_probe_call() {
        let sizes = [SeccompMode::Enforce, SeccompMode::Log]
            .map(|m| thread_seccomp::filters::<ThreadKind>(m).unwrap().len());

        assert_eq!(sizes, [ThreadKind::ALL.len(); 2]);
    }
}
