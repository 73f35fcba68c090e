//! Writes the seed corpora under fuzz/corpus/: real frames for
//! proto_decode (messages built from JSON, so this keeps compiling as the
//! message types grow), qcow2 images from `vmd_disk::create` for
//! qcow2_open (run-seeds.sh adds qemu-img's), and well-formed requests for
//! the virtqueue targets, virtio-net and virtio-scsi; DHCP frames for
//! dhcp_server. vm.conf seeds are copied by run-seeds.sh.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use vmd_proto::frame;
use vmd_disk::{create, open_disk, CreateSpec, Format};
use vmd_proto::Msg;

#[path = "../../fuzz_targets/common/virtq_layout.rs"]
mod layout;
use layout::*;

fn corpus(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus").join(target);
    fs::create_dir_all(&d).unwrap();
    d
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    fs::write(corpus(target).join(name), bytes).unwrap();
}

const MESSAGES: &[&str] = &[
    r#"{"Request":{"Start":{"name":"web","kernel":"/bsd","initrd":null,"cmdline":"console=ttyS0","memory":536870912,"vcpus":2,"disks":[{"path":"/var/vm/a.qcow2","format":"Qcow2","read_only":false}]}}}"#,
    r#"{"Request":{"Stop":{"name":null,"force":true,"wait":false}}}"#,
    r#"{"Request":{"Status":{"name":"web"}}}"#,
    r#"{"Request":{"Console":{"name":"web"}}}"#,
    r#"{"Request":{"Load":{"path":"/etc/vm.conf"}}}"#,
    r#"{"Request":"Reload"}"#,
    r#"{"Request":{"Reset":{"what":"Switches"}}}"#,
    r#"{"Request":{"Log":{"verbose":true}}}"#,
    r#"{"ClientRequest":{"creds":{"uid":1000,"gid":1000,"pid":4242,"groups":[1000,27]},"req":{"Wait":{"name":"x"}}}}"#,
    r#"{"Reply":{"Ok":"started"}}"#,
    r#"{"Reply":{"Error":"no such vm"}}"#,
    r#"{"Reply":{"Console":{"tty":"/dev/pts/3"}}}"#,
    r#"{"Reply":{"Status":[{"id":1,"pid":77,"vcpus":1,"max_mem":1048576,"cur_mem":0,"tty":"","owner":"root","state":"Running","name":"a","last_exit":{"GuestCrash":"triple fault"},"restarts":0,"defined":true,"enabled":false,"disks":["/a"],"interfaces":1,"cdrom":null}]}}"#,
    r#"{"PrivOpen":{"kind":{"Disk":{"index":1,"read_only":true,"format":"Raw"}},"path":"/var/vm/b.img","opener":{"uid":1000,"gid":1000,"groups":[1000]}}}"#,
    r#"{"PrivOpen":{"kind":{"Tap":{"index":0}},"path":"","opener":{"uid":0,"gid":0,"groups":[]}}}"#,
    r#"{"PrivOpened":{"kind":"Kvm"}}"#,
    r#"{"PrivFailed":{"kind":"Kernel","path":"/bsd","reason":"ENOENT"}}"#,
    r#"{"PrivOpenedDisk":{"index":0,"backing":2}}"#,
    r#"{"PrivOpenedTap":{"index":0,"name":"tap0"}}"#,
    r#"{"PrivIfConfig":{"name":"tap0","switch":{"bridge":"br0","group":"uplink","up":true},"group":null,"up":true,"host_addr":["100.64.0.1",31]}}"#,
    r#"{"PrivIfDone":{"name":"tap0"}}"#,
    r#""PrivCleanup""#,
    r#"{"PrivChildOpened":{"file":{"uid":1000,"gid":1000,"dev":2049,"ino":12,"backing":["base.img","Raw"]}}}"#,
    r#"{"VmmStart":{"id":3,"name":"vm1","memory":536870912,"vcpus":2,"cmdline":"console=ttyS0","has_initrd":true,"uid":1000,"gid":1000,"verbose":false,"disks":[{"format":"Qcow2","read_only":false,"backing":1}],"nics":[{"mac":[254,225,186,208,0,1],"locked":true,"dhcp":{"guest":"100.64.0.2","host":"100.64.0.1","prefix_len":31,"dns":null,"boot_file":"pxe"}}]}}"#,
    r#"{"VmmStart":{"id":4,"name":"v","memory":1048576,"vcpus":1,"cmdline":"","has_initrd":false,"uid":0,"gid":0,"verbose":true,"disks":[],"nics":[]}}"#,
    r#""VmmRunning""#,
    r#""VmmTerminate""#,
    r#"{"VmmExited":{"Signal":9}}"#,
    r#"{"VmmExited":"PowerOff"}"#,
    r#""VmmPause""#,
    r#""VmmUnpause""#,
    r#"{"VmmPauseState":{"paused":true}}"#,
    r#"{"SetVerbose":{"level":2}}"#,
    r#""ControlSocket""#,
];

