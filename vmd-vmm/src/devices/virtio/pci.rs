//! The modern virtio-pci transport (virtio 1.2, 4.1): vendor 0x1af4,
//! device 0x1040 + type, revision 1, and one 32-bit memory BAR (BAR 0)
//! holding every structure:
//!
//! | BAR 0 offset | what                                        |
//! |--------------|---------------------------------------------|
//! | 0x0000       | common configuration (0x38 bytes)           |
//! | 0x0800       | ISR status (1 byte, read clears)            |
//! | 0x1000       | device-specific configuration               |
//! | 0x2000       | notifications: queue n at 0x2000 + 4 n      |
//! | 0x3000       | MSI-X table (one vector per queue + config) |
//! | 0x3800       | MSI-X pending-bit array                     |
//!
//! Each queue's notification address is an ioeventfd registered with KVM
//! (any write, any width), so a notify wakes the device's backend (in its
//! device process, see [`super::backend`]) without a userspace exit;
//! should a write still arrive here (no ioeventfd yet, or KVM refused it)
//! the same eventfd is signalled. This process keeps the registers,
//! feature negotiation and interrupts; the lifecycle (FEATURES_OK,
//! DRIVER_OK with the queues, reset, configuration writes) goes to the
//! backend as requests over its channel ([`super::remote`]); the data path
//! never runs here. Interrupts: the backend writes a queue's call eventfd,
//! the I/O thread ([`spawn_worker`]) raises the queue's MSI-X vector
//! through its irqfd when the driver enabled MSI-X, otherwise INTx (pin A,
//! level) with the ISR byte.
//!
//! A driver that breaks the rules gets DEVICE_NEEDS_RESET (status bit
//! 0x40, a configuration-change interrupt) and a device that does nothing
//! until it is reset; register writes that make no sense are ignored.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmd_proto::vm::{ExitReason, QueueSetup};
use vmd_proto::Msg;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::remote::{DeviceLink, LinkError};
use super::{
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;
use crate::lifecycle::ExitSignal;
use crate::pci::config::{self, ConfigError, PciConfig, PciIds};
use crate::pci::irq::{GsiRouter, IntxLine, IrqError};
use crate::pci::msix::Msix;
use crate::pci::PciDevice;

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
pub const BAR_SIZE: u64 = 0x4000;
pub const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x0800;
const ISR_LEN: u64 = 1;
pub const DEVICE_OFFSET: u64 = 0x1000;
/// Room for the device-specific configuration.
pub const DEVICE_LEN: u64 = 0x800;
pub const NOTIFY_OFFSET: u64 = 0x2000;
/// queue_notify_off is the queue index; this spaces them 4 bytes apart.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0x3000;
pub const MSIX_PBA_OFFSET: u64 = 0x3800;
/// "No vector" in msix_config and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// virtio PCI capability types (4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_ID_VENDOR: u8 = 0x09;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Irq(#[from] IrqError),
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
    #[error("queue of {0} entries: {1}")]
    Queue(u16, virtio_queue::Error),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("{0} queues are more than the transport supports")]
    TooManyQueues(usize),
    #[error("device process: {0}")]
    Link(#[from] LinkError),
}

pub struct VirtioPci {
    name: String,
    config: PciConfig,
    /// The backend, at the other end of its channel.
    link: DeviceLink,
    /// The device configuration as the backend last said it reads.
    device_config: Vec<u8>,
    mem: Arc<GuestMemoryMmap>,
    /// Told when the backend dies or stops answering.
    exit: Arc<ExitSignal>,
    vm: Arc<VmFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    msix_config: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    notify: Vec<EventFd>,
    /// The backend writes queue n's when it used buffers.
    calls: Vec<EventFd>,
    /// The GSI each queue's call eventfd is an irqfd of now: with MSI-X on
    /// and its vector unmasked, the backend's write reaches the guest
    /// through KVM without waking this process.
    direct: Vec<Option<u32>>,
    /// The backend writes this when the driver broke the rules.
    error: EventFd,
    /// BAR 0 base the ioeventfds are registered at.
    ioevents_at: Option<u64>,
    isr: u8,
    msix: Msix,
    msix_cap: usize,
    intx: IntxLine,
}

