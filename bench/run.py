#!/usr/bin/env python3
"""Benchmark mailrelay against Postfix, side by side, on this machine.

Two measurements, for each message size:

  e2e     smtp-source -> relay -> smtp-sink, one message per connection, timed from the
          start of smtp-source until the sink has received every message;
  accept  smtp-source -> relay with several messages per connection (smtp-source -d),
          timed until smtp-source has had every "250 queued" reply (the relay still
          delivers to a running smtp-sink in the background, as it would in service).

Relays: mailrelay (twistd, --smarthost [127.0.0.1]:SINK) and a private Postfix instance
(its own config, queue and data directories, relayhost=[127.0.0.1]:SINK), each started
fresh for every run and stopped after it.  Runs alternate (mailrelay, postfix, mailrelay,
postfix, ...) and the median of --repeat runs is reported, with the ratio
mailrelay/postfix, and the peak resident memory of the relay's processes.

Run as root (Postfix needs it):

    /work/venv/bin/python bench/run.py [--sizes 4k,100k,1m] [--messages N]
                                       [--sessions 10] [--repeat 2] [--quick]

See bench/README.md.  Results also go to bench/results-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
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

#: Messages per run by size when --messages is not given: (normal, --quick).
DEFAULT_MESSAGES = [
    (8 * 1024, 2000, 300),
    (256 * 1024, 1000, 150),
    (None, 200, 20),
]

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


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat utime + stime); 0.0 when
    it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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

    def __init__(self, args: argparse.Namespace, workdir: Path, sink_port: int, run_id: str):
        self.args = args
        self.port = free_port()
        self.dir = workdir / f"mailrelay-{run_id}"
        self.sink_port = sink_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.logpath = self.dir / "mailrelay.log"

    def __enter__(self) -> Self:
        self.dir.mkdir(parents=True)
        cmd = [
            self.args.twistd, "-n", "--pidfile=", "mailrelay",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--spool", str(self.dir / "spool"),
            "--hostname", RELAY_NAME,
            "--smarthost", f"[127.0.0.1]:{self.sink_port}",
        ]
        self._log = open(self.logpath, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_smtp_ready(self.port, time.monotonic() + 60, lambda: self.proc.poll() is None)
        except BenchError as e:
            self.__exit__(None, None, None)
            raise BenchError(f"mailrelay did not start: {e}\n{tail(self.logpath)}") from None
        return self

    def rss_groups(self) -> dict[str, list[tuple[int, str, int]]]:
        """The twistd process and its children (the delivery process)."""
        assert self.proc is not None
        root = self.proc.pid
        st = proc_stat(root)
        procs = [(root, st[0], st[2])] if st else []
        for pid in all_pids():
            if pid != root:
                child = proc_stat(pid)
                if child is not None and child[1] == root:
                    procs.append((pid, child[0], child[2]))
        return {"relay": procs, "all": procs}

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

    def __init__(self, args: argparse.Namespace, workdir: Path, sink_port: int, run_id: str):
        self.args = args
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
# one run


def run_once(args: argparse.Namespace, workdir: Path, relay_cls: type, phase: str, size: int,
             messages: int, deadline: float, run_id: str) -> dict[str, Any]:
    """One measurement: fresh sink, fresh relay, smtp-source, stop everything."""
    result: dict[str, Any] = {
        "relay": relay_cls.name, "phase": phase, "size": size, "messages": messages,
        "sessions": args.sessions, "ok": False,
    }
    with Sink(workdir) as sink, relay_cls(args, workdir, sink.port, run_id) as relay:
        cmd = [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(messages), "-l", str(size),
               "-f", SENDER, "-t", RECIPIENT, "-M", CLIENT_NAME]
        if phase == "accept":
            cmd.append("-d")  # keep each connection open for the next message
        cmd.append(f"127.0.0.1:{relay.port}")
        result["command"] = " ".join(cmd)
        sink.expect(messages)
        with RssSampler(relay.rss_groups, args.rss_interval) as sampler:
            start = time.monotonic()
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
            source_done = time.monotonic()
            result["source_seconds"] = round(source_done - start, 4)
            result["source_rc"] = src.returncode
            result["source_output"] = out.decode("utf-8", "replace")[-2000:]
            result["delivered_when_source_done"] = sink.count
            if "error" not in result and src.returncode != 0:
                result["error"] = f"smtp-source exited {src.returncode}: " + \
                    out.decode("utf-8", "replace").strip()[-300:]
            if "error" not in result:
                if phase == "accept":
                    result["seconds"] = result["source_seconds"]
                    result["ok"] = True
                else:
                    first = args.delivery_probe if relay_cls is Mailrelay else None
                    state = sink.wait(deadline, args.stall_timeout, first)
                    result["sink_count"] = sink.count
                    if state == "done":
                        assert sink.target_time is not None
                        result["seconds"] = round(sink.target_time - start, 4)
                        result["ok"] = True
                    elif state == "stalled" and sink.count == 0:
                        result["error"] = "no message reached the sink"
                        result["delivery_unavailable"] = True
                    else:
                        result["error"] = (f"sink {state} at {sink.count}/{messages} messages "
                                           f"after {time.monotonic() - start:.1f}s")
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
    return result


# --------------------------------------------------------------------------------------------
# reporting


def target_ratio(size: int) -> float:
    return 1.5 if size < 100 * 1024 else 1.0


def summarize(runs: list[dict[str, Any]], relays: list[str], sizes: list[int],
              phases: list[str], notes: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for phase in phases:
        for size in sizes:
            row: dict[str, Any] = {"phase": phase, "size": size, "size_label": size_label(size),
                                   "target_ratio": target_ratio(size)}
            for relay in relays:
                mine = [r for r in runs if r["relay"] == relay and r["phase"] == phase
                        and r["size"] == size]
                good = [r for r in mine if r["ok"]]
                # memory of completed runs only: a failed run did not do the same work
                rss = [r["rss_peak_bytes"] for r in good if r.get("rss_peak_bytes")]
                rss_all = [r["rss_peak_all_bytes"] for r in good if r.get("rss_peak_all_bytes")]
                pss = [r["pss_peak_bytes"] for r in good if r.get("pss_peak_bytes")]
                row[relay] = {
                    "runs": len(mine),
                    "ok_runs": len(good),
                    "msgs_per_s_all": [r["msgs_per_s"] for r in good],
                    "msgs_per_s": (round(statistics.median(r["msgs_per_s"] for r in good), 2)
                                   if good else None),
                    "rss_peak_bytes": max(rss) if rss else None,
                    "rss_peak_all_bytes": max(rss_all) if rss_all else None,
                    "pss_peak_bytes": max(pss) if pss else None,
                    "messages": mine[0]["messages"] if mine else None,
                    "errors": sorted({r["error"] for r in mine if r.get("error")}),
                }
                note = notes.get(f"{relay}:{phase}")
                if note:
                    row[relay]["note"] = note
            if "mailrelay" in row and "postfix" in row:
                a, b = row["mailrelay"], row["postfix"]
                row["ratio"] = (round(a["msgs_per_s"] / b["msgs_per_s"], 3)
                                if a["msgs_per_s"] and b["msgs_per_s"] else None)
                row["rss_ratio"] = (round(a["rss_peak_bytes"] / b["rss_peak_bytes"], 3)
                                    if a["rss_peak_bytes"] and b["rss_peak_bytes"] else None)
                row["pss_ratio"] = (round(a["pss_peak_bytes"] / b["pss_peak_bytes"], 3)
                                    if a["pss_peak_bytes"] and b["pss_peak_bytes"] else None)
                row["target_met"] = (row["ratio"] >= row["target_ratio"]
                                     if row["ratio"] is not None else None)
            rows.append(row)
    return rows


def fmt_rate(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    if cell["msgs_per_s"] is None:
        return "no delivery" if cell.get("note") else ("failed" if cell["runs"] else "n/a")
    s = f"{cell['msgs_per_s']:.1f}"
    if cell["ok_runs"] < cell["runs"]:
        s += f" ({cell['ok_runs']}/{cell['runs']} ok)"
    return s


def fmt_mib(n: int | None) -> str:
    return f"{n / (1024 * 1024):.1f}" if n else "-"


def print_table(rows: list[dict[str, Any]], relays: list[str]) -> None:
    both = "mailrelay" in relays and "postfix" in relays
    head = ["phase", "size", "msgs", "mailrelay msg/s", "postfix msg/s", "ratio", "target",
            "mr RSS MiB", "pf RSS MiB", "RSS ratio", "PSS ratio"]
    table = [head]
    for row in rows:
        mr, pf = row.get("mailrelay"), row.get("postfix")
        msgs = next((c["messages"] for c in (mr, pf) if c and c.get("messages")), None)
        ratio = row.get("ratio")
        if ratio is not None:
            ratio_s = f"{ratio:.2f}"
            target_s = f">={row['target_ratio']:g} " + ("met" if row["target_met"] else "MISSED")
        else:
            ratio_s, target_s = "-", f">={row['target_ratio']:g} ?" if both else "-"
        rr, pr = row.get("rss_ratio"), row.get("pss_ratio")
        table.append([
            row["phase"], row["size_label"], str(msgs or "-"), fmt_rate(mr), fmt_rate(pf),
            ratio_s, target_s, fmt_mib(mr and mr["rss_peak_bytes"]),
            fmt_mib(pf and pf["rss_peak_bytes"]), f"{rr:.2f}" if rr is not None else "-",
            f"{pr:.2f}" if pr is not None else "-",
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) if j >= 2 else c.ljust(w)
                        for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for row in rows:
        for relay in relays:
            cell = row.get(relay)
            if not cell:
                continue
            if cell.get("note"):
                print(f"{relay} {row['phase']} {row['size_label']}: {cell['note']}")
            elif cell["errors"]:
                print(f"{relay} {row['phase']} {row['size_label']}: "
                      + "; ".join(e.splitlines()[0][:200] for e in cell["errors"]))


# --------------------------------------------------------------------------------------------
# main


def messages_for(size: int, args: argparse.Namespace) -> int:
    if args.messages:
        return args.messages
    for limit, normal, quick in DEFAULT_MESSAGES:
        if limit is None or size <= limit:
            return quick if args.quick else normal
    raise AssertionError


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
    p.add_argument("--sizes", default="4k,100k,1m",
                   help="message payload sizes, comma-separated (default: 4k,100k,1m)")
    p.add_argument("--messages", type=int, default=None,
                   help="messages per run, for every size (default: 2000 for sizes up to 8k, "
                   "1000 up to 256k, 200 above; --quick: 300/150/20)")
    p.add_argument("--sessions", type=int, default=10,
                   help="parallel SMTP sessions of smtp-source (default: 10)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs per relay, size and phase, alternated; median reported (default: 2)")
    p.add_argument("--quick", action="store_true",
                   help="fewer messages and shorter waits: a whole run in under 2 minutes")
    p.add_argument("--relays", default="mailrelay,postfix",
                   help="which relays (default: mailrelay,postfix)")
    p.add_argument("--phases", default="e2e,accept",
                   help="which measurements (default: e2e,accept)")
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
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (spools, Postfix config, logs) for debugging")
    args = p.parse_args(argv)
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.relay_list = [r.strip() for r in args.relays.split(",") if r.strip()]
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not args.size_list or set(args.relay_list) - {"mailrelay", "postfix"} or not args.relay_list:
        p.error("--relays takes mailrelay and/or postfix; --sizes at least one size")
    if set(args.phase_list) - {"e2e", "accept"} or not args.phase_list:
        p.error("--phases takes e2e and/or accept")
    if args.repeat < 1 or args.sessions < 1 or (args.messages is not None and args.messages < 1):
        p.error("--repeat, --sessions and --messages must be >= 1")
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
    try:
        n = 0
        for phase in args.phase_list:
            for size in args.size_list:
                messages = messages_for(size, args)
                spent = {r: 0.0 for r in relays}  # each relay's own time on this size
                for rep in range(args.repeat):
                    for relay in relays:
                        key = f"{relay}:{phase}"
                        if key in notes:
                            continue
                        remaining = args.config_budget - spent[relay]
                        if remaining < 5:
                            log(f"{relay} {phase} {size_label(size)}: time budget used up, "
                                "skipping the remaining repeats")
                            continue
                        n += 1
                        run_id = f"{n:03d}"
                        log(f"run {run_id}: {relay} {phase} {size_label(size)} x{messages} "
                            f"({args.sessions} sessions) repeat {rep + 1}/{args.repeat}")
                        t0 = time.monotonic()
                        try:
                            res = run_once(args, workdir, classes[relay], phase, size,
                                           messages, t0 + remaining, run_id)
                        except BenchError as e:
                            res = {"relay": relay, "phase": phase, "size": size,
                                   "messages": messages, "ok": False, "error": str(e)}
                        res["repeat"] = rep + 1
                        res["wall_seconds"] = round(time.monotonic() - t0, 2)
                        spent[relay] += time.monotonic() - t0
                        runs.append(res)
                        if res["ok"]:
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

    rows = summarize(runs, relays, args.size_list, args.phase_list, notes)
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
    print(f"RSS: peak of the summed resident set, sampled every {args.rss_interval:g}s; mailrelay "
          "= the twistd process and its delivery process, postfix = its smtpd+cleanup+qmgr+smtp processes "
          "(shared pages counted once per process, so Postfix's sum overstates it); "
          "PSS ratio: the same with proportional set sizes (shared pages divided among "
          "their sharers).")
    if interrupted:
        print(f"{interrupted}: the table has the runs completed before")
    print(f"total {report['total_seconds']}s; results written to {output}")
    if interrupted:
        return 130
    return 0 if any(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
