//! Disk images: raw files and qcow2 (versions 2 and 3), synchronous and
//! std-only so the per-VM process needs no async runtime. Its own crate,
//! apart from the wire protocol (as Cloud Hypervisor's block/ and OpenBSD's
//! vioqcow2.c stand apart): priv, the vmm and `vmctl create` link it; the
//! parent and the control process do not.
//!
//! The VM process never opens paths: priv opens the top image (locked
//! exclusively) and every backing file (read-only), then passes the fds;
//! [`open_disk`] builds a [`Disk`] from them. [`backing_chain`] tells priv
//! which backing files a qcow2 image needs. [`create`] serves `vmctl create`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod create;
pub mod qcow2;
mod raw;

pub use create::{create, parse_create_target, CreateSpec};
pub use qcow2::Qcow2Disk;
pub use raw::RawDisk;

/// Most backing files below one image (OpenBSD's VM_MAX_BASE_PER_DISK).
pub const MAX_BACKING_DEPTH: usize = 4;

/// Everything that can go wrong with an image; each variant says where.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The image's metadata is inconsistent or out of bounds.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// A valid image using a feature we do not implement.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("access of {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("disk is read-only")]
    ReadOnly,
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("backing chain: {0}")]
    Backing(String),
    #[error("{0}")]
    Invalid(String),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Image formats we read and write: the wire type, so a client's
/// `raw:`/`qcow2:` choice travels in the protocol without it linking this
/// crate.
pub use vmd_proto::vm::DiskFormat as Format;

/// A virtual disk as the block device sees it. All offsets are guest bytes.
pub trait Disk: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError>;
    /// Makes every completed write durable (metadata, then fdatasync).
    fn flush(&mut self) -> Result<(), ImageError>;
    /// Lets the image drop the range; reads afterwards return zeroes or, for
    /// a qcow2 v2 overlay where zero cannot be expressed, the old data.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// Makes the range read as zeroes, deallocating where possible.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError>;
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

/// Reads as much of `buf` as the file holds at `offset`, zero-filling what
/// lies past its end (qcow2 images may end inside their last cluster).
pub(crate) fn pread_zero_tail(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), ImageError> {
    let mut done = 0;
    while done < buf.len() {
        let pos = offset
            .checked_add(done as u64)
            .ok_or_else(|| ImageError::Corrupt(format!("{what}: offset {offset} overflows")))?;
        match file.read_at(&mut buf[done..], pos) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(format!("reading {what} at {pos}"), e)),
        }
    }
    Ok(())
}

pub(crate) fn pwrite_all(
    file: &File,
    buf: &[u8],
    offset: u64,
    what: &str,
) -> Result<(), ImageError> {
    file.write_all_at(buf, offset)
        .map_err(|e| ImageError::io(format!("writing {what} at {offset}"), e))
}

/// File length via lseek, so block devices report their size too.
pub(crate) fn file_len(file: &File) -> Result<u64, ImageError> {
    // SAFETY: lseek on a valid fd has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(ImageError::io(
            "finding image size",
            io::Error::last_os_error(),
        ));
    }
    Ok(r as u64)
}

/// Which lock an image carries while a VM (or `vmctl create`) uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// A writable top image: no other user of the file at all.
    Exclusive,
    /// A read-only image or a backing file: others may read it too, but
    /// no one may open it writable (their exclusive lock fails).
    Shared,
}

/// Takes a non-blocking flock on an image, so no VM (or `vmctl create -i`)
/// writes a file another one uses: an image that is in use fails here with
/// an error naming it.
pub fn lock(file: &File, path: &Path, lock: Lock) -> Result<(), ImageError> {
    let op = match lock {
        Lock::Exclusive => libc::LOCK_EX,
        Lock::Shared => libc::LOCK_SH,
    };
    // SAFETY: flock on a valid fd has no memory effects.
    let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if r < 0 {
        let e = io::Error::last_os_error();
        let why = match lock {
            Lock::Exclusive => "in use by another VM, or the backing file of one",
            Lock::Shared => "open writable by another VM",
        };
        return Err(ImageError::io(
            format!("locking {} ({why}?)", path.display()),
            e,
        ));
    }
    Ok(())
}

/// The format of the backing file a qcow2 `header` names, with its name:
/// the header's backing-format extension, or else the name's
/// ([`Format::of_name`]), never the backing file's content.
pub fn backing_of(header: &qcow2::header::Header) -> Result<Option<(String, Format)>, ImageError> {
    let Some(name) = &header.backing_file else {
        return Ok(None);
    };
    let format = match header.backing_format_parsed()? {
        Some(f) => f,
        None => Format::of_name(Path::new(name)),
    };
    Ok(Some((name.clone(), format)))
}

