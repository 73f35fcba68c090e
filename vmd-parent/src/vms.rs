//! The parent's table of VMs: what each one is, its process, its console.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use vmd_proto::msg::Opener;
use vmd_proto::vm::{
    BootDevice, DiskSpec, ExitReason, NicSpec, StartRequest, VmInfo, VmState, DEFAULT_MEMORY,
    MAX_CMDLINE, MAX_DISKS, MAX_NICS, MAX_VCPUS,
};
use vmd_proto::Channel;

use crate::console::Console;

/// What a VM without a kernel boots: Debian's SeaBIOS.
pub const FIRMWARE_PATH: &str = "/usr/share/seabios/bios.bin";
/// The network boot ROM of `boot device net`: Debian's iPXE (ipxe-qemu)
/// for virtio-net, legacy BIOS only (the EFI+legacy image does not fit
/// SeaBIOS's option ROM area when handed over fw_cfg).
pub const NET_BOOT_ROM_PATH: &str = "/usr/lib/ipxe/qemu/pxe-virtio.rom";
/// OpenBSD's reboot-loop guard: more than this many restarts within
/// [`REBOOT_WINDOW`] stops the VM instead.
pub const MAX_REBOOTS: usize = 3;
pub const REBOOT_WINDOW: Duration = Duration::from_secs(6);

/// What a VM is made of: from vm.conf, a start request, or both (a
/// request's settings override the definition's for that start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u32,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// An ISO 9660 image, attached as a read-only virtio-scsi CD-ROM.
    pub cdrom: Option<String>,
    /// What the firmware boots first (its `bootorder`).
    pub boot_device: Option<BootDevice>,
    /// vm.conf `boot filename` (ours): the PXE boot file that the local
    /// interfaces' DHCP names when the VM boots from the network.
    pub boot_filename: Option<String>,
    /// Who named each path above: priv opens it with their rights.
    pub named_by: NamedBy,
}

/// Whose rights open each path of a [`VmSpec`]: whoever named it (root
/// for vm.conf, the client for what its request names). A path vmd names
/// itself (the firmware, the network boot ROM) is root's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBy {
    pub kernel: Opener,
    pub initrd: Opener,
    pub cdrom: Opener,
    /// One per disk, in the same order.
    pub disks: Vec<Opener>,
}

impl NamedBy {
    fn all(by: &Opener, disks: usize) -> NamedBy {
        NamedBy {
            kernel: by.clone(),
            initrd: by.clone(),
            cdrom: by.clone(),
            disks: vec![by.clone(); disks],
        }
    }
}

impl VmSpec {
    /// Settles and checks a request on its own; `by` named its paths.
    pub fn from_request(req: &StartRequest, by: &Opener) -> Result<VmSpec, String> {
        Self::checked(req, None, by)
    }

    /// The spec of `req` (whose paths `by` named) laid over `base` (a
    /// defined VM); paths it keeps from `base` keep their namers.
    pub fn merged(base: &VmSpec, req: &StartRequest, by: &Opener) -> Result<VmSpec, String> {
        Self::checked(req, Some(base), by)
    }

