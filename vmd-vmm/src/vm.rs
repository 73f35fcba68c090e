//! Building a VM from its parameters and fds, running its vCPUs, and the
//! main thread's event loop until the guest ends or the parent says stop.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clock_data, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vm_memory::GuestMemoryMmap;
use vmd_proto::vm::{DevKind, ExitReason, VmmParams, MAX_VCPUS};
use vmd_proto::{Channel, ChannelError, Msg};
use vmd_tap::tap_info;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError};
use crate::arch::x86_64::boot::{self, firmware, BootEntry, BootError};
use crate::arch::x86_64::cpuid::{self, CpuidError};
use crate::arch::x86_64::layout::{
    COM1_IRQ, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, PM1A_EVT_LEN, PORT_CMOS, PORT_COM1,
    PORT_DEBUGCON, PORT_FW_CFG, PORT_I8042_DATA, PORT_PCI_CONFIG_ADDRESS, PORT_PCI_CONFIG_DATA,
    PORT_PM1A_CNT, PORT_PM1A_EVT, PORT_POST, PORT_RESET_CTRL, SCI_IRQ,
};
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::bus::{Bus, BusError, SharedDevice};
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::debugcon::DebugCon;
use crate::devices::legacy::fw_cfg::{self, FwCfg, FwCfgError, FwCfgItems, FW_CFG_PORT_LEN};
use crate::devices::legacy::i8042::{ResetControl, I8042};
use crate::devices::legacy::power::{Pm1aControl, Pm1aEvent, PWRBTN_STS};
use crate::devices::legacy::serial::{RoomNotifier, SerialDevice, SerialError};
use crate::devices::virtio::backend;
use crate::devices::virtio::model::{self, ModelError};
use crate::devices::virtio::pci::{
    spawn_worker, SharedRam, TransportError, VirtioPci, Worker, VIRTIO_PCI_DEVICE_BASE,
    VIRTIO_PCI_VENDOR,
};
use crate::devices::virtio::remote::{DeviceLink, INFO_TIMEOUT};
use crate::devices::virtio::rng::VirtioRng;
use crate::devices::virtio::{VirtioDevice, TYPE_NET};
use crate::devices::Sink;
use crate::lifecycle::ExitSignal;
use crate::memory::{self, MemoryError, RamLayout};
use crate::pci::irq::GsiRouter;
use crate::pci::{intx_gsi, ConfigAddress, ConfigData, HostBridge, PciError, PciRoot};
use crate::vcpu::{self, Vcpu, VcpuError};

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// How long to wait for vCPU threads to leave after a kick.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("expected {expected} fds with VmmStart, got {got}")]
    FdCount { expected: usize, got: usize },
    #[error("kvm: {0}")]
    KvmSetup(String),
    #[error("kvm: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("vcpus: {0} requested, 1 to {1} supported")]
    VcpuCount(u32, u32),
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("{0}")]
    FwCfg(#[from] FwCfgError),
    #[error("acpi: {0}")]
    Acpi(#[from] AcpiError),
    #[error("mptable: {0}")]
    MpTable(#[from] MpTableError),
    #[error("cpuid: {0}")]
    Cpuid(#[from] CpuidError),
    #[error("vCPU {id}: {err}")]
    Vcpu { id: u32, err: VcpuError },
    #[error("devices: {0}")]
    Bus(#[from] BusError),
    #[error("{0}")]
    Serial(#[from] SerialError),
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
    #[error("disk {index}: {err}")]
    Disk {
        index: usize,
        err: vmd_disk::ImageError,
    },
    #[error("{0} disks, but {1} sets of disk fds")]
    DiskCount(usize, usize),
    #[error("{0} interfaces, but {1} TAP fds")]
    NicCount(usize, usize),
    #[error("{0} devices, but {1} device channels")]
    DeviceCount(usize, usize),
    #[error("{name}: {err}")]
    Model { name: String, err: ModelError },
    #[error("interface {index}: {err}")]
    Nic { index: usize, err: io::Error },
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    #[error("virtio device {name}: {err}")]
    Virtio { name: String, err: TransportError },
}

/// The fds that come with `VmmStart`, in their order.
#[derive(Debug)]
pub struct VmFiles {
    /// /dev/kvm, opened read-write.
    pub kvm: OwnedFd,
    /// The console: a pty slave in raw mode.
    pub tty: OwnedFd,
    /// The kernel image, read-only.
    pub kernel: OwnedFd,
    /// The initrd, read-only, when `has_initrd`.
    pub initrd: Option<OwnedFd>,
    /// One entry per `VmmParams::disks`, in guest order.
    pub disks: Vec<DiskFiles>,
    /// The CD-ROM image, read-only, when `VmmParams::cdrom`.
    pub cdrom: Option<OwnedFd>,
    /// One TAP per `VmmParams::nics`, in guest order.
    pub taps: Vec<TapFiles>,
    /// Channels to the device processes, one per disk, CD-ROM and nic in
    /// that order (`VmmParams::device_count`). Without them (tests), the
    /// backends for `disks`, `cdrom` and `taps` run on threads of this
    /// process instead, served the same way.
    pub devices: Vec<Channel>,
    /// The network boot ROM (iPXE), read-only, when a nic has `boot_rom`.
    pub option_rom: Option<OwnedFd>,
}

/// A NIC's TAP fd, and the MAC of the host side of the TAP (the built-in
/// DHCP server answers from it). The MAC is read here, before the sandbox
/// forbids the ioctls that tell it.
#[derive(Debug)]
pub struct TapFiles {
    pub fd: OwnedFd,
    pub host_mac: Option<[u8; 6]>,
}

impl TapFiles {
    pub fn new(fd: OwnedFd) -> TapFiles {
        let host_mac = match tap_info(fd.as_fd()) {
            Ok((_, mac)) => Some(mac),
            Err(e) => {
                log::warn!("TAP fd: cannot read its interface's MAC: {e}");
                None
            }
        };
        TapFiles { fd, host_mac }
    }
}

/// A disk's fds: the top image, then its backing files top down.
#[derive(Debug)]
pub struct DiskFiles {
    pub top: OwnedFd,
    pub backing: Vec<OwnedFd>,
}

impl VmFiles {
    /// Splits the fds that came with `VmmStart` (see
    /// `VmmParams::fd_count` for their order): the images and TAPs are
    /// with the device processes; here come the channels to them.
    pub fn from_fds(fds: Vec<OwnedFd>, params: &VmmParams) -> Result<VmFiles, VmError> {
        let expected = params.fd_count();
        let got = fds.len();
        if got != expected {
            return Err(VmError::FdCount { expected, got });
        }
        let mut it = fds.into_iter();
        let mut next = || it.next().ok_or(VmError::FdCount { expected, got });
        let kvm = next()?;
        let tty = next()?;
        let kernel = next()?;
        let initrd = if params.has_initrd {
            Some(next()?)
        } else {
            None
        };
        let devices = (0..params.device_count())
            .map(|_| next().map(Channel::from_fd))
            .collect::<Result<_, _>>()?;
        let option_rom = if params.boot_rom() {
            Some(next()?)
        } else {
            None
        };
        Ok(VmFiles {
            kvm,
            tty,
            kernel,
            initrd,
            disks: Vec::new(),
            cdrom: None,
            taps: Vec::new(),
            devices,
            option_rom,
        })
    }
}

/// Knobs for development and tests; the daemon uses the defaults.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// Boot a PVH-capable ELF through its 64-bit Linux entry instead.
    pub ignore_pvh: bool,
}

/// How the event loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM ended; the parent should be told why.
    Exited(ExitReason),
    /// The parent went away: nobody is left to tell.
    ParentGone,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM built and ready to run.
pub struct Vm {
    /// Stopped (and joined) first when the VM goes away.
    _io_workers: Vec<Worker>,
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    /// The firmware image below 4 GiB (a KVM slot), when booting one.
    _rom: Option<GuestMemoryMmap>,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitSignal>,
    /// The PM1a event block, where `VmmPowerButton` presses the button.
    pm1a: Arc<Mutex<Pm1aEvent>>,
    serial: Arc<Mutex<SerialDevice>>,
    room: Arc<RoomNotifier>,
    _serial_irq: EventFd,
    tty: File,
}

impl Vm {
    pub fn new(params: &VmmParams, files: VmFiles, opts: &DevOptions) -> Result<Vm, VmError> {
        let kvm_io = |what| move |e| VmError::Kvm(what, e);
        // SAFETY: we own this fd (it came with VmmStart) and hand it over.
        let kvm = unsafe { Kvm::from_raw_fd(files.kvm.into_raw_fd()) };
        if kvm.get_api_version() != KVM_API_VERSION {
            return Err(VmError::KvmSetup(format!(
                "/dev/kvm speaks API {}, not {KVM_API_VERSION}",
                kvm.get_api_version()
            )));
        }
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Pit2, "in-kernel PIT"),
            (Cap::Irqfd, "irqfd"),
            (Cap::UserMemory, "user memory"),
            (Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::KvmSetup(format!("no {name} support")));
            }
        }
        let max = (kvm.get_max_vcpus() as u32).min(MAX_VCPUS);
        if params.vcpus == 0 || params.vcpus > max {
            return Err(VmError::VcpuCount(params.vcpus, max));
        }

        let vm = kvm.create_vm().map_err(kvm_io("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_io("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_io("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(kvm_io("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // KVM answers the PC speaker port (0x61) with a dummy.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_io("KVM_CREATE_PIT2"))?;

        let ram = RamLayout::new(params.memory)?;
        let guest_ram = memory::create(&ram)?;
        let mem = guest_ram.mem;
        memory::register(&vm, &mem)?;
        let vm = Arc::new(vm);

        let mut kernel = File::from(files.kernel);
        let mut initrd = files.initrd.map(File::from);
        let mut cmos = Cmos::default();
        let image = firmware::read_image(&mut kernel)?;
        let mut rom = None;
        let entry = if let Some(image) = &image {
            // The firmware builds its own tables (ACPI, MP, e820) from
            // fw_cfg and CMOS, and loads the OS itself.
            if initrd.is_some() || !params.cmdline.is_empty() {
                log::warn!("booting firmware: the initrd and command line are not used");
            }
            firmware::load_low(&mem, image)?;
            let high = firmware::high_copy(image)?;
            let slot = vm_memory::GuestMemoryBackend::num_regions(&mem) as u32;
            memory::register_rom(&vm, &high, slot, kvm.check_extension(Cap::ReadonlyMem))?;
            rom = Some(high);
            cmos.set_machine(ram.low_end, ram.high_size, params.vcpus);
            log::info!("booting firmware ({} KiB)", image.len() >> 10);
            BootEntry::Firmware
        } else {
            // Both the ACPI tables (modern guests) and the MP table
            // (kernels without ACPI, our freestanding test guests)
            // describe the CPUs.
            let rsdp = acpi::write(&mem, params.vcpus)?;
            mptable::write(&mem, params.vcpus)?;
            boot::load(
                &mem,
                ram,
                &mut kernel,
                initrd.as_mut(),
                &params.cmdline,
                opts.ignore_pvh,
                Some(rsdp),
            )?
        };
        log::debug!("boot entry {entry:x?}");

        let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Io("exit eventfd", e))?);
        let (serial, serial_irq, room) = SerialDevice::new(&files.tty)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_io("KVM_IRQFD for COM1"))?;
        let serial = Arc::new(Mutex::new(serial));

        let pio = Bus::new("port I/O");
        pio.insert(u64::from(PORT_COM1), 8, serial.clone())?;
        pio.insert(u64::from(PORT_POST), 1, shared(Sink))?;
        pio.insert(
            u64::from(PORT_I8042_DATA),
            5,
            shared(I8042::new(exit.clone())),
        )?;
        pio.insert(u64::from(PORT_CMOS), 2, shared(cmos))?;
        // The SCI is level-triggered (MADT override), so KVM_IRQ_LINE
        // holds it up until the guest clears the status bit.
        let sci_vm = vm.clone();
        let pm1a = Arc::new(Mutex::new(Pm1aEvent::with_sci(Box::new(move |level| {
            if let Err(e) = sci_vm.set_irq_line(u32::from(SCI_IRQ), level) {
                log::warn!("SCI (GSI {SCI_IRQ}): KVM_IRQ_LINE: {e}");
            }
        }))));
        pio.insert(
            u64::from(PORT_PM1A_EVT),
            u64::from(PM1A_EVT_LEN),
            pm1a.clone(),
        )?;
        pio.insert(
            u64::from(PORT_PM1A_CNT),
            2,
            shared(Pm1aControl::new(exit.clone())),
        )?;
        pio.insert(
            u64::from(PORT_RESET_CTRL),
            1,
            shared(ResetControl::new(exit.clone())),
        )?;
        let mmio = Arc::new(Bus::new("MMIO"));
        let mem = Arc::new(mem);
        // The firmware's fw_cfg items; the device is plugged in once the
        // PCI slots (which a boot order names) are known.
        let mut fw_items = None;
        if image.is_some() {
            let mut items = FwCfgItems::new(params.vcpus as u16, params.memory);
            items.add_file("etc/e820", fw_cfg::e820_file(&firmware::e820_map(&ram)))?;
            // Our ACPI tables, placed by the firmware's table loader, so
            // that an ACPI guest can power off and take the power button.
            let acpi = acpi::loader_files(params.vcpus, acpi::firmware_pci_window(ram.low_end))?;
            items.add_file(acpi::LOADER_TABLES_FILE, acpi.tables)?;
            items.add_file(acpi::LOADER_RSDP_FILE, acpi.rsdp)?;
            items.add_file(acpi::LOADER_SCRIPT_FILE, acpi.script)?;
            pio.insert(u64::from(PORT_DEBUGCON), 1, shared(DebugCon::default()))?;
            fw_items = Some(items);
        }
        let option_rom = match (files.option_rom, &fw_items) {
            (Some(fd), Some(_)) => Some(firmware::read_option_rom(&mut File::from(fd))?),
            (Some(_), None) => {
                log::warn!("booting a kernel: the network boot ROM is not used");
                None
            }
            (None, _) => None,
        };
        let bridge = match image {
            Some(_) => HostBridge::i440fx(),
            None => HostBridge::new(),
        };
        let backends = backends(params, files.devices, files.disks, files.cdrom, files.taps)?;
        let ram_share = SharedRam {
            mem: mem.clone(),
            memfd: &guest_ram.memfd,
            regions: &guest_ram.regions,
        };
        let (io_workers, net_slot, drive_slot) = add_pci_devices(
            params, backends, bridge, &vm, &ram_share, &exit, &pio, &mmio,
        )?;
        if let Some(mut items) = fw_items {
            if let (Some(rom), Some(slot)) = (option_rom, net_slot) {
                // SeaBIOS runs a ROM named for the device's IDs with that
                // device's bus/device/function, and boots its entry first.
                let device = VIRTIO_PCI_DEVICE_BASE + TYPE_NET;
                let name = firmware::pci_rom_file(VIRTIO_PCI_VENDOR, device);
                log::info!("network boot: option ROM {name} ({} KiB)", rom.len() >> 10);
                items.add_file(&name, rom)?;
                items.add_file("bootorder", firmware::nic_bootorder(slot).into_bytes())?;
            }
            if let (Some(dev), Some(slot)) = (params.boot_device, drive_slot) {
                let order = firmware::drive_bootorder(dev, slot);
                log::debug!("boot order: {order:?}");
                items.add_file("bootorder", order.into_bytes())?;
            }
            pio.insert(
                u64::from(PORT_FW_CFG),
                FW_CFG_PORT_LEN,
                shared(FwCfg::new(items, mem.clone())),
            )?;
        }
        let pio = Arc::new(pio);

        let base_cpuid = cpuid::supported(&kvm)?;
        let mut vcpus = Vec::new();
        for id in 0..params.vcpus {
            let verr = |err| VmError::Vcpu { id, err };
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| verr(VcpuError::Ioctl("KVM_CREATE_VCPU", e)))?;
            let cpuid = cpuid::for_vcpu(&base_cpuid, id, params.vcpus)?;
            let boot = (id == 0).then_some(entry);
            vcpu::configure(&fd, &cpuid, boot).map_err(verr)?;
            vcpus.push(Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
            });
        }

        Ok(Vm {
            _io_workers: io_workers,
            _kvm: kvm,
            _vm: vm,
            mem,
            _rom: rom,
            vcpus,
            exit,
            pm1a,
            serial,
            room,
            _serial_irq: serial_irq,
            tty: File::from(files.tty),
        })
    }

    /// Starts one thread per vCPU.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler().map_err(|err| VmError::Vcpu { id: 0, err })?;
        let vcpus = std::mem::take(&mut self.vcpus);
        let mut running = RunningVm {
            vm: self,
            threads: Vec::new(),
            pause: PauseBook::default(),
        };
        for v in vcpus {
            let id = v.id;
            match v.spawn() {
                Ok(t) => running.threads.push(t),
                Err(err) => {
                    let err = VmError::Vcpu { id, err };
                    running
                        .vm
                        .exit
                        .request(ExitReason::VmmError(err.to_string()));
                    running.stop_vcpus();
                    return Err(err);
                }
            }
        }
        Ok(running)
    }
}

