//! Raw images: the file is the disk.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::{check_range, file_len, pread_zero_tail, pwrite_all, Disk, ImageError};

/// Zero buffer size for the write-zeroes fallback.
const ZERO_CHUNK: usize = 1 << 20;

pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    pub fn open(file: File, read_only: bool) -> Result<Self, ImageError> {
        let size = file_len(&file)?;
        Ok(RawDisk {
            file,
            size,
            read_only,
        })
    }

    /// Punches a hole (keeping the size); falls back to writing zeroes where
    /// the file system or device cannot.
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(ImageError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        };
        // SAFETY: fallocate on a valid fd has no memory effects.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => {}
            _ => {
                return Err(ImageError::io(
                    format!("punching a hole of {len} bytes at {offset}"),
                    e,
                ))
            }
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            pwrite_all(&self.file, &zeroes[..n], pos, "zeroes")?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        pread_zero_tail(&self.file, buf, offset, "raw image")
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        pwrite_all(&self.file, buf, offset, "raw image")
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| ImageError::io("fdatasync of raw image", e))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.zero_range(offset, len)
    }
}
