//! The DHCP/BOOTP server of a `local interface`. It runs inside the VM's
//! own process, needs no privilege and no socket: it looks at the Ethernet
//! frames the guest sends and builds the answer frame to hand the guest,
//! for exactly one client (the guest's MAC) and one lease.
//!
//! Pure byte work, no I/O: the VM process strips the virtio-net header,
//! calls [`DhcpServer::handle`] and, on `Some`, queues the reply for the
//! guest instead of (or as well as) writing the frame to the TAP.

use std::net::Ipv4Addr;

use vmd_proto::net::prefix_mask;
use vmd_proto::vm::DhcpLease;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// Lease time offered. The address never changes, so long is fine; the
/// guest renews now and then and gets the same answer.
pub const LEASE_SECS: u32 = 86_400;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
/// chaddr (16), sname (64), file (128).
const BOOTP_FIXED: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Shortest BOOTP message old clients accept (RFC 951 vend area of 64).
const BOOTP_MIN: usize = 300;
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
const FLAG_BROADCAST: u16 = 0x8000;
const FILE_OFF: usize = 108;
const FILE_LEN: usize = 128;

// Option codes (RFC 2132).
const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MSG_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_RENEWAL: u8 = 58;
const OPT_REBINDING: u8 = 59;
const OPT_BOOTFILE: u8 = 67;
const OPT_END: u8 = 255;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MsgType {
    fn from_u8(v: u8) -> Option<MsgType> {
        Some(match v {
            1 => MsgType::Discover,
            2 => MsgType::Offer,
            3 => MsgType::Request,
            4 => MsgType::Decline,
            5 => MsgType::Ack,
            6 => MsgType::Nak,
            7 => MsgType::Release,
            8 => MsgType::Inform,
            _ => return None,
        })
    }
}

/// What the server needs from one client message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientMsg {
    xid: [u8; 4],
    flags: u16,
    ciaddr: Ipv4Addr,
    /// `None`: plain BOOTP (no option 53).
    msg_type: Option<MsgType>,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
}

/// The DHCP server for one guest interface.
#[derive(Debug, Clone)]
pub struct DhcpServer {
    guest_mac: [u8; 6],
    server_mac: [u8; 6],
    lease: DhcpLease,
    hostname: Option<String>,
}

impl DhcpServer {
    /// A server answering only `guest_mac`, from `server_mac` (the host
    /// TAP's MAC, so the guest's later ARP for the server resolves to the
    /// same address), handing out `lease`, and `hostname` if given.
    pub fn new(
        guest_mac: [u8; 6],
        server_mac: [u8; 6],
        lease: DhcpLease,
        hostname: Option<String>,
    ) -> DhcpServer {
        DhcpServer {
            guest_mac,
            server_mac,
            lease,
            hostname,
        }
    }

    /// Looks at one Ethernet frame the guest sent. Returns the answer frame
    /// when it is a DHCP or BOOTP request from the guest that calls for
    /// one; `None` for anything else (other traffic, other MACs, other
    /// servers' business, malformed frames).
    pub fn handle(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let msg = parse(frame, &self.guest_mac)?;
        let lease = &self.lease;
        match msg.msg_type {
            None => Some(self.reply(&msg, None, lease.guest)),
            Some(MsgType::Discover) => Some(self.reply(&msg, Some(MsgType::Offer), lease.guest)),
            Some(MsgType::Request) => {
                if msg.server_id.is_some_and(|s| s != lease.host) {
                    // The guest took another server's offer.
                    return None;
                }
                let wanted = msg
                    .requested_ip
                    .or((!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr));
                match wanted {
                    Some(ip) if ip != lease.guest => Some(self.nak(&msg)),
                    _ => Some(self.reply(&msg, Some(MsgType::Ack), lease.guest)),
                }
            }
            Some(MsgType::Inform) => {
                Some(self.reply(&msg, Some(MsgType::Ack), Ipv4Addr::UNSPECIFIED))
            }
            // Decline, release, and server-to-client types: nothing to say.
            Some(_) => None,
        }
    }

