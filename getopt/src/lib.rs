//! A small getopt(3)-like parser, the one both vmd and vmctl use (its
//! own crate so vmctl links no daemon crate for it; no dependencies).
//!
//! Short options follow getopt's rules: they bundle (`-fw`), an option
//! that takes an argument gets it attached (`-m256M`) or from the next word
//! (`-m 256M`), and `--` ends the options. Long options must be spelled out
//! in full (`--vcpus 2` or `--vcpus=2`); they are never abbreviated, so
//! scripts keep working when new ones appear.

use std::fmt;

/// Which options a command takes.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// getopt-style short options: each letter, followed by ':' when it
    /// takes an argument ("cb:m:").
    pub short: &'static str,
    /// Long option names without the dashes, followed by '=' when they take
    /// an argument ("vcpus=", "json").
    pub long: &'static [&'static str],
    /// Whether options may follow operands (`start name -m 1G`, as
    /// OpenBSD's vmctl allows). When false, the first operand ends the
    /// options, as the global options before the command need.
    pub intermixed: bool,
}

/// One option as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt {
    Short(char),
    Long(&'static str),
}

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Opt::Short(c) => write!(f, "-{c}"),
            Opt::Long(name) => write!(f, "--{name}"),
        }
    }
}

/// An option and its argument, when it takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub opt: Opt,
    pub arg: Option<String>,
}

impl Found {
    /// The option's argument ("" for an option that takes none, which the
    /// spec rules out for the options that do).
    pub fn arg(&self) -> &str {
        self.arg.as_deref().unwrap_or("")
    }
}

/// The options in the order given, then the operands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub opts: Vec<Found>,
    pub operands: Vec<String>,
}

/// What was wrong with the arguments (the caller adds the command name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    UnknownOption(String),
    MissingArgument(Opt),
    UnexpectedArgument(Opt),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::UnknownOption(o) => write!(f, "unknown option {o}"),
            ArgError::MissingArgument(o) => write!(f, "option {o} needs an argument"),
            ArgError::UnexpectedArgument(o) => write!(f, "option {o} takes no argument"),
        }
    }
}

impl Spec {
    /// Whether short option `c` exists, and whether it takes an argument.
    fn short_takes_arg(&self, c: char) -> Option<bool> {
        if c == ':' {
            return None;
        }
        let mut chars = self.short.chars().peekable();
        while let Some(o) = chars.next() {
            let takes = chars.peek() == Some(&':');
            if takes {
                chars.next();
            }
            if o == c {
                return Some(takes);
            }
        }
        None
    }

    /// The spec's own spelling of long option `name`, and whether it takes
    /// an argument.
    fn long_option(&self, name: &str) -> Option<(&'static str, bool)> {
        self.long.iter().find_map(|l| match l.strip_suffix('=') {
            Some(n) if n == name => Some((n, true)),
            None if *l == name => Some((*l, false)),
            _ => None,
        })
    }

