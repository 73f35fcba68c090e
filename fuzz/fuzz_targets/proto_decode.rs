//! The strict wire decoder: `frame::decode(bytes, fds)` and, for inputs
//! whose first byte has bit 7 set, the same bytes sent over a real
//! SOCK_SEQPACKET pair with SCM_RIGHTS and read back by `Channel::recv`.
//!
//! Input: byte 0 = fd count (low 6 bits, up to 63, more than MAX_FDS) and
//! mode (bit 7); the rest is the frame. Checks: no panic, every fd handed
//! in is closed once the frame (or error) is dropped, a decoded message
//! re-encodes and decodes to itself, and the process's fd count stays flat.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmd_proto::{frame, Channel};

fn dev_null_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| File::open("/dev/null").expect("open /dev/null").into())
        .collect()
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// A connected pair: the raw sending end and the receiving channel.
fn pair() -> &'static (OwnedFd, Channel) {
    static PAIR: OnceLock<(OwnedFd, Channel)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let (a, b) = Channel::pair().expect("socketpair");
        (a.into_fd(), b)
    })
}

/// sendmsg(2) of `bytes` with `fds` as SCM_RIGHTS; false if the kernel
/// refused (then nothing was queued).
fn send_raw(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> bool {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer below points into live
    // buffers sized as the kernel expects.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) == bytes.len() as isize
    }
}

fn check_frame(f: &frame::Frame) {
    assert_eq!(f.fds.len(), f.msg.fd_count(), "fd count of a decoded frame");
    let enc = frame::encode(&f.msg, f.peer_id, f.pid, f.fds.len())
        .expect("a decoded message re-encodes");
    let again = frame::decode(&enc, dev_null_fds(f.fds.len())).expect("re-encoded frame decodes");
    assert_eq!(again.msg, f.msg);
    assert_eq!((again.peer_id, again.pid), (f.peer_id, f.pid));
}

static EXECS: AtomicU64 = AtomicU64::new(0);
static BASELINE: OnceLock<usize> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let n = usize::from(first & 0x3f);
    let via_socket = first & 0x80 != 0;
    let fds = dev_null_fds(n);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();

    if via_socket {
        let (tx, rx) = pair();
        if send_raw(tx.as_raw_fd(), bytes, &raw) {
            drop(fds); // the receiver has its own copies now
            rx.set_nonblocking(true).unwrap();
            match rx.recv() {
                Ok(f) => check_frame(&f),
                Err(e) => {
                    assert!(!e.is_would_block(), "a queued packet must be readable");
                    let _ = e.to_string();
                }
            }
        }
    } else {
        match frame::decode(bytes, fds) {
            Ok(f) => {
                assert_eq!(f.fds.len(), n);
                check_frame(&f);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    for fd in raw {
        assert!(!is_open(fd), "fd {fd} leaked");
    }

    // Belt and braces: the whole table must not grow (libFuzzer itself
    // may briefly hold a file or two open).
    let i = EXECS.fetch_add(1, Ordering::Relaxed);
    if i % 4096 == 0 {
        let now = count_fds();
        let base = *BASELINE.get_or_init(|| now);
        assert!(now <= base + 4, "fd table grew from {base} to {now}");
    }
});
