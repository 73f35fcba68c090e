//! virtio-blk's descriptor-chain walker and request parsing
//! (`VirtioDevice::process_queue`) over guest-controlled rings and
//! buffers, backed by a 1 MiB raw disk in a memfd.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;

use libfuzzer_sys::fuzz_target;
use vmd_disk::{open_disk, Format};
use vmd_vmm::devices::virtio::block::{serial, VirtioBlk};

mod common;
use common::layout::F_READ_ONLY;

fn disk_file() -> File {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vmd-fuzz-blk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    f
}

fuzz_target!(|data: &[u8]| {
    let ro = data.first().is_some_and(|f| f & F_READ_ONLY != 0);
    let disk = open_disk(disk_file(), Vec::new(), ro, Format::Raw).unwrap();
    let mut dev = VirtioBlk::new(disk, serial("fuzz", 0), ro);
    common::run(&mut dev, data);
});
