//! Building a backend's device model from its parameters and fds, in one
//! place for both the device processes and vmd-vmm's in-process tests.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::net::dhcp::DhcpServer;
use vmd_disk::open_disk;
use vmd_proto::net::{format_mac, generated_mac};
use vmd_proto::stats::SharedCounters;
use vmd_proto::vm::DevKind;
use vmd_tap::tap_info;

use super::block::{self, VirtioBlk};
use super::net::VirtioNet;
use super::scsi::VirtioScsi;
use super::VirtioDevice;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("expected {expected} fds, got {got}")]
    FdCount { expected: usize, got: usize },
    #[error("disk {index}: {err}")]
    Disk {
        index: u32,
        err: vmd_disk::ImageError,
    },
    #[error("cdrom image: {0}")]
    Cdrom(io::Error),
    #[error("interface {index}: {err}")]
    Nic { index: u32, err: io::Error },
}

/// The model for `kind` over `fds` (as `DevStart` carries them, less the
/// channel): a disk's top image and backing files, the ISO, or the TAP.
pub fn open(
    vm_name: &str,
    kind: &DevKind,
    fds: Vec<OwnedFd>,
    counters: Option<SharedCounters>,
) -> Result<Box<dyn VirtioDevice>, ModelError> {
    let expected = match kind {
        DevKind::Block { disk, .. } => 1 + disk.backing as usize,
        DevKind::Scsi | DevKind::Net { .. } => 1,
    };
    if fds.len() != expected {
        return Err(ModelError::FdCount {
            expected,
            got: fds.len(),
        });
    }
    let mut fds = fds.into_iter().map(File::from);
    // Checked above: there is a first fd.
    let Some(first) = fds.next() else {
        return Err(ModelError::FdCount { expected, got: 0 });
    };
    Ok(match kind {
        DevKind::Block { index, disk } => {
            let d = open_disk(first, fds.collect(), disk.read_only, disk.format)
                .map_err(|err| ModelError::Disk { index: *index, err })?;
            log::info!(
                "disk {index}: {} bytes{}",
                d.size(),
                if disk.read_only { ", read-only" } else { "" }
            );
            let id = block::serial(vm_name, *index as usize);
            Box::new(VirtioBlk::new(d, id, disk.read_only).with_counters(counters))
        }
        DevKind::Scsi => {
            let size = first.metadata().map_err(ModelError::Cdrom)?.len();
            log::info!("cdrom: {size} bytes, read-only");
            Box::new(VirtioScsi::new(first, size))
        }
        DevKind::Net { index, nic } => {
            let dhcp = nic.dhcp.clone().map(|lease| {
                // Without the TAP's MAC, answer from a stable local one.
                let server_mac = match tap_info(first.as_fd()) {
                    Ok((_, mac)) => mac,
                    Err(e) => {
                        log::warn!("TAP: cannot read its interface's MAC: {e}");
                        generated_mac(vm_name, 0x80 | *index as u8)
                    }
                };
                DhcpServer::new(nic.mac, server_mac, lease, Some(vm_name.to_string()))
            });
            log::info!(
                "interface {index}: {}{}{}",
                format_mac(&nic.mac),
                if nic.locked { ", locked" } else { "" },
                if nic.dhcp.is_some() {
                    ", local (dhcp)"
                } else {
                    ""
                }
            );
            let net = VirtioNet::new(first, nic.mac, nic.locked, dhcp)
                .map_err(|err| ModelError::Nic { index: *index, err })?;
            Box::new(net)
        }
    })
}
