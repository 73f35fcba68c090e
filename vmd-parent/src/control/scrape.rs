//! The `metrics listen` socket, served by the control process: scrapers
//! (Prometheus, curl) send an HTTP GET and get the metrics text, and
//! nothing else. A scraper cannot send the parent anything but "the
//! metrics, please" (`Msg::MetricsRequest`), so reading the metrics is all
//! the power it has. Every scraper is bounded: its request size, its time,
//! and how many may be connected at once.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::sys::socket::{accept4, SockFlag};
use vmd_proto::msg::Reply;
use vmd_proto::{Channel, Msg};

/// Scrapers connected at once; more wait in the listen backlog.
pub const MAX_SCRAPERS: usize = 16;
/// The longest request we read (a GET line and a few headers).
const MAX_REQUEST: usize = 8192;
/// A scraper has this long to ask and read its answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Scraper {
    sock: std::fs::File,
    request: Vec<u8>,
    /// Sent to the parent; waiting for its answer.
    asked: bool,
    response: Vec<u8>,
    written: usize,
    /// The metrics' parts so far, when they come in several.
    parts: String,
    since: Instant,
}

impl Scraper {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Whether to poll for input (still reading the request).
    pub fn wants_input(&self) -> bool {
        !self.asked && self.response.is_empty()
    }

    pub fn wants_output(&self) -> bool {
        self.written < self.response.len()
    }

    pub fn deadline(&self) -> Instant {
        self.since + SCRAPE_TIMEOUT
    }
}

/// Accepts waiting scrapers, up to MAX_SCRAPERS.
pub fn accept(listener: &OwnedFd, scrapers: &mut BTreeMap<u32, Scraper>, next_id: &mut u32) {
    use std::os::fd::{AsRawFd, FromRawFd};
    while scrapers.len() < MAX_SCRAPERS {
        let fd = match accept4(
            listener.as_raw_fd(),
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(e) => {
                warn!("metrics accept: {e}");
                return;
            }
        };
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let sock = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let id = *next_id;
        *next_id = next_id.wrapping_add(1).max(1);
        scrapers.insert(
            id,
            Scraper {
                sock,
                request: Vec::new(),
                asked: false,
                response: Vec::new(),
                written: 0,
                parts: String::new(),
                since: Instant::now(),
            },
        );
    }
}

/// What a scraper's request asks, once its header has ended.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Incomplete,
    Metrics,
    /// An HTTP status and reason for anything else.
    Refused(&'static str),
}

fn parse_request(req: &[u8]) -> Asked {
    let end = req.windows(4).any(|w| w == b"\r\n\r\n") || req.windows(2).any(|w| w == b"\n\n");
    if !end {
        return if req.len() >= MAX_REQUEST {
            Asked::Refused("431 Request Header Fields Too Large")
        } else {
            Asked::Incomplete
        };
    }
    let line = req.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics" | "/")) => Asked::Metrics,
        (Some("GET"), Some(_)) => Asked::Refused("404 Not Found"),
        _ => Asked::Refused("405 Method Not Allowed"),
    }
}

fn http(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads what scraper `id` sent; asks the parent once it wants the
/// metrics. False when the scraper is done for.
pub fn readable(parent: &Channel, scrapers: &mut BTreeMap<u32, Scraper>, id: u32) -> bool {
    let Some(s) = scrapers.get_mut(&id) else {
        return false;
    };
    let mut buf = [0u8; 2048];
    match s.sock.read(&mut buf) {
        Ok(0) => return false,
        Ok(n) => s.request.extend_from_slice(&buf[..n.min(MAX_REQUEST)]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
        Err(_) => return false,
    }
    match parse_request(&s.request) {
        Asked::Incomplete => true,
        Asked::Metrics => {
            s.asked = true;
            if let Err(e) = parent.send(&Msg::MetricsRequest, id, &[]) {
                warn!("asking the parent for the metrics: {e}");
                return false;
            }
            true
        }
        Asked::Refused(status) => {
            debug!("scraper {id}: {status}");
            s.response = http(status, "only GET /metrics is served here\n");
            true
        }
    }
}

/// The parent's answer for scraper `id`.
pub fn answer(scrapers: &mut BTreeMap<u32, Scraper>, id: u32, msg: Msg) {
    let Some(s) = scrapers.get_mut(&id) else {
        return;
    };
    s.response = match msg {
        Msg::Reply(Reply::MetricsPart(text)) => {
            s.parts.push_str(&text);
            return;
        }
        Msg::Reply(Reply::Metrics(text)) => {
            let mut body = std::mem::take(&mut s.parts);
            body.push_str(&text);
            http("200 OK", &body)
        }
        Msg::Reply(Reply::Error(e)) => http("503 Service Unavailable", &format!("{e}\n")),
        _ => http("500 Internal Server Error", ""),
    };
}

/// Writes what the socket takes; false when the scraper is done (all
/// written, or gone).
pub fn writable(scrapers: &mut BTreeMap<u32, Scraper>, id: u32) -> bool {
    let Some(s) = scrapers.get_mut(&id) else {
        return false;
    };
    while s.written < s.response.len() {
        match s.sock.write(&s.response[s.written..]) {
            Ok(0) => return false,
            Ok(n) => s.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Asked::Incomplete
        );
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse_request(b"GET / HTTP/1.0\n\n"), Asked::Metrics);
        assert!(matches!(
            parse_request(b"GET /start?vm=x HTTP/1.0\r\n\r\n"),
            Asked::Refused(s) if s.starts_with("404")
        ));
        assert!(matches!(
            parse_request(b"POST /metrics HTTP/1.0\r\n\r\n"),
            Asked::Refused(s) if s.starts_with("405")
        ));
        assert!(matches!(
            parse_request(&vec![b'a'; MAX_REQUEST]),
            Asked::Refused(s) if s.starts_with("431")
        ));
        // vmctl's own protocol is not HTTP: refused, never forwarded.
        assert!(matches!(
            parse_request(b"\x01\x00\x00\x00\n\n"),
            Asked::Refused(_)
        ));
    }
}
