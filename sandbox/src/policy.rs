//! Each sandboxed role's sandbox, defined once and entered by one
//! sequence ([`Sandbox::enter`]): identity (a user switch, or root with
//! a few capabilities), rlimits, landlock, seccomp. docs/SECURITY.md's
//! table says the same, and tests/tests/security.rs checks it against
//! /proc.

use crate::{
    apply_seccomp, drop_privileges, keep_only_caps, landlock_no_fs, limit_resources, Capability,
    Role, SandboxError,
};

/// Who a role runs as once sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Stays root, holding exactly these capabilities.
    Root { keep: &'static [Capability] },
    /// Switches to the unprivileged vmd user, with no capability at all.
    VmdUser,
}

/// How one role drops its powers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sandbox {
    pub identity: Identity,
    /// RLIMIT_NOFILE.
    pub max_files: u64,
    /// Landlock with no host paths at all (roles that open nothing).
    pub no_host_paths: bool,
    /// The seccomp filter.
    pub filter: Role,
}

/// priv stays root to open root-owned files, but keeps only
/// CAP_DAC_OVERRIDE (open what root names whatever its mode), CAP_SETUID
/// and CAP_SETGID (its opener children take the rights of whoever named a
/// path), CAP_KILL (and priv kills them once they answered or timed out:
/// they run as another user) and CAP_NET_ADMIN (TAP devices and bridges).
/// One request at a time: a disk's backing chain at most.
pub const PRIV: Sandbox = Sandbox {
    identity: Identity::Root {
        keep: &[
            Capability::CAP_DAC_OVERRIDE,
            Capability::CAP_KILL,
            Capability::CAP_SETGID,
            Capability::CAP_SETUID,
            Capability::CAP_NET_ADMIN,
        ],
    },
    max_files: 256,
    no_host_paths: false,
    filter: Role::Priv,
};

/// control: MAX_CLIENTS (vmd-parent's limits.rs, 256) plus the channel,
/// the listener and relayed console fds fit in twice that.
pub const CONTROL: Sandbox = Sandbox {
    identity: Identity::VmdUser,
    max_files: 512,
    no_host_paths: true,
    filter: Role::Control,
};

/// The VM process: vCPU fds, disk chains, virtio eventfds are far below
/// this.
pub const VMM: Sandbox = Sandbox {
    identity: Identity::VmdUser,
    max_files: 1024,
    no_host_paths: true,
    filter: Role::Vmm,
};

/// A device process: the channel, its image chain (at most a few dozen
/// backing files) or TAP, the memfd and the queue eventfds. Its filter
/// depends on the device ([`Sandbox::with_filter`]).
pub const DEVICE: Sandbox = Sandbox {
    identity: Identity::VmdUser,
    max_files: 128,
    no_host_paths: true,
    filter: Role::Block,
};

impl Sandbox {
    /// The same sandbox with another seccomp filter (a device's kind).
    pub const fn with_filter(self, filter: Role) -> Sandbox {
        Sandbox { filter, ..self }
    }

    /// Enters the sandbox, for good: `user` is the uid:gid a
    /// [`Identity::VmdUser`] role switches to (ignored for root roles).
    /// Called once the role holds every fd it will ever need.
    pub fn enter(&self, user: Option<(u32, u32)>) -> Result<(), SandboxError> {
        match self.identity {
            Identity::Root { keep } => keep_only_caps(keep)?,
            Identity::VmdUser => {
                let (uid, gid) = user.ok_or(SandboxError::NoUser)?;
                drop_privileges(uid, gid)?;
            }
        }
        limit_resources(self.max_files)?;
        if self.no_host_paths {
            landlock_no_fs()?;
        }
        apply_seccomp(self.filter)
    }
}
