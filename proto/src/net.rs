//! Network helpers shared by the parent, priv and the VM process: local
//! interface addresses and generated MACs (TAP ioctls are in `vmd-tap`).

use std::net::Ipv4Addr;

use crate::vm::MAX_NICS;

/// The /31 of `vm_id`'s interface `nic_index` inside the local prefix
/// `(addr, len)`: `(host, guest)`, the host side being the even address.
///
/// Each (vm id, interface) pair owns /31 number `vm_id * MAX_NICS +
/// nic_index`, so two VMs, or two interfaces of one VM, never share one,
/// and a VM gets the same addresses every time it starts (as OpenBSD's vmd
/// derives them from the VM id and interface index). `None` when the
/// interface index is out of range, the prefix is longer than /30, or the
/// prefix has no room for this VM.
pub fn local_pair(
    (addr, len): (Ipv4Addr, u8),
    vm_id: u32,
    nic_index: u8,
) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if usize::from(nic_index) >= MAX_NICS || len > 30 {
        return None;
    }
    let base = u32::from(addr) & u32::from(prefix_mask(len)?);
    let slot = u64::from(vm_id) * MAX_NICS as u64 + u64::from(nic_index);
    let slots = 1u64 << (31 - len);
    if slot >= slots {
        return None;
    }
    // slot < 2^(31-len), so 2 * slot fits in the host part.
    let host = base | (2 * slot) as u32;
    Some((Ipv4Addr::from(host), Ipv4Addr::from(host | 1)))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

    #[test]
    fn local_pair_is_a_slash_31_inside_the_prefix() {
        let (h, g) = local_pair(DEFAULT, 1, 0).unwrap();
        assert_eq!(h, Ipv4Addr::new(100, 64, 0, 8));
        assert_eq!(g, Ipv4Addr::new(100, 64, 0, 9));
        let (h, g) = local_pair(DEFAULT, 1, 3).unwrap();
        assert_eq!(
            (h, g),
            (
                "100.64.0.14".parse().unwrap(),
                "100.64.0.15".parse().unwrap()
            )
        );
        // Host bits in the configured prefix are ignored.
        assert_eq!(
            local_pair((Ipv4Addr::new(100, 64, 1, 2), 10), 1, 0),
            local_pair(DEFAULT, 1, 0)
        );
    }

    #[test]
    fn local_pairs_are_distinct_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for vm in 0..300 {
            for nic in 0..MAX_NICS as u8 {
                let (h, g) = local_pair((Ipv4Addr::new(10, 0, 0, 0), 16), vm, nic).unwrap();
                assert_eq!(u32::from(g), u32::from(h) + 1);
                assert_eq!(u32::from(h) & 1, 0);
                assert_eq!(u32::from(h) >> 16, 0x0a00);
                assert!(seen.insert(h) && seen.insert(g), "vm {vm} nic {nic}");
                assert_eq!(
                    local_pair((Ipv4Addr::new(10, 0, 0, 0), 16), vm, nic),
                    Some((h, g))
                );
            }
        }
    }

    #[test]
    fn local_pair_refuses_what_does_not_fit() {
        assert_eq!(local_pair(DEFAULT, 1, MAX_NICS as u8), None);
        assert_eq!(local_pair((Ipv4Addr::new(10, 0, 0, 0), 31), 0, 0), None);
        // A /16 holds 2^15 /31s: 8192 VMs of four interfaces.
        let p16 = (Ipv4Addr::new(10, 1, 0, 0), 16);
        assert_eq!(
            local_pair(p16, 8191, 3),
            Some((
                "10.1.255.254".parse().unwrap(),
                "10.1.255.255".parse().unwrap()
            ))
        );
        assert_eq!(local_pair(p16, 8192, 0), None);
        assert_eq!(local_pair(p16, u32::MAX, 3), None);
        // A /30 has two /31s: only vm 0's first interfaces fit.
        assert!(local_pair((Ipv4Addr::new(10, 0, 0, 4), 30), 0, 1).is_some());
        assert_eq!(local_pair((Ipv4Addr::new(10, 0, 0, 4), 30), 0, 2), None);
        assert!(local_pair((Ipv4Addr::new(0, 0, 0, 0), 0), (1 << 29) - 1, 3).is_some());
        assert_eq!(local_pair((Ipv4Addr::new(0, 0, 0, 0), 0), 1 << 29, 0), None);
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
}
