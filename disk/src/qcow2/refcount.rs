//! Refcounts: a table of refcount-block offsets, each block a cluster of
//! 16-bit big-endian counts (refcount_order 4), one per host cluster.
//!
//! Everything is written through at once. Allocation order keeps a crash
//! harmless: a cluster's refcount is written before anything points to it,
//! and a freed cluster is only reused after the next flush, so an unflushed
//! L2 update can never leave two users of one cluster.

use std::collections::HashSet;
use std::fs::File;

use super::super::{pread_zero_tail, pwrite_all, ImageError};
use super::header::{Header, MAX_REFTABLE_BYTES};
use super::OFFSET_MASK;

/// Host offsets must fit the 56-bit offset field of L1/L2 entries.
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Header field offsets rewritten when the refcount table moves.
const HDR_REFTABLE_OFFSET: u64 = 48;

pub struct Refcounts {
    cluster_bits: u32,
    /// log2 of refcount entries per block (cluster_size / 2).
    block_bits: u32,
    table: Vec<u64>,
    table_offset: u64,
    /// One decoded block (offset, counts), enough for sequential work.
    block: Option<(u64, Vec<u16>)>,
    /// Lowest cluster index that may be free.
    cursor: u64,
    /// Clusters freed since the last flush; not reused until then.
    quarantine: HashSet<u64>,
    /// First cluster index past the file and everything allocated.
    end: u64,
}

fn corrupt(msg: String) -> ImageError {
    ImageError::Corrupt(msg)
}

fn decode_u64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

