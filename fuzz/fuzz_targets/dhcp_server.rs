//! The built-in DHCP server of a local interface (runs in the virtio-net
//! device process): any Ethernet frame the guest sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmd_proto::vm::DhcpLease;
use vmd_vmm::devices::virtio::net::dhcp::DhcpServer;

const GUEST_MAC: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0, 1];
const SERVER_MAC: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0, 0x80];

fuzz_target!(|frame: &[u8]| {
    let lease = DhcpLease {
        guest: "100.64.0.9".parse().unwrap(),
        host: "100.64.0.8".parse().unwrap(),
        prefix_len: 31,
        dns: Some("100.64.0.8".parse().unwrap()),
        boot_file: Some("pxe.bin".into()),
    };
    let server = DhcpServer::new(
        GUEST_MAC,
        SERVER_MAC,
        lease,
        Some("fuzz-vm".into()),
    );
    if let Some(reply) = server.handle(frame) {
        // An answer is one Ethernet frame to the guest, never a jumbo one.
        assert!(reply.len() >= 14 + 20 + 8 + 236 && reply.len() <= 1514, "{}", reply.len());
        // To the guest, or broadcast when the guest asked for it (RFC
        // 2131 4.1), from the server's MAC.
        assert!(reply[..6] == GUEST_MAC || reply[..6] == [0xff; 6], "{:x?}", &reply[..6]);
        assert_eq!(&reply[6..12], &SERVER_MAC[..]);
    }
});
