//! control's clients: each one's queue and deadlines, admission by
//! share, and moving requests to the parent and replies back.

use super::*;

/// One connected vmctl. Its socket is non-blocking: a client that does
/// not read its replies fills its own queue and is dropped; control never
/// waits for it.
pub(super) struct Client {
    pub(super) chan: Channel,
    pub(super) creds: Creds,
    /// Replies the socket would not take yet, oldest first.
    pub(super) queue: VecDeque<(Msg, Vec<OwnedFd>)>,
    /// Requests forwarded to the parent and not answered yet; at
    /// CLIENT_REQUESTS_IN_FLIGHT we stop reading from the client.
    pub(super) in_flight: usize,
    /// When it last sent a request or was sent a reply.
    pub(super) last_active: Instant,
}

impl Client {
    /// Requests are read while few are in flight, even when replies are
    /// queued: a client that sends but never reads then overflows its
    /// queue and is dropped, instead of lingering.
    pub(super) fn wants_input(&self) -> bool {
        self.in_flight < CLIENT_REQUESTS_IN_FLIGHT
    }

    /// Since when the client has made no progress: neither asked for
    /// anything nor taken a reply. One that only waits for an answer (a
    /// start, `vmctl wait`) is never idle.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        (self.in_flight == 0 || !self.queue.is_empty()).then_some(self.last_active)
    }

    /// Writes queued replies until the socket is full; false when the
    /// client is gone.
    pub(super) fn flush(&mut self, id: u32) -> bool {
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
pub(super) fn admit(clients: &BTreeMap<u32, Client>, uid: u32) -> Result<(), String> {
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
pub(super) struct Refused {
    pub(super) chan: Channel,
    pub(super) why: String,
    pub(super) until: Instant,
}

impl Refused {
    /// Reads the request, answers with the reason; the caller closes it.
    pub(super) fn answer(&self) {
        let _ = self.chan.recv();
        let _ = self
            .chan
            .send(&Msg::Reply(Reply::Error(self.why.clone())), 0, &[]);
    }
}

/// Accepts every waiting client; each one past its share is told why and
/// closed at once.
pub(super) fn accept_clients(
    listener: &Listener,
    clients: &mut BTreeMap<u32, Client>,
    refused: &mut Vec<Refused>,
    next_id: &mut u32,
) -> bool {
    loop {
        let chan = match listener.accept() {
            Ok(chan) => chan,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            // Out of fds: the caller stops polling the listener a moment,
            // rather than spinning on a connection it cannot take.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                return true;
            }
            Err(e) => {
                warn!("accept: {e}");
                return false;
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
            // As many refusals wait for their request as one user may
            // hold connections (so they and the clients fit in control's
            // fd limit); past that a refused client is just closed.
            if refused.len() < MAX_CLIENTS_PER_UID {
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
pub(super) fn drop_idle(clients: &mut BTreeMap<u32, Client>) {
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

pub(super) fn client_readable(parent: &Channel, clients: &mut BTreeMap<u32, Client>, id: u32) {
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
pub(super) fn relay_reply(
    clients: &mut BTreeMap<u32, Client>,
    id: u32,
    msg: Msg,
    fds: Vec<OwnedFd>,
) {
    let Some(client) = clients.get_mut(&id) else {
        debug!("reply for departed client {id} dropped");
        return;
    };
    if !matches!(msg, Msg::Reply(_)) {
        warn!("parent sent message type {} for a client", msg.type_code());
        return;
    }
    // A part of the metrics is not yet the answer.
    if !matches!(msg, Msg::Reply(Reply::MetricsPart(_))) {
        client.in_flight = client.in_flight.saturating_sub(1);
    }
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
