//! BIOS boot end to end: a VM without a kernel boots Debian's SeaBIOS,
//! which loads a boot sector this test writes from a raw or qcow2 disk
//! through its own virtio-blk driver. The boot sector prints a marker to
//! COM1, reads the disk's second sector through `int 13h` (SeaBIOS's
//! driver again) and prints the marker found there, then powers off or
//! resets. An ISO built with xorriso boots the same way by El Torito from
//! the virtio-scsi CD-ROM (`-r`), and `-B` picks the disk or the CD-ROM.

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
    assemble_sector(dir, &format!("boot{action}"), BOOT_SECTOR, action)
}

/// Assembles `source` (real mode, linked at 0x7c00, `ACTION` defined as
/// `action`) into a 512-byte boot sector named after `stem` in `dir`.
fn assemble_sector(dir: &Path, stem: &str, source: &str, action: u32) -> Vec<u8> {
    let code = vmd_e2e::assemble_real_mode(dir, stem, source, &[("ACTION", action)]);
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

const CD_MARKER: &str = "VMD-CD boot image";
const CD_BLOCK2_MARKER: &str = "VMD-CD second block via int13";

/// El Torito no-emulation boot image (2048 bytes, loaded at 07c0:0000).
/// xorriso's boot info table (`-boot-info-table`) fills in the image's
/// own LBA at offset 12; the code reads the block after it (2048-byte
/// sectors through SeaBIOS's CD drive 0xE0+, so its virtio-scsi driver)
/// and prints the marker found there, then powers off.
const CD_BOOT: &str = r#"
    .code16
    .globl _start
_start:
    ljmp $0, $start
    .org 8
bi_pvd: .long 0
bi_file: .long 0
bi_length: .long 0
bi_csum: .long 0
    .org 64
start:
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
    mov bi_file, %eax
    inc %eax
    mov %eax, dap_lba
    mov $0x42, %ah
    mov drive, %dl
    mov $dap, %si
    int $0x13
    jc failed
    mov $0x9000, %si
    call puts
    mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
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
    .word 0x9000, 0
dap_lba: .quad 0
msg: .asciz "VMD-CD boot image\r\n"
err: .asciz "VMD-CD int13 read failed\r\n"
    .org 2048
"#;

/// Builds an ISO 9660 image (xorriso) whose El Torito boot image is
/// [`CD_BOOT`] followed by a block holding the second marker.
fn iso_image(dir: &Path) -> PathBuf {
    let mut image = vmd_e2e::assemble_real_mode(dir, "cdboot", CD_BOOT, &[]);
    assert_eq!(image.len(), 2048, "the boot image's code must be one block");
    let mut block2 = format!("{CD_BLOCK2_MARKER}\r\n\0").into_bytes();
    block2.resize(2048, 0);
    image.extend_from_slice(&block2);
    let root = dir.join("iso-root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("boot.img"), image).unwrap();
    let iso = dir.join("image.iso");
    assert!(
        Command::new("xorriso").arg("-version").output().is_ok(),
        "xorriso is required: install Debian's xorriso package"
    );
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "VMDTEST", "-o"])
        .arg(&iso)
        .args([
            "-b",
            "boot.img",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
        ])
        .arg(&root)
        .output()
        .expect("running xorriso");
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    iso
}

#[test]
fn seabios_boots_an_iso_from_the_virtio_scsi_cdrom() {
    require_firmware();
    let d = Daemon::start("bios-cdrom");
    let iso = iso_image(&d.dir);
    d.ok(&[
        "start",
        "-r",
        iso.to_str().unwrap(),
        "-B",
        "cdrom",
        "-m",
        "64M",
        "bcd",
    ]);
    let console = d.console("bcd");
    console.wait_for(CD_MARKER, T);
    console.wait_for(CD_BLOCK2_MARKER, T);
    d.wait_state("bcd", "stopped", T);
    assert!(
        !console.text().contains("read failed"),
        "{}",
        console.text()
    );
    let status = d.ok(&["status", "bcd"]);
    assert!(status.contains("image.iso"), "{status}");
}