impl Refcounts {
    pub fn load(file: &File, h: &Header, flen: u64) -> Result<Self, ImageError> {
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        let mut raw = vec![0u8; bytes as usize];
        pread_zero_tail(file, &mut raw, h.refcount_table_offset, "refcount table")?;
        Ok(Refcounts {
            cluster_bits: h.cluster_bits,
            block_bits: h.cluster_bits - 1,
            table: decode_u64s(&raw),
            table_offset: h.refcount_table_offset,
            block: None,
            cursor: 0,
            quarantine: HashSet::new(),
            end: flen.div_ceil(cs),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The block offset covering refcount table index `ri`, if allocated.
    fn block_offset(&self, ri: u64) -> Result<Option<u64>, ImageError> {
        let Some(&e) = self.table.get(ri as usize) else {
            return Ok(None);
        };
        if e & !OFFSET_MASK != 0 {
            return Err(corrupt(format!(
                "refcount table entry {ri} ({e:#x}) is not a valid cluster offset"
            )));
        }
        Ok((e != 0).then_some(e))
    }

    fn block(&mut self, file: &File, off: u64) -> Result<&mut [u16], ImageError> {
        if self.block.as_ref().map(|b| b.0) != Some(off) {
            let mut raw = vec![0u8; self.cs() as usize];
            pread_zero_tail(file, &mut raw, off, "refcount block")?;
            let counts = raw
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            self.block = Some((off, counts));
        }
        match &mut self.block {
            Some((_, b)) => Ok(b),
            None => Err(corrupt("refcount block cache lost".into())),
        }
    }

    fn split(&self, cluster: u64) -> (u64, usize) {
        (
            cluster >> self.block_bits,
            (cluster & ((1 << self.block_bits) - 1)) as usize,
        )
    }

    pub fn get(&mut self, file: &File, cluster: u64) -> Result<u16, ImageError> {
        let (ri, bi) = self.split(cluster);
        match self.block_offset(ri)? {
            None => Ok(0),
            Some(off) => Ok(self.block(file, off)?[bi]),
        }
    }

    /// Sets a count in an existing block.
    fn set(&mut self, file: &File, cluster: u64, value: u16) -> Result<(), ImageError> {
        let (ri, bi) = self.split(cluster);
        let off = self.block_offset(ri)?.ok_or_else(|| {
            corrupt(format!(
                "no refcount block for cluster {cluster} (internal)"
            ))
        })?;
        pwrite_all(
            file,
            &value.to_be_bytes(),
            off + bi as u64 * 2,
            "refcount entry",
        )?;
        self.block(file, off)?[bi] = value;
        Ok(())
    }

    /// First cluster at or after `from` with refcount 0 that is not
    /// quarantined. Clusters with no refcount block are free.
    fn find_free(&mut self, file: &File, mut from: u64) -> Result<u64, ImageError> {
        let per_block = 1u64 << self.block_bits;
        loop {
            if from << self.cluster_bits >= MAX_HOST_OFFSET {
                return Err(ImageError::Unsupported(
                    "image is full: no host offset left below 2^56".into(),
                ));
            }
            let (ri, bi) = self.split(from);
            let Some(off) = self.block_offset(ri)? else {
                return Ok(from);
            };
            let base = ri * per_block;
            let quarantine = std::mem::take(&mut self.quarantine);
            let found = self.block(file, off).map(|counts| {
                counts[bi..]
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| (base + (bi + i) as u64, n))
                    .find(|(c, n)| *n == 0 && !quarantine.contains(c))
                    .map(|(c, _)| c)
            });
            self.quarantine = quarantine;
            let found = found?;
            if let Some(c) = found {
                return Ok(c);
            }
            from = base + per_block;
        }
    }

    /// Allocates one cluster (refcount 1, written) and returns its offset.
    pub fn alloc(&mut self, file: &File) -> Result<u64, ImageError> {
        loop {
            let c = self.find_free(file, self.cursor)?;
            // Cluster 0 is the header. It is free only in a refcount table
            // that fails to describe it; placing a block there would wipe
            // the header and loop forever (found by the qcow2_open fuzzer).
            if c == 0 {
                return Err(corrupt(
                    "refcount table does not cover the header cluster (cluster 0)".into(),
                ));
            }
            self.cursor = c;
            let (ri, _) = self.split(c);
            if self.block_offset(ri)?.is_none() {
                // The new block describes itself, so it takes cluster c and
                // we look again.
                self.new_block_at(file, c)?;
                continue;
            }
            self.set(file, c, 1)?;
            self.cursor = c + 1;
            self.end = self.end.max(c + 1);
            return Ok(c << self.cluster_bits);
        }
    }

    /// Creates the refcount block covering cluster `c`, placed at `c`.
    fn new_block_at(&mut self, file: &File, c: u64) -> Result<(), ImageError> {
        let (ri, bi) = self.split(c);
        if ri as usize >= self.table.len() {
            self.grow_table(file, ri + 1, c)?;
            // Growing may have created this block or used cluster c.
            return Ok(());
        }
        let cs = self.cs();
        let mut raw = vec![0u8; cs as usize];
        raw[bi * 2..bi * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        let off = c << self.cluster_bits;
        pwrite_all(file, &raw, off, "new refcount block")?;
        pwrite_all(
            file,
            &off.to_be_bytes(),
            self.table_offset + ri * 8,
            "refcount table entry",
        )?;
        self.table[ri as usize] = off;
        self.end = self.end.max(c + 1);
        Ok(())
    }

    /// Moves the refcount table to the end of the file with room for at
    /// least `min_entries` blocks, adding the blocks that describe the new
    /// clusters. The header switches to the new table only once it and its
    /// blocks are on disk; the old table is freed afterwards.
    fn grow_table(
        &mut self,
        file: &File,
        min_entries: u64,
        free_from: u64,
    ) -> Result<(), ImageError> {
        let cs = self.cs();
        let per_block = 1u64 << self.block_bits;
        // Everything from here on is free: past the file, past what we
        // allocated, and at or after the free cluster that needed a block.
        let start = self.end.max(free_from);
        let mut entries = min_entries.max(self.table.len() as u64 * 2);
        let (table_clusters, new_blocks) = loop {
            let tc = (entries * 8).div_ceil(cs);
            if tc * cs > MAX_REFTABLE_BYTES {
                return Err(ImageError::Unsupported(format!(
                    "refcount table would exceed {MAX_REFTABLE_BYTES} bytes"
                )));
            }
            // Blocks needed for [start, start + tc + k): iterate to a fixpoint.
            let mut k = 0u64;
            let blocks = loop {
                let last = start + tc + k;
                let mut need = Vec::new();
                for ri in (start / per_block)..=((last - 1) / per_block) {
                    if self.block_offset(ri)?.is_none() {
                        need.push(ri);
                    }
                }
                if need.len() as u64 == k {
                    break need;
                }
                k = need.len() as u64;
            };
            let last_ri = (start + tc + k - 1) / per_block;
            if last_ri < tc * cs / 8 {
                break (tc, blocks);
            }
            entries = last_ri + 1;
        };
        let table_off = start << self.cluster_bits;
        let used_end = start + table_clusters + new_blocks.len() as u64;
        let mut table = self.table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        for (j, &ri) in new_blocks.iter().enumerate() {
            table[ri as usize] = (start + table_clusters + j as u64) << self.cluster_bits;
        }
        // New blocks: counts for the clusters of [start, used_end) they cover.
        for (j, &ri) in new_blocks.iter().enumerate() {
            let mut raw = vec![0u8; cs as usize];
            for c in start.max(ri * per_block)..used_end.min((ri + 1) * per_block) {
                let bi = (c - ri * per_block) as usize;
                raw[bi * 2..bi * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            let off = (start + table_clusters + j as u64) << self.cluster_bits;
            pwrite_all(file, &raw, off, "new refcount block")?;
        }
        let mut raw = Vec::with_capacity(table.len() * 8);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        pwrite_all(file, &raw, table_off, "new refcount table")?;
        let old_off = self.table_offset;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(cs);
        self.table = table;
        self.table_offset = table_off;
        self.end = self.end.max(used_end);
        // Clusters of the range that fall in blocks that already existed.
        for c in start..used_end {
            let (ri, _) = self.split(c);
            if !new_blocks.contains(&ri) {
                self.set(file, c, 1)?;
            }
        }
        file.sync_data()
            .map_err(|e| ImageError::io("fdatasync before switching refcount table", e))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        pwrite_all(
            file,
            &hdr,
            HDR_REFTABLE_OFFSET,
            "header refcount table fields",
        )?;
        file.sync_data()
            .map_err(|e| ImageError::io("fdatasync after switching refcount table", e))?;
        self.free(file, old_off, old_clusters * cs)?;
        Ok(())
    }

    /// Drops one reference from each cluster overlapping [offset, offset+len).
    pub fn free(&mut self, file: &File, offset: u64, len: u64) -> Result<(), ImageError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| corrupt(format!("freeing {len} bytes at {offset:#x} overflows")))?
            >> self.cluster_bits;
        for c in first..=last {
            let n = self.get(file, c)?;
            if n == 0 {
                return Err(corrupt(format!(
                    "cluster at {:#x} is in use but its refcount is 0",
                    c << self.cluster_bits
                )));
            }
            self.set(file, c, n - 1)?;
            if n == 1 {
                self.quarantine.insert(c);
            }
        }
        Ok(())
    }

    /// After an fdatasync, freed clusters may be reused.
    pub fn flushed(&mut self) {
        if let Some(&min) = self.quarantine.iter().min() {
            self.cursor = self.cursor.min(min);
        }
        self.quarantine.clear();
    }
}
