//! Starting a child role: fork + exec of our own binary, never a bare fork.
//! The parent is single-threaded, so forking it to exec at once is safe;
//! the child finds its end of the socketpair at fd 3, as in OpenBSD's proc.c.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::unistd::Pid;
use vmd_proto::{Channel, CHILD_CHANNEL_FD};

use crate::options::Options;
use crate::roles::Role;

/// A running child role and our end of its channel.
#[derive(Debug)]
pub struct ChildProc {
    pub pid: Pid,
    pub chan: Channel,
}

/// Re-executes /proc/self/exe as `role`, passing on the logging flags.
pub fn spawn_role(role: Role, opts: &Options, extra: &[String]) -> io::Result<ChildProc> {
    spawn_titled(role, role.def().title, opts, extra)
}

/// As [`spawn_role`], with `title` as the process's argv[0] (what `ps`
/// shows: `vmd: vm web blk0`).
pub fn spawn_titled(
    role: Role,
    title: &str,
    opts: &Options,
    extra: &[String],
) -> io::Result<ChildProc> {
    spawn_sending(role, title, opts, extra, |_| Ok(())).map_err(|e| match e {
        SpawnError::Spawn(e) => e,
        SpawnError::First(e) => io::Error::other(e),
    })
}

/// Why [`spawn_sending`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The first message could not be queued (no child was started).
    #[error("{0}")]
    First(String),
    #[error("{0}")]
    Spawn(#[from] io::Error),
}

/// As [`spawn_titled`], with `first` queued on the channel before the
/// fork: the child reads it as soon as it runs, instead of waiting for the
/// parent to wake once `spawn` has returned and send it (a wake-up less on
/// the start path; docs/BENCHMARKS.md, where the time goes).
pub fn spawn_sending(
    role: Role,
    title: &str,
    opts: &Options,
    extra: &[String],
    first: impl FnOnce(&Channel) -> Result<(), String>,
) -> Result<ChildProc, SpawnError> {
    let (ours, theirs) = Channel::pair()?;
    // Nobody reads yet: a frame the socket buffer cannot hold fails here
    // instead of blocking the parent (MAX_PAYLOAD fits the default one).
    ours.set_nonblocking(true)?;
    first(&ours).map_err(SpawnError::First)?;
    ours.set_nonblocking(false)?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(title)
        .args(["--role", role.name()])
        .args(opts.child_args())
        .args(extra)
        .stdin(Stdio::null());
    let child_fd = theirs.as_raw_fd();
    // SAFETY: the closure runs between fork and exec in a child of a
    // single-threaded process and calls only async-signal-safe libc
    // functions.
    unsafe {
        cmd.pre_exec(move || {
            if child_fd == CHILD_CHANNEL_FD {
                if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CHILD_CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent blocks the signals it reads from a signalfd; the
            // mask survives exec, so unblock everything for the child.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            // Die with the parent; never outlive vmd.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Own session: a ^C on vmd's terminal goes to vmd only, which
            // then stops its children in order.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    Ok(ChildProc {
        pid: Pid::from_raw(child.id() as i32),
        chan: ours,
    })
}
