//! VM descriptions shared by every role: what a client asks for, what the
//! parent tells a VM process, and what status reports.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::size::format_size;

/// Longest VM name accepted (OpenBSD's limit).
pub const MAX_NAME_LEN: usize = 64;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 64;
/// Smallest and largest guest memory, in bytes: the smallest holds a
/// kernel loaded at 1 MiB (the VM process's own minimum).
pub const MIN_MEMORY: u64 = 2 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;
/// Guest memory is laid out in whole MiB, as OpenBSD's vmd does.
pub const MEMORY_UNIT: u64 = 1 << 20;
/// Memory a VM gets when nothing says otherwise (OpenBSD's default).
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Longest kernel command line we pass (Linux's COMMAND_LINE_SIZE on x86).
pub const MAX_CMDLINE: usize = 2047;

/// Why a guest memory size cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "memory {} is outside the range {} to {}",
        format_size(*.0),
        format_size(MIN_MEMORY),
        format_size(MAX_MEMORY)
    )]
    OutOfRange(u64),
    #[error(
        "memory {} is more than this host has ({})",
        format_size(*.bytes),
        format_size(*.host)
    )]
    MoreThanHost { bytes: u64, host: u64 },
}

/// The documented range of guest memory (vm.conf checks only this: a
/// file may be written for a bigger host).
pub fn check_memory_range(bytes: u64) -> Result<(), MemoryError> {
    if (MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        Ok(())
    } else {
        Err(MemoryError::OutOfRange(bytes))
    }
}

/// The one check of a memory size a VM is started with: the documented
/// range, and no more than the host's memory (MemTotal).
pub fn check_memory(bytes: u64) -> Result<(), MemoryError> {
    check_memory_range(bytes)?;
    match host_memory() {
        Some(host) if bytes > host => Err(MemoryError::MoreThanHost { bytes, host }),
        _ => Ok(()),
    }
}

/// The host's memory in bytes (/proc/meminfo's MemTotal).
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// A client's request to start a VM (`vmctl start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StartRequest {
    pub name: String,
    /// Kernel image: bzImage, ELF vmlinux or any PVH ELF.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// Bytes; `None` means the default.
    pub memory: Option<u64>,
    pub vcpus: Option<u32>,
    /// Disks (`-d`); empty means the VM's defined ones, if any.
    pub disks: Vec<DiskSpec>,
    /// Network interfaces (`-i`, `-L`, `-n`); empty means the defined ones.
    pub nics: Vec<NicSpec>,
    /// `-t`: make `name` a new instance of this defined VM.
    pub template: Option<String>,
    /// `-r`: an ISO 9660 image attached as a read-only CD-ROM.
    #[serde(default)]
    pub cdrom: Option<String>,
    /// `-B`: what the firmware boots first.
    #[serde(default)]
    pub boot_device: Option<BootDevice>,
}

/// What the firmware boots (vm.conf `boot device`, `vmctl start -B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootDevice {
    /// The first disk.
    Disk,
    /// The CD-ROM.
    Cdrom,
    /// The first network interface, through iPXE.
    Net,
}

impl BootDevice {
    pub fn from_name(s: &str) -> Option<BootDevice> {
        match s {
            "disk" => Some(BootDevice::Disk),
            "cdrom" => Some(BootDevice::Cdrom),
            "net" => Some(BootDevice::Net),
            _ => None,
        }
    }
}

impl std::fmt::Display for BootDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootDevice::Disk => "disk",
            BootDevice::Cdrom => "cdrom",
            BootDevice::Net => "net",
        })
    }
}

/// A network interface as a client or vm.conf names it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NicSpec {
    /// The TAP's name; `None` takes the next free `tapN`.
    pub tap: Option<String>,
    /// A local interface: a /31 from `local prefix`, the guest side handed
    /// out by the VM process's DHCP server.
    pub local: bool,
    /// The switch (vm.conf `switch` block) the TAP joins.
    pub switch: Option<String>,
    pub group: Option<String>,
    /// The guest's MAC; `None` generates a stable one.
    pub lladdr: Option<[u8; 6]>,
    /// Drop guest frames with another source MAC.
    pub locked: bool,
    pub up: bool,
    /// vm.conf `rdomain N`: the TAP's Linux VRF (routing table N).
    #[serde(default)]
    pub rdomain: Option<u32>,
}