    fn checked(req: &StartRequest, base: Option<&VmSpec>, by: &Opener) -> Result<VmSpec, String> {
        let name = &req.name;
        let memory = req
            .memory
            .or(base.map(|b| b.memory))
            .unwrap_or(DEFAULT_MEMORY);
        vmd_proto::vm::check_memory(memory).map_err(|e| format!("vm {name}: {e}"))?;
        let vcpus = req.vcpus.or(base.map(|b| b.vcpus)).unwrap_or(1);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(format!(
                "vm {name}: vcpus {vcpus} out of range (1 to {MAX_VCPUS})"
            ));
        }
        let cmdline = req
            .cmdline
            .clone()
            .or(base.map(|b| b.cmdline.clone()))
            .unwrap_or_default();
        if cmdline.len() > MAX_CMDLINE {
            return Err(format!(
                "vm {name}: command line longer than {MAX_CMDLINE} bytes"
            ));
        }
        if cmdline.bytes().any(|b| b == 0) {
            return Err(format!("vm {name}: command line contains a NUL byte"));
        }
        let disks = if req.disks.is_empty() {
            base.map(|b| b.disks.clone()).unwrap_or_default()
        } else {
            req.disks.clone()
        };
        if disks.len() > MAX_DISKS {
            return Err(format!("vm {name}: more than {MAX_DISKS} disks"));
        }
        let nics = if req.nics.is_empty() {
            base.map(|b| b.nics.clone()).unwrap_or_default()
        } else {
            req.nics.clone()
        };
        if nics.len() > MAX_NICS {
            return Err(format!(
                "vm {name}: more than {MAX_NICS} network interfaces"
            ));
        }
        let kernel = req.kernel.clone().or(base.and_then(|b| b.kernel.clone()));
        // A new kernel brings its own initrd (or none).
        let initrd = match (&req.kernel, &req.initrd) {
            (_, Some(i)) => Some(i.clone()),
            (Some(_), None) => None,
            (None, None) => base.and_then(|b| b.initrd.clone()),
        };
        let cdrom = req.cdrom.clone().or(base.and_then(|b| b.cdrom.clone()));
        let boot_device = req.boot_device.or(base.and_then(|b| b.boot_device));
        let named_by = match base {
            None => NamedBy::all(by, disks.len()),
            Some(b) => {
                let pick = |from_req: bool, kept: &Opener| match from_req {
                    true => by.clone(),
                    false => kept.clone(),
                };
                NamedBy {
                    kernel: pick(req.kernel.is_some(), &b.named_by.kernel),
                    initrd: pick(req.initrd.is_some(), &b.named_by.initrd),
                    cdrom: pick(req.cdrom.is_some(), &b.named_by.cdrom),
                    disks: match req.disks.is_empty() {
                        true => b.named_by.disks.clone(),
                        false => vec![by.clone(); disks.len()],
                    },
                }
            }
        };
        Ok(VmSpec {
            kernel,
            initrd,
            cmdline,
            memory,
            vcpus,
            disks,
            nics,
            cdrom,
            boot_device,
            boot_filename: base.and_then(|b| b.boot_filename.clone()),
            named_by,
        })
    }

    /// What the VM boots: its kernel, or else the BIOS (SeaBIOS), which
    /// the vmm tells from a kernel by its contents.
    pub fn boot_image(&self) -> &str {
        self.kernel.as_deref().unwrap_or(FIRMWARE_PATH)
    }

    /// `boot device net` (`-B net`): iPXE's option ROM boots the first
    /// interface.
    pub fn boot_net(&self) -> bool {
        self.boot_device == Some(BootDevice::Net)
    }

    /// Why this VM cannot start with what vmd has today, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        let missing = match self.boot_device {
            Some(BootDevice::Disk) if self.disks.is_empty() => Some("a disk"),
            Some(BootDevice::Cdrom) if self.cdrom.is_none() => Some("a cdrom"),
            Some(BootDevice::Net) if self.nics.is_empty() => Some("a network interface"),
            _ => None,
        };
        if let Some(what) = missing {
            let dev = self.boot_device.map(|d| d.to_string()).unwrap_or_default();
            return Some(format!("boot device {dev} needs {what}"));
        }
        None
    }
}

/// A live VM process.
pub struct VmProc {
    pub pid: Pid,
    pub chan: Channel,
    /// The process said the VM runs.
    pub running: bool,
    /// We asked it to stop; its end is then "stopped on request".
    pub stop_requested: bool,
    /// What the process told us before exiting.
    pub exit_msg: Option<ExitReason>,
    /// When a guest that was asked to power off (the ACPI power button)
    /// is stopped without it.
    pub terminate_at: Option<Instant>,
    /// When a graceful stop turns into SIGKILL.
    pub kill_at: Option<Instant>,
    /// When a VM process that has not said the VM runs is killed and its
    /// start fails (VMM_START_TIMEOUT after it was started).
    pub start_by: Option<Instant>,
    /// The VM's device processes (one per disk, CD-ROM and nic).
    pub devices: Vec<DevProc>,
    /// Why a device process died while the VM ran: the VM's stop reason.
    pub device_failure: Option<String>,
    /// The host TAP of each interface, by index (metrics read their
    /// counters from sysfs).
    pub taps: Vec<String>,
    /// Each vCPU's KVM statistics fd, as the VM process handed them over
    /// (metrics read exit counts from them).
    pub kvm_stats: Vec<OwnedFd>,
    /// When the VM process said the VM runs.
    pub running_since: Option<Instant>,
}

