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
use std::path::Path;

use log::{debug, error, info, warn};
use vmd_disk::{self as image, Format, ImageError};
use vmd_proto::vm::OpenKind;
use vmd_proto::{Channel, ChannelError, Msg};

pub mod net;
mod netlink;

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
}

/// Opens what `kind` names. Kernels and initrds are opened read-only and
/// must be regular files; /dev/kvm must be the character device.
pub fn open_for_vm(kind: OpenKind, path: &str) -> Result<File, OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_string(),
        source,
    };
    if !Path::new(path).is_absolute() {
        return Err(OpenError::NotAbsolute { path: path.into() });
    }
    match kind {
        OpenKind::Kvm => {
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
        // An ISO image: read-only, like a kernel.
        OpenKind::Cdrom => open_for_vm(OpenKind::Kernel, path),
        OpenKind::Tap { .. } | OpenKind::Interface => {
            Err(OpenError::NotAFile { path: path.into() })
        }
        OpenKind::Kernel | OpenKind::Initrd | OpenKind::OptionRom => {
            // O_NONBLOCK so a FIFO planted at the path cannot hang us
            // before the regular-file check.
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(path)
                .map_err(io)?;
            if !file.metadata().map_err(io)?.is_file() {
                return Err(OpenError::NotRegular { path: path.into() });
            }
            Ok(file)
        }
    }
}

/// Opens a disk for a VM: the top image read-write (or read-only) and
/// locked exclusively, so two VMs never write one image, then each file of
/// its backing chain read-only. With `format` given as raw the image is
/// never parsed for a backing chain.
pub fn open_disk(
    path: &str,
    read_only: bool,
    format: Option<Format>,
) -> Result<Vec<File>, OpenError> {
    let image_err = |e: ImageError| OpenError::Image {
        path: path.to_string(),
        reason: e.to_string(),
    };
    let io = |source| OpenError::Io {
        path: path.to_string(),
        source,
    };
    if !Path::new(path).is_absolute() {
        return Err(OpenError::NotAbsolute { path: path.into() });
    }
    let top = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = top.metadata().map_err(io)?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(OpenError::NotRegular { path: path.into() });
    }
    if !read_only {
        image::lock_exclusive(&top, Path::new(path)).map_err(image_err)?;
    }
    let format = match format {
        Some(f) => f,
        None => image::detect_format(&top).map_err(image_err)?,
    };
    let mut files = vec![top];
    if format == Format::Qcow2 {
        for backing in image::backing_chain(Path::new(path)).map_err(image_err)? {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(&backing)
                .map_err(|source| OpenError::Io {
                    path: backing.display().to_string(),
                    source,
                })?;
            files.push(file);
        }
    }
    Ok(files)
}

/// priv stays root to open root-owned files, but keeps only
/// CAP_DAC_OVERRIDE (open images and kernels whatever their mode) and
/// CAP_NET_ADMIN (TAP devices and bridges), and only its syscalls.
fn sandbox() -> Result<(), vmd_sandbox::SandboxError> {
    use vmd_sandbox::Capability;
    vmd_sandbox::keep_only_caps(&[Capability::CAP_DAC_OVERRIDE, Capability::CAP_NET_ADMIN])?;
    // One request at a time: a disk's backing chain at most.
    vmd_sandbox::limit_resources(256)?;
    vmd_sandbox::apply_seccomp(vmd_sandbox::Role::Priv)
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
        } => {
            let done = open_disk(&path, read_only, format).map(|files| {
                let backing = (files.len() - 1) as u32;
                debug!("vm {vm}: opened disk {index} {path} (+{backing} backing)");
                (Msg::PrivOpenedDisk { index, backing }, files)
            });
            (kind, path, done.map_err(|e| e.to_string()))
        }
        Msg::PrivOpen {
            kind: kind @ OpenKind::Tap { index },
            path,
        } => {
            let done = net.open_tap(&path).map(|(file, name)| {
                debug!("vm {vm}: created TAP {name} for interface {index}");
                (Msg::PrivOpenedTap { index, name }, vec![file])
            });
            (kind, path, done.map_err(|e| e.to_string()))
        }
        Msg::PrivOpen { kind, path } => {
            let done = open_for_vm(kind, &path).map(|file| {
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

/// Role entry point: serve the parent until it goes away.
pub fn run(chan: Channel) -> i32 {
    if let Err(e) = sandbox() {
        error!("sandbox: {e}");
        return 1;
    }
    info!("ready");
    let mut net = NetState::new();
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
