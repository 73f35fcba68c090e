//! `vmctl status` (alias `show`).

use std::fmt::Write as _;

use vmd_proto::msg::{Reply, Request};
use vmd_proto::size::format_size;
use vmd_proto::vm::{VmInfo, VmState};

use crate::args::{Opt, Spec};
use crate::client::{Ctx, Error};

const CMD: &str = "status";

pub const SPEC: Spec = Spec {
    short: "r",
    long: &["json"],
    intermixed: true,
};

/// OpenBSD's column headings, spaced as its vmctl prints them.
pub const HEADER: &str = "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusArgs {
    pub name: Option<String>,
    pub running_only: bool,
    pub json: bool,
}

pub fn parse(args: &[String]) -> Result<StatusArgs, Error> {
    let parsed = SPEC.parse(args).map_err(|e| Error::args(CMD, e))?;
    let mut out = StatusArgs::default();
    for found in &parsed.opts {
        match found.opt {
            Opt::Short('r') => out.running_only = true,
            Opt::Long("json") => out.json = true,
            opt => return Err(Error::usage(CMD, format!("unknown option {opt}"))),
        }
    }
    out.name = match parsed.operands.as_slice() {
        [] => None,
        [name] => Some(name.clone()),
        [_, extra, ..] => return Err(Error::usage(CMD, format!("unexpected argument {extra:?}"))),
    };
    Ok(out)
}

