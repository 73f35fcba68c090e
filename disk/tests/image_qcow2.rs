//! qcow2 interop with qemu-img/qemu-io: our images pass `qemu-img check`,
//! theirs read back byte for byte, and mixed writes compare identical.

mod image_util;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use image_util::{assert_check_clean, assert_identical, p, qemu_info, qemu_ok, Rng, TempDir};
use vmd_disk::{create, open_path, CreateSpec, Disk, Format};

fn new_qcow2(path: &Path, size: u64, cluster_bits: u32) {
    create(
        path,
        CreateSpec {
            size: Some(size),
            cluster_bits,
            ..CreateSpec::new(Format::Qcow2)
        },
    )
    .expect("create qcow2");
}

fn new_mirror(path: &Path, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

/// Random writes (aligned and not, crossing clusters and L2 tables) to
/// both the image and a raw mirror.
fn random_writes(d: &mut dyn Disk, mirror: &File, rng: &mut Rng, count: usize, max_len: u64) {
    let size = d.size();
    for i in 0..count {
        let len = 1 + rng.below(max_len);
        let mut off = rng.below(size - len);
        if i % 3 == 0 {
            off &= !511;
        }
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        d.write_at(&buf, off).unwrap();
        mirror.write_all_at(&buf, off).unwrap();
    }
}

fn read_all(d: &mut dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn created_image_is_clean_and_info_agrees() {
    let dir = TempDir::new("q");
    let img = dir.path("a.qcow2");
    new_qcow2(&img, 10 << 30, 16);
    assert_check_clean(&img);
    assert_eq!(qemu_info(&img), (10 << 30, "qcow2".to_string()));
    let mut d = open_path(&img, true, None).unwrap();
    assert_eq!(d.size(), 10 << 30);
    let mut b = vec![1u8; 4096];
    d.read_at(&mut b, (10 << 30) - 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// Small clusters so that a few MiB need many L2 tables, new refcount
/// blocks and a bigger refcount table.
#[test]
fn writes_with_small_clusters_grow_metadata() {
    let dir = TempDir::new("q");
    let img = dir.path("small.qcow2");
    let raw = dir.path("small.raw");
    let size = 24 << 20;
    new_qcow2(&img, size, 9);
    let mirror = new_mirror(&raw, size);
    let mut rng = Rng(0x1234_5678);
    {
        let mut d = open_path(&img, false, None).unwrap();
        // 12 MiB sequential: past one refcount table cluster (8 MiB of host).
        let mut chunk = vec![0u8; 256 << 10];
        for i in 0..48u64 {
            rng.fill(&mut chunk);
            d.write_at(&chunk, i * chunk.len() as u64).unwrap();
            mirror.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
        }
        random_writes(d.as_mut(), &mirror, &mut rng, 300, 5000);
        d.flush().unwrap();
    }
    assert_check_clean(&img);
    assert_identical(&raw, "raw", &img, "qcow2");
    // The refcount table outgrew its first cluster and moved.
    let mut rt = [0u8; 8];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut rt, 48)
        .unwrap();
    assert_ne!(
        u64::from_be_bytes(rt),
        512,
        "refcount table should have moved"
    );
    let mut d = open_path(&img, true, None).unwrap();
    assert_eq!(read_all(d.as_mut()), std::fs::read(&raw).unwrap());
}

#[test]
fn random_writes_discard_zeroes_compare_identical() {
    let dir = TempDir::new("q");
    let img = dir.path("big.qcow2");
    let raw = dir.path("big.raw");
    // 64 KiB clusters: one L2 table maps 512 MiB, so 1.5 GiB needs three.
    let size = 1536 << 20;
    new_qcow2(&img, size, 16);
    let mirror = new_mirror(&raw, size);
    let mut rng = Rng(42);
    {
        let mut d = open_path(&img, false, None).unwrap();
        random_writes(d.as_mut(), &mirror, &mut rng, 200, 200_000);
        // Straddle the first L2 boundary.
        let buf = vec![0x5a; 300_000];
        d.write_at(&buf, (512 << 20) - 150_000).unwrap();
        mirror.write_all_at(&buf, (512 << 20) - 150_000).unwrap();
        d.flush().unwrap();
    }
    assert_check_clean(&img);
    assert_identical(&raw, "raw", &img, "qcow2");
    {
        let mut d = open_path(&img, false, None).unwrap();
        for _ in 0..40 {
            let len = 1 + rng.below(1 << 20);
            let off = rng.below(size - len);
            let (zs, ze) = if rng.below(2) == 0 {
                d.write_zeroes(off, len).unwrap();
                (off, off + len)
            } else {
                // Without a backing file, discarded whole clusters read as
                // zero; partial clusters at the edges are left alone.
                d.discard(off, len).unwrap();
                (off.next_multiple_of(65536), (off + len) & !65535)
            };
            if ze > zs {
                mirror
                    .write_all_at(&vec![0u8; (ze - zs) as usize], zs)
                    .unwrap();
            }
            let mut got = vec![0u8; len as usize];
            let mut want = vec![0u8; len as usize];
            d.read_at(&mut got, off).unwrap();
            mirror.read_exact_at(&mut want, off).unwrap();
            assert!(got == want, "zeroed range {off}+{len} differs");
        }
        // Rewrite after freeing: freed clusters are reused after a flush.
        d.flush().unwrap();
        random_writes(d.as_mut(), &mirror, &mut rng, 50, 100_000);
        d.flush().unwrap();
    }
    assert_check_clean(&img);
    assert_identical(&raw, "raw", &img, "qcow2");
}

#[test]
fn write_zeroes_reads_zero() {
    let dir = TempDir::new("q");
    let img = dir.path("z.qcow2");
    new_qcow2(&img, 4 << 20, 16);
    let mut d = open_path(&img, false, None).unwrap();
    d.write_at(&vec![0xff; 4 << 20], 0).unwrap();
    d.write_zeroes(1000, 300_000).unwrap();
    let all = read_all(d.as_mut());
    for (i, &b) in all.iter().enumerate() {
        assert_eq!(
            b,
            if (1000..301_000).contains(&i) {
                0
            } else {
                0xff
            },
            "byte {i}"
        );
    }
    d.flush().unwrap();
    drop(d);
    assert_check_clean(&img);
}

/// Expected content after `qemu-io -c "write -P pat off len"`.
fn pattern(buf: &mut [u8], pat: u8, off: usize, len: usize) {
    buf[off..off + len].fill(pat);
}

#[test]
fn qemu_made_images_read_back() {
    let dir = TempDir::new("q");
    let size = 8u64 << 20;
    for compat in ["0.10", "1.1"] {
        let img = dir.path(&format!("qemu-{compat}.qcow2"));
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                p(&img),
                "8M",
            ],
        );
        qemu_ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0x12 1000k 5000",
                p(&img),
            ],
        );
        let mut want = vec![0u8; size as usize];
        pattern(&mut want, 0xab, 0, 65536);
        pattern(&mut want, 0x12, 1000 << 10, 5000);
        let mut d = open_path(&img, true, None).unwrap();
        assert_eq!(read_all(d.as_mut()), want, "compat={compat}");
        drop(d);
        // Our writes on their image stay consistent.
        let raw = dir.path(&format!("qemu-{compat}.raw"));
        std::fs::write(&raw, &want).unwrap();
        let mirror = OpenOptions::new().write(true).open(&raw).unwrap();
        let mut d = open_path(&img, false, None).unwrap();
        random_writes(d.as_mut(), &mirror, &mut Rng(7), 60, 70_000);
        d.write_zeroes(0, 32768).unwrap();
        mirror.write_all_at(&[0u8; 32768], 0).unwrap();
        d.flush().unwrap();
        drop(d);
        assert_check_clean(&img);
        assert_identical(&raw, "raw", &img, "qcow2");
    }
}

