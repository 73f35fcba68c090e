//! `vmctl create`: overlays on a base (-b), conversion (-i), backing chains.

mod image_util;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use image_util::{assert_check_clean, assert_identical, p, qemu_info, qemu_ok, Rng, TempDir};
use vmd_disk::{backing_chain, create, open_disk, open_path, CreateSpec, Disk, Format, ImageError};

fn read_all(d: &mut dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn overlay_on_base() {
    let dir = TempDir::new("c");
    let base = dir.path("base.qcow2");
    let mut content = vec![0u8; 2 << 20];
    Rng(1).fill(&mut content);
    let src = dir.path("src.raw");
    std::fs::write(&src, &content).unwrap();
    qemu_ok("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&base)]);
    let base_bytes = std::fs::read(&base).unwrap();

    let top = dir.path("top.qcow2");
    create(
        &top,
        CreateSpec {
            base: Some(PathBuf::from("base.qcow2")),
            ..CreateSpec::new(Format::Qcow2)
        },
    )
    .unwrap();
    assert_check_clean(&top);
    assert_eq!(qemu_info(&top), (2 << 20, "qcow2".to_string()));
    assert_eq!(
        backing_chain(&top, Format::Qcow2).unwrap(),
        vec![(dir.path("base.qcow2"), Format::Qcow2)]
    );

    // Priv's view: open the files, pass them down.
    let top_f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&top)
        .unwrap();
    let chain: Vec<File> = backing_chain(&top, Format::Qcow2)
        .unwrap()
        .iter()
        .map(|(p, _)| File::open(p).unwrap())
        .collect();
    let mut d = open_disk(top_f, chain, false, Format::Qcow2).unwrap();
    assert_eq!(read_all(d.as_mut()), content);
    let patch = vec![0xee; 70_000];
    d.write_at(&patch, 100_000).unwrap();
    content[100_000..170_000].copy_from_slice(&patch);
    d.write_zeroes(1 << 20, 65536).unwrap();
    content[1 << 20..(1 << 20) + 65536].fill(0);
    d.flush().unwrap();
    assert_eq!(read_all(d.as_mut()), content);
    drop(d);
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "base unchanged");
    assert_check_clean(&top);
    std::fs::write(&src, &content).unwrap();
    assert_identical(&src, "raw", &top, "qcow2");

    // A raw target cannot have a base.
    let e = create(
        &dir.path("bad.img"),
        CreateSpec {
            base: Some(PathBuf::from("base.qcow2")),
            ..CreateSpec::new(Format::Raw)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("qcow2"), "{e}");
}

#[test]
fn backing_chains_depth_and_loops() {
    let dir = TempDir::new("c");
    let base = dir.path("l0.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let mut prev = "l0.raw".to_string();
    for i in 1..=5 {
        let name = format!("l{i}.qcow2");
        create(
            &dir.path(&name),
            CreateSpec {
                base: Some(PathBuf::from(&prev)),
                ..CreateSpec::new(Format::Qcow2)
            },
        )
        .unwrap();
        prev = name;
    }
    assert_eq!(
        backing_chain(&dir.path("l4.qcow2"), Format::Qcow2)
            .unwrap()
            .len(),
        4
    );
    let mut d = open_path(&dir.path("l4.qcow2"), true, None).unwrap();
    assert_eq!(read_all(d.as_mut()), vec![7u8; 1 << 20]);
    let e = backing_chain(&dir.path("l5.qcow2"), Format::Qcow2).unwrap_err();
    assert!(e.to_string().contains("more than 4"), "{e}");
    // Missing backing fd.
    let e = open_disk(
        File::open(dir.path("l1.qcow2")).unwrap(),
        vec![],
        true,
        Format::Qcow2,
    )
    .err()
    .unwrap();
    assert!(matches!(e, ImageError::Backing(_)), "{e}");

    // a -> b -> a
    qemu_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&dir.path("a.qcow2")), "1M"],
    );
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            p(&dir.path("b.qcow2")),
        ],
    );
    qemu_ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            p(&dir.path("a.qcow2")),
        ],
    );
    let e = backing_chain(&dir.path("a.qcow2"), Format::Qcow2).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
}

