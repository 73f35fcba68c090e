//! The harness every KVM test here shares: the /dev/kvm and root check,
//! a raw console pty whose output a thread collects, tiny guests assembled
//! with `as`/`ld`, the project's tests/guests built by their build.sh, and
//! starting a VM (`build_and_run` on a thread, or `run()` in a fork).
//!
//! Each test binary uses only part of it.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::pty::openpty;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use nix::unistd::Pid;
use vmd_proto::vm::VmmParams;
use vmd_proto::{Channel, Msg};
use vmd_vmm::{build_and_run, DevOptions, Outcome, VmFiles};

struct StderrLog;
impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("[{}] {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Logs to stderr up to `level`; the first call in a test binary wins.
pub fn init_log(level: log::LevelFilter) {
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
}

/// /dev/kvm opened read-write, or None (and a loud note) if unusable.
pub fn kvm() -> Option<OwnedFd> {
    init_log(log::LevelFilter::Info);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: not root");
        return None;
    }
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => Some(f.into()),
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm: {e}");
            None
        }
    }
}

/// Everything the guest has written to its console so far.
pub type Output = Arc<Mutex<Vec<u8>>>;

/// A guest console: a pty in raw mode whose output a thread collects.
pub struct Console {
    /// What the guest wrote.
    pub out: Output,
    /// The slave side, the VM's tty.
    pub tty: OwnedFd,
    /// The master side, for typing to the guest.
    pub input: File,
}

/// A fresh console pty, its output collected until the master sees EOF.
pub fn console() -> Console {
    let p = openpty(None, None).unwrap();
    let mut t = tcgetattr(p.slave.as_fd()).unwrap();
    cfmakeraw(&mut t);
    tcsetattr(p.slave.as_fd(), SetArg::TCSANOW, &t).unwrap();
    let mut master = File::from(p.master);
    let input = master.try_clone().unwrap();
    let out = Output::default();
    let o = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    Console {
        out,
        tty: p.slave,
        input,
    }
}

pub fn len(out: &Output) -> usize {
    out.lock().unwrap().len()
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

/// Waits until the output contains `what`; fails the test after `limit`.
pub fn wait_for(out: &Output, what: &str, limit: Duration) {
    wait_until(out, limit, &format!("no {what:?}"), |o| o.contains(what));
}

/// Waits until the output ends with `what`; fails the test after `limit`.
pub fn wait_for_end(out: &Output, what: &str, limit: Duration) {
    wait_until(out, limit, &format!("output not ending in {what:?}"), |o| {
        o.ends_with(what)
    });
}

fn wait_until(out: &Output, limit: Duration, failure: &str, done: impl Fn(&str) -> bool) {
    let start = Instant::now();
    while !done(&text(out)) {
        assert!(
            start.elapsed() < limit,
            "{failure} after {limit:?}: {:?}",
            text(out)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// 64 MiB, running as root, not verbose: override fields as needed.
pub fn params(name: &str, vcpus: u32, cmdline: &str) -> VmmParams {
    VmmParams {
        id: 7,
        name: name.into(),
        memory: 64 << 20,
        vcpus,
        cmdline: cmdline.into(),
        has_initrd: false,
        uid: 0,
        gid: 0,
        verbose: false,
        disks: Vec::new(),
        nics: Vec::new(),
        cdrom: false,
        boot_device: None,
    }
}

/// The files for booting `kernel` on `tty`, with no initrd, disk or NIC.
pub fn files(kvm: OwnedFd, tty: OwnedFd, kernel: &Path) -> VmFiles {
    VmFiles {
        kvm,
        tty,
        kernel: File::open(kernel).unwrap().into(),
        initrd: None,
        disks: Vec::new(),
        cdrom: None,
        taps: Vec::new(),
        devices: Vec::new(),
        option_rom: None,
    }
}

/// A VM running on its own thread, without a control channel.
pub struct Running {
    pub out: Output,
    pub done: mpsc::Receiver<Outcome>,
}

/// Runs `build_and_run` on a thread; the outcome arrives on `done`.
pub fn launch(p: VmmParams, files: VmFiles, out: Output, opts: DevOptions) -> Running {
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(build_and_run(&p, files, None, &opts));
    });
    Running { out, done }
}

impl Running {
    pub fn output(&self) -> String {
        text(&self.out)
    }

    /// Waits for the VM to end (failing the test after `limit`); returns
    /// its outcome and console output.
    pub fn finish(self, limit: Duration) -> (Outcome, String) {
        let outcome = self.done.recv_timeout(limit).unwrap_or_else(|_| {
            panic!(
                "guest did not finish in {limit:?}; output:\n{}",
                self.output()
            )
        });
        // Let the console thread pick up the last bytes.
        std::thread::sleep(Duration::from_millis(100));
        let output = self.output();
        eprintln!("guest output:\n{output}\noutcome: {outcome:?}");
        (outcome, output)
    }
}

/// Runs `build_and_run` on a thread, controlled through the returned
/// channel (the VM's first message, VmmRunning, is left to the caller).
pub fn launch_controlled(
    p: VmmParams,
    files: VmFiles,
    opts: DevOptions,
) -> (Channel, JoinHandle<Outcome>) {
    let (chan, child) = Channel::pair().unwrap();
    let thread = std::thread::spawn(move || build_and_run(&p, files, Some(&child), &opts));
    (chan, thread)
}

/// Forks a child running the real `vmd_vmm::run` and sends it VmmStart
/// with `p` (as uid/gid 65534) and the kvm, tty and kernel fds; returns
/// the parent's channel and the child's pid.
pub fn fork_vmm(kvm: &OwnedFd, tty: &OwnedFd, kernel: &Path, p: VmmParams) -> (Channel, Pid) {
    let (parent, child) = Channel::pair().unwrap();
    // SAFETY: the child only runs vmd_vmm::run and exits.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(parent);
            let code = vmd_vmm::run(child, &vmd_sandbox::VMM);
            // SAFETY: leave without running the test harness's atexit code.
            unsafe { libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child: pid } => {
            drop(child);
            let p = VmmParams {
                uid: 65534,
                gid: 65534,
                ..p
            };
            let kernel: OwnedFd = File::open(kernel).unwrap().into();
            parent
                .send(
                    &Msg::VmmStart(p),
                    7,
                    &[kvm.as_fd(), tty.as_fd(), kernel.as_fd()],
                )
                .unwrap();
            (parent, pid)
        }
    }
}

/// A directory of this test binary's own under CARGO_TARGET_TMPDIR.
pub fn tmp_dir(what: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{what}", env!("CARGO_CRATE_NAME")));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The project's freestanding test guests (tests/guests), built by their
/// build.sh once per test binary; returns the directory holding the ELFs.
pub fn project_guests() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = project_guests_script();
            let out = tmp_dir("project-guests");
            let st = Command::new("sh").arg(&script).arg(&out).status().unwrap();
            assert!(st.success(), "tests/guests/build.sh failed");
            out
        })
        .clone()
}

