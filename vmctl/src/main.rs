//! vmctl: control vmd's virtual machines.
//!
//! `vmctl [-v] [-s socket] command [args...]`; any unambiguous prefix of a
//! command works, as on OpenBSD.

mod client;
mod console;
mod create;
mod simple;
mod start;
mod status;
mod stop;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use client::{Ctx, Error};
use vmd_getopt as args;
use vmd_getopt::{Opt, Spec};

type Run = fn(&Ctx, &[String]) -> Result<(), Error>;

/// One command, with what `vmctl help` says about it.
struct Command {
    name: &'static str,
    run: Run,
    synopsis: &'static str,
    about: &'static str,
    /// One line per flag or argument: (flag, explanation).
    flags: &'static [(&'static str, &'static str)],
}

const COMMANDS: &[Command] = &[
    Command {
        name: "console",
        run: console::run,
        synopsis: "console name",
        about: "attach to a VM's serial console; type ~. at the start of a line to leave",
        flags: &[("name", "the VM whose console to attach")],
    },
    Command {
        name: "create",
        run: create::run,
        synopsis: "create [-b base | -i input] [-s size] [raw:|qcow2:]path",
        about: "create a disk image (qcow2 if named *.qcow2 or qcow2:, else raw)",
        flags: &[
            ("-s size", "virtual size, e.g. 10G (defaults to the base's or input's)"),
            ("-b base", "make a qcow2 overlay backed by base (stored as given)"),
            ("-i input", "copy an existing raw or qcow2 image (conversion)"),
        ],
    },
    Command {
        name: "help",
        run: help,
        synopsis: "help [command]",
        about: "show this help, or one command's",
        flags: &[],
    },
    Command {
        name: "load",
        run: simple::load,
        synopsis: "load file",
        about: "add the VMs and switches a vm.conf file defines",
        flags: &[("file", "a file in vm.conf(5) syntax")],
    },
    Command {
        name: "log",
        run: simple::log,
        synopsis: "log verbose|brief",
        about: "change how much vmd logs (root only)",
        flags: &[],
    },
    Command {
        name: "metrics",
        run: simple::metrics,
        synopsis: "metrics",
        about: "print every VM's and vmd's counters in the Prometheus text format",
        flags: &[],
    },
    Command {
        name: "pause",
        run: simple::pause,
        synopsis: "pause name",
        about: "stop a VM's vCPUs (and its clock) until unpause",
        flags: &[],
    },
    Command {
        name: "reload",
        run: simple::reload,
        synopsis: "reload",
        about: "re-read vm.conf: forget stopped VMs, start every enabled one, leave running ones alone",
        flags: &[],
    },
    Command {
        name: "reset",
        run: simple::reset,
        synopsis: "reset [all|vms|switches]",
        about: "stop and forget every VM and/or forget the switches (reads nothing: reload does)",
        flags: &[],
    },
    Command {
        name: "show",
        run: status::run,
        synopsis: "show [-r] [--json] [name]",
        about: "the same as status",
        flags: &[],
    },
    Command {
        name: "start",
        run: start::run,
        synopsis:
            "start [-cL] [-B device] [-b path] [-d disk] [-i count] [-m size] [-n switch] [-r path] [-t template] [--initrd path] [--cmdline string] [--vcpus N] name",
        about: "start a VM",
        flags: &[
            ("-c", "attach the console once the VM runs"),
            ("-b path", "kernel (bzImage, ELF vmlinux, PVH ELF) or BIOS image; none: SeaBIOS"),
            ("-m size", "guest memory, e.g. 512M or 2G (default 512M)"),
            ("--initrd path", "initial ramdisk to load with the kernel"),
            ("--cmdline string", "kernel command line"),
            ("--vcpus N", "number of virtual CPUs, 1 to 64"),
            ("-i count", "this many network interfaces (TAPs), 1 to 4"),
            (
                "-t template",
                "start name as a new instance of this vm.conf VM (allow instance)",
            ),
            ("-L", "add a local interface: a /31 and DHCP from vmd"),
            ("-n switch", "add an interface on this vm.conf switch (repeatable)"),
            (
                "-d [raw:|qcow2:]path",
                "a disk image (up to 4; format detected unless named)",
            ),
            (
                "-r path",
                "an ISO 9660 image, attached as a read-only CD-ROM (virtio-scsi)",
            ),
            (
                "-B device",
                "boot disk, cdrom or net first (the firmware's boot order)",
            ),
        ],
    },
    Command {
        name: "status",
        run: status::run,
        synopsis: "status [-r] [--json] [name]",
        about: "list VMs, or one VM and why it last stopped",
        flags: &[
            ("-r", "only VMs that are running"),
            ("--json", "print every field of every VM as a JSON array"),
        ],
    },
    Command {
        name: "stop",
        run: stop::run,
        synopsis: "stop [-fw] [name | -a]",
        about: "stop a VM, or all of them",
        flags: &[
            ("-a", "stop every VM"),
            (
                "-f",
                "kill the VM process at once (without it, vmd presses the guest's ACPI power button and stops the VM itself if the guest has not powered off within vmd's --stop-grace, 30 s)",
            ),
            ("-w", "wait until the VM has stopped"),
        ],
    },
    Command {
        name: "unpause",
        run: simple::unpause,
        synopsis: "unpause name",
        about: "let a paused VM run again",
        flags: &[],
    },
    Command {
        name: "wait",
        run: simple::wait,
        synopsis: "wait name",
        about: "wait until a VM stops, then say why it did",
        flags: &[],
    },
];

