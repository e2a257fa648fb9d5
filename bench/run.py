#!/usr/bin/env python3
"""Benchmark mailrelay against Postfix, side by side, on this machine: the one benchmark of
issue 11.

The matrix, for each size (4k, 100k, 1m) x parallel sessions (10, 100) x messages per
connection (1, or 100 with smtp-source -d):

  e2e      smtp-source -> relay -> smtp-sink, timed from the start of smtp-source until the
           sink has received every message;
  accept   accept-only: the relay holds what it takes (mailrelay [queue] hold, Postfix's
           hold queue), timed until smtp-source has had every "250 queued" reply;

and two more kinds of rows:

  latency  one client, one connection, messages one after the other: the time from the
           end-of-data dot to the 250 reply, p50 and p99 (the relay delivering meanwhile);
  burst    100 and 500 concurrent one-message connections (4k, e2e) on the shipped defaults;
  memory   the base memory (summed PSS of all the relay's processes, no sessions) and the
           memory of each idle session (N connections that greeted and sent EHLO; Postfix:
           its default_process_limit of sessions, one smtpd each).

Relays: mailrelay (twistd, shipped defaults, --smarthost [127.0.0.1]:SINK) and a private
Postfix instance (its own config, queue and data directories, relayhost=[127.0.0.1]:SINK),
each started fresh for every run and stopped after it.  Runs alternate (mailrelay, postfix,
mailrelay, postfix, ...) --repeat times; each cell reports the median of each relay, the ratio
of each repeat's pair (median and min-max), the CPU milliseconds per message of all each
relay's processes (/proc/PID/stat, their reaped children included), and peak memory.

Run as root (Postfix needs it):

    /work/venv/bin/python bench/run.py [--quick] [--sizes 4k,100k,1m] [--sessions 10,100]
                                       [--per-conn 1,100] [--repeat 3] [--phases ...]

See bench/README.md.  Results also go to bench/results-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTFIX_PROTO = Path("/etc/postfix/main.cf.proto")
POSTFIX_MASTER = Path("/etc/postfix/master.cf")

SENDER = "bench@source.test"
RECIPIENT = "sink@sink.test"
CLIENT_NAME = "client.bench.test"
RELAY_NAME = "bench.test"

#: Postfix processes counted in the headline RSS figure (the brief's list).
POSTFIX_RSS_NAMES = frozenset({"smtpd", "cleanup", "qmgr", "smtp"})

#: Messages per run of one message per connection, by size, when --messages is not given:
#: (normal, --quick).
DEFAULT_MESSAGES = [
    (8 * 1024, 2000, 100),
    (256 * 1024, 1000, 50),
    (None, 200, 20),
]

#: The measurements (see the module's docstring).
PHASES = ("e2e", "accept", "latency", "burst", "memory")

#: The memory targets of issue 11 (not tests): the base of all the relay's processes without
#: sessions, and the memory of each idle session, both as PSS.
TARGET_BASE_PSS = 60 * 1024 * 1024
TARGET_SESSION_PSS = 30 * 1024

PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A set-up step failed (a relay or sink would not start, ...)."""


# --------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4k, 100k, 1m, 512)")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0: {text!r}")
    return n


def size_label(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind port 0, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_smtp_ready(port: int, deadline: float, alive: Callable[[], bool]) -> None:
    """Wait until 127.0.0.1:port greets with 220 (then QUIT), or raise BenchError."""
    last = "no attempt"
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"process exited before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                data = b""
                while b"\n" not in data and len(data) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(4096)
                    return
                last = f"greeting {data[:80]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(f"nothing greeted with 220 on 127.0.0.1:{port} in time ({last})")


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, rss_bytes) of a process from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    lp, rp = data.find(b"("), data.rfind(b")")
    if lp < 0 or rp < 0:
        return None
    comm = data[lp + 1 : rp].decode("utf-8", "replace")
    rest = data[rp + 2 :].split()
    # rest[0] is field 3 (state); ppid is field 4, rss (pages) is field 24.
    try:
        return comm, int(rest[1]), int(rest[21]) * PAGE
    except (IndexError, ValueError):
        return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (utime at 11, stime, then the
    reaped children's cutime, cstime).  Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _ticks(fields: list[bytes], first: int) -> float:
    """Two consecutive clock-tick fields of L{_stat_fields} summed, in seconds: 11 (utime +
    stime: the process, every thread that ever ran) or 13 (its reaped children's)."""
    return (int(fields[first]) + int(fields[first + 1])) / CLOCK_TICKS


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat utime + stime); 0.0 when
    it is gone."""
    try:
        return _ticks(_stat_fields(pid), 11)
    except (OSError, IndexError):
        return 0.0


def threads_cpu_seconds(pid: int) -> float:
    """CPU seconds of every live thread of a process, from /proc/PID/task/TID/schedstat
    (nanoseconds).  /proc/PID/schedstat alone is the main thread's: it leaves out the spool
    committer's thread and the thread pools, which is where half of mailrelay's CPU went
    unseen before this was summed per thread."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def _own_and_reaped(pid: int) -> tuple[float, float] | None:
    """A process's own CPU seconds (its threads' schedstat in nanoseconds: precise even for
    the many short-lived daemons of Postfix, where stat's clock ticks would round each one
    down; or stat's utime + stime, which also holds threads that have ended, when that is
    more) and its reaped children's (cutime + cstime); C{None} when it is gone."""
    try:
        threads = threads_cpu_seconds(pid)
        fields = _stat_fields(pid)
        return max(threads, _ticks(fields, 11)), _ticks(fields, 13)
    except (OSError, IndexError, ValueError):
        return None


