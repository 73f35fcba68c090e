//! virtio-net's transmit and receive paths (the virtio-net device
//! process's data path) over guest-controlled rings and buffers: the
//! input's flags pick the queue (bit 5 set: receive), bit 6 makes the
//! interface local (DHCP answered in the device) and locked. A datagram
//! socketpair stands in for the TAP: transmitted frames are read back
//! from its other end; for receive, two frames cut from the input wait in
//! it, and a DHCP answer from a transmit is received too.
#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use vmd_proto::vm::DhcpLease;
use vmd_vmm::devices::virtio::net::dhcp::DhcpServer;
use vmd_vmm::devices::virtio::net::{VirtioNet, RX_QUEUE, TX_QUEUE};
use virtio_queue::QueueT;
use vmd_vmm::devices::virtio::VirtioDevice;

mod common;

const F_RX: u8 = 1 << 5;
const F_LOCAL: u8 = 1 << 6;
const MAC: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0, 1];

fuzz_target!(|data: &[u8]| {
    let Some(&flags) = data.first() else { return };
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    let dhcp = (flags & F_LOCAL != 0).then(|| {
        let lease = DhcpLease {
            guest: "100.64.0.9".parse().unwrap(),
            host: "100.64.0.8".parse().unwrap(),
            prefix_len: 31,
            dns: None,
            boot_file: None,
        };
        DhcpServer::new(MAC, [0xfe, 0, 0, 0, 0, 0x80], lease, None)
    });
    let tap = File::from(OwnedFd::from(tap));
    let mut dev = VirtioNet::new(tap, MAC, flags & F_LOCAL != 0, dhcp).expect("device");
    let image = &data[1..];
    if flags & F_RX != 0 {
        for (at, len) in [(0x4000usize, 0x600usize), (0x5000, 0x40)] {
            let frame = image.get(at..).map_or(&[][..], |f| &f[..f.len().min(len)]);
            let _ = peer.send(frame);
        }
        dev.input_ready();
    }
    common::with_guest(image, |mem| {
        let (index, max) = if flags & F_RX != 0 {
            (RX_QUEUE, dev.queue_max_sizes()[RX_QUEUE])
        } else {
            (TX_QUEUE, dev.queue_max_sizes()[TX_QUEUE])
        };
        let mut q = common::queue_for(flags, max, mem);
        if let Ok(n) = dev.process_queue(index, &mut q, mem) {
            assert_eq!(q.next_used(), n as u16, "every chain consumed is used");
        }
        // A DHCP answer (or frames still waiting) go to receive buffers:
        // the same rings, seen afresh as the receive queue.
        if dev.take_pending() == Some(RX_QUEUE) {
            let mut rx = common::queue_for(flags, dev.queue_max_sizes()[RX_QUEUE], mem);
            let _ = dev.process_queue(RX_QUEUE, &mut rx, mem);
        }
    });
    // What reached the "TAP": whole frames with their virtio-net header,
    // never more than a TSO frame.
    peer.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 70_000];
    while let Ok(n) = peer.recv(&mut buf) {
        assert!((12 + 14..=12 + 65_535 + 14).contains(&n), "frame of {n} bytes");
    }
});
