//! seccomp filters of the backend daemons: one allow-list per kind of thread,
//! each installed by the thread itself ([`apply`], not TSYNC) before it reads
//! anything a guest or a frontend wrote.
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
//!
//! A call outside the list raises SIGSYS ([`SeccompMode::Enforce`]): the
//! handler writes one line, `seccomp: forbidden system call N`, to stderr and
//! exits the process with status [`SIGSYS_EXIT_CODE`]. [`SeccompMode::Log`]
//! lets the call through and has the kernel log it (SECCOMP_RET_LOG).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// Exit status after a forbidden system call: 128 + SIGSYS, as a shell
/// reports a death by that signal.
pub const SIGSYS_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// Errors building or installing filters.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// `--seccomp` is not `true`, `log` or `false`.
    #[error("Invalid seccomp mode {0:?}: expected true, log or false")]
    Mode(String),
    /// A filter could not be built or compiled.
    #[error("Cannot build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// The SIGSYS handler could not be installed.
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("Cannot install the {0:?} seccomp filter")]
    Apply(ThreadKind, #[source] seccompiler::Error),
    /// [`enable`] was called twice with different modes.
    #[error("Seccomp is already enabled in another mode")]
    AlreadyEnabled,
}

/// What happens to a system call outside a thread's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `true`: SIGSYS, one line on stderr, exit.
    Enforce,
    /// `log`: allowed, logged by the kernel (SECCOMP_RET_LOG).
    Log,
    /// `false`: no filter.
    Off,
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "false" => Ok(SeccompMode::Off),
            _ => Err(SeccompError::Mode(s.into())),
        }
    }
}

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

const KINDS: [ThreadKind; 5] = [
    ThreadKind::Main,
    ThreadKind::Worker,
    ThreadKind::Metrics,
    ThreadKind::Logger,
    ThreadKind::Transfer,
];

/// What every thread needs: memory management by the allocator (`mmap`
/// and `mprotect` without PROT_EXEC, see [`rules`]), futexes, logging to
/// stderr, signal return, and its own end (the SIGSYS handler's `write` and
/// `exit_group` among them).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

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
/// and closing through [`COMMON`]) and waits on it.
const TRANSFER: &[i64] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];

/// The metrics endpoint: tokio's epoll driver, accepted unix connections,
/// removing its socket on SIGTERM/SIGINT.
const METRICS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_unlink,
];

/// The protocol thread: the vhost-user socket (messages with fds; `socket`
/// and `connect` for `--client`), guest memory, inflight regions and the
/// dirty log (each file's size checked with `fstat` first: glibc's is
/// `newfstatat(fd, "", AT_EMPTY_PATH)`, allowed with that flag only), rings
/// and eventfds for the workers, the worker threads themselves (glibc's
/// thread start: rseq, robust list, signal set-up, name, affinity; and the
/// worker's own `seccomp`); and what the workers need, which they inherit.
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
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_seccomp,
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

/// `prctl` options of the protocol thread: naming a new thread, and
/// NO_NEW_PRIVS, which every worker sets before its own filter.
const MAIN_PRCTLS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64];

fn allow(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, calls: &[i64]) {
    for &nr in calls {
        rules.insert(nr, Vec::new());
    }
}

fn one_of(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    nr: i64,
    arg: u8,
    values: &[u64],
) -> Result<(), seccompiler::BackendError> {
    let alts = values
        .iter()
        .map(|&v| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(nr, alts);
    Ok(())
}

/// The syscall rules of `kind`.
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules = BTreeMap::new();
    allow(&mut rules, COMMON);
    let no_exec = || {
        SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
    };
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    one_of(&mut rules, libc::SYS_fcntl, 1, FCNTLS)?;
    // tokio's SIGTERM/SIGINT handler runs on whichever thread the signal
    // hits and wakes the metrics thread with a `sendto` on a connected
    // socket pair: every thread may `sendto` with no destination address.
    let connected = SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?;
    rules.insert(libc::SYS_sendto, vec![SeccompRule::new(vec![connected])?]);
    match kind {
        ThreadKind::Main => {
            allow(&mut rules, MAIN);
            allow(&mut rules, WORKER);
            allow(&mut rules, TRANSFER);
            one_of(&mut rules, libc::SYS_ioctl, 1, MAIN_IOCTLS)?;
            one_of(&mut rules, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
            one_of(&mut rules, libc::SYS_prctl, 0, MAIN_PRCTLS)?;
            let empty_path = SeccompCondition::new(
                3,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(libc::AT_EMPTY_PATH as u64),
                libc::AT_EMPTY_PATH as u64,
            )?;
            rules.insert(
                libc::SYS_newfstatat,
                vec![SeccompRule::new(vec![empty_path])?],
            );
            // clone only for threads (glibc's fallback when clone3 is not
            // there); clone3's flags are behind a pointer seccomp cannot read.
            let thread = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )?;
            rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![thread])?]);
        }
        ThreadKind::Worker => allow(&mut rules, WORKER),
        ThreadKind::Metrics => allow(&mut rules, METRICS),
        ThreadKind::Logger => {}
        ThreadKind::Transfer => allow(&mut rules, TRANSFER),
    }
    Ok(rules)
}

