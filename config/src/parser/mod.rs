//! Recursive-descent parser over the lexer's tokens. One [`FileParser`] per
//! file; includes recurse with a fresh one sharing the [`State`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use vmd_proto::size::parse_size;
use vmd_proto::vm::{check_memory_range, validate_name, MAX_CMDLINE, MAX_VCPUS, MEMORY_UNIT};

use crate::lexer::{lex, LexError, Tok, Token};
use crate::{
    AgentX, AllowInstance, BootDevice, Config, ConfigError, DiskDef, DiskFormat, InterfaceDef,
    Ipv4Prefix, Ipv6Prefix, Location, MacAddr, MetricsListen, Owner, Staggered, SwitchDef, VmDef,
    Warning, DEFAULT_LOCAL_PREFIX6, MAX_DISKS, MAX_IFNAME_LEN, MAX_INCLUDE_DEPTH, MAX_INTERFACES,
};

const TOP_KEYWORDS: &[&str] = &[
    "include",
    "local",
    "socket",
    "agentx",
    "metrics",
    "staggered",
    "vm",
    "switch",
];
const VM_KEYWORDS: &[&str] = &[
    "enable",
    "disable",
    "memory",
    "vcpus",
    "boot",
    "initrd",
    "cmdline",
    "cdrom",
    "disk",
    "local",
    "interface",
    "interfaces",
    "owner",
    "allow",
];
const IFACE_KEYWORDS: &[&str] = &[
    "switch", "group", "locked", "lladdr", "rdomain", "up", "down",
];
const SWITCH_KEYWORDS: &[&str] = &[
    "interface",
    "group",
    "locked",
    "rdomain",
    "up",
    "down",
    "enable",
    "disable",
];
const ALLOW_KEYWORDS: &[&str] = &[
    "boot",
    "memory",
    "vcpus",
    "interface",
    "disk",
    "cdrom",
    "instance",
    "owner",
];
/// Words that appear in the grammar besides the block keywords; macros may
/// not be named after any keyword.
const OTHER_KEYWORDS: &[&str] = &[
    "prefix", "inet6", "start", "parallel", "delay", "context", "path", "device", "format", "raw",
    "qcow2", "net", "instance", "filename", "listen",
];
/// `boot filename`: it must fit the DHCP header's 128-byte `file` field,
/// NUL included.
const MAX_BOOT_FILENAME: usize = 127;
/// Unknown-keyword messages list the alternatives up to this many.
const LIST_LIMIT: usize = 8;

mod global;
mod switch;
mod values;
mod vm;

use values::{check_group, check_ifname, parse_mac, parse_owner, parse_prefix4, parse_prefix6};

type Result<T> = std::result::Result<T, ConfigError>;

/// Parses the file at `path`; includes are relative to its directory.
pub fn parse_file(path: &Path) -> Result<Config> {
    parse_file_with(path, &[])
}

/// Parses the file at `path` with macros defined beforehand (`vmd -D
/// name=value`); as on OpenBSD, they override the file's definitions of
/// the same names.
pub fn parse_file_with(path: &Path, defines: &[(String, String)]) -> Result<Config> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Read {
        file: name.clone(),
        message: format!("cannot read: {e}"),
    })?;
    let text = decode(&bytes, &name)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let key = std::fs::canonicalize(path).ok();
    parse_inner(&text, name, dir, key, defines)
}

/// Parses `text`; `name` is the file name used in messages and locations,
/// `base_dir` is where relative includes are found.
pub fn parse_str(text: &str, name: &str, base_dir: &Path) -> Result<Config> {
    let key = std::fs::canonicalize(base_dir.join(name)).ok();
    parse_inner(text, name.to_string(), base_dir.to_path_buf(), key, &[])
}

fn parse_inner(
    text: &str,
    name: String,
    dir: PathBuf,
    key: Option<PathBuf>,
    defines: &[(String, String)],
) -> Result<Config> {
    let toks = lex(text).map_err(|e| lex_error(&name, e))?;
    let mut st = State {
        chain: vec![(name.clone(), key)],
        ..State::default()
    };
    for (k, v) in defines {
        st.macros.insert(k.clone(), v.clone());
        st.fixed_macros.insert(k.clone());
    }
    FileParser {
        st: &mut st,
        file: name,
        dir,
        toks,
        pos: 0,
    }
    .top()?;
    // Switches may be defined after the VMs that use them. As on OpenBSD,
    // an interface naming no defined switch is a plain interface.
    for (sw, at) in &st.switch_refs {
        if !st.switch_at.contains_key(sw) {
            st.cfg.warnings.push(Warning {
                at: at.clone(),
                message: format!("switch \"{sw}\" is not defined: the interface joins no switch"),
            });
        }
    }
    Ok(st.cfg)
}

fn lex_error(file: &str, e: LexError) -> ConfigError {
    ConfigError::At {
        at: Location {
            file: file.to_string(),
            line: e.line,
            col: e.col,
        },
        message: e.message,
    }
}