fn proto_seeds() {
    let mut n = 0;
    for (i, j) in MESSAGES.iter().enumerate() {
        let msg: Msg = match serde_json::from_str(j) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("proto seed {i} skipped (message types changed?): {e}");
                continue;
            }
        };
        let nfds = msg.fd_count();
        let bytes = frame::encode(&msg, 7, 1234, nfds).unwrap();
        for via_socket in [false, true] {
            if via_socket && i % 3 != 0 {
                continue;
            }
            let mut input = vec![nfds as u8 | if via_socket { 0x80 } else { 0 }];
            input.extend_from_slice(&bytes);
            write("proto_decode", &format!("msg-{i:02}{}", if via_socket { "-sock" } else { "" }), &input);
            n += 1;
        }
    }
    eprintln!("proto_decode: {n} seeds");
}

/// `ctl` (16 bytes) then the image.
fn qcow2_input(ctl0: u8, image: &Path) -> Vec<u8> {
    // Ops: read at 0, write near the middle, read it back, discard, flush.
    let mut v = vec![ctl0, 0x08, 0, 0, 0x11, 0x80, 0, 0x10, 0x80, 0, 0x03, 0x80, 0, 0x02, 0, 0];
    v.extend_from_slice(&fs::read(image).unwrap());
    v
}

fn qcow2_seeds(tmp: &Path) {
    let mut n = 0;
    let base = tmp.join("base.qcow2");
    for (name, bits, size) in [("c9", 9, 1u64 << 20), ("c12", 12, 4 << 20), ("c10-odd", 10, 3 * 512 + 4096)] {
        let p = tmp.join(format!("{name}.qcow2"));
        let _ = fs::remove_file(&p);
        let mut spec = CreateSpec::new(Format::Qcow2);
        spec.size = Some(size);
        spec.cluster_bits = bits;
        create(&p, spec).unwrap();
        write("qcow2_open", &format!("own-{name}"), &qcow2_input(0, &p));
        // With data: clusters, L2 tables and refcounts allocated.
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut d = open_disk(f, Vec::new(), false, Format::Qcow2).unwrap();
        d.write_at(&[0x5a; 1024], 0).unwrap();
        d.write_at(&[0xa5; 512], size / 2).unwrap();
        d.flush().unwrap();
        drop(d);
        write("qcow2_open", &format!("own-{name}-data"), &qcow2_input(0, &p));
        write("qcow2_open", &format!("own-{name}-data-ro"), &qcow2_input(1, &p));
        n += 3;
        if name == "c9" {
            fs::copy(&p, &base).unwrap();
        }
    }
    // An overlay on a raw backing file (the target passes a raw one).
    let raw = tmp.join("base.raw");
    File::create(&raw).unwrap().set_len(64 << 10).unwrap();
    let ov = tmp.join("overlay.qcow2");
    let _ = fs::remove_file(&ov);
    let mut spec = CreateSpec::new(Format::Qcow2);
    spec.base = Some(PathBuf::from("base.raw"));
    spec.cluster_bits = 9;
    create(&ov, spec).unwrap();
    write("qcow2_open", "own-overlay", &qcow2_input(2, &ov));
    write("qcow2_open", "own-overlay-detect", &qcow2_input(2 | 4, &ov));
    n += 2;
    eprintln!("qcow2_open: {n} seeds from image::create");
}

