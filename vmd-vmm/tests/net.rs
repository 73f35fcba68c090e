//! virtio-net end to end, driven by the freestanding `net` test guest
//! (tests/guests/net.c): the host pings a guest on a TAP, a local
//! interface's guest gets its lease from the built-in DHCP server, a guest
//! forging its source MAC on a locked interface reaches nobody, and two
//! guests on one bridge ping each other.
//!
//! Every test moves its own thread into a fresh network namespace
//! (unshare(CLONE_NEWNET) acts on the calling thread only; the `ip`
//! commands it runs are forked from that thread), so nothing here sees or
//! touches the host's interfaces. Needs root and /dev/kvm; says so loudly
//! and passes when either is missing.

mod common;

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{console, files, kvm, launch, Running};
use vmd_proto::vm::{DhcpLease, ExitReason, NicParams, VmmParams};
use vmd_tap::TAP_VNET_HDR_LEN;
use vmd_vmm::vm::TapFiles;
use vmd_vmm::{DevOptions, Outcome, VmFiles};

/// Moves this thread into a new network namespace with `lo` up.
fn netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    ip("link set lo up");
}

/// Runs `ip ARGS` in this thread's namespace.
fn ip(args: &str) {
    let st = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip");
    assert!(st.success(), "ip {args} failed");
}

