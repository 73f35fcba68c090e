//! A channel is one end of a `SOCK_SEQPACKET` unix socket: one frame per
//! packet, fds alongside as SCM_RIGHTS. (Skeleton: signatures are the
//! contract.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use crate::frame::{DecodeError, EncodeError, Frame};
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
        todo!()
    }
    pub fn from_fd(sock: OwnedFd) -> Channel {
        Channel { sock }
    }
    /// Connects to a listening control socket.
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let _ = path;
        todo!()
    }
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let _ = on;
        todo!()
    }
    /// Sends one frame with `fds` alongside (`fds.len()` must equal
    /// `msg.fd_count()`). The sender's pid goes in the header.
    pub fn send(&self, msg: &Msg, peer_id: u32, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let _ = (msg, peer_id, fds);
        todo!()
    }
    /// Receives one frame. `Err(Closed)` at end of stream.
    pub fn recv(&self) -> Result<Frame, ChannelError> {
        todo!()
    }
    /// The peer's credentials (SO_PEERCRED).
    pub fn peer_creds(&self) -> io::Result<Creds> {
        todo!()
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
    pub fn bind(path: &Path) -> io::Result<Listener> {
        let _ = path;
        todo!()
    }
    /// Accepts one client (close-on-exec, non-blocking off).
    pub fn accept(&self) -> io::Result<Channel> {
        todo!()
    }
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let _ = on;
        todo!()
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