const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
const BLK_FLUSH: u32 = 4;
const BLK_GET_ID: u32 = 8;
const BLK_DISCARD: u32 = 11;
const BLK_WRITE_ZEROES: u32 = 13;

fn blk_header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn virtq_seeds() {
    let blk_max = 256;
    // One request per type: header (readable), data, status (writable).
    for (name, ty, sector, data_len, data_writable, flags) in [
        ("in", BLK_IN, 1u64, 512u32, true, 2u8),
        ("in-ro", BLK_IN, 0, 1024, true, 2 | F_READ_ONLY),
        ("out", BLK_OUT, 2, 512, false, 2),
        ("out-ro", BLK_OUT, 2, 512, false, 2 | F_READ_ONLY),
        ("flush", BLK_FLUSH, 0, 0, true, 1),
        ("get-id", BLK_GET_ID, 0, 20, true, 2 | F_EVENT_IDX),
        ("in-past-end", BLK_IN, 2047, 1024, true, 2),
        ("unknown", 99, 0, 0, true, 1),
    ] {
        let mut b = Builder::new(flags, blk_max);
        let d = b.data_start();
        b.put(d, &blk_header(ty, sector));
        let mut i = 0;
        b.desc(i, d, 16, DESC_F_NEXT, i + 1);
        i += 1;
        if data_len > 0 {
            let f = if data_writable { DESC_F_WRITE } else { 0 };
            if !data_writable {
                b.put(d + 0x100, &vec![0x77; data_len as usize]);
            }
            b.desc(i, d + 0x100, data_len, f | DESC_F_NEXT, i + 1);
            i += 1;
        }
        b.desc(i, d + 0x80, 1, DESC_F_WRITE, 0);
        b.avail(0);
        write("virtqueue_chain_blk", name, &b.build());
    }
    // Discard and write-zeroes with two segments.
    for (name, ty) in [("discard", BLK_DISCARD), ("write-zeroes", BLK_WRITE_ZEROES)] {
        let mut b = Builder::new(2, blk_max);
        let d = b.data_start();
        b.put(d, &blk_header(ty, 0));
        let mut segs = Vec::new();
        for (sector, n, fl) in [(8u64, 8u32, 0u32), (64, 16, u32::from(ty == BLK_WRITE_ZEROES))] {
            segs.extend_from_slice(&sector.to_le_bytes());
            segs.extend_from_slice(&n.to_le_bytes());
            segs.extend_from_slice(&fl.to_le_bytes());
        }
        b.put(d + 16, &segs);
        b.desc(0, d, 16 + segs.len() as u32, DESC_F_NEXT, 1);
        b.desc(1, d + 0x80, 1, DESC_F_WRITE, 0);
        b.avail(0);
        write("virtqueue_chain_blk", name, &b.build());
    }
    // Indirect table, a buffer crossing the region boundary, two chains.
    {
        let mut b = Builder::new(3, blk_max);
        let d = b.data_start();
        let table = d + 0x200;
        b.put(d, &blk_header(BLK_IN, 0));
        b.desc_at(table, 0, d, 16, DESC_F_NEXT, 1);
        b.desc_at(table, 1, 0x10000 - 256, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
        b.desc_at(table, 2, d + 0x80, 1, DESC_F_WRITE, 0);
        b.desc(0, table, 48, DESC_F_INDIRECT, 0);
        b.put(d + 0x40, &blk_header(BLK_GET_ID, 0));
        b.desc(1, d + 0x40, 16, DESC_F_NEXT, 2);
        b.desc(2, d + 0x90, 21, DESC_F_WRITE, 0);
        b.avail(0).avail(1);
        write("virtqueue_chain_blk", "indirect-cross-region-2chains", &b.build());
    }
    // Malformed: readable after writable, a loop.
    {
        let mut b = Builder::new(2, blk_max);
        let d = b.data_start();
        b.put(d, &blk_header(BLK_IN, 0));
        b.desc(0, d + 0x80, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
        b.desc(1, d, 16, 0, 0);
        b.avail(0);
        write("virtqueue_chain_blk", "bad-order", &b.build());
        let mut b = Builder::new(1, blk_max);
        let d = b.data_start();
        b.desc(0, d, 16, DESC_F_NEXT, 1);
        b.desc(1, d, 16, DESC_F_NEXT, 0);
        b.avail(0);
        write("virtqueue_chain_blk", "loop", &b.build());
    }
    // rng: writable buffers, one chain of two, one in the far region.
    for (name, flags, bufs) in [
        ("one", 0u8, vec![(0u64, 64u32)]),
        ("two-desc", 1, vec![(0, 16), (0x20000, 4096)]),
        ("cross-region", 2 | F_EVENT_IDX, vec![(0x10000 - 8, 64)]),
    ] {
        let mut b = Builder::new(flags, 64);
        let d = b.data_start();
        let n = bufs.len() as u16;
        for (i, (addr, len)) in bufs.into_iter().enumerate() {
            let i = i as u16;
            let addr = if addr == 0 { d } else { addr };
            let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
            b.desc(i, addr, len, DESC_F_WRITE | next, i + 1);
        }
        b.avail(0);
        write("virtqueue_chain_rng", name, &b.build());
    }
    eprintln!("virtqueue seeds written");
}

/// A DHCP request frame from `mac`: Ethernet, IPv4, UDP 68 -> 67, BOOTP
/// with the magic cookie and `options` (each [code, len, value..]).
fn dhcp_frame(mac: [u8; 6], options: &[u8]) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[28..34].copy_from_slice(&mac);
    bootp.extend_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(options);
    bootp.push(255);
    let udp_len = 8 + bootp.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&bootp);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);
    frame
}

