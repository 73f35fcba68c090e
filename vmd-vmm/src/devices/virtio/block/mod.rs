//! virtio-blk (virtio 1.2, 5.2): one request queue over a
//! [`vmd_disk::Disk`] (raw or qcow2).
//!
//! Requests: IN, OUT, FLUSH (the image's flush: metadata, then
//! fdatasync), GET_ID, DISCARD and WRITE_ZEROES (both end in the image's
//! hole punching). A read-only disk advertises VIRTIO_BLK_F_RO and fails
//! writes with IOERR. Every request's sectors are checked against the
//! capacity and every buffer against guest memory; a bad request gets
//! IOERR (or UNSUPP), and only a chain without a usable status byte (or
//! a malformed one) makes the transport ask for a device reset. Data goes
//! through one bounce buffer allocated once.

use virtio_bindings::virtio_blk;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmd_disk::Disk;
use vmd_proto::stats::{self, SharedCounters};

use crate::devices::virtio::{next_chain, ChainBuffers, VirtioDevice, VirtioError, TYPE_BLOCK};

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Bounce buffer: requests larger than this are served in pieces.
const BOUNCE: usize = 128 << 10;

// Feature bits (5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << virtio_blk::VIRTIO_BLK_F_SEG_MAX;
pub const VIRTIO_BLK_F_RO: u64 = 1 << virtio_blk::VIRTIO_BLK_F_RO;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << virtio_blk::VIRTIO_BLK_F_FLUSH;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << virtio_blk::VIRTIO_BLK_F_DISCARD;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;

// Request types and status values (5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
pub const VIRTIO_BLK_T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
pub const VIRTIO_BLK_T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
pub const VIRTIO_BLK_T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
pub const VIRTIO_BLK_T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
pub const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
pub const VIRTIO_BLK_ID_BYTES: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
const WRITE_ZEROES_FLAG_UNMAP: u32 = virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Limits advertised for DISCARD and WRITE_ZEROES.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 8;
const HEADER: u64 = 16;
const SEGMENT: u64 = 16;

pub struct VirtioBlk {
    disk: Box<dyn Disk>,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    read_only: bool,
    config: [u8; 60],
    bufs: ChainBuffers,
    bounce: Vec<u8>,
    /// Requests and bytes served, for the parent's metrics.
    counters: Option<SharedCounters>,
}

