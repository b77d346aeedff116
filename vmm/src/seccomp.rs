//! seccomp filters of the vmm process (`--seccomp true|log|false`): one
//! allow-list per kind of thread ([`ThreadKind`]), each installed by the
//! thread itself before it reads guest or API input. Compiling, installing
//! and the SIGSYS report (`seccomp: forbidden system call N`, exit 159) are
//! `thread_seccomp`'s, shared with the backend daemons; the lists are here.
//!
//! Install order. A thread inherits its creator's filter and filters stack,
//! so a list only has to hold what its thread does once it is installed,
//! but a thread's list must also hold everything the threads it spawns do:
//! 1. `main` parses the command line, calls [`enable`] (SIGSYS handler
//!    installed; each kind's filter is compiled by the first thread of that
//!    kind to confine itself) and, if any backend may be started (an
//!    image or a tap on the command line, or the API), the backends'
//!    launcher (`vmm-spawn`, [`ThreadKind::Spawn`]); with `--api-socket fd=` the
//!    watch on the socket's path (`vmm-api-watch`, [`ThreadKind::Watch`]);
//!    the event monitor thread (`vmm-events`, [`ThreadKind::Events`]); and
//!    binds and serves the API socket (`vmm-api`, [`ThreadKind::Api`]).
//!    Each confines itself first thing. The API thread's tokio blocking
//!    pool and the `vm.counters` fetch threads are its children and run
//!    under its list.
//! 2. Every backend vmm starts (`--disk path=`, `--net tap=`, the same
//!    from the API) is started by a supervisor thread (`vmm-blk-backend`,
//!    `vmm-net-backend`) that the launcher starts, so the supervisor and the
//!    backend process, which keeps the filters of the thread that forked it
//!    across `execve`, run under the launcher's list and their own, never
//!    under the controller's: the [`ThreadKind::Spawn`] list holds all that
//!    blk-backend and net-backend do.
//! 3. `main` confines itself ([`ThreadKind::Controller`]) before any VM is
//!    built. It runs the controller loop, which builds every VM (vm.create
//!    and vm.boot, vm.restore, vm.receive-migration, a reboot rebuild) on a
//!    new `vmm-vm` thread that inherits this list; so does the command-line
//!    VM without `--api-socket`, built on `main` itself. The controller's
//!    list is therefore the widest: building a VM, receiving a migration
//!    (listening on a unix or TCP socket), and all that its children do.
//! 4. While a VM is built, each vCPU thread (`vcpuN`, [`ThreadKind::Vcpu`])
//!    and each vhost-user reconnect monitor (`vhost-user-N`,
//!    [`ThreadKind::Reconnect`]) confines itself before its first `KVM_RUN`
//!    or its first look at the backend's socket.
//! 5. Once built, the VM's thread confines itself to the event loop's list
//!    ([`ThreadKind::Vm`]) before serving. The one thread it starts is a
//!    live migration's pre-copy (`vmm-migrate`, [`ThreadKind::Migrate`]),
//!    whose list the VM loop's holds (it also runs the migration's last
//!    step, and vm.swap-backend's connection to the new backend).
//!
//! The lists were derived from `strace -f -ff` of vmm under the vmm test
//! suites (API, life cycle, snapshot, events, migration, libvirt, virtio
//! with blk-backend, net-backend, vhost-device-rng and virtiofsd, test
//! guest), grouped by thread name and by the filters installed so far, and
//! checked with `--seccomp log` against the kernel's audit log; the
//! nested-rig tests run Linux with them enforced. `ioctl` is filtered by
//! request number everywhere, `socket` by domain, `setsockopt` by level and
//! option. A `tcp:` migration URL must name an IP address: resolving a
//! host name would need the resolver's files and sockets in the migration
//! lists.
//!
//! A new kind of thread is one [`ThreadKind`] variant, its list in
//! `ThreadKind::rules`, one `apply_or_exit` at its start, and, as its
//! creator's list must hold what it does, its list merged into its
//! creator's (with `Rules::spawn_threads` there).

