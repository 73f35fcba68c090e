//! Codec and channel tests: every decode error, fd hygiene on error paths,
//! real socketpairs, and property tests.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, MsgFlags};
use proptest::prelude::*;

use crate::channel::{Channel, ChannelError, Listener};
use crate::frame::{
    decode, encode, DecodeError, EncodeError, Header, HEADER_LEN, MAX_FDS, MAX_PAYLOAD,
};
use crate::msg::{Creds, Msg, Reply, Request, ResetWhat, SwitchParams};
use crate::vm::DiskFormat as Format;
use crate::vm::{
    BootDevice, DevKind, DevParams, DhcpLease, DiskParams, DiskSpec, ExitReason, NicParams,
    NicSpec, OpenKind, QueueSetup, StartRequest, VmInfo, VmState, VmmParams,
};

// ---- helpers ----

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// True when no read end of the pipe is open anywhere: writing gets EPIPE
/// (the test harness, like any Rust binary, ignores SIGPIPE).
fn read_end_closed(w: &OwnedFd) -> bool {
    match nix::unistd::write(w, b"x") {
        Err(Errno::EPIPE) => true,
        Ok(_) => false,
        Err(e) => panic!("unexpected write error {e}"),
    }
}

/// `n` pipes; returns (read ends to hand over, write ends to probe with).
fn pipes(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
    (0..n).map(|_| pipe()).unzip()
}

fn frame_bytes(type_code: u16, nfds: u16, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        type_code,
        nfds,
        len: payload.len() as u32,
        peer_id: 7,
        pid: 9,
    };
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(payload);
    b
}

fn vmm_params(has_initrd: bool) -> VmmParams {
    VmmParams {
        id: 3,
        name: "vm1".into(),
        memory: 512 << 20,
        vcpus: 2,
        cmdline: "console=ttyS0".into(),
        has_initrd,
        uid: 1000,
        gid: 1000,
        verbose: true,
        disks: Vec::new(),
        nics: Vec::new(),
        cdrom: false,
        boot_device: None,
    }
}

fn dev_null_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| std::fs::File::open("/dev/null").unwrap().into())
        .collect()
}

/// Sends raw bytes and fds on a channel, bypassing all checks.
fn raw_send(ch: &Channel, bytes: &[u8], fds: &[RawFd]) {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let n = socket::sendmsg::<()>(
        ch.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

fn temp_sock_path() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vmd-proto-test-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

// ---- decode errors, one test each ----

#[test]
fn decode_truncated_header() {
    let (r, w) = pipe();
    let err = decode(&[1, 0, 0], vec![r]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Truncated {
                got: 3,
                need: HEADER_LEN
            }
        ),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn decode_truncated_payload() {
    let msg = Msg::PrivOpened {
        kind: OpenKind::Kernel,
    };
    let bytes = encode(&msg, 1, 2, 1).unwrap();
    let (r, w) = pipe();
    let err = decode(&bytes[..bytes.len() - 1], vec![r]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Truncated { got, need } if got + 1 == need),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn decode_oversized_len() {
    let mut bytes = frame_bytes(21, 1, &[]);
    bytes[4..8].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    let (r, w) = pipe();
    let err = decode(&bytes, vec![r]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Oversized { len, max: MAX_PAYLOAD } if len == MAX_PAYLOAD + 1),
        "{err}"
    );
    assert!(read_end_closed(&w));
    // u32::MAX must not overflow anything either.
    bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&bytes, vec![]),
        Err(DecodeError::Oversized { .. })
    ));
}

#[test]
fn decode_unknown_type() {
    let (r, w) = pipe();
    let err = decode(&frame_bytes(999, 1, &[]), vec![r]).unwrap_err();
    assert!(matches!(err, DecodeError::UnknownType(999)), "{err}");
    assert!(read_end_closed(&w));
}

