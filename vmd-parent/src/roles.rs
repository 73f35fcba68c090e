//! The one table of vmd's processes: each role's `--role` name (also its
//! log tag), its process title, its sandbox (defined in `vmd-sandbox`,
//! entered by the role itself once it holds its fds) and its entry point.
//! Options parsing, spawning, logging and the dispatch in main all read
//! it; docs/SECURITY.md describes the same rows.

use vmd_proto::Channel;
use vmd_sandbox::Sandbox;

use crate::options::Options;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Parent,
    Priv,
    Control,
    Vmm,
    /// A virtio device process of a VM.
    Device,
}

/// A child role's entry point.
pub type Entry = fn(&Options, Channel, &'static Sandbox) -> i32;

pub struct RoleDef {
    pub role: Role,
    /// The `--role` word and the log tag.
    pub name: &'static str,
    /// What `ps` shows (per-VM roles get a title naming their VM instead).
    pub title: &'static str,
    /// `None`: the parent keeps root (see docs/SECURITY.md).
    pub sandbox: Option<&'static Sandbox>,
    /// Runs the role over its channel to the parent, handing it its
    /// sandbox to enter once it holds its fds; the parent's own entry is
    /// `parent::run`, which takes the options by value.
    pub entry: Option<Entry>,
}

pub const ROLES: [RoleDef; 5] = [
    RoleDef {
        role: Role::Parent,
        name: "parent",
        title: "vmd: parent",
        sandbox: None,
        entry: None,
    },
    RoleDef {
        role: Role::Priv,
        name: "priv",
        title: "vmd: priv",
        sandbox: Some(&vmd_sandbox::PRIV),
        entry: Some(|_, chan, sandbox| vmd_priv::run(chan, sandbox)),
    },
    RoleDef {
        role: Role::Control,
        name: "control",
        title: "vmd: control",
        sandbox: Some(&vmd_sandbox::CONTROL),
        entry: Some(crate::control::run),
    },
    RoleDef {
        role: Role::Vmm,
        name: "vmm",
        title: "vmd: vmm",
        sandbox: Some(&vmd_sandbox::VMM),
        entry: Some(|_, chan, sandbox| vmd_vmm::run(chan, sandbox)),
    },
    RoleDef {
        role: Role::Device,
        name: "device",
        title: "vmd: device",
        sandbox: Some(&vmd_sandbox::DEVICE),
        entry: Some(|_, chan, sandbox| vmd_vmm::device::run(chan, sandbox)),
    },
];

impl Role {
    pub fn def(self) -> &'static RoleDef {
        // Every variant has exactly one row (tested below).
        ROLES.iter().find(|d| d.role == self).unwrap_or(&ROLES[0])
    }

    pub fn name(self) -> &'static str {
        self.def().name
    }

    /// The role a `--role` word names; the parent is never started so.
    pub fn from_name(name: &str) -> Option<Role> {
        ROLES
            .iter()
            .find(|d| d.name == name && d.role != Role::Parent)
            .map(|d| d.role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_role_and_names_round_trip() {
        for (i, d) in ROLES.iter().enumerate() {
            assert_eq!(d.role.def().name, d.name, "row {i}");
            assert_eq!(d.title, format!("vmd: {}", d.name));
            assert_eq!(d.sandbox.is_none(), d.role == Role::Parent);
            assert_eq!(d.entry.is_none(), d.role == Role::Parent);
            if d.role != Role::Parent {
                assert_eq!(Role::from_name(d.name), Some(d.role));
            }
        }
        assert_eq!(Role::from_name("parent"), None);
        let mut names: Vec<_> = ROLES.iter().map(|d| d.name).collect();
        names.dedup();
        assert_eq!(names.len(), ROLES.len());
    }
}
