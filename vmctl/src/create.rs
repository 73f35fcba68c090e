//! `vmctl create [-b base | -i input] [-s size] [raw:|qcow2:]path`: makes a
//! disk image here, as the invoking user (no daemon involved), as
//! OpenBSD's vmctl does.

use std::path::PathBuf;

use vmd_disk::{create, parse_create_target, CreateSpec};
use vmd_proto::size::parse_size;

use crate::args::{Opt, Spec};
use crate::client::{Ctx, Error};

const CMD: &str = "create";

pub const SPEC: Spec = Spec {
    short: "b:i:s:",
    long: &[],
    intermixed: true,
};

/// The image to make and how.
pub fn parse(args: &[String]) -> Result<(PathBuf, CreateSpec), Error> {
    let parsed = SPEC.parse(args).map_err(|e| Error::args(CMD, e))?;
    let (mut base, mut input, mut size) = (None, None, None);
    // `-b`/`-i` take a `raw:`/`qcow2:` prefix too; without one the name
    // decides, never the file's content.
    for found in &parsed.opts {
        let arg = found.arg();
        match found.opt {
            Opt::Short('b') => base = Some(named_format(arg)),
            Opt::Short('i') => input = Some(named_format(arg)),
            Opt::Short('s') => {
                let bytes = parse_size(arg).map_err(|e| Error::usage(CMD, format!("-s: {e}")))?;
                if bytes == 0 {
                    return Err(Error::usage(CMD, "-s: size must not be zero"));
                }
                size = Some(bytes);
            }
            opt => return Err(Error::usage(CMD, format!("unknown option {opt}"))),
        }
    }
    let target = match parsed.operands.as_slice() {
        [t] => t,
        [] => return Err(Error::usage(CMD, "needs the path of the image to create")),
        [_, extra, ..] => return Err(Error::usage(CMD, format!("unexpected argument {extra:?}"))),
    };
    if base.is_some() && input.is_some() {
        return Err(Error::usage(CMD, "give -b or -i, not both"));
    }
    if base.is_none() && input.is_none() && size.is_none() {
        return Err(Error::usage(
            CMD,
            "needs a size (-s), a base (-b) or an input (-i)",
        ));
    }
    let (format, path) = parse_create_target(target);
    let mut spec = CreateSpec::new(format);
    spec.size = size;
    if let Some((format, path)) = base {
        (spec.base_format, spec.base) = (format, Some(path));
    }
    if let Some((format, path)) = input {
        (spec.input_format, spec.input) = (format, Some(path));
    }
    Ok((path, spec))
}

/// `raw:path`, `qcow2:path` or `path` (format `None`: the name's).
fn named_format(arg: &str) -> (Option<vmd_disk::Format>, PathBuf) {
    let (format, path) = parse_create_target(arg);
    let named = arg.starts_with(&format!("{}:", format.name()));
    (named.then_some(format), path)
}

pub fn run(_ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    let (path, spec) = parse(args)?;
    let format = spec.format;
    create(&path, spec).map_err(|source| Error::Image {
        path: path.display().to_string(),
        source,
    })?;
    eprintln!("vmctl: {format} imagefile created: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmd_disk::Format;

    fn p(words: &[&str]) -> Result<(PathBuf, CreateSpec), Error> {
        parse(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn forms() {
        let (path, spec) = p(&["-s", "1G", "disk.img"]).unwrap();
        assert_eq!(
            (path, spec.format, spec.size),
            ("disk.img".into(), Format::Raw, Some(1 << 30))
        );
        let (path, spec) = p(&["qcow2:d", "-s4M"]).unwrap();
        assert_eq!((path, spec.format), ("d".into(), Format::Qcow2));
        let (_, spec) = p(&["-b", "base.qcow2", "new.qcow2"]).unwrap();
        assert_eq!(
            (spec.base, spec.base_format),
            (Some("base.qcow2".into()), None)
        );
        let (_, spec) = p(&["-i", "in.img", "out.qcow2"]).unwrap();
        assert_eq!(
            (spec.input, spec.input_format, spec.format),
            (Some("in.img".into()), None, Format::Qcow2)
        );
        // -b and -i name a format with a prefix, as the target does.
        let (_, spec) = p(&["-b", "qcow2:base.img", "new.qcow2"]).unwrap();
        assert_eq!(
            (spec.base, spec.base_format),
            (Some("base.img".into()), Some(Format::Qcow2))
        );
        let (_, spec) = p(&["-i", "raw:in.qcow2", "out.img"]).unwrap();
        assert_eq!(
            (spec.input, spec.input_format),
            (Some("in.qcow2".into()), Some(Format::Raw))
        );
    }

    #[test]
    fn usage_errors() {
        assert!(p(&[]).is_err());
        assert!(p(&["x.img"])
            .unwrap_err()
            .to_string()
            .contains("needs a size"));
        assert!(p(&["-b", "a", "-i", "b", "x.qcow2"]).is_err());
        assert!(p(&["-s", "lots", "x.img"])
            .unwrap_err()
            .to_string()
            .contains("-s"));
        assert!(p(&["-s", "0", "x.img"]).is_err());
    }
}
