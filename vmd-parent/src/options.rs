//! Command-line options of vmd, shared by every role.

use std::path::PathBuf;
use std::time::Duration;

use vmd_getopt::{Opt, Spec};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmd";
pub const DEFAULT_CONFIG: &str = "/etc/vm.conf";
/// The unprivileged user the control and VM processes run as.
pub const VMD_USER: &str = "_vmd";

pub use crate::roles::Role;

#[derive(Debug, Clone)]
pub struct Options {
    pub role: Role,
    /// `-d`: stay in the foreground, log to stderr.
    pub foreground: bool,
    /// `-v`, repeatable.
    pub verbose: u8,
    /// `-s`: control socket path.
    pub socket: PathBuf,
    /// `--state-dir`: console logs and other state.
    pub state_dir: PathBuf,
    /// Internal: uid:gid the unprivileged roles switch to.
    pub user: Option<(u32, u32)>,
    /// `-f`: the configuration file.
    pub config: PathBuf,
    /// Whether `-f` named it (a missing default file is no error).
    pub config_given: bool,
    /// `-n`: check the configuration and exit.
    pub check_only: bool,
    /// `--stop-grace`: how long `vmctl stop` waits for the guest to power
    /// off after the power button before stopping the VM itself.
    pub stop_grace: Duration,
    /// `-D name=value`: vm.conf macros that override the file's.
    pub defines: Vec<(String, String)>,
}

/// OpenBSD's vmd gives a guest 30 s to shut down through vmmci.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);

pub const USAGE: &str =
    "usage: vmd [-dnv] [-D macro=value] [-f file] [-s socket] [--state-dir dir] [--stop-grace secs]";

/// `-D name=value`, as OpenBSD's vmd takes it.
fn define(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value))
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Ok((name.to_string(), value.to_string()))
        }
        _ => Err(format!("bad -D {arg:?}: expected macro=value")),
    }
}

/// vmd's options, in the getopt(3) style vmctl uses too: `-fFILE` or
/// `-f FILE`, bundles (`-dvv`), `--stop-grace 30` or `--stop-grace=30`.
const SPEC: Spec = Spec {
    short: "dnvD:f:s:",
    long: &[
        "role=",
        "user=",
        "vm=",
        "device=",
        "state-dir=",
        "stop-grace=",
    ],
    intermixed: false,
};

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options {
            role: Role::Parent,
            foreground: false,
            verbose: 0,
            socket: PathBuf::from(vmd_proto::DEFAULT_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            user: None,
            config: PathBuf::from(DEFAULT_CONFIG),
            config_given: false,
            check_only: false,
            stop_grace: DEFAULT_STOP_GRACE,
            defines: Vec::new(),
        };
        let parsed = SPEC.parse(args).map_err(|e| e.to_string())?;
        if let Some(extra) = parsed.operands.first() {
            return Err(format!("unexpected argument {extra:?}"));
        }
        for found in &parsed.opts {
            let v = found.arg();
            match found.opt {
                Opt::Long("role") => {
                    opts.role = Role::from_name(v).ok_or_else(|| format!("unknown role {v:?}"))?;
                }
                Opt::Long("user") => {
                    let (u, g) = v
                        .split_once(':')
                        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                        .ok_or_else(|| format!("bad --user {v:?}"))?;
                    opts.user = Some((u, g));
                }
                // Only for `ps`: name the VM a vmm process runs, and a
                // device process's device.
                Opt::Long("vm") | Opt::Long("device") => {}
                Opt::Short('D') => opts.defines.push(define(v)?),
                Opt::Short('s') => opts.socket = PathBuf::from(v),
                Opt::Short('f') => {
                    opts.config = PathBuf::from(v);
                    opts.config_given = true;
                }
                Opt::Long("state-dir") => opts.state_dir = PathBuf::from(v),
                Opt::Long("stop-grace") => {
                    let secs = v
                        .parse::<u64>()
                        .map_err(|_| format!("bad --stop-grace {v:?}: seconds expected"))?;
                    opts.stop_grace = Duration::from_secs(secs);
                }
                Opt::Short('d') => opts.foreground = true,
                Opt::Short('n') => opts.check_only = true,
                Opt::Short('v') => opts.verbose = opts.verbose.saturating_add(1),
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(opts)
    }

    /// The flags a child role inherits.
    pub fn child_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.foreground {
            args.push("-d".to_string());
        }
        for _ in 0..self.verbose {
            args.push("-v".to_string());
        }
        args.push("-s".into());
        args.push(self.socket.display().to_string());
        if let Some((uid, gid)) = self.user {
            args.push("--user".into());
            args.push(format!("{uid}:{gid}"));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_bundle_and_repeat() {
        let o = parse(&["-dvv", "-s", "/tmp/x.sock"]).unwrap();
        assert!(o.foreground);
        assert_eq!(o.verbose, 2);
        assert_eq!(o.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(o.role, Role::Parent);
        assert_eq!(o.stop_grace, DEFAULT_STOP_GRACE);
        let o = parse(&["--stop-grace", "3"]).unwrap();
        assert_eq!(o.stop_grace, Duration::from_secs(3));
    }

    #[test]
    fn child_args_round_trip() {
        let mut o = parse(&["-dv", "-s", "/tmp/y"]).unwrap();
        o.user = Some((5, 6));
        let mut args = vec!["--role".to_string(), "control".to_string()];
        args.extend(o.child_args());
        let c = Options::parse(&args).unwrap();
        assert_eq!(c.role, Role::Control);
        assert_eq!(c.user, Some((5, 6)));
        assert!(c.foreground);
        assert_eq!(c.socket, o.socket);
    }

    #[test]
    fn defines_are_macro_value_pairs() {
        let o = parse(&["-D", "disk=/a b", "-Dmem=64M"]).unwrap();
        assert_eq!(
            o.defines,
            [
                ("disk".to_string(), "/a b".to_string()),
                ("mem".to_string(), "64M".to_string())
            ]
        );
        assert!(parse(&["-D", "novalue"]).unwrap_err().contains("-D"));
        assert!(parse(&["-D", "a-b=1"]).unwrap_err().contains("-D"));
        assert!(parse(&["-D"]).unwrap_err().contains("-D"));
    }

    #[test]
    fn errors_name_the_option() {
        assert!(parse(&["-x"]).unwrap_err().contains("-x"));
        assert!(parse(&["-s"]).unwrap_err().contains("-s"));
        assert!(parse(&["--role", "bogus"]).unwrap_err().contains("bogus"));
        assert!(parse(&["--stop-grace", "soon"])
            .unwrap_err()
            .contains("--stop-grace"));
    }

    #[test]
    fn getopt_forms_as_vmctl_takes_them() {
        let o = parse(&["-f/etc/x.conf", "--stop-grace=7"]).unwrap();
        assert_eq!(o.config, PathBuf::from("/etc/x.conf"));
        assert!(o.config_given);
        assert_eq!(o.stop_grace, Duration::from_secs(7));
        let o = parse(&["-nf", "y.conf", "--state-dir=/s"]).unwrap();
        assert!(o.check_only);
        assert_eq!(o.config, PathBuf::from("y.conf"));
        assert_eq!(o.state_dir, PathBuf::from("/s"));
        assert!(parse(&["extra"]).unwrap_err().contains("extra"));
        assert!(parse(&["-d", "--", "x"]).unwrap_err().contains("x"));
        assert!(parse(&["--bogus"]).unwrap_err().contains("--bogus"));
        assert!(parse(&["-n=1"]).unwrap_err().contains("-="));
    }
}