use std::str::FromStr;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd,
    kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs,
    kvm_nested_state, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
pub use thread_seccomp::{
    apply_or_exit, thread_modes, SeccompError, SeccompMode, PROBE_CALL, SIGSYS_EXIT_CODE,
};
use thread_seccomp::{BackendError, Rules};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// The kinds of thread in the vmm process, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// `main`: the controller loop (with `--api-socket`), which builds
    /// every VM on a `vmm-vm` thread that inherits this list; or, without
    /// the API, the builder of the command-line VM.
    Controller,
    /// A built VM's event loop: `vmm-vm`, or `main` without the API.
    Vm,
    /// A vCPU thread: `KVM_RUN` and the device models' exits.
    Vcpu,
    /// The API server (`vmm-api`, tokio + hyper), its blocking pool and the
    /// `vm.counters` fetch threads.
    Api,
    /// The event monitor's writer (`vmm-events`).
    Events,
    /// A vhost-user reconnect monitor (`vhost-user-N`).
    Reconnect,
    /// A live migration's pre-copy (`vmm-migrate`), started by the VM loop.
    Migrate,
    /// The watch on a manager's API socket path (`vmm-api-watch`).
    Watch,
    /// The backends vmm starts: the launcher (`vmm-spawn`) and the
    /// supervisor threads it starts (`vmm-blk-backend`, `vmm-net-backend`),
    /// whose backend processes inherit this list.
    Spawn,
}

impl ThreadKind {
    /// Every kind, in the order of the module documentation.
    pub const ALL: &'static [Self] = &[
        Self::Controller,
        Self::Vm,
        Self::Vcpu,
        Self::Api,
        Self::Events,
        Self::Reconnect,
        Self::Migrate,
        Self::Watch,
        Self::Spawn,
    ];
}

impl FromStr for ThreadKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        thread_seccomp::kind_named(s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL
                .iter()
                .map(|&k| thread_seccomp::ThreadKind::name(k))
                .collect();
            format!("expected one of {}", names.join(", "))
        })
    }
}

/// The mode `--seccomp` chose, for the backends vmm starts.
static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Turns seccomp on for this process in `mode`; a thread of kind `probe`
/// makes a forbidden call once confined (tests: `--seccomp-probe`).
pub fn enable(mode: SeccompMode, probe: Option<ThreadKind>) -> Result<(), SeccompError> {
    thread_seccomp::enable(mode, probe)?;
    let _ = MODE.set(mode);
    Ok(())
}

/// The mode [`enable`] was called with (`false` included), if it was:
/// the backends vmm starts are given the same (`--seccomp`).
pub fn mode() -> Option<SeccompMode> {
    MODE.get().copied()
}

/// Confines the calling thread to `kind`'s list (when seccomp is enabled).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    thread_seccomp::apply(kind)
}

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
}

const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u64
}

const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        KVMIO,
        nr,
        std::mem::size_of::<T>() as u32,
    ) as u64
}

/// The KVM `ioctl` requests vmm makes (`linux/kvm.h`).
mod kvm {
    use super::*;

