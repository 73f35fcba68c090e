//! `vmctl create`: new raw or qcow2 images, qcow2 overlays on a base image,
//! and conversion from an input image.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::qcow2::header::{self, Header};
use super::qcow2::Qcow2Disk;
use super::{open_path, pwrite_all, resolve_backing, Disk, Format, ImageError, RawDisk};

/// 64 KiB clusters, as qemu's default.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// What to create; `format` usually comes from [`parse_create_target`].
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub format: Format,
    /// Virtual size in bytes (rounded up to 512). Defaults to the base's or
    /// the input's size.
    pub size: Option<u64>,
    /// Backing image name, stored as given (relative names are relative to
    /// the new image's directory); makes a qcow2 overlay.
    pub base: Option<PathBuf>,
    /// The base's format (`-b raw:`/`qcow2:`); `None`: its name's.
    pub base_format: Option<Format>,
    /// Image to copy the data from.
    pub input: Option<PathBuf>,
    /// The input's format (`-i raw:`/`qcow2:`); `None`: its name's.
    pub input_format: Option<Format>,
    /// qcow2 cluster size as log2 (9..=21).
    pub cluster_bits: u32,
}

impl CreateSpec {
    pub fn new(format: Format) -> Self {
        CreateSpec {
            format,
            size: None,
            base: None,
            base_format: None,
            input: None,
            input_format: None,
            cluster_bits: DEFAULT_CLUSTER_BITS,
        }
    }
}

/// Splits `raw:path` / `qcow2:path`; without a prefix the name decides
/// ([`Format::of_name`]), as OpenBSD's vmctl; the content never does.
pub fn parse_create_target(s: &str) -> (Format, PathBuf) {
    for f in [Format::Raw, Format::Qcow2] {
        if let Some(rest) = s.strip_prefix(f.name()).and_then(|r| r.strip_prefix(':')) {
            return (f, PathBuf::from(rest));
        }
    }
    let path = PathBuf::from(s);
    (Format::of_name(&path), path)
}

/// Creates a new image; never overwrites an existing file.
pub fn create(path: &Path, spec: CreateSpec) -> Result<(), ImageError> {
    if spec.base.is_some() && spec.input.is_some() {
        return Err(ImageError::Invalid(
            "a base image (-b) and an input image (-i) cannot be combined".into(),
        ));
    }
    if spec.base.is_some() && spec.format != Format::Qcow2 {
        return Err(ImageError::Invalid(
            "base images require the qcow2 format (use a qcow2: prefix or .qcow2 name)".into(),
        ));
    }
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&spec.cluster_bits) {
        return Err(ImageError::Invalid(format!(
            "cluster_bits {} out of range",
            spec.cluster_bits
        )));
    }
    let mut backing = None;
    let mut input = None;
    let mut default_size = None;
    if let Some(base) = &spec.base {
        let name = base.to_str().ok_or_else(|| {
            ImageError::Invalid(format!("base name {} is not UTF-8", base.display()))
        })?;
        let real = resolve_backing(path, name);
        // The format the overlay records for its base is the one named or
        // its name's, as a VM start would read it (never its content).
        let fmt = Format::named_or_of(spec.base_format, &real);
        let disk = open_path(&real, true, Some(fmt))?;
        default_size = Some(disk.size());
        backing = Some((name.to_string(), fmt));
    }
    if let Some(inp) = &spec.input {
        let disk = open_path(inp, true, spec.input_format)?;
        default_size = Some(disk.size());
        input = Some(disk);
    }
    let size = match (spec.size, default_size) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => return Err(ImageError::Invalid("missing size (-s)".into())),
    };
    if size == 0 {
        return Err(ImageError::Invalid("size must not be zero".into()));
    }
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| ImageError::Invalid(format!("size {size} too large")))?;
    if let Some(inp) = &input {
        if size < inp.size() {
            return Err(ImageError::Invalid(format!(
                "size {size} is smaller than the input image ({} bytes)",
                inp.size()
            )));
        }
    }
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ImageError::Exists(path.to_path_buf()))
        }
        Err(e) => return Err(ImageError::io(format!("creating {}", path.display()), e)),
    };
    let result = fill(&file, path, &spec, size, backing, input);
    if result.is_err() {
        // Leave nothing half-made behind; the file is ours (O_EXCL).
        let _ = std::fs::remove_file(path);
    }
    result
}

