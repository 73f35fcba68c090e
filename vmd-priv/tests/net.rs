//! priv's network plumbing against the real kernel. Each test moves its own
//! thread into a fresh network namespace first (unshare(CLONE_NEWNET) acts
//! on the calling thread only), so it sees only `lo` and whatever it
//! creates; nothing touches the host's interfaces and nothing leaves the
//! machine. `ip` runs as a child of that thread, in the same namespace.

use std::io::Read;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use vmd_priv::net::{self, IfConfig, NetError, NetState};
use vmd_proto::msg::SwitchParams;
use vmd_tap::{set_tap_offloads, tap_info, TapOffloads, TAP_VNET_HDR_LEN};

/// Enters a fresh network namespace; false (test skipped) when not root.
fn fresh_netns() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: not root");
        return false;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    // Proof we are not in the host's namespace before doing anything.
    let links = ip(&["-o", "link", "show"]);
    assert_eq!(
        links.lines().count(),
        1,
        "fresh netns has only lo:\n{links}"
    );
    assert!(links.contains(": lo:"), "{links}");
    true
}

/// Runs `ip ARGS` and returns its stdout; panics if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -d link show dev NAME`, or None when there is no such interface.
fn link(name: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-d", "link", "show", "dev", name])
        .output()
        .expect("run ip");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_admin_up(name: &str) -> bool {
    let l = link(name).expect("interface exists");
    // The flags list: "<BROADCAST,MULTICAST,UP,LOWER_UP>".
    let flags = l
        .split('<')
        .nth(1)
        .and_then(|s| s.split('>').next())
        .unwrap_or("");
    flags.split(',').any(|f| f == "UP")
}

fn switch(bridge: &str, group: Option<&str>, up: bool) -> SwitchParams {
    SwitchParams {
        bridge: bridge.into(),
        group: group.map(Into::into),
        up,
        rdomain: None,
        ifgroup: None,
    }
}

#[test]
fn tap_by_name_and_auto_named_and_gone_with_its_fd() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (named, name) = st.open_tap("vmdtest0").unwrap();
    assert_eq!(name, "vmdtest0");
    let d = link("vmdtest0").unwrap();
    assert!(d.contains("tun type tap"), "{d}");
    assert!(d.contains("pi off"), "{d}");
    assert!(d.contains("vnet_hdr on"), "{d}");
    assert!(d.contains("persist off"), "{d}");

    // Empty name: the first free tapN, each time a new one.
    let (auto0, a0) = st.open_tap("").unwrap();
    let (auto1, a1) = st.open_tap("").unwrap();
    assert_eq!((a0.as_str(), a1.as_str()), ("tap0", "tap1"));

    // An existing name is never taken over.
    let e = st.open_tap("vmdtest0").unwrap_err();
    assert!(e.to_string().starts_with("vmdtest0: create TAP"), "{e}");
    ip(&["link", "add", "otherbr", "type", "bridge"]);
    let e = st.open_tap("otherbr").unwrap_err();
    assert!(e.to_string().starts_with("otherbr: create TAP"), "{e}");
    assert!(link("otherbr").unwrap().contains("bridge forward_delay"));

    // The VM process's fd is the last one: closing it deletes the TAP.
    drop(named);
    assert!(link("vmdtest0").is_none(), "TAP outlived its fd");
    assert!(!net::interface_exists("vmdtest0"));
    drop(auto0);
    assert!(link("tap0").is_none());
    assert!(link("tap1").is_some());
    drop(auto1);
    assert!(link("tap1").is_none());
    // And the name can be used again.
    let (_again, n) = st.open_tap("vmdtest0").unwrap();
    assert_eq!(n, "vmdtest0");
}

#[test]
fn bad_requested_names_are_refused() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    for bad in ["tap%d", "a/b", "0123456789abcdef", "x y"] {
        assert!(
            matches!(st.open_tap(bad), Err(NetError::BadName { .. })),
            "{bad}"
        );
    }
}

