//! Fault isolation and load: a VM process that dies takes nothing else
//! with it, a dead role makes vmd stop cleanly (never hang), a hostile
//! guest gets errors, and many VM starts leave no fd or process behind.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmd_e2e::{children_of, guest, process_alive, Daemon};

const T: Duration = Duration::from_secs(90);

fn role_pid(parent: u32, role: &str) -> u32 {
    children_of(parent)
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&format!("--role\0{role}\0")))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no {role} process under {parent}"))
}

#[test]
fn killing_one_vm_process_leaves_vmd_and_the_other_vms_running() {
    let d = Daemon::start("iso-kill");
    let idle = guest("idle.elf");
    for name in ["v1", "v2", "v3"] {
        d.boot(&idle, "16M", name);
    }
    let pids: Vec<u32> = ["v1", "v2", "v3"]
        .iter()
        .map(|n| d.wait_state(n, "running", T).pid as u32)
        .collect();
    kill(Pid::from_raw(pids[1] as i32), Signal::SIGKILL).unwrap();
    let st = d.wait_state("v2", "stopped", T);
    assert!(
        st.last_exit.contains("Signal") && st.last_exit.contains('9'),
        "{st:?}"
    );
    let show = d.ok(&["status", "v2"]);
    assert!(
        show.contains("last exit: vm process killed by signal 9"),
        "{show}"
    );
    for (name, pid) in [("v1", pids[0]), ("v3", pids[2])] {
        let st = d.status(name).expect("status");
        assert_eq!(
            (st.state.as_str(), st.pid as u32),
            ("running", pid),
            "{name}"
        );
    }
    // And vmd still serves: the killed VM starts again.
    d.ok(&["start", "v2"]);
    d.wait_state("v2", "running", T);
}

#[test]
fn a_dead_priv_or_control_makes_vmd_stop_cleanly() {
    for role in ["priv", "control"] {
        let mut d = Daemon::start(&format!("iso-{role}"));
        let idle = guest("idle.elf");
        d.boot(&idle, "16M", "victim");
        let vm = d.wait_state("victim", "running", T).pid as u32;
        let parent = d.pid();
        let pid = role_pid(parent, role);
        let others: Vec<u32> = children_of(parent);
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let t0 = Instant::now();
        let code = d.terminate_wait(Duration::from_secs(30));
        eprintln!("TIME {role} killed: vmd exited after {:?}", t0.elapsed());
        assert_eq!(code, Some(1), "vmd should exit 1 after losing {role}");
        for p in others.iter().chain([&vm]) {
            assert!(
                !process_alive(*p),
                "process {p} left behind after {role} died"
            );
        }
        assert!(
            d.log().contains(&format!("{role} process died")),
            "{}",
            d.log()
        );
    }
}

#[test]
fn hostile_guest_gets_errors_and_the_host_carries_on() {
    let d = Daemon::start("iso-evil");
    let disk = d.dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let blk = guest("blk.elf");
    d.ok(&[
        "start",
        "-b",
        blk.to_str().unwrap(),
        "-m",
        "32M",
        "-d",
        disk.to_str().unwrap(),
        "--cmdline",
        "evil:loop evil:oob evil:garbage read:0:1",
        "evil",
    ]);
    let console = d.console("evil");
    console.wait_for("VMD-TEST blk done", T);
    let text = console.text();
    assert!(
        text.contains("needs-reset=1"),
        "descriptor loop not refused:\n{text}"
    );
    assert!(
        text.contains("evil oob status 1"),
        "out-of-RAM buffer not refused:\n{text}"
    );
    assert!(text.contains("evil garbage recovered status 0"), "{text}");
    assert!(text.contains("read 0 1 status 0"), "{text}");
    let st = d.wait_state("evil", "stopped", T);
    assert!(st.last_exit.contains("PowerOff"), "{st:?}");
}

#[test]
fn twenty_vms_ten_rounds_leave_no_fd_or_process_behind() {
    let d = Daemon::start("iso-load");
    let idle = guest("idle.elf");
    let parent = d.pid();
    let fds = || std::fs::read_dir(format!("/proc/{parent}/fd")).map_or(0, |d| d.count());
    // An answered request means priv and control are both up.
    d.ok(&["status"]);
    let start_fds = fds();
    let start_children = children_of(parent).len();
    let names: Vec<String> = (0..20).map(|i| format!("load{i}")).collect();
    let t0 = Instant::now();
    for round in 0..10 {
        for name in &names {
            d.boot(&idle, "16M", name);
        }
        for name in &names {
            d.wait_state(name, "running", T);
        }
        assert_eq!(
            children_of(parent).len(),
            start_children + 20,
            "round {round}"
        );
        d.ok(&["stop", "-a", "-f", "-w"]);
        assert_eq!(children_of(parent).len(), start_children, "round {round}");
    }
    eprintln!("TIME 10 rounds of 20 VMs: {:?}", t0.elapsed());
    // Forgetting the VMs returns every fd (ptys and console logs included).
    d.ok(&["reset", "vms"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fds() != start_fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fds(), start_fds, "vmd holds more fds than at start");
    assert_eq!(children_of(parent).len(), start_children);
}
