//! Logging: syslog (daemon facility) by default, stderr in `-d` mode.
//! Every process installs it right after the role dispatch, so lines from
//! each role carry its name.

use std::io::Write;
use std::sync::Mutex;

use log::{Level, Log, Metadata, Record};

enum Sink {
    Stderr,
    Syslog(Mutex<syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>>),
}

struct VmdLogger {
    role: &'static str,
    sink: Sink,
}

impl Log for VmdLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // The log crate's global maximum is the one knob every role's code
        // (and `vmctl log`) turns.
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match &self.sink {
            Sink::Stderr => {
                // One write per line: several processes share this stderr.
                let line = format!(
                    "vmd[{}] {}: {}\n",
                    self.role,
                    record.level().as_str().to_lowercase(),
                    record.args()
                );
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Syslog(logger) => {
                let text = format!("{}: {}", self.role, record.args());
                if let Ok(mut logger) = logger.lock() {
                    let _ = match record.level() {
                        Level::Error => logger.err(text),
                        Level::Warn => logger.warning(text),
                        Level::Info => logger.info(text),
                        Level::Debug | Level::Trace => logger.debug(text),
                    };
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger for this process. Falls back to stderr when no
/// syslog socket can be reached, saying so once.
pub fn init(role: &'static str, foreground: bool, verbose: u8) {
    let sink = if foreground {
        Sink::Stderr
    } else {
        let formatter = syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: "vmd".into(),
            pid: std::process::id(),
        };
        match syslog::unix(formatter) {
            Ok(logger) => Sink::Syslog(Mutex::new(logger)),
            Err(e) => {
                eprintln!("vmd[{role}]: syslog unavailable ({e}), logging to stderr");
                Sink::Stderr
            }
        }
    };
    let logger = Box::new(VmdLogger { role, sink });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(vmd_proto::log_filter(verbose));
    }
}