/// `vmd-<vm>-<n>`, cut to the 20 bytes GET_ID returns (the VM name is
/// shortened first, so the disk number survives).
pub fn serial(vm: &str, index: usize) -> [u8; VIRTIO_BLK_ID_BYTES] {
    let tail = format!("-{index}");
    let room = VIRTIO_BLK_ID_BYTES - "vmd-".len() - tail.len();
    let mut name: String = vm.chars().filter(|c| c.is_ascii_graphic()).collect();
    while name.len() > room {
        name.pop();
    }
    let s = format!("vmd-{name}{tail}");
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    let n = s.len().min(id.len());
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

impl VirtioBlk {
    pub fn new(disk: Box<dyn Disk>, id: [u8; VIRTIO_BLK_ID_BYTES], read_only: bool) -> VirtioBlk {
        let read_only = read_only || disk.read_only();
        let capacity = disk.size() / SECTOR;
        let mut config = [0u8; 60];
        let mut put = |at: usize, v: &[u8]| config[at..at + v.len()].copy_from_slice(v);
        put(0, &capacity.to_le_bytes());
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        VirtioBlk {
            disk,
            id,
            read_only,
            config,
            bufs: ChainBuffers::default(),
            bounce: vec![0; BOUNCE],
            counters: None,
        }
    }

    /// Counts the requests served in `counters` (the parent's metrics).
    pub fn with_counters(mut self, counters: Option<SharedCounters>) -> VirtioBlk {
        self.counters = counters;
        self
    }

    fn count(&self, requests: usize, bytes: usize, n: u64) {
        if let Some(c) = &self.counters {
            c.add(requests, 1);
            c.add(bytes, n);
        }
    }

    fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR
    }

    /// Byte offset of `len` bytes at `sector`, if inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        let end = off.checked_add(len)?;
        (end <= self.capacity() * SECTOR).then_some(off)
    }

    /// Serves the loaded chain: (status, bytes written before the status).
    fn execute(&mut self, mem: &GuestMemoryMmap) -> (u8, u64) {
        let mut hdr = [0u8; HEADER as usize];
        if self.bufs.read(mem, 0, &mut hdr).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let in_len = self.bufs.writable_len - 1;
        let out_len = self.bufs.readable_len - HEADER;
        match ty {
            VIRTIO_BLK_T_IN => {
                let (status, done) = self.read(mem, sector, in_len);
                if status == VIRTIO_BLK_S_OK {
                    self.count(stats::DISK_READ_REQUESTS, stats::DISK_READ_BYTES, done);
                }
                (status, done)
            }
            VIRTIO_BLK_T_OUT if self.read_only => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT => {
                let status = self.write(mem, sector, out_len);
                if status == VIRTIO_BLK_S_OK {
                    self.count(stats::DISK_WRITE_REQUESTS, stats::DISK_WRITE_BYTES, out_len);
                }
                (status, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = (in_len as usize).min(VIRTIO_BLK_ID_BYTES);
                match self.bufs.write(mem, 0, &self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u64),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.read_only => {
                (VIRTIO_BLK_S_IOERR, 0)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                (self.discard(mem, ty == VIRTIO_BLK_T_DISCARD, out_len), 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn read(&mut self, mem: &GuestMemoryMmap, sector: u64, len: u64) -> (u8, u64) {
        let Some(off) = self
            .range(sector, len)
            .filter(|_| len.is_multiple_of(SECTOR))
        else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(self.bounce.len());
            let buf = &mut self.bounce[..n];
            if let Err(e) = self.disk.read_at(buf, off + done) {
                log::warn!("virtio-blk: read at {}: {e}", off + done);
                return (VIRTIO_BLK_S_IOERR, done);
            }
            if self.bufs.write(mem, done, buf).is_err() {
                return (VIRTIO_BLK_S_IOERR, done);
            }
            done += n as u64;
        }
        (VIRTIO_BLK_S_OK, done)
    }

    fn write(&mut self, mem: &GuestMemoryMmap, sector: u64, len: u64) -> u8 {
        let Some(off) = self
            .range(sector, len)
            .filter(|_| len.is_multiple_of(SECTOR))
        else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(self.bounce.len());
            let buf = &mut self.bounce[..n];
            if self.bufs.read(mem, HEADER + done, buf).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            if let Err(e) = self.disk.write_at(buf, off + done) {
                log::warn!("virtio-blk: write at {}: {e}", off + done);
                return VIRTIO_BLK_S_IOERR;
            }
            done += n as u64;
        }
        VIRTIO_BLK_S_OK
    }

    fn discard(&mut self, mem: &GuestMemoryMmap, discard: bool, len: u64) -> u8 {
        let count = len / SEGMENT;
        if count == 0 || count > u64::from(MAX_DISCARD_SEG) || !len.is_multiple_of(SEGMENT) {
            return VIRTIO_BLK_S_IOERR;
        }
        for i in 0..count {
            let mut seg = [0u8; SEGMENT as usize];
            if self.bufs.read(mem, HEADER + i * SEGMENT, &mut seg).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            let mut s8 = [0u8; 8];
            s8.copy_from_slice(&seg[..8]);
            let sector = u64::from_le_bytes(s8);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Unknown flags, and unmap on a discard, are unsupported.
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
                return VIRTIO_BLK_S_UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let bytes = u64::from(sectors) * SECTOR;
            let Some(off) = self.range(sector, bytes) else {
                return VIRTIO_BLK_S_IOERR;
            };
            let r = if discard {
                self.disk.discard(off, bytes)
            } else {
                self.disk.write_zeroes(off, bytes)
            };
            if let Err(e) = r {
                log::warn!("virtio-blk: discard/write-zeroes at {off}+{bytes}: {e}");
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let base = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            base | VIRTIO_BLK_F_RO
        } else {
            base | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, VirtioError> {
        let mut used = 0;
        while let Some(chain) = next_chain(queue, mem)? {
            self.bufs.load(chain)?;
            let head = self.bufs.head;
            if self.bufs.writable_len == 0 || self.bufs.readable_len < HEADER {
                return Err(VirtioError::NoStatus(head));
            }
            let (status, written) = self.execute(mem);
            // The status byte goes last, after the data.
            if self
                .bufs
                .write(mem, self.bufs.writable_len - 1, &[status])
                .is_err()
            {
                return Err(VirtioError::NoStatus(head));
            }
            queue.add_used(mem, head, (written + 1) as u32)?;
            used += 1;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials() {
        assert_eq!(&serial("web", 0)[..9], b"vmd-web-0");
        assert_eq!(serial("web", 0)[9], 0);
        let long = serial("a-very-long-virtual-machine-name", 3);
        assert_eq!(&long, b"vmd-a-very-long-vi-3");
    }
}
