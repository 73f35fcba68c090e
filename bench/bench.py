#!/usr/bin/env python3
"""vmd vs QEMU benchmarks; writes docs/BENCHMARKS.md.  Run through bench/run.sh.

Every figure is measured from outside the guest, on CLOCK_MONOTONIC:
  * serial output: vmd's console log (STATE/console/NAME.log, written by the
    parent as it drains the pty) is polled every 0.5 ms; QEMU's `-serial
    stdio` pipe is read by a thread.  A byte is timestamped when the harness
    sees it.
  * first guest instruction: ftrace (tracefs instance "vmdbench", trace_clock
    mono) records the first ioctl(KVM_RUN) of the VMM process, and
    sched_stat_runtime events give the CPU time every thread of it ran up to
    that instant.
  * memory: /proc/PID/smaps of the VMM process (Rss of everything, minus the
    Rss of the guest RAM mapping = guest pages touched).
Standard library only (Python 3.11).
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("RUNS", "5"))
LINUX_RUNS = int(os.environ.get("LINUX_RUNS", str(RUNS)))
EXITS_N = int(os.environ.get("EXITS_N", "20000"))
BIN = Path(os.environ["VMD_BIN_DIR"])
GUESTS = Path(os.environ["GUEST_DIR"])
VMLINUX = os.environ.get("VMLINUX", "")
OUT_MD = Path(os.environ.get("OUT_MD", ROOT / "docs/BENCHMARKS.md"))
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/vmd-bench"))
QEMU = shutil.which("qemu-system-x86_64")
# Flags QEMU needs on this nested KVM (see ../shared/guest/README.md): -cpu
# host aborts on MSR 0x10a (ARCH_CAPABILITIES).
QEMU_BASE = ["-enable-kvm", "-cpu", "qemu64,-cx16", "-smp", "1", "-nodefaults",
             "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]
LINUX_CMDLINE = "console=ttyS0 earlyprintk=ttyS0"
BOOT_MARK = b"VMD-BENCH boot\n"
IDLE_MARK = b"VMD-BENCH idle\n"
HW_VIRT = any(("vmx" in l.split() or "svm" in l.split())
              for l in open("/proc/cpuinfo") if l.startswith("flags"))
# Firecracker and Cloud Hypervisor built by ../shared/peers/build.sh (see
# bench/README.md); a missing binary drops its column.
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/var/tmp/peers"))
FIRECRACKER = PEERS_DIR / "firecracker"
CLOUD_HV = PEERS_DIR / "cloud-hypervisor"
ALL_VMMS = ["vmd", "firecracker", "cloud-hypervisor", "qemu-microvm", "qemu-pc"]
# qemu-microvm runs only the boot figures (no PCI): VMMS=...,qemu-microvm adds it.
DEFAULT_VMMS = "vmd,firecracker,cloud-hypervisor,qemu-pc"


def have(vmm):
    if vmm.startswith("qemu"):
        return QEMU is not None
    return {"vmd": True, "firecracker": FIRECRACKER.exists(), "cloud-hypervisor": CLOUD_HV.exists()}[vmm]


# VMMS=vmd,firecracker,... narrows the columns (QEMU's firmware makes its
# boots 100x slower than the others').
VMMS = [v for v in os.environ.get("VMMS", DEFAULT_VMMS).split(",") if v in ALL_VMMS and have(v)]
# QEMU runs only the figures named here (its firmware takes ~1.4 CPU s a
# boot, minutes for the idle-memory and exit figures on a busy machine):
# by default those whose targets name it.
QEMU_FIGS = set(os.environ.get("QEMU_FIGS", "boot,blk,net,bios").split(","))


def vmms_for(fig):
    return [v for v in VMMS if not v.startswith("qemu") or fig in QEMU_FIGS]
PEERS = [v for v in VMMS if v != "vmd"]
# Peers that can drive the PCI test guests' devices (QEMU microvm has only
# virtio-mmio).
PCI_PEERS = [v for v in PEERS if v != "qemu-microvm"]
FC_FLAGS = ["--no-api", "--level", "Error"]     # + --config-file, --id; --enable-pci for blk/net
CH_BASE = ["--cpus", "boot=1", "--serial", "tty", "--console", "off"]
notes = [          # free-text notes collected for the report
    "QEMU flags: `-enable-kvm -cpu qemu64,-cx16` as ../shared/guest/README.md says (`-cpu host` is "
    "reported there to abort on MSR 0x10a; in a quick check with QEMU 10.0.2 on this machine `-cpu host` "
    "did boot bench_boot.elf under microvm and pc, but the benchmark keeps the documented flags). QEMU warns "
    "`host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]` and runs on. microvm has no PM "
    "port at 0x604, so its guests do not power off: the harness kills QEMU once the marker is in.",
]
failures = {}       # (figure, vmm) -> error text


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def now():
    return time.monotonic()


# ---------------------------------------------------------------- vmd side

class Vmd:
    def __init__(self, netns=None, sub="vmd", conf=None):
        """conf: vm.conf text (`vmd -f`); otherwise an empty one."""
        self.dir = WORK / sub
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.sock = self.dir / "vmd.sock"
        self.state = self.dir / "state"
        self.errf = open(self.dir / "vmd.log", "wb")
        (self.dir / "vm.conf").write_text(conf or "")
        wrap = ["ip", "netns", "exec", netns] if netns else []
        self.t0 = now()
        self.p = subprocess.Popen([*wrap, BIN / "vmd", "-d", "-f", self.dir / "vm.conf", "-s", self.sock,
                                   "--state-dir", self.state],
                                  stdin=subprocess.DEVNULL, stdout=self.errf, stderr=self.errf)
        t = now()
        while not self.sock.exists():
            if self.p.poll() is not None or now() - t > 10:
                raise SystemExit("vmd did not start: " + (self.dir / "vmd.log").read_text())
            time.sleep(0.01)
        self.seq = 0

    def vmctl(self, *args, check=True):
        r = subprocess.run([BIN / "vmctl", "-s", self.sock, *args], capture_output=True, text=True)
        if check and r.returncode:
            raise RuntimeError(f"vmctl {args}: {r.stdout}{r.stderr}")
        return r

    def name(self):
        self.seq += 1
        return f"b{self.seq}"

    def log_path(self, name):
        return self.state / "console" / f"{name}.log"

    def start(self, kernel, cmdline="", mem="64M", name=None, extra=()):
        """Starts a VM; returns (name, t0, Popen of vmctl)."""
        name = name or self.name()
        args = [BIN / "vmctl", "-s", self.sock, "start", "-b", kernel, "-m", mem, "--vcpus", "1", *extra]
        if cmdline:
            args += ["--cmdline", cmdline]
        t0 = now()
        p = subprocess.Popen([*args, name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return name, t0, p

    def wait_marks(self, name, marks, timeout, vmctl=None):
        """Polls the console log; returns {'first': t, mark: t, ...} (monotonic)."""
        path = self.log_path(name)
        got, buf, pos = {}, b"", 0
        deadline = now() + timeout
        while now() < deadline:
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            t = now()
            if chunk:
                pos += len(chunk)
                buf += chunk
                got.setdefault("first", t)
                for m in marks:
                    if m not in got and m in buf:
                        got[m] = t
                if all(m in got for m in marks):
                    return got, buf
            elif vmctl is not None and vmctl.poll() not in (None, 0):
                raise RuntimeError("vmctl start failed: " + vmctl.stderr.read().decode())
            time.sleep(0.0005)
        raise TimeoutError(f"vmd {name}: markers {marks} not all seen in {timeout}s; got {buf[-300:]!r}")

    def wait_all(self, names, mark, timeout):
        """Polls every VM's console log until each holds `mark`; returns the
        time the last one was seen."""
        pos, buf, left = {n: 0 for n in names}, {n: b"" for n in names}, set(names)
        deadline, last = now() + timeout, None
        while left and now() < deadline:
            for n in list(left):
                try:
                    with open(self.log_path(n), "rb") as f:
                        f.seek(pos[n])
                        chunk = f.read()
                except FileNotFoundError:
                    continue
                pos[n] += len(chunk)
                buf[n] += chunk
                if mark in buf[n]:
                    left.discard(n)
                    last = now()
            if left:
                time.sleep(0.002)
        if left:
            raise TimeoutError(f"vmd: {len(left)} of {len(names)} VMs without {mark!r} after {timeout}s")
        return last

    def pid(self, name):
        st = json.loads(self.vmctl("status", "--json").stdout)
        vms = st if isinstance(st, list) else st.get("vms", st)
        for v in vms:
            if v.get("name") == name:
                return v.get("pid")
        return None

    def stop(self, name):
        self.vmctl("stop", "-f", "-w", name, check=False)

    def daemon_pids(self):
        pids = [self.p.pid]
        for tid in os.listdir(f"/proc/{self.p.pid}/task"):
            try:
                pids += [int(x) for x in open(f"/proc/{self.p.pid}/task/{tid}/children").read().split()]
            except OSError:
                pass
        return pids

    def close(self):
        self.vmctl("stop", "-a", "-f", "-w", check=False)
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()


# --------------------------------------------------------------- QEMU side

class Peer:
    """One peer VMM process (QEMU, Firecracker, Cloud Hypervisor); its serial
    output (stdout) timestamped as it arrives.  disk: a raw image on the
    peer's virtio-blk PCI; tap: an existing TAP on its virtio-net PCI."""
    seq = 0

    def __init__(self, vmm, kernel, cmdline="", mem="64M", extra=(), netns=None, disk=None, tap=None):
        self.machine = vmm
        Peer.seq += 1
        wrap = ["ip", "netns", "exec", netns] if netns else []
        self.argv = [*wrap, *peer_argv(vmm, kernel, cmdline, mem, extra, disk, tap, Peer.seq)]
        self.buf = b""
        self.events = []        # (t, len(buf) after chunk)
        self.cv = threading.Condition()
        self.err = open(WORK / f"{vmm}.err", "ab")
        self.t0 = now()
        self.p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=self.err)
        self.th = threading.Thread(target=self._reader, daemon=True)
        self.th.start()

    def _reader(self):
        fd = self.p.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            t = now()
            with self.cv:
                if not chunk:
                    self.events.append((t, -1))
                    self.cv.notify_all()
                    return
                self.buf += chunk
                self.events.append((t, len(self.buf)))
                self.cv.notify_all()

    def wait_marks(self, marks, timeout):
        deadline = now() + timeout
        with self.cv:
            while True:
                done = all(m in self.buf for m in marks)
                eof = self.events and self.events[-1][1] == -1
                if done or eof or now() > deadline:
                    break
                self.cv.wait(0.05)
            if not all(m in self.buf for m in marks):
                rc = self.p.poll()
                raise RuntimeError(f"{self.machine}: markers not all seen "
                                   f"(exit {rc}, output {self.buf[-300:]!r})")
            got = {}
            if self.events:
                got["first"] = next(t for t, n in self.events if n > 0)
            for m in marks:
                end = self.buf.index(m) + len(m)
                got[m] = next(t for t, n in self.events if n >= end)
            return got, self.buf

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.err.close()