fn shared<D: crate::bus::BusDevice + 'static>(d: D) -> SharedDevice {
    Arc::new(Mutex::new(d))
}

/// Every virtio device's backend, in PCI slot order (disks, CD-ROM, nics,
/// then rng): its name and the transport's end of its channel. With
/// `devices` (the daemon) those are the device processes' channels;
/// without (vmd-vmm's tests) the backends for the local files run on
/// threads here. virtio-rng always runs on a thread here: it parses
/// nothing.
fn backends(
    params: &VmmParams,
    devices: Vec<Channel>,
    disks: Vec<DiskFiles>,
    cdrom: Option<OwnedFd>,
    taps: Vec<TapFiles>,
) -> Result<Vec<(String, Channel)>, VmError> {
    let names = device_names(params);
    let mut out = Vec::new();
    if !devices.is_empty() {
        if devices.len() != names.len() {
            return Err(VmError::DeviceCount(names.len(), devices.len()));
        }
        out.extend(names.into_iter().zip(devices));
    } else {
        if disks.len() != params.disks.len() {
            return Err(VmError::DiskCount(params.disks.len(), disks.len()));
        }
        if taps.len() != params.nics.len() {
            return Err(VmError::NicCount(params.nics.len(), taps.len()));
        }
        let mut local = Vec::new();
        for (index, (d, f)) in params.disks.iter().zip(disks).enumerate() {
            let kind = DevKind::Block {
                index: index as u32,
                disk: d.clone(),
            };
            local.push((kind, std::iter::once(f.top).chain(f.backing).collect()));
        }
        if let Some(fd) = cdrom {
            local.push((DevKind::Scsi, vec![fd]));
        }
        for (index, (n, t)) in params.nics.iter().zip(taps).enumerate() {
            let kind = DevKind::Net {
                index: index as u32,
                nic: n.clone(),
            };
            local.push((kind, vec![t.fd]));
        }
        for (name, (kind, fds)) in names.into_iter().zip(local) {
            let m = model::open(&params.name, &kind, fds).map_err(|err| VmError::Model {
                name: name.clone(),
                err,
            })?;
            out.push((name, spawn_backend(&name_of(&kind, &params.name), m)?));
        }
    }
    out.push((
        "rng".into(),
        spawn_backend("rng", Box::new(VirtioRng::new()))?,
    ));
    Ok(out)
}

