//! Host network plumbing for VMs: TAP devices, Linux bridges for vm.conf
//! switches, interface state, aliases and the host side of local
//! interfaces. Everything acts in priv's network namespace.
//!
//! TAPs are created non-persistent: the kernel deletes one when the last fd
//! on it closes, so a VM's TAP goes away with its VM process, whatever way
//! that process ends. Bridges outlive their ports, so priv remembers the
//! ones it created and deletes them at cleanup.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use log::{debug, info, warn};
use vmd_proto::msg::SwitchParams;
use vmd_proto::net::{valid_ifname, MAX_IFNAME_LEN};
use vmd_tap::ifreq;

use crate::netlink::{self, NlError};

// Bridge ioctls, from linux/sockios.h (libc does not carry them).
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRDELBR: libc::c_ulong = 0x89a1;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "{name:?}: invalid interface name (1 to {MAX_IFNAME_LEN} letters, digits, '-', '_', '.')"
    )]
    BadName { name: String },
    #[error(
        "{name}: group {group:?} is longer than {} bytes",
        netlink::MAX_ALIAS_LEN
    )]
    BadGroup { name: String, group: String },
    #[error("{name}: invalid prefix length /{len}")]
    BadPrefix { name: String, len: u8 },
    #[error("{name}: {op}: {source}")]
    Os {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{name}: {op}: {source}")]
    Netlink {
        name: String,
        op: &'static str,
        #[source]
        source: NlError,
    },
    #[error("{0}")]
    Several(String),
}

fn os<'a>(name: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> NetError + 'a {
    move |source| NetError::Os {
        name: name.to_string(),
        op,
        source,
    }
}

fn nl<'a>(name: &'a str, op: &'static str) -> impl FnOnce(NlError) -> NetError + 'a {
    move |source| NetError::Netlink {
        name: name.to_string(),
        op,
        source,
    }
}

fn check_name(name: &str) -> Result<(), NetError> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(NetError::BadName { name: name.into() })
    }
}

/// A socket to issue interface ioctls on; it fixes the network namespace
/// they act in (the caller's).
fn ctl_socket(name: &str) -> Result<OwnedFd, NetError> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os(name, "socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// ioctl `req` with an ifreq on a fresh control socket.
fn ifreq_ioctl(
    name: &str,
    op: &'static str,
    req: libc::c_ulong,
    ifr: &mut libc::ifreq,
) -> Result<(), NetError> {
    let sock = ctl_socket(name)?;
    // SAFETY: every request used here reads or writes one struct ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, ifr as *mut libc::ifreq) } < 0 {
        return Err(os(name, op)(io::Error::last_os_error()));
    }
    Ok(())
}

/// The interface's index, or ENODEV. (SIOCGIFINDEX rather than libc's
/// if_nametoindex, so priv's syscalls stay the ones its filter lists.)
pub fn ifindex(name: &str) -> Result<u32, NetError> {
    check_name(name)?;
    let mut ifr = ifreq(name);
    ifreq_ioctl(name, "look up", libc::SIOCGIFINDEX, &mut ifr)?;
    // SAFETY: SIOCGIFINDEX filled the index member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_ifindex } as u32)
}

/// Whether an interface of that name exists.
pub fn interface_exists(name: &str) -> bool {
    ifindex(name).is_ok()
}

/// Creates a TAP device for a VM: named `name`, or the first free `tapN`
/// when `None`. Non-persistent (it vanishes with its last fd), no packet
/// info, with a 12-byte virtio-net header on every frame and no receive
/// offloads yet: the VM process turns on those its guest negotiates
/// (`vmd_tap::set_tap_offloads`). An existing interface of that
/// name is never taken over.
pub fn create_tap(name: Option<&str>) -> Result<(File, String), NetError> {
    let template = match name {
        Some(n) => {
            check_name(n)?;
            n
        }
        None => "tap%d",
    };
    vmd_tap::create(template).map_err(|e| NetError::Os {
        name: e.name,
        op: e.what,
        source: e.source,
    })
}

