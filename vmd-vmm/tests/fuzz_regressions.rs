//! Inputs the fuzz targets once crashed on, replayed through the same
//! harness (fuzz/fuzz_targets/common) without libFuzzer, so plain
//! `cargo test` keeps them fixed. They live in the targets' corpora under
//! `regress-*` names, which the fuzz smoke run (fuzz/run-ci.sh) replays too.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

#[path = "../../fuzz/fuzz_targets/common/mod.rs"]
mod common;

use common::layout::{layout, queue_size, F_READ_ONLY};
use vmd_disk::{open_disk, Format};
use vmd_vmm::devices::virtio::block::{serial, VirtioBlk};
use vmd_vmm::devices::virtio::rng::VirtioRng;
use vmd_vmm::devices::virtio::VirtioDevice;

fn input(target: &str, name: &str) -> Vec<u8> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "fuzz",
        "corpus",
        target,
        name,
    ]
    .iter()
    .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn disk_file() -> File {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vmd-regress-blk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    f
}

fn run_rng(data: &[u8]) {
    common::run(&mut VirtioRng::new(), data);
}

/// As the virtqueue_chain_blk target: a 1 MiB raw disk in a memfd.
fn run_blk(data: &[u8]) {
    let ro = data.first().is_some_and(|f| f & F_READ_ONLY != 0);
    let disk = open_disk(disk_file(), Vec::new(), ro, Format::Raw).unwrap();
    common::run(&mut VirtioBlk::new(disk, serial("fuzz", 0), ro), data);
}

/// The ring indexes an input's image holds: (avail idx, used idx).
fn ring_indexes(data: &[u8], max: u16) -> (u16, u16) {
    let l = layout(queue_size(data[0], max));
    let image = &data[1..];
    let at = |off: u64| {
        let off = off as usize;
        u16::from_le_bytes([image[off], image[off + 1]])
    };
    (at(l.avail + 2), at(l.used + 2))
}

/// The first fuzz runs of both virtqueue targets stopped on these: a ring
/// with nothing available whose used index (never written by the device,
/// so still the input's bytes) is not zero. The harness asserted the used
/// index even when no chain was served; the device was right. Both devices
/// must serve nothing and leave it alone.
#[test]
fn nothing_served_leaves_a_nonzero_used_index_alone() {
    for name in [
        "regress-nothing-served-used-idx-256",
        "regress-nothing-served-used-idx-512",
    ] {
        let data = input("virtqueue_chain_rng", name);
        let (avail, used) = ring_indexes(&data, VirtioRng::new().queue_max_sizes()[0]);
        assert_eq!(avail, 0, "{name}: the case needs an empty available ring");
        assert_ne!(used, 0, "{name}: the case needs a nonzero used index");
        run_rng(&data);
        run_blk(&data);
    }
}