fn name_of(kind: &DevKind, _vm: &str) -> String {
    match kind {
        DevKind::Block { index, .. } => format!("blk{index}"),
        DevKind::Scsi => "cdrom".into(),
        DevKind::Net { index, .. } => format!("net{index}"),
    }
}

/// A backend on a thread of this process; the thread ends with the
/// channel.
fn spawn_backend(name: &str, model: Box<dyn VirtioDevice>) -> Result<Channel, VmError> {
    let (chan, _thread) =
        backend::spawn_local(name, model).map_err(|e| VmError::Io("virtio backend thread", e))?;
    Ok(chan)
}

/// The names of a VM's device processes, in the order of their channels:
/// `blk0`.., `cdrom`, `net0`.. (also their process titles).
pub fn device_names(params: &VmmParams) -> Vec<String> {
    let mut names: Vec<String> = (0..params.disks.len()).map(|i| format!("blk{i}")).collect();
    if params.cdrom {
        names.push("cdrom".into());
    }
    names.extend((0..params.nics.len()).map(|i| format!("net{i}")));
    names
}

/// PCI bus 0 on the port bus and one virtio function per backend, each
/// with its transport's I/O thread. Every backend describes itself first:
/// the device processes started together, so this waits for the slowest
/// one only.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn add_pci_devices(
    params: &VmmParams,
    backends: Vec<(String, Channel)>,
    bridge: HostBridge,
    vm: &Arc<VmFd>,
    ram: &SharedRam<'_>,
    exit: &Arc<ExitSignal>,
    pio: &Bus,
    mmio: &Arc<Bus>,
) -> Result<(Vec<Worker>, Option<usize>, Option<usize>), VmError> {
    let root = Arc::new(Mutex::new(PciRoot::with_bridge(mmio.clone(), bridge)));
    pio.insert(
        u64::from(PORT_PCI_CONFIG_ADDRESS),
        1,
        shared(ConfigAddress(root.clone())),
    )?;
    pio.insert(
        u64::from(PORT_PCI_CONFIG_DATA),
        4,
        shared(ConfigData(root.clone())),
    )?;
    let router = GsiRouter::new(vm.clone());
    // The interface the VM boots from, if any.
    let boot_nic = params
        .nics
        .iter()
        .position(|n| n.boot_rom)
        .map(|i| format!("net{i}"));
    let mut boot_slot = None;
    // The disk or CD-ROM the firmware boots (`boot device`), if any.
    let boot_drive = match params.boot_device {
        Some(vmd_proto::vm::BootDevice::Disk) => Some("blk0"),
        Some(vmd_proto::vm::BootDevice::Cdrom) => Some("cdrom"),
        _ => None,
    };
    let mut drive_slot = None;
    let mut workers = Vec::new();
    for (name, chan) in backends {
        let verr = |err| VmError::Virtio {
            name: name.clone(),
            err,
        };
        let link = DeviceLink::connect(&name, chan, INFO_TIMEOUT)
            .map_err(|e| verr(TransportError::Link(e)))?;
        let mut r = lock(&root);
        let slot = r.next_slot().ok_or(PciError::BusFull)?;
        if boot_nic.as_ref() == Some(&name) {
            boot_slot = Some(slot);
        }
        if boot_drive == Some(name.as_str()) {
            drive_slot = Some(slot);
        }
        let dev = VirtioPci::new(link, ram, &router, intx_gsi(slot), exit.clone()).map_err(verr)?;
        let dev = Arc::new(Mutex::new(dev));
        r.add(dev.clone(), dev.clone())?;
        drop(r);
        log::debug!("virtio {name} at 00:{slot:02x}.0");
        workers.push(spawn_worker(dev).map_err(|e| VmError::Io("virtio I/O thread", e))?);
    }
    Ok((workers, boot_slot, drive_slot))
}

