//! seccomp allow-lists per kind of thread, each installed by the thread
//! itself ([`apply`], not TSYNC) before it reads anything a guest, a
//! frontend or an API client wrote. Shared by `vmm` and the backend
//! daemons: each names its kinds of thread and their lists (a
//! [`ThreadKind`] enum whose [`ThreadKind::rules`] builds [`Rules`]); this
//! crate compiles them, installs them and reports a violation.
//!
//! A thread inherits its creator's filter and filters stack (a call must
//! pass every one), so a thread that spawns threads after confining itself
//! needs in its own list what they do before they confine themselves
//! ([`Rules::spawn_threads`]) and whatever they do at all: their own
//! filters only narrow that down.
//!
//! A call outside the list raises SIGSYS ([`SeccompMode::Enforce`]): the
//! handler writes one line, `seccomp: forbidden system call N`, to stderr
//! and exits the process with status [`SIGSYS_EXIT_CODE`]. A thread must
//! not block SIGSYS, or the kernel kills the process without the line.
//! [`SeccompMode::Log`] lets the call through and has the kernel log it
//! (SECCOMP_RET_LOG).
//!
//! For tests, [`enable`] can name a kind to probe: a thread of that kind
//! makes [`PROBE_CALL`], which no list allows, right after confining
//! itself, so that the report can be seen from the outside.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::str::FromStr;
use std::sync::OnceLock;

pub use seccompiler::BackendError;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// Exit status after a forbidden system call: 128 + SIGSYS, as a shell
/// reports a death by that signal.
pub const SIGSYS_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// The call a probed thread makes ([`enable`]): harmless, and needed by no
/// thread of ours, so no list may allow it.
pub const PROBE_CALL: i64 = libc::SYS_getppid;

/// glibc's signal for set*id across threads (`__SIGRTMIN + 1`), whose
/// handler its first `pthread_create` installs.
const GLIBC_SIGSETXID: u64 = 33;

/// Errors building or installing filters.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// `--seccomp` is not `true`, `log` or `false`.
    #[error("Invalid seccomp mode {0:?}: expected true, log or false")]
    Mode(String),
    /// A filter could not be built or compiled.
    #[error("Cannot build the {0} seccomp filter")]
    Build(&'static str, #[source] BackendError),
    /// The SIGSYS handler could not be installed.
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("Cannot install the {0} seccomp filter")]
    Apply(&'static str, #[source] seccompiler::Error),
    /// [`enable`] was called twice with different modes or kinds.
    #[error("Seccomp is already enabled in another mode")]
    AlreadyEnabled,
    /// [`apply`] was given a kind of another set than [`enable`]'s.
    #[error("Seccomp is enabled for other kinds of thread than {0}")]
    OtherKinds(&'static str),
    /// A list allows [`PROBE_CALL`], which must stay forbidden everywhere.
    #[error("The {0} seccomp filter allows the probe call")]
    ProbeAllowed(&'static str),
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

impl SeccompMode {
    /// The command-line word for the mode, as [`FromStr`] reads it.
    pub fn as_arg(self) -> &'static str {
        match self {
            SeccompMode::Enforce => "true",
            SeccompMode::Log => "log",
            SeccompMode::Off => "false",
        }
    }
}

/// A program's kinds of thread, each with its own list.
pub trait ThreadKind: Copy + Eq + Debug + Send + Sync + 'static {
    /// Every kind, each compiled when a thread of it first confines
    /// itself ([`apply`]).
    const ALL: &'static [Self];

    /// The kind's name, in errors and for a probe.
    fn name(self) -> &'static str;

    /// The calls a thread of this kind may make once confined.
    fn rules(self) -> Result<Rules, BackendError>;
}

/// The kind called `name`, if any.
pub fn kind_named<K: ThreadKind>(name: &str) -> Option<K> {
    K::ALL.iter().copied().find(|k| k.name() == name)
}

/// An allow-list: system calls by number, each allowed with any arguments
/// or only with the arguments one of its rules matches.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    calls: BTreeMap<i64, Vec<SeccompRule>>,
}

