//! Hostile and unsupported images: refused with a clear error, never a
//! panic or an out-of-bounds access.

mod image_util;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use image_util::{p, qemu_ok, Rng, TempDir};
use proptest::prelude::*;
use vmd_disk::{create, open_disk, CreateSpec, Format, ImageError};

fn open_err(path: &Path) -> String {
    match open_disk(File::open(path).unwrap(), vec![], true, Format::Qcow2) {
        Ok(_) => panic!("{} opened but should be refused", path.display()),
        Err(e) => e.to_string(),
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn unsupported_features_are_refused_clearly() {
    let dir = TempDir::new("h");
    let fresh = |name: &str| {
        let path = dir.path(name);
        create(
            &path,
            CreateSpec {
                size: Some(1 << 20),
                ..CreateSpec::new(Format::Qcow2)
            },
        )
        .unwrap();
        path
    };
    let cases: [(&str, u64, Vec<u8>, &str); 8] = [
        (
            "order.qcow2",
            96,
            5u32.to_be_bytes().to_vec(),
            "refcount_order 5",
        ),
        ("crypt.qcow2", 32, 1u32.to_be_bytes().to_vec(), "encrypted"),
        (
            "unknown.qcow2",
            72,
            (1u64 << 5).to_be_bytes().to_vec(),
            "unknown incompatible feature bit 5",
        ),
        (
            "dirty.qcow2",
            72,
            1u64.to_be_bytes().to_vec(),
            "qemu-img check -r all",
        ),
        (
            "corrupt.qcow2",
            72,
            2u64.to_be_bytes().to_vec(),
            "marked corrupt",
        ),
        (
            "datafile.qcow2",
            72,
            4u64.to_be_bytes().to_vec(),
            "external data file",
        ),
        (
            "extl2.qcow2",
            72,
            16u64.to_be_bytes().to_vec(),
            "extended L2",
        ),
        ("version.qcow2", 4, 4u32.to_be_bytes().to_vec(), "version 4"),
    ];
    for (name, at, bytes, want) in cases {
        let path = fresh(name);
        patch(&path, at, &bytes);
        let e = open_err(&path);
        assert!(e.contains(want), "{name}: {e:?} should mention {want:?}");
    }
    // zstd compression type.
    let path = fresh("zstd.qcow2");
    patch(&path, 72, &8u64.to_be_bytes());
    patch(&path, 104, &[1]);
    assert!(open_err(&path).contains("compression type 1"));
    // qemu-made 64-bit refcounts.
    let path = dir.path("rc64.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=64",
            p(&path),
            "1M",
        ],
    );
    let e = open_err(&path);
    assert!(
        e.contains("refcount_order 6") && e.contains("16-bit"),
        "{e}"
    );
    // Not an image at all, when asked for qcow2.
    let path = dir.path("junk.qcow2");
    std::fs::write(&path, b"not a qcow2 image").unwrap();
    assert!(open_err(&path).contains("magic"));
}

#[test]
fn snapshots_are_read_only() {
    let dir = TempDir::new("h");
    let path = dir.path("snap.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "1M"]);
    qemu_ok("qemu-io", &["-c", "write -P 0x11 0 4k", p(&path)]);
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", p(&path)]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let e = open_disk(f, vec![], false, Format::Qcow2).err().unwrap();
    assert!(
        matches!(e, ImageError::Unsupported(_)) && e.to_string().contains("snapshot"),
        "{e}"
    );
    let mut d = open_disk(File::open(&path).unwrap(), vec![], true, Format::Qcow2).unwrap();
    let mut b = [0u8; 4096];
    d.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
}

/// A small image with every kind of metadata: L2 tables, data, zero and
/// compressed clusters, all within the first few KiB.
fn seed_image(dir: &TempDir) -> Vec<u8> {
    let src = dir.path("seed.raw");
    let mut data = vec![0u8; 256 << 10];
    let mut rng = Rng(5);
    for c in data.chunks_mut(4096).step_by(2) {
        c.fill(rng.next() as u8);
    }
    std::fs::write(&src, &data).unwrap();
    let img = dir.path("seed.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&src),
            p(&img),
        ],
    );
    qemu_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 8k 8k",
            "-c",
            "write -z 16k 4k",
            p(&img),
        ],
    );
    std::fs::read(&img).unwrap()
}

fn exercise(path: &Path, writable: bool) {
    let f = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap();
    let Ok(mut d) = open_disk(f, vec![], !writable, Format::Qcow2) else {
        return;
    };
    let size = d.size();
    let mut buf = vec![0u8; 4096];
    let span = size.min(512 << 10);
    let mut off = 0;
    while off + 4096 <= span {
        let _ = d.read_at(&mut buf, off);
        off += 4096;
    }
    let _ = d.read_at(&mut buf[..100], size.saturating_sub(100));
    if writable {
        let _ = d.write_at(&buf[..3000], 1000);
        let _ = d.write_at(&buf, span / 2);
        let _ = d.discard(0, span.min(64 << 10));
        let _ = d.write_zeroes(4096, 10_000.min(size.saturating_sub(4096)));
        let _ = d.flush();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(
        muts in proptest::collection::vec((0usize..16384, any::<u8>()), 1..12),
        writable in any::<bool>(),
    ) {
        let dir = TempDir::new("fuzz");
        let mut img = seed_image(&dir);
        for (at, v) in muts {
            // Header, refcount table/blocks and L1/L2 tables live in the
            // first clusters; hit those.
            let n = img.len().min(16384);
            if let Some(b) = img.get_mut(at % n) {
                *b = v;
            }
        }
        let path = dir.path("m.qcow2");
        std::fs::write(&path, &img).unwrap();
        exercise(&path, writable);
    }
}

#[test]
fn truncated_images_are_errors() {
    let dir = TempDir::new("h");
    let img = seed_image(&dir);
    for len in [0usize, 3, 50, 100, 4096, 8192, img.len() / 2] {
        let path = dir.path(&format!("t{len}.qcow2"));
        std::fs::write(&path, &img[..len.min(img.len())]).unwrap();
        exercise(&path, false);
        exercise(&path, true);
    }
}

/// A refcount table whose first entry is zero leaves the header cluster
/// undescribed; allocating then must fail, not overwrite the header and
/// loop (the qcow2_open fuzzer found that hang).
#[test]
fn undescribed_header_cluster_is_an_error_not_a_hang() {
    let dir = TempDir::new("rc0");
    let path = dir.path("rc0.qcow2");
    let mut spec = CreateSpec::new(Format::Qcow2);
    spec.size = Some(1 << 20);
    create(&path, spec).unwrap();
    let mut table = [0u8; 8];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut table, 48)
        .unwrap();
    patch(&path, u64::from_be_bytes(table), &[0u8; 8]);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    match open_disk(file, vec![], false, Format::Qcow2) {
        Err(e) => assert!(e.to_string().contains("refcount"), "{e}"),
        Ok(mut disk) => {
            let err = disk.write_at(&[1u8; 512], 0).expect_err("write must fail");
            assert!(matches!(err, ImageError::Corrupt(_)), "{err}");
            assert!(err.to_string().contains("cluster 0"), "{err}");
        }
    }
}
