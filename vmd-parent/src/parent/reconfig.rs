//! vm.conf at run time: reload, load, reset, and the staggered autostart
//! queue.

use super::*;

impl Parent {
    /// Re-reads the configuration file; on any error nothing changes.
    pub(super) fn reload(&mut self) -> Result<(), String> {
        let config = initial_config(&self.opts)?;
        set_socket_owner(&self.opts.socket, &config)?;
        self.apply_config(config, true)
    }

    /// Takes a configuration's VM definitions: new VMs are added (and
    /// queued to start when enabled), stopped ones take their new
    /// definition, running ones are left untouched until their next start.
    /// With `replace`, stopped VMs the configuration no longer defines are
    /// forgotten. Everything is resolved first, so an error changes nothing.
    pub(super) fn apply_config(
        &mut self,
        config: vmd_config::Config,
        replace: bool,
    ) -> Result<(), String> {
        let mut resolved = Vec::new();
        for def in &config.vms {
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
            resolved.push((def, spec, owner, allow));
        }
        if replace {
            let defined: Vec<&str> = config.vms.iter().map(|d| d.name.as_str()).collect();
            let gone: Vec<u32> = self
                .vms
                .vms
                .values()
                .filter(|vm| vm.defined.is_some() && !vm.is_active())
                .filter(|vm| !defined.contains(&vm.name.as_str()))
                .map(|vm| vm.id)
                .collect();
            for id in gone {
                if let Some(vm) = self.vms.vms.remove(&id) {
                    info!("vm {}: no longer defined, forgotten", vm.name);
                }
            }
        }
        for (def, spec, owner, allow) in resolved {
            match self.vms.by_name(&def.name).map(|vm| vm.id) {
                Some(id) => {
                    let Some(vm) = self.vms.vms.get_mut(&id) else {
                        continue;
                    };
                    let unchanged = vm.defined.as_ref() == Some(&spec)
                        && vm.enabled == def.enabled
                        && vm.owner == owner
                        && vm.allow_instance == allow;
                    if unchanged {
                        continue;
                    }
                    vm.defined = Some(spec.clone());
                    vm.enabled = def.enabled;
                    vm.owner = owner;
                    vm.allow_instance = allow;
                    if !vm.is_active() {
                        vm.spec = spec;
                    }
                    info!("vm {}: definition updated", vm.name);
                }
                None => {
                    let id = self.new_vm(&def.name, spec.clone(), Some(spec), owner)?;
                    if let Some(vm) = self.vms.vms.get_mut(&id) {
                        vm.enabled = def.enabled;
                        vm.allow_instance = allow;
                        info!("vm {}: defined", vm.name);
                        if vm.enabled {
                            self.autostart.push_back(id);
                        }
                    }
                }
            }
        }
        if replace {
            self.config = config;
        } else {
            // A loaded file adds its switches too; ones already defined
            // keep their definition.
            for sw in config.switches {
                if self.config.switch(&sw.name).is_none() {
                    info!("switch {}: defined", sw.name);
                    self.config.switches.push(sw);
                }
            }
        }
        Ok(())
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
            let Some(vm) = self.vms.vms.get(&id) else {
                continue;
            };
            if vm.is_active() {
                continue;
            }
            self.begin_start(id, None);
            started += 1;
        }
        self.next_autostart = Instant::now() + delay;
    }

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

    /// Completes a reset once every VM has stopped: forgets them all and
    /// reads the configuration afresh.
    pub(super) fn finish_reset(&mut self) {
        let Some((client, what)) = self.pending_reset else {
            return;
        };
        if self.vms.vms.values().any(|vm| vm.proc.is_some()) || !self.pending.is_empty() {
            return;
        }
        self.pending_reset = None;
        if matches!(what, ResetWhat::All | ResetWhat::Vms) {
            self.vms.vms.clear();
        }
        match self.reload() {
            Ok(()) => self.reply(client, Reply::Ok("reset done".into()), &[]),
            Err(e) => self.error(client, format!("reset done, but reload failed: {e}")),
        }
    }
}
