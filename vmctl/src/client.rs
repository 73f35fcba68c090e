//! Talking to vmd: connect to the control socket, send one request, read
//! its reply. Also the error type every command returns.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use vmd_proto::msg::{Reply, Request};
use vmd_proto::{Channel, ChannelError, Msg};

use crate::args::ArgError;

/// Everything that makes vmctl exit with status 1. Displayed after
/// "vmctl: ".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line; points at the help.
    #[error("{}", usage_text(.cmd, .msg))]
    Usage {
        cmd: Option<&'static str>,
        msg: String,
    },
    /// A flag the parser knows but vmctl does not implement yet.
    #[error("{cmd} {opt}: not supported yet")]
    Unsupported { cmd: &'static str, opt: String },
    #[error("cannot connect to {}: is vmd running? ({source})", .path.display())]
    NoDaemon { path: PathBuf, source: io::Error },
    #[error("cannot connect to {}: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// The daemon refused the request (Reply::Error).
    #[error("{0}")]
    Daemon(String),
    #[error("vmd closed the connection without answering")]
    NoReply,
    #[error("talking to vmd: {0}")]
    Channel(#[from] ChannelError),
    /// The daemon answered something that does not fit the request.
    #[error("unexpected answer from vmd: {0}")]
    Protocol(String),
    /// Creating a disk image failed.
    #[error("create {path}: {source}")]
    Image {
        path: String,
        source: vmd_disk::ImageError,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

fn usage_text(cmd: &Option<&'static str>, msg: &str) -> String {
    match cmd {
        Some(c) => format!("{c}: {msg} (see 'vmctl help {c}')"),
        None => format!("{msg} (see 'vmctl help')"),
    }
}

impl Error {
    pub fn usage(cmd: &'static str, msg: impl Into<String>) -> Error {
        Error::Usage {
            cmd: Some(cmd),
            msg: msg.into(),
        }
    }

    /// A parse error of `cmd`'s arguments.
    pub fn args(cmd: &'static str, e: ArgError) -> Error {
        Error::usage(cmd, e.to_string())
    }

    pub fn io(what: &'static str, source: io::Error) -> Error {
        Error::Io { what, source }
    }
}

/// The global options every command sees.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub socket: PathBuf,
    /// How many times -v was given: 1 and up log requests and replies.
    pub verbose: u32,
}

impl Ctx {
    /// Connects to vmd, sends `req` and waits for the reply, returning it
    /// with the fds that came along. `Reply::Error` becomes
    /// [`Error::Daemon`].
    pub fn request(&self, req: Request) -> Result<(Reply, Vec<OwnedFd>), Error> {
        let chan = connect(&self.socket)?;
        if self.verbose > 0 {
            eprintln!("vmctl: -> {req:?}");
        }
        chan.send(&Msg::Request(req), 0, &[])?;
        let frame = match chan.recv() {
            Ok(f) => f,
            Err(ChannelError::Closed) => return Err(Error::NoReply),
            Err(e) => return Err(e.into()),
        };
        if self.verbose > 0 {
            eprintln!("vmctl: <- {:?} ({} fds)", frame.msg, frame.fds.len());
        }
        match frame.msg {
            Msg::Reply(Reply::Error(reason)) => Err(Error::Daemon(reason)),
            Msg::Reply(reply) => Ok((reply, frame.fds)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends `req` and returns the connection, whose replies the caller
    /// reads one by one (an answer in several messages).
    pub fn request_stream(&self, req: Request) -> Result<Replies, Error> {
        let chan = connect(&self.socket)?;
        if self.verbose > 0 {
            eprintln!("vmctl: -> {req:?}");
        }
        chan.send(&Msg::Request(req), 0, &[])?;
        Ok(Replies {
            chan,
            verbose: self.verbose,
        })
    }

    /// A request answered by `Reply::Ok(text)`: prints "vmctl: text" on
    /// stderr (as OpenBSD's vmctl does with warnx) unless it is empty.
    pub fn request_ok(&self, req: Request) -> Result<(), Error> {
        match self.request(req)? {
            (Reply::Ok(text), _) => {
                if !text.is_empty() {
                    eprintln!("vmctl: {text}");
                }
                Ok(())
            }
            (other, _) => Err(Error::Protocol(format!("{other:?}"))),
        }
    }
}

/// The replies to one request, read as they come.
pub struct Replies {
    chan: Channel,
    verbose: u32,
}

impl Replies {
    /// The next reply; `Reply::Error` becomes [`Error::Daemon`].
    pub fn next(&mut self) -> Result<Reply, Error> {
        let frame = match self.chan.recv() {
            Ok(f) => f,
            Err(ChannelError::Closed) => return Err(Error::NoReply),
            Err(e) => return Err(e.into()),
        };
        if self.verbose > 0 {
            eprintln!("vmctl: <- {:?}", frame.msg);
        }
        match frame.msg {
            Msg::Reply(Reply::Error(reason)) => Err(Error::Daemon(reason)),
            Msg::Reply(reply) => Ok(reply),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }
}

/// Connects to the control socket; a missing socket or a refused
/// connection mean vmd is not running.
pub fn connect(path: &Path) -> Result<Channel, Error> {
    Channel::connect(path).map_err(|e| {
        let path = path.to_path_buf();
        // The channel's error may already name the path; keep only the
        // OS error, which our message puts in context.
        let errno = e.raw_os_error().or(match e.kind() {
            io::ErrorKind::NotFound => Some(libc::ENOENT),
            io::ErrorKind::ConnectionRefused => Some(libc::ECONNREFUSED),
            io::ErrorKind::PermissionDenied => Some(libc::EACCES),
            _ => None,
        });
        let source = match errno {
            Some(n) => io::Error::from_raw_os_error(n),
            None => e,
        };
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                Error::NoDaemon { path, source }
            }
            _ => Error::Connect { path, source },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = Error::usage("stop", "needs a VM name or -a");
        assert_eq!(
            e.to_string(),
            "stop: needs a VM name or -a (see 'vmctl help stop')"
        );
        let e = Error::Usage {
            cmd: None,
            msg: "no command given".into(),
        };
        assert_eq!(e.to_string(), "no command given (see 'vmctl help')");
        let e = Error::Unsupported {
            cmd: "start",
            opt: "-d".into(),
        };
        assert_eq!(e.to_string(), "start -d: not supported yet");
    }

    #[test]
    fn missing_socket_means_no_daemon() {
        let path = Path::new("/nonexistent-vmctl-test/vmd.sock");
        let e = Error::NoDaemon {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(e
            .to_string()
            .starts_with("cannot connect to /nonexistent-vmctl-test/vmd.sock: is vmd running? ("));
    }
}
