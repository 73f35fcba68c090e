//! virtio-blk and virtio-rng on PCI, driven by the project's freestanding
//! `blk` test guest (tests/guests/blk.c): reads match the host file, writes
//! and flushes reach it, GET_ID, read-only disks, hole punching, two disks,
//! qcow2, MSI-X and INTx delivery, and hostile drivers. Needs root and
//! /dev/kvm; says so loudly and passes when either is missing.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{console, files, kvm, launch};
use vmd_disk::Format;
use vmd_proto::vm::{DiskParams, ExitReason, VmmParams};
use vmd_vmm::{DevOptions, DiskFiles, Outcome, VmFiles};

fn tmp(name: &str) -> PathBuf {
    common::tmp_dir("disks").join(name)
}

struct Disk {
    path: PathBuf,
    read_only: bool,
    format: Format,
}

fn raw(name: &str, data: &[u8]) -> Disk {
    let path = tmp(name);
    fs::write(&path, data).unwrap();
    Disk {
        path,
        read_only: false,
        format: Format::Raw,
    }
}

/// Boots blk.elf with `disks` and `cmdline`; returns the console output.
fn run(disks: &[Disk], cmdline: &str) -> Option<String> {
    let kvm = kvm()?;
    let con = console();
    let kernel = common::project_guests().join("blk.elf");
    let files = VmFiles {
        disks: disks
            .iter()
            .map(|d| DiskFiles {
                top: OpenOptions::new()
                    .read(true)
                    .write(!d.read_only)
                    .open(&d.path)
                    .unwrap()
                    .into(),
                backing: Vec::new(),
            })
            .collect(),
        ..files(kvm, con.tty, &kernel)
    };
    let params = VmmParams {
        id: 3,
        disks: disks
            .iter()
            .map(|d| DiskParams {
                format: d.format,
                read_only: d.read_only,
                backing: 0,
            })
            .collect(),
        ..common::params("t", 1, cmdline)
    };
    let (outcome, output) =
        launch(params, files, con.out, DevOptions::default()).finish(Duration::from_secs(60));
    assert_eq!(outcome, Outcome::Exited(ExitReason::PowerOff), "{output}");
    assert!(output.ends_with("VMD-TEST blk done\n"), "{output}");
    Some(output)
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn has(out: &str, line: &str) {
    assert!(
        out.lines().any(|l| l == line),
        "missing line {line:?} in:\n{out}"
    );
}

#[test]
fn read_matches_host_and_devices_enumerate() {
    let data = pattern(1 << 20);
    let d = raw("read.img", &data);
    let Some(out) = run(&[d], "info read:0:8 read:100:4 id rng:16 msix") else {
        return;
    };
    has(&out, "pci 00:00.0 0x8086:0x29c0");
    has(&out, "pci 00:01.0 0x1af4:0x1042");
    has(&out, "pci 00:02.0 0x1af4:0x1044");
    // 2048 sectors; FLUSH, DISCARD, WRITE_ZEROES, VERSION_1 offered.
    assert!(out.contains("blk: capacity=2048 features=0x"), "{out}");
    has(&out, "blk: capacity=2048 features=0x110006244 ro=0");
    let first: String = data[..16].iter().map(|b| format!("{b:02x}")).collect();
    has(
        &out,
        &format!(
            "read 0 8 status 0 fnv {:#x} first {first}",
            fnv(&data[..4096])
        ),
    );
    let at = 100 * 512;
    let first: String = data[at..at + 16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    has(
        &out,
        &format!(
            "read 100 4 status 0 fnv {:#x} first {first}",
            fnv(&data[at..at + 2048])
        ),
    );
    has(&out, "id status 0 vmd-t-0");
    let rng = out.lines().find(|l| l.starts_with("rng ")).unwrap();
    let hex = rng.strip_prefix("rng 16 ").expect(rng);
    assert_eq!(hex.len(), 32);
    assert_ne!(hex, "0".repeat(32));
    // The MSI-X vector reached the LAPIC.
    has(&out, "msix status 0 irr=1");
    // Past the end: IOERR.
}

#[test]
fn write_flush_reach_the_file_and_bounds_are_checked() {
    let d = raw("write.img", &vec![0u8; 1 << 20]);
    let path = d.path.clone();
    let Some(out) = run(
        &[d],
        "write:10:3:171 flush read:10:1 write:2047:2:1 read:2048:1 write:2047:1:7",
    ) else {
        return;
    };
    has(&out, "write 10 3 status 0");
    has(&out, "flush status 0");
    has(&out, "write 2047 2 status 1");
    assert!(out.contains("read 2048 1 status 1 "), "{out}");
    has(&out, "write 2047 1 status 0");
    let got = fs::read(&path).unwrap();
    assert!(got[10 * 512..13 * 512].iter().all(|b| *b == 171));
    assert!(got[..10 * 512].iter().all(|b| *b == 0));
    assert!(got[13 * 512..2047 * 512].iter().all(|b| *b == 0));
    assert!(got[2047 * 512..].iter().all(|b| *b == 7));
}

#[test]
fn read_only_disk_refuses_writes() {
    let data = pattern(64 << 10);
    let mut d = raw("ro.img", &data);
    d.read_only = true;
    let path = d.path.clone();
    let Some(out) = run(
        &[d],
        "info write:0:1:5 discard:0:8 zeroes:0:8:1 flush read:0:1",
    ) else {
        return;
    };
    assert!(out.contains(" ro=1\n"), "{out}");
    has(&out, "write 0 1 status 1");
    has(&out, "discard 0 8 status 1");
    has(&out, "zeroes 0 8 status 1");
    has(&out, "flush status 0");
    assert!(out.contains("read 0 1 status 0 "), "{out}");
    assert_eq!(fs::read(&path).unwrap(), data);
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    let d = raw("holes.img", &vec![0x5au8; 4 << 20]);
    let path = d.path.clone();
    let before = fs::metadata(&path).unwrap().blocks();
    let Some(out) = run(
        &[d],
        "discard:0:2048 zeroes:4096:2048:1 zeroes:2048:8:0 discard:0:8:1 read:4096:1",
    ) else {
        return;
    };
    has(&out, "discard 0 2048 status 0");
    has(&out, "zeroes 4096 2048 status 0");
    has(&out, "zeroes 2048 8 status 0");
    let zero = fnv(&[0u8; 512]);
    assert!(
        out.contains(&format!("read 4096 1 status 0 fnv {zero:#x} ")),
        "{out}"
    );
    let f = File::open(&path).unwrap();
    let after = f.metadata().unwrap().blocks();
    assert!(
        after + 2 * 2048 <= before,
        "st_blocks {before} -> {after}: no holes"
    );
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0x5a));
}

