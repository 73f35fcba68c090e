//! virtio-scsi's request queue (the CD-ROM device process's data path):
//! request headers and CDBs in guest-controlled chains, over a 64 KiB ISO
//! image in a memfd (its first bytes mark each 2 KiB block).
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use vmd_vmm::devices::virtio::scsi::VirtioScsi;

mod common;

/// The request queue (0 is control, 1 events).
const REQUEST_QUEUE: usize = 2;
const ISO_SIZE: u64 = 64 << 10;

fn iso() -> File {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vmd-fuzz-iso".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(ISO_SIZE).unwrap();
    for block in 0..ISO_SIZE / 2048 {
        f.write_all_at(&block.to_le_bytes(), block * 2048).unwrap();
    }
    f
}

fuzz_target!(|data: &[u8]| {
    let mut dev = VirtioScsi::new(iso(), ISO_SIZE);
    common::run_queue(&mut dev, REQUEST_QUEUE, data);
});
