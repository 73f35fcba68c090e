//! Per-role seccomp filters: deny by default (the whole process is
//! killed), each role allowed only the syscalls its steady state makes.
//! The lists come from `strace -f` of the end-to-end suite, one role at a
//! time; docs/SECURITY.md says how to find a missing one.
//!
//! x86_64 only, like the KVM code it guards.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::SandboxError;

/// `VMD_SECCOMP=log` makes a violation a kernel audit line (`dmesg`,
/// type=1326 ... syscall=N) instead of a kill, to find a missing syscall.
/// Children inherit the parent's environment, so setting it for vmd sets
/// it for every role.
pub const SECCOMP_ENV: &str = "VMD_SECCOMP";

/// The roles with a filter. The parent has none: see docs/SECURITY.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Vmm,
    /// A vmm's vCPU threads, on top of `Vmm` (per thread).
    Vcpu,
    Control,
    Priv,
    /// Device processes: virtio-blk, virtio-scsi, virtio-net.
    Block,
    Scsi,
    Net,
}

/// A syscall allowed whatever its arguments.
fn any(list: &[i64]) -> impl Iterator<Item = (i64, Vec<SeccompRule>)> + '_ {
    list.iter().map(|&nr| (nr, Vec::new()))
}

/// Every role's steady state: memory, fds it holds, the channel, time,
/// signals' return path and leaving. The logger writes to stderr (`-d`)
/// or sends on its already-connected syslog socket.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
];

/// The VM process: KVM, the console tty, disk images, vCPU and I/O
/// threads.
const VMM: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // New threads register these with the kernel.
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    // available_parallelism's fallback once cgroup files are out of reach.
    libc::SYS_sched_getaffinity,
    // Kicking a vCPU out of KVM_RUN (pause, stop).
    libc::SYS_tgkill,
    // Thread creation: glibc tries clone3 first (its flags sit in memory
    // the filter cannot read); `clone` itself is checked for CLONE_THREAD.
    libc::SYS_clone3,
];

/// A vCPU thread, under the vmm's filter: KVM_RUN and the register and
/// device work its exits bring (port and MMIO handlers: the console
/// write, eventfds, MSI routing and ioeventfd ioctls, requests to a device
/// process over its channel, locks, allocation), nothing that makes
/// threads, eventfds or files, or reads or writes disks.
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_clock_gettime,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
];

/// virtio-blk's process: its image chain (positioned reads and writes,
/// flush, hole punching, growth). No ioctl, no socket calls, no threads.
const BLOCK: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
];

/// virtio-scsi's process: reads of its ISO image only.
const SCSI: &[i64] = &[libc::SYS_pread64, libc::SYS_preadv, libc::SYS_preadv2];

/// ioctl requests virtio-net's process makes on its TAP: offloads the
/// guest asked for, the interface's name and MAC (DHCP answers from it).
const NET_IOCTLS: &[u64] = &[
    libc::FIONBIO,
    libc::TUNSETOFFLOAD,
    libc::TUNGETIFF,
    libc::TUNGETVNETHDRSZ,
    libc::SIOCGIFHWADDR,
];

/// control: its listening socket, clients, the parent's channel.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    // SO_PEERCRED of each client.
    libc::SYS_getsockopt,
];

/// priv: opens the host files the parent asks for, checks and locks them,
/// reads image headers for backing chains.
const PRIV: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_flock,
    libc::SYS_fcntl,
    // canonicalize() of backing-file paths.
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    // TAP setup (TUNSETIFF, TUNSETVNETHDRSZ) and interface configuration
    // through a socket or netlink: the network work now landing. priv is
    // root with CAP_NET_ADMIN: its ioctls are its job, left unfiltered.
    libc::SYS_ioctl,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    // Opener children (vmd-priv's opener.rs): a socketpair to answer on,
    // fork (clone, checked below), the child taking the namer's groups,
    // gid and uid and keeping only its socket, and priv killing and
    // reaping it. No execve: the child runs priv's own code only.
    libc::SYS_socketpair,
    // glibc's fork registers the child's robust futex list.
    libc::SYS_set_robust_list,
    libc::SYS_setgroups,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_dup2,
    libc::SYS_close_range,
    libc::SYS_kill,
    libc::SYS_wait4,
];

