//! The one typed message enum. Each variant has a fixed wire type code
//! (never reuse or renumber one) and a fixed number of fds that must travel
//! with it.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::frame::MAX_PAYLOAD;
use crate::vm::{DevParams, ExitReason, OpenKind, QueueSetup, StartRequest, VmInfo, VmmParams};

/// What a client may ask of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Start(StartRequest),
    /// `name: None` stops every VM (`vmctl stop -a`).
    Stop {
        name: Option<String>,
        force: bool,
        wait: bool,
    },
    Status {
        name: Option<String>,
    },
    Console {
        name: String,
    },
    Pause {
        name: String,
    },
    Unpause {
        name: String,
    },
    /// Answered when the VM next stops.
    Wait {
        name: String,
    },
    /// Adds the definitions of a vm.conf file (`vmctl load`).
    Load {
        path: String,
    },
    /// Re-reads the configuration file (`vmctl reload`, SIGHUP).
    Reload,
    /// `vmctl reset [all|vms|switches]`.
    Reset {
        what: ResetWhat,
    },
    /// `vmctl log verbose|brief`.
    Log {
        verbose: bool,
    },
    /// `vmctl metrics`: the Prometheus text exposition of every VM's and
    /// the daemon's counters.
    Metrics,
}

/// What `vmctl reset` resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetWhat {
    All,
    Vms,
    Switches,
}

/// The daemon's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok(String),
    Error(String),
    Status(Vec<VmInfo>),
    /// The console is attached; one fd follows: a stream socket relaying
    /// the VM's serial console. `tty` is the guest-side pty path.
    Console {
        tty: String,
    },
    /// The answer to `Request::Metrics`: Prometheus text format 0.0.4
    /// (its last part, when `MetricsPart`s came first).
    Metrics(String),
    /// A part of the metrics text too long for one message; more follows,
    /// `Metrics` last.
    MetricsPart(String),
}

/// A client's credentials as the control process read them from the
/// kernel: SO_PEERCRED and SO_PEERGROUPS, both fixed when it connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Supplementary groups, at most [`MAX_GROUPS`].
    pub groups: Vec<u32>,
}

/// Most supplementary groups a client may have; control refuses a client
/// with more (dropping some could grant access: a file whose group bits
/// deny what its other bits allow).
pub const MAX_GROUPS: usize = 4096;

