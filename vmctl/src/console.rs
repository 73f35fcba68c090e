//! `vmctl console`: relay the terminal to a VM's serial console.
//!
//! vmd answers `Request::Console` with a stream socket that carries the
//! console both ways. One thread polls stdin, the socket and a self-pipe
//! fed by the signal handler. On a terminal, stdin goes raw for the
//! session and is put back on every way out: normal end, error, SIGINT,
//! SIGTERM, SIGHUP and panic.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Once};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{self, SetArg};
use vmd_proto::msg::{Reply, Request};

use crate::args::Spec;
use crate::client::{Ctx, Error};

const CMD: &str = "console";

pub const SPEC: Spec = Spec {
    short: "",
    long: &[],
    intermixed: true,
};

/// Signals that end the session (with the terminal restored first).
const END_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Stop reading stdin while this much input waits for the VM.
const MAX_PENDING: usize = 64 * 1024;

pub fn parse(args: &[String]) -> Result<String, Error> {
    let parsed = SPEC.parse(args).map_err(|e| Error::args(CMD, e))?;
    match parsed.operands.as_slice() {
        [name] => Ok(name.clone()),
        [] => Err(Error::usage(CMD, "needs a VM name")),
        [_, extra, ..] => Err(Error::usage(CMD, format!("unexpected argument {extra:?}"))),
    }
}

pub fn run(ctx: &Ctx, args: &[String]) -> Result<(), Error> {
    let name = parse(args)?;
    attach(ctx, &name)
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The VM side closed the socket.
    Closed,
    /// The user typed "~.".
    Escape,
    /// The terminal went away.
    Hangup,
    Signal(i32),
}

/// Asks vmd for `name`'s console and relays it until it ends.
pub fn attach(ctx: &Ctx, name: &str) -> Result<(), Error> {
    let (reply, fds) = ctx.request(Request::Console {
        name: name.to_string(),
    })?;
    let tty = match reply {
        Reply::Console { tty } => tty,
        other => return Err(Error::Protocol(format!("{other:?}"))),
    };
    let sock = fds
        .into_iter()
        .next()
        .ok_or_else(|| Error::Protocol("console reply came without its socket".into()))?;

    let stdin = io::stdin();
    let interactive = termios::tcgetattr(stdin.as_fd()).is_ok();
    let signals = SignalPipe::install()?;
    if interactive {
        eprintln!("[vmctl: connected to vm {name} ({tty}); type ~. to leave]");
    }
    let end = {
        let _raw = if interactive {
            Some(RawMode::enter(stdin.as_fd())?)
        } else {
            None
        };
        relay(
            &sock,
            stdin.as_fd(),
            io::stdout().as_fd(),
            interactive,
            &signals,
        )
        // _raw drops here: the terminal is back before anything is printed.
    };
    match end? {
        End::Closed => eprintln!("[vmctl: console closed]"),
        End::Escape => eprintln!("[EOT]"),
        End::Hangup => {}
        End::Signal(sig) => die_of(sig),
    }
    Ok(())
}

/// Ends the process by `sig` itself, so the caller sees the usual status.
fn die_of(sig: i32) -> ! {
    if let Ok(s) = Signal::try_from(sig) {
        let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: restoring the default disposition is always sound.
        let _ = unsafe { signal::sigaction(s, &dfl) };
        let _ = signal::raise(s);
    }
    std::process::exit(128 + sig);
}

