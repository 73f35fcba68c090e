//! `vmctl start`.

use std::path::Path;

use vmd_proto::msg::Request;
use vmd_proto::size::parse_size;
use vmd_proto::vm::DiskFormat as Format;
use vmd_proto::vm::{
    check_memory, is_vm_id, validate_name, BootDevice, DiskSpec, NicSpec, StartRequest,
    MAX_CMDLINE, MAX_DISKS, MAX_NICS, MAX_VCPUS,
};

use crate::args::{Opt, Spec};
use crate::client::{Ctx, Error};
use crate::console;

const CMD: &str = "start";

/// OpenBSD's flags, all supported.
pub const SPEC: Spec = Spec {
    short: "B:b:cd:Li:m:n:r:t:",
    long: &["initrd=", "cmdline=", "vcpus="],
    intermixed: true,
};

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartArgs {
    pub req: StartRequest,
    /// Attach the console once the VM runs.
    pub console: bool,
}

pub fn parse(args: &[String]) -> Result<StartArgs, Error> {
    let parsed = SPEC.parse(args).map_err(|e| Error::args(CMD, e))?;
    let mut out = StartArgs::default();
    let (mut plain_nics, mut local_nics, mut switches) = (0, 0, Vec::new());
    for found in &parsed.opts {
        let arg = found.arg();
        match found.opt {
            Opt::Short('c') => out.console = true,
            Opt::Short('i') => {
                let n: usize = arg
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_NICS).contains(n))
                    .ok_or_else(|| {
                        Error::usage(CMD, format!("-i {arg:?}: expected 1 to {MAX_NICS}"))
                    })?;
                plain_nics = n;
            }
            // Each -L adds a local interface, as on OpenBSD.
            Opt::Short('L') => local_nics += 1,
            Opt::Short('t') => out.req.template = Some(arg.to_string()),
            Opt::Short('n') => switches.push(arg.to_string()),
            Opt::Short('d') => {
                if out.req.disks.len() == MAX_DISKS {
                    return Err(Error::usage(
                        CMD,
                        format!("more than {MAX_DISKS} disks (-d)"),
                    ));
                }
                out.req.disks.push(disk(arg)?);
            }
            Opt::Short('b') => out.req.kernel = Some(absolute(arg)?),
            Opt::Short('r') => out.req.cdrom = Some(absolute(arg)?),
            Opt::Short('B') => {
                out.req.boot_device = Some(BootDevice::from_name(arg).ok_or_else(|| {
                    Error::usage(CMD, format!("-B {arg:?}: expected disk, cdrom or net"))
                })?)
            }
            Opt::Long("initrd") => out.req.initrd = Some(absolute(arg)?),
            Opt::Short('m') => out.req.memory = Some(memory(arg)?),
            Opt::Long("vcpus") => out.req.vcpus = Some(vcpus(arg)?),
            Opt::Long("cmdline") => {
                if arg.len() > MAX_CMDLINE {
                    return Err(Error::usage(
                        CMD,
                        format!("--cmdline is longer than {MAX_CMDLINE} bytes"),
                    ));
                }
                out.req.cmdline = Some(arg.to_string());
            }
            opt => {
                return Err(Error::Unsupported {
                    cmd: CMD,
                    opt: opt.to_string(),
                })
            }
        }
    }
    // The local interfaces first, then one per -n
    // switch, then plain ones up to the -i count.
    let up = |local, switch| NicSpec {
        local,
        switch,
        up: true,
        ..Default::default()
    };
    for _ in 0..local_nics {
        out.req.nics.push(up(true, None));
    }
    out.req
        .nics
        .extend(switches.into_iter().map(|s| up(false, Some(s))));
    while out.req.nics.len() < plain_nics {
        out.req.nics.push(up(false, None));
    }
    if out.req.nics.len() > MAX_NICS {
        return Err(Error::usage(
            CMD,
            format!("more than {MAX_NICS} interfaces"),
        ));
    }
    out.req.name = match parsed.operands.as_slice() {
        [name] => name.clone(),
        [] => return Err(Error::usage(CMD, "needs a VM name")),
        [_, extra, ..] => return Err(Error::usage(CMD, format!("unexpected argument {extra:?}"))),
    };
    // A number names an existing VM by id, as on OpenBSD.
    if !is_vm_id(&out.req.name) || out.req.template.is_some() {
        validate_name(&out.req.name).map_err(|e| Error::usage(CMD, e))?;
    }
    Ok(out)
}