/// The first argument ... sixth argument, for [`Rules::allow_args`].
pub type ArgIndex = u8;

impl Rules {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// What every thread needs: memory management by the allocator and
    /// thread stacks (`mmap` and `mprotect` never with PROT_EXEC; `mremap`,
    /// glibc's `realloc` of a large block), futexes,
    /// logging to stderr, signal return, sleeping, and its own end (the
    /// SIGSYS handler's `write` and `exit_group` among them).
    pub fn thread_basics() -> Result<Self, BackendError> {
        let mut rules = Self::new();
        rules.allow(&[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
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
        ]);
        let no_exec = SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?;
        rules.allow_when(libc::SYS_mmap, no_exec.clone());
        rules.allow_when(libc::SYS_mprotect, no_exec);
        Ok(rules)
    }

    /// What a thread needs to start threads that name and confine
    /// themselves: `clone3`, or `clone` for threads only (glibc's fallback;
    /// clone3's flags are behind a pointer seccomp cannot read), glibc's
    /// thread start (robust list, rseq, affinity; at the process's first
    /// thread, the handler of its internal SIGSETXID), `prctl` to name the
    /// thread and set NO_NEW_PRIVS, and `seccomp`.
    pub fn spawn_threads(&mut self) -> Result<&mut Self, BackendError> {
        self.allow(&[
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
            libc::SYS_seccomp,
        ]);
        self.allow_flags_set(libc::SYS_clone, 0, libc::CLONE_THREAD as u64)?;
        self.allow_args(libc::SYS_rt_sigaction, 0, &[GLIBC_SIGSETXID])?;
        self.allow_args(
            libc::SYS_prctl,
            0,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        )
    }

    /// A tokio runtime serving a unix listener (hyper): the epoll driver,
    /// accepted connections read and written, `shutdown` when done.
    pub fn tokio_unix_server(&mut self) -> &mut Self {
        self.allow(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
        ])
    }

    /// `sendto` on a connected socket only (no destination address): what
    /// `send` on a stream is.
    pub fn sendto_connected(&mut self) -> Result<&mut Self, BackendError> {
        let connected = SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?;
        Ok(self.allow_when(libc::SYS_sendto, SeccompRule::new(vec![connected])?))
    }

    /// Allows `calls` with any arguments.
    pub fn allow(&mut self, calls: &[i64]) -> &mut Self {
        for &nr in calls {
            self.calls.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `nr` when argument `arg` (as a 32-bit value) is one of
    /// `values`, in that order of checking; a call already allowed with any
    /// arguments stays so.
    pub fn allow_args(
        &mut self,
        nr: i64,
        arg: ArgIndex,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for &v in values {
            let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
            self.allow_when(nr, SeccompRule::new(vec![c])?);
        }
        Ok(self)
    }

    /// Allows `nr` when argument `first.0` is `first.1` and argument `arg`
    /// one of `values` (each as a 32-bit value): a `setsockopt` level with
    /// its option names, say.
    pub fn allow_arg_pairs(
        &mut self,
        nr: i64,
        first: (ArgIndex, u64),
        arg: ArgIndex,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for &v in values {
            let a =
                SeccompCondition::new(first.0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, first.1)?;
            let b = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
            self.allow_when(nr, SeccompRule::new(vec![a, b])?);
        }
        Ok(self)
    }

    /// Allows `nr` when every bit of `flags` is set in argument `arg` (as
    /// a 64-bit value), whatever its other bits.
    pub fn allow_flags_set(
        &mut self,
        nr: i64,
        arg: ArgIndex,
        flags: u64,
    ) -> Result<&mut Self, BackendError> {
        let set = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flags),
            flags,
        )?;
        Ok(self.allow_when(nr, SeccompRule::new(vec![set])?))
    }

    /// Allows `nr` when `rule` matches (besides its other rules); a call
    /// already allowed with any arguments stays so.
    pub fn allow_when(&mut self, nr: i64, rule: SeccompRule) -> &mut Self {
        match self.calls.get_mut(&nr) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => {
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
            None => {
                self.calls.insert(nr, vec![rule]);
            }
        }
        self
    }

    /// Adds everything `other` allows.
    pub fn merge(&mut self, other: &Rules) -> &mut Self {
        for (&nr, rules) in &other.calls {
            if rules.is_empty() {
                self.allow(&[nr]);
            }
            for r in rules {
                self.allow_when(nr, r.clone());
            }
        }
        self
    }

    /// The system calls allowed (with some arguments), by number.
    pub fn calls(&self) -> impl Iterator<Item = i64> + '_ {
        self.calls.keys().copied()
    }

    /// Whether `nr` is allowed with some arguments.
    pub fn allows(&self, nr: i64) -> bool {
        self.calls.contains_key(&nr)
    }

    /// The number of system calls allowed (with some arguments).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// The compiled filter of `kind` in `mode` (`Off` has none: `None`).
