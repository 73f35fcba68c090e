//! Counters a device process keeps for the parent's metrics, in a small
//! shared memory file (a memfd) the parent makes and hands over with
//! `DevStart`: the device adds, the parent reads whenever it is scraped,
//! and neither waits for the other. The layout is a fixed array of u64s.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots of a disk's counters.
pub const DISK_READ_REQUESTS: usize = 0;
pub const DISK_READ_BYTES: usize = 1;
pub const DISK_WRITE_REQUESTS: usize = 2;
pub const DISK_WRITE_BYTES: usize = 3;
/// Slots in a counters file (one page).
pub const SLOTS: usize = 512;
const BYTES: usize = SLOTS * 8;

/// A mapping of a counters file.
pub struct SharedCounters {
    ptr: *mut AtomicU64,
}

// SAFETY: the mapping is only ever accessed through atomics.
unsafe impl Send for SharedCounters {}
// SAFETY: as above.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    /// A new zeroed counters file, sealed against shrinking, and a
    /// read-only mapping of it (the parent's side).
    pub fn create(name: &str) -> io::Result<(OwnedFd, SharedCounters)> {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: memfd_create with a valid C string; a non-negative
        // result is a new fd we own.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on the fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), BYTES as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The device may not shrink it under our mapping (a SIGBUS in the
        // parent), nor lift that seal.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on the fd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Self::map_with(&fd, libc::PROT_READ)?;
        Ok((fd, map))
    }

    /// Maps a counters file (the device's side, and the parent's). The
    /// file must be a whole counters file: a shorter one is refused,
    /// so no access can fall past its end.
    pub fn map(fd: &OwnedFd) -> io::Result<SharedCounters> {
        Self::map_with(fd, libc::PROT_READ | libc::PROT_WRITE)
    }

    fn map_with(fd: &OwnedFd, prot: libc::c_int) -> io::Result<SharedCounters> {
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on an fd we hold.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_size as u64) < BYTES as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "counters file too short",
            ));
        }
        // SAFETY: a fresh shared mapping of BYTES bytes of a file at least
        // that long; we own the result until Drop unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedCounters { ptr: ptr.cast() })
    }

    fn slot(&self, i: usize) -> Option<&AtomicU64> {
        // SAFETY: `i < SLOTS` keeps the access inside the mapping, which
        // is page-aligned (so 8-aligned) and lives as long as `self`.
        (i < SLOTS).then(|| unsafe { &*self.ptr.add(i) })
    }

    /// Adds to slot `i` (on a writable mapping: the device's).
    pub fn add(&self, i: usize, v: u64) {
        if let Some(s) = self.slot(i) {
            s.fetch_add(v, Ordering::Relaxed);
        }
    }

    pub fn get(&self, i: usize) -> u64 {
        self.slot(i).map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping `map` made, once.
        unsafe { libc::munmap(self.ptr.cast(), BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_share_the_counters() {
        let (fd, parent) = SharedCounters::create("t").unwrap();
        let device = SharedCounters::map(&fd).unwrap();
        // Sealed: the device cannot shrink it under the parent.
        // SAFETY: ftruncate on a test fd.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
        device.add(DISK_READ_BYTES, 4096);
        device.add(DISK_READ_BYTES, 512);
        device.add(SLOTS, 1); // out of range: ignored
        assert_eq!(parent.get(DISK_READ_BYTES), 4608);
        assert_eq!(parent.get(SLOTS), 0);
        // A file shorter than a counters file is refused.
        let short: OwnedFd = tempfile_fd();
        assert!(SharedCounters::map(&short).is_err());
    }

    fn tempfile_fd() -> OwnedFd {
        // SAFETY: as in create.
        let fd = unsafe { libc::memfd_create(c"short".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd just made.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}