pub struct RunningVm {
    vm: Vm,
    threads: Vec<JoinHandle<()>>,
    pause: PauseBook,
}

/// The main loop's side of pausing (the vCPUs' side is in `ExitSignal`).
#[derive(Default)]
struct PauseBook {
    /// Paused, or pausing: the vCPUs were told to park.
    paused: bool,
    /// Every live vCPU is parked (and the clock saved).
    settled: bool,
    /// Peers waiting for `VmmPauseState { paused: true }`.
    waiting: Vec<u32>,
    /// kvmclock as it was when the last vCPU parked.
    clock: Option<kvm_clock_data>,
}

/// What woke the event loop.
struct Ready {
    exit: bool,
    room: bool,
    chan: bool,
    tty_in: bool,
    tty_gone: bool,
}

impl RunningVm {
    /// Serves the VM until it ends, then stops the vCPUs. With `chan`,
    /// obeys the parent's messages on it; without, runs until the guest
    /// ends (tests).
    pub fn event_loop(mut self, chan: Option<&Channel>) -> Outcome {
        let outcome = self.serve(chan);
        self.vm.exit.request(match &outcome {
            Outcome::Exited(r) => r.clone(),
            Outcome::ParentGone => ExitReason::Stopped,
        });
        self.stop_vcpus();
        outcome
    }

