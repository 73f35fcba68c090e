//! qcow2 images, versions 2 and 3.
//!
//! Guest offset -> L1 index (high bits) -> L2 table (one cluster of u64
//! entries) -> host cluster. Entries are big-endian; bits 9..55 hold the
//! host offset, bit 63 ("copied") says the refcount is exactly 1, bit 62
//! marks a compressed cluster and, in v3, bit 0 a cluster that reads as
//! zeroes. Unallocated clusters read from the backing file, or as zeroes.
//!
//! Writes go: data, then refcounts, then L2, then L1, each written through,
//! so a crash leaves at worst leaked clusters; `flush` adds the fdatasync.

pub mod header;
mod l2cache;
mod refcount;

use std::fs::File;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::{check_range, file_len, pread_zero_tail, pwrite_all, Disk, ImageError};
use header::Header;
use l2cache::L2Cache;
use refcount::Refcounts;

/// Host offset bits of L1/L2 entries and refcount table entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
/// Bits that must be clear in an L1 entry.
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Bits that must be clear in a standard (uncompressed) L2 entry.
const L2_RESERVED: u64 = !(OFFSET_MASK | COPIED | ZERO);

/// L2 tables kept in memory; 32 tables of 64 KiB map 16 GiB of guest disk.
const L2_CACHE_TABLES: usize = 32;

/// Where a guest cluster's data comes from.
#[derive(Debug, Clone, Copy)]
enum Mapping {
    /// Read the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes (v3 zero flag); `host` is a still-allocated cluster.
    Zero {
        host: Option<u64>,
    },
    Data {
        host: u64,
        copied: bool,
    },
    /// Compressed data: byte offset, and the 512-byte sectors it spans.
    Compressed {
        offset: u64,
        sectors: u64,
    },
}

pub struct Qcow2Disk {
    file: File,
    version: u32,
    cluster_bits: u32,
    size: u64,
    read_only: bool,
    l1_offset: u64,
    l1: Vec<u64>,
    l2: L2Cache,
    rc: Refcounts,
    backing: Option<Box<dyn Disk>>,
    /// Current file length: offsets past it are refused as metadata.
    flen: u64,
    /// Last decompressed cluster, keyed by its L2 entry.
    inflated: Option<(u64, Vec<u8>)>,
}

fn corrupt(msg: String) -> ImageError {
    ImageError::Corrupt(msg)
}

