//! Network boot end to end, inside a network namespace the test makes: a
//! VM with no disk and no kernel (SeaBIOS, its debug build named as the
//! VM's BIOS image) and `boot device net` gets
//! iPXE's virtio-net option ROM, which asks the local interface's built-in
//! DHCP server for an address and a boot file, fetches that file over
//! TFTP from the host side of the /31 (a Debian in.tftpd the test runs in
//! the namespace, bound to that address only) and runs it as a PXE boot
//! program: 16-bit code at 0x7c00 that prints a marker to COM1 and powers
//! off.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmd_e2e::{has_hw_virt, Daemon, NetNs};

const T: Duration = Duration::from_secs(120);
/// Debian's SeaBIOS build with debug output (the 128 KiB bios.bin has
/// none), named as the VM's BIOS image: no kernel, no disk.
const FIRMWARE: &str = "/usr/share/seabios/bios-256k.bin";
const IPXE_ROM: &str = "/usr/lib/ipxe/qemu/pxe-virtio.rom";
const TFTPD: &str = "/usr/sbin/in.tftpd";
const MARKER: &str = "VMD-PXE boot program over TFTP";

/// The PXE boot program: iPXE loads it at 0000:7c00 and jumps there in
/// real mode. It powers off through our PM1a control register (SLP_TYP 5
/// | SLP_EN), as the BIOS boot sectors do.
const NBP: &str = r#"
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $msg, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
3:  hlt
    jmp 3b
msg: .asciz "VMD-PXE boot program over TFTP\r\n"
"#;

/// Assembles the boot program (binutils), flat at 0x7c00.
fn boot_program(dir: &Path) -> Vec<u8> {
    vmd_e2e::assemble_real_mode(dir, "nbp", NBP, &[])
}

/// An in.tftpd serving `root`, in the foreground inside `ns`; killed (by
/// its own pid: `ip netns exec` execs it) when dropped.
struct Tftpd(Child);

impl Tftpd {
    fn start(ns: &NetNs, addr: Ipv4Addr, root: &Path) -> Tftpd {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, TFTPD])
            .args(["--foreground", "--secure", "--verbose", "--address"])
            .arg(format!("{addr}:69"))
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting in.tftpd");
        Tftpd(child)
    }
}

impl Drop for Tftpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host side of the VM's local interface: the address vmd gave its
/// TAP (a /31 from the local prefix), once it has.
fn host_side(ns: &NetNs) -> Ipv4Addr {
    let deadline = Instant::now() + T;
    loop {
        let out = ns.run(&["ip", "-4", "-o", "addr", "show"]);
        let found = out.split_whitespace().find_map(|w| {
            let (a, len) = w.split_once('/')?;
            (len == "31").then(|| a.parse().ok()).flatten()
        });
        if let Some(a) = found {
            return a;
        }
        assert!(Instant::now() < deadline, "no /31 on a TAP:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ipxe_boots_a_program_over_tftp_from_the_local_interface() {
    for (path, package) in [
        (FIRMWARE, "seabios"),
        (IPXE_ROM, "ipxe-qemu"),
        (TFTPD, "tftpd-hpa"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install Debian's {package} package"
        );
    }
    let ns = NetNs::new("pxe");
    let dir = Daemon::dir_for("pxe");
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("tftp");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("boot.bin"), boot_program(&dir)).unwrap();
    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        format!(
            "vm \"pxe\" {{\n    boot \"{FIRMWARE}\"\n    memory 64M\n    local interface\n    boot device net\n    boot filename \"boot.bin\"\n    disable\n}}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start_in("pxe", Some(&ns), &["-f", conf.to_str().unwrap()]);
    d.ok(&["start", "pxe"]);
    // The TAP has its address before the VM process starts; the firmware
    // and iPXE take seconds before they ask for the file (and iPXE
    // retransmits its request), so the server is up in time.
    let host = host_side(&ns);
    let _tftpd = Tftpd::start(&ns, host, &root);
    let console = d.console("pxe");
    // SeaBIOS found the ROM in fw_cfg and ran it (the 256 KiB build logs
    // to the debug port, which reaches vmd's log at -v).
    d.wait_log("network boot: option ROM pci1af4,1041.rom", T);
    d.wait_log("firmware: Running option rom at", T);
    if !has_hw_virt() {
        // Without VMX/SVM this host's KVM (kvm-pvm) cannot run iPXE's
        // real/protected mode switches: the vCPU fails inside iPXE's
        // init, and QEMU -M pc with KVM fails the same way with the same
        // ROM (under TCG the same program boots over TFTP and prints the
        // marker).
        vmd_e2e::skipped(
            "the TFTP half of ipxe_boots_a_program_over_tftp_from_the_local_interface",
            "this CPU has no vmx/svm and its KVM cannot run iPXE (QEMU -M pc fails the same way); SeaBIOS ran the ROM, checked above; the rest runs on hosts with hardware virtualization",
        );
        return;
    }
    let deadline = Instant::now() + T;
    while !console.text().contains(MARKER) {
        assert!(
            Instant::now() < deadline,
            "no marker from the boot program:\n{}\nvmd log:\n{}",
            console.text(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_state("pxe", "stopped", T);
    let log = d.log();
    assert!(
        log.contains("firmware: Searching bootorder for: /pci@i0cf8/*@1"),
        "{log}"
    );
}
