//! Disks end to end: the blk.elf test guest (its own virtio-blk driver)
//! reads what the host wrote and writes what the host reads back, on raw
//! and qcow2 images made by `vmctl create`, judged by qemu-img.

use std::process::Command;
use std::time::Duration;

use vmd_e2e::{guest, has_hw_virt, line_after, linux_guest, process_alive, Daemon};

const T: Duration = Duration::from_secs(90);
const SECTOR: usize = 512;

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required (Debian package qemu-utils)");
    out
}

fn start_blk(d: &Daemon, name: &str, disks: &[&std::path::Path], cmdline: &str) {
    let kernel = guest("blk.elf");
    let mut args = vec!["start", "-b", kernel.to_str().unwrap(), "-m", "32M"];
    for disk in disks {
        args.push("-d");
        args.push(disk.to_str().unwrap());
    }
    args.extend(["--cmdline", cmdline, name]);
    d.ok(&args);
}

#[test]
fn guest_reads_the_hosts_pattern_and_its_flushed_writes_reach_the_file() {
    let d = Daemon::start("disk-raw");
    let raw = d.dir.join("disk.raw");
    let mut image = vec![0u8; 1 << 20];
    for (i, b) in image
        .iter_mut()
        .enumerate()
        .skip(3 * SECTOR)
        .take(2 * SECTOR)
    {
        *b = (i % 251) as u8;
    }
    std::fs::write(&raw, &image).unwrap();
    let want = fnv1a(&image[3 * SECTOR..5 * SECTOR]);
    start_blk(&d, "r1", &[&raw], "read:3:2 write:8:4:165 flush");
    let console = d.console("r1");
    console.wait_for("VMD-TEST blk done", T);
    let text = console.text();
    let read = line_after(&text, "read 3 2 status 0 fnv ").expect("read line");
    assert!(
        read.starts_with(&format!("{want:#018x}")) || read.starts_with(&format!("{want:#x}")),
        "guest saw {read}, host wrote fnv {want:#x}\n{text}"
    );
    assert!(text.contains("write 8 4 status 0"), "{text}");
    assert!(text.contains("flush status 0"), "{text}");
    d.wait_state("r1", "stopped", T);
    let after = std::fs::read(&raw).unwrap();
    assert!(
        after[8 * SECTOR..12 * SECTOR].iter().all(|b| *b == 165),
        "write did not reach the file"
    );
    assert_eq!(
        after[..8 * SECTOR],
        image[..8 * SECTOR],
        "bytes outside the write changed"
    );
    assert_eq!(
        after[12 * SECTOR..],
        image[12 * SECTOR..],
        "bytes outside the write changed"
    );
}