/// Why a VM is not running (or why it last stopped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register).
    Reboot,
    /// Stopped on request (`vmctl stop`).
    Stopped,
    /// The guest crashed the VM: triple fault, emulation failure, ...
    /// The text names the KVM exit and carries the registers.
    GuestCrash(String),
    /// The VM process failed on its own (setup error, bad device state).
    VmmError(String),
    /// The VM process was killed by a signal.
    Signal(i32),
    /// The VM process exited without saying why.
    Exited(i32),
    /// Restarted too often in a short time (reboot loop).
    RebootLoop,
    /// One of the VM's device processes died or failed: "blk0: killed by
    /// signal 9".
    Device(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reboot => write!(f, "guest rebooted"),
            ExitReason::Stopped => write!(f, "stopped on request"),
            ExitReason::GuestCrash(s) => write!(f, "guest crashed: {s}"),
            ExitReason::VmmError(s) => write!(f, "vm process failed: {s}"),
            ExitReason::Signal(n) => write!(f, "vm process killed by signal {n}"),
            ExitReason::Exited(n) => write!(f, "vm process exited with status {n}"),
            ExitReason::RebootLoop => write!(f, "rebooted too often, stopped"),
            ExitReason::Device(s) => write!(f, "device failed: {s}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    /// Enabled in vm.conf and queued to start with the next staggered
    /// group (OpenBSD's `waiting`). Appended: wire codes never change.
    Waiting,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Waiting => "waiting",
        })
    }
}

/// One row of `vmctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: u32,
    /// PID of the VM process, 0 when not running.
    pub pid: u32,
    pub vcpus: u32,
    /// Bytes of guest memory configured.
    pub max_mem: u64,
    /// Bytes of guest memory in use (resident), 0 when not running.
    pub cur_mem: u64,
    /// Console pty path, empty when none.
    pub tty: String,
    pub owner: String,
    pub state: VmState,
    pub name: String,
    /// Why it last stopped, if it has.
    pub last_exit: Option<ExitReason>,
    /// How many times the guest rebooted in this run.
    pub restarts: u32,
    /// Defined in vm.conf (rather than started ad hoc).
    pub defined: bool,
    /// Started when vmd starts (`enable` in vm.conf).
    pub enabled: bool,
    /// Disk image paths, in guest order.
    pub disks: Vec<String>,
    /// Network interfaces configured.
    pub interfaces: u32,
    pub cdrom: Option<String>,
}

/// Which host file a VM needs, when the parent asks priv to open one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenKind {
    /// /dev/kvm, read-write.
    Kvm,
    /// A kernel image, read-only.
    Kernel,
    /// An initrd, read-only.
    Initrd,
    /// Disk number `index` of the VM: the top image (locked, read-write
    /// unless `read_only`) and its backing chain, read-only.
    Disk {
        index: u8,
        read_only: bool,
        /// The top image's format: named, or what its name implies.
        format: DiskFormat,
    },
    /// The VM's CD-ROM image, read-only.
    Cdrom,
    /// Network interface number `index` of the VM: a TAP device, created
    /// with the name in `path`, or the first free `tapN` when it is empty.
    Tap { index: u8 },
    /// A host interface being configured or cleaned up (`PrivIfConfig`,
    /// `PrivCleanup`); in `PrivFailed` the path is the interface's name.
    Interface,
    /// A network boot ROM (iPXE) for the firmware, read-only.
    OptionRom,
}

