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

    fn local(&mut self) -> Result<()> {
        let t = self.peek().clone();
        match self.peek_word() {
            Some("prefix") => {
                self.advance();
                let (s, at) = self.value("local prefix")?;
                self.st.cfg.globals.local_prefix = parse_prefix4(&s, at)?;
            }
            Some("inet6") => {
                self.advance();
                let mut p = DEFAULT_LOCAL_PREFIX6;
                if self.peek_word() == Some("prefix") {
                    self.advance();
                    let (s, at) = self.value("local inet6 prefix")?;
                    p = parse_prefix6(&s, at)?;
                }
                self.st.cfg.globals.local_inet6 = Some(p);
            }
            _ => {
                return Err(err(
                    self.loc(&t),
                    format!(
                        "expected \"prefix\" or \"inet6\" after local, found {}",
                        t.tok.describe()
                    ),
                ))
            }
        }
        Ok(())
    }

    fn agentx(&mut self, at: Location) -> Result<()> {
        let mut a = AgentX::default();
        loop {
            match self.peek_word() {
                Some("context") if a.context.is_none() => {
                    self.advance();
                    a.context = Some(self.value("agentx context")?.0);
                }
                Some("path") if a.path.is_none() => {
                    self.advance();
                    a.path = Some(self.path("agentx path")?);
                }
                _ => break,
            }
        }
        self.st.cfg.globals.agentx = Some(a);
        self.warn(at, "agentx is not supported; ignored");
        Ok(())
    }

    /// `metrics listen PATH | ADDR:PORT`: an absolute unix socket path,
    /// or a loopback address, so only the host's scrapers reach it.
    fn metrics(&mut self) -> Result<()> {
        self.expect_word("listen", "metrics")?;
        let (s, at) = self.value("metrics listen address")?;
        let listen = if s.starts_with('/') {
            MetricsListen::Unix(PathBuf::from(&s))
        } else {
            let addr: std::net::SocketAddr = s.parse().map_err(|_| {
                err(
                    at.clone(),
                    format!(
                        "metrics listen \"{s}\": expected an absolute socket path or ADDRESS:PORT"
                    ),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(err(
                    at,
                    format!("metrics listen {addr}: only a loopback address (127.0.0.0/8, ::1) is allowed"),
                ));
            }
            MetricsListen::Tcp(addr)
        };
        self.st.cfg.globals.metrics_listen = Some(listen);
        Ok(())
    }

    fn staggered(&mut self) -> Result<()> {
        self.expect_word("start", "staggered")?;
        self.expect_word("parallel", "staggered start")?;
        let parallel = self.number("parallel", 1, u32::MAX)?;
        self.expect_word("delay", "parallel count")?;
        let delay = self.number("delay", 0, u32::MAX)?;
        self.st.cfg.globals.staggered = Some(Staggered { parallel, delay });
        Ok(())
    }

    fn vm(&mut self, at: Location) -> Result<()> {
        let (first, first_at) = self.value("vm name")?;
        let (name, name_at, parent) = if self.peek_word() == Some("instance") {
            self.advance();
            let (n, a) = self.value("instance name")?;
            (n, a, Some((first, first_at)))
        } else {
            (first, first_at, None)
        };
        validate_name(&name).map_err(|m| err(name_at.clone(), m))?;
        if let Some(&i) = self.st.vm_index.get(&name) {
            let prev = &self.st.cfg.vms[i].defined_at;
            return Err(err(
                name_at,
                format!("duplicate vm \"{name}\" (first defined at {prev})"),
            ));
        }

        let mut inst = None;
        let mut vm = match parent {
            None => VmDef::new(name.clone(), at),
            Some((pname, pat)) => {
                let Some(&pi) = self.st.vm_index.get(&pname) else {
                    return Err(err(pat, format!("instance of undefined vm \"{pname}\"")));
                };
                let p = &self.st.cfg.vms[pi];
                // vm.conf is root's, and root may make any instance, of an
                // instance too, changing anything (OpenBSD's vm.conf(5)):
                // `allow instance` binds only users' `vmctl start -t`.
                let allow = p.allow_instance.clone().unwrap_or_default();
                let mut vm = p.clone();
                vm.name = name.clone();
                vm.defined_at = at;
                vm.instance_of = Some(pname.clone());
                // Not inherited: templates are often disabled themselves.
                vm.enabled = true;
                // Users may make instances of it only if its parent says so.
                if !allow.instance {
                    vm.allow_instance = None;
                }
                inst = Some(InstanceCtx {
                    disks_replaced: false,
                    ifaces_replaced: false,
                });
                vm
            }
        };
        let mut seen = HashSet::new();
        self.block("vm block", |p, kw, at| {
            p.vm_item(&mut vm, &mut seen, inst.as_mut(), kw, at)
        })?;
        self.st.vm_index.insert(name, self.st.cfg.vms.len());
        self.st.cfg.vms.push(vm);
        Ok(())
    }

    fn vm_item(
        &mut self,
        vm: &mut VmDef,
        seen: &mut HashSet<&'static str>,
        inst: Option<&mut InstanceCtx>,
        kw: &str,
        at: Location,
    ) -> Result<()> {
        let mut inst = inst;
        let mut once = |key: &'static str, at: &Location| {
            if seen.insert(key) {
                Ok(())
            } else {
                Err(err(at.clone(), format!("{key} specified more than once")))
            }
        };
        match kw {
            "enable" => vm.enabled = true,
            "disable" => vm.enabled = false,
            "memory" => {
                once("memory", &at)?;
                let (s, vat) = self.value("memory size")?;
                vm.memory = Some(self.memory_size(&s, vat)?);
            }
            "vcpus" => {
                once("vcpus", &at)?;
                vm.vcpus = Some(self.number("vcpus", 1, MAX_VCPUS)?);
            }
            "boot" => {
                if self.peek_word() == Some("device") {
                    self.advance();
                    once("boot device", &at)?;
                    let (s, vat) = self.value("boot device")?;
                    vm.boot_device = Some(match s.as_str() {
                        "disk" => BootDevice::Disk,
                        "cdrom" => BootDevice::Cdrom,
                        "net" => BootDevice::Net,
                        _ => {
                            return Err(err(
                                vat,
                                format!("unknown boot device \"{s}\": expected disk, cdrom or net"),
                            ))
                        }
                    });
                } else if self.peek_word() == Some("filename") {
                    self.advance();
                    once("boot filename", &at)?;
                    let (s, vat) = self.value("boot file name")?;
                    if s.is_empty()
                        || s.len() > MAX_BOOT_FILENAME
                        || !s.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(err(
                            vat,
                            format!(
                                "boot filename must be 1 to {MAX_BOOT_FILENAME} printable characters without spaces"
                            ),
                        ));
                    }
                    vm.boot_filename = Some(s);
                } else {
                    once("boot", &at)?;
                    vm.kernel = Some(self.path("boot path")?);
                }
            }
            "initrd" => {
                once("initrd", &at)?;
                vm.initrd = Some(self.path("initrd path")?);
            }
            "cmdline" => {
                once("cmdline", &at)?;
                let (s, vat) = self.value("kernel command line")?;
                if s.len() > MAX_CMDLINE {
                    return Err(err(
                        vat,
                        format!("cmdline is longer than {MAX_CMDLINE} bytes"),
                    ));
                }
                vm.cmdline = Some(s);
            }
            "cdrom" => {
                once("cdrom", &at)?;
                vm.cdrom = Some(self.path("cdrom path")?);
            }
            "disk" => {
                // An instance's own disks replace its parent's.
                if let Some(ctx) = &mut inst {
                    if !ctx.disks_replaced {
                        ctx.disks_replaced = true;
                        vm.disks.clear();
                    }
                }
                if vm.disks.len() >= MAX_DISKS {
                    return Err(err(at, format!("too many disks: at most {MAX_DISKS}")));
                }
                let path = self.path("disk path")?;
                let mut format = None;
                if self.peek_word() == Some("format") {
                    self.advance();
                    let (s, vat) = self.value("disk format")?;
                    format = Some(match s.as_str() {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => {
                            return Err(err(
                                vat,
                                format!("unknown disk format \"{s}\": expected raw or qcow2"),
                            ))
                        }
                    });
                }
                vm.disks.push(DiskDef { path, format });
            }
            "local" | "interface" => {
                let local = kw == "local";
                if local {
                    self.expect_word("interface", "local")?;
                }
                if let Some(ctx) = &mut inst {
                    if !ctx.ifaces_replaced {
                        ctx.ifaces_replaced = true;
                        vm.interfaces.clear();
                    }
                }
                if vm.interfaces.len() >= MAX_INTERFACES {
                    return Err(err(
                        at,
                        format!("too many interfaces: at most {MAX_INTERFACES}"),
                    ));
                }
                let ifd = self.interface(local)?;
                vm.interfaces.push(ifd);
            }
            "interfaces" => {
                once("interfaces", &at)?;
                vm.interface_count = Some(self.number("interfaces", 1, MAX_INTERFACES as u32)?);
            }
            "owner" => {
                once("owner", &at)?;
                let (s, vat) = self.value("owner")?;
                vm.owner = Some(parse_owner(&s, vat)?);
            }
            "allow" => {
                self.expect_word("instance", "allow")?;
                once("allow instance", &at)?;
                vm.allow_instance = Some(self.allow_instance()?);
            }
            _ => return Err(self.unknown(kw, at, "in vm block", VM_KEYWORDS)),
        }
        Ok(())
    }

    fn memory_size(&mut self, s: &str, at: Location) -> Result<u64> {
        let b = parse_size(s).map_err(|e| err(at.clone(), e.to_string()))?;
        check_memory_range(b).map_err(|e| err(at.clone(), e.to_string()))?;
        let rounded = b / MEMORY_UNIT * MEMORY_UNIT;
        if rounded != b {
            self.warn(
                at,
                format!("memory size {s} rounded down to {}M", rounded >> 20),
            );
        }
        Ok(rounded)
    }

    /// After `[local] interface`: `[NAME] [{ ... }]`.
    fn interface(&mut self, local: bool) -> Result<InterfaceDef> {
        let mut ifd = InterfaceDef {
            local,
            ..InterfaceDef::default()
        };
        match self.peek().tok {
            Tok::Word(_) | Tok::Str(_) | Tok::Macro(_) => {
                let (n, at) = self.value("interface name")?;
                check_ifname(&n, at)?;
                ifd.name = Some(n);
            }
            _ => {}
        }
        if self.peek().tok != Tok::LBrace {
            return Ok(ifd);
        }
        let mut seen = HashSet::new();
        let mut rdomain_at = None;
        self.block("interface block", |p, kw, at| {
            let mut once = |key: &'static str| {
                if seen.insert(key) {
                    Ok(())
                } else {
                    Err(err(at.clone(), format!("{key} specified more than once")))
                }
            };
            match kw {
                "switch" => {
                    once("switch")?;
                    let (s, sat) = p.value("switch name")?;
                    p.st.switch_refs.push((s.clone(), sat));
                    ifd.switch = Some(s);
                }
                "group" => {
                    once("group")?;
                    let (s, gat) = p.value("group name")?;
                    check_group(&s, gat.clone())?;
                    p.st.cfg.group_refs.push((s.clone(), gat));
                    ifd.group = Some(s);
                }
                "locked" | "lladdr" => {
                    if kw == "locked" {
                        p.expect_word("lladdr", "locked")?;
                        ifd.locked = true;
                    }
                    once("lladdr")?;
                    ifd.lladdr = p.optional_mac()?;
                }
                "rdomain" => {
                    once("rdomain")?;
                    ifd.rdomain = Some(p.number("rdomain", 0, 255)?);
                    rdomain_at = Some(at.clone());
                }
                "up" => ifd.up = true,
                "down" => ifd.up = false,
                _ => return Err(p.unknown(kw, at.clone(), "in interface block", IFACE_KEYWORDS)),
            }
            Ok(())
        })?;
        if let (Some(at), Some(_)) = (rdomain_at, &ifd.switch) {
            // A bridge port cannot be in a VRF of its own on Linux.
            self.warn(
                at,
                "rdomain of an interface on a switch is ignored: on Linux the \
                 switch's bridge is in a VRF, with all its ports (give the switch the rdomain)",
            );
        }
        Ok(ifd)
    }

    /// The MAC after `lladdr`, if one is there.
    fn optional_mac(&mut self) -> Result<Option<MacAddr>> {
        match &self.peek().tok {
            Tok::Word(w) if IFACE_KEYWORDS.contains(&w.as_str()) => Ok(None),
            Tok::Word(_) | Tok::Str(_) | Tok::Macro(_) => {
                let (s, at) = self.value("MAC address")?;
                parse_mac(&s, at).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn allow_instance(&mut self) -> Result<AllowInstance> {
        let mut a = AllowInstance::default();
        let mut item = |p: &mut Self, kw: &str, at: Location| -> Result<()> {
            match kw {
                "boot" => a.boot = true,
                "memory" => a.memory = true,
                "vcpus" => a.vcpus = true,
                "interface" => a.interface = true,
                "disk" => a.disk = true,
                "cdrom" => a.cdrom = true,
                "instance" => a.instance = true,
                "owner" => {
                    if a.owner.is_some() {
                        return Err(err(at, "owner specified more than once"));
                    }
                    let (s, oat) = p.value("owner")?;
                    a.owner = Some(parse_owner(&s, oat)?);
                }
                _ => return Err(p.unknown(kw, at, "in allow instance", ALLOW_KEYWORDS)),
            }
            Ok(())
        };
        if self.peek().tok == Tok::LBrace {
            self.block("allow instance block", item)?;
        } else {
            let t = self.peek().clone();
            let at = self.loc(&t);
            match t.tok {
                Tok::Word(w) => {
                    self.advance();
                    item(self, &w, at)?;
                }
                other => {
                    return Err(err(
                        at,
                        format!(
                            "expected '{{' or a keyword after allow instance, found {}",
                            other.describe()
                        ),
                    ))
                }
            }
        }
        Ok(a)
    }

    fn switch(&mut self, at: Location) -> Result<()> {
        let (name, name_at) = self.value("switch name")?;
        // Same rules as VM names; only the noun differs.
        validate_name(&name)
            .map_err(|m| err(name_at.clone(), m.replacen("VM name", "switch name", 1)))?;
        if let Some(prev) = self.st.switch_at.get(&name) {
            return Err(err(
                name_at,
                format!("duplicate switch \"{name}\" (first defined at {prev})"),
            ));
        }
        let mut iface: Option<String> = None;
        let mut sw = SwitchDef {
            name: name.clone(),
            interface: String::new(),
            group: None,
            locked_lladdr: false,
            rdomain: None,
            up: true,
            enabled: true,
            defined_at: at.clone(),
        };
        let mut seen = HashSet::new();
        self.block("switch block", |p, kw, kat| {
            let mut once = |key: &'static str| {
                if seen.insert(key) {
                    Ok(())
                } else {
                    Err(err(kat.clone(), format!("{key} specified more than once")))
                }
            };
            match kw {
                "interface" => {
                    once("interface")?;
                    let (s, iat) = p.value("bridge interface name")?;
                    check_ifname(&s, iat)?;
                    iface = Some(s);
                }
                "group" => {
                    once("group")?;
                    let (s, gat) = p.value("group name")?;
                    check_group(&s, gat.clone())?;
                    p.st.cfg.group_refs.push((s.clone(), gat));
                    sw.group = Some(s);
                }
                "locked" => {
                    p.expect_word("lladdr", "locked")?;
                    sw.locked_lladdr = true;
                }
                "rdomain" => {
                    once("rdomain")?;
                    sw.rdomain = Some(p.number("rdomain", 0, 255)?);
                }
                "up" => sw.up = true,
                "down" => sw.up = false,
                "enable" => sw.enabled = true,
                "disable" => sw.enabled = false,
                _ => return Err(p.unknown(kw, kat.clone(), "in switch block", SWITCH_KEYWORDS)),
            }
            Ok(())
        })?;
        let Some(iface) = iface else {
            return Err(err(name_at, format!("switch \"{name}\" has no interface")));
        };
        sw.interface = iface;
        self.st.switch_at.insert(name, at);
        self.st.cfg.switches.push(sw);
        Ok(())
    }
}

fn parse_prefix4(s: &str, at: Location) -> Result<Ipv4Prefix> {
    let bad = || {
        err(
            at.clone(),
            format!("invalid local prefix \"{s}\": expected A.B.C.D/len"),
        )
    };
    let (a, l) = s.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
    let len: u8 = l.parse().map_err(|_| bad())?;
    if len > 32 || !l.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if len > 16 {
        return Err(err(
            at,
            format!("local prefix {s} is too long: the length must be at most 16"),
        ));
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    if u32::from(addr) & !mask != 0 {
        return Err(err(at, format!("local prefix {s} has host bits set")));
    }
    Ok(Ipv4Prefix { addr, len })
}

fn parse_prefix6(s: &str, at: Location) -> Result<Ipv6Prefix> {
    let bad = || {
        err(
            at.clone(),
            format!("invalid local inet6 prefix \"{s}\": expected ADDR/len"),
        )
    };
    let (a, l) = s.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv6Addr = a.parse().map_err(|_| bad())?;
    let len: u8 = l.parse().map_err(|_| bad())?;
    if len > 128 || !l.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if len > 64 {
        return Err(err(
            at,
            format!("local inet6 prefix {s} is too long: the length must be at most 64"),
        ));
    }
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    if u128::from(addr) & !mask != 0 {
        return Err(err(at, format!("local inet6 prefix {s} has host bits set")));
    }
    Ok(Ipv6Prefix { addr, len })
}

/// `user`, `user:group` or `:group`, with portable account names.
fn parse_owner(s: &str, at: Location) -> Result<Owner> {
    let bad = || {
        err(
            at.clone(),
            format!("invalid owner \"{s}\": expected user, user:group or :group"),
        )
    };
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let user = (!u.is_empty()).then(|| u.to_string());
    let group = match g {
        Some("") => return Err(bad()),
        Some(g) => Some(g.to_string()),
        None => None,
    };
    if user.is_none() && group.is_none() {
        return Err(bad());
    }
    for (kind, n) in [("user", &user), ("group", &group)] {
        if let Some(n) = n {
            let ok = n.len() <= 32
                && !n.starts_with('-')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(err(
                    at.clone(),
                    format!("invalid {kind} name \"{n}\" in owner"),
                ));
            }
        }
    }
    Ok(Owner { user, group })
}

fn check_ifname(s: &str, at: Location) -> Result<()> {
    if s.len() > MAX_IFNAME_LEN {
        return Err(err(
            at,
            format!("interface name \"{s}\" is longer than {MAX_IFNAME_LEN} characters"),
        ));
    }
    // The same rule priv applies when it creates the interface.
    if !vmd_proto::net::valid_ifname(s) {
        return Err(err(at, format!("invalid interface name \"{s}\"")));
    }
    Ok(())
}

/// Interface group names: like interface names, but a trailing digit
/// would make them look like an interface unit.
fn check_group(s: &str, at: Location) -> Result<()> {
    if s.is_empty()
        || s.len() > MAX_IFNAME_LEN
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(err(at, format!("invalid group name \"{s}\"")));
    }
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        return Err(err(
            at,
            format!("group name \"{s}\" must not end with a digit"),
        ));
    }
    Ok(())
}

/// Six colon-separated groups of one or two hex digits; unicast only.
fn parse_mac(s: &str, at: Location) -> Result<MacAddr> {
    let bad = || err(at.clone(), format!("invalid MAC address \"{s}\""));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next().ok_or_else(bad)?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if out[0] & 1 != 0 {
        return Err(err(
            at,
            format!("MAC address \"{s}\" is a multicast address"),
        ));
    }
    Ok(MacAddr(out))
}
