"""End-to-end harness: the real C{twistd -n mailrelay} process on a free loopback port.

Each relay listens on C{tcp:0:interface=127.0.0.1}; the port it got is read from its log
("listening on 127.0.0.1:PORT"), so tests never race for ports.  Every process is stopped in
teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (\S+):(\d+) \(")


def requireTool(name: str) -> str:
    """The path of a system tool; skips the test (visibly) when missing, fails under CI."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed (apt-get install {'swaks' if name == 'swaks' else 'postfix'})")
    return path


class RelayProcess:
    """One C{twistd -n mailrelay} process.

    @ivar directory: its working directory (config, spool and log live here).
    @ivar ports: the ports it listens on, in listener order.
    """

    def __init__(self, directory: Path, config: str | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, defaults: bool = True, listeners: int = 1,
                 hold: bool = False) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        if hold:
            # Inbound-only tests: spool, deliver nothing (and so never look up an MX).
            config = "[queue]\nhold = true\n" + (config or "")
        self.configText = config
        self.args = args
        self.env = env
        self.defaults = defaults
        self.listeners = listeners
        self.process: subprocess.Popen[bytes] | None = None
        self.logPath = directory / "relay.log"
        self.ports: list[int] = []
        self._logOffset = 0

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def spool(self) -> Path:
        return self.directory / "spool"

    def command(self) -> list[str]:
        cmd = [TWISTD, "-n", "--pidfile=", "mailrelay"]
        if self.configText is not None:
            path = self.directory / "mailrelay.toml"
            path.write_text(self.configText)
            cmd += ["--config", str(path)]
        if self.defaults:
            # A free port, a spool in the test's directory, a fixed name; args may override.
            for option, value in (("--listen", "tcp:0:interface=127.0.0.1"),
                                  ("--spool", str(self.spool)), ("--hostname", "relay.test")):
                if not any(a.startswith(option) for a in self.args):
                    cmd += [option, value]
        return cmd + list(self.args)

    def start(self, timeout: float = 30.0) -> "RelayProcess":
        env = dict(os.environ)
        env.update(self.env or {})
        self._logOffset = self.logPath.stat().st_size if self.logPath.exists() else 0
        log = open(self.logPath, "ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            found = _LISTENING.findall(text)
            if len(found) >= self.listeners:
                self.ports = [int(p) for _, p in found]
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited with {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"relay did not start listening in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """What the relay logged since its last start."""
        if not self.logPath.exists():
            return ""
        with open(self.logPath, "rb") as f:
            f.seek(self._logOffset)
            return f.read().decode("utf-8", "replace")

    def waitForLog(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.process = None
        return p.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def queued(self) -> list[str]:
        """Committed queue ids in the spool."""
        q = self.spool / "queue"
        return sorted(p.stem for p in q.glob("*.json")) if q.exists() else []

    def connect(self) -> "LineClient":
        return LineClient(self.port)


class LineClient:
    """A raw SMTP client for byte-exact tests."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readReply(self) -> list[bytes]:
        """One complete (possibly multi-line) reply, as lines without CRLF."""
        lines = []
        while True:
            line = self.readLine()
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def expectClosed(self) -> None:
        self.sock.settimeout(10)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()
