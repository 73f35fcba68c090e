//! Command-line options of vmd, shared by every role.

use std::path::PathBuf;
use std::time::Duration;

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
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("option {flag} needs an argument"))
            };
            match arg.as_str() {
                "--role" => {
                    let name = value("--role")?;
                    opts.role =
                        Role::from_name(&name).ok_or_else(|| format!("unknown role {name:?}"))?;
                }
                "--user" => {
                    let v = value("--user")?;
                    let (u, g) = v
                        .split_once(':')
                        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                        .ok_or_else(|| format!("bad --user {v:?}"))?;
                    opts.user = Some((u, g));
                }
                // Only for `ps`: names the VM a vmm process runs.
                "--vm" => {
                    value("--vm")?;
                }
                // Only for `ps`: names a device process's device.
                "--device" => {
                    value("--device")?;
                }
                "-D" => opts.defines.push(define(&value("-D")?)?),
                d if d.starts_with("-D") => opts.defines.push(define(&d[2..])?),
                "-s" => opts.socket = PathBuf::from(value("-s")?),
                "-f" => {
                    opts.config = PathBuf::from(value("-f")?);
                    opts.config_given = true;
                }
                "--state-dir" => opts.state_dir = PathBuf::from(value("--state-dir")?),
                "--stop-grace" => {
                    let v = value("--stop-grace")?;
                    let secs = v
                        .parse::<u64>()
                        .map_err(|_| format!("bad --stop-grace {v:?}: seconds expected"))?;
                    opts.stop_grace = Duration::from_secs(secs);
                }
                flags if flags.starts_with('-') && !flags.starts_with("--") && flags.len() > 1 => {
                    for c in flags[1..].chars() {
                        match c {
                            'd' => opts.foreground = true,
                            'n' => opts.check_only = true,
                            'v' => opts.verbose = opts.verbose.saturating_add(1),
                            other => return Err(format!("unknown option -{other}")),
                        }
                    }
                }
                other => return Err(format!("unexpected argument {other:?}")),
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
}
