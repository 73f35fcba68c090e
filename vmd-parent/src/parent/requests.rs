//! Requests from vmctl clients (through control): start, stop, status,
//! console, pause, wait, log; who may do what.

use super::*;
use crate::limits::{MAX_CONSOLES_PER_VM, MAX_INSTANCES_PER_USER, VMM_REQUEST_TIMEOUT};
use crate::rights::{Ceiling, Origin};

impl Parent {
    pub(super) fn control_readable(&mut self) {
        let frame = match self.control.chan.recv() {
            Ok(frame) => frame,
            Err(ChannelError::Closed) => return,
            Err(e) if e.is_would_block() => return,
            Err(e) => {
                warn!("control: {e}");
                return;
            }
        };
        let client = frame.peer_id;
        match frame.msg {
            Msg::ClientRequest { creds, req } => self.request(client, creds, req),
            Msg::ControlClients { count } => self.control_clients = count,
            Msg::MetricsRequest => self.metrics_reply(client),
            other => warn!("control sent unexpected message type {}", other.type_code()),
        }
    }

    pub(super) fn reply(&self, client: u32, reply: Reply, fds: &[BorrowedFd<'_>]) {
        if let Err(e) = self.control.chan.send(&Msg::Reply(reply), client, fds) {
            warn!("reply to client {client}: {e}");
        }
    }

    /// The metrics text, to a vmctl client or a scraper (both through
    /// control), in as many messages as it takes: parts cut at line ends,
    /// `Reply::Metrics` last.
    pub(super) fn metrics_reply(&self, client: u32) {
        // Room for the frame's header and encoding.
        const PART: usize = vmd_proto::MAX_PAYLOAD - 4096;
        let mut parts = crate::metrics::parts(self.metrics_text(), PART);
        let last = parts.pop().unwrap_or_default();
        for part in parts {
            self.reply(client, Reply::MetricsPart(part), &[]);
        }
        self.reply(client, Reply::Metrics(last), &[]);
    }

    pub(super) fn error(&self, client: u32, reason: String) {
        self.reply(client, Reply::Error(reason), &[]);
    }

    /// Root may do anything; a VM's owner (user, or a member of its
    /// group) may start, stop, pause, unpause, wait for and console it.
    pub(super) fn may_manage(creds: &Creds, vm: &Vm) -> bool {
        creds.uid == 0 || admits(&vm.owner, creds)
    }

    pub(super) fn request(&mut self, client: u32, creds: Creds, req: Request) {
        if self.shutting_down {
            return self.error(client, "vmd is shutting down".into());
        }
        match req {
            Request::Start(start) => self.start_request(client, creds, start),
            Request::Stop { name, force, wait } => {
                self.stop_request(client, creds, name, force, wait)
            }
            Request::Status { name } => {
                let rows: Vec<_> = match &name {
                    None => self.vms.vms.values().map(Vm::info).collect(),
                    Some(n) => match self.vms.id_of(n).and_then(|id| self.vms.vms.get(&id)) {
                        Some(vm) => vec![vm.info()],
                        None => return self.error(client, format!("vm {n} not found")),
                    },
                };
                self.reply(client, Reply::Status(rows), &[]);
            }
            Request::Console { name } => self.console_request(client, creds, &name),
            Request::Pause { name } => self.pause_request(client, creds, &name, true),
            Request::Unpause { name } => self.pause_request(client, creds, &name, false),
            Request::Wait { name } => self.wait_request(client, creds, &name),
            Request::Log { verbose } => self.log_request(client, creds, verbose),
            // As status: anyone who may use the socket.
            Request::Metrics => self.metrics_reply(client),
            Request::Load { .. } | Request::Reload | Request::Reset { .. } if creds.uid != 0 => {
                self.error(client, "permission denied".into())
            }
            Request::Reload => match self.reload() {
                Ok(()) => self.reply(client, Reply::Ok("configuration reloaded".into()), &[]),
                Err(e) => {
                    error!("reload failed, keeping the running configuration: {e}");
                    self.error(client, e)
                }
            },
            Request::Load { path } => match self.load(std::path::Path::new(&path)) {
                Ok(()) => self.reply(client, Reply::Ok(format!("loaded {path}")), &[]),
                Err(e) => {
                    error!("load {path} failed: {e}");
                    self.error(client, e)
                }
            },
            Request::Reset { what } => self.reset_request(client, what),
        }
    }

    pub(super) fn start_request(&mut self, client: u32, creds: Creds, mut req: StartRequest) {
        // `vmctl start ID`: a VM vmd knows, by number.
        if is_vm_id(&req.name) && req.template.is_none() {
            match req.name.parse().ok().and_then(|id| self.vms.vms.get(&id)) {
                Some(vm) => req.name = vm.name.clone(),
                None => return self.error(client, format!("vm {} not found", req.name)),
            }
        }
        if let Err(e) = validate_name(&req.name) {
            return self.error(client, e);
        }
        if let Some(template) = req.template.clone() {
            return self.start_instance(client, creds, &template, req);
        }
        let existing = self.vms.by_name(&req.name).map(|vm| vm.id);
        let Some(id) = existing else {
            // Defining VMs is root's; users start the ones they own.
            if creds.uid != 0 {
                return self.error(client, "permission denied".into());
            }
            let spec = match VmSpec::from_request(&req, &Opener::client(&creds)) {
                Ok(spec) => spec,
                Err(e) => return self.error(client, e),
            };
            let owner = VmOwner {
                uid: Some(0),
                gid: None,
                name: "root".into(),
            };
            match self.new_vm(&req.name, spec, None, owner) {
                Ok(id) => return self.begin_start(id, Some(client)),
                Err(e) => return self.error(client, e),
            }
        };
        let vm = &self.vms.vms[&id];
        if !Self::may_manage(&creds, vm) {
            return self.error(client, "permission denied".into());
        }
        if vm.is_active() {
            return self.error(client, format!("vm {} is already running", req.name));
        }
        // A start lays its settings over the definition (or over what the
        // ad-hoc VM or instance last ran with).
        let base = vm.defined.clone().unwrap_or_else(|| vm.spec.clone());
        let mut spec = match VmSpec::merged(&base, &req, &Opener::client(&creds)) {
            Ok(spec) => spec,
            Err(e) => return self.error(client, e),
        };
        if creds.uid != 0 {
            // Anyone but root stays under the VM's ceiling.
            let ceiling = match (&vm.origin, &vm.defined) {
                (Some(origin), _) => Ceiling::Instance(origin),
                (None, Some(defined)) => Ceiling::Owner {
                    vm: &vm.name,
                    base: defined,
                },
                (None, None) => return self.error(client, "permission denied".into()),
            };
            if let Err(e) = ceiling.check(&spec) {
                return self.error(client, e.to_string());
            }
            ceiling.keep_locks(&mut spec, |nic| self.nic_locked(nic));
        }
        if let Some(vm) = self.vms.vms.get_mut(&id) {
            vm.spec = spec;
        }
        self.begin_start(id, Some(client));
    }

    /// `vmctl start -t TEMPLATE NAME`: a new VM made from a defined one
    /// that says `allow instance`, changing only what that allows; it
    /// belongs to whoever made it.
    pub(super) fn start_instance(
        &mut self,
        client: u32,
        creds: Creds,
        template: &str,
        req: StartRequest,
    ) {
        if self.vms.by_name(&req.name).is_some() {
            return self.error(client, format!("vm {} already exists", req.name));
        }
        let Some(tpl) = self.vms.by_name(template) else {
            return self.error(client, format!("vm {template} not found"));
        };
        let (Some(base), Some((allow, who))) = (&tpl.defined, &tpl.allow_instance) else {
            return self.error(client, format!("vm {template} does not allow instances"));
        };
        let permitted = creds.uid == 0 || who.as_ref().is_some_and(|o| admits(o, &creds));
        if !permitted {
            return self.error(client, "permission denied".into());
        }
        if creds.uid != 0 {
            let made = self
                .vms
                .vms
                .values()
                .filter(|vm| vm.origin.is_some() && vm.owner.uid == Some(creds.uid))
                .count();
            if made >= MAX_INSTANCES_PER_USER {
                return self.error(
                    client,
                    format!(
                        "vm {}: you have {made} instances, the most one user may have",
                        req.name
                    ),
                );
            }
        }
        let origin = Origin {
            template: template.to_string(),
            base: base.clone(),
            allow: allow.clone(),
        };
        let mut spec = match VmSpec::merged(base, &req, &Opener::client(&creds)) {
            Ok(spec) => spec,
            Err(e) => return self.error(client, e),
        };
        if creds.uid != 0 {
            let ceiling = Ceiling::Instance(&origin);
            if let Err(e) = ceiling.check(&spec) {
                return self.error(client, e.to_string());
            }
            ceiling.keep_locks(&mut spec, |nic| self.nic_locked(nic));
        }
        let owner = VmOwner {
            uid: Some(creds.uid),
            gid: None,
            name: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(creds.uid))
                .ok()
                .flatten()
                .map_or_else(|| creds.uid.to_string(), |u| u.name),
        };
        match self.new_vm(&req.name, spec, None, owner) {
            Ok(id) => {
                info!("vm {}: instance of {template}", req.name);
                if let Some(vm) = self.vms.vms.get_mut(&id) {
                    vm.origin = Some(origin);
                }
                self.begin_start(id, Some(client))
            }
            Err(e) => self.error(client, e),
        }
    }

