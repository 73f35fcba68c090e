//! Canonical text form of a parsed configuration: vm.conf syntax, every
//! statement on its own line in a fixed order, defaults spelled out where
//! they matter, instances resolved. It parses back to the same settings.

use std::fmt::{self, Display, Formatter, Write};

use crate::{AllowInstance, Config, InterfaceDef, SwitchDef, VmDef};

/// A quoted vm.conf string.
fn q(s: impl Display) -> String {
    let mut out = String::from("\"");
    for c in s.to_string().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Bytes in the largest unit that divides them exactly.
fn size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

impl Config {
    /// The canonical text (same as `to_string()`).
    pub fn dump(&self) -> String {
        self.to_string()
    }
}

impl Display for Config {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let g = &self.globals;
        writeln!(f, "local prefix {}", g.local_prefix)?;
        if let Some(p) = &g.local_inet6 {
            writeln!(f, "local inet6 prefix {p}")?;
        }
        if let Some(o) = &g.socket_owner {
            writeln!(f, "socket owner {}", q(o))?;
        }
        if let Some(a) = &g.agentx {
            let mut line = String::from("agentx");
            if let Some(c) = &a.context {
                let _ = write!(line, " context {}", q(c));
            }
            if let Some(p) = &a.path {
                let _ = write!(line, " path {}", q(p.display()));
            }
            writeln!(f, "{line}")?;
        }
        if let Some(m) = &g.metrics_listen {
            writeln!(f, "metrics listen {}", q(m))?;
        }
        match &g.staggered {
            Some(s) => writeln!(
                f,
                "staggered start parallel {} delay {}",
                s.parallel, s.delay
            )?,
            None => writeln!(f, "# staggered start: parallel = number of CPUs, delay 30")?,
        }
        for sw in &self.switches {
            writeln!(f)?;
            write_switch(f, sw)?;
        }
        for vm in &self.vms {
            writeln!(f)?;
            write_vm(f, vm)?;
        }
        Ok(())
    }
}

fn write_switch(f: &mut Formatter<'_>, sw: &SwitchDef) -> fmt::Result {
    writeln!(f, "switch {} {{", q(&sw.name))?;
    writeln!(f, "\t# defined at {}", sw.defined_at)?;
    writeln!(f, "\t{}", if sw.enabled { "enable" } else { "disable" })?;
    writeln!(f, "\tinterface {}", q(&sw.interface))?;
    if let Some(g) = &sw.group {
        writeln!(f, "\tgroup {}", q(g))?;
    }
    if sw.locked_lladdr {
        writeln!(f, "\tlocked lladdr")?;
    }
    if let Some(r) = sw.rdomain {
        writeln!(f, "\trdomain {r}")?;
    }
    writeln!(f, "\t{}", if sw.up { "up" } else { "down" })?;
    writeln!(f, "}}")
}

fn write_vm(f: &mut Formatter<'_>, vm: &VmDef) -> fmt::Result {
    writeln!(f, "vm {} {{", q(&vm.name))?;
    writeln!(f, "\t# defined at {}", vm.defined_at)?;
    if let Some(p) = &vm.instance_of {
        writeln!(f, "\t# instance of {}", q(p))?;
    }
    writeln!(f, "\t{}", if vm.enabled { "enable" } else { "disable" })?;
    if let Some(m) = vm.memory {
        writeln!(f, "\tmemory {}", size(m))?;
    }
    if let Some(n) = vm.vcpus {
        writeln!(f, "\tvcpus {n}")?;
    }
    if let Some(k) = &vm.kernel {
        writeln!(f, "\tboot {}", q(k.display()))?;
    }
    if let Some(i) = &vm.initrd {
        writeln!(f, "\tinitrd {}", q(i.display()))?;
    }
    if let Some(c) = &vm.cmdline {
        writeln!(f, "\tcmdline {}", q(c))?;
    }
    if let Some(d) = vm.boot_device {
        writeln!(f, "\tboot device {d}")?;
    }
    if let Some(n) = &vm.boot_filename {
        writeln!(f, "\tboot filename {}", q(n))?;
    }
    if let Some(c) = &vm.cdrom {
        writeln!(f, "\tcdrom {}", q(c.display()))?;
    }
    for d in &vm.disks {
        match d.format {
            Some(fmt) => writeln!(f, "\tdisk {} format {fmt}", q(d.path.display()))?,
            None => writeln!(f, "\tdisk {}", q(d.path.display()))?,
        }
    }
    for i in &vm.interfaces {
        write_interface(f, i)?;
    }
    if let Some(n) = vm.interface_count {
        writeln!(f, "\tinterfaces {n}")?;
    }
    if let Some(o) = &vm.owner {
        writeln!(f, "\towner {}", q(o))?;
    }
    if let Some(a) = &vm.allow_instance {
        write_allow(f, a)?;
    }
    writeln!(f, "}}")
}

fn write_interface(f: &mut Formatter<'_>, i: &InterfaceDef) -> fmt::Result {
    let mut head = String::from("\t");
    if i.local {
        head.push_str("local ");
    }
    head.push_str("interface");
    if let Some(n) = &i.name {
        let _ = write!(head, " {}", q(n));
    }
    writeln!(f, "{head} {{")?;
    if let Some(s) = &i.switch {
        writeln!(f, "\t\tswitch {}", q(s))?;
    }
    if let Some(g) = &i.group {
        writeln!(f, "\t\tgroup {}", q(g))?;
    }
    match (i.locked, i.lladdr) {
        (true, Some(m)) => writeln!(f, "\t\tlocked lladdr {m}")?,
        (true, None) => writeln!(f, "\t\tlocked lladdr")?,
        (false, Some(m)) => writeln!(f, "\t\tlladdr {m}")?,
        (false, None) => {}
    }
    if let Some(r) = i.rdomain {
        writeln!(f, "\t\trdomain {r}")?;
    }
    writeln!(f, "\t\t{}", if i.up { "up" } else { "down" })?;
    writeln!(f, "\t}}")
}

fn write_allow(f: &mut Formatter<'_>, a: &AllowInstance) -> fmt::Result {
    let mut items: Vec<String> = [
        (a.boot, "boot"),
        (a.memory, "memory"),
        (a.vcpus, "vcpus"),
        (a.interface, "interface"),
        (a.disk, "disk"),
        (a.cdrom, "cdrom"),
        (a.instance, "instance"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| n.to_string())
    .collect();
    if let Some(o) = &a.owner {
        items.push(format!("owner {}", q(o)));
    }
    writeln!(f, "\tallow instance {{ {} }}", items.join(", "))
}