/// clone flags priv's fork may not carry: no thread, no shared memory, no
/// new namespace (glibc's fork passes SIGCHLD and the CHILD_*TID flags).
const PRIV_CLONE_FORBIDDEN: u64 = (libc::CLONE_THREAD
    | libc::CLONE_VM
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

/// ioctl request numbers the vmm may use besides KVM's: tty and socket
/// basics, and TAP setup for virtio-net.
const VMM_IOCTLS: &[u64] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    // virtio-net on its TAP fd: offloads the guest asked for, and the
    // interface's name and MAC.
    libc::TUNSETOFFLOAD,
    libc::TUNGETIFF,
    libc::TUNGETVNETHDRSZ,
    libc::SIOCGIFHWADDR,
];

/// Opens the vmm's threads make though the vmm opens no path: glibc's
/// malloc reads /proc/sys/vm/overcommit_memory the first time it trims a
/// thread's heap (any thread that frees memory, at any moment). They are
/// answered EACCES by a second filter (`OPEN_REFUSED`) rather than killing
/// the VM; landlock refuses every path anyway.
const OPEN_REFUSED: &[i64] = &[libc::SYS_open, libc::SYS_openat];

/// fcntl commands: fd flags, cloexec dups, record locks on images.
const FCNTL_CMDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_GETLK as u64,
    libc::F_SETLK as u64,
    libc::F_OFD_GETLK as u64,
    libc::F_OFD_SETLK as u64,
];

/// ioctl type byte of every KVM ioctl (`KVMIO`).
const KVMIO: u64 = 0xAE;

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

fn fcntl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    FCNTL_CMDS
        .iter()
        .map(|&cmd| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, cmd)?]))
        .collect()
}

fn rules(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = any(BASE).collect();
    match role {
        Role::Vmm => {
            map.extend(any(VMM));
            // Guest RAM, shared with the device processes.
            map.extend(any(&[libc::SYS_memfd_create]));
            // The channel to virtio-rng's backend thread: a connected
            // pair of unix sockets, reaching nothing outside.
            map.insert(
                libc::SYS_socketpair,
                vec![SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::Eq,
                    libc::AF_UNIX as u64,
                )?])?],
            );
            // vCPU threads add their narrower filter (filters only ever
            // narrow): no_new_privs is set already; seccomp without TSYNC.
            let seccomp = vec![SeccompRule::new(vec![
                cond(
                    0,
                    SeccompCmpOp::Eq,
                    u64::from(libc::SECCOMP_SET_MODE_FILTER),
                )?,
                cond(1, SeccompCmpOp::Eq, 0)?,
            ])?];
            map.insert(libc::SYS_seccomp, seccomp);
            // Threads only, never a new process.
            let thread = libc::CLONE_THREAD as u64;
            map.insert(
                libc::SYS_clone,
                vec![SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::MaskedEq(thread),
                    thread,
                )?])?],
            );
            // Every KVM ioctl (on the fds KVM gave us) plus a short list.
            let mut ioctl = vec![SeccompRule::new(vec![cond(
                1,
                SeccompCmpOp::MaskedEq(0xff00),
                KVMIO << 8,
            )?])?];
            for &req in VMM_IOCTLS {
                ioctl.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, req)?])?);
            }
            map.insert(libc::SYS_ioctl, ioctl);
            // Naming threads, and no_new_privs (already set) on the way
            // to a vCPU's filter; nothing else prctl can do.
            map.insert(
                libc::SYS_prctl,
                vec![
                    SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
                    SeccompRule::new(vec![cond(
                        0,
                        SeccompCmpOp::Eq,
                        libc::PR_SET_NO_NEW_PRIVS as u64,
                    )?])?,
                ],
            );
            map.insert(libc::SYS_fcntl, fcntl_rules()?);
            map.extend(any(OPEN_REFUSED));
        }
        Role::Vcpu => {
            map = any(VCPU).collect();
            map.extend(any(OPEN_REFUSED));
            // Closing an fd checks it first in debug builds.
            map.insert(
                libc::SYS_fcntl,
                vec![SeccompRule::new(vec![cond(
                    1,
                    SeccompCmpOp::Eq,
                    libc::F_GETFD as u64,
                )?])?],
            );
            // KVM's ioctls only: KVM_RUN, MSI routing, ioeventfds.
            map.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![cond(
                    1,
                    SeccompCmpOp::MaskedEq(0xff00),
                    KVMIO << 8,
                )?])?],
            );
        }
        Role::Block => {
            map.extend(any(BLOCK));
            map.insert(libc::SYS_fcntl, fcntl_rules()?);
        }
        Role::Scsi => {
            map.extend(any(SCSI));
            map.insert(libc::SYS_fcntl, fcntl_rules()?);
        }
        Role::Net => {
            let ioctl = NET_IOCTLS
                .iter()
                .map(|&req| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, req)?]))
                .collect::<Result<_, _>>()?;
            map.insert(libc::SYS_ioctl, ioctl);
            map.insert(libc::SYS_fcntl, fcntl_rules()?);
        }
        Role::Control => {
            map.extend(any(CONTROL));
            map.insert(libc::SYS_fcntl, fcntl_rules()?);
        }
        Role::Priv => {
            map.extend(any(PRIV));
            map.insert(
                libc::SYS_clone,
                vec![SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::MaskedEq(PRIV_CLONE_FORBIDDEN),
                    0,
                )?])?],
            );
        }
    }
    Ok(map)
}

