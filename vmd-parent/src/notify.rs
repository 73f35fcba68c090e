//! Readiness for systemd (Type=notify): one datagram, "READY=1", to the
//! socket named by $NOTIFY_SOCKET, sent once the control socket accepts
//! connections. Nothing happens when vmd was not started by systemd.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use log::{debug, warn};

pub fn ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    // A leading '@' names a socket in the abstract namespace.
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(b"READY=1", &addr)
    });
    match sent {
        Ok(_) => debug!("told systemd we are ready"),
        Err(e) => warn!("NOTIFY_SOCKET {path}: {e}"),
    }
    // Children must not inherit it and notify on our behalf.
    std::env::remove_var("NOTIFY_SOCKET");
}