/// Whose rights priv opens a path with: whoever named it (docs/SECURITY.md,
/// "Who names a path"). The connecting user for paths in a vmctl request,
/// root for vm.conf's, an image's owner for the backing file it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opener {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Opener {
    /// vm.conf, vmd's own paths, and root's requests: root's rights.
    pub fn root() -> Opener {
        Opener {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// No one's rights (Debian's nobody and nogroup): what a path whose
    /// namer is unknown opens with, never root's.
    pub fn nobody() -> Opener {
        Opener {
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        }
    }

    /// A vmctl client's rights.
    pub fn client(creds: &Creds) -> Opener {
        Opener {
            uid: creds.uid,
            gid: creds.gid,
            groups: creds.groups.clone(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// What priv's opener child found, sent with the open fd (`PrivChildOpened`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenedFile {
    /// The file's owner and group (fstat): whose rights open the backing
    /// file it names.
    pub uid: u32,
    pub gid: u32,
    /// Device and inode, to find loops in a backing chain.
    pub dev: u64,
    pub ino: u64,
    /// The backing file a qcow2 image names, and its format.
    pub backing: Option<(String, crate::vm::DiskFormat)>,
}

/// The switch (a Linux bridge) a VM's TAP joins, from a vm.conf `switch`
/// block. `locked lladdr` is not here: the VM process enforces it per NIC
/// ([`crate::vm::NicParams::locked`]), where the guest's frames come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchParams {
    /// Host bridge name; priv creates it when missing (and deletes it at
    /// `PrivCleanup`), an existing one is used as it is.
    pub bridge: String,
    /// The switch's group, set as the bridge's interface alias.
    pub group: Option<String>,
    /// Bring the bridge up (or down).
    pub up: bool,
    /// `rdomain N`: the bridge goes into the Linux VRF of routing table N
    /// (created when missing).
    #[serde(default)]
    pub rdomain: Option<u32>,
    /// The switch's group as a Linux interface group number (what
    /// `nft ... iifgroup` and `ip link ... group` match), when the name is
    /// in iproute2's group file.
    #[serde(default)]
    pub ifgroup: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// client -> control.
    Request(Request),
    /// control -> parent: a client's request with its credentials; the
    /// header's peer id names the client connection.
    ClientRequest { creds: Creds, req: Request },
    /// parent -> control -> client.
    Reply(Reply),
    /// parent -> priv: open a file a VM needs with `opener`'s rights (who
    /// named it); peer id is the start's sequence number.
    PrivOpen {
        kind: OpenKind,
        path: String,
        opener: Opener,
    },
    /// priv -> parent: the file is open; one fd follows.
    PrivOpened { kind: OpenKind },
    /// priv -> parent: a disk is open; its top image and `backing` backing
    /// files follow as fds, top down.
    PrivOpenedDisk { index: u8, backing: u32 },
    /// priv -> parent: the file could not be opened.
    PrivFailed {
        kind: OpenKind,
        path: String,
        reason: String,
    },
    /// parent -> VM process: build and run this VM; `params.fd_count()`
    /// fds follow.
    VmmStart(VmmParams),
    /// VM process -> parent: the VM is built and its vCPUs run.
    VmmRunning,
    /// parent -> VM process: stop the VM now.
    VmmTerminate,
    /// parent -> VM process: press the ACPI power button, asking the guest
    /// to power off (`vmctl stop` without -f).
    VmmPowerButton,
    /// VM process -> parent, once running: `count` of its vCPUs' KVM
    /// binary statistics fds (KVM_GET_STATS_FD) follow, the vCPUs from
    /// `first` on, so the parent can read exit counts at any time without
    /// asking. Sent in groups of at most MAX_FDS.
    VmmStats { first: u32, count: u32 },
    /// VM process -> parent: the VM ended, and why; the process exits next.
    VmmExited(ExitReason),
    /// parent -> VM process: stop the vCPUs (the guest clock stops too).
    VmmPause,
    /// parent -> VM process: let the vCPUs run again.
    VmmUnpause,
    /// VM process -> parent: the vCPUs are now paused (or running).
    VmmPauseState { paused: bool },
    /// parent -> every child: change the log verbosity.
    SetVerbose { level: u8 },
    /// parent -> control, first message: the listening control socket
    /// follows as one fd.
    ControlSocket,
    /// control -> parent: how many vmctl clients are connected now.
    ControlClients { count: u32 },
    /// parent -> control: the `metrics listen` socket follows as one fd;
    /// control serves it read-only (HTTP GET of the metrics).
    MetricsSocket,
    /// control -> parent: a scraper (peer id) wants the metrics; answered
    /// with `Reply::Metrics` to that peer id.
    MetricsRequest,
    /// priv -> parent: answers `PrivOpen` of `OpenKind::Tap`; the TAP fd
    /// follows. `name` is the interface the kernel created.
    PrivOpenedTap { index: u8, name: String },
    /// parent -> priv: configure host interface `name` (a VM's TAP): join
    /// `switch` (creating its bridge if missing), set `group` as its alias,
    /// bring it up or down, give it `host_addr` (a local interface's host
    /// side) and `host_addr6` (its IPv6 side under `local inet6`).
    /// Answered by `PrivIfDone` or `PrivFailed` (kind `Interface`).
    PrivIfConfig {
        name: String,
        switch: Option<SwitchParams>,
        group: Option<String>,
        up: bool,
        host_addr: Option<(Ipv4Addr, u8)>,
        host_addr6: Option<(Ipv6Addr, u8)>,
        /// `rdomain N` of an interface on no switch: the TAP goes into the
        /// VRF of routing table N.
        rdomain: Option<u32>,
        /// The interface's group (or else its switch's) as a Linux
        /// interface group number.
        ifgroup: Option<u32>,
    },
    /// priv -> parent: `PrivIfConfig` of `name` (or `PrivCleanup`, with an
    /// empty name) is done.
    PrivIfDone { name: String },
    /// parent -> priv, at shutdown: delete the bridges priv created and
    /// forget its TAPs. Answered by `PrivIfDone` or `PrivFailed`.
    PrivCleanup,
    /// parent -> device process: run this backend; `params.fd_count()`
    /// fds follow (the channel to the VM process first).
    DevStart(DevParams),
    /// device -> VM process, first message: what the device is. The VM
    /// process builds the device's PCI function from it.
    DevInfo {
        device_type: u16,
        features: u64,
        queue_sizes: Vec<u16>,
        config: Vec<u8>,
    },
    /// VM process -> device: guest RAM and the queue eventfds. fds: the
    /// RAM memfd, then `queues` notify eventfds (ioeventfds), `queues`
    /// call eventfds (the device writes one when it used buffers), and
    /// one error eventfd (the device writes it when the driver broke the
    /// rules: the VM process sets DEVICE_NEEDS_RESET). `regions` are
    /// (guest address, length, offset in the memfd).
    DevAttach {
        regions: Vec<(u64, u64, u64)>,
        queues: u8,
    },
    /// VM process -> device: the driver accepted `features` (FEATURES_OK).
    DevFeaturesOk { features: u64 },
    /// VM process -> device: DRIVER_OK with these queues: start serving.
    DevActivate { queues: Vec<QueueSetup> },
    /// VM process -> device: the driver reset the device.
    DevReset,
    /// VM process -> device: the driver wrote the device configuration.
    DevConfigWrite { offset: u64, data: Vec<u8> },
    /// device -> VM process: the last request is done (`config` is the
    /// device configuration as it now reads).
    DevAck { config: Vec<u8> },
    /// priv's short-lived opener child -> priv: the file is open (one fd
    /// follows) and this is what it is; failures come as `PrivFailed`.
    PrivChildOpened { file: OpenedFile },
}

/// Bincode settings for payloads. The limit caps what a decoder may
/// allocate; bincode counts decoded (in-memory) bytes, and a varint can
/// grow 8x from wire to memory, so 8 * MAX_PAYLOAD never rejects a payload
/// we could have sent while still bounding a hostile length prefix.
pub(crate) const PAYLOAD_LIMIT: usize = 8 * MAX_PAYLOAD;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<PAYLOAD_LIMIT>()
}

fn decode_inner<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode_config())
}

