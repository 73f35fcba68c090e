//! Starting a VM: asking priv for every file and TAP it needs, then
//! spawning its VM process with all of them; a start that fails leaves
//! nothing behind.

use super::*;

use std::path::Path;

use vmd_proto::vm::DiskFormat as Format;

/// A start in progress: the fds priv has opened for it so far.
pub(super) struct PendingStart {
    pub(super) vm_id: u32,
    pub(super) kvm: Option<OwnedFd>,
    pub(super) kernel: Option<OwnedFd>,
    pub(super) initrd: Option<OwnedFd>,
    pub(super) need_initrd: bool,
    /// The CD-ROM image, when the VM has one.
    pub(super) cdrom: Option<OwnedFd>,
    pub(super) need_cdrom: bool,
    /// iPXE's ROM, for `boot device net`.
    pub(super) option_rom: Option<OwnedFd>,
    pub(super) need_option_rom: bool,
    /// Per disk: its top image and backing files, once priv sent them.
    pub(super) disks: Vec<Option<Vec<OwnedFd>>>,
    /// Per interface: the TAP priv made, and whether priv has configured
    /// it (bridge, alias, address, up).
    pub(super) taps: Vec<Option<Tap>>,
}

pub(super) struct Tap {
    pub(super) name: String,
    pub(super) fd: OwnedFd,
    pub(super) configured: bool,
}

impl PendingStart {
    pub(super) fn complete(&self) -> bool {
        self.kvm.is_some()
            && self.kernel.is_some()
            && (!self.need_initrd || self.initrd.is_some())
            && (!self.need_cdrom || self.cdrom.is_some())
            && (!self.need_option_rom || self.option_rom.is_some())
            && self.disks.iter().all(Option::is_some)
            && self
                .taps
                .iter()
                .all(|t| t.as_ref().is_some_and(|t| t.configured))
    }
}