    /// Splits `args` (the words after the command name) into options and
    /// operands.
    pub fn parse(&self, args: &[String]) -> Result<Parsed, ArgError> {
        let mut parsed = Parsed::default();
        let mut words = args.iter();
        while let Some(word) = words.next() {
            if word == "--" {
                parsed.operands.extend(words.cloned());
                break;
            }
            if let Some(long) = word.strip_prefix("--") {
                let (name, attached) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                let (opt_name, takes) = self
                    .long_option(name)
                    .ok_or_else(|| ArgError::UnknownOption(format!("--{name}")))?;
                let opt = Opt::Long(opt_name);
                let arg = match (takes, attached) {
                    (true, Some(v)) => Some(v),
                    (true, None) => Some(
                        words
                            .next()
                            .cloned()
                            .ok_or(ArgError::MissingArgument(opt))?,
                    ),
                    (false, Some(_)) => return Err(ArgError::UnexpectedArgument(opt)),
                    (false, None) => None,
                };
                parsed.opts.push(Found { opt, arg });
                continue;
            }
            // A lone "-" is an operand, as in getopt.
            let Some(bundle) = word.strip_prefix('-').filter(|b| !b.is_empty()) else {
                parsed.operands.push(word.clone());
                if !self.intermixed {
                    parsed.operands.extend(words.cloned());
                    break;
                }
                continue;
            };
            for (i, c) in bundle.char_indices() {
                let opt = Opt::Short(c);
                let takes = self
                    .short_takes_arg(c)
                    .ok_or_else(|| ArgError::UnknownOption(opt.to_string()))?;
                if !takes {
                    parsed.opts.push(Found { opt, arg: None });
                    continue;
                }
                // The rest of the bundle is the argument, or else the next word.
                let rest = &bundle[i + c.len_utf8()..];
                let arg = if rest.is_empty() {
                    words
                        .next()
                        .cloned()
                        .ok_or(ArgError::MissingArgument(opt))?
                } else {
                    rest.to_string()
                };
                parsed.opts.push(Found {
                    opt,
                    arg: Some(arg),
                });
                break;
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Spec = Spec {
        short: "cb:m:",
        long: &["vcpus=", "json"],
        intermixed: true,
    };
    const GLOBAL: Spec = Spec {
        short: "vs:",
        long: &[],
        intermixed: false,
    };

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    fn parse(spec: &Spec, s: &[&str]) -> Result<Parsed, ArgError> {
        spec.parse(&words(s))
    }

    fn short(c: char, arg: Option<&str>) -> Found {
        Found {
            opt: Opt::Short(c),
            arg: arg.map(str::to_string),
        }
    }

    fn long(n: &'static str, arg: Option<&str>) -> Found {
        Found {
            opt: Opt::Long(n),
            arg: arg.map(str::to_string),
        }
    }

    #[test]
    fn empty() {
        assert_eq!(parse(&START, &[]), Ok(Parsed::default()));
    }

    #[test]
    fn bundled_flags() {
        let p = parse(&START, &["-cc", "vm"]).unwrap();
        assert_eq!(p.opts, vec![short('c', None), short('c', None)]);
        assert_eq!(p.operands, words(&["vm"]));
    }

    #[test]
    fn attached_and_separate_arguments() {
        let p = parse(&START, &["-m256M", "-m", "1G", "vm"]).unwrap();
        assert_eq!(
            p.opts,
            vec![short('m', Some("256M")), short('m', Some("1G"))]
        );
        assert_eq!(p.operands, words(&["vm"]));
    }

    #[test]
    fn bundle_ending_in_option_with_argument() {
        let p = parse(&START, &["-cm", "1G", "-cb/k", "vm"]).unwrap();
        assert_eq!(
            p.opts,
            vec![
                short('c', None),
                short('m', Some("1G")),
                short('c', None),
                short('b', Some("/k")),
            ]
        );
    }

    #[test]
    fn argument_may_look_like_an_option() {
        let p = parse(&START, &["-b", "-c", "vm"]).unwrap();
        assert_eq!(p.opts, vec![short('b', Some("-c"))]);
        assert_eq!(p.operands, words(&["vm"]));
    }

    #[test]
    fn long_options() {
        let p = parse(&START, &["--vcpus", "2", "--vcpus=4", "--json", "vm"]).unwrap();
        assert_eq!(
            p.opts,
            vec![
                long("vcpus", Some("2")),
                long("vcpus", Some("4")),
                long("json", None)
            ]
        );
        // An empty attached value is still a value.
        let p = parse(&START, &["--vcpus="]).unwrap();
        assert_eq!(p.opts, vec![long("vcpus", Some(""))]);
    }

    #[test]
    fn long_options_are_never_abbreviated() {
        assert_eq!(
            parse(&START, &["--vcpu", "2"]),
            Err(ArgError::UnknownOption("--vcpu".into()))
        );
        assert_eq!(
            parse(&START, &["--js"]),
            Err(ArgError::UnknownOption("--js".into()))
        );
    }

    #[test]
    fn missing_arguments() {
        assert_eq!(
            parse(&START, &["vm", "-m"]),
            Err(ArgError::MissingArgument(Opt::Short('m')))
        );
        assert_eq!(
            parse(&START, &["-cm"]),
            Err(ArgError::MissingArgument(Opt::Short('m')))
        );
        assert_eq!(
            parse(&START, &["--vcpus"]),
            Err(ArgError::MissingArgument(Opt::Long("vcpus")))
        );
    }

    #[test]
    fn unknown_and_unexpected() {
        assert_eq!(
            parse(&START, &["-x"]),
            Err(ArgError::UnknownOption("-x".into()))
        );
        assert_eq!(
            parse(&START, &["-cx"]),
            Err(ArgError::UnknownOption("-x".into()))
        );
        // ':' in the spec is syntax, never an option.
        assert_eq!(
            parse(&START, &["-:"]),
            Err(ArgError::UnknownOption("-:".into()))
        );
        assert_eq!(
            parse(&START, &["--nope"]),
            Err(ArgError::UnknownOption("--nope".into()))
        );
        assert_eq!(
            parse(&START, &["--json=yes"]),
            Err(ArgError::UnexpectedArgument(Opt::Long("json")))
        );
        assert_eq!(
            ArgError::MissingArgument(Opt::Short('m')).to_string(),
            "option -m needs an argument"
        );
    }

    #[test]
    fn double_dash_ends_options() {
        let p = parse(&START, &["-c", "--", "-m", "--json"]).unwrap();
        assert_eq!(p.opts, vec![short('c', None)]);
        assert_eq!(p.operands, words(&["-m", "--json"]));
    }

    #[test]
    fn intermixed_options_and_operands() {
        let p = parse(&START, &["vm", "-m", "1G", "extra"]).unwrap();
        assert_eq!(p.opts, vec![short('m', Some("1G"))]);
        assert_eq!(p.operands, words(&["vm", "extra"]));
        // A lone dash is an operand.
        let p = parse(&START, &["-"]).unwrap();
        assert_eq!(p.operands, words(&["-"]));
    }

    #[test]
    fn first_operand_stops_when_not_intermixed() {
        let p = parse(&GLOBAL, &["-vs/tmp/s", "stop", "-f", "vm"]).unwrap();
        assert_eq!(p.opts, vec![short('v', None), short('s', Some("/tmp/s"))]);
        assert_eq!(p.operands, words(&["stop", "-f", "vm"]));
    }
}