pub fn project_guests_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/build.sh")
}

const LINKER_SCRIPT: &str = "
ENTRY(_start)
SECTIONS {
  . = 0x10000;
  .tramp : { *(.tramp) }
  . = 0x100000;
  .text : { *(.text) }
  .note.Xen : { *(.note.Xen) }
  /DISCARD/ : { *(.note.gnu.property) }
}
";

/// The PVH note: 32-bit entry at `_start`.
pub const PVH_NOTE: &str = r#"
.section .note.Xen, "a", @note
.p2align 2
.long 4, 4, 18
.asciz "Xen"
.p2align 2
.long _start
"#;

/// Power off through PM1a (SLP_TYP 5 | SLP_EN) then halt.
pub const POWEROFF: &str = "
  mov $0x604, %dx
  mov $0x3400, %ax
  out %ax, %dx
9: hlt
  jmp 9b
";

/// Assembles and links `src` into an ELF; returns its path.
pub fn guest(name: &str, src: &str) -> PathBuf {
    let dir = tmp_dir("asm-guests");
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    // One linker script per guest: tests run in parallel, and a shared
    // script rewritten (truncated) by one test while another's ld reads
    // it links that guest at the wrong address.
    let ld = dir.join(format!("{name}.ld"));
    let elf = dir.join(format!("{name}.elf"));
    fs::write(&s, src).unwrap();
    fs::write(&ld, LINKER_SCRIPT).unwrap();
    let st = Command::new("as")
        .args(["--64", "-o"])
        .arg(&o)
        .arg(&s)
        .status()
        .unwrap();
    assert!(st.success(), "as failed for {name}");
    let st = Command::new("ld")
        .args(["-m", "elf_x86_64", "-nostdlib", "--build-id=none"])
        .args(["-z", "max-page-size=0x1000", "-T"])
        .arg(&ld)
        .arg("-o")
        .arg(&elf)
        .arg(&o)
        .status()
        .unwrap();
    assert!(st.success(), "ld failed for {name}");
    elf
}

/// Emits code printing the NUL-terminated string at (%esi) / (%rsi).
pub fn print_esi(reg: &str) -> String {
    format!(
        "
  mov $0x3f8, %dx
1: movb ({reg}), %al
  test %al, %al
  jz 2f
  out %al, %dx
  inc {reg}
  jmp 1b
2:
"
    )
}

/// Emits code printing `s` on COM1, byte by byte.
pub fn print_str(s: &str) -> String {
    let mut out = String::from("  mov $0x3f8, %dx\n");
    for b in s.bytes() {
        out += &format!("  mov ${b}, %al\n  out %al, %dx\n");
    }
    out
}
