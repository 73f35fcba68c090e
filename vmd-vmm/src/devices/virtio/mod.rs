//! virtio 1.x devices: the [`VirtioDevice`] trait the device models
//! implement, descriptor-chain handling shared by them, and the modern
//! PCI transport ([`pci`]).

pub mod backend;
pub mod block;
pub mod model;
pub mod net;
pub mod pci;
pub mod remote;
pub mod rng;
pub mod scsi;

use std::os::fd::RawFd;

use virtio_bindings::{virtio_config, virtio_ids, virtio_ring};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Feature bits every device offers (virtio 1.2, 6).
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (2.1).
pub const STATUS_ACKNOWLEDGE: u8 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_NEEDS_RESET: u8 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = virtio_config::VIRTIO_CONFIG_S_FAILED as u8;

/// Device types (5).
pub const TYPE_NET: u16 = virtio_ids::VIRTIO_ID_NET as u16;
pub const TYPE_BLOCK: u16 = virtio_ids::VIRTIO_ID_BLOCK as u16;
pub const TYPE_RNG: u16 = virtio_ids::VIRTIO_ID_RNG as u16;
pub const TYPE_SCSI: u16 = virtio_ids::VIRTIO_ID_SCSI as u16;

/// Guest misbehaviour that the device cannot answer on the request
/// itself: the transport sets DEVICE_NEEDS_RESET and stops the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("descriptor chain at head {0} is empty, loops or leaves the table")]
    BadChain(u16),
    #[error("descriptor chain at head {0} has a device-readable buffer after a writable one")]
    BadOrder(u16),
    #[error("descriptor chain at head {0} has no room for the status byte")]
    NoStatus(u16),
}

/// A request's buffers do not hold what it needs, or lie outside guest
/// memory: the device fails that request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("descriptor chain too short, or a buffer outside guest memory")]
pub struct BufferError;

/// A device model behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// Device-specific feature bits (the transport adds its own).
    fn features(&self) -> u64;
    /// Largest size of each queue (powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific configuration space, as bytes.
    fn config(&self) -> &[u8] {
        &[]
    }
    /// Reads the configuration space; what lies past its end reads as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Serves what the driver made available on queue `index`; returns
    /// how many chains it put in the used ring.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, VirtioError>;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The driver set FEATURES_OK having accepted `features`.
    fn features_ok(&mut self, _features: u64) {}
    /// An fd the I/O thread polls for input besides the notifications (a
    /// TAP), and the queue to serve when it is readable.
    fn input_fd(&self) -> Option<(RawFd, usize)> {
        None
    }
    /// Whether to poll `input_fd` now: false while the device has nowhere
    /// to put what it would read.
    fn input_wanted(&self) -> bool {
        false
    }
    /// poll(2) found `input_fd` readable.
    fn input_ready(&mut self) {}
    /// A queue with work the device made for itself (a frame to inject):
    /// the transport serves it right after the current one.
    fn take_pending(&mut self) -> Option<usize> {
        None
    }
}

/// The next chain the driver made available, if any.
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, VirtioError> {
    use virtio_queue::QueueOwnedT;
    Ok(queue.iter(mem)?.next())
}

/// A chain's buffers, split into the device-readable part and the
/// device-writable part, each seen as one byte stream. Reused from request
/// to request: no allocation once warm.
#[derive(Default)]
pub struct ChainBuffers {
    pub head: u16,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    pub readable_len: u64,
    pub writable_len: u64,
}

impl ChainBuffers {
    /// Walks `chain` (following an indirect table). A chain that runs
    /// into the descriptor limit with NEXT still set loops (or leaves its
    /// table): an error, as is a readable buffer after a writable one.
    pub fn load(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<(), VirtioError> {
        let head = chain.head_index();
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        let mut last: Option<Descriptor> = None;
        for d in chain {
            if d.is_write_only() {
                self.writable.push((d.addr().0, d.len()));
                self.writable_len += u64::from(d.len());
            } else {
                if !self.writable.is_empty() {
                    return Err(VirtioError::BadOrder(head));
                }
                self.readable.push((d.addr().0, d.len()));
                self.readable_len += u64::from(d.len());
            }
            last = Some(d);
        }
        match last {
            Some(d) if !d.has_next() => Ok(()),
            _ => Err(VirtioError::BadChain(head)),
        }
    }

    /// The device-readable buffers: (guest address, length).
    pub fn readable(&self) -> &[(u64, u32)] {
        &self.readable
    }

    /// The device-writable buffers: (guest address, length).
    pub fn writable(&self) -> &[(u64, u32)] {
        &self.writable
    }

    /// Copies readable bytes from `skip` on into `buf`; fails when the
    /// chain is too short or a buffer lies outside guest memory.
    pub fn read(
        &self,
        mem: &GuestMemoryMmap,
        skip: u64,
        buf: &mut [u8],
    ) -> Result<(), BufferError> {
        copy(&self.readable, skip, buf.len(), |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], GuestAddress(addr))
                .map_err(|_| BufferError)
        })
    }

    /// Copies `buf` into the writable bytes from `skip` on.
    pub fn write(&self, mem: &GuestMemoryMmap, skip: u64, buf: &[u8]) -> Result<(), BufferError> {
        copy(&self.writable, skip, buf.len(), |addr, at, n| {
            mem.write_slice(&buf[at..at + n], GuestAddress(addr))
                .map_err(|_| BufferError)
        })
    }
}

/// Walks `segs` from byte `skip` for `len` bytes, calling
/// `f(guest address, offset into the caller's buffer, length)` per piece.
fn copy(
    segs: &[(u64, u32)],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), BufferError>,
) -> Result<(), BufferError> {
    let mut done = 0usize;
    for &(addr, seg_len) in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg_len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(len - done);
        let a = addr.checked_add(skip).ok_or(BufferError)?;
        f(a, done, n)?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(BufferError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_walks_segments() {
        let segs = [(0x1000, 4), (0x2000, 8), (0x3000, 2)];
        let mut got = Vec::new();
        copy(&segs, 2, 9, |a, at, n| {
            got.push((a, at, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(0x1002, 0, 2), (0x2000, 2, 7)]);
        assert!(copy(&segs, 10, 10, |_, _, _| Ok(())).is_err());
        assert!(copy(&segs, 0, 14, |_, _, _| Ok(())).is_ok());
    }
}