def proc_tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of processes and of their children reaped so far (L{_own_and_reaped}).
    Summed over a relay's live processes, a process that exits between two readings is
    still counted, in its parent's children's time once reaped."""
    return sum(sum(times) for times in map(_own_and_reaped, pids) if times is not None)


def proc_own_cpu_seconds(pids: list[tuple[int, str]]) -> dict[int, tuple[str, float]]:
    """C{{pid: (name, CPU seconds of its own threads)}} of the processes still there (no
    children's time): what L{busiest_process} compares."""
    found = {}
    for pid, name in pids:
        times = _own_and_reaped(pid)
        if times is not None:
            found[pid] = (name, times[0])
    return found


def busiest_process(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                    seconds: float) -> tuple[str, float] | None:
    """The process that used the most CPU between two L{proc_own_cpu_seconds} readings, and
    its share of one core over C{seconds} (1.0: a core busy all the time).  A single-threaded
    process -- or one bound by Python's GIL -- cannot pass 1.0: near it, that process is what
    limits the throughput, however many cores are idle."""
    if seconds <= 0:
        return None
    best: tuple[str, float] | None = None
    for pid, (name, now) in after.items():
        used = now - before.get(pid, (name, 0.0))[1]
        if best is None or used > best[1]:
            best = (name, used)
    return None if best is None else (best[0], round(best[1] / seconds, 3))


def proc_pss(pid: int) -> int | None:
    """Proportional set size of a process in bytes (shared pages divided among sharers)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def all_pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def descendants(root: int) -> list[tuple[int, str, int]]:
    """(pid, comm, rss_bytes) of the children of C{root}, their children, and so on."""
    others = {pid: info for pid in all_pids() if pid != root
              and (info := proc_stat(pid)) is not None}
    found: list[tuple[int, str, int]] = []
    parents = {root}
    while True:
        step = [(pid, info) for pid, info in others.items() if info[1] in parents]
        if not step:
            return found
        for pid, info in step:
            del others[pid]
            parents.add(pid)
            found.append((pid, info[0], info[2]))


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def stop_process(proc: subprocess.Popen[Any], name: str, grace: float = 10.0) -> None:
    """SIGTERM, wait up to grace seconds, then SIGKILL; never raises."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM for {grace:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# smtp-sink with a counter


class Sink:
    """smtp-sink -c on a free port; a thread reads its running counters (mesg=N)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.count = 0
        self.target: int | None = None
        self.target_time: float | None = None
        self.last_progress = time.monotonic()
        self.cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = workdir / f"sink-{self.port}.err"

    def __enter__(self) -> Self:
        cmd = [SMTP_SINK, "-c", "-h", "sink.test"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        cmd += [f"127.0.0.1:{self.port}", "256"]
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err,
            start_new_session=True,
        )
        self.thread = threading.Thread(target=self._read, name="sink-reader", daemon=True)
        self.thread.start()
        try:
            wait_smtp_ready(self.port, time.monotonic() + 15, lambda: self.proc.poll() is None)
        except BenchError as e:
            self.__exit__(None, None, None)
            raise BenchError(f"smtp-sink: {e}: {tail(self.stderr_path, 5)}") from None
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        pattern = re.compile(rb"mesg=(\d+)")
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            newest = None
            for rec in records:
                m = pattern.search(rec)
                if m:
                    newest = int(m.group(1))
            if newest is not None:
                now = time.monotonic()
                with self.cond:
                    if newest > self.count:
                        self.count = newest
                        self.last_progress = now
                        if (self.target is not None and self.target_time is None
                                and newest >= self.target):
                            self.target_time = now
                        self.cond.notify_all()

    def expect(self, n: int) -> None:
        """Record the time at which the counter reaches n (counted from 0)."""
        with self.cond:
            self.target, self.target_time = n, None
            self.last_progress = time.monotonic()
            if self.count >= n:
                self.target_time = time.monotonic()

    def wait(self, deadline: float, stall: float, first_stall: float | None = None) -> str:
        """Wait for the target: "done", "stalled" (no progress for stall seconds, or
        nothing at all for first_stall seconds), "timeout" or "sink died"."""
        with self.cond:
            while self.target_time is None:
                now = time.monotonic()
                if self.proc is None or self.proc.poll() is not None:
                    return "sink died"
                if now >= deadline:
                    return "timeout"
                limit = first_stall if (self.count == 0 and first_stall) else stall
                if now - self.last_progress >= limit:
                    return "stalled"
                self.cond.wait(timeout=min(0.5, deadline - now))
            return "done"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, "smtp-sink", grace=5)
            with contextlib.suppress(Exception):
                self.thread.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self._err.close()


# --------------------------------------------------------------------------------------------
# RSS sampling


class RssSampler:
    """Samples the summed RSS of pids_fn()'s processes every interval seconds."""

    def __init__(self, pids_fn: Callable[[], dict[str, list[tuple[int, str, int]]]],
                 interval: float = 0.2) -> None:
        self.pids_fn = pids_fn
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.peak_procs: dict[str, int] = {}
        self.peak_pss: int | None = None
        self.samples = 0
        self.stop_event = threading.Event()

    def sample(self) -> None:
        with contextlib.suppress(Exception):
            groups = self.pids_fn()
            for name, procs in groups.items():
                total = sum(rss for _, _, rss in procs)
                if total > self.peaks.get(name, 0):
                    self.peaks[name] = total
                    self.peak_procs[name] = len(procs)
            pss = [x for x in (proc_pss(p) for p, _, _ in groups.get("relay", [])) if x]
            if pss:
                self.peak_pss = max(self.peak_pss or 0, sum(pss))
            self.samples += 1

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self.thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        self.sample()


# --------------------------------------------------------------------------------------------
# the relays


class Mailrelay:
    name = "mailrelay"

    def __init__(self, args: argparse.Namespace, workdir: Path, sink_port: int, run_id: str,
                 hold: bool = False, max_connections: int | None = None):
        self.args = args
        self.port = free_port()
        self.dir = workdir / f"mailrelay-{run_id}"
        self.sink_port = sink_port
        self.hold = hold
        #: The listener's max_connections, when the run needs more than the shipped default.
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None
        self.logpath = self.dir / "mailrelay.log"

    def __enter__(self) -> Self:
        self.dir.mkdir(parents=True)
        endpoint = f"tcp:{self.port}:interface=127.0.0.1"
        cmd = [
            self.args.twistd, "-n", "--pidfile=", "mailrelay",
            "--listen", endpoint,
            "--spool", str(self.dir / "spool"),
            "--hostname", RELAY_NAME,
            "--smarthost", f"[127.0.0.1]:{self.sink_port}",
        ]
        lines = []
        if self.max_connections is not None:  # the listener is in the file, not --listen
            del cmd[4:6]
            lines.append(f'[[listeners]]\nendpoint = "{endpoint}"\n'
                         f"max_connections = {self.max_connections}\n")
        processes = self.args.mailrelay_processes
        if processes != "1":
            value = processes if processes.isdigit() else f'"{processes}"'
            lines.append(f"[relay]\nprocesses = {value}\n")
        if self.hold:  # accept-only: spooled with fsync, nothing delivered
            lines.append("[queue]\nhold = true\n")
        if lines:
            config = self.dir / "mailrelay.toml"
            config.write_text("".join(lines))
            cmd[4:4] = ["--config", str(config)]
        self._log = open(self.logpath, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            wait_smtp_ready(self.port, deadline, lambda: self.proc.poll() is None)
            # The delivery process's start-up is not per-message work: wait for it.
            while not self.hold and b"queue manager started" not in self.logpath.read_bytes():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise BenchError("its delivery process did not start")
                time.sleep(0.05)
        except BenchError as e:
            self.__exit__(None, None, None)
            raise BenchError(f"mailrelay did not start: {e}\n{tail(self.logpath)}") from None
        if processes != "1":  # the acceptor processes accept once they have started
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if b": accepting on" in self.logpath.read_bytes():
                    break
                time.sleep(0.1)
        return self

    def rss_groups(self) -> dict[str, list[tuple[int, str, int]]]:
        """The twistd process and all its descendants: the delivery process (and any
        acceptor process), and the fork server that forks them, whose children they are."""
        assert self.proc is not None
        root = self.proc.pid
        st = proc_stat(root)
        procs = ([(root, st[0], st[2])] if st else []) + descendants(root)
        return {"relay": procs, "all": procs}

    def cpu_seconds(self) -> float:
        """CPU time of twistd and its descendants (with any reaped children)."""
        return proc_tree_cpu_seconds([p for p, _, _ in self.rss_groups()["all"]])

    def extra(self) -> dict[str, Any]:
        """Figures read just before stopping."""
        assert self.proc is not None
        hwm = proc_status_kb(self.proc.pid, "VmHWM")
        return {"twistd_vmhwm_bytes": hwm * 1024 if hwm is not None else None}

    def log_tail(self) -> str:
        return tail(self.logpath)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, "mailrelay")
        with contextlib.suppress(Exception):
            self._log.close()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class Postfix:
    """A private Postfix instance: own config, queue and data directories, own port."""

    name = "postfix"

    def __init__(self, args: argparse.Namespace, workdir: Path, sink_port: int, run_id: str,
                 hold: bool = False, max_connections: int | None = None):
        # (max_connections: Postfix keeps its own limit, default_process_limit smtpd)
        self.args = args
        self.hold = hold
        self.port = free_port()
        self.dir = workdir / f"postfix-{run_id}"
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.logpath = self.dir / "maillog"
        self.sink_port = sink_port
        self.master_pid: int | None = None
        self.started = False

    def _postfix(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf), *argv], check=False, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def _configure(self) -> None:
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.conf.mkdir()
        self.queue.mkdir(mode=0o755)
        self.data.mkdir(mode=0o700)
        shutil.chown(self.data, "postfix", "postfix")
        shutil.copyfile(POSTFIX_PROTO, self.conf / "main.cf")
        params = {
            "compatibility_level": "3.6",
            "setgid_group": "postdrop",
            "mail_owner": "postfix",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "manpage_directory": "/usr/share/man",
            "sample_directory": "/usr/share/doc/postfix/examples",
            "readme_directory": "no",
            "html_directory": "no",
            "sendmail_path": "/usr/sbin/sendmail",
            "newaliases_path": "/usr/bin/newaliases",
            "mailq_path": "/usr/bin/mailq",
            "alias_maps": "",
            "alias_database": "",
            "maillog_file": str(self.logpath),
            "maillog_file_prefixes": str(self.dir),
            "myhostname": RELAY_NAME,
            "biff": "no",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtpd_relay_restrictions": "permit_mynetworks,reject_unauth_destination",
        }
        if self.hold:  # accept-only: every message to the hold queue, nothing delivered
            params["smtpd_sender_restrictions"] = "check_sender_access static:HOLD"
        for item in self.args.postfix_param:
            key, _, value = item.partition("=")
            params[key.strip()] = value.strip()
        r = subprocess.run(
            [POSTCONF, "-c", str(self.conf), "-e", *[f"{k}={v}" for k, v in params.items()]],
            check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise BenchError(f"postconf -e failed: {r.stderr.strip()}")
        # master.cf: no chroot (the private queue has no etc/ copies), smtpd on our port.
        out, moved = [], False
        for line in POSTFIX_MASTER.read_text().splitlines():
            if line and not line[0].isspace() and not line.startswith("#"):
                fields = line.split()
                if len(fields) >= 8:
                    fields[4] = "n"
                    if fields[0] == "smtp" and fields[1] == "inet":
                        fields[0] = str(self.port)
                        moved = True
                    line = " ".join(fields)
            out.append(line)
        if not moved:
            raise BenchError(f"no 'smtp inet' service in {POSTFIX_MASTER}")
        (self.conf / "master.cf").write_text("\n".join(out) + "\n")

    def __enter__(self) -> Self:
        try:
            self._configure()
            self.started = True  # from here on, try to stop it whatever happens
            r = self._postfix("start")
            if r.returncode != 0:
                raise BenchError(
                    f"postfix -c {self.conf} start exited {r.returncode}: "
                    f"{(r.stdout + r.stderr).strip()}\n{tail(self.logpath)}"
                )
            deadline = time.monotonic() + 30
            while self.master_pid is None and time.monotonic() < deadline:
                self.master_pid = self._read_master_pid()
                if self.master_pid is None:
                    time.sleep(0.1)
            if self.master_pid is None:
                raise BenchError(f"postfix master did not start\n{tail(self.logpath)}")
            wait_smtp_ready(self.port, time.monotonic() + 30,
                            lambda: os.path.exists(f"/proc/{self.master_pid}"))
        except BaseException as e:
            self.__exit__(None, None, None)
            if isinstance(e, BenchError):
                raise BenchError(f"postfix did not start: {e}\n{tail(self.logpath)}") from None
            raise
        return self

    def _read_master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        st = proc_stat(pid)
        return pid if st and st[0] == "master" else None

    def _children(self) -> list[tuple[int, str, int]]:
        found = []
        for pid in all_pids():
            st = proc_stat(pid)
            if st and st[1] == self.master_pid:
                found.append((pid, st[0], st[2]))
        return found

    def rss_groups(self) -> dict[str, list[tuple[int, str, int]]]:
        if self.master_pid is None:
            return {}
        children = self._children()
        master = proc_stat(self.master_pid)
        everything = children + ([(self.master_pid, master[0], master[2])] if master else [])
        return {
            "relay": [p for p in children if p[1] in POSTFIX_RSS_NAMES],
            "all": everything,
        }

    def session_limit(self) -> int:
        """How many SMTP sessions the instance serves at once: its smtp service's process
        limit (master.cf's maxproc, or default_process_limit), one smtpd each; 0 for no
        limit."""
        for line in (self.conf / "master.cf").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 8 and fields[0] == str(self.port) and fields[6] != "-":
                return int(fields[6])
        r = subprocess.run(
            [POSTCONF, "-c", str(self.conf), "-h", "default_process_limit"], check=False,
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        try:
            return int(r.stdout.strip())
        except ValueError:
            raise BenchError(f"postconf -h default_process_limit said {r.stdout.strip()!r} "
                             f"{r.stderr.strip()}") from None

    def cpu_seconds(self) -> float:
        """CPU time of the instance: master and every daemon (with those reaped)."""
        return proc_tree_cpu_seconds([p for p, _, _ in self.rss_groups().get("all", [])])

    def extra(self) -> dict[str, Any]:
        return {}

    def log_tail(self) -> str:
        return tail(self.logpath)

    def _instance_pids(self) -> list[int]:
        """Processes of this instance: master, its children, anything with our MAIL_CONFIG."""
        mine = []
        needle = f"MAIL_CONFIG={self.conf}".encode()
        for pid in all_pids():
            if pid == os.getpid():
                continue
            st = proc_stat(pid)
            if st is None:
                continue
            if pid == self.master_pid or (self.master_pid and st[1] == self.master_pid):
                mine.append(pid)
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if needle in env:
                mine.append(pid)
        return mine

    def __exit__(self, *exc: object) -> None:
        if self.started:
            try:
                r = self._postfix("stop", timeout=60)
                if r.returncode != 0 and self.master_pid is not None:
                    log(f"postfix stop exited {r.returncode}: {(r.stdout + r.stderr).strip()}")
            except subprocess.TimeoutExpired:
                log("postfix stop timed out")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._instance_pids():
                time.sleep(0.2)
            leftovers = self._instance_pids()
            if leftovers:
                log(f"killing leftover Postfix processes {leftovers}")
                for pid in leftovers:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the matrix


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement of the table: a phase, a size, parallel sessions, messages per
    connection (1, or several with smtp-source -d) and the messages of a run."""

    phase: str
    size: int
    sessions: int
    per_conn: int
    messages: int

    @property
    def key(self) -> str:
        if self.phase == "memory":
            return f"memory s{self.sessions}"
        return f"{self.phase} {size_label(self.size)} s{self.sessions} m{self.per_conn}"


#: Targets against Postfix (issue 11): throughput ratios, latency as Postfix p50 / ours.
def target_ratio(phase: str, size: int) -> float:
    if phase == "e2e":
        return 1.5 if size < 100 * 1024 else 1.2
    return {"accept": 2.0, "latency": 1.0, "burst": 1.0}[phase]


def messages_for(size: int, args: argparse.Namespace) -> int:
    """Messages of a run of one message per connection."""
    if args.messages:
        return args.messages
    for limit, normal, quick in DEFAULT_MESSAGES:
        if limit is None or size <= limit:
            return quick if args.quick else normal
    raise AssertionError


def cells(args: argparse.Namespace) -> list[Cell]:
    """The matrix: e2e and accept for every size x sessions x messages per connection; the
    latency of one client per size; the burst rows (4k, one message per connection, on the
    shipped defaults) at each of --burst sessions; the memory row (--idle-sessions)."""
    found: list[Cell] = []
    for phase in args.phase_list:
        if phase == "memory":
            found.append(Cell(phase, 0, args.idle_sessions, 0, 0))
            continue
        if phase == "latency":
            for size in args.size_list:
                found.append(Cell(phase, size, 1, args.latency_messages, args.latency_messages))
            continue
        if phase == "burst":
            for sessions in args.burst_list:
                n = max(messages_for(4096, args), sessions)
                found.append(Cell(phase, 4096, sessions, 1, n))
            continue
        for size in args.size_list:
            for sessions in args.session_list:
                for per_conn in args.per_conn_list:
                    base = messages_for(size, args)
                    if per_conn == 1:
                        n = max(base, sessions)
                    else:  # as many as asked, within 5 runs' worth of one message each
                        n = max(min(sessions * per_conn, 5 * base), 2 * sessions)
                        n -= n % sessions
                    found.append(Cell(phase, size, sessions, n // sessions if per_conn > 1
                                      else 1, n))
    return found


# --------------------------------------------------------------------------------------------
# one run


def message_bytes(size: int) -> bytes:
    """A text message of about C{size} octets (CRLF lines of 78), for the latency client."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def latency_client(port: int, count: int, size: int, deadline: float) -> list[float]:
    """One connection, C{count} messages in turn; for each, the seconds from the write of
    the end-of-data dot to the C{250} reply."""
    data = message_bytes(size) + b".\r\n"
    samples: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        # The dot goes in a write of its own: without this, it would wait for the ACK of
        # the body's last segment (a delayed ACK, up to 40 ms), and that is what we'd measure.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if not line:
                    raise BenchError("the relay closed the connection")
                if line[3:4] != b"-":
                    return line

        def command(text: bytes, want: bytes) -> None:
            s.sendall(text)
            answer = reply()
            if not answer.startswith(want):
                raise BenchError(f"{text.strip()!r} answered {answer.strip()!r}")

        if not reply().startswith(b"220"):
            raise BenchError("no greeting")
        command(f"EHLO {CLIENT_NAME}\r\n".encode(), b"250")
        body, dot = data[:-3], data[-3:]
        for _ in range(count):
            if time.monotonic() > deadline:
                raise BenchError("latency run out of time")
            command(f"MAIL FROM:<{SENDER}>\r\n".encode(), b"250")
            command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"250")
            command(b"DATA\r\n", b"354")
            s.sendall(body)
            start = time.perf_counter()
            s.sendall(dot)
            answer = reply()
            samples.append(time.perf_counter() - start)
            if not answer.startswith(b"250"):
                raise BenchError(f"end of data answered {answer.strip()!r}")
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
    return samples


#: The machine-phase probe's fixed Python work (iterations) and its fsyncs of 4 KiB.
PROBE_LOOPS = 200_000
PROBE_FSYNCS = 20


def machine_phase(directory: Path) -> dict[str, float]:
    """How fast this machine is right now, measured just before a run: the same relay code
    runs 10-20 % slower in a VM's slow phases (the host's other guests), which moves both
    relays' rates between runs of one table and between tables.  C{cpu_ms}: the fastest of
    three passes of a fixed pure-Python loop (one core, as a relay's busiest process);
    C{fsync_ms}: the median of C{PROBE_FSYNCS} writes of 4 KiB each followed by C{fsync}
    in C{directory} (the spools' disk).  Read beside a run, a change of rate that the probe
    moved with too is the machine's, not the code's."""
    def work() -> float:
        start = time.perf_counter()
        table: dict[int, str] = {}
        for i in range(PROBE_LOOPS):
            table[i & 1023] = f"{i:x}"
        return time.perf_counter() - start

    cpu = min(work() for _ in range(3))
    fd, path = tempfile.mkstemp(prefix="probe-", dir=directory)
    syncs = []
    try:
        block = b"x" * 4096
        for _ in range(PROBE_FSYNCS):
            start = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            syncs.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"cpu_ms": round(cpu * 1000, 3), "fsync_ms": round(statistics.median(syncs) * 1000, 3)}


