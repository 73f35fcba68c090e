//! The unprivileged user the control and VM processes run as.

use std::process::Command;

use log::info;
use nix::unistd::User;

use crate::options::VMD_USER;

/// Looks up `_vmd`, creating it as a system user (no home, no shell) when
/// it does not exist yet; returns its uid and gid.
pub fn ensure_vmd_user() -> Result<(u32, u32), String> {
    let lookup = || -> Result<Option<User>, String> {
        User::from_name(VMD_USER).map_err(|e| format!("looking up user {VMD_USER}: {e}"))
    };
    if let Some(user) = lookup()? {
        return checked(user);
    }
    info!("creating system user {VMD_USER}");
    let status = Command::new("useradd")
        .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
        .args(["--shell", "/usr/sbin/nologin", "--user-group", VMD_USER])
        .status()
        .map_err(|e| format!("useradd {VMD_USER}: {e}"))?;
    if !status.success() {
        return Err(format!("useradd {VMD_USER} failed: {status}"));
    }
    match lookup()? {
        Some(user) => checked(user),
        None => Err(format!("user {VMD_USER} still missing after useradd")),
    }
}

fn checked(user: User) -> Result<(u32, u32), String> {
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(format!("user {VMD_USER} must not have uid or gid 0"));
    }
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}
