//! vm.conf as the parent uses it: loading a file, turning definitions into
//! VM specs and owners, and the staggered autostart plan.

use std::path::Path;
use std::time::Duration;

use vmd_config::{Config, Owner, VmDef};

use crate::vms::{VmOwner, VmSpec};

/// Reads and parses a configuration file, with `vmd -D` macros; the error
/// is one line naming `file:line:column`.
pub fn load(path: &Path, defines: &[(String, String)]) -> Result<Config, String> {
    let mut config = vmd_config::parse_file_with(path, defines).map_err(|e| e.to_string())?;
    // A group the host has no number for would only be an alias, which no
    // filter matches: say so where it is written.
    for (name, at) in &config.group_refs {
        if ifgroup_id(name).is_none() {
            config.warnings.push(vmd_config::Warning {
                at: at.clone(),
                message: format!(
                    "group \"{name}\" has no number in {}: the interfaces get it only \
                     as their alias, which filters cannot match (add a line \"NUMBER {name}\")",
                    IFGROUP_FILES[0]
                ),
            });
        }
    }
    for w in &config.warnings {
        log::warn!("{w}");
    }
    Ok(config)
}

/// `vmd -n`: the files each VM names exist and are of the right type, so
/// a typo shows before the VM starts: boot (a kernel or BIOS image) and
/// initrd regular files, disks regular files or block devices, the cdrom
/// a regular file. Each problem is one line naming the VM's place.
pub fn check_paths(config: &Config) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut problems = Vec::new();
    for vm in &config.vms {
        let mut check = |what: &str, path: &Path, block_ok: bool| {
            let wanted = if block_ok {
                "a regular file or block device"
            } else {
                "a regular file"
            };
            let why = match std::fs::metadata(path) {
                Err(e) => e.to_string(),
                Ok(m) if m.is_file() || (block_ok && m.file_type().is_block_device()) => return,
                Ok(_) => format!("not {wanted}"),
            };
            problems.push(format!(
                "{}: vm \"{}\": {what} {}: {why}",
                vm.defined_at,
                vm.name,
                path.display()
            ));
        };
        if let Some(k) = &vm.kernel {
            check("boot", k, false);
        }
        if let Some(i) = &vm.initrd {
            check("initrd", i, false);
        }
        for d in &vm.disks {
            check("disk", &d.path, true);
        }
        if let Some(c) = &vm.cdrom {
            check("cdrom", c, false);
        }
    }
    problems
}

/// iproute2's interface group names (`NUMBER NAME` lines), where Linux
/// filters (nftables `iifgroup "NAME"`, `ip link show group NAME`) look
/// them up; the first file that names a group wins.
pub const IFGROUP_FILES: [&str; 3] = [
    "/etc/iproute2/group",
    "/usr/share/iproute2/group",
    "/usr/lib/iproute2/group",
];

/// The Linux interface group number of vm.conf group `name`.
pub fn ifgroup_id(name: &str) -> Option<u32> {
    IFGROUP_FILES.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        ifgroup_in(&text, name)
    })
}

/// `name`'s number in the text of an iproute2 group file.
fn ifgroup_in(text: &str, name: &str) -> Option<u32> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (num, n) = (f.next()?, f.next()?);
            let num = match num.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            (n == name).then_some(num)
        })
}

/// The spec a definition starts with.
pub fn spec_of(def: &VmDef) -> Result<VmSpec, String> {
    let mut spec = VmSpec::from_request(
        &vmd_config::to_start_request(def),
        &vmd_proto::msg::Opener::root(),
    )
    .map_err(|e| format!("{}: {e}", def.defined_at))?;
    spec.cdrom = def.cdrom.as_ref().map(|p| p.display().to_string());
    spec.boot_filename = def.boot_filename.clone();
    Ok(spec)
}

/// Resolves `owner user[:group]` to ids now, so a typo fails the load
/// rather than a later access check.
pub fn resolve_owner(owner: &Owner, at: &impl std::fmt::Display) -> Result<VmOwner, String> {
    let uid = match &owner.user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| format!("{at}: unknown user {name:?}"))?
                .uid
                .as_raw(),
        ),
        None => None,
    };
    let gid = match &owner.group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| format!("{at}: unknown group {name:?}"))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    let name = match (&owner.user, &owner.group) {
        (Some(u), Some(g)) => format!("{u}:{g}"),
        (Some(u), None) => u.clone(),
        (None, Some(g)) => format!(":{g}"),
        (None, None) => "root".into(),
    };
    Ok(VmOwner { uid, gid, name })
}

/// `staggered start parallel N delay S`: how many VMs start at once and
/// how long to wait between groups (OpenBSD's defaults: the number of
/// CPUs, 30 seconds).
pub fn stagger(config: &Config) -> (usize, Duration) {
    match &config.globals.staggered {
        Some(s) => (
            s.parallel.max(1) as usize,
            Duration::from_secs(u64::from(s.delay)),
        ),
        None => (
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            Duration::from_secs(30),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifgroup_names_come_from_iproute2s_file() {
        let text = "# device group names\n0\tdefault\n42 vms # ours\n0x10 hexed\nbad line\n";
        assert_eq!(ifgroup_in(text, "default"), Some(0));
        assert_eq!(ifgroup_in(text, "vms"), Some(42));
        assert_eq!(ifgroup_in(text, "hexed"), Some(16));
        assert_eq!(ifgroup_in(text, "ours"), None);
        assert_eq!(ifgroup_in(text, "line"), None);
    }
}
