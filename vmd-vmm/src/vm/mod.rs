//! A VM process's VM: fd intake (`files`), building the machine
//! (`build`), wiring its virtio devices to their backends (`wiring`), and
//! the main thread's run loop (`run`) until the guest ends or the parent
//! says stop.

mod build;
mod files;
mod run;
mod wiring;

use std::io::{self};
use std::os::fd::AsFd;
use std::sync::{Mutex, MutexGuard};

use vmd_proto::vm::{ExitReason, VmmParams};
use vmd_proto::{Channel, Msg};

use crate::acpi::AcpiError;
use crate::arch::x86_64::boot::BootError;
use crate::arch::x86_64::cpuid::CpuidError;
use crate::arch::x86_64::mptable::MpTableError;
use crate::bus::BusError;
use crate::devices::legacy::fw_cfg::FwCfgError;
use crate::devices::legacy::serial::SerialError;
use crate::devices::virtio::model::ModelError;
use crate::devices::virtio::pci::TransportError;
use crate::memory::MemoryError;
use crate::pci::PciError;
use crate::vcpu::VcpuError;

pub use build::Vm;
pub use files::{DiskFiles, TapFiles, VmFiles};
use run::PauseBook;
pub use run::RunningVm;
pub use wiring::device_names;

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
    let mut running = running;
    if let Some(c) = chan {
        if let Err(e) = c.send(&Msg::VmmRunning, params.id, &[]) {
            log::error!("cannot tell the parent the VM runs: {e}");
            running.vm.exit.request(ExitReason::Stopped);
            running.stop_vcpus();
            return Outcome::ParentGone;
        }
        // The parent reads exit counts from these; we need them no more.
        let stats = std::mem::take(&mut running.vm.stats);
        for (n, group) in stats.chunks(vmd_proto::MAX_FDS).enumerate() {
            let fds: Vec<_> = group.iter().map(|f| f.as_fd()).collect();
            let msg = Msg::VmmStats {
                first: (n * vmd_proto::MAX_FDS) as u32,
                count: fds.len() as u32,
            };
            if let Err(e) = c.send(&msg, params.id, &fds) {
                log::warn!("cannot hand the parent the vCPU statistics: {e}");
            }
        }
    }
    running.event_loop(chan)
}