def phase_summary(runs: list[dict[str, Any]]) -> str | None:
    """One line on the machine-phase probes of C{runs} (median and range), or C{None}."""
    probes = [r["machine_phase"] for r in runs if r.get("machine_phase")]
    if not probes:
        return None
    parts = []
    for key, what in (("cpu_ms", "CPU probe"), ("fsync_ms", "fsync probe")):
        values = sorted(p[key] for p in probes)
        parts.append(f"{what} {statistics.median(values):.2f} ms "
                     f"({values[0]:.2f}-{values[-1]:.2f})")
    return (f"machine phase before each of {len(probes)} runs: " + ", ".join(parts)
            + "; a spread of more than ~10% says the VM changed speed during the table")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run_once(args: argparse.Namespace, workdir: Path, relay_cls: type, cell: Cell,
             deadline: float, run_id: str) -> dict[str, Any]:
    """One measurement: fresh sink, fresh relay, the load, stop everything."""
    messages = cell.messages
    result: dict[str, Any] = {
        "relay": relay_cls.name, "phase": cell.phase, "size": cell.size, "messages": messages,
        "sessions": cell.sessions, "per_conn": cell.per_conn, "cell": cell.key, "ok": False,
    }
    hold = cell.phase == "accept"
    with Sink(workdir) as sink, relay_cls(args, workdir, sink.port, run_id, hold) as relay:
        cmd = [SMTP_SOURCE, "-s", str(cell.sessions), "-m", str(messages), "-l",
               str(cell.size), "-f", SENDER, "-t", RECIPIENT, "-M", CLIENT_NAME]
        if cell.per_conn > 1:
            cmd.append("-d")  # keep each connection open for the next message
        cmd.append(f"127.0.0.1:{relay.port}")
        sink.expect(messages)
        with RssSampler(relay.rss_groups, args.rss_interval) as sampler:
            def own() -> dict[int, tuple[str, float]]:
                return proc_own_cpu_seconds(
                    [(p, name) for p, name, _ in relay.rss_groups().get("all", [])])
            own_before = own()
            cpu_before = relay.cpu_seconds()
            start = time.monotonic()
            if cell.phase == "latency":
                result["command"] = f"latency client: {messages} x {size_label(cell.size)}"
                try:
                    samples = latency_client(relay.port, messages, cell.size, deadline)
                except (BenchError, OSError) as e:
                    result["error"] = f"latency client: {e}"
                else:
                    result["seconds"] = round(time.monotonic() - start, 4)
                    result["latency_p50_ms"] = round(percentile(samples, 50) * 1000, 3)
                    result["latency_p99_ms"] = round(percentile(samples, 99) * 1000, 3)
                    result["ok"] = True
            else:
                result["command"] = " ".join(cmd)
                run_source(args, relay_cls, cell, cmd, sink, deadline, start, result)
            result["cpu_seconds"] = round(relay.cpu_seconds() - cpu_before, 4)
            busiest = busiest_process(own_before, own(), time.monotonic() - start)
            if busiest is not None:
                result["busiest_process"], result["busiest_core_share"] = busiest
        result["sink_count"] = sink.count
        result["rss_peak_bytes"] = sampler.peaks.get("relay")
        result["rss_peak_all_bytes"] = sampler.peaks.get("all")
        result["rss_peak_procs"] = sampler.peak_procs.get("relay")
        result["pss_peak_bytes"] = sampler.peak_pss
        result["rss_samples"] = sampler.samples
        result.update(relay.extra())
        if not result["ok"]:
            result["relay_log_tail"] = relay.log_tail()
    if result["ok"]:
        result["msgs_per_s"] = round(messages / result["seconds"], 2)
        result["cpu_ms_per_msg"] = round(result["cpu_seconds"] * 1000 / messages, 3)
    return result


