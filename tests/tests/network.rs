//! Networking end to end, all inside a network namespace the test makes
//! (vmd runs in it, so its TAPs and bridges do too): two VMs on a switch,
//! a local interface leased by the built-in DHCP server, a forging guest
//! on a locked interface, and start/stop cycles that leave nothing behind.
//! The guests are tests/guests/net.elf, which carries its own virtio-net
//! driver and answers ARP and ping.

use std::time::Duration;

use vmd_e2e::{guest, line_after, Daemon, NetNs};

const T: Duration = Duration::from_secs(90);

/// A VM running net.elf; it stays up (answering up to 100 pings) for at
/// most 5 minutes.
fn net_vm(name: &str, cmdline: &str, iface: &str, enable: bool) -> String {
    let kernel = guest("net.elf");
    let enable = if enable { "enable" } else { "disable" };
    format!(
        "vm {name} {{\n    boot \"{}\"\n    memory 32M\n    cmdline \"{cmdline} net.exit=100 net.timeout=300\"\n    {iface}\n    {enable}\n}}\n",
        kernel.display()
    )
}

#[test]
fn switch_dhcp_and_locked_lladdr() {
    let ns = NetNs::new("net");
    let dir = Daemon::dir_for("network");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("vm.conf");
    let sw = "interface { switch \"sw\" }";
    std::fs::write(
        &conf,
        format!(
            "staggered start parallel 4 delay 1\nswitch \"sw\" {{\n    interface vmdbr0\n}}\n{}{}{}{}",
            // a starts once b answers, then pings b across the switch.
            net_vm("a", "net.ip=10.77.0.2/24 net.ping=10.77.0.3 net.count=3", sw, false),
            net_vm("b", "net.ip=10.77.0.3/24", sw, true),
            net_vm(
                "forger",
                "net.ip=10.77.0.4/24 net.forge=1",
                "interface { switch \"sw\"; locked lladdr }",
                true,
            ),
            net_vm("l", "net.dhcp=1", "local interface", true),
        ),
    )
    .unwrap();
    let d = Daemon::start_in("network", Some(&ns), &["-f", conf.to_str().unwrap()]);
    for name in ["b", "forger", "l"] {
        d.wait_state(name, "running", T);
    }
    let b = d.console("b");
    b.wait_for("VMD-TEST net ready", T);
    d.ok(&["start", "a"]);
    d.wait_state("a", "running", T);
    let consoles: Vec<_> = ["a", "b", "forger", "l"]
        .iter()
        .map(|n| d.console(n))
        .collect();
    for c in &consoles[..3] {
        c.wait_for("VMD-TEST net ready", T);
    }
    // The switch is a bridge with each VM's TAP in it; the host joins it.
    let links = ns.links();
    assert!(links.iter().any(|l| l == "vmdbr0"), "no bridge: {links:?}");
    assert_eq!(
        links.iter().filter(|l| l.starts_with("tap")).count(),
        4,
        "{links:?}"
    );
    ns.run(&["ip", "addr", "add", "10.77.0.1/24", "dev", "vmdbr0"]);
    ns.run(&["ip", "link", "set", "vmdbr0", "up"]);
    // VM to VM across the switch, and the host to each VM.
    consoles[0].wait_for("VMD-TEST net ping 10.77.0.3 ok", T);
    assert!(ns.ping("10.77.0.2", 3), "host cannot ping VM a");
    assert!(ns.ping("10.77.0.3", 3), "host cannot ping VM b");
    // The forger answers, but from a MAC that is not its own: dropped.
    assert!(
        !ns.ping("10.77.0.4", 3),
        "a forging guest on a locked interface was reached"
    );

    // The local interface: a /31 from 100.64.0.0/10, leased by the VM
    // process's own DHCP server, and reachable from the host side.
    consoles[3].wait_for("VMD-TEST net lease ", T);
    let text = consoles[3].text();
    let lease = line_after(&text, "VMD-TEST net lease ").expect("lease line");
    let (addr, router) = lease.split_once(" router ").expect("router in lease");
    assert!(addr.starts_with("100.") && addr.ends_with("/31"), "{lease}");
    let guest_ip = addr.trim_end_matches("/31");
    consoles[3].wait_for("VMD-TEST net ready", T);
    assert!(
        ns.ping(guest_ip, 3),
        "host cannot ping the leased address {guest_ip} (router {router})"
    );

    d.ok(&["stop", "-a", "-f", "-w"]);
    let links = ns.links();
    assert!(
        !links.iter().any(|l| l.starts_with("tap")),
        "TAPs left after stop: {links:?}"
    );
}

