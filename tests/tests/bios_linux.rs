//! A real operating system through SeaBIOS: a Debian bookworm disk image
//! built by `tests/guest/build-debian-disk.sh` (debootstrap, Debian's cloud
//! kernel and GRUB from grub-pc, all on the serial console) boots with no
//! kernel given, so vmd loads SeaBIOS, SeaBIOS loads GRUB's boot sector from
//! the virtio-blk disk, GRUB reads its modules, the kernel and the initrd
//! through SeaBIOS's `int 13h`, and Linux brings up systemd and a getty on
//! ttyS0, whose `login:` prompt the test waits for on `vmctl console`.
//!
//! Only where the CPU has hardware virtualization (vmx/svm): on this
//! project's nested KVM guest kernel code is emulated and Linux cannot get
//! to userspace in any sensible time. Elsewhere the test says SKIPPED, loudly,
//! before doing anything expensive (the image build downloads ~150 MiB).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmd_e2e::Daemon;

const FIRMWARE: &str = "/usr/share/seabios/bios.bin";
/// From the start command to the login prompt.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// The cached image (`VMD_DEBIAN_DISK` names a prebuilt one, for hosts
/// without Debian's mirror).
fn debian_disk() -> PathBuf {
    if let Ok(path) = std::env::var("VMD_DEBIAN_DISK") {
        return PathBuf::from(path);
    }
    let out = Command::new("bash")
        .arg(vmd_e2e::repo_root().join("tests/guest/build-debian-disk.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running tests/guest/build-debian-disk.sh");
    assert!(
        out.status.success(),
        "building the Debian disk image failed"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().expect("image path printed").trim();
    PathBuf::from(path)
}

/// A private copy for this run (the guest writes to its disk), sparse like
/// the original.
fn copy_disk(from: &Path, dir: &Path) -> PathBuf {
    let to = dir.join("debian.raw");
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(&to)
        .status()
        .expect("cp");
    assert!(status.success(), "copying {} failed", from.display());
    to
}

#[test]
fn seabios_boots_a_debian_disk_image_to_a_login_prompt() {
    if !vmd_e2e::has_hw_virt() {
        vmd_e2e::skipped(
            "bios_linux: Debian disk image (debootstrap + cloud kernel + GRUB) to a login prompt through SeaBIOS",
            "no vmx/svm in /proc/cpuinfo; this host's nested KVM emulates guest kernel code, so Linux cannot \
             reach userspace (the image is not built either)",
        );
        return;
    }
    vmd_e2e::require_kvm();
    assert!(
        Path::new(FIRMWARE).exists(),
        "{FIRMWARE} is missing: install Debian's seabios package"
    );
    let image = debian_disk();
    let d = Daemon::start("bios-linux");
    let disk = copy_disk(&image, &d.dir);

    let started = Instant::now();
    d.ok(&["start", "-d", disk.to_str().unwrap(), "-m", "512M", "bdeb"]);
    let console = d.console("bdeb");
    console.wait_for("login:", BOOT_LIMIT);
    eprintln!(
        "bios_linux: start to login prompt: {:.2?}",
        started.elapsed()
    );
    let text = console.text();
    assert!(
        text.contains("Debian GNU/Linux"),
        "the login prompt came without Debian's issue banner:\n{text}"
    );
    d.ok(&["stop", "-f", "-w", "bdeb"]);
}
