//! Metrics in the Prometheus text exposition format (0.0.4): a small
//! writer for metric families, and the readers of the kernel's counters
//! that vmd exports (KVM's binary vCPU statistics, a TAP's sysfs
//! statistics).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Metric families in the order they were first written, each with its
/// samples.
#[derive(Default)]
pub struct Exposition {
    families: Vec<Family>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Exposition {
    /// Adds one sample of family `name` (declared on first use).
    pub fn sample(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let family = match self.families.iter_mut().position(|f| f.name == name) {
            Some(i) => &mut self.families[i],
            None => {
                self.families.push(Family {
                    name,
                    kind,
                    help,
                    samples: Vec::new(),
                });
                let last = self.families.len() - 1;
                &mut self.families[last]
            }
        };
        let mut l = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(l, "{sep}{k}=\"{}\"", escape(v));
        }
        family.samples.push((l, value));
    }

    /// A counter (`_total`).
    pub fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        v: u64,
    ) {
        self.sample(name, "counter", help, labels, v as f64);
    }

    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        v: f64,
    ) {
        self.sample(name, "gauge", help, labels, v);
    }

    /// The text: `# HELP`, `# TYPE` and the samples of each family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (labels, v) in &f.samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{} {}", f.name, v);
                } else {
                    let _ = writeln!(out, "{}{{{labels}}} {}", f.name, v);
                }
            }
        }
        out
    }
}

/// `text` cut at line ends into parts of at most `max` bytes (a longer
/// line is cut where it must), in order.
pub fn parts(mut text: String, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    while text.len() > max {
        let mut cut = text[..max].rfind('\n').map_or(max, |i| i + 1);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let rest = text.split_off(cut);
        out.push(text);
        text = rest;
    }
    out.push(text);
    out
}

/// A label value as the text format wants it: backslash, quote and
/// newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Whether `fd` is a KVM vCPU statistics fd (and not some other file a VM
/// process might pass off as one).
pub fn is_kvm_stats_fd(fd: &OwnedFd) -> bool {
    // The kernel names it "anon_inode:kvm-vcpu-stats:ID".
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).is_ok_and(|t| {
        t.to_str()
            .is_some_and(|t| t.starts_with("anon_inode:kvm-vcpu-stats"))
    })
}

// KVM binary statistics (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD).
const STATS_TYPE_MASK: u32 = 0xf;
const STATS_TYPE_CUMULATIVE: u32 = 0;
/// Bounds on what we read, whatever the header says.
const MAX_STATS_BYTES: u64 = 1 << 20;
const MAX_NAME: u32 = 256;