    /// An OFFER, ACK or BOOTREPLY carrying the lease.
    fn reply(&self, msg: &ClientMsg, ty: Option<MsgType>, yiaddr: Ipv4Addr) -> Vec<u8> {
        let lease = &self.lease;
        let mut opts = Vec::with_capacity(64);
        if let Some(ty) = ty {
            push_opt(&mut opts, OPT_MSG_TYPE, &[ty as u8]);
            push_opt(&mut opts, OPT_SERVER_ID, &lease.host.octets());
        }
        // INFORM: the client has its address; no lease times (RFC 2131 4.3.5).
        let informing = ty.is_some() && yiaddr.is_unspecified();
        if ty.is_some() && !informing {
            push_opt(&mut opts, OPT_LEASE_TIME, &LEASE_SECS.to_be_bytes());
            push_opt(&mut opts, OPT_RENEWAL, &(LEASE_SECS / 2).to_be_bytes());
            push_opt(
                &mut opts,
                OPT_REBINDING,
                &(LEASE_SECS / 8 * 7).to_be_bytes(),
            );
        }
        if let Some(mask) = prefix_mask(lease.prefix_len) {
            push_opt(&mut opts, OPT_SUBNET_MASK, &mask.octets());
        }
        push_opt(&mut opts, OPT_ROUTER, &lease.host.octets());
        if let Some(dns) = lease.dns {
            push_opt(&mut opts, OPT_DNS, &dns.octets());
        }
        if let Some(name) = &self.hostname {
            push_opt(&mut opts, OPT_HOSTNAME, truncate(name.as_bytes()));
        }
        let mut file = None;
        if let Some(boot) = &lease.boot_file {
            // The fixed `file` field holds 127 bytes and a NUL; longer names
            // go in option 67 only.
            if boot.len() < FILE_LEN {
                file = Some(boot.as_bytes());
            }
            push_opt(&mut opts, OPT_BOOTFILE, truncate(boot.as_bytes()));
        }
        let bootp = self.bootp(msg, yiaddr, lease.host, file, &opts);
        let ip_dst = if !msg.ciaddr.is_unspecified() {
            msg.ciaddr
        } else if msg.flags & FLAG_BROADCAST != 0 || yiaddr.is_unspecified() {
            Ipv4Addr::BROADCAST
        } else {
            yiaddr
        };
        self.frame(ip_dst, &bootp)
    }

    /// A NAK: the guest asked for an address that is not its own. Always
    /// broadcast, as the guest may not have a usable address (RFC 2131
    /// 4.3.2).
    fn nak(&self, msg: &ClientMsg) -> Vec<u8> {
        let mut opts = Vec::new();
        push_opt(&mut opts, OPT_MSG_TYPE, &[MsgType::Nak as u8]);
        push_opt(&mut opts, OPT_SERVER_ID, &self.lease.host.octets());
        let bootp = self.bootp(
            msg,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            None,
            &opts,
        );
        self.frame(Ipv4Addr::BROADCAST, &bootp)
    }

    fn bootp(
        &self,
        msg: &ClientMsg,
        yiaddr: Ipv4Addr,
        siaddr: Ipv4Addr,
        file: Option<&[u8]>,
        opts: &[u8],
    ) -> Vec<u8> {
        let mut b = vec![0u8; BOOTP_FIXED];
        b[0] = BOOTREPLY;
        b[1] = HTYPE_ETHER;
        b[2] = 6;
        b[4..8].copy_from_slice(&msg.xid);
        b[10..12].copy_from_slice(&msg.flags.to_be_bytes());
        b[12..16].copy_from_slice(&msg.ciaddr.octets());
        b[16..20].copy_from_slice(&yiaddr.octets());
        b[20..24].copy_from_slice(&siaddr.octets());
        b[28..34].copy_from_slice(&self.guest_mac);
        if let Some(file) = file {
            b[FILE_OFF..FILE_OFF + file.len()].copy_from_slice(file);
        }
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(opts);
        b.push(OPT_END);
        if b.len() < BOOTP_MIN {
            b.resize(BOOTP_MIN, OPT_PAD);
        }
        b
    }

