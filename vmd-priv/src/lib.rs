//! The privileged helper: the one process that keeps root's powers.
//!
//! It serves the parent only. For each `PrivOpen` it opens one host file a
//! VM needs (or creates its TAP device) and sends the fd back; the VM
//! process never opens a host path. It also does the host side of VM
//! networking (`PrivIfConfig`: bridges, aliases, addresses, up/down) and
//! deletes the bridges it made at `PrivCleanup` or when the parent goes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::{debug, error, info, warn};
use vmd_disk::{self as image, Format, Lock, MAX_BACKING_DEPTH};
use vmd_proto::msg::Opener;
use vmd_proto::vm::OpenKind;
use vmd_proto::{Channel, ChannelError, Msg};

pub mod net;
mod netlink;
pub mod opener;

use opener::Want;

use net::NetState;

/// The KVM device every VM process gets an fd for.
pub const KVM_PATH: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: path must be absolute")]
    NotAbsolute { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotRegular { path: String },
    #[error("{path}: not a character device")]
    NotCharDevice { path: String },
    #[error("{path}: {reason}")]
    Image { path: String, reason: String },
    #[error("{path}: not a file (asked to open a network interface as one)")]
    NotAFile { path: String },
    /// The opener child could not do its work (fork, timeout, a bad answer).
    #[error("{path}: {reason}")]
    Opener { path: String, reason: String },
    /// The open failed with the namer's rights; `reason` names the path.
    #[error("{reason}")]
    Refused { reason: String },
}

