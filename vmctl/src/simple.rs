//! The commands that take no flags: pause, unpause, wait, load, reload,
//! reset, log and metrics. Each is one request and one reply.

use vmd_proto::msg::{Reply, Request, ResetWhat};

use crate::args::Spec;
use crate::client::{Ctx, Error};

const NO_FLAGS: Spec = Spec {
    short: "",
    long: &[],
    intermixed: true,
};

/// The operands of a flagless command, exactly `min..=max` of them.
fn operands(
    cmd: &'static str,
    args: &[String],
    min: usize,
    max: usize,
) -> Result<Vec<String>, Error> {
    let parsed = NO_FLAGS.parse(args).map_err(|e| Error::args(cmd, e))?;
    let ops = parsed.operands;
    if ops.len() < min {
        return Err(Error::usage(cmd, "missing argument"));
    }
    if let Some(extra) = ops.get(max) {
        return Err(Error::usage(cmd, format!("unexpected argument {extra:?}")));
    }
    Ok(ops)
}

fn name(cmd: &'static str, args: &[String]) -> Result<String, Error> {
    let mut ops = operands(cmd, args, 1, 1)?;
    Ok(ops.remove(0))
}

pub fn parse(cmd: &'static str, args: &[String]) -> Result<Request, Error> {
    Ok(match cmd {
        "pause" => Request::Pause {
            name: name(cmd, args)?,
        },
        "unpause" => Request::Unpause {
            name: name(cmd, args)?,
        },
        "wait" => Request::Wait {
            name: name(cmd, args)?,
        },
        "load" => {
            let file = name(cmd, args)?;
            // vmd runs elsewhere: it needs the path as we mean it.
            let path = std::path::absolute(&file).map_err(|e| Error::io("load path", e))?;
            Request::Load {
                path: path.display().to_string(),
            }
        }
        "reload" => {
            operands(cmd, args, 0, 0)?;
            Request::Reload
        }
        "reset" => {
            let ops = operands(cmd, args, 0, 1)?;
            let what = match ops.first().map(String::as_str) {
                None | Some("all") => ResetWhat::All,
                Some("vms") => ResetWhat::Vms,
                Some("switches") => ResetWhat::Switches,
                Some(other) => {
                    return Err(Error::usage(
                        cmd,
                        format!("unknown target {other:?}: all, vms or switches"),
                    ))
                }
            };
            Request::Reset { what }
        }
        "log" => {
            let level = name(cmd, args)?;
            let verbose = match level.as_str() {
                "verbose" => true,
                "brief" => false,
                other => {
                    return Err(Error::usage(
                        cmd,
                        format!("unknown level {other:?}: verbose or brief"),
                    ))
                }
            };
            Request::Log { verbose }
        }
        other => return Err(Error::usage(cmd, format!("no such command {other:?}"))),
    })
}

/// `vmctl metrics`: the daemon's metrics in the Prometheus text format,
/// on standard output.
pub fn metrics(ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    use std::io::Write;
    operands("metrics", args, 0, 0)?;
    let mut out = std::io::stdout().lock();
    let mut print = |text: &str| {
        out.write_all(text.as_bytes())
            .map_err(|e| Error::io("standard output", e))
    };
    // A long text comes in parts, the last as `Metrics`.
    let mut reply = ctx.request_stream(Request::Metrics)?;
    loop {
        match reply.next()? {
            Reply::MetricsPart(text) => print(&text)?,
            Reply::Metrics(text) => return print(&text),
            other => return Err(Error::Protocol(format!("{other:?}"))),
        }
    }
}

macro_rules! command {
    ($($f:ident => $name:literal),* $(,)?) => {
        $(pub fn $f(ctx: &Ctx, args: &[String]) -> Result<(), Error> {
            ctx.request_ok(parse($name, args)?)
        })*
    };
}

command! {
    pause => "pause",
    unpause => "unpause",
    wait => "wait",
    load => "load",
    reload => "reload",
    reset => "reset",
    log => "log",
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cmd: &'static str, words: &[&str]) -> Result<Request, Error> {
        parse(
            cmd,
            &words.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn each_command_builds_its_request() {
        assert_eq!(
            p("pause", &["a"]).unwrap(),
            Request::Pause { name: "a".into() }
        );
        assert_eq!(
            p("unpause", &["a"]).unwrap(),
            Request::Unpause { name: "a".into() }
        );
        assert_eq!(
            p("wait", &["a"]).unwrap(),
            Request::Wait { name: "a".into() }
        );
        assert_eq!(p("reload", &[]).unwrap(), Request::Reload);
        assert_eq!(
            p("reset", &[]).unwrap(),
            Request::Reset {
                what: ResetWhat::All
            }
        );
        assert_eq!(
            p("reset", &["vms"]).unwrap(),
            Request::Reset {
                what: ResetWhat::Vms
            }
        );
        assert_eq!(
            p("log", &["brief"]).unwrap(),
            Request::Log { verbose: false }
        );
        match p("load", &["/etc/vm.conf"]).unwrap() {
            Request::Load { path } => assert_eq!(path, "/etc/vm.conf"),
            other => panic!("{other:?}"),
        }
        match p("load", &["rel.conf"]).unwrap() {
            Request::Load { path } => assert!(path.starts_with('/') && path.ends_with("/rel.conf")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_operands_are_usage_errors() {
        assert!(p("pause", &[]).is_err());
        assert!(p("pause", &["a", "b"]).is_err());
        assert!(p("reload", &["x"]).is_err());
        assert!(p("reset", &["disks"])
            .unwrap_err()
            .to_string()
            .contains("disks"));
        assert!(p("log", &["loud"])
            .unwrap_err()
            .to_string()
            .contains("loud"));
        assert!(p("wait", &["-x", "a"]).is_err());
    }
}
