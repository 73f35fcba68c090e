//! vm.conf(5) for vmd: a hand-written lexer and recursive-descent parser
//! producing typed, serializable definitions.
//!
//! ```no_run
//! let cfg = vmd_config::parse_file(std::path::Path::new("/etc/vm.conf"))?;
//! for vm in &cfg.vms {
//!     println!("{} enabled={}", vm.name, vm.enabled);
//! }
//! # Ok::<(), vmd_config::ConfigError>(())
//! ```
//!
//! Extensions over OpenBSD's grammar: `vcpus`, `initrd`, `cmdline` in a vm
//! block, and `vcpus` in `allow instance`.

mod dump;
mod lexer;
mod parser;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use parser::{parse_file, parse_file_with, parse_str};

/// Most disks a VM may have (the protocol's limit, defined there once).
pub use vmd_proto::vm::MAX_DISKS;
/// Most network interfaces a VM may have (the protocol's limit).
pub use vmd_proto::vm::MAX_NICS as MAX_INTERFACES;
/// Deepest include nesting.
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// Longest network interface name (Linux IFNAMSIZ - 1).
pub use vmd_proto::net::MAX_IFNAME_LEN;
/// Default seconds between staggered start batches.
pub const DEFAULT_STAGGER_DELAY: u32 = 30;

/// Where something is in the configuration: file as shown to the user,
/// 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Something wrong at a place in a file (also inside includes).
    #[error("{at}: {message}")]
    At { at: Location, message: String },
    /// The top-level file could not be read at all.
    #[error("{file}: {message}")]
    Read { file: String, message: String },
}

impl ConfigError {
    /// Where the error is, when it is inside a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::At { at, .. } => Some(at),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Something accepted but worth telling the operator (`vmd -n` prints
/// these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub at: Location,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.at, self.message)
    }
}

/// A parsed vm.conf. [`fmt::Display`] (or [`Config::dump`]) prints it in
/// a canonical vm.conf form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Config {
    pub globals: Globals,
    /// In definition order; instances appear fully resolved.
    pub vms: Vec<VmDef>,
    pub switches: Vec<SwitchDef>,
    pub warnings: Vec<Warning>,
    /// Every `group` name and where it is, so the daemon can warn about
    /// names the host has no interface group number for.
    #[serde(default)]
    pub group_refs: Vec<(String, Location)>,
}

impl Config {
    pub fn vm(&self, name: &str) -> Option<&VmDef> {
        self.vms.iter().find(|v| v.name == name)
    }

