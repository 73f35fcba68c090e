//! A channel is one end of a `SOCK_SEQPACKET` unix socket: one frame per
//! packet, fds alongside as SCM_RIGHTS. Every socket and every received
//! fd is close-on-exec, so nothing leaks into a re-executed child by
//! accident.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

use crate::frame::{self, DecodeError, EncodeError, Frame, HEADER_LEN, MAX_FDS, MAX_PAYLOAD};
use crate::msg::{Creds, Msg};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("peer closed the channel")]
    Closed,
    #[error("channel i/o: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame from peer: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot send: {0}")]
    Encode(#[from] EncodeError),
    #[error("frame arrived with more fds than allowed (control data truncated)")]
    FdsTruncated,
}

impl ChannelError {
    /// True for a non-blocking channel that has nothing to read (or no
    /// room to write) right now.
    pub fn is_would_block(&self) -> bool {
        matches!(self, ChannelError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
}

impl Channel {
    /// A connected pair (close-on-exec set on both).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| with_context(e.into(), "socketpair"))?;
        Ok((Channel { sock: a }, Channel { sock: b }))
    }
    pub fn from_fd(sock: OwnedFd) -> Channel {
        Channel { sock }
    }
    /// Connects to a listening control socket.
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let ctx = || format!("connecting to {}", path.display());
        let sock = seqpacket_socket().map_err(|e| with_context(e, &ctx()))?;
        let addr = UnixAddr::new(path).map_err(|e| with_context(e.into(), &ctx()))?;
        socket::connect(sock.as_raw_fd(), &addr).map_err(|e| with_context(e.into(), &ctx()))?;
        Ok(Channel { sock })
    }
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        set_nonblocking(self.sock.as_fd(), on)
    }
    /// Sends one frame with `fds` alongside (`fds.len()` must equal
    /// `msg.fd_count()`). The sender's pid goes in the header.
    pub fn send(
        &self,
        msg: &Msg,
        peer_id: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        // encode() checks fds.len() against msg.fd_count() (at most MAX_FDS).
        let bytes = frame::encode(msg, peer_id, std::process::id(), fds.len())?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        // An empty SCM_RIGHTS message is an error (EINVAL); send none.
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(&bytes)];
        loop {
            // MSG_NOSIGNAL: a dead peer is an EPIPE error, not a SIGPIPE.
            match socket::sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == bytes.len() => return Ok(()),
                // SOCK_SEQPACKET sends whole packets; anything else is a bug.
                Ok(n) => {
                    return Err(ChannelError::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "short send of message type {}: {n} of {} bytes",
                            msg.type_code(),
                            bytes.len()
                        ),
                    )))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        }
    }
    /// Receives one frame. `Err(Closed)` at end of stream.
    pub fn recv(&self) -> Result<Frame, ChannelError> {
        // One spare byte so a packet longer than any valid frame shows up
        // as trailing bytes rather than silently fitting.
        let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD + 1];
        let (n, flags, fds) = loop {
            match recvmsg_fds(self.sock.as_fd(), &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        // From here on `fds` owns every received descriptor; returning an
        // error drops (closes) them.
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        if flags & libc::MSG_CTRUNC != 0 {
            return Err(ChannelError::FdsTruncated);
        }
        if flags & libc::MSG_TRUNC != 0 {
            let claimed = frame::Header::parse(&buf).map_or(0, |h| h.len as usize);
            return Err(DecodeError::Oversized {
                len: claimed.max(n.saturating_sub(HEADER_LEN)),
                max: MAX_PAYLOAD,
            }
            .into());
        }
        Ok(frame::decode(&buf[..n], fds)?)
    }
    /// The peer's credentials: SO_PEERCRED and SO_PEERGROUPS, both what
    /// the kernel recorded at connect(2), so nothing the client does later
    /// (exec, setgroups) or a reused pid can change them.
    pub fn peer_creds(&self) -> io::Result<Creds> {
        let c = socket::getsockopt(&self.sock, sockopt::PeerCredentials)
            .map_err(|e| with_context(e.into(), "SO_PEERCRED"))?;
        Ok(Creds {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            groups: self.peer_groups()?,
        })
    }

    /// SO_PEERGROUPS; more than [`crate::msg::MAX_GROUPS`] is an error
    /// (ERANGE), never a truncated list.
    fn peer_groups(&self) -> io::Result<Vec<u32>> {
        let mut groups = vec![0u32; crate::msg::MAX_GROUPS];
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of u32s we own; the kernel
        // writes at most `len` bytes and stores the length it wrote.
        let r = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(with_context(io::Error::last_os_error(), "SO_PEERGROUPS"));
        }
        groups.truncate(len as usize / std::mem::size_of::<u32>());
        Ok(groups)
    }
    pub fn into_fd(self) -> OwnedFd {
        self.sock
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// A listening `SOCK_SEQPACKET` unix socket (the control socket).
#[derive(Debug)]
pub struct Listener {
    sock: OwnedFd,
}

impl Listener {
    /// Binds `path` (removing a stale socket file first) and listens.
    /// Wraps a listening socket received from elsewhere (the control
    /// process gets its socket from the parent).
    pub fn from_fd(sock: OwnedFd) -> Listener {
        Listener { sock }
    }

    pub fn bind(path: &Path) -> io::Result<Listener> {
        let ctx = || format!("binding {}", path.display());
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(with_context(
                        e,
                        &format!("removing stale {}", path.display()),
                    ))
                }
                _ => {}
            },
            // Never delete something that is not a socket.
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a socket", ctx()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_context(e, &ctx())),
        }
        let sock = seqpacket_socket().map_err(|e| with_context(e, &ctx()))?;
        let addr = UnixAddr::new(path).map_err(|e| with_context(e.into(), &ctx()))?;
        socket::bind(sock.as_raw_fd(), &addr).map_err(|e| with_context(e.into(), &ctx()))?;
        let backlog = Backlog::new(128).map_err(|e| with_context(e.into(), &ctx()))?;
        socket::listen(&sock, backlog).map_err(|e| with_context(e.into(), &ctx()))?;
        Ok(Listener { sock })
    }
    /// Accepts one client (close-on-exec, non-blocking off).
    pub fn accept(&self) -> io::Result<Channel> {
        loop {
            // accept4 never inherits O_NONBLOCK, so the channel blocks.
            match socket::accept4(self.sock.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 just returned this fd; nothing else owns it.
                Ok(fd) => return Ok(Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        set_nonblocking(self.sock.as_fd(), on)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Control buffer for up to MAX_FDS fds, as u64s so it is aligned for
/// `cmsghdr`.
fn cmsg_buffer() -> (Vec<u64>, usize) {
    let payload = (MAX_FDS * std::mem::size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    (vec![0u64; space.div_ceil(8)], space)
}

/// One recvmsg(2) with MSG_CMSG_CLOEXEC: returns the bytes read, the
/// msg_flags, and every fd that arrived, already owned.
///
/// This uses libc rather than nix because nix refuses to walk the control
/// messages when MSG_CTRUNC is set, yet the fds that did fit were installed
/// in our table and must be closed.
fn recvmsg_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, libc::c_int, Vec<OwnedFd>)> {
    let (mut cbuf, space) = cmsg_buffer();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space as _;
    // SAFETY: mh points at live buffers (buf via iov, cbuf) of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled mh.msg_control/msg_controllen; the CMSG_*
    // macros walk only within that length.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&mh) };
    while !c.is_null() {
        // SAFETY: c is non-null and points at a cmsghdr inside cbuf.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is pure arithmetic.
            let data_len =
                (hdr.cmsg_len as usize).saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            // SAFETY: CMSG_DATA of a valid cmsghdr points at its data.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..data_len / std::mem::size_of::<RawFd>() {
                // SAFETY: i is within data_len; the data may be unaligned.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS just installed this fd for us alone.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: mh and c are valid, as above.
        c = unsafe { libc::CMSG_NXTHDR(&mh, c) };
    }
    Ok((n as usize, mh.msg_flags, fds))
}
