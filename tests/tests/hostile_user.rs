//! A VM owner, an instance maker and a user with no rights at all, tried
//! against the real daemon as hostile local users would: they get nothing
//! beyond their own rights (a VM's definition is the ceiling), and none of
//! them can starve the others. The limits come from docs/SECURITY.md's
//! "Limits" table, which must say what vmd-parent/src/limits.rs says.

use std::process::Output;
use std::time::Duration;

use vmd_e2e::{guest, repo_root, users, Daemon, NetNs};

const T: Duration = Duration::from_secs(60);
/// The VM owner, the instance maker (one user plays both), and a user
/// allowed to connect but owning nothing.
const OWNER: &str = "vmdhostile";
const NOBODY: &str = "vmdhostilex";
const GROUP: &str = "vmdhostileg";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// The "Limits" table of docs/SECURITY.md: (constant, value) per row.
fn limits_table() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(repo_root().join("docs/SECURITY.md")).expect("SECURITY.md");
    let section = doc
        .split("\n## Limits")
        .nth(1)
        .expect("docs/SECURITY.md has a \"## Limits\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // "| what | `CONSTANT` | value | ... |"
            let name = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(3)?.to_string()))
        })
        .collect()
}

/// A limit's value as the table gives it (a count).
fn limit(name: &str) -> usize {
    let table = limits_table();
    let value = &table
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in SECURITY.md's Limits table: {table:?}"))
        .1;
    value
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: value {value:?} is not a count"))
}

#[test]
fn the_limits_table_says_what_the_code_does() {
    let code = std::fs::read_to_string(repo_root().join("vmd-parent/src/limits.rs"))
        .expect("vmd-parent/src/limits.rs");
    let table = limits_table();
    let mut consts = 0;
    for line in code.lines() {
        let Some(rest) = line.strip_prefix("pub const ") else {
            continue;
        };
        consts += 1;
        let (name, rest) = rest.split_once(':').expect("const NAME: TYPE = VALUE;");
        let value = rest
            .split_once('=')
            .expect("= VALUE")
            .1
            .trim()
            .trim_end_matches(';');
        // 60 or Duration::from_secs(60) (the table says "60 s").
        let value = value
            .strip_prefix("Duration::from_secs(")
            .map_or(value, |v| v.trim_end_matches(')'));
        let row = table
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is missing from SECURITY.md's Limits table"));
        let doc_value = row.1.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            doc_value.replace(',', ""),
            value.replace('_', ""),
            "SECURITY.md says {name} is {}, limits.rs says {value}",
            row.1
        );
    }
    assert_eq!(consts, table.len(), "one table row per limit: {table:?}");
}

/// A vm.conf: `owned` (owner OWNER, an interface on a `locked lladdr`
/// switch) and `tpl` (instances allowed to change memory only, by OWNER).
fn setup(test: &str) -> (Daemon, NetNs) {
    users::user(OWNER, &[GROUP]);
    users::user(NOBODY, &[GROUP]);
    let dir = Daemon::dir_for(test);
    std::fs::create_dir_all(&dir).unwrap();
    let idle = guest("idle.elf");
    let idle = idle.to_str().unwrap();
    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        format!(
            "socket owner root:{GROUP}\n\
             switch sw {{\n    interface bridge77\n    locked lladdr\n}}\n\
             vm owned {{\n    boot \"{idle}\"\n    memory 32M\n    disable\n    owner {OWNER}\n    interface {{ switch sw }}\n}}\n\
             vm tpl {{\n    boot \"{idle}\"\n    memory 32M\n    disable\n    allow instance {{ memory, owner {OWNER} }}\n}}\n"
        ),
    )
    .unwrap();
    // Interfaces and bridges stay in the test's own namespace.
    let ns = NetNs::new(test);
    let d = Daemon::start_in(test, Some(&ns), &["-f", conf.to_str().unwrap()]);
    (d, ns)
}

