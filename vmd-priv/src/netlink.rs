//! Just enough rtnetlink for what ioctls cannot do: an interface alias
//! (IFLA_IFALIAS), its group and master, VRF devices, and IPv4 and IPv6
//! addresses with any prefix length. One request,
//! one acknowledgement; nothing is dumped or parsed beyond the ack.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

// From linux/netlink.h and linux/rtnetlink.h; stable kernel ABI.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_EXCL: u16 = 0x200;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_SETLINK: u16 = 19;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_GROUP: u16 = 27;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VRF_TABLE: u16 = 1;
const RTM_NEWADDR: u16 = 20;
const IFLA_IFALIAS: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
const RTM_GETLINK: u16 = 18;
const RTM_NEWLINKPROP: u16 = 108;
const IFLA_PROP_LIST: u16 = 52;
const IFLA_ALT_IFNAME: u16 = 53;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Longest alias the kernel keeps (IFALIASZ - 1).
pub const MAX_ALIAS_LEN: usize = 255;

/// Why a netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The kernel refused the request (or the socket failed).
    #[error("{0}")]
    Os(#[from] io::Error),
    /// The kernel's answer made no sense to us.
    #[error("malformed netlink answer: {0}")]
    Protocol(&'static str),
}

/// One request under construction: header, fixed body, attributes.
struct Request {
    buf: Vec<u8>,
    seq: u32,
}

impl Request {
    fn new(msg_type: u16, flags: u16) -> Request {
        static SEQ: AtomicU32 = AtomicU32::new(1);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `finish`
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        Request { buf, seq }
    }

    fn body(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        // rtattr: u16 length (header included, padding not), u16 type.
        self.buf
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Opens a nested attribute; `end_nested` with the returned offset
    /// closes it.
    fn begin_nested(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        at
    }

    fn end_nested(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    /// Sends the request and waits for the kernel's acknowledgement.
    fn send(mut self) -> Result<(), NlError> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        let sock: OwnedFd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(io::Error::from)?;
        socket::sendto(
            sock.as_raw_fd(),
            &self.buf,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        let mut rx = vec![0u8; 8192];
        loop {
            // rtnetlink handles a request inside sendto, so its ack is
            // queued by now: never block (and never hang priv) waiting.
            let n = match socket::recv(sock.as_raw_fd(), &mut rx, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => return Err(NlError::Protocol("no answer")),
                Err(e) => return Err(io::Error::from(e).into()),
            };
            if let Some(result) = find_ack(&rx[..n], self.seq)? {
                return result;
            }
        }
    }
}

/// Looks through one datagram of netlink messages for the ack of `seq`:
/// `Some(Ok)` for success, `Some(Err)` for the kernel's error, `None` when
/// this datagram does not hold it.
fn find_ack(mut msgs: &[u8], seq: u32) -> Result<Option<Result<(), NlError>>, NlError> {
    while msgs.len() >= NLMSG_HDRLEN {
        let field = |off: usize| {
            u32::from_ne_bytes([msgs[off], msgs[off + 1], msgs[off + 2], msgs[off + 3]])
        };
        let len = field(0) as usize;
        let ty = u16::from_ne_bytes([msgs[4], msgs[5]]);
        if len < NLMSG_HDRLEN || len > msgs.len() {
            return Err(NlError::Protocol("message length out of bounds"));
        }
        if ty == NLMSG_ERROR && field(8) == seq {
            let code = msgs
                .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                .ok_or(NlError::Protocol("short error message"))?;
            let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
            return Ok(Some(if code == 0 {
                Ok(())
            } else {
                Err(NlError::Os(io::Error::from_raw_os_error(-code)))
            }));
        }
        let next = (len + 3) & !3;
        msgs = msgs.get(next..).unwrap_or(&[]);
    }
    Ok(None)
}

/// Adds an alternative name (`ip link property add ... altname`) to
/// interface `index`.
pub fn add_altname(index: u32, altname: &str) -> Result<(), NlError> {
    let mut req = Request::new(RTM_NEWLINKPROP, NLM_F_CREATE);
    let mut ifi = [0u8; 16];
    ifi[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    req.body(&ifi);
    let mut name = altname.as_bytes().to_vec();
    name.push(0);
    let mut inner = Vec::with_capacity(4 + name.len() + 3);
    inner.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
    inner.extend_from_slice(&IFLA_ALT_IFNAME.to_ne_bytes());
    inner.extend_from_slice(&name);
    inner.resize(inner.len().next_multiple_of(4), 0);
    req.attr(IFLA_PROP_LIST | NLA_F_NESTED, &inner);
    req.send()
}

/// The rtattrs in `bytes`: (type without flags, payload).
fn attrs(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let ty = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            break;
        }
        out.push((ty, &bytes[4..len]));
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    out
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Every interface with its alternative names (an RTM_GETLINK dump). It
/// blocks on the kernel's answer: call it only outside the sandbox.
pub fn links_with_altnames() -> Result<Vec<(String, Vec<String>)>, NlError> {
    let mut req = Request::new(RTM_GETLINK, NLM_F_DUMP);
    req.body(&[0u8; 16]);
    let len = req.buf.len() as u32;
    req.buf[..4].copy_from_slice(&len.to_ne_bytes());
    let sock: OwnedFd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io::Error::from)?;
    socket::sendto(
        sock.as_raw_fd(),
        &req.buf,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut links = Vec::new();
    let mut rx = vec![0u8; 65536];
    loop {
        let n =
            socket::recv(sock.as_raw_fd(), &mut rx, MsgFlags::empty()).map_err(io::Error::from)?;
        let mut msgs = &rx[..n];
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
            let ty = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(NlError::Protocol("message length out of bounds"));
            }
            match ty {
                NLMSG_DONE => return Ok(links),
                NLMSG_ERROR => {
                    if let Some(Err(e)) = find_ack(&msgs[..len], req.seq)? {
                        return Err(e);
                    }
                }
                RTM_NEWLINK if len >= NLMSG_HDRLEN + 16 => {
                    let (mut name, mut alts) = (String::new(), Vec::new());
                    for (ty, data) in attrs(&msgs[NLMSG_HDRLEN + 16..len]) {
                        match ty {
                            IFLA_IFNAME => name = c_string(data),
                            IFLA_PROP_LIST => alts.extend(
                                attrs(data)
                                    .into_iter()
                                    .filter(|(t, _)| *t == IFLA_ALT_IFNAME)
                                    .map(|(_, d)| c_string(d)),
                            ),
                            _ => {}
                        }
                    }
                    links.push((name, alts));
                }
                _ => {}
            }
            msgs = msgs.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        }
    }
}

/// Sets (or, with an empty string, clears) interface `index`'s alias.
pub fn set_alias(index: u32, alias: &str) -> Result<(), NlError> {
    let mut req = Request::new(RTM_SETLINK, 0);
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifi = [0u8; 16];
    ifi[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    req.body(&ifi);
    req.attr(IFLA_IFALIAS, alias.as_bytes());
    req.send()
}

/// struct ifinfomsg for interface `index` (0: none yet).
fn ifinfo(index: u32) -> [u8; 16] {
    // family, pad, type, index, flags, change.
    let mut ifi = [0u8; 16];
    ifi[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    ifi
}

/// Puts interface `index` in interface group `group` (IFLA_GROUP), which
/// nftables (`iifgroup`), iptables (`-m devgroup`) and `ip link ... group`
/// match.
pub fn set_group(index: u32, group: u32) -> Result<(), NlError> {
    let mut req = Request::new(RTM_SETLINK, 0);
    req.body(&ifinfo(index));
    req.attr(IFLA_GROUP, &group.to_ne_bytes());
    req.send()
}

/// Makes `master` (a bridge or a VRF) interface `index`'s master.
pub fn set_master(index: u32, master: u32) -> Result<(), NlError> {
    let mut req = Request::new(RTM_SETLINK, 0);
    req.body(&ifinfo(index));
    req.attr(IFLA_MASTER, &master.to_ne_bytes());
    req.send()
}

/// The request creating VRF device `name` for routing table `table`.
fn new_vrf_request(name: &str, table: u32) -> Request {
    let mut req = Request::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
    req.body(&ifinfo(0));
    let mut ifname = name.as_bytes().to_vec();
    ifname.push(0);
    req.attr(IFLA_IFNAME, &ifname);
    let info = req.begin_nested(IFLA_LINKINFO);
    req.attr(IFLA_INFO_KIND, b"vrf");
    let data = req.begin_nested(IFLA_INFO_DATA);
    req.attr(IFLA_VRF_TABLE, &table.to_ne_bytes());
    req.end_nested(data);
    req.end_nested(info);
    req
}

/// Creates VRF device `name` bound to routing table `table` (the kernel
/// answers EOPNOTSUPP without CONFIG_NET_VRF).
pub fn new_vrf(name: &str, table: u32) -> Result<(), NlError> {
    new_vrf_request(name, table).send()
}

/// Deletes interface `index`.
pub fn delete_link(index: u32) -> Result<(), NlError> {
    let mut req = Request::new(RTM_DELLINK, 0);
    req.body(&ifinfo(index));
    req.send()
}

/// Adds (or replaces) `addr/prefix_len` on interface `index`.
pub fn add_ipv4(index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<(), NlError> {
    let mut req = Request::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
    // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
    let mut ifa = [0u8; 8];
    ifa[0] = libc::AF_INET as u8;
    ifa[1] = prefix_len;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    req.body(&ifa);
    // IFA_LOCAL is the address itself; IFA_ADDRESS the same on a
    // broadcast link (it would be the peer on a point-to-point one).
    req.attr(IFA_LOCAL, &addr.octets());
    req.attr(IFA_ADDRESS, &addr.octets());
    req.send()
}

/// Gives interface `index` the IPv6 address `addr/prefix_len` (replacing
/// it if present) without duplicate address detection: the address is
/// ours by construction, and usable at once.
pub fn add_ipv6(index: u32, addr: Ipv6Addr, prefix_len: u8) -> Result<(), NlError> {
    const IFA_F_NODAD: u8 = 0x02;
    let mut req = Request::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
    // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
    let mut ifa = [0u8; 8];
    ifa[0] = libc::AF_INET6 as u8;
    ifa[1] = prefix_len;
    ifa[2] = IFA_F_NODAD;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    req.body(&ifa);
    req.attr(IFA_LOCAL, &addr.octets());
    req.attr(IFA_ADDRESS, &addr.octets());
    req.send()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn acks_and_errors_are_found_by_sequence() {
        let ok = msg(NLMSG_ERROR, 7, &0i32.to_ne_bytes());
        assert!(matches!(find_ack(&ok, 7), Ok(Some(Ok(())))));
        assert!(matches!(find_ack(&ok, 8), Ok(None)));
        let mut two = msg(3, 7, &[1, 2, 3]);
        two.extend(msg(NLMSG_ERROR, 7, &(-libc::ENODEV).to_ne_bytes()));
        match find_ack(&two, 7) {
            Ok(Some(Err(NlError::Os(e)))) => assert_eq!(e.raw_os_error(), Some(libc::ENODEV)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut bad = msg(NLMSG_ERROR, 7, &0i32.to_ne_bytes());
        bad[0] = 200;
        assert!(matches!(find_ack(&bad, 7), Err(NlError::Protocol(_))));
        bad[0] = 3;
        assert!(matches!(find_ack(&bad, 7), Err(NlError::Protocol(_))));
        let short = msg(NLMSG_ERROR, 7, &[]);
        assert!(matches!(find_ack(&short, 7), Err(NlError::Protocol(_))));
        assert!(matches!(find_ack(&[1, 2, 3], 7), Ok(None)));
    }

    #[test]
    fn vrf_request_nests_kind_and_table() {
        let req = new_vrf_request("vrf7", 7);
        let b = &req.buf;
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        // Header, then the 16-byte ifinfomsg, then IFLA_IFNAME "vrf7\0"
        // (padded to 8 + 4 header).
        let mut o = NLMSG_HDRLEN + 16;
        assert_eq!((u16_at(o), u16_at(o + 2)), (9, IFLA_IFNAME));
        assert_eq!(&b[o + 4..o + 9], b"vrf7\0");
        o += 12;
        // IFLA_LINKINFO holds the kind and the data, whose table is 7.
        assert_eq!(u16_at(o + 2), IFLA_LINKINFO);
        assert_eq!(usize::from(u16_at(o)), b.len() - o);
        let kind = o + 4;
        assert_eq!((u16_at(kind), u16_at(kind + 2)), (7, IFLA_INFO_KIND));
        assert_eq!(&b[kind + 4..kind + 7], b"vrf");
        let data = kind + 8;
        assert_eq!((u16_at(data), u16_at(data + 2)), (12, IFLA_INFO_DATA));
        assert_eq!((u16_at(data + 4), u16_at(data + 6)), (8, IFLA_VRF_TABLE));
        assert_eq!(&b[data + 8..data + 12], &7u32.to_ne_bytes());
        assert_eq!(b.len(), data + 12);
    }

    #[test]
    fn attributes_are_padded() {
        let mut r = Request::new(RTM_SETLINK, 0);
        r.body(&[0; 16]);
        r.attr(IFLA_IFALIAS, b"abcde");
        assert_eq!(r.buf.len(), NLMSG_HDRLEN + 16 + 12);
        assert_eq!(&r.buf[32..34], &9u16.to_ne_bytes());
    }
}
