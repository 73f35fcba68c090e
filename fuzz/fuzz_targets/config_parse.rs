//! vm.conf: `vmd_config::parse_str(text, name, base_dir)` over arbitrary
//! bytes (UTF-8 lossy), with `base_dir` a private directory holding the
//! regress suite's include files (tests/config/*.inc) and a few of our own,
//! so `include` statements resolve, loop and nest. An accepted config's
//! canonical dump must parse back to the same settings (the regress
//! suite's invariant).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const OWN_INCLUDES: &[(&str, &str)] = &[
    ("a.inc", "sw = \"uplink\"\nswitch $sw { interface br0 }\n"),
    ("b.inc", "include \"a.inc\"\nvm \"inc\" { memory 64M\n disk \"/x.img\" }\n"),
    ("self.inc", "include \"self.inc\"\n"),
    ("sub/c.inc", "include \"../a.inc\"\nlocal prefix 10.9.0.0/16\n"),
    ("bad.inc", "vm { {{ \"\n"),
];

fn base_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vmd-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("temp dir");
        let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/config");
        if let Ok(rd) = std::fs::read_dir(&cases) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "inc") {
                    let _ = std::fs::copy(&p, dir.join(e.file_name()));
                }
            }
        }
        for (name, text) in OWN_INCLUDES {
            std::fs::write(dir.join(name), text).expect("write include");
        }
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registering a plain extern "C" fn.
        unsafe { libc::atexit(cleanup) };
        dir
    })
}

/// Inputs that could make `include` read a device, FIFO or procfs file
/// (an endless read of /dev/zero, a blocking read of /dev/stdin) are not
/// parser bugs but would stall the fuzzer; skip them.
fn touches_special_files(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    ["dev", "proc", "sys", "run", "fd/", ".."]
        .iter()
        .any(|s| t.contains(s))
        && t.contains("include")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if touches_special_files(&text) {
        return;
    }
    let dir = base_dir();
    match vmd_config::parse_str(&text, "vm.conf", dir) {
        Ok(cfg) => {
            let dump = cfg.dump();
            let again = vmd_config::parse_str(&dump, "vm.conf", dir)
                .unwrap_or_else(|e| panic!("dump does not parse: {e}\n{dump}"));
            assert_eq!(again.globals, cfg.globals, "globals differ after reparse\n{dump}");
            assert_eq!(again.vms.len(), cfg.vms.len(), "vm count\n{dump}");
            for (a, b) in again.vms.iter().zip(&cfg.vms) {
                let mut b = b.clone();
                b.instance_of = None;
                assert!(a.same_settings(&b), "vm {} differs after reparse\n{dump}", a.name);
            }
            assert_eq!(again.switches.len(), cfg.switches.len(), "switch count\n{dump}");
            for (a, b) in again.switches.iter().zip(&cfg.switches) {
                assert!(a.same_settings(b), "switch {} differs after reparse\n{dump}", a.name);
            }
            for vm in &cfg.vms {
                let _ = vmd_config::to_start_request(vm);
            }
        }
        Err(e) => {
            let _ = e.to_string();
            let _ = e.location();
        }
    }
});