const GLOBAL: Spec = Spec {
    short: "hs:v",
    long: &["help"],
    intermixed: false,
};

const GLOBAL_FLAGS: &[(&str, &str)] = &[
    ("-s socket", "vmd's control socket (default /run/vmd.sock)"),
    ("-v", "verbose: show each request and reply on stderr"),
    ("-h", "show this help"),
];

/// Finds the command `word` names: itself or an unambiguous prefix.
fn lookup(word: &str) -> Result<&'static Command, Error> {
    if let Some(c) = COMMANDS.iter().find(|c| c.name == word) {
        return Ok(c);
    }
    let matches: Vec<&Command> = COMMANDS
        .iter()
        .filter(|c| c.name.starts_with(word))
        .collect();
    match matches.as_slice() {
        [c] => Ok(c),
        [] => Err(Error::Usage {
            cmd: None,
            msg: format!("unknown command {word:?}"),
        }),
        many => {
            let names: Vec<&str> = many.iter().map(|c| c.name).collect();
            Err(Error::Usage {
                cmd: None,
                msg: format!("ambiguous command {word:?}: {}", names.join(", ")),
            })
        }
    }
}

fn usage_line() -> &'static str {
    "usage: vmctl [-v] [-s socket] command [arg ...]"
}

fn write_command(out: &mut String, c: &Command) {
    out.push_str(&format!("  {}\n      {}\n", c.synopsis, c.about));
    for (flag, text) in c.flags {
        out.push_str(&format!("        {flag:<28} {text}\n"));
    }
}

fn help_text(only: Option<&Command>) -> String {
    let mut out = String::new();
    match only {
        Some(c) => {
            out.push_str(&format!("usage: vmctl {}\n", c.synopsis));
            write_command(&mut out, c);
        }
        None => {
            out.push_str(usage_line());
            out.push('\n');
            for (flag, text) in GLOBAL_FLAGS {
                out.push_str(&format!("  {flag:<34} {text}\n"));
            }
            out.push_str("\ncommands (any unambiguous prefix works):\n");
            for c in COMMANDS {
                write_command(&mut out, c);
            }
            out.push_str("\nsizes take K, M, G or T (binary, any case), e.g. 512M, 1.5G\n");
        }
    }
    out
}

fn help(_ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    let parsed = Spec {
        short: "",
        long: &[],
        intermixed: true,
    }
    .parse(args)
    .map_err(|e| Error::args("help", e))?;
    let text = match parsed.operands.as_slice() {
        [] => help_text(None),
        [word] => help_text(Some(lookup(word)?)),
        [_, extra, ..] => {
            return Err(Error::usage(
                "help",
                format!("unexpected argument {extra:?}"),
            ))
        }
    };
    // A closed pipe (vmctl help | head) is not worth an error.
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}

