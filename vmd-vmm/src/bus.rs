//! Port-I/O and MMIO buses: address ranges mapped to devices. An access
//! nobody claims reads as all-ones (a floating bus) and writes vanish.
//!
//! Ranges can be added and removed while vCPUs run (PCI BARs move when
//! the guest reprograms them): the range list sits behind a read-write
//! lock that accesses only read.

use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range the
/// device was inserted at; `data.len()` is the access size.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{bus} range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        bus: &'static str,
        base: u64,
        len: u64,
    },
}

struct Range {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

pub struct Bus {
    name: &'static str,
    /// Sorted by base, never overlapping.
    ranges: RwLock<Vec<Range>>,
}

impl Bus {
    pub fn new(name: &'static str) -> Bus {
        Bus {
            name,
            ranges: RwLock::new(Vec::new()),
        }
    }

    pub fn insert(&self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let err = BusError::Overlap {
            bus: self.name,
            base,
            len,
        };
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(err);
        };
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let at = ranges.partition_point(|r| r.base < base);
        let clashes_prev = at > 0 && {
            let p = &ranges[at - 1];
            p.base + p.len > base
        };
        let clashes_next = ranges.get(at).is_some_and(|n| n.base < end);
        if clashes_prev || clashes_next {
            return Err(err);
        }
        ranges.insert(at, Range { base, len, dev });
        Ok(())
    }

    /// Removes the range starting at `base`; false if there is none.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        match ranges.iter().position(|r| r.base == base) {
            Some(i) => {
                ranges.remove(i);
                true
            }
            None => false,
        }
    }

    /// The device at `addr` and the offset into its range.
    fn find(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let at = ranges.partition_point(|r| r.base <= addr);
        let r = ranges.get(at.checked_sub(1)?)?;
        (addr - r.base < r.len).then(|| (r.dev.clone(), addr - r.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((dev, offset)) => lock(&dev).read(offset, data),
            None => {
                log::trace!(
                    "{} read of {} bytes at {addr:#x}: unclaimed",
                    self.name,
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((dev, offset)) => lock(&dev).write(offset, data),
            None => log::trace!("{} write {data:x?} at {addr:#x}: unclaimed", self.name),
        }
    }
}

/// A device panicking on one vCPU must not wedge the others.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn dev(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn dispatch_and_unclaimed() {
        let bus = Bus::new("pio");
        bus.insert(0x3f8, 8, dev(0x10)).unwrap();
        bus.insert(0x60, 1, dev(0x20)).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fa, &mut b);
        assert_eq!(b, [0x12]);
        bus.read(0x60, &mut b);
        assert_eq!(b, [0x20]);
        let mut w = [0u8; 2];
        bus.read(0x400, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        bus.read(0x5f, &mut b);
        assert_eq!(b, [0xff]);
        bus.write(0x60, &[7]);
        bus.read(0x60, &mut b);
        assert_eq!(b, [7]);
        bus.write(0x1234, &[1]); // ignored
    }

    #[test]
    fn overlaps_rejected() {
        let bus = Bus::new("pio");
        bus.insert(0x100, 0x10, dev(0)).unwrap();
        assert!(bus.insert(0x10f, 1, dev(0)).is_err());
        assert!(bus.insert(0xf8, 0x9, dev(0)).is_err());
        assert!(bus.insert(0x50, 0, dev(0)).is_err());
        assert!(bus.insert(u64::MAX, 2, dev(0)).is_err());
        bus.insert(0xf8, 0x8, dev(0)).unwrap();
        bus.insert(0x110, 1, dev(0)).unwrap();
        assert!(bus.remove(0x100));
        assert!(!bus.remove(0x100));
        bus.insert(0x108, 8, dev(0)).unwrap();
    }
}
