//! The control process: serves the vmctl socket as the unprivileged vmd
//! user. It reads each client's credentials from the kernel (SO_PEERCRED),
//! tags the client's requests with them and forwards them to the parent,
//! and passes the parent's replies (and their fds) back. Access decisions
//! are the parent's: it alone knows who owns which VM.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmd_proto::msg::{Creds, Reply};
use vmd_proto::{Channel, ChannelError, Listener, Msg};

use crate::limits::{
    CLIENT_IDLE_TIMEOUT, CLIENT_QUEUE_MAX, CLIENT_REQUESTS_IN_FLIGHT, MAX_CLIENTS,
    MAX_CLIENTS_PER_UID, REFUSAL_GRACE, ROOT_RESERVED_CLIENTS,
};
use crate::options::Options;
use crate::scrape::{self, Scraper};

/// One connected vmctl. Its socket is non-blocking: a client that does
/// not read its replies fills its own queue and is dropped; control never
/// waits for it.
struct Client {
    chan: Channel,
    creds: Creds,
    /// Replies the socket would not take yet, oldest first.
    queue: VecDeque<(Msg, Vec<OwnedFd>)>,
    /// Requests forwarded to the parent and not answered yet; at
    /// CLIENT_REQUESTS_IN_FLIGHT we stop reading from the client.
    in_flight: usize,
    /// When it last sent a request or was sent a reply.
    last_active: Instant,
}

impl Client {
    /// Requests are read while few are in flight, even when replies are
    /// queued: a client that sends but never reads then overflows its
    /// queue and is dropped, instead of lingering.
    fn wants_input(&self) -> bool {
        self.in_flight < CLIENT_REQUESTS_IN_FLIGHT
    }

    /// Since when the client has made no progress: neither asked for
    /// anything nor taken a reply. One that only waits for an answer (a
    /// start, `vmctl wait`) is never idle.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight == 0 || !self.queue.is_empty()).then_some(self.last_active)
    }

    /// Writes queued replies until the socket is full; false when the
    /// client is gone.
    fn flush(&mut self, id: u32) -> bool {
        while let Some((msg, fds)) = self.queue.front() {
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            match self.chan.send(msg, id, &borrowed) {
                Ok(()) => {
                    self.queue.pop_front();
                    self.last_active = Instant::now();
                }
                Err(e) if e.is_would_block() => return true,
                Err(e) => {
                    debug!("client {id}: {e}; dropping it");
                    return false;
                }
            }
        }
        true
    }
}

/// Whether a new client of `uid` may have a slot: root always while any
/// slot is left; others within their uid's share and outside the slots
/// kept for root. The refusal says why.
fn admit(clients: &BTreeMap<u32, Client>, uid: u32) -> Result<(), String> {
    if clients.len() >= MAX_CLIENTS {
        return Err(format!("vmd serves {MAX_CLIENTS} connections already"));
    }
    if uid == 0 {
        return Ok(());
    }
    let others = clients.values().filter(|c| c.creds.uid != 0).count();
    if others >= MAX_CLIENTS - ROOT_RESERVED_CLIENTS {
        return Err("too many connections; try again later".into());
    }
    let own = clients.values().filter(|c| c.creds.uid == uid).count();
    if own >= MAX_CLIENTS_PER_UID {
        return Err(format!(
            "uid {uid} has {own} connections to vmd, the most one user may have"
        ));
    }
    Ok(())
}

/// A client refused a slot: it is told why once its request has arrived
/// (closing a socket with its request unread would reset it before it
/// could read the reason), or closed after REFUSAL_GRACE.
struct Refused {
    chan: Channel,
    why: String,
    until: Instant,
}