#[test]
fn qcow2_overlay_written_by_the_guest_is_clean_and_matches_the_expected_image() {
    let d = Daemon::start("disk-qcow2");
    let base = d.dir.join("base.raw");
    let mut expected = vec![0u8; 4 << 20];
    for (i, b) in expected.iter_mut().enumerate() {
        *b = (i / SECTOR % 256) as u8;
    }
    std::fs::write(&base, &expected).unwrap();
    let top = d.dir.join("top.qcow2");
    d.ok(&[
        "create",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);
    // Writes inside one cluster, across a cluster boundary (64 KiB = 128
    // sectors) and far out; reads of untouched sectors come from the base.
    start_blk(
        &d,
        "q1",
        &[&top],
        "write:1:1:17 write:126:4:34 write:5000:8:51 flush read:2:1",
    );
    let console = d.console("q1");
    console.wait_for("VMD-TEST blk done", T);
    let text = console.text();
    assert!(!text.contains("VMD-TEST error"), "{text}");
    let read2 = line_after(&text, "read 2 1 status 0 fnv ").expect("read line");
    let want = fnv1a(&expected[2 * SECTOR..3 * SECTOR]);
    assert!(
        read2.starts_with(&format!("{want:#x}")) || read2.starts_with(&format!("{want:#018x}")),
        "{read2} vs {want:#x}"
    );
    d.wait_state("q1", "stopped", T);
    for (lba, n, byte) in [(1usize, 1usize, 17u8), (126, 4, 34), (5000, 8, 51)] {
        expected[lba * SECTOR..(lba + n) * SECTOR].fill(byte);
    }
    let want_img = d.dir.join("expected.raw");
    std::fs::write(&want_img, &expected).unwrap();
    let check = qemu_img(&["check", top.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        top.to_str().unwrap(),
        want_img.to_str().unwrap(),
    ]);
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    // The base image is untouched.
    let base_now = std::fs::read(&base).unwrap();
    assert_eq!(base_now[SECTOR], 1, "base image was written");
}

#[test]
fn kill_9_after_flush_loses_nothing_and_a_locked_disk_is_refused() {
    let d = Daemon::start("disk-kill");
    let raw = d.dir.join("disk.raw");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    // Write, flush, then keep the disk busy so the VM is alive when killed.
    start_blk(
        &d,
        "k1",
        &[&raw],
        "write:16:8:99 flush bench:rand-read-4k:1000000",
    );
    let console = d.console("k1");
    console.wait_for("flush status 0", T);
    let pid = d.wait_state("k1", "running", T).pid as u32;

    // While k1 holds the disk, a second VM may not open it read-write.
    let kernel = guest("blk.elf");
    let out = d.vmctl(&[
        "start",
        "-b",
        kernel.to_str().unwrap(),
        "-m",
        "32M",
        "-d",
        raw.to_str().unwrap(),
        "k2",
    ]);
    assert!(!out.status.success(), "second VM opened a locked disk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("in use by another VM"), "{err}");
    assert!(d.status("k2").is_none(), "refused VM left behind");
    assert_eq!(
        d.status("k1").map(|s| s.state),
        Some("running".into()),
        "first VM disturbed"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = d.wait_state("k1", "stopped", T);
    assert!(st.last_exit.contains("Signal"), "{st:?}");
    assert!(!process_alive(pid));
    let data = std::fs::read(&raw).unwrap();
    assert!(
        data[16 * SECTOR..24 * SECTOR].iter().all(|b| *b == 99),
        "flushed write lost"
    );
    // The lock went with the process: the disk can be used again.
    start_blk(&d, "k3", &[&raw], "read:16:1");
    d.console("k3").wait_for("VMD-TEST blk done", T);
}

#[test]
fn linux_mounts_an_ext4_disk_reads_and_writes_a_file() {
    if !has_hw_virt() {
        vmd_e2e::skipped(
            "linux_mounts_an_ext4_disk_reads_and_writes_a_file",
            "this CPU has no vmx/svm (nested KVM emulates guest kernel code, Linux cannot boot to userspace here); it runs on hosts with hardware virtualization",
        );
        return;
    }
    let dir = linux_guest();
    let d = Daemon::start("disk-linux");
    let disk = d.dir.join("disk.img");
    std::fs::copy(dir.join("disk.img"), &disk).unwrap();
    d.ok(&[
        "start",
        "-b",
        dir.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        dir.join("initrd.gz").to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 panic=-1",
        "-m",
        "256M",
        "-d",
        disk.to_str().unwrap(),
        "lxdisk",
    ]);
    let console = d.console("lxdisk");
    console.wait_for("GUEST-READY", T);
    let text = console.text();
    assert!(text.contains("GUEST-DISK: VMD-DISK-OK"), "{text}");
    assert!(text.contains("GUEST-DISK-WROTE"), "{text}");
    let _ = d.vmctl(&["stop", "-f", "-w", "lxdisk"]);
    d.wait_state("lxdisk", "stopped", T);
    let out = Command::new("debugfs")
        .args(["-R", "cat /from-guest.txt"])
        .arg(&disk)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "GUEST-WROTE");
}
