//! The control process: serves the vmctl socket as the unprivileged vmd
//! user. It reads each client's credentials from the kernel (SO_PEERCRED),
//! tags the client's requests with them and forwards them to the parent,
//! and passes the parent's replies (and their fds) back. Access decisions
//! are the parent's: it alone knows who owns which VM.

mod clients;
pub mod scrape;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmd_proto::msg::{Creds, Reply};
use vmd_proto::{Channel, ChannelError, Listener, Msg};

use self::clients::{accept_clients, client_readable, drop_idle, relay_reply, Client, Refused};
use self::scrape::Scraper;
use crate::limits::{
    CLIENT_IDLE_TIMEOUT, CLIENT_QUEUE_MAX, CLIENT_REQUESTS_IN_FLIGHT, MAX_CLIENTS,
    MAX_CLIENTS_PER_UID, REFUSAL_GRACE, ROOT_RESERVED_CLIENTS,
};
use crate::options::Options;

/// `sandbox` is control's row of the role table (`vmd_sandbox::CONTROL`).
pub fn run(opts: &Options, parent: Channel, sandbox: &vmd_sandbox::Sandbox) -> i32 {
    match serve(opts, parent, sandbox) {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            1
        }
    }
}

/// How long the listener rests when control is out of fds.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

fn serve(opts: &Options, parent: Channel, sandbox: &vmd_sandbox::Sandbox) -> Result<(), String> {
    // The parent binds the socket (it stays root to remove it at exit) and
    // hands it over first thing; we never need root for it.
    let frame = parent
        .recv()
        .map_err(|e| format!("waiting for the socket: {e}"))?;
    let listener = match (frame.msg, frame.fds.into_iter().next()) {
        (Msg::ControlSocket, Some(fd)) => Listener::from_fd(fd),
        (other, _) => {
            return Err(format!(
                "expected the socket, got message type {}",
                other.type_code()
            ))
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("control socket: {e}"))?;
    let (uid, gid) = opts.user.ok_or("no --user given")?;
    // The socket is in hand: drop to the vmd user, no host paths, only
    // control's syscalls.
    sandbox
        .enter(Some((uid, gid)))
        .map_err(|e| format!("sandbox: {e}"))?;
    info!("serving {}", opts.socket.display());

    let mut clients: BTreeMap<u32, Client> = BTreeMap::new();
    let mut refused: Vec<Refused> = Vec::new();
    let mut next_id: u32 = 1;
    let mut reported = 0;
    // Set while we are out of fds: the listener rests until then.
    let mut accept_paused: Option<Instant> = None;
    // `metrics listen`, when the parent hands it over, and its scrapers.
    let mut metrics: Option<OwnedFd> = None;
    let mut scrapers: BTreeMap<u32, Scraper> = BTreeMap::new();
    loop {
        // The parent's metrics count our clients.
        if clients.len() != reported {
            reported = clients.len();
            let msg = Msg::ControlClients {
                count: reported as u32,
            };
            if let Err(e) = parent.send(&msg, 0, &[]) {
                warn!("telling the parent the client count: {e}");
            }
        }
        let ids: Vec<u32> = clients.keys().copied().collect();
        let accepting = accept_paused.is_none_or(|t| Instant::now() >= t);
        let mut fds = vec![
            PollFd::new(parent.as_fd(), PollFlags::POLLIN),
            PollFd::new(
                listener.as_fd(),
                if accepting {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
        ];
        fds.extend(ids.iter().filter_map(|id| clients.get(id)).map(|c| {
            let mut events = PollFlags::empty();
            if c.wants_input() {
                events |= PollFlags::POLLIN;
            }
            if !c.queue.is_empty() {
                events |= PollFlags::POLLOUT;
            }
            PollFd::new(c.chan.as_fd(), events)
        }));
        fds.extend(
            refused
                .iter()
                .map(|r| PollFd::new(r.chan.as_fd(), PollFlags::POLLIN)),
        );
        // Then the metrics listener (while there is room) and scrapers.
        let metrics_at = fds.len();
        let listening = metrics.is_some() && scrapers.len() < scrape::MAX_SCRAPERS;
        fds.extend(
            metrics
                .as_ref()
                .filter(|_| listening)
                .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
        );
        let scraper_ids: Vec<u32> = scrapers.keys().copied().collect();
        let scrapers_at = fds.len();
        fds.extend(scrapers.values().map(|s| {
            let mut events = PollFlags::empty();
            if s.wants_input() {
                events |= PollFlags::POLLIN;
            }
            if s.wants_output() {
                events |= PollFlags::POLLOUT;
            }
            PollFd::new(s.fd(), events)
        }));
        let timeout = clients
            .values()
            .filter_map(Client::idle_since)
            .map(|since| since + CLIENT_IDLE_TIMEOUT)
            .chain(refused.iter().map(|r| r.until))
            .chain(accept_paused.filter(|_| !accepting))
            .chain(scrapers.values().map(Scraper::deadline))
            .min()
            .map_or(PollTimeout::NONE, |at| {
                let left = at.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                    .unwrap_or(PollTimeout::NONE)
            });
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);

        if !ready[0].is_empty() {
            match parent.recv() {
                Ok(frame) => match frame.msg {
                    Msg::SetVerbose { level } => log::set_max_level(vmd_proto::log_filter(level)),
                    Msg::MetricsSocket => {
                        metrics = frame.fds.into_iter().next();
                        info!("serving the metrics to scrapers");
                    }
                    msg if scrapers.contains_key(&frame.peer_id) => {
                        scrape::answer(&mut scrapers, frame.peer_id, msg)
                    }
                    msg => relay_reply(&mut clients, frame.peer_id, msg, frame.fds),
                },
                // The parent is gone or broken: nothing left to serve.
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(format!("parent: {e}")),
            }
        }
        // Refusals first: their indices are from before this round's accepts.
        let now = Instant::now();
        let mut index = 2 + ids.len();
        refused.retain(|r| {
            let readable = !ready[index].is_empty();
            index += 1;
            if readable {
                r.answer();
            }
            !readable && now < r.until
        });
        if accepting && !ready[1].is_empty() {
            let out_of_fds = accept_clients(&listener, &mut clients, &mut refused, &mut next_id);
            if out_of_fds && accept_paused.is_none() {
                warn!("out of file descriptors: not accepting clients for a moment");
            }
            accept_paused = out_of_fds.then(|| Instant::now() + ACCEPT_PAUSE);
        }
        for (i, id) in ids.iter().enumerate() {
            let revents = ready[i + 2];
            if revents.contains(PollFlags::POLLOUT) {
                if let Some(c) = clients.get_mut(id) {
                    if !c.flush(*id) {
                        clients.remove(id);
                        continue;
                    }
                }
            }
            if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                client_readable(&parent, &mut clients, *id);
            }
        }
        drop_idle(&mut clients);
        if listening && !ready[metrics_at].is_empty() {
            if let Some(l) = &metrics {
                scrape::accept(l, &mut scrapers, &mut next_id);
            }
        }
        for (i, id) in scraper_ids.iter().enumerate() {
            let revents = ready[scrapers_at + i];
            let mut keep = true;
            if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                && scrapers.get(id).is_some_and(Scraper::wants_input)
            {
                keep = scrape::readable(&parent, &mut scrapers, *id);
            }
            if keep && scrapers.get(id).is_some_and(Scraper::wants_output) {
                keep = scrape::writable(&mut scrapers, *id);
            }
            if !keep {
                scrapers.remove(id);
            }
        }
        let now = Instant::now();
        scrapers.retain(|_, s| s.deadline() > now);
    }
}