pub fn run(ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    let start = parse(args)?;
    let name = start.req.name.clone();
    ctx.request_ok(Request::Start(start.req))?;
    if start.console {
        console::attach(ctx, &name)?;
    }
    Ok(())
}

/// `-d [raw:|qcow2:]path`: a disk, its format named or detected by vmd.
fn disk(arg: &str) -> Result<DiskSpec, Error> {
    let (format, path) = match arg.split_once(':') {
        Some((prefix, rest)) => match Format::from_name(prefix) {
            Some(f) => (Some(f), rest),
            None => (None, arg),
        },
        None => (None, arg),
    };
    Ok(DiskSpec {
        path: absolute(path)?,
        format,
        read_only: false,
    })
}

/// Makes `path` absolute against vmctl's cwd: vmd runs elsewhere.
fn absolute(path: &str) -> Result<String, Error> {
    if path.is_empty() {
        return Err(Error::usage(CMD, "empty path"));
    }
    let abs = std::path::absolute(Path::new(path))
        .map_err(|e| Error::usage(CMD, format!("cannot resolve path {path:?}: {e}")))?;
    abs.into_os_string()
        .into_string()
        .map_err(|p| Error::usage(CMD, format!("path {p:?} is not valid UTF-8")))
}

fn memory(arg: &str) -> Result<u64, Error> {
    let bytes = parse_size(arg).map_err(|e| Error::usage(CMD, format!("-m: {e}")))?;
    check_memory(bytes).map_err(|e| Error::usage(CMD, format!("-m {arg}: {e}")))?;
    Ok(bytes)
}