    pub const GET_API_VERSION: u64 = io(0x00);
    pub const CREATE_VM: u64 = io(0x01);
    pub const GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
    pub const CHECK_EXTENSION: u64 = io(0x03);
    pub const GET_VCPU_MMAP_SIZE: u64 = io(0x04);
    pub const GET_SUPPORTED_CPUID: u64 = iowr::<kvm_cpuid2>(0x05);
    pub const CREATE_VCPU: u64 = io(0x41);
    pub const GET_DIRTY_LOG: u64 = iow::<kvm_dirty_log>(0x42);
    pub const SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
    pub const SET_TSS_ADDR: u64 = io(0x47);
    pub const SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
    pub const CREATE_IRQCHIP: u64 = io(0x60);
    pub const GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
    pub const SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
    pub const SET_GSI_ROUTING: u64 = iow::<kvm_irq_routing>(0x6a);
    pub const IRQFD: u64 = iow::<kvm_irqfd>(0x76);
    pub const CREATE_PIT2: u64 = iow::<kvm_pit_config>(0x77);
    pub const IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);
    pub const SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
    pub const GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
    pub const RUN: u64 = io(0x80);
    pub const GET_REGS: u64 = ior::<kvm_regs>(0x81);
    pub const SET_REGS: u64 = iow::<kvm_regs>(0x82);
    pub const GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
    pub const SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
    pub const GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
    pub const SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
    pub const GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
    pub const SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
    pub const GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
    pub const SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
    pub const SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
    pub const GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
    pub const SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
    pub const GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
    pub const SET_PIT2: u64 = iow::<kvm_pit_state2>(0xa0);
    pub const GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
    pub const SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
    pub const GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
    pub const SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
    pub const SET_TSC_KHZ: u64 = io(0xa2);
    pub const GET_TSC_KHZ: u64 = io(0xa3);
    pub const GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
    pub const SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
    pub const GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
    pub const SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
    pub const KVMCLOCK_CTRL: u64 = io(0xad);
    pub const GET_NESTED_STATE: u64 = iowr::<kvm_nested_state>(0xbe);
    pub const SET_NESTED_STATE: u64 = iow::<kvm_nested_state>(0xbf);
    pub const GET_XSAVE2: u64 = ior::<kvm_xsave>(0xcf);
}

/// `ioctl`s of a vCPU thread. `KVM_RUN` first: the filter checks requests
/// in this order, and it is the one made thousands of times a second. Then
/// what a snapshot asks of a parked vCPU on its own thread (its state, and
/// from the system fd the MSR list and XSAVE size), and what the guest's
/// register writes make the device models do on the VM fd: queue kicks
/// (ioeventfd), MSI-X vectors (irqfd, GSI routes).
const VCPU_IOCTLS: &[u64] = &[
    kvm::RUN,
    kvm::GET_MP_STATE,
    kvm::GET_REGS,
    kvm::GET_SREGS,
    kvm::GET_FPU,
    kvm::GET_XSAVE2,
    kvm::GET_XSAVE,
    kvm::GET_XCRS,
    kvm::GET_DEBUGREGS,
    kvm::GET_LAPIC,
    kvm::GET_TSC_KHZ,
    kvm::GET_MSRS,
    kvm::GET_NESTED_STATE,
    kvm::GET_VCPU_EVENTS,
    kvm::CHECK_EXTENSION,
    kvm::GET_MSR_INDEX_LIST,
    kvm::IOEVENTFD,
    kvm::IRQFD,
    kvm::SET_GSI_ROUTING,
];

/// A vCPU thread besides its `ioctl`s: the vhost-user frontend, which a
/// guest's virtio status and queue writes drive (messages with fds, queue
/// eventfds duplicated, a backend's saved state loaded through a pipe when
/// a restored device is first activated), and the MSI-X pending bits
/// (a zero-timeout `poll` of a vector's eventfd). Serial and debug-port
/// output, eventfd signals and log lines are `write`s.
const VCPU: &[i64] = &[
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_pipe2,
    libc::SYS_poll,
];

/// A VM's event loop: `epoll` on its eventfds, signalfd and stdin (with
/// the terminal in raw mode); kicking vCPUs out of `KVM_RUN` (`tgkill` by
/// glibc, which asks `getpid`); vhost-user messages for pause, resume,
/// a backend's saved state (a pipe it writes, waited for with `poll`) and
/// the end of the VM; writing a snapshot (directory, state file written
/// and renamed into place, memory copied sparse with `lseek`
/// SEEK_DATA/SEEK_HOLE and `copy_file_range`, or `pread`/`pwrite` where
/// that is refused).
const VM: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_getpid,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_mkdir,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_copy_file_range,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_rename,
    libc::SYS_eventfd2,
];