#[test]
fn switch_creates_bridge_attaches_tap_sets_group_and_cleanup_removes_it() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (_t1, tap1) = st.open_tap("vmdt1").unwrap();
    let (_t2, tap2) = st.open_tap("vmdt2").unwrap();
    let sw = switch("vmdbr0", Some("uplink"), true);
    st.configure(
        &tap1,
        &IfConfig {
            switch: Some(&sw),
            group: Some("vms"),
            up: true,
            ..IfConfig::default()
        },
    )
    .unwrap();
    let b = link("vmdbr0").expect("bridge created");
    assert!(b.contains("bridge forward_delay"), "{b}");
    assert!(b.contains("alias uplink"), "{b}");
    assert!(is_admin_up("vmdbr0"));
    let t = link(&tap1).unwrap();
    assert!(t.contains("master vmdbr0"), "{t}");
    assert!(t.contains("alias vms"), "{t}");
    assert!(is_admin_up(&tap1));
    assert_eq!(st.created_bridges(), ["vmdbr0".to_string()]);

    // A second VM on the same switch: the bridge is reused, not re-made.
    st.configure(
        &tap2,
        &IfConfig {
            switch: Some(&sw),
            up: false,
            ..IfConfig::default()
        },
    )
    .unwrap();
    assert!(link(&tap2).unwrap().contains("master vmdbr0"));
    assert!(!is_admin_up(&tap2));
    assert_eq!(st.created_bridges().len(), 1);

    // A bridge that was there before is used and left alone at cleanup.
    ip(&["link", "add", "hostbr", "type", "bridge"]);
    let (_t3, tap3) = st.open_tap("vmdt3").unwrap();
    st.configure(
        &tap3,
        &IfConfig {
            switch: Some(&switch("hostbr", None, false)),
            up: true,
            ..IfConfig::default()
        },
    )
    .unwrap();
    assert!(link(&tap3).unwrap().contains("master hostbr"));
    assert!(!is_admin_up("hostbr"));
    assert_eq!(st.created_bridges().len(), 1);

    st.cleanup().unwrap();
    assert!(link("vmdbr0").is_none(), "created bridge left behind");
    assert!(link("hostbr").is_some(), "found bridge deleted");
    assert!(st.created_bridges().is_empty());
    // The TAPs survive their bridge (their VMs still hold them), unbridged.
    assert!(!link(&tap1).unwrap().contains("master"));
}

#[test]
fn switch_down_and_group_cleared() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (_t, tap) = st.open_tap("").unwrap();
    st.configure(
        &tap,
        &IfConfig {
            switch: Some(&switch("vmdbr1", None, false)),
            group: Some("g1"),
            up: true,
            ..IfConfig::default()
        },
    )
    .unwrap();
    assert!(!is_admin_up("vmdbr1"));
    assert!(link(&tap).unwrap().contains("alias g1"));
    net::set_alias(&tap, "").unwrap();
    assert!(!link(&tap).unwrap().contains("alias"));
    assert!(matches!(
        net::set_alias(&tap, &"x".repeat(256)),
        Err(NetError::BadGroup { .. })
    ));
    // Cleanup deletes a bridge that is down too, and is idempotent.
    st.cleanup().unwrap();
    assert!(link("vmdbr1").is_none());
    st.cleanup().unwrap();
}

#[test]
fn local_interface_host_side_gets_its_slash_31() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (mut tap_fd, tap) = st.open_tap("").unwrap();
    let (host, guest) =
        vmd_proto::net::local_pair((Ipv4Addr::new(100, 64, 0, 0), 10), 1, 0).unwrap();
    st.configure(
        &tap,
        &IfConfig {
            up: true,
            host_addr: Some((host, 31)),
            ..IfConfig::default()
        },
    )
    .unwrap();
    let a = ip(&["-o", "-4", "addr", "show", "dev", &tap]);
    assert!(a.contains(&format!("inet {host}/31")), "{a}");
    // Configuring again (a VM restart) replaces rather than fails.
    st.configure(
        &tap,
        &IfConfig {
            up: true,
            host_addr: Some((host, 31)),
            ..IfConfig::default()
        },
    )
    .unwrap();
    let a = ip(&["-o", "-4", "addr", "show", "dev", &tap]);
    assert_eq!(a.lines().count(), 1, "{a}");
    let r = ip(&["-4", "route", "show", "dev", &tap]);
    assert!(r.contains(&format!("{host}/31")), "{r}");

    // Traffic to the guest side goes out on the TAP: the kernel ARPs for
    // it, and the frame reaches the fd behind a 12-byte virtio-net header.
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.send_to(b"hello", (guest, 9)).unwrap();
    nix::fcntl::fcntl(
        tap_fd.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    let arp = loop {
        assert!(Instant::now() < deadline, "no ARP request on the TAP");
        match tap_fd.read(&mut buf) {
            Ok(n) => {
                let eth = &buf[TAP_VNET_HDR_LEN..n];
                if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] {
                    break eth.to_vec();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("read TAP: {e}"),
        }
    };
    // ARP request: sender IP is the host side, target the guest side.
    assert_eq!(&arp[28..32], &host.octets());
    assert_eq!(&arp[38..42], &guest.octets());
}

#[test]
fn offloads_and_tap_info_work_on_the_fd() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (fd, tap) = st.open_tap("vmdoff0").unwrap();
    let (name, mac) = tap_info(fd.as_fd()).unwrap();
    assert_eq!(name, tap);
    let shown = vmd_proto::net::format_mac(&mac);
    assert!(link(&tap).unwrap().contains(&shown), "{shown}");
    let all = TapOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };
    set_tap_offloads(fd.as_fd(), all).unwrap();
    set_tap_offloads(fd.as_fd(), TapOffloads::default()).unwrap();
}

