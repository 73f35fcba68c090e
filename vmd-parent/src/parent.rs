//! The parent process: keeps the VM table, starts the other roles, starts,
//! stops and reaps VM processes, relays consoles, and turns signals into
//! orderly work. It is single-threaded (one poll loop), so re-executing
//! children by fork + exec is safe.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use vmd_proto::msg::ResetWhat;
use vmd_proto::msg::{Creds, Reply, Request};
use vmd_proto::vm::{
    validate_name, DhcpLease, DiskParams, ExitReason, NicParams, OpenKind, StartRequest, VmState,
    VmmParams,
};
use vmd_proto::{ChannelError, Msg};

use crate::console::Console;
use crate::options::Options;
use crate::spawn::{spawn_role, ChildProc};
use crate::vms::{Vm, VmOwner, VmProc, VmSpec, VmTable};

/// How long a graceful stop may take before the VM process is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the priv and control processes get to exit at shutdown.
const CHILD_EXIT_GRACE: Duration = Duration::from_secs(3);

/// A start in progress: the fds priv has opened for it so far.
struct PendingStart {
    vm_id: u32,
    kvm: Option<OwnedFd>,
    kernel: Option<OwnedFd>,
    initrd: Option<OwnedFd>,
    need_initrd: bool,
    /// Per disk: its top image and backing files, once priv sent them.
    disks: Vec<Option<Vec<OwnedFd>>>,
    /// Per interface: the TAP priv made, and whether priv has configured
    /// it (bridge, alias, address, up).
    taps: Vec<Option<Tap>>,
}

struct Tap {
    name: String,
    fd: OwnedFd,
    configured: bool,
}

impl PendingStart {
    fn complete(&self) -> bool {
        self.kvm.is_some()
            && self.kernel.is_some()
            && (!self.need_initrd || self.initrd.is_some())
            && self.disks.iter().all(Option::is_some)
            && self
                .taps
                .iter()
                .all(|t| t.as_ref().is_some_and(|t| t.configured))
    }
}

/// A `vmctl stop -w` waiting for these VMs to stop.
struct StopWaiter {
    client: u32,
    vm_ids: Vec<u32>,
}

#[derive(Clone, Copy)]
enum Token {
    Signal,
    Priv,
    Control,
    VmChan(u32),
    Master(u32),
    ConsoleClient(u32, usize),
}

struct Parent {
    opts: Options,
    user: (u32, u32),
    privsep: ChildProc,
    control: ChildProc,
    vms: VmTable,
    pending: BTreeMap<u32, PendingStart>,
    next_seq: u32,
    stop_waiters: Vec<StopWaiter>,
    shutting_down: bool,
    /// vmd's exit status once shut down: 1 when a role died under us.
    exit_code: i32,
    console_dir: PathBuf,
    /// The configuration in force.
    config: vmd_config::Config,
    /// VMs waiting for their turn to autostart, and when the next group
    /// may go.
    autostart: VecDeque<u32>,
    next_autostart: Instant,
    /// A `vmctl reset` waiting for the VMs to stop: (client, what).
    pending_reset: Option<(u32, ResetWhat)>,
}