    /// Wraps a BOOTP message in UDP, IPv4 and Ethernet, checksums computed.
    fn frame(&self, ip_dst: Ipv4Addr, bootp: &[u8]) -> Vec<u8> {
        let src = self.lease.host;
        let udp_len = UDP_HLEN + bootp.len();
        let ip_len = IP_HLEN + udp_len;
        let mut f = Vec::with_capacity(ETH_HLEN + ip_len);
        let eth_dst = if ip_dst == Ipv4Addr::BROADCAST {
            [0xff; 6]
        } else {
            self.guest_mac
        };
        f.extend_from_slice(&eth_dst);
        f.extend_from_slice(&self.server_mac);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

        let ip = f.len();
        f.extend_from_slice(&[0x45, 0]);
        // The sizes here are bounded by the options we write (< 1500).
        f.extend_from_slice(&(ip_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&ip_dst.octets());
        let sum = checksum(&[&f[ip..ip + IP_HLEN]]);
        f[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());

        let udp = f.len();
        f.extend_from_slice(&SERVER_PORT.to_be_bytes());
        f.extend_from_slice(&CLIENT_PORT.to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(bootp);
        let sum = udp_checksum(src, ip_dst, &f[udp..]);
        f[udp + 6..udp + 8].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

/// Option data is at most 255 bytes.
fn truncate(b: &[u8]) -> &[u8] {
    &b[..b.len().min(255)]
}

fn push_opt(opts: &mut Vec<u8>, code: u8, data: &[u8]) {
    let data = truncate(data);
    opts.push(code);
    opts.push(data.len() as u8);
    opts.extend_from_slice(data);
}

/// The internet checksum (RFC 1071) of the concatenation of `parts`, each
/// of even length except possibly the last.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
        // Fold as we go so a long input cannot overflow.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let len = (udp.len() as u16).to_be_bytes();
    let pseudo = [0, IPPROTO_UDP, len[0], len[1]];
    let sum = checksum(&[&src.octets(), &dst.octets(), &pseudo, udp]);
    // 0 means "no checksum" in UDP; a computed 0 is sent as all ones.
    if sum == 0 {
        0xffff
    } else {
        sum
    }
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn ipv4(b: &[u8], off: usize) -> Option<Ipv4Addr> {
    let s: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(s))
}

/// Parses a guest frame as a BOOTP request from `mac`; `None` for anything
/// else. Checksums are not verified: the frame comes straight from the
/// guest (which may leave them to offload), not off a wire.
fn parse(frame: &[u8], mac: &[u8; 6]) -> Option<ClientMsg> {
    if frame.get(6..12)? != mac || be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_HLEN..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IP_HLEN || *ip.get(9)? != IPPROTO_UDP {
        return None;
    }
    // Fragments (more-fragments set or an offset) are never DHCP.
    if be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(be16(ip, 2)?);
    let ip = ip.get(..total)?;
    let udp = ip.get(ihl..)?;
    if be16(udp, 0)? != CLIENT_PORT || be16(udp, 2)? != SERVER_PORT {
        return None;
    }
    let udp_len = usize::from(be16(udp, 4)?);
    if udp_len < UDP_HLEN {
        return None;
    }
    let b = udp.get(UDP_HLEN..udp_len)?;
    if b.len() < BOOTP_FIXED || b[0] != BOOTREQUEST || b[1] != HTYPE_ETHER || b[2] != 6 {
        return None;
    }
    if &b[28..34] != mac {
        return None;
    }
    let mut msg = ClientMsg {
        xid: b[4..8].try_into().ok()?,
        flags: be16(b, 10)?,
        ciaddr: ipv4(b, 12)?,
        msg_type: None,
        requested_ip: None,
        server_id: None,
    };
    // No magic cookie: plain BOOTP with no (or vendor-specific) options.
    if b.get(BOOTP_FIXED..BOOTP_FIXED + 4) != Some(&MAGIC[..]) {
        return Some(msg);
    }
    let mut opts = &b[BOOTP_FIXED + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            OPT_PAD => {
                opts = rest;
                continue;
            }
            OPT_END => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let data = rest.get(..usize::from(len))?;
        opts = &rest[usize::from(len)..];
        match (code, data) {
            (OPT_MSG_TYPE, [t]) => msg.msg_type = Some(MsgType::from_u8(*t)?),
            (OPT_REQUESTED_IP, [a, b, c, d]) => {
                msg.requested_ip = Some(Ipv4Addr::new(*a, *b, *c, *d))
            }
            (OPT_SERVER_ID, [a, b, c, d]) => msg.server_id = Some(Ipv4Addr::new(*a, *b, *c, *d)),
            _ => {}
        }
    }
    Some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GUEST: [u8; 6] = [0xfe, 0xe1, 0xba, 1, 2, 3];
    const HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 9];

    fn lease() -> DhcpLease {
        DhcpLease {
            guest: Ipv4Addr::new(100, 64, 0, 9),
            host: Ipv4Addr::new(100, 64, 0, 8),
            prefix_len: 31,
            dns: None,
            boot_file: None,
        }
    }

    fn server() -> DhcpServer {
        DhcpServer::new(GUEST, HOST, lease(), Some("vm1".into()))
    }

    /// A client message as a guest would send it: options given as
    /// (code, data) pairs; `None` for the cookie means plain BOOTP.
    fn client_frame(
        src_mac: [u8; 6],
        chaddr: [u8; 6],
        ciaddr: Ipv4Addr,
        flags: u16,
        opts: Option<&[(u8, &[u8])]>,
    ) -> Vec<u8> {
        let mut b = vec![0u8; BOOTP_FIXED];
        b[0] = BOOTREQUEST;
        b[1] = HTYPE_ETHER;
        b[2] = 6;
        b[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        b[10..12].copy_from_slice(&flags.to_be_bytes());
        b[12..16].copy_from_slice(&ciaddr.octets());
        b[28..34].copy_from_slice(&chaddr);
        if let Some(opts) = opts {
            b.extend_from_slice(&MAGIC);
            for (code, data) in opts {
                b.push(*code);
                b.push(data.len() as u8);
                b.extend_from_slice(data);
            }
            b.push(OPT_PAD);
            b.push(OPT_END);
        }
        b.resize(b.len().max(BOOTP_MIN), 0);
        let src = if ciaddr.is_unspecified() {
            Ipv4Addr::UNSPECIFIED
        } else {
            ciaddr
        };
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (IP_HLEN + UDP_HLEN + b.len()) as u16;
        f.extend_from_slice(&[0x45, 0x10]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&[255; 4]);
        let udp_len = (UDP_HLEN + b.len()) as u16;
        f.extend_from_slice(&68u16.to_be_bytes());
        f.extend_from_slice(&67u16.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&b);
        f
    }

    fn discover() -> Vec<u8> {
        client_frame(
            GUEST,
            GUEST,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(&[(OPT_MSG_TYPE, &[1]), (55, &[1, 3, 6, 12])]),
        )
    }

    /// A parsed reply, every layer checked for consistency.
    #[derive(Debug)]
    struct Reply {
        xid: [u8; 4],
        eth_dst: [u8; 6],
        ip_dst: Ipv4Addr,
        yiaddr: Ipv4Addr,
        siaddr: Ipv4Addr,
        ciaddr: Ipv4Addr,
        file: Vec<u8>,
        opts: Vec<(u8, Vec<u8>)>,
    }

    impl Reply {
        fn opt(&self, code: u8) -> Option<&[u8]> {
            self.opts
                .iter()
                .find(|(c, _)| *c == code)
                .map(|(_, d)| &d[..])
        }
    }

    fn check_reply(f: &[u8]) -> Reply {
        assert_eq!(&f[6..12], &HOST, "source MAC is the host TAP's");
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[ETH_HLEN..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(usize::from(be16(ip, 2).unwrap()), ip.len());
        assert_eq!(checksum(&[&ip[..IP_HLEN]]), 0, "IP header checksum");
        assert_eq!(ip[9], 17);
        let src = ipv4(ip, 12).unwrap();
        let dst = ipv4(ip, 16).unwrap();
        assert_eq!(src, lease().host);
        let udp = &ip[IP_HLEN..];
        assert_eq!((be16(udp, 0).unwrap(), be16(udp, 2).unwrap()), (67, 68));
        assert_eq!(usize::from(be16(udp, 4).unwrap()), udp.len());
        assert_ne!(be16(udp, 6).unwrap(), 0, "UDP checksum is computed");
        let len = (udp.len() as u16).to_be_bytes();
        assert_eq!(
            checksum(&[&src.octets(), &dst.octets(), &[0, 17, len[0], len[1]], udp]),
            0,
            "UDP checksum"
        );
        let b = &udp[UDP_HLEN..];
        assert!(b.len() >= BOOTP_MIN);
        assert_eq!(&b[..3], &[BOOTREPLY, 1, 6]);
        assert_eq!(&b[28..34], &GUEST);
        assert_eq!(&b[BOOTP_FIXED..BOOTP_FIXED + 4], &MAGIC);
        let mut opts = Vec::new();
        let mut o = &b[BOOTP_FIXED + 4..];
        loop {
            let code = o[0];
            if code == OPT_END {
                break;
            }
            let len = usize::from(o[1]);
            opts.push((code, o[2..2 + len].to_vec()));
            o = &o[2 + len..];
        }
        Reply {
            xid: b[4..8].try_into().unwrap(),
            eth_dst: f[..6].try_into().unwrap(),
            ip_dst: dst,
            yiaddr: ipv4(b, 16).unwrap(),
            siaddr: ipv4(b, 20).unwrap(),
            ciaddr: ipv4(b, 12).unwrap(),
            file: b[FILE_OFF..FILE_OFF + FILE_LEN]
                .iter()
                .copied()
                .take_while(|&c| c != 0)
                .collect(),
            opts,
        }
    }

    #[test]
    fn discover_gets_an_offer_with_the_lease() {
        let r = check_reply(&server().handle(&discover()).expect("offer"));
        assert_eq!(r.opt(OPT_MSG_TYPE), Some(&[2][..]));
        assert_eq!(r.xid, [0xde, 0xad, 0xbe, 0xef], "xid echoed");
        assert_eq!(r.yiaddr, lease().guest);
        assert_eq!(r.siaddr, lease().host);
        assert_eq!(r.eth_dst, GUEST);
        assert_eq!(
            r.ip_dst,
            lease().guest,
            "unicast without the broadcast flag"
        );
        assert_eq!(r.opt(OPT_SERVER_ID), Some(&[100, 64, 0, 8][..]));
        assert_eq!(r.opt(OPT_ROUTER), Some(&[100, 64, 0, 8][..]));
        assert_eq!(r.opt(OPT_SUBNET_MASK), Some(&[255, 255, 255, 254][..]));
        assert_eq!(r.opt(OPT_LEASE_TIME), Some(&LEASE_SECS.to_be_bytes()[..]));
        assert_eq!(r.opt(OPT_HOSTNAME), Some(&b"vm1"[..]));
        assert_eq!(r.opt(OPT_DNS), None);
        assert_eq!(r.opt(OPT_BOOTFILE), None);
    }

    #[test]
    fn broadcast_flag_gets_a_broadcast_answer() {
        let f = client_frame(
            GUEST,
            GUEST,
            Ipv4Addr::UNSPECIFIED,
            FLAG_BROADCAST,
            Some(&[(OPT_MSG_TYPE, &[1])]),
        );
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert_eq!(r.eth_dst, [0xff; 6]);
    }

    #[test]
    fn request_gets_an_ack() {
        let f = client_frame(
            GUEST,
            GUEST,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(&[
                (OPT_MSG_TYPE, &[3]),
                (OPT_REQUESTED_IP, &[100, 64, 0, 9]),
                (OPT_SERVER_ID, &[100, 64, 0, 8]),
            ]),
        );
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.opt(OPT_MSG_TYPE), Some(&[5][..]));
        assert_eq!(r.yiaddr, lease().guest);
        assert!(r.opt(OPT_RENEWAL).is_some() && r.opt(OPT_REBINDING).is_some());
    }

    #[test]
    fn renewal_is_acked_to_the_client_address() {
        let f = client_frame(
            GUEST,
            GUEST,
            lease().guest,
            0,
            Some(&[(OPT_MSG_TYPE, &[3])]),
        );
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.opt(OPT_MSG_TYPE), Some(&[5][..]));
        assert_eq!(r.ip_dst, lease().guest);
        assert_eq!(r.ciaddr, lease().guest);
    }

    #[test]
    fn request_for_another_address_is_nakked_by_broadcast() {
        let f = client_frame(
            GUEST,
            GUEST,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(&[(OPT_MSG_TYPE, &[3]), (OPT_REQUESTED_IP, &[10, 0, 0, 5])]),
        );
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.opt(OPT_MSG_TYPE), Some(&[6][..]));
        assert_eq!(r.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert_eq!(r.opt(OPT_LEASE_TIME), None);
    }

    #[test]
    fn request_to_another_server_is_ignored() {
        let f = client_frame(
            GUEST,
            GUEST,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(&[
                (OPT_MSG_TYPE, &[3]),
                (OPT_REQUESTED_IP, &[100, 64, 0, 9]),
                (OPT_SERVER_ID, &[10, 0, 0, 1]),
            ]),
        );
        assert_eq!(server().handle(&f), None);
    }

    #[test]
    fn inform_gets_options_but_no_address() {
        let f = client_frame(
            GUEST,
            GUEST,
            lease().guest,
            0,
            Some(&[(OPT_MSG_TYPE, &[8])]),
        );
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.opt(OPT_MSG_TYPE), Some(&[5][..]));
        assert_eq!(r.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.ip_dst, lease().guest);
        assert_eq!(r.opt(OPT_LEASE_TIME), None);
        assert_eq!(r.opt(OPT_ROUTER), Some(&[100, 64, 0, 8][..]));
    }

    #[test]
    fn release_and_decline_get_no_answer() {
        for t in [4u8, 7, 2, 5, 6] {
            let f = client_frame(
                GUEST,
                GUEST,
                Ipv4Addr::UNSPECIFIED,
                0,
                Some(&[(OPT_MSG_TYPE, &[t])]),
            );
            assert_eq!(server().handle(&f), None, "type {t}");
        }
        let f = client_frame(
            GUEST,
            GUEST,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(&[(OPT_MSG_TYPE, &[99])]),
        );
        assert_eq!(server().handle(&f), None);
    }

    #[test]
    fn plain_bootp_gets_a_bootreply() {
        let f = client_frame(GUEST, GUEST, Ipv4Addr::UNSPECIFIED, 0, None);
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.yiaddr, lease().guest);
        assert_eq!(r.opt(OPT_MSG_TYPE), None);
        assert_eq!(r.opt(OPT_SERVER_ID), None);
        assert_eq!(r.opt(OPT_SUBNET_MASK), Some(&[255, 255, 255, 254][..]));
    }