/// The cumulative counters of one KVM statistics fd, by name (`exits`,
/// `io_exits`, `halt_exits`, ...); empty when unreadable.
pub fn kvm_counters(fd: &OwnedFd) -> BTreeMap<String, u64> {
    let file = std::fs::File::from(match fd.try_clone() {
        Ok(f) => f,
        Err(_) => return BTreeMap::new(),
    });
    let read = |off: u64, len: usize| -> Option<Vec<u8>> {
        if off.checked_add(len as u64)? > MAX_STATS_BYTES {
            return None;
        }
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).ok()?;
        Some(buf)
    };
    parse_kvm_stats(read).unwrap_or_default()
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parses KVM's binary statistics through `read(offset, len)`.
fn parse_kvm_stats(read: impl Fn(u64, usize) -> Option<Vec<u8>>) -> Option<BTreeMap<String, u64>> {
    // struct kvm_stats_header: flags, name_size, num_desc, id_offset,
    // desc_offset, data_offset (u32 each).
    let h = read(0, 24)?;
    let name_size = u32_at(&h, 4)?;
    let num_desc = u32_at(&h, 8)?;
    let desc_offset = u64::from(u32_at(&h, 16)?);
    let data_offset = u64::from(u32_at(&h, 20)?);
    if name_size == 0 || name_size > MAX_NAME {
        return None;
    }
    // struct kvm_stats_desc: flags u32, exponent s16, size u16, offset
    // u32, bucket_size u32, name[name_size].
    let stride = 16 + name_size as usize;
    let descs = read(desc_offset, stride.checked_mul(num_desc as usize)?)?;
    let mut out = BTreeMap::new();
    for d in descs.chunks_exact(stride) {
        let flags = u32_at(d, 0)?;
        let size = u16::from_ne_bytes([d[6], d[7]]);
        let offset = u64::from(u32_at(d, 8)?);
        if flags & STATS_TYPE_MASK != STATS_TYPE_CUMULATIVE || size != 1 {
            continue;
        }
        let name = &d[16..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let v = read(data_offset.checked_add(offset)?, 8)?;
        let v = u64::from_ne_bytes(v.try_into().ok()?);
        out.insert(name.to_string(), v);
    }
    Some(out)
}

/// One of a host interface's kernel counters
/// (/sys/class/net/IF/statistics/NAME), 0 when unreadable.
pub fn netdev_counter(ifname: &str, name: &str) -> u64 {
    if !vmd_proto::net::valid_ifname(ifname) {
        return 0;
    }
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_groups_families_and_escapes_labels() {
        let mut e = Exposition::default();
        e.counter("vmd_reloads_total", "Reloads.", &[], 3);
        e.gauge("vmd_vm_vcpus", "vCPUs.", &[("vm", "a")], 2.0);
        e.gauge("vmd_vm_vcpus", "vCPUs.", &[("vm", "b\"\\\n")], 1.0);
        let text = e.render();
        assert_eq!(
            text,
            "# HELP vmd_reloads_total Reloads.\n# TYPE vmd_reloads_total counter\nvmd_reloads_total 3\n\
             # HELP vmd_vm_vcpus vCPUs.\n# TYPE vmd_vm_vcpus gauge\nvmd_vm_vcpus{vm=\"a\"} 2\n\
             vmd_vm_vcpus{vm=\"b\\\"\\\\\\n\"} 1\n"
        );
    }

    #[test]
    fn parts_cut_at_line_ends_and_lose_nothing() {
        let text: String = (0..1000).map(|i| format!("metric_{i} {i}\n")).collect();
        let p = parts(text.clone(), 100);
        assert!(p.len() > 100);
        assert!(p.iter().all(|s| s.len() <= 100 && s.ends_with('\n')));
        assert_eq!(p.concat(), text);
        assert_eq!(parts("short\n".into(), 100), ["short\n"]);
        // A line longer than a part is cut, still losing nothing.
        let long = "x".repeat(250);
        assert_eq!(parts(long.clone(), 100).concat(), long);
    }

    /// A statistics blob laid out as KVM lays it out.
    fn blob(stats: &[(&str, u32, u64)]) -> Vec<u8> {
        let name_size = 48u32;
        let stride = 16 + name_size as usize;
        let desc_offset = 24 + 16; // after the header and an id string
        let data_offset = desc_offset + stride * stats.len();
        let mut b = vec![0u8; data_offset + 8 * stats.len()];
        for (i, v) in [
            0,
            name_size,
            stats.len() as u32,
            24,
            desc_offset as u32,
            data_offset as u32,
        ]
        .iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        for (i, (name, flags, value)) in stats.iter().enumerate() {
            let d = desc_offset + i * stride;
            b[d..d + 4].copy_from_slice(&flags.to_ne_bytes());
            b[d + 6..d + 8].copy_from_slice(&1u16.to_ne_bytes());
            b[d + 8..d + 12].copy_from_slice(&((i * 8) as u32).to_ne_bytes());
            b[d + 16..d + 16 + name.len()].copy_from_slice(name.as_bytes());
            let v = data_offset + i * 8;
            b[v..v + 8].copy_from_slice(&value.to_ne_bytes());
        }
        b
    }

    fn parse(b: &[u8]) -> Option<BTreeMap<String, u64>> {
        parse_kvm_stats(|off, len| {
            let off = usize::try_from(off).ok()?;
            b.get(off..off.checked_add(len)?).map(<[u8]>::to_vec)
        })
    }

    #[test]
    fn kvm_stats_keep_cumulative_counters() {
        // Type 1 is an instant value, 2 a peak: not counters.
        let b = blob(&[
            ("exits", 0, 41),
            ("io_exits", 0, 7),
            ("halt_poll_ns", 1, 99),
            ("peak", 2, 5),
        ]);
        let m = parse(&b).unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m["exits"], 41);
        assert_eq!(m["io_exits"], 7);
    }

    #[test]
    fn hostile_stats_are_refused_not_trusted() {
        let good = blob(&[("exits", 0, 1)]);
        // Truncated anywhere: nothing, no panic.
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        // A huge name size or descriptor count.
        let mut b = good.clone();
        b[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse(&b).is_none());
        let mut b = good;
        b[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse(&b).is_none());
    }
}
