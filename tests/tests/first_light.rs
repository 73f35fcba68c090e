//! First light: test guests boot through vmd's real processes, driven by
//! vmctl as an admin would, and their console is read through
//! `vmctl console`. Times are printed, never asserted.

use std::time::{Duration, Instant};

use vmd_e2e::{children_of, guest, line_after, proc_status, process_alive, Daemon};

const BOOT: Duration = Duration::from_secs(60);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn hello_guest_sees_cmdline_memory_and_every_cpu_then_powers_off() {
    let d = Daemon::start("hello");
    let kernel = guest("hello.elf");
    let cmdline = "vmd-test hello=1 console=ttyS0";
    let t0 = Instant::now();
    let started = d.ok(&[
        "start",
        "-b",
        kernel.to_str().unwrap(),
        "-m",
        "64M",
        "--vcpus",
        "2",
        "--cmdline",
        cmdline,
        "hello1",
    ]);
    assert!(
        started.contains("hello1") || started.is_empty(),
        "{started}"
    );
    let console = d.console("hello1");
    console.wait_for("VMD-TEST hello done", BOOT);
    eprintln!("TIME hello: start -> 'hello done' {:?}", t0.elapsed());
    let text = console.text();
    assert!(text.contains("VMD-TEST hello start"), "{text}");
    assert_eq!(line_after(&text, "cmdline: "), Some(cmdline), "{text}");
    let kib: u64 = line_after(&text, "mem-total-ram: ")
        .and_then(|v| v.trim_end_matches(" KiB").parse().ok())
        .unwrap_or_else(|| panic!("no mem-total-ram line:\n{text}"));
    // 64 MiB less the legacy holes below 1 MiB.
    assert!(
        (63 * 1024..=64 * 1024).contains(&kib),
        "guest saw {kib} KiB:\n{text}"
    );
    assert_eq!(
        line_after(&text, "cpus: "),
        Some("mp-table=2 started=2"),
        "{text}"
    );
    assert!(!text.contains("VMD-TEST error"), "{text}");
    let st = d.wait_state("hello1", "stopped", BOOT);
    assert!(st.last_exit.contains("PowerOff"), "{st:?}");
    let show = d.ok(&["status", "hello1"]);
    assert!(show.contains("hello1"), "{show}");
    assert!(
        d.log().contains("vm hello1: stopped: guest powered off"),
        "{}",
        d.log()
    );
}

#[test]
fn reset_guest_is_restarted_then_stopped_as_a_reboot_loop() {
    let d = Daemon::start("reset");
    let kernel = guest("reset.elf");
    let t0 = Instant::now();
    d.boot(&kernel, "32M", "reset1");
    let console = d.console("reset1");
    console.wait_for("VMD-TEST reset", BOOT);
    eprintln!("TIME reset: start -> first marker {:?}", t0.elapsed());
    // The guest resets at once each time; vmd restarts it on the same
    // console until the reboot-loop guard (3 in 6 s) stops it.
    let st = d.wait_state("reset1", "stopped", BOOT);
    assert!(st.restarts >= 1, "{st:?}");
    assert!(console.count("VMD-TEST reset") >= 2, "{}", console.text());
    assert!(
        !console.text().contains("reset failed"),
        "{}",
        console.text()
    );
    assert!(
        st.last_exit.contains("RebootLoop") || st.restarts >= 3,
        "{st:?}"
    );
    assert!(
        d.log().contains("vm reset1: guest rebooted, restarting"),
        "{}",
        d.log()
    );
}