def mib(mem):
    return int(mem.rstrip("M"))


def peer_argv(vmm, kernel, cmdline, mem, extra, disk, tap, seq):
    """The command line that boots `kernel` under a peer, one vCPU, serial on stdout."""
    if vmm.startswith("qemu-"):
        kern = ["-kernel", str(kernel)] if kernel is not None else []
        argv = [QEMU, "-M", vmm[5:], *QEMU_BASE, "-m", mem, *kern, *extra]
        if cmdline:
            argv += ["-append", cmdline]
        if disk:
            argv += ["-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
                     "-drive", f"file={disk},format=raw,if=none,id=d0,cache={BLK_CACHE}"]
        if tap:
            argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                     "-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]
        return argv
    if vmm == "firecracker":
        cfg = {"boot-source": {"kernel_image_path": str(kernel), "boot_args": cmdline or "console=ttyS0"},
               "machine-config": {"vcpu_count": 1, "mem_size_mib": mib(mem)},
               "drives": [], "network-interfaces": []}
        if disk:
            cfg["drives"].append({"drive_id": "d0", "path_on_host": str(disk), "is_root_device": False,
                                  "is_read_only": False, "cache_type": "Writeback"})
        if tap:
            cfg["network-interfaces"].append({"iface_id": "n0", "host_dev_name": tap,
                                              "guest_mac": "52:54:00:12:34:56"})
        f = WORK / f"fc-{seq}.json"
        f.write_text(json.dumps(cfg))
        pci = ["--enable-pci"] if disk or tap else []
        return [FIRECRACKER, *FC_FLAGS, *pci, "--id", f"b{seq}", "--config-file", f]
    if vmm == "cloud-hypervisor":
        argv = [CLOUD_HV, "--kernel", kernel, "--memory", f"size={mem}", *CH_BASE]
        if cmdline:
            argv += ["--cmdline", cmdline]
        if disk:
            argv += ["--disk", f"path={disk},image_type=raw"]
        if tap:
            argv += ["--net", f"tap={tap},mac=52:54:00:12:34:56"]
        return argv
    raise ValueError(vmm)


def peer_versions():
    out = []
    for vmm, b, flags in [("firecracker", FIRECRACKER, " ".join(FC_FLAGS) + " --config-file VM.json "
                           "(boot-source, machine-config: 1 vCPU, 64 MiB) [--enable-pci for blk/net]"),
                          ("cloud-hypervisor", CLOUD_HV, "--kernel GUEST --memory size=64M " + " ".join(CH_BASE)
                           + " [--cmdline ..] [--disk path=..,image_type=raw] [--net tap=..]")]:
        if vmm in VMMS:
            v = subprocess.run([b, "--version"], capture_output=True, text=True).stdout.splitlines()
            out.append((vmm, f"{v[0] if v else '?'} ({b}); flags `{flags}`"))
    return out


# ------------------------------------------------------------------ ftrace

TRACE = Path("/sys/kernel/tracing")
INST = TRACE / "instances" / "vmdbench"
LINE = re.compile(r"^\s*(.*)-(\d+)\s+\(\s*([-\d]+)\)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+)(?:: |\()(.*)$")


class Ftrace:
    def __init__(self, pids):
        if not (TRACE / "instances").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACE)], check=False)
        if not INST.exists():
            INST.mkdir()
        self.w("tracing_on", "0")
        self.w("trace_clock", "mono")
        self.w("buffer_size_kb", "8192")
        self.w("options/record-tgid", "1")
        self.w("options/event-fork", "1")
        self.w("events/syscalls/sys_enter_ioctl/filter", "cmd == 0xae80")
        for ev in ["syscalls/sys_enter_ioctl", "sched/sched_stat_runtime"]:
            self.w(f"events/{ev}/enable", "1")
        self.set_pids(pids)

    def w(self, f, v):
        (INST / f).write_text(v)

    def set_pids(self, pids):
        self.w("set_event_pid", " ".join(str(p) for p in pids))

    def start(self):
        self.w("trace", "")
        self.w("tracing_on", "1")

    def stop(self):
        self.w("tracing_on", "0")
        return (INST / "trace").read_text()

    def close(self):
        try:
            self.w("tracing_on", "0")
            for ev in ["syscalls/sys_enter_ioctl", "sched/sched_stat_runtime"]:
                self.w(f"events/{ev}/enable", "0")
            INST.rmdir()
        except OSError:
            pass


def first_run_cpu(text, vmm_tgid=None, exclude=()):
    """From one trace: (t of the first KVM_RUN, its tgid, CPU s of that tgid
    before it, CPU s of every traced process but `exclude` before it)."""
    tgid_of, runtime, kvm_run = {}, [], None
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        pid, tgid, ts, ev, rest = int(m[2]), m[3], float(m[4]), m[5], m[6]
        if tgid.lstrip("-").isdigit() and int(tgid) > 0:
            tgid_of[pid] = int(tgid)
        if ev in ("sys_enter_ioctl", "sys_ioctl"):
            t = tgid_of.get(pid, pid)
            if kvm_run is None and (vmm_tgid is None or t == vmm_tgid):
                kvm_run = (ts, t)
        elif ev == "sched_stat_runtime":
            f = dict(re.findall(r"(\w+)=(\S+)", rest))
            runtime.append((ts, int(f["pid"]), int(f["runtime"]) / 1e9))
    if kvm_run is None:
        return None
    t_run, tg = kvm_run
    own = total = 0.0
    for ts, pid, rt in runtime:
        start = ts - rt
        if start >= t_run:
            continue
        part = min(ts, t_run) - start      # the slice ran continuously up to ts
        t = tgid_of.get(pid)
        if t is None or t in exclude:
            continue
        total += part
        if t == tg:
            own += part
    return t_run, tg, own, total


# ---------------------------------------------------------------- memory