/// Brings an interface up or down.
pub fn set_up(name: &str, up: bool) -> Result<(), NetError> {
    check_name(name)?;
    let mut ifr = ifreq(name);
    ifreq_ioctl(name, "get flags", libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let want = if up {
        flags | libc::IFF_UP as libc::c_short
    } else {
        flags & !(libc::IFF_UP as libc::c_short)
    };
    if want == flags {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = want;
    ifreq_ioctl(
        name,
        if up { "bring up" } else { "bring down" },
        libc::SIOCSIFFLAGS,
        &mut ifr,
    )
}

/// Whether the interface is administratively up.
pub fn is_up(name: &str) -> Result<bool, NetError> {
    check_name(name)?;
    let mut ifr = ifreq(name);
    ifreq_ioctl(name, "get flags", libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0)
}

/// Creates bridge `name` unless an interface of that name exists. Returns
/// whether it was created (so only those get deleted at cleanup).
pub fn ensure_bridge(name: &str) -> Result<bool, NetError> {
    check_name(name)?;
    if interface_exists(name) {
        return Ok(false);
    }
    let c = CString::new(name).map_err(|_| NetError::BadName { name: name.into() })?;
    let sock = ctl_socket(name)?;
    // SAFETY: SIOCBRADDBR reads a NUL-terminated name.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDBR as _, c.as_ptr()) } < 0 {
        let e = io::Error::last_os_error();
        // Made between our check and now: someone else's, leave it be.
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(false);
        }
        return Err(os(name, "create bridge")(e));
    }
    Ok(true)
}

/// The mark on a bridge vmd made: an alternative name naming the vmd
/// (parent) process and the bridge, so that a later vmd can tell its own
/// leftovers (their vmd is gone) from anyone else's bridges (unmarked) and
/// from a live vmd's.
fn bridge_mark(vmd_pid: u32, bridge: &str) -> String {
    format!("vmd.{vmd_pid}.{bridge}")
}

/// Marks bridge `name` as made by vmd process `vmd_pid`.
fn mark_bridge(name: &str, vmd_pid: u32) -> Result<(), NetError> {
    let index = ifindex(name)?;
    let mark = bridge_mark(vmd_pid, name);
    netlink::add_altname(index, &mark).map_err(nl(name, "mark bridge"))
}

/// Deletes the bridges an earlier vmd made and left behind (it was killed
/// before it could clean up): marked, and their vmd process is gone. Runs
/// at priv's start, before the sandbox (a netlink dump may block).
pub fn remove_leftover_bridges() {
    let links = match netlink::links_with_altnames() {
        Ok(links) => links,
        Err(e) => return warn!("looking for leftover bridges: {e}"),
    };
    for (name, alts) in links {
        let owner = alts.iter().find_map(|a| {
            let (pid, bridge) = a.strip_prefix("vmd.")?.split_once('.')?;
            (bridge == name).then(|| pid.parse::<u32>().ok()).flatten()
        });
        let Some(pid) = owner else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "vmd" {
            continue;
        }
        match delete_bridge(&name) {
            Ok(()) => info!("deleted bridge {name}, left behind by vmd process {pid}"),
            Err(e) => warn!("leftover bridge {name}: {e}"),
        }
    }
}

