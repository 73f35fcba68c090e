//! A VM's serial console as the parent keeps it: the pty (the VM process
//! holds the slave, we read the master at all times so the guest never
//! blocks), the last 64 KiB of output for consoles that attach later, an
//! append-only log file, and the attached `vmctl console` clients, each a
//! stream socket we relay to.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use log::{debug, warn};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::termios;

/// Output kept for replay to a console that attaches.
pub const REPLAY_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("openpty: {0}")]
    Openpty(nix::Error),
    #[error("pty setup: {0}")]
    Setup(nix::Error),
    #[error("console log {path}: {source}")]
    Log { path: String, source: io::Error },
    #[error("console socket: {0}")]
    Socket(io::Error),
}

struct Client {
    sock: UnixStream,
    backlog: Vec<u8>,
}

pub struct Console {
    master: File,
    slave: OwnedFd,
    tty: String,
    replay: VecDeque<u8>,
    log: File,
    clients: Vec<Client>,
    /// Bytes the guest wrote to its console, and bytes typed into it
    /// (metrics).
    pub bytes_out: u64,
    pub bytes_in: u64,
}

fn set_cloexec_nonblock(fd: BorrowedFd<'_>, nonblock: bool) -> Result<(), nix::Error> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    if nonblock {
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

impl Console {
    /// Opens a raw pty whose slave is owned by `owner_uid` and a log file
    /// at `log_path` (appended to).
    pub fn new(log_path: &Path, owner_uid: u32) -> Result<Console, ConsoleError> {
        let pty = nix::pty::openpty(None, None).map_err(ConsoleError::Openpty)?;
        set_cloexec_nonblock(pty.master.as_fd(), true).map_err(ConsoleError::Setup)?;
        set_cloexec_nonblock(pty.slave.as_fd(), false).map_err(ConsoleError::Setup)?;
        // Raw: bytes pass untouched both ways, no echo, no line discipline
        // (the guest's own tty layer does that).
        let mut tio = termios::tcgetattr(&pty.slave).map_err(ConsoleError::Setup)?;
        termios::cfmakeraw(&mut tio);
        termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &tio)
            .map_err(ConsoleError::Setup)?;
        let tty = nix::unistd::ttyname(&pty.slave)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(log_path)
            .map_err(|source| ConsoleError::Log {
                path: log_path.display().to_string(),
                source,
            })?;
        // SAFETY: openpty handed us this fd and nothing else owns it.
        let master = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(pty.master)) };
        let console = Console {
            master,
            slave: pty.slave,
            tty,
            replay: VecDeque::with_capacity(REPLAY_BYTES),
            log,
            clients: Vec::new(),
            bytes_out: 0,
            bytes_in: 0,
        };
        console.set_owner(owner_uid);
        Ok(console)
    }

    /// Gives the pty to `uid` (root and that user only: mode 0600, not
    /// the tty group's 0620), as when the VM's owner changes at a reload.
    /// Without it the former owner could still open the pty, read what
    /// root types at `vmctl console` and write as the guest.
    pub fn set_owner(&self, uid: u32) {
        use nix::sys::stat::{fchmod, Mode};
        if let Err(e) =
            nix::unistd::fchown(&self.slave, Some(nix::unistd::Uid::from_raw(uid)), None)
                .and_then(|()| fchmod(&self.slave, Mode::S_IRUSR | Mode::S_IWUSR))
        {
            warn!("console {}: giving it to uid {uid}: {e}", self.tty);
        }
    }

    pub fn tty(&self) -> &str {
        &self.tty
    }

    /// A fresh fd for the VM process's end; stale input typed while no VM
    /// was running is discarded first.
    pub fn slave_for_vm(&self) -> io::Result<OwnedFd> {
        let _ = termios::tcflush(&self.slave, termios::FlushArg::TCIFLUSH);
        self.slave.try_clone()
    }

    pub fn master_fd(&self) -> BorrowedFd<'_> {
        self.master.as_fd()
    }

    /// How many `vmctl console` clients are attached.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub fn client_fds(&self) -> impl Iterator<Item = (BorrowedFd<'_>, bool)> {
        self.clients
            .iter()
            .map(|c| (c.sock.as_fd(), !c.backlog.is_empty()))
    }

    /// Drains what the guest wrote: into the replay buffer, the log and
    /// every attached client.
    pub fn master_readable(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.master.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    self.bytes_out += n as u64;
                    self.output(&buf[..n])
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("console {}: read: {e}", self.tty);
                    return;
                }
            }
        }
    }

    fn output(&mut self, bytes: &[u8]) {
        let overflow = (self.replay.len() + bytes.len()).saturating_sub(REPLAY_BYTES);
        self.replay.drain(..overflow.min(self.replay.len()));
        let keep = &bytes[bytes.len().saturating_sub(REPLAY_BYTES)..];
        self.replay.extend(keep);
        if let Err(e) = self.log.write_all(bytes) {
            warn!("console {}: log write: {e}", self.tty);
        }
        for client in &mut self.clients {
            client.backlog.extend_from_slice(bytes);
        }
        self.flush_clients();
    }

    /// Attaches a client: returns the socket end to hand to vmctl, after
    /// queueing the replay of recent output on ours.
    pub fn attach(&mut self) -> Result<OwnedFd, ConsoleError> {
        let (ours, theirs) = UnixStream::pair().map_err(ConsoleError::Socket)?;
        ours.set_nonblocking(true).map_err(ConsoleError::Socket)?;
        let (a, b) = self.replay.as_slices();
        let mut backlog = Vec::with_capacity(a.len() + b.len());
        backlog.extend_from_slice(a);
        backlog.extend_from_slice(b);
        self.clients.push(Client {
            sock: ours,
            backlog,
        });
        self.flush_clients();
        Ok(OwnedFd::from(theirs))
    }

    /// Input from client `idx` goes to the guest (dropped when no VM runs
    /// or the pty is full: typing must never stall the daemon).
    pub fn client_readable(&mut self, idx: usize, vm_running: bool) {
        let Some(client) = self.clients.get_mut(idx) else {
            return;
        };
        let mut buf = [0u8; 1024];
        match client.sock.read(&mut buf) {
            Ok(0) => {
                self.clients.remove(idx);
            }
            Ok(n) if vm_running => {
                if let Ok(w) = self.master.write(&buf[..n]) {
                    self.bytes_in += w as u64;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.clients.remove(idx);
            }
        }
    }

    /// Writes queued output to clients; detaches the ones that are gone
    /// or hopelessly behind.
    pub fn flush_clients(&mut self) {
        self.clients.retain_mut(|client| {
            while !client.backlog.is_empty() {
                match client.sock.write(&client.backlog) {
                    Ok(0) => return false,
                    Ok(n) => {
                        client.backlog.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
            client.backlog.len() <= crate::limits::CONSOLE_BACKLOG_MAX
        });
    }

    /// Detaches every client (the VM stopped); their vmctl sees EOF once
    /// the output already queued has been written where possible.
    pub fn detach_all(&mut self) {
        self.flush_clients();
        self.clients.clear();
    }
}