def tree(pid):
    """pid and every process below it (a VM's helper processes count as its)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            kids.setdefault(int(st[st.rindex(")") + 2:].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def vm_pids(vmm_pid, name):
    """Every process of one vmd VM: the vmm and what it started, and the
    device processes the parent starts for it (`vmd: vm NAME blk0`)."""
    pids = tree(vmm_pid)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv0 = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if argv0.startswith(f"vmd: vm {name} ") and int(d) not in pids:
                pids.append(int(d))
    return pids


def private_overhead(pid, guest_bytes):
    """KiB of pages only this process maps (Private_Clean + Private_Dirty:
    what the host gets back when it exits), guest RAM mapping left out."""
    total, cur, maps = 0, None, []
    for line in open(f"/proc/{pid}/smaps"):
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            cur = {"path": parts[5] if len(parts) > 5 else "", "size": 0, "priv": 0}
            maps.append(cur)
        elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
            cur["priv"] += int(parts[1])
        elif parts[0] == "Size:":
            cur["size"] = int(parts[1])
    g = guest_bytes // 1024
    guest = max((m["priv"] for m in maps if g <= m["size"] <= g + 4096
                 and (m["path"] in ("", "[anon]") or m["path"].startswith("/memfd:"))), default=0)
    return sum(m["priv"] for m in maps) - guest


def smaps_overhead(pid, guest_bytes):
    """(VMM RSS, guest RAM Rss, overhead) in KiB from /proc/PID/smaps.
    The guest RAM mapping is the anonymous mapping whose size is within
    [guest, guest + 4 MiB] with the largest Rss."""
    total, maps, cur = 0, [], None
    for line in open(f"/proc/{pid}/smaps"):
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            cur = {"path": parts[5] if len(parts) > 5 else "", "size": 0, "rss": 0}
            maps.append(cur)
        elif parts[0] == "Size:":
            cur["size"] = int(parts[1])
        elif parts[0] == "Rss:":
            cur["rss"] = int(parts[1])
            total += int(parts[1])
    g = guest_bytes // 1024
    cands = [m for m in maps if g <= m["size"] <= g + 4096 and m["path"] in ("", "[anon]")
             or m["path"].startswith("/memfd:") and g <= m["size"] <= g + 4096]
    guest = max((m["rss"] for m in cands), default=0)
    return total, guest, total - guest


# ------------------------------------------------------------------ stats

results = {}        # figure -> vmm -> list of values


def add(fig, vmm, v):
    results.setdefault(fig, {}).setdefault(vmm, []).append(v)


def fail(fig, vmm, err):
    log(f"{fig} / {vmm}: {err}")
    failures[(fig, vmm)] = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)


# --------------------------------------------------------------- figures

def boot_vmd(vmd, tr, fig, kernel, cmdline, marks, timeout, mem="64M"):
    tr.set_pids([os.getpid(), *vmd.daemon_pids()])
    tr.start()
    name, t0, p = vmd.start(kernel, cmdline, mem)
    got, _ = vmd.wait_marks(name, marks, timeout, p)
    text = tr.stop()
    p.wait()
    vmd.stop(name)
    return t0, got, text


def boot_peer(vmm, tr, kernel, cmdline, marks, timeout, mem="64M"):
    tr.set_pids([os.getpid()])
    tr.start()
    q = Peer(vmm, kernel, cmdline, mem)
    try:
        got, _ = q.wait_marks(marks, timeout)
    finally:
        text = tr.stop()
        q.kill()
    return q.t0, got, text, q.p.pid


def fig_boot(vmd, tr):
    """Test guest and Debian vmlinux: start command -> first byte / marker;
    and (from the test-guest runs) VMM CPU/wall before the first KVM_RUN."""
    guests = [("test", GUESTS / "bench_boot.elf", "", [BOOT_MARK], 30, RUNS, "64M")]
    if VMLINUX:
        guests.append(("linux", Path(VMLINUX), LINUX_CMDLINE,
                       [b"Linux version", b"Kernel command line:"], 120, LINUX_RUNS, "256M"))
    else:
        notes.append("No Debian vmlinux found (tests/guest/build-linux-guest.sh): Linux boot rows skipped.")
    me = os.getpid()
    for gname, kernel, cmdline, marks, timeout, runs, mem in guests:
        for i in range(runs):
            for vmm in vmms_for("boot"):
                if (f"{gname}-boot", vmm) in failures:
                    continue
                log(f"boot {gname} {vmm} run {i + 1}/{runs}")
                try:
                    if vmm == "vmd":
                        t0, got, text = boot_vmd(vmd, tr, gname, kernel, cmdline, marks, timeout, mem)
                        pid = None
                    else:
                        t0, got, text, pid = boot_peer(vmm, tr, kernel, cmdline, marks, timeout, mem)
                except Exception as e:
                    fail(f"{gname}-boot", vmm, e)
                    continue
                add(f"{gname}: start -> first serial byte (ms)", vmm, (got["first"] - t0) * 1e3)
                for m in marks:
                    label = m.decode().strip()
                    add(f"{gname}: start -> `{label}` (ms)", vmm, (got[m] - t0) * 1e3)
                if gname != "test":
                    continue
                r = first_run_cpu(text, pid, exclude={me})
                if r is None:
                    fail("pre-run", vmm, "no KVM_RUN in the trace")
                    continue
                t_run, tg, own, total = r
                add("start -> first KVM_RUN, wall (ms)", vmm, (t_run - t0) * 1e3)
                add("VMM process CPU before first KVM_RUN (ms)", vmm, own * 1e3)
                add("all processes' CPU before first KVM_RUN (ms)", vmm, total * 1e3)


def fig_exits(vmd):
    marks = [f"VMD-BENCH {k} {e}\n".encode() for k in ["pio-out", "pio-in", "mmio-write", "mmio-read"]
             for e in ["begin", "end"]] + [b"VMD-BENCH exits done\n"]
    for i in range(RUNS):
        for vmm in vmms_for("exits"):
            if ("exits", vmm) in failures:
                continue
            log(f"exits {vmm} run {i + 1}/{RUNS}")
            cmd = f"n={EXITS_N}"
            try:
                if vmm == "vmd":
                    name, t0, p = vmd.start(GUESTS / "bench_exits.elf", cmd)
                    got, _ = vmd.wait_marks(name, marks, 300, p)
                    p.wait()
                    vmd.stop(name)
                else:
                    q = Peer(vmm, GUESTS / "bench_exits.elf", cmd)
                    try:
                        got, _ = q.wait_marks(marks, 300)
                    finally:
                        q.kill()
            except Exception as e:
                fail("exits", vmm, e)
                continue
            for k in ["pio-out", "pio-in", "mmio-write", "mmio-read"]:
                dt = got[f"VMD-BENCH {k} end\n".encode()] - got[f"VMD-BENCH {k} begin\n".encode()]
                add(f"{k} exits per second (1 vCPU)", vmm, EXITS_N / dt)


def fig_memory(vmd):
    for count in (1, 10):
        for i in range(RUNS):
            for vmm in vmms_for("memory"):
                if (f"mem{count}", vmm) in failures:
                    continue
                log(f"memory {count} idle VM(s) {vmm} run {i + 1}/{RUNS}")
                started, qs = [], []
                try:
                    for _ in range(count):
                        if vmm == "vmd":
                            name, t0, p = vmd.start(GUESTS / "bench_boot.elf", "idle")
                            started.append((name, p))
                        else:
                            qs.append(Peer(vmm, GUESTS / "bench_boot.elf", "idle"))
                    pids = []
                    if vmm == "vmd":
                        for name, p in started:
                            vmd.wait_marks(name, [IDLE_MARK], 60, p)
                            p.wait()
                            pids += vm_pids(vmd.pid(name), name)
                    else:
                        for q in qs:
                            q.wait_marks([IDLE_MARK], 60)
                            pids.append(q.p.pid)
                    time.sleep(0.5)
                    over = rss = guest = priv = 0
                    for pid in pids:
                        r, g, o = smaps_overhead(pid, 64 << 20)
                        rss, guest, over = rss + r, guest + g, over + o
                        priv += private_overhead(pid, 64 << 20)
                    if count == 1:
                        add("1 idle VM: VMM RSS (MiB)", vmm, rss / 1024)
                        add("1 idle VM: guest pages touched (MiB)", vmm, guest / 1024)
                        add("1 idle VM: overhead = RSS - guest (MiB)", vmm, over / 1024)
                        add("1 idle VM: private overhead = unshared pages - guest (MiB)", vmm, priv / 1024)
                        if vmm == "vmd" and i == 0:
                            d = sum(smaps_overhead(p, 1 << 60)[0] for p in vmd.daemon_pids())
                            notes.append(f"vmd's fixed daemons (parent, control, priv) add {d / 1024:.1f} MiB RSS "
                                         "once per host, whatever the number of VMs (not counted per VM).")
                    else:
                        add("10 idle VMs: total overhead (MiB)", vmm, over / 1024)
                        add("10 idle VMs: overhead per VM (MiB)", vmm, over / 1024 / 10)
                        add("10 idle VMs: Pss per VM, guest pages included (MiB)", vmm, pss_mib(pids) / 10)
                except Exception as e:
                    fail(f"mem{count}", vmm, e)
                finally:
                    for name, _ in started:
                        vmd.stop(name)
                    for q in qs:
                        q.kill()


SCALE_NS = [int(x) for x in os.environ.get("SCALE_NS", "1,10,50,100").split(",")]
SCALE_RUNS = int(os.environ.get("SCALE_RUNS", "1"))
# QEMU's firmware takes ~1.4 CPU s a boot here: 100 of them would take minutes.
SCALE_MODES = ["vmd: vmctl", "vmd: vm.conf"] + [v for v in PEERS if not v.startswith("qemu")]
scale = {}          # (mode, n) -> [(ms until every marker, total Pss MiB)]


def pss_mib(pids):
    """Proportional set size of these processes (shared pages split among
    their users), guest memory included, in MiB."""
    kib = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    kib += int(line.split()[1])
        except OSError:
            pass
    return kib / 1024


def scale_conf(n):
    vms = "".join(f'vm "s{i}" {{\n\tmemory 64M\n\tvcpus 1\n\tboot "{GUESTS / "bench_boot.elf"}"\n'
                  f'\tcmdline "idle"\n}}\n' for i in range(n))
    return f"staggered start parallel {n} delay 0\n" + vms


def scale_run(vmd, mode, n):
    """n idle VMs at once; (ms from the first start until every guest printed
    its marker, total Pss of every process involved 0.5 s later)."""
    if mode == "vmd: vmctl":
        names = [vmd.name() for _ in range(n)]
        t0 = now()
        ps = [subprocess.Popen([BIN / "vmctl", "-s", vmd.sock, "start", "-b", GUESTS / "bench_boot.elf", "-m",
                                "64M", "--vcpus", "1", "--cmdline", "idle", nm],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for nm in names]
        try:
            t_end = vmd.wait_all(names, BOOT_MARK, 60 + n)
            time.sleep(0.5)
            return (t_end - t0) * 1e3, pss_mib(tree(vmd.p.pid))
        finally:
            for p in ps:
                p.wait()
            vmd.vmctl("stop", "-a", "-f", "-w", check=False)
    if mode == "vmd: vm.conf":
        v = Vmd(sub="vmd-conf", conf=scale_conf(n))
        try:
            t_end = v.wait_all([f"s{i}" for i in range(n)], BOOT_MARK, 60 + n)
            time.sleep(0.5)
            return (t_end - v.t0) * 1e3, pss_mib(tree(v.p.pid))
        finally:
            v.close()
    qs = []
    try:
        qs = [Peer(mode, GUESTS / "bench_boot.elf", "idle") for _ in range(n)]
        t_end = max(q.wait_marks([BOOT_MARK], 60 + n)[0][BOOT_MARK] for q in qs)
        time.sleep(0.5)
        return (t_end - qs[0].t0) * 1e3, pss_mib([q.p.pid for q in qs])
    finally:
        for q in qs:
            q.kill()


def fig_scale(vmd):
    """1, 10, 50, 100 idle VMs started at once through vmctl, through a
    vm.conf autostart, and as that many peer processes."""
    for n in SCALE_NS:
        for i in range(SCALE_RUNS):
            for mode in SCALE_MODES:
                if ("scale", mode) in failures:
                    continue
                log(f"{n} VMs at once: {mode} run {i + 1}/{SCALE_RUNS}")
                try:
                    ms, mem = scale_run(vmd, mode, n)
                except Exception as e:
                    fail("scale", mode, f"{n} VMs: {e}")
                    continue
                scale.setdefault((mode, n), []).append((ms, mem))
                if n == 10 and mode != "vmd: vm.conf":
                    add("10 VMs at once: start -> every marker (ms)", mode.split(":")[0], ms)
    notes.append(
        "10 VMs at once (and the scaling table): vmd: that many `vmctl start` processes spawned at once "
        "against one running vmd; peers: that many VMM processes spawned at once. Time from the first spawn "
        "until every guest's `VMD-BENCH boot` line was seen (vmd's console logs polled every 2 ms).")


def scale_section():
    if not scale:
        return []
    L = ["## How cost grows", "",
         f"N idle `bench_boot.elf` VMs (64 MiB, 1 vCPU) started at once, {SCALE_RUNS} run(s) each, median. "
         "`vmd: vmctl` = N `vmctl start` processes spawned together against a running vmd; `vmd: vm.conf` = "
         f"vmd started with `-f` on a vm.conf of N VMs and `staggered start parallel N delay 0`, timed from "
         "vmd's own spawn (its daemons' start included); peers: N VMM processes spawned together. Memory = "
         "total Pss (shared pages split between the processes that map them) of every process involved - "
         "vmd's daemons and each VM's processes, or the peer processes - guest pages touched included, "
         "0.5 s after the last marker. QEMU is left out (its firmware costs ~1.4 CPU s per boot here).", "",
         "| N | " + " | ".join(f"{m}: all markers (ms)" for m in SCALE_MODES) + " | "
         + " | ".join(f"{m}: memory (MiB)" for m in SCALE_MODES) + " |",
         "|---|" + "---|" * (2 * len(SCALE_MODES))]
    for n in SCALE_NS:
        t = [scale_med(m, n, 0) for m in SCALE_MODES]
        mm = [scale_med(m, n, 1) for m in SCALE_MODES]
        L.append(f"| {n} | " + " | ".join(fmt(x) if x is not None else "-" for x in t + mm) + " |")
    L += ["", "![time until every marker and total memory against N](bench-scale.svg)", ""]
    return L


def scale_med(mode, n, k):
    v = scale.get((mode, n))
    return statistics.median(x[k] for x in v) if v else None


def scale_svg(path):
    """Two line plots (time until every marker, total memory) against N;
    standard library only."""
    W, H, M = 420, 300, 60
    colors = ["#1f77b4", "#17becf", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 40}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{2 * W}" height="{H + 40}" fill="white"/>']
    xmax = max(SCALE_NS)
    for panel, (k, title) in enumerate([(0, "time until every marker (ms)"), (1, "total memory, Pss (MiB)")]):
        ox = panel * W
        vals = [scale_med(m, n, k) for m in SCALE_MODES for n in SCALE_NS]
        ymax = max([v for v in vals if v is not None] or [1]) * 1.1
        X = lambda n: ox + M + (W - M - 20) * n / xmax
        Y = lambda v: H - 30 - (H - 60) * v / ymax
        out.append(f'<text x="{ox + W / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>')
        out.append(f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(xmax)}" y2="{Y(0)}" stroke="black"/>')
        out.append(f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(0)}" y2="{Y(ymax)}" stroke="black"/>')
        for n in SCALE_NS:
            out.append(f'<text x="{X(n)}" y="{Y(0) + 14}" text-anchor="middle">{n}</text>')
        out.append(f'<text x="{X(xmax / 2)}" y="{Y(0) + 28}" text-anchor="middle">VMs started at once</text>')
        for j in range(5):
            v = ymax * j / 4
            out.append(f'<line x1="{X(0) - 4}" y1="{Y(v)}" x2="{X(xmax)}" y2="{Y(v)}" stroke="#ddd"/>')
            out.append(f'<text x="{X(0) - 6}" y="{Y(v) + 4}" text-anchor="end">{fmt(v)}</text>')
        for ci, m in enumerate(SCALE_MODES):
            pts = [(X(n), Y(v)) for n in SCALE_NS if (v := scale_med(m, n, k)) is not None]
            c = colors[ci % len(colors)]
            if pts:
                out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                           + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
            if panel == 0:
                out.append(f'<rect x="{X(0) + 10}" y="{30 + 15 * ci}" width="10" height="10" fill="{c}"/>')
                out.append(f'<text x="{X(0) + 24}" y="{39 + 15 * ci}">{m}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def fig_linux_hw(vmd):
    """Linux-guest variants that need hardware virtualization."""
    if not HW_VIRT:
        notes.append("SKIPPED (no vmx/svm in /proc/cpuinfo: the nested KVM here emulates guest CPL0 code, "
                     "so Linux cannot boot to userspace): Linux full boot to `GUEST-READY` with the busybox "
                     "initramfs under each VMM; idle-Linux memory overhead.")
        return
    d = Path(VMLINUX).parent if VMLINUX else None
    if not d or not (d / "initrd.gz").exists():
        notes.append("Linux full-boot rows skipped: no initrd.gz next to the vmlinux.")
        return
    for i in range(RUNS):
        for vmm in VMMS:
            try:
                if vmm == "vmd":
                    name = vmd.name()
                    args = [BIN / "vmctl", "-s", vmd.sock, "start", "-b", d / "vmlinux", "--initrd",
                            d / "initrd.gz", "-m", "256M", "--cmdline", LINUX_CMDLINE, name]
                    t0 = now()
                    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    got, _ = vmd.wait_marks(name, [b"GUEST-READY"], 60, p)
                    vmd.stop(name)
                else:
                    q = Peer(vmm, d / "vmlinux", LINUX_CMDLINE, "256M",
                             ["-initrd", str(d / "initrd.gz")])
                    t0 = q.t0
                    try:
                        got, _ = q.wait_marks([b"GUEST-READY"], 60)
                    finally:
                        q.kill()
                add("linux: start -> `GUEST-READY` (ms)", vmm, (got[b"GUEST-READY"] - t0) * 1e3)
            except Exception as e:
                fail("linux-full", vmm, e)


# ------------------------------------------------- BIOS: reset vector -> boot sector

BIOS_FW = "/usr/share/seabios/bios.bin"
BIOS_MARK = b"VMD-BENCH bios boot sector\r\n"
# Real mode: print the marker on COM1, power off through vmd's PM1a control
# (0x604; QEMU -M pc's PIIX4 PM block sits elsewhere, so QEMU is killed once
# the marker is in), then halt with interrupts off.
BIOS_SECTOR = r"""
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $msg, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
3:  hlt
    jmp 3b