const GUEST_MAC: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0, 1];

fn dhcp_seeds() -> Vec<Vec<u8>> {
    let discover = dhcp_frame(GUEST_MAC, &[53, 1, 1, 12, 3, b'v', b'm', b'1', 55, 3, 1, 3, 6]);
    let request = dhcp_frame(
        GUEST_MAC,
        &[53, 1, 3, 50, 4, 100, 64, 0, 9, 54, 4, 100, 64, 0, 8],
    );
    let other_server = dhcp_frame(GUEST_MAC, &[53, 1, 3, 54, 4, 10, 0, 0, 1]);
    let bootp = dhcp_frame(GUEST_MAC, &[]);
    let stranger = dhcp_frame([2, 0, 0, 0, 0, 9], &[53, 1, 1]);
    let frames = vec![discover, request, other_server, bootp, stranger];
    for (name, f) in ["discover", "request", "request-other-server", "bootp", "other-mac"]
        .iter()
        .zip(&frames)
    {
        write("dhcp_server", name, f);
    }
    frames
}

const NET_F_RX: u8 = 1 << 5;
const NET_F_LOCAL: u8 = 1 << 6;

fn net_seeds(dhcp: &[Vec<u8>]) {
    let max = 256;
    // Transmit: a virtio-net header, then a frame, in one or two buffers.
    for (name, flags, frame, split) in [
        ("tx-dhcp-local", 2 | NET_F_LOCAL, dhcp[0].clone(), false),
        ("tx-dhcp-split", 2 | NET_F_LOCAL, dhcp[1].clone(), true),
        ("tx-plain", 2, dhcp[3].clone(), false),
        ("tx-spoofed-locked", 2 | NET_F_LOCAL, dhcp[4].clone(), false),
        ("tx-runt", 1, vec![0u8; 8], false),
    ] {
        let mut b = Builder::new(flags, max);
        let d = b.data_start();
        let mut pkt = vec![0u8; 12];
        pkt.extend_from_slice(&frame);
        b.put(d, &pkt);
        if split {
            b.desc(0, d, 12, DESC_F_NEXT, 1);
            b.desc(1, d + 12, frame.len() as u32, 0, 0);
        } else {
            b.desc(0, d, pkt.len() as u32, 0, 0);
        }
        b.avail(0);
        write("virtio_net_chain", name, &b.build());
    }
    // Receive: writable buffers, one large, one chain of small ones; the
    // frames to receive are cut from the image at 0x4000 and 0x5000.
    for (name, bufs) in [
        ("rx-one", vec![(0u64, 2048u32)]),
        ("rx-chain", vec![(0, 12), (0x8000, 64), (0x9000, 1600)]),
        ("rx-too-small", vec![(0, 8)]),
    ] {
        let mut b = Builder::new(2 | NET_F_RX, max);
        let d = b.data_start();
        let n = bufs.len() as u16;
        for (i, (addr, len)) in bufs.into_iter().enumerate() {
            let i = i as u16;
            let addr = if addr == 0 { d } else { addr };
            let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
            b.desc(i, addr, len, DESC_F_WRITE | next, i + 1);
        }
        b.avail(0);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&dhcp[0]);
        b.put(0x4000, &frame);
        b.put(0x5000, &[0u8; 12 + 14]);
        write("virtio_net_chain", name, &b.build());
    }
    eprintln!("virtio-net and DHCP seeds written");
}