    pub(super) fn new_vm(
        &mut self,
        name: &str,
        spec: VmSpec,
        defined: Option<VmSpec>,
        owner: VmOwner,
    ) -> Result<u32, String> {
        let log_path = self.console_dir.join(format!("{name}.log"));
        let console = Console::new(&log_path, owner.uid.unwrap_or(0))
            .map_err(|e| format!("vm {name}: {e}"))?;
        let id = self.vms.alloc_id();
        self.vms.vms.insert(
            id,
            Vm {
                id,
                name: name.to_string(),
                spec,
                defined,
                enabled: false,
                owner,
                allow_instance: None,
                origin: None,
                state: VmState::Stopped,
                proc: None,
                console,
                last_exit: None,
                restarts: 0,
                recent_reboots: Default::default(),
                ever_ran: false,
                start_waiter: None,
                pause_waiter: None,
                pause_deadline: None,
            },
        );
        Ok(id)
    }

    pub(super) fn stop_request(
        &mut self,
        client: u32,
        creds: Creds,
        name: Option<String>,
        force: bool,
        wait: bool,
    ) {
        let ids: Vec<u32> = match &name {
            Some(n) => match self.vms.id_of(n) {
                Some(id) => vec![id],
                None => return self.error(client, format!("vm {n} not found")),
            },
            None => self
                .vms
                .vms
                .values()
                .filter(|vm| vm.is_active() && Self::may_manage(&creds, vm))
                .map(|vm| vm.id)
                .collect(),
        };
        for id in &ids {
            let vm = &self.vms.vms[id];
            if !Self::may_manage(&creds, vm) {
                return self.error(client, "permission denied".into());
            }
            if name.is_some() && vm.state == VmState::Waiting {
                // Queued, not started yet: it stays stopped.
                let text = format!("stopped vm {}", vm.name);
                self.dequeue(*id);
                return self.reply(client, Reply::Ok(text), &[]);
            }
            if name.is_some() && !vm.is_active() {
                return self.error(client, format!("vm {} is not running", vm.name));
            }
        }
        if name.is_none() {
            // `stop -a` also keeps every queued VM from starting.
            let queued: Vec<u32> = self
                .vms
                .vms
                .values()
                .filter(|vm| vm.state == VmState::Waiting && Self::may_manage(&creds, vm))
                .map(|vm| vm.id)
                .collect();
            for id in queued {
                self.dequeue(id);
            }
        }
        for id in &ids {
            let how = if force {
                StopHow::Kill
            } else {
                StopHow::PowerButton
            };
            self.request_stop(*id, how);
        }
        let what = match &name {
            Some(n) => format!("vm {n}"),
            None => format!("{} vms", ids.len()),
        };
        // A VM still waiting for priv's fds has no process to wait for.
        let waiting: Vec<u32> = ids
            .into_iter()
            .filter(|id| self.vms.vms.get(id).is_some_and(|vm| vm.proc.is_some()))
            .collect();
        if wait && !waiting.is_empty() {
            self.stop_waiters.push(StopWaiter {
                client,
                vm_ids: waiting,
            });
        } else if wait {
            self.reply(client, Reply::Ok(format!("stopped {what}")), &[]);
        } else {
            self.reply(client, Reply::Ok(format!("stopping {what}")), &[]);
        }
    }