// Helpers for `wire_table!`, one arm per variant shape: newtype
// (`Variant(binding: Type)`) and struct (`Variant { field: Type, .. }`);
// unit variants are written `Variant {}` (braces work for any variant).
macro_rules! wire_pat {
    ($v:ident ($b:ident : $t:ty)) => { Msg::$v($b) };
    ($v:ident { $($b:ident : $t:ty),* $(,)? }) => { Msg::$v { $($b),* } };
}
macro_rules! wire_encode {
    ($v:ident ($b:ident : $t:ty)) => { bincode::serde::encode_to_vec($b, bincode_config()) };
    ($v:ident { $($b:ident : $t:ty),* $(,)? }) => {
        bincode::serde::encode_to_vec(($($b,)*), bincode_config())
    };
}
macro_rules! wire_decode {
    ($bytes:ident, $v:ident ($b:ident : $t:ty)) => {
        decode_inner::<$t>($bytes).map(|($b, n)| (Msg::$v($b), n))
    };
    ($bytes:ident, $v:ident { $($b:ident : $t:ty),* $(,)? }) => {
        decode_inner::<($($t,)*)>($bytes).map(|(($($b,)*), n)| (Msg::$v { $($b),* }, n))
    };
}

/// The one table mapping wire type codes to variants. Only a variant's
/// inner data goes into the payload (struct variants as a tuple of their
/// fields, unit variants as nothing), so the header's type code is the only
/// discriminant on the wire.
macro_rules! wire_table {
    ($($code:literal => $v:ident $shape:tt,)*) => {
        impl Msg {
            /// The wire type code of this message.
            #[allow(unused_variables)]
            pub fn type_code(&self) -> u16 {
                match self {
                    $(wire_pat!($v $shape) => $code,)*
                }
            }

            /// Every wire type code, in table order.
            pub const TYPE_CODES: &'static [u16] = &[$($code),*];

            /// The bincode payload of this message (its inner data only).
            pub fn encode_payload(&self) -> Result<Vec<u8>, bincode::error::EncodeError> {
                match self {
                    $(wire_pat!($v $shape) => wire_encode!($v $shape),)*
                }
            }

            /// Decodes the payload of a message with type `code`: `None` for
            /// an unknown code, otherwise the message and the number of
            /// payload bytes bincode consumed (the caller checks for
            /// trailing bytes).
            pub fn decode_payload(
                code: u16,
                bytes: &[u8],
            ) -> Option<Result<(Msg, usize), bincode::error::DecodeError>> {
                match code {
                    $($code => Some(wire_decode!(bytes, $v $shape)),)*
                    _ => None,
                }
            }
        }
    };
}

