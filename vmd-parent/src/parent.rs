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
use vmd_proto::msg::{Creds, Opener, Reply, Request};
use vmd_proto::vm::{
    is_vm_id, validate_name, DevKind, DevParams, DhcpLease, DiskParams, ExitReason, NicParams,
    OpenKind, StartRequest, VmState, VmmFd, VmmParams,
};
use vmd_proto::{ChannelError, Msg};

use crate::console::Console;
use crate::options::Options;
use crate::roles::Role;
use crate::spawn::{spawn_role, spawn_sending, ChildProc, SpawnError};
use crate::vms::{DevProc, Vm, VmOwner, VmProc, VmSpec, VmTable};

mod metrics;
mod reconfig;
mod requests;
mod starting;

use starting::PendingStart;

/// How long a VM process may take to stop after `VmmTerminate` before it
/// is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(10);
/// How long the priv and control processes get to exit at shutdown.
const CHILD_EXIT_GRACE: Duration = Duration::from_secs(3);

/// How to stop a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopHow {
    /// `vmctl stop`: ask the guest (ACPI power button), then `Terminate`
    /// once `--stop-grace` has passed.
    PowerButton,
    /// Stop the vCPUs without asking the guest (vmd shutting down).
    Terminate,
    /// SIGKILL at once (`vmctl stop -f`, reset).
    Kill,
}

/// Why a device process's end stops its VM, if it does: "blk0: killed by
/// signal 9". None for a device that exited 0 (its VM closed its channel).
fn device_failure(name: &str, status: WaitStatus) -> Option<String> {
    match status {
        WaitStatus::Exited(_, 0) => None,
        WaitStatus::Exited(_, code) => Some(format!("{name}: exited with status {code}")),
        WaitStatus::Signaled(_, sig, _) => Some(format!("{name}: killed by signal {}", sig as i32)),
        other => Some(format!("{name}: ended ({other:?})")),
    }
}

/// Whether child `pid` has exited (a zombie not reaped yet), without
/// reaping it.
fn has_exited(pid: nix::unistd::Pid) -> bool {
    use nix::sys::wait::{waitid, Id};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    matches!(waitid(Id::Pid(pid), flags), Ok(s) if s != WaitStatus::StillAlive)
}

/// Sends `VmmTerminate` (SIGKILL if it cannot be sent) and arms the kill.
fn terminate(name: &str, id: u32, p: &mut VmProc) {
    p.terminate_at = None;
    if p.chan.send(&Msg::VmmTerminate, id, &[]).is_err() {
        warn!("vm {name}: cannot send VmmTerminate, killing it");
        let _ = kill(p.pid, Signal::SIGKILL);
    }
    let kill_at = Instant::now() + TERMINATE_GRACE;
    p.kill_at = Some(p.kill_at.map_or(kill_at, |t| t.min(kill_at)));
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
    /// Successful reloads since vmd started.
    reloads: u64,
    /// vmctl clients connected, as control last said.
    control_clients: u32,
    /// Where the metrics are served (bound at start; a reload that
    /// changes it takes effect at the next start).
    metrics_listen: Option<vmd_config::MetricsListen>,
    /// The IPv6 prefix of `local inet6` without one: fd00::/8 with 56
    /// random bits (OpenBSD's global and subnet ID), drawn once at start.
    auto_prefix6: std::net::Ipv6Addr,
}

/// OpenBSD's `local inet6` default: a unique local prefix, fd00::/8 with
/// the next 7 bytes random.
fn random_ula_prefix() -> std::net::Ipv6Addr {
    let mut bytes = [0u8; 16];
    bytes[0] = 0xfd;
    // SAFETY: getrandom writes at most the 7 bytes it is given.
    let n = unsafe { libc::getrandom(bytes[1..8].as_mut_ptr().cast(), 7, 0) };
    if n != 7 {
        warn!("getrandom failed; the local inet6 prefix is fd00::/64");
    }
    std::net::Ipv6Addr::from(bytes)
}