#[test]
fn boot_device_picks_the_disk_or_the_cdrom_when_both_are_attached() {
    require_firmware();
    let d = Daemon::start("bios-bootorder");
    let disk = raw_disk(&d.dir, 1);
    let iso = iso_image(&d.dir);
    let iso = iso.to_str().unwrap();
    // On its own SeaBIOS boots the disk (it comes first on the bus): the
    // boot order has to name the CD-ROM for it to win...
    let started = Instant::now();
    d.ok(&[
        "start",
        "-d",
        disk.to_str().unwrap(),
        "-r",
        iso,
        "-B",
        "cdrom",
        "-m",
        "64M",
        "bcd2",
    ]);
    let console = d.console("bcd2");
    console.wait_for(CD_BLOCK2_MARKER, T);
    eprintln!("bcd2: start to CD marker: {:.2?}", started.elapsed());
    d.wait_state("bcd2", "stopped", T);
    assert!(!console.text().contains(BOOT_MARKER), "{}", console.text());
    // ...and `-B disk` boots the disk with the CD-ROM still attached.
    let (console, _) = boot(&d, "bord", &disk, &["-r", iso, "-B", "disk"]);
    console.wait_for(SECTOR2_MARKER, T);
    d.wait_state("bord", "stopped", T);
    assert!(!console.text().contains(CD_MARKER), "{}", console.text());
}

/// A boot sector that looks for ACPI the way an OS does: it scans
/// 0xe0000-0xfffff in 16-byte steps for the RSDP's "RSD PTR ", enables
/// the power button in PM1a_EN, waits for PWRBTN_STS in PM1a_STS, then
/// acknowledges it and powers off through PM1a_CNT (S5), as an ACPI
/// guest answers `vmctl stop`. Interrupts stay off: it polls.
const ACPI_SECTOR: &str = r#"
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    mov $0xe000, %bx
scan:
    mov %bx, %es
    cmpl $0x20445352, %es:0
    jne next
    cmpl $0x20525450, %es:4
    je found
next:
    inc %bx
    jnz scan
    mov $none, %si
    call puts
    jmp halt
found:
    mov $msg_found, %si
    call puts
    mov $0x602, %dx
    mov $0x0100, %ax
    out %ax, %dx
    mov $msg_armed, %si
    call puts
poll:
    pause
    mov $0x600, %dx
    in %dx, %ax
    test $0x0100, %ax
    jz poll
    mov $msg_button, %si
    call puts
    mov $0x600, %dx
    mov $0x0100, %ax
    out %ax, %dx
    mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
halt:
    hlt
    jmp halt
puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
msg_found: .asciz "BIOS-ACPI found\r\n"
msg_armed: .asciz "BIOS-ACPI armed\r\n"
msg_button: .asciz "BIOS-ACPI button\r\n"
none: .asciz "BIOS-ACPI no RSDP\r\n"
    .org 510
    .byte 0x55, 0xaa
"#;

#[test]
fn vmctl_stop_presses_the_power_button_of_an_acpi_guest_under_seabios() {
    require_firmware();
    let d = Daemon::start("bios-acpi");
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(&assemble_sector(&d.dir, "acpi", ACPI_SECTOR, 0));
    let disk = d.dir.join("acpi.raw");
    std::fs::write(&disk, image).unwrap();
    d.ok(&["start", "-d", disk.to_str().unwrap(), "-m", "64M", "bacpi"]);
    let console = d.console("bacpi");
    console.wait_for("BIOS-ACPI armed", T);
    assert!(
        console.text().contains("BIOS-ACPI found"),
        "{}",
        console.text()
    );
    // Well within the grace (3 s in the tests): the guest answered the
    // button, vmd did not have to kill it.
    let started = Instant::now();
    d.ok(&["stop", "-w", "bacpi"]);
    let took = started.elapsed();
    eprintln!("bacpi: vmctl stop -w took {took:.2?}");
    assert!(
        took < Duration::from_millis(1500),
        "stop took {took:?}\n{}",
        d.log()
    );
    console.wait_for("BIOS-ACPI button", T);
    let show = d.ok(&["status", "bacpi"]);
    assert!(
        show.contains("last exit: guest powered off"),
        "{show}\n{}",
        d.log()
    );

    // SeaBIOS's own log (the 256 KiB build) shows it took our tables:
    // it finds the FADT ("FACP") through our XSDT and parses our DSDT.
    d.ok(&[
        "start",
        "-d",
        disk.to_str().unwrap(),
        "-m",
        "64M",
        "-b",
        FIRMWARE_256K,
        "bacpi2",
    ]);
    let console = d.console("bacpi2");
    console.wait_for("BIOS-ACPI armed", T);
    d.wait_log("firmware: ACPI: parse DSDT at", T);
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("firmware: table(50434146)=") && l.contains("(via xsdt)")),
        "{log}"
    );
    d.ok(&["stop", "-w", "bacpi2"]);
    d.wait_state("bacpi2", "stopped", T);
}
