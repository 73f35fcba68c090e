//! The per-VM process: one VM on Linux KVM, serving its parent over a
//! channel.
//!
//! Protocol, as seen from here:
//! 1. receive exactly one `Msg::VmmStart(params)` with `params.fd_count()`
//!    fds, in order: /dev/kvm (read-write), the console tty (a pty slave in
//!    raw mode), the kernel image (read-only), when `has_initrd` the
//!    initrd (read-only), then per disk its top image and its backing
//!    files (top down), then one TAP per network interface;
//! 2. drop privileges to `params.uid`/`params.gid`, then landlock (no host
//!    paths) and the vmm's seccomp filter (see the `vmd-sandbox` crate);
//! 3. build the VM and start its vCPUs, then send `Msg::VmmRunning`;
//! 4. serve the console and the channel until the guest ends or the
//!    parent sends `Msg::VmmTerminate`, then send `Msg::VmmExited(why)`;
//!    `Msg::VmmPowerButton` only asks the guest (ACPI) to power off.
//!
//! `run` returns 0 after sending `VmmExited`, 1 if it could not (or the
//! parent went away first).

pub mod acpi;
pub mod arch;
pub mod bus;
pub mod device;
pub mod devices;
pub mod lifecycle;
pub mod memory;
pub mod pci;
pub mod vcpu;
pub mod vm;

use vmd_proto::vm::ExitReason;
use vmd_proto::{Channel, Msg};

pub use vm::{build_and_run, DevOptions, DiskFiles, Outcome, VmError, VmFiles};

/// Role entry point: serves one VM over `chan`, returns the exit status.
/// `sandbox` is the vmm's row of the role table (`vmd_sandbox::VMM`).
pub fn run(chan: Channel, sandbox: &vmd_sandbox::Sandbox) -> i32 {
    let frame = match chan.recv() {
        Ok(f) => f,
        Err(e) => {
            log::error!("no start message from the parent: {e}");
            return 1;
        }
    };
    let peer_id = frame.peer_id;
    let params = match frame.msg {
        Msg::VmmStart(p) => p,
        other => {
            let why = format!(
                "protocol: expected VmmStart, got message type {}",
                other.type_code()
            );
            log::error!("{why}");
            return report(&chan, peer_id, ExitReason::VmmError(why));
        }
    };
    if params.verbose {
        log::set_max_level(log::LevelFilter::Debug);
    }
    let id = params.id;
    let files = match VmFiles::from_fds(frame.fds, &params) {
        Ok(f) => f,
        Err(e) => return report(&chan, id, ExitReason::VmmError(e.to_string())),
    };
    if let Err(e) = enter_sandbox(sandbox, params.uid, params.gid) {
        log::error!("vm {}: sandbox: {e}", params.name);
        return report(&chan, id, ExitReason::VmmError(format!("sandbox: {e}")));
    }
    match build_and_run(&params, files, Some(&chan), &DevOptions::default()) {
        Outcome::Exited(reason) => report(&chan, id, reason),
        Outcome::ParentGone => 1,
    }
}

/// Every fd is in hand: drop to the vmd user, then no host paths and only
/// the vmm's syscalls, before any guest-controlled byte is parsed.
fn enter_sandbox(
    sandbox: &vmd_sandbox::Sandbox,
    uid: u32,
    gid: u32,
) -> Result<(), vmd_sandbox::SandboxError> {
    sandbox.enter(Some((uid, gid)))?;
    vcpu::narrow_vcpu_threads();
    Ok(())
}

fn report(chan: &Channel, id: u32, reason: ExitReason) -> i32 {
    log::info!("vm {id}: {reason}");
    match chan.send(&Msg::VmmExited(reason), id, &[]) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("cannot report the VM's end to the parent: {e}");
            1
        }
    }
}