#[test]
fn convert_from_input() {
    let dir = TempDir::new("c");
    let src = dir.path("src.raw");
    let mut content = vec![0u8; 5 << 20];
    let mut rng = Rng(77);
    for chunk in content.chunks_mut(100_000).step_by(3) {
        rng.fill(chunk);
    }
    std::fs::write(&src, &content).unwrap();
    let q = dir.path("in.qcow2");
    qemu_ok(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", p(&src), p(&q)],
    );
    for (input, fmt) in [(&src, "raw"), (&q, "qcow2")] {
        for out_fmt in [Format::Qcow2, Format::Raw] {
            let out = dir.path(&format!("out-{fmt}.{out_fmt}"));
            create(
                &out,
                CreateSpec {
                    input: Some(input.clone()),
                    ..CreateSpec::new(out_fmt)
                },
            )
            .unwrap();
            assert_identical(input, fmt, &out, out_fmt.name());
            if out_fmt == Format::Qcow2 {
                assert_check_clean(&out);
                // Sparse: zero chunks were skipped.
                let alloc = std::fs::metadata(&out).unwrap().len();
                assert!(alloc < content.len() as u64, "{alloc} bytes: not sparse");
            }
        }
    }
    // Larger target than input is fine, smaller is refused.
    let big = dir.path("big.qcow2");
    create(
        &big,
        CreateSpec {
            input: Some(src.clone()),
            size: Some(8 << 20),
            ..CreateSpec::new(Format::Qcow2)
        },
    )
    .unwrap();
    assert_eq!(qemu_info(&big).0, 8 << 20);
    let e = create(
        &dir.path("small.qcow2"),
        CreateSpec {
            input: Some(src.clone()),
            size: Some(1 << 20),
            ..CreateSpec::new(Format::Qcow2)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("smaller"), "{e}");
    assert!(!dir.path("small.qcow2").exists());
}

/// A format is never read from content: a qcow2 base named `*.img` is
/// raw to an overlay unless `-b qcow2:` names its format, and an input is
/// read as its name (or prefix) says.
#[test]
fn formats_come_from_names_and_prefixes_not_content() {
    let dir = TempDir::new("fmt");
    let mut content = vec![0u8; 1 << 20];
    Rng(5).fill(&mut content);
    let src = dir.path("src.raw");
    std::fs::write(&src, &content).unwrap();
    let base = dir.path("base.img");
    qemu_ok("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&base)]);
    let qcow2_bytes = std::fs::read(&base).unwrap();

    // By its name the base is raw: the overlay shows its qcow2 bytes.
    let by_name = dir.path("by-name.qcow2");
    create(
        &by_name,
        CreateSpec {
            base: Some(PathBuf::from("base.img")),
            ..CreateSpec::new(Format::Qcow2)
        },
    )
    .unwrap();
    assert_eq!(qemu_info(&by_name).1, "qcow2");
    let got = read_all(open_path(&by_name, true, None).unwrap().as_mut());
    assert_eq!(&got[..qcow2_bytes.len()], &qcow2_bytes[..]);
    // Named qcow2, it is read as qcow2, by us and by qemu.
    let named = dir.path("named.qcow2");
    create(
        &named,
        CreateSpec {
            base: Some(PathBuf::from("base.img")),
            base_format: Some(Format::Qcow2),
            ..CreateSpec::new(Format::Qcow2)
        },
    )
    .unwrap();
    assert_check_clean(&named);
    assert_eq!(
        read_all(open_path(&named, true, None).unwrap().as_mut()),
        content
    );
    // An input is copied as what it is named.
    let copy = dir.path("copy.raw");
    create(
        &copy,
        CreateSpec {
            input: Some(base.clone()),
            input_format: Some(Format::Qcow2),
            ..CreateSpec::new(Format::Raw)
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), content);
}