#[test]
fn start_stop_cycles_leave_no_tap_bridge_or_fd() {
    let ns = NetNs::new("cycle");
    let dir = Daemon::dir_for("cycles");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("vm.conf");
    std::fs::write(&conf, "switch \"sw\" {\n    interface vmdcyc0\n}\n").unwrap();
    let mut d = Daemon::start_in("cycles", Some(&ns), &["-f", conf.to_str().unwrap()]);
    let idle = guest("idle.elf");
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let vmd_pid = d.pid();
    let mut baseline = None;
    for round in 0..20 {
        d.ok(&[
            "start",
            "-b",
            idle.to_str().unwrap(),
            "-m",
            "16M",
            "-n",
            "sw",
            "-L",
            "cyc",
        ]);
        d.wait_state("cyc", "running", T);
        assert_eq!(
            ns.links().iter().filter(|l| l.starts_with("tap")).count(),
            2
        );
        d.ok(&["stop", "-f", "-w", "cyc"]);
        // The VM entry (and its console pty) stays after the first round;
        // from then on nothing may grow once vmd has settled.
        match baseline {
            None => baseline = Some(fds(vmd_pid)),
            Some(b) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                while fds(vmd_pid) != b && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                assert_eq!(fds(vmd_pid), b, "vmd's fd count moved in round {round}");
            }
        }
        let links = ns.links();
        assert!(
            !links.iter().any(|l| l.starts_with("tap")),
            "round {round}: {links:?}"
        );
    }
    assert_eq!(
        vmd_e2e::children_of(vmd_pid).len(),
        2,
        "only priv and control remain"
    );
    assert_eq!(d.terminate(), Some(0));
    let links = ns.links();
    assert!(
        !links.iter().any(|l| l == "vmdcyc0"),
        "vmd left its bridge: {links:?}"
    );
    assert_eq!(links, ["lo"], "{links:?}");
}