#[test]
fn an_owner_overrides_only_the_boot_image() {
    let (d, _ns) = setup("hu-owner");
    let iso = d.dir.join("x.iso");
    std::fs::write(&iso, [0u8; 4096]).unwrap();
    let iso = iso.to_str().unwrap();
    for (args, setting) in [
        (&["--initrd", "/etc/shadow"][..], "initrd"),
        (&["--cmdline", "init=/bin/sh"], "cmdline"),
        (&["-m", "64M"], "memory"),
        (&["--vcpus", "2"], "vcpus"),
        (&["-d", "raw:/etc/shadow"], "disk"),
        (&["-r", iso], "cdrom"),
        (&["-B", "cdrom"], "boot device"),
        (&["-i", "2"], "interface"),
        (&["-L"], "interface"),
        // The VM's interface is on a locked switch: a new one would not be.
        (&["-n", "sw2"], "interface"),
    ] {
        let mut argv = vec!["start"];
        argv.extend_from_slice(args);
        argv.push("owned");
        let out = d.vmctl_as(OWNER, &argv);
        assert!(!out.status.success(), "{argv:?} allowed for the owner");
        assert_eq!(
            stderr(&out),
            format!(
                "vmctl: vm owned: its owner may change only the boot image (-b), not {setting}; \
                 ask root to change the definition"
            ),
            "{argv:?}"
        );
        assert_eq!(d.status("owned").map(|s| s.state), Some("stopped".into()));
    }
    // The boot image is the owner's to choose.
    let spin = guest("spin.elf");
    let out = d.vmctl_as(OWNER, &["start", "-b", spin.to_str().unwrap(), "owned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state("owned", "running", T);
    let out = d.vmctl_as(OWNER, &["stop", "-f", "-w", "owned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Root may still change everything.
    d.ok(&["start", "-m", "48M", "owned"]);
    d.wait_state("owned", "running", T);
    d.ok(&["stop", "-f", "-w", "owned"]);
}

#[test]
fn instances_change_only_what_allow_instance_lists() {
    let (d, _ns) = setup("hu-inst");
    let iso = d.dir.join("x.iso");
    std::fs::write(&iso, [0u8; 4096]).unwrap();
    let iso = iso.to_str().unwrap();
    let spin = guest("spin.elf");
    let spin = spin.to_str().unwrap();
    for (args, setting) in [
        (&["-r", iso][..], "cdrom"),
        (&["-B", "cdrom"], "boot device"),
        (&["-b", spin], "boot"),
        (&["--initrd", "/etc/shadow"], "initrd"),
        (&["--cmdline", "init=/bin/sh"], "cmdline"),
        (&["-d", "raw:/etc/shadow"], "disk"),
        (&["-n", "sw"], "interface"),
        (&["-i", "1"], "interface"),
        (&["-L"], "interface"),
        (&["--vcpus", "2"], "vcpus"),
    ] {
        let mut argv = vec!["start", "-t", "tpl"];
        argv.extend_from_slice(args);
        argv.push("inst");
        let out = d.vmctl_as(OWNER, &argv);
        assert_eq!(
            stderr(&out),
            format!("vmctl: vm tpl: instances may not change {setting} (allow instance)"),
            "{argv:?}"
        );
        assert!(d.status("inst").is_none(), "{argv:?} left an instance");
    }
    // What it allows, it allows.
    let out = d.vmctl_as(OWNER, &["start", "-t", "tpl", "-m", "16M", "inst"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state("inst", "running", T);
    // A stopped instance is forgotten (as OpenBSD does), so a later start
    // cannot take what the first one could not.
    let out = d.vmctl_as(OWNER, &["stop", "-f", "-w", "inst"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        d.status("inst").is_none(),
        "a stopped instance stays listed"
    );
    let out = d.vmctl_as(
        OWNER,
        &["start", "--vcpus", "2", "-d", "/etc/shadow", "inst"],
    );
    assert!(!out.status.success(), "a later start of a stopped instance");
    assert_eq!(stderr(&out), "vmctl: permission denied");
    assert!(d.status("inst").is_none());
}

#[test]
fn one_user_has_a_bounded_number_of_instances() {
    let (d, _ns) = setup("hu-icap");
    let cap = limit("MAX_INSTANCES_PER_USER");
    for i in 0..cap {
        let name = format!("i{i}");
        let out = d.vmctl_as(OWNER, &["start", "-t", "tpl", "-m", "2M", &name]);
        assert!(out.status.success(), "instance {i}: {}", stderr(&out));
    }
    let out = d.vmctl_as(OWNER, &["start", "-t", "tpl", "-m", "2M", "one-too-many"]);
    assert_eq!(
        stderr(&out),
        format!("vmctl: vm one-too-many: you have {cap} instances, the most one user may have")
    );
    assert!(d.status("one-too-many").is_none());
    // Root is not held to it, and a stopped instance frees its slot.
    d.ok(&["start", "-t", "tpl", "-m", "2M", "roots"]);
    let out = d.vmctl_as(OWNER, &["stop", "-f", "-w", "i0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.vmctl_as(OWNER, &["start", "-t", "tpl", "-m", "2M", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.ok(&["stop", "-f", "-w", "-a"]);
}

/// `hostile-client SOCKET ARGS...` as user `user`; returns the child and
/// its first line of output (what vmd did to it). The client keeps its
/// connections until the child is dropped (stdin closed, then killed).
struct Hostile {
    child: std::process::Child,
    pub said: String,
}

impl Hostile {
    fn run(d: &Daemon, user: &str, args: &[&str]) -> Hostile {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(env!("CARGO_BIN_EXE_hostile-client"))
            .arg(&d.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("runuser hostile-client");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("hostile-client output");
        Hostile {
            child,
            said: line.trim().to_string(),
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vmctl status` as `user` (None: root) must answer, within a bound that
/// only a hang can exceed.
fn status_answers(d: &Daemon, user: Option<&str>) {
    use std::process::Command;
    let mut cmd = Command::new("timeout");
    cmd.arg("20");
    if let Some(user) = user {
        cmd.args(["runuser", "-u", user, "--"]);
    }
    let out = cmd
        .arg(vmd_e2e::bin("vmctl"))
        .arg("-s")
        .arg(&d.socket)
        .arg("status")
        .output()
        .expect("vmctl status");
    assert!(
        out.status.success(),
        "vmctl status as {user:?} failed or hung: {}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("owned"));
}

#[test]
fn a_client_that_never_reads_does_not_block_root() {
    let (d, _ns) = setup("hu-flood");
    let flood = Hostile::run(&d, NOBODY, &["flood"]);
    assert!(
        flood.said.starts_with("dropped after "),
        "vmd kept a client that never reads: {}",
        flood.said
    );
    status_answers(&d, None);
    status_answers(&d, Some(OWNER));
    assert!(d.log().contains("does not read its replies; dropping it"));
}

#[test]
fn one_users_idle_connections_lock_out_no_one() {
    let (d, _ns) = setup("hu-idle");
    let share = limit("MAX_CLIENTS_PER_UID");
    let idle = Hostile::run(&d, NOBODY, &["idle", "300"]);
    assert_eq!(idle.said, format!("held {share}"));
    // Root, and another user, still get in and are served.
    status_answers(&d, None);
    status_answers(&d, Some(OWNER));
    // The one over the share is told why.
    let out = d.vmctl_as(NOBODY, &["status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the most one user may have"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_idle_client_is_dropped() {
    let (d, _ns) = setup("hu-idlet");
    let timeout = limit("CLIENT_IDLE_TIMEOUT");
    let idle = Hostile::run(&d, NOBODY, &["wait-drop"]);
    let secs: usize = idle
        .said
        .strip_prefix("dropped after ")
        .and_then(|s| s.strip_suffix(" s"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{}", idle.said));
    assert!(
        (timeout..timeout + 10).contains(&secs),
        "dropped after {secs} s, the idle timeout is {timeout} s"
    );
}

#[test]
fn memory_sizes_are_checked_once_against_the_range_and_the_host() {
    let (d, _ns) = setup("hu-mem");
    let host_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal");
    let too_big = (host_kib * 1024 + (1 << 30)).to_string();
    // vmctl and vmd say the same thing, from the same check.
    let out = d.vmctl_as(OWNER, &["start", "-t", "tpl", "-m", "1T", "big"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("memory 1.0T is more than this host has"),
        "{}",
        stderr(&out)
    );
    let raw = Hostile::run(&d, OWNER, &["start", "tpl", "big", &too_big]);
    assert!(
        raw.said.starts_with("error: vm big: memory ")
            && raw.said.contains("is more than this host has"),
        "{}",
        raw.said
    );
    let raw = Hostile::run(
        &d,
        OWNER,
        &["start", "tpl", "small", &(1u64 << 20).to_string()],
    );
    assert_eq!(
        raw.said,
        "error: vm small: memory 1.0M is outside the range 2.0M to 1.0T"
    );
    let out = d.vmctl(&["start", "-b", "/nonexistent", "-m", "1M", "small"]);
    assert!(
        stderr(&out).contains("-m 1M: memory 1.0M is outside the range 2.0M to 1.0T"),
        "{}",
        stderr(&out)
    );
    assert!(d.status("big").is_none() && d.status("small").is_none());
    // The smallest size the range allows runs.
    let out = d.vmctl_as(OWNER, &["start", "-t", "tpl", "-m", "2M", "smallest"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state("smallest", "running", T);
    d.ok(&["stop", "-f", "-w", "smallest"]);
}

#[test]
fn an_owner_has_a_bounded_number_of_consoles_and_root_always_gets_one() {
    use std::process::{Command, Stdio};
    let (d, _ns) = setup("hu-cons");
    let cap = limit("MAX_CONSOLES_PER_VM");
    d.ok(&["start", "owned"]);
    d.wait_state("owned", "running", T);
    let mut consoles = Vec::new();
    for k in 1..=cap {
        let child = Command::new("runuser")
            .args(["-u", OWNER, "--"])
            .arg(vmd_e2e::bin("vmctl"))
            .arg("-s")
            .arg(&d.socket)
            .args(["console", "owned"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("vmctl console");
        consoles.push(child);
        d.wait_log(
            &format!("console attached for uid {} ({k} attached)", uid(OWNER)),
            T,
        );
    }
    let out = d.vmctl_as(OWNER, &["console", "owned"]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        format!("vmctl: vm owned: {cap} consoles attached, the most one VM may have")
    );
    // Root still attaches.
    let root = d.console("owned");
    d.wait_log(
        &format!("console attached for uid 0 ({} attached)", cap + 1),
        T,
    );
    drop(root);
    for mut c in consoles {
        let _ = c.kill();
        let _ = c.wait();
    }
    d.ok(&["stop", "-f", "-w", "owned"]);
}

fn uid(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .expect("test user")
        .uid
        .as_raw()
}

#[test]
fn a_stopped_vm_process_does_not_hang_pause() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let (d, _ns) = setup("hu-stop");
    let timeout = limit("VMM_REQUEST_TIMEOUT");
    d.ok(&["start", "owned"]);
    let pid = d.wait_state("owned", "running", T).pid;
    let vmm = Pid::from_raw(pid as i32);
    kill(vmm, Signal::SIGSTOP).unwrap();
    let out = std::process::Command::new("timeout")
        .arg((timeout + 15).to_string())
        .arg(vmd_e2e::bin("vmctl"))
        .arg("-s")
        .arg(&d.socket)
        .args(["pause", "owned"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(124), "vmctl pause hung");
    assert_eq!(
        stderr(&out),
        format!("vmctl: vm owned: the vm process did not answer within {timeout} s; it is still running")
    );
    // Status, pause and unpause agree on what the VM process last said.
    assert_eq!(d.status("owned").map(|s| s.state), Some("running".into()));
    let out = d.vmctl(&["unpause", "owned"]);
    assert_eq!(stderr(&out), "vmctl: vm owned is not paused");
    // Once it runs again it takes the pause it was sent, and says so.
    kill(vmm, Signal::SIGCONT).unwrap();
    d.wait_state("owned", "paused", T);
    d.ok(&["unpause", "owned"]);
    assert_eq!(d.status("owned").map(|s| s.state), Some("running".into()));
    d.ok(&["stop", "-f", "-w", "owned"]);
}

#[test]
fn vmd_raises_its_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // vmd starts with the usual soft limit of a service, 1024.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    let started = std::panic::catch_unwind(|| setup("hu-nofile"));
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let (d, _ns) = started.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let want = limit("PARENT_NOFILE");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let (soft, hard): (usize, usize) = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| {
            let mut n = v.split_whitespace().map(|n| n.parse().ok());
            Some((n.next()??, n.next()??))
        })
        .expect("Max open files");
    // Where even root may not raise the hard limit, the soft one is the
    // hard one.
    assert!(
        soft >= want.min(hard) && soft > 1024,
        "vmd's open-file limit is {soft} (hard {hard}), not {want}"
    );
}

/// The console pty of VM `name`, as `vmctl status --json` shows it.
fn tty_of(d: &Daemon, name: &str) -> String {
    let show = d.ok(&["status", "--json", name]);
    show.split("\"tty\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no tty in {show}"))
        .to_string()
}

#[test]
fn a_reload_is_all_or_nothing_and_the_pty_follows_the_owner() {
    use std::os::unix::fs::MetadataExt;
    let (d, _ns) = setup("hu-reload");
    users::group("vmdhostileo");
    let conf_path = Daemon::dir_for("hu-reload").join("vm.conf");
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    let group_of = |name: &str| {
        nix::unistd::Group::from_name(name)
            .unwrap()
            .expect("test group")
            .gid
            .as_raw()
    };
    d.ok(&["start", "owned"]);
    d.wait_state("owned", "running", T);
    let tty = tty_of(&d, "owned");
    let meta = std::fs::metadata(&tty).unwrap();
    assert_eq!(meta.uid(), uid(OWNER), "{tty}");
    assert_eq!(meta.mode() & 0o077, 0, "{tty} is open to others");
    assert_eq!(std::fs::metadata(&d.socket).unwrap().gid(), group_of(GROUP));

    // A reload that fails changes nothing, the socket's owner included.
    std::fs::write(
        &conf_path,
        format!(
            "{}vm bad {{\n    memory 32M\n    owner vmd-no-such-user\n}}\n",
            conf.replace(
                &format!("socket owner root:{GROUP}"),
                "socket owner root:vmdhostileo"
            )
        ),
    )
    .unwrap();
    let out = d.vmctl(&["reload"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("vmd-no-such-user"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().gid(),
        group_of(GROUP),
        "a failed reload changed the socket's owner"
    );
    assert!(d.status("bad").is_none());

    // The owner goes: the running VM's pty is root's alone at once.
    std::fs::write(
        &conf_path,
        conf.replace(&format!("    owner {OWNER}\n"), ""),
    )
    .unwrap();
    d.ok(&["reload"]);
    let meta = std::fs::metadata(&tty).unwrap();
    assert_eq!(meta.uid(), 0, "{tty} still belongs to the former owner");
    assert_eq!(meta.mode() & 0o077, 0);
    let out = d.vmctl_as(OWNER, &["console", "owned"]);
    assert_eq!(stderr(&out), "vmctl: permission denied");
    d.ok(&["stop", "-f", "-w", "owned"]);
}

#[test]
fn a_later_vmd_removes_its_own_leftover_bridges_and_no_one_elses() {
    let (mut d, ns) = setup("hu-bridge");
    // An admin's bridge, made by hand: never vmd's to delete.
    ns.run(&["ip", "link", "add", "adminbr0", "type", "bridge"]);
    d.ok(&["start", "owned"]);
    let vm_pid = d.wait_state("owned", "running", T).pid as u32;
    let links = ns.links();
    assert!(links.contains(&"bridge77".to_string()), "{links:?}");
    // kill -9: no cleanup ran.
    let child = d.child.as_mut().expect("vmd");
    child.kill().unwrap();
    child.wait().unwrap();
    d.child = None;
    let deadline = std::time::Instant::now() + T;
    while vmd_e2e::process_alive(vm_pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ns.links().contains(&"bridge77".to_string()), "left behind");
    // The next vmd removes it, and only it.
    let _d2 = Daemon::start_in("hu-bridge2", Some(&ns), &[]);
    let deadline = std::time::Instant::now() + T;
    while ns.links().contains(&"bridge77".to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the next vmd left its predecessor's bridge: {:?}",
            ns.links()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ns.links().contains(&"adminbr0".to_string()),
        "{:?}",
        ns.links()
    );
}

#[test]
fn an_instance_keeps_its_templates_locked_lladdr() {
    users::user(OWNER, &[GROUP]);
    let ns = NetNs::new("hu-lock");
    let dir = Daemon::dir_for("hu-lock");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("vm.conf");
    let net = guest("net.elf");
    // The template's interface is locked; its guest answers from a forged
    // MAC. An instance may change interfaces, and takes another switch.
    std::fs::write(
        &conf,
        format!(
            "socket owner root:{GROUP}\n\
             switch sw {{\n    interface vmdbr8\n}}\n\
             switch open {{\n    interface vmdbr9\n}}\n\
             vm forger {{\n    boot \"{}\"\n    memory 32M\n    disable\n    \
             cmdline \"net.ip=10.78.0.4/24 net.forge=1 net.timeout=300\"\n    \
             interface {{ switch sw; locked lladdr }}\n    \
             allow instance {{ interface, owner {OWNER} }}\n}}\n",
            net.display()
        ),
    )
    .unwrap();
    let d = Daemon::start_in("hu-lock", Some(&ns), &["-f", conf.to_str().unwrap()]);
    let reach = |who: Option<&str>| {
        let args = ["start", "-t", "forger", "-n", "open", "inst"];
        let out = match who {
            Some(user) => d.vmctl_as(user, &args),
            None => d.vmctl(&args),
        };
        assert!(out.status.success(), "{}", stderr(&out));
        d.console("inst").wait_for("VMD-TEST net ready", T);
        ns.run(&["ip", "addr", "replace", "10.78.0.1/24", "dev", "vmdbr9"]);
        ns.run(&["ip", "link", "set", "vmdbr9", "up"]);
        ns.run(&["ip", "neigh", "flush", "dev", "vmdbr9"]);
        let reached = ns.ping("10.78.0.4", 3);
        d.ok(&["stop", "-f", "-w", "inst"]);
        reached
    };
    // Root may drop the lock: the forger is reached (the network works).
    assert!(reach(None), "root's unlocked instance was not reached");
    // The maker may not: the interface on the other switch stays locked,
    // and the forged frames are dropped.
    assert!(
        !reach(Some(OWNER)),
        "the instance's interface lost its template's locked lladdr"
    );
}

/// The VM process (`--role vmm`) among vmd's children, if one runs.
fn vmm_child(vmd: u32) -> Option<u32> {
    vmd_e2e::children_of(vmd).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                c.split(|b| *b == 0)
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == b"--role" && w[1] == b"vmm")
            })
            .unwrap_or(false)
    })
}

#[test]
fn a_vm_process_that_never_starts_does_not_hang_start() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::process::{Command, Stdio};
    let (d, _ns) = setup("hu-vstart");
    let timeout = limit("VMM_START_TIMEOUT");
    // Stop the VM process before it says the VM runs. That is a race with
    // its start; a try that comes too late is undone and tried again.
    for _ in 0..10 {
        let start = Command::new("timeout")
            .arg((timeout + 30).to_string())
            .arg(vmd_e2e::bin("vmctl"))
            .arg("-s")
            .arg(&d.socket)
            .args(["start", "owned"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + T;
        let vmm = loop {
            if let Some(pid) = vmm_child(d.pid()) {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "no vm process");
        };
        kill(Pid::from_raw(vmm as i32), Signal::SIGSTOP).unwrap();
        let out = start.wait_with_output().unwrap();
        assert_ne!(out.status.code(), Some(124), "vmctl start hung");
        if out.status.success() {
            // Too late: it said it runs before it stopped.
            kill(Pid::from_raw(vmm as i32), Signal::SIGCONT).unwrap();
            d.ok(&["stop", "-f", "-w", "owned"]);
            continue;
        }
        assert_eq!(
            stderr(&out),
            format!("vmctl: vm owned: vm process failed: did not start within {timeout} s")
        );
        let st = d.wait_state("owned", "stopped", T);
        assert_eq!(st.pid, 0);
        assert!(
            !vmd_e2e::process_alive(vmm),
            "the stuck vm process was left"
        );
        // And the VM starts normally again.
        d.ok(&["start", "owned"]);
        d.wait_state("owned", "running", T);
        d.ok(&["stop", "-f", "-w", "owned"]);
        return;
    }
    panic!("never caught the vm process before it ran, in 10 tries");
}