/// Builds a disk from already-open files: `top` and its backing files in
/// chain order (as [`backing_chain`] lists them), which are read-only.
/// `format` is the top image's; each backing file's is [`backing_of`].
pub fn open_disk(
    top: File,
    backing: Vec<File>,
    read_only: bool,
    format: Format,
) -> Result<Box<dyn Disk>, ImageError> {
    let mut backing = backing.into_iter();
    let disk = open_layer(top, &mut backing, read_only, format, 0)?;
    let extra = backing.count();
    if extra > 0 {
        return Err(ImageError::Backing(format!(
            "{extra} backing file(s) passed that the image chain does not use"
        )));
    }
    Ok(disk)
}

fn open_layer(
    file: File,
    backing: &mut std::vec::IntoIter<File>,
    read_only: bool,
    format: Format,
    depth: usize,
) -> Result<Box<dyn Disk>, ImageError> {
    match format {
        Format::Raw => Ok(Box::new(RawDisk::open(file, read_only)?)),
        Format::Qcow2 => {
            let header = qcow2::header::Header::read(&file)?;
            let below = match backing_of(&header)? {
                None => None,
                Some((name, fmt)) => {
                    if depth >= MAX_BACKING_DEPTH {
                        return Err(ImageError::Backing(format!(
                            "more than {MAX_BACKING_DEPTH} backing files (at {name:?})"
                        )));
                    }
                    let f = backing.next().ok_or_else(|| {
                        ImageError::Backing(format!("backing file {name:?} was not passed"))
                    })?;
                    Some(open_layer(f, backing, true, fmt, depth + 1)?)
                }
            };
            Ok(Box::new(Qcow2Disk::open(file, header, below, read_only)?))
        }
    }
}

/// The backing file a qcow2 image names, if any (raw images have none).
fn backing_name(path: &Path, format: Format) -> Result<Option<(String, Format)>, ImageError> {
    if format != Format::Qcow2 {
        return Ok(None);
    }
    let file =
        File::open(path).map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    backing_of(&qcow2::header::Header::read(&file)?)
}

/// Resolves a backing name as qemu does: relative names are relative to the
/// directory of the image that names them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Lists the backing files below `path` (of `format`) with their formats,
/// nearest first (not `path` itself), at most [`MAX_BACKING_DEPTH`] deep;
/// a loop is an error. For `vmctl create`, which runs as its user; priv
/// walks a VM's chain itself, opening each file as its namer.
pub fn backing_chain(path: &Path, format: Format) -> Result<Vec<(PathBuf, Format)>, ImageError> {
    let mut seen = vec![std::fs::canonicalize(path)
        .map_err(|e| ImageError::io(format!("resolving {}", path.display()), e))?];
    let mut chain = Vec::new();
    let mut cur = (path.to_path_buf(), format);
    while let Some((name, fmt)) = backing_name(&cur.0, cur.1)? {
        let next = resolve_backing(&cur.0, &name);
        if chain.len() >= MAX_BACKING_DEPTH {
            return Err(ImageError::Backing(format!(
                "{} has more than {MAX_BACKING_DEPTH} backing files",
                path.display()
            )));
        }
        let canon = std::fs::canonicalize(&next).map_err(|e| {
            ImageError::io(
                format!("backing file {} of {}", next.display(), cur.0.display()),
                e,
            )
        })?;
        if seen.contains(&canon) {
            return Err(ImageError::Backing(format!(
                "loop: {} is its own backing file",
                canon.display()
            )));
        }
        seen.push(canon);
        chain.push((next.clone(), fmt));
        cur = (next, fmt);
    }
    Ok(chain)
}

/// Opens an image and its backing chain by path, as `vmctl create -b/-i`
/// does: the top read-write (locked exclusively) unless `read_only`,
/// backing files read-only (locked shared). `format: None` takes the
/// name's ([`Format::of_name`]).
pub fn open_path(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
) -> Result<Box<dyn Disk>, ImageError> {
    let format = Format::named_or_of(format, path);
    let top = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    lock(
        &top,
        path,
        if read_only {
            Lock::Shared
        } else {
            Lock::Exclusive
        },
    )?;
    let mut files = Vec::new();
    for (p, _) in backing_chain(path, format)? {
        let file = File::open(&p)
            .map_err(|e| ImageError::io(format!("opening backing file {}", p.display()), e))?;
        lock(&file, &p, Lock::Shared)?;
        files.push(file);
    }
    open_disk(top, files, read_only, format)
}