/// Deletes bridge `name` (down first: the kernel refuses an up bridge).
pub fn delete_bridge(name: &str) -> Result<(), NetError> {
    check_name(name)?;
    set_up(name, false)?;
    let c = CString::new(name).map_err(|_| NetError::BadName { name: name.into() })?;
    let sock = ctl_socket(name)?;
    // SAFETY: SIOCBRDELBR reads a NUL-terminated name.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRDELBR as _, c.as_ptr()) } < 0 {
        return Err(os(name, "delete bridge")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes interface `port` a port of bridge `bridge`.
pub fn add_to_bridge(bridge: &str, port: &str) -> Result<(), NetError> {
    check_name(bridge)?;
    let index = ifindex(port)?;
    let mut ifr = ifreq(bridge);
    ifr.ifr_ifru.ifru_ifindex = index as libc::c_int;
    ifreq_ioctl(port, "add to bridge", SIOCBRADDIF, &mut ifr).map_err(|e| match e {
        NetError::Os { source, .. } => NetError::Os {
            name: port.to_string(),
            op: "add to bridge",
            source: io::Error::new(source.kind(), format!("{bridge}: {source}")),
        },
        e => e,
    })
}

/// Sets the interface's alias (`ip link show` prints it); an empty string
/// clears it. vm.conf groups land here by name, and as an interface group
/// number (`set_group`) when iproute2's group file names them.
pub fn set_alias(name: &str, alias: &str) -> Result<(), NetError> {
    if alias.len() > netlink::MAX_ALIAS_LEN || alias.contains('\0') {
        return Err(NetError::BadGroup {
            name: name.into(),
            group: alias.into(),
        });
    }
    let index = ifindex(name)?;
    netlink::set_alias(index, alias).map_err(nl(name, "set alias"))
}

/// Gives the interface `addr/prefix_len` (the host side of a local
/// interface: a /31).
pub fn set_ipv4(name: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<(), NetError> {
    if prefix_len > 32 {
        return Err(NetError::BadPrefix {
            name: name.into(),
            len: prefix_len,
        });
    }
    let index = ifindex(name)?;
    netlink::add_ipv4(index, addr, prefix_len).map_err(nl(name, "set address"))
}

/// Gives the interface the IPv6 address `addr/prefix_len` (the host side
/// of a local interface under `local inet6`: a /96).
pub fn set_ipv6(name: &str, addr: Ipv6Addr, prefix_len: u8) -> Result<(), NetError> {
    if prefix_len > 128 {
        return Err(NetError::BadPrefix {
            name: name.into(),
            len: prefix_len,
        });
    }
    let index = ifindex(name)?;
    netlink::add_ipv6(index, addr, prefix_len).map_err(nl(name, "set IPv6 address"))
}

/// Puts the interface in Linux interface group `group` (what nftables'
/// `iifgroup`/`oifgroup`, iptables' `devgroup` and `ip link ... group`
/// match; names come from iproute2's group file).
pub fn set_group(name: &str, group: u32) -> Result<(), NetError> {
    let index = ifindex(name)?;
    netlink::set_group(index, group).map_err(nl(name, "set group"))
}

/// The VRF device of routing table `table`, as vmd names it.
pub fn vrf_name(table: u32) -> String {
    format!("vrf{table}")
}

/// Linux's own routing tables (default, main, local), which a VRF may not
/// take.
const RESERVED_TABLES: [u32; 3] = [253, 254, 255];

/// How one TAP is set up: everything `PrivIfConfig` says about it.
#[derive(Debug, Default, Clone)]
pub struct IfConfig<'a> {
    /// The switch whose bridge the TAP joins.
    pub switch: Option<&'a SwitchParams>,
    /// The vm.conf group, as the interface's alias.
    pub group: Option<&'a str>,
    /// The group as a Linux interface group number.
    pub ifgroup: Option<u32>,
    /// `rdomain N` of a TAP on no switch: its VRF's table.
    pub rdomain: Option<u32>,
    pub up: bool,
    pub host_addr: Option<(Ipv4Addr, u8)>,
    pub host_addr6: Option<(Ipv6Addr, u8)>,
}

/// What priv remembers about the interfaces it made.
#[derive(Debug, Default)]
pub struct NetState {
    /// Bridges priv created (not those it found), deleted at cleanup.
    bridges: Vec<String>,
    /// VRF devices priv created (not those it found), deleted at cleanup
    /// after the bridges.
    vrfs: Vec<String>,
    /// TAPs priv created, to report any still present at cleanup.
    taps: Vec<String>,
    /// The vmd (parent) process, named in the mark of each bridge we make;
    /// read before the sandbox, which has no getppid.
    vmd_pid: u32,
}

impl NetState {
    pub fn new() -> NetState {
        NetState {
            vmd_pid: std::os::unix::process::parent_id(),
            ..NetState::default()
        }
    }

    /// The bridges priv created and has not deleted yet.
    pub fn created_bridges(&self) -> &[String] {
        &self.bridges
    }

    /// Creates a TAP: `requested` names it, empty means the next `tapN`.
    pub fn open_tap(&mut self, requested: &str) -> Result<(File, String), NetError> {
        let (file, name) = create_tap((!requested.is_empty()).then_some(requested))?;
        // Forget TAPs that went away with their VM, so the list stays short.
        self.taps.retain(|t| interface_exists(t));
        self.taps.push(name.clone());
        Ok((file, name))
    }

    /// Configures a VM's TAP `name`: joins its switch (the bridge created
    /// when missing, put in the switch's VRF, given the switch's group as
    /// alias and interface group, brought up or down), or else goes into
    /// its own VRF (`rdomain`); takes its group as alias and interface
    /// group, gets its host addresses, and goes up or down last, when
    /// everything else is in place. VRFs come before addresses: joining
    /// one moves the interface's routes into the VRF's table.
    pub fn configure(&mut self, name: &str, cfg: &IfConfig<'_>) -> Result<(), NetError> {
        check_name(name)?;
        if let Some(sw) = cfg.switch {
            if ensure_bridge(&sw.bridge)? {
                debug!("created bridge {}", sw.bridge);
                self.bridges.push(sw.bridge.clone());
                // Unmarked, a leftover is never deleted by a later vmd;
                // the VM still runs.
                if let Err(e) = mark_bridge(&sw.bridge, self.vmd_pid) {
                    warn!("{e}");
                }
            }
            if let Some(table) = sw.rdomain {
                self.join_vrf(&sw.bridge, table)?;
            }
            if let Some(g) = &sw.group {
                set_alias(&sw.bridge, g)?;
            }
            if let Some(id) = sw.ifgroup {
                set_group(&sw.bridge, id)?;
            }
            set_up(&sw.bridge, sw.up)?;
            add_to_bridge(&sw.bridge, name)?;
        } else if let Some(table) = cfg.rdomain {
            self.join_vrf(name, table)?;
        }
        if let Some(g) = cfg.group {
            set_alias(name, g)?;
        }
        if let Some(id) = cfg.ifgroup {
            set_group(name, id)?;
        }
        if let Some((addr, len)) = cfg.host_addr {
            set_ipv4(name, addr, len)?;
        }
        if let Some((addr, len)) = cfg.host_addr6 {
            set_ipv6(name, addr, len)?;
        }
        set_up(name, cfg.up)
    }

    /// Puts interface `name` in the VRF of routing table `table` (OpenBSD's
    /// rdomain), creating the VRF device when missing; rdomain 0 is the
    /// main table, where every interface already is.
    pub fn join_vrf(&mut self, name: &str, table: u32) -> Result<(), NetError> {
        if table == 0 {
            return Ok(());
        }
        let vrf = vrf_name(table);
        if RESERVED_TABLES.contains(&table) {
            return Err(NetError::Os {
                name: name.into(),
                op: "rdomain",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("routing table {table} is Linux's own"),
                ),
            });
        }
        if !interface_exists(&vrf) {
            netlink::new_vrf(&vrf, table).map_err(|e| match e {
                NlError::Os(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => NetError::Os {
                    name: vrf.clone(),
                    op: "create VRF",
                    source: io::Error::new(
                        err.kind(),
                        "this kernel has no VRF support (CONFIG_NET_VRF)",
                    ),
                },
                e => nl(&vrf, "create VRF")(e),
            })?;
            debug!("created {vrf} for routing table {table}");
            self.vrfs.push(vrf.clone());
        }
        set_up(&vrf, true)?;
        let master = ifindex(&vrf)?;
        netlink::set_master(ifindex(name)?, master).map_err(nl(name, "join VRF"))
    }

    /// The VRF devices priv created and has not deleted yet.
    pub fn created_vrfs(&self) -> &[String] {
        &self.vrfs
    }

    /// Deletes every bridge priv created; TAPs need nothing (each goes with
    /// its last fd), but any still present are named in the log. Tries
    /// every bridge, then reports all failures at once.
    pub fn cleanup(&mut self) -> Result<(), NetError> {
        let mut failed = Vec::new();
        for bridge in std::mem::take(&mut self.bridges) {
            match delete_bridge(&bridge) {
                Ok(()) => debug!("deleted bridge {bridge}"),
                Err(e) => failed.push(e.to_string()),
            }
        }
        for vrf in std::mem::take(&mut self.vrfs) {
            let deleted =
                ifindex(&vrf).and_then(|i| netlink::delete_link(i).map_err(nl(&vrf, "delete VRF")));
            match deleted {
                Ok(()) => debug!("deleted {vrf}"),
                Err(e) => failed.push(e.to_string()),
            }
        }
        for tap in std::mem::take(&mut self.taps) {
            if interface_exists(&tap) {
                // Still held open by a process; the kernel deletes it when
                // that fd closes, and priv cannot delete a non-persistent
                // TAP in use.
                warn!("{tap}: still open by a VM process at cleanup");
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(NetError::Several(failed.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        assert!(matches!(
            create_tap(Some("tap%d")),
            Err(NetError::BadName { .. })
        ));
        let mut st = NetState::new();
        let e = st.configure("../x", &IfConfig::default()).unwrap_err();
        assert!(e.to_string().contains("../x"), "{e}");
        let sw = SwitchParams {
            bridge: "x".repeat(16),
            group: None,
            up: true,
            rdomain: None,
            ifgroup: None,
        };
        let cfg = IfConfig {
            switch: Some(&sw),
            up: true,
            ..IfConfig::default()
        };
        assert!(matches!(
            st.configure("tap0", &cfg),
            Err(NetError::BadName { .. })
        ));
        assert!(st.created_bridges().is_empty());
    }
}
