//! Pause and unpause on the real KVM: the vCPUs really stop (no console
//! output, no typed byte echoed, no CPU time burned) and resume, also with
//! an AP still waiting for its SIPI; terminate works while paused. Needs
//! root and /dev/kvm; says so loudly and passes when either is missing.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    console, files, fork_vmm, guest, kvm, launch_controlled, len, print_str, text, wait_for,
    Output, PVH_NOTE,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmd_proto::vm::{ExitReason, VmmParams};
use vmd_proto::{Channel, Msg};
use vmd_vmm::{DevOptions, Outcome};

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
    common::params("pause", vcpus, "")
}

/// The next message from the VM, failing the test after `limit`.
fn recv(chan: &Channel, limit: Duration) -> Msg {
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    loop {
        let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(ms)).unwrap();
        assert!(n > 0, "no message from the VM in {limit:?}");
        match chan.recv().unwrap().msg {
            // The vCPU statistics fds for the parent's metrics.
            Msg::VmmStats { .. } => continue,
            msg => return msg,
        }
    }
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
    let con = console();
    let (chan, thread) = launch_controlled(
        params(vcpus),
        files(kvm, con.tty, elf),
        DevOptions::default(),
    );
    assert_eq!(recv(&chan, Duration::from_secs(10)), Msg::VmmRunning);
    Vm {
        chan,
        out: con.out,
        input: con.input,
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
    let con = console();
    let (parent, pid) = fork_vmm(&kvm, &con.tty, &elf, params(1));
    assert_eq!(recv(&parent, Duration::from_secs(10)), Msg::VmmRunning);
    wait_for(&con.out, "spin\n", Duration::from_secs(10));

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