/// `vmd -n`: checks the configuration, says so, exits 0 or 1.
fn check_config(opts: &Options) -> i32 {
    match crate::conf::load(&opts.config) {
        Ok(config) => {
            if opts.verbose > 0 {
                print!("{}", config.dump());
            }
            eprintln!("configuration OK");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// The configuration at start: the file if it exists; a missing default
/// file just means no VMs are defined.
fn initial_config(opts: &Options) -> Result<vmd_config::Config, String> {
    if !opts.config_given && !opts.config.exists() {
        return Ok(vmd_config::Config::default());
    }
    crate::conf::load(&opts.config)
}

pub fn run(opts: Options) -> i32 {
    if opts.check_only {
        return check_config(&opts);
    }
    match setup(opts) {
        Ok((mut parent, signals)) => parent.serve(signals),
        Err(e) => {
            error!("{e}");
            eprintln!("vmd: {e}");
            1
        }
    }
}

fn setup(mut opts: Options) -> Result<(Parent, SignalFd), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("need root privileges".into());
    }
    if vmd_proto::Channel::connect(&opts.socket).is_ok() {
        return Err(format!(
            "{}: another vmd is already listening there",
            opts.socket.display()
        ));
    }
    let config = initial_config(&opts)?;
    let user = crate::user::ensure_vmd_user()?;
    // Bound before daemonizing, so the socket exists once `vmd` returns.
    let listener = bind_control_socket(&opts.socket)?;
    set_socket_owner(&opts.socket, &config)?;
    if !opts.foreground {
        // Still single-threaded with no children: forking here is safe.
        nix::unistd::daemon(false, false).map_err(|e| format!("daemon: {e}"))?;
    }
    opts.user = Some(user);
    let console_dir = opts.state_dir.join("console");
    std::fs::create_dir_all(&console_dir)
        .map_err(|e| format!("state directory {}: {e}", console_dir.display()))?;

    // Block the signals we handle before any child exists; each child
    // unblocks them again before exec.
    let mut mask = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        mask.add(sig);
    }
    mask.thread_block()
        .map_err(|e| format!("sigprocmask: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;

    let privsep = spawn_role("priv", &opts, &[]).map_err(|e| format!("starting priv: {e}"))?;
    let control =
        spawn_role("control", &opts, &[]).map_err(|e| format!("starting control: {e}"))?;
    control
        .chan
        .send(&Msg::ControlSocket, 0, &[listener.as_fd()])
        .map_err(|e| format!("handing the socket to control: {e}"))?;
    drop(listener);
    crate::notify::ready();
    info!(
        "started (priv pid {}, control pid {}), socket {}",
        privsep.pid,
        control.pid,
        opts.socket.display()
    );
    let mut parent = Parent {
        opts,
        user,
        privsep,
        control,
        vms: VmTable::default(),
        pending: BTreeMap::new(),
        next_seq: 0,
        stop_waiters: Vec::new(),
        shutting_down: false,
        exit_code: 0,
        console_dir,
        config: vmd_config::Config::default(),
        autostart: VecDeque::new(),
        next_autostart: Instant::now(),
        pending_reset: None,
    };
    parent.apply_config(config, true)?;
    Ok((parent, signals))
}

/// Whether `owner` names the client: its user, or a group it is in.
fn admits(owner: &VmOwner, creds: &Creds) -> bool {
    owner.uid == Some(creds.uid)
        || owner
            .gid
            .is_some_and(|g| creds.gid == g || client_groups(creds.pid).contains(&g))
}

/// A client's supplementary groups, read from /proc: SO_PEERCRED carries
/// only the primary group.
fn client_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// `socket owner user[:group]`: who besides root may connect.
fn set_socket_owner(path: &std::path::Path, config: &vmd_config::Config) -> Result<(), String> {
    let Some(owner) = &config.globals.socket_owner else {
        return Ok(());
    };
    let o = crate::conf::resolve_owner(owner, &"socket owner")?;
    nix::unistd::chown(
        path,
        o.uid.map(nix::unistd::Uid::from_raw),
        o.gid.map(nix::unistd::Gid::from_raw),
    )
    .map_err(|e| format!("{}: chown: {e}", path.display()))
}

/// Creates the control socket, mode 0660, so root (and later the
/// `socket owner` group) can connect.
fn bind_control_socket(path: &std::path::Path) -> Result<vmd_proto::Listener, String> {
    use std::os::unix::fs::PermissionsExt;
    let listener =
        vmd_proto::Listener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

impl Parent {
    fn serve(&mut self, signals: SignalFd) -> i32 {
        loop {
            if self.shutting_down && self.vms.vms.values().all(|vm| vm.proc.is_none()) {
                return self.finish();
            }
            let (tokens, ready) = match self.wait(&signals) {
                Ok(r) => r,
                Err(e) => {
                    error!("poll: {e}");
                    return 1;
                }
            };
            for (token, revents) in tokens.into_iter().zip(ready) {
                if revents.is_empty() {
                    continue;
                }
                match token {
                    Token::Signal => self.signals(&signals),
                    Token::Priv => self.priv_readable(),
                    Token::Control => self.control_readable(),
                    Token::VmChan(id) => self.vm_chan_readable(id),
                    Token::Master(id) => {
                        if let Some(vm) = self.vms.vms.get_mut(&id) {
                            vm.console.master_readable();
                        }
                    }
                    Token::ConsoleClient(id, idx) => {
                        if let Some(vm) = self.vms.vms.get_mut(&id) {
                            // Input typed while paused waits in the pty
                            // for the guest to read after unpause.
                            let running = vm.proc.is_some();
                            if revents.contains(PollFlags::POLLOUT) {
                                vm.console.flush_clients();
                            }
                            if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                                vm.console.client_readable(idx, running);
                            }
                        }
                    }
                }
            }
            self.kill_overdue();
            self.finish_reset();
            self.autostart_due();
        }
    }

    /// One poll over everything we watch. Console client indices are only
    /// valid for this round, so each round rebuilds the list.
    fn wait(&self, signals: &SignalFd) -> Result<(Vec<Token>, Vec<PollFlags>), Errno> {
        let mut tokens = vec![Token::Signal, Token::Priv, Token::Control];
        let mut fds: Vec<PollFd<'_>> = vec![
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.privsep.chan.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.control.chan.as_fd(), PollFlags::POLLIN),
        ];
        for vm in self.vms.vms.values() {
            if let Some(p) = &vm.proc {
                tokens.push(Token::VmChan(vm.id));
                fds.push(PollFd::new(p.chan.as_fd(), PollFlags::POLLIN));
            }
            tokens.push(Token::Master(vm.id));
            fds.push(PollFd::new(vm.console.master_fd(), PollFlags::POLLIN));
            for (idx, (fd, backlog)) in vm.console.client_fds().enumerate() {
                let mut flags = PollFlags::POLLIN;
                if backlog {
                    flags |= PollFlags::POLLOUT;
                }
                tokens.push(Token::ConsoleClient(vm.id, idx));
                fds.push(PollFd::new(fd, flags));
            }
        }
        // Console clients are handled in reverse so a removal does not
        // shift the index of one still to come this round.
        let timeout = self.next_deadline().map_or(PollTimeout::NONE, |d| {
            let ms = d.saturating_duration_since(Instant::now()).as_millis();
            PollTimeout::try_from(ms.min(60_000) as i32 + 1).unwrap_or(PollTimeout::NONE)
        });
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let ready: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        let mut pairs: Vec<(Token, PollFlags)> = tokens.into_iter().zip(ready).collect();
        pairs.sort_by_key(|(t, _)| match t {
            Token::ConsoleClient(_, idx) => usize::MAX - idx,
            _ => 0,
        });
        Ok(pairs.into_iter().unzip())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let autostart = (!self.autostart.is_empty()).then_some(self.next_autostart);
        self.vms
            .vms
            .values()
            .filter_map(|vm| vm.proc.as_ref().and_then(|p| p.kill_at))
            .chain(autostart)
            .min()
    }

    fn kill_overdue(&mut self) {
        let now = Instant::now();
        for vm in self.vms.vms.values_mut() {
            if let Some(p) = &mut vm.proc {
                if p.kill_at.is_some_and(|t| t <= now) {
                    warn!("vm {}: did not stop in time, killing it", vm.name);
                    let _ = kill(p.pid, Signal::SIGKILL);
                    p.kill_at = None;
                }
            }
        }
    }

    fn signals(&mut self, signals: &SignalFd) {
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                Ok(Signal::SIGHUP) => {
                    info!("SIGHUP: reloading {}", self.opts.config.display());
                    if let Err(e) = self.reload() {
                        error!("reload failed, keeping the running configuration: {e}");
                    }
                }
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => self.begin_shutdown(sig),
                _ => {}
            }
        }
    }

    fn begin_shutdown(&mut self, sig: Signal) {
        if self.shutting_down {
            return;
        }
        info!("{sig}: stopping all VMs and exiting");
        self.shutting_down = true;
        let pending: Vec<u32> = self.pending.keys().copied().collect();
        for seq in pending {
            if let Some(p) = self.pending.remove(&seq) {
                self.start_failed(p.vm_id, "vmd is shutting down".into());
            }
        }
        let ids: Vec<u32> = self.vms.vms.keys().copied().collect();
        for id in ids {
            self.request_stop(id, false);
        }
    }

    /// Stops priv and control and leaves no process behind.
    fn finish(&mut self) -> i32 {
        self.priv_cleanup();
        for child in [&self.privsep, &self.control] {
            let _ = kill(child.pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + CHILD_EXIT_GRACE;
        for pid in [self.privsep.pid, self.control.pid] {
            loop {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Ok(WaitStatus::StillAlive) => {
                        let _ = kill(pid, Signal::SIGKILL);
                        let _ = waitpid(pid, None);
                        break;
                    }
                    _ => break,
                }
            }
        }
        let _ = std::fs::remove_file(&self.opts.socket);
        info!("exiting");
        self.exit_code
    }

    /// Asks priv to delete the bridges it created, and waits (briefly) for
    /// it to finish, so vmd leaves no interface behind.
    fn priv_cleanup(&mut self) {
        if let Err(e) = self.privsep.chan.send(&Msg::PrivCleanup, 0, &[]) {
            warn!("asking priv to clean up: {e}");
            return;
        }
        let deadline = Instant::now() + CHILD_EXIT_GRACE;
        while Instant::now() < deadline {
            let mut fds = [PollFd::new(self.privsep.chan.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, PollTimeout::from(100u16)), Ok(n) if n > 0) {
                continue;
            }
            match self.privsep.chan.recv() {
                Ok(frame) => match frame.msg {
                    Msg::PrivIfDone { name } if name.is_empty() => return,
                    Msg::PrivFailed { reason, .. } => return warn!("priv cleanup: {reason}"),
                    _ => {}
                },
                Err(e) if e.is_would_block() => {}
                Err(_) => return,
            }
        }
        warn!("priv did not finish its cleanup in time");
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => status,
                Err(e) => {
                    warn!("waitpid: {e}");
                    return;
                }
            };
            let Some(pid) = status.pid() else { continue };
            if pid == self.privsep.pid || pid == self.control.pid {
                if !self.shutting_down {
                    let role = if pid == self.privsep.pid {
                        "priv"
                    } else {
                        "control"
                    };
                    // Without priv no VM can start; without control no one
                    // can manage them. Stop cleanly rather than limp on.
                    error!("{role} process died ({status:?}); stopping every VM and exiting");
                    self.exit_code = 1;
                    self.begin_shutdown(Signal::SIGTERM);
                }
                continue;
            }
            match self.vms.by_pid(pid) {
                Some(id) => self.vm_ended(id, status),
                None => debug!("reaped unknown child {pid}"),
            }
        }
    }

    // --- control requests -------------------------------------------------

    fn control_readable(&mut self) {
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
            other => warn!("control sent unexpected message type {}", other.type_code()),
        }
    }

    fn reply(&self, client: u32, reply: Reply, fds: &[BorrowedFd<'_>]) {
        if let Err(e) = self.control.chan.send(&Msg::Reply(reply), client, fds) {
            warn!("reply to client {client}: {e}");
        }
    }

    fn error(&self, client: u32, reason: String) {
        self.reply(client, Reply::Error(reason), &[]);
    }

    /// Root may do anything; a VM's owner (user, or a member of its
    /// group) may start, stop, pause, unpause, wait for and console it.
    fn may_manage(creds: &Creds, vm: &Vm) -> bool {
        creds.uid == 0 || admits(&vm.owner, creds)
    }

    fn request(&mut self, client: u32, creds: Creds, req: Request) {
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
            Request::Load { path } => {
                let loaded = crate::conf::load(std::path::Path::new(&path))
                    .and_then(|config| self.apply_config(config, false));
                match loaded {
                    Ok(()) => self.reply(client, Reply::Ok(format!("loaded {path}")), &[]),
                    Err(e) => {
                        error!("load {path} failed: {e}");
                        self.error(client, e)
                    }
                }
            }
            Request::Reset { what } => self.reset_request(client, what),
        }
    }

    fn start_request(&mut self, client: u32, creds: Creds, req: StartRequest) {
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
            let spec = match VmSpec::from_request(&req) {
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
        // ad-hoc VM last ran with).
        let base = vm.defined.clone().unwrap_or_else(|| vm.spec.clone());
        let spec = match VmSpec::merged(&base, &req) {
            Ok(spec) => spec,
            Err(e) => return self.error(client, e),
        };
        if let Some(vm) = self.vms.vms.get_mut(&id) {
            vm.spec = spec;
        }
        self.begin_start(id, Some(client));
    }

    /// `vmctl start -t TEMPLATE NAME`: a new VM made from a defined one
    /// that says `allow instance`, changing only what that allows; it
    /// belongs to whoever made it.
    fn start_instance(&mut self, client: u32, creds: Creds, template: &str, req: StartRequest) {
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
        let changes = [
            (
                "boot",
                req.kernel.is_some() || req.initrd.is_some() || req.cmdline.is_some(),
                allow.boot,
            ),
            ("memory", req.memory.is_some(), allow.memory),
            ("vcpus", req.vcpus.is_some(), allow.vcpus),
            ("disk", !req.disks.is_empty(), allow.disk),
            ("interface", !req.nics.is_empty(), allow.interface),
        ];
        if let Some((what, _, _)) = changes
            .iter()
            .find(|(_, asked, allowed)| *asked && !allowed)
        {
            return self.error(
                client,
                format!("vm {template}: instances may not change {what} (allow instance)"),
            );
        }
        let spec = match VmSpec::merged(base, &req) {
            Ok(spec) => spec,
            Err(e) => return self.error(client, e),
        };
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
                self.begin_start(id, Some(client))
            }
            Err(e) => self.error(client, e),
        }
    }

    fn new_vm(
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
                state: VmState::Stopped,
                proc: None,
                console,
                last_exit: None,
                restarts: 0,
                recent_reboots: Default::default(),
                ever_ran: false,
                start_waiter: None,
                pause_waiter: None,
            },
        );
        Ok(id)
    }

    fn stop_request(
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
            if name.is_some() && !vm.is_active() {
                return self.error(client, format!("vm {} is not running", vm.name));
            }
        }
        for id in &ids {
            self.request_stop(*id, force);
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

    /// Asks VM `id` to stop (or kills it with `force`).
    fn request_stop(&mut self, id: u32, force: bool) {
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
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let Some(p) = &mut vm.proc else { return };
        p.stop_requested = true;
        vm.state = VmState::Stopping;
        if force {
            info!("vm {}: stopping (forced)", vm.name);
            let _ = kill(p.pid, Signal::SIGKILL);
        } else {
            info!("vm {}: stopping", vm.name);
            if p.chan.send(&Msg::VmmTerminate, id, &[]).is_err() {
                let _ = kill(p.pid, Signal::SIGKILL);
            }
            p.kill_at = Some(Instant::now() + STOP_GRACE);
        }
    }

    fn console_request(&mut self, client: u32, creds: Creds, name: &str) {
        let Some(id) = self.vms.id_of(name) else {
            return self.error(client, format!("vm {name} not found"));
        };
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        if !Self::may_manage(&creds, vm) {
            return self.error(client, "permission denied".into());
        }
        let active = vm.is_active();
        match vm.console.attach() {
            Ok(sock) => {
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

    fn pause_request(&mut self, client: u32, creds: Creds, name: &str, pause: bool) {
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
                }
            }
            Some(Err(e)) => self.error(client, format!("vm {name}: {e}")),
            None => self.error(client, format!("vm {name} is not running")),
        }
    }

    fn wait_request(&mut self, client: u32, creds: Creds, name: &str) {
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

    fn log_request(&mut self, client: u32, creds: Creds, verbose: bool) {
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

    // --- configuration ------------------------------------------------------

    /// Re-reads the configuration file; on any error nothing changes.
    fn reload(&mut self) -> Result<(), String> {
        let config = initial_config(&self.opts)?;
        set_socket_owner(&self.opts.socket, &config)?;
        self.apply_config(config, true)
    }

    /// Takes a configuration's VM definitions: new VMs are added (and
    /// queued to start when enabled), stopped ones take their new
    /// definition, running ones are left untouched until their next start.
    /// With `replace`, stopped VMs the configuration no longer defines are
    /// forgotten. Everything is resolved first, so an error changes nothing.
    fn apply_config(&mut self, config: vmd_config::Config, replace: bool) -> Result<(), String> {
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
    fn autostart_due(&mut self) {
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

    fn reset_request(&mut self, client: u32, what: ResetWhat) {
        if self.pending_reset.is_some() {
            return self.error(client, "a reset is already in progress".into());
        }
        info!("reset {what:?}");
        if matches!(what, ResetWhat::All | ResetWhat::Vms) {
            self.autostart.clear();
            let ids: Vec<u32> = self.vms.vms.keys().copied().collect();
            for id in ids {
                self.request_stop(id, true);
            }
        }
        self.pending_reset = Some((client, what));
        self.finish_reset();
    }

    /// Completes a reset once every VM has stopped: forgets them all and
    /// reads the configuration afresh.
    fn finish_reset(&mut self) {
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

    // --- starting VMs -----------------------------------------------------

    /// Asks priv for every fd the VM needs; the VM process is spawned when
    /// the last one arrives.
    fn begin_start(&mut self, id: u32, client: Option<u32>) {
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        vm.start_waiter = client;
        let (kernel, why_not) = match (&vm.spec.kernel, vm.spec.unsupported()) {
            (Some(k), None) => (k.clone(), None),
            (_, why) => (String::new(), why),
        };
        if let Some(why) = why_not {
            return self.start_failed(id, why);
        }
        vm.state = VmState::Starting;
        info!("vm {}: starting", vm.name);
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        let mut wants = vec![
            (OpenKind::Kvm, vmd_priv::KVM_PATH.to_string()),
            (OpenKind::Kernel, kernel),
        ];
        if let Some(initrd) = &vm.spec.initrd {
            wants.push((OpenKind::Initrd, initrd.clone()));
        }
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            let kind = OpenKind::Tap { index: index as u8 };
            wants.push((kind, nic.tap.clone().unwrap_or_default()));
        }
        for (index, disk) in vm.spec.disks.iter().enumerate() {
            let kind = OpenKind::Disk {
                index: index as u8,
                read_only: disk.read_only,
                format: disk.format,
            };
            wants.push((kind, disk.path.clone()));
        }
        self.pending.insert(
            seq,
            PendingStart {
                vm_id: id,
                kvm: None,
                kernel: None,
                initrd: None,
                need_initrd: vm.spec.initrd.is_some(),
                disks: vm.spec.disks.iter().map(|_| None).collect(),
                taps: vm.spec.nics.iter().map(|_| None).collect(),
            },
        );
        for (kind, path) in wants {
            if let Err(e) = self
                .privsep
                .chan
                .send(&Msg::PrivOpen { kind, path }, seq, &[])
            {
                self.pending.remove(&seq);
                self.start_failed(id, format!("asking priv to open files: {e}"));
                return;
            }
        }
    }

    fn priv_readable(&mut self) {
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
    fn tap_config(&self, vm_id: u32, index: u8, name: &str) -> Result<Msg, String> {
        let vm = self.vms.vms.get(&vm_id).ok_or("vm vanished")?;
        let nic = vm
            .spec
            .nics
            .get(usize::from(index))
            .ok_or_else(|| format!("interface {index} unknown"))?;
        let switch = match &nic.switch {
            None => None,
            Some(sw) => {
                let def = self
                    .config
                    .switch(sw)
                    .ok_or_else(|| format!("interface {index}: no switch {sw:?} in vm.conf"))?;
                if !def.enabled {
                    return Err(format!("interface {index}: switch {sw} is disabled"));
                }
                Some(vmd_proto::msg::SwitchParams {
                    bridge: def.interface.clone(),
                    group: def.group.clone(),
                    up: def.up,
                })
            }
        };
        let host_addr = match nic.local {
            false => None,
            true => Some((self.local_pair(vm_id, index)?.0, 31)),
        };
        Ok(Msg::PrivIfConfig {
            name: name.to_string(),
            switch,
            group: nic.group.clone(),
            up: nic.up,
            host_addr,
        })
    }

    /// A local interface's /31: (host, guest).
    fn local_pair(&self, vm_id: u32, index: u8) -> Result<(Ipv4Addr, Ipv4Addr), String> {
        let prefix = &self.config.globals.local_prefix;
        vmd_proto::net::local_pair((prefix.addr, prefix.len), vm_id, index).ok_or_else(|| {
            format!(
                "interface {index}: local prefix {}/{} has no /31 left for vm {vm_id}",
                prefix.addr, prefix.len
            )
        })
    }

    /// What the VM process needs to run interface `index`.
    fn nic_params(&self, vm: &Vm, index: usize) -> Result<NicParams, String> {
        let nic = &vm.spec.nics[index];
        let switch_locked = nic
            .switch
            .as_ref()
            .and_then(|sw| self.config.switch(sw))
            .is_some_and(|sw| sw.locked_lladdr);
        let dhcp = match nic.local {
            false => None,
            true => {
                let (host, guest) = self.local_pair(vm.id, index as u8)?;
                Some(DhcpLease {
                    guest,
                    host,
                    prefix_len: 31,
                    dns: None,
                    boot_file: None,
                })
            }
        };
        Ok(NicParams {
            mac: nic
                .lladdr
                .unwrap_or_else(|| vmd_proto::net::generated_mac(&vm.name, index as u8)),
            locked: nic.locked || switch_locked,
            dhcp,
        })
    }

    fn launch(&mut self, p: PendingStart) {
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
            disks: vm
                .spec
                .disks
                .iter()
                .zip(&p.disks)
                .map(|(spec, fds)| DiskParams {
                    format: spec.format,
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
        let mut fds = vec![kvm.as_fd(), tty.as_fd(), kernel.as_fd()];
        if let Some(initrd) = &p.initrd {
            fds.push(initrd.as_fd());
        }
        fds.extend(p.disks.iter().flatten().flatten().map(|f| f.as_fd()));
        // Ours close when `p` drops, so each TAP lives exactly as long as
        // the VM process holds it.
        fds.extend(p.taps.iter().flatten().map(|t| t.fd.as_fd()));
        let child = match spawn_role("vmm", &self.opts, &["--vm".into(), vm.name.clone()]) {
            Ok(child) => child,
            Err(e) => return self.start_failed(id, format!("starting vm process: {e}")),
        };
        if let Err(e) = child.chan.send(&Msg::VmmStart(params), id, &fds) {
            let _ = kill(child.pid, Signal::SIGKILL);
            // Reaped by the SIGCHLD path as an unknown child.
            return self.start_failed(id, format!("sending vm parameters: {e}"));
        }
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
                kill_at: None,
            });
        }
    }

    /// A start failed before the VM ran: tell the client; a VM that never
    /// ran is forgotten so the failed start leaves nothing behind.
    fn start_failed(&mut self, id: u32, reason: String) {
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
        if vm.ever_ran {
            vm.state = VmState::Stopped;
            vm.last_exit = Some(ExitReason::VmmError(reason));
            vm.console.detach_all();
        } else {
            self.vms.vms.remove(&id);
            let log = self.console_dir.join(format!("{name}.log"));
            if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(log);
            }
        }
        self.notify_stop_waiters(id);
    }

    // --- VM processes -----------------------------------------------------

    fn vm_chan_readable(&mut self, id: u32) {
        loop {
            let Some(p) = self.vms.vms.get_mut(&id).and_then(|vm| vm.proc.as_mut()) else {
                return;
            };
            match p.chan.recv() {
                Ok(frame) => self.vm_message(id, frame.msg),
                Err(e) if e.is_would_block() => return,
                Err(ChannelError::Closed) => {
                    // The process is exiting; SIGCHLD finishes the story.
                    // Stop polling a closed channel by marking it so.
                    p.running = p.running && p.exit_msg.is_none();
                    return;
                }
                Err(e) => {
                    if let Some(vm) = self.vms.vms.get(&id) {
                        warn!(
                            "vm {}: bad message from vm process: {e}; killing it",
                            vm.name
                        );
                        if let Some(p) = &vm.proc {
                            let _ = kill(p.pid, Signal::SIGKILL);
                        }
                    }
                    return;
                }
            }
        }
    }

    fn vm_message(&mut self, id: u32, msg: Msg) {
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let Some(p) = vm.proc.as_mut() else { return };
        match msg {
            Msg::VmmRunning => {
                p.running = true;
                vm.ever_ran = true;
                if vm.state == VmState::Starting {
                    vm.state = VmState::Running;
                }
                info!("vm {}: running (pid {})", vm.name, p.pid);
                if let Some(client) = vm.start_waiter.take() {
                    let text = format!(
                        "started vm {} ({}) successfully, tty {}",
                        vm.id,
                        vm.name,
                        vm.console.tty()
                    );
                    self.reply(client, Reply::Ok(text), &[]);
                }
            }
            Msg::VmmPauseState { paused } => {
                vm.state = if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                info!("vm {}: {}", vm.name, vm.state);
                if let Some(client) = vm.pause_waiter.take() {
                    let text = format!(
                        "{} vm {}",
                        if paused { "paused" } else { "unpaused" },
                        vm.name
                    );
                    self.reply(client, Reply::Ok(text), &[]);
                }
            }
            Msg::VmmExited(reason) => {
                debug!("vm {}: vm process reports: {reason}", vm.name);
                p.exit_msg = Some(reason);
            }
            other => warn!(
                "vm {}: unexpected message type {}",
                vm.name,
                other.type_code()
            ),
        }
    }

    fn vm_ended(&mut self, id: u32, status: WaitStatus) {
        // Read what the process said before it died: the exit message may
        // still be queued behind the SIGCHLD.
        self.vm_chan_readable(id);
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let Some(p) = vm.proc.take() else { return };
        vm.console.master_readable();
        let reason = p
            .exit_msg
            .or_else(|| p.stop_requested.then_some(ExitReason::Stopped))
            .unwrap_or(match status {
                WaitStatus::Signaled(_, sig, _) => ExitReason::Signal(sig as i32),
                WaitStatus::Exited(_, code) => ExitReason::Exited(code),
                _ => ExitReason::Exited(-1),
            });
        if let Some(client) = vm.pause_waiter.take() {
            let text = format!("vm {} stopped: {reason}", vm.name);
            self.reply(client, Reply::Error(text), &[]);
        }
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        if vm.start_waiter.is_some() && !p.running {
            return self.start_failed(id, reason.to_string());
        }
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        if reason == ExitReason::Reboot && !self.shutting_down && !p.stop_requested {
            if vm.note_reboot(Instant::now()) {
                vm.restarts += 1;
                info!("vm {}: guest rebooted, restarting", vm.name);
                self.begin_start(id, None);
                return;
            }
            vm.state = VmState::Stopped;
            vm.last_exit = Some(ExitReason::RebootLoop);
            warn!("vm {}: stopped: {}", vm.name, ExitReason::RebootLoop);
        } else {
            match &reason {
                ExitReason::GuestCrash(_) | ExitReason::VmmError(_) | ExitReason::Signal(_) => {
                    warn!("vm {}: stopped: {reason}", vm.name)
                }
                _ => info!("vm {}: stopped: {reason}", vm.name),
            }
            vm.state = VmState::Stopped;
            vm.last_exit = Some(reason);
        }
        vm.console.detach_all();
        self.notify_stop_waiters(id);
    }

    fn notify_stop_waiters(&mut self, id: u32) {
        let mut done = Vec::new();
        self.stop_waiters.retain_mut(|w| {
            w.vm_ids.retain(|v| *v != id);
            if w.vm_ids.is_empty() {
                done.push(w.client);
                false
            } else {
                true
            }
        });
        let text = match self.vms.vms.get(&id) {
            Some(vm) => match &vm.last_exit {
                Some(reason) => format!("vm {} stopped: {reason}", vm.name),
                None => format!("vm {} stopped", vm.name),
            },
            None => "stopped".to_string(),
        };
        for client in done {
            self.reply(client, Reply::Ok(text.clone()), &[]);
        }
    }
}
