//! The fds that come with `VmmStart`, split by what they are.

use std::os::fd::{AsFd, OwnedFd};

use vmd_proto::vm::{VmmFd, VmmParams};
use vmd_proto::Channel;
use vmd_tap::tap_info;

use super::VmError;

/// The fds that come with `VmmStart`, in their order.
#[derive(Debug)]
pub struct VmFiles {
    /// /dev/kvm, opened read-write.
    pub kvm: OwnedFd,
    /// The console: a pty slave in raw mode.
    pub tty: OwnedFd,
    /// The kernel image, read-only.
    pub kernel: OwnedFd,
    /// The initrd, read-only, when `has_initrd`.
    pub initrd: Option<OwnedFd>,
    /// One entry per `VmmParams::disks`, in guest order.
    pub disks: Vec<DiskFiles>,
    /// The CD-ROM image, read-only, when `VmmParams::cdrom`.
    pub cdrom: Option<OwnedFd>,
    /// One TAP per `VmmParams::nics`, in guest order.
    pub taps: Vec<TapFiles>,
    /// Channels to the device processes, one per disk, CD-ROM and nic in
    /// that order (`VmmParams::device_count`). Without them (tests), the
    /// backends for `disks`, `cdrom` and `taps` run on threads of this
    /// process instead, served the same way.
    pub devices: Vec<Channel>,
    /// The network boot ROM (iPXE), read-only, when a nic has `boot_rom`.
    pub option_rom: Option<OwnedFd>,
}

/// A NIC's TAP fd, and the MAC of the host side of the TAP (the built-in
/// DHCP server answers from it). The MAC is read here, before the sandbox
/// forbids the ioctls that tell it.
#[derive(Debug)]
pub struct TapFiles {
    pub fd: OwnedFd,
    pub host_mac: Option<[u8; 6]>,
}

impl TapFiles {
    pub fn new(fd: OwnedFd) -> TapFiles {
        let host_mac = match tap_info(fd.as_fd()) {
            Ok((_, mac)) => Some(mac),
            Err(e) => {
                log::warn!("TAP fd: cannot read its interface's MAC: {e}");
                None
            }
        };
        TapFiles { fd, host_mac }
    }
}

/// A disk's fds: the top image, then its backing files top down.
#[derive(Debug)]
pub struct DiskFiles {
    pub top: OwnedFd,
    pub backing: Vec<OwnedFd>,
}

impl VmFiles {
    /// Splits the fds that came with `VmmStart` (see
    /// `VmmParams::fd_count` for their order): the images and TAPs are
    /// with the device processes; here come the channels to them.
    pub fn from_fds(fds: Vec<OwnedFd>, params: &VmmParams) -> Result<VmFiles, VmError> {
        let expected = params.fd_count();
        let got = fds.len();
        if got != expected {
            return Err(VmError::FdCount { expected, got });
        }
        // Taken apart by the same description the parent sent by.
        let (mut kvm, mut tty, mut kernel, mut initrd, mut option_rom) =
            (None, None, None, None, None);
        let mut devices = Vec::with_capacity(params.device_count());
        for (what, fd) in params.fds().into_iter().zip(fds) {
            match what {
                VmmFd::Kvm => kvm = Some(fd),
                VmmFd::Console => tty = Some(fd),
                VmmFd::Kernel => kernel = Some(fd),
                VmmFd::Initrd => initrd = Some(fd),
                VmmFd::Device(_) => devices.push(Channel::from_fd(fd)),
                VmmFd::OptionRom => option_rom = Some(fd),
            }
        }
        let missing = || VmError::FdCount { expected, got };
        Ok(VmFiles {
            kvm: kvm.ok_or_else(missing)?,
            tty: tty.ok_or_else(missing)?,
            kernel: kernel.ok_or_else(missing)?,
            initrd,
            disks: Vec::new(),
            cdrom: None,
            taps: Vec::new(),
            devices,
            option_rom,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsFd, AsRawFd};

    use vmd_proto::vm::{DiskParams, NicParams};

    use super::*;

    fn params(initrd: bool, disks: usize, nics: usize, rom: bool) -> VmmParams {
        VmmParams {
            id: 1,
            name: "t".into(),
            memory: 16 << 20,
            vcpus: 1,
            cmdline: String::new(),
            has_initrd: initrd,
            uid: 1,
            gid: 1,
            verbose: false,
            disks: vec![
                DiskParams {
                    format: vmd_proto::vm::DiskFormat::Raw,
                    read_only: false,
                    backing: 3,
                };
                disks
            ],
            nics: (0..nics)
                .map(|i| NicParams {
                    mac: [2, 0, 0, 0, 0, i as u8],
                    locked: false,
                    dhcp: None,
                    boot_rom: rom && i == 0,
                })
                .collect(),
            cdrom: false,
            boot_device: None,
        }
    }

    fn fds(n: usize) -> (Vec<OwnedFd>, Vec<i32>) {
        let fds: Vec<OwnedFd> = (0..n)
            .map(|_| File::open("/dev/null").unwrap().into())
            .collect();
        let raw = fds.iter().map(|f| f.as_raw_fd()).collect();
        (fds, raw)
    }

    #[test]
    fn fds_are_taken_in_their_order() {
        // kvm, tty, kernel, initrd, a channel per disk and nic, the ROM:
        // a disk's backing files are not the vmm's.
        let p = params(true, 2, 1, true);
        assert_eq!(p.fd_count(), 4 + 3 + 1);
        let (all, raw) = fds(p.fd_count());
        let f = VmFiles::from_fds(all, &p).unwrap();
        assert_eq!(f.kvm.as_raw_fd(), raw[0]);
        assert_eq!(f.tty.as_raw_fd(), raw[1]);
        assert_eq!(f.kernel.as_raw_fd(), raw[2]);
        assert_eq!(f.initrd.as_ref().map(|i| i.as_raw_fd()), Some(raw[3]));
        let chans: Vec<i32> = f.devices.iter().map(|c| c.as_fd().as_raw_fd()).collect();
        assert_eq!(chans, raw[4..7]);
        assert_eq!(f.option_rom.as_ref().map(|r| r.as_raw_fd()), Some(raw[7]));
        assert!(f.disks.is_empty() && f.taps.is_empty() && f.cdrom.is_none());
    }

    #[test]
    fn a_wrong_number_of_fds_is_refused() {
        let p = params(false, 1, 0, false);
        for n in [3, 5] {
            let (all, _) = fds(n);
            let err = VmFiles::from_fds(all, &p).unwrap_err();
            assert!(
                matches!(err, VmError::FdCount { expected: 4, got } if got == n),
                "{err}"
            );
        }
    }
}
