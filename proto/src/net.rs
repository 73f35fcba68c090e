//! Network helpers shared by the parent, priv and the VM process: local
//! interface addresses and generated MACs (TAP ioctls are in `vmd-tap`).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::vm::MAX_NICS;

/// The /31 of `vm_id`'s interface `nic_index` inside the local prefix
/// `(addr, len)`: `(host, guest)`, computed as OpenBSD's vmd does
/// (priv.c, vm_priv_addr): the VM id fills the third octet and up
/// (`vm_id << 8`), the interface the last (`(index + 1) * 2`, skipping
/// the .0 subnet), the host side is the even address and the guest the
/// odd one. VM 9's first interface: host 100.64.9.2, guest 100.64.9.3.
/// `None` when the interface index is out of range or the address falls
/// outside the prefix's host bits (a VM id too high for it).
pub fn local_pair(
    (addr, len): (Ipv4Addr, u8),
    vm_id: u32,
    nic_index: u8,
) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if usize::from(nic_index) >= MAX_NICS {
        return None;
    }
    let mask = u32::from(prefix_mask(len)?);
    let base = u32::from(addr) & mask;
    let suffix = vm_id.checked_mul(1 << 8)? | ((u32::from(nic_index) + 1) * 2);
    // OpenBSD checks only that the result is still inside the prefix, so
    // an id whose bits overlap a prefix bit set there could collide with
    // another VM's; here the id must fit in the host bits.
    if (suffix | 1) & mask != 0 {
        return None;
    }
    let host = base | suffix;
    Some((Ipv4Addr::from(host), Ipv4Addr::from(host | 1)))
}

/// The IPv6 addresses of a local interface under `local inet6`, as
/// OpenBSD's vmd computes them (priv.c, vm_priv_addr6): the prefix's
/// address with the guest's IPv4 address in bytes 8 to 11 and 1 (host)
/// or 2 (guest) in the last byte, a /96 per interface. `(host, guest)`.
pub fn local_pair6(prefix: Ipv6Addr, guest4: Ipv4Addr) -> (Ipv6Addr, Ipv6Addr) {
    let mut bytes = prefix.octets();
    bytes[8..12].copy_from_slice(&guest4.octets());
    bytes[15] = 1;
    let host = Ipv6Addr::from(bytes);
    bytes[15] = 2;
    (host, Ipv6Addr::from(bytes))
}

/// The prefix length of each local interface's IPv6 subnet.
pub const LOCAL_PREFIX6_LEN: u8 = 96;

/// The netmask of a prefix length; `None` above 32.
pub fn prefix_mask(len: u8) -> Option<Ipv4Addr> {
    match len {
        0 => Some(Ipv4Addr::UNSPECIFIED),
        1..=32 => Some(Ipv4Addr::from(u32::MAX << (32 - u32::from(len)))),
        _ => None,
    }
}