/// A virtio-scsi request for LUN 0 with `cdb`, and `data_in` bytes of
/// room for the answer after the response header and sense.
fn scsi_seed(name: &str, cdb: &[u8], data_in: u32, flags: u8) {
    let mut b = Builder::new(flags, 128);
    let d = b.data_start();
    let mut req = vec![0u8; 19 + 32];
    req[0] = 1; // LUN 0, target 0 in the single-level format
    req[8..16].copy_from_slice(&7u64.to_le_bytes()); // tag
    req[19..19 + cdb.len()].copy_from_slice(cdb);
    b.put(d, &req);
    b.desc(0, d, req.len() as u32, DESC_F_NEXT, 1);
    let resp = 4 + 4 + 2 + 1 + 1 + 96;
    if data_in > 0 {
        b.desc(1, d + 0x100, resp, DESC_F_WRITE | DESC_F_NEXT, 2);
        b.desc(2, d + 0x200, data_in, DESC_F_WRITE, 0);
    } else {
        b.desc(1, d + 0x100, resp, DESC_F_WRITE, 0);
    }
    b.avail(0);
    write("scsi_cdb", name, &b.build());
}

fn scsi_seeds() {
    scsi_seed("test-unit-ready", &[0x00, 0, 0, 0, 0, 0], 0, 2);
    scsi_seed("inquiry", &[0x12, 0, 0, 0, 96, 0], 96, 2);
    scsi_seed("inquiry-vpd", &[0x12, 1, 0x80, 0, 64, 0], 64, 2);
    scsi_seed("request-sense", &[0x03, 0, 0, 0, 18, 0], 18, 2);
    scsi_seed("report-luns", &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], 16, 2);
    scsi_seed("read-capacity-10", &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, 2);
    scsi_seed("read-10", &[0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0], 4096, 2);
    scsi_seed("read-10-past-end", &[0x28, 0, 0, 0, 0, 31, 0, 0, 4, 0], 8192, 2);
    scsi_seed("read-12", &[0xa8, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], 2048, 2);
    scsi_seed(
        "read-16",
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0],
        2048,
        2,
    );
    scsi_seed("mode-sense-6", &[0x1a, 0, 0x3f, 0, 64, 0], 64, 2);
    scsi_seed("mode-sense-10", &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64, 0], 64, 2);
    scsi_seed("read-toc", &[0x43, 0, 0, 0, 0, 0, 0, 0, 64, 0], 64, 2);
    scsi_seed("get-configuration", &[0x46, 0, 0, 0, 0, 0, 0, 0, 64, 0], 64, 2);
    scsi_seed("get-event-status", &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8, 2);
    scsi_seed("write-10", &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0, 2);
    scsi_seed("unknown-opcode", &[0xff; 16], 0, 1);
    eprintln!("virtio-scsi seeds written");
}

fn main() {
    let dhcp = dhcp_seeds();
    net_seeds(&dhcp);
    scsi_seeds();
    let tmp = std::env::temp_dir().join(format!("vmd-fuzz-seedgen-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    proto_seeds();
    qcow2_seeds(&tmp);
    virtq_seeds();
    let _ = fs::remove_dir_all(&tmp);
}