#[test]
fn qemu_made_overlays_read_back() {
    let dir = TempDir::new("q");
    let base_raw = dir.path("base.raw");
    let mut base = vec![0u8; 4 << 20];
    Rng(99).fill(&mut base);
    std::fs::write(&base_raw, &base).unwrap();
    let base_q = dir.path("base.qcow2");
    qemu_ok(
        "qemu-img",
        &["convert", "-O", "qcow2", p(&base_raw), p(&base_q)],
    );
    for (b, fmt) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        for compat in ["0.10", "1.1"] {
            let top = dir.path(&format!("top-{fmt}-{compat}.qcow2"));
            qemu_ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={compat}"),
                    "-b",
                    b,
                    "-F",
                    fmt,
                    p(&top),
                    "6M",
                ],
            );
            qemu_ok(
                "qemu-io",
                &[
                    "-c",
                    "write -P 0xab 0 64k",
                    "-c",
                    "write -P 0xcd 100000 3000",
                    p(&top),
                ],
            );
            let mut want = base.clone();
            want.resize(6 << 20, 0);
            pattern(&mut want, 0xab, 0, 65536);
            pattern(&mut want, 0xcd, 100_000, 3000);
            let mut d = open_path(&top, true, None).unwrap();
            assert_eq!(read_all(d.as_mut()), want, "{fmt} {compat}");
            drop(d);
            // Our writes and zeroes on their overlay; the base is untouched.
            let raw = dir.path("expect.raw");
            let _ = std::fs::remove_file(&raw);
            std::fs::write(&raw, &want).unwrap();
            let mirror = OpenOptions::new().write(true).open(&raw).unwrap();
            let mut d = open_path(&top, false, None).unwrap();
            random_writes(d.as_mut(), &mirror, &mut Rng(5), 40, 100_000);
            d.write_zeroes(65536 * 3, 65536 * 2).unwrap();
            mirror
                .write_all_at(&vec![0u8; 65536 * 2], 65536 * 3)
                .unwrap();
            d.flush().unwrap();
            drop(d);
            assert_check_clean(&top);
            assert_identical(&raw, "raw", &top, "qcow2");
            assert_eq!(std::fs::read(&base_raw).unwrap(), base);
        }
    }
}

#[test]
fn compressed_images_read_back_and_rewrite() {
    let dir = TempDir::new("q");
    let src = dir.path("src.raw");
    let mut data = vec![0u8; 3 << 20];
    // Compressible but not trivial: repeated random runs.
    let mut rng = Rng(3);
    for chunk in data.chunks_mut(4096).step_by(2) {
        let v = rng.next() as u8;
        chunk.fill(v);
        chunk[..16].copy_from_slice(&rng.next().to_le_bytes().repeat(2));
    }
    std::fs::write(&src, &data).unwrap();
    let img = dir.path("c.qcow2");
    qemu_ok(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", p(&src), p(&img)],
    );
    let mut d = open_path(&img, true, None).unwrap();
    assert_eq!(read_all(d.as_mut()), data);
    drop(d);
    // Writes into compressed clusters move them to fresh ones.
    let mirror = OpenOptions::new().write(true).open(&src).unwrap();
    let mut d = open_path(&img, false, None).unwrap();
    random_writes(d.as_mut(), &mirror, &mut Rng(11), 30, 20_000);
    d.discard(1 << 20, 1 << 20).unwrap();
    mirror.write_all_at(&vec![0u8; 1 << 20], 1 << 20).unwrap();
    d.flush().unwrap();
    drop(d);
    assert_check_clean(&img);
    assert_identical(&src, "raw", &img, "qcow2");
}
