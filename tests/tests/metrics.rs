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

/// One HTTP exchange on a stream: what the server answered.
fn http_exchange(mut s: impl std::io::Read + std::io::Write, request: &[u8]) -> String {
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// vm.conf `metrics listen`: control serves the metrics to any scraper
/// on a unix socket or a loopback port, answers nothing but GET /metrics,
/// and a scraper that stalls holds up no one.
#[test]
fn metrics_listen_serves_scrapers_and_nothing_else() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let dir = Daemon::dir_for("scrape");
    std::fs::create_dir_all(&dir).unwrap();
    // Only the host's scrapers: a public address is refused with its place.
    let public = dir.join("public.conf");
    std::fs::write(&public, "metrics listen \"192.0.2.1:9100\"\n").unwrap();
    let out = Command::new(vmd_e2e::bin("vmd"))
        .args(["-n", "-f"])
        .arg(&public)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(":1:16: ") && err.contains("only a loopback address"),
        "{err}"
    );

    let sock = dir.join("metrics.sock");
    let conf = dir.join("vm.conf");
    std::fs::write(&conf, format!("metrics listen \"{}\"\n", sock.display())).unwrap();
    let d = Daemon::start_with("scrape", &["-f", conf.to_str().unwrap()]);
    d.boot(&guest("idle.elf"), "16M", "scraped");
    d.wait_state("scraped", "running", T);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "any local scraper may connect");
    // A scraper that connects and says nothing does not stall the others.
    let _stalled = UnixStream::connect(&sock).unwrap();
    let reply = http_exchange(
        UnixStream::connect(&sock).unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: vmd\r\n\r\n",
    );
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let m = parse(body);
    assert_eq!(
        value(
            &m,
            "vmd_vm_state",
            &[("vm", "scraped"), ("state", "running")]
        ),
        Some(1.0)
    );
    // Nothing else is served, and nothing reaches vmd: not a vmctl request.
    for (req, status) in [
        (&b"POST /metrics HTTP/1.0\r\n\r\n"[..], "405"),
        (b"GET /stop?vm=scraped HTTP/1.0\r\n\r\n", "404"),
        (b"\x00\x00\x00\x01garbage\n\n", "405"),
    ] {
        let reply = http_exchange(UnixStream::connect(&sock).unwrap(), req);
        assert!(reply.starts_with(&format!("HTTP/1.0 {status}")), "{reply}");
    }
    assert_eq!(d.status("scraped").unwrap().state, "running");
    drop(d);
    assert!(!sock.exists(), "metrics socket left behind");

    // A loopback TCP port, as Prometheus scrapes.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&conf, format!("metrics listen \"127.0.0.1:{port}\"\n")).unwrap();
    let d = Daemon::start_with("scrape", &["-f", conf.to_str().unwrap()]);
    let reply = http_exchange(
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        b"GET /metrics HTTP/1.0\r\n\r\n",
    );
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert_eq!(
        value(&parse(body), "vmd_vms", &[("state", "running")]),
        Some(0.0)
    );
    drop(d);
}

/// Metrics longer than one message (here 300 defined VMs, well over
/// 128 KiB of text) come whole, to vmctl and to a scraper.
#[test]
fn metrics_of_many_vms_come_whole() {
    use std::os::unix::net::UnixStream;
    let dir = Daemon::dir_for("many");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("metrics.sock");
    let mut conf = format!("metrics listen \"{}\"\n", sock.display());
    for i in 0..300 {
        conf.push_str(&format!(
            "vm \"many{i}\" {{\n    memory 16M\n    disable\n}}\n"
        ));
    }
    let path = dir.join("vm.conf");
    std::fs::write(&path, conf).unwrap();
    let d = Daemon::start_with("many", &["-f", path.to_str().unwrap()]);
    let text = d.ok(&["metrics"]);
    assert!(text.len() > 128 << 10, "only {} bytes", text.len());
    let m = parse(&text);
    assert_eq!(value(&m, "vmd_vms", &[("state", "stopped")]), Some(300.0));
    assert_eq!(value(&m, "vmd_vm_vcpus", &[("vm", "many299")]), Some(1.0));
    let reply = http_exchange(
        UnixStream::connect(&sock).unwrap(),
        b"GET /metrics HTTP/1.0\r\n\r\n",
    );
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert_eq!(body.len(), text.len());
    assert_eq!(
        value(&parse(body), "vmd_vms", &[("state", "stopped")]),
        Some(300.0)
    );
}