/// How many syscalls `role`'s filter allows (some only with checked
/// arguments).
pub fn syscall_count(role: Role) -> usize {
    rules(role).map_or(0, |m| m.len())
}

/// What a violation does: kill the process, or with `VMD_SECCOMP=log`
/// allow and log it.
pub fn seccomp_action() -> SeccompAction {
    match std::env::var(SECCOMP_ENV).as_deref() {
        Ok("log") => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    }
}

/// Compiles `role`'s filter with `on_violation` as its default action.
pub fn filter_for(role: Role, on_violation: SeccompAction) -> Result<BpfProgram, SandboxError> {
    let build = |source| SandboxError::SeccompBuild { role, source };
    let filter = SeccompFilter::new(
        rules(role).map_err(build)?,
        on_violation,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Installs `role`'s filter on every thread of this process (and so on
/// every thread it starts later). Sets no_new_privs on the way.
pub fn apply_seccomp(role: Role) -> Result<(), SandboxError> {
    let action = seccomp_action();
    if action == SeccompAction::Log {
        log::warn!("seccomp: {SECCOMP_ENV}=log: violations are logged, not killed");
    }
    let install = |prog: &BpfProgram| {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|source| SandboxError::Seccomp { role, source })
    };
    if role == Role::Vmm {
        // First, while prctl and seccomp are still allowed: clone3 fails
        // with ENOSYS, so glibc falls back to clone(2), whose flags the
        // main filter checks.
        let clone3 = SeccompFilter::new(
            any(&[libc::SYS_clone3]).collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|source| SandboxError::SeccompBuild { role, source })?;
        install(&clone3)?;
        // open/openat pass the main filter only to meet this one: EACCES
        // (a stacked filter's errno outranks the main filter's allow).
        let open = SeccompFilter::new(
            any(OPEN_REFUSED).collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            TargetArch::x86_64,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|source| SandboxError::SeccompBuild { role, source })?;
        install(&open)?;
    }
    install(&filter_for(role, action)?)
}

/// Installs `role`'s filter on the calling thread only, on top of the
/// process's (a vCPU thread narrows itself with `Role::Vcpu`).
pub fn apply_thread_seccomp(role: Role) -> Result<(), SandboxError> {
    seccompiler::apply_filter(&filter_for(role, seccomp_action())?)
        .map_err(|source| SandboxError::Seccomp { role, source })
}
