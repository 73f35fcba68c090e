//! The VM's devices: emulated legacy devices on the port-I/O bus
//! ([`legacy`]), and the virtio device models behind the PCI transport
//! ([`virtio`], one directory per device).

pub mod legacy;
pub mod virtio;

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
