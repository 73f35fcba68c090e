//! The one vmd binary. It re-executes itself for every role, so the role
//! dispatch is the very first thing main does: before any thread exists.

mod conf;
mod console;
mod control;
mod limits;
mod logger;
mod metrics;
mod notify;
mod options;
mod parent;
mod rights;
mod roles;
mod spawn;
mod user;
mod vms;

use std::os::fd::{FromRawFd, OwnedFd};

use options::{Options, USAGE};
use vmd_proto::{Channel, CHILD_CHANNEL_FD};

/// The channel a child role inherits at fd 3.
fn inherited_channel() -> Result<Channel, String> {
    // SAFETY: fstat only writes into the struct we hand it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid, writable struct stat.
    let is_socket = unsafe { libc::fstat(CHILD_CHANNEL_FD, &mut st) } == 0
        && st.st_mode & libc::S_IFMT == libc::S_IFSOCK;
    if !is_socket {
        return Err("roles are internal: vmd starts them itself".into());
    }
    // SAFETY: fd 3 is ours by the spawn contract and was just checked to
    // be an open socket; nothing else in this process owns it.
    Ok(Channel::from_fd(unsafe {
        OwnedFd::from_raw_fd(CHILD_CHANNEL_FD)
    }))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Options::parse(&args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("vmd: {e}\n{USAGE}");
            std::process::exit(1);
        }
    };
    let role = opts.role.def();
    // `vmd -n` is a foreground check: its words belong on the terminal.
    logger::init(role.name, opts.foreground || opts.check_only, opts.verbose);
    let code = match (role.entry, role.sandbox) {
        (Some(entry), Some(sandbox)) => match inherited_channel() {
            Err(e) => {
                eprintln!("vmd: {e}");
                1
            }
            Ok(chan) => entry(&opts, chan, sandbox),
        },
        _ => parent::run(opts),
    };
    std::process::exit(code);
}
