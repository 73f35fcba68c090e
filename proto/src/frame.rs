//! Frame layout and the strict codec. (Skeleton: the signatures are the
//! contract; bodies are being filled in.)

use std::os::fd::OwnedFd;

use crate::msg::Msg;

/// Header bytes on the wire, little endian:
/// type_code u16 | nfds u16 | len u32 (payload bytes) | peer_id u32 | pid u32
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted or sent.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Most fds one frame may carry.
pub const MAX_FDS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub type_code: u16,
    pub nfds: u16,
    pub len: u32,
    pub peer_id: u32,
    pub pid: u32,
}

/// A decoded frame: the message, who it concerns, who sent it, and the fds
/// that came with it (closed when dropped).
#[derive(Debug)]
pub struct Frame {
    pub peer_id: u32,
    pub pid: u32,
    pub msg: Msg,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame truncated: {got} bytes, need {need}")]
    Truncated { got: usize, need: usize },
    #[error("frame payload of {len} bytes exceeds the {max} byte limit")]
    Oversized { len: usize, max: usize },
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("{extra} trailing bytes after message type {type_code}")]
    TrailingBytes { type_code: u16, extra: usize },
    #[error("message type {type_code} needs {expected} fds, {got} arrived")]
    FdCount { type_code: u16, expected: usize, got: usize },
    #[error("message type {type_code}: bad payload: {reason}")]
    Payload { type_code: u16, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message type {type_code}: payload of {len} bytes exceeds the {max} byte limit")]
    Oversized { type_code: u16, len: usize, max: usize },
    #[error("message type {type_code} needs {expected} fds, {got} given")]
    FdCount { type_code: u16, expected: usize, got: usize },
    #[error("message type {type_code}: cannot encode: {reason}")]
    Payload { type_code: u16, reason: String },
}

/// Encodes `msg` into one frame's bytes. `nfds` is the number of fds the
/// caller will send alongside; it must equal `msg.fd_count()`.
pub fn encode(msg: &Msg, peer_id: u32, pid: u32, nfds: usize) -> Result<Vec<u8>, EncodeError> {
    let _ = (msg, peer_id, pid, nfds);
    todo!()
}

/// Decodes one frame's bytes. On any error the fds are closed.
pub fn decode(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Frame, DecodeError> {
    let _ = (bytes, fds);
    todo!()
}