/// The compiled filter of `kind` in `mode` (`Off` has none: `None`).
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let build = |e| SeccompError::Build(kind, e);
    let filter = SeccompFilter::new(
        rules(kind).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map(Some).map_err(build)
}

struct Enabled {
    mode: SeccompMode,
    filters: Vec<(ThreadKind, BpfProgram)>,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();

/// Turns seccomp on for this process in `mode`: compiles every kind's
/// filter and installs the SIGSYS handler. From then on [`apply`] confines
/// the calling thread; before, it does nothing (so tests serving in-process
/// run unconfined).
pub fn enable(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let filters = KINDS
        .iter()
        .filter_map(|&k| filter(k, mode).transpose().map(|f| f.map(|f| (k, f))))
        .collect::<Result<Vec<_>, _>>()?;
    install_sigsys_handler()?;
    let enabled = ENABLED.get_or_init(|| Enabled { mode, filters });
    if enabled.mode != mode {
        return Err(SeccompError::AlreadyEnabled);
    }
    Ok(())
}

/// The mode [`enable`] turned on, if any.
pub fn enabled_mode() -> Option<SeccompMode> {
    ENABLED.get().map(|e| e.mode)
}

/// Confines the calling thread to `kind`'s list, if [`enable`] was called.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(enabled) = ENABLED.get() else {
        return Ok(());
    };
    match enabled.filters.iter().find(|(k, _)| *k == kind) {
        Some((_, prog)) => {
            seccompiler::apply_filter(prog).map_err(|e| SeccompError::Apply(kind, e))
        }
        None => Ok(()),
    }
}

/// Confines the calling thread to `kind`'s list or exits the process: a
/// thread that cannot confine itself must not go on to read guest input.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        tracing::error!("{}", crate::daemon::error_chain(&e));
        std::process::exit(1);
    }
}

/// The `Seccomp:` field of every thread of process `pid`, with the
/// thread's name (0: none, 2: filtered); for tests and diagnostics.
pub fn thread_modes(pid: u32) -> std::io::Result<Vec<(String, u32)>> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let name = std::fs::read_to_string(dir.join("comm"))?;
        let status = std::fs::read_to_string(dir.join("status"))?;
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no Seccomp line"))?;
        modes.push((name.trim_end().to_string(), mode));
    }
    modes.sort();
    Ok(modes)
}

/// `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in the union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// The SIGSYS line: "seccomp: forbidden system call N\n" into `buf`.
fn sigsys_line(nr: i32, buf: &mut [u8; 64]) -> usize {
    const HEAD: &[u8] = b"seccomp: forbidden system call ";
    buf[..HEAD.len()].copy_from_slice(HEAD);
    let mut len = HEAD.len();
    if nr < 0 {
        buf[len] = b'-';
        len += 1;
    }
    let mut digits = [0u8; 10];
    let mut n = nr.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits[..count].iter().rev() {
        buf[len] = *d;
        len += 1;
    }
    buf[len] = b'\n';
    len + 1
}

/// Async-signal-safe: formats on the stack, then write(2) and _exit(2).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // for SIGSYS from seccomp its union holds `_sigsys`, which SigsysInfo
    // mirrors (x86_64 layout).
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut buf = [0u8; 64];
    let len = sigsys_line(nr, &mut buf);
    // SAFETY: `buf[..len]` is initialised stack memory; write and _exit are
    // async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(SIGSYS_EXIT_CODE);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point (empty mask, no flags).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is fully initialised and `on_sigsys` has the SA_SIGINFO
    // signature; a null old-action pointer is allowed.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigsys_line_names_the_call_number() {
        let mut buf = [0u8; 64];

        let len = sigsys_line(321, &mut buf);

        assert_eq!(&buf[..len], b"seccomp: forbidden system call 321\n");
    }

    #[test]
    fn every_kind_compiles_in_both_modes() {
        let built = KINDS
            .iter()
            .flat_map(|&k| [SeccompMode::Enforce, SeccompMode::Log].map(|m| filter(k, m)))
            .filter(|f| matches!(f, Ok(Some(p)) if !p.is_empty()))
            .count();

        assert_eq!(built, 2 * KINDS.len());
    }

    #[test]
    fn mode_parses_the_three_words() {
        let modes: Vec<_> = ["true", "log", "false"]
            .iter()
            .map(|s| s.parse::<SeccompMode>().unwrap())
            .collect();

        assert_eq!(
            modes,
            [SeccompMode::Enforce, SeccompMode::Log, SeccompMode::Off]
        );
    }
}
