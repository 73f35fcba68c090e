//! The wire protocol every vmd process speaks, modelled on OpenBSD's imsg.
//!
//! A frame is a fixed header (see [`frame::Header`]) followed by a bincode
//! payload; file descriptors ride alongside as SCM_RIGHTS on the same
//! `SOCK_SEQPACKET` packet, so frame boundaries and fd ownership never blur.
//! Decoding is strict: anything unexpected is a typed [`frame::DecodeError`],
//! and fds that came with a bad frame are closed.

pub mod channel;
pub mod frame;
pub mod msg;
pub mod net;
pub mod size;
pub mod stats;
pub mod vm;

pub use channel::{Channel, ChannelError, Listener};
pub use frame::{DecodeError, Frame, Header, MAX_FDS, MAX_PAYLOAD};
pub use msg::Msg;

/// The fd number at which a re-executed child finds its end of the
/// socketpair to the parent (as OpenBSD's proc.c uses fd 3).
pub const CHILD_CHANNEL_FD: i32 = 3;

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/vmd.sock";

#[cfg(test)]
mod tests;

/// The log filter for a verbosity count (`-v` given N times), shared by
/// every role so `vmctl log verbose` means the same everywhere.
pub fn log_filter(verbose: u8) -> log::LevelFilter {
    match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}