/// A device process of a VM (`vmd: vm NAME blk0`).
pub struct DevProc {
    /// `blk0`, `cdrom`, `net1`.
    pub name: String,
    pub pid: Pid,
    /// Not reaped yet.
    pub alive: bool,
    /// A disk device's request counters (metrics).
    pub disk_stats: Option<vmd_proto::stats::SharedCounters>,
}

/// Who may manage a VM besides root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// As status shows it: "user", "user:group" or ":group".
    pub name: String,
}

impl VmOwner {
    pub fn root() -> VmOwner {
        VmOwner {
            uid: Some(0),
            gid: None,
            name: "root".into(),
        }
    }
}

pub struct Vm {
    pub id: u32,
    pub name: String,
    /// What the next start runs.
    pub spec: VmSpec,
    /// The vm.conf definition, when the VM has one; starts lay requests
    /// over it.
    pub defined: Option<VmSpec>,
    pub enabled: bool,
    pub owner: VmOwner,
    /// vm.conf `allow instance`: what `vmctl start -t` may change, and
    /// who besides root may make instances.
    pub allow_instance: Option<(vmd_config::AllowInstance, Option<VmOwner>)>,
    /// For an instance made with `vmctl start -t`: its template and what
    /// it may change (checked at every start by a user other than root).
    pub origin: Option<crate::rights::Origin>,
    pub state: VmState,
    pub proc: Option<VmProc>,
    pub console: Console,
    pub last_exit: Option<ExitReason>,
    /// Restarts after guest reboots in this run, and their times.
    pub restarts: u32,
    pub recent_reboots: VecDeque<Instant>,
    /// Whether the VM has run at all; one that never did is forgotten when
    /// its first start fails, so a failed start leaves nothing behind.
    pub ever_ran: bool,
    /// The client waiting for the answer to a start.
    pub start_waiter: Option<u32>,
    /// The client waiting for a pause or unpause to take effect.
    pub pause_waiter: Option<u32>,
    /// When a pause or unpause the VM process has not answered is given
    /// up (VMM_REQUEST_TIMEOUT after it was sent).
    pub pause_deadline: Option<std::time::Instant>,
}