    #[test]
    fn dns_and_boot_file_are_offered() {
        let mut l = lease();
        l.dns = Some(Ipv4Addr::new(100, 64, 0, 8));
        l.boot_file = Some("pxeboot".into());
        let s = DhcpServer::new(GUEST, HOST, l, None);
        let r = check_reply(&s.handle(&discover()).unwrap());
        assert_eq!(r.opt(OPT_DNS), Some(&[100, 64, 0, 8][..]));
        assert_eq!(r.file, b"pxeboot");
        assert_eq!(r.opt(OPT_BOOTFILE), Some(&b"pxeboot"[..]));
        assert_eq!(r.opt(OPT_HOSTNAME), None);
        // Too long for the fixed field: option only.
        let mut l = lease();
        l.boot_file = Some("x".repeat(300));
        let s = DhcpServer::new(GUEST, HOST, l, None);
        let r = check_reply(&s.handle(&discover()).unwrap());
        assert!(r.file.is_empty());
        assert_eq!(r.opt(OPT_BOOTFILE).map(<[u8]>::len), Some(255));
    }

    #[test]
    fn other_macs_are_ignored() {
        let other = [0x52, 0x54, 0, 0, 0, 1];
        let opts: &[(u8, &[u8])] = &[(OPT_MSG_TYPE, &[1])];
        let s = server();
        let u = Ipv4Addr::UNSPECIFIED;
        assert_eq!(
            s.handle(&client_frame(other, other, u, 0, Some(opts))),
            None
        );
        assert_eq!(
            s.handle(&client_frame(other, GUEST, u, 0, Some(opts))),
            None
        );
        assert_eq!(
            s.handle(&client_frame(GUEST, other, u, 0, Some(opts))),
            None
        );
    }