/// The relay loop proper: `stdin` to the socket, the socket to `stdout`.
fn relay(
    sock: &OwnedFd,
    stdin: BorrowedFd<'_>,
    stdout: BorrowedFd<'_>,
    interactive: bool,
    signals: &SignalPipe,
) -> Result<End, Error> {
    fcntl(sock, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(|e| Error::io("console socket", e.into()))?;

    let mut stdin_open = true;
    let mut pending: Vec<u8> = Vec::new();
    let mut escape = Escape::default();
    let mut buf = [0u8; 4096];
    let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;

    loop {
        let read_stdin = stdin_open && pending.len() < MAX_PENDING;
        let mut sock_events = PollFlags::POLLIN;
        if !pending.is_empty() {
            sock_events |= PollFlags::POLLOUT;
        }
        let (sig_ev, sock_ev, stdin_ev) = {
            let mut fds = vec![
                PollFd::new(signals.read.as_fd(), PollFlags::POLLIN),
                PollFd::new(sock.as_fd(), sock_events),
            ];
            if read_stdin {
                fds.push(PollFd::new(stdin, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::io("poll", e.into())),
            }
            let ev = |i: usize| {
                fds.get(i)
                    .and_then(PollFd::revents)
                    .unwrap_or(PollFlags::empty())
            };
            (ev(0), ev(1), ev(2))
        };

        if !sig_ev.is_empty() {
            if let Some(sig) = signals.take() {
                return Ok(End::Signal(sig));
            }
        }

        // VM -> stdout.
        if sock_ev.intersects(ready | PollFlags::POLLNVAL) {
            match nix::unistd::read(sock, &mut buf) {
                Ok(0) | Err(Errno::ECONNRESET) => return Ok(End::Closed),
                Ok(n) => {
                    if let Some(sig) = write_all(stdout, &buf[..n], signals)? {
                        return Ok(End::Signal(sig));
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Err(Error::io("reading the console", e.into())),
            }
        }

        // Pending input -> VM.
        if sock_ev.contains(PollFlags::POLLOUT) && !pending.is_empty() {
            match nix::unistd::write(sock, &pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Ok(End::Closed),
                Err(e) => return Err(Error::io("writing to the console", e.into())),
            }
        }

        // stdin -> pending input.
        if read_stdin && stdin_ev.intersects(ready | PollFlags::POLLNVAL) {
            let got = if stdin_ev.contains(PollFlags::POLLNVAL) {
                Ok(0)
            } else {
                nix::unistd::read(stdin, &mut buf)
            };
            match got {
                Ok(0) if interactive => return Ok(End::Hangup),
                // Scripts: end of input is not the end of the session;
                // keep showing the console until it closes.
                Ok(0) => stdin_open = false,
                Ok(n) => {
                    if escape.feed(&buf[..n], &mut pending) {
                        flush_pending(sock, &pending);
                        return Ok(End::Escape);
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) if interactive => return Err(Error::io("reading stdin", e.into())),
                Err(_) => stdin_open = false,
            }
        }
    }
}

/// Writes all of `data` to a (normally blocking) fd, giving up when a
/// signal ends the session meanwhile.
fn write_all(
    fd: BorrowedFd<'_>,
    mut data: &[u8],
    signals: &SignalPipe,
) -> Result<Option<i32>, Error> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {
                if let Some(sig) = signals.take() {
                    return Ok(Some(sig));
                }
            }
            Err(Errno::EAGAIN) => {
                // Someone left stdout non-blocking: wait for room.
                let mut fds = [
                    PollFd::new(fd, PollFlags::POLLOUT),
                    PollFd::new(signals.read.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(Error::io("poll", e.into())),
                }
                if let Some(sig) = signals.take() {
                    return Ok(Some(sig));
                }
            }
            Err(e) => return Err(Error::io("writing stdout", e.into())),
        }
    }
    Ok(None)
}

/// Best effort: hands input typed before "~." to the VM (one second at
/// most), so "command\n~." in a script runs the command.
fn flush_pending(sock: &OwnedFd, mut data: &[u8]) {
    while !data.is_empty() {
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        match nix::unistd::write(sock, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// cu(1)-style escapes: "~." at the start of a line leaves, "~~" sends one
/// '~', and a '~' followed by anything else is sent as typed.
#[derive(Debug, Clone, Copy)]
struct Escape {
    line_start: bool,
    tilde: bool,
}

impl Default for Escape {
    fn default() -> Self {
        Escape {
            line_start: true,
            tilde: false,
        }
    }
}

impl Escape {
    /// Appends what `input` sends to the VM to `out`; true when the user
    /// asked to leave (the rest of `input` is dropped).
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return true,
                    b'~' => out.push(b'~'),
                    _ => out.extend_from_slice(&[b'~', b]),
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            } else {
                out.push(b);
            }
            self.line_start = matches!(b, b'\r' | b'\n');
        }
        false
    }
}

/// The terminal settings to put back, also reachable from the panic hook.
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

fn restore_terminal() {
    let saved = match SAVED_TERMIOS.lock() {
        Ok(mut g) => g.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let Some(t) = saved {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &t.into());
    }
}

/// Raw mode on stdin for as long as it lives.
struct RawMode;

impl RawMode {
    fn enter(fd: BorrowedFd<'_>) -> Result<RawMode, Error> {
        let orig =
            termios::tcgetattr(fd).map_err(|e| Error::io("reading terminal settings", e.into()))?;
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        if let Ok(mut g) = SAVED_TERMIOS.lock() {
            *g = Some(orig.clone().into());
        }
        let mut raw = orig;
        termios::cfmakeraw(&mut raw);
        if let Err(e) = termios::tcsetattr(fd, SetArg::TCSANOW, &raw) {
            restore_terminal();
            return Err(Error::io("setting raw mode", e.into()));
        }
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Write end of the self-pipe, for the signal handler (-1: none).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let saved = Errno::last_raw();
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
        Errno::set_raw(saved);
    }
}

/// Signals arrive as bytes on a non-blocking pipe, so poll(2) wakes for
/// them without races.
struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
}

impl SignalPipe {
    fn install() -> Result<SignalPipe, Error> {
        let pipe = SignalPipe::new()?;
        SIGNAL_FD.store(pipe._write.as_raw_fd(), Ordering::Relaxed);
        // No SA_RESTART: a blocked write to stdout returns EINTR.
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        for sig in END_SIGNALS {
            // SAFETY: the handler only calls async-signal-safe functions.
            unsafe { signal::sigaction(sig, &action) }
                .map_err(|e| Error::io("installing signal handlers", e.into()))?;
        }
        Ok(pipe)
    }

    /// The pipe alone, with no handlers.
    fn new() -> Result<SignalPipe, Error> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| Error::io("pipe", e.into()))?;
        Ok(SignalPipe {
            read,
            _write: write,
        })
    }

    /// The first signal that arrived, if any did.
    fn take(&self) -> Option<i32> {
        let mut b = [0u8; 1];
        match nix::unistd::read(&self.read, &mut b) {
            Ok(1) => Some(i32::from(b[0])),
            _ => None,
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        SIGNAL_FD.store(-1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut esc = Escape::default();
        let mut out = Vec::new();
        for c in chunks {
            if esc.feed(c, &mut out) {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn tilde_dot_at_line_start_leaves() {
        assert_eq!(feed_all(&[b"~."]), (vec![], true));
        assert_eq!(feed_all(&[b"ls\r~.rest"]), (b"ls\r".to_vec(), true));
        assert_eq!(feed_all(&[b"ls\n~."]), (b"ls\n".to_vec(), true));
        // Split across reads.
        assert_eq!(feed_all(&[b"x\r~", b"."]), (b"x\r".to_vec(), true));
    }

    #[test]
    fn tilde_elsewhere_is_sent() {
        assert_eq!(feed_all(&[b"a~."]), (b"a~.".to_vec(), false));
        assert_eq!(feed_all(&[b"~~."]), (b"~.".to_vec(), false));
        assert_eq!(feed_all(&[b"~x"]), (b"~x".to_vec(), false));
        // After "~x" we are mid-line: "~." is plain text.
        assert_eq!(feed_all(&[b"~x~."]), (b"~x~.".to_vec(), false));
        assert_eq!(feed_all(&[b"~\r~."]), (b"~\r".to_vec(), true));
    }

    use std::os::unix::net::UnixStream;
    use std::thread;

    /// Runs `relay` with pipes for stdin and stdout and a socketpair for
    /// the console; `vm` plays the daemon's end.
    fn run_relay(
        input: &[u8],
        close_input: bool,
        vm: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (End, Vec<u8>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (in_r, in_w) = nix::unistd::pipe().unwrap();
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&in_w, input).unwrap();
        let keep_open = if close_input {
            drop(in_w);
            None
        } else {
            Some(in_w)
        };
        let vm = thread::spawn(move || vm(theirs));
        let reader = thread::spawn(move || {
            let mut out = Vec::new();
            let mut f = std::fs::File::from(out_r);
            std::io::Read::read_to_end(&mut f, &mut out).unwrap();
            out
        });
        let signals = SignalPipe::new().unwrap();
        let sock = OwnedFd::from(ours);
        let end = relay(&sock, in_r.as_fd(), out_w.as_fd(), false, &signals).unwrap();
        drop(sock);
        drop(out_w);
        drop(keep_open);
        vm.join().unwrap();
        (end, reader.join().unwrap())
    }

    #[test]
    fn relays_until_the_vm_closes_even_after_stdin_eof() {
        use std::io::{Read, Write};
        let (end, out) = run_relay(b"ping\n", true, |mut s| {
            s.write_all(b"login: ").unwrap();
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping\n");
            // Output after stdin hit EOF still arrives.
            thread::sleep(std::time::Duration::from_millis(50));
            s.write_all(b"pong\r\n").unwrap();
        });
        assert_eq!(end, End::Closed);
        assert_eq!(out, b"login: pong\r\n");
    }

    #[test]
    fn tilde_dot_leaves_after_sending_the_line_before() {
        use std::io::Read;
        let (end, _) = run_relay(b"halt\n~.ignored", false, |mut s| {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"halt\n");
        });
        assert_eq!(end, End::Escape);
    }

    #[test]
    fn a_signal_ends_the_session() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (in_r, _in_w) = nix::unistd::pipe().unwrap();
        let (_out_r, out_w) = nix::unistd::pipe().unwrap();
        let signals = SignalPipe::new().unwrap();
        nix::unistd::write(&signals._write, &[libc::SIGTERM as u8]).unwrap();
        let sock = OwnedFd::from(ours);
        let end = relay(&sock, in_r.as_fd(), out_w.as_fd(), false, &signals).unwrap();
        assert_eq!(end, End::Signal(libc::SIGTERM));
    }

    #[test]
    fn args() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse(&w(&["vm"])).unwrap(), "vm");
        assert!(parse(&w(&[]))
            .unwrap_err()
            .to_string()
            .contains("needs a VM name"));
        assert!(parse(&w(&["a", "b"])).is_err());
        assert!(parse(&w(&["-c", "vm"]))
            .unwrap_err()
            .to_string()
            .contains("unknown option -c"));
    }
}
