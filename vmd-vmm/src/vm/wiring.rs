//! Device wiring: each virtio device's backend (a device process's
//! channel, or a thread here), its PCI function and transport.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmd_proto::vm::{DevKind, VmmParams};
use vmd_proto::Channel;

use crate::arch::x86_64::layout::{PORT_PCI_CONFIG_ADDRESS, PORT_PCI_CONFIG_DATA};
use crate::bus::Bus;
use crate::devices::virtio::backend;
use crate::devices::virtio::model::{self};
use crate::devices::virtio::pci::{spawn_worker, SharedRam, TransportError, VirtioPci, Worker};
use crate::devices::virtio::remote::{DeviceLink, INFO_TIMEOUT};
use crate::devices::virtio::rng::VirtioRng;
use crate::devices::virtio::VirtioDevice;
use crate::lifecycle::ExitSignal;
use crate::pci::irq::GsiRouter;
use crate::pci::{intx_gsi, ConfigAddress, ConfigData, HostBridge, PciError, PciRoot};

use super::build::shared;
use super::{lock, DiskFiles, TapFiles, VmError};

/// Every virtio device's backend, in PCI slot order (disks, CD-ROM, nics,
/// then rng): its name and the transport's end of its channel. With
/// `devices` (the daemon) those are the device processes' channels;
/// without (vmd-vmm's tests) the backends for the local files run on
/// threads here. virtio-rng always runs on a thread here: it parses
/// nothing.
pub(super) fn backends(
    params: &VmmParams,
    devices: Vec<Channel>,
    disks: Vec<DiskFiles>,
    cdrom: Option<OwnedFd>,
    taps: Vec<TapFiles>,
) -> Result<Vec<(String, Channel)>, VmError> {
    let kinds = params.device_kinds();
    let mut out = Vec::new();
    if !devices.is_empty() {
        if devices.len() != kinds.len() {
            return Err(VmError::DeviceCount(kinds.len(), devices.len()));
        }
        out.extend(kinds.iter().map(DevKind::name).zip(devices));
    } else {
        if disks.len() != params.disks.len() {
            return Err(VmError::DiskCount(params.disks.len(), disks.len()));
        }
        if taps.len() != params.nics.len() {
            return Err(VmError::NicCount(params.nics.len(), taps.len()));
        }
        // Each kind's fds, in the order of `device_kinds`.
        let mut local: Vec<Vec<OwnedFd>> = disks
            .into_iter()
            .map(|f| std::iter::once(f.top).chain(f.backing).collect())
            .collect();
        local.extend(cdrom.map(|fd| vec![fd]));
        local.extend(taps.into_iter().map(|t| vec![t.fd]));
        if local.len() != kinds.len() {
            return Err(VmError::DeviceCount(kinds.len(), local.len()));
        }
        for (kind, fds) in kinds.into_iter().zip(local) {
            let name = kind.name();
            let m = model::open(&params.name, &kind, fds, None).map_err(|err| VmError::Model {
                name: name.clone(),
                err,
            })?;
            let chan = spawn_backend(&name, m)?;
            out.push((name, chan));
        }
    }
    out.push((
        "rng".into(),
        spawn_backend("rng", Box::new(VirtioRng::new()))?,
    ));
    Ok(out)
}

/// A backend on a thread of this process; the thread ends with the
/// channel.
fn spawn_backend(name: &str, model: Box<dyn VirtioDevice>) -> Result<Channel, VmError> {
    let (chan, _thread) =
        backend::spawn_local(name, model).map_err(|e| VmError::Io("virtio backend thread", e))?;
    Ok(chan)
}

/// The names of a VM's device processes, in the order of their channels:
/// `blk0`.., `cdrom`, `net0`.. (also their process titles).
pub fn device_names(params: &VmmParams) -> Vec<String> {
    params.device_kinds().iter().map(DevKind::name).collect()
}

