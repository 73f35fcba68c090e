//! Helpers for the end-to-end tests: a real vmd daemon on its own socket
//! and state directory, vmctl runs against it, console readers, and the
//! test guests built from source.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Where the workspace's binaries are: next to the test executable's
/// `deps/` directory, or `VMD_BIN_DIR`.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("VMD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Fails loudly when the machine cannot run VMs: these tests never pass
/// by skipping.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "KVM REQUIRED: /dev/kvm is missing on this host; the end-to-end tests boot real guests"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "ROOT REQUIRED: the end-to-end tests run vmd, which needs root"
    );
}

/// True where the CPU exposes hardware virtualization, so a full Linux
/// guest can boot (this project's CI host runs a nested KVM that cannot).
pub fn has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Says loudly that (part of) a test did not run here and why. Written
/// straight to stderr, past the test harness's output capture, so the
/// line shows in every run's output and no skip passes silently.
pub fn skipped(what: &str, why: &str) {
    use std::io::Write;
    let line = format!("\n*** SKIPPED {what}: {why} ***\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Assembles 16-bit real-mode code (binutils: `as --32`, `ld` to a flat
/// binary linked at 0x7c00, where firmware and PXE load boot code), with
/// each `(name, value)` in `defsyms` defined for the source; files are
/// named after `stem` in `dir`.
pub fn assemble_real_mode(
    dir: &Path,
    stem: &str,
    source: &str,
    defsyms: &[(&str, u32)],
) -> Vec<u8> {
    let src = dir.join(format!("{stem}.S"));
    let obj = dir.join(format!("{stem}.o"));
    let bin = dir.join(format!("{stem}.bin"));
    std::fs::write(&src, source).expect("writing the assembly source");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("binutils (as, ld) are required");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--32");
    for (name, value) in defsyms {
        as_cmd.args(["--defsym", &format!("{name}={value}")]);
    }
    run(as_cmd.arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj));
    std::fs::read(&bin).expect("reading the assembled binary")
}

/// Builds the freestanding test guests once per test process.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Prebuilt guests, for hosts without a compiler.
        if let Ok(dir) = std::env::var("VMD_TEST_GUESTS") {
            return PathBuf::from(dir);
        }
        let out = repo_root()
            .join("target/test-guests")
            .join(std::process::id().to_string());
        let status = Command::new("bash")
            .arg(repo_root().join("tests/guests/build.sh"))
            .arg(&out)
            .status()
            .expect("running tests/guests/build.sh");
        assert!(status.success(), "building the test guests failed");
        out
    })
}

pub fn guest(name: &str) -> PathBuf {
    let path = guests().join(name);
    assert!(path.exists(), "test guest {} missing", path.display());
    path
}

/// Builds (or finds cached) the Debian kernel + busybox initramfs guest;
/// returns its directory.
pub fn linux_guest() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // A prebuilt guest directory, for hosts without Debian's mirror.
        if let Ok(dir) = std::env::var("VMD_LINUX_GUEST") {
            return PathBuf::from(dir);
        }
        let out = Command::new("bash")
            .arg(repo_root().join("tests/guest/build-linux-guest.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/guest/build-linux-guest.sh");
        assert!(out.status.success(), "building the Linux guest failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout.lines().last().expect("guest dir printed").trim();
        PathBuf::from(dir)
    })
    .clone()
}

/// A running vmd with its own socket and state directory. Dropping it
/// stops the daemon with SIGTERM.
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    log: Arc<Mutex<String>>,
}

/// vmd's `--stop-grace` in the tests (the default, 30 s, would make every
/// plain `vmctl stop` of a guest without ACPI take that long).
pub const STOP_GRACE_SECS: &str = "3";

impl Daemon {
    pub fn start(test: &str) -> Daemon {
        Self::start_with(test, &[])
    }

    /// The daemon's test directory, made before the daemon starts (so a
    /// test can write a vm.conf there first).
    pub fn dir_for(test: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmd-e2e-{}-{test}", std::process::id()))
    }

    /// Starts vmd with extra arguments (`-f vm.conf`, say).
    pub fn start_with(test: &str, extra: &[&str]) -> Daemon {
        Self::start_in(test, None, extra)
    }