/// UTF-8 or an error pointing at the first bad byte.
fn decode(bytes: &[u8], file: &str) -> Result<String> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => {
            let good = String::from_utf8_lossy(&bytes[..e.valid_up_to()]);
            let line = good.matches('\n').count() + 1;
            let col = good.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Err(ConfigError::At {
                at: Location {
                    file: file.to_string(),
                    line,
                    col,
                },
                message: "invalid UTF-8".into(),
            })
        }
    }
}

#[derive(Default)]
struct State {
    cfg: Config,
    macros: HashMap<String, String>,
    vm_index: HashMap<String, usize>,
    switch_at: HashMap<String, Location>,
    /// Switch names used by interfaces, checked once everything is read.
    switch_refs: Vec<(String, Location)>,
    /// Macros from the command line (`vmd -D`): the file cannot redefine
    /// them.
    fixed_macros: HashSet<String>,
    /// Files being read: display name and canonical path (for loops).
    chain: Vec<(String, Option<PathBuf>)>,
}

struct FileParser<'s> {
    st: &'s mut State,
    file: String,
    dir: PathBuf,
    /// Always ends with Eof, and `pos` never moves past it.
    toks: Vec<Token>,
    pos: usize,
}

/// An instance being defined: whether its own disks and interfaces have
/// replaced its parent's yet.
struct InstanceCtx {
    disks_replaced: bool,
    ifaces_replaced: bool,
}

fn err(at: Location, message: impl Into<String>) -> ConfigError {
    ConfigError::At {
        at,
        message: message.into(),
    }
}

