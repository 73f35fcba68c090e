//! virtio-net (virtio 1.2, 5.1) on a TAP device: queue 0 receives, queue
//! 1 transmits; no control queue.
//!
//! The TAP carries a 12-byte virtio-net header on every frame (priv set
//! IFF_VNET_HDR and TUNSETVNETHDRSZ 12), the same layout as the header on
//! the queues with VERSION_1, so frames go between guest buffers and the
//! TAP with one readv/writev each and no copy or reformatting. Checksum
//! and TSO offloads are offered only when the TAP takes them, and switched
//! on (TUNSETOFFLOAD) only as far as the guest accepted them.
//!
//! Receive: the I/O thread polls the TAP while the guest has buffers; with
//! none left it stops polling, so frames wait in the TAP's queue instead
//! of being dropped here, until the guest adds buffers.
//!
//! A `locked` interface drops every frame whose Ethernet source is not the
//! NIC's MAC. A local interface answers the guest's DHCP requests itself
//! ([`DhcpServer`]): those never reach the TAP, and the answers are queued
//! for the receive path.

pub mod dhcp;

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use virtio_bindings::virtio_net;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmd_proto::net::format_mac;
use vmd_tap::{set_tap_offloads, TapOffloads, TAP_VNET_HDR_LEN};

use self::dhcp::DhcpServer;
use crate::devices::virtio::{
    next_chain, BufferError, ChainBuffers, VirtioDevice, VirtioError, TYPE_NET,
};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
const HDR: u64 = TAP_VNET_HDR_LEN as u64;
/// Largest frame the TAP takes or gives: a 64 KiB TSO frame plus its
/// Ethernet header.
const MAX_FRAME: u64 = 65_535 + 14;
/// readv/writev take at most this many pieces (UIO_MAXIOV).
const MAX_IOV: usize = 1024;
/// DHCP replies waiting for receive buffers; more are dropped (the guest
/// retries).
const MAX_PENDING: usize = 8;
/// Frames received per call, so transmit gets its turn under a flood.
const RX_BATCH: usize = 256;

// Feature bits (5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_CSUM;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_CSUM;
pub const VIRTIO_NET_F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO4;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO6;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO4;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO6;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;
const VIRTIO_NET_S_LINK_UP: u16 = virtio_net::VIRTIO_NET_S_LINK_UP as u16;

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames a locked interface dropped for their source MAC.
    pub tx_spoofed: u64,
    /// Frames dropped for their size, their buffers, or a TAP error.
    pub tx_dropped: u64,
    pub rx_dropped: u64,
    pub dhcp_answered: u64,
}

/// Reused iovec storage. The raw pointers in it are only meaningful
/// between filling and the syscall that uses them.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are scratch, rebuilt before every use on whichever
// thread runs the device; nothing is ever read through a stale one.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Host pointers for the guest buffers `segs`, from byte `skip` on.
    fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, u32)],
        mut skip: u64,
    ) -> Result<(), BufferError> {
        self.0.clear();
        for &(addr, len) in segs {
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let start = addr.checked_add(skip).ok_or(BufferError)?;
            for s in GuestMemoryBackend::get_slices(mem, GuestAddress(start), (len - skip) as usize)
            {
                let s = s.map_err(|_| BufferError)?;
                if self.0.len() == MAX_IOV {
                    return Err(BufferError);
                }
                self.0.push(libc::iovec {
                    iov_base: s.ptr_guard_mut().as_ptr().cast(),
                    iov_len: s.len(),
                });
            }
            skip = 0;
        }
        Ok(())
    }
}