msg: .asciz "VMD-BENCH bios boot sector\r\n"
    .org 510
    .byte 0x55, 0xaa
"""


def bios_disk():
    """A 1 MiB raw disk whose boot sector prints BIOS_MARK (binutils as/ld)."""
    d = WORK / "bios"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "boot.S").write_text(BIOS_SECTOR)
    subprocess.run(["as", "--32", "-o", d / "boot.o", d / "boot.S"], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
                    "-o", d / "boot.bin", d / "boot.o"], check=True)
    code = (d / "boot.bin").read_bytes()
    assert len(code) == 512, len(code)
    disk = d / "disk.raw"
    disk.write_bytes(code + bytes((1 << 20) - 512))
    return disk


def fig_bios(vmd, tr):
    """The same boot sector on a raw disk through Debian's SeaBIOS: vmd
    (`vmctl start -d`, no -b) and QEMU -M pc (-bios, virtio-blk-pci), from
    the start command and from the first KVM_RUN (the reset vector: the
    first guest instruction is SeaBIOS's in both) to the marker."""
    if not Path(BIOS_FW).exists():
        notes.append(f"BIOS: {BIOS_FW} missing (Debian's seabios package): BIOS rows skipped.")
        return
    disk = bios_disk()
    me = os.getpid()
    qemu_extra = ["-bios", BIOS_FW, "-drive", f"file={disk},format=raw,if=none,id=d0",
                  "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
    for i in range(RUNS):
        for vmm in [v for v in VMMS if v in ("vmd", "qemu-pc")]:
            if ("BIOS", vmm) in failures:
                continue
            log(f"BIOS boot {vmm} run {i + 1}/{RUNS}")
            try:
                if vmm == "vmd":
                    tr.set_pids([me, *vmd.daemon_pids()])
                    tr.start()
                    name = vmd.name()
                    t0 = now()
                    p = subprocess.Popen([BIN / "vmctl", "-s", vmd.sock, "start", "-d", disk, "-m", "64M",
                                          "--vcpus", "1", name],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    try:
                        got, _ = vmd.wait_marks(name, [BIOS_MARK], 120, p)
                    finally:
                        text = tr.stop()
                        p.wait()
                        vmd.stop(name)
                    pid = None
                else:
                    tr.set_pids([me])
                    tr.start()
                    q = Peer("qemu-pc", None, mem="64M", extra=qemu_extra)
                    try:
                        got, _ = q.wait_marks([BIOS_MARK], 120)
                    finally:
                        text = tr.stop()
                        q.kill()
                    t0, pid = q.t0, q.p.pid
                r = first_run_cpu(text, pid, exclude={me})
                if r is None:
                    raise RuntimeError("no KVM_RUN in the trace")
            except Exception as e:
                fail("BIOS", vmm, e)
                continue
            add("BIOS: start -> boot-sector marker (ms)", vmm, (got[BIOS_MARK] - t0) * 1e3)
            add("BIOS: reset vector -> boot-sector marker (ms)", vmm, (got[BIOS_MARK] - r[0]) * 1e3)
    notes.append(
        "BIOS: one boot sector (prints `VMD-BENCH bios boot sector` on COM1, then powers off through "
        "PM1a at 0x604 / halts) on a 1 MiB raw disk, booted by Debian's SeaBIOS "
        f"(`{BIOS_FW}`) under both. vmd: `vmctl start -d disk.raw -m 64M` (no -b, so its default "
        "SeaBIOS, the disk on vmd's virtio-blk); QEMU: `-M pc -bios " + BIOS_FW + " -drive "
        "file=disk.raw,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0,disable-legacy=on` with "
        "the base flags and no -kernel: virtio-blk (not IDE), so both firmware runs go through the same "
        "SeaBIOS virtio-blk driver. `reset vector` = the VMM process's first ioctl(KVM_RUN) in the ftrace "
        "(the vCPU starts at the reset vector in SeaBIOS in both); `start` = the start command's spawn. "
        "The gap is SeaBIOS's POST, which on this nested KVM runs emulated (guest CPL0 about 1M "
        "instructions/s), so the figure mostly counts how much POST work and how many exits each "
        "machine model gives SeaBIOS, not CPU speed.")


# ------------------------------------------------- virtio-blk / virtio-net

BLK_SEQ_MIB = int(os.environ.get("BLK_SEQ_MIB", "32"))
BLK_RAND_N = int(os.environ.get("BLK_RAND_N", "2000"))
NET_TX_N = int(os.environ.get("NET_TX_N", "100000"))
NET_RX_S = float(os.environ.get("NET_RX_S", "3.5"))   # seconds the host sends
NETNS = "vmdbench-net"
# Each peer gets a TAP made beforehand in the namespace and its own /24
# (vmd makes its tap0 itself, 10.9.0.0/24).
NET_TAPS = {"qemu-pc": ("vbqtap0", "10.9.1"), "firecracker": ("vbftap0", "10.9.2"),
            "cloud-hypervisor": ("vbctap0", "10.9.3")}
# Same guest driver under both VMMs: vmd's PCI virtio devices vs QEMU -M pc's
# virtio-*-pci with disable-legacy=on (modern only, as the guest drives it).
# microvm has only virtio-mmio, which the PCI drivers cannot use.
BLK_CACHE = "writeback"     # vmd opens its images buffered (page cache), no O_DIRECT


def host_tsc_khz():
    """TSC rate from /proc/cpuinfo: `cpu MHz` is the TSC's where the flags
    say tsc_known_freq (the guest reads the same TSC: constant_tsc)."""
    mhz = next(float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz"))
    return mhz * 1000


def wait_text(get, pred, timeout, what):
    deadline = now() + timeout
    while now() < deadline:
        t = get()
        if pred(t):
            return t
        time.sleep(0.01)
    raise TimeoutError(f"{what}: not seen in {timeout}s; got {get()[-300:]!r}")


def vm_text(vmd, name):
    try:
        return vmd.log_path(name).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def q_text(q):
    with q.cv:
        return q.buf.decode(errors="replace")


def fig_blk(vmd, khz):
    disk = WORK / "bench-disk.raw"
    with open(disk, "wb") as f:        # written, not sparse: every block exists
        chunk = bytes(range(256)) * 4096
        for _ in range(64 << 20 >> 20):
            f.write(chunk)
    cmd = f"bench:seq-read:{BLK_SEQ_MIB} bench:rand-read-4k:{BLK_RAND_N} bench:seq-write:{BLK_SEQ_MIB}"
    pat = re.compile(r"bench (seq-read|rand-read-4k|seq-write) (\d+) (?:MiB|reqs) status (\d+) cycles (\d+)")
    for i in range(RUNS):
        for vmm in ["vmd", *PCI_PEERS]:
            if ("blk", vmm) in failures:
                continue
            log(f"virtio-blk {vmm} run {i + 1}/{RUNS}")
            done = lambda t: "VMD-TEST blk done" in t or "VMD-TEST error" in t
            try:
                if vmm == "vmd":
                    name, _, p = vmd.start(GUESTS / "blk.elf", cmd, extra=["-d", str(disk)])
                    p.wait()
                    text = wait_text(lambda: vm_text(vmd, name), done, 120, "vmd blk")
                    vmd.stop(name)
                else:
                    q = Peer(vmm, GUESTS / "blk.elf", cmd, disk=disk)
                    try:
                        text = wait_text(lambda: q_text(q), done, 120, "qemu blk")
                    finally:
                        q.kill()
                got = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in pat.finditer(text)}
                if len(got) != 3 or any(st for _, st, _ in got.values()):
                    raise RuntimeError(f"blk bench output incomplete or failed: {text[-300:]!r}")
            except Exception as e:
                fail("blk", vmm, e)
                continue
            for kind, (n, _, cyc) in got.items():
                s = cyc / (khz * 1e3)
                if kind == "rand-read-4k":
                    add("virtio-blk random 4 KiB reads: requests/s", vmm, n / s)
                    add("virtio-blk random 4 KiB reads: MiB/s", vmm, n * 4096 / s / (1 << 20))
                else:
                    label = "sequential 64 KiB reads" if kind == "seq-read" else \
                        "sequential 64 KiB writes + 1 flush"
                    add(f"virtio-blk {label}: requests/s", vmm, n * 16 / s)
                    add(f"virtio-blk {label}: MiB/s", vmm, n / s)
    notes.append(
        f"virtio-blk: guest `tests/guests/blk.elf` (its own polled virtio-blk PCI driver, one queue of 16, one "
        f"request in flight, running at CPL0 - which this nested KVM emulates, so the guest's own per-request "
        f"work is slow and the same under both VMMs: the figures are lower bounds for both and their ratio is "
        f"pulled towards 1). Verbs `{cmd}` in one boot; disk: a 64 MiB raw file written in full beforehand "
        f"(no holes), host page cache warm. vmd: `vmctl start -d disk.raw`; QEMU `-M pc -device "
        f"virtio-blk-pci,drive=d0,disable-legacy=on -drive file=disk.raw,format=raw,if=none,id=d0,"
        f"cache={BLK_CACHE}` (writeback = buffered through the host page cache like vmd, which does not use "
        f"O_DIRECT); Firecracker `--enable-pci` with one drives entry, cache_type Writeback (buffered, and "
        f"flushes reach the disk as under the others; its default Unsafe drops them), io_engine Sync; Cloud Hypervisor `--disk path=disk.raw,image_type=raw` (buffered, direct=off; it "
        f"adds its default virtio-rng too). Firecracker places its 64-bit BARs at 256 GiB and cannot move "
        f"them; Cloud Hypervisor's 64-bit BARs sit near 64 TiB: the guests map such BARs' GiB (tests/guests/pci.c) and use them where they are. QEMU -M microvm has no PCI virtio (virtio-mmio only), which the guest's PCI driver "
        f"cannot use: its column is empty. Time = the guest's TSC cycles around the loop / {khz / 1e3:.3f} MHz "
        f"(host /proc/cpuinfo `cpu MHz`, tsc_known_freq).")


NET_SINK = r"""
import socket, signal, sys
n = b = 0
def out(*_):
    print(n, b, flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, out)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", 9))
print("ready", flush=True)
while True:
    d = s.recv(65536); n += 1; b += len(d)
"""

NET_SOURCE = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 9))
buf = bytes(1472); n = err = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.send(buf); n += 1
        except OSError:
            err += 1
print(n, err, flush=True)
"""

RX_LINE = re.compile(r"VMD-TEST net bench rx frames (\d+) bytes (\d+) cycles (\d+) tsc_khz (\d+)\n")
TX_LINE = re.compile(r"VMD-TEST net bench tx frames (\d+) bytes (\d+) cycles (\d+) tsc_khz (\d+)\n")


def ns(*argv, check=True):
    return subprocess.run(["ip", "netns", "exec", NETNS, *argv], check=check, capture_output=True, text=True)


def rx_rate(text):
    """Frames/s and bytes/s over the guest's 1-second reports that lie wholly
    inside the host's sending: reports i..j with the count rising before i
    and after j.  Rates in guest TSC cycles: (frames, bytes, cycles)."""
    r = [(int(m[1]), int(m[2]), int(m[3])) for m in RX_LINE.finditer(text)]
    ok = [k for k in range(1, len(r) - 1) if r[k - 1][0] < r[k][0] < r[k + 1][0]]
    if len(ok) < 2:
        raise RuntimeError(f"rx: fewer than 2 steady-state reports: {r}")
    a, b = r[ok[0]], r[ok[-1]]
    return b[0] - a[0], b[1] - a[1], b[2] - a[2]


guest_khz = []     # the net guest's own RTC-calibrated TSC rates


def fig_net(khz):
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    ns("ip", "link", "set", "lo", "up")
    vmdn = None
    try:
        vmdn = Vmd(netns=NETNS, sub="vmd-net")
        for vmm in PCI_PEERS:
            tap, sub = NET_TAPS[vmm]
            ns("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            ns("ip", "addr", "add", f"{sub}.1/24", "dev", tap)
            ns("ip", "link", "set", tap, "up")
        for i in range(RUNS):
            for vmm in ["vmd", *PCI_PEERS]:
                for d in ["tx", "rx"]:
                    if (f"net-{d}", vmm) in failures:
                        continue
                    log(f"virtio-net {d} {vmm} run {i + 1}/{RUNS}")
                    try:
                        net_run(vmdn, vmm, d, khz)
                    except Exception as e:
                        fail(f"net-{d}", vmm, e)
    finally:
        if vmdn:
            vmdn.close()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    notes.append(
        f"virtio-net: guest `tests/guests/net.elf` (its own virtio-net PCI driver, ring 3, polled, queues of 64, "
        f"no offloads), everything inside a network namespace the harness makes ({NETNS}; vmd runs in it, QEMU is "
        f"started in it). vmd: `vmctl start -i 1`, the harness puts 10.9.0.1/24 on vmd's tap0; each peer: a TAP "
        f"pre-created in the namespace with its own /24 (QEMU `-netdev tap,id=n0,ifname=TAP,script=no,"
        f"downscript=no,vhost=off -device virtio-net-pci,netdev=n0,disable-legacy=on`; Firecracker "
        f"`--enable-pci` and a network-interfaces entry with host_dev_name=TAP; Cloud Hypervisor `--net tap=TAP`) "
        f"(vhost=off: every VMM moves packets in userspace; /dev/vhost-net does not exist on this machine, so no "
        f"vhost=on row; Firecracker has no CMOS RTC, so its guest counts seconds on the TSC at the host's rate, "
        f"`net.tsc_khz=`). "
        f"Guest->host: `net.bench=tx:{NET_TX_N}` sends 1514-byte UDP frames to a Python UDP sink in the namespace; "
        f"rate = frames / (guest TSC cycles from the first frame queued until the device has used the last) - "
        f"what the VMM takes off the ring, the sink's own count is recorded below. Host->guest: a Python sender "
        f"in the namespace blasts 1472-byte UDP payloads (1514-byte frames) at the guest for {NET_RX_S} s; "
        f"`net.bench=rx` prints its count and TSC every second; rate = frames between the first and last reports "
        f"that fall wholly inside the blast / their cycles (what the VMM delivered; the TAP drops the rest). "
        f"Cycles -> s at {khz / 1e3:.3f} MHz (host /proc/cpuinfo; the guest's own RTC calibration gave "
        + (f"{min(guest_khz) / 1e3:.1f}-{max(guest_khz) / 1e3:.1f} MHz" if guest_khz else "nothing") +
        f"). The Python source/sink shares the 2 cores with the VMM.")


def net_run(vmdn, vmm, d, khz):
    sub = "10.9.0" if vmm == "vmd" else NET_TAPS[vmm][1]
    cmd = f"net.ip={sub}.2/24 net.timeout=60 " + \
        (f"net.peer={sub}.1 net.port=9 net.bench=tx:{NET_TX_N}" if d == "tx" else "net.bench=rx")
    if vmm == "firecracker":        # no CMOS RTC to count seconds on
        cmd += f" net.tsc_khz={int(khz)}"
    sink = name = q = None
    try:
        if d == "tx":
            sink = subprocess.Popen(["ip", "netns", "exec", NETNS, "python3", "-c", NET_SINK],
                                    stdout=subprocess.PIPE, text=True)
            assert sink.stdout.readline().strip() == "ready"
        if vmm == "vmd":
            name, _, p = vmdn.start(GUESTS / "net.elf", cmd, extra=["-i", "1"])
            p.wait()
            get = lambda: vm_text(vmdn, name)
            wait_text(lambda: ns("ip", "-o", "link").stdout, lambda t: " tap0" in t, 30, "vmd tap0")
            ns("ip", "addr", "add", f"{sub}.1/24", "dev", "tap0")
            ns("ip", "link", "set", "tap0", "up")
        else:
            q = Peer(vmm, GUESTS / "net.elf", cmd, netns=NETNS, tap=NET_TAPS[vmm][0])
            get = lambda: q_text(q)
        bad = lambda t: "VMD-TEST error" in t
        if d == "tx":
            t = wait_text(get, lambda t: TX_LINE.search(t) or bad(t), 120, f"{vmm} tx")
            m = TX_LINE.search(t)
            if not m:
                raise RuntimeError(t[-300:])
            time.sleep(0.3)
            sink.terminate()
            got = sink.communicate(timeout=10)[0].split()
            n, cyc = int(m[1]), int(m[3])
            guest_khz.append(int(m[4]))
            s = cyc / (khz * 1e3)
            add("virtio-net guest->host 1514-B frames: frames/s", vmm, n / s)
            add("virtio-net guest->host 1514-B frames: MiB/s", vmm, n * 1514 / s / (1 << 20))
            add("virtio-net guest->host: share the host sink received (%)", vmm, 100 * int(got[0]) / n)
        else:
            wait_text(get, lambda t: len(RX_LINE.findall(t)) >= 1 or bad(t), 60, f"{vmm} rx ready")
            src = subprocess.run(["ip", "netns", "exec", NETNS, "python3", "-c", NET_SOURCE, f"{sub}.2",
                                  str(NET_RX_S)], capture_output=True, text=True, timeout=NET_RX_S + 30)
            sent = int(src.stdout.split()[0])
            k = len(RX_LINE.findall(get()))
            t = wait_text(get, lambda t: len(RX_LINE.findall(t)) >= k + 2, 30, f"{vmm} rx reports")
            frames, nbytes, cyc = rx_rate(t)
            s = cyc / (khz * 1e3)
            total = int(RX_LINE.findall(t)[-1][0])
            add("virtio-net host->guest 1514-B frames: frames/s", vmm, frames / s)
            add("virtio-net host->guest 1514-B frames: MiB/s", vmm, nbytes / s / (1 << 20))
            add("virtio-net host->guest: share of the host's sends the guest got (%)", vmm,
                100 * min(total, sent) / max(sent, 1))
    finally:
        if sink and sink.poll() is None:
            sink.kill()
        if name:
            vmdn.stop(name)
        if q:
            q.kill()


timeline_lines = []     # the report's timeline section
TIMELINE_RUNS = int(os.environ.get("TIMELINE_RUNS", "5"))
TL_INST = TRACE / "instances" / "vmdtimeline"
TL_EVENTS = ["sched/sched_switch", "sched/sched_waking", "sched/sched_wakeup_new", "sched/sched_process_fork",
             "sched/sched_process_exec", "raw_syscalls/sys_enter", "raw_syscalls/sys_exit"]
KVM_IOCTLS = {0xae01: "KVM_CREATE_VM", 0xae03: "KVM_CHECK_EXTENSION", 0xae04: "KVM_GET_VCPU_MMAP_SIZE",
              0xc008ae05: "KVM_GET_SUPPORTED_CPUID", 0xae41: "KVM_CREATE_VCPU", 0x4020ae46:
              "KVM_SET_USER_MEMORY_REGION", 0xae47: "KVM_SET_TSS_ADDR", 0x4008ae48: "KVM_SET_IDENTITY_MAP_ADDR",
              0xae60: "KVM_CREATE_IRQCHIP", 0x4040ae77: "KVM_CREATE_PIT2", 0x4008ae90: "KVM_SET_CPUID2",
              0x4090ae82: "KVM_SET_REGS", 0x4138ae84: "KVM_SET_SREGS", 0x4008ae89: "KVM_SET_MSRS",
              0x41a0ae8d: "KVM_SET_FPU", 0x4400ae8f: "KVM_SET_LAPIC", 0x4008ae6a: "KVM_SET_GSI_ROUTING",
              0x4020ae76: "KVM_IRQFD", 0x4040ae79: "KVM_IOEVENTFD", 0x4068aea3: "KVM_ENABLE_CAP",
              0xaea2: "KVM_SET_TSC_KHZ", 0xae80: "KVM_RUN", 0x4030ae7b: "KVM_SET_CLOCK",
              0xc008ae88: "KVM_GET_MSRS", 0x8090ae81: "KVM_GET_REGS", 0x8138ae83: "KVM_GET_SREGS"}
TL_LINE = re.compile(r"^\s*(.*)-(\d+)\s+\(\s*([-\d]+)\)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)$")


def syscall_names():
    names = {}
    try:
        for line in open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"):
            m = re.match(r"#define __NR_(\w+)\s+(\d+)", line)
            if m:
                names[int(m[2])] = m[1]
    except OSError:
        pass
    return names


def tl_trace(vmd, kernel):
    """One traced `vmctl start`: (t0, t of the first serial byte the harness
    saw, trace text, {tgid: role})."""
    if not TL_INST.exists():
        TL_INST.mkdir()
    w = lambda f, v: (TL_INST / f).write_text(v)
    w("tracing_on", "0")
    w("trace_clock", "mono")
    w("buffer_size_kb", "16384")
    w("options/record-tgid", "1")
    w("options/event-fork", "1")
    for ev in TL_EVENTS:
        w(f"events/{ev}/enable", "1")
    roles = {vmd.p.pid: "parent"}
    for pid in vmd.daemon_pids()[1:]:
        try:
            argv = open(f"/proc/{pid}/cmdline").read().split("\0")
            roles[pid] = argv[argv.index("--role") + 1] if "--role" in argv else f"pid {pid}"
        except (OSError, ValueError):
            pass
    w("set_event_pid", " ".join(str(p) for p in [os.getpid(), *roles]))
    w("trace", "")
    w("tracing_on", "1")
    name, t0, p = vmd.start(kernel)
    try:
        got, _ = vmd.wait_marks(name, [BOOT_MARK], 30, p)
    finally:
        w("tracing_on", "0")
        text = (TL_INST / "trace").read_text()
        p.wait()
        vmd.stop(name)
    return t0, got["first"], text, roles


def tl_analyse(t0, t_end, text, roles, me):
    """Per-process wall/CPU and the critical path back from the console-log
    write that carried the guest's first byte to the harness's start."""
    sysname = syscall_names()
    ev = []
    tgid = {}
    for line in text.splitlines():
        m = TL_LINE.match(line)
        if not m:
            continue
        pid, tg, ts, name, rest = int(m[2]), m[3], float(m[5]), m[6], m[7]
        if tg.lstrip("-").isdigit() and int(tg) > 0:
            tgid[pid] = int(tg)
        ev.append((ts, pid, name, rest, m[1].strip()))
    comm = {}
    forks = {}           # child tid -> parent tid
    for ts, pid, name, rest, c in ev:
        comm.setdefault(pid, c)
        if name == "sched_process_fork":
            f = dict(re.findall(r"(\w+)=(\S+)", rest))
            forks[int(f["child_pid"])] = pid
            tgid.setdefault(int(f["child_pid"]), tgid.get(pid, pid) if "CLONE_THREAD" in rest else
                            int(f["child_pid"]))
        if name == "sched_process_exec":
            comm[pid] = rest.split("filename=")[1].split()[0].rsplit("/", 1)[-1]
    # Role names for processes born during the trace.
    role = dict(roles)
    for pid in sorted(forks):
        t = tgid.get(pid, pid)
        if t in role:
            continue
        up = tgid.get(forks[pid], forks[pid])
        if up == me:
            role[t] = "vmctl"
        elif role.get(up) == "parent" and t not in role:
            role[t] = "vmm"
        else:
            role[t] = f"{role.get(up, '?')} child"

    def who(tid):
        t = tgid.get(tid, tid)
        r = role.get(t, comm.get(tid, "?"))
        return r if t == tid or r.endswith("thread") else f"{r} thread"

    # Per-thread state changes.
    on = {}                     # tid -> switched in at
    cpu = {}                    # tgid -> CPU s inside [t0, t_end]
    runs = {}                   # tid -> [(in, out)]
    blocks = {}                 # tid -> [(out, state, syscall)]
    wakes = {}                  # tid -> [(t, waker tid)]
    cur_sys = {}                # tid -> syscall it is in
    sys_exits = {}              # tid -> [(t, name)]
    sys_names = {}              # tid -> [(t, syscall entered)]
    writes = []                 # (t, tid) write-like syscall entries
    out_calls = []              # (t, tid) every traced thread's writes/sends
    first_run = None
    for ts, pid, name, rest, _ in ev:
        if name == "sched_switch":
            f = dict(re.findall(r"(\w+)=(\S+)", rest.replace(" ==> ", " ")))
            prev, nxt = int(f["prev_pid"]), int(f["next_pid"])
            if prev in on:
                a = on.pop(prev)
                runs.setdefault(prev, []).append((a, ts))
                t = tgid.get(prev, prev)
                cpu[t] = cpu.get(t, 0) + max(0.0, min(ts, t_end) - max(a, t0))
            if not f["prev_state"].startswith("R"):
                blocks.setdefault(prev, []).append((ts, f["prev_state"], cur_sys.get(prev, "?")))
            if nxt:
                on[nxt] = ts
        elif name in ("sched_waking", "sched_wakeup_new"):
            f = dict(re.findall(r"(\w+)=(\S+)", rest))
            wakes.setdefault(int(f["pid"]), []).append((ts, pid))
        elif name == "sys_enter":
            n = int(rest.split()[1])
            cur_sys[pid] = sysname.get(n, str(n))
            if n == 16:
                cmd = int(rest.split("(")[1].split(",")[1], 16)
                cur_sys[pid] = f"ioctl({KVM_IOCTLS.get(cmd, hex(cmd))})"
            sys_names.setdefault(pid, []).append((ts, cur_sys[pid]))
            if n == 16 and rest.split("(")[1].split(",")[1].strip() == "ae80" and first_run is None:
                first_run = (ts, pid)
            if cur_sys[pid] in ("write", "pwrite64", "writev") and role.get(tgid.get(pid, pid)) == "parent":
                writes.append((ts, pid))
            if cur_sys[pid] in ("write", "writev", "sendmsg", "sendto") and tgid.get(pid, pid) != me:
                out_calls.append((ts, pid))
        elif name == "sys_exit":
            sys_exits.setdefault(pid, []).append((ts, cur_sys.get(pid, "?")))
            cur_sys.pop(pid, None)
    def cur_name(tid, t):
        return next((n for ts_, n in sys_names.get(tid, []) if ts_ == t), "write")

    # The end: the parent's last console-log write before the harness saw the byte.
    ends = [(t, p) for t, p in writes if t <= t_end and (first_run is None or t > first_run[0])]
    if not ends:
        raise RuntimeError("timeline: no console-log write by the parent in the trace")
    t, tid = ends[-1]
    path = []                   # (from, to, tid, what)
    guard = 0
    while t > t0 and guard < 10000:
        guard += 1
        r = [(a, b) for a, b in runs.get(tid, []) if a < t]
        a = r[-1][0] if r else None
        if tid in on and on[tid] < t and (a is None or on[tid] > a):
            a = on[tid]
        if a is None:
            path.append((t0, t, tid, "before the trace saw it"))
            break
        path.append((max(a, t0), t, tid, "running"))
        if a <= t0:
            break
        # Before a: runnable since its wakeup or its preemption.
        prev_out = max([b for _, b in r[:-1] if b <= a] or [None], key=lambda x: x or 0)
        wk = [(wt, wp) for wt, wp in wakes.get(tid, []) if wt <= a and (prev_out is None or wt >= prev_out)]
        if wk:
            wt, wp = wk[-1]
            if wt < a:
                path.append((max(wt, t0), a, tid, "runnable, waiting for a CPU"))
            blk = [(bt, st, sc) for bt, st, sc in blocks.get(tid, []) if bt <= wt]
            bt, _, sc = blk[-1] if blk else (None, "?", "?")
            waker = tgid.get(wp, wp)
            if wp == 0 or waker == me or tgid.get(wp, wp) not in role and wp not in forks:
                # Woken by an interrupt (a timer or I/O) in someone else's
                # context: the wait was the thread's own.
                # A write by another traced thread while it slept is what a
                # kernel thread passed on (a pty's data goes through the
                # tty layer's flush work): follow that thread.
                src = [(ot, op) for ot, op in out_calls
                       if op != tid and (bt is None or ot >= bt) and ot <= wt]
                if src and not sc.endswith("sleep"):
                    ot, op = src[-1]
                    path.append((ot, wt, tid, f"hand-off through the kernel: {who(op)}'s {cur_name(op, ot)} "
                                 f"woke it via a kernel thread ({sc})"))
                    tid, t = op, ot
                    continue
                if bt is not None and bt < wt:
                    path.append((max(bt, t0), wt, tid, f"sleeping in {sc}, woken by the kernel (a timer, an interrupt or a kernel thread)"))
                t = bt if bt is not None else wt
                continue
            if bt is not None and bt < wt:
                path.append((wt, wt, tid, f"hand-off: {who(wp)} wakes it ({sc}, blocked {(wt - bt) * 1e3:.2f} ms)"))
            tid, t = wp, wt
            continue
        if prev_out is not None:
            path.append((max(prev_out, t0), a, tid, "preempted, waiting for a CPU"))
            t = prev_out
            continue
        if tid in forks:
            path.append((t0, a, tid, "new process"))
            tid, t = forks[tid], a
            continue
        path.append((t0, a, tid, "unknown"))
        break
    path.reverse()
    return path, cpu, role, who, first_run


def fig_timeline(vmd):
    """Several traced `vmctl start`s; the report shows the one with the
    median time to the first byte."""
    me = os.getpid()
    done = []
    for i in range(TIMELINE_RUNS):
        log(f"timeline run {i + 1}/{TIMELINE_RUNS}")
        try:
            t0, t_end, text, roles = tl_trace(vmd, GUESTS / "bench_boot.elf")
            done.append((t_end - t0, t0, t_end, tl_analyse(t0, t_end, text, roles, me)))
        except Exception as e:
            fail("timeline", "vmd", e)
    try:
        for ev_ in TL_EVENTS:
            (TL_INST / f"events/{ev_}/enable").write_text("0")
        TL_INST.rmdir()
    except OSError:
        pass
    if not done:
        return
    done.sort(key=lambda d: d[0])
    _, t0, t_end, (path, cpu, role, who, first_run) = done[len(done) // 2]
    ms = lambda t: (t - t0) * 1e3
    L = ["## Where the time goes: one `vmctl start`", "",
         f"One traced `vmctl start` of `bench_boot.elf` (the median by time to first byte of "
         f"{len(done)} traced runs: {', '.join(f'{d[0] * 1e3:.1f}' for d in done)} ms; tracing slows each a "
         "little). ftrace (mono clock): sched_switch, sched_waking, sched_wakeup_new, fork, exec and every "
         "syscall entry/exit of the harness's children and vmd's daemons. t = 0 is the spawn of vmctl; the end "
         f"is the parent's console-log write the harness read the guest's first byte from "
         f"({ms(t_end):.2f} ms: the harness polls every 0.5 ms).", "",
         "Per process, inside that window:", "",
         "| process | CPU (ms) | on the critical path: running (ms) | waiting for a CPU (ms) | sleeping/timer (ms) |",
         "|---|---|---|---|---|"]
    per = {}
    for a, b, tid, what in path:
        r = role.get(tid, None) or who(tid)
        r = who(tid)
        k = 0 if what == "running" else 1 if "CPU" in what else 2 if "timer" in what else None
        if k is not None:
            per.setdefault(r.replace(" thread", ""), [0, 0, 0])[k] += (b - a) * 1e3
    for t, c in sorted(cpu.items(), key=lambda x: -x[1]):
        r = role.get(t)
        if r is None:
            continue        # the harness itself and unrelated processes
        p = per.get(r, [0, 0, 0])
        L.append(f"| {r} | {c * 1e3:.2f} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} |")
    if first_run:
        L += ["", f"The vmm's first KVM_RUN: {ms(first_run[0]):.2f} ms."]
    L += ["", "The critical path, hop by hop (each row: a thread running, or the wait that held it; "
          "waits of under 0.02 ms merged into the row before):", "",
          "| from (ms) | to (ms) | took (ms) | process | what |", "|---|---|---|---|---|"]
    merged = []
    for a, b, tid, what in path:
        if merged and (merged[-1][2] == tid and merged[-1][3] == what or b - a < 2e-5 and a != b):
            merged[-1] = (merged[-1][0], b, merged[-1][2], merged[-1][3])
        else:
            merged.append((a, b, tid, what))
    for a, b, tid, what in merged:
        L.append(f"| {ms(a):.2f} | {ms(b):.2f} | {(b - a) * 1e3:.2f} | {who(tid)} | {what} |")
    if merged:
        last = merged[-1][1]
        L.append(f"| {ms(last):.2f} | {ms(t_end):.2f} | {(t_end - last) * 1e3:.2f} | harness | its next poll "
                 "of the console log (every 0.5 ms, and it too waits for a CPU) |")
    waits = [(b - a, who(tid), what) for a, b, tid, what in path if what != "running" and b > a]
    tot = sum(w for w, _, _ in waits)
    L += ["", f"Waits that are not work on the path: {tot * 1e3:.2f} ms of {ms(t_end):.2f} ms "
          f"({', '.join(f'{w * 1e3:.2f} ms {p} {x}' for w, p, x in sorted(waits, reverse=True)[:6])}).", ""]
    timeline_lines[:] = L


def timeline_section():
    return timeline_lines


# ----------------------------------------------------------------- report

def fmt(v):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


loads = []          # 1-minute load average, sampled every 5 s during the run


def sample_load():
    while True:
        loads.append(os.getloadavg()[0])
        time.sleep(5)


def load_text():
    if not loads:
        return "?"
    return (f"1-min load average during the run: median {statistics.median(loads):.1f}, "
            f"{min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} cores, shared with other work)")


def machine_info():
    def sh(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "?"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    mods = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    pvm = ""
    if Path("/sys/module/kvm_pvm/parameters/pvm_native").exists():
        pvm = " (pvm_native=" + Path("/sys/module/kvm_pvm/parameters/pvm_native").read_text().strip() + ")"
    dirty = " + uncommitted changes" if sh("git", "status", "--porcelain", "--untracked-files=no") else ""
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("CPU", f"{cpu}, {os.cpu_count()} cores; hardware virtualization (vmx/svm): {'yes' if HW_VIRT else 'no'}"),
        ("memory", f"{int(mem) // 1024} MiB"),
        ("kernel", sh("uname", "-srm")),
        ("KVM", ", ".join(mods) + pvm),
        ("OS", sh("sh", "-c", ". /etc/os-release; echo $PRETTY_NAME")),
        ("vmd", f"git {sh('git', 'rev-parse', '--short', 'HEAD')}{dirty}, release build, {sh('rustc', '--version')}"),
        ("QEMU", sh(QEMU, "--version").splitlines()[0] if QEMU else "not installed"),
        ("QEMU flags", "`" + " ".join(["-M microvm|pc", *QEMU_BASE, "-m 64M -kernel GUEST"]) + "`"),
        *peer_versions(),
        ("load", load_text()),
        ("runs", f"{RUNS} per figure ({LINUX_RUNS} for the Linux boot); exits: n={EXITS_N} per phase"),
    ]


NAMES = {"vmd": "vmd", "firecracker": "Firecracker", "cloud-hypervisor": "Cloud Hypervisor",
         "qemu-microvm": "QEMU microvm", "qemu-pc": "QEMU pc"}


def higher_is_better(fig):
    return "/s" in fig or "per second" in fig or "(%)" in fig


def best_peer(fig, peers=None):
    """(peer, median) of the best peer on this figure, or None."""
    meds = [(statistics.median(v), p) for p, v in results.get(fig, {}).items()
            if p != "vmd" and v and (peers is None or p in peers)]
    if not meds:
        return None
    m, p = (max if higher_is_better(fig) else min)(meds)
    return p, m


def write_report(placeholder_rows, elapsed):
    L = ["# Benchmarks: vmd vs Firecracker, Cloud Hypervisor and QEMU", "",
         "Generated by `bench/run.sh` (see bench/README.md for the methods); do not edit by hand.", "",
         "## Machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in machine_info()]
    L += ["", f"Whole run: {elapsed / 60:.1f} min.", "",
          "## Results", "",
          "Median (min-max) over the runs, every VMM's runs interleaved within one run; ratio = vmd median / "
          "the best peer's median in this run (lower is better for times and memory, higher for rates).", ""]
    L += results_header() + result_rows(list(results))
    for fig, why in placeholder_rows:
        L.append(f"| {fig} | not yet measurable: {why} |" + " |" * (len(VMMS) + 1))
    L += ["", "## Targets", ""]
    L += targets()
    L += [""] + scale_section()
    L += timeline_section()
    if failures:
        L += ["", "## Failures", "", "| figure | VMM | error |", "|---|---|---|"]
        L += [f"| {f} | {v} | `{e}` |" for (f, v), e in failures.items()]
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    L += ["", "## Methods", ""] + METHODS
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_MD.write_text("\n".join(L) + "\n")
    if scale:
        scale_svg(OUT_MD.parent / "bench-scale.svg")
    log(f"wrote {OUT_MD}")


def results_header():
    return ["| figure | " + " | ".join(NAMES[v] for v in VMMS) + " | vmd / best peer |",
            "|---|" + "---|" * (len(VMMS) + 1)]


def result_rows(figs):
    L = []
    for fig in figs:
        per = results[fig]
        cells = []
        for vmm in VMMS:
            vals = per.get(vmm)
            key = next((k for k in failures if k[1] == vmm and fig.startswith(k[0].split("-")[0])), None)
            if vals:
                m = statistics.median(vals)
                cells.append(f"{fmt(m)} ({fmt(min(vals))}-{fmt(max(vals))}), n={len(vals)}")
            else:
                cells.append("failed (see below)" if key else "-")
        bp = best_peer(fig)
        if bp and per.get("vmd") and bp[1]:
            cells.append(f"{statistics.median(per['vmd']) / bp[1]:.3g} ({NAMES[bp[0]]})")
        else:
            cells.append("-")
        L.append(f"| {fig} | " + " | ".join(cells) + " |")
    return L


# ONLY= keys whose rows merge into an existing OUT_MD: (Results row prefix,
# Failures row prefix, Notes prefix, the section that says when they ran).
MERGE = {
    "blk": ("| virtio-blk", "| blk", "- virtio-blk:", "Block and network run"),
    "net": ("| virtio-net", "| net-", "- virtio-net:", "Block and network run"),
    "bios": ("| BIOS:", "| BIOS", "- BIOS:", "BIOS boot run"),
}
MERGEABLE = set(MERGE)


def merge_report(only, elapsed):
    """ONLY=blk, net and/or bios: the file keeps every other row as measured
    before; these rows (and, for blk/net, the throughput target line), their
    failures and notes are replaced, and a section says when and where they
    were measured."""
    text = OUT_MD.read_text()
    sects = re.split(r"(?m)^(?=## )", text)
    head, rest = sects[0], {s.split("\n", 1)[0][3:].strip(): s for s in sects[1:]}
    keys = [MERGE[k] for k in sorted(only)]
    res = [l for l in rest["Results"].rstrip("\n").split("\n") if not any(l.startswith(k[0]) for k in keys)]
    res += result_rows([f for f in results if any(("| " + f).startswith(k[0]) for k in keys)])
    rest["Results"] = "\n".join(res) + "\n\n"
    if only & {"blk", "net"}:
        tg = [l for l in rest["Targets"].rstrip("\n").split("\n") if not l.startswith("- virtio-")]
        rest["Targets"] = "\n".join(tg + [io_target()]) + "\n\n"
    if "Failures" in rest:
        fl = [l for l in rest["Failures"].rstrip("\n").split("\n")
              if not any(l.startswith(k[1]) for k in keys)]
        rest["Failures"] = "\n".join(fl) + "\n\n"
    new_f = [f"| {f} | {v} | `{e}` |" for (f, v), e in failures.items()]
    if new_f:
        if "Failures" not in rest:
            rest["Failures"] = "## Failures\n\n| figure | VMM | error |\n|---|---|---|\n"
        rest["Failures"] = rest["Failures"].rstrip("\n") + "\n" + "\n".join(new_f) + "\n\n"
    new_n = [f"- {n}" for n in notes if any(("- " + n).startswith(k[2]) for k in keys)]
    if "Notes" in rest or new_n:
        nl = [l for l in rest.get("Notes", "## Notes\n").rstrip("\n").split("\n")
              if not any(l.startswith(k[2]) for k in keys)]
        rest["Notes"] = "\n".join(nl + new_n) + "\n\n"
    info = dict(machine_info())
    onl = ",".join(sorted(only))
    table = (f"| | |\n|---|---|\n| date | {info['date']} |\n| vmd | {info['vmd']} |\n"
             f"| QEMU | {info['QEMU']} |\n")
    if only & {"blk", "net"}:
        rest["Block and network run"] = (
            f"## Block and network run\n\nThe virtio-blk and virtio-net rows come from a later run "
            f"(`ONLY={onl} bench/run.sh`, {elapsed / 60:.1f} min) merged into this file; "
            f"every other row is from the run described under Machine.\n\n{table}"
            f"| QEMU flags | `-M pc {' '.join(QEMU_BASE)} -m 64M -kernel GUEST` + the device flags in the notes |\n"
            f"| runs | {RUNS} per figure |\n\n")
    if "bios" in only:
        rest["BIOS boot run"] = (
            f"## BIOS boot run\n\nThe `BIOS:` rows come from a later run (`ONLY={onl} bench/run.sh`, "
            f"{elapsed / 60:.1f} min) merged into this file; every other row is from the run described "
            f"under Machine (or the block and network run).\n\n{table}"
            f"| QEMU flags | `-M pc {' '.join(QEMU_BASE)} -m 64M -bios {BIOS_FW}` + the virtio-blk disk in the notes |\n"
            f"| runs | {RUNS} per figure |\n\n")
    order = ["Machine", "Block and network run", "BIOS boot run", "Results", "Targets", "Failures", "Notes",
             "Methods"]
    keys = [k for k in order if k in rest] + [k for k in rest if k not in order]
    OUT_MD.write_text(head + "".join(rest[k] if rest[k].endswith("\n\n") or k == keys[-1]
                                     else rest[k] + "\n" for k in keys))
    log(f"merged into {OUT_MD}")


def med(fig, vmm):
    v = results.get(fig, {}).get(vmm)
    return statistics.median(v) if v else None


def ratio_target(label, fig, limit, peers=None, floor=None):
    """One target line: vmd's median against the best peer's in this run."""
    a, bp = med(fig, "vmd"), best_peer(fig, peers)
    if a is None or bp is None:
        return f"- {label}: **not measured** in this run (a side failed or was left out)."
    r = a / bp[1]
    hi = higher_is_better(fig)
    ok = r >= limit if hi else r <= limit
    verdict = "met" if ok else "NOT met"
    if not ok and floor is not None and r < floor:
        verdict += f" (below {floor}x: the minimum is met)"
    return (f"- {label}: vmd {fmt(a)} vs {NAMES[bp[0]]} {fmt(bp[1])} = **{r:.2f}x** "
            f"(target {'>=' if hi else '<='} {limit}x): **{verdict}**.")


def targets():
    fast = [p for p in PEERS if not p.startswith("qemu")]
    out = [
        ratio_target("Start to the guest's first line <= 0.5x the fastest peer (at least < 1.0x)",
                     "test: start -> `VMD-BENCH boot` (ms)", 0.5, fast, 1.0),
        ratio_target("VMM CPU before the guest's first instruction <= 0.5x the fastest peer",
                     "VMM process CPU before first KVM_RUN (ms)", 0.5, fast),
        ratio_target("Idle overhead per VM (all of a VM's processes) <= 0.5x the smallest peer, 1 VM",
                     "1 idle VM: overhead = RSS - guest (MiB)", 0.5, fast),
        ratio_target("Idle overhead per VM <= 0.5x the smallest peer, 10 VMs",
                     "10 idle VMs: overhead per VM (MiB)", 0.5, fast),
    ]
    out += [ratio_target(f"{f.replace(': MiB/s', '')} >= 1.0x the best of QEMU, Firecracker and Cloud "
                         "Hypervisor", f, 1.0) for f in results if f.startswith("virtio-") and f.endswith("MiB/s")]
    out.append(ratio_target("BIOS boot (reset vector -> boot-sector marker) <= 1.0x QEMU -M pc, same SeaBIOS",
                            "BIOS: reset vector -> boot-sector marker (ms)", 1.0, ["qemu-pc"]))
    c = med("VMM process CPU before first KVM_RUN (ms)", "vmd")
    if c is not None:
        out.append(f"- Firecracker's spec, at most 8 CPU ms in the VMM before the guest's first instruction: "
                   f"vmd's vmm process {c:.2f} ms: **{'met' if c <= 8 else 'NOT met'}** "
                   f"(all vmd processes together, vmctl included: "
                   f"{med('all processes' + chr(39) + ' CPU before first KVM_RUN (ms)', 'vmd'):.2f} ms).")
    return out


def io_target():
    return "\n".join(ratio_target(f"{f.replace(': MiB/s', '')} >= 1.0x the best of QEMU, Firecracker and "
                                  "Cloud Hypervisor", f, 1.0)
                     for f in results if f.startswith("virtio-") and f.endswith("MiB/s"))


METHODS = [
    "- **Start -> first serial byte / marker**: t0 is taken just before spawning `vmctl start` (vmd) or "
    "the peer's process (`firecracker`, `cloud-hypervisor`, `qemu-system-x86_64`). vmd's serial output is read "
    "from its console log (`STATE/console/NAME.log`, written by the parent as it drains the pty), polled every "
    "0.5 ms; each peer's from its stdout pipe (its serial console) by a reader thread. A marker counts when its whole line has arrived. "
    "The test guest is `tests/guests/bench_boot.elf` (PVH entry, prints `VMD-BENCH boot` as its first "
    "output, then powers off); under QEMU it is loaded with `-kernel` (microvm: qboot + PVH; pc: SeaBIOS + "
    "the PVH option ROM). The Linux rows boot Debian's vmlinux (PVH note) with "
    f"`{LINUX_CMDLINE}` and 256 MiB; it gets no further than its early boot on a nested KVM that emulates "
    "guest kernel code.",
    "- **Before the guest's first instruction**: an ftrace instance (`trace_clock=mono`, the clock "
    "Python's `time.monotonic` reads) records `sys_enter_ioctl` with `cmd == 0xae80` (KVM_RUN) and "
    "`sched_stat_runtime` for the harness's descendants and vmd's daemons (`set_event_pid` + "
    "`event-fork`). Wall = first KVM_RUN - t0. CPU = the run time of every thread of the VMM process "
    "(vmd: the per-VM `vmm` process; QEMU: the qemu process) up to that instant, from the "
    "sched_stat_runtime slices (each one a contiguous run ending at its timestamp, cut at the KVM_RUN). "
    "The `all processes` row adds, for vmd, vmctl, control, parent and priv. For QEMU the guest's first "
    "instruction is its firmware's (qboot or SeaBIOS), not the test guest's.",
    "- **Memory**: `bench_boot.elf idle` prints `VMD-BENCH idle` and halts with interrupts off. 0.5 s "
    "after the marker, Rss of every mapping in /proc/PID/smaps of each of the VM's processes (vmd: the vmm, "
    "what it started and the VM's device processes; a peer: its process) is summed; the guest RAM mapping "
    "(anonymous or memfd, 64 MiB to 68 MiB in size, the largest Rss of those) is subtracted. RSS counts "
    "every file page mapped in full for each process (libraries, and the VMM binary itself: vmd's is shared "
    "with its daemons, a peer's with its other VMs only). The private row counts only pages no other process "
    "maps (Private_Clean + Private_Dirty, guest RAM left out): what the host gets back when the VM stops. The "
    "Pss row splits shared pages among the processes mapping them (guest pages included).",
    f"- **Exits**: `tests/guests/bench_exits.elf n={EXITS_N}` switches to ring 3 (CPL3 runs natively on "
    "this nested KVM; the TSS I/O bitmap allows every port, since this KVM ignores RFLAGS.IOPL for ring 3) "
    "and runs four phases of N accesses: `outb` to port 0x2e0, `inb` from it, 32-bit stores to and loads "
    "from 0xd0000000 (all unclaimed in both VMMs, each one a userspace exit). Rate = N / (host time "
    "between the phase's `begin` and `end` lines).",
    "- **N VMs at once**: see How cost grows; the 10-VM row of the results table is its `vmd: vmctl` "
    "column.",
]


def main():
    t_start = now()
    threading.Thread(target=sample_load, daemon=True).start()
    WORK.mkdir(parents=True, exist_ok=True)
    vmd = Vmd()
    tr = Ftrace([os.getpid(), *vmd.daemon_pids()])
    only = set(os.environ.get("ONLY", "boot,exits,memory,scale,timeline,linuxhw,blk,net,bios").split(","))
    khz = host_tsc_khz()
    try:
        if "boot" in only:
            fig_boot(vmd, tr)
        if "exits" in only:
            fig_exits(vmd)
        if "memory" in only:
            fig_memory(vmd)
        if "scale" in only:
            fig_scale(vmd)
        if "timeline" in only:
            fig_timeline(vmd)
        if "linuxhw" in only:
            fig_linux_hw(vmd)
        if "blk" in only:
            fig_blk(vmd, khz)
        if "bios" in only:
            fig_bios(vmd, tr)
    finally:
        tr.close()
        vmd.close()
    if "net" in only:
        fig_net(khz)
    rows = []
    if only <= MERGEABLE and OUT_MD.exists():
        merge_report(only, now() - t_start)
    else:
        write_report(rows, now() - t_start)
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