/// `vmd -n`: checks the configuration, says so, exits 0 or 1.
fn check_config(opts: &Options) -> i32 {
    match crate::conf::load(&opts.config, &opts.defines) {
        Ok(config) => {
            let problems = crate::conf::check_paths(&config);
            if !problems.is_empty() {
                for p in problems {
                    eprintln!("{p}");
                }
                return 1;
            }
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
    crate::conf::load(&opts.config, &opts.defines)
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
    raise_nofile();
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

    let privsep = spawn_role(Role::Priv, &opts, &[]).map_err(|e| format!("starting priv: {e}"))?;
    let control =
        spawn_role(Role::Control, &opts, &[]).map_err(|e| format!("starting control: {e}"))?;
    control
        .chan
        .send(&Msg::ControlSocket, 0, &[listener.as_fd()])
        .map_err(|e| format!("handing the socket to control: {e}"))?;
    drop(listener);
    // `metrics listen`: bound here (control may not), served by control.
    let metrics_listen = config.globals.metrics_listen.clone();
    if let Some(listen) = &metrics_listen {
        let sock = bind_metrics_socket(listen)?;
        control
            .chan
            .send(&Msg::MetricsSocket, 0, &[sock.as_fd()])
            .map_err(|e| format!("handing the metrics socket to control: {e}"))?;
        info!("metrics on {listen}");
    }
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
        reloads: 0,
        control_clients: 0,
        auto_prefix6: random_ula_prefix(),
        metrics_listen,
    };
    parent.configure(config)?;
    Ok((parent, signals))
}

/// Binds `metrics listen`: a unix socket any local user may connect to
/// (a stale socket from an earlier run is replaced; any other file there
/// is an error), or a loopback TCP port.
fn bind_metrics_socket(listen: &vmd_config::MetricsListen) -> Result<OwnedFd, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match listen {
        vmd_config::MetricsListen::Unix(path) => {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if !m.file_type().is_socket() {
                    return Err(format!(
                        "metrics listen {}: exists and is not a socket",
                        path.display()
                    ));
                }
                let _ = std::fs::remove_file(path);
            }
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("metrics listen {}: {e}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                .map_err(|e| format!("metrics listen {}: {e}", path.display()))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("metrics listen: {e}"))?;
            Ok(OwnedFd::from(l))
        }
        vmd_config::MetricsListen::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("metrics listen {addr}: {e}"))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("metrics listen: {e}"))?;
            Ok(OwnedFd::from(l))
        }
    }
}