pub struct VirtioNet {
    tap: File,
    mac: [u8; 6],
    locked: bool,
    dhcp: Option<DhcpServer>,
    /// Offload features the TAP can honour.
    offload_features: u64,
    config: [u8; 8],
    txb: ChainBuffers,
    rxb: ChainBuffers,
    iov: IoVecs,
    /// Start of a transmitted frame (headers a DHCP check needs).
    peek: [u8; 64],
    /// A whole DHCP request, copied out for the server.
    scratch: Vec<u8>,
    pending: VecDeque<Vec<u8>>,
    /// The guest had no receive buffer last time we looked.
    rx_blocked: bool,
    /// The TAP may have frames (cleared when a read says EAGAIN).
    tap_readable: bool,
    /// The TAP failed for good: stop polling it.
    tap_dead: bool,
    stats: NetStats,
}

impl VirtioNet {
    /// A NIC on `tap` (a TAP fd with a 12-byte vnet header) with the
    /// guest MAC `mac`; `dhcp` answers the guest's DHCP requests.
    pub fn new(
        tap: File,
        mac: [u8; 6],
        locked: bool,
        dhcp: Option<DhcpServer>,
    ) -> io::Result<VirtioNet> {
        set_nonblocking(&tap)?;
        let offload_features = probe_offloads(&tap);
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        log::debug!(
            "virtio-net {}: offloads {offload_features:#x}{}{}",
            format_mac(&mac),
            if locked { ", locked" } else { "" },
            if dhcp.is_some() { ", dhcp" } else { "" }
        );
        Ok(VirtioNet {
            tap,
            mac,
            locked,
            dhcp,
            offload_features,
            config,
            txb: ChainBuffers::default(),
            rxb: ChainBuffers::default(),
            iov: IoVecs(Vec::with_capacity(64)),
            peek: [0; 64],
            scratch: Vec::with_capacity(2048),
            pending: VecDeque::with_capacity(MAX_PENDING),
            rx_blocked: false,
            tap_readable: true,
            tap_dead: false,
            stats: NetStats::default(),
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Transmits every chain the guest made available.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        let mut used = 0;
        while let Some(chain) = next_chain(queue, mem)? {
            self.txb.load(chain)?;
            let head = self.txb.head;
            self.transmit_one(mem);
            queue.add_used(mem, head, 0)?;
            used += 1;
        }
        Ok(used)
    }

    fn transmit_one(&mut self, mem: &GuestMemoryMmap) {
        let len = self.txb.readable_len;
        if !(HDR + 14..=HDR + MAX_FRAME).contains(&len) {
            self.stats.tx_dropped += 1;
            log::debug!("virtio-net: dropping a {len}-byte transmit chain");
            return;
        }
        let peek_len = ((len - HDR) as usize).min(self.peek.len());
        if self.txb.read(mem, HDR, &mut self.peek[..peek_len]).is_err() {
            self.stats.tx_dropped += 1;
            return;
        }
        if self.locked && self.peek[6..12] != self.mac {
            self.stats.tx_spoofed += 1;
            log::debug!(
                "virtio-net {}: dropped a frame from {} (locked lladdr; {} so far)",
                format_mac(&self.mac),
                format_mac(&[
                    self.peek[6],
                    self.peek[7],
                    self.peek[8],
                    self.peek[9],
                    self.peek[10],
                    self.peek[11]
                ]),
                self.stats.tx_spoofed
            );
            return;
        }
        if self.dhcp.is_some() && is_dhcp_request(&self.peek[..peek_len]) {
            self.answer_dhcp(mem, (len - HDR) as usize);
            return;
        }
        if self.iov.fill(mem, self.txb.readable(), 0).is_err() {
            self.stats.tx_dropped += 1;
            return;
        }
        // SAFETY: the iovecs point into guest memory, mapped for as long
        // as `mem` lives, and cover exactly the chain's readable buffers.
        let r = unsafe {
            libc::writev(
                self.tap.as_raw_fd(),
                self.iov.0.as_ptr(),
                self.iov.0.len() as libc::c_int,
            )
        };
        if r < 0 {
            self.stats.tx_dropped += 1;
            log::debug!("virtio-net: TAP write: {}", io::Error::last_os_error());
        } else {
            self.stats.tx_frames += 1;
        }
    }

    /// Hands a DHCP request to the built-in server; the answer waits for
    /// the receive path. Never forwarded to the TAP.
    fn answer_dhcp(&mut self, mem: &GuestMemoryMmap, len: usize) {
        self.scratch.resize(len, 0);
        if self.txb.read(mem, HDR, &mut self.scratch).is_err() {
            self.stats.tx_dropped += 1;
            return;
        }
        let Some(server) = &self.dhcp else { return };
        let Some(reply) = server.handle(&self.scratch) else {
            log::debug!("virtio-net: DHCP request left unanswered");
            return;
        };
        if self.pending.len() >= MAX_PENDING {
            self.stats.rx_dropped += 1;
            return;
        }
        self.stats.dhcp_answered += 1;
        self.pending.push_back(reply);
    }

    /// Fills the guest's receive buffers: queued replies first, then
    /// frames from the TAP until it is empty or the buffers run out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        if self.rx_blocked {
            // Frames may have arrived while we were not polling.
            self.rx_blocked = false;
            self.tap_readable = true;
        }
        let mut used = 0;
        while used < RX_BATCH {
            let want = !self.pending.is_empty() || (self.tap_readable && !self.tap_dead);
            if !want {
                break;
            }
            let Some(chain) = next_chain(queue, mem)? else {
                self.rx_blocked = true;
                break;
            };
            self.rxb.load(chain)?;
            let head = self.rxb.head;
            if let Some(frame) = self.pending.pop_front() {
                let n = self.put_frame(mem, &frame);
                queue.add_used(mem, head, n)?;
                used += 1;
                continue;
            }
            match self.read_tap(mem) {
                Ok(Some(n)) => {
                    queue.add_used(mem, head, n)?;
                    used += 1;
                }
                Ok(None) => {
                    // Nothing to read: the buffer goes back for later.
                    queue.go_to_previous_position();
                    self.tap_readable = false;
                }
                Err(()) => {
                    // Unusable buffers: hand them back empty.
                    self.stats.rx_dropped += 1;
                    queue.add_used(mem, head, 0)?;
                    used += 1;
                }
            }
        }
        Ok(used)
    }

