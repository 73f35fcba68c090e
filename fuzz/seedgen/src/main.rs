//! Writes the seed corpora under fuzz/corpus/: real frames for
//! proto_decode (messages built from JSON, so this keeps compiling as the
//! message types grow), qcow2 images from `vmd_disk::create` for
//! qcow2_open (run-seeds.sh adds qemu-img's), and well-formed requests for
//! the virtqueue targets. vm.conf seeds are copied by run-seeds.sh.

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

fn main() {
    let tmp = std::env::temp_dir().join(format!("vmd-fuzz-seedgen-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    proto_seeds();
    qcow2_seeds(&tmp);
    virtq_seeds();
    let _ = fs::remove_dir_all(&tmp);
}