#[test]
fn decode_trailing_bytes_after_payload() {
    let msg = Msg::PrivOpened {
        kind: OpenKind::Kvm,
    };
    let mut bytes = encode(&msg, 1, 2, 1).unwrap();
    bytes.extend_from_slice(&[0, 0]);
    let (r, w) = pipe();
    let err = decode(&bytes, vec![r]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TrailingBytes {
                type_code: 21,
                extra: 2
            }
        ),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn decode_trailing_bytes_inside_len() {
    // PrivOpened's payload is one varint tag; the second byte is unused.
    let (r, w) = pipe();
    let err = decode(&frame_bytes(21, 1, &[0, 0]), vec![r]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TrailingBytes {
                type_code: 21,
                extra: 1
            }
        ),
        "{err}"
    );
    assert!(read_end_closed(&w));
    // A unit variant's payload is empty.
    let err = decode(&frame_bytes(41, 0, &[0]), vec![]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TrailingBytes {
                type_code: 41,
                extra: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn decode_fd_count_header_says_more_than_arrived() {
    let err = decode(&frame_bytes(21, 1, &[0]), vec![]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::FdCount {
                type_code: 21,
                expected: 1,
                got: 0
            }
        ),
        "{err}"
    );
}

#[test]
fn decode_fd_count_more_arrived_than_header_says() {
    let (r, w) = pipe();
    let err = decode(&frame_bytes(41, 0, &[]), vec![r]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::FdCount {
                type_code: 41,
                expected: 0,
                got: 1
            }
        ),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn decode_fd_count_message_needs_fewer() {
    // Header and fds agree, but VmmRunning carries none.
    let (r, w) = pipe();
    let err = decode(&frame_bytes(41, 1, &[]), vec![r]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::FdCount {
                type_code: 41,
                expected: 0,
                got: 1
            }
        ),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn decode_fd_count_message_needs_more() {
    // VmmStart with an initrd needs 4 fds; header and fds say 3.
    let payload = Msg::VmmStart(vmm_params(true)).encode_payload().unwrap();
    let (rs, ws) = pipes(3);
    let err = decode(&frame_bytes(40, 3, &payload), rs).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::FdCount {
                type_code: 40,
                expected: 4,
                got: 3
            }
        ),
        "{err}"
    );
    assert!(ws.iter().all(read_end_closed));
}

#[test]
fn decode_bad_payload() {
    let (r, w) = pipe();
    // ExitReason has 8 variants; tag 200 is none of them.
    let err = decode(&frame_bytes(21, 1, &[200]), vec![r]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Payload { type_code: 21, .. }),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn decode_hostile_length_prefix_does_not_allocate() {
    // Reply::Ok(String) claiming a 2^60-byte string: varint 0xff + u64.
    let mut payload = vec![0u8, 0xff];
    payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let err = decode(&frame_bytes(3, 0, &payload), vec![]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Payload { type_code: 3, .. }),
        "{err}"
    );
    // Reply::Status(Vec<VmInfo>) claiming 2^60 rows.
    payload[0] = 2;
    let err = decode(&frame_bytes(3, 0, &payload), vec![]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Payload { type_code: 3, .. }),
        "{err}"
    );
}

#[test]
fn decode_success_keeps_fds() {
    let msg = Msg::PrivOpened {
        kind: OpenKind::Initrd,
    };
    let bytes = encode(&msg, 5, 6, 1).unwrap();
    let (r, w) = pipe();
    let f = decode(&bytes, vec![r]).unwrap();
    assert_eq!((f.peer_id, f.pid, &f.msg, f.fds.len()), (5, 6, &msg, 1));
    assert!(!read_end_closed(&w));
    drop(f);
    assert!(read_end_closed(&w));
}

// ---- encode ----

#[test]
fn encode_checks_fd_count() {
    let err = encode(&Msg::VmmStart(vmm_params(false)), 0, 0, 4).unwrap_err();
    assert!(
        matches!(
            err,
            EncodeError::FdCount {
                type_code: 40,
                expected: 3,
                got: 4
            }
        ),
        "{err}"
    );
    let err = encode(&Msg::VmmRunning, 0, 0, 1).unwrap_err();
    assert!(
        matches!(
            err,
            EncodeError::FdCount {
                expected: 0,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn encode_checks_size() {
    let big = Msg::Reply(Reply::Ok("x".repeat(MAX_PAYLOAD)));
    let err = encode(&big, 0, 0, 0).unwrap_err();
    assert!(
        matches!(
            err,
            EncodeError::Oversized {
                type_code: 3,
                max: MAX_PAYLOAD,
                ..
            }
        ),
        "{err}"
    );
    // The largest payload that fits round-trips (the decode limit must
    // not reject it).
    // Overhead: variant tag (1 byte) + string length varint (0xfc + u32).
    let s = "x".repeat(MAX_PAYLOAD - 6);
    let fits = Msg::Reply(Reply::Ok(s));
    let bytes = encode(&fits, 0, 0, 0).unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + MAX_PAYLOAD);
    assert_eq!(decode(&bytes, vec![]).unwrap().msg, fits);
}

#[test]
fn encode_layout_is_header_then_inner_payload() {
    let bytes = encode(&Msg::VmmTerminate, 0x0102_0304, 0x0506_0708, 0).unwrap();
    assert_eq!(
        bytes,
        [42, 0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1, 8, 7, 6, 5],
        "unit variants have an empty payload"
    );
    // The payload carries no enum discriminant: PrivOpened{Kernel} is just
    // OpenKind::Kernel's tag.
    let bytes = encode(
        &Msg::PrivOpened {
            kind: OpenKind::Kernel,
        },
        0,
        0,
        1,
    )
    .unwrap();
    assert_eq!(&bytes[HEADER_LEN..], &[1]);
    assert_eq!(&bytes[0..4], &[21, 0, 1, 0]);
}

#[test]
fn type_codes_are_unique_and_covered() {
    let mut codes = Msg::TYPE_CODES.to_vec();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), Msg::TYPE_CODES.len());
    let samples = [
        Msg::Request(Request::Status { name: None }),
        Msg::ClientRequest {
            creds: Creds {
                uid: 0,
                gid: 0,
                pid: 1,
                groups: vec![0, 4],
            },
            req: Request::Console { name: "a".into() },
        },
        Msg::Reply(Reply::Error("e".into())),
        Msg::PrivOpen {
            kind: OpenKind::Kvm,
            path: "/dev/kvm".into(),
            opener: crate::msg::Opener::root(),
        },
        Msg::PrivOpened {
            kind: OpenKind::Kvm,
        },
        Msg::PrivFailed {
            kind: OpenKind::Kernel,
            path: "/k".into(),
            reason: "ENOENT".into(),
        },
        Msg::VmmStart(vmm_params(true)),
        Msg::VmmRunning,
        Msg::VmmTerminate,
        Msg::VmmExited(ExitReason::PowerOff),
        Msg::VmmPause,
        Msg::VmmUnpause,
        Msg::VmmPauseState { paused: true },
        Msg::VmmPowerButton,
        Msg::VmmStats { first: 0, count: 2 },
        Msg::SetVerbose { level: 2 },
        Msg::ControlSocket,
        Msg::ControlClients { count: 3 },
        Msg::MetricsSocket,
        Msg::MetricsRequest,
        Msg::PrivOpenedDisk {
            index: 1,
            backing: 2,
        },
        Msg::PrivOpenedTap {
            index: 0,
            name: "tap0".into(),
        },
        Msg::PrivIfConfig {
            name: "tap0".into(),
            switch: Some(SwitchParams {
                bridge: "br0".into(),
                group: Some("uplink".into()),
                up: true,
                rdomain: Some(3),
                ifgroup: Some(42),
            }),
            group: Some("vms".into()),
            up: true,
            host_addr: Some(("100.64.0.8".parse().unwrap(), 31)),
            host_addr6: None,
            rdomain: None,
            ifgroup: Some(42),
        },
        Msg::PrivIfDone {
            name: "tap0".into(),
        },
        Msg::PrivCleanup,
        Msg::DevStart(DevParams {
            vm_id: 1,
            vm_name: "vm1".into(),
            name: "cdrom".into(),
            kind: DevKind::Scsi,
            uid: 1,
            gid: 1,
            verbose: true,
        }),
        Msg::DevInfo {
            device_type: 2,
            features: 1 << 9,
            queue_sizes: vec![256],
            config: vec![1, 2, 3],
        },
        Msg::DevAttach {
            regions: vec![(0, 1 << 20, 0)],
            queues: 2,
        },
        Msg::DevFeaturesOk { features: 1 << 32 },
        Msg::DevActivate {
            queues: vec![QueueSetup {
                size: 256,
                ready: true,
                desc: 0x1000,
                avail: 0x2000,
                used: 0x3000,
            }],
        },
        Msg::DevReset,
        Msg::DevConfigWrite {
            offset: 4,
            data: vec![9],
        },
        Msg::DevAck { config: vec![] },
        Msg::PrivChildOpened {
            file: crate::msg::OpenedFile {
                uid: 1000,
                gid: 1000,
                dev: 2049,
                ino: 12,
                backing: Some(("base.img".into(), Format::Raw)),
            },
        },
    ];
    let mut seen: Vec<u16> = samples.iter().map(Msg::type_code).collect();
    seen.sort_unstable();
    assert_eq!(seen, codes);
    assert_eq!(samples[samples.len() - 13].fd_count(), 1, "PrivOpenedTap");
    assert_eq!(
        samples[samples.len() - 7].fd_count(),
        2 + 2 * 2,
        "DevAttach"
    );
    assert_eq!(samples[samples.len() - 1].fd_count(), 1, "PrivChildOpened");
    for m in &samples {
        let bytes = encode(m, 0, 0, m.fd_count()).unwrap();
        let f = decode(&bytes, dev_null_fds(m.fd_count())).unwrap();
        assert_eq!(&f.msg, m);
    }
}

#[test]
fn vmm_params_fd_count_counts_the_cdrom() {
    let mut p = vmm_params(false);
    p.disks.push(DiskParams {
        format: crate::vm::DiskFormat::Qcow2,
        read_only: false,
        backing: 1,
    });
    p.cdrom = true;
    p.boot_device = Some(BootDevice::Cdrom);
    // One device channel each for the disk and the CD-ROM: the images
    // themselves go to the device processes.
    assert_eq!(p.fd_count(), 3 + 1 + 1);
    let msg = Msg::VmmStart(p);
    let bytes = encode(&msg, 0, 0, 5).unwrap();
    assert_eq!(decode(&bytes, dev_null_fds(5)).unwrap().msg, msg);
}

#[test]
fn vmm_params_fd_count_counts_one_device_channel_per_nic() {
    let mut p = vmm_params(true);
    p.disks.push(DiskParams {
        format: crate::vm::DiskFormat::Qcow2,
        read_only: false,
        backing: 2,
    });
    assert_eq!(p.fd_count(), 4 + 1);
    let nic = NicParams {
        mac: crate::net::generated_mac("vm1", 0),
        locked: true,
        dhcp: Some(DhcpLease {
            guest: "100.64.0.9".parse().unwrap(),
            host: "100.64.0.8".parse().unwrap(),
            prefix_len: 31,
            dns: None,
            boot_file: None,
        }),
        boot_rom: false,
    };
    p.nics = vec![nic.clone(), nic.clone()];
    assert_eq!(p.fd_count(), 4 + 1 + 2);
    let msg = Msg::VmmStart(p.clone());
    let bytes = encode(&msg, 0, 0, 7).unwrap();
    assert_eq!(decode(&bytes, dev_null_fds(7)).unwrap().msg, msg);
    // A net-booting VM's option ROM comes last.
    p.nics[1].boot_rom = true;
    assert!(p.boot_rom());
    assert_eq!(p.fd_count(), 4 + 1 + 2 + 1);
    // Each device process gets its channel and its image chain or TAP.
    let blk = DevParams {
        vm_id: 1,
        vm_name: "vm1".into(),
        name: "blk0".into(),
        kind: DevKind::Block {
            index: 0,
            disk: p.disks[0].clone(),
        },
        uid: 1,
        gid: 1,
        verbose: false,
    };
    // The channel, the image and 2 backing files, the counters file.
    assert_eq!(blk.fd_count(), 1 + 3 + 1);
    let net = DevParams {
        kind: DevKind::Net { index: 1, nic },
        ..blk.clone()
    };
    assert_eq!(net.fd_count(), 2);
}

#[test]
fn nic_params_without_boot_rom_still_decode() {
    // Parents from before `boot_rom` do not send it.
    let json = r#"{"mac":[254,0,0,0,0,1],"locked":false,"dhcp":null}"#;
    let nic: NicParams = serde_json::from_str(json).unwrap();
    assert!(!nic.boot_rom);
}

// ---- channels ----

fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    nix::fcntl::FdFlag::from_bits_retain(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
}

#[test]
fn socketpair_passes_usable_fds() {
    let (a, b) = Channel::pair().unwrap();
    assert!(is_cloexec(a.as_fd()) && is_cloexec(b.as_fd()));
    let msg = Msg::VmmStart(vmm_params(false));
    let (rs, ws) = pipes(3);
    let borrowed: Vec<BorrowedFd<'_>> = rs.iter().map(|f| f.as_fd()).collect();
    a.send(&msg, 3, &borrowed).unwrap();
    drop(borrowed);
    drop(rs); // the in-flight copies are now the only read ends
    let f = b.recv().unwrap();
    assert_eq!(f.msg, msg);
    assert_eq!(f.peer_id, 3);
    assert_eq!(f.pid, std::process::id());
    assert_eq!(f.fds.len(), 3);
    for (i, (w, r)) in ws.iter().zip(&f.fds).enumerate() {
        assert!(is_cloexec(r.as_fd()), "received fd {i} lacks CLOEXEC");
        nix::unistd::write(w, &[b'a' + i as u8]).unwrap();
        let mut buf = [0u8; 1];
        std::fs::File::from(r.try_clone().unwrap())
            .read_exact(&mut buf)
            .unwrap();
        assert_eq!(buf[0], b'a' + i as u8);
    }
    drop(f);
    assert!(ws.iter().all(read_end_closed));
}

#[test]
fn send_rejects_wrong_fd_count() {
    let (a, _b) = Channel::pair().unwrap();
    let err = a
        .send(&Msg::VmmStart(vmm_params(true)), 0, &[])
        .unwrap_err();
    assert!(
        matches!(err, ChannelError::Encode(EncodeError::FdCount { .. })),
        "{err}"
    );
}

#[test]
fn recv_more_than_max_fds_errs_and_closes_all() {
    let (a, b) = Channel::pair().unwrap();
    let (rs, ws) = pipes(MAX_FDS + 1);
    let raw: Vec<RawFd> = rs.iter().map(|f| f.as_raw_fd()).collect();
    raw_send(&a, &frame_bytes(41, (MAX_FDS + 1) as u16, &[]), &raw);
    drop(rs);
    let err = b.recv().unwrap_err();
    assert!(matches!(err, ChannelError::FdsTruncated), "{err}");
    assert!(ws.iter().all(read_end_closed));
    // The channel still works afterwards.
    a.send(&Msg::VmmRunning, 0, &[]).unwrap();
    assert_eq!(b.recv().unwrap().msg, Msg::VmmRunning);
}

#[test]
fn recv_bad_frame_closes_fds() {
    let (a, b) = Channel::pair().unwrap();
    let (rs, ws) = pipes(MAX_FDS);
    let raw: Vec<RawFd> = rs.iter().map(|f| f.as_raw_fd()).collect();
    raw_send(&a, &frame_bytes(41, MAX_FDS as u16, &[]), &raw);
    drop(rs);
    let err = b.recv().unwrap_err();
    assert!(
        matches!(err, ChannelError::Decode(DecodeError::FdCount { .. })),
        "{err}"
    );
    assert!(ws.iter().all(read_end_closed));
}

#[test]
fn recv_oversized_packet() {
    let (a, b) = Channel::pair().unwrap();
    let (r, w) = pipe();
    let mut bytes = frame_bytes(3, 0, &[]);
    bytes.resize(HEADER_LEN + MAX_PAYLOAD + 100, 0);
    raw_send(&a, &bytes, &[r.as_raw_fd()]);
    drop(r);
    let err = b.recv().unwrap_err();
    assert!(
        matches!(err, ChannelError::Decode(DecodeError::Oversized { .. })),
        "{err}"
    );
    assert!(read_end_closed(&w));
}

#[test]
fn recv_closed() {
    let (a, b) = Channel::pair().unwrap();
    drop(a);
    assert!(matches!(b.recv(), Err(ChannelError::Closed)));
}

#[test]
fn send_to_closed_peer_is_epipe_not_sigpipe() {
    let (a, b) = Channel::pair().unwrap();
    drop(b);
    let err = a.send(&Msg::VmmRunning, 0, &[]).unwrap_err();
    assert!(
        matches!(&err, ChannelError::Io(e) if e.raw_os_error() == Some(libc::EPIPE)),
        "{err}"
    );
}

#[test]
fn nonblocking_would_block() {
    let (a, b) = Channel::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    assert!(b.recv().unwrap_err().is_would_block());
    a.set_nonblocking(true).unwrap();
    let big = Msg::Reply(Reply::Ok("x".repeat(MAX_PAYLOAD / 2)));
    let mut sent = 0;
    let err = loop {
        match a.send(&big, 0, &[]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "send never blocked");
    };
    assert!(err.is_would_block(), "{err}");
    for _ in 0..sent {
        assert_eq!(b.recv().unwrap().msg, big);
    }
    assert!(b.recv().unwrap_err().is_would_block());
    b.set_nonblocking(false).unwrap();
}

#[test]
fn listener_connect_accept_creds() {
    let path = temp_sock_path();
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(
        Listener::bind(&path).is_err(),
        "must not delete a regular file"
    );
    std::fs::remove_file(&path).unwrap();

    let l = Listener::bind(&path).unwrap();
    drop(l); // leaves a stale socket file behind
    let l = Listener::bind(&path).unwrap();
    assert!(is_cloexec(l.as_fd()));
    let c = Channel::connect(&path).unwrap();
    let s = l.accept().unwrap();
    assert!(is_cloexec(c.as_fd()) && is_cloexec(s.as_fd()));
    let creds = s.peer_creds().unwrap();
    assert_eq!(creds.pid as u32, std::process::id());
    assert_eq!(creds.uid, nix::unistd::getuid().as_raw());
    assert_eq!(creds.gid, nix::unistd::getgid().as_raw());
    c.send(&Msg::Request(Request::Status { name: None }), 0, &[])
        .unwrap();
    assert_eq!(
        s.recv().unwrap().msg,
        Msg::Request(Request::Status { name: None })
    );
    l.set_nonblocking(true).unwrap();
    let err = l.accept().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    std::fs::remove_file(&path).unwrap();
    assert!(Channel::connect(&path).is_err());
}

// ---- property tests ----

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn arb_exit() -> impl Strategy<Value = ExitReason> {
    prop_oneof![
        Just(ExitReason::PowerOff),
        Just(ExitReason::Reboot),
        Just(ExitReason::Stopped),
        text().prop_map(ExitReason::GuestCrash),
        text().prop_map(ExitReason::VmmError),
        any::<i32>().prop_map(ExitReason::Signal),
        any::<i32>().prop_map(ExitReason::Exited),
        Just(ExitReason::RebootLoop),
    ]
}

fn arb_kind() -> impl Strategy<Value = OpenKind> {
    prop_oneof![
        Just(OpenKind::Kvm),
        Just(OpenKind::Kernel),
        Just(OpenKind::Initrd),
        Just(OpenKind::Cdrom),
        Just(OpenKind::OptionRom),
        (any::<u8>(), any::<bool>(), arb_some_format()).prop_map(|(index, read_only, format)| {
            OpenKind::Disk {
                index,
                read_only,
                format,
            }
        }),
        any::<u8>().prop_map(|index| OpenKind::Tap { index }),
        Just(OpenKind::Interface),
    ]
}

fn arb_ipv4() -> impl Strategy<Value = std::net::Ipv4Addr> {
    any::<u32>().prop_map(std::net::Ipv4Addr::from)
}

fn arb_nic() -> impl Strategy<Value = NicParams> {
    let lease = (
        arb_ipv4(),
        arb_ipv4(),
        any::<u8>(),
        proptest::option::of(arb_ipv4()),
        proptest::option::of(text()),
    )
        .prop_map(|(guest, host, prefix_len, dns, boot_file)| DhcpLease {
            guest,
            host,
            prefix_len,
            dns,
            boot_file,
        });
    (
        any::<[u8; 6]>(),
        any::<bool>(),
        proptest::option::of(lease),
        any::<bool>(),
    )
        .prop_map(|(mac, locked, dhcp, boot_rom)| NicParams {
            mac,
            locked,
            dhcp,
            boot_rom,
        })
}

fn arb_switch() -> impl Strategy<Value = SwitchParams> {
    (
        text(),
        proptest::option::of(text()),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(bridge, group, up, rdomain, ifgroup)| SwitchParams {
            bridge,
            group,
            up,
            rdomain,
            ifgroup,
        })
}

fn arb_some_format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Raw), Just(Format::Qcow2)]
}

