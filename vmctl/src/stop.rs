//! `vmctl stop`.

use vmd_proto::msg::Request;

use crate::args::{Opt, Spec};
use crate::client::{Ctx, Error};

const CMD: &str = "stop";

pub const SPEC: Spec = Spec {
    short: "afw",
    long: &[],
    intermixed: true,
};

/// Builds the `Request::Stop` the command line asks for.
pub fn parse(args: &[String]) -> Result<Request, Error> {
    let parsed = SPEC.parse(args).map_err(|e| Error::args(CMD, e))?;
    let (mut all, mut force, mut wait) = (false, false, false);
    for found in &parsed.opts {
        match found.opt {
            Opt::Short('a') => all = true,
            Opt::Short('f') => force = true,
            Opt::Short('w') => wait = true,
            opt => return Err(Error::usage(CMD, format!("unknown option {opt}"))),
        }
    }
    let name = match (parsed.operands.as_slice(), all) {
        ([name], false) => Some(name.clone()),
        ([], true) => None,
        ([], false) => return Err(Error::usage(CMD, "needs a VM name or -a")),
        ([_], true) => return Err(Error::usage(CMD, "give a VM name or -a, not both")),
        ([_, extra, ..], _) => {
            return Err(Error::usage(CMD, format!("unexpected argument {extra:?}")))
        }
    };
    Ok(Request::Stop { name, force, wait })
}

pub fn run(ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    ctx.request_ok(parse(args)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(s: &[&str]) -> Result<Request, Error> {
        parse(&s.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    fn stop(name: Option<&str>, force: bool, wait: bool) -> Request {
        Request::Stop {
            name: name.map(str::to_string),
            force,
            wait,
        }
    }

    #[test]
    fn forms() {
        assert_eq!(
            parse_words(&["vm"]).unwrap(),
            stop(Some("vm"), false, false)
        );
        assert_eq!(
            parse_words(&["-fw", "vm"]).unwrap(),
            stop(Some("vm"), true, true)
        );
        assert_eq!(
            parse_words(&["-w", "vm", "-f"]).unwrap(),
            stop(Some("vm"), true, true)
        );
        assert_eq!(parse_words(&["-a"]).unwrap(), stop(None, false, false));
        assert_eq!(parse_words(&["-afw"]).unwrap(), stop(None, true, true));
        assert_eq!(
            parse_words(&["-f", "--", "-vm"]).unwrap(),
            stop(Some("-vm"), true, false)
        );
    }

    #[test]
    fn usage_errors() {
        let e = |s: &[&str]| parse_words(s).unwrap_err().to_string();
        assert_eq!(
            e(&[]),
            "stop: needs a VM name or -a (see 'vmctl help stop')"
        );
        assert_eq!(
            e(&["-f"]),
            "stop: needs a VM name or -a (see 'vmctl help stop')"
        );
        assert!(e(&["-a", "vm"]).contains("not both"));
        assert!(e(&["a", "b"]).contains("unexpected argument \"b\""));
        assert!(e(&["-x", "vm"]).contains("unknown option -x"));
    }
}
