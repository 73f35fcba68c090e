//! Dropping privileges before the VM process touches guest input.
//!
//! Everything the process needs from the host (/dev/kvm, the tty, the
//! kernel and initrd) arrives as open fds, so it can give up its user,
//! groups and every capability before it creates the VM. This must run
//! while the process has a single thread: capabilities and no_new_privs
//! are per thread, and threads started later inherit them.

use caps::CapSet;
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("setgroups([]): {0}")]
    SetGroups(nix::Error),
    #[error("setresgid({0}): {1}")]
    SetGid(u32, nix::Error),
    #[error("setresuid({0}): {1}")]
    SetUid(u32, nix::Error),
    #[error("clearing the {set} capability set: {err}")]
    Caps {
        set: &'static str,
        err: caps::errors::CapsError,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::Error),
}

fn clear(set: CapSet, name: &'static str) -> Result<(), SandboxError> {
    caps::clear(None, set).map_err(|err| SandboxError::Caps { set: name, err })
}

/// Becomes `uid`/`gid` with no supplementary groups, no capabilities in
/// any set, and no way to regain any through exec.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    if uid == 0 {
        log::warn!("VM process asked to keep running as root; dropping capabilities only");
    }
    setgroups(&[]).map_err(SandboxError::SetGroups)?;
    // Dropping from the bounding set needs CAP_SETPCAP: do it while we
    // still have it, i.e. before changing user.
    clear(CapSet::Bounding, "bounding")?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|e| SandboxError::SetGid(gid, e))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|e| SandboxError::SetUid(uid, e))?;
    // Leaving uid 0 already empties these; for uid 0 it is what drops them.
    clear(CapSet::Ambient, "ambient")?;
    clear(CapSet::Effective, "effective")?;
    clear(CapSet::Permitted, "permitted")?;
    clear(CapSet::Inheritable, "inheritable")?;
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    log::debug!("privileges dropped to uid {uid} gid {gid}");
    Ok(())
}