fn arb_format() -> impl Strategy<Value = Option<Format>> {
    proptest::option::of(arb_some_format())
}

fn arb_opener() -> impl Strategy<Value = crate::msg::Opener> {
    (
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u32>(), 0..8),
    )
        .prop_map(|(uid, gid, groups)| crate::msg::Opener { uid, gid, groups })
}

fn arb_nic_spec() -> impl Strategy<Value = NicSpec> {
    (
        proptest::option::of(text()),
        any::<bool>(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(any::<[u8; 6]>()),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(tap, local, switch, group, lladdr, locked, up, rdomain)| NicSpec {
                tap,
                local,
                switch,
                group,
                lladdr,
                locked,
                up,
                rdomain,
            },
        )
}

fn arb_disk_spec() -> impl Strategy<Value = DiskSpec> {
    (text(), arb_format(), any::<bool>()).prop_map(|(path, format, read_only)| DiskSpec {
        path,
        format,
        read_only,
    })
}

fn arb_state() -> impl Strategy<Value = VmState> {
    prop_oneof![
        Just(VmState::Starting),
        Just(VmState::Running),
        Just(VmState::Paused),
        Just(VmState::Stopping),
        Just(VmState::Stopped),
        Just(VmState::Waiting),
    ]
}

fn arb_start() -> impl Strategy<Value = StartRequest> {
    (
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        any::<Option<u64>>(),
        any::<Option<u32>>(),
        proptest::collection::vec(arb_disk_spec(), 0..3),
        proptest::collection::vec(arb_nic_spec(), 0..3),
        proptest::option::of(text()),
        (
            proptest::option::of(text()),
            proptest::option::of(arb_boot_device()),
        ),
    )
        .prop_map(
            |(
                name,
                kernel,
                initrd,
                cmdline,
                memory,
                vcpus,
                disks,
                nics,
                template,
                (cdrom, boot_device),
            )| StartRequest {
                name,
                kernel,
                initrd,
                cmdline,
                memory,
                vcpus,
                disks,
                nics,
                template,
                cdrom,
                boot_device,
            },
        )
}

fn arb_boot_device() -> impl Strategy<Value = BootDevice> {
    prop_oneof![
        Just(BootDevice::Disk),
        Just(BootDevice::Cdrom),
        Just(BootDevice::Net),
    ]
}

fn arb_info() -> impl Strategy<Value = VmInfo> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (text(), text(), arb_state(), text()),
        (proptest::option::of(arb_exit()), any::<u32>()),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(text(), 0..3),
            any::<u32>(),
            proptest::option::of(text()),
        ),
    )
        .prop_map(
            |(
                (id, pid, vcpus, max_mem, cur_mem),
                (tty, owner, state, name),
                (last_exit, restarts),
                (defined, enabled, disks, interfaces, cdrom),
            )| {
                VmInfo {
                    id,
                    pid,
                    vcpus,
                    max_mem,
                    cur_mem,
                    tty,
                    owner,
                    state,
                    name,
                    last_exit,
                    restarts,
                    defined,
                    enabled,
                    disks,
                    interfaces,
                    cdrom,
                }
            },
        )
}