/// A TAP as priv makes it: no packet info, a 12-byte vnet header.
fn tap(name: &str) -> OwnedFd {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes one ifreq.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert!(r >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let len = TAP_VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
    assert!(
        r >= 0,
        "TUNSETVNETHDRSZ: {}",
        std::io::Error::last_os_error()
    );
    f.into()
}

/// net.elf running.
struct Guest(Running);

impl Guest {
    /// Waits for a console line starting with `prefix`; returns it.
    fn wait_line(&self, prefix: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let out = self.0.output();
            // Whole lines only: the rest may still be arriving.
            let whole = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(l) = whole.lines().find(|l| l.starts_with(prefix)) {
                return l.to_string();
            }
            assert!(
                !out.contains("VMD-TEST error") && t.elapsed() < limit,
                "no line {prefix:?} after {:?}:\n{out}",
                t.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guest to power off; returns its console output.
    fn finish(self, limit: Duration) -> String {
        let (outcome, out) = self.0.finish(limit);
        assert_eq!(outcome, Outcome::Exited(ExitReason::PowerOff), "{out}");
        out
    }
}

/// Boots net.elf with one NIC on `tap`.
fn boot(kvm: OwnedFd, name: &str, tap: OwnedFd, nic: NicParams, cmdline: &str) -> Guest {
    let con = console();
    let kernel = common::project_guests().join("net.elf");
    let files = VmFiles {
        taps: vec![TapFiles::new(tap)],
        ..files(kvm, con.tty, &kernel)
    };
    let params = VmmParams {
        id: 5,
        nics: vec![nic],
        ..common::params(name, 1, cmdline)
    };
    Guest(launch(params, files, con.out, DevOptions::default()))
}

fn nic(mac: [u8; 6]) -> NicParams {
    NicParams {
        mac,
        locked: false,
        dhcp: None,
        boot_rom: false,
    }
}

fn mac_str(m: &[u8; 6]) -> String {
    vmd_proto::net::format_mac(m)
}

/// Sends `count` ICMP echo requests to `dst` from this thread's
/// namespace (raw socket), each waiting up to `wait`; returns how many
/// were answered.
fn ping(dst: Ipv4Addr, count: u16, wait: Duration) -> u16 {
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let id: u16 = 0x4242;
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_addr.s_addr = u32::from(dst).to_be();
    let mut answered = 0;
    for seq in 1..=count {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend((0..48).map(|i| i as u8));
        let c = icmp_csum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: sends `pkt` to the address in `sa`.
        let r = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert!(r >= 0, "sendto: {}", std::io::Error::last_os_error());
        let t = Instant::now();
        let mut buf = [0u8; 2048];
        while t.elapsed() < wait {
            // SAFETY: receives into `buf`.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let b = &buf[..n as usize];
            let ihl = usize::from(b[0] & 15) * 4;
            let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
            let Some(icmp) = b.get(ihl..ihl + 8) else {
                continue;
            };
            if src == dst
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                answered += 1;
                break;
            }
        }
    }
    answered
}

fn icmp_csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

const MAC_A: [u8; 6] = [0x02, 0x56, 0x4d, 0x44, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x56, 0x4d, 0x44, 0x00, 0x0b];
const BOOT: Duration = Duration::from_secs(30);

#[test]
fn host_pings_guest_and_guest_pings_host() {
    let Some(kvm) = kvm() else { return };
    netns();
    let t = tap("vt0");
    ip("addr add 10.9.0.1/24 dev vt0");
    ip("link set vt0 up");
    let g = boot(
        kvm,
        "n1",
        t,
        nic(MAC_A),
        "net.ip=10.9.0.2/24 net.ping=10.9.0.1 net.count=3 net.exit=3 net.timeout=40",
    );
    g.wait_line(
        &format!("VMD-TEST net ready 10.9.0.2 {}", mac_str(&MAC_A)),
        BOOT,
    );
    g.wait_line("VMD-TEST net ping 10.9.0.1 ok 3/3", BOOT);
    assert_eq!(
        ping("10.9.0.2".parse().unwrap(), 3, Duration::from_secs(3)),
        3
    );
    let out = g.finish(BOOT);
    assert!(out.contains("VMD-TEST net done answered=3"), "{out}");
}

#[test]
fn local_interface_gets_its_lease_from_the_builtin_dhcp_server() {
    let Some(kvm) = kvm() else { return };
    netns();
    let t = tap("vt1");
    ip("addr add 100.64.0.8/31 dev vt1");
    ip("link set vt1 up");
    let lease = DhcpLease {
        guest: "100.64.0.9".parse().unwrap(),
        host: "100.64.0.8".parse().unwrap(),
        prefix_len: 31,
        dns: None,
        boot_file: None,
    };
    let mut n = nic(MAC_A);
    n.dhcp = Some(lease);
    let g = boot(kvm, "n2", t, n, "net.dhcp=1 net.exit=3 net.timeout=40");
    let lease = g.wait_line("VMD-TEST net lease", BOOT);
    assert_eq!(lease, "VMD-TEST net lease 100.64.0.9/31 router 100.64.0.8");
    g.wait_line("VMD-TEST net ready 100.64.0.9", BOOT);
    assert_eq!(
        ping("100.64.0.9".parse().unwrap(), 3, Duration::from_secs(3)),
        3
    );
    g.finish(BOOT);
}

/// A guest sending from a forged MAC: on a locked interface the host never
/// hears it; unlocked, it does (so the first half can fail).
fn forged(locked: bool) -> u16 {
    let kvm = kvm().unwrap();
    netns();
    let t = tap("vt2");
    ip("addr add 10.9.2.1/24 dev vt2");
    ip("link set vt2 up");
    let mut n = nic(MAC_A);
    n.locked = locked;
    let g = boot(
        kvm,
        "n3",
        t,
        n,
        "net.ip=10.9.2.2/24 net.forge=1 net.exit=3 net.timeout=12",
    );
    g.wait_line("VMD-TEST net ready 10.9.2.2", BOOT);
    let got = ping("10.9.2.2".parse().unwrap(), 3, Duration::from_secs(2));
    g.finish(BOOT);
    got
}

#[test]
fn locked_interface_drops_forged_source_macs() {
    if kvm().is_none() {
        return;
    }
    assert_eq!(forged(true), 0, "a locked interface let forged frames out");
    assert_eq!(forged(false), 3, "unlocked, the forged guest should answer");
}

#[test]
fn two_guests_on_a_bridge() {
    let Some(kvm) = kvm() else { return };
    let kvm2 = common::kvm().unwrap();
    netns();
    ip("link add br0 type bridge");
    ip("addr add 10.9.3.1/24 dev br0");
    ip("link set br0 up");
    let ta = tap("vta");
    let tb = tap("vtb");
    for t in ["vta", "vtb"] {
        ip(&format!("link set {t} master br0"));
        ip(&format!("link set {t} up"));
    }
    // Each answers the host's 3 pings and the other's 3.
    let a = boot(
        kvm,
        "na",
        ta,
        nic(MAC_A),
        "net.ip=10.9.3.2/24 net.ping=10.9.3.3 net.exit=6 net.timeout=60",
    );
    let b = boot(
        kvm2,
        "nb",
        tb,
        nic(MAC_B),
        "net.ip=10.9.3.3/24 net.ping=10.9.3.2 net.exit=6 net.timeout=60",
    );
    a.wait_line("VMD-TEST net ping 10.9.3.3 ok 3/3", BOOT);
    b.wait_line("VMD-TEST net ping 10.9.3.2 ok 3/3", BOOT);
    assert_eq!(
        ping("10.9.3.2".parse().unwrap(), 3, Duration::from_secs(3)),
        3
    );
    assert_eq!(
        ping("10.9.3.3".parse().unwrap(), 3, Duration::from_secs(3)),
        3
    );
    a.finish(BOOT);
    b.finish(BOOT);
}

/// Not a test: guest-to-host and host-to-guest UDP throughput with the
/// test guest. `cargo test -p vmd-vmm --test net -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_throughput() {
    let Some(kvm) = kvm() else { return };
    let kvm2 = common::kvm().unwrap();
    netns();
    let t = tap("vtx");
    ip("addr add 10.9.4.1/24 dev vtx");
    ip("link set vtx up");
    let sink = std::net::UdpSocket::bind("10.9.4.1:5001").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let frames = 200_000u64;
    let g = boot(
        kvm,
        "btx",
        t,
        nic(MAC_A),
        &format!("net.ip=10.9.4.2/24 net.peer=10.9.4.1 net.port=5001 net.bench=tx:{frames} net.timeout=60"),
    );
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (mut n, mut bytes) = (0u64, 0u64);
        let t = Instant::now();
        // Until the guest has sent and gone quiet (it boots first).
        loop {
            match sink.recv(&mut buf) {
                Ok(len) => {
                    n += 1;
                    bytes += len as u64;
                }
                Err(_) if n == 0 && t.elapsed() < Duration::from_secs(60) => {}
                Err(_) => break,
            }
        }
        (n, bytes)
    });
    let line = g.wait_line("VMD-TEST net bench tx", Duration::from_secs(60));
    g.finish(BOOT);
    let (got, got_bytes) = counter.join().unwrap();
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (sent, bytes, cycles, khz) = (f[0], f[1], f[2], f[3]);
    let secs = cycles as f64 / (khz as f64 * 1000.0);
    println!(
        "guest->host: {sent} frames ({bytes} bytes) in {secs:.3} s: {:.1} Mbit/s, {:.0} frames/s offered; host socket got {got} datagrams ({got_bytes} payload bytes)",
        bytes as f64 * 8.0 / secs / 1e6,
        sent as f64 / secs
    );

    let t = tap("vrx");
    ip("addr add 10.9.5.1/24 dev vrx");
    ip("link set vrx up");
    let g = boot(
        kvm2,
        "brx",
        t,
        nic(MAC_B),
        "net.ip=10.9.5.2/24 net.bench=rx net.timeout=8",
    );
    g.wait_line("VMD-TEST net ready", BOOT);
    let src = std::net::UdpSocket::bind("10.9.5.1:0").unwrap();
    let payload = [0x5au8; 1472];
    // Resolve the guest's MAC before the clock starts.
    src.send_to(&payload, "10.9.5.2:9").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        if src.send_to(&payload, "10.9.5.2:9").is_ok() {
            sent += 1;
        }
    }
    let out = g.finish(Duration::from_secs(30));
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("VMD-TEST net bench rx"))
        .unwrap()
        .to_string();
    let f: Vec<u64> = last
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (frames, bytes) = (f[0], f[1]);
    println!(
        "host->guest: host sent {sent} datagrams in 3 s ({:.1} Mbit/s offered); guest received {frames} frames, {bytes} bytes: {:.1} Mbit/s over 3 s",
        sent as f64 * 1514.0 * 8.0 / 3.0 / 1e6,
        bytes as f64 * 8.0 / 3.0 / 1e6
    );
}
