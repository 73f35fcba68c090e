//! The control process: serves the vmctl socket as the unprivileged vmd
//! user. It reads each client's credentials from the kernel (SO_PEERCRED),
//! tags the client's requests with them and forwards them to the parent,
//! and passes the parent's replies (and their fds) back. Access decisions
//! are the parent's: it alone knows who owns which VM.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmd_proto::msg::Creds;
use vmd_proto::{Channel, ChannelError, Listener, Msg};

use crate::options::Options;

/// Clients beyond this are turned away, so a flood of connections cannot
/// exhaust our fds.
const MAX_CLIENTS: usize = 256;

struct Client {
    chan: Channel,
    creds: Creds,
}

pub fn run(opts: &Options, parent: Channel) -> i32 {
    match serve(opts, parent) {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            1
        }
    }
}

fn serve(opts: &Options, parent: Channel) -> Result<(), String> {
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
    sandbox(uid, gid).map_err(|e| format!("sandbox: {e}"))?;
    info!("serving {}", opts.socket.display());

    let mut clients: BTreeMap<u32, Client> = BTreeMap::new();
    let mut next_id: u32 = 1;
    loop {
        let ids: Vec<u32> = clients.keys().copied().collect();
        let mut fds = vec![
            PollFd::new(parent.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            ids.iter()
                .filter_map(|id| clients.get(id))
                .map(|c| PollFd::new(c.chan.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);

        if ready[0] {
            match parent.recv() {
                Ok(frame) => match frame.msg {
                    Msg::SetVerbose { level } => log::set_max_level(vmd_proto::log_filter(level)),
                    msg => relay_reply(&mut clients, frame.peer_id, msg, frame.fds),
                },
                // The parent is gone or broken: nothing left to serve.
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(format!("parent: {e}")),
            }
        }
        if ready[1] {
            accept_client(&listener, &mut clients, &mut next_id);
        }
        for (i, id) in ids.iter().enumerate() {
            if ready[i + 2] {
                client_readable(&parent, &mut clients, *id);
            }
        }
    }
}

/// The socket is in hand: drop to the vmd user, no host paths, only
/// control's syscalls.
fn sandbox(uid: u32, gid: u32) -> Result<(), vmd_sandbox::SandboxError> {
    vmd_sandbox::drop_privileges(uid, gid)?;
    // MAX_CLIENTS plus the channel, the listener and relayed console fds.
    vmd_sandbox::limit_resources(2 * MAX_CLIENTS as u64)?;
    vmd_sandbox::landlock_no_fs()?;
    vmd_sandbox::apply_seccomp(vmd_sandbox::Role::Control)
}

fn accept_client(listener: &Listener, clients: &mut BTreeMap<u32, Client>, next_id: &mut u32) {
    let chan = match listener.accept() {
        Ok(chan) => chan,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Err(e) => {
            warn!("accept: {e}");
            return;
        }
    };
    if clients.len() >= MAX_CLIENTS {
        warn!("too many clients, refusing one");
        return;
    }
    let creds = match chan.peer_creds() {
        Ok(creds) => creds,
        Err(e) => {
            warn!("SO_PEERCRED: {e}");
            return;
        }
    };
    let id = *next_id;
    *next_id = next_id.wrapping_add(1).max(1);
    debug!("client {id} connected: uid {} pid {}", creds.uid, creds.pid);
    clients.insert(id, Client { chan, creds });
}

fn client_readable(parent: &Channel, clients: &mut BTreeMap<u32, Client>, id: u32) {
    let Some(client) = clients.get(&id) else {
        return;
    };
    let frame = match client.chan.recv() {
        Ok(frame) => frame,
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
            let msg = Msg::ClientRequest {
                creds: client.creds,
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

fn relay_reply(clients: &mut BTreeMap<u32, Client>, id: u32, msg: Msg, fds: Vec<OwnedFd>) {
    let Some(client) = clients.get(&id) else {
        debug!("reply for departed client {id} dropped");
        return;
    };
    if !matches!(msg, Msg::Reply(_)) {
        warn!("parent sent message type {} for a client", msg.type_code());
        return;
    }
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    if let Err(e) = client.chan.send(&msg, id, &borrowed) {
        debug!("client {id}: {e}; dropping it");
        clients.remove(&id);
    }
}
