//! The device role (`vmd --role device`, titled `vmd: vm NAME blk0`): one
//! virtio backend (virtio-blk, virtio-net or virtio-scsi) in a process of
//! its own, so the code that parses what a guest or an image controls
//! (qcow2, DHCP, Ethernet frames, SCSI commands) shares neither address
//! space nor powers with the vCPUs.
//!
//! Protocol, as seen from here:
//! 1. receive exactly one `Msg::DevStart(params)` from the parent with
//!    `params.fd_count()` fds: the channel to the VM process, then the
//!    disk image and its backing files (and the disk's counters file),
//!    the ISO, or the TAP;
//! 2. drop privileges and apply this kind's seccomp filter (narrower than
//!    the VM process's: see docs/SECURITY.md); then open the image;
//! 3. serve the VM process ([`crate::devices::virtio::backend::serve`])
//!    until it closes the channel, then exit 0.

use vmd_proto::stats::SharedCounters;
use vmd_proto::vm::{DevKind, DevParams};
use vmd_proto::{Channel, Msg};

use crate::devices::virtio::{backend, model};

/// Role entry point; returns the exit status.
/// `sandbox` is the device role's row of the role table
/// (`vmd_sandbox::DEVICE`); the filter follows the device's kind.
pub fn run(parent: Channel, sandbox: &vmd_sandbox::Sandbox) -> i32 {
    let frame = match parent.recv() {
        Ok(f) => f,
        Err(e) => {
            log::error!("no start message from the parent: {e}");
            return 1;
        }
    };
    let params = match frame.msg {
        Msg::DevStart(p) => p,
        other => {
            log::error!(
                "protocol: expected DevStart, got message type {}",
                other.type_code()
            );
            return 1;
        }
    };
    if params.verbose {
        log::set_max_level(log::LevelFilter::Debug);
    }
    // Nothing more comes from the parent: it watches this process by pid.
    drop(parent);
    let mut fds = frame.fds;
    if fds.is_empty() {
        log::error!("{}: DevStart came without its fds", params.name);
        return 1;
    }
    let vm_chan = Channel::from_fd(fds.remove(0));
    // A disk's last fd is its counters file, for the parent's metrics.
    let counters = match params.kind {
        DevKind::Block { .. } => match fds.pop().map(|fd| SharedCounters::map(&fd)) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                log::error!("vm {} {}: counters: {e}", params.vm_name, params.name);
                return 1;
            }
            None => None,
        },
        _ => None,
    };
    if let Err(e) = enter_sandbox(sandbox, &params) {
        log::error!("vm {} {}: sandbox: {e}", params.vm_name, params.name);
        return 1;
    }
    let model = match model::open(&params.vm_name, &params.kind, fds, counters) {
        Ok(m) => m,
        Err(e) => {
            log::error!("vm {} {}: {e}", params.vm_name, params.name);
            return 1;
        }
    };
    match backend::serve(&vm_chan, model) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("vm {} {}: {e}", params.vm_name, params.name);
            1
        }
    }
}

/// The sandbox role of a device kind.
pub fn role_of(kind: &DevKind) -> vmd_sandbox::Role {
    match kind {
        DevKind::Block { .. } => vmd_sandbox::Role::Block,
        DevKind::Scsi => vmd_sandbox::Role::Scsi,
        DevKind::Net { .. } => vmd_sandbox::Role::Net,
    }
}

/// Every fd is in hand: drop to the vmd user, no host paths, and only
/// this kind's syscalls, before a byte of the image or the guest is read.
fn enter_sandbox(
    sandbox: &vmd_sandbox::Sandbox,
    params: &DevParams,
) -> Result<(), vmd_sandbox::SandboxError> {
    sandbox
        .with_filter(role_of(&params.kind))
        .enter(Some((params.uid, params.gid)))
}
