//! The sandbox table in docs/SECURITY.md, checked against the live
//! processes: every role's and thread kind's Uid, capability sets,
//! no_new_privs and seccomp mode as /proc/PID/status shows them, with a VM
//! running that has a disk, a CD-ROM and an interface (so one process of
//! each device kind); and each row's syscall count against the filter.

use std::time::Duration;

use vmd_e2e::{children_of, guest, proc_status, repo_root, Daemon, NetNs};
use vmd_sandbox::Role;

const BOOT: Duration = Duration::from_secs(60);

/// The table's rows: the roles, and the vmm's vCPU threads.
const ROWS: [&str; 8] = [
    "parent",
    "priv",
    "control",
    "vmm",
    "vCPU thread",
    "blk",
    "scsi",
    "net",
];

/// One row of the table: what /proc must show for a role.
#[derive(Debug)]
struct Row {
    role: String,
    uid_root: bool,
    /// CapEff, CapPrm and CapBnd, as /proc prints them.
    caps: String,
    no_new_privs: &'static str,
    seccomp: &'static str,
    /// "kill, N syscalls": N.
    syscalls: Option<usize>,
}

/// Reads the table's rows out of docs/SECURITY.md: columns role, uid,
/// capabilities (a backticked mask, or "all"), no_new_privs, seccomp.
fn table() -> Vec<Row> {
    let doc = std::fs::read_to_string(repo_root().join("docs/SECURITY.md")).expect("SECURITY.md");
    let all = proc_status(std::process::id(), "CapBnd").expect("our CapBnd");
    let mut rows = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| role | uid | caps | nnp | seccomp | fs | opens | talks |"
        if cells.len() < 9 || !ROWS.contains(&cells[1]) {
            continue;
        }
        let caps = if cells[3].starts_with("all") {
            all.clone()
        } else {
            cells[3]
                .split('`')
                .nth(1)
                .unwrap_or_else(|| panic!("no mask in {line}"))
                .to_string()
        };
        let syscalls = cells[5]
            .strip_prefix("kill, ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        rows.push(Row {
            role: cells[1].to_string(),
            uid_root: cells[2].starts_with("0 "),
            caps,
            no_new_privs: if cells[4].starts_with("yes") {
                "1"
            } else {
                "0"
            },
            seccomp: if cells[5].starts_with("none") {
                "0"
            } else {
                "2"
            },
            syscalls,
        });
    }
    assert_eq!(
        rows.len(),
        ROWS.len(),
        "one row per role in SECURITY.md: {rows:?}"
    );
    rows
}

fn filter_of(row: &str) -> Option<Role> {
    Some(match row {
        "priv" => Role::Priv,
        "control" => Role::Control,
        "vmm" => Role::Vmm,
        "vCPU thread" => Role::Vcpu,
        "blk" => Role::Block,
        "scsi" => Role::Scsi,
        "net" => Role::Net,
        _ => return None,
    })
}

/// The table row a child process belongs to: its `--role`, or for a
/// device process the kind its `--device` names.
fn role_of(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let arg = |flag: &str| {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    };
    let role = arg("--role")?;
    if role != "device" {
        return Some(role);
    }
    let dev = arg("--device")?;
    Some(
        match dev.trim_end_matches(|c: char| c.is_ascii_digit()) {
            "cdrom" => "scsi",
            kind => kind,
        }
        .to_string(),
    )
}

/// (thread id, name, Seccomp, Seccomp_filters) of each thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir");
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            task.file_name().to_string_lossy().into_owned(),
            field("Name:"),
            field("Seccomp:"),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    out
}

fn check(pid: u32, row: &Row) {
    let what = format!("{} (pid {pid})", row.role);
    let uid = proc_status(pid, "Uid").expect("Uid");
    if row.uid_root {
        assert!(uid.split_whitespace().all(|u| u == "0"), "{what} Uid {uid}");
    } else {
        assert!(uid.split_whitespace().all(|u| u != "0"), "{what} Uid {uid}");
    }
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            proc_status(pid, set).as_deref(),
            Some(row.caps.as_str()),
            "{what} {set}"
        );
    }
    if row.role != "parent" {
        for set in ["CapInh", "CapAmb"] {
            assert_eq!(
                proc_status(pid, set).as_deref(),
                Some("0000000000000000"),
                "{what} {set}"
            );
        }
    }
    assert_eq!(
        proc_status(pid, "NoNewPrivs").as_deref(),
        Some(row.no_new_privs),
        "{what} NoNewPrivs"
    );
    // Every thread (vCPUs, I/O workers) carries the filter, not just main.
    for (tid, name, seccomp, _) in threads(pid) {
        assert_eq!(seccomp, row.seccomp, "{what} thread {tid} ({name}) Seccomp");
    }
}