    /// Stops VM `id` the way `how` says.
    pub(super) fn request_stop(&mut self, id: u32, how: StopHow) {
        if let Some(seq) = self
            .pending
            .iter()
            .find(|(_, p)| p.vm_id == id)
            .map(|(seq, _)| *seq)
        {
            self.pending.remove(&seq);
            self.start_failed(id, "stopped before it started".into());
            return;
        }
        let grace = self.opts.stop_grace;
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let Some(p) = &mut vm.proc else { return };
        // A paused guest cannot see the button: stop it at once.
        let how = match how {
            StopHow::PowerButton if vm.state == VmState::Paused => StopHow::Terminate,
            how => how,
        };
        p.stop_requested = true;
        vm.state = VmState::Stopping;
        match how {
            StopHow::Kill => {
                info!("vm {}: stopping (forced)", vm.name);
                let _ = kill(p.pid, Signal::SIGKILL);
            }
            StopHow::PowerButton => {
                info!(
                    "vm {}: stopping: power button pressed, {}s for the guest to power off",
                    vm.name,
                    grace.as_secs()
                );
                if p.chan.send(&Msg::VmmPowerButton, id, &[]).is_err() {
                    let _ = kill(p.pid, Signal::SIGKILL);
                } else if p.terminate_at.is_none() && p.kill_at.is_none() {
                    // A second press does not push the deadline back.
                    p.terminate_at = Some(Instant::now() + grace);
                }
            }
            StopHow::Terminate => {
                info!("vm {}: stopping", vm.name);
                terminate(&vm.name, id, p);
            }
        }
    }

