//! Metrics as an operator's scraper sees them: `vmctl metrics` and the
//! vm.conf `metrics listen` socket serve the Prometheus text format, which
//! Prometheus's own Python parser (Debian's python3-prometheus-client)
//! reads; the disk counters follow what the guest did to its disk.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmd_e2e::{guest, Daemon, NetNs};

const T: Duration = Duration::from_secs(60);

/// One sample: metric name and labels.
type Key = (String, BTreeMap<String, String>);

/// Parses exposition text with prometheus_client's parser; a parse error
/// fails the test.
fn parse(text: &str) -> BTreeMap<Key, f64> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    // Debian's python3, where python3-prometheus-client installs.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (Debian's python3)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics (python3-prometheus-client installed?): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).expect("parser output");
    rows.into_iter().map(|(n, l, v)| ((n, l), v)).collect()
}

/// The value of `name` whose labels include all of `want`.
fn value(m: &BTreeMap<Key, f64>, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    m.iter()
        .find(|((n, l), _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
}

fn scrape(d: &Daemon) -> BTreeMap<Key, f64> {
    parse(&d.ok(&["metrics"]))
}

#[test]
fn vmctl_metrics_parse_and_disk_counters_follow_the_guest() {
    let ns = NetNs::new("metrics");
    let d = Daemon::start_in("metrics", Some(&ns), &[]);
    let kernel = guest("blk.elf");
    let kernel = kernel.to_str().unwrap();
    for name in ["idle", "busy"] {
        std::fs::write(d.dir.join(format!("{name}.raw")), vec![0u8; 1 << 20]).unwrap();
    }
    let disk = |n: &str| d.dir.join(format!("{n}.raw")).display().to_string();
    // "idle" only looks at its disk's configuration; "busy" reads 8
    // sectors and writes 4. Both stay up afterwards.
    let idle_disk = disk("idle");
    let busy_disk = disk("busy");
    for (name, disk, cmdline) in [
        ("idle", &idle_disk, "info stay"),
        ("busy", &busy_disk, "read:0:8 write:8:4:165 stay"),
    ] {
        d.ok(&[
            "start",
            "-b",
            kernel,
            "-m",
            "32M",
            "-d",
            disk,
            "-i",
            "1",
            "--cmdline",
            cmdline,
            name,
        ]);
        d.console(name).wait_for("VMD-TEST blk done", T);
    }
    let m = scrape(&d);
    let vm = |n: &'static str| [("vm", n), ("disk", "blk0")];
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&m, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in {m:#?}"))
    };
    assert_eq!(get("vmd_vm_disk_read_requests_total", &vm("idle")), 0.0);
    assert_eq!(get("vmd_vm_disk_read_requests_total", &vm("busy")), 1.0);
    assert_eq!(get("vmd_vm_disk_read_bytes_total", &vm("busy")), 4096.0);
    assert_eq!(get("vmd_vm_disk_write_requests_total", &vm("busy")), 1.0);
    assert_eq!(get("vmd_vm_disk_write_bytes_total", &vm("busy")), 2048.0);
    assert_eq!(get("vmd_vms", &[("state", "running")]), 2.0);
    assert_eq!(
        get("vmd_vm_state", &[("vm", "busy"), ("state", "running")]),
        1.0
    );
    assert_eq!(
        get("vmd_vm_state", &[("vm", "busy"), ("state", "stopped")]),
        0.0
    );
    assert_eq!(get("vmd_vm_vcpus", &[("vm", "busy")]), 1.0);
    assert_eq!(
        get("vmd_vm_memory_bytes", &[("vm", "busy")]),
        32.0 * 1024.0 * 1024.0
    );
    assert!(get("vmd_vm_uptime_seconds", &[("vm", "busy")]) > 0.0);
    assert!(get("vmd_vm_console_output_bytes_total", &[("vm", "busy")]) > 0.0);
    assert_eq!(get("vmd_vm_restarts_total", &[("vm", "busy")]), 0.0);
    // KVM's own exit counters: the guest's driver reaches the disk through
    // its MMIO BAR, and halts once done.
    assert!(get("vmd_vm_vcpu_exits_total", &[("vm", "busy")]) > 0.0);
    let mmio = [("vm", "busy"), ("reason", "mmio")];
    assert!(get("vmd_vm_vcpu_exits_by_reason_total", &mmio) > 0.0);
    // The interface's counters come from its TAP.
    for n in [
        "rx_packets",
        "rx_bytes",
        "rx_dropped",
        "tx_packets",
        "tx_bytes",
        "tx_dropped",
    ] {
        let name = format!("vmd_vm_nic_{n}_total");
        get(&name, &[("vm", "busy"), ("nic", "net0")]);
    }
    assert_eq!(get("vmd_reloads_total", &[]), 0.0);
    d.ok(&["reload"]);
    let m2 = scrape(&d);
    assert_eq!(value(&m2, "vmd_reloads_total", &[]), Some(1.0));
    // The counters keep counting: the same numbers again, not reset.
    assert_eq!(
        value(&m2, "vmd_vm_disk_read_bytes_total", &vm("busy")),
        Some(4096.0)
    );
}
