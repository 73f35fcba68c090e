//! Every limit that keeps one user from starving the others, in one place.
//! docs/SECURITY.md lists them in its "Limits" table, which
//! tests/tests/hostile_user.rs reads and attacks with.

use std::time::Duration;

/// Client connections control serves at once, all users together.
pub const MAX_CLIENTS: usize = 256;
/// Of those, the most one uid other than root may hold.
pub const MAX_CLIENTS_PER_UID: usize = 32;
/// Slots only root may take, so that other users together never lock root
/// out.
pub const ROOT_RESERVED_CLIENTS: usize = 16;
/// A client that neither asks nor waits for anything this long (seconds)
/// is dropped.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client refused a slot gets this long (seconds) to send its request
/// and read why it was refused.
pub const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// Replies control queues for a client that does not read them; one more
/// and the client is dropped.
pub const CLIENT_QUEUE_MAX: usize = 64;
/// Requests of one client waiting in the parent at once; control reads no
/// more from that client until one is answered.
pub const CLIENT_REQUESTS_IN_FLIGHT: usize = 16;
/// `vmctl console` sessions on one VM for users other than root (root may
/// always attach).
pub const MAX_CONSOLES_PER_VM: usize = 8;
/// Bytes of guest output queued for a console client that does not read;
/// past this it is detached rather than letting its backlog grow.
pub const CONSOLE_BACKLOG_MAX: usize = 1_048_576;
/// Instances (`vmctl start -t`) one user other than root may have.
pub const MAX_INSTANCES_PER_USER: usize = 16;
/// How long (seconds) a VM process gets to answer a pause or unpause;
/// then the client is told, and the state stays what the VM process last
/// reported.
pub const VMM_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long (seconds) a VM process gets from its start to saying the VM
/// runs; then it is killed and the start fails with that reason.
pub const VMM_START_TIMEOUT: Duration = Duration::from_secs(30);
/// vmd raises its open-file limit to this (or its hard limit, if it
/// cannot raise that): each VM holds a pty, a log and its consoles in the
/// parent.
pub const PARENT_NOFILE: u64 = 65536;

// control's open-file limit (vmd_sandbox::CONTROL) holds every client
// plus the channel, the listener and relayed console fds.
const _: () = assert!(vmd_sandbox::CONTROL.max_files == 2 * MAX_CLIENTS as u64);