pub fn filter<K: ThreadKind>(
    kind: K,
    mode: SeccompMode,
) -> Result<Option<BpfProgram>, SeccompError> {
    let rules = kind
        .rules()
        .map_err(|e| SeccompError::Build(kind.name(), e))?;
    compile(kind.name(), rules, mode)
}

fn compile(
    name: &'static str,
    rules: Rules,
    mode: SeccompMode,
) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let build = |e| SeccompError::Build(name, e);
    let filter = SeccompFilter::new(
        rules.calls,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map(Some).map_err(build)
}

/// Every kind's compiled filter in `mode`, in the order of
/// [`ThreadKind::ALL`] (empty with `Off`); a list that allows
/// [`PROBE_CALL`] is an error.
pub fn filters<K: ThreadKind>(mode: SeccompMode) -> Result<Vec<BpfProgram>, SeccompError> {
    K::ALL
        .iter()
        .map(|&k| checked_filter(k, mode).map(Option::unwrap_or_default))
        .collect()
}

/// `kind`'s compiled filter in `mode`, refused if its list allows
/// [`PROBE_CALL`].
fn checked_filter<K: ThreadKind>(
    kind: K,
    mode: SeccompMode,
) -> Result<Option<BpfProgram>, SeccompError> {
    let rules = kind
        .rules()
        .map_err(|e| SeccompError::Build(kind.name(), e))?;
    if rules.allows(PROBE_CALL) {
        return Err(SeccompError::ProbeAllowed(kind.name()));
    }
    compile(kind.name(), rules, mode)
}

struct Enabled {
    mode: SeccompMode,
    kinds: TypeId,
    /// Each kind's compiled filter, in the order of [`ThreadKind::ALL`],
    /// compiled by the first thread of that kind that confines itself:
    /// a process starts only some kinds of thread, and each compiles its
    /// own list off the others' way.
    filters: Vec<OnceLock<BpfProgram>>,
    probe: Option<&'static str>,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();

/// Turns seccomp on for this process in `mode`: settles what glibc would
/// otherwise read from files later ([`settle_malloc`]) and installs the
/// SIGSYS handler. Call it before any thread is confined. From then on
/// [`apply`] confines the calling thread (compiling its kind's filter the
/// first time); before, it does nothing (so tests serving in-process run
/// unconfined). A thread of kind `probe`, if given, makes [`PROBE_CALL`]
/// once confined.
pub fn enable<K: ThreadKind>(mode: SeccompMode, probe: Option<K>) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    settle_malloc();
    install_sigsys_handler()?;
    let kinds = TypeId::of::<K>();
    let enabled = ENABLED.get_or_init(|| Enabled {
        mode,
        kinds,
        filters: K::ALL.iter().map(|_| OnceLock::new()).collect(),
        probe: probe.map(K::name),
    });
    if enabled.mode != mode || enabled.kinds != kinds {
        return Err(SeccompError::AlreadyEnabled);
    }
    Ok(())
}