/// `ioctl`s of the VM loop: the terminal (raw mode on and off, bytes
/// waiting on stdin), the VM-wide state a snapshot saves, and queue kicks
/// taken back when the devices go.
const VM_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::FIONREAD,
    kvm::GET_IRQCHIP,
    kvm::GET_PIT2,
    kvm::GET_CLOCK,
    kvm::IOEVENTFD,
    kvm::IRQFD,
];

/// A reconnect monitor: waits for the backend to hang up (`poll`) and
/// retries (`clock_nanosleep`); reconnecting is the whole vhost-user
/// set-up again on a new unix socket with a reply timeout: messages with
/// fds, queue eventfds duplicated, the inflight region mapped, a pending
/// saved state loaded through a pipe.
const RECONNECT: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_pipe2,
];

/// A migration's pre-copy (`vmm-migrate`): the connection to the
/// destination (a unix or TCP socket, reply timeouts, no Nagle), its
/// messages (`send`/`recv`) and guest pages sent straight from the memfd
/// (`sendfile`, holes skipped with `lseek` SEEK_DATA/SEEK_HOLE, the file's
/// size by `statx`); KVM's dirty log (slots re-registered with logging on
/// and off, the log read each round) and each backend's (a memfd shared
/// with it, `VHOST_USER_SET_LOG_BASE` and its reply).
const MIGRATE: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendfile,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_poll,
];

/// `ioctl`s of the pre-copy thread: the dirty log.
const MIGRATE_IOCTLS: &[u64] = &[kvm::GET_DIRTY_LOG, kvm::SET_USER_MEMORY_REGION];

/// The watch on the manager's API socket path (`vmm-api-watch`): inotify
/// events `read`, the path's identity (`statx`), and SIGTERM to this
/// process (`kill` of `getpid`) once it is gone.
const WATCH: &[i64] = &[libc::SYS_read, libc::SYS_statx, libc::SYS_getpid];

/// The backends' launcher and supervisors (`vmm-spawn`, `vmm-blk-backend`,
/// `vmm-net-backend`) and, since a process keeps the filters of the thread
/// that forked it across `execve`, everything blk-backend and net-backend
/// do under it. The supervisor: std's `Command` (`clone` of a process, a
/// socket pair for the child's exec error, stdin from /dev/null with
/// `dup2`, `execve`), `wait4`, the stale socket removed (`unlink`); in the
/// child before `execve`, `prctl(PR_SET_PDEATHSIG)` and the signal mask.
/// The backend: the dynamic loader (`access`, `openat`, `read`, `pread64`,
/// `newfstatat` of each directory of its search path, `mmap` of its
/// libraries with PROT_EXEC, `arch_prctl`,
/// `set_tid_address`, `prlimit64`), its image or tap, its listening socket
/// (`bind`, `chmod`, `listen`, `accept4`), io_uring, memfds and eventfds,
/// its own threads and filters, and its signal handlers; then what
/// [`backends`' lists](../../backends/src/seccomp.rs) allow.
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_socketpair,
    // The pipe the backend's stderr comes through.
    libc::SYS_pipe2,
    libc::SYS_dup2,
    libc::SYS_execve,
    libc::SYS_wait4,
    libc::SYS_unlink,
    libc::SYS_access,
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_arch_prctl,
    libc::SYS_set_tid_address,
    libc::SYS_prlimit64,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    // blk-backend asks whether its image is on a memory filesystem.
    libc::SYS_fstatfs,
    libc::SYS_rename,
    libc::SYS_chmod,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_getpid,
    libc::SYS_rt_sigaction,
];

/// `ioctl`s under the launcher's list: the backends' terminal check on
/// stderr, non-blocking sockets, and net-backend's tap (created or
/// attached, its name read back, offloads and vnet header size).
const SPAWN_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::FIONBIO,
    0x4004_54ca, // TUNSETIFF
    0x8004_54d2, // TUNGETIFF
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d8, // TUNSETVNETHDRSZ
];

/// `prctl` options under the launcher's list besides naming threads and
/// NO_NEW_PRIVS: the backend dies with its supervisor.
const SPAWN_PRCTLS: &[u64] = &[libc::PR_SET_PDEATHSIG as u64];