pub fn run(ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    let args = parse(args)?;
    let vms = match ctx.request(Request::Status {
        name: args.name.clone(),
    })? {
        (Reply::Status(vms), _) => vms,
        (other, _) => return Err(Error::Protocol(format!("{other:?}"))),
    };
    let vms: Vec<VmInfo> = vms
        .into_iter()
        .filter(|vm| !args.running_only || is_running(vm))
        .collect();
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&vms)
            .map_err(|e| Error::Protocol(format!("cannot encode status as JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        table(&vms, args.name.is_some())
    };
    print!("{text}");
    Ok(())
}

/// Whether a VM has a process (what `-r` keeps).
pub fn is_running(vm: &VmInfo) -> bool {
    vm.state != VmState::Stopped && vm.pid != 0
}

/// The status table; with `single` (status of one named VM), a final
/// "last exit:" line for a VM that has stopped before.
pub fn table(vms: &[VmInfo], single: bool) -> String {
    let mut out = String::new();
    out.push_str(HEADER);
    out.push('\n');
    for vm in vms {
        let running = is_running(vm);
        let dash = || "-".to_string();
        let id = if vm.id == 0 {
            dash()
        } else {
            vm.id.to_string()
        };
        let pid = if running { vm.pid.to_string() } else { dash() };
        let cur = if running {
            format_size(vm.cur_mem)
        } else {
            dash()
        };
        let tty = if running && !vm.tty.is_empty() {
            vm.tty.strip_prefix("/dev/").unwrap_or(&vm.tty).to_string()
        } else {
            dash()
        };
        let owner = if vm.owner.is_empty() {
            dash()
        } else {
            vm.owner.clone()
        };
        let _ = writeln!(
            out,
            "{id:>5} {pid:>5} {vcpus:>5} {max:>7} {cur:>7} {tty:>7} {owner:>12} {state:>8} {name}",
            vcpus = vm.vcpus,
            max = format_size(vm.max_mem),
            state = vm.state.to_string(),
            name = vm.name,
        );
    }
    if let ([vm], true) = (vms, single) {
        // The one-VM view adds what the table has no column for.
        if vm.defined {
            let how = if vm.enabled { "enabled" } else { "disabled" };
            let _ = writeln!(out, "defined in vm.conf, {how}");
        }
        for (i, disk) in vm.disks.iter().enumerate() {
            let _ = writeln!(out, "disk {i}: {disk}");
        }
        if vm.interfaces > 0 {
            let _ = writeln!(out, "interfaces: {}", vm.interfaces);
        }
        if let Some(cdrom) = &vm.cdrom {
            let _ = writeln!(out, "cdrom: {cdrom}");
        }
        if let Some(reason) = &vm.last_exit {
            let _ = writeln!(out, "last exit: {reason}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmd_proto::vm::ExitReason;

    fn vm(id: u32, name: &str, state: VmState) -> VmInfo {
        let running = state != VmState::Stopped;
        VmInfo {
            id,
            pid: if running { 4242 } else { 0 },
            vcpus: 2,
            max_mem: 1 << 30,
            cur_mem: if running {
                88 * (1 << 20) + 100 * 1024
            } else {
                0
            },
            tty: if running {
                "/dev/pts/3".into()
            } else {
                String::new()
            },
            owner: "root".into(),
            state,
            name: name.into(),
            last_exit: None,
            restarts: 0,
            defined: false,
            enabled: false,
            disks: Vec::new(),
            interfaces: 0,
            cdrom: None,
        }
    }

    #[test]
    fn table_layout() {
        let mut stopped = vm(2, "db", VmState::Stopped);
        stopped.max_mem = 512 << 20;
        stopped.last_exit = Some(ExitReason::PowerOff);
        let text = table(&[vm(1, "web", VmState::Running), stopped], false);
        let expected = "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME\n\
                        \x20   1  4242     2    1.0G   88.1M   pts/3         root  running web\n\
                        \x20   2     -     2    512M       -       -         root  stopped db\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn columns_line_up_with_the_header() {
        let text = table(&[vm(7, "web", VmState::Running)], false);
        let lines: Vec<&str> = text.lines().collect();
        // Right-aligned columns end where their headings end.
        for heading in [
            "ID", "PID", "VCPUS", "MAXMEM", "CURMEM", "TTY", "OWNER", "STATE",
        ] {
            let end = lines[0].find(heading).unwrap() + heading.len();
            assert_ne!(lines[1].as_bytes()[end - 1], b' ', "{heading}");
            assert_eq!(lines[1].as_bytes()[end], b' ', "{heading}");
        }
        assert_eq!(lines[0].find("NAME"), lines[1].find("web"));
    }

    #[test]
    fn last_exit_only_for_a_single_named_vm() {
        let mut v = vm(3, "crashy", VmState::Stopped);
        v.last_exit = Some(ExitReason::GuestCrash("triple fault".into()));
        let text = table(std::slice::from_ref(&v), true);
        assert!(
            text.ends_with("crashy\nlast exit: guest crashed: triple fault\n"),
            "{text}"
        );
        assert!(!table(std::slice::from_ref(&v), false).contains("last exit"));
        v.last_exit = None;
        assert!(!table(&[v], true).contains("last exit"));
    }

    #[test]
    fn empty_table_is_the_header() {
        assert_eq!(table(&[], false), format!("{HEADER}\n"));
    }

    #[test]
    fn odd_values() {
        let mut v = vm(0, "x", VmState::Starting);
        v.tty = "ttyS9".into();
        v.owner = String::new();
        let text = table(&[v], false);
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("    -  4242"), "{row}");
        assert!(row.contains(" ttyS9 "), "{row}");
        assert!(row.contains(" - starting x"), "{row}");
    }

    #[test]
    fn json_has_every_field() {
        let mut v = vm(1, "web", VmState::Running);
        v.last_exit = Some(ExitReason::Reboot);
        v.restarts = 1;
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&[v]).unwrap()).unwrap();
        let obj = json[0].as_object().unwrap();
        for field in [
            "id",
            "pid",
            "vcpus",
            "max_mem",
            "cur_mem",
            "tty",
            "owner",
            "state",
            "name",
            "last_exit",
            "restarts",
        ] {
            assert!(obj.contains_key(field), "{field}");
        }
    }

    #[test]
    fn running_filter() {
        assert!(is_running(&vm(1, "a", VmState::Running)));
        assert!(is_running(&vm(1, "a", VmState::Starting)));
        assert!(!is_running(&vm(1, "a", VmState::Stopped)));
    }

    #[test]
    fn args() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse(&w(&[])).unwrap(), StatusArgs::default());
        assert_eq!(
            parse(&w(&["-r", "--json", "vm"])).unwrap(),
            StatusArgs {
                name: Some("vm".into()),
                running_only: true,
                json: true
            }
        );
        assert!(parse(&w(&["a", "b"])).is_err());
        assert!(parse(&w(&["--jso"])).is_err());
    }
}