/// A stable MAC for interface `index` of VM `vm_name` that has no
/// `lladdr`: fe:e1:ba plus three bytes of an FNV-1a hash of the name and
/// index. 0xfe has the locally-administered bit set and the multicast bit
/// clear. FNV rather than std's hasher because std's may change between
/// releases, and a guest's MAC must not. 24 bits make a clash between two
/// VMs on one switch unlikely (about 1 in 10^5 for 50 VMs), not impossible:
/// `lladdr` settles it.
pub fn generated_mac(vm_name: &str, index: u8) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm_name.bytes().chain([0, index]) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A 64-bit finalizer (murmur3's): FNV's low bytes mix short inputs
    // poorly, and names like vm1, vm2 differ only in their last byte.
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    let h = h ^ (h >> 33);
    [0xfe, 0xe1, 0xba, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Longest interface name (Linux's IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// An interface name we accept: 1..=15 bytes of letters, digits, '-', '_',
/// '.', and not "." or "..". Narrower than the kernel's rule on purpose:
/// no '/', ':', '%' or whitespace to trip up sysfs, aliases or templates.
pub fn valid_ifname(name: &str) -> bool {
    (1..=MAX_IFNAME_LEN).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

    #[test]
    fn local_pair_is_openbsds() {
        // OpenBSD: VM 9's first interface is 100.64.9.2 (host), .3 (guest).
        let pair = |vm, nic| local_pair(DEFAULT, vm, nic).unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(pair(9, 0), (ip("100.64.9.2"), ip("100.64.9.3")));
        assert_eq!(pair(9, 1), (ip("100.64.9.4"), ip("100.64.9.5")));
        assert_eq!(pair(1, 3), (ip("100.64.1.8"), ip("100.64.1.9")));
        assert_eq!(pair(300, 0), (ip("100.65.44.2"), ip("100.65.44.3")));
        // Host bits in the configured prefix are ignored.
        assert_eq!(
            local_pair((Ipv4Addr::new(100, 64, 1, 2), 10), 1, 0),
            local_pair(DEFAULT, 1, 0)
        );
    }

    #[test]
    fn local_pairs_are_distinct_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for vm in 0..256 {
            for nic in 0..MAX_NICS as u8 {
                let (h, g) = local_pair((Ipv4Addr::new(10, 0, 0, 0), 16), vm, nic).unwrap();
                assert_eq!(u32::from(g), u32::from(h) + 1);
                assert_eq!(u32::from(h) & 1, 0);
                assert_eq!(u32::from(h) >> 16, 0x0a00);
                assert!(seen.insert(h) && seen.insert(g), "vm {vm} nic {nic}");
            }
        }
    }

    #[test]
    fn local_pair_refuses_what_does_not_fit() {
        assert_eq!(local_pair(DEFAULT, 1, MAX_NICS as u8), None);
        // A /16 holds VM ids 0 to 255.
        let p16 = (Ipv4Addr::new(10, 1, 0, 0), 16);
        assert_eq!(
            local_pair(p16, 255, 3),
            Some(("10.1.255.8".parse().unwrap(), "10.1.255.9".parse().unwrap()))
        );
        assert_eq!(local_pair(p16, 256, 0), None);
        assert_eq!(local_pair(DEFAULT, u32::MAX, 3), None);
        // A /30 holds only vm 0's first interface.
        assert!(local_pair((Ipv4Addr::new(10, 0, 0, 4), 30), 0, 0).is_some());
        assert_eq!(local_pair((Ipv4Addr::new(10, 0, 0, 4), 30), 0, 1), None);
        assert_eq!(local_pair((Ipv4Addr::new(10, 0, 0, 0), 33), 0, 0), None);
    }

    #[test]
    fn local_pair6_is_openbsds() {
        let (_, g4) = local_pair(DEFAULT, 9, 0).unwrap();
        let prefix: Ipv6Addr = "fd12:3456:789a:bcde::".parse().unwrap();
        let (h, g) = local_pair6(prefix, g4);
        assert_eq!(
            h,
            "fd12:3456:789a:bcde:6440:903::1"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(
            g,
            "fd12:3456:789a:bcde:6440:903::2"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0), Some(Ipv4Addr::new(0, 0, 0, 0)));
        assert_eq!(prefix_mask(10), Some(Ipv4Addr::new(255, 192, 0, 0)));
        assert_eq!(prefix_mask(31), Some(Ipv4Addr::new(255, 255, 255, 254)));
        assert_eq!(prefix_mask(32), Some(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(prefix_mask(33), None);
    }

    #[test]
    fn generated_macs_are_stable_local_unicast_and_distinct() {
        let a = generated_mac("vm1", 0);
        assert_eq!(a, generated_mac("vm1", 0));
        assert_eq!(&a[..3], &[0xfe, 0xe1, 0xba]);
        assert_eq!(a[0] & 1, 0, "unicast");
        assert_eq!(a[0] & 2, 2, "locally administered");
        // Pinned: a guest's MAC must not change between vmd releases.
        assert_eq!(format_mac(&a), "fe:e1:ba:35:3e:af");
        let mut seen = std::collections::HashSet::new();
        for vm in 0..64 {
            for nic in 0..4 {
                assert!(seen.insert(generated_mac(&format!("vm{vm}"), nic)));
            }
        }
        // The index is not just appended text: "vm1"+1 differs from "vm11"+0.
        assert_ne!(generated_mac("vm1", 1), generated_mac("vm11", 0));
    }

    #[test]
    fn interface_names() {
        for ok in ["tap0", "br-vms", "a", "vm_1.x", "abcdefghijklmno"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "abcdefghijklmnop",
            "a/b",
            "a:b",
            "tap%d",
            "a b",
            "é",
        ] {
            assert!(!valid_ifname(bad), "{bad}");
        }
    }
}
