//! vm.conf regress cases in `tests/config/` at the repository root: every
//! `NAME.conf` has either `NAME.ok` (warnings as `# ...` lines, then the
//! canonical dump) or `NAME.err` (the exact error line). Files named
//! `*.inc` are include targets, not cases.
//!
//! `VMD_CONFIG_BLESS=1 cargo test` writes missing expectations from the
//! current output (review them before committing).

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/config")
}

/// What a case produces, in the form of its expectation file.
fn run_case(dir: &Path, name: &str) -> (String, &'static str) {
    let text = std::fs::read_to_string(dir.join(name)).expect("read case");
    match vmd_config::parse_str(&text, name, dir) {
        Ok(cfg) => {
            let mut out = String::new();
            for w in &cfg.warnings {
                let _ = writeln!(out, "# {w}");
            }
            out.push_str(&cfg.dump());
            // The dump must parse back to the same settings.
            let again = vmd_config::parse_str(&cfg.dump(), name, dir)
                .unwrap_or_else(|e| panic!("{name}: dump does not parse: {e}\n{}", cfg.dump()));
            assert_eq!(
                again.globals, cfg.globals,
                "{name}: globals differ after reparse"
            );
            assert_eq!(again.vms.len(), cfg.vms.len());
            for (a, b) in again.vms.iter().zip(&cfg.vms) {
                let mut b = b.clone();
                b.instance_of = None;
                assert!(
                    a.same_settings(&b),
                    "{name}: vm {} differs after reparse",
                    a.name
                );
            }
            for (a, b) in again.switches.iter().zip(&cfg.switches) {
                assert!(a.same_settings(b), "{name}: switch {} differs", a.name);
            }
            (out, "ok")
        }
        Err(e) => (format!("{e}\n"), "err"),
    }
}

/// A line diff (longest common subsequence), `-` expected, `+` actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        }
    }
    out
}

#[test]
fn regress_cases() {
    let dir = cases_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/config")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".conf"))
        .collect();
    names.sort();
    assert!(names.len() >= 40, "only {} cases found", names.len());
    let bless = std::env::var_os("VMD_CONFIG_BLESS").is_some();
    let mut failures = Vec::new();
    for name in &names {
        let stem = name.trim_end_matches(".conf");
        let ok = dir.join(format!("{stem}.ok"));
        let errf = dir.join(format!("{stem}.err"));
        let (actual, kind) = run_case(&dir, name);
        let expected = match (ok.exists(), errf.exists()) {
            (true, true) => {
                failures.push(format!("{name}: both .ok and .err exist"));
                continue;
            }
            (false, false) if bless => {
                std::fs::write(dir.join(format!("{stem}.{kind}")), &actual).expect("bless");
                continue;
            }
            (false, false) => {
                failures.push(format!("{name}: no {stem}.ok or {stem}.err"));
                continue;
            }
            (true, false) => ("ok", std::fs::read_to_string(&ok).expect("read .ok")),
            (false, true) => ("err", std::fs::read_to_string(&errf).expect("read .err")),
        };
        if expected.0 != kind || expected.1 != actual {
            failures.push(format!(
                "{name}: expected {} got {kind}\n{}",
                expected.0,
                diff(&expected.1, &actual)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/vm.conf");
    let cfg = vmd_config::parse_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cfg.vms.is_empty());
    assert!(!cfg.switches.is_empty());
}