    #[test]
    fn non_dhcp_traffic_is_ignored() {
        let s = server();
        let good = discover();
        // Not IPv4 (an ARP frame's ethertype).
        let mut f = good.clone();
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(s.handle(&f), None);
        // TCP, not UDP.
        let mut f = good.clone();
        f[ETH_HLEN + 9] = 6;
        assert_eq!(s.handle(&f), None);
        // Another port.
        let mut f = good.clone();
        f[ETH_HLEN + IP_HLEN + 2..ETH_HLEN + IP_HLEN + 4].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(s.handle(&f), None);
        // A fragment.
        let mut f = good.clone();
        f[ETH_HLEN + 6] = 0x20;
        assert_eq!(s.handle(&f), None);
        // A BOOTREPLY from the guest.
        let mut f = good.clone();
        f[ETH_HLEN + IP_HLEN + UDP_HLEN] = BOOTREPLY;
        assert_eq!(s.handle(&f), None);
        // IPv6 version nibble.
        let mut f = good.clone();
        f[ETH_HLEN] = 0x65;
        assert_eq!(s.handle(&f), None);
        // Cut anywhere: shorter than the IP total length says.
        for n in 0..good.len() {
            assert_eq!(s.handle(&good[..n]), None, "cut at {n}");
        }
        assert!(s.handle(&good).is_some());
    }

