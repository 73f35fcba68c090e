//! Frame layout and the strict codec.

use std::os::fd::OwnedFd;

use crate::msg::Msg;

/// Header bytes on the wire, little endian:
/// type_code u16 | nfds u16 | len u32 (payload bytes) | peer_id u32 | pid u32
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted or sent.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Most fds one frame may carry.
/// Enough for a VM's start: kvm, tty, kernel, initrd and four disks with
/// four backing files each.
pub const MAX_FDS: usize = 32;

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
    FdCount {
        type_code: u16,
        expected: usize,
        got: usize,
    },
    #[error("message type {type_code}: bad payload: {reason}")]
    Payload { type_code: u16, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message type {type_code}: payload of {len} bytes exceeds the {max} byte limit")]
    Oversized {
        type_code: u16,
        len: usize,
        max: usize,
    },
    #[error("message type {type_code} needs {expected} fds, {got} given")]
    FdCount {
        type_code: u16,
        expected: usize,
        got: usize,
    },
    #[error("message type {type_code}: cannot encode: {reason}")]
    Payload { type_code: u16, reason: String },
}

impl Header {
    /// Parses the fixed header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Header, DecodeError> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DecodeError::Truncated {
                got: bytes.len(),
                need: HEADER_LEN,
            })?;
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        Ok(Header {
            type_code: u16_at(0),
            nfds: u16_at(2),
            len: u32_at(4),
            peer_id: u32_at(8),
            pid: u32_at(12),
        })
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&self.type_code.to_le_bytes());
        b[2..4].copy_from_slice(&self.nfds.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.peer_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.pid.to_le_bytes());
        b
    }
}

/// Encodes `msg` into one frame's bytes. `nfds` is the number of fds the
/// caller will send alongside; it must equal `msg.fd_count()`.
pub fn encode(msg: &Msg, peer_id: u32, pid: u32, nfds: usize) -> Result<Vec<u8>, EncodeError> {
    let type_code = msg.type_code();
    let expected = msg.fd_count();
    if nfds != expected {
        return Err(EncodeError::FdCount {
            type_code,
            expected,
            got: nfds,
        });
    }
    let payload = msg.encode_payload().map_err(|e| EncodeError::Payload {
        type_code,
        reason: e.to_string(),
    })?;
    if payload.len() > MAX_PAYLOAD {
        return Err(EncodeError::Oversized {
            type_code,
            len: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    // Both fit: fd_count() is at most MAX_FDS and len at most MAX_PAYLOAD.
    let header = Header {
        type_code,
        nfds: nfds as u16,
        len: payload.len() as u32,
        peer_id,
        pid,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes one frame's bytes. On any error the fds are closed.
///
/// `fds` is taken by value and only handed back inside an `Ok` frame, so
/// every error return drops (closes) them.
pub fn decode(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Frame, DecodeError> {
    let header = Header::parse(bytes)?;
    let type_code = header.type_code;
    let len = header.len as usize;
    if len > MAX_PAYLOAD {
        return Err(DecodeError::Oversized {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let need = HEADER_LEN + len;
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need,
        });
    }
    if bytes.len() > need {
        return Err(DecodeError::TrailingBytes {
            type_code,
            extra: bytes.len() - need,
        });
    }
    if usize::from(header.nfds) != fds.len() {
        return Err(DecodeError::FdCount {
            type_code,
            expected: usize::from(header.nfds),
            got: fds.len(),
        });
    }
    let payload = &bytes[HEADER_LEN..need];
    let (msg, used) = Msg::decode_payload(type_code, payload)
        .ok_or(DecodeError::UnknownType(type_code))?
        .map_err(|e| DecodeError::Payload {
            type_code,
            reason: e.to_string(),
        })?;
    if used != len {
        return Err(DecodeError::TrailingBytes {
            type_code,
            extra: len.saturating_sub(used),
        });
    }
    if msg.fd_count() != fds.len() {
        return Err(DecodeError::FdCount {
            type_code,
            expected: msg.fd_count(),
            got: fds.len(),
        });
    }
    Ok(Frame {
        peer_id: header.peer_id,
        pid: header.pid,
        msg,
        fds,
    })
}
