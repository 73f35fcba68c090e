//! qcow2 metadata: the input's image bytes go into a memfd, are opened
//! with `image::open_disk(.., Qcow2)` (or as raw), and a
//! few reads, writes, discards, write-zeroes and flushes run at offsets
//! taken from the input.
//!
//! Input: 16 control bytes, then the image.
//!   ctl[0] bit 0: read-only; bit 1: pass a 64 KiB raw backing file;
//!          bit 2: open it as raw instead of qcow2.
//!   ctl[1..16]: five ops of 3 bytes: kind (low 3 bits: 0/5/6/7 read,
//!          1 write, 2 flush, 3 discard, 4 write-zeroes; high 5 bits:
//!          length in 512-byte units - 1), then a big-endian u16 position
//!          scaled to the virtual size.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use libfuzzer_sys::fuzz_target;
use vmd_disk::{open_disk, Format};

const CTL: usize = 16;

fn memfd(bytes: &[u8]) -> File {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vmd-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes).expect("fill memfd");
    f
}

fuzz_target!(|data: &[u8]| {
    let mut ctl = [0u8; CTL];
    let n = data.len().min(CTL);
    ctl[..n].copy_from_slice(&data[..n]);
    let image = &data[n..];

    let read_only = ctl[0] & 1 != 0;
    let backing = if ctl[0] & 2 != 0 {
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        vec![memfd(&pattern)]
    } else {
        Vec::new()
    };
    let format = if ctl[0] & 4 != 0 {
        Format::Raw
    } else {
        Format::Qcow2
    };
    let Ok(mut disk) = open_disk(memfd(image), backing, read_only, format) else {
        return;
    };
    assert_eq!(disk.read_only(), read_only);
    let size = disk.size();
    let mut buf = vec![0u8; 16 * 512];
    for (i, op) in ctl[1..].chunks_exact(3).enumerate() {
        let len = ((usize::from(op[0] >> 3) + 1) * 512).min(buf.len());
        let pos = u64::from(u16::from_be_bytes([op[1], op[2]]));
        let offset = ((u128::from(size) * u128::from(pos)) >> 16) as u64;
        let buf = &mut buf[..len];
        let r = match op[0] & 7 {
            1 => {
                buf.fill(0xa0 + i as u8);
                disk.write_at(buf, offset)
            }
            2 => disk.flush(),
            3 => disk.discard(offset, len as u64),
            4 => disk.write_zeroes(offset, len as u64),
            _ => disk.read_at(buf, offset),
        };
        if let Err(e) = r {
            let _ = e.to_string();
        }
    }
    let _ = disk.flush();
});