    /// Asks every vCPU thread to leave and waits (bounded) for them.
    fn stop_vcpus(&mut self) {
        for t in &self.threads {
            vcpu::kick(t);
        }
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() > deadline {
                log::warn!("vCPU threads did not stop in {VCPU_STOP_TIMEOUT:?}; leaving them");
                // They may still touch guest memory: keep it mapped.
                std::mem::forget(self.vm.mem.clone());
                return;
            }
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                vcpu::kick(t);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }

    fn serve(&mut self, chan: Option<&Channel>) -> Outcome {
        let mut tty_open = true;
        loop {
            if let Some(reason) = self.vm.exit.reason() {
                return Outcome::Exited(reason);
            }
            if let Some(c) = chan {
                self.settle_pause(c);
            }
            let mut want_tty = false;
            if tty_open {
                let mut room = lock(&self.vm.serial).room();
                if room == 0 {
                    // Full FIFO: ask to be woken when the guest reads, then
                    // look again in case it read in between.
                    self.vm.room.set_waiting();
                    room = lock(&self.vm.serial).room();
                }
                want_tty = room > 0;
            }
            let ready = match self.wait(chan, want_tty) {
                Ok(r) => r,
                Err(e) => return Outcome::Exited(ExitReason::VmmError(format!("poll: {e}"))),
            };
            if ready.exit {
                let _ = self.vm.exit.eventfd().read();
            }
            if ready.room {
                let _ = self.vm.room.eventfd().read();
            }
            if ready.chan {
                if let Some(c) = chan {
                    if let Some(outcome) = self.handle_message(c) {
                        return outcome;
                    }
                }
            }
            if ready.tty_in && !self.forward_input() {
                tty_open = false;
            }
            if ready.tty_gone && !ready.tty_in {
                log::info!("console tty hung up; guest input stops");
                tty_open = false;
            }
        }
    }