impl Refused {
    /// Reads the request, answers with the reason; the caller closes it.
    fn answer(&self) {
        let _ = self.chan.recv();
        let _ = self
            .chan
            .send(&Msg::Reply(Reply::Error(self.why.clone())), 0, &[]);
    }
}

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
        let mut fds = vec![
            PollFd::new(parent.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
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
        if !ready[1].is_empty() {
            accept_clients(&listener, &mut clients, &mut refused, &mut next_id);
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

/// Accepts every waiting client; each one past its share is told why and
/// closed at once.
fn accept_clients(
    listener: &Listener,
    clients: &mut BTreeMap<u32, Client>,
    refused: &mut Vec<Refused>,
    next_id: &mut u32,
) {
    loop {
        let chan = match listener.accept() {
            Ok(chan) => chan,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                warn!("accept: {e}");
                return;
            }
        };
        let creds = match chan.peer_creds() {
            Ok(creds) => creds,
            Err(e) => {
                warn!("SO_PEERCRED: {e}");
                continue;
            }
        };
        if let Err(e) = chan.set_nonblocking(true) {
            warn!("client socket: {e}");
            continue;
        }
        if let Err(why) = admit(clients, creds.uid) {
            warn!(
                "refusing a client of uid {} (pid {}): {why}",
                creds.uid, creds.pid
            );
            // As many refusals wait for their request as clients may be
            // served; past that a refused client is just closed.
            if refused.len() < MAX_CLIENTS {
                refused.push(Refused {
                    chan,
                    why,
                    until: Instant::now() + REFUSAL_GRACE,
                });
            }
            continue;
        }
        let id = *next_id;
        *next_id = next_id.wrapping_add(1).max(1);
        debug!("client {id} connected: uid {} pid {}", creds.uid, creds.pid);
        clients.insert(
            id,
            Client {
                chan,
                creds,
                queue: VecDeque::new(),
                in_flight: 0,
                last_active: Instant::now(),
            },
        );
    }
}

/// Drops clients that have neither asked nor waited for anything in
/// CLIENT_IDLE_TIMEOUT.
fn drop_idle(clients: &mut BTreeMap<u32, Client>) {
    let now = Instant::now();
    clients.retain(|id, c| {
        let idle = c
            .idle_since()
            .is_some_and(|t| now.duration_since(t) >= CLIENT_IDLE_TIMEOUT);
        if idle {
            debug!("client {id} (uid {}) idle, dropping it", c.creds.uid);
        }
        !idle
    });
}

fn client_readable(parent: &Channel, clients: &mut BTreeMap<u32, Client>, id: u32) {
    let Some(client) = clients.get_mut(&id) else {
        return;
    };
    let frame = match client.chan.recv() {
        Ok(frame) => frame,
        Err(e) if e.is_would_block() => return,
        Err(ChannelError::Closed) => {
            debug!("client {id} disconnected");
            clients.remove(&id);
            return;
        }
        Err(e) => {
            warn!("client {id} (uid {}): {e}; dropping it", client.creds.uid);
            clients.remove(&id);
            return;
        }
    };
    match frame.msg {
        Msg::Request(req) => {
            client.in_flight += 1;
            client.last_active = Instant::now();
            let msg = Msg::ClientRequest {
                creds: client.creds.clone(),
                req,
            };
            if let Err(e) = parent.send(&msg, id, &[]) {
                error!("forwarding to parent: {e}");
            }
        }
        other => {
            warn!(
                "client {id} sent message type {}, which clients may not send; dropping it",
                other.type_code()
            );
            clients.remove(&id);
        }
    }
}

/// Queues a reply for its client and writes what the socket takes; a
/// client whose queue overflows is dropped, never waited for.
fn relay_reply(clients: &mut BTreeMap<u32, Client>, id: u32, msg: Msg, fds: Vec<OwnedFd>) {
    let Some(client) = clients.get_mut(&id) else {
        debug!("reply for departed client {id} dropped");
        return;
    };
    if !matches!(msg, Msg::Reply(_)) {
        warn!("parent sent message type {} for a client", msg.type_code());
        return;
    }
    client.in_flight = client.in_flight.saturating_sub(1);
    if client.queue.len() >= CLIENT_QUEUE_MAX {
        warn!(
            "client {id} (uid {}) does not read its replies; dropping it",
            client.creds.uid
        );
        clients.remove(&id);
        return;
    }
    client.queue.push_back((msg, fds));
    if !client.flush(id) {
        clients.remove(&id);
    }
}
