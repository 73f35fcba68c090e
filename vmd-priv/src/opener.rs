//! Opening a path with the rights of whoever named it.
//!
//! priv is root, but a path a vmctl user names must open only if that user
//! could open it, a backing file only if the owner of the image naming it
//! could. Checking first and opening after would race (a symlink swapped
//! in between), so the open itself runs with those rights: priv forks a
//! short-lived child (priv is single-threaded, so fork is safe) that takes
//! the user's groups, gid and uid, opens, checks the file type on the fd,
//! locks, reads a qcow2 header for its backing file, sends the fd back with
//! SCM_RIGHTS and is killed. Once its uid changed the kernel clears its
//! capabilities and makes it non-dumpable, so the user can neither borrow
//! root's rights through it nor ptrace it. A child that does not answer
//! within [`OPEN_TIMEOUT`] (a FUSE file system that never replies) is
//! killed; priv itself never opens, reads or locks a path a user named.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use vmd_disk::{self as image, Format, Lock};
use vmd_proto::msg::{OpenedFile, Opener};
use vmd_proto::vm::OpenKind;
use vmd_proto::{Channel, Msg};

use crate::OpenError;

/// How long an opener child may take; a path on a file system that never
/// answers fails the start instead of hanging priv.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the child opens a path as.
#[derive(Debug, Clone, Copy)]
pub enum Want {
    /// A kernel, initrd, BIOS, option ROM or CD-ROM image: a regular
    /// file, read-only.
    ReadOnly,
    /// A disk image (a VM's top image or a backing file): a regular file,
    /// or a block device when root named it; opened writable or not,
    /// locked, and a qcow2 header read for its backing file.
    Image {
        write: bool,
        lock: Lock,
        format: Format,
    },
}

/// Opens `path` with `opener`'s rights in a child; the fd and what the
/// child found about it.
pub fn open_as(
    opener: &Opener,
    kind: OpenKind,
    path: &str,
    want: Want,
) -> Result<(File, OpenedFile), OpenError> {
    let err = |reason: String| OpenError::Opener {
        path: path.to_string(),
        reason,
    };
    log::debug!(
        "opening {path} as uid {} gid {} groups {:?}",
        opener.uid,
        opener.gid,
        opener.groups
    );
    let (ours, theirs) = Channel::pair().map_err(|e| err(format!("socketpair: {e}")))?;
    // SAFETY: priv is single-threaded (no thread is ever started in it),
    // so the child may run ordinary code, allocation included.
    let pid = match unsafe { libc::fork() } {
        -1 => return Err(err(format!("fork: {}", std::io::Error::last_os_error()))),
        0 => child(theirs, opener, kind, path, want),
        pid => Pid::from_raw(pid),
    };
    drop(theirs);
    let answer = receive(&ours, path);
    // Its work is done (or it is late): it never outlives the answer, even
    // if the user stopped it (same uid) before it could exit. Killing a
    // process of another uid takes CAP_KILL.
    if let Err(e) = kill(pid, Signal::SIGKILL) {
        log::warn!("killing opener child {pid}: {e}");
    }
    reap(pid);
    answer
}

/// Children that did not die at once (an uninterruptible wait in a file
/// system), reaped later so priv never waits for one.
static STRAGGLERS: std::sync::Mutex<Vec<Pid>> = std::sync::Mutex::new(Vec::new());

