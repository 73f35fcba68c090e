//! Pause and unpause on the real KVM: the vCPUs really stop (no console
//! output, no typed byte echoed, no CPU time burned) and resume, also with
//! an AP still waiting for its SIPI; terminate works while paused. Needs
//! root and /dev/kvm; says so loudly and passes when either is missing.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::openpty;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use vmd_proto::vm::{ExitReason, VmmParams};
use vmd_proto::{Channel, Msg};
use vmd_vmm::{build_and_run, DevOptions, Outcome, VmFiles};

struct StderrLog;
impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        eprintln!("[{}] {}", r.level(), r.args());
    }
    fn flush(&self) {}
}

fn kvm() -> Option<OwnedFd> {
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
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

const PVH_NOTE: &str = r#"
.section .note.Xen, "a", @note
.p2align 2
.long 4, 4, 18
.asciz "Xen"
.p2align 2
.long _start
"#;

fn guest(name: &str, src: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pause-guests");
    fs::create_dir_all(&dir).unwrap();
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    let ld = dir.join("link.ld");
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

fn print_str(s: &str) -> String {
    let mut out = String::from("  mov $0x3f8, %dx\n");
    for b in s.bytes() {
        out += &format!("  mov ${b}, %al\n  out %al, %dx\n");
    }
    out
}

/// Echoes every byte received on COM1.
fn echo_guest() -> PathBuf {
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
{ready}
1: mov $0x3fd, %dx
  in %dx, %al
  test $1, %al
  jz 1b
  mov $0x3f8, %dx
  in %dx, %al
  out %al, %dx
  jmp 1b
",
        ready = print_str("ready\n")
    );
    guest("echo", &src)
}

/// Prints `ready`, waits for one byte on COM1, starts the APs (INIT,
/// SIPI, SIPI to all but self), then the BSP prints `a` and every AP `b`,
/// forever, with a short delay between bytes.
fn smp_printer_guest() -> PathBuf {
    let src = format!(
        "{PVH_NOTE}
.section .tramp, \"ax\"
.code16
ap_start:
  mov $0x3f8, %dx
  mov $'b', %al
1: out %al, %dx
  mov $20000, %ecx
2: addr32 loop 2b
  jmp 1b

.text
.code32
.globl _start
_start:
{ready}
1: mov $0x3fd, %dx
  in %dx, %al
  test $1, %al
  jz 1b
  mov $0x3f8, %dx
  in %dx, %al
  movl $0x000c4500, 0xfee00300
  mov $2000, %ecx
1: loop 1b
  movl $0x000c4610, 0xfee00300
  mov $2000, %ecx
1: loop 1b
  movl $0x000c4610, 0xfee00300
  mov $0x3f8, %dx
  mov $'a', %al
1: out %al, %dx
  mov $20000, %ecx
2: loop 2b
  jmp 1b
",
        ready = print_str("ready\n")
    );
    guest("smp-printer", &src)
}

fn spin_guest() -> PathBuf {
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
{hi}
1: jmp 1b
",
        hi = print_str("spin\n")
    );
    guest("spin", &src)
}

fn params(vcpus: u32) -> VmmParams {
    VmmParams {
        id: 7,
        name: "pause".into(),
        memory: 64 << 20,
        vcpus,
        cmdline: String::new(),
        has_initrd: false,
        uid: 0,
        gid: 0,
        verbose: false,
        disks: Vec::new(),
        nics: Vec::new(),
    }
}

/// A console pty: (master, slave in raw mode).
fn pty() -> (File, OwnedFd) {
    let p = openpty(None, None).unwrap();
    let mut t = tcgetattr(p.slave.as_fd()).unwrap();
    cfmakeraw(&mut t);
    tcsetattr(p.slave.as_fd(), SetArg::TCSANOW, &t).unwrap();
    (File::from(p.master), p.slave)
}

type Output = Arc<Mutex<Vec<u8>>>;

fn drain(mut master: File, out: Output) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