fn run(argv: &[String]) -> Result<(), Error> {
    let parsed = GLOBAL.parse(argv).map_err(|e| Error::Usage {
        cmd: None,
        msg: e.to_string(),
    })?;
    let mut ctx = Ctx {
        socket: PathBuf::from(vmd_proto::DEFAULT_SOCKET),
        verbose: 0,
    };
    for found in &parsed.opts {
        match found.opt {
            Opt::Short('v') => ctx.verbose += 1,
            Opt::Short('s') => ctx.socket = PathBuf::from(found.arg()),
            Opt::Short('h') | Opt::Long("help") => return help(&ctx, &[]),
            opt => {
                return Err(Error::Usage {
                    cmd: None,
                    msg: format!("unknown option {opt}"),
                })
            }
        }
    }
    let Some((word, rest)) = parsed.operands.split_first() else {
        return Err(Error::Usage {
            cmd: None,
            msg: "no command given".into(),
        });
    };
    let command = lookup(word)?;
    (command.run)(&ctx, rest)
}

fn main() -> ExitCode {
    let argv: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(v) => v,
        Err(bad) => {
            eprintln!("vmctl: argument {bad:?} is not valid UTF-8");
            return ExitCode::FAILURE;
        }
    };
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmctl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(word: &str) -> Result<&'static str, String> {
        lookup(word).map(|c| c.name).map_err(|e| e.to_string())
    }

    #[test]
    fn exact_and_prefix() {
        assert_eq!(name_of("status"), Ok("status"));
        assert_eq!(name_of("stat"), Ok("status"));
        assert_eq!(name_of("sto"), Ok("stop"));
        assert_eq!(name_of("star"), Ok("start"));
        assert_eq!(name_of("sh"), Ok("show"));
        assert_eq!(name_of("co"), Ok("console"));
        assert_eq!(name_of("cr"), Ok("create"));
        assert_eq!(name_of("h"), Ok("help"));
    }

    #[test]
    fn ambiguous_prefix_names_the_candidates() {
        assert_eq!(
            name_of("st"),
            Err("ambiguous command \"st\": start, status, stop (see 'vmctl help')".into())
        );
        assert_eq!(
            name_of("s"),
            Err("ambiguous command \"s\": show, start, status, stop (see 'vmctl help')".into())
        );
        assert!(name_of("sta").unwrap_err().contains("start, status"));
    }

    #[test]
    fn unknown_command() {
        assert_eq!(
            name_of("frob"),
            Err("unknown command \"frob\" (see 'vmctl help')".into())
        );
        assert!(name_of("").is_err());
        assert!(name_of("stops").is_err());
    }

    #[test]
    fn global_options() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let e = run(&w(&[])).unwrap_err().to_string();
        assert_eq!(e, "no command given (see 'vmctl help')");
        assert!(run(&w(&["-s"]))
            .unwrap_err()
            .to_string()
            .contains("-s needs an argument"));
        assert!(run(&w(&["-x", "status"]))
            .unwrap_err()
            .to_string()
            .contains("unknown option -x"));
        // Usage errors come before any connection attempt.
        let e = run(&w(&["-s", "/nonexistent/vmd.sock", "sto"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stop: needs a VM name or -a"), "{e}");
    }

    #[test]
    fn help_lists_every_command_and_flag() {
        let text = help_text(None);
        for c in COMMANDS {
            assert!(text.contains(c.synopsis), "{}", c.name);
            for (flag, _) in c.flags {
                assert!(text.contains(flag), "{flag}");
            }
        }
        for flag in [
            "-s socket",
            "-v",
            "--vcpus N",
            "--initrd path",
            "--cmdline string",
            "--json",
        ] {
            assert!(text.contains(flag), "{flag}");
        }
        let one = help_text(Some(lookup("sto").unwrap()));
        assert!(
            one.starts_with("usage: vmctl stop [-fw] [name | -a]\n"),
            "{one}"
        );
        assert!(!one.contains("console"));
    }
}