/// An eventfd as a borrowed fd (vmm-sys-util's EventFd has no `AsFd`).
fn borrow_evt(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd lives as long as `e`, which the borrow is tied to.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// A vendor-specific virtio capability pointing into BAR 0.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let len = if multiplier.is_some() { 20 } else { 16 };
    let mut b = vec![CAP_ID_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// A transport for the backend at the other end of `link`, with INTx
    /// on `intx_gsi`: hands the backend guest RAM (`ram`) and its queue
    /// eventfds.
    pub fn new(
        link: DeviceLink,
        ram: &SharedRam<'_>,
        router: &Arc<GsiRouter>,
        intx_gsi: u32,
        exit: Arc<ExitSignal>,
    ) -> Result<VirtioPci, TransportError> {
        let vm = router.vm().clone();
        let sizes = link.info.queue_sizes.clone();
        if sizes.len() * NOTIFY_MULTIPLIER as usize > NOTIFY_LEN as usize || sizes.len() > 127 {
            return Err(TransportError::TooManyQueues(sizes.len()));
        }
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        let mut calls = Vec::new();
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd);
        for s in &sizes {
            queues.push(Queue::new(*s).map_err(|e| TransportError::Queue(*s, e))?);
            notify.push(evt()?);
            calls.push(evt()?);
        }
        let error = evt()?;
        let mut fds = vec![ram.memfd.as_fd()];
        fds.extend(notify.iter().map(borrow_evt));
        fds.extend(calls.iter().map(borrow_evt));
        fds.push(borrow_evt(&error));
        let attach = Msg::DevAttach {
            regions: ram.regions.to_vec(),
            queues: sizes.len() as u8,
        };
        let device_config = link.request(&attach, &fds)?;
        let name = link.name.clone();
        let msix = Msix::new(sizes.len() as u16 + 1, router.clone())?;
        let ty = link.info.device_type;
        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + ty,
            revision: 1,
            class: class_of(ty),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        });
        config.add_mem32_bar(0, BAR_SIZE)?;
        config.set_intx(intx_gsi as u8);
        config.add_capability(
            &virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, None),
            &[],
        )?;
        config.add_capability(
            &virtio_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER),
            ),
            &[],
        )?;
        config.add_capability(&virtio_cap(CAP_ISR, ISR_OFFSET, ISR_LEN, None), &[])?;
        config.add_capability(
            &virtio_cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_LEN, None),
            &[],
        )?;
        let (body, wmask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&body, &wmask)?;
        let intx = IntxLine::new(&vm, intx_gsi)?;
        Ok(VirtioPci {
            name,
            config,
            link,
            device_config,
            mem: ram.mem.clone(),
            exit,
            vm,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            msix_config: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues.len()],
            queues,
            notify,
            direct: vec![None; calls.len()],
            calls,
            error,
            ioevents_at: None,
            isr: 0,
            msix,
            msix_cap,
            intx,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn device_features(&self) -> u64 {
        self.link.info.features | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC
    }

    /// Sends a lifecycle request to the backend. A backend that is gone
    /// or does not answer stops the VM: its guest could not go on anyway.
    fn request(&mut self, msg: &Msg) -> bool {
        match self.link.request(msg, &[]) {
            Ok(config) => {
                self.device_config = config;
                true
            }
            Err(e) => {
                self.backend_failed(&e.to_string());
                false
            }
        }
    }

    /// Makes each queue's call eventfd an irqfd of its vector's GSI while
    /// the vector can take it directly, and takes it back otherwise (then
    /// the I/O thread reads the call and goes through MSI-X masking or
    /// INTx). Run after anything that changes a queue's vector, the MSI-X
    /// table or its control word.
    fn update_direct(&mut self) {
        for q in 0..self.calls.len() {
            let want = self.msix.direct_gsi(self.queue_vectors[q]);
            if want == self.direct[q] {
                continue;
            }
            if let Some(gsi) = self.direct[q].take() {
                if let Err(e) = self.vm.unregister_irqfd(&self.calls[q], gsi) {
                    log::warn!("{}: queue {q}: releasing irqfd: {e}", self.name);
                }
            }
            if let Some(gsi) = want {
                match self.vm.register_irqfd(&self.calls[q], gsi) {
                    Ok(()) => self.direct[q] = Some(gsi),
                    // The I/O thread still relays every call.
                    Err(e) => log::debug!("{}: queue {q}: direct irqfd: {e}", self.name),
                }
            }
        }
    }

    fn backend_failed(&mut self, why: &str) {
        log::error!("{}: {why}", self.name);
        self.status |= STATUS_FAILED;
        self.exit
            .request(ExitReason::Device(format!("{}: {why}", self.name)));
    }

    /// The queues as the driver set them up, for the backend.
    fn queue_setups(&self) -> Vec<QueueSetup> {
        self.queues
            .iter()
            .map(|q| QueueSetup {
                size: q.size(),
                ready: q.ready(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
            })
            .collect()
    }

    fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.device_config.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The common configuration structure as the driver would read it.
    fn common(&self) -> [u8; COMMON_LEN as usize] {
        let mut c = [0u8; COMMON_LEN as usize];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(
            0x04,
            &half(self.device_features(), self.device_feature_select).to_le_bytes(),
        );
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(
            0x0c,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(0x10, &self.msix_config.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status, 0]);
        put(0x16, &self.queue_select.to_le_bytes());
        let sel = usize::from(self.queue_select);
        if let Some(q) = self.queues.get(sel) {
            put(0x18, &q.size().to_le_bytes());
            put(0x1a, &self.queue_vectors[sel].to_le_bytes());
            put(0x1c, &u16::from(q.ready()).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc_table().to_le_bytes());
            put(0x28, &q.avail_ring().to_le_bytes());
            put(0x30, &q.used_ring().to_le_bytes());
        }
        c
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= COMMON_LEN)
        else {
            return;
        };
        let (off, end) = (offset as usize, end as usize);
        let mut c = self.common();
        c[off..end].copy_from_slice(data);
        let u16_at = |at: usize| u16::from_le_bytes([c[at], c[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
        // (offset, size) of each writable field.
        const FIELDS: [(usize, usize); 15] = [
            (0x00, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x14, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x20, 4),
            (0x24, 4),
            (0x28, 4),
            (0x2c, 4),
            (0x30, 4),
            (0x34, 4),
        ];
        for (at, size) in FIELDS {
            if at >= end || at + size <= off {
                continue;
            }
            match at {
                0x00 => self.device_feature_select = u32_at(at),
                0x08 => self.driver_feature_select = u32_at(at),
                0x0c => self.write_driver_features(u32_at(at)),
                0x10 => self.msix_config = self.valid_vector(u16_at(at)),
                0x14 => self.write_status(c[at]),
                0x16 => self.queue_select = u16_at(at),
                _ => self.write_queue_field(at, u16_at(at), u32_at(at)),
            }
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        let offered = self.device_features();
        self.driver_features = (self.driver_features & !mask) | ((u64::from(v) << shift) & offered);
    }

    fn write_queue_field(&mut self, at: usize, v16: u16, v32: u32) {
        let sel = usize::from(self.queue_select);
        let mem = self.mem.clone();
        let Some(q) = self.queues.get_mut(sel) else {
            return;
        };
        if at == 0x1a {
            self.queue_vectors[sel] = if v16 < self.msix.vectors() {
                v16
            } else {
                NO_VECTOR
            };
            self.update_direct();
            return;
        }
        // Enabled queues are fixed until reset.
        if q.ready() {
            return;
        }
        match at {
            0x18 if q.try_set_size(v16).is_err() => {
                log::debug!("{}: queue {sel}: bad size {v16}", self.name);
            }
            0x1c if v16 == 1 => {
                q.set_ready(true);
                if !q.is_valid(&*mem) {
                    q.set_ready(false);
                    log::warn!("{}: queue {sel} rings are not in guest memory", self.name);
                    self.set_needs_reset();
                }
            }
            0x20 => q.set_desc_table_address(Some(v32), None),
            0x24 => q.set_desc_table_address(None, Some(v32)),
            0x28 => q.set_avail_ring_address(Some(v32), None),
            0x2c => q.set_avail_ring_address(None, Some(v32)),
            0x30 => q.set_used_ring_address(Some(v32), None),
            0x34 => q.set_used_ring_address(None, Some(v32)),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0
            && old & STATUS_FEATURES_OK == 0
            && self.driver_features & VIRTIO_F_VERSION_1 == 0
        {
            log::debug!("{}: driver did not accept VERSION_1", self.name);
            v &= !STATUS_FEATURES_OK;
        }
        // NEEDS_RESET is the device's to set; only a reset clears it.
        self.status = (v & !STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET);
        if v & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let features = self.driver_features;
            if !self.request(&Msg::DevFeaturesOk { features }) {
                return;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            log::debug!(
                "{}: driver ok, features {:#x}",
                self.name,
                self.driver_features
            );
            let queues = self.queue_setups();
            if !self.request(&Msg::DevActivate { queues }) {
                return;
            }
            // Serve whatever was queued before DRIVER_OK.
            for n in &self.notify {
                let _ = n.write(1);
            }
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.update_direct();
        self.msix_config = NO_VECTOR;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.isr = 0;
        // The backend stops using the old queues before the driver hears
        // the reset is done (it reads status 0 after this write).
        self.request(&Msg::DevReset);
    }

    fn set_needs_reset(&mut self) {
        if self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.status |= STATUS_NEEDS_RESET;
        // Only a driver that finished setup hears about it.
        if self.status & STATUS_DRIVER_OK != 0 {
            self.signal(self.msix_config, ISR_CONFIG);
        }
    }

    /// Raises `vector` (MSI-X) or INTx with `isr` bits.
    fn signal(&mut self, vector: u16, isr: u8) {
        if self.msix.enabled() {
            if vector != NO_VECTOR {
                self.msix.notify(vector);
            }
        } else {
            self.isr |= isr;
            if self.config.command() & config::COMMAND_INTX_DISABLE == 0 {
                self.intx.assert();
            }
        }
    }

    /// KVM lowered INTx after the guest's EOI: raise it again while the
    /// ISR still says something is pending.
    fn resample(&mut self) {
        if !self.msix.enabled() && self.isr != 0 {
            self.intx.assert();
        }
    }

    fn register_ioevents(&mut self, base: Option<u64>) {
        if let Some(old) = self.ioevents_at.take() {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = IoEventAddress::Mmio(old + NOTIFY_OFFSET + 4 * i as u64);
                if let Err(e) = self.vm.unregister_ioevent(fd, &addr, NoDatamatch) {
                    log::warn!("{}: unregistering ioeventfd: {e}", self.name);
                }
            }
        }
        let Some(base) = base else { return };
        for (i, fd) in self.notify.iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + NOTIFY_OFFSET + 4 * i as u64);
            if let Err(e) = self.vm.register_ioevent(fd, &addr, NoDatamatch) {
                // Notifications still arrive as MMIO writes.
                log::warn!("{}: ioeventfd for queue {i}: {e}", self.name);
            }
        }
        self.ioevents_at = Some(base);
    }
}

/// PCI class for a device type: mass storage for block, "other" else.
fn class_of(ty: u16) -> (u8, u8, u8) {
    match ty {
        super::TYPE_BLOCK => (0x01, 0x00, 0x00),
        super::TYPE_NET => (0x02, 0x00, 0x00),
        super::TYPE_SCSI => (0x01, 0x00, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

fn in_range(offset: u64, len: usize, base: u64, size: u64) -> Option<u64> {
    let end = offset.checked_add(len as u64)?;
    (offset >= base && end <= base.checked_add(size)?).then(|| offset - base)
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let n = data.len();
        if let Some(o) = in_range(offset, n, COMMON_OFFSET, COMMON_LEN) {
            let c = self.common();
            data.copy_from_slice(&c[o as usize..o as usize + n]);
        } else if in_range(offset, n, ISR_OFFSET, ISR_LEN).is_some() {
            data[0] = std::mem::take(&mut self.isr);
        } else if let Some(o) = in_range(offset, n, DEVICE_OFFSET, DEVICE_LEN) {
            self.read_device_config(o, data);
        } else if let Some(o) = in_range(offset, n, MSIX_TABLE_OFFSET, self.msix.table_len()) {
            self.msix.read_table(o, data);
        } else if let Some(o) = in_range(offset, n, MSIX_PBA_OFFSET, self.msix.pba_len()) {
            self.msix.read_pba(o, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let n = data.len();
        if let Some(o) = in_range(offset, n, COMMON_OFFSET, COMMON_LEN) {
            self.write_common(o, data);
        } else if let Some(o) = in_range(offset, n, DEVICE_OFFSET, DEVICE_LEN) {
            let msg = Msg::DevConfigWrite {
                offset: o,
                data: data.to_vec(),
            };
            self.request(&msg);
        } else if let Some(o) = in_range(offset, n, NOTIFY_OFFSET, NOTIFY_LEN) {
            // No ioeventfd caught it: wake the I/O thread ourselves.
            if let Some(fd) = self.notify.get((o / 4) as usize) {
                let _ = fd.write(1);
            }
        } else if let Some(o) = in_range(offset, n, MSIX_TABLE_OFFSET, self.msix.table_len()) {
            self.msix.write_table(o, data);
            self.update_direct();
        }
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, offset: usize, len: usize) {
        let ctrl = self.msix_cap + 2;
        if offset < ctrl + 2 && offset + len > ctrl {
            let v = self.config.u16(ctrl);
            self.msix.set_control(v);
            self.update_direct();
        }
    }
    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar == 0 {
            self.register_ioevents(addr);
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.queue_vectors.fill(NO_VECTOR);
        self.update_direct();
        self.register_ioevents(None);
        let _ = self.vm.unregister_irqfd(&self.intx.irq, self.intx.gsi);
    }
}

/// A device's I/O thread; dropping it stops the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a virtio I/O thread panicked");
            }
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest RAM as a backend receives it.
pub struct SharedRam<'a> {
    pub mem: Arc<GuestMemoryMmap>,
    pub memfd: &'a File,
    /// (guest address, length, offset in the memfd).
    pub regions: &'a [(u64, u64, u64)],
}

/// Starts `dev`'s I/O thread: it sleeps in poll(2) on the backend's call
/// and error eventfds, the INTx resample eventfd and the backend's channel
/// (for hang-up: the device process died).
pub fn spawn_worker(dev: Arc<Mutex<VirtioPci>>) -> io::Result<Worker> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let (name, calls, error, resample, chan) = {
        let d = lock(&dev);
        let calls = d
            .calls
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let chan = d.link.chan_fd().try_clone_to_owned()?;
        (
            d.name.clone(),
            calls,
            d.error.try_clone()?,
            d.intx.resample.try_clone()?,
            chan,
        )
    };
    let stop2 = stop.try_clone()?;
    let thread = std::thread::Builder::new()
        .name(format!("io-{name}"))
        .spawn(move || worker_loop(&dev, &stop2, &resample, &error, &calls, chan.as_fd()))?;
    Ok(Worker {
        stop,
        thread: Some(thread),
    })
}

fn worker_loop(
    dev: &Mutex<VirtioPci>,
    stop: &EventFd,
    resample: &EventFd,
    error: &EventFd,
    calls: &[EventFd],
    chan: BorrowedFd<'_>,
) {
    let borrow = borrow_evt;
    // Built once: poll(2) rewrites only the returned events. The channel
    // is watched for hang-up only; its requests and answers belong to the
    // transport.
    let mut fds = vec![
        PollFd::new(borrow(stop), PollFlags::POLLIN),
        PollFd::new(borrow(resample), PollFlags::POLLIN),
        PollFd::new(borrow(error), PollFlags::POLLIN),
        PollFd::new(chan, PollFlags::empty()),
    ];
    fds.extend(
        calls
            .iter()
            .map(|n| PollFd::new(borrow(n), PollFlags::POLLIN)),
    );
    let ready = |f: &PollFd| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("virtio I/O thread: poll: {e}");
                return;
            }
        }
        if ready(&fds[0]) {
            return;
        }
        if ready(&fds[1]) {
            let _ = resample.read();
            lock(dev).resample();
        }
        if ready(&fds[2]) {
            let _ = error.read();
            lock(dev).set_needs_reset();
        }
        for (q, n) in calls.iter().enumerate() {
            // Nothing to read: KVM took the call (a direct irqfd).
            if ready(&fds[4 + q]) && n.read().is_ok() {
                let mut d = lock(dev);
                let vector = d.queue_vectors[q];
                d.signal(vector, ISR_QUEUE);
            }
        }
        if fds[3]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        {
            lock(dev).backend_failed("device process gone");
            return;
        }
    }
}
