//! The one typed message enum. Each variant has a fixed wire type code
//! (never reuse or renumber one) and a fixed number of fds that must travel
//! with it.

use serde::{Deserialize, Serialize};

use crate::vm::{ExitReason, OpenKind, StartRequest, VmInfo, VmmParams};

/// What a client may ask of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Start(StartRequest),
    /// `name: None` stops every VM (`vmctl stop -a`).
    Stop {
        name: Option<String>,
        force: bool,
        wait: bool,
    },
    Status {
        name: Option<String>,
    },
    Console {
        name: String,
    },
}

/// The daemon's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok(String),
    Error(String),
    Status(Vec<VmInfo>),
    /// The console is attached; one fd follows: a stream socket relaying
    /// the VM's serial console. `tty` is the guest-side pty path.
    Console { tty: String },
}

/// A client's credentials as the control process read them (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// client -> control.
    Request(Request),
    /// control -> parent: a client's request with its credentials; the
    /// header's peer id names the client connection.
    ClientRequest { creds: Creds, req: Request },
    /// parent -> control -> client.
    Reply(Reply),
    /// parent -> priv: open a file a VM needs; peer id is the VM id.
    PrivOpen { kind: OpenKind, path: String },
    /// priv -> parent: the file is open; one fd follows.
    PrivOpened { kind: OpenKind },
    /// priv -> parent: the file could not be opened.
    PrivFailed { kind: OpenKind, path: String, reason: String },
    /// parent -> VM process: build and run this VM; `params.fd_count()`
    /// fds follow.
    VmmStart(VmmParams),
    /// VM process -> parent: the VM is built and its vCPUs run.
    VmmRunning,
    /// parent -> VM process: stop the VM now.
    VmmTerminate,
    /// VM process -> parent: the VM ended, and why; the process exits next.
    VmmExited(ExitReason),
}

impl Msg {
    /// The wire type code of this message.
    pub fn type_code(&self) -> u16 {
        match self {
            Msg::Request(_) => 1,
            Msg::ClientRequest { .. } => 2,
            Msg::Reply(_) => 3,
            Msg::PrivOpen { .. } => 20,
            Msg::PrivOpened { .. } => 21,
            Msg::PrivFailed { .. } => 22,
            Msg::VmmStart(_) => 40,
            Msg::VmmRunning => 41,
            Msg::VmmTerminate => 42,
            Msg::VmmExited(_) => 43,
        }
    }

    /// How many fds must travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Msg::Reply(Reply::Console { .. }) => 1,
            Msg::PrivOpened { .. } => 1,
            Msg::VmmStart(p) => p.fd_count(),
            _ => 0,
        }
    }
}