def run_source(args: argparse.Namespace, relay_cls: type, cell: Cell, cmd: list[str],
               sink: Sink, deadline: float, start: float, result: dict[str, Any]) -> None:
    """smtp-source's part of a run: accept phases end with smtp-source, the others when the
    sink has every message."""
    src = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = src.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_process(src, "smtp-source", grace=2)
        out = src.communicate()[0]
        result["error"] = "smtp-source timed out"
    finally:
        stop_process(src, "smtp-source", grace=2)  # interrupted: do not leave it
    result["source_seconds"] = round(time.monotonic() - start, 4)
    result["source_rc"] = src.returncode
    result["source_output"] = out.decode("utf-8", "replace")[-2000:]
    result["delivered_when_source_done"] = sink.count
    if "error" not in result and src.returncode != 0:
        result["error"] = f"smtp-source exited {src.returncode}: " + \
            out.decode("utf-8", "replace").strip()[-300:]
    if "error" in result:
        return
    if cell.phase == "accept":
        result["seconds"] = result["source_seconds"]
        result["ok"] = True
        return
    first = args.delivery_probe if relay_cls is Mailrelay else None
    state = sink.wait(deadline, args.stall_timeout, first)
    if state == "done":
        assert sink.target_time is not None
        result["seconds"] = round(sink.target_time - start, 4)
        result["ok"] = True
    elif state == "stalled" and sink.count == 0:
        result["error"] = "no message reached the sink"
        result["delivery_unavailable"] = True
    else:
        result["error"] = (f"sink {state} at {sink.count}/{cell.messages} messages "
                           f"after {time.monotonic() - start:.1f}s")


