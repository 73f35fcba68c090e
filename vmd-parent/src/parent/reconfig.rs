//! vm.conf at run time: reload, load, reset, and the staggered autostart
//! queue, as OpenBSD's vmd does them (vmd_reload, start_vm_batch), except
//! that a broken file changes nothing.

use super::*;

/// A vm.conf VM definition with its owners resolved to ids: everything
/// that can fail is done before the VM table changes.
struct Resolved {
    name: String,
    spec: VmSpec,
    enabled: bool,
    owner: VmOwner,
    allow: Option<(vmd_config::AllowInstance, Option<VmOwner>)>,
}

fn resolve(config: &vmd_config::Config) -> Result<Vec<Resolved>, String> {
    config
        .vms
        .iter()
        .map(|def| {
            let spec = crate::conf::spec_of(def)?;
            let owner = match &def.owner {
                Some(o) => crate::conf::resolve_owner(o, &def.defined_at)?,
                None => VmOwner::root(),
            };
            let allow = match &def.allow_instance {
                Some(a) => {
                    let who = match &a.owner {
                        Some(o) => Some(crate::conf::resolve_owner(o, &def.defined_at)?),
                        None => None,
                    };
                    Some((a.clone(), who))
                }
                None => None,
            };
            Ok(Resolved {
                name: def.name.clone(),
                spec,
                enabled: def.enabled,
                owner,
                allow,
            })
        })
        .collect()
}

impl Parent {
    /// SIGHUP, `vmctl reload`: re-reads the configuration file. As on
    /// OpenBSD, every VM that is not running is forgotten, the file's VMs
    /// are defined afresh and every enabled VM that is not running is
    /// queued to start in staggered groups; a running VM stays and takes
    /// its new definition at its next start. On any error in the file
    /// nothing changes.
    pub(super) fn reload(&mut self) -> Result<(), String> {
        let config = initial_config(&self.opts)?;
        let resolved = resolve(&config)?;
        set_socket_owner(&self.opts.socket, &config)?;
        if config.globals.metrics_listen != self.metrics_listen {
            warn!("metrics listen changed: it takes effect when vmd restarts");
        }
        self.forget_idle();
        self.config = config;
        self.define(resolved);
        self.reloads += 1;
        self.queue_enabled();
        Ok(())
    }

    /// At start: the first configuration, its enabled VMs queued.
    pub(super) fn configure(&mut self, config: vmd_config::Config) -> Result<(), String> {
        let resolved = resolve(&config)?;
        self.config = config;
        self.define(resolved);
        self.queue_enabled();
        Ok(())
    }

    /// `vmctl load FILE`: adds the VMs FILE defines without forgetting
    /// any (a VM already known takes FILE's definition for its next
    /// start), and the switches vmd does not know yet; enabled VMs that
    /// are not running are queued.
    pub(super) fn load(&mut self, path: &std::path::Path) -> Result<(), String> {
        let config = crate::conf::load(path, &self.opts.defines)?;
        let resolved = resolve(&config)?;
        for sw in config.switches {
            if self.config.switch(&sw.name).is_none() {
                info!("switch {}: defined", sw.name);
                self.config.switches.push(sw);
            }
        }
        self.define(resolved);
        self.queue_enabled();
        Ok(())
    }

    /// Forgets every VM that has no process and no start in progress.
    fn forget_idle(&mut self) {
        self.autostart.clear();
        self.vms.vms.retain(|_, vm| {
            let keep = vm.is_active();
            if !keep {
                debug!("vm {}: not running, forgotten", vm.name);
            }
            keep
        });
    }

