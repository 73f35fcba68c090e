//! Shared helpers for the image tests: temp dirs, qemu-img, a PRNG.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmd-image-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a qemu tool; a missing tool fails the test loudly, never skips it.
pub fn qemu(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "{tool} could not be run ({e}): the image interop tests need qemu-utils \
             (apt-get install qemu-utils); they do not skip"
        ),
    }
}

pub fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let o = qemu(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// `qemu-img check` must exit 0 and find no errors and no leaks.
pub fn assert_check_clean(img: &Path) {
    let o = qemu("qemu-img", &["check", p(img)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("No errors were found") && !out.contains("leaked"),
        "qemu-img check {} not clean (exit {:?}):\n{out}",
        img.display(),
        o.status.code()
    );
}

/// `qemu-img compare` must report identical contents.
pub fn assert_identical(a: &Path, afmt: &str, b: &Path, bfmt: &str) {
    let o = qemu("qemu-img", &["compare", "-f", afmt, "-F", bfmt, p(a), p(b)]);
    assert!(
        o.status.success(),
        "qemu-img compare {} {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The top-level "virtual-size" and "format" of `qemu-img info`.
pub fn qemu_info(img: &Path) -> (u64, String) {
    let out = qemu_ok("qemu-img", &["info", "--output=json", p(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info json");
    (
        v["virtual-size"].as_u64().expect("virtual-size"),
        v["format"].as_str().expect("format").to_string(),
    )
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}