    pub fn switch(&self, name: &str) -> Option<&SwitchDef> {
        self.switches.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Prefix {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Default `local prefix`: 100.64.0.0/10.
pub const DEFAULT_LOCAL_PREFIX: Ipv4Prefix = Ipv4Prefix {
    addr: Ipv4Addr::new(100, 64, 0, 0),
    len: 10,
};
/// Default `local inet6 prefix`: fd00::/8.
pub const DEFAULT_LOCAL_PREFIX6: Ipv6Prefix = Ipv6Prefix {
    addr: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0),
    len: 8,
};

/// Top-level settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Globals {
    /// Addresses handed to `local interface`s.
    pub local_prefix: Ipv4Prefix,
    /// IPv6 for local interfaces; `None` when `local inet6` is absent.
    pub local_inet6: Option<Ipv6Prefix>,
    /// Owner of the control socket.
    pub socket_owner: Option<Owner>,
    /// Parsed and kept, not used yet (a warning says so).
    pub agentx: Option<AgentX>,
    /// `None`: start as many VMs at once as there are CPUs, 30 s apart.
    pub staggered: Option<Staggered>,
    /// `metrics listen ADDR`: where control serves the metrics to
    /// scrapers.
    #[serde(default)]
    pub metrics_listen: Option<MetricsListen>,
}

/// Where `metrics listen` serves: a unix socket path, or a loopback TCP
/// address (scrapers on the host only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricsListen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Unix(p) => write!(f, "{}", p.display()),
            MetricsListen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl Default for Globals {
    fn default() -> Self {
        Globals {
            local_prefix: DEFAULT_LOCAL_PREFIX,
            local_inet6: None,
            socket_owner: None,
            agentx: None,
            staggered: None,
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AgentX {
    pub context: Option<String>,
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staggered {
    /// VMs started at once (at least 1).
    pub parallel: u32,
    /// Seconds between batches.
    pub delay: u32,
}

/// `user`, `user:group` or `:group`; names are resolved by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub user: Option<String>,
    pub group: Option<String>,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            f.write_str(u)?;
        }
        if let Some(g) = &self.group {
            write!(f, ":{g}")?;
        }
        Ok(())
    }
}

/// `boot device`: the protocol's type, so it travels unchanged.
pub use vmd_proto::vm::BootDevice;

/// Disk image formats: the image library's own type, so a format named in
/// vm.conf travels to the VM process unchanged.
pub use vmd_proto::vm::DiskFormat;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDef {
    pub path: PathBuf,
    /// `None`: detected from the image (qcow2 magic, else raw).
    pub format: Option<DiskFormat>,
}

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceDef {
    /// Host tap name; `None`: the daemon picks one.
    pub name: Option<String>,
    /// `local interface`: a /31 from the local prefix, with DHCP.
    pub local: bool,
    /// Switch (bridge) to join, by switch name.
    pub switch: Option<String>,
    pub group: Option<String>,
    /// Guest MAC; `None`: a random one.
    pub lladdr: Option<MacAddr>,
    /// Drop guest frames whose source MAC is not `lladdr`.
    pub locked: bool,
    pub rdomain: Option<u32>,
    pub up: bool,
}

impl Default for InterfaceDef {
    fn default() -> Self {
        InterfaceDef {
            name: None,
            local: false,
            switch: None,
            group: None,
            lladdr: None,
            locked: false,
            rdomain: None,
            up: true,
        }
    }
}

/// What instances of a VM may set (`allow instance { ... }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AllowInstance {
    /// `boot PATH`, `boot device`, and our `boot filename`, `initrd` and
    /// `cmdline`.
    pub boot: bool,
    pub memory: bool,
    /// Our extension.
    pub vcpus: bool,
    /// `interface`, `local interface`, `interfaces`.
    pub interface: bool,
    pub disk: bool,
    pub cdrom: bool,
    /// Instances may themselves be parents of instances.
    pub instance: bool,
    /// Who may create instances (used by the daemon for vmctl requests).
    pub owner: Option<Owner>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDef {
    pub name: String,
    /// Started when vmd starts (the default).
    pub enabled: bool,
    /// Bytes, a whole number of MiB; `None`: DEFAULT_MEMORY.
    pub memory: Option<u64>,
    /// Our extension; `None`: one vCPU.
    pub vcpus: Option<u32>,
    /// `boot PATH`: the kernel image.
    pub kernel: Option<PathBuf>,
    /// Our extension.
    pub initrd: Option<PathBuf>,
    /// Our extension.
    pub cmdline: Option<String>,
    pub boot_device: Option<BootDevice>,
    /// Our extension (`boot filename "pxe.bin"`): the file the local
    /// interfaces' DHCP server names for a network boot.
    pub boot_filename: Option<String>,
    pub cdrom: Option<PathBuf>,
    pub disks: Vec<DiskDef>,
    pub interfaces: Vec<InterfaceDef>,
    /// `interfaces N`: at least N interfaces; missing ones are plain
    /// interfaces with defaults.
    pub interface_count: Option<u32>,
    pub owner: Option<Owner>,
    pub allow_instance: Option<AllowInstance>,
    /// Parent VM when defined with `vm PARENT instance NAME`.
    pub instance_of: Option<String>,
    pub defined_at: Location,
}

impl VmDef {
    fn new(name: String, defined_at: Location) -> Self {
        VmDef {
            name,
            enabled: true,
            memory: None,
            vcpus: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            boot_device: None,
            boot_filename: None,
            cdrom: None,
            disks: Vec::new(),
            interfaces: Vec::new(),
            interface_count: None,
            owner: None,
            allow_instance: None,
            instance_of: None,
            defined_at,
        }
    }

    /// Equal apart from where it was written: what a reload compares.
    pub fn same_settings(&self, other: &VmDef) -> bool {
        let mut o = other.clone();
        o.defined_at = self.defined_at.clone();
        *self == o
    }

    /// Interfaces the VM gets: the explicit ones plus defaults up to
    /// `interfaces N`.
    pub fn effective_interfaces(&self) -> Vec<InterfaceDef> {
        let mut v = self.interfaces.clone();
        let want = self.interface_count.unwrap_or(0) as usize;
        while v.len() < want {
            v.push(InterfaceDef::default());
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchDef {
    pub name: String,
    /// Host bridge interface.
    pub interface: String,
    pub group: Option<String>,
    pub locked_lladdr: bool,
    pub rdomain: Option<u32>,
    pub up: bool,
    pub enabled: bool,
    pub defined_at: Location,
}

impl SwitchDef {
    pub fn same_settings(&self, other: &SwitchDef) -> bool {
        let mut o = other.clone();
        o.defined_at = self.defined_at.clone();
        *self == o
    }
}

/// The `vmctl start` request equivalent to a definition.
pub fn to_start_request(vm: &VmDef) -> vmd_proto::vm::StartRequest {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    vmd_proto::vm::StartRequest {
        name: vm.name.clone(),
        kernel: path(&vm.kernel),
        initrd: path(&vm.initrd),
        cmdline: vm.cmdline.clone(),
        memory: vm.memory,
        vcpus: vm.vcpus,
        disks: vm
            .disks
            .iter()
            .map(|d| vmd_proto::vm::DiskSpec {
                path: d.path.to_string_lossy().into_owned(),
                format: d.format,
                read_only: false,
            })
            .collect(),
        nics: vm
            .effective_interfaces()
            .iter()
            .map(|i| vmd_proto::vm::NicSpec {
                tap: i.name.clone(),
                local: i.local,
                switch: i.switch.clone(),
                group: i.group.clone(),
                lladdr: i.lladdr.map(|m| m.0),
                locked: i.locked,
                up: i.up,
                rdomain: i.rdomain,
            })
            .collect(),
        template: None,
        cdrom: vm.cdrom.as_ref().map(|p| p.to_string_lossy().into_owned()),
        boot_device: vm.boot_device,
    }
}