#[test]
fn every_role_runs_as_the_security_table_says() {
    let rows = table();
    for row in &rows {
        if let Some(role) = filter_of(&row.role) {
            assert_eq!(
                row.syscalls,
                Some(vmd_sandbox::syscall_count(role)),
                "SECURITY.md's syscall count for {}",
                row.role
            );
        }
    }
    let ns = NetNs::new("sec");
    let d = Daemon::start_in("security", Some(&ns), &[]);
    let kernel = guest("spin.elf");
    let disk = d.dir.join("sec.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk image");
    let iso = d.dir.join("sec.iso");
    std::fs::write(&iso, vec![0u8; 64 << 10]).expect("iso image");
    d.ok(&[
        "start",
        "-b",
        kernel.to_str().unwrap(),
        "-m",
        "32M",
        "--vcpus",
        "2",
        "-d",
        disk.to_str().unwrap(),
        "-r",
        iso.to_str().unwrap(),
        "-L",
        "sec1",
    ]);
    let console = d.console("sec1");
    console.wait_for("VMD-TEST spin", BOOT);
    let vm_pid = d.wait_state("sec1", "running", BOOT).pid as u32;

    let mut seen = Vec::new();
    for row in &rows {
        if row.role == "vCPU thread" {
            continue;
        }
        let pids: Vec<u32> = if row.role == "parent" {
            vec![d.pid()]
        } else {
            children_of(d.pid())
                .into_iter()
                .filter(|p| role_of(*p).as_deref() == Some(row.role.as_str()))
                .collect()
        };
        assert_eq!(pids.len(), 1, "one {} process: {pids:?}", row.role);
        let tasks = threads(pids[0]);
        if row.role == "vmm" {
            assert_eq!(pids[0], vm_pid);
            // Main, two vCPUs, I/O threads: the filter reached them all;
            // the vCPU threads carry one filter more than the rest.
            let main = tasks
                .iter()
                .find(|t| t.0 == vm_pid.to_string())
                .map(|t| t.3)
                .expect("main thread");
            assert!(main >= 1, "vmm main thread filters: {main}");
            let vcpus: Vec<_> = tasks.iter().filter(|t| t.1.starts_with("vcpu")).collect();
            assert_eq!(vcpus.len(), 2, "vCPU threads: {tasks:?}");
            // KVM's own worker (kvm-nx-lpage-recovery) lives in the
            // process's thread group but runs only kernel code.
            for t in tasks.iter().filter(|t| !t.1.starts_with("kvm-")) {
                let want = if t.1.starts_with("vcpu") {
                    main + 1
                } else {
                    main
                };
                assert_eq!(t.3, want, "vmm thread {t:?} Seccomp_filters");
            }
            // The vCPU row: same process, so the same uid and powers.
            let vcpu_row = rows.iter().find(|r| r.role == "vCPU thread").expect("row");
            check(pids[0], vcpu_row);
            seen.push(vcpu_row.role.clone());
        }
        if ["blk", "scsi", "net"].contains(&row.role.as_str()) {
            assert_eq!(tasks.len(), 1, "{} is single-threaded: {tasks:?}", row.role);
        }
        check(pids[0], row);
        seen.push(row.role.clone());
    }
    // The guest still runs under its filters, and stops cleanly.
    assert_eq!(d.status("sec1").map(|s| s.state), Some("running".into()));
    d.ok(&["stop", "-f", "-w", "sec1"]);
    let st = d.status("sec1").expect("status");
    // SIGSYS (31) would be a filter killing a process.
    assert!(
        !st.last_exit.contains("signal 31") && !d.log().contains("signal 31"),
        "killed by a filter: {st:?}\n{}",
        d.log()
    );
    assert_eq!(seen.len(), ROWS.len());
}

/// The vmm's filter allows what its devices do: virtio-blk on a raw disk
/// and on a qcow2 overlay with a backing file (read, write, flush, GET_ID,
/// discard, write zeroes) and virtio-rng, with the backing chain opened by
/// priv under its own filter.
#[test]
fn disks_and_rng_work_under_the_filters() {
    let d = Daemon::start("security-disks");
    let raw = d.dir.join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(4 << 20))
        .expect("raw image");
    let base = d.dir.join("base.img");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(4 << 20))
        .expect("base image");
    let top = d.dir.join("top.qcow2");
    d.ok(&[
        "create",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);
    let kernel = guest("blk.elf");
    d.ok(&[
        "start",
        "-b",
        kernel.to_str().unwrap(),
        "-m",
        "32M",
        "-d",
        raw.to_str().unwrap(),
        "-d",
        top.to_str().unwrap(),
        "--cmdline",
        "info write:2:2:7 read:2:2 flush id discard:0:1 zeroes:1:1:1 \
         disk:1 info read:0:1 write:0:1:9 read:0:1 flush rng:16",
        "blk1",
    ]);
    let console = d.console("blk1");
    console.wait_for("VMD-TEST blk done", BOOT);
    let text = console.text();
    assert!(!text.contains("VMD-TEST error"), "{text}");
    let st = d.wait_state("blk1", "stopped", BOOT);
    assert!(
        !st.last_exit.contains("signal"),
        "vmm killed: {st:?}\n{}",
        d.log()
    );
    // Writes reached both images (the overlay, not its backing file).
    let data = std::fs::read(&raw).expect("raw");
    assert!(
        data[1024..2048].iter().all(|b| *b == 7),
        "raw disk not written"
    );
    assert!(std::fs::read(&base).expect("base").iter().all(|b| *b == 0));
}
