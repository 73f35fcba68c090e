//! `vm` blocks: their settings, interfaces and `allow instance`.

use super::*;

impl FileParser<'_> {
    pub(super) fn vm(&mut self, at: Location) -> Result<()> {
        let (first, first_at) = self.value("vm name")?;
        let (name, name_at, parent) = if self.peek_word() == Some("instance") {
            self.advance();
            let (n, a) = self.value("instance name")?;
            (n, a, Some((first, first_at)))
        } else {
            (first, first_at, None)
        };
        validate_name(&name).map_err(|m| err(name_at.clone(), m))?;
        if let Some(&i) = self.st.vm_index.get(&name) {
            let prev = &self.st.cfg.vms[i].defined_at;
            return Err(err(
                name_at,
                format!("duplicate vm \"{name}\" (first defined at {prev})"),
            ));
        }

        let mut inst = None;
        let mut vm = match parent {
            None => VmDef::new(name.clone(), at),
            Some((pname, pat)) => {
                let Some(&pi) = self.st.vm_index.get(&pname) else {
                    return Err(err(pat, format!("instance of undefined vm \"{pname}\"")));
                };
                let p = &self.st.cfg.vms[pi];
                // vm.conf is root's, and root may make any instance, of an
                // instance too, changing anything (OpenBSD's vm.conf(5)):
                // `allow instance` binds only users' `vmctl start -t`.
                let allow = p.allow_instance.clone().unwrap_or_default();
                let mut vm = p.clone();
                vm.name = name.clone();
                vm.defined_at = at;
                vm.instance_of = Some(pname.clone());
                // Not inherited: templates are often disabled themselves.
                vm.enabled = true;
                // Users may make instances of it only if its parent says so.
                if !allow.instance {
                    vm.allow_instance = None;
                }
                inst = Some(InstanceCtx {
                    disks_replaced: false,
                    ifaces_replaced: false,
                });
                vm
            }
        };
        let mut seen = HashSet::new();
        self.block("vm block", |p, kw, at| {
            p.vm_item(&mut vm, &mut seen, inst.as_mut(), kw, at)
        })?;
        self.st.vm_index.insert(name, self.st.cfg.vms.len());
        self.st.cfg.vms.push(vm);
        Ok(())
    }

    pub(super) fn vm_item(
        &mut self,
        vm: &mut VmDef,
        seen: &mut HashSet<&'static str>,
        inst: Option<&mut InstanceCtx>,
        kw: &str,
        at: Location,
    ) -> Result<()> {
        let mut inst = inst;
        let mut once = |key: &'static str, at: &Location| {
            if seen.insert(key) {
                Ok(())
            } else {
                Err(err(at.clone(), format!("{key} specified more than once")))
            }
        };
        match kw {
            "enable" => vm.enabled = true,
            "disable" => vm.enabled = false,
            "memory" => {
                once("memory", &at)?;
                let (s, vat) = self.value("memory size")?;
                vm.memory = Some(self.memory_size(&s, vat)?);
            }
            "vcpus" => {
                once("vcpus", &at)?;
                vm.vcpus = Some(self.number("vcpus", 1, MAX_VCPUS)?);
            }
            "boot" => {
                if self.peek_word() == Some("device") {
                    self.advance();
                    once("boot device", &at)?;
                    let (s, vat) = self.value("boot device")?;
                    vm.boot_device = Some(match s.as_str() {
                        "disk" => BootDevice::Disk,
                        "cdrom" => BootDevice::Cdrom,
                        "net" => BootDevice::Net,
                        _ => {
                            return Err(err(
                                vat,
                                format!("unknown boot device \"{s}\": expected disk, cdrom or net"),
                            ))
                        }
                    });
                } else if self.peek_word() == Some("filename") {
                    self.advance();
                    once("boot filename", &at)?;
                    let (s, vat) = self.value("boot file name")?;
                    if s.is_empty()
                        || s.len() > MAX_BOOT_FILENAME
                        || !s.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(err(
                            vat,
                            format!(
                                "boot filename must be 1 to {MAX_BOOT_FILENAME} printable characters without spaces"
                            ),
                        ));
                    }
                    vm.boot_filename = Some(s);
                } else {
                    once("boot", &at)?;
                    vm.kernel = Some(self.path("boot path")?);
                }
            }
            "initrd" => {
                once("initrd", &at)?;
                vm.initrd = Some(self.path("initrd path")?);
            }
            "cmdline" => {
                once("cmdline", &at)?;
                let (s, vat) = self.value("kernel command line")?;
                if s.len() > MAX_CMDLINE {
                    return Err(err(
                        vat,
                        format!("cmdline is longer than {MAX_CMDLINE} bytes"),
                    ));
                }
                vm.cmdline = Some(s);
            }
            "cdrom" => {
                once("cdrom", &at)?;
                vm.cdrom = Some(self.path("cdrom path")?);
            }
            "disk" => {
                // An instance's own disks replace its parent's.
                if let Some(ctx) = &mut inst {
                    if !ctx.disks_replaced {
                        ctx.disks_replaced = true;
                        vm.disks.clear();
                    }
                }
                if vm.disks.len() >= MAX_DISKS {
                    return Err(err(at, format!("too many disks: at most {MAX_DISKS}")));
                }
                let path = self.path("disk path")?;
                let mut format = None;
                if self.peek_word() == Some("format") {
                    self.advance();
                    let (s, vat) = self.value("disk format")?;
                    format = Some(match s.as_str() {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => {
                            return Err(err(
                                vat,
                                format!("unknown disk format \"{s}\": expected raw or qcow2"),
                            ))
                        }
                    });
                }
                vm.disks.push(DiskDef { path, format });
            }
            "local" | "interface" => {
                let local = kw == "local";
                if local {
                    self.expect_word("interface", "local")?;
                }
                if let Some(ctx) = &mut inst {
                    if !ctx.ifaces_replaced {
                        ctx.ifaces_replaced = true;
                        vm.interfaces.clear();
                    }
                }
                if vm.interfaces.len() >= MAX_INTERFACES {
                    return Err(err(
                        at,
                        format!("too many interfaces: at most {MAX_INTERFACES}"),
                    ));
                }
                let ifd = self.interface(local)?;
                vm.interfaces.push(ifd);
            }
            "interfaces" => {
                once("interfaces", &at)?;
                vm.interface_count = Some(self.number("interfaces", 1, MAX_INTERFACES as u32)?);
            }
            "owner" => {
                once("owner", &at)?;
                let (s, vat) = self.value("owner")?;
                vm.owner = Some(parse_owner(&s, vat)?);
            }
            "allow" => {
                self.expect_word("instance", "allow")?;
                once("allow instance", &at)?;
                vm.allow_instance = Some(self.allow_instance()?);
            }
            _ => return Err(self.unknown(kw, at, "in vm block", VM_KEYWORDS)),
        }
        Ok(())
    }

    pub(super) fn memory_size(&mut self, s: &str, at: Location) -> Result<u64> {
        let b = parse_size(s).map_err(|e| err(at.clone(), e.to_string()))?;
        check_memory_range(b).map_err(|e| err(at.clone(), e.to_string()))?;
        let rounded = b / MEMORY_UNIT * MEMORY_UNIT;
        if rounded != b {
            self.warn(
                at,
                format!("memory size {s} rounded down to {}M", rounded >> 20),
            );
        }
        Ok(rounded)
    }

    /// After `[local] interface`: `[NAME] [{ ... }]`.
    pub(super) fn interface(&mut self, local: bool) -> Result<InterfaceDef> {
        let mut ifd = InterfaceDef {
            local,
            ..InterfaceDef::default()
        };
        match self.peek().tok {
            Tok::Word(_) | Tok::Str(_) | Tok::Macro(_) => {
                let (n, at) = self.value("interface name")?;
                check_ifname(&n, at)?;
                ifd.name = Some(n);
            }
            _ => {}
        }
        if self.peek().tok != Tok::LBrace {
            return Ok(ifd);
        }
        let mut seen = HashSet::new();
        let mut rdomain_at = None;
        self.block("interface block", |p, kw, at| {
            let mut once = |key: &'static str| {
                if seen.insert(key) {
                    Ok(())
                } else {
                    Err(err(at.clone(), format!("{key} specified more than once")))
                }
            };
            match kw {
                "switch" => {
                    once("switch")?;
                    let (s, sat) = p.value("switch name")?;
                    p.st.switch_refs.push((s.clone(), sat));
                    ifd.switch = Some(s);
                }
                "group" => {
                    once("group")?;
                    let (s, gat) = p.value("group name")?;
                    check_group(&s, gat.clone())?;
                    p.st.cfg.group_refs.push((s.clone(), gat));
                    ifd.group = Some(s);
                }
                "locked" | "lladdr" => {
                    if kw == "locked" {
                        p.expect_word("lladdr", "locked")?;
                        ifd.locked = true;
                    }
                    once("lladdr")?;
                    ifd.lladdr = p.optional_mac()?;
                }
                "rdomain" => {
                    once("rdomain")?;
                    ifd.rdomain = Some(p.number("rdomain", 0, 255)?);
                    rdomain_at = Some(at.clone());
                }
                "up" => ifd.up = true,
                "down" => ifd.up = false,
                _ => return Err(p.unknown(kw, at.clone(), "in interface block", IFACE_KEYWORDS)),
            }
            Ok(())
        })?;
        if let (Some(at), Some(_)) = (rdomain_at, &ifd.switch) {
            // A bridge port cannot be in a VRF of its own on Linux.
            self.warn(
                at,
                "rdomain of an interface on a switch is ignored: on Linux the \
                 switch's bridge is in a VRF, with all its ports (give the switch the rdomain)",
            );
        }
        Ok(ifd)
    }

    /// The MAC after `lladdr`, if one is there.
    pub(super) fn optional_mac(&mut self) -> Result<Option<MacAddr>> {
        match &self.peek().tok {
            Tok::Word(w) if IFACE_KEYWORDS.contains(&w.as_str()) => Ok(None),
            Tok::Word(_) | Tok::Str(_) | Tok::Macro(_) => {
                let (s, at) = self.value("MAC address")?;
                parse_mac(&s, at).map(Some)
            }
            _ => Ok(None),
        }
    }

    pub(super) fn allow_instance(&mut self) -> Result<AllowInstance> {
        let mut a = AllowInstance::default();
        let mut item = |p: &mut Self, kw: &str, at: Location| -> Result<()> {
            match kw {
                "boot" => a.boot = true,
                "memory" => a.memory = true,
                "vcpus" => a.vcpus = true,
                "interface" => a.interface = true,
                "disk" => a.disk = true,
                "cdrom" => a.cdrom = true,
                "instance" => a.instance = true,
                "owner" => {
                    if a.owner.is_some() {
                        return Err(err(at, "owner specified more than once"));
                    }
                    let (s, oat) = p.value("owner")?;
                    a.owner = Some(parse_owner(&s, oat)?);
                }
                _ => return Err(p.unknown(kw, at, "in allow instance", ALLOW_KEYWORDS)),
            }
            Ok(())
        };
        if self.peek().tok == Tok::LBrace {
            self.block("allow instance block", item)?;
        } else {
            let t = self.peek().clone();
            let at = self.loc(&t);
            match t.tok {
                Tok::Word(w) => {
                    self.advance();
                    item(self, &w, at)?;
                }
                other => {
                    return Err(err(
                        at,
                        format!(
                            "expected '{{' or a keyword after allow instance, found {}",
                            other.describe()
                        ),
                    ))
                }
            }
        }
        Ok(a)
    }
}