    fn wait(&self, chan: Option<&Channel>, want_tty: bool) -> nix::Result<Ready> {
        let fd = |raw| {
            // SAFETY: the eventfds live in `self.vm` for the whole call.
            unsafe { BorrowedFd::borrow_raw(raw) }
        };
        let mut fds = vec![
            PollFd::new(fd(self.vm.exit.eventfd().as_raw_fd()), PollFlags::POLLIN),
            PollFd::new(fd(self.vm.room.eventfd().as_raw_fd()), PollFlags::POLLIN),
        ];
        let chan_at = chan.map(|c| {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let tty_at = want_tty.then(|| {
            fds.push(PollFd::new(self.vm.tty.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let ev = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let any = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        Ok(Ready {
            exit: ev(0).contains(PollFlags::POLLIN),
            room: ev(1).contains(PollFlags::POLLIN),
            chan: chan_at.is_some_and(|i| ev(i).intersects(any)),
            tty_in: tty_at.is_some_and(|i| ev(i).contains(PollFlags::POLLIN)),
            tty_gone: tty_at
                .is_some_and(|i| ev(i).intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        })
    }

    /// One message from the parent; `Some` ends the loop.
    fn handle_message(&mut self, chan: &Channel) -> Option<Outcome> {
        match chan.recv() {
            Ok(frame) => match frame.msg {
                Msg::VmmTerminate => {
                    // Also when paused: the request wakes parked vCPUs.
                    log::info!("stopping on request");
                    self.vm.exit.request(ExitReason::Stopped);
                    None
                }
                Msg::VmmPowerButton => {
                    // A guest without ACPI never looks: the parent stops
                    // it after its grace period.
                    if lock(&self.vm.pm1a).raise(PWRBTN_STS) {
                        log::info!("power button pressed");
                    } else {
                        log::info!("power button pressed; the guest has not enabled it (yet)");
                    }
                    None
                }
                Msg::VmmPause => {
                    self.pause(frame.peer_id);
                    self.settle_pause(chan);
                    None
                }
                Msg::VmmUnpause => {
                    self.unpause();
                    // Whoever still waited for the pause (not all vCPUs
                    // parked yet) learns it did not happen.
                    for peer in std::mem::take(&mut self.pause.waiting) {
                        self.answer(chan, peer, false);
                    }
                    self.answer(chan, frame.peer_id, false);
                    None
                }
                Msg::SetVerbose { level } => {
                    log::set_max_level(vmd_proto::log_filter(level));
                    None
                }
                other => {
                    log::warn!("ignoring unexpected message type {}", other.type_code());
                    None
                }
            },
            Err(ChannelError::Closed) => {
                log::warn!("parent closed the channel; stopping the VM");
                Some(Outcome::ParentGone)
            }
            Err(e) if e.is_would_block() => None,
            Err(e) => {
                log::error!("channel: {e}");
                Some(Outcome::Exited(ExitReason::VmmError(format!(
                    "channel: {e}"
                ))))
            }
        }
    }

    /// Starts pausing (once) and queues `peer` for the answer, which
    /// [`Self::settle_pause`] sends when every vCPU is parked.
    fn pause(&mut self, peer: u32) {
        self.pause.waiting.push(peer);
        if self.pause.paused {
            return;
        }
        log::info!("pausing");
        self.pause.paused = true;
        self.pause.settled = false;
        self.vm.exit.set_paused(true);
        // Running vCPUs leave KVM_RUN (EINTR), and so do APs blocked in
        // it waiting for their SIPI; all of them then park.
        for t in &self.threads {
            vcpu::kick(t);
        }
    }

    /// Once every live vCPU is parked: saves the guest clock and answers
    /// whoever waits for the pause.
    fn settle_pause(&mut self, chan: &Channel) {
        if !self.pause.paused {
            return;
        }
        if !self.pause.settled {
            let live = self.threads.iter().filter(|t| !t.is_finished()).count();
            if self.vm.exit.parked() < live {
                return;
            }
            // With the vCPUs stopped, KVM's kvmclock still follows the
            // host's monotonic clock: on unpause the guest would see the
            // paused time pass at once. Save it now and put it back then
            // (as QEMU does for kvmclock). A guest reading the raw TSC
            // still sees the TSC advance across the pause: that would need
            // each vCPU's TSC offset moved back, which QEMU does not do
            // either.
            self.pause.clock = match self.vm._vm.get_clock() {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!("KVM_GET_CLOCK: {e}; the guest clock runs on while paused");
                    None
                }
            };
            self.pause.settled = true;
            log::info!("paused ({live} vCPUs parked)");
        }
        for peer in std::mem::take(&mut self.pause.waiting) {
            self.answer(chan, peer, true);
        }
    }

    /// Releases the parked vCPUs, with the guest clock where it stopped.
    fn unpause(&mut self) {
        if !self.pause.paused {
            return;
        }
        if let Some(saved) = self.pause.clock.take() {
            // Only the value: flags such as KVM_CLOCK_REALTIME would ask
            // KVM to add the time that passed, older kernels refuse any.
            let clock = kvm_clock_data {
                clock: saved.clock,
                ..Default::default()
            };
            if let Err(e) = self.vm._vm.set_clock(&clock) {
                log::warn!("KVM_SET_CLOCK: {e}; the guest clock jumps ahead");
            }
        }
        self.pause.paused = false;
        self.pause.settled = false;
        self.vm.exit.set_paused(false);
        log::info!("unpaused");
    }

    fn answer(&self, chan: &Channel, peer: u32, paused: bool) {
        if let Err(e) = chan.send(&Msg::VmmPauseState { paused }, peer, &[]) {
            log::error!("cannot send the pause state to the parent: {e}");
        }
    }

    /// Moves what the FIFO can take from the tty into the UART. Returns
    /// false when the tty is gone.
    fn forward_input(&mut self) -> bool {
        let mut serial = lock(&self.vm.serial);
        let mut buf = [0u8; 64];
        let n = serial.room().min(buf.len());
        if n == 0 {
            return true;
        }
        match self.vm.tty.read(&mut buf[..n]) {
            Ok(0) => {
                log::info!("console tty closed; guest input stops");
                false
            }
            Ok(got) => {
                serial.enqueue(&buf[..got]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                true
            }
            Err(e) => {
                // EIO: the pty master is closed.
                log::info!("console tty: {e}; guest input stops");
                false
            }
        }
    }
}

/// Builds the VM, runs it, and reports `VmmRunning` on `chan` once its
/// vCPUs run. Every setup failure becomes `ExitReason::VmmError`.
pub fn build_and_run(
    params: &VmmParams,
    files: VmFiles,
    chan: Option<&Channel>,
    opts: &DevOptions,
) -> Outcome {
    let started = Vm::new(params, files, opts).and_then(Vm::start);
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            log::error!("vm {}: {e}", params.name);
            return Outcome::Exited(ExitReason::VmmError(e.to_string()));
        }
    };
    log::info!(
        "vm {}: running ({} vCPUs, {} MiB)",
        params.name,
        params.vcpus,
        params.memory >> 20
    );
    if let Some(c) = chan {
        if let Err(e) = c.send(&Msg::VmmRunning, params.id, &[]) {
            log::error!("cannot tell the parent the VM runs: {e}");
            let mut running = running;
            running.vm.exit.request(ExitReason::Stopped);
            running.stop_vcpus();
            return Outcome::ParentGone;
        }
    }
    running.event_loop(chan)
}
