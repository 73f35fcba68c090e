//! The real Debian kernel under vmd. Its early boot runs everywhere (this
//! CI host's nested KVM emulates guest kernel code, so Linux gets as far
//! as its command line there); the full boot to the initramfs runs where
//! the CPU has hardware virtualization, and says loudly when it cannot.

use std::time::{Duration, Instant};

use vmd_e2e::{has_hw_virt, line_after, linux_guest, Daemon};

#[test]
fn debian_vmlinux_early_boot_shows_version_and_our_command_line() {
    let dir = linux_guest();
    let d = Daemon::start("linux-early");
    let kernel = dir.join("vmlinux");
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 vmd.test=early-boot panic=-1";
    let t0 = Instant::now();
    d.ok(&[
        "start",
        "-b",
        kernel.to_str().unwrap(),
        "-m",
        "256M",
        "--vcpus",
        "2",
        "--cmdline",
        cmdline,
        "linux-early",
    ]);
    let console = d.console("linux-early");
    console.wait_for("Linux version", Duration::from_secs(60));
    eprintln!(
        "TIME linux early boot: start -> 'Linux version' {:?}",
        t0.elapsed()
    );
    console.wait_for("Kernel command line:", Duration::from_secs(150));
    eprintln!(
        "TIME linux early boot: start -> 'Kernel command line:' {:?}",
        t0.elapsed()
    );
    // The line may still be arriving: wait for its end before reading it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = console.text();
    while !text
        .split_once("Kernel command line: ")
        .is_some_and(|(_, rest)| rest.contains('\n'))
    {
        assert!(
            Instant::now() < deadline,
            "command line never ended:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
        text = console.text();
    }
    let shown = text
        .lines()
        .find_map(|l| {
            l.split_once("Kernel command line: ")
                .map(|(_, c)| c.trim_end())
        })
        .expect("command line line");
    assert_eq!(shown, cmdline, "console:\n{text}");
    // Linux found our ACPI tables and, through the MADT, both vCPUs (the
    // cloud kernel ignores MP tables).
    for line in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT 0x00000000000E0040",
        "ACPI: FACP 0x00000000000E0100",
        "ACPI: DSDT 0x00000000000E0300",
        "ACPI: APIC 0x00000000000E",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs",
    ] {
        assert!(text.contains(line), "console lacks {line:?}:\n{text}");
    }
    for bad in ["ACPI BIOS Error", "ACPI Error", "ACPI Warning", "Invalid"] {
        assert!(!text.contains(bad), "console shows {bad:?}:\n{text}");
    }
    d.ok(&["stop", "-f", "-w", "linux-early"]);
}

#[test]
fn debian_linux_full_boot_with_two_vcpus() {
    if !has_hw_virt() {
        vmd_e2e::skipped(
            "debian_linux_full_boot_with_two_vcpus",
            "this CPU has no vmx/svm (nested KVM emulates guest kernel code, Linux cannot boot to userspace here); it runs on hosts with hardware virtualization",
        );
        return;
    }
    let dir = linux_guest();
    let d = Daemon::start("linux-full");
    let t0 = Instant::now();
    d.ok(&[
        "start",
        "-b",
        dir.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        dir.join("initrd.gz").to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1",
        "-m",
        "256M",
        "--vcpus",
        "2",
        "linux-full",
    ]);
    let console = d.console("linux-full");
    console.wait_for("GUEST-READY", Duration::from_secs(60));
    eprintln!(
        "TIME linux full boot: start -> GUEST-READY {:?}",
        t0.elapsed()
    );
    let text = console.text();
    assert_eq!(
        line_after(&text, "GUEST-CPUS: ").map(str::trim),
        Some("2"),
        "{text}"
    );
    // The initramfs powers off (or, without ACPI power-off, halts): either
    // way the VM must be stoppable and end up stopped.
    let _ = d.vmctl(&["stop", "-f", "-w", "linux-full"]);
    d.wait_state("linux-full", "stopped", Duration::from_secs(30));
}