    /// Writes a header and `frame` into the loaded receive chain; returns
    /// the length used (0: it did not fit, the frame is dropped).
    fn put_frame(&mut self, mem: &GuestMemoryMmap, frame: &[u8]) -> u32 {
        let mut hdr = [0u8; HDR as usize];
        hdr[10] = 1; // num_buffers
        let total = HDR + frame.len() as u64;
        if total > self.rxb.writable_len
            || self.rxb.write(mem, 0, &hdr).is_err()
            || self.rxb.write(mem, HDR, frame).is_err()
        {
            self.stats.rx_dropped += 1;
            return 0;
        }
        self.stats.rx_frames += 1;
        total as u32
    }

    /// Reads one frame from the TAP into the loaded receive chain:
    /// `Some(length)`, `None` when the TAP is empty, `Err` when the
    /// buffers are unusable.
    fn read_tap(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u32>, ()> {
        if self.rxb.writable_len < HDR || self.iov.fill(mem, self.rxb.writable(), 0).is_err() {
            return Err(());
        }
        // SAFETY: the iovecs point into guest memory, mapped for as long
        // as `mem` lives, and cover exactly the chain's writable buffers.
        let r = unsafe {
            libc::readv(
                self.tap.as_raw_fd(),
                self.iov.0.as_ptr(),
                self.iov.0.len() as libc::c_int,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => {
                    log::warn!("virtio-net: TAP read: {e}; no longer receiving");
                    self.tap_dead = true;
                }
            }
            return Ok(None);
        }
        let n = r as u64;
        if n < HDR {
            self.stats.rx_dropped += 1;
            return Err(());
        }
        // The TAP leaves num_buffers alone; without MRG_RXBUF it is 1.
        if self.rxb.write(mem, 10, &[1, 0]).is_err() {
            return Err(());
        }
        self.stats.rx_frames += 1;
        Ok(Some(n as u32))
    }
}

fn set_nonblocking(tap: &File) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int through the pointer.
    if unsafe { libc::ioctl(tap.as_raw_fd(), libc::FIONBIO, &on) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The offload features this TAP can honour: everything when it takes
/// every receive offload, checksums only when it takes just that. Leaves
/// the TAP with none until the guest negotiates.
fn probe_offloads(tap: &File) -> u64 {
    let all = TapOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: false,
    };
    let csum_only = TapOffloads {
        csum: true,
        ..TapOffloads::default()
    };
    let features = if set_tap_offloads(tap.as_fd(), all).is_ok() {
        VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
    } else if set_tap_offloads(tap.as_fd(), csum_only).is_ok() {
        VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
    } else {
        0
    };
    if let Err(e) = set_tap_offloads(tap.as_fd(), TapOffloads::default()) {
        log::debug!("virtio-net: clearing TAP offloads: {e}");
    }
    features
}

/// Whether `frame` (its first bytes) is IPv4 UDP to the DHCP server port.
fn is_dhcp_request(frame: &[u8]) -> bool {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 17 {
        return false;
    }
    // A fragment's port numbers are not where they seem.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return false;
    }
    match ip.get(ihl + 2..ihl + 4) {
        Some(p) => u16::from_be_bytes([p[0], p[1]]) == dhcp::SERVER_PORT,
        None => false,
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | self.offload_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, VirtioError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(0),
        }
    }

    fn features_ok(&mut self, features: u64) {
        let offloads = TapOffloads {
            csum: features & VIRTIO_NET_F_GUEST_CSUM != 0,
            tso4: features & VIRTIO_NET_F_GUEST_TSO4 != 0,
            tso6: features & VIRTIO_NET_F_GUEST_TSO6 != 0,
            ecn: false,
        };
        if let Err(e) = set_tap_offloads(self.tap.as_fd(), offloads) {
            log::warn!("virtio-net: TAP offloads {offloads:?}: {e}");
        }
    }

    fn reset(&mut self) {
        if self.stats.tx_spoofed > 0 {
            log::info!(
                "virtio-net {}: {} frames with a foreign source MAC dropped",
                format_mac(&self.mac),
                self.stats.tx_spoofed
            );
        }
        self.pending.clear();
        self.rx_blocked = false;
        self.tap_readable = true;
        // A new driver may not take what the old one negotiated.
        let _ = set_tap_offloads(self.tap.as_fd(), TapOffloads::default());
    }

    fn input_fd(&self) -> Option<(RawFd, usize)> {
        Some((self.tap.as_raw_fd(), RX_QUEUE))
    }

    fn input_wanted(&self) -> bool {
        !self.rx_blocked && !self.tap_dead
    }

    fn input_ready(&mut self) {
        self.tap_readable = true;
    }

    fn take_pending(&mut self) -> Option<usize> {
        (!self.pending.is_empty() && !self.rx_blocked).then_some(RX_QUEUE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(dst_port: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&dst_port.to_be_bytes());
        f
    }

    #[test]
    fn dhcp_requests_are_recognised() {
        assert!(is_dhcp_request(&udp_frame(67)));
        assert!(!is_dhcp_request(&udp_frame(68)));
        let mut frag = udp_frame(67);
        frag[14 + 7] = 1; // fragment offset 8
        assert!(!is_dhcp_request(&frag));
        let mut tcp = udp_frame(67);
        tcp[14 + 9] = 6;
        assert!(!is_dhcp_request(&tcp));
        assert!(!is_dhcp_request(&udp_frame(67)[..40]));
        let mut bad_ihl = udp_frame(67);
        bad_ihl[14] = 0x4f; // 60-byte header: ports beyond what we hold
        assert!(!is_dhcp_request(&bad_ihl));
    }
}
