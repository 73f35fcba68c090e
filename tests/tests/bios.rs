//! BIOS boot end to end: a VM without a kernel boots Debian's SeaBIOS,
//! which loads a boot sector this test writes from a raw or qcow2 disk
//! through its own virtio-blk driver. The boot sector prints a marker to
//! COM1, reads the disk's second sector through `int 13h` (SeaBIOS's
//! driver again) and prints the marker found there, then powers off or
//! resets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmd_e2e::Daemon;

const T: Duration = Duration::from_secs(120);
const FIRMWARE: &str = "/usr/share/seabios/bios.bin";
const FIRMWARE_256K: &str = "/usr/share/seabios/bios-256k.bin";
const BOOT_MARKER: &str = "VMD-BIOS boot sector";
const SECTOR2_MARKER: &str = "VMD-BIOS second sector via int13";

/// Real-mode boot sector source; `ACTION` 1 powers off through our PM1a
/// control register (SLP_TYP 5 | SLP_EN), 2 resets through the i8042.
const BOOT_SECTOR: &str = r#"
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    mov $msg, %si
    call puts
    mov $0x42, %ah
    mov drive, %dl
    mov $dap, %si
    int $0x13
    jc failed
    mov $0x7e00, %si
    call puts
.if ACTION == 1
    mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
.else
    mov $0xfe, %al
    out %al, $0x64
.endif
halt:
    hlt
    jmp halt
failed:
    mov $err, %si
    call puts
    jmp halt
puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
drive: .byte 0
    .p2align 2
dap: .byte 0x10, 0
    .word 1
    .word 0x7e00, 0
    .quad 1
msg: .asciz "VMD-BIOS boot sector\r\n"
err: .asciz "VMD-BIOS int13 read failed\r\n"
    .org 510
    .byte 0x55, 0xaa
"#;

fn require_firmware() {
    assert!(
        Path::new(FIRMWARE).exists(),
        "{FIRMWARE} is missing: install Debian's seabios package"
    );
}

/// Assembles the boot sector (binutils) and returns its 512 bytes.
fn boot_sector(dir: &Path, action: u32) -> Vec<u8> {
    let src = dir.join(format!("boot{action}.S"));
    let obj = dir.join(format!("boot{action}.o"));
    let bin = dir.join(format!("boot{action}.bin"));
    std::fs::write(&src, BOOT_SECTOR).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("binutils (as, ld) are required");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("as")
        .args(["--32", "--defsym", &format!("ACTION={action}"), "-o"])
        .arg(&obj)
        .arg(&src));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj));
    let code = std::fs::read(&bin).unwrap();
    assert_eq!(code.len(), 512, "boot sector must be one sector");
    code
}

/// A 1 MiB raw disk: the boot sector, then the second sector's marker.
fn raw_disk(dir: &Path, action: u32) -> PathBuf {
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(&boot_sector(dir, action));
    let marker = format!("{SECTOR2_MARKER}\r\n\0");
    image[512..512 + marker.len()].copy_from_slice(marker.as_bytes());
    let path = dir.join(format!("disk{action}.raw"));
    std::fs::write(&path, image).unwrap();
    path
}

/// Starts `name` from `disk` with no kernel; returns the console and how
/// long the boot sector's marker took to appear.
fn boot(d: &Daemon, name: &str, disk: &Path, extra: &[&str]) -> (vmd_e2e::ConsoleReader, Duration) {
    let started = Instant::now();
    let mut args = vec!["start", "-d", disk.to_str().unwrap(), "-m", "64M"];
    args.extend_from_slice(extra);
    args.push(name);
    d.ok(&args);
    let console = d.console(name);
    console.wait_for(BOOT_MARKER, T);
    let took = started.elapsed();
    eprintln!("{name}: start to boot-sector marker: {took:.2?}");
    (console, took)
}

#[test]
fn seabios_boots_a_raw_disk_and_int13_reads_through_virtio_blk() {
    require_firmware();
    let d = Daemon::start("bios-raw");
    let disk = raw_disk(&d.dir, 1);
    let (console, _) = boot(&d, "braw", &disk, &[]);
    console.wait_for(SECTOR2_MARKER, T);
    d.wait_state("braw", "stopped", T);
    assert!(
        !console.text().contains("read failed"),
        "{}",
        console.text()
    );
}

#[test]
fn seabios_boots_a_qcow2_disk() {
    require_firmware();
    let d = Daemon::start("bios-qcow2");
    let raw = raw_disk(&d.dir, 1);
    let qcow2 = d.dir.join("disk.qcow2");
    d.ok(&[
        "create",
        "-i",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    let (console, _) = boot(&d, "bq", &qcow2, &[]);
    console.wait_for(SECTOR2_MARKER, T);
    d.wait_state("bq", "stopped", T);
}

#[test]
fn seabios_finds_two_cpus() {
    require_firmware();
    let d = Daemon::start("bios-smp");
    let disk = raw_disk(&d.dir, 1);
    // Debian's 128 KiB bios.bin is built without debug output; the
    // 256 KiB build logs to the debug port (0x402), which reaches vmd's
    // log at -v. Naming it with -b also shows -b takes a BIOS image.
    let (console, _) = boot(&d, "bsmp", &disk, &["-b", FIRMWARE_256K, "--vcpus", "2"]);
    console.wait_for(SECTOR2_MARKER, T);
    d.wait_log("firmware: Found 2 cpu(s)", T);
    d.wait_state("bsmp", "stopped", T);
}

#[test]
fn keyboard_controller_reset_boots_the_firmware_again() {
    require_firmware();
    let d = Daemon::start("bios-reset");
    let disk = raw_disk(&d.dir, 2);
    let (console, _) = boot(&d, "breset", &disk, &[]);
    let deadline = Instant::now() + T;
    while console.count(SECTOR2_MARKER) < 2 {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot twice:\n{}\nvmd log:\n{}",
            console.text(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.log().contains("vm breset: guest rebooted, restarting"),
        "{}",
        d.log()
    );
    d.ok(&["stop", "-f", "breset"]);
    d.wait_state("breset", "stopped", T);
}