impl FileParser<'_> {
    fn peek(&self) -> &Token {
        let last = self.toks.len().saturating_sub(1);
        &self.toks[self.pos.min(last)]
    }

    fn advance(&mut self) {
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
    }

    fn loc(&self, t: &Token) -> Location {
        Location {
            file: self.file.clone(),
            line: t.line,
            col: t.col,
        }
    }

    /// The next token if it is an unquoted word.
    fn peek_word(&self) -> Option<&str> {
        match &self.peek().tok {
            Tok::Word(w) => Some(w),
            _ => None,
        }
    }

    fn expect_word(&mut self, kw: &str, after: &str) -> Result<()> {
        if self.peek_word() == Some(kw) {
            self.advance();
            return Ok(());
        }
        let t = self.peek().clone();
        Err(err(
            self.loc(&t),
            format!(
                "expected \"{kw}\" after {after}, found {}",
                t.tok.describe()
            ),
        ))
    }

    /// A value: word, quoted string or macro (expanded).
    fn value(&mut self, what: &str) -> Result<(String, Location)> {
        let t = self.peek().clone();
        let at = self.loc(&t);
        let v = match t.tok {
            Tok::Word(w) | Tok::Str(w) => w,
            Tok::Macro(m) => match self.st.macros.get(&m) {
                Some(v) => v.clone(),
                None => return Err(err(at, format!("undefined macro ${m}"))),
            },
            other => {
                return Err(err(
                    at,
                    format!("expected {what}, found {}", other.describe()),
                ))
            }
        };
        self.advance();
        Ok((v, at))
    }

    fn number(&mut self, what: &str, lo: u32, hi: u32) -> Result<u32> {
        let (s, at) = self.value(what)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(at, format!("{what} must be a number, found \"{s}\"")));
        }
        match s.parse::<u64>() {
            Ok(n) if n >= u64::from(lo) && n <= u64::from(hi) => Ok(n as u32),
            _ => Err(err(at, format!("{what} must be between {lo} and {hi}"))),
        }
    }

    fn path(&mut self, what: &str) -> Result<PathBuf> {
        let (s, at) = self.value(what)?;
        if s.is_empty() {
            return Err(err(at, format!("{what} must not be empty")));
        }
        Ok(PathBuf::from(s))
    }

    fn warn(&mut self, at: Location, message: impl Into<String>) {
        self.st.cfg.warnings.push(Warning {
            at,
            message: message.into(),
        });
    }

    fn unknown(&self, word: &str, at: Location, place: &str, allowed: &[&str]) -> ConfigError {
        let mut m = format!("unknown keyword \"{word}\" {place}");
        if allowed.len() <= LIST_LIMIT {
            m.push_str("; expected one of: ");
            m.push_str(&allowed.join(", "));
        }
        err(at, m)
    }

    /// After a top-level statement: end of line, ';' or end of file.
    fn end_top(&mut self) -> Result<()> {
        let t = self.peek().clone();
        let at = self.loc(&t);
        match t.tok {
            Tok::Newline | Tok::Semi => {
                self.advance();
                Ok(())
            }
            Tok::Eof => Ok(()),
            other => Err(err(
                at,
                format!("expected end of line, found {}", other.describe()),
            )),
        }
    }

    /// `{ item (sep item)* }` where sep is newline, ';' or ','. The brace
    /// must be on the statement's line.
    fn block<F>(&mut self, what: &str, mut item: F) -> Result<()>
    where
        F: FnMut(&mut Self, &str, Location) -> Result<()>,
    {
        let open = self.peek().clone();
        if open.tok != Tok::LBrace {
            return Err(err(
                self.loc(&open),
                format!(
                    "expected '{{' to open {what}, found {}",
                    open.tok.describe()
                ),
            ));
        }
        self.advance();
        loop {
            let t = self.peek().clone();
            let at = self.loc(&t);
            match t.tok {
                Tok::Newline | Tok::Semi | Tok::Comma => self.advance(),
                Tok::RBrace => {
                    self.advance();
                    return Ok(());
                }
                Tok::Eof => {
                    return Err(err(
                        at,
                        format!(
                            "missing '}}' at end of file: {what} opened at line {} is not closed",
                            open.line
                        ),
                    ))
                }
                Tok::Word(w) => {
                    self.advance();
                    item(self, &w, at)?;
                    let t = self.peek().clone();
                    let at = self.loc(&t);
                    match t.tok {
                        Tok::Newline | Tok::Semi | Tok::Comma => self.advance(),
                        Tok::RBrace => {}
                        other => {
                            return Err(err(
                                at,
                                format!(
                                    "expected end of line, ';' or '}}' in {what}, found {}",
                                    other.describe()
                                ),
                            ))
                        }
                    }
                }
                other => {
                    return Err(err(
                        at,
                        format!("expected a keyword in {what}, found {}", other.describe()),
                    ))
                }
            }
        }
    }

    fn top(&mut self) -> Result<()> {
        loop {
            let t = self.peek().clone();
            let at = self.loc(&t);
            match &t.tok {
                Tok::Newline | Tok::Semi => self.advance(),
                Tok::Eof => return Ok(()),
                Tok::Word(w) => {
                    self.advance();
                    if self.peek().tok == Tok::Eq {
                        self.advance();
                        self.macro_def(w, at)?;
                    } else {
                        match w.as_str() {
                            "include" => self.include()?,
                            "local" => self.local()?,
                            "socket" => {
                                self.expect_word("owner", "socket")?;
                                let (s, at) = self.value("socket owner")?;
                                self.st.cfg.globals.socket_owner = Some(parse_owner(&s, at)?);
                            }
                            "agentx" => self.agentx(at)?,
                            "metrics" => self.metrics()?,
                            "staggered" => self.staggered()?,
                            "vm" => self.vm(at)?,
                            "switch" => self.switch(at)?,
                            _ => return Err(self.unknown(w, at, "at top level", TOP_KEYWORDS)),
                        }
                    }
                    self.end_top()?;
                }
                other => {
                    return Err(err(
                        at,
                        format!("expected a statement, found {}", other.describe()),
                    ))
                }
            }
        }
    }

    fn macro_def(&mut self, name: &str, at: Location) -> Result<()> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(at, format!("invalid macro name \"{name}\"")));
        }
        let reserved = [
            TOP_KEYWORDS,
            VM_KEYWORDS,
            IFACE_KEYWORDS,
            SWITCH_KEYWORDS,
            ALLOW_KEYWORDS,
            OTHER_KEYWORDS,
        ]
        .iter()
        .any(|l| l.contains(&name));
        if reserved {
            return Err(err(
                at,
                format!("macro name \"{name}\" is a reserved keyword"),
            ));
        }
        let (v, _) = self.value("macro value")?;
        if !self.st.fixed_macros.contains(name) {
            self.st.macros.insert(name.to_string(), v);
        }
        Ok(())
    }

    fn include(&mut self) -> Result<()> {
        let (p, at) = self.value("include file name")?;
        if p.is_empty() {
            return Err(err(at, "include file name must not be empty"));
        }
        let rel = Path::new(&p);
        let (real, shown) = if rel.is_absolute() {
            (rel.to_path_buf(), p.clone())
        } else {
            let shown_dir = Path::new(&self.file).parent().unwrap_or(Path::new(""));
            (
                self.dir.join(rel),
                shown_dir.join(rel).display().to_string(),
            )
        };
        let key = std::fs::canonicalize(&real).ok();
        let chain = |st: &State| {
            let mut names: Vec<&str> = st.chain.iter().map(|(n, _)| n.as_str()).collect();
            names.push(&shown);
            names.join(" -> ")
        };
        if key.is_some() && self.st.chain.iter().any(|(_, k)| *k == key) {
            return Err(err(at, format!("include loop: {}", chain(self.st))));
        }
        if self.st.chain.len() > MAX_INCLUDE_DEPTH {
            return Err(err(
                at,
                format!(
                    "includes nested more than {MAX_INCLUDE_DEPTH} deep: {}",
                    chain(self.st)
                ),
            ));
        }
        let bytes = std::fs::read(&real)
            .map_err(|e| err(at, format!("cannot read include file \"{p}\": {e}")))?;
        let text = decode(&bytes, &shown)?;
        let toks = lex(&text).map_err(|e| lex_error(&shown, e))?;
        let dir = real
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        self.st.chain.push((shown.clone(), key));
        let r = FileParser {
            st: self.st,
            file: shown,
            dir,
            toks,
            pos: 0,
        }
        .top();
        self.st.chain.pop();
        r
    }
}
