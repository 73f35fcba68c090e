//! Dropping a role's powers, one implementation for every role: user
//! switch and capability sets, rlimits, a landlock ruleset with no host
//! paths, and a per-role seccomp filter (see `docs/SECURITY.md` for which
//! role gets what). The order matters: the bounding set can only shrink
//! while we still hold CAP_SETPCAP, and the uid switch must come after the
//! gid switch.

mod policy;
mod seccomp;

pub use caps::Capability;
use caps::{CapSet, CapsHashSet};
use landlock::{Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, Scope, ABI};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

pub use policy::{Identity, Sandbox, CONTROL, DEVICE, PRIV, VMM};
pub use seccomp::{
    apply_seccomp, apply_thread_seccomp, filter_for, seccomp_action, syscall_count, Role,
    SECCOMP_ENV,
};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("setgroups: {0}")]
    Groups(nix::Error),
    #[error("setresgid({gid}): {source}")]
    Gid { gid: u32, source: nix::Error },
    #[error("setresuid({uid}): {source}")]
    Uid { uid: u32, source: nix::Error },
    #[error("refusing to run as root (uid 0) after dropping privileges")]
    StillRoot,
    #[error("no user to switch to (--user)")]
    NoUser,
    #[error("clearing capability set {set:?}: {source}")]
    Caps {
        set: CapSet,
        source: caps::errors::CapsError,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::Error),
    #[error("setrlimit({resource:?}): {source}")]
    Rlimit {
        resource: Resource,
        source: nix::Error,
    },
    #[error("landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("seccomp filter for {role:?}: {source}")]
    Seccomp {
        role: Role,
        source: seccompiler::Error,
    },
    #[error("seccomp filter for {role:?}: {source}")]
    SeccompBuild {
        role: Role,
        source: seccompiler::BackendError,
    },
}

/// Switches to `uid`/`gid` with no supplementary groups, clears every
/// capability set (bounding and ambient included) and sets no_new_privs,
/// so nothing this process execs can ever regain a power.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    if uid == 0 {
        return Err(SandboxError::StillRoot);
    }
    // Bounding set first: shrinking it needs CAP_SETPCAP, which the uid
    // switch below takes away.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        caps::clear(None, CapSet::Bounding).map_err(|source| SandboxError::Caps {
            set: CapSet::Bounding,
            source,
        })?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|source| SandboxError::Caps {
        set: CapSet::Ambient,
        source,
    })?;
    setgroups(&[]).map_err(SandboxError::Groups)?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|source| SandboxError::Gid { gid, source })?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|source| SandboxError::Uid { uid, source })?;
    // A uid change from root clears permitted/effective already; clear
    // explicitly so a process with SECBIT_KEEP_CAPS set cannot keep any.
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::set(None, set, &CapsHashSet::new())
            .map_err(|source| SandboxError::Caps { set, source })?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    Ok(())
}

/// For a role that stays root (priv): keeps exactly `keep` in the
/// bounding, permitted and effective sets, empties inheritable and
/// ambient, and sets no_new_privs, so neither this process nor anything it
/// might exec can hold any other capability, even as uid 0.
pub fn keep_only_caps(keep: &[Capability]) -> Result<(), SandboxError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let err = |set| move |source| SandboxError::Caps { set, source };
    // Bounding first, while CAP_SETPCAP is still effective.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(err(CapSet::Bounding))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err(CapSet::Ambient))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err(CapSet::Inheritable))?;
    // Effective must stay a subset of permitted at every step.
    caps::set(None, CapSet::Effective, &keep).map_err(err(CapSet::Effective))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err(CapSet::Permitted))?;
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    Ok(())
}

/// Caps what a compromised role can hoard: at most `max_files` open fds,
/// no core dumps (a vmm's core would hold guest memory), and no file it
/// writes may grow (roles write only to fds they are given, whose size the
/// guest or image format decides, so this is left unlimited: see
/// SECURITY.md).
pub fn limit_resources(max_files: u64) -> Result<(), SandboxError> {
    let set = |resource, limit| {
        setrlimit(resource, limit, limit)
            .map_err(|source| SandboxError::Rlimit { resource, source })
    };
    set(Resource::RLIMIT_NOFILE, max_files)?;
    set(Resource::RLIMIT_CORE, 0)?;
    // No role needs locked memory; KVM guest memory is ordinary mmap.
    set(Resource::RLIMIT_MEMLOCK, 0)?;
    Ok(())
}