# --------------------------------------------------------------------------------------------
# memory: the base, and idle sessions


@contextlib.contextmanager
def open_files_limit(need: int) -> Any:
    """Raise this process's RLIMIT_NOFILE to at least C{need} (the hard limit too, as root,
    up to fs.nr_open) for the time of the block: our client sockets need it, and the relays
    started inside inherit it (mailrelay raises its soft limit to its hard one as its
    listeners need).  Raises BenchError when it cannot be had."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < need:
        if hard != infinite and hard < need:
            try:
                nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            except (OSError, ValueError):
                nr_open = need
            if need > nr_open:
                raise BenchError(f"{need} open files wanted, above fs.nr_open ({nr_open})")
            hard = need
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        except (ValueError, OSError) as e:
            raise BenchError(
                f"cannot raise the open file limit from {before} to {need}: {e} (run as root, "
                "or raise ulimit -Hn, or give fewer --idle-sessions)") from None
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, before)


def smtp_reply_done(buf: bytes) -> bytes | None:
    """The last line of a complete SMTP reply at the start of C{buf}, else None."""
    for line in buf.split(b"\r\n")[:-1]:
        if len(line) < 4 or line[3:4] != b"-":
            return line
    return None


class IdleSessions:
    """C{count} SMTP sessions with the relay on 127.0.0.1:C{port}, each of which reads the
    greeting, sends EHLO, reads its reply and then stays idle until the block ends (QUIT and
    close).  At most C{concurrency} sessions are being opened at once, so that the listen
    queue never overflows.  Raises BenchError when a session is refused, closed or not ready
    by C{deadline}."""

    def __init__(self, port: int, count: int, deadline: float, concurrency: int = 100) -> None:
        self.port = port
        self.count = count
        self.deadline = deadline
        self.concurrency = concurrency
        self.sockets: list[socket.socket] = []
        #: Seconds it took to have every session idle after its EHLO.
        self.seconds: float | None = None

    def __enter__(self) -> Self:
        import selectors

        start = time.monotonic()
        sel = selectors.DefaultSelector()
        state: dict[socket.socket, list[Any]] = {}  # socket -> [stage, received]
        ready = 0
        try:
            while ready < self.count:
                while len(self.sockets) < self.count and len(state) < self.concurrency:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self.sockets.append(s)
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", self.port))
                    sel.register(s, selectors.EVENT_READ)
                    state[s] = ["greeting", b""]
                if time.monotonic() > self.deadline:
                    raise BenchError(f"{ready} of {self.count} sessions ready before the "
                                     "deadline")
                for key, _ in sel.select(timeout=1.0):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(4096)
                    except OSError as e:
                        raise BenchError(f"{ready} of {self.count} sessions ready, then: "
                                         f"{e}") from None
                    stage, received = state[s]
                    received += data
                    if not data:
                        raise BenchError(f"{ready} of {self.count} sessions ready, then the "
                                         f"relay closed one at its {stage}: "
                                         f"{received[-200:]!r}")
                    last = smtp_reply_done(received)
                    state[s][1] = received
                    if last is None:
                        continue
                    if stage == "greeting":
                        if not last.startswith(b"220"):
                            raise BenchError(f"{ready} of {self.count} sessions ready, then "
                                             f"one was greeted with {last[:200]!r}")
                        s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
                        state[s] = ["EHLO reply", b""]
                    else:
                        if not last.startswith(b"250"):
                            raise BenchError(f"{ready} of {self.count} sessions ready, then "
                                             f"one's EHLO was answered {last[:200]!r}")
                        sel.unregister(s)
                        del state[s]
                        ready += 1
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            sel.close()
        self.seconds = time.monotonic() - start
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.send(b"QUIT\r\n")
            s.close()
        self.sockets = []


def wait_quiet(relay: Any, deadline: float, quiet: float = 0.02, interval: float = 0.5) -> bool:
    """Wait until the relay's processes have used less than C{quiet} CPU seconds in each of
    two C{interval}s in a row (they are idle), or C{deadline}: whether they were."""
    calm = 0
    before = relay.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = relay.cpu_seconds()
        calm = calm + 1 if now - before < quiet else 0
        before = now
        if calm >= 2:
            return True
    return False


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/PID/smaps_rollup, in bytes (empty when it is gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == b"kB":
                    found[parts[0].rstrip(b":").decode()] = int(parts[1]) * 1024
    except (OSError, ValueError):
        return {}
    return found


def pss_by_process(relay: Any) -> list[dict[str, Any]]:
    """pid, name, PSS (all of it, and of its anonymous memory) and RSS of each of the
    relay's processes."""
    found = []
    for pid, name, rss in relay.rss_groups().get("all", []):
        rollup = smaps_rollup(pid)
        if "Pss" in rollup:
            found.append({"pid": pid, "name": name, "pss_bytes": rollup["Pss"],
                          "pss_anon_bytes": rollup.get("Pss_Anon", 0), "rss_bytes": rss})
    return found


def run_memory(args: argparse.Namespace, workdir: Path, relay_cls: type, cell: Cell,
               deadline: float, run_id: str) -> dict[str, Any]:
    """The memory row of one relay: start it (mailrelay on its shipped defaults but for a
    listener allowing the sessions), wait until it is up and idle, read the summed PSS of
    its processes (the base), open the idle sessions, wait until idle again and read it
    again: the cost of each session is the difference over the sessions.

    For Postfix, the base is its daemons without an smtpd (the one the start-up probe
    spawned, idle, is left out), and it holds as many sessions as its smtpd process limit
    (default_process_limit: 100), never more: that many are opened."""
    wanted = cell.sessions
    result: dict[str, Any] = {
        "relay": relay_cls.name, "phase": cell.phase, "size": cell.size, "messages": 0,
        "sessions_asked": wanted, "cell": cell.key, "ok": False,
    }
    with open_files_limit(wanted + 1024), relay_cls(
        args, workdir, free_port(), run_id, max_connections=wanted + 100
    ) as relay:
        sessions = wanted
        if relay_cls is Postfix:
            limit = relay.session_limit()
            sessions = min(wanted, limit) if limit else wanted
            result["session_limit"] = limit
        result["sessions"] = sessions
        result["base_idle"] = wait_quiet(relay, min(deadline, time.monotonic() + 30))
        base = pss_by_process(relay)
        if relay_cls is Postfix:  # the probe's smtpd is a session's, not the base's
            base = [p for p in base if p["name"] != "smtpd"]
        result["base_processes"] = base
        result["base_pss_bytes"] = sum(p["pss_bytes"] for p in base)
        result["base_pss_anon_bytes"] = sum(p["pss_anon_bytes"] for p in base)
        try:
            with IdleSessions(relay.port, sessions, deadline) as idle:
                result["sessions_seconds"] = round(idle.seconds or 0.0, 2)
                result["loaded_idle"] = wait_quiet(relay, min(deadline, time.monotonic() + 30))
                loaded = pss_by_process(relay)
        except BenchError as e:
            result["error"] = f"idle sessions: {e}"
            result["relay_log_tail"] = relay.log_tail()
            return result
        result["loaded_processes"] = [{k: p[k] for k in ("name", "pss_bytes")} for p in loaded]
        result["loaded_pss_bytes"] = sum(p["pss_bytes"] for p in loaded)
        result["per_session_bytes"] = round(
            (result["loaded_pss_bytes"] - result["base_pss_bytes"]) / sessions)
        result["ok"] = True
    return result