fn fill(
    file: &File,
    path: &Path,
    spec: &CreateSpec,
    size: u64,
    backing: Option<(String, Format)>,
    input: Option<Box<dyn Disk>>,
) -> Result<(), ImageError> {
    let ctx = |e| ImageError::io(format!("writing {}", path.display()), e);
    let mut disk: Box<dyn Disk> = match spec.format {
        Format::Raw => {
            file.set_len(size).map_err(ctx)?;
            Box::new(RawDisk::open(file.try_clone().map_err(ctx)?, false)?)
        }
        Format::Qcow2 => {
            let backing_name = backing.as_ref().map(|b| b.0.clone());
            write_qcow2(file, size, spec.cluster_bits, backing)?;
            if input.is_none() {
                return file.sync_all().map_err(ctx);
            }
            let h = Header::read(file)?;
            debug_assert!(backing_name.is_none());
            Box::new(Qcow2Disk::open(
                file.try_clone().map_err(ctx)?,
                h,
                None,
                false,
            )?)
        }
    };
    if let Some(mut inp) = input {
        copy_data(inp.as_mut(), disk.as_mut())?;
    }
    disk.flush()?;
    file.sync_all().map_err(ctx)
}

/// Copies every non-zero chunk, so the output stays sparse.
fn copy_data(from: &mut dyn Disk, to: &mut dyn Disk) -> Result<(), ImageError> {
    const CHUNK: u64 = 64 << 10;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    let end = from.size();
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        from.read_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            to.write_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// Writes an empty qcow2 v3 image: header cluster, refcount table,
/// refcount blocks for the metadata, and a zeroed L1 table.
fn write_qcow2(
    file: &File,
    size: u64,
    cluster_bits: u32,
    backing: Option<(String, Format)>,
) -> Result<(), ImageError> {
    let cs = 1u64 << cluster_bits;
    let l1_span = cs * (cs / 8);
    let l1_size = size.div_ceil(l1_span);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(ImageError::Invalid(format!(
            "size {size} needs an L1 table larger than {} bytes; use larger clusters",
            header::MAX_L1_BYTES
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let per_block = cs / 2;
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_rt = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_rt == rt_clusters {
            break;
        }
        blocks = need_blocks;
        rt_clusters = need_rt;
    }
    let total = 1 + rt_clusters + blocks + l1_clusters;
    if let Some((name, fmt)) = &backing {
        // Header, format extension, end marker, then the name.
        let room =
            cs - u64::from(header::V3_HEADER_LEN) - 8 - 8 - fmt.name().len().div_ceil(8) as u64 * 8;
        if name.is_empty() || name.len() as u64 > room.min(u64::from(header::MAX_BACKING_NAME)) {
            return Err(ImageError::Invalid(format!(
                "base name {name:?} is empty or too long"
            )));
        }
    }
    let h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: (1 + rt_clusters + blocks) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: header::V3_HEADER_LEN,
        compression_type: 0,
        backing_format: backing.as_ref().map(|b| b.1.name().to_string()),
        backing_file: backing.map(|b| b.0),
        feature_names: Vec::new(),
    };
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for j in 0..blocks {
        let off = (1 + rt_clusters + j) * cs;
        rt[j as usize * 8..j as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
    }
    let mut rb = vec![0u8; (blocks * cs) as usize];
    for c in 0..total as usize {
        rb[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.set_len(total * cs)
        .map_err(|e| ImageError::io("sizing new qcow2 image", e))?;
    pwrite_all(file, &rt, cs, "refcount table")?;
    pwrite_all(file, &rb, (1 + rt_clusters) * cs, "refcount blocks")?;
    // The header goes last: until it is there the file is not an image.
    pwrite_all(file, &header::build_v3_cluster(&h), 0, "qcow2 header")
}
