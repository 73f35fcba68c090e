//! vm.conf as the parent uses it: loading a file, turning definitions into
//! VM specs and owners, and the staggered autostart plan.

use std::path::Path;
use std::time::Duration;

use vmd_config::{Config, Owner, VmDef};

use crate::vms::{VmOwner, VmSpec};

/// Reads and parses a configuration file; the error is one line naming
/// `file:line:column`.
pub fn load(path: &Path) -> Result<Config, String> {
    let config = vmd_config::parse_file(path).map_err(|e| e.to_string())?;
    for w in &config.warnings {
        log::warn!("{w}");
    }
    Ok(config)
}

/// The spec a definition starts with.
pub fn spec_of(def: &VmDef) -> Result<VmSpec, String> {
    let mut spec = VmSpec::from_request(&vmd_config::to_start_request(def))
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