fn len(out: &Output) -> usize {
    out.lock().unwrap().len()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

fn wait_for(out: &Output, what: &str, limit: Duration) {
    let start = Instant::now();
    while !text(out).contains(what) {
        assert!(
            start.elapsed() < limit,
            "no {what:?} after {limit:?}: {:?}",
            text(out)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The next message from the VM, failing the test after `limit`.
fn recv(chan: &Channel, limit: Duration) -> Msg {
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::from(ms)).unwrap();
    assert!(n > 0, "no message from the VM in {limit:?}");
    chan.recv().unwrap().msg
}

/// Sends `msg` and expects `VmmPauseState { paused }` within 2 s.
fn ask(chan: &Channel, msg: Msg, paused: bool) -> Duration {
    let start = Instant::now();
    chan.send(&msg, 7, &[]).unwrap();
    assert_eq!(
        recv(chan, Duration::from_secs(2)),
        Msg::VmmPauseState { paused }
    );
    start.elapsed()
}

/// Asserts that the console stays silent for 500 ms.
fn assert_silent(out: &Output) {
    // Bytes written before the last vCPU parked may still be in the pty.
    std::thread::sleep(Duration::from_millis(50));
    let before = len(out);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(len(out), before, "output while paused: {:?}", text(out));
}

struct Vm {
    chan: Channel,
    out: Output,
    input: File,
    thread: JoinHandle<Outcome>,
}

fn start(kvm: OwnedFd, elf: &Path, vcpus: u32) -> Vm {
    let (master, slave) = pty();
    let input = master.try_clone().unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    drain(master, out.clone());
    let (chan, child) = Channel::pair().unwrap();
    let files = VmFiles {
        kvm,
        tty: slave,
        kernel: File::open(elf).unwrap().into(),
        initrd: None,
        disks: Vec::new(),
        taps: Vec::new(),
    };
    let p = params(vcpus);
    let thread =
        std::thread::spawn(move || build_and_run(&p, files, Some(&child), &DevOptions::default()));
    assert_eq!(recv(&chan, Duration::from_secs(10)), Msg::VmmRunning);
    Vm {
        chan,
        out,
        input,
        thread,
    }
}

/// Terminates the VM (paused or not) and expects it stopped within 2 s.
fn terminate(vm: Vm) {
    let start = Instant::now();
    vm.chan.send(&Msg::VmmTerminate, 7, &[]).unwrap();
    while !vm.thread.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "terminate did not stop the VM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        vm.thread.join().unwrap(),
        Outcome::Exited(ExitReason::Stopped)
    );
    eprintln!("stopped in {:?}", start.elapsed());
}

/// Typed bytes are not echoed while paused and are once unpaused; a
/// second pause answers the same; unpausing a running VM is harmless;
/// terminate works while paused.
#[test]
fn paused_guest_does_not_run() {
    let Some(kvm) = kvm() else { return };
    let mut vm = start(kvm, &echo_guest(), 1);
    wait_for(&vm.out, "ready\n", Duration::from_secs(10));

    vm.input.write_all(b"1").unwrap();
    wait_for(&vm.out, "ready\n1", Duration::from_secs(5));

    let took = ask(&vm.chan, Msg::VmmPause, true);
    eprintln!("paused in {took:?}");
    ask(&vm.chan, Msg::VmmPause, true);
    vm.input.write_all(b"xyz").unwrap();
    assert_silent(&vm.out);
    assert_eq!(text(&vm.out), "ready\n1");

    ask(&vm.chan, Msg::VmmUnpause, false);
    wait_for(&vm.out, "ready\n1xyz", Duration::from_secs(5));
    ask(&vm.chan, Msg::VmmUnpause, false);
    vm.input.write_all(b"2").unwrap();
    wait_for(&vm.out, "ready\n1xyz2", Duration::from_secs(5));

    // Log level changes are accepted (no answer expected).
    vm.chan.send(&Msg::SetVerbose { level: 0 }, 7, &[]).unwrap();

    ask(&vm.chan, Msg::VmmPause, true);
    terminate(vm);
}

/// Two vCPUs: paused while the AP still waits for its SIPI, the AP starts
/// fine later; then both print, both stop while paused, both resume.
#[test]
fn smp_guest_pauses_and_resumes() {
    let Some(kvm) = kvm() else { return };
    let mut vm = start(kvm, &smp_printer_guest(), 2);
    wait_for(&vm.out, "ready\n", Duration::from_secs(10));

    // The AP is in wait-for-SIPI, blocked in KVM_RUN.
    ask(&vm.chan, Msg::VmmPause, true);
    std::thread::sleep(Duration::from_millis(100));
    ask(&vm.chan, Msg::VmmUnpause, false);

    vm.input.write_all(b"g").unwrap();
    wait_for(&vm.out, "a", Duration::from_secs(10));
    wait_for(&vm.out, "b", Duration::from_secs(10));

    for round in 0..3 {
        let took = ask(&vm.chan, Msg::VmmPause, true);
        eprintln!("round {round}: paused in {took:?}");
        assert_silent(&vm.out);
        let before = text(&vm.out);
        let (a, b) = (before.matches('a').count(), before.matches('b').count());
        ask(&vm.chan, Msg::VmmUnpause, false);
        let start = Instant::now();
        loop {
            let now = text(&vm.out);
            if now.matches('a').count() > a && now.matches('b').count() > b {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "round {round}: not both vCPUs resumed: {a} a, {b} b before, now {} a, {} b",
                now.matches('a').count(),
                now.matches('b').count()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    ask(&vm.chan, Msg::VmmPause, true);
    terminate(vm);
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: nix::unistd::Pid) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parens.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_over(pid: nix::unistd::Pid, d: Duration) -> u64 {
    let t0 = cpu_ticks(pid);
    std::thread::sleep(d);
    cpu_ticks(pid) - t0
}

/// The real VM process (forked, through `run()`): a spinning guest burns
/// a CPU, and nothing once paused.
#[test]
fn paused_vm_process_burns_no_cpu() {
    let Some(kvm) = kvm() else { return };
    let elf = spin_guest();
    let (master, slave) = pty();
    let out = Arc::new(Mutex::new(Vec::new()));
    drain(master, out.clone());
    let (parent, child) = Channel::pair().unwrap();
    // SAFETY: the child only runs vmd_vmm::run and exits.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(parent);
            let code = vmd_vmm::run(child);
            // SAFETY: leave without running the test harness's atexit code.
            unsafe { libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child: pid } => {
            drop(child);
            let mut p = params(1);
            p.uid = 65534;
            p.gid = 65534;
            let kernel: OwnedFd = File::open(&elf).unwrap().into();
            parent
                .send(
                    &Msg::VmmStart(p),
                    7,
                    &[kvm.as_fd(), slave.as_fd(), kernel.as_fd()],
                )
                .unwrap();
            assert_eq!(recv(&parent, Duration::from_secs(10)), Msg::VmmRunning);
            wait_for(&out, "spin\n", Duration::from_secs(10));

            let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .unwrap_or(100) as u64;
            let window = Duration::from_secs(1);
            let running = ticks_over(pid, window);
            ask(&parent, Msg::VmmPause, true);
            let paused = ticks_over(pid, window);
            ask(&parent, Msg::VmmUnpause, false);
            let resumed = ticks_over(pid, window);
            eprintln!(
                "CPU ticks per {window:?} (HZ {hz}): running {running}, paused {paused}, resumed {resumed}"
            );
            // Spinning is about one CPU (at least a fifth of one on a
            // busy host); paused is nothing (0 measured; 2% allowed).
            assert!(
                running >= hz / 5,
                "spinning guest used only {running} ticks"
            );
            assert!(resumed >= hz / 5, "resumed guest used only {resumed} ticks");
            assert!(paused <= hz / 50, "paused VM still used {paused} ticks");

            ask(&parent, Msg::VmmPause, true);
            parent.send(&Msg::VmmTerminate, 7, &[]).unwrap();
            assert_eq!(
                recv(&parent, Duration::from_secs(2)),
                Msg::VmmExited(ExitReason::Stopped)
            );
            let status = nix::sys::wait::waitpid(pid, None).unwrap();
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
        }
    }
}