fn vcpus(arg: &str) -> Result<u32, Error> {
    match arg.parse::<u32>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(Error::usage(
            CMD,
            format!("--vcpus {arg:?}: expected a number from 1 to {MAX_VCPUS}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(s: &[&str]) -> Result<StartArgs, Error> {
        parse(&s.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    fn err(s: &[&str]) -> String {
        match parse_words(s) {
            Err(e) => e.to_string(),
            Ok(a) => panic!("{s:?} parsed: {a:?}"),
        }
    }

    #[test]
    fn minimal() {
        let a = parse_words(&["vm1"]).unwrap();
        assert_eq!(a.req.name, "vm1");
        assert!(!a.console);
        assert_eq!(
            a.req,
            StartRequest {
                name: "vm1".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn everything() {
        let a = parse_words(&[
            "-c",
            "-b",
            "/boot/bzImage",
            "-m1G",
            "--initrd=/boot/initrd",
            "--cmdline",
            "console=ttyS0 -- quiet",
            "--vcpus",
            "2",
            "-d",
            "qcow2:/d/a.qcow2",
            "-d/d/b.img",
            "-r",
            "/i/x.iso",
            "-B",
            "cdrom",
            "vm1",
        ])
        .unwrap();
        assert!(a.console);
        assert_eq!(
            a.req,
            StartRequest {
                name: "vm1".into(),
                kernel: Some("/boot/bzImage".into()),
                initrd: Some("/boot/initrd".into()),
                cmdline: Some("console=ttyS0 -- quiet".into()),
                memory: Some(1 << 30),
                vcpus: Some(2),
                disks: vec![
                    DiskSpec {
                        path: "/d/a.qcow2".into(),
                        format: Some(Format::Qcow2),
                        read_only: false,
                    },
                    DiskSpec {
                        path: "/d/b.img".into(),
                        format: None,
                        read_only: false,
                    },
                ],
                nics: Vec::new(),
                template: None,
                cdrom: Some("/i/x.iso".into()),
                boot_device: Some(BootDevice::Cdrom),
            }
        );
    }

    #[test]
    fn interfaces_in_openbsd_order() {
        let a = parse_words(&["-L", "-n", "sw0", "-i", "3", "vm1"]).unwrap();
        let kinds: Vec<(bool, Option<&str>)> = a
            .req
            .nics
            .iter()
            .map(|n| (n.local, n.switch.as_deref()))
            .collect();
        assert_eq!(kinds, [(true, None), (false, Some("sw0")), (false, None)]);
        assert!(a.req.nics.iter().all(|n| n.up));
        assert!(err(&["-i", "9", "vm"]).contains("-i"));
        assert!(
            err(&["-L", "-n", "a", "-n", "b", "-n", "c", "-n", "d", "vm"]).contains("more than 4")
        );
    }

    #[test]
    fn options_after_the_name() {
        let a = parse_words(&["vm1", "-cm", "256M", "--vcpus=4"]).unwrap();
        assert!(a.console);
        assert_eq!(a.req.memory, Some(256 << 20));
        assert_eq!(a.req.vcpus, Some(4));
    }

    #[test]
    fn relative_paths_become_absolute() {
        let a = parse_words(&["-b", "kernel", "--initrd", "../initrd", "vm1"]).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            a.req.kernel,
            Some(cwd.join("kernel").to_str().unwrap().to_string())
        );
        let initrd = a.req.initrd.unwrap();
        assert!(Path::new(&initrd).is_absolute(), "{initrd}");
        assert!(initrd.ends_with("initrd"), "{initrd}");
    }

    #[test]
    fn cdrom_and_boot_device() {
        let a = parse_words(&["-r", "x.iso", "-B", "cdrom", "vm"]).unwrap();
        let cdrom = a.req.cdrom.unwrap();
        assert!(Path::new(&cdrom).is_absolute() && cdrom.ends_with("x.iso"));
        assert_eq!(a.req.boot_device, Some(BootDevice::Cdrom));
        for (w, d) in [("disk", BootDevice::Disk), ("net", BootDevice::Net)] {
            let a = parse_words(&["-B", w, "vm"]).unwrap();
            assert_eq!(a.req.boot_device, Some(d));
        }
        assert!(err(&["-B", "floppy", "vm"]).contains("expected disk, cdrom or net"));
        assert!(err(&["-r", "", "vm"]).contains("empty path"));
    }

    #[test]
    fn usage_errors() {
        assert_eq!(err(&[]), "start: needs a VM name (see 'vmctl help start')");
        assert!(err(&["a", "b"]).contains("unexpected argument \"b\""));
        assert!(err(&["-m"]).contains("option -m needs an argument"));
        assert!(err(&["-x", "vm"]).contains("unknown option -x"));
        assert!(err(&["--vcpu", "2", "vm"]).contains("unknown option --vcpu"));
        assert!(err(&["-m", "lots", "vm"]).contains("\"lots\""));
        assert!(err(&["-m", "512", "vm"]).contains("memory 512B is outside the range 2.0M to 1.0T"));
        assert!(err(&["--vcpus", "0", "vm"]).contains("--vcpus \"0\""));
        assert!(err(&["--vcpus", "65", "vm"]).contains("1 to 64"));
        assert!(err(&["--vcpus", "two", "vm"]).contains("--vcpus"));
        assert!(err(&["-b", "", "vm"]).contains("empty path"));
        assert!(err(&["bad/name"]).contains("invalid character"));
        let long = "x".repeat(MAX_CMDLINE + 1);
        assert!(err(&["--cmdline", &long, "vm"]).contains("--cmdline is longer"));
    }
}