    pub(super) fn console_request(&mut self, client: u32, creds: Creds, name: &str) {
        let Some(id) = self.vms.id_of(name) else {
            return self.error(client, format!("vm {name} not found"));
        };
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        if !Self::may_manage(&creds, vm) {
            return self.error(client, "permission denied".into());
        }
        // Root may always attach; others share what is left.
        let attached = vm.console.client_count();
        if creds.uid != 0 && attached >= MAX_CONSOLES_PER_VM {
            return self.error(
                client,
                format!("vm {name}: {attached} consoles attached, the most one VM may have"),
            );
        }
        let active = vm.is_active();
        match vm.console.attach() {
            Ok(sock) => {
                debug!(
                    "vm {name}: console attached for uid {} ({} attached)",
                    creds.uid,
                    attached + 1
                );
                let tty = vm.console.tty().to_string();
                if !active {
                    // A stopped VM's console replays what it last printed,
                    // then ends.
                    vm.console.detach_all();
                }
                self.reply(client, Reply::Console { tty }, &[sock.as_fd()]);
            }
            Err(e) => self.error(client, format!("vm {name}: {e}")),
        }
    }

    pub(super) fn pause_request(&mut self, client: u32, creds: Creds, name: &str, pause: bool) {
        let Some(id) = self.vms.id_of(name) else {
            return self.error(client, format!("vm {name} not found"));
        };
        let vm = &self.vms.vms[&id];
        if !Self::may_manage(&creds, vm) {
            return self.error(client, "permission denied".into());
        }
        let (want, verb) = if pause {
            (VmState::Running, "running")
        } else {
            (VmState::Paused, "paused")
        };
        if vm.state != want || vm.pause_waiter.is_some() {
            return self.error(client, format!("vm {name} is not {verb}"));
        }
        let msg = if pause {
            Msg::VmmPause
        } else {
            Msg::VmmUnpause
        };
        let sent = vm.proc.as_ref().map(|p| p.chan.send(&msg, id, &[]));
        match sent {
            Some(Ok(())) => {
                if let Some(vm) = self.vms.vms.get_mut(&id) {
                    vm.pause_waiter = Some(client);
                    vm.pause_deadline = Some(Instant::now() + VMM_REQUEST_TIMEOUT);
                }
            }
            Some(Err(e)) => self.error(client, format!("vm {name}: {e}")),
            None => self.error(client, format!("vm {name} is not running")),
        }
    }

    pub(super) fn wait_request(&mut self, client: u32, creds: Creds, name: &str) {
        let Some(id) = self.vms.id_of(name) else {
            return self.error(client, format!("vm {name} not found"));
        };
        let vm = &self.vms.vms[&id];
        if !Self::may_manage(&creds, vm) {
            return self.error(client, "permission denied".into());
        }
        if !vm.is_active() {
            return self.error(client, format!("vm {name} is not running"));
        }
        self.stop_waiters.push(StopWaiter {
            client,
            vm_ids: vec![id],
        });
    }

    pub(super) fn log_request(&mut self, client: u32, creds: Creds, verbose: bool) {
        if creds.uid != 0 {
            return self.error(client, "permission denied".into());
        }
        let level = if verbose { self.opts.verbose.max(1) } else { 0 };
        log::set_max_level(vmd_proto::log_filter(level));
        let msg = Msg::SetVerbose { level };
        let chans = [&self.privsep.chan, &self.control.chan].into_iter().chain(
            self.vms
                .vms
                .values()
                .filter_map(|vm| vm.proc.as_ref().map(|p| &p.chan)),
        );
        for chan in chans {
            if let Err(e) = chan.send(&msg, 0, &[]) {
                warn!("log level change: {e}");
            }
        }
        info!("logging {}", if verbose { "verbose" } else { "brief" });
        self.reply(
            client,
            Reply::Ok(format!(
                "logging {}",
                if verbose { "verbose" } else { "brief" }
            )),
            &[],
        );
    }
}