    #[test]
    fn ip_options_and_ethernet_padding_are_handled() {
        // An IP header with 4 bytes of options (IHL 6), then trailing
        // Ethernet padding beyond the IP total length.
        let good = discover();
        let mut f = good[..ETH_HLEN].to_vec();
        let ip = &good[ETH_HLEN..];
        let mut hdr = ip[..IP_HLEN].to_vec();
        hdr[0] = 0x46;
        let total = be16(ip, 2).unwrap() + 4;
        hdr[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&hdr);
        f.extend_from_slice(&[1, 1, 1, 0]);
        f.extend_from_slice(&ip[IP_HLEN..]);
        f.extend_from_slice(&[0; 20]);
        let r = check_reply(&server().handle(&f).unwrap());
        assert_eq!(r.opt(OPT_MSG_TYPE), Some(&[2][..]));
    }

    #[test]
    fn malformed_options_are_refused() {
        // An option whose length runs past the end.
        let mut f = discover();
        let opt = ETH_HLEN + IP_HLEN + UDP_HLEN + BOOTP_FIXED + 4;
        assert_eq!(f[opt], OPT_MSG_TYPE);
        f[opt + 1] = 250;
        assert_eq!(server().handle(&f), None);
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071's example words sum to 0xddf2, so the checksum is !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Odd length pads with a zero byte.
        assert_eq!(checksum(&[&[0x12]]), !0x1200);
    }

    proptest! {
        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = server().handle(&bytes);
        }

        #[test]
        fn prop_mutated_requests_never_panic_and_replies_are_sound(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut f = discover();
            for (i, v) in flips {
                let i = i.index(f.len());
                f[i] = v;
            }
            let n = cut.index(f.len() + 1);
            if let Some(reply) = server().handle(&f[..n.max(1)]) {
                // Whatever got through still yields a well-formed answer.
                let _ = check_reply(&reply);
            }
        }
    }
}