impl Qcow2Disk {
    /// Opens an image whose header was read with [`Header::read`];
    /// `backing` is the already opened disk below it, if the header names one.
    pub fn open(
        file: File,
        h: Header,
        backing: Option<Box<dyn Disk>>,
        read_only: bool,
    ) -> Result<Self, ImageError> {
        if h.backing_file.is_some() != backing.is_some() {
            return Err(ImageError::Backing(format!(
                "image {} a backing file but {} was given",
                if h.backing_file.is_some() {
                    "names"
                } else {
                    "has no"
                },
                if backing.is_some() { "one" } else { "none" }
            )));
        }
        if h.nb_snapshots > 0 && !read_only {
            return Err(ImageError::Unsupported(format!(
                "image has {} internal snapshot(s); open it read-only or delete them with \
                 `qemu-img snapshot -d`",
                h.nb_snapshots
            )));
        }
        let flen = file_len(&file)?;
        let mut raw = vec![0u8; h.l1_size as usize * 8];
        pread_zero_tail(&file, &mut raw, h.l1_table_offset, "L1 table")?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let rc = Refcounts::load(&file, &h, flen)?;
        if !read_only && h.autoclear_features != 0 {
            // We do not maintain what autoclear features describe (dirty
            // bitmaps), so the spec says a writer clears them.
            pwrite_all(&file, &0u64.to_be_bytes(), 88, "autoclear features")?;
        }
        Ok(Qcow2Disk {
            file,
            version: h.version,
            cluster_bits: h.cluster_bits,
            size: h.size,
            read_only,
            l1_offset: h.l1_table_offset,
            l1,
            l2: L2Cache::new(L2_CACHE_TABLES),
            rc,
            backing,
            flen,
            inflated: None,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    /// L1 index and L2 index of a guest offset.
    fn indices(&self, guest: u64) -> (usize, usize) {
        let l2 = (guest >> self.cluster_bits) & ((1 << self.l2_bits()) - 1);
        let l1 = guest >> (self.cluster_bits + self.l2_bits());
        (l1 as usize, l2 as usize)
    }

    /// The L2 table offset for `l1_index`, or None when unallocated.
    fn l2_offset(&self, l1_index: usize) -> Result<Option<(u64, bool)>, ImageError> {
        let e = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| corrupt(format!("L1 index {l1_index} beyond the L1 table")))?;
        if e & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {l1_index} ({e:#x}) has reserved bits set"
            )));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || off.saturating_add(self.cs()) > self.flen {
            return Err(corrupt(format!(
                "L1 entry {l1_index}: L2 table at {off:#x} is unaligned or past the end of the file"
            )));
        }
        Ok(Some((off, e & COPIED != 0)))
    }

    fn l2_entry(&mut self, l2_off: u64, index: usize) -> Result<u64, ImageError> {
        if let Some(t) = self.l2.get(l2_off) {
            return t
                .get(index)
                .copied()
                .ok_or_else(|| corrupt(format!("L2 index {index} out of range")));
        }
        let mut raw = vec![0u8; self.cs() as usize];
        pread_zero_tail(&self.file, &mut raw, l2_off, "L2 table")?;
        let table: Box<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let e = table
            .get(index)
            .copied()
            .ok_or_else(|| corrupt(format!("L2 index {index} out of range")))?;
        self.l2.insert(l2_off, table);
        Ok(e)
    }

    /// Writes one L2 entry through to the file, then to the cache.
    fn set_l2_entry(&mut self, l2_off: u64, index: usize, value: u64) -> Result<(), ImageError> {
        pwrite_all(
            &self.file,
            &value.to_be_bytes(),
            l2_off + index as u64 * 8,
            "L2 entry",
        )?;
        if let Some(t) = self.l2.get(l2_off) {
            if let Some(slot) = t.get_mut(index) {
                *slot = value;
            }
        }
        Ok(())
    }

    fn decode(&self, e: u64) -> Result<Mapping, ImageError> {
        if e & COMPRESSED != 0 {
            // Offset in the low (62 - (cluster_bits - 8)) bits, then the
            // count of 512-byte sectors after the first.
            let shift = 62 - (self.cluster_bits - 8);
            let offset = e & ((1u64 << shift) - 1);
            let sectors = ((e >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            return Ok(Mapping::Compressed { offset, sectors });
        }
        if e & L2_RESERVED != 0 {
            return Err(corrupt(format!("L2 entry {e:#x} has reserved bits set")));
        }
        let host = e & OFFSET_MASK;
        if e & ZERO != 0 {
            if self.version < 3 {
                return Err(corrupt(format!(
                    "L2 entry {e:#x}: zero flag in a version 2 image"
                )));
            }
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host,
            copied: e & COPIED != 0,
        })
    }

    /// Mapping of the cluster holding `guest`.
    fn lookup(&mut self, guest: u64) -> Result<Mapping, ImageError> {
        let (l1i, l2i) = self.indices(guest);
        match self.l2_offset(l1i)? {
            None => Ok(Mapping::Unallocated),
            Some((l2_off, _)) => {
                let e = self.l2_entry(l2_off, l2i)?;
                self.decode(e)
            }
        }
    }

    fn read_backing(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        // A backing file may be smaller than the overlay: the rest is zero.
        let bsize = b.size();
        let n = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Decompresses a cluster into the one-entry cache.
    fn inflate(&mut self, offset: u64, sectors: u64) -> Result<&[u8], ImageError> {
        let key = offset ^ (sectors << 56);
        if self.inflated.as_ref().map(|x| x.0) != Some(key) {
            let len = (sectors * 512 - (offset & 511)).min(self.flen.saturating_sub(offset));
            if offset >= self.flen || len == 0 {
                return Err(corrupt(format!(
                    "compressed cluster at {offset:#x} is past the end of the file"
                )));
            }
            let mut input = vec![0u8; len as usize];
            pread_zero_tail(&self.file, &mut input, offset, "compressed cluster")?;
            let mut out = vec![0u8; self.cs() as usize];
            // Raw deflate (no zlib header), as qcow2 stores it.
            let mut d = DecompressorOxide::new();
            let (status, _, produced) = decompress(
                &mut d,
                &input,
                &mut out,
                0,
                inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
            );
            let ok = matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput);
            if !ok || produced != out.len() {
                return Err(corrupt(format!(
                    "compressed cluster at {offset:#x} does not inflate to a cluster \
                     ({status:?}, {produced} bytes)"
                )));
            }
            self.inflated = Some((key, out));
        }
        match &self.inflated {
            Some((_, d)) => Ok(d),
            None => Err(corrupt("decompression cache lost".into())),
        }
    }

    /// Reads within one cluster.
    fn read_chunk(&mut self, buf: &mut [u8], guest: u64) -> Result<(), ImageError> {
        let within = (guest & (self.cs() - 1)) as usize;
        match self.lookup(guest)? {
            Mapping::Unallocated => self.read_backing(buf, guest),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                if host >= self.flen {
                    return Err(corrupt(format!(
                        "data cluster at {host:#x} (guest {guest:#x}) is past the end of the file"
                    )));
                }
                pread_zero_tail(&self.file, buf, host + within as u64, "data cluster")
            }
            Mapping::Compressed { offset, sectors } => {
                let data = self.inflate(offset, sectors)?;
                buf.copy_from_slice(&data[within..within + buf.len()]);
                Ok(())
            }
        }
    }

    /// The L2 table for `guest`, allocating a zeroed one if needed.
    fn l2_for_write(&mut self, guest: u64) -> Result<(u64, usize), ImageError> {
        let (l1i, l2i) = self.indices(guest);
        match self.l2_offset(l1i)? {
            Some((off, true)) => Ok((off, l2i)),
            Some((off, false)) => Err(ImageError::Unsupported(format!(
                "L2 table at {off:#x} is shared (snapshot); cannot write in place"
            ))),
            None => {
                let off = self.rc.alloc(&self.file)?;
                pwrite_all(
                    &self.file,
                    &vec![0u8; self.cs() as usize],
                    off,
                    "new L2 table",
                )?;
                self.flen = self.flen.max(off + self.cs());
                let e = off | COPIED;
                pwrite_all(
                    &self.file,
                    &e.to_be_bytes(),
                    self.l1_offset + l1i as u64 * 8,
                    "L1 entry",
                )?;
                self.l1[l1i] = e;
                self.l2
                    .insert(off, vec![0u64; 1 << self.l2_bits()].into_boxed_slice());
                Ok((off, l2i))
            }
        }
    }

    /// Drops the host clusters a mapping held (after the L2 no longer
    /// points at them).
    fn release(&mut self, m: Mapping) -> Result<(), ImageError> {
        match m {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                self.rc.free(&self.file, host, self.cs())
            }
            Mapping::Compressed { offset, sectors } => {
                self.inflated = None;
                self.rc.free(&self.file, offset & !511, sectors * 512)
            }
            _ => Ok(()),
        }
    }