/// Opens what `kind` names with `opener`'s rights (who named it, see
/// [`opener`]). Kernels, initrds, BIOS and option ROMs and CD-ROM images
/// are opened read-only and must be regular files; /dev/kvm, which vmd
/// itself names, must be the character device.
pub fn open_for_vm(kind: OpenKind, path: &str, opener: &Opener) -> Result<File, OpenError> {
    if !Path::new(path).is_absolute() {
        return Err(OpenError::NotAbsolute { path: path.into() });
    }
    match kind {
        OpenKind::Kvm => {
            let io = |source| OpenError::Io {
                path: path.to_string(),
                source,
            };
            if path != KVM_PATH {
                return Err(OpenError::NotCharDevice { path: path.into() });
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(io)?;
            if !file.metadata().map_err(io)?.file_type().is_char_device() {
                return Err(OpenError::NotCharDevice { path: path.into() });
            }
            Ok(file)
        }
        OpenKind::Disk { .. } => Err(OpenError::NotRegular { path: path.into() }),
        OpenKind::Tap { .. } | OpenKind::Interface => {
            Err(OpenError::NotAFile { path: path.into() })
        }
        OpenKind::Kernel | OpenKind::Initrd | OpenKind::OptionRom | OpenKind::Cdrom => {
            Ok(opener::open_as(opener, kind, path, Want::ReadOnly)?.0)
        }
    }
}

/// Opens a disk for a VM: the top image read-write (locked exclusively)
/// or read-only (locked shared) with `opener`'s rights, then each file of
/// its backing chain read-only, locked shared, with the rights of the
/// owner of the image that names it. A raw image has no backing chain.
pub fn open_disk(
    path: &str,
    read_only: bool,
    format: Format,
    opener: &Opener,
) -> Result<Vec<File>, OpenError> {
    if !Path::new(path).is_absolute() {
        return Err(OpenError::NotAbsolute { path: path.into() });
    }
    let want = Want::Image {
        write: !read_only,
        lock: if read_only {
            Lock::Shared
        } else {
            Lock::Exclusive
        },
        format,
    };
    let kind = OpenKind::Disk {
        index: 0,
        read_only,
        format,
    };
    let (top, mut found) = opener::open_as(opener, kind, path, want)?;
    let mut seen = vec![(found.dev, found.ino)];
    let mut files = vec![top];
    let mut cur = PathBuf::from(path);
    while let Some((name, format)) = found.backing.take() {
        let next = image::resolve_backing(&cur, &name);
        let image_err = |reason: String| OpenError::Image {
            path: cur.display().to_string(),
            reason,
        };
        if files.len() > MAX_BACKING_DEPTH {
            return Err(image_err(format!(
                "more than {MAX_BACKING_DEPTH} backing files (at {name:?})"
            )));
        }
        let Some(next_str) = next.to_str() else {
            return Err(image_err(format!("backing file {name:?} is not UTF-8")));
        };
        let owner = opener::owner_of(found.uid, found.gid);
        let want = Want::Image {
            write: false,
            lock: Lock::Shared,
            format,
        };
        let (file, below) = opener::open_as(&owner, kind, next_str, want)?;
        if seen.contains(&(below.dev, below.ino)) {
            return Err(image_err(format!(
                "backing file loop: {} is already in the chain",
                next.display()
            )));
        }
        seen.push((below.dev, below.ino));
        files.push(file);
        found = below;
        cur = next;
    }
    Ok(files)
}

/// One request's answer: the message and the files that travel with it.
type Answer = (Msg, Vec<File>);

/// Does what one request from the parent asks; every failure becomes a
/// `PrivFailed` naming what was asked. `None`: nothing to answer.
fn answer(net: &mut NetState, msg: Msg, vm: u32) -> Option<Answer> {
    let (kind, path, done): (OpenKind, String, Result<Answer, String>) = match msg {
        Msg::PrivOpen {
            kind:
                kind @ OpenKind::Disk {
                    index,
                    read_only,
                    format,
                },
            path,
            opener,
        } => {
            let done = open_disk(&path, read_only, format, &opener).map(|files| {
                let backing = (files.len() - 1) as u32;
                debug!("vm {vm}: opened disk {index} {path} (+{backing} backing)");
                (Msg::PrivOpenedDisk { index, backing }, files)
            });
            (kind, path, done.map_err(|e| e.to_string()))
        }
        Msg::PrivOpen {
            kind: kind @ OpenKind::Tap { index },
            path,
            opener: _,
        } => {
            let done = net.open_tap(&path).map(|(file, name)| {
                debug!("vm {vm}: created TAP {name} for interface {index}");
                (Msg::PrivOpenedTap { index, name }, vec![file])
            });
            (kind, path, done.map_err(|e| e.to_string()))
        }
        Msg::PrivOpen { kind, path, opener } => {
            let done = open_for_vm(kind, &path, &opener).map(|file| {
                debug!("vm {vm}: opened {kind:?} {path}");
                (Msg::PrivOpened { kind }, vec![file])
            });
            (kind, path, done.map_err(|e| e.to_string()))
        }
        Msg::PrivIfConfig {
            name,
            switch,
            group,
            up,
            host_addr,
            host_addr6,
            rdomain,
            ifgroup,
        } => {
            let cfg = net::IfConfig {
                switch: switch.as_ref(),
                group: group.as_deref(),
                ifgroup,
                rdomain,
                up,
                host_addr,
                host_addr6,
            };
            let done = net.configure(&name, &cfg).map(|()| {
                debug!("vm {vm}: configured {name}");
                (Msg::PrivIfDone { name: name.clone() }, Vec::new())
            });
            (OpenKind::Interface, name, done.map_err(|e| e.to_string()))
        }
        Msg::PrivCleanup => {
            let done = net.cleanup().map(|()| {
                let name = String::new();
                (Msg::PrivIfDone { name }, Vec::new())
            });
            (
                OpenKind::Interface,
                String::new(),
                done.map_err(|e| e.to_string()),
            )
        }
        Msg::SetVerbose { level } => {
            log::set_max_level(vmd_proto::log_filter(level));
            return None;
        }
        other => {
            error!("unexpected message type {}", other.type_code());
            return None;
        }
    };
    Some(done.unwrap_or_else(|reason| (Msg::PrivFailed { kind, path, reason }, Vec::new())))
}

/// Role entry point: serve the parent until it goes away. `sandbox` is
/// priv's row of the role table (`vmd_sandbox::PRIV`: root keeping only
/// CAP_DAC_OVERRIDE, CAP_SETUID, CAP_SETGID and CAP_NET_ADMIN, and only
/// its syscalls).
pub fn run(chan: Channel, sandbox: &vmd_sandbox::Sandbox) -> i32 {
    net::remove_leftover_bridges();
    let mut net = NetState::new();
    if let Err(e) = sandbox.enter(None) {
        error!("sandbox: {e}");
        return 1;
    }
    info!("ready");
    loop {
        let frame = match chan.recv() {
            Ok(frame) => frame,
            Err(ChannelError::Closed) => {
                debug!("parent closed the channel, exiting");
                // The parent died without PrivCleanup: still leave no
                // bridge of ours behind.
                if let Err(e) = net.cleanup() {
                    warn!("cleanup: {e}");
                }
                return 0;
            }
            Err(e) => {
                // Only the parent talks to us; a bad frame from it is a bug
                // worth stopping for rather than guessing.
                error!("{e}");
                return 1;
            }
        };
        let reply_to = frame.peer_id;
        let Some((reply, files)) = answer(&mut net, frame.msg, reply_to) else {
            continue;
        };
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let sent = chan.send(&reply, reply_to, &fds);
        if let Err(e) = sent {
            error!("reply to parent failed: {e}");
            return 1;
        }
    }
}