impl Vm {
    pub fn is_active(&self) -> bool {
        matches!(
            self.state,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    pub fn info(&self) -> VmInfo {
        let pid = self
            .proc
            .as_ref()
            .map(|p| p.pid.as_raw() as u32)
            .unwrap_or(0);
        VmInfo {
            id: self.id,
            pid,
            vcpus: self.spec.vcpus,
            max_mem: self.spec.memory,
            cur_mem: if pid != 0 { resident_bytes(pid) } else { 0 },
            tty: if self.is_active() {
                self.console.tty().to_string()
            } else {
                String::new()
            },
            owner: self.owner.name.clone(),
            state: self.state,
            name: self.name.clone(),
            last_exit: self.last_exit.clone(),
            restarts: self.restarts,
            defined: self.defined.is_some(),
            enabled: self.enabled,
            disks: self.spec.disks.iter().map(|d| d.path.clone()).collect(),
            interfaces: self.spec.nics.len() as u32,
            cdrom: self.spec.cdrom.clone(),
        }
    }

    /// Records a guest reboot; false when that makes too many in the
    /// window, and the VM should stop instead of restarting.
    pub fn note_reboot(&mut self, now: Instant) -> bool {
        while self
            .recent_reboots
            .front()
            .is_some_and(|t| now.duration_since(*t) > REBOOT_WINDOW)
        {
            self.recent_reboots.pop_front();
        }
        self.recent_reboots.push_back(now);
        self.recent_reboots.len() <= MAX_REBOOTS
    }
}

/// Resident memory of a process in bytes (0 when unreadable).
fn resident_bytes(pid: u32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// The VM table, by id.
#[derive(Default)]
pub struct VmTable {
    pub vms: BTreeMap<u32, Vm>,
    next_id: u32,
}

impl VmTable {
    pub fn alloc_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    pub fn by_name(&self, name: &str) -> Option<&Vm> {
        self.vms.values().find(|vm| vm.name == name)
    }

    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut Vm> {
        self.vms.values_mut().find(|vm| vm.name == name)
    }

    pub fn id_of(&self, name_or_id: &str) -> Option<u32> {
        if let Some(vm) = self.by_name(name_or_id) {
            return Some(vm.id);
        }
        name_or_id
            .parse::<u32>()
            .ok()
            .filter(|id| self.vms.contains_key(id))
    }

    pub fn by_pid(&self, pid: Pid) -> Option<u32> {
        self.vms
            .values()
            .find(|vm| vm.proc.as_ref().is_some_and(|p| p.pid == pid))
            .map(|vm| vm.id)
    }

    /// The VM and the index of its device process `pid`.
    pub fn by_device_pid(&self, pid: Pid) -> Option<(u32, usize)> {
        self.vms.values().find_map(|vm| {
            let p = vm.proc.as_ref()?;
            let i = p.devices.iter().position(|d| d.pid == pid)?;
            Some((vm.id, i))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str) -> StartRequest {
        StartRequest {
            name: name.into(),
            kernel: Some("/k".into()),
            ..Default::default()
        }
    }

    #[test]
    fn spec_defaults_and_limits() {
        let spec = VmSpec::from_request(&req("a"), &Opener::root()).unwrap();
        assert_eq!(spec.memory, DEFAULT_MEMORY);
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.unsupported(), None);
        // Without a kernel the VM boots the firmware.
        let mut r = req("a");
        r.kernel = None;
        let spec = VmSpec::from_request(&r, &Opener::root()).unwrap();
        assert_eq!(spec.unsupported(), None);
        assert_eq!(spec.boot_image(), FIRMWARE_PATH);
        let mut r = req("a");
        r.vcpus = Some(0);
        assert!(VmSpec::from_request(&r, &Opener::root())
            .unwrap_err()
            .contains("vcpus"));
        let mut r = req("a");
        r.memory = Some(1000);
        assert!(VmSpec::from_request(&r, &Opener::root())
            .unwrap_err()
            .contains("memory"));
        let mut r = req("a");
        r.cmdline = Some("x".repeat(5000));
        assert!(VmSpec::from_request(&r, &Opener::root())
            .unwrap_err()
            .contains("command line"));
    }

    #[test]
    fn cdrom_and_boot_device() {
        let mut r = req("a");
        r.kernel = None;
        r.boot_device = Some(BootDevice::Cdrom);
        let spec = VmSpec::from_request(&r, &Opener::root()).unwrap();
        assert_eq!(
            spec.unsupported().as_deref(),
            Some("boot device cdrom needs a cdrom")
        );
        r.cdrom = Some("/x.iso".into());
        let spec = VmSpec::from_request(&r, &Opener::root()).unwrap();
        assert_eq!(spec.unsupported(), None);
        r.boot_device = Some(BootDevice::Disk);
        assert!(VmSpec::from_request(&r, &Opener::root())
            .unwrap()
            .unsupported()
            .unwrap()
            .contains("needs a disk"));
        // A definition's cdrom and boot device hold unless the request
        // names its own.
        let base = VmSpec::from_request(&r, &Opener::root()).unwrap();
        let m = VmSpec::merged(&base, &req("a"), &Opener::root()).unwrap();
        assert_eq!(m.cdrom.as_deref(), Some("/x.iso"));
        assert_eq!(m.boot_device, Some(BootDevice::Disk));
    }

    #[test]
    fn request_overrides_definition() {
        let mut base = VmSpec::from_request(&req("a"), &Opener::root()).unwrap();
        base.memory = 64 << 20;
        base.initrd = Some("/i".into());
        base.cmdline = "def".into();
        let r = StartRequest {
            name: "a".into(),
            vcpus: Some(2),
            ..Default::default()
        };
        let m = VmSpec::merged(&base, &r, &Opener::root()).unwrap();
        assert_eq!(
            (m.memory, m.vcpus, m.cmdline.as_str()),
            (64 << 20, 2, "def")
        );
        assert_eq!(m.initrd.as_deref(), Some("/i"));
        // A new kernel drops the definition's initrd unless one is given.
        let r = StartRequest {
            name: "a".into(),
            kernel: Some("/k2".into()),
            ..Default::default()
        };
        assert_eq!(
            VmSpec::merged(&base, &r, &Opener::root()).unwrap().initrd,
            None
        );
    }
}