#[test]
fn errors_name_the_interface() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let e = st
        .configure(
            "nosuch0",
            &IfConfig {
                up: true,
                ..IfConfig::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("nosuch0: "), "{e}");
    // A switch whose "bridge" is an existing non-bridge interface.
    let (_t0, not_bridge) = st.open_tap("notabridge").unwrap();
    let (_t, tap) = st.open_tap("").unwrap();
    let e = st
        .configure(
            &tap,
            &IfConfig {
                switch: Some(&switch(&not_bridge, None, true)),
                up: true,
                ..IfConfig::default()
            },
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&tap) && msg.contains("notabridge"), "{msg}");
    assert!(st.created_bridges().is_empty());
    let e = net::set_ipv4(&tap, Ipv4Addr::new(10, 0, 0, 1), 33).unwrap_err();
    assert!(matches!(e, NetError::BadPrefix { .. }), "{e}");
    let e = net::delete_bridge("nosuch1").unwrap_err();
    assert!(e.to_string().starts_with("nosuch1: "), "{e}");
}

/// vm.conf `group` becomes a Linux interface group (what nftables'
/// iifgroup matches) on the TAP and on the switch's bridge.
#[test]
fn groups_become_interface_groups() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (_t, tap) = st.open_tap("").unwrap();
    let mut sw = switch("vmdbrg", Some("uplink"), true);
    sw.ifgroup = Some(77);
    let cfg = IfConfig {
        switch: Some(&sw),
        group: Some("vms"),
        ifgroup: Some(4242),
        up: true,
        ..IfConfig::default()
    };
    st.configure(&tap, &cfg).unwrap();
    // `ip -d link` prints "group N" (or the name iproute2's file gives it).
    let l = link(&tap).unwrap();
    assert!(l.contains(" group 4242 "), "{l}");
    assert!(l.contains("alias vms"), "{l}");
    let b = link("vmdbrg").unwrap();
    assert!(b.contains(" group 77 "), "{b}");
    // Filters select by it.
    let members = ip(&["-o", "link", "show", "group", "4242"]);
    assert_eq!(members.lines().count(), 1, "{members}");
    assert!(members.contains(&tap), "{members}");
    st.cleanup().unwrap();
}

/// rdomain N: the TAP (or a switch's bridge) goes into the VRF of routing
/// table N, created when missing and deleted at cleanup; one that was
/// there already is used and left alone. Kernels without VRF support
/// (CONFIG_NET_VRF) get a clear error, and this test says SKIPPED.
#[test]
fn rdomain_puts_the_interface_in_a_vrf() {
    if !fresh_netns() {
        return;
    }
    let mut st = NetState::new();
    let (_t, tap) = st.open_tap("").unwrap();
    let cfg = IfConfig {
        rdomain: Some(7),
        up: true,
        host_addr: Some(("100.64.1.2".parse().unwrap(), 31)),
        ..IfConfig::default()
    };
    if let Err(e) = st.configure(&tap, &cfg) {
        let text = e.to_string();
        assert!(text.contains("no VRF support"), "{text}");
        assert!(st.created_vrfs().is_empty());
        use std::io::Write;
        let _ = std::io::stderr().write_all(
            b"\n*** SKIPPED rdomain_puts_the_interface_in_a_vrf: this kernel has no VRF support ***\n",
        );
        return;
    }
    let v = link("vrf7").expect("VRF created");
    assert!(v.contains("vrf table 7"), "{v}");
    assert!(link(&tap).unwrap().contains("master vrf7"));
    // The host side's route lives in table 7, not main.
    let r = ip(&["-4", "route", "show", "table", "7"]);
    assert!(r.contains("100.64.1.2/31"), "{r}");
    assert_eq!(st.created_vrfs(), ["vrf7".to_string()]);
    // A switch's rdomain moves its bridge, with its ports.
    let (_t2, tap2) = st.open_tap("").unwrap();
    let mut sw = switch("vmdbrv", None, true);
    sw.rdomain = Some(7);
    let cfg = IfConfig {
        switch: Some(&sw),
        up: true,
        ..IfConfig::default()
    };
    st.configure(&tap2, &cfg).unwrap();
    assert!(link("vmdbrv").unwrap().contains("master vrf7"));
    assert_eq!(st.created_vrfs().len(), 1);
    // Linux's own tables are refused.
    let cfg = IfConfig {
        rdomain: Some(254),
        ..IfConfig::default()
    };
    assert!(st.configure(&tap, &cfg).is_err());
    st.cleanup().unwrap();
    assert!(link("vrf7").is_none(), "created VRF left behind");
}