# --------------------------------------------------------------------------------------------
# reporting


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def most_common(values: list[str]) -> str | None:
    return collections.Counter(values).most_common(1)[0][0] if values else None


def summarize(runs: list[dict[str, Any]], relays: list[str], all_cells: list[Cell],
              notes: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for cell in all_cells:
        if cell.phase == "memory":
            rows.append(summarize_memory(runs, relays, cell))
            continue
        row: dict[str, Any] = {"cell": cell.key, "phase": cell.phase, "size": cell.size,
                               "size_label": size_label(cell.size), "sessions": cell.sessions,
                               "per_conn": cell.per_conn, "messages": cell.messages,
                               "target_ratio": target_ratio(cell.phase, cell.size)}
        for relay in relays:
            mine = [r for r in runs if r["relay"] == relay and r["cell"] == cell.key]
            good = [r for r in mine if r["ok"]]
            # memory of completed runs only: a failed run did not do the same work
            rss = [r["rss_peak_bytes"] for r in good if r.get("rss_peak_bytes")]
            pss = [r["pss_peak_bytes"] for r in good if r.get("pss_peak_bytes")]
            rates = [r["msgs_per_s"] for r in good]
            row[relay] = {
                "runs": len(mine),
                "ok_runs": len(good),
                "msgs_per_s_all": rates,
                "msgs_per_s": median_or_none(rates),
                "spread": (round((max(rates) - min(rates)) / statistics.median(rates), 3)
                           if len(rates) > 1 else None),
                "cpu_ms_per_msg": median_or_none([r["cpu_ms_per_msg"] for r in good]),
                "busiest_core_share": median_or_none([r["busiest_core_share"] for r in good
                                                      if "busiest_core_share" in r]),
                "busiest_process": most_common([r["busiest_process"] for r in good
                                                if "busiest_process" in r]),
                "latency_p50_ms": median_or_none([r["latency_p50_ms"] for r in good
                                                  if "latency_p50_ms" in r]),
                "latency_p99_ms": median_or_none([r["latency_p99_ms"] for r in good
                                                  if "latency_p99_ms" in r]),
                "rss_peak_bytes": max(rss) if rss else None,
                "pss_peak_bytes": max(pss) if pss else None,
                "errors": sorted({r["error"] for r in mine if r.get("error")}),
            }
            note = notes.get(f"{relay}:{cell.phase}")
            if note:
                row[relay]["note"] = note
        if "mailrelay" in row and "postfix" in row:
            ratios = paired_ratios(runs, cell)
            row["ratios"] = ratios
            row["ratio"] = median_or_none(ratios)
            row["ratio_min"] = min(ratios) if ratios else None
            row["ratio_max"] = max(ratios) if ratios else None
            a, b = row["mailrelay"], row["postfix"]
            row["pss_ratio"] = (round(a["pss_peak_bytes"] / b["pss_peak_bytes"], 3)
                                if a["pss_peak_bytes"] and b["pss_peak_bytes"] else None)
            row["target_met"] = (row["ratio"] >= row["target_ratio"]
                                 if row["ratio"] is not None else None)
        rows.append(row)
    return rows


def summarize_memory(runs: list[dict[str, Any]], relays: list[str],
                     cell: Cell) -> dict[str, Any]:
    """The memory row: each relay's median base PSS and PSS per idle session over its
    repeats, and mailrelay's against the targets."""
    row: dict[str, Any] = {
        "cell": cell.key, "phase": "memory", "sessions": cell.sessions,
        "target_base_pss_bytes": TARGET_BASE_PSS,
        "target_per_session_bytes": TARGET_SESSION_PSS,
    }
    for relay in relays:
        mine = [r for r in runs if r["relay"] == relay and r["cell"] == cell.key]
        good = [r for r in mine if r["ok"]]
        base = median_or_none([r["base_pss_bytes"] for r in good])
        anon = median_or_none([r["base_pss_anon_bytes"] for r in good])
        per = median_or_none([r["per_session_bytes"] for r in good])
        row[relay] = {
            "runs": len(mine),
            "ok_runs": len(good),
            "sessions": max((r["sessions"] for r in good), default=None),
            "base_pss_bytes": round(base) if base is not None else None,
            "base_pss_anon_bytes": round(anon) if anon is not None else None,
            "per_session_bytes": round(per) if per is not None else None,
            "base_pss_all": [r["base_pss_bytes"] for r in good],
            "per_session_all": [r["per_session_bytes"] for r in good],
            "errors": sorted({r["error"] for r in mine if r.get("error")}),
        }
    mr = row.get("mailrelay")
    if mr and mr["base_pss_bytes"] is not None:
        row["base_target_met"] = mr["base_pss_bytes"] <= TARGET_BASE_PSS
        row["per_session_target_met"] = mr["per_session_bytes"] <= TARGET_SESSION_PSS
    return row


def paired_ratios(runs: list[dict[str, Any]], cell: Cell) -> list[float]:
    """mailrelay against Postfix for each repeat both completed: throughput mailrelay /
    Postfix; for latency, Postfix's p50 / mailrelay's (above 1: mailrelay answers sooner)."""
    by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r["cell"] == cell.key and r["ok"]:
            by_repeat.setdefault(r["repeat"], {})[r["relay"]] = r
    ratios = []
    for pair in by_repeat.values():
        if "mailrelay" in pair and "postfix" in pair:
            mr, pf = pair["mailrelay"], pair["postfix"]
            if cell.phase == "latency":
                ratios.append(round(pf["latency_p50_ms"] / mr["latency_p50_ms"], 3))
            else:
                ratios.append(round(mr["msgs_per_s"] / pf["msgs_per_s"], 3))
    return ratios


def fmt_rate(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    if cell["msgs_per_s"] is None:
        return "no delivery" if cell.get("note") else ("failed" if cell["runs"] else "n/a")
    s = f"{cell['msgs_per_s']:.1f}"
    if cell["spread"] is not None:
        s += f" ±{cell['spread'] * 50:.0f}%"  # half the max-min range, of the median
    if cell["ok_runs"] < cell["runs"]:
        s += f" ({cell['ok_runs']}/{cell['runs']} ok)"
    return s


def fmt_num(n: float | None, digits: int = 2) -> str:
    return "-" if n is None else f"{n:.{digits}f}"


def fmt_mib(n: int | None) -> str:
    return f"{n / (1024 * 1024):.1f}" if n else "-"


def fmt_latency(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("latency_p50_ms") is None:
        return "-"
    return f"{cell['latency_p50_ms']:.2f}/{cell['latency_p99_ms']:.2f}"


def fmt_busiest(cell: dict[str, Any] | None) -> str:
    """The busiest process's share of one core, and its name: C{"97% twistd"}."""
    if not cell or cell.get("busiest_core_share") is None:
        return "-"
    return f"{cell['busiest_core_share'] * 100:.0f}% {cell['busiest_process']}"


#: The table's columns, in order.
COLUMNS = ["phase", "size", "sess", "msg/conn", "msgs", "mailrelay msg/s", "postfix msg/s",
           "ratio", "ratio min-max", "target", "mr CPU ms/msg", "pf CPU ms/msg",
           "mr busiest", "mr p50/p99 ms", "pf p50/p99 ms", "mr RSS MiB", "pf RSS MiB", "PSS ratio"]


def print_aligned(table: list[list[str]], right_from: int) -> None:
    """Rows of cells in columns, the header underlined; columns from C{right_from} on are
    right-aligned."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print()
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) if j >= right_from else c.ljust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_memory_table(row: dict[str, Any], relays: list[str]) -> None:
    """The memory row as two lines, base and per session, each relay's figure and
    mailrelay's target."""
    def figure(relay: str, key: str, scale: int, unit: str) -> str:
        cell = row.get(relay)
        if not cell:
            return "-"
        if cell[key] is None:
            return "failed" if cell["runs"] else "n/a"
        text = f"{cell[key] / scale:.1f}"
        if key == "per_session_bytes":
            text += f" ({cell['sessions']} {unit})"
        return text

    def target(met_key: str, limit: str) -> str:
        met = row.get(met_key)
        return f"<={limit} " + ("?" if met is None else "met" if met else "MISSED")

    session_unit = {"mailrelay": "sessions", "postfix": "smtpd, its process limit"}
    table = [["memory", *relays, "target (mailrelay)"],
             ["base PSS MiB, no session", *[figure(r, "base_pss_bytes", 1024 * 1024, "")
                                            for r in relays],
              target("base_target_met", f"{TARGET_BASE_PSS // (1024 * 1024)} MiB")],
             ["  of it anonymous", *[figure(r, "base_pss_anon_bytes", 1024 * 1024, "")
                                     for r in relays], ""],
             ["PSS KiB per idle session", *[figure(r, "per_session_bytes", 1024,
                                                   session_unit[r]) for r in relays],
              target("per_session_target_met", f"{TARGET_SESSION_PSS // 1024} KiB")]]
    print_aligned(table, 1)


def print_table(rows: list[dict[str, Any]], relays: list[str]) -> None:
    both = "mailrelay" in relays and "postfix" in relays
    table = [COLUMNS]
    for row in rows:
        if row["phase"] == "memory":
            continue
        mr, pf = row.get("mailrelay"), row.get("postfix")
        ratio = row.get("ratio")
        if ratio is not None:
            target_s = f">={row['target_ratio']:g} " + ("met" if row["target_met"] else "MISSED")
            spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
        else:
            target_s, spread = (f">={row['target_ratio']:g} ?" if both else "-"), "-"
        table.append([
            row["phase"], row["size_label"], str(row["sessions"]), str(row["per_conn"]),
            str(row["messages"]), fmt_rate(mr), fmt_rate(pf), fmt_num(ratio), spread, target_s,
            fmt_num(mr and mr["cpu_ms_per_msg"], 3), fmt_num(pf and pf["cpu_ms_per_msg"], 3),
            fmt_busiest(mr), fmt_latency(mr), fmt_latency(pf), fmt_mib(mr and mr["rss_peak_bytes"]),
            fmt_mib(pf and pf["rss_peak_bytes"]), fmt_num(row.get("pss_ratio")),
        ])
    if len(table) > 1:
        print_aligned(table, 2)
    for row in rows:
        if row["phase"] == "memory":
            print_memory_table(row, relays)
    print()
    for row in rows:
        for relay in relays:
            cell = row.get(relay)
            if not cell:
                continue
            if cell.get("note"):
                print(f"{relay} {row['cell']}: {cell['note']}")
            elif cell["errors"]:
                print(f"{relay} {row['cell']}: "
                      + "; ".join(e.splitlines()[0][:200] for e in cell["errors"]))


# --------------------------------------------------------------------------------------------
# main


def versions(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        info["mailrelay"] = version("mailrelay")
    with contextlib.suppress(Exception):
        info["mailrelay_git"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    with contextlib.suppress(Exception):
        out = subprocess.run([POSTCONF, "-d", "-h", "mail_version"], check=False,
                             capture_output=True,
                             text=True, timeout=10).stdout.strip()
        info["postfix"] = out
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark mailrelay against Postfix (run as root: Postfix needs it).",
    )
    p.add_argument("--sizes", default=None,
                   help="message payload sizes, comma-separated (default: 4k,100k,1m; "
                   "--quick: 4k,1m)")
    p.add_argument("--messages", type=int, default=None,
                   help="messages per run of one message per connection, for every size "
                   "(default: 2000 for sizes up to 8k, 1000 up to 256k, 200 above; --quick: "
                   "100/50/20); at least one per session")
    p.add_argument("--sessions", default="10,100",
                   help="parallel SMTP sessions of smtp-source, comma-separated (default: 10,100)")
    p.add_argument("--per-conn", default="1,100",
                   help="messages per connection, comma-separated: 1, or N (smtp-source -d, "
                   "at most 5 runs' worth of messages in all) (default: 1,100)")
    p.add_argument("--burst", default="100,500",
                   help="the burst rows: concurrent one-message connections of 4k on the "
                   "shipped defaults, comma-separated (default: 100,500)")
    p.add_argument("--idle-sessions", type=int, default=None,
                   help="the memory row's idle sessions (greeting and EHLO, then nothing) held "
                   "by mailrelay at once; Postfix holds as many as its smtpd process limit "
                   "(default: 5000, --quick: 1000)")
    p.add_argument("--latency-messages", type=int, default=None,
                   help="messages of the latency client, one after the other on one "
                   "connection (default: 200, --quick: 30)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per relay and cell, alternated; median reported (default: 3, "
                   "--quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="4k and 1m, fewer messages, one repeat, shorter waits: a few minutes")
    p.add_argument("--relays", default="mailrelay,postfix",
                   help="which relays (default: mailrelay,postfix)")
    p.add_argument("--phases", default="e2e,accept,latency,burst,memory",
                   help="which measurements (default: e2e,accept,latency,burst,memory)")
    p.add_argument("--workdir", default="/var/tmp",
                   help="where the spools and Postfix's instance go, in a fresh directory removed "
                   "at exit; keep it on a disk file system, not tmpfs, so fsync costs what it "
                   "costs (default: /var/tmp)")
    p.add_argument("--output", default=None,
                   help="JSON results file (default: bench/results-<UTC timestamp>.json)")
    p.add_argument("--twistd", default=str(Path(sys.executable).with_name("twistd")),
                   help="the twistd with mailrelay installed (default: next to this python)")
    p.add_argument("--postfix-param", action="append", default=[], metavar="NAME=VALUE",
                   help="extra main.cf setting for the Postfix peer (repeatable), "
                   "e.g. in_flow_delay=0")
    p.add_argument("--config-budget", type=float, default=600.0,
                   help="seconds allowed for all runs of one relay/size/phase (default: 600)")
    p.add_argument("--stall-timeout", type=float, default=None,
                   help="give up an e2e run when the sink count has not moved for this long "
                   "(default: 60, --quick: 20)")
    p.add_argument("--delivery-probe", type=float, default=None,
                   help="mailrelay e2e: seconds after smtp-source is done with no message at the "
                   "sink before reporting 'delivery not available' (default: 30, --quick: 10)")
    p.add_argument("--rss-interval", type=float, default=0.1,
                   help="RSS sampling interval in seconds (default: 0.1)")
    p.add_argument("--mailrelay-processes", default="1", metavar="N|auto",
                   help="mailrelay's [relay] processes (acceptor processes; default 1)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (spools, Postfix config, logs) for debugging")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = "4k,1m" if args.quick else "4k,100k,1m"
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.latency_messages is None:
        args.latency_messages = 30 if args.quick else 200
    if args.idle_sessions is None:
        args.idle_sessions = 1000 if args.quick else 5000
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        args.session_list = [int(x) for x in args.sessions.split(",") if x.strip()]
        args.per_conn_list = [int(x) for x in args.per_conn.split(",") if x.strip()]
        args.burst_list = [int(x) for x in args.burst.split(",") if x.strip()]
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if min(args.session_list + args.per_conn_list + args.burst_list + [1]) < 1:
        p.error("--sessions, --per-conn and --burst take numbers >= 1")
    args.relay_list = [r.strip() for r in args.relays.split(",") if r.strip()]
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not args.size_list or set(args.relay_list) - {"mailrelay", "postfix"} or not args.relay_list:
        p.error("--relays takes mailrelay and/or postfix; --sizes at least one size")
    if set(args.phase_list) - set(PHASES) or not args.phase_list:
        p.error(f"--phases takes some of {', '.join(PHASES)}")
    if args.repeat < 1 or args.latency_messages < 1 or args.idle_sessions < 1 or (
            args.messages is not None and args.messages < 1):
        p.error("--repeat, --latency-messages, --idle-sessions and --messages must be >= 1")
    if args.stall_timeout is None:
        args.stall_timeout = 20.0 if args.quick else 60.0
    if args.delivery_probe is None:
        args.delivery_probe = 10.0 if args.quick else 30.0
    args.config_budget = min(args.config_budget, 600.0)
    for item in args.postfix_param:
        if "=" not in item:
            p.error(f"--postfix-param wants NAME=VALUE, not {item!r}")
    return args


def check_prerequisites(args: argparse.Namespace) -> None:
    missing = [x for x in (SMTP_SOURCE, SMTP_SINK) if not os.access(x, os.X_OK)]
    if "postfix" in args.relay_list:
        missing += [x for x in (POSTFIX, POSTCONF) if not os.access(x, os.X_OK)]
        missing += [str(x) for x in (POSTFIX_PROTO, POSTFIX_MASTER) if not x.exists()]
        if os.geteuid() != 0:
            raise SystemExit("bench/run.py: run it as root: Postfix needs root to start "
                             "(or use --relays mailrelay)")
    if "mailrelay" in args.relay_list and not os.access(args.twistd, os.X_OK):
        missing.append(args.twistd)
    if missing:
        raise SystemExit("bench/run.py: missing " + ", ".join(missing)
                         + " (apt-get install postfix; pip install -e . in the venv)")


def _on_signal(signum: int, frame: Any) -> None:
    # Once: further signals must not cut the clean-up (stopping Postfix, ...) short.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_prerequisites(args)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output) if args.output else HERE / f"results-{stamp}.json"
    classes = {"mailrelay": Mailrelay, "postfix": Postfix}
    relays = args.relay_list
    runs: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    started = time.monotonic()
    interrupted = None

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-bench-", dir=args.workdir))
    os.chmod(workdir, 0o755)  # Postfix's daemons (user postfix) must reach their queue
    log(f"work directory {workdir}; results to {output}")
    all_cells = cells(args)
    try:
        n = 0
        for cell in all_cells:
            phase, messages = cell.phase, cell.messages
            spent = {r: 0.0 for r in relays}  # each relay's own time on this cell
            for rep in range(args.repeat):
                for relay in relays:
                    key = f"{relay}:{phase}"
                    if key in notes:
                        continue
                    remaining = args.config_budget - spent[relay]
                    if remaining < 5:
                        log(f"{relay} {cell.key}: time budget used up, "
                            "skipping the remaining repeats")
                        continue
                    n += 1
                    run_id = f"{n:03d}"
                    load = "" if phase == "memory" else f" x{messages}"
                    log(f"run {run_id}: {relay} {cell.key}{load} "
                        f"repeat {rep + 1}/{args.repeat}")
                    probe = machine_phase(workdir)
                    t0 = time.monotonic()
                    runner = run_memory if phase == "memory" else run_once
                    try:
                        res = runner(args, workdir, classes[relay], cell, t0 + remaining,
                                     run_id)
                    except BenchError as e:
                        res = {"relay": relay, "phase": phase, "size": cell.size,
                               "cell": cell.key, "messages": messages, "ok": False,
                               "error": str(e)}
                    res["repeat"] = rep + 1
                    res["machine_phase"] = probe
                    res["wall_seconds"] = round(time.monotonic() - t0, 2)
                    spent[relay] += time.monotonic() - t0
                    runs.append(res)
                    if res["ok"] and phase == "memory":
                        log(f"  base {fmt_mib(res['base_pss_bytes'])} MiB PSS, "
                            f"{res['per_session_bytes'] / 1024:.1f} KiB PSS per session "
                            f"({res['sessions']} sessions)")
                    elif res["ok"]:
                        log(f"  {res['msgs_per_s']} msg/s ({res['seconds']:.2f}s), peak RSS "
                            f"{fmt_mib(res.get('rss_peak_bytes'))} MiB")
                    else:
                        log(f"  FAILED: {res['error'].splitlines()[0][:300]}")
                        if res.get("delivery_unavailable"):
                            notes[key] = ("mailrelay: delivery not available (no message "
                                          f"reached smtp-sink within {args.delivery_probe:g}s "
                                          "of the last 250); e2e skipped")
                            log("  " + notes[key])
                        elif "did not start" in res["error"]:
                            log("  " + res["error"].replace("\n", "\n  ")[:3000])
    except (KeyboardInterrupt, SystemExit) as e:
        interrupted = f"interrupted (exit code {getattr(e, 'code', 130)})"
        log(interrupted + ": cleaning up")
    finally:
        if args.keep:
            log(f"keeping {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = summarize(runs, relays, all_cells, notes)
    report = {
        "timestamp": stamp,
        "argv": sys.argv,
        "settings": {k: v for k, v in vars(args).items()},
        "environment": versions(args),
        "total_seconds": round(time.monotonic() - started, 1),
        "interrupted": interrupted,
        "notes": notes,
        "summary": rows,
        "runs": runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(rows, relays)
    if any(row["phase"] != "memory" for row in rows):
        print("msg/s: median of the repeats, ± half their range; ratio: mailrelay/Postfix of "
              "each repeat's pair (latency: Postfix p50 / mailrelay p50), median and min-max; "
              "CPU: user+system ms per message of all the relay's processes, every thread (and "
              "their reaped children) from /proc; mr busiest: the mailrelay process that used "
              "the most CPU, as a share of one core over the run (near 100%: that process, one "
              "core's worth under Python's GIL, is what bounds the rate); p50/p99: "
              "end-of-data -> 250 of one client, ms.")
        print(f"RSS: peak of the summed resident set, sampled every {args.rss_interval:g}s; "
              "mailrelay = the twistd process and its descendants (fork server, delivery "
              "process), postfix = its "
              "smtpd+cleanup+qmgr+smtp processes "
              "(shared pages counted once per process, so Postfix's sum overstates it); "
              "PSS ratio: the same with proportional set sizes (shared pages divided among "
              "their sharers).")
    if any(row["phase"] == "memory" for row in rows):
        print("memory: summed PSS (smaps_rollup) of all the relay's processes once idle, "
              "medians of the repeats; base: just started, no session (mailrelay: twistd and "
              "its descendants, the fork server and delivery process; Postfix: master, "
              "qmgr, pickup, ... without smtpd); per "
              "idle session: (PSS with the sessions - base) / sessions, each session having "
              "had its greeting and EHLO reply; Postfix serves at most its smtpd process "
              "limit (default_process_limit) at once, one smtpd each, so it gets that many. "
              "Anonymous: the processes' own memory; the rest is their share of mapped files "
              "(libpython, OpenSSL, ...), divided among every process of the machine mapping "
              "them, so it varies with what else runs.")
    phases = phase_summary(runs)
    if phases:
        print(phases)
    if interrupted:
        print(f"{interrupted}: the table has the runs completed before")
    print(f"total {report['total_seconds']}s; results written to {output}")
    if interrupted:
        return 130
    return 0 if any(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
