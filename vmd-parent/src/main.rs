//! The one vmd binary. It re-executes itself for every role, so the role
//! dispatch is the very first thing main does: before any thread exists.

mod conf;
mod console;
mod control;
mod limits;
mod logger;
mod notify;
mod options;
mod parent;
mod rights;
mod spawn;
mod user;
mod vms;

use std::os::fd::{FromRawFd, OwnedFd};

use options::{Options, Role, USAGE};
use vmd_proto::{Channel, CHILD_CHANNEL_FD};

/// The channel a child role inherits at fd 3.
fn inherited_channel() -> Result<Channel, String> {
    // SAFETY: fstat only writes into the struct we hand it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
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
    let role_name = match opts.role {
        Role::Parent => "parent",
        Role::Priv => "priv",
        Role::Control => "control",
        Role::Vmm => "vmm",
        Role::Device => "device",
    };
    // `vmd -n` is a foreground check: its words belong on the terminal.
    logger::init(role_name, opts.foreground || opts.check_only, opts.verbose);
    let code = if opts.role == Role::Parent {
        parent::run(opts)
    } else {
        match inherited_channel() {
            Err(e) => {
                eprintln!("vmd: {e}");
                1
            }
            Ok(chan) => match opts.role {
                Role::Priv => vmd_priv::run(chan),
                Role::Control => control::run(&opts, chan),
                Role::Vmm => vmd_vmm::run(chan),
                Role::Device => vmd_vmm::device::run(chan),
                Role::Parent => unreachable!("handled above"),
            },
        }
    };
    std::process::exit(code);
}
