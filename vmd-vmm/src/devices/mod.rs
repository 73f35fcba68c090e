//! Emulated legacy devices on the port-I/O bus, and the virtio device
//! models (behind the PCI transport in `virtio::pci`).

pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod power;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_net;
pub mod virtio_rng;
pub mod virtio_scsi;

use crate::bus::BusDevice;

/// A port whose writes are ignored and whose reads float (all-ones), but
/// which is expected to be hit often, so it is not logged as unclaimed
/// (port 0x80, used by Linux for I/O delays).
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
