//! Without -d, vmd daemonizes and logs to syslog (daemon facility): a
//! VM's state changes reach the system log as real syslog lines.
//! `tests/run` starts rsyslogd; without a syslog daemon this test fails
//! loudly rather than passing.

use std::process::Command;
use std::time::{Duration, Instant};

use vmd_e2e::{bin, guest, require_kvm};

/// The files rsyslog writes daemon messages to on Debian.
const LOGS: [&str; 2] = ["/var/log/syslog", "/var/log/daemon.log"];

fn system_log() -> String {
    LOGS.iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

#[test]
fn vmd_logs_vm_state_changes_to_syslog() {
    require_kvm();
    assert!(
        std::path::Path::new("/dev/log").exists()
            && LOGS.iter().any(|p| std::path::Path::new(p).exists()),
        "SYSLOG REQUIRED: no /dev/log or /var/log/syslog; install and start rsyslog (tests/run does)"
    );
    let dir = std::env::temp_dir().join(format!("vmd-e2e-{}-syslog", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vmd.sock");
    let name = format!("sl{}", std::process::id());
    // No -d: vmd forks into the background and returns once its socket
    // exists.
    let st = Command::new(bin("vmd"))
        .arg("-s")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .status()
        .expect("vmd");
    assert!(st.success(), "vmd failed to start");
    let vmctl = |args: &[&str]| {
        Command::new(bin("vmctl"))
            .arg("-s")
            .arg(&socket)
            .args(args)
            .output()
            .expect("vmctl")
    };
    let hello = guest("hello.elf");
    let out = vmctl(&["start", "-b", hello.to_str().unwrap(), "-m", "32M", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!("parent: vm {name}: stopped: guest powered off");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = system_log();
    while !log.contains(&want) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        log = system_log();
    }
    // Stop the daemon: it is the process serving our socket.
    let pids = Command::new("pgrep")
        .args(["-f", &format!("vmd -s {}", socket.display())])
        .output()
        .expect("pgrep");
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-TERM", pid]).status();
    }
    let line = log
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no syslog line {want:?} in {LOGS:?}"));
    assert!(line.contains("vmd["), "not tagged vmd[pid]: {line}");
    assert!(log
        .lines()
        .any(|l| l.contains(&format!("parent: vm {name}: running"))));
    let _ = std::fs::remove_dir_all(&dir);
}
