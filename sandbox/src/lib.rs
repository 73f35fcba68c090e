//! Dropping a role's powers, shared by every unprivileged role (control,
//! vmm). The order matters: the bounding set can only shrink while we still
//! hold CAP_SETPCAP, and the uid switch must come after the gid switch.

use caps::{CapSet, CapsHashSet};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("setgroups: {0}")]
    Groups(nix::Error),
    #[error("setresgid({gid}): {source}")]
    Gid { gid: u32, source: nix::Error },
    #[error("setresuid({uid}): {source}")]
    Uid { uid: u32, source: nix::Error },
    #[error("refusing to run as root (uid 0) after dropping privileges")]
    StillRoot,
    #[error("clearing capability set {set:?}: {source}")]
    Caps {
        set: CapSet,
        source: caps::errors::CapsError,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::Error),
}

/// Switches to `uid`/`gid` with no supplementary groups, clears every
/// capability set (bounding and ambient included) and sets no_new_privs,
/// so nothing this process execs can ever regain a power.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    if uid == 0 {
        return Err(SandboxError::StillRoot);
    }
    // Bounding set first: shrinking it needs CAP_SETPCAP, which the uid
    // switch below takes away.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        caps::clear(None, CapSet::Bounding).map_err(|source| SandboxError::Caps {
            set: CapSet::Bounding,
            source,
        })?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|source| SandboxError::Caps {
        set: CapSet::Ambient,
        source,
    })?;
    setgroups(&[]).map_err(SandboxError::Groups)?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|source| SandboxError::Gid { gid, source })?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|source| SandboxError::Uid { uid, source })?;
    // A uid change from root clears permitted/effective already; clear
    // explicitly so a process with SECBIT_KEEP_CAPS set cannot keep any.
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::set(None, set, &CapsHashSet::new())
            .map_err(|source| SandboxError::Caps { set, source })?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    Ok(())
}