/// What `landlock_no_fs` could enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsView {
    /// Every filesystem right, TCP bind/connect, abstract unix sockets
    /// and signals outside the domain are denied.
    NoHostPaths,
    /// The kernel's landlock is older than ABI 7: some rights stay.
    Partial,
    /// No landlock in this kernel: paths are only kept out by the uid
    /// and by seccomp (no exec, no mount).
    Unavailable,
}

/// Restricts this process (and threads it creates later) to no host
/// paths at all: a landlock ruleset that handles every filesystem right of
/// ABI 7 and allows none, plus TCP bind/connect and the signal and
/// abstract-unix-socket scopes. Fds already open keep working. Best
/// effort on kernels without (full) landlock, with a warning.
pub fn landlock_no_fs() -> Result<FsView, SandboxError> {
    let abi = ABI::V7;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => FsView::NoHostPaths,
        RulesetStatus::PartiallyEnforced => {
            log::warn!("landlock: the kernel enforces only part of the no-paths ruleset");
            FsView::Partial
        }
        RulesetStatus::NotEnforced => {
            log::warn!("landlock: unavailable in this kernel; no filesystem ruleset");
            FsView::Unavailable
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child (sandboxing is one-way) and returns its
    /// exit status: 0 means `f` returned true.
    fn in_child(f: impl FnOnce() -> bool) -> i32 {
        // SAFETY: the child only runs `f` and exits; it never returns
        // into the test harness's threads.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(false);
                // SAFETY: _exit skips the atexit work of the parent's copy.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).expect("waitpid") {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    nix::sys::wait::WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
                    other => panic!("child: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn landlock_denies_every_host_path_but_keeps_open_fds() {
        let code = in_child(|| {
            let before = std::fs::File::open("/proc/self/status").expect("open before");
            match landlock_no_fs().expect("landlock") {
                FsView::NoHostPaths => {}
                // Without landlock there is nothing to check here.
                FsView::Partial | FsView::Unavailable => return true,
            }
            let denied = |p: &str| {
                std::fs::File::open(p).err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES)
            };
            let mut s = String::new();
            use std::io::Read;
            denied("/etc/passwd")
                && denied("/proc/self/status")
                && denied("/")
                && std::fs::write("/tmp/vmd-sandbox-landlock-test", b"x").is_err()
                && (&before).read_to_string(&mut s).is_ok()
                && s.contains("NoNewPrivs:\t1")
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn limits_apply() {
        let code = in_child(|| {
            limit_resources(32).expect("limits");
            let files = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE).expect("nofile");
            let core = nix::sys::resource::getrlimit(Resource::RLIMIT_CORE).expect("core");
            files == (32, 32) && core == (0, 0)
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn every_role_filter_compiles() {
        for role in [
            Role::Vmm,
            Role::Vcpu,
            Role::Control,
            Role::Priv,
            Role::Block,
            Role::Scsi,
            Role::Net,
        ] {
            let prog = filter_for(role, seccompiler::SeccompAction::KillProcess).expect("compiles");
            assert!(!prog.is_empty());
            assert!(syscall_count(role) > 20, "{role:?}");
            eprintln!("{role:?}: {} syscalls", syscall_count(role));
        }
    }

    #[test]
    fn seccomp_kills_a_syscall_outside_the_list() {
        // The control filter has no socket(2): a killed child proves
        // deny-by-default; a child that only reads proves the allowlist.
        let killed = in_child(|| {
            apply_seccomp(Role::Control).expect("seccomp");
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
            true
        });
        assert_eq!(killed, 128 + libc::SIGSYS);
        let fine = in_child(|| {
            apply_seccomp(Role::Control).expect("seccomp");
            std::process::id() > 0 && std::fs::metadata("/").is_ok()
        });
        assert_eq!(fine, 0);
    }

    #[test]
    fn device_filters_are_narrower_than_the_vmms() {
        // blk: no socket calls at all.
        let killed = in_child(|| {
            apply_seccomp(Role::Block).expect("seccomp");
            let _ = std::os::unix::net::UnixDatagram::unbound();
            true
        });
        assert_eq!(killed, 128 + libc::SIGSYS, "blk socket()");
        // net: no file opens, even of an fd it could reach.
        let killed = in_child(|| {
            apply_seccomp(Role::Net).expect("seccomp");
            let _ = std::fs::File::open("/dev/null");
            true
        });
        assert_eq!(killed, 128 + libc::SIGSYS, "net open()");
        // net: no positioned file I/O either; scsi: no writes to files.
        let killed = in_child(|| {
            let f = std::fs::File::open("/dev/null").expect("open");
            apply_seccomp(Role::Net).expect("seccomp");
            use std::os::unix::fs::FileExt;
            let _ = f.read_at(&mut [0u8; 4], 0);
            true
        });
        assert_eq!(killed, 128 + libc::SIGSYS, "net pread()");
        let killed = in_child(|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .expect("open");
            apply_seccomp(Role::Scsi).expect("seccomp");
            use std::os::unix::fs::FileExt;
            let _ = f.write_at(b"x", 0);
            true
        });
        assert_eq!(killed, 128 + libc::SIGSYS, "scsi pwrite()");
        // No device may make a thread; blk still does its image I/O.
        let killed = in_child(|| {
            apply_seccomp(Role::Block).expect("seccomp");
            let _ = std::thread::spawn(|| ()).join();
            true
        });
        assert_eq!(killed, 128 + libc::SIGSYS, "blk clone()");
        let fine = in_child(|| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .expect("open");
            apply_seccomp(Role::Block).expect("seccomp");
            use std::os::unix::fs::FileExt;
            f.write_at(b"x", 0).is_ok() && f.read_at(&mut [0u8; 1], 0).is_ok()
        });
        assert_eq!(fine, 0, "blk image I/O");
    }

    #[test]
    fn a_vmm_thread_that_opens_a_path_gets_eacces_and_lives() {
        // glibc's malloc opens /proc/sys/vm/overcommit_memory when it
        // first trims a thread's heap: that must not kill the VM.
        let fine = in_child(|| {
            apply_seccomp(Role::Vmm).expect("vmm seccomp");
            let io = std::thread::spawn(|| {
                std::fs::File::open("/proc/sys/vm/overcommit_memory")
                    .map_err(|e| e.raw_os_error())
                    .err()
                    == Some(Some(libc::EACCES))
            });
            let vcpu = std::thread::spawn(|| {
                apply_thread_seccomp(Role::Vcpu).expect("vcpu seccomp");
                std::fs::File::open("/dev/null")
                    .map_err(|e| e.raw_os_error())
                    .err()
                    == Some(Some(libc::EACCES))
            });
            io.join().unwrap_or(false) && vcpu.join().unwrap_or(false)
        });
        assert_eq!(fine, 0);
    }

    #[test]
    fn a_vcpu_thread_cannot_do_what_the_vmm_may() {
        // Under the vmm's filter a thread may make an eventfd; a thread
        // that added the vCPU filter is killed for it.
        let fine = in_child(|| {
            apply_seccomp(Role::Vmm).expect("vmm seccomp");
            // SAFETY: eventfd takes no pointers; the fd is left to exit.
            std::thread::spawn(|| unsafe { libc::eventfd(0, 0) } >= 0)
                .join()
                .unwrap_or(false)
        });
        assert_eq!(fine, 0, "vmm thread eventfd");
        let killed = in_child(|| {
            apply_seccomp(Role::Vmm).expect("vmm seccomp");
            std::thread::spawn(|| {
                apply_thread_seccomp(Role::Vcpu).expect("vcpu seccomp");
                // SAFETY: a plain syscall; the filter kills us first.
                unsafe { libc::eventfd(0, 0) };
            })
            .join()
            .is_ok()
        });
        assert_eq!(killed, 128 + libc::SIGSYS, "vCPU thread eventfd");
    }
}