    /// Writes within one cluster.
    fn write_chunk(&mut self, data: &[u8], guest: u64) -> Result<(), ImageError> {
        let cs = self.cs();
        let within = (guest & (cs - 1)) as usize;
        let cluster_start = guest - within as u64;
        let (l2_off, l2i) = self.l2_for_write(guest)?;
        let entry = self.l2_entry(l2_off, l2i)?;
        let old = self.decode(entry)?;
        if let Mapping::Data { host, copied: true } = old {
            if host >= self.flen {
                return Err(corrupt(format!(
                    "data cluster at {host:#x} (guest {guest:#x}) is past the end of the file"
                )));
            }
            // Sole owner: overwrite in place.
            return pwrite_all(&self.file, data, host + within as u64, "data cluster");
        }
        // Everything else gets a fresh cluster holding the old contents
        // merged with the new bytes.
        let mut cluster = vec![0u8; cs as usize];
        if data.len() as u64 != cs {
            match old {
                Mapping::Unallocated => self.read_backing(&mut cluster, cluster_start)?,
                Mapping::Zero { .. } => {}
                Mapping::Data { host, .. } => {
                    pread_zero_tail(&self.file, &mut cluster, host, "shared data cluster")?
                }
                Mapping::Compressed { offset, sectors } => {
                    let d = self.inflate(offset, sectors)?;
                    cluster.copy_from_slice(d);
                }
            }
        }
        cluster[within..within + data.len()].copy_from_slice(data);
        let host = self.rc.alloc(&self.file)?;
        pwrite_all(&self.file, &cluster, host, "new data cluster")?;
        self.flen = self.flen.max(host + cs);
        self.set_l2_entry(l2_off, l2i, host | COPIED)?;
        self.release(old)
    }

    /// Makes one whole cluster read as zeroes; `discard` allows leaving old
    /// data where zero cannot be expressed (v2 with a backing file).
    fn zero_cluster(&mut self, guest: u64, discard: bool) -> Result<(), ImageError> {
        let has_backing = self.backing.is_some();
        let (l1i, l2i) = self.indices(guest);
        let slot = self.l2_offset(l1i)?;
        if slot.is_none() && !has_backing {
            return Ok(());
        }
        // Without a backing file an unallocated entry already reads zero.
        let target = if has_backing { ZERO } else { 0 };
        if has_backing && self.version < 3 {
            if discard {
                return Ok(());
            }
            let zeroes = vec![0u8; self.cs() as usize];
            return self.write_chunk(&zeroes, guest);
        }
        let (l2_off, l2i) = match slot {
            Some((off, true)) => (off, l2i),
            _ => self.l2_for_write(guest)?,
        };
        let entry = self.l2_entry(l2_off, l2i)?;
        if entry == target {
            return Ok(());
        }
        let old = self.decode(entry)?;
        self.set_l2_entry(l2_off, l2i, target)?;
        self.release(old)
    }

    fn zero_range(&mut self, offset: u64, len: u64, discard: bool) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let cs = self.cs();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster_end = (pos | (cs - 1)).saturating_add(1);
            let n = cluster_end.min(end) - pos;
            // The last cluster of a disk whose size is not cluster-aligned
            // counts as whole when the range reaches the disk's end.
            let whole = n == cs || (pos.is_multiple_of(cs) && pos + n == self.size);
            if whole {
                self.zero_cluster(pos, discard)?;
            } else if !discard {
                let reads_zero = match self.lookup(pos)? {
                    Mapping::Zero { .. } => true,
                    Mapping::Unallocated => self.backing.is_none(),
                    _ => false,
                };
                if !reads_zero {
                    self.write_chunk(&vec![0u8; n as usize], pos)?;
                }
            }
            pos += n;
        }
        Ok(())
    }
}

impl Disk for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            self.read_chunk(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            self.write_chunk(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| ImageError::io("fdatasync of qcow2 image", e))?;
        self.rc.flushed();
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.zero_range(offset, len, false)
    }
}