fn arb_params() -> impl Strategy<Value = VmmParams> {
    let disk =
        (arb_some_format(), any::<bool>(), 0u32..3).prop_map(|(format, read_only, backing)| {
            DiskParams {
                format,
                read_only,
                backing,
            }
        });
    (
        (any::<u32>(), text(), any::<u64>(), any::<u32>(), text()),
        (any::<bool>(), any::<u32>(), any::<u32>(), any::<bool>()),
        proptest::collection::vec(disk, 0..2),
        proptest::collection::vec(arb_nic(), 0..3),
        (any::<bool>(), proptest::option::of(arb_boot_device())),
    )
        .prop_map(
            |(
                (id, name, memory, vcpus, cmdline),
                (has_initrd, uid, gid, verbose),
                disks,
                nics,
                (cdrom, boot_device),
            )| {
                VmmParams {
                    id,
                    name,
                    memory,
                    vcpus,
                    cmdline,
                    has_initrd,
                    uid,
                    gid,
                    verbose,
                    disks,
                    nics,
                    cdrom,
                    boot_device,
                }
            },
        )
}

fn arb_creds() -> impl Strategy<Value = Creds> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<i32>(),
        proptest::collection::vec(any::<u32>(), 0..8),
    )
        .prop_map(|(uid, gid, pid, groups)| Creds {
            uid,
            gid,
            pid,
            groups,
        })
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        arb_start().prop_map(Request::Start),
        (proptest::option::of(text()), any::<bool>(), any::<bool>())
            .prop_map(|(name, force, wait)| Request::Stop { name, force, wait }),
        proptest::option::of(text()).prop_map(|name| Request::Status { name }),
        text().prop_map(|name| Request::Console { name }),
        text().prop_map(|name| Request::Pause { name }),
        text().prop_map(|name| Request::Unpause { name }),
        text().prop_map(|name| Request::Wait { name }),
        text().prop_map(|path| Request::Load { path }),
        Just(Request::Reload),
        prop_oneof![
            Just(ResetWhat::All),
            Just(ResetWhat::Vms),
            Just(ResetWhat::Switches)
        ]
        .prop_map(|what| Request::Reset { what }),
        any::<bool>().prop_map(|verbose| Request::Log { verbose }),
    ]
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        text().prop_map(Reply::Ok),
        text().prop_map(Reply::Error),
        proptest::collection::vec(arb_info(), 0..4).prop_map(Reply::Status),
        text().prop_map(|tty| Reply::Console { tty }),
    ]
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        arb_request().prop_map(Msg::Request),
        (arb_creds(), arb_request()).prop_map(|(creds, req)| Msg::ClientRequest { creds, req }),
        arb_reply().prop_map(Msg::Reply),
        (arb_kind(), text(), arb_opener()).prop_map(|(kind, path, opener)| Msg::PrivOpen {
            kind,
            path,
            opener
        }),
        arb_kind().prop_map(|kind| Msg::PrivOpened { kind }),
        (arb_kind(), text(), text()).prop_map(|(kind, path, reason)| Msg::PrivFailed {
            kind,
            path,
            reason
        }),
        arb_params().prop_map(Msg::VmmStart),
        Just(Msg::VmmRunning),
        Just(Msg::VmmTerminate),
        arb_exit().prop_map(Msg::VmmExited),
        Just(Msg::VmmPause),
        Just(Msg::VmmUnpause),
        any::<bool>().prop_map(|paused| Msg::VmmPauseState { paused }),
        Just(Msg::VmmPowerButton),
        any::<u8>().prop_map(|level| Msg::SetVerbose { level }),
        Just(Msg::ControlSocket),
        (any::<u8>(), 0u32..4).prop_map(|(index, backing)| Msg::PrivOpenedDisk { index, backing }),
        (any::<u8>(), text()).prop_map(|(index, name)| Msg::PrivOpenedTap { index, name }),
        (
            text(),
            proptest::option::of(arb_switch()),
            proptest::option::of(text()),
            any::<bool>(),
            proptest::option::of((arb_ipv4(), any::<u8>())),
            proptest::option::of((any::<u128>(), any::<u8>())),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(
                |(name, switch, group, up, host_addr, host_addr6, rdomain, ifgroup)| {
                    Msg::PrivIfConfig {
                        name,
                        switch,
                        group,
                        up,
                        host_addr,
                        host_addr6: host_addr6.map(|(a, l)| (std::net::Ipv6Addr::from(a), l)),
                        rdomain,
                        ifgroup,
                    }
                }
            ),
        text().prop_map(|name| Msg::PrivIfDone { name }),
        Just(Msg::PrivCleanup),
    ]
}

