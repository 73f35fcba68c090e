//! TAP device ioctls, in one place for the two processes that issue them:
//! priv creates a VM's TAPs ([`create`], needs CAP_NET_ADMIN), the VM
//! process tunes the one it was handed ([`set_tap_offloads`]) and reads its
//! name and MAC ([`tap_info`]), which needs no privilege. Its own crate because
//! priv and the VM process never link each other, and these are not wire
//! protocol. The ioctls go through vmm-sys-util's typed helpers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Size of the virtio-net header on the TAP (`struct virtio_net_hdr_v1`,
/// with `num_buffers`), as priv sets it with TUNSETVNETHDRSZ.
pub const TAP_VNET_HDR_LEN: usize = 12;

/// Offloads the kernel may use on frames it hands the VM process through
/// the TAP (TUNSETOFFLOAD). The VM process turns on only those the guest
/// negotiated: a guest that did not accept partial checksums or TSO must
/// never receive such frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TapOffloads {
    /// Partial checksums (VIRTIO_NET_F_GUEST_CSUM).
    pub csum: bool,
    /// TCP segmentation for IPv4 (VIRTIO_NET_F_GUEST_TSO4), needs `csum`.
    pub tso4: bool,
    /// TCP segmentation for IPv6 (VIRTIO_NET_F_GUEST_TSO6), needs `csum`.
    pub tso6: bool,
    /// TSO with ECN (VIRTIO_NET_F_GUEST_ECN).
    pub ecn: bool,
}

impl TapOffloads {
    fn bits(self) -> libc::c_uint {
        let mut bits = 0;
        if self.csum {
            bits |= libc::TUN_F_CSUM;
            if self.tso4 {
                bits |= libc::TUN_F_TSO4;
            }
            if self.tso6 {
                bits |= libc::TUN_F_TSO6;
            }
            if (self.tso4 || self.tso6) && self.ecn {
                bits |= libc::TUN_F_TSO_ECN;
            }
        }
        bits
    }
}

/// An `ifreq` naming `name` (truncated to what fits, as the kernel would).
pub fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

/// The interface name an `ifreq` holds.
pub fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Why [`create`] failed: the step, and the interface it was for.
#[derive(Debug)]
pub struct CreateError {
    /// The requested template or, after TUNSETIFF, the created name.
    pub name: String,
    pub what: &'static str,
    pub source: io::Error,
}

/// Creates a TAP device from `template` (a name, or a pattern like
/// `tap%d` for the first free one): non-persistent (it vanishes with its
/// last fd), no packet info, a [`TAP_VNET_HDR_LEN`]-byte virtio-net header
/// on every frame and no receive offloads yet. IFF_TUN_EXCL: an existing
/// interface of that name is never taken over. Returns the TAP and its
/// name.
pub fn create(template: &str) -> Result<(File, String), CreateError> {
    let fail = |name: &str, what: &'static str| {
        let name = name.to_owned();
        move |source| CreateError { name, what, source }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(fail(template, "open /dev/net/tun"))?;
    let mut ifr = ifreq(template);
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `ifr` is.
    if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(fail(template, "create TAP")(io::Error::last_os_error()));
    }
    let created = ifreq_name(&ifr);
    let hdr_len = TAP_VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the reference.
    if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(fail(&created, "set virtio-net header size")(
            io::Error::last_os_error(),
        ));
    }
    set_tap_offloads(&file, TapOffloads::default()).map_err(fail(&created, "clear offloads"))?;
    Ok((file, created))
}

/// Sets the TAP's receive offloads. Needs no privilege: it acts on the
/// device the fd is attached to. Fails (EINVAL) where the kernel does not
/// support a flag, so callers can fall back to fewer.
pub fn set_tap_offloads(tap: impl AsFd, offloads: TapOffloads) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is read.
    let r = unsafe {
        ioctl_with_val(
            &tap.as_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(offloads.bits()),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name and MAC of the interface a TAP fd is attached to (TUNGETIFF,
/// SIOCGIFHWADDR on the tun fd itself, so no socket is needed). The MAC is
/// the host side's: the built-in DHCP server answers from it.
pub fn tap_info(tap: impl AsFd) -> io::Result<(String, [u8; 6])> {
    let tap = tap.as_fd();
    let mut ifr = ifreq("");
    // SAFETY: both ioctls write at most one struct ifreq into `ifr`.
    if unsafe { ioctl_with_mut_ref(&tap, libc::TUNGETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let name = ifreq_name(&ifr);
    // SAFETY: as above.
    if unsafe { ioctl_with_mut_ref(&tap, libc::SIOCGIFHWADDR, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, &c) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = c as u8;
    }
    Ok((name, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_bits_follow_dependencies() {
        let all = TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
        };
        assert_eq!(all.bits(), 0x0f);
        assert_eq!(TapOffloads { csum: false, ..all }.bits(), 0);
        assert_eq!(
            TapOffloads {
                tso4: false,
                tso6: false,
                ..all
            }
            .bits(),
            libc::TUN_F_CSUM
        );
    }
}