/// Raises the open-file limit to PARENT_NOFILE (root may raise the hard
/// limit; where even root may not, the soft limit goes up to the hard
/// one): every VM holds a pty, a log and its consoles here. Each child
/// role sets its own, lower limit.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = crate::limits::PARENT_NOFILE;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if setrlimit(Resource::RLIMIT_NOFILE, want.max(soft), want.max(hard)).is_err() {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard.max(soft), hard) {
            warn!("cannot raise the open-file limit: {e}");
        }
    }
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
            self.expire_vmm_requests();
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
            .filter_map(|vm| vm.proc.as_ref())
            .flat_map(|p| [p.terminate_at, p.kill_at, p.start_by])
            .flatten()
            .chain(self.vms.vms.values().filter_map(|vm| vm.pause_deadline))
            .chain(autostart)
            .min()
    }

    /// A VM process that does not answer a pause or unpause in time (it
    /// may be stopped with SIGSTOP, or stuck): the client hears so, and the
    /// state stays what the VM process last reported; an answer that
    /// comes later still updates it.
    fn expire_vmm_requests(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for vm in self.vms.vms.values_mut() {
            if vm.pause_deadline.is_some_and(|t| t <= now) {
                vm.pause_deadline = None;
                if let Some(client) = vm.pause_waiter.take() {
                    warn!(
                        "vm {}: vm process did not answer within {} s",
                        vm.name,
                        crate::limits::VMM_REQUEST_TIMEOUT.as_secs()
                    );
                    expired.push((
                        client,
                        format!(
                            "vm {}: the vm process did not answer within {} s; it is still {}",
                            vm.name,
                            crate::limits::VMM_REQUEST_TIMEOUT.as_secs(),
                            vm.state
                        ),
                    ));
                }
            }
        }
        for (client, text) in expired {
            self.error(client, text);
        }
    }

    fn kill_overdue(&mut self) {
        let now = Instant::now();
        for vm in self.vms.vms.values_mut() {
            if let Some(p) = &mut vm.proc {
                if p.start_by.is_some_and(|t| t <= now) {
                    p.start_by = None;
                    if !p.running {
                        let secs = crate::limits::VMM_START_TIMEOUT.as_secs();
                        warn!(
                            "vm {}: vm process did not start within {secs} s, killing it",
                            vm.name
                        );
                        p.exit_msg = Some(ExitReason::VmmError(format!(
                            "did not start within {secs} s"
                        )));
                        let _ = kill(p.pid, Signal::SIGKILL);
                    }
                }
                if p.terminate_at.is_some_and(|t| t <= now) {
                    info!("vm {}: guest did not power off, stopping it", vm.name);
                    terminate(&vm.name, vm.id, p);
                }
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

    /// SIGTERM, SIGINT: as OpenBSD's rc does with `vmctl stop -aw`
    /// before vmd goes, every running VM's power button is pressed and
    /// the guests get `--stop-grace` to power off, all at once; those
    /// still running then are stopped without them (`kill_overdue`). A
    /// second signal stops them all at once.
    fn begin_shutdown(&mut self, sig: Signal) {
        let how = if self.shutting_down {
            info!("{sig} again: stopping every VM now");
            StopHow::Terminate
        } else {
            info!(
                "{sig}: powering off every VM ({}s grace), then exiting",
                self.opts.stop_grace.as_secs()
            );
            StopHow::PowerButton
        };
        self.shutting_down = true;
        self.autostart.clear();
        let pending: Vec<u32> = self.pending.keys().copied().collect();
        for seq in pending {
            if let Some(p) = self.pending.remove(&seq) {
                self.start_failed(p.vm_id, "vmd is shutting down".into());
            }
        }
        let ids: Vec<u32> = self.vms.vms.keys().copied().collect();
        for id in ids {
            self.request_stop(id, how);
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
        if let Some(vmd_config::MetricsListen::Unix(path)) = &self.metrics_listen {
            let _ = std::fs::remove_file(path);
        }
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
            if let Some((id, index)) = self.vms.by_device_pid(pid) {
                self.device_ended(id, index, status);
                continue;
            }
            match self.vms.by_pid(pid) {
                Some(id) => self.vm_ended(id, status),
                None => debug!("reaped unknown child {pid}"),
            }
        }
    }

    // --- VM processes -----------------------------------------------------

    fn vm_chan_readable(&mut self, id: u32) {
        loop {
            let Some(p) = self.vms.vms.get_mut(&id).and_then(|vm| vm.proc.as_mut()) else {
                return;
            };
            match p.chan.recv() {
                Ok(frame) => self.vm_message(id, frame.msg, frame.fds),
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

    fn vm_message(&mut self, id: u32, msg: Msg, fds: Vec<OwnedFd>) {
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let Some(p) = vm.proc.as_mut() else { return };
        match msg {
            Msg::VmmStats { .. } => {
                // Only what KVM made: the parent reads these as root, so a
                // VM process may not slip it any other file.
                for fd in fds {
                    if p.kvm_stats.len() >= vm.spec.vcpus as usize {
                        break;
                    }
                    if crate::metrics::is_kvm_stats_fd(&fd) {
                        p.kvm_stats.push(fd);
                    } else {
                        warn!("vm {}: VmmStats with an fd that is not KVM's", vm.name);
                    }
                }
            }
            Msg::VmmRunning => {
                p.running = true;
                p.start_by = None;
                p.running_since = Some(Instant::now());
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
                vm.pause_deadline = None;
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

    /// A device process ended. While its VM process runs that is a
    /// failure: the VM stops with the device's reason ("blk0: killed by
    /// signal 9"). A device that exits 0 does so because its VM process
    /// closed its channel: the VM is ending anyway.
    fn device_ended(&mut self, id: u32, index: usize, status: WaitStatus) {
        // The VM process may have said why it ends just before.
        self.vm_chan_readable(id);
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let name = vm.name.clone();
        let Some(p) = vm.proc.as_mut() else { return };
        let Some(dev) = p.devices.get_mut(index) else {
            return;
        };
        dev.alive = false;
        let failure = device_failure(&dev.name, status);
        let vmm_gone = p.exit_msg.is_some() || has_exited(p.pid);
        match failure {
            Some(reason) if !vmm_gone && p.device_failure.is_none() && !p.stop_requested => {
                warn!("vm {name}: device process {reason}; stopping the VM");
                p.device_failure = Some(reason);
                terminate(&name, id, p);
            }
            Some(reason) => debug!("vm {name}: device process {reason}"),
            None => debug!("vm {name}: device process {} exited", dev.name),
        }
    }

    /// Makes sure none of a VM's device processes outlives it: each holds
    /// an image lock or a TAP that a restart needs. They exit by
    /// themselves once the VM process has closed their channels; one that
    /// has not is killed. A device that died on its own, which the VM
    /// process reported, gives the VM its reason.
    fn end_devices(p: &mut VmProc) {
        for d in p.devices.iter_mut().filter(|d| d.alive) {
            d.alive = false;
            let status = match waitpid(d.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    let _ = kill(d.pid, Signal::SIGKILL);
                    let _ = waitpid(d.pid, None);
                    continue;
                }
                Ok(status) => status,
                Err(_) => continue,
            };
            if matches!(p.exit_msg, Some(ExitReason::Device(_))) && p.device_failure.is_none() {
                p.device_failure = device_failure(&d.name, status);
            }
        }
    }

    fn vm_ended(&mut self, id: u32, status: WaitStatus) {
        // Read what the process said before it died: the exit message may
        // still be queued behind the SIGCHLD.
        self.vm_chan_readable(id);
        let Some(vm) = self.vms.vms.get_mut(&id) else {
            return;
        };
        let Some(mut p) = vm.proc.take() else { return };
        vm.console.master_readable();
        Self::end_devices(&mut p);
        let reason = p
            .device_failure
            .clone()
            .map(ExitReason::Device)
            .or(p.exit_msg.clone())
            .or_else(|| p.stop_requested.then_some(ExitReason::Stopped))
            .unwrap_or(match status {
                WaitStatus::Signaled(_, sig, _) => ExitReason::Signal(sig as i32),
                WaitStatus::Exited(_, code) => ExitReason::Exited(code),
                _ => ExitReason::Exited(-1),
            });
        vm.pause_deadline = None;
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
        self.forget_if_instance(id);
    }

    /// Instances (`vmctl start -t`) are forgotten once they stop, as
    /// OpenBSD does: a stopped instance keeps no name, pty or slot.
    fn forget_if_instance(&mut self, id: u32) {
        let stopped_instance = self
            .vms
            .vms
            .get(&id)
            .is_some_and(|vm| vm.origin.is_some() && !vm.is_active());
        if stopped_instance {
            if let Some(vm) = self.vms.vms.remove(&id) {
                info!("vm {}: instance stopped, forgotten", vm.name);
            }
        }
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