/// `fcntl` commands of the backends besides [`FCNTLS`]: status flags, and
/// the tap fds a child inherits (close-on-exec cleared).
const SPAWN_FCNTLS: &[u64] = &[
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_SETFD as u64,
];

/// Stopping the backends vmm started (on vm.delete, and at exit on the
/// thread that ran the VM): SIGTERM, then SIGKILL if one lingers, and
/// their socket directory removed (`openat` and `getdents64` on it, std's
/// check of its flags and close-on-exec with `fcntl`, `unlinkat`).
const STOP_BACKENDS: &[i64] = &[libc::SYS_getdents64, libc::SYS_unlinkat, libc::SYS_openat];

/// Signals sent to a backend vmm started.
const BACKEND_SIGNALS: &[u64] = &[libc::SIGTERM as u64, libc::SIGKILL as u64];

/// The API server besides [`Rules::tokio_unix_server`] and starting its
/// blocking pool's threads: the `vm.counters` fetch threads (started on
/// that pool) connect to each backend's metrics socket with timeouts and
/// `send`/`recv` on it.
const API: &[i64] = &[libc::SYS_connect, libc::SYS_recvmsg];

/// Building a VM, and the controller loop: `/dev/kvm`, the kernel,
/// initramfs and snapshot files (`openat`, `read`, `pread`, metadata,
/// `fstatfs` for a Map restore), guest RAM (`memfd_create`, `ftruncate`,
/// mapped shared), eventfds, signalfd and epoll instances, the vhost-user
/// sockets, the kick signal's handler (once per process), snapshot memory
/// copied in; then the loop (`epoll`, eventfd and signalfd `read`s) and,
/// at exit, removing the API socket.
const BUILD: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_eventfd2,
    libc::SYS_signalfd4,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_copy_file_range,
    libc::SYS_unlink,
    libc::SYS_readlink,
    libc::SYS_mkdir,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    // A disk image given by path is locked while its backend runs.
    libc::SYS_flock,
];

/// `ioctl`s of building a VM: the system fd (version, capabilities, CPUID,
/// VM creation), the VM fd (memory slots, TSS and identity map, irqchip,
/// PIT, GSI routes, irqfds and ioeventfds, restored VM-wide state), and
/// each vCPU's set-up or restored state, which is written from the
/// building thread before the vCPU thread starts.
const BUILD_IOCTLS: &[u64] = &[
    kvm::GET_API_VERSION,
    kvm::CHECK_EXTENSION,
    kvm::CREATE_VM,
    kvm::GET_VCPU_MMAP_SIZE,
    kvm::GET_SUPPORTED_CPUID,
    kvm::GET_MSR_INDEX_LIST,
    kvm::SET_USER_MEMORY_REGION,
    kvm::SET_TSS_ADDR,
    kvm::SET_IDENTITY_MAP_ADDR,
    kvm::CREATE_IRQCHIP,
    kvm::CREATE_PIT2,
    kvm::SET_GSI_ROUTING,
    kvm::IRQFD,
    kvm::IOEVENTFD,
    kvm::SET_PIT2,
    kvm::SET_CLOCK,
    kvm::SET_IRQCHIP,
    kvm::CREATE_VCPU,
    kvm::SET_CPUID2,
    kvm::GET_TSC_KHZ,
    kvm::SET_TSC_KHZ,
    kvm::SET_MP_STATE,
    kvm::GET_SREGS,
    kvm::SET_SREGS,
    kvm::SET_NESTED_STATE,
    kvm::SET_REGS,
    kvm::SET_FPU,
    kvm::SET_XSAVE,
    kvm::SET_XCRS,
    kvm::SET_DEBUGREGS,
    kvm::GET_LAPIC,
    kvm::SET_LAPIC,
    kvm::SET_MSRS,
    kvm::SET_VCPU_EVENTS,
    kvm::KVMCLOCK_CTRL,
    libc::TIOCGPTN,
    libc::TIOCSPTLCK,
    libc::FIONBIO,
    // A tap fd given with vm.add-net is checked to be one.
    libc::TUNGETIFF,
];

