//! The sandbox table in docs/SECURITY.md, checked against the live
//! processes: every role's Uid, capability sets, no_new_privs and seccomp
//! mode as /proc/PID/status shows them, with a VM running.

use std::time::Duration;

use vmd_e2e::{children_of, guest, proc_status, repo_root, Daemon};

const BOOT: Duration = Duration::from_secs(60);

/// One row of the table: what /proc must show for a role.
#[derive(Debug)]
struct Row {
    role: String,
    uid_root: bool,
    /// CapEff, CapPrm and CapBnd, as /proc prints them.
    caps: String,
    no_new_privs: &'static str,
    seccomp: &'static str,
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
        if cells.len() < 9 || !["parent", "priv", "control", "vmm"].contains(&cells[1]) {
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
        });
    }
    assert_eq!(rows.len(), 4, "one row per role in SECURITY.md: {rows:?}");
    rows
}

fn role_of(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let at = args.iter().position(|a| *a == b"--role")?;
    args.get(at + 1)
        .map(|r| String::from_utf8_lossy(r).into_owned())
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
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir");
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let seccomp = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim);
        assert_eq!(
            seccomp,
            Some(row.seccomp),
            "{what} thread {:?} Seccomp",
            task.file_name()
        );
    }
}

#[test]
fn every_role_runs_as_the_security_table_says() {
    let rows = table();
    let d = Daemon::start("security");
    let kernel = guest("spin.elf");
    d.ok(&[
        "start",
        "-b",
        kernel.to_str().unwrap(),
        "-m",
        "32M",
        "--vcpus",
        "2",
        "sec1",
    ]);
    let console = d.console("sec1");
    console.wait_for("VMD-TEST spin", BOOT);
    let vm_pid = d.wait_state("sec1", "running", BOOT).pid as u32;

    let mut seen = Vec::new();
    for row in &rows {
        let pids: Vec<u32> = if row.role == "parent" {
            vec![d.pid()]
        } else {
            children_of(d.pid())
                .into_iter()
                .filter(|p| role_of(*p).as_deref() == Some(row.role.as_str()))
                .collect()
        };
        assert_eq!(pids.len(), 1, "one {} process: {pids:?}", row.role);
        if row.role == "vmm" {
            assert_eq!(pids[0], vm_pid);
            // Main, two vCPUs at least: the filter reached them all.
            let threads = std::fs::read_dir(format!("/proc/{vm_pid}/task"))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(threads >= 3, "vmm threads: {threads}");
        }
        check(pids[0], row);
        seen.push(row.role.clone());
    }
    // The guest still runs under its filter, and stops cleanly.
    assert_eq!(d.status("sec1").map(|s| s.state), Some("running".into()));
    d.ok(&["stop", "-f", "-w", "sec1"]);
    let st = d.status("sec1").expect("status");
    // SIGSYS (31) would be the vmm's seccomp filter killing it.
    assert!(
        !st.last_exit.contains("signal 31") && !d.log().contains("signal 31"),
        "vmm killed by its filter: {st:?}\n{}",
        d.log()
    );
    assert_eq!(seen.len(), 4);
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
