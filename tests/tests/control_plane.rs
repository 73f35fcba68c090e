//! The control plane as an admin uses it: vm.conf autostart, SIGHUP and
//! `vmctl reload`, owners and the socket group, pause/unpause, `vmd -n`.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use vmd_e2e::{bin, guest, users, Daemon};

const T: Duration = Duration::from_secs(60);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn vm_block(name: &str, kernel: &str, enabled: bool, extra: &str) -> String {
    let enable = if enabled { "enable" } else { "disable" };
    format!("vm {name} {{\n    boot \"{kernel}\"\n    memory 32M\n    {enable}\n{extra}}}\n")
}

#[test]
fn vm_conf_autostart_reload_and_broken_edits() {
    let dir = Daemon::dir_for("conf");
    std::fs::create_dir_all(&dir).unwrap();
    let spin = guest("spin.elf");
    let spin = spin.to_str().unwrap();
    let conf = dir.join("vm.conf");
    let base = format!(
        "# test configuration\nkernel = \"{spin}\"\nstaggered start parallel 4 delay 1\n{}{}{}",
        vm_block("auto1", "$kernel", true, ""),
        vm_block("auto2", "$kernel", true, ""),
        vm_block("manual", "$kernel", false, ""),
    )
    .replace("\"$kernel\"", "$kernel");
    std::fs::write(&conf, &base).unwrap();
    let d = Daemon::start_with("conf", &["-f", conf.to_str().unwrap()]);

    let p1 = d.wait_state("auto1", "running", T).pid;
    let p2 = d.wait_state("auto2", "running", T).pid;
    let manual = d.status("manual").expect("disabled VM is listed");
    assert_eq!(manual.state, "stopped", "{manual:?}");
    let show = d.ok(&["status", "manual"]);
    assert!(show.contains("defined in vm.conf, disabled"), "{show}");
    d.ok(&["start", "manual"]);
    let p3 = d.wait_state("manual", "running", T).pid;

    // A third enabled VM appears after SIGHUP; the others are untouched.
    let added = format!("{base}{}", vm_block("added", spin, true, ""));
    std::fs::write(&conf, &added).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_state("added", "running", T);
    for (name, pid) in [("auto1", p1), ("auto2", p2), ("manual", p3)] {
        assert_eq!(
            d.status(name).map(|s| (s.state, s.pid)),
            Some(("running".into(), pid))
        );
    }

    // A broken edit changes nothing and says where it is broken.
    std::fs::write(&conf, format!("{added}vm broken {{\n    memory lots\n}}\n")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("reload failed, keeping the running configuration", T);
    let log = d.log();
    assert!(log.contains(&format!("{}:", conf.display())), "{log}");
    // Line 25, column 12: the bad size in the appended block.
    let at = format!("{}:25:12: ", conf.display());
    assert!(log.contains(&at), "no {at} in:\n{log}");
    let out = d.vmctl(&["reload"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains(&at), "{}", stderr(&out));
    for name in ["auto1", "auto2", "manual", "added"] {
        assert_eq!(
            d.status(name).map(|s| s.state),
            Some("running".into()),
            "{name}"
        );
    }
    assert!(d.status("broken").is_none());

    // Removing a running VM's definition leaves it running; once stopped
    // and reloaded, it is forgotten.
    std::fs::write(&conf, &base).unwrap();
    d.ok(&["reload"]);
    assert_eq!(d.status("added").map(|s| s.state), Some("running".into()));
    d.ok(&["stop", "-fw", "added"]);
    d.ok(&["reload"]);
    assert!(
        d.status("added").is_none(),
        "stopped undefined VM still listed"
    );
}

#[test]
fn vmd_n_checks_a_file() {
    let dir = Daemon::dir_for("check");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.conf");
    std::fs::write(&good, "vm a {\n    memory 64M\n}\n").unwrap();
    let out = Command::new(bin("vmd"))
        .args(["-n", "-f"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("configuration OK"));
    let bad = dir.join("bad.conf");
    std::fs::write(&bad, "vm a {\n    memroy 64M\n}\n").unwrap();
    let out = Command::new(bin("vmd"))
        .args(["-n", "-f"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!("{}:2:5: ", bad.display())),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn owners_may_manage_their_vm_and_others_may_not() {
    users::user("vmdtesto", &["vmdtestg"]);
    users::user("vmdtestx", &["vmdtestg"]);
    let dir = Daemon::dir_for("owner");
    std::fs::create_dir_all(&dir).unwrap();
    let spin = guest("spin.elf");
    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        format!(
            "socket owner root:vmdtestg\n{}",
            vm_block(
                "owned",
                spin.to_str().unwrap(),
                false,
                "    owner vmdtesto\n"
            )
        ),
    )
    .unwrap();
    let d = Daemon::start_with("owner", &["-f", conf.to_str().unwrap()]);

    // Both users may connect (socket group) and see status.
    let out = d.vmctl_as("vmdtestx", &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The non-owner is refused, and nothing changes.
    let out = d.vmctl_as("vmdtestx", &["start", "owned"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).trim(), "vmctl: permission denied");
    assert_eq!(d.status("owned").map(|s| s.state), Some("stopped".into()));
    // The owner may start it, and its console pty is the owner's.
    let out = d.vmctl_as("vmdtesto", &["start", "owned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state("owned", "running", T);
    let show = d.ok(&["status", "--json"]);
    let tty = show
        .split("\"tty\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("tty in status");
    let owner_uid = nix::unistd::User::from_name("vmdtesto")
        .unwrap()
        .unwrap()
        .uid;
    let st = nix::sys::stat::stat(tty).expect("stat tty");
    assert_eq!(
        st.st_uid,
        owner_uid.as_raw(),
        "tty {tty} not owned by the VM's owner"
    );
    for args in [
        &["stop", "owned"][..],
        &["pause", "owned"],
        &["console", "owned"],
    ] {
        let out = d.vmctl_as("vmdtestx", args);
        assert!(!out.status.success(), "{args:?} allowed for a non-owner");
        assert_eq!(stderr(&out).trim(), "vmctl: permission denied", "{args:?}");
    }
    // Root-only verbs stay root's.
    let out = d.vmctl_as("vmdtesto", &["reload"]);
    assert_eq!(stderr(&out).trim(), "vmctl: permission denied");
    let out = d.vmctl_as("vmdtesto", &["stop", "-w", "owned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.status("owned").map(|s| s.state), Some("stopped".into()));
}

#[test]
fn pause_stops_the_guest_and_unpause_resumes_it() {
    let d = Daemon::start("pause");
    let echo = guest("echo.elf");
    d.boot(&echo, "32M", "p1");
    let mut console = d.console("p1");
    console.wait_for("VMD-TEST echo ready", T);
    d.ok(&["pause", "p1"]);
    assert_eq!(d.status("p1").map(|s| s.state), Some("paused".into()));
    let out = d.vmctl(&["pause", "p1"]);
    assert_eq!(stderr(&out).trim(), "vmctl: vm p1 is not running");
    console.type_text("while-paused");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !console.text().contains("while-paused"),
        "a paused guest echoed"
    );
    d.ok(&["unpause", "p1"]);
    console.wait_for("while-paused", Duration::from_secs(10));
    assert_eq!(d.status("p1").map(|s| s.state), Some("running".into()));
    // Stopping a paused VM works too.
    d.ok(&["pause", "p1"]);
    d.ok(&["stop", "-w", "p1"]);
    assert_eq!(d.status("p1").map(|s| s.state), Some("stopped".into()));
    assert!(d.log().contains("vm p1: paused"), "{}", d.log());
}

#[test]
fn instances_of_a_template_as_allow_instance_says() {
    users::user("vmdtesto", &["vmdtestg"]);
    users::user("vmdtestx", &["vmdtestg"]);
    let dir = Daemon::dir_for("instance");
    std::fs::create_dir_all(&dir).unwrap();
    let idle = guest("idle.elf");
    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        format!(
            "socket owner root:vmdtestg\n{}",
            vm_block(
                "tpl",
                idle.to_str().unwrap(),
                false,
                "    allow instance { memory, owner vmdtesto }\n"
            )
        ),
    )
    .unwrap();
    let d = Daemon::start_with("instance", &["-f", conf.to_str().unwrap()]);
    // The allowed user makes an instance, with the memory it may change.
    let out = d.vmctl_as("vmdtesto", &["start", "-t", "tpl", "-m", "48M", "inst1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = d.wait_state("inst1", "running", T);
    let info = d.ok(&["status", "--json"]);
    assert!(info.contains("\"max_mem\": 50331648"), "{info}");
    assert!(info.contains("\"owner\": \"vmdtesto\""), "{info}");
    assert!(st.pid > 0);
    // What allow instance leaves out stays the template's.
    let out = d.vmctl_as("vmdtesto", &["start", "-t", "tpl", "--vcpus", "2", "inst2"]);
    assert_eq!(
        stderr(&out).trim(),
        "vmctl: vm tpl: instances may not change vcpus (allow instance)"
    );
    // Someone else may not make instances; nothing is left behind.
    let out = d.vmctl_as("vmdtestx", &["start", "-t", "tpl", "inst3"]);
    assert_eq!(stderr(&out).trim(), "vmctl: permission denied");
    assert!(d.status("inst2").is_none() && d.status("inst3").is_none());
    // A VM without allow instance is no template.
    let out = d.vmctl(&["start", "-t", "inst1", "inst4"]);
    assert_eq!(
        stderr(&out).trim(),
        "vmctl: vm inst1 does not allow instances"
    );
    // The instance belongs to its maker.
    let out = d.vmctl_as("vmdtesto", &["stop", "-w", "inst1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// OpenBSD's reload: every VM that is not running is forgotten and
/// defined afresh, and every enabled VM that is not running starts, in
/// staggered groups (queued ones show `waiting`); the first group goes at
/// once, on a timer of its own: nothing but the SIGHUP wakes vmd here.
/// `vmctl reset` only purges.
#[test]
fn reload_starts_every_enabled_vm_on_time_and_reset_only_purges() {
    let dir = Daemon::dir_for("reload-now");
    std::fs::create_dir_all(&dir).unwrap();
    let idle = guest("idle.elf");
    let idle = idle.to_str().unwrap();
    let conf = dir.join("vm.conf");
    // One VM per group, groups 30 s apart (OpenBSD's default delay).
    let head = "staggered start parallel 1 delay 30\n";
    let first = format!(
        "{head}{}{}",
        vm_block("early", idle, true, ""),
        vm_block("later", idle, false, "")
    );
    std::fs::write(&conf, &first).unwrap();
    let d = Daemon::start_with("reload-now", &["-f", conf.to_str().unwrap()]);
    d.wait_state("early", "running", T);
    assert_eq!(d.status("later").unwrap().state, "stopped");

    // A new enabled VM, and a disabled one switched to enable: the next
    // group would be 30 s after the first, but a reload's first group
    // goes now. Nothing else talks to vmd until the log says so.
    let second = format!(
        "{head}{}{}{}",
        vm_block("early", idle, true, ""),
        vm_block("later", idle, true, ""),
        vm_block("added", idle, true, "")
    );
    std::fs::write(&conf, &second).unwrap();
    let t0 = std::time::Instant::now();
    d.signal(Signal::SIGHUP);
    d.wait_log("vm later: running", Duration::from_secs(1));
    eprintln!("TIME SIGHUP -> queued VM running: {:?}", t0.elapsed());
    // parallel 1: the other one waits its turn, and says so.
    assert_eq!(d.status("added").unwrap().state, "waiting");
    let show = d.ok(&["status"]);
    assert!(
        show.lines()
            .any(|l| l.contains("waiting") && l.ends_with(" added")),
        "{show}"
    );
    // A queued VM can be started by hand (by id, as on OpenBSD), or kept
    // from starting by stop.
    d.ok(&["stop", "added"]);
    assert_eq!(d.status("added").unwrap().state, "stopped");

    // An enabled VM stopped by hand starts again on reload; a stopped one
    // is forgotten and defined afresh (a new id), the running ones keep
    // theirs.
    d.ok(&["stop", "-fw", "early"]);
    let ids = |d: &Daemon| {
        let out = d.ok(&["status"]);
        out.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[f.len() - 1].to_string(), f[0].to_string())
            })
            .collect::<std::collections::BTreeMap<String, String>>()
    };
    let before = ids(&d);
    d.ok(&["reload"]);
    d.wait_state("early", "running", T);
    let after = ids(&d);
    assert_ne!(before["early"], after["early"], "{before:?} {after:?}");
    assert_eq!(before["later"], after["later"], "{before:?} {after:?}");

    // reset vms kills and forgets every VM and starts none; reload brings
    // the enabled ones back.
    d.ok(&["reset", "vms"]);
    let out = d.ok(&["status"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.ok(&["status"]).lines().count(), 1);
    d.ok(&["reload"]);
    d.wait_state("early", "running", T);
}

/// The small things an OpenBSD admin relies on: `vmd -D macro=value`
/// overriding the file, `vmd -n` checking the files VMs name, names that
/// start with a letter, `vmctl start ID`.
#[test]
fn openbsd_small_differences() {
    let dir = Daemon::dir_for("small");
    std::fs::create_dir_all(&dir).unwrap();
    let idle = guest("idle.elf");
    let idle = idle.to_str().unwrap();
    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        "kernel = \"/nonexistent/bsd\"\nvm \"one\" {\n    boot $kernel\n    memory 32M\n    disable\n}\n",
    )
    .unwrap();
    let vmd_n = |extra: &[&str], file: &std::path::Path| {
        let out = Command::new(bin("vmd"))
            .args(extra)
            .args(["-n", "-f"])
            .arg(file)
            .output()
            .unwrap();
        (out.status.code(), stderr(&out))
    };
    // vmd -n sees the missing kernel, naming the VM's place...
    let (code, err) = vmd_n(&[], &conf);
    assert_eq!(code, Some(1), "{err}");
    let at = format!(
        "{}:2:1: vm \"one\": boot /nonexistent/bsd: ",
        conf.display()
    );
    assert!(err.contains(&at), "no {at} in {err}");
    // ... and -D replaces the file's macro.
    let define = format!("kernel={idle}");
    let (code, err) = vmd_n(&["-D", &define], &conf);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("configuration OK"), "{err}");

    // Wrong types: a directory as a disk, a FIFO as the cdrom.
    let fifo = dir.join("fifo.iso");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let typed = dir.join("typed.conf");
    std::fs::write(
        &typed,
        format!(
            "vm \"two\" {{\n    boot \"{idle}\"\n    disk \"{}\"\n    cdrom \"{}\"\n}}\n",
            dir.display(),
            fifo.display()
        ),
    )
    .unwrap();
    let (code, err) = vmd_n(&[], &typed);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a regular file or block device"), "{err}");
    assert!(
        err.contains(&format!("cdrom {}: not a regular file", fifo.display())),
        "{err}"
    );

    // Names start with a letter, as on OpenBSD.
    let digit = dir.join("digit.conf");
    std::fs::write(&digit, "vm \"9lives\" {\n    memory 32M\n}\n").unwrap();
    let (code, err) = vmd_n(&[], &digit);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(":1:4: ") && err.contains("must start with a letter"),
        "{err}"
    );

    let d = Daemon::start_with("small", &["-D", &define, "-f", conf.to_str().unwrap()]);
    let out = d.vmctl(&["start", "-b", idle, "-m", "16M", "2fast"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("must start with a letter"),
        "{}",
        stderr(&out)
    );
    // vmctl start ID: VM 1 is "one".
    let id = d.ok(&["status", "one"]);
    assert!(
        id.lines().nth(1).unwrap().trim_start().starts_with("1 "),
        "{id}"
    );
    d.ok(&["start", "1"]);
    d.wait_state("one", "running", T);
    let out = d.vmctl(&["start", "99"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("vm 99 not found"), "{}", stderr(&out));
}
