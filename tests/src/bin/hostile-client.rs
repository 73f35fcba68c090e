//! A hostile vmctl client for tests/hostile_user.rs, run as a test user
//! (runuser): it holds connections to vmd without a word, or sends
//! requests and never reads a reply. It prints one line saying what vmd
//! did, then keeps its connections until its stdin closes.
//!
//! hostile-client SOCKET idle COUNT   -> "held N": connections vmd kept
//! hostile-client SOCKET flood        -> "dropped after N" | "stuck after N"
//! hostile-client SOCKET wait-drop    -> "dropped after S s": one silent
//!                                        connection, until vmd closes it
//! hostile-client SOCKET start TEMPLATE NAME BYTES -> vmd's answer to an
//!                                        instance start with that memory,
//!                                        sent as is (no vmctl checks)

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use vmd_proto::msg::{Reply, Request};
use vmd_proto::vm::StartRequest;
use vmd_proto::{Channel, ChannelError, Msg};

/// Whether vmd still holds this connection open for us.
fn held(chan: &Channel) -> bool {
    match chan.recv() {
        Err(e) if e.is_would_block() => true,
        // A refusal (its reason), or the connection closed.
        Ok(_) | Err(ChannelError::Closed) | Err(_) => false,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, mode) = match args.as_slice() {
        [socket, mode, ..] => (Path::new(socket), mode.as_str()),
        _ => {
            eprintln!("usage: hostile-client SOCKET idle COUNT | flood | wait-drop");
            std::process::exit(2);
        }
    };
    let mut keep = Vec::new();
    match mode {
        "idle" => {
            let count: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(300);
            for _ in 0..count {
                match Channel::connect(socket) {
                    Ok(chan) => keep.push(chan),
                    Err(_) => break,
                }
            }
            // Give control the time to accept or refuse every one (a
            // refused client that says nothing is closed after vmd's
            // REFUSAL_GRACE, 2 s).
            std::thread::sleep(Duration::from_secs(4));
            for chan in &keep {
                chan.set_nonblocking(true).expect("non-blocking");
            }
            let n = keep.iter().filter(|c| held(c)).count();
            println!("held {n}");
        }
        "flood" => {
            let chan = Channel::connect(socket).expect("connect");
            chan.set_nonblocking(true).expect("non-blocking");
            let req = Msg::Request(Request::Status { name: None });
            let mut sent = 0u64;
            let mut blocked_since: Option<Instant> = None;
            let verdict = loop {
                match chan.send(&req, 0, &[]) {
                    Ok(()) => {
                        sent += 1;
                        blocked_since = None;
                    }
                    Err(e) if e.is_would_block() => {
                        let since = *blocked_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(3) {
                            break "stuck";
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break "dropped",
                }
            };
            println!("{verdict} after {sent}");
            keep.push(chan);
        }
        "wait-drop" => {
            let chan = Channel::connect(socket).expect("connect");
            let started = Instant::now();
            // Blocks until vmd closes the connection (or says something).
            let _ = chan.recv();
            println!("dropped after {} s", started.elapsed().as_secs());
        }
        "start" => {
            let [template, name, bytes] = &args[2..] else {
                panic!("start TEMPLATE NAME BYTES");
            };
            let chan = Channel::connect(socket).expect("connect");
            let req = StartRequest {
                name: name.clone(),
                template: Some(template.clone()),
                memory: Some(bytes.parse().expect("BYTES")),
                ..Default::default()
            };
            chan.send(&Msg::Request(Request::Start(req)), 0, &[])
                .expect("send");
            match chan.recv().map(|f| f.msg) {
                Ok(Msg::Reply(Reply::Error(e))) => println!("error: {e}"),
                Ok(Msg::Reply(Reply::Ok(text))) => println!("ok: {text}"),
                other => println!("unexpected: {other:?}"),
            }
        }
        other => {
            eprintln!("hostile-client: unknown mode {other}");
            std::process::exit(2);
        }
    }
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(keep);
}