wire_table! {
    1 => Request(req: Request),
    2 => ClientRequest { creds: Creds, req: Request },
    3 => Reply(reply: Reply),
    20 => PrivOpen { kind: OpenKind, path: String, opener: Opener },
    21 => PrivOpened { kind: OpenKind },
    22 => PrivFailed { kind: OpenKind, path: String, reason: String },
    23 => PrivOpenedDisk { index: u8, backing: u32 },
    24 => PrivOpenedTap { index: u8, name: String },
    25 => PrivIfConfig {
        name: String,
        switch: Option<SwitchParams>,
        group: Option<String>,
        up: bool,
        host_addr: Option<(Ipv4Addr, u8)>,
        host_addr6: Option<(Ipv6Addr, u8)>,
        rdomain: Option<u32>,
        ifgroup: Option<u32>,
    },
    26 => PrivIfDone { name: String },
    27 => PrivCleanup {},
    28 => PrivChildOpened { file: OpenedFile },
    40 => VmmStart(params: VmmParams),
    41 => VmmRunning {},
    42 => VmmTerminate {},
    43 => VmmExited(reason: ExitReason),
    44 => VmmPause {},
    45 => VmmUnpause {},
    46 => VmmPauseState { paused: bool },
    47 => VmmPowerButton {},
    48 => VmmStats { first: u32, count: u32 },
    60 => SetVerbose { level: u8 },
    61 => ControlSocket {},
    62 => ControlClients { count: u32 },
    63 => MetricsSocket {},
    64 => MetricsRequest {},
    80 => DevStart(params: DevParams),
    81 => DevInfo { device_type: u16, features: u64, queue_sizes: Vec<u16>, config: Vec<u8> },
    82 => DevAttach { regions: Vec<(u64, u64, u64)>, queues: u8 },
    83 => DevFeaturesOk { features: u64 },
    84 => DevActivate { queues: Vec<QueueSetup> },
    85 => DevReset {},
    86 => DevConfigWrite { offset: u64, data: Vec<u8> },
    87 => DevAck { config: Vec<u8> },
}

impl Msg {
    /// How many fds must travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Msg::Reply(Reply::Console { .. }) => 1,
            Msg::PrivOpened { .. } => 1,
            Msg::PrivOpenedTap { .. } => 1,
            Msg::PrivChildOpened { .. } => 1,
            Msg::ControlSocket => 1,
            Msg::MetricsSocket => 1,
            Msg::VmmStats { count, .. } => *count as usize,
            Msg::PrivOpenedDisk { backing, .. } => 1 + *backing as usize,
            Msg::VmmStart(p) => p.fd_count(),
            Msg::DevStart(p) => p.fd_count(),
            Msg::DevAttach { queues, .. } => 2 + 2 * usize::from(*queues),
            _ => 0,
        }
    }
}