/// Reaps `pid` if it is gone within a second, else remembers it; reaps
/// earlier stragglers that have gone since.
fn reap(pid: Pid) {
    let gone = |p: Pid| {
        !matches!(
            waitpid(p, Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        )
    };
    let mut stragglers = STRAGGLERS.lock().unwrap_or_else(|e| e.into_inner());
    stragglers.retain(|p| !gone(*p));
    for _ in 0..100 {
        if gone(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::warn!("opener child {pid} does not die yet; reaping it later");
    stragglers.push(pid);
}

fn receive(chan: &Channel, path: &str) -> Result<(File, OpenedFile), OpenError> {
    let err = |reason: String| OpenError::Opener {
        path: path.to_string(),
        reason,
    };
    let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
    let ms = OPEN_TIMEOUT.as_millis() as u16;
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => {
            return Err(err(format!(
                "no answer within {} s (a file system that does not respond?)",
                OPEN_TIMEOUT.as_secs()
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(err(format!("poll: {e}"))),
    }
    let frame = chan.recv().map_err(|e| err(format!("opener child: {e}")))?;
    match frame.msg {
        Msg::PrivChildOpened { file } => {
            let fd = frame
                .fds
                .into_iter()
                .next()
                .ok_or_else(|| err("opener child sent no fd".into()))?;
            Ok((File::from(fd), file))
        }
        Msg::PrivFailed { reason, .. } => Err(OpenError::Refused { reason }),
        other => Err(err(format!(
            "opener child sent message type {}",
            other.type_code()
        ))),
    }
}

/// The child: become `opener`, open, answer, exit. Never returns.
fn child(chan: Channel, opener: &Opener, kind: OpenKind, path: &str, want: Want) -> ! {
    // Keep nothing of priv's but stdio and our socket: the parent's
    // channel, netlink sockets and TAPs stay out of the user's process.
    let sock = chan.into_fd();
    // SAFETY: plain fd syscalls in our own, single-threaded process.
    let chan = unsafe {
        if libc::dup2(sock.as_raw_fd(), 3) < 0 {
            libc::_exit(2);
        }
        if libc::close_range(4, u32::MAX, 0) < 0 {
            // A kernel without close_range (before 5.9): every fd priv may
            // hold lies below its RLIMIT_NOFILE.
            for fd in 4..vmd_sandbox::PRIV.max_files as libc::c_int {
                libc::close(fd);
            }
        }
        std::mem::forget(sock);
        Channel::from_fd(OwnedFd::from_raw_fd(3))
    };
    let msg = match become_opener(opener).and_then(|()| open_checked(opener, path, want)) {
        Ok((file, found)) => {
            let sent = chan.send(&Msg::PrivChildOpened { file: found }, 0, &[file.as_fd()]);
            // SAFETY: exiting without running priv's destructors.
            unsafe { libc::_exit(i32::from(sent.is_err())) }
        }
        Err(reason) => Msg::PrivFailed {
            kind,
            path: path.to_string(),
            reason,
        },
    };
    let sent = chan.send(&msg, 0, &[]);
    // SAFETY: as above.
    unsafe { libc::_exit(i32::from(sent.is_err())) }
}

/// Takes `opener`'s groups, gid and uid (root keeps priv's own rights).
fn become_opener(opener: &Opener) -> Result<(), String> {
    if opener.is_root() {
        return Ok(());
    }
    let check = |r: libc::c_int, what: &str| match r {
        0 => Ok(()),
        _ => Err(format!("{what}: {}", std::io::Error::last_os_error())),
    };
    let (uid, gid) = (opener.uid, opener.gid);
    // SAFETY: the credential syscalls take plain values and a buffer we own.
    unsafe {
        check(
            libc::setgroups(opener.groups.len(), opener.groups.as_ptr()),
            "setgroups",
        )?;
        check(libc::setresgid(gid, gid, gid), "setresgid")?;
        check(libc::setresuid(uid, uid, uid), "setresuid")?;
    }
    Ok(())
}

/// Opens without blocking (a FIFO, socket or device cannot hang us), then
/// checks on the fd what it is: no check-then-open race.
fn open_checked(opener: &Opener, path: &str, want: Want) -> Result<(File, OpenedFile), String> {
    let io = |e: std::io::Error| format!("{path}: {e}");
    let write = matches!(want, Want::Image { write: true, .. });
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let block = meta.file_type().is_block_device();
    match want {
        _ if meta.is_file() => {}
        Want::Image { .. } if block && opener.is_root() => {}
        Want::Image { .. } if block => {
            return Err(format!(
                "{path}: a block device; only root (vm.conf, or vmctl as root) may name one"
            ))
        }
        _ => return Err(format!("{path}: not a regular file")),
    }
    // Reads and writes of the image block as usual from here on.
    // SAFETY: fcntl on our own fd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let mut found = OpenedFile {
        uid: meta.uid(),
        gid: meta.gid(),
        dev: meta.dev(),
        ino: meta.ino(),
        backing: None,
    };
    if let Want::Image { lock, format, .. } = want {
        image::lock(&file, Path::new(path), lock).map_err(|e| e.to_string())?;
        if format == Format::Qcow2 {
            let header =
                image::qcow2::header::Header::read(&file).map_err(|e| format!("{path}: {e}"))?;
            found.backing = image::backing_of(&header).map_err(|e| format!("{path}: {e}"))?;
        }
    }
    Ok((file, found))
}

/// Whose rights open the backing file an image names: the image's owner
/// (its uid and gid as fstat saw them) with that user's groups from
/// /etc/passwd and /etc/group. Files only: priv's filter has no socket
/// for NSS services; a user known only there gets no supplementary groups.
pub fn owner_of(uid: u32, gid: u32) -> Opener {
    if uid == 0 {
        return Opener::root();
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[2].parse() == Ok(uid))
            .then(|| (f[0].to_string(), f[3].parse::<u32>().ok()))
    });
    let mut groups = Vec::new();
    if let Some((name, primary)) = user {
        groups.extend(primary);
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                groups.extend(f[2].parse::<u32>().ok());
            }
        }
    }
    groups.sort_unstable();
    groups.dedup();
    Opener { uid, gid, groups }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_owns_as_root() {
        assert!(owner_of(0, 5).is_root());
        let o = owner_of(4_000_000_000, 7);
        assert_eq!((o.uid, o.gid, o.groups.len()), (4_000_000_000, 7, 0));
    }
}
