//! Raw images and `vmctl create` target parsing.

mod image_util;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use image_util::TempDir;
use vmd_disk::{create, open_disk, parse_create_target, CreateSpec, Disk, Format, ImageError};

fn raw_disk(dir: &TempDir, size: u64, read_only: bool) -> (PathBuf, Box<dyn Disk>) {
    let path = dir.path("disk.raw");
    create(
        &path,
        CreateSpec {
            size: Some(size),
            ..CreateSpec::new(Format::Raw)
        },
    )
    .expect("create raw");
    let f = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .expect("open");
    (
        path,
        open_disk(f, vec![], read_only, Format::Raw).expect("open_disk"),
    )
}

#[test]
fn raw_read_write_flush() {
    let dir = TempDir::new("raw");
    let (path, mut d) = raw_disk(&dir, 1 << 20, false);
    assert_eq!(d.size(), 1 << 20);
    assert!(!d.read_only());
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    d.write_at(&data, 4097).unwrap();
    d.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    d.read_at(&mut back, 4097).unwrap();
    assert_eq!(back, data);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4097..4097 + data.len()], &data[..]);
    assert_eq!(on_disk.len(), 1 << 20);
}

#[test]
fn raw_discard_and_write_zeroes() {
    let dir = TempDir::new("raw");
    let (path, mut d) = raw_disk(&dir, 1 << 20, false);
    d.write_at(&vec![0xaa; 1 << 20], 0).unwrap();
    d.discard(65536, 65536).unwrap();
    d.write_zeroes(200_000, 1000).unwrap();
    let mut back = vec![0u8; 1 << 20];
    d.read_at(&mut back, 0).unwrap();
    for (i, &b) in back.iter().enumerate() {
        let zero = (65536..131072).contains(&i) || (200_000..201_000).contains(&i);
        assert_eq!(b, if zero { 0 } else { 0xaa }, "byte {i}");
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        1 << 20,
        "size kept"
    );
}

#[test]
fn raw_out_of_range_and_read_only() {
    let dir = TempDir::new("raw");
    let (_, mut d) = raw_disk(&dir, 4096, false);
    let mut b = [0u8; 2];
    assert!(matches!(
        d.read_at(&mut b, 4095),
        Err(ImageError::OutOfRange {
            offset: 4095,
            len: 2,
            size: 4096
        })
    ));
    assert!(matches!(
        d.write_at(&b, u64::MAX),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(d.discard(4000, 200).is_err());
    assert!(d.write_zeroes(u64::MAX - 1, 5).is_err());
    d.read_at(&mut b, 4094).unwrap();
    drop(d);
    let f = File::open(dir.path("disk.raw")).unwrap();
    let mut ro = open_disk(f, vec![], true, Format::Raw).unwrap();
    assert!(ro.read_only());
    assert!(matches!(ro.write_at(&b, 0), Err(ImageError::ReadOnly)));
    assert!(matches!(ro.discard(0, 512), Err(ImageError::ReadOnly)));
    ro.flush().unwrap();
}

#[test]
fn create_never_clobbers() {
    let dir = TempDir::new("raw");
    let path = dir.path("x.img");
    std::fs::write(&path, b"precious").unwrap();
    for f in [Format::Raw, Format::Qcow2] {
        let e = create(
            &path,
            CreateSpec {
                size: Some(1 << 20),
                ..CreateSpec::new(f)
            },
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::Exists(_)), "{e}");
        assert!(e.to_string().contains("already exists"), "{e}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let e = create(&dir.path("nosize.img"), CreateSpec::new(Format::Raw)).unwrap_err();
    assert!(e.to_string().contains("size"), "{e}");
    assert!(!dir.path("nosize.img").exists());
}

#[test]
fn create_targets() {
    assert_eq!(
        parse_create_target("qcow2:a.img"),
        (Format::Qcow2, "a.img".into())
    );
    assert_eq!(
        parse_create_target("raw:b.qcow2"),
        (Format::Raw, "b.qcow2".into())
    );
    assert_eq!(
        parse_create_target("/x/disk.qcow2"),
        (Format::Qcow2, "/x/disk.qcow2".into())
    );
    assert_eq!(
        parse_create_target("disk.QCOW2"),
        (Format::Qcow2, "disk.QCOW2".into())
    );
    assert_eq!(
        parse_create_target("disk.img"),
        (Format::Raw, "disk.img".into())
    );
    assert_eq!(
        parse_create_target("disk.raw"),
        (Format::Raw, "disk.raw".into())
    );
    assert_eq!(parse_create_target("disk"), (Format::Raw, "disk".into()));
}

#[test]
fn raw_create_rounds_and_is_sparse() {
    let dir = TempDir::new("raw");
    let path = dir.path("s.img");
    create(
        &path,
        CreateSpec {
            size: Some(1000),
            ..CreateSpec::new(Format::Raw)
        },
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
}