impl Parent {
    /// Asks priv for every fd the VM needs; the VM process is spawned when
    /// the last one arrives.
    pub(super) fn begin_start(&mut self, id: u32, client: Option<u32>) {
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        vm.start_waiter = client;
        if let Some(why) = vm.spec.unsupported() {
            return self.start_failed(id, why);
        }
        let kernel = vm.spec.boot_image().to_string();
        vm.state = VmState::Starting;
        info!("vm {}: starting", vm.name);
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        // Each path is opened with the rights of whoever named it; vmd's
        // own (/dev/kvm, the firmware, the boot ROM) with root's.
        let named = &vm.spec.named_by;
        let kernel_by = match vm.spec.kernel {
            Some(_) => named.kernel.clone(),
            None => Opener::root(),
        };
        let mut wants = vec![
            (
                OpenKind::Kvm,
                vmd_priv::KVM_PATH.to_string(),
                Opener::root(),
            ),
            (OpenKind::Kernel, kernel, kernel_by),
        ];
        if let Some(initrd) = &vm.spec.initrd {
            wants.push((OpenKind::Initrd, initrd.clone(), named.initrd.clone()));
        }
        if let Some(cdrom) = &vm.spec.cdrom {
            wants.push((OpenKind::Cdrom, cdrom.clone(), named.cdrom.clone()));
        }
        if vm.spec.boot_net() {
            wants.push((
                OpenKind::OptionRom,
                crate::vms::NET_BOOT_ROM_PATH.to_string(),
                Opener::root(),
            ));
        }
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            let kind = OpenKind::Tap { index: index as u8 };
            wants.push((kind, nic.tap.clone().unwrap_or_default(), Opener::root()));
        }
        for (index, disk) in vm.spec.disks.iter().enumerate() {
            let kind = OpenKind::Disk {
                index: index as u8,
                read_only: disk.read_only,
                format: Format::named_or_of(disk.format, Path::new(&disk.path)),
            };
            // A spec has one namer per disk; were one missing, the disk
            // opens with nobody's rights, never root's.
            let by = named
                .disks
                .get(index)
                .cloned()
                .unwrap_or_else(Opener::nobody);
            wants.push((kind, disk.path.clone(), by));
        }
        self.pending.insert(
            seq,
            PendingStart {
                vm_id: id,
                kvm: None,
                kernel: None,
                initrd: None,
                need_initrd: vm.spec.initrd.is_some(),
                cdrom: None,
                need_cdrom: vm.spec.cdrom.is_some(),
                option_rom: None,
                need_option_rom: vm.spec.boot_net(),
                disks: vm.spec.disks.iter().map(|_| None).collect(),
                taps: vm.spec.nics.iter().map(|_| None).collect(),
            },
        );
        for (kind, path, opener) in wants {
            let msg = Msg::PrivOpen { kind, path, opener };
            if let Err(e) = self.privsep.chan.send(&msg, seq, &[]) {
                self.pending.remove(&seq);
                self.start_failed(id, format!("asking priv to open files: {e}"));
                return;
            }
        }
    }

    pub(super) fn priv_readable(&mut self) {
        let frame = match self.privsep.chan.recv() {
            Ok(frame) => frame,
            Err(ChannelError::Closed) => return,
            Err(e) if e.is_would_block() => return,
            Err(e) => {
                warn!("priv: {e}");
                return;
            }
        };
        let seq = frame.peer_id;
        // Replies for a start that already failed or was cancelled are
        // dropped here, closing their fds.
        let Some(pending) = self.pending.get_mut(&seq) else {
            return;
        };
        let vm_id = pending.vm_id;
        match frame.msg {
            Msg::PrivOpened { kind } => {
                let fd = frame.fds.into_iter().next();
                match kind {
                    OpenKind::Kvm => pending.kvm = fd,
                    OpenKind::Kernel => pending.kernel = fd,
                    OpenKind::Initrd => pending.initrd = fd,
                    OpenKind::Cdrom => pending.cdrom = fd,
                    OpenKind::OptionRom => pending.option_rom = fd,
                    OpenKind::Disk { .. } | OpenKind::Tap { .. } | OpenKind::Interface => {
                        warn!("priv answered {kind:?} with PrivOpened");
                        return;
                    }
                }
            }
            Msg::PrivOpenedTap { index, name } => {
                let Some(fd) = frame.fds.into_iter().next() else {
                    return;
                };
                let config = self.tap_config(vm_id, index, &name);
                let Some(pending) = self.pending.get_mut(&seq) else {
                    return;
                };
                match (pending.taps.get_mut(usize::from(index)), config) {
                    (Some(slot), Ok(msg)) => {
                        *slot = Some(Tap {
                            name,
                            fd,
                            configured: false,
                        });
                        if let Err(e) = self.privsep.chan.send(&msg, seq, &[]) {
                            self.pending.remove(&seq);
                            return self
                                .start_failed(vm_id, format!("asking priv to configure {e}"));
                        }
                    }
                    (None, _) => {
                        warn!("priv answered for an interface {index} this VM does not have")
                    }
                    (_, Err(e)) => {
                        self.pending.remove(&seq);
                        return self.start_failed(vm_id, e);
                    }
                }
                return;
            }
            Msg::PrivIfDone { name } => {
                match pending.taps.iter_mut().flatten().find(|t| t.name == name) {
                    Some(tap) => tap.configured = true,
                    None => warn!("priv configured {name}, which this start does not know"),
                }
            }
            Msg::PrivOpenedDisk { index, .. } => match pending.disks.get_mut(usize::from(index)) {
                Some(slot) => *slot = Some(frame.fds),
                None => warn!("priv answered for a disk {index} this VM does not have"),
            },
            Msg::PrivFailed {
                kind,
                path: _,
                reason,
            } => {
                self.pending.remove(&seq);
                let what = match kind {
                    OpenKind::Kvm => "kvm device".to_string(),
                    OpenKind::Kernel => "kernel".to_string(),
                    OpenKind::Initrd => "initrd".to_string(),
                    OpenKind::Cdrom => "cdrom".to_string(),
                    OpenKind::OptionRom => "network boot ROM".to_string(),
                    OpenKind::Disk { index, .. } => format!("disk {index}:"),
                    OpenKind::Tap { index } => format!("interface {index}:"),
                    OpenKind::Interface => "interface".to_string(),
                };
                return self.start_failed(vm_id, format!("{what} {reason}"));
            }
            other => {
                warn!("priv sent unexpected message type {}", other.type_code());
                return;
            }
        }
        if self.pending.get(&seq).is_some_and(PendingStart::complete) {
            if let Some(p) = self.pending.remove(&seq) {
                self.launch(p);
            }
        }
    }

    /// How priv should set up interface `index`'s TAP: its switch's bridge,
    /// group, up/down, and for a local interface the host side of its /31.
    pub(super) fn tap_config(&self, vm_id: u32, index: u8, name: &str) -> Result<Msg, String> {
        let vm = self.vms.vms.get(&vm_id).ok_or("vm vanished")?;
        let nic = vm
            .spec
            .nics
            .get(usize::from(index))
            .ok_or_else(|| format!("interface {index} unknown"))?;
        // As on OpenBSD, a switch that is not defined is ignored, with a
        // warning: the interface is a plain one.
        let def = nic.switch.as_ref().and_then(|sw| {
            let def = self.config.switch(sw);
            if def.is_none() {
                warn!(
                    "vm {}: interface {index}: switch {sw} not found, joining no switch",
                    vm.name
                );
            }
            def
        });
        let switch = match def {
            None => None,
            Some(def) => {
                let sw = &def.name;
                if !def.enabled {
                    return Err(format!("interface {index}: switch {sw} is disabled"));
                }
                Some(vmd_proto::msg::SwitchParams {
                    bridge: def.interface.clone(),
                    group: def.group.clone(),
                    up: def.up,
                    rdomain: def.rdomain,
                    ifgroup: def.group.as_deref().and_then(crate::conf::ifgroup_id),
                })
            }
        };
        let host_addr = match nic.local {
            false => None,
            true => Some((self.local_pair(vm_id, index)?.0, 31)),
        };
        let host_addr6 = match nic.local {
            false => None,
            true => self
                .local_pair6(vm_id, index)?
                .map(|(host, _)| (host, vmd_proto::net::LOCAL_PREFIX6_LEN)),
        };
        // OpenBSD gives the TAP its own group and its switch's; Linux has
        // one group per interface: its own, else the switch's.
        let ifgroup = nic
            .group
            .as_deref()
            .and_then(crate::conf::ifgroup_id)
            .or(switch.as_ref().and_then(|sw| sw.ifgroup));
        Ok(Msg::PrivIfConfig {
            name: name.to_string(),
            // A bridge port is in its bridge's VRF (a warning at load).
            rdomain: nic.rdomain.filter(|_| switch.is_none()),
            switch,
            group: nic.group.clone(),
            up: nic.up,
            host_addr,
            host_addr6,
            ifgroup,
        })
    }

    /// A local interface's IPv6 addresses under `local inet6`: (host,
    /// guest) in its /96, as OpenBSD assigns them.
    pub(super) fn local_pair6(
        &self,
        vm_id: u32,
        index: u8,
    ) -> Result<Option<(std::net::Ipv6Addr, std::net::Ipv6Addr)>, String> {
        let Some(p) = &self.config.globals.local_inet6 else {
            return Ok(None);
        };
        // `local inet6` without a prefix: OpenBSD's random ULA prefix,
        // drawn once per vmd run.
        let prefix = if *p == vmd_config::DEFAULT_LOCAL_PREFIX6 {
            self.auto_prefix6
        } else {
            p.addr
        };
        let (_, guest4) = self.local_pair(vm_id, index)?;
        Ok(Some(vmd_proto::net::local_pair6(prefix, guest4)))
    }

    /// A local interface's /31: (host, guest).
    pub(super) fn local_pair(&self, vm_id: u32, index: u8) -> Result<(Ipv4Addr, Ipv4Addr), String> {
        let prefix = &self.config.globals.local_prefix;
        vmd_proto::net::local_pair((prefix.addr, prefix.len), vm_id, index).ok_or_else(|| {
            format!(
                "interface {index}: local prefix {}/{} has no /31 left for vm {vm_id}",
                prefix.addr, prefix.len
            )
        })
    }

    /// Whether an interface's guest may send only from its own MAC:
    /// `locked lladdr` on the interface or on its switch.
    pub(super) fn nic_locked(&self, nic: &vmd_proto::vm::NicSpec) -> bool {
        nic.locked
            || nic
                .switch
                .as_ref()
                .and_then(|sw| self.config.switch(sw))
                .is_some_and(|sw| sw.locked_lladdr)
    }

    /// What the VM process needs to run interface `index`.
    pub(super) fn nic_params(&self, vm: &Vm, index: usize) -> Result<NicParams, String> {
        let nic = &vm.spec.nics[index];
        let dhcp = match nic.local {
            false => None,
            true => {
                let (host, guest) = self.local_pair(vm.id, index as u8)?;
                Some(DhcpLease {
                    guest,
                    host,
                    prefix_len: 31,
                    dns: None,
                    // The host side is the next server (DhcpServer).
                    boot_file: vm.spec.boot_filename.clone().filter(|_| vm.spec.boot_net()),
                })
            }
        };
        Ok(NicParams {
            mac: nic
                .lladdr
                .unwrap_or_else(|| vmd_proto::net::generated_mac(&vm.name, index as u8)),
            locked: self.nic_locked(nic),
            dhcp,
            // The ROM boots from the first interface.
            boot_rom: vm.spec.boot_net() && index == 0,
        })
    }

    pub(super) fn launch(&mut self, p: PendingStart) {
        let id = p.vm_id;
        let Some(vm) = self.vms.vms.get(&id) else {
            return;
        };
        let (Some(kvm), Some(kernel)) = (p.kvm, p.kernel) else {
            return;
        };
        let tty = match vm.console.slave_for_vm() {
            Ok(fd) => fd,
            Err(e) => return self.start_failed(id, format!("console: {e}")),
        };
        let params = VmmParams {
            id,
            name: vm.name.clone(),
            memory: vm.spec.memory,
            vcpus: vm.spec.vcpus,
            cmdline: vm.spec.cmdline.clone(),
            has_initrd: p.initrd.is_some(),
            uid: self.user.0,
            gid: self.user.1,
            verbose: self.opts.verbose > 0,
            cdrom: p.cdrom.is_some(),
            boot_device: vm.spec.boot_device,
            disks: vm
                .spec
                .disks
                .iter()
                .zip(&p.disks)
                .map(|(spec, fds)| DiskParams {
                    format: Format::named_or_of(spec.format, Path::new(&spec.path)),
                    read_only: spec.read_only,
                    backing: fds.as_ref().map_or(0, |f| f.len().saturating_sub(1)) as u32,
                })
                .collect(),
            nics: match (0..vm.spec.nics.len())
                .map(|i| self.nic_params(vm, i))
                .collect()
            {
                Ok(nics) => nics,
                Err(e) => return self.start_failed(id, e),
            },
        };
        // One device process per disk, CD-ROM and nic, all started now
        // (they open and check their images while the VM process builds
        // the VM); each gets its image or TAP and one end of a channel to
        // the VM process, which gets the other end.
        // Each kind's fds, in the order of `device_kinds`.
        let mut backend_fds: Vec<Vec<BorrowedFd<'_>>> = Vec::new();
        backend_fds.extend(
            p.disks
                .iter()
                .map(|fds| fds.iter().flatten().map(|f| f.as_fd()).collect()),
        );
        backend_fds.extend(p.cdrom.iter().map(|iso| vec![iso.as_fd()]));
        backend_fds.extend(
            p.taps
                .iter()
                .map(|tap| tap.iter().map(|t| t.fd.as_fd()).collect()),
        );
        let backend_fds: Vec<_> = params.device_kinds().into_iter().zip(backend_fds).collect();
        let mut devices = Vec::new();
        let mut vm_ends = Vec::new();
        for (kind, fds) in backend_fds {
            match self.spawn_device(vm, &params, kind, &fds) {
                Ok((dev, vm_end)) => {
                    devices.push(dev);
                    vm_ends.push(vm_end);
                }
                Err(e) => {
                    for d in &devices {
                        let _ = kill(d.pid, Signal::SIGKILL);
                    }
                    return self.start_failed(id, e);
                }
            }
        }
        // In the order VmmParams::fds gives, which the VM process reads by.
        let fds: Option<Vec<BorrowedFd<'_>>> = params
            .fds()
            .into_iter()
            .map(|what| match what {
                VmmFd::Kvm => Some(kvm.as_fd()),
                VmmFd::Console => Some(tty.as_fd()),
                VmmFd::Kernel => Some(kernel.as_fd()),
                VmmFd::Initrd => p.initrd.as_ref().map(|f| f.as_fd()),
                VmmFd::Device(i) => vm_ends.get(i).map(|c| c.as_fd()),
                VmmFd::OptionRom => p.option_rom.as_ref().map(|f| f.as_fd()),
            })
            .collect();
        let Some(fds) = fds else {
            for d in &devices {
                let _ = kill(d.pid, Signal::SIGKILL);
            }
            return self.start_failed(id, "internal: an fd VmmStart needs is missing".into());
        };
        let extra = ["--vm".into(), vm.name.clone()];
        let child = match spawn_sending(
            Role::Vmm,
            Role::Vmm.def().title,
            &self.opts,
            &extra,
            |chan| {
                chan.send(&Msg::VmmStart(params), id, &fds)
                    .map_err(|e| e.to_string())
            },
        ) {
            Ok(child) => child,
            Err(e) => {
                for d in &devices {
                    // Reaped by the SIGCHLD path as unknown children.
                    let _ = kill(d.pid, Signal::SIGKILL);
                }
                let what = match e {
                    SpawnError::First(_) => "sending vm parameters",
                    SpawnError::Spawn(_) => "starting vm process",
                };
                return self.start_failed(id, format!("{what}: {e}"));
            }
        };
        // Ours of the images, TAPs and channels close when `p` and
        // `vm_ends` drop: each TAP lives exactly as long as its device
        // process holds it.
        drop(vm_ends);
        if let Err(e) = child.chan.set_nonblocking(true) {
            warn!("vm {}: {e}", vm.name);
        }
        debug!("vm {}: vm process {} started", vm.name, child.pid);
        if let Some(vm) = self.vms.vms.get_mut(&id) {
            vm.proc = Some(VmProc {
                pid: child.pid,
                chan: child.chan,
                running: false,
                stop_requested: false,
                exit_msg: None,
                terminate_at: None,
                kill_at: None,
                start_by: Some(Instant::now() + crate::limits::VMM_START_TIMEOUT),
                devices,
                device_failure: None,
                taps: p.taps.iter().flatten().map(|t| t.name.clone()).collect(),
                kvm_stats: Vec::new(),
                running_since: None,
            });
        }
    }

    /// Starts the device process for `kind` of `vm` and sends it its
    /// backend's `fds`; returns it and the VM process's end of its channel.
    fn spawn_device(
        &self,
        vm: &Vm,
        params: &VmmParams,
        kind: DevKind,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(DevProc, vmd_proto::Channel), String> {
        let name = kind.name();
        let (vm_end, dev_end) =
            vmd_proto::Channel::pair().map_err(|e| format!("{name}: channel: {e}"))?;
        let title = format!("vmd: vm {} {name}", vm.name);
        let extra = [
            "--vm".to_string(),
            vm.name.clone(),
            "--device".into(),
            name.clone(),
        ];
        let dev = DevParams {
            vm_id: params.id,
            vm_name: vm.name.clone(),
            name: name.clone(),
            kind,
            uid: params.uid,
            gid: params.gid,
            verbose: params.verbose,
        };
        let mut all = vec![dev_end.as_fd()];
        all.extend_from_slice(fds);
        // A disk counts its requests in a file we read for the metrics.
        let counters = match &dev.kind {
            DevKind::Block { .. } => Some(
                vmd_proto::stats::SharedCounters::create(&name)
                    .map_err(|e| format!("{name}: counters: {e}"))?,
            ),
            _ => None,
        };
        all.extend(counters.as_ref().map(|(fd, _)| fd.as_fd()));
        let child = spawn_sending(Role::Device, &title, &self.opts, &extra, |chan| {
            chan.send(&Msg::DevStart(dev), params.id, &all)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| match e {
            SpawnError::First(e) => format!("{name}: sending its parameters: {e}"),
            SpawnError::Spawn(e) => format!("starting device process {name}: {e}"),
        })?;
        debug!(
            "vm {}: device process {name} started ({})",
            vm.name, child.pid
        );
        Ok((
            DevProc {
                name,
                pid: child.pid,
                alive: true,
                disk_stats: counters.map(|(_, map)| map),
            },
            vm_end,
        ))
    }

    /// A start failed before the VM ran: tell the client; a VM that never
    /// ran is forgotten so the failed start leaves nothing behind.
    pub(super) fn start_failed(&mut self, id: u32, reason: String) {
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let name = vm.name.clone();
        warn!("vm {name}: start failed: {reason}");
        if let Some(client) = vm.start_waiter.take() {
            self.reply(client, Reply::Error(format!("vm {name}: {reason}")), &[]);
        }
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        // A vm.conf VM stays defined (stopped, with the reason).
        if vm.ever_ran || vm.defined.is_some() {
            vm.state = VmState::Stopped;
            vm.last_exit = Some(ExitReason::VmmError(reason));
            vm.console.detach_all();
            self.notify_stop_waiters(id);
            return self.forget_if_instance(id);
        } else {
            self.vms.vms.remove(&id);
            let log = self.console_dir.join(format!("{name}.log"));
            if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(log);
            }
        }
        self.notify_stop_waiters(id);
    }
}