/// The mode [`enable`] turned on, if any.
pub fn enabled_mode() -> Option<SeccompMode> {
    ENABLED.get().map(|e| e.mode)
}

/// Confines the calling thread to `kind`'s list, if [`enable`] was called.
pub fn apply<K: ThreadKind>(kind: K) -> Result<(), SeccompError> {
    let Some(enabled) = ENABLED.get() else {
        return Ok(());
    };
    if enabled.kinds != TypeId::of::<K>() {
        return Err(SeccompError::OtherKinds(kind.name()));
    }
    let Some(slot) = K::ALL
        .iter()
        .position(|&k| k == kind)
        .and_then(|i| enabled.filters.get(i))
    else {
        return Ok(());
    };
    let prog = match slot.get() {
        Some(prog) => prog,
        None => {
            let Some(compiled) = checked_filter(kind, enabled.mode)? else {
                return Ok(());
            };
            // Two threads of a kind may both compile it: the same program.
            slot.get_or_init(|| compiled)
        }
    };
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Apply(kind.name(), e))?;
    if enabled.probe == Some(kind.name()) {
        // SAFETY: getppid takes no arguments and touches no memory.
        unsafe { libc::syscall(PROBE_CALL) };
    }
    Ok(())
}

/// Confines the calling thread to `kind`'s list or exits the process: a
/// thread that cannot confine itself must not go on to read its input.
pub fn apply_or_exit<K: ThreadKind>(kind: K) {
    if let Err(e) = apply(kind) {
        let chain: Vec<String> =
            std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .map(ToString::to_string)
                .collect();
        tracing::error!("{}", chain.join(": "));
        std::process::exit(1);
    }
}

/// The `Seccomp:` field of every thread of process `pid`, with the
/// thread's name (0: none, 2: filtered), sorted by name; for tests and
/// diagnostics.
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

/// glibc's malloc gives each thread an arena, up to 8 per online CPU, and
/// works that limit out (reading `/sys/devices/system/cpu/online`) when a
/// thread needs a 9th arena: whichever thread that is, confined or not, so
/// a process with many threads would die on an `openat` in, say, an API
/// worker. Setting the same limit now leaves malloc nothing to read.
#[cfg(target_env = "gnu")]
fn settle_malloc() {
    // SAFETY: sysconf only reads system state.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: M_ARENA_MAX only sets a malloc parameter; any positive
    // value is valid.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

#[cfg(not(target_env = "gnu"))]
fn settle_malloc() {}

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

    #[test]
    fn a_mode_written_as_an_argument_parses_back_to_itself() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log, SeccompMode::Off] {
            assert_eq!(mode.as_arg().parse::<SeccompMode>().unwrap(), mode);
        }
    }

    #[test]
    fn allowing_with_any_arguments_wins_over_argument_rules() {
        let mut rules = Rules::new();
        rules.allow_args(libc::SYS_ioctl, 1, &[1, 2]).unwrap();
        let mut other = Rules::new();
        other.allow(&[libc::SYS_ioctl]);

        rules
            .merge(&other)
            .allow_args(libc::SYS_ioctl, 1, &[3])
            .unwrap();

        assert_eq!(rules.calls[&libc::SYS_ioctl], Vec::new());
    }

    #[test]
    fn merged_argument_rules_are_kept_once_in_order() {
        let mut rules = Rules::new();
        rules.allow_args(libc::SYS_ioctl, 1, &[1, 2]).unwrap();
        let mut other = Rules::new();
        other.allow_args(libc::SYS_ioctl, 1, &[2, 3]).unwrap();
        let mut want = Rules::new();
        want.allow_args(libc::SYS_ioctl, 1, &[1, 2, 3]).unwrap();

        rules.merge(&other);

        assert_eq!(rules.calls, want.calls);
    }
}