/// OpenBSD's local addressing: VM N's interface I is host
/// prefix+N.(I+1)*2, guest +1 (vm_priv_addr), several `-L` per VM, and
/// under `local inet6` a /96 per interface with the guest's IPv4 address
/// inside, host ::1 and guest ::2 (vm_priv_addr6). The host pings the
/// guest over each interface, IPv4 and IPv6.
#[test]
fn local_interfaces_get_openbsds_addresses_v4_and_v6() {
    let ns = NetNs::new("local");
    let dir = Daemon::dir_for("local-addr");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("vm.conf");
    std::fs::write(&conf, "local inet6 prefix fd12:3456:789a:bcde::/64\n").unwrap();
    let d = Daemon::start_in("local-addr", Some(&ns), &["-f", conf.to_str().unwrap()]);
    let kernel = guest("net.elf");
    let kernel = kernel.to_str().unwrap();
    // The first VM of a fresh vmd is VM 1: interface 0 is 100.64.1.2/.3,
    // interface 1 100.64.1.4/.5.
    let cases = [
        (
            0,
            "100.64.1.2",
            "100.64.1.3",
            "fd12:3456:789a:bcde:6440:103:0:2",
        ),
        (
            1,
            "100.64.1.4",
            "100.64.1.5",
            "fd12:3456:789a:bcde:6440:105:0:2",
        ),
    ];
    for (nic, host, guest4, guest6) in cases {
        let expanded: Vec<String> = guest6
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .segments()
            .iter()
            .map(|g| format!("{g:x}"))
            .collect();
        let cmdline = format!(
            "net.dhcp=1 net.nic={nic} net.ip6={} net.exit=100 net.timeout=120",
            expanded.join(":")
        );
        d.ok(&[
            "start",
            "-b",
            kernel,
            "-m",
            "32M",
            "-L",
            "-L",
            "--cmdline",
            &cmdline,
            "loc",
        ]);
        // The console replays the earlier runs too: this run's lines are
        // the last ones.
        let console = d.console("loc");
        let deadline = std::time::Instant::now() + T;
        while console.count("VMD-TEST net ready") <= nic {
            assert!(std::time::Instant::now() < deadline, "{}", console.text());
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = console.text();
        let lease = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("VMD-TEST net lease "))
            .expect("lease line");
        assert_eq!(
            lease.trim(),
            format!("{guest4}/31 router {host}"),
            "nic {nic}"
        );
        // Two local TAPs, each with its own /31 and /96 on the host side.
        let addrs = ns.run(&["ip", "-o", "addr", "show"]);
        for want in [
            "inet 100.64.1.2/31",
            "inet 100.64.1.4/31",
            "inet6 fd12:3456:789a:bcde:6440:103:0:1/96",
            "inet6 fd12:3456:789a:bcde:6440:105:0:1/96",
        ] {
            assert!(addrs.contains(want), "no {want} in:\n{addrs}");
        }
        assert!(ns.ping(guest4, 3), "host cannot ping {guest4} (nic {nic})");
        let out = ns.exec(&["ping", "-6", "-c", "3", "-W", "2", "-i", "0.3", guest6]);
        assert!(
            out.status.success(),
            "host cannot ping6 {guest6} (nic {nic}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        d.ok(&["stop", "-f", "-w", "loc"]);
    }
}

/// vm.conf `group` becomes a Linux interface group (nftables `iifgroup`,
/// `ip link show group`) when iproute2's group file names it, and a group
/// it does not name is a warning with its place; `rdomain N` puts the
/// interface in the VRF of table N (on kernels with VRF support).
#[test]
fn groups_are_interface_groups_and_rdomains_are_vrfs() {
    vmd_e2e::users::iproute2_group(4243, "vmdtestgrp");
    let ns = NetNs::new("group");
    let dir = Daemon::dir_for("group");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("vm.conf");
    let kernel = guest("net.elf");
    std::fs::write(
        &conf,
        format!(
            "switch \"sw\" {{\n    interface vmdbrg0\n    group \"vmdtestgrp\"\n}}\n\
             vm \"g\" {{\n    boot \"{k}\"\n    memory 32M\n    cmdline \"net.ip=10.78.0.2/24 net.timeout=120\"\n    disable\n    interface {{ switch \"sw\" }}\n    local interface {{ group \"vmdnosuch\" }}\n}}\n\
             vm \"r\" {{\n    boot \"{k}\"\n    memory 32M\n    disable\n    local interface {{ rdomain 5 }}\n}}\n",
            k = kernel.display()
        ),
    )
    .unwrap();
    // vmd -n: the group the host has no number for is a warning there.
    let out = std::process::Command::new(vmd_e2e::bin("vmd"))
        .args(["-n", "-f"])
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let at = format!("{}:11:29: warning: group \"vmdnosuch\"", conf.display());
    assert!(err.contains(&at), "no {at} in:\n{err}");
    assert!(!err.contains("\"vmdtestgrp\" has no number"), "{err}");

    let mut d = Daemon::start_in("group", Some(&ns), &["-f", conf.to_str().unwrap()]);
    d.ok(&["start", "g"]);
    d.wait_state("g", "running", T);
    // The switch's TAP and its bridge are in the group, by name.
    let members = ns.run(&["ip", "-o", "link", "show", "group", "vmdtestgrp"]);
    assert_eq!(members.lines().count(), 2, "{members}");
    assert!(members.contains("vmdbrg0"), "{members}");
    assert!(members.contains(": tap"), "{members}");

    // reset switches forgets the switches; as on OpenBSD an interface
    // naming a switch that is not defined joins none, with a warning.
    d.ok(&["reset", "switches"]);
    let k = kernel.to_str().unwrap();
    d.ok(&[
        "start",
        "-b",
        k,
        "-m",
        "32M",
        "-n",
        "sw",
        "--cmdline",
        "net.ip=10.78.0.9/24",
        "nosw",
    ]);
    d.wait_log(
        "vm nosw: interface 0: switch sw not found, joining no switch",
        T,
    );
    let bridged = ns.run(&["ip", "-o", "link", "show", "master", "vmdbrg0"]);
    assert_eq!(bridged.lines().count(), 1, "only g's TAP: {bridged}");
    d.ok(&["stop", "-f", "-w", "nosw"]);

    // rdomain 5: a VRF for table 5, or a clear refusal where the kernel
    // has none.
    let out = d.vmctl(&["start", "r"]);
    if out.status.success() {
        d.wait_state("r", "running", T);
        let v = ns.run(&["ip", "-d", "link", "show", "vrf5"]);
        assert!(v.contains("vrf table 5"), "{v}");
        let r = ns.run(&["ip", "-4", "route", "show", "table", "5"]);
        assert!(r.contains("100.64."), "{r}");
        d.ok(&["stop", "-a", "-f", "-w"]);
        assert_eq!(d.terminate(), Some(0));
        assert!(!ns.links().iter().any(|l| l == "vrf5"), "VRF left behind");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no VRF support"), "{err}");
        vmd_e2e::skipped(
            "rdomain half of groups_are_interface_groups_and_rdomains_are_vrfs",
            "this kernel has no VRF support (CONFIG_NET_VRF)",
        );
    }
}
