//! Device processes seen from outside: one per disk, CD-ROM and
//! interface, none for a VM without them; a device process that dies
//! (kill -9) stops its VM with the device's reason, leaves no process,
//! TAP or image lock behind, and leaves other VMs running.

use std::time::Duration;

use vmd_e2e::{children_of, guest, Daemon, NetNs};

const T: Duration = Duration::from_secs(60);

/// argv[0] of each of vmd's children: "vmd: vm NAME blk0", ...
fn titles(vmd: u32) -> Vec<(u32, String)> {
    children_of(vmd)
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let arg0 = cmdline.split(|b| *b == 0).next()?;
            Some((pid, String::from_utf8_lossy(arg0).into_owned()))
        })
        .collect()
}

fn devices_of(vmd: u32, vm: &str) -> Vec<(u32, String)> {
    let prefix = format!("vmd: vm {vm} ");
    titles(vmd)
        .into_iter()
        .filter_map(|(pid, t)| Some((pid, t.strip_prefix(&prefix)?.to_string())))
        .collect()
}

#[test]
fn kill_9_of_a_device_process_stops_only_its_vm_and_frees_everything() {
    let ns = NetNs::new("devkill");
    let d = Daemon::start_in("devices-kill", Some(&ns), &[]);
    let spin = guest("spin.elf");
    let disk = d.dir.join("a.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let other = d.dir.join("b.img");
    std::fs::File::create(&other)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let start = |name: &str, img: &std::path::Path| {
        d.ok(&[
            "start",
            "-b",
            spin.to_str().unwrap(),
            "-m",
            "16M",
            "-d",
            img.to_str().unwrap(),
            "-L",
            name,
        ]);
        d.console(name).wait_for("VMD-TEST spin", T);
    };
    start("victim", &disk);
    start("bystander", &other);
    // A VM without disks or interfaces has no device process.
    d.ok(&["start", "-b", spin.to_str().unwrap(), "-m", "16M", "plain"]);
    d.console("plain").wait_for("VMD-TEST spin", T);
    assert!(devices_of(d.pid(), "plain").is_empty());

    let mut devs = devices_of(d.pid(), "victim");
    devs.sort_by(|a, b| a.1.cmp(&b.1));
    let names: Vec<&str> = devs.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["blk0", "net0"], "{:?}", titles(d.pid()));
    assert_eq!(
        ns.links().iter().filter(|l| l.starts_with("tap")).count(),
        2
    );
    let vmm = d.status("victim").expect("status").pid as u32;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(devs[0].0 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 blk0");
    let st = d.wait_state("victim", "stopped", T);
    assert!(st.last_exit.contains("blk0: killed by signal 9"), "{st:?}");
    let shown = d.ok(&["status", "victim"]);
    assert!(
        shown.contains("last exit: device failed: blk0: killed by signal 9"),
        "{shown}"
    );
    // Nothing of the VM is left: its vmm, its other device, its TAP.
    let left: Vec<_> = titles(d.pid())
        .into_iter()
        .filter(|(pid, t)| *pid == vmm || t.contains(" victim "))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let taps = ns
        .links()
        .into_iter()
        .filter(|l| l.starts_with("tap"))
        .count();
    assert_eq!(taps, 1, "only the bystander's TAP remains");
    // The others run on, and the victim starts again: its image's lock
    // went with its device process.
    assert_eq!(
        d.status("bystander").map(|s| s.state),
        Some("running".into())
    );
    assert_eq!(d.status("plain").map(|s| s.state), Some("running".into()));
    start("victim", &disk);
    assert_eq!(d.status("victim").map(|s| s.state), Some("running".into()));
    for vm in ["victim", "bystander", "plain"] {
        d.ok(&["stop", "-f", "-w", vm]);
    }
    assert_eq!(children_of(d.pid()).len(), 2, "{:?}", titles(d.pid()));
}