proptest! {
    #[test]
    fn prop_encode_decode_round_trip(msg in arb_msg(), peer_id in any::<u32>(), pid in any::<u32>()) {
        let n = msg.fd_count();
        let bytes = encode(&msg, peer_id, pid, n).unwrap();
        let f = decode(&bytes, dev_null_fds(n)).unwrap();
        prop_assert_eq!(f.msg, msg);
        prop_assert_eq!((f.peer_id, f.pid, f.fds.len()), (peer_id, pid, n));
    }

    #[test]
    fn prop_decode_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        nfds in 0usize..3,
    ) {
        let _ = decode(&bytes, dev_null_fds(nfds));
    }

    #[test]
    fn prop_decode_valid_header_arbitrary_payload_never_panics(
        code in proptest::sample::select(Msg::TYPE_CODES),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        nfds in 0usize..5,
    ) {
        let _ = decode(&frame_bytes(code, nfds as u16, &payload), dev_null_fds(nfds));
    }

    #[test]
    fn prop_mutated_frames_never_panic(
        msg in arb_msg(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode(&msg, 1, 2, msg.fd_count()).unwrap();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        let _ = decode(&bytes, dev_null_fds(msg.fd_count()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn prop_socketpair_round_trip(msg in arb_msg(), peer_id in any::<u32>()) {
        let (a, b) = Channel::pair().unwrap();
        let fds = dev_null_fds(msg.fd_count());
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        a.send(&msg, peer_id, &borrowed).unwrap();
        let f = b.recv().unwrap();
        prop_assert_eq!(f.msg, msg);
        prop_assert_eq!(f.peer_id, peer_id);
        prop_assert_eq!(f.fds.len(), fds.len());
    }
}
