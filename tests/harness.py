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
from typing import Any

import pytest

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (\S+):(\d+) \(")


def requireTool(name: str, package: str | None = None) -> str:
    """The path of a system tool; skips the test (visibly) when missing, fails under CI.

    @param package: the Debian package that has it (default: swaks or postfix)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        package = package or ("swaks" if name == "swaks" else "postfix")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


class RelayProcess:
    """One C{twistd -n mailrelay} process.

    @ivar directory: its working directory (config, spool and log live here).
    @ivar ports: the ports it listens on, in listener order.
    """

    def __init__(self, directory: Path, config: str | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, defaults: bool = True, listeners: int = 1,
                 hold: bool = False, systemdSocket: Any = None,
                 twistdArgs: tuple[str, ...] = ()) -> None:
        """
        @param twistdArgs: twistd's own options (C{--rundir DIR}), before C{mailrelay}.
        @param systemdSocket: a listening socket passed to the relay as systemd's socket
            activation does (file descriptor 3, C{LISTEN_PID}, C{LISTEN_FDS=1},
            C{LISTEN_FDNAMES=smtp}), for a C{systemd:domain=...:index=0} (or C{name=smtp})
            listener.
        """
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
        self.systemdSocket = systemdSocket
        self.twistdArgs = twistdArgs
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
        cmd = [TWISTD, "-n", "--pidfile=", *self.twistdArgs, "mailrelay"]
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
        cmd += list(self.args)
        if self.systemdSocket is not None:
            # (bash keeps its process id through exec: LISTEN_PID is the relay's; sh takes
            # descriptors of one digit only.)
            fd = self.systemdSocket.fileno()
            move = f"3<&{fd}" + (f" {fd}<&-" if fd != 3 else "")
            cmd = ["/bin/bash", "-c", f'exec {move}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=smtp exec "$0" "$@"',
                   *cmd]
        return cmd

    def start(self, timeout: float = 30.0) -> "RelayProcess":
        env = dict(os.environ)
        env.update(self.env or {})
        self._logOffset = self.logPath.stat().st_size if self.logPath.exists() else 0
        log = open(self.logPath, "ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=() if self.systemdSocket is None else (self.systemdSocket.fileno(),),
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

    def published(self, timeout: float = 10.0) -> Path:
        """The file naming its listeners that the relay writes in its spool
        (L{mailrelay.app.published}) once started: a moment after its "listening on" lines,
        which L{start} waits for."""
        path = self.spool / "listeners.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} not written in {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        return path

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


def stopProcess(p: subprocess.Popen[bytes] | None) -> None:
    """Stop C{p} (when running): SIGTERM, then SIGKILL after 10 seconds."""
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def fired(d: Any) -> Any:
    """The result of C{d}, a Deferred that has fired (or C{d} itself, when no Deferred)."""
    from twisted.internet.defer import Deferred

    if not isinstance(d, Deferred):
        return d
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def freePort(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot report the port they
    got); callers should retry when the server then fails to bind it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# A tiny authoritative DNS server (twisted.names) for end-to-end tests, run as a subprocess
# (a reactor in a thread of pytest is fragile).  argv[1] is JSON: {"origin": "test",
# "records": [[name, TYPE, *args of dns.Record_TYPE]]}; a null MX is ["x.test", "MX", 0, ""].
# Names of the origin's zone without records are NXDOMAIN; names with records but none of the
# type asked are NODATA; [name, "SERVFAIL"] or [name, "REFUSED"] answers that code for the
# name, for every name when it is "*"; [name, "TRUNCATE"] answers the name's queries over UDP
# truncated (TC, no records), over TCP (the same port) whole.  [name, "TLSA", usage, selector,
# matching type, hex data] is a TLSA record (RFC 6698).  Answers about the names of "ad" (all
# for "*") have the AD bit (as a validating resolver's: DNSSEC-valid), when the query asked
# for it (RFC 6840 5.7).  It prints "port N" when listening, then "query NAME TYPE" for each
# query it answers ("tcp" first over TCP; "ad" first when the query has the AD bit).
_DNS_SERVER_SCRIPT = r"""
import json, sys
from twisted.internet import defer, reactor
from twisted.names import authority, dns, server

spec = json.loads(sys.argv[1])

class Refused(Exception):
    pass

class Record_TLSA(dns.UnknownRecord):
    TYPE = 52

    def __init__(self, usage, selector, matchingType, data, ttl=None):
        super().__init__(bytes([usage, selector, matchingType]) + bytes.fromhex(data), ttl)

dns.Record_TLSA = Record_TLSA
secure = {name.lower().encode("ascii") for name in spec.get("ad", ())}

class Zone(authority.FileAuthority):
    def loadFile(self, filename):
        origin = spec["origin"].encode("ascii")
        soa = dns.Record_SOA(mname=b"ns." + origin, rname=b"hostmaster." + origin, serial=1,
                             refresh=60, retry=60, expire=60, minimum=60)
        self.soa = (origin, soa)
        self.records = {origin: [soa]}
        self.failing = {}
        for name, rtype, *args in spec["records"]:
            if rtype == "ANSWERFOR":  # (a name whose queries are answered as another's)
                answerFor[name.lower().encode("ascii")] = args[0].encode("ascii")
                continue
            if rtype in ("SERVFAIL", "REFUSED", "TRUNCATE", "TRUNCATEALL"):  # (queries fail)
                self.failing[name.lower().encode("ascii")] = rtype
                continue
            args = [a.encode("ascii") if isinstance(a, str) and rtype not in ("A", "AAAA", "TLSA")
                    else a for a in args]
            record = getattr(dns, "Record_" + rtype)(*args)
            self.records.setdefault(name.lower().encode("ascii"), []).append(record)

    def _lookup(self, name, cls, type, timeout=None):
        print("query", name.decode("ascii", "replace").lower(), dns.QUERY_TYPES.get(type, type),
              flush=True)
        failing = self.failing.get(name.lower(), self.failing.get(b"*"))
        if failing == "REFUSED":
            return defer.fail(Refused())
        if failing == "SERVFAIL":
            return defer.fail(RuntimeError("SERVFAIL"))
        return super()._lookup(name, cls, type, timeout)

class Factory(server.DNSServerFactory):
    def handleQuery(self, message, protocol, address):
        if address is None:
            print("tcp", flush=True)
        if message.authenticData:
            print("ad", flush=True)
            askedAD.add(message.id)
        for query in message.queries:
            other = answerFor.get(query.name.name.lower())
            if other is not None:
                print("query", query.name.name.decode("ascii", "replace").lower(),
                      dns.QUERY_TYPES.get(query.type, query.type), flush=True)
                query.name = dns.Name(other)
        return super().handleQuery(message, protocol, address)

    def sendReply(self, protocol, message, address):
        name = message.queries[0].name.name.lower() if message.queries else b""
        message.authenticData = int(message.id in askedAD
                                    and (name in secure or b"*" in secure))
        askedAD.discard(message.id)
        failing = zone.failing.get(name)
        if failing == "TRUNCATEALL" or (address is not None and failing == "TRUNCATE"):
            message.trunc = 1
            if address is not None:
                message.answers, message.authority, message.additional = [], [], []
        return super().sendReply(protocol, message, address)

    def gotResolverError(self, failure, protocol, message, address):
        if not failure.check(Refused):
            return super().gotResolverError(failure, protocol, message, address)
        response = self._responseFromMessage(message=message, rCode=dns.EREFUSED)
        self.sendReply(protocol, response, address)

askedAD = set()
answerFor = {}
zone = Zone(None)
factory = Factory(authorities=[zone])
for attempt in range(20):  # (a UDP port whose TCP twin is free)
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    try:
        reactor.listenTCP(port.getHost().port, factory, interface="127.0.0.1")
        break
    except Exception:
        port.stopListening()
else:
    sys.exit("no UDP port with its TCP twin free")
print("port", port.getHost().port, flush=True)
reactor.run()
"""


class DNSServer:
    """L{_DNS_SERVER_SCRIPT} on 127.0.0.1 (UDP and TCP), in a subprocess.  C{records} are
    C{[name, type, *arguments]} (C{Record_<type>}'s); C{[name, "SERVFAIL"]} (or
    C{"REFUSED"}) makes every query of C{name} (of every name for C{"*"}) answer that code;
    C{[name, "TRUNCATE"]} truncates its answers over UDP (TC: ask again over TCP);
    C{[name, "TRUNCATEALL"]} too, and its answers over TCP say they are truncated (TC);
    C{[name, "ANSWERFOR", other]} answers the queries of C{name} as those of C{other}, their
    question too (an answer to another question);
    C{[name, "TLSA", usage, selector, matchingType, hexData]} is a TLSA record.  The answers
    about the names of C{ad} (every name for C{"*"}) have the AD bit when asked for it, as a
    validating resolver's.

    @ivar port: the UDP port it answers on.
    """

    def __init__(self, directory: Path, origin: str, records: list[list],
                 ad: tuple[str, ...] = ()) -> None:
        import json

        directory.mkdir(parents=True, exist_ok=True)
        self.logPath = directory / "dns.log"
        with open(self.logPath, "wb") as log:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-c", _DNS_SERVER_SCRIPT,
                 json.dumps({"origin": origin, "records": records, "ad": list(ad)})],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = re.search(r"^port (\d+)$", self.log(), re.MULTILINE)
            if m:
                self.port = int(m.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log()
        self.stop()
        raise AssertionError(f"the DNS server did not start:\n{text}")

    def log(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def queries(self) -> list[tuple[str, str]]:
        """The C{(name, type)} of every query answered so far."""
        found = re.finditer(r"^query (\S+) (\S+)$", self.log(), re.MULTILINE)
        return [(m.group(1), m.group(2)) for m in found]

    def stop(self) -> None:
        p, self.process = self.process, None
        stopProcess(p)


class RedisServer:
    """A C{redis-server} of its own on a free 127.0.0.1 port, with its own directory, no
    persistence, and a password when given; skipped (visibly) when the Debian package
    redis-server is not installed, a failure under CI (.ci/run installs it).

    @ivar port: the TCP port it listens on.
    """

    def __init__(self, directory: Path, password: str | None = None) -> None:
        server = requireTool("redis-server", "redis-server")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.password = password
        self.logPath = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        for _ in range(5):  # another process may take the free port first
            self.port = freePort()
            command = [server, "--port", str(self.port), "--bind", "127.0.0.1",
                       "--dir", str(directory), "--save", "", "--appendonly", "no",
                       "--daemonize", "no", "--logfile", str(self.logPath)]
            if password is not None:
                command += ["--requirepass", password]
            self.logPath.unlink(missing_ok=True)
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.process.poll() is None:
                if "Ready to accept connections" in self.log():
                    return
                time.sleep(0.05)
            self.stop()
        raise AssertionError(f"redis-server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def stop(self) -> None:
        p, self.process = self.process, None
        stopProcess(p)
