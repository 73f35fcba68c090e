//! The qcow2 header (big-endian, at offset 0) and its extensions.
//!
//! Layout: magic, version, backing_file_offset(u64), backing_file_size,
//! cluster_bits, size(u64), crypt_method, l1_size, l1_table_offset(u64),
//! refcount_table_offset(u64), refcount_table_clusters, nb_snapshots,
//! snapshots_offset(u64) = 72 bytes for v2; v3 adds incompatible,
//! compatible and autoclear feature masks (u64 each), refcount_order,
//! header_length and (if header_length > 104) a compression type byte.
//! Extensions (type u32, length u32, data padded to 8) follow the header
//! up to the end of cluster 0; type 0 ends them.

use std::fs::File;

use super::super::{file_len, pread_zero_tail, Format, ImageError};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header we write: v3 plus the compression type byte, padded to 8.
pub const V3_HEADER_LEN: u32 = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_BACKING_NAME: u32 = 1023;
/// Same bounds qemu uses, so every image qemu makes opens here and a hostile
/// header cannot make us allocate gigabytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// (feature type 0/1/2, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(msg: String) -> ImageError {
    ImageError::Corrupt(msg)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads and validates the header of an open image, refusing what we
    /// cannot handle with a message that names the feature.
    pub fn read(file: &File) -> Result<Header, ImageError> {
        let flen = file_len(file)?;
        let mut b = vec![0u8; 4096];
        pread_zero_tail(file, &mut b, 0, "qcow2 header")?;
        if b[0..4] != MAGIC {
            return Err(corrupt("no qcow2 magic".into()));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(ImageError::Unsupported(format!(
                "qcow2 version {version} (only 2 and 3)"
            )));
        }
        let cluster_bits = be32(&b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(ImageError::Unsupported(format!(
                "cluster_bits {cluster_bits} (must be {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits,
            size: be64(&b, 24),
            crypt_method: be32(&b, 32),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
        };
        let cs = h.cluster_size();
        if version == 3 {
            h.incompatible_features = be64(&b, 72);
            h.compatible_features = be64(&b, 80);
            h.autoclear_features = be64(&b, 88);
            h.refcount_order = be32(&b, 96);
            h.header_length = be32(&b, 100);
            if h.header_length < V3_MIN_HEADER_LEN
                || u64::from(h.header_length) > cs
                || !h.header_length.is_multiple_of(8)
            {
                return Err(corrupt(format!(
                    "header_length {} is invalid",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = b[104];
            }
        }
        // Cluster 0 holds the header, extensions and backing name; read it
        // whole now that we know its size.
        if cs as usize > b.len() {
            b.resize(cs as usize, 0);
            pread_zero_tail(file, &mut b, 0, "qcow2 header cluster")?;
        }
        b.truncate(cs as usize);
        h.parse_extensions(&b)?;
        h.check_features()?;
        h.validate(flen)?;
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset;
            let len = u64::from(h.backing_file_size);
            if len == 0 || len > u64::from(MAX_BACKING_NAME) || off.saturating_add(len) > cs {
                return Err(corrupt(format!(
                    "backing file name ({len} bytes at {off}) is not inside the header cluster"
                )));
            }
            let name = &b[off as usize..(off + len) as usize];
            let name = std::str::from_utf8(name)
                .map_err(|_| corrupt("backing file name is not UTF-8".into()))?;
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, b: &[u8]) -> Result<(), ImageError> {
        let mut at = self.header_length as usize;
        // Each extension needs at least its 8-byte type/length pair.
        while at + 8 <= b.len() {
            let ty = be32(b, at);
            let len = be32(b, at + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_at = at + 8;
            let end = data_at
                .checked_add(len)
                .filter(|&e| e <= b.len())
                .ok_or_else(|| {
                    corrupt(format!(
                        "header extension {ty:#x} at {at} ({len} bytes) overruns cluster 0"
                    ))
                })?;
            let data = &b[data_at..end];
            match ty {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| corrupt("backing format name is not UTF-8".into()))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|&c| c == 0).next().unwrap_or(&[]);
                        self.feature_names.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                // Bitmaps, encryption, data file name and unknown ones: the
                // features that need them are refused via the header fields.
                _ => {}
            }
            at = end.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn feature_name(&self, ty: u8, bit: u32) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == ty && u32::from(*b) == bit)
            .map(|(_, _, n)| format!(" ({n})"))
            .unwrap_or_default()
    }

    fn check_features(&self) -> Result<(), ImageError> {
        if self.crypt_method != 0 {
            return Err(ImageError::Unsupported(format!(
                "encrypted image (crypt_method {}); decrypt it with qemu-img convert first",
                self.crypt_method
            )));
        }
        if self.refcount_order != 4 {
            return Err(ImageError::Unsupported(format!(
                "refcount_order {} ({}-bit refcounts); only 16-bit refcounts (order 4) are \
                 supported: convert with qemu-img amend -o refcount_bits=16",
                self.refcount_order,
                1u64.checked_shl(self.refcount_order).unwrap_or(0)
            )));
        }
        let inc = self.incompatible_features;
        if inc & INCOMPAT_DIRTY != 0 {
            return Err(ImageError::Unsupported(
                "image is marked dirty (lazy refcounts not written back); repair it with \
                 `qemu-img check -r all`"
                    .into(),
            ));
        }
        if inc & INCOMPAT_CORRUPT != 0 {
            return Err(ImageError::Unsupported(
                "image is marked corrupt; repair it with `qemu-img check -r all`".into(),
            ));
        }
        if inc & INCOMPAT_DATA_FILE != 0 {
            return Err(ImageError::Unsupported("external data file".into()));
        }
        if inc & INCOMPAT_EXTL2 != 0 {
            return Err(ImageError::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if inc & INCOMPAT_COMPRESSION != 0 && self.compression_type != 0 {
            return Err(ImageError::Unsupported(format!(
                "compression type {} (only zlib)",
                self.compression_type
            )));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = inc & !known;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            return Err(ImageError::Unsupported(format!(
                "unknown incompatible feature bit {bit}{} (features {inc:#x})",
                self.feature_name(0, bit)
            )));
        }
        if self.compression_type != 0 {
            return Err(ImageError::Unsupported(format!(
                "compression type {} (only zlib)",
                self.compression_type
            )));
        }
        Ok(())
    }

    fn validate(&self, flen: u64) -> Result<(), ImageError> {
        let cs = self.cluster_size();
        let entries_per_l2 = cs / 8;
        // Guest bytes one L1 entry maps.
        let l1_span = cs * entries_per_l2;
        let need_l1 = self.size.div_ceil(l1_span);
        if u64::from(self.l1_size) < need_l1 {
            return Err(corrupt(format!(
                "L1 table has {} entries but size {} needs {need_l1}",
                self.l1_size, self.size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(ImageError::Unsupported(format!(
                "L1 table of {l1_bytes} bytes (more than {MAX_L1_BYTES})"
            )));
        }
        check_table(
            "L1 table",
            self.l1_table_offset,
            l1_bytes,
            cs,
            flen,
            self.l1_size > 0,
        )?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters",
                self.refcount_table_clusters
            )));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            flen,
            true,
        )?;
        if self.nb_snapshots > 0 && !self.snapshots_offset.is_multiple_of(cs) {
            return Err(corrupt(format!(
                "snapshot table offset {:#x} not cluster-aligned",
                self.snapshots_offset
            )));
        }
        Ok(())
    }

    /// The backing format named by the header extension, if any.
    pub fn backing_format_parsed(&self) -> Result<Option<Format>, ImageError> {
        match &self.backing_format {
            None => Ok(None),
            Some(s) => Format::from_name(s).map(Some).ok_or_else(|| {
                ImageError::Unsupported(format!("backing file format {s:?} (only raw and qcow2)"))
            }),
        }
    }
}

/// A metadata table must be cluster-aligned and lie inside the file.
fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cs: u64,
    flen: u64,
    required: bool,
) -> Result<(), ImageError> {
    if !required {
        return Ok(());
    }
    if offset == 0 || !offset.is_multiple_of(cs) {
        return Err(corrupt(format!(
            "{what} offset {offset:#x} is not a valid cluster"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= flen => Ok(()),
        _ => Err(corrupt(format!(
            "{what} ({len} bytes at {offset:#x}) extends past the end of the file ({flen} bytes)"
        ))),
    }
}

/// Serializes a fresh v3 header cluster (header, backing format extension,
/// end marker, backing name) for `create`.
pub fn build_v3_cluster(h: &Header) -> Vec<u8> {
    let cs = h.cluster_size() as usize;
    let mut b = vec![0u8; cs];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    b[0..4].copy_from_slice(&MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, h.cluster_bits);
    put64(&mut b, 24, h.size);
    put32(&mut b, 32, 0);
    put32(&mut b, 36, h.l1_size);
    put64(&mut b, 40, h.l1_table_offset);
    put64(&mut b, 48, h.refcount_table_offset);
    put32(&mut b, 56, h.refcount_table_clusters);
    put32(&mut b, 60, 0);
    put64(&mut b, 64, 0);
    put64(&mut b, 72, 0);
    put64(&mut b, 80, 0);
    put64(&mut b, 88, 0);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, V3_HEADER_LEN);
    // b[104] = compression type zlib (0), then padding.
    let mut at = V3_HEADER_LEN as usize;
    if let Some(fmt) = &h.backing_format {
        put32(&mut b, at, EXT_BACKING_FORMAT);
        put32(&mut b, at + 4, fmt.len() as u32);
        b[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
        at += 8 + fmt.len().div_ceil(8) * 8;
    }
    // End-of-extensions marker (8 zero bytes, already zero).
    at += 8;
    if let Some(name) = &h.backing_file {
        b[at..at + name.len()].copy_from_slice(name.as_bytes());
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, name.len() as u32);
    }
    b
}