/// Disk image formats (the `vmd-disk` crate reads and writes both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The name used in `raw:`/`qcow2:` prefixes and qcow2's backing format.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// The format a path's name implies when nothing names one: qcow2 for
    /// `*.qcow2` (any case), raw otherwise, as OpenBSD's vmctl. A disk's
    /// content never decides its format: a guest writes its raw disk, and
    /// a qcow2 header it wrote there would name a backing file to read
    /// (QEMU's CVE-2008-2004).
    pub fn of_name(path: &std::path::Path) -> DiskFormat {
        let qcow2 = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"));
        if qcow2 {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        }
    }

    /// `named`, or else what the name implies ([`DiskFormat::of_name`]).
    pub fn named_or_of(named: Option<DiskFormat>, path: &std::path::Path) -> DiskFormat {
        named.unwrap_or_else(|| DiskFormat::of_name(path))
    }

    pub fn from_name(s: &str) -> Option<DiskFormat> {
        match s {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A disk as a client or vm.conf names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub path: String,
    /// `None`: what the name implies (`*.qcow2`), never the content.
    pub format: Option<DiskFormat>,
    pub read_only: bool,
}

/// Most disks a VM may have.
pub const MAX_DISKS: usize = 4;

/// Everything a VM process needs to build its VM; its fds travel with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmParams {
    pub id: u32,
    pub name: String,
    pub memory: u64,
    pub vcpus: u32,
    pub cmdline: String,
    /// Whether an initrd fd follows the kernel fd.
    pub has_initrd: bool,
    /// Unprivileged user and group the VM process switches to.
    pub uid: u32,
    pub gid: u32,
    /// Log verbosely.
    pub verbose: bool,
    /// The VM's disks, in guest order.
    pub disks: Vec<DiskParams>,
    /// The VM's network interfaces (virtio-net), in guest order.
    pub nics: Vec<NicParams>,
    /// A CD-ROM (virtio-scsi): its image's fd follows the disks' fds.
    #[serde(default)]
    pub cdrom: bool,
    /// What the firmware boots first; `None` leaves SeaBIOS's own order.
    #[serde(default)]
    pub boot_device: Option<BootDevice>,
}

/// One disk of a VM as the VM process receives it: the top image's fd,
/// then `backing` read-only fds for its backing chain, top down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskParams {
    /// The top image's format, as priv opened it.
    pub format: DiskFormat,
    pub read_only: bool,
    pub backing: u32,
}

/// Most network interfaces a VM may have (OpenBSD's limit).
pub const MAX_NICS: usize = 4;

/// One network interface of a VM as the VM process receives it; its TAP
/// fd travels with [`VmmParams`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicParams {
    /// The guest's MAC address (`lladdr`, or [`crate::net::generated_mac`]).
    pub mac: [u8; 6],
    /// Drop every frame the guest sends with another source MAC (`locked
    /// lladdr` on the interface or on its switch).
    pub locked: bool,
    /// For a `local interface`: the address the VM process's own DHCP
    /// server hands the guest.
    pub dhcp: Option<DhcpLease>,
    /// The VM boots from this interface (`boot device net`): the firmware
    /// gets iPXE's virtio-net option ROM, whose fd follows the TAPs.
    #[serde(default)]
    pub boot_rom: bool,
}

/// What the built-in DHCP server of a local interface hands out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpLease {
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The host side (the TAP's address): server id and router.
    pub host: Ipv4Addr,
    /// Prefix length of the link (31 for local interfaces).
    pub prefix_len: u8,
    /// A name server to offer, if any.
    pub dns: Option<Ipv4Addr>,
    /// A boot file to offer (PXE), with the host as next server.
    pub boot_file: Option<String>,
}

/// What one of the fds that come with `VmmStart` is. [`VmmParams::fds`]
/// lists them in their order; the parent sends by it and the VM process
/// takes them apart by it, so the order is written down once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmFd {
    /// /dev/kvm, read-write.
    Kvm,
    /// The console: a pty slave in raw mode.
    Console,
    /// The kernel (or BIOS) image, read-only.
    Kernel,
    /// The initrd, read-only (only with `has_initrd`).
    Initrd,
    /// The channel to device process N, in [`VmmParams::device_kinds`]'
    /// order.
    Device(usize),
    /// iPXE's option ROM, read-only (only when a nic has `boot_rom`).
    OptionRom,
}