    /// Starts vmd inside network namespace `netns` (when given), so every
    /// TAP and bridge it makes lives there and nowhere else.
    pub fn start_in(test: &str, netns: Option<&NetNs>, extra: &[&str]) -> Daemon {
        require_kvm();
        let dir = Self::dir_for(test);
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = dir.join("vmd.sock");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(bin("vmd"));
                c
            }
            None => Command::new(bin("vmd")),
        };
        // A guest that ignores the ACPI power button (most test guests)
        // keeps `vmctl stop` waiting this long; `extra` may override it.
        let mut child = cmd
            .args(["-d", "-v", "--stop-grace", STOP_GRACE_SECS, "-s"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting vmd");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("vmd stderr");
        let sink = log.clone();
        let tag = test.to_string();
        thread::spawn(move || collect(stderr, sink, Some(tag)));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready once vmctl gets an answer: the socket file appears at
        // bind(), a moment before it listens and control serves it.
        let answers = || {
            Command::new(bin("vmctl"))
                .arg("-s")
                .arg(&socket)
                .arg("status")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        while !(socket.exists() && answers()) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("vmd exited at start ({status}): {}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "vmd did not answer on {}",
                socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            dir,
            socket,
            child: Some(child),
            log,
        }
    }

    pub fn vmctl(&self, args: &[&str]) -> Output {
        Command::new(bin("vmctl"))
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running vmctl")
    }

    /// Runs vmctl and insists it succeeds; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vmctl(args);
        assert!(
            out.status.success(),
            "vmctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vmctl start -b KERNEL -m MEMORY NAME`, insisting it succeeds: the
    /// plain start most tests begin with.
    pub fn boot(&self, kernel: &Path, memory: &str, name: &str) -> String {
        let kernel = kernel.to_str().expect("guest path is UTF-8");
        self.ok(&["start", "-b", kernel, "-m", memory, name])
    }

    /// `vmctl status --json` parsed into (name, state, pid, last exit).
    pub fn status(&self, name: &str) -> Option<VmStatus> {
        let out = self.vmctl(&["status", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        parse_status(&text).into_iter().find(|s| s.name == name)
    }

    /// Waits until VM `name` reaches `state`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> VmStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status(name) {
                if s.state == state {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "vm {name} did not reach {state} in {timeout:?}; status: {:?}\nvmd log:\n{}",
                self.status(name),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn console(&self, name: &str) -> ConsoleReader {
        ConsoleReader::attach(self, name)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends vmd a signal (SIGHUP: reload).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig)
            .expect("signalling vmd");
    }

    /// Waits until vmd's log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "vmd never logged {needle:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs vmctl as another user (with that user's groups), as an admin's
    /// colleague would.
    pub fn vmctl_as(&self, user: &str, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(bin("vmctl"))
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("runuser vmctl")
    }

    /// Waits for vmd to exit on its own (no signal); its exit code.
    pub fn terminate_wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmd did not exit by itself within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmd did not exit within 30 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Cleanup, not a test of shutdown: most test guests ignore the
            // power button SIGTERM presses, so stop them first rather than
            // wait out the grace.
            let _ = self.vmctl(&["stop", "-a", "-f", "-w"]);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.terminate()));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn collect(mut from: impl Read + Send + 'static, sink: Arc<Mutex<String>>, echo: Option<String>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Some(tag) = &echo {
                    for line in text.lines() {
                        eprintln!("[{tag}] {line}");
                    }
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&text);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    pub name: String,
    pub state: String,
    pub pid: u64,
    pub last_exit: String,
    pub restarts: u64,
}

/// Reads `vmctl status --json`: an array with one object per VM.
fn parse_status(text: &str) -> Vec<VmStatus> {
    let Ok(serde_json::Value::Array(vms)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    vms.iter()
        .map(|vm| VmStatus {
            name: vm["name"].as_str().unwrap_or_default().to_string(),
            state: vm["state"].as_str().unwrap_or_default().to_lowercase(),
            pid: vm["pid"].as_u64().unwrap_or(0),
            last_exit: match &vm["last_exit"] {
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            },
            restarts: vm["restarts"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// `vmctl console NAME` running as a child, its output collected.
pub struct ConsoleReader {
    child: Child,
    out: Arc<Mutex<String>>,
    started: Instant,
}

impl ConsoleReader {
    fn attach(daemon: &Daemon, name: &str) -> ConsoleReader {
        let mut child = Command::new(bin("vmctl"))
            .arg("-s")
            .arg(&daemon.socket)
            .args(["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vmctl console");
        let out = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("console stdout");
        let sink = out.clone();
        thread::spawn(move || collect(stdout, sink, None));
        ConsoleReader {
            child,
            out,
            started: Instant::now(),
        }
    }

    /// Types `text` into the console, as a user at `vmctl console` would.
    pub fn type_text(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("console stdin");
        stdin
            .write_all(text.as_bytes())
            .expect("typing into vmctl console");
        stdin.flush().expect("flushing vmctl console input");
    }

    pub fn text(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for `needle` in the console output; returns the time since
    /// the reader attached.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if self.text().contains(needle) {
                return self.started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "console never showed {needle:?} within {timeout:?}; it showed:\n{}",
                self.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts the occurrences of `needle` so far.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Waits for vmctl console to exit on its own (the VM stopped).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for ConsoleReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The line of `text` that starts with `prefix`, without the prefix.
pub fn line_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
}

/// PIDs of live processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return kids;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) follows the ")" that ends the command name.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        if after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(ppid) {
            kids.push(pid);
        }
    }
    kids
}

pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
}

/// Fields of /proc/PID/status.
pub fn proc_status(pid: u32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    line_after(&text, &format!("{key}:")).map(|v| v.trim().to_string())
}

/// A network namespace the test owns; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vmdt-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} failed (iproute2 needed)");
        let ns = NetNs { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; returns its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }

    /// Runs a command inside the namespace and insists it succeeds.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Interface names in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.run(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// True when `count` pings of `addr` from the namespace get replies.
    pub fn ping(&self, addr: &str, count: u32) -> bool {
        let count = count.to_string();
        self.exec(&["ping", "-c", &count, "-W", "2", "-i", "0.3", addr])
            .status
            .success()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Test users and groups, made once per machine and never raced: test
/// binaries run in parallel, and two `useradd`s at once fail on the
/// /etc/passwd lock, so every creation happens under one file lock.
pub mod users {
    use std::process::Command;

    fn locked<T>(f: impl FnOnce() -> T) -> T {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/vmd-e2e-users.lock")
            .expect("open /run/vmd-e2e-users.lock");
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map(|held| {
                let out = f();
                drop(held);
                out
            })
            .unwrap_or_else(|(_, e)| panic!("flock users lock: {e}"))
    }

    /// An iproute2 interface group name (`NUM NAME` in
    /// /etc/iproute2/group), added if missing, under the same lock: what
    /// vm.conf `group NAME` needs to become an interface group filters
    /// can match.
    pub fn iproute2_group(num: u32, name: &str) {
        locked(|| {
            let path = std::path::Path::new("/etc/iproute2/group");
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name))
            {
                return;
            }
            std::fs::create_dir_all("/etc/iproute2").expect("mkdir /etc/iproute2");
            let mut text = text;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("{num}\t{name}\n"));
            std::fs::write(path, text).expect("writing /etc/iproute2/group");
        })
    }

    /// A system group, created if missing.
    pub fn group(name: &str) {
        locked(|| {
            if nix::unistd::Group::from_name(name).ok().flatten().is_none() {
                let st = Command::new("groupadd")
                    .args(["--system", name])
                    .status()
                    .expect("groupadd");
                assert!(st.success(), "groupadd {name}");
            }
        })
    }

    /// A system user without a home or shell, a member of `groups`
    /// (each created if missing), created if missing.
    pub fn user(name: &str, groups: &[&str]) -> nix::unistd::User {
        for g in groups {
            group(g);
        }
        locked(|| {
            if let Some(u) = nix::unistd::User::from_name(name).ok().flatten() {
                return u;
            }
            let mut cmd = Command::new("useradd");
            cmd.args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ]);
            if !groups.is_empty() {
                cmd.args(["-G", &groups.join(",")]);
            }
            let st = cmd.arg(name).status().expect("useradd");
            assert!(st.success(), "useradd {name}");
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("user {name} missing after useradd"))
        })
    }
}