    /// Enters resolved definitions into the VM table.
    fn define(&mut self, resolved: Vec<Resolved>) {
        for def in resolved {
            if let Some(vm) = self.vms.by_name_mut(&def.name) {
                let unchanged = vm.defined.as_ref() == Some(&def.spec)
                    && vm.enabled == def.enabled
                    && vm.owner == def.owner
                    && vm.allow_instance == def.allow;
                if !vm.is_active() {
                    vm.spec = def.spec.clone();
                }
                if vm.owner != def.owner {
                    // A running VM keeps its pty: only its new owner (and
                    // root) may open it from now on.
                    vm.console.set_owner(def.owner.uid.unwrap_or(0));
                }
                vm.defined = Some(def.spec);
                vm.enabled = def.enabled;
                vm.owner = def.owner;
                vm.allow_instance = def.allow;
                if !unchanged {
                    info!("vm {}: definition updated", vm.name);
                }
                continue;
            }
            match self.new_vm(&def.name, def.spec.clone(), Some(def.spec), def.owner) {
                Ok(id) => {
                    if let Some(vm) = self.vms.vms.get_mut(&id) {
                        vm.enabled = def.enabled;
                        vm.allow_instance = def.allow;
                        debug!("vm {}: defined", vm.name);
                    }
                }
                // Not the file's fault (a pty, the console log): the other
                // VMs still get defined.
                Err(e) => error!("{e}"),
            }
        }
    }

    /// Queues every enabled VM that is not running (state `waiting`), in
    /// id order, and lets the first group go now, as OpenBSD's reload
    /// does; later groups follow `staggered start ... delay` apart.
    fn queue_enabled(&mut self) {
        for vm in self.vms.vms.values_mut() {
            if vm.enabled && !vm.is_active() && !self.autostart.contains(&vm.id) {
                vm.state = VmState::Waiting;
                self.autostart.push_back(vm.id);
            }
        }
        self.next_autostart = Instant::now();
        // On time even when nothing else wakes the parent: this group now,
        // the next by the poll timeout (next_deadline).
        self.autostart_due();
    }

    /// Starts the next group of queued VMs when its time has come.
    pub(super) fn autostart_due(&mut self) {
        if self.autostart.is_empty() || Instant::now() < self.next_autostart || self.shutting_down {
            return;
        }
        let (parallel, delay) = crate::conf::stagger(&self.config);
        let mut started = 0;
        while started < parallel {
            let Some(id) = self.autostart.pop_front() else {
                break;
            };
            // Started by hand, stopped or forgotten meanwhile.
            if !self
                .vms
                .vms
                .get(&id)
                .is_some_and(|vm| vm.state == VmState::Waiting)
            {
                continue;
            }
            self.begin_start(id, None);
            started += 1;
        }
        self.next_autostart = Instant::now() + delay;
    }

    /// Takes VM `id` out of the start queue (it was stopped or started
    /// by hand).
    pub(super) fn dequeue(&mut self, id: u32) {
        self.autostart.retain(|v| *v != id);
        if let Some(vm) = self.vms.vms.get_mut(&id) {
            if vm.state == VmState::Waiting {
                vm.state = VmState::Stopped;
            }
        }
    }

    /// `vmctl reset [all|vms|switches]`: as on OpenBSD, only purges.
    /// `vms` kills every VM and forgets them all once they are gone;
    /// `switches` forgets the switch definitions (their bridges stay until
    /// vmd exits); `all` does both. `vmctl reload` reads vm.conf again.
    pub(super) fn reset_request(&mut self, client: u32, what: ResetWhat) {
        if self.pending_reset.is_some() {
            return self.error(client, "a reset is already in progress".into());
        }
        info!("reset {what:?}");
        if matches!(what, ResetWhat::All | ResetWhat::Vms) {
            self.autostart.clear();
            let ids: Vec<u32> = self.vms.vms.keys().copied().collect();
            for id in ids {
                self.request_stop(id, StopHow::Kill);
            }
        }
        self.pending_reset = Some((client, what));
        self.finish_reset();
    }

    /// Completes a reset once every VM has stopped.
    pub(super) fn finish_reset(&mut self) {
        let Some((client, what)) = self.pending_reset else {
            return;
        };
        let vms = matches!(what, ResetWhat::All | ResetWhat::Vms);
        if vms && (self.vms.vms.values().any(|vm| vm.proc.is_some()) || !self.pending.is_empty()) {
            return;
        }
        self.pending_reset = None;
        if vms {
            self.vms.vms.clear();
        }
        if matches!(what, ResetWhat::All | ResetWhat::Switches) {
            self.config.switches.clear();
        }
        self.reply(client, Reply::Ok("reset done".into()), &[]);
    }
}