impl VmmParams {
    /// The fds sent with these params, in order: /dev/kvm, console tty,
    /// kernel, the initrd when there is one, then one channel to each
    /// device process (per disk, the CD-ROM, per nic, in that order; the
    /// images and TAPs themselves go to the device processes), then the
    /// option ROM when a nic has `boot_rom`.
    pub fn fds(&self) -> Vec<VmmFd> {
        let mut fds = vec![VmmFd::Kvm, VmmFd::Console, VmmFd::Kernel];
        if self.has_initrd {
            fds.push(VmmFd::Initrd);
        }
        fds.extend((0..self.device_count()).map(VmmFd::Device));
        if self.boot_rom() {
            fds.push(VmmFd::OptionRom);
        }
        fds
    }

    /// How many fds come with these params ([`VmmParams::fds`]).
    pub fn fd_count(&self) -> usize {
        self.fds().len()
    }

    /// How many device processes serve this VM (one per disk, CD-ROM and
    /// nic).
    pub fn device_count(&self) -> usize {
        self.disks.len() + usize::from(self.cdrom) + self.nics.len()
    }

    /// The VM's device processes in the order of their channels (and of
    /// their PCI slots): disks, the CD-ROM, nics.
    pub fn device_kinds(&self) -> Vec<DevKind> {
        let mut kinds: Vec<DevKind> = (0u32..)
            .zip(&self.disks)
            .map(|(index, disk)| DevKind::Block {
                index,
                disk: disk.clone(),
            })
            .collect();
        if self.cdrom {
            kinds.push(DevKind::Scsi);
        }
        kinds.extend((0u32..).zip(&self.nics).map(|(index, nic)| DevKind::Net {
            index,
            nic: nic.clone(),
        }));
        kinds
    }

    /// Whether an option ROM fd comes last.
    pub fn boot_rom(&self) -> bool {
        self.nics.iter().any(|n| n.boot_rom)
    }
}

/// Checks a VM name: 1..=64 characters of letters, digits, '-', '_', '.'.
/// Whether `s` is a VM id (`vmctl start 3`) rather than a name: digits
/// only, which no name may be.
pub fn is_vm_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit())
}

pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("VM name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("VM name is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("VM name {name:?} contains invalid character {c:?}"));
    }
    // OpenBSD's rule (vm.conf(5)): a name starts with a letter, which also
    // keeps names apart from ids.
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("VM name {name:?} must start with a letter"));
    }
    Ok(())
}

/// A virtio device process (`vmd: vm NAME blk0`): what the parent tells it
/// with `DevStart`. The fds that travel with it: the channel to its VM
/// process first, then the backend's own (see [`DevParams::fd_count`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevParams {
    /// The VM's id and name, for logs and the disk serial.
    pub vm_id: u32,
    pub vm_name: String,
    /// The device's name in its VM: `blk0`, `cdrom`, `net1`.
    pub name: String,
    pub kind: DevKind,
    /// Unprivileged user and group the device process switches to.
    pub uid: u32,
    pub gid: u32,
    pub verbose: bool,
}

/// Which backend a device process runs, with its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DevKind {
    /// virtio-blk disk `index`: its top image, then `disk.backing`
    /// backing files (top down).
    Block { index: u32, disk: DiskParams },
    /// virtio-scsi CD-ROM: the ISO image.
    Scsi,
    /// virtio-net interface `index`: its TAP.
    Net { index: u32, nic: NicParams },
}

impl DevKind {
    /// The device's name in its VM, also its process title's last word:
    /// `blk0`, `cdrom`, `net1`.
    pub fn name(&self) -> String {
        match self {
            DevKind::Block { index, .. } => format!("blk{index}"),
            DevKind::Scsi => "cdrom".into(),
            DevKind::Net { index, .. } => format!("net{index}"),
        }
    }
}

impl DevParams {
    /// fds sent with `DevStart`: the VM channel, then the image and its
    /// backing files (and last the disk's counters file, see
    /// [`crate::stats`]), the ISO, or the TAP.
    pub fn fd_count(&self) -> usize {
        1 + match &self.kind {
            DevKind::Block { disk, .. } => 2 + disk.backing as usize,
            DevKind::Scsi | DevKind::Net { .. } => 1,
        }
    }
}

/// One virtqueue as the driver set it up, sent to the device process
/// when the driver sets DRIVER_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSetup {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Most queues a device process may have (virtio-scsi has 3, net 2).
pub const MAX_DEV_QUEUES: usize = 8;
