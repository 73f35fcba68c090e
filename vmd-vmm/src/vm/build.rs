//! Building a VM: KVM, guest RAM, the boot path, the legacy devices, the
//! PCI bus with the virtio devices (see `wiring`), and the vCPUs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmd_proto::vm::{ExitReason, VmmParams, MAX_VCPUS};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self};
use crate::arch::x86_64::boot::{self, firmware, BootEntry};
use crate::arch::x86_64::cpuid::{self};
use crate::arch::x86_64::layout::{
    COM1_IRQ, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, PM1A_EVT_LEN, PORT_CMOS, PORT_COM1,
    PORT_DEBUGCON, PORT_FW_CFG, PORT_I8042_DATA, PORT_PM1A_CNT, PORT_PM1A_EVT, PORT_POST,
    PORT_RESET_CTRL, SCI_IRQ,
};
use crate::arch::x86_64::mptable::{self};
use crate::bus::{Bus, SharedDevice};
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::debugcon::DebugCon;
use crate::devices::legacy::fw_cfg::{self, FwCfg, FwCfgItems, FW_CFG_PORT_LEN};
use crate::devices::legacy::i8042::{ResetControl, I8042};
use crate::devices::legacy::power::{Pm1aControl, Pm1aEvent};
use crate::devices::legacy::serial::{RoomNotifier, SerialDevice};
use crate::devices::virtio::pci::{SharedRam, Worker, VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_VENDOR};
use crate::devices::virtio::TYPE_NET;
use crate::devices::Sink;
use crate::lifecycle::ExitSignal;
use crate::memory::{self, MemoryError, RamLayout};
use crate::pci::HostBridge;
use crate::vcpu::{self, Vcpu, VcpuError};

use super::wiring::{add_pci_devices, backends};
use super::{DevOptions, PauseBook, RunningVm, VmError, VmFiles};

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// A VM built and ready to run.
pub struct Vm {
    /// Stopped (and joined) first when the VM goes away.
    pub(super) _io_workers: Vec<Worker>,
    pub(super) _kvm: Kvm,
    pub(super) _vm: Arc<VmFd>,
    pub(super) mem: Arc<GuestMemoryMmap>,
    /// The firmware image below 4 GiB (a KVM slot), when booting one.
    pub(super) _rom: Option<GuestMemoryMmap>,
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) exit: Arc<ExitSignal>,
    /// The PM1a event block, where `VmmPowerButton` presses the button.
    pub(super) pm1a: Arc<Mutex<Pm1aEvent>>,
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) room: Arc<RoomNotifier>,
    pub(super) _serial_irq: EventFd,
    pub(super) tty: File,
    /// Each vCPU's KVM binary statistics fd (KVM_GET_STATS_FD), handed to
    /// the parent once the VM runs, for its metrics.
    pub(super) stats: Vec<OwnedFd>,
}

/// KVM_GET_STATS_FD: _IO(KVMIO, 0xce), Linux 5.14 and later.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

/// A vCPU's statistics fd, or `None` on kernels without binary stats
/// (metrics then lack exit counts).
fn stats_fd(vcpu: &VcpuFd) -> Option<OwnedFd> {
    // SAFETY: an ioctl without an argument on a vCPU fd we own; a
    // non-negative result is a new fd that we then own.
    let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
    // SAFETY: see above.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
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
        let ram = RamLayout::new(params.memory)?;
        let guest_ram = memory::create(&ram)?;
        let mem = guest_ram.mem;
        // Each of these ioctls sleeps in the kernel (SRCU grace periods for
        // the memory slot, the PIC/IOAPIC/PIT I/O-bus entries and the IRQ
        // routing; a kthread for the PIT): most of a start's VMM time, and
        // not work. A helper thread registers the RAM while this one makes
        // the interrupt controllers, so the waits that do not share a lock
        // overlap (docs/BENCHMARKS.md, where the time goes).
        std::thread::scope(|s| {
            let slots = s.spawn(|| memory::register(&vm, &mem));
            let chips = vm
                .create_irq_chip()
                .map_err(kvm_io("KVM_CREATE_IRQCHIP"))
                .and_then(|()| {
                    let pit = kvm_pit_config {
                        // KVM answers the PC speaker port (0x61) with a dummy.
                        flags: KVM_PIT_SPEAKER_DUMMY,
                        ..Default::default()
                    };
                    vm.create_pit2(pit).map_err(kvm_io("KVM_CREATE_PIT2"))
                });
            let slots = slots.join().unwrap_or(Err(MemoryError::RegisterThread));
            chips?;
            slots.map_err(VmError::from)
        })?;
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
        let mut stats = Vec::new();
        for id in 0..params.vcpus {
            let verr = |err| VmError::Vcpu { id, err };
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| verr(VcpuError::Ioctl("KVM_CREATE_VCPU", e)))?;
            stats.extend(stats_fd(&fd));
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
            stats,
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

pub(super) fn shared<D: crate::bus::BusDevice + 'static>(d: D) -> SharedDevice {
    Arc::new(Mutex::new(d))
}