#[test]
fn two_disks() {
    let a = raw("two-a.img", &vec![1u8; 1 << 20]);
    let b = raw("two-b.img", &vec![2u8; 2 << 20]);
    let (pa, pb) = (a.path.clone(), b.path.clone());
    let Some(out) = run(
        &[a, b],
        "info write:0:1:9 disk:1 info id read:0:1 write:0:1:8",
    ) else {
        return;
    };
    has(&out, "pci 00:01.0 0x1af4:0x1042");
    has(&out, "pci 00:02.0 0x1af4:0x1042");
    has(&out, "pci 00:03.0 0x1af4:0x1044");
    assert!(out.contains("blk: capacity=2048 "), "{out}");
    assert!(out.contains("blk: capacity=4096 "), "{out}");
    has(&out, "id status 0 vmd-t-1");
    assert!(out.contains("read 0 1 status 0 fnv ") && out.contains(" first 02020202"));
    assert_eq!(fs::read(&pa).unwrap()[..512], [9u8; 512]);
    assert_eq!(fs::read(&pb).unwrap()[..512], [8u8; 512]);
}

#[test]
fn qcow2_written_by_the_guest_checks_clean() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no qemu-img");
        return;
    }
    let path = tmp("guest.qcow2");
    let _ = fs::remove_file(&path);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("4M")
        .status()
        .unwrap();
    assert!(st.success());
    let d = Disk {
        path: path.clone(),
        read_only: false,
        format: Format::Qcow2,
    };
    let Some(out) = run(
        &[d],
        "write:0:8:17 write:300:16:34 write:8191:1:51 flush zeroes:300:8:1 read:300:16",
    ) else {
        return;
    };
    has(&out, "write 0 8 status 0");
    has(&out, "write 300 16 status 0");
    has(&out, "write 8191 1 status 0");
    has(&out, "zeroes 300 8 status 0");
    let mut expect = vec![0u8; 4 << 20];
    expect[..8 * 512].fill(17);
    expect[308 * 512..316 * 512].fill(34);
    expect[8191 * 512..].fill(51);
    let e = &expect[300 * 512..316 * 512];
    assert!(
        out.contains(&format!("read 300 16 status 0 fnv {:#x} ", fnv(e))),
        "{out}"
    );
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let rawp = tmp("guest-expect.raw");
    fs::write(&rawp, &expect).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&path)
        .arg(&rawp)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn intx_through_the_ioapic() {
    let d = raw("intx.img", &vec![0u8; 64 << 10]);
    let Some(out) = run(&[d], "intx") else {
        return;
    };
    has(&out, "intx gsi=16 status 0 isr=1 irr=1");
}

#[test]
fn hostile_driver_gets_errors_and_resets() {
    let d = raw("evil.img", &pattern(64 << 10));
    let Some(out) = run(&[d], "evil:oob evil:loop evil:garbage read:0:1") else {
        return;
    };
    has(&out, "evil oob status 1");
    // A header outside RAM: IOERR on that request too.
    has(&out, "evil oob-hdr status 1");
    has(&out, "evil loop used=0 status 0x4f needs-reset=1");
    has(&out, "recovered status 0");
    has(&out, "evil garbage done");
    has(&out, "evil garbage recovered status 0");
    assert!(out.contains("read 0 1 status 0 "), "{out}");
}

/// Not a correctness test: prints guest-measured throughput (cycles from
/// the guest's TSC) for the benchmark scripts. `--ignored` to run.
#[test]
#[ignore]
fn bench_guest_reads() {
    let d = raw("bench.img", &pattern(64 << 20));
    if let Some(out) = run(&[d], "bench:seq-read:32 bench:rand-read-4k:2000") {
        for l in out.lines().filter(|l| l.starts_with("bench")) {
            eprintln!("{l}");
        }
    }
}