/// PCI bus 0 on the port bus and one virtio function per backend, each
/// with its transport's I/O thread. Every backend describes itself first:
/// the device processes started together, so this waits for the slowest
/// one only.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn add_pci_devices(
    params: &VmmParams,
    backends: Vec<(String, Channel)>,
    bridge: HostBridge,
    vm: &Arc<VmFd>,
    ram: &SharedRam<'_>,
    exit: &Arc<ExitSignal>,
    pio: &Bus,
    mmio: &Arc<Bus>,
) -> Result<(Vec<Worker>, Option<usize>, Option<usize>), VmError> {
    let root = Arc::new(Mutex::new(PciRoot::with_bridge(mmio.clone(), bridge)));
    pio.insert(
        u64::from(PORT_PCI_CONFIG_ADDRESS),
        1,
        shared(ConfigAddress(root.clone())),
    )?;
    pio.insert(
        u64::from(PORT_PCI_CONFIG_DATA),
        4,
        shared(ConfigData(root.clone())),
    )?;
    let router = GsiRouter::new(vm.clone());
    // The interface the VM boots from, if any.
    let boot_nic = params
        .nics
        .iter()
        .position(|n| n.boot_rom)
        .map(|i| format!("net{i}"));
    let mut boot_slot = None;
    // The disk or CD-ROM the firmware boots (`boot device`), if any.
    let boot_drive = match params.boot_device {
        Some(vmd_proto::vm::BootDevice::Disk) => Some("blk0"),
        Some(vmd_proto::vm::BootDevice::Cdrom) => Some("cdrom"),
        _ => None,
    };
    let mut drive_slot = None;
    let mut workers = Vec::new();
    for (name, chan) in backends {
        let verr = |err| VmError::Virtio {
            name: name.clone(),
            err,
        };
        let link = DeviceLink::connect(&name, chan, INFO_TIMEOUT)
            .map_err(|e| verr(TransportError::Link(e)))?;
        let mut r = lock(&root);
        let slot = r.next_slot().ok_or(PciError::BusFull)?;
        if boot_nic.as_ref() == Some(&name) {
            boot_slot = Some(slot);
        }
        if boot_drive == Some(name.as_str()) {
            drive_slot = Some(slot);
        }
        let dev = VirtioPci::new(link, ram, &router, intx_gsi(slot), exit.clone()).map_err(verr)?;
        let dev = Arc::new(Mutex::new(dev));
        r.add(dev.clone(), dev.clone())?;
        drop(r);
        log::debug!("virtio {name} at 00:{slot:02x}.0");
        workers.push(spawn_worker(dev).map_err(|e| VmError::Io("virtio I/O thread", e))?);
    }
    Ok((workers, boot_slot, drive_slot))
}

#[cfg(test)]
mod tests {
    use vmd_proto::vm::{DiskParams, NicParams};

    use super::*;

    fn params(disks: usize, cdrom: bool, nics: usize) -> VmmParams {
        VmmParams {
            id: 1,
            name: "t".into(),
            memory: 16 << 20,
            vcpus: 1,
            cmdline: String::new(),
            has_initrd: false,
            uid: 1,
            gid: 1,
            verbose: false,
            disks: vec![
                DiskParams {
                    format: vmd_proto::vm::DiskFormat::Raw,
                    read_only: false,
                    backing: 0,
                };
                disks
            ],
            nics: vec![
                NicParams {
                    mac: [2, 0, 0, 0, 0, 1],
                    locked: false,
                    dhcp: None,
                    boot_rom: false,
                };
                nics
            ],
            cdrom,
            boot_device: None,
        }
    }

    #[test]
    fn devices_are_named_in_channel_and_slot_order() {
        assert_eq!(
            device_names(&params(2, true, 2)),
            ["blk0", "blk1", "cdrom", "net0", "net1"]
        );
        assert!(device_names(&params(0, false, 0)).is_empty());
    }

    #[test]
    fn device_channels_must_match_the_devices() {
        let p = params(1, false, 1);
        let one = vec![Channel::pair().unwrap().0];
        let err = backends(&p, one, Vec::new(), None, Vec::new()).unwrap_err();
        assert!(matches!(err, VmError::DeviceCount(2, 1)), "{err}");
        // Without channels, the local files must match too.
        let err = backends(&p, Vec::new(), Vec::new(), None, Vec::new()).unwrap_err();
        assert!(matches!(err, VmError::DiskCount(1, 0)), "{err}");
    }

    #[test]
    fn a_vm_without_devices_gets_only_rng_on_a_thread() {
        let got = backends(
            &params(0, false, 0),
            Vec::new(),
            Vec::new(),
            None,
            Vec::new(),
        )
        .unwrap();
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["rng"]);
    }

    #[test]
    fn a_device_that_says_nothing_fails_the_build_in_time() {
        // A device process that never describes itself: the link gives up
        // rather than leave the VM process waiting.
        let (ours, _theirs) = Channel::pair().unwrap();
        let err = DeviceLink::connect("blk0", ours, std::time::Duration::from_millis(50));
        assert!(err.is_err());
    }
}