/// `fcntl` commands: std's check that an fd is still open before it
/// closes one (debug builds), and duplicating fds (`try_clone`).
const FCNTLS: &[u64] = &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64];

/// `fcntl` of building a VM besides [`FCNTLS`]: the pty's master made
/// non-blocking.
const BUILD_FCNTLS: &[u64] = &[libc::F_GETFL as u64, libc::F_SETFL as u64];

/// `fcntl` of the API thread besides [`FCNTLS`]: tokio checks that the
/// listener it is handed is non-blocking.
const API_FCNTLS: &[u64] = &[libc::F_GETFL as u64];

/// `setsockopt` options at SOL_SOCKET: reply and send timeouts on
/// vhost-user, metrics and migration connections.
const SOCKOPTS: &[u64] = &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64];

/// Unix sockets (vhost-user, the backends' metrics, migration) with
/// timeouts.
fn unix_sockets(rules: &mut Rules) -> Result<(), BackendError> {
    rules.allow_args(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
    rules.allow_arg_pairs(
        libc::SYS_setsockopt,
        (1, libc::SOL_SOCKET as u64),
        2,
        SOCKOPTS,
    )?;
    Ok(())
}

/// [`unix_sockets`] and TCP for a migration: IPv4 or IPv6, no Nagle, and
/// SO_REUSEADDR, which std sets on a listener.
fn migration_sockets(rules: &mut Rules) -> Result<(), BackendError> {
    unix_sockets(rules)?;
    let inet = [libc::AF_INET as u64, libc::AF_INET6 as u64];
    rules.allow_args(libc::SYS_socket, 0, &inet)?;
    rules.allow_arg_pairs(
        libc::SYS_setsockopt,
        (1, libc::SOL_SOCKET as u64),
        2,
        &[libc::SO_REUSEADDR as u64],
    )?;
    rules.allow_arg_pairs(
        libc::SYS_setsockopt,
        (1, libc::IPPROTO_TCP as u64),
        2,
        &[libc::TCP_NODELAY as u64],
    )?;
    rules.sendto_connected()?;
    Ok(())
}

/// What stopping the backends vmm started takes ([`STOP_BACKENDS`]).
fn stop_backends(rules: &mut Rules) -> Result<(), BackendError> {
    rules.allow(STOP_BACKENDS);
    rules.allow_args(libc::SYS_kill, 1, BACKEND_SIGNALS)?;
    rules.allow_args(
        libc::SYS_fcntl,
        1,
        &[libc::F_GETFL as u64, libc::F_SETFD as u64],
    )?;
    Ok(())
}

/// The kick signal (`vcpu::kick_signal`): the one signal a vmm thread sends
/// (`tgkill`) or sets a handler for (`rt_sigaction`).
fn kick_signal() -> u64 {
    libc::SIGRTMIN() as u64
}

impl thread_seccomp::ThreadKind for ThreadKind {
    const ALL: &'static [Self] = ThreadKind::ALL;

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Controller => "controller",
            ThreadKind::Vm => "vm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Events => "events",
            ThreadKind::Reconnect => "reconnect",
            ThreadKind::Migrate => "migrate",
            ThreadKind::Watch => "watch",
            ThreadKind::Spawn => "spawn",
        }
    }

    fn rules(self) -> Result<Rules, BackendError> {
        let mut rules = Rules::thread_basics()?;
        rules.allow_args(libc::SYS_fcntl, 1, FCNTLS)?;
        match self {
            ThreadKind::Controller => {
                // What the threads it starts do, before and after they
                // confine themselves, it must allow too; the vCPU's first,
                // so that KVM_RUN heads this filter's ioctl checks as well.
                rules.spawn_threads()?;
                for child in [ThreadKind::Vcpu, ThreadKind::Vm, ThreadKind::Reconnect] {
                    rules.merge(&child.rules()?);
                }
                rules.allow(BUILD);
                rules.allow_args(libc::SYS_ioctl, 1, BUILD_IOCTLS)?;
                rules.allow_args(libc::SYS_fcntl, 1, BUILD_FCNTLS)?;
                rules.allow_args(libc::SYS_rt_sigaction, 0, &[kick_signal()])?;
                migration_sockets(&mut rules)?;
                stop_backends(&mut rules)?;
            }
            ThreadKind::Vm => {
                rules.spawn_threads()?;
                rules.merge(&ThreadKind::Migrate.rules()?);
                rules.allow(VM);
                rules.allow_args(libc::SYS_ioctl, 1, VM_IOCTLS)?;
                stop_backends(&mut rules)?;
                rules.allow_args(libc::SYS_tgkill, 2, &[kick_signal()])?;
            }
            ThreadKind::Vcpu => {
                rules.allow(VCPU);
                rules.allow_args(libc::SYS_ioctl, 1, VCPU_IOCTLS)?;
            }
            ThreadKind::Api => {
                rules.tokio_unix_server().allow(API);
                rules.allow_args(libc::SYS_fcntl, 1, API_FCNTLS)?;
                rules.spawn_threads()?;
                rules.sendto_connected()?;
                unix_sockets(&mut rules)?;
            }
            ThreadKind::Events => {}
            ThreadKind::Reconnect => {
                rules.allow(RECONNECT);
                unix_sockets(&mut rules)?;
            }
            ThreadKind::Migrate => {
                rules.allow(MIGRATE);
                rules.allow_args(libc::SYS_ioctl, 1, MIGRATE_IOCTLS)?;
                migration_sockets(&mut rules)?;
            }
            ThreadKind::Watch => {
                rules.allow(WATCH);
                rules.allow_args(libc::SYS_kill, 1, &[libc::SIGTERM as u64])?;
            }
            ThreadKind::Spawn => {
                rules.spawn_threads()?;
                rules.allow(SPAWN);
                rules.allow_args(libc::SYS_ioctl, 1, SPAWN_IOCTLS)?;
                rules.allow_args(libc::SYS_prctl, 0, SPAWN_PRCTLS)?;
                rules.allow_args(libc::SYS_fcntl, 1, SPAWN_FCNTLS)?;
                rules.sendto_connected()?;
                // The dynamic loader maps the backends' libraries.
                rules.allow(&[libc::SYS_mmap]);
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
    fn every_list_compiles_in_both_modes_without_the_probe_call() {
        let compiled = [SeccompMode::Enforce, SeccompMode::Log]
            .map(|m| thread_seccomp::filters::<ThreadKind>(m).is_ok());

        assert_eq!(compiled, [true, true]);
    }

    #[test]
    fn the_controller_allows_every_call_of_the_threads_it_starts() {
        let controller = ThreadKind::Controller.rules().unwrap();
        let children =
            [ThreadKind::Vm, ThreadKind::Vcpu, ThreadKind::Reconnect].map(|k| k.rules().unwrap());

        let missing: Vec<i64> = children
            .iter()
            .flat_map(Rules::calls)
            .filter(|&nr| !controller.allows(nr))
            .collect();

        assert_eq!(missing, Vec::<i64>::new());
    }

    #[test]
    fn kinds_parse_by_name() {
        let parsed: Vec<ThreadKind> = [
            "controller",
            "vm",
            "vcpu",
            "api",
            "events",
            "reconnect",
            "migrate",
            "watch",
            "spawn",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();

        assert_eq!(parsed, ThreadKind::ALL);
    }

    #[test]
    fn kvm_requests_match_the_kernel_header() {
        // A few values from linux/kvm.h, to catch a wrong direction or size.
        assert_eq!(
            [
                kvm::RUN,
                kvm::GET_REGS,
                kvm::SET_GSI_ROUTING,
                kvm::IOEVENTFD,
                kvm::GET_DIRTY_LOG
            ],
            [0xae80, 0x8090_ae81, 0x4008_ae6a, 0x4040_ae79, 0x4010_ae42]
        );
    }
}