#[test]
fn spinning_guest_stops_with_force_and_vm_process_is_unprivileged() {
    let d = Daemon::start("spin");
    let kernel = guest("spin.elf");
    d.boot(&kernel, "32M", "spin1");
    let console = d.console("spin1");
    console.wait_for("VMD-TEST spin", BOOT);
    let st = d.wait_state("spin1", "running", BOOT);
    let pid = st.pid as u32;
    assert!(pid > 0);
    // The VM process runs unprivileged, with no capabilities and
    // no_new_privs, while the guest runs.
    let uid = proc_status(pid, "Uid").expect("Uid");
    assert!(uid.split_whitespace().all(|u| u != "0"), "vmm Uid: {uid}");
    assert_eq!(
        proc_status(pid, "CapEff").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(
        proc_status(pid, "CapPrm").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(proc_status(pid, "NoNewPrivs").as_deref(), Some("1"));
    // A second start of a running VM is refused and changes nothing.
    let again = d.vmctl(&["start", "-b", kernel.to_str().unwrap(), "spin1"]);
    assert!(!again.status.success());
    assert_eq!(stderr(&again).trim(), "vmctl: vm spin1 is already running");
    assert_eq!(d.status("spin1").map(|s| s.pid), Some(st.pid));

    let t0 = Instant::now();
    d.ok(&["stop", "-f", "-w", "spin1"]);
    eprintln!("TIME spin: stop -f -w took {:?}", t0.elapsed());
    let st = d.status("spin1").expect("status");
    assert_eq!(st.state, "stopped");
    assert!(st.last_exit.contains("Stopped"), "{st:?}");
    assert!(!process_alive(pid), "vm process {pid} still alive");
}

#[test]
fn graceful_stop_waits_for_the_vm_to_end() {
    let d = Daemon::start("stopw");
    let kernel = guest("spin.elf");
    d.boot(&kernel, "32M", "spin2");
    let pid = d.wait_state("spin2", "running", BOOT).pid as u32;
    // spin.elf ignores the power button: vmd stops it after the grace.
    let t0 = Instant::now();
    d.ok(&["stop", "-w", "spin2"]);
    let took = t0.elapsed();
    eprintln!("TIME spin: stop -w (no ACPI) took {took:?}");
    let grace: u64 = vmd_e2e::STOP_GRACE_SECS.parse().unwrap();
    assert!(took >= Duration::from_secs(grace), "{took:?}");
    let st = d.status("spin2").expect("status");
    assert_eq!(st.state, "stopped");
    assert!(st.last_exit.contains("Stopped"), "{st:?}");
    assert!(
        d.log()
            .contains("vm spin2: guest did not power off, stopping it"),
        "{}",
        d.log()
    );
    assert!(!process_alive(pid));
    let again = d.vmctl(&["stop", "spin2"]);
    assert!(!again.status.success());
    assert_eq!(stderr(&again).trim(), "vmctl: vm spin2 is not running");
}

#[test]
fn stop_presses_the_acpi_power_button() {
    let d = Daemon::start("acpi");
    let kernel = guest("acpi.elf");
    d.boot(&kernel, "32M", "acpi1");
    let console = d.console("acpi1");
    console.wait_for("VMD-TEST acpi ready", BOOT);
    let t0 = Instant::now();
    d.ok(&["stop", "-w", "acpi1"]);
    let took = t0.elapsed();
    eprintln!("TIME acpi: stop -w took {took:?}");
    console.wait_for("VMD-TEST acpi power button", Duration::from_secs(5));
    let st = d.status("acpi1").expect("status");
    assert_eq!(st.state, "stopped");
    // The guest powered itself off: not the fallback after the grace.
    assert!(st.last_exit.contains("PowerOff"), "{st:?}");
    let grace: u64 = vmd_e2e::STOP_GRACE_SECS.parse().unwrap();
    assert!(took < Duration::from_secs(grace), "{took:?}");
}

#[test]
fn guest_crash_is_reported_with_reason_and_registers() {
    let d = Daemon::start("crash");
    let kernel = guest("badinsn.elf");
    d.boot(&kernel, "32M", "bad1");
    let console = d.console("bad1");
    console.wait_for("VMD-TEST badinsn", BOOT);
    let st = d.wait_state("bad1", "stopped", BOOT);
    assert!(st.last_exit.contains("GuestCrash"), "{st:?}");
    assert!(
        st.last_exit.contains("emulation failure") || st.last_exit.contains("triple fault"),
        "{st:?}"
    );
    assert!(st.last_exit.contains("rip"), "registers missing: {st:?}");
    let log = d.log();
    assert!(log.contains("vm bad1: stopped: guest crashed"), "{log}");
    let show = d.ok(&["status", "bad1"]);
    assert!(show.contains("guest crashed"), "{show}");
}

#[test]
fn bad_requests_get_one_line_errors_and_change_nothing() {
    // No daemon at all.
    let d = Daemon::start("errors");
    let missing = d.dir.join("nowhere.sock");
    let out = std::process::Command::new(vmd_e2e::bin("vmctl"))
        .arg("-s")
        .arg(&missing)
        .arg("status")
        .output()
        .expect("vmctl");
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).starts_with("vmctl: "), "{}", stderr(&out));
    assert!(stderr(&out).contains("vmd running"), "{}", stderr(&out));

    // A kernel that does not exist.
    let out = d.vmctl(&["start", "-b", "/nonexistent/kernel", "ghost"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vmctl: vm ghost: kernel /nonexistent/kernel"),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
    assert!(
        d.status("ghost").is_none(),
        "a failed start left a VM behind"
    );
    assert!(children_of(d.pid()).len() == 2, "only priv and control run");

    // Not a kernel at all: the VM process refuses it; nothing stays.
    let junk = d.dir.join("junk.bin");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let out = d.vmctl(&["start", "-b", junk.to_str().unwrap(), "junk"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(d.status("junk").is_none());

    // Bad names and sizes are refused before anything starts.
    let out = d.vmctl(&["start", "-b", "/bin/true", "bad name"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1);
    let out = d.vmctl(&["start", "-b", "/bin/true", "-m", "lots", "x"]);
    assert!(!out.status.success());
    let out = d.vmctl(&["status"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).lines().count(),
        1,
        "only the header: {}",
        stdout(&out)
    );
}

/// Host shutdown (systemctl stop, SIGTERM): every guest's power button
/// is pressed at once; an ACPI guest powers itself off, the others are
/// stopped once `--stop-grace` has passed, and nothing is left behind.
#[test]
fn sigterm_powers_guests_off_then_stops_the_rest_and_leaves_no_process() {
    let mut d = Daemon::start("sigterm");
    let spin = guest("spin.elf");
    for name in ["t1", "t2"] {
        d.boot(&spin, "32M", name);
    }
    d.boot(&guest("acpi.elf"), "32M", "t3");
    let console = d.console("t3");
    console.wait_for("VMD-TEST acpi ready", BOOT);
    let pids: Vec<u32> = ["t1", "t2", "t3"]
        .iter()
        .map(|n| d.wait_state(n, "running", BOOT).pid as u32)
        .collect();
    let mut all = children_of(d.pid());
    assert_eq!(
        all.len(),
        5,
        "priv, control and three VM processes: {all:?}"
    );
    for pid in &pids {
        assert!(all.contains(pid));
    }
    let t0 = Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    // The ACPI guest sees its power button and powers off by itself, long
    // before the grace is up.
    console.wait_for("VMD-TEST acpi power button", Duration::from_secs(5));
    d.wait_log("vm t3: stopped: guest powered off", Duration::from_secs(5));
    let off = t0.elapsed();
    eprintln!("TIME sigterm: ACPI guest powered off after {off:?}");
    let grace = Duration::from_secs(vmd_e2e::STOP_GRACE_SECS.parse().unwrap());
    assert!(off < grace, "{off:?}");
    // The others ignore the button and are stopped after the grace.
    assert_eq!(d.terminate_wait(grace + Duration::from_secs(15)), Some(0));
    let took = t0.elapsed();
    eprintln!("TIME sigterm: vmd exit took {took:?}");
    assert!(took >= grace, "{took:?}");
    let log = d.log();
    for name in ["t1", "t2"] {
        assert!(
            log.contains(&format!("vm {name}: guest did not power off, stopping it")),
            "{log}"
        );
    }
    all.retain(|pid| process_alive(*pid));
    assert!(all.is_empty(), "left behind: {all:?}");
    assert!(!d.socket.exists(), "socket left behind");
}

#[test]
fn console_replays_output_and_reattaches() {
    let d = Daemon::start("console");
    let kernel = guest("spin.elf");
    d.boot(&kernel, "32M", "c1");
    let first = d.console("c1");
    first.wait_for("VMD-TEST spin", BOOT);
    drop(first);
    // Attaching later still shows what the guest printed before.
    let second = d.console("c1");
    second.wait_for("VMD-TEST spin", Duration::from_secs(5));
    d.ok(&["stop", "-f", "-w", "c1"]);
    let log = std::fs::read_to_string(d.dir.join("state/console/c1.log")).expect("console log");
    assert!(log.contains("VMD-TEST spin"), "{log}");
}

#[test]
fn console_input_reaches_the_guest_and_wait_returns_at_poweroff() {
    let d = Daemon::start("echo");
    let kernel = guest("echo.elf");
    d.boot(&kernel, "32M", "echo1");
    let mut console = d.console("echo1");
    console.wait_for("VMD-TEST echo ready", BOOT);
    console.type_text("hello, guest");
    console.wait_for("hello, guest", Duration::from_secs(10));
    // `vmctl wait` blocks until the guest powers off, and says why.
    let socket = d.socket.clone();
    let waiter = std::thread::spawn(move || {
        std::process::Command::new(vmd_e2e::bin("vmctl"))
            .arg("-s")
            .arg(&socket)
            .args(["wait", "echo1"])
            .output()
            .expect("vmctl wait")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "vmctl wait returned while the VM runs"
    );
    console.type_text("q");
    console.wait_for("VMD-TEST echo bye", Duration::from_secs(10));
    let out = waiter.join().expect("wait thread");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vm echo1 stopped: guest powered off"),
        "{}",
        stderr(&out)
    );
    assert!(
        console.wait_exit(Duration::from_secs(5)),
        "console did not end with the VM"
    );
}
