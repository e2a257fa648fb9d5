"""End-to-end, outbound: the real C{twistd -n mailrelay} delivering to real next hops.

Next hops: Postfix's C{smtp-sink}, aiosmtpd (SMTP over TCP, LMTP over a UNIX socket) in a
thread of the test process, raw sockets that misbehave, and maildirs.  MX lookups go to a
twisted.names server the tests run on 127.0.0.1 (L{tests.harness.DNSServer}); every relay is
configured with it as its only name server, so no test ever asks the system's resolver.

Assertions are on what arrived at the next hop (byte for byte, compared with the relay's own
spool file where the test can read it first), on the spool, and on the relay's log lines
(C{ID: to=<..>, relay=.., delay=.., attempts=N, status=sent|deferred|bounced (..)},
C{ID: removed}).

To read a message as spooled before it is delivered, a test starts the relay with
C{[queue] hold = true}, submits, reads C{queue/ID.eml}, and restarts the same relay (same
spool) with C{hold = false}.
"""

from __future__ import annotations

import dataclasses
import email
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP

from mailrelay.delivery.protocol import CHUNK_SIZE
from tests.harness import DNSServer, RelayProcess, freePort, requireTool, stopProcess
from tests.test_e2e_ipv6 import _hasIPv6Loopback

# ---------------------------------------------------------------------------------------------
# Next hops


@dataclass
class Received:
    """One transaction a next hop accepted (or, in C{attempts}, saw)."""

    mailFrom: str
    rcptTos: list[str]
    mailOptions: list[str]
    rcptOptions: dict[str, list[str]]
    content: bytes
    peer: Any = None


class Recorder:
    """An aiosmtpd handler that records every transaction and answers as told.

    @ivar rcptReply: C{address -> reply or None} (None: accept).
    @ivar dataReply: C{(Received, attempt number) -> reply}; the reply C{"DROP"} aborts the
        connection instead of answering (after the whole message came in).  For LMTP, a list
        of replies, one per accepted recipient.
    """

    def __init__(self, lmtp: bool = False) -> None:
        self.lmtp = lmtp
        self.cond = threading.Condition()
        self.accepted: list[Received] = []
        self.attempts: list[Received] = []
        self.rcptReply: Callable[[str], str | None] = lambda address: None
        self.dataReply: Callable[[Received, int], Any] = lambda received, n: (
            ["250 2.0.0 delivered"] * len(received.rcptTos) if self.lmtp else "250 2.0.0 OK"
        )

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcptReply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        if not hasattr(envelope, "perRcptOptions"):
            envelope.perRcptOptions = {}
        envelope.perRcptOptions[address] = list(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        received = Received(
            envelope.mail_from, list(envelope.rcpt_tos), list(envelope.mail_options),
            dict(getattr(envelope, "perRcptOptions", {})), bytes(envelope.original_content),
            session.peer,
        )
        with self.cond:
            self.attempts.append(received)
            n = len(self.attempts)
        reply = self.dataReply(received, n)
        if reply == "DROP":
            server.transport.abort()  # no reply at all; writes after this are discarded
            return "451 4.0.0 (never sent: the connection is gone)"
        if self.lmtp:
            ok = [r for r, text in zip(received.rcptTos, reply) if text.startswith("2")]
            reply = "\r\n".join(reply)
        else:
            ok = received.rcptTos if reply.startswith("2") else []
        if ok:
            with self.cond:
                self.accepted.append(dataclasses.replace(received, rcptTos=ok))
                self.cond.notify_all()
        return reply

    def waitFor(self, predicate: Callable[[list[Received]], bool], timeout: float = 15.0,
                what: str = "") -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.accepted):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"next hop: {what or predicate} not seen in {timeout}s; "
                                         f"accepted: {self.accepted!r}")
                self.cond.wait(min(left, 0.2))
            return list(self.accepted)

    def to(self, address: str) -> list[Received]:
        with self.cond:
            return [m for m in self.accepted if address in m.rcptTos]

    def waitTo(self, address: str, count: int = 1, timeout: float = 15.0) -> list[Received]:
        self.waitFor(lambda acc: sum(address in m.rcptTos for m in acc) >= count, timeout,
                     f"{count} message(s) to <{address}>")
        return self.to(address)


class _TCPController(Controller):
    """aiosmtpd on 127.0.0.1; with C{port=0} it takes a free port and reports it."""

    def _trigger_server(self) -> None:
        if self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _LMTPController(UnixSocketController):
    def factory(self) -> Any:
        return LMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def nexthop(tmp_path: Path):
    """C{nexthop(port=0, lmtp=False, host="127.0.0.1")}: a started aiosmtpd next hop:
    C{(Recorder, where)} with C{where} the port (SMTP, on C{host}) or socket path (LMTP).
    Stopped in teardown."""
    controllers: list[Any] = []

    def start(port: int = 0, lmtp: bool = False,
              host: str = "127.0.0.1") -> tuple[Recorder, Any]:
        handler = Recorder(lmtp)
        if lmtp:
            path = tmp_path / f"lmtp{len(controllers)}.sock"
            controller: Any = _LMTPController(handler, unix_socket=str(path), ready_timeout=10)
        else:
            controller = _TCPController(handler, hostname=host, port=port, ready_timeout=10)
        controller.start()
        controllers.append(controller)
        return handler, (str(path) if lmtp else controller.port)

    yield start
    for c in controllers:
        c.stop()


class Sink:
    """Postfix's smtp-sink, dumping each transaction to a file in C{directory}."""

    def __init__(self, path: str) -> None:
        # smtp-sink drops privileges to nobody: its dump directory must be reachable and
        # writable by nobody (pytest's tmp_path is under a 0700 directory).
        self.directory = Path(tempfile.mkdtemp(prefix="mailrelay-sink-"))
        self.directory.chmod(0o777)
        self.process: subprocess.Popen[bytes] | None = None
        out = self.directory / "counters"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        for _ in range(5):  # the free port may be taken between freePort() and bind()
            self.port = freePort()
            with open(out, "wb") as f:
                self.process = subprocess.Popen(
                    [path, *user, "-c", "-h", "sink.test", "-d", str(self.directory / "msg."),
                     f"127.0.0.1:{self.port}", "16"],
                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._listening():
                return
            self.stop()
        raise AssertionError(f"smtp-sink did not start: {out.read_text(errors='replace')}")

    def _listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def counters(self) -> bytes:
        return (self.directory / "counters").read_bytes()

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.directory.glob("msg.*"))]

    def stop(self) -> None:
        p, self.process = self.process, None
        stopProcess(p)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def sink():
    path = requireTool("smtp-sink")
    sinks: list[Sink] = []

    def start() -> Sink:
        s = Sink(path)
        sinks.append(s)
        return s

    yield start
    for s in sinks:
        s.cleanup()


class SilentServer:
    """Accepts TCP connections (the kernel completes the handshake) and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def serve(self, handle: Callable[[socket.socket], None]) -> None:
        """Have each connection accepted handled by C{handle}, in a thread, until closed."""

        def accept() -> None:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                handle(conn)

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()


class ThenClose(bytes):
    """A reply of a L{ScriptedServer} after which it closes the connection."""


class ScriptedServer(SilentServer):
    """A next hop whose every reply is raw bytes the test chooses: C{replies} maps a verb
    (C{"GREETING"}, C{"EHLO"}, C{"MAIL"}, C{"RCPT"}, C{"DATA"}, C{"DOT"}, C{"RSET"},
    C{"QUIT"}) to the bytes sent for it, line ends included; a callable is given the number
    of such commands seen on the connection so far (from 0); C{None} closes the connection
    instead.  A C{BDAT} command's data is read before its reply.  C{messages} holds the
    content of each message it read to its end (its end of data, or its LAST chunk)."""

    DEFAULTS = {"GREETING": b"220 scripted.test ESMTP\r\n",
                "EHLO": b"250-scripted.test\r\n250 PIPELINING\r\n",
                "MAIL": b"250 2.1.0 ok\r\n", "RCPT": b"250 2.1.5 ok\r\n",
                "DATA": b"354 go on\r\n", "DOT": b"250 2.0.0 ok\r\n",
                "RSET": b"250 2.0.0 ok\r\n", "QUIT": b"221 2.0.0 bye\r\n"}

    def __init__(self, **replies: Any) -> None:
        super().__init__()
        self.replies = {**self.DEFAULTS, **replies}
        self.messages: list[bytes] = []
        self.serve(lambda conn: threading.Thread(target=self._talk, args=(conn,),
                                                 daemon=True).start())

    def _reply(self, conn: socket.socket, verb: str, seen: dict[str, int]) -> bool:
        """Send the reply to C{verb}; C{False}: the connection is to be closed instead (or
        after it, for a L{ThenClose} reply)."""
        reply = self.replies[verb]
        count = seen[verb] = seen.get(verb, -1) + 1
        reply = reply(count) if callable(reply) else reply
        if reply is None:
            return False
        conn.sendall(reply)
        return not isinstance(reply, ThenClose)

    def _talk(self, conn: socket.socket) -> None:
        seen: dict[str, int] = {}
        chunks: list[bytes] = []
        with conn, conn.makefile("rb") as lines:
            try:
                if not self._reply(conn, "GREETING", seen):
                    return
                for line in lines:
                    verb = line[:4].upper().decode("ascii", "replace")
                    verb = "EHLO" if verb in ("EHLO", "LHLO") else verb
                    if verb not in self.replies:
                        conn.sendall(b"502 5.5.2 no\r\n")
                        continue
                    if verb == "BDAT":
                        _, size, *last = line.split()
                        chunks.append(lines.read(int(size)))
                        if last:
                            self.messages.append(b"".join(chunks))
                            chunks.clear()
                    if not self._reply(conn, verb, seen) or verb == "QUIT":
                        return
                    if verb == "DATA" and self.replies["DATA"][:3] == b"354":
                        self.messages.append(b"".join(iter(lines.readline, b".\r\n")))
                        if not self._reply(conn, "DOT", seen):
                            return
            except OSError:
                return


# ---------------------------------------------------------------------------------------------
# DNS: one server for the module; zone "test"

ZONE = [
    ["mx.test", "MX", 10, "mail.mx.test"],        # MX to a host with an A record only
    ["mail.mx.test", "A", "127.0.0.1"],
    ["nullmx.test", "MX", 0, ""],                 # RFC 7505 null MX
    ["aonly.test", "A", "127.0.0.1"],             # no MX: the domain is its own exchanger
    ["nullmx.test", "A", "127.0.0.1"],            # (never to be used: null MX wins)
    ["mixnull.test", "MX", 0, ""],                # a null MX beside a real one: no mail
    ["mixnull.test", "MX", 10, "mail.mixnull.test"],
    ["mail.mixnull.test", "A", "127.0.0.1"],
    ["two.test", "MX", 10, "mx1.two.test"],       # two MX hosts, on two loopback addresses
    ["two.test", "MX", 20, "mx2.two.test"],
    ["mx1.two.test", "A", "127.0.0.1"],
    ["mx2.two.test", "A", "127.0.0.2"],
    ["three.test", "MX", 10, "mx1.three.test"],   # three MX hosts on three loopback addresses
    ["three.test", "MX", 20, "mx2.three.test"],
    ["three.test", "MX", 30, "mx3.three.test"],
    ["mx1.three.test", "A", "127.0.0.1"],
    ["mx2.three.test", "A", "127.0.0.2"],
    ["mx3.three.test", "A", "127.0.0.3"],
]                                                 # nx.test: no records: NXDOMAIN


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), "test", ZONE)
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# The relay


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def config(dns: DNSServer, *, hold: bool = False, queue: dict | None = None,
           delivery: dict | None = None, timeouts: dict | None = None,
           routes: list[dict] = (), before: tuple[DNSServer, ...] = (),
           after: tuple[DNSServer, ...] = ()) -> str:
    """A relay configuration: DNS only through C{dns} (between the name servers C{before}
    and C{after}), no reverse lookups, C{hold} as given."""
    lines = ["[queue]", f"hold = {_toml(hold)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in (queue or {}).items()]
    lines += ["[delivery]"] + [f"{k} = {_toml(v)}" for k, v in (delivery or {}).items()]
    lines += ["[delivery.timeouts]"] + [f"{k} = {_toml(v)}" for k, v in (timeouts or {}).items()]
    servers = ", ".join(f'"127.0.0.1:{d.port}"' for d in (*before, dns, *after))
    lines += ["[dns]", "reverse_lookups = false", f"nameservers = [{servers}]"]
    for route in routes:
        lines += ["[[routes]]"] + [f"{k} = {_toml(v)}" for k, v in route.items()]
    return "\n".join(lines) + "\n"


def smtpRoute(domain: str, port: int) -> dict:
    return {"domain": domain, "backend": "smtp", "nexthop": f"[127.0.0.1]:{port}"}


@pytest.fixture
def relay(tmp_path: Path):
    started: list[RelayProcess] = []

    def start(config: str | None = None, *args: str, **kw: Any) -> RelayProcess:
        kw.setdefault("hold", False)
        r = RelayProcess(tmp_path / f"relay{len(started)}", config, args, **kw)
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()


def submit(r: RelayProcess, sender: str, recipients: list[str], message: bytes,
           mailOptions: tuple[str, ...] = (), rcptOptions: tuple[str, ...] = ()) -> str:
    """Hand C{message} to the relay with smtplib; its queue id."""
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        assert s.ehlo("client.test")[0] == 250
        assert s.mail(sender, list(mailOptions)) == (250, b"2.1.0 Ok")
        for rcpt in recipients:
            assert s.rcpt(rcpt, list(rcptOptions)) == (250, b"2.1.5 Ok")
        code, reply = s.data(message)
        assert code == 250, reply
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]{20})", reply)
    assert m, reply
    return m.group(1).decode()


def spooled(r: RelayProcess, queueID: str) -> bytes:
    return (r.spool / "queue" / f"{queueID}.eml").read_bytes()


def release(r: RelayProcess, configText: str) -> None:
    """Restart C{r} (same directory and spool) with C{configText} (which should not hold)."""
    r.stop()
    r.configText = configText
    r.start()


_RESULT = (r"{id}: to=<{rcpt}>, relay=(?P<relay>\S+), delay=[\d.]+, attempts=(?P<attempts>\d+), "
           r"status=(?P<status>{status}) \((?P<diagnostic>.*)\)")


def waitResult(r: RelayProcess, queueID: str, rcpt: str, status: str = r"\w+",
               timeout: float = 15.0) -> re.Match[str]:
    """The log line of a delivery result of C{rcpt} with C{status}."""
    return r.waitForLog(_RESULT.format(id=queueID, rcpt=re.escape(rcpt), status=status), timeout)


def results(r: RelayProcess, queueID: str, rcpt: str) -> list[tuple[str, str, str]]:
    """C{(attempts, status, diagnostic)} of every result logged for C{rcpt} so far."""
    pattern = _RESULT.format(id=queueID, rcpt=re.escape(rcpt), status=r"\w+")
    return [(m["attempts"], m["status"], m["diagnostic"]) for m in re.finditer(pattern, r.log())]


def waitRemoved(r: RelayProcess, queueID: str, timeout: float = 15.0) -> None:
    r.waitForLog(rf"{queueID}: removed", timeout)


def waitEmpty(r: RelayProcess, timeout: float = 15.0) -> None:
    """Wait until C{queue/} holds nothing at all.  A removal unlinks the C{.json} before the
    C{.eml} (so that a crash in between leaves an orphan that start-up removes), so the
    envelope's absence alone does not mean the message file is gone yet."""
    deadline = time.monotonic() + timeout

    def left() -> list[str]:
        return sorted(p.name for p in (r.spool / "queue").iterdir())

    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.queued() == [], r.log()
    assert left() == []


def bounceID(r: RelayProcess, queueID: str, kind: str = "non-delivery notification") -> str:
    m = r.waitForLog(rf"{queueID}: sender {kind}: ([0-9A-Z]{{20}})")
    return m.group(1)


def unfold(value: str) -> str:
    """A header field value without its folding (RFC 5322 section 2.2.3)."""
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def parseReport(content: bytes) -> tuple[Message, Message, list[Message], list[Message]]:
    """A DSN: C{(message, per-message fields, per-recipient fields, parts)}."""
    msg = email.message_from_bytes(content)
    assert msg.get_content_type() == "multipart/report", content[:500]
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) >= 2
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    return msg, blocks[0], blocks[1:], parts


def message(subject: str, body: str = "Hello.\r\n", extra: str = "") -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"{extra}\r\n{body}").encode()


# ---------------------------------------------------------------------------------------------
# 1. Postfix's smtp-sink as the smarthost


def test_smarthost_smtp_sink(relay, sink, dns) -> None:
    s = sink()
    r = relay(config(dns), "--smarthost", f"[127.0.0.1]:{s.port}")
    msg = message("to the sink", "line one\r\n.leading dot\r\n")
    qid = submit(r, "alice@sender.test", ["bob@example.org", "carol@example.org"], msg,
                 mailOptions=("RET=HDRS", "ENVID=env-1"), rcptOptions=("NOTIFY=FAILURE,DELAY",))
    size = int(r.waitForLog(rf"{qid}: from=<alice@sender\.test> nrcpt=2 size=(\d+) ").group(1))
    for rcpt in ("bob@example.org", "carol@example.org"):
        m = waitResult(r, qid, rcpt)
        # Postfix's relay=: the name, the address and the port.
        assert (m["status"], m["attempts"]) == ("sent", "1"), m[0]
        assert m["relay"] == f"127.0.0.1[127.0.0.1]:{s.port}", m[0]
        assert m["diagnostic"].startswith("smtp; 250 2.0.0 Ok"), m[0]
    waitRemoved(r, qid)
    waitEmpty(r)

    (dump,) = s.dumps()  # one transaction for both recipients
    head, _, content = dump.partition(b"\nReceived: from relay.test ([127.0.0.1])\n")
    assert head.split(b"\n") == [
        b"X-Client-Addr: 127.0.0.1",
        b"X-Client-Proto: ESMTP",
        b"X-Helo-Args: relay.test",
        # smtp-sink announces DSN (not SIZE): the DSN parameters are passed on (RFC 3461
        # section 4), SIZE is not sent.
        b"X-Mail-Args: <alice@sender.test> RET=HDRS ENVID=env-1",
        b"X-Rcpt-Args: <bob@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@example.org",
        b"X-Rcpt-Args: <carol@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;carol@example.org",
    ]
    # After smtp-sink's own 3-line Received: the message as relayed (LF line ends), then an
    # empty line: our Received: first, the original, our Message-Id:/Date:, the body unstuffed.
    message_ = content.split(b"\n", 2)[2]
    assert message_.endswith(b"\nline one\n.leading dot\n\n")
    relayed = message_[:-1].replace(b"\n", b"\r\n")
    assert len(relayed) == size
    assert relayed.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n"
                              b"\tby relay.test (mailrelay) with ESMTP id " + qid.encode())
    assert b"\r\nSubject: to the sink\r\n" in relayed
    assert re.search(rb"\r\nMessage-Id: <\d{14}\." + qid.encode() + rb"@relay\.test>\r\nDate: ",
                     relayed)
    # smtp-sink's own count (-c: "sess=N quit=N mesg=N", updated after each "."): one message.
    assert re.findall(rb"mesg=(\d+)", s.counters())[-1] == b"1"


def test_no_relayed_dsn_when_next_hop_has_dsn(relay, sink, dns) -> None:
    s = sink()
    r = relay(config(dns), "--smarthost", f"[127.0.0.1]:{s.port}")
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("notify success"),
                 rcptOptions=("NOTIFY=SUCCESS",))
    assert waitResult(r, qid, "bob@example.org")["status"] == "sent"
    waitRemoved(r, qid)  # notifications are committed before the entry is removed
    passedOn = b"\nX-Rcpt-Args: <bob@example.org> NOTIFY=SUCCESS ORCPT=rfc822;bob@example.org\n"
    assert [passedOn in dump for dump in s.dumps()].count(True) == 1
    assert "notification" not in r.log()
    assert len(s.dumps()) == 1  # no report to alice@sender.test through the smarthost


# ---------------------------------------------------------------------------------------------
# 2. Byte-exact relaying to aiosmtpd (no DSN extension)


def test_relay_byte_exact_without_dsn(relay, nexthop, dns) -> None:
    hop, port = nexthop()
    routes = [smtpRoute("example.org", port), smtpRoute("sender.test", port)]
    r = relay(config(dns, hold=True, routes=routes))
    msg = message("exact", "Body\r\n..two dots\r\n.\r\nlast line, no final newline",
                  extra="X-Extra: keep\r\n\tfolded\r\n")
    qid = submit(r, "alice@sender.test", ["bob@example.org", "carol@example.org"], msg,
                 mailOptions=("RET=FULL", "ENVID=env-2"),
                 rcptOptions=("NOTIFY=SUCCESS,FAILURE",))
    original = spooled(r, qid)
    assert original.startswith(b"Received: ") and original.endswith(b"no final newline\r\n")
    assert hop.accepted == []
    release(r, config(dns, routes=routes))

    for rcpt in ("bob@example.org", "carol@example.org"):
        m = waitResult(r, qid, rcpt)
        assert (m["status"], m["relay"]) == ("sent", f"127.0.0.1[127.0.0.1]:{port}"), m[0]
    waitRemoved(r, qid)
    (got,) = hop.to("bob@example.org")
    assert got.mailFrom == "alice@sender.test"
    assert got.rcptTos == ["bob@example.org", "carol@example.org"]
    assert got.content == original
    # aiosmtpd does not announce DSN: no RET/ENVID/NOTIFY/ORCPT (it would refuse RCPT
    # parameters with 555 anyway).
    assert got.mailOptions == [f"SIZE={len(original)}"]
    assert got.rcptOptions == {"bob@example.org": [], "carol@example.org": []}

    # ... so the relay itself reports the success to the sender, who asked NOTIFY=SUCCESS:
    # action "relayed" (RFC 3461 section 5.2.2).
    dsnID = bounceID(r, qid, "delivery status notification")
    waitRemoved(r, dsnID)
    (report,) = hop.waitTo("alice@sender.test")
    assert report.mailFrom == "<>"
    assert report.mailOptions == [f"SIZE={len(report.content)}"]
    _, perMessage, perRecipient, _ = parseReport(report.content)
    assert perMessage["Original-Envelope-Id"] == "env-2"
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in perRecipient] == [
        ("rfc822; bob@example.org", "relayed", "2.0.0"),
        ("rfc822; carol@example.org", "relayed", "2.0.0"),
    ]
    waitEmpty(r)


# ---------------------------------------------------------------------------------------------
# 3. 4xx, then 250 on the retry


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_temporary_failure_then_delivered(relay, nexthop, dns, stage: str) -> None:
    hop, port = nexthop()
    if stage == "RCPT":
        seen: list[str] = []

        def rcptReply(address: str) -> str | None:
            seen.append(address)
            return "451 4.3.0 try later" if len(seen) == 1 else None

        hop.rcptReply = rcptReply
    else:
        hop.dataReply = lambda received, n: "451 4.3.0 try later" if n == 1 else "250 2.0.0 OK"
    r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 2},
                     routes=[smtpRoute("example.org", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("retry"))
    waitResult(r, qid, "bob@example.org", "sent")
    waitRemoved(r, qid)
    # The log says which command the refusal answered, as Postfix's; not of a success.
    command = "RCPT TO" if stage == "RCPT" else "end of DATA"
    assert results(r, qid, "bob@example.org") == [
        ("1", "deferred", f"smtp; 451 4.3.0 try later (in reply to {command} command)"),
        ("2", "sent", "smtp; 250 2.0.0 OK"),
    ]
    if stage == "DATA":
        assert len(hop.attempts) == 2 and hop.attempts[0].content == hop.attempts[1].content
    else:
        assert len(hop.attempts) == 1  # no DATA without an accepted recipient
    assert [m.rcptTos for m in hop.accepted] == [["bob@example.org"]]
    assert "notification" not in r.log()
    waitEmpty(r)


def test_a_refused_connection_is_logged_once(relay, dns) -> None:
    """A next hop that refuses the connection: one line says so, naming the message, the
    host, its address and port (as Postfix's "connect to HOST[ADDR]:PORT: Connection
    refused"), then the recipient's result, one line per fact as Postfix's (a line without
    them said it first; a third, "no host of ... accepted the delivery", said it again)."""
    port = freePort()
    r = relay(config(dns, queue={"min_backoff": 3600, "max_backoff": 7200},
                     routes=[smtpRoute("example.org", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("refused"))
    waitResult(r, qid, "bob@example.org", "deferred")
    lines = [line for line in r.log().splitlines() if "connection refused" in line]
    assert len(lines) == 2, lines
    assert lines[0].endswith(f"{qid}: cannot use 127.0.0.1[127.0.0.1]:{port} for "
                             f"[127.0.0.1]:{port}: 4.4.1 X-mailrelay; connection refused by "
                             "127.0.0.1"), lines
    assert f"{qid}: to=<bob@example.org>" in lines[1], lines


def test_a_reply_whose_lines_disagree_is_taken_by_its_last_line(relay, nexthop, dns) -> None:
    """A next hop answering the end of data 250-/251 has the message: delivered once, as
    Postfix acts on the last line's code, not deferred as a protocol error and sent again."""
    hop, port = nexthop()
    hop.dataReply = lambda received, n: "250-2.0.0 ok\r\n251 2.0.0 queued as 1"
    r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 2},
                     routes=[smtpRoute("example.org", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("mixed codes"))
    waitResult(r, qid, "bob@example.org", "sent")
    waitRemoved(r, qid)
    time.sleep(2.5)  # (a retry would come within max_backoff)
    assert len(hop.attempts) == 1
    assert results(r, qid, "bob@example.org") == [
        ("1", "sent", "smtp; 251 2.0.0 ok queued as 1")]


def _sentOnceThrough(relay, dns, hop: ScriptedServer, subject: str) -> tuple[Any, dict]:
    """Send one message to bob@example.org through C{hop} (closed after): it is sent, once,
    and leaves the queue.  The relay and the message's result."""
    try:
        r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 2},
                         routes=[smtpRoute("example.org", hop.port)]))
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message(subject))
        m = waitResult(r, qid, "bob@example.org")
        assert m["status"] == "sent", m[0]
        waitRemoved(r, qid)
        assert len(hop.messages) == 1
        return r, m
    finally:
        hop.close()


def test_replies_ending_in_a_bare_lf_are_read(relay, dns) -> None:
    """A next hop whose replies end in a bare LF (and one CR too many) is understood, as
    Postfix's smtp_get() reads them (smtp_stream.c): the message is delivered once.  It
    used to be deferred as a protocol error, even after the "250" to its end of data, and
    sent again at every retry."""
    hop = ScriptedServer(GREETING=b"220 lf.test ESMTP\n",
                         EHLO=b"250-lf.test\n250 PIPELINING\n", DOT=b"250 2.0.0 ok\r\r\n")
    _, m = _sentOnceThrough(relay, dns, hop, "bare LF")
    assert m["diagnostic"] == "smtp; 250 2.0.0 ok", m[0]


def test_a_4xx_reply_to_ehlo_falls_back_to_helo(relay, dns) -> None:
    """A next hop answering EHLO with 451 gets HELO and the message, as Postfix's
    smtp_helo() does for any reply to EHLO but 2xx and 421; it used to be deferred."""
    hop = ScriptedServer(EHLO=b"451 4.3.0 no ESMTP now\r\n", HELO=b"250 scripted.test\r\n")
    _, m = _sentOnceThrough(relay, dns, hop, "helo only")
    assert m["diagnostic"] == "smtp; 250 2.0.0 ok", m[0]


@pytest.mark.parametrize("extensions,answered", [
    (b"250 PIPELINING\r\n", ""),
    (b"250 STARTTLS\r\n", " (in reply to STARTTLS command)"),  # (sent on the EHLO reply)
])
def test_a_421_with_the_ehlo_reply_defers_with_its_text(relay, dns, extensions,
                                                        answered) -> None:
    """A next hop that writes its EHLO reply and "421 4.3.2 shutting down" at once, and
    closes: the message is deferred with that 421 and its text in the log (and so in a
    delay notice), as Postfix reports it ("host X said: 421 ..."); it used to say
    "connection ... is closed", naming neither (also where STARTTLS was offered: under
    tls = "may" the 421 to it was taken for a refusal, and the session went on)."""
    hop = ScriptedServer(EHLO=ThenClose(b"250-scripted.test\r\n" + extensions
                                        + b"421 4.3.2 shutting down\r\n"))
    try:
        r = relay(config(dns, queue={"min_backoff": 3600, "max_backoff": 7200},
                         routes=[smtpRoute("example.org", hop.port)]))
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("421"))
        m = waitResult(r, qid, "bob@example.org", "deferred")
        assert m["diagnostic"] == "smtp; 421 4.3.2 shutting down" + answered, m[0]
        assert hop.messages == []
    finally:
        hop.close()


def test_an_overlong_reply_to_the_end_of_data_is_cut_not_refused(relay, dns) -> None:
    """A next hop answering the end of data with a reply line of 100,000 octets and 2,000
    lines has the message: its reply is cut (as Postfix's smtp_chat_resp cuts one) and the
    message delivered once.  A protocol error deferred it, and it was sent again.  The cut
    is logged once, naming the next hop (Postfix: "response longer than N")."""
    hop = ScriptedServer(DOT=b"250-2.0.0 " + b"x" * 100_000 + b"\r\n"
                         + b"250-2.0.0 more\r\n" * 2000 + b"250 2.0.0 ok\r\n")
    port = hop.port
    r, m = _sentOnceThrough(relay, dns, hop, "long reply")
    assert m["diagnostic"].startswith("smtp; 250 2.0.0 xxxxxxxxxx"), m[0]
    cuts = [line for line in r.log().splitlines() if "reply cut" in line]
    assert len(cuts) == 1, cuts
    assert re.search(rf"\[127\.0\.0\.1\]:{port}: reply cut \(a line longer than 65536 "
                     rf"octets, more than 1000 lines\): 250 2\.0\.0 xxxx", cuts[0]), cuts


# ---------------------------------------------------------------------------------------------
# 4. 5xx at RCPT: a bounce, delivered, from <>


def test_permanent_failure_bounces_to_sender(relay, nexthop, dns) -> None:
    hop, port = nexthop()
    hop.rcptReply = lambda a: "550 5.1.1 no such user" if a == "bob@example.org" else None
    r = relay(config(dns, routes=[smtpRoute("example.org", port), smtpRoute("sender.test", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org", "carol@example.org"],
                 message("will bounce"), mailOptions=("ENVID=env+2B4",))
    m = waitResult(r, qid, "bob@example.org")
    assert (m["status"], m["diagnostic"]) == ("bounced", "smtp; 550 5.1.1 no such user (in reply to RCPT TO command)"), m[0]
    assert waitResult(r, qid, "carol@example.org")["status"] == "sent"
    dsnID = bounceID(r, qid)
    waitRemoved(r, qid)
    waitResult(r, dsnID, "alice@sender.test", "sent")
    waitRemoved(r, dsnID)

    (bounce,) = hop.waitTo("alice@sender.test")
    assert bounce.mailFrom == "<>"  # RFC 5321 6.1, RFC 3461 6.1: notifications come from <>
    assert [m.rcptTos for m in hop.to("carol@example.org")] == [["carol@example.org"]]
    assert hop.to("bob@example.org") == []
    msg, perMessage, perRecipient, parts = parseReport(bounce.content)
    assert msg["To"] == "<alice@sender.test>" and msg["From"].startswith("MAILER-DAEMON@relay.test")
    assert msg["Auto-Submitted"] == "auto-replied"
    assert perMessage["Reporting-MTA"] == "dns; relay.test"
    # The ENVID xtext decoded, as the sender meant it (as Postfix's bounce daemon writes it).
    assert perMessage["Original-Envelope-Id"] == "env+4"
    (block,) = perRecipient  # carol was delivered: not in the report
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; [127.0.0.1]"
    assert unfold(block["Diagnostic-Code"]) == "smtp; 550 5.1.1 no such user"
    # The text names the server as Postfix's, name[address] (smtp_proto.c, namaddr); the
    # log's relay= with its port.
    text = " ".join(parts[0].get_payload(decode=True).decode().split())
    assert "<bob@example.org>: host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user" in text, text
    assert m["relay"] == f"127.0.0.1[127.0.0.1]:{port}", m[0]
    # RET not given: the original's header section is returned.
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Subject: will bounce" in parts[2].get_payload(decode=True)
    waitEmpty(r)


class _RefusesHello(Recorder):
    """A next hop whose EHLO and HELO get a 5xx."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        return ["550 5.7.1 EHLO refused"]

    async def handle_HELO(self, server: Any, session: Any, envelope: Any,
                          hostname: str) -> str:
        return "550 5.7.1 your HELO name is not welcome here"


def test_hello_refused_by_the_next_hop_bounces(relay, nexthop, dns) -> None:
    """A 5xx to HELO from the last (here the only) host returns the mail at once, as
    Postfix does; the relay used to defer it for the queue's lifetime (5 days)."""
    notices, noticePort = nexthop()
    refuser = _TCPController(_RefusesHello(), hostname="127.0.0.1", port=0, ready_timeout=10)
    refuser.start()
    try:
        r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                         routes=[smtpRoute("example.org", refuser.port),
                                 smtpRoute("sender.test", noticePort)]))
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("helo refused"))
        m = waitResult(r, qid, "bob@example.org")
        assert m["status"] == "bounced", m[0]
        assert m["diagnostic"].startswith(
            "smtp; 550 5.7.1 your HELO name is not welcome here"), m[0]
        dsnID = bounceID(r, qid)
        waitRemoved(r, qid)
        waitResult(r, dsnID, "alice@sender.test", "sent")
        (bounce,) = notices.waitTo("alice@sender.test")
        _, _, (block,), _ = parseReport(bounce.content)
        assert (block["Action"], block["Status"]) == ("failed", "5.7.1")
        assert "HELO name is not welcome" in unfold(block["Diagnostic-Code"])
        assert refuser.handler.attempts == []  # no transaction was ever begun
        waitEmpty(r)
    finally:
        refuser.stop()


class _RefusesStartTLS(SilentServer):
    """Offers STARTTLS and answers it with C{reply}; QUIT with 221 (any other command
    with 503)."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply
        self.heard: list[bytes] = []
        self.serve(self._talk)

    def _talk(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 refuser.test ESMTP\r\n")
            for line in lines:
                self.heard.append(line.strip())
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-refuser.test\r\n250 STARTTLS\r\n")
                elif verb == b"STAR":
                    conn.sendall(self.reply + b"\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    break
                else:
                    conn.sendall(b"503 5.5.1 no\r\n")


@pytest.mark.parametrize("reply, status", [(b"454 4.7.0 TLS not available", "deferred"),
                                           (b"554 5.7.0 no TLS for you", "bounced")])
def test_starttls_refused_where_tls_is_required(relay, nexthop, dns, reply: bytes,
                                                status: str) -> None:
    """TLS required and the next hop refuses STARTTLS: its reply and status are passed on
    (in reply to STARTTLS), as Postfix's "TLS is required, but host %s refused to start
    TLS" (smtp_proto.c, smtp_site_fail with the server's response): a 4xx defers, a 5xx
    from the last host returns the mail, as a refused HELO; no plaintext is ever sent."""
    notices, noticePort = nexthop()
    refuser = _RefusesStartTLS(reply)
    try:
        route = {**smtpRoute("example.org", refuser.port), "tls": "required"}
        r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                         routes=[route, smtpRoute("sender.test", noticePort)]))
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("tls refused"))
        m = waitResult(r, qid, "bob@example.org")
        assert (m["status"], m["diagnostic"]) == (
            status, f"smtp; {reply.decode()} (in reply to STARTTLS command)"), m[0]
        assert [h[:4] for h in refuser.heard] == [b"EHLO", b"STAR", b"QUIT"]
        if status == "deferred":
            assert r.queued() == [qid]
            return
        waitResult(r, bounceID(r, qid), "alice@sender.test", "sent")
        (bounce,) = notices.waitTo("alice@sender.test")
        _, _, (block,), _ = parseReport(bounce.content)
        assert (block["Action"], block["Status"]) == ("failed", "5.7.0")
        assert block["Remote-MTA"] == "dns; [127.0.0.1]"
        assert unfold(block["Diagnostic-Code"]) == f"smtp; {reply.decode()}"
        waitEmpty(r)
    finally:
        refuser.close()


# ---------------------------------------------------------------------------------------------
# 5. The next hop drops the connection after the message, without a reply


def test_connection_dropped_after_data_is_deferred_then_delivered(relay, nexthop, dns) -> None:
    hop, port = nexthop()
    broken = threading.Event()
    broken.set()
    hop.dataReply = lambda received, n: "DROP" if broken.is_set() else "250 2.0.0 OK"
    r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 2},
                     routes=[smtpRoute("example.org", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("dropped"))
    m = waitResult(r, qid, "bob@example.org")
    assert m["status"] == "deferred", m[0]
    assert "lost connection with" in m["diagnostic"] and "end of data" in m["diagnostic"], m[0]
    # Not lost, not bounced: still in the spool, recipient pending.
    assert r.queued() == [qid]
    envelope = json.loads((r.spool / "queue" / f"{qid}.json").read_text())
    assert [x["state"] for x in envelope["recipients"]] == ["pending"]
    assert hop.accepted == [] and len(hop.attempts) >= 1
    broken.clear()

    waitResult(r, qid, "bob@example.org", "sent")
    waitRemoved(r, qid)
    statuses = [s for _, s, _ in results(r, qid, "bob@example.org")]
    assert statuses[-1] == "sent" and set(statuses[:-1]) == {"deferred"}
    assert "bounced" not in statuses and "notification" not in r.log()
    (got,) = hop.accepted
    assert got.content == hop.attempts[0].content  # the same message, whole, again
    waitEmpty(r)


# ---------------------------------------------------------------------------------------------
# 6. The next hop accepts the connection and never says anything


def test_greeting_timeout_defers(relay, dns) -> None:
    silent = SilentServer()
    try:
        r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                         timeouts={"greeting": 1},
                         routes=[smtpRoute("example.org", silent.port)]))
        start = time.monotonic()
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("silence"))
        m = waitResult(r, qid, "bob@example.org", timeout=20)
        elapsed = time.monotonic() - start
        assert m["status"] == "deferred", m[0]
        assert "timed out while receiving the initial server greeting" in m["diagnostic"], m[0]
        assert 0.9 <= elapsed < 10, elapsed  # the 1 s greeting timeout, not the default 300 s
        assert r.queued() == [qid]
        assert "bounced" not in r.log() and "notification" not in r.log()
    finally:
        silent.close()


class StallingServer(SilentServer):
    """Greets, answers EHLO, then never answers again (a server that accepts and stalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: list[socket.socket] = []
        self.serve(self._stall)

    def _stall(self, conn: socket.socket) -> None:
        self.connections.append(conn)
        conn.sendall(b"220 stalling.test ESMTP\r\n")
        conn.recv(1000)  # EHLO
        conn.sendall(b"250 stalling.test\r\n")

    def close(self) -> None:
        super().close()
        for conn in self.connections:
            conn.close()


@pytest.mark.parametrize("stall, diagnostic", [
    ("greeting", "conversation with 127.0.0.1[127.0.0.1] timed out while receiving the "
                 "initial server greeting"),
    ("mail", "conversation with 127.0.0.1[127.0.0.1] timed out while sending MAIL FROM"),
])
def test_dead_destination_does_not_starve_the_others(relay, nexthop, dns, stall: str,
                                                     diagnostic: str) -> None:
    """A next hop that never greets (or stalls once greeted), with more mail for it than
    the active window holds: once a cohort of deliveries to it (its destination concurrency,
    1 here) has failed to reach it, it is suspended (Postfix's dead destination, for
    $minimal_backoff_time): the rest of its mail is deferred at once ("delivery temporarily
    suspended"), not each after a time-out of its own, and mail for another next hop gets
    through.  It used to wait for every one of them in turn (active_limit at a time)."""
    hop, port = nexthop()
    dead = SilentServer() if stall == "greeting" else StallingServer()
    try:
        r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600, "active_limit": 2},
                         delivery={"destination_concurrency": 1},
                         timeouts={"greeting": 2, "mail": 2},
                         routes=[smtpRoute("silent.test", dead.port),
                                 smtpRoute("example.org", port)]))
        queued = [submit(r, "alice@sender.test", [f"u{n}@silent.test"], message(f"dead {n}"))
                  for n in range(6)]
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("alive"))
        assert waitResult(r, qid, "bob@example.org", timeout=30)["status"] == "sent"
        found = [waitResult(r, q, f"u{n}@silent.test", timeout=30) for n, q in enumerate(queued)]
        assert [m["status"] for m in found] == ["deferred"] * 6
        r.waitForLog(rf"{qid}: removed")  # (logged sent before its entry is removed)
        diagnostics = [m["diagnostic"] for m in found]
        # One only: then the next hop was suspended.
        assert sorted(diagnostics) == [f"X-mailrelay; {diagnostic}"] + [
            f"delivery temporarily suspended: {diagnostic}"
        ] * 5, r.log()
        assert sorted(r.queued()) == sorted(queued)
        assert "bounced" not in r.log()
    finally:
        dead.close()


def test_new_mail_is_not_kept_waiting_behind_the_queued(relay, nexthop, dns) -> None:
    """Queued mail found at the start for a slow next hop, more than the active window
    holds: mail that arrives meanwhile takes every other free place, as Postfix's queue
    manager round-robins its incoming and deferred queues, instead of waiting until all of
    it is done."""
    slow, slowPort = nexthop()
    slow.dataReply = lambda received, n: (time.sleep(1), "250 2.0.0 OK")[1]
    fast, fastPort = nexthop()
    routes = [smtpRoute("slow.test", slowPort), smtpRoute("example.org", fastPort)]
    queue = {"active_limit": 1}
    r = relay(config(dns, hold=True, queue=queue, routes=routes))
    queued = [submit(r, "alice@sender.test", [f"u{n}@slow.test"], message(f"slow {n}"))
              for n in range(4)]
    release(r, config(dns, queue=queue, routes=routes))
    r.waitForLog(rf"{queued[0]}: from=<alice@sender.test>, .*\(queue active\)")
    new = submit(r, "alice@sender.test", ["bob@example.org"], message("new"))
    fast.waitTo("bob@example.org", timeout=30)
    slow.waitTo("u3@slow.test", timeout=30)
    active = re.findall(r"(\w{20}): from=<alice@sender.test>, .*\(queue active\)", r.log())
    assert active == [queued[0], new, *queued[1:]]


# ---------------------------------------------------------------------------------------------
# 7. MX delivery through our DNS server


def _mxRoutes(port: int, sinkPort: int) -> list[dict]:
    # "domain:port" (no brackets): look up the domain's MX records, connect to that port
    # (relay.smarthost syntax; see route.parseNexthop).  The relay cannot be made to use port
    # 25 here, so every test domain gets such a route.
    return ([{"domain": d, "backend": "smtp", "nexthop": f"{d}:{port}"}
             for d in ("mx.test", "aonly.test", "nullmx.test", "mixnull.test", "nx.test")]
            + [smtpRoute("sender.test", sinkPort)])


@pytest.mark.parametrize("domain, outcome, queries", [
    ("mx.test", "sent", [("mx.test", "MX"), ("mail.mx.test", "A")]),
    ("aonly.test", "sent", [("aonly.test", "MX"), ("aonly.test", "A")]),
    ("nullmx.test", "5.1.10", [("nullmx.test", "MX")]),
    ("mixnull.test", "5.1.10", [("mixnull.test", "MX")]),
    ("nx.test", "5.1.2", [("nx.test", "MX")]),
])
def test_mx_delivery(relay, nexthop, dns, domain: str, outcome: str,
                     queries: list[tuple[str, str]]) -> None:
    hop, port = nexthop()
    notices, noticePort = nexthop()
    r = relay(config(dns, routes=_mxRoutes(port, noticePort)))
    rcpt = f"user@{domain}"
    qid = submit(r, "alice@sender.test", [rcpt], message(f"to {domain}"))
    m = waitResult(r, qid, rcpt)
    waitRemoved(r, qid)
    asked = [q for q in dns.queries() if q[0] == domain or q[0].endswith("." + domain)]
    for q in queries:
        assert q in asked, (q, asked)
    if outcome == "sent":
        assert m["status"] == "sent", m[0]
        exchanger = f"mail.{domain}" if domain == "mx.test" else domain
        assert m["relay"] == f"{exchanger}[127.0.0.1]:{port}", m[0]
        (got,) = hop.waitTo(rcpt)
        assert got.mailFrom == "alice@sender.test"
        assert f"Subject: to {domain}".encode() in got.content
        assert "notification" not in r.log()
    else:
        assert m["status"] == "bounced", m[0]
        expected = {"5.1.10": "does not accept mail (null MX)", "5.1.2": "does not exist"}[outcome]
        assert m["diagnostic"] == f"X-mailrelay; domain {domain} {expected}", m[0]
        assert hop.accepted == []
        if domain in ("nullmx.test", "mixnull.test"):
            assert (domain, "A") not in asked  # a null MX is final: no fallback to A
            assert (f"mail.{domain}", "A") not in asked  # nor the other MX hosts (Postfix)
        dsnID = bounceID(r, qid)
        waitRemoved(r, dsnID)
        (bounce,) = notices.waitTo("alice@sender.test")
        assert bounce.mailFrom == "<>"
        _, _, (block,), _ = parseReport(bounce.content)
        assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
            f"rfc822; {rcpt}", "failed", outcome)
        assert unfold(block["Diagnostic-Code"]) == f"X-mailrelay; domain {domain} {expected}"
    waitEmpty(r)


def test_recipients_deferred_by_an_mx_host_are_tried_at_the_next(relay, nexthop, dns) -> None:
    """A recipient the best MX host answers 4xx at RCPT is tried at the next MX host in the
    same attempt, as Postfix keeps soft-failed recipients for the next server (smtp_trouble.c,
    SMTP_RCPT_KEEP) unless it is the last; the one it accepted is not sent again and the one
    it refused (5xx) is returned, not tried elsewhere.  The relay used to move on only when
    every recipient was deferred: the deferred one waited for the queue's next attempt."""
    best, port = nexthop()
    backup, _ = nexthop(port=port, host="127.0.0.2")
    notices, noticePort = nexthop()
    asked: dict[str, list[str]] = {"best": [], "backup": []}

    def bestReply(address: str) -> str | None:
        asked["best"].append(address)
        return {"busy@two.test": "450 4.2.1 mailbox busy",
                "gone@two.test": "550 5.1.1 no such user"}.get(address)

    def backupReply(address: str) -> str | None:
        asked["backup"].append(address)
        return None

    best.rcptReply, backup.rcptReply = bestReply, backupReply
    r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600}, routes=[
        {"domain": "two.test", "backend": "smtp", "nexthop": f"two.test:{port}"},
        smtpRoute("sender.test", noticePort)]))
    qid = submit(r, "alice@sender.test", ["ok@two.test", "busy@two.test", "gone@two.test"],
                 message("two MX hosts"))
    ok = waitResult(r, qid, "ok@two.test")
    busy = waitResult(r, qid, "busy@two.test")
    gone = waitResult(r, qid, "gone@two.test")
    assert (ok["status"], ok["relay"], ok["attempts"]) == (
        "sent", f"mx1.two.test[127.0.0.1]:{port}", "1"), ok[0]
    assert (busy["status"], busy["relay"], busy["attempts"]) == (
        "sent", f"mx2.two.test[127.0.0.2]:{port}", "1"), busy[0]
    assert (gone["status"], gone["diagnostic"]) == (
        "bounced", "smtp; 550 5.1.1 no such user (in reply to RCPT TO command)"), gone[0]
    assert [m.rcptTos for m in best.accepted] == [["ok@two.test"]]
    assert [m.rcptTos for m in backup.accepted] == [["busy@two.test"]]
    assert asked == {"best": ["ok@two.test", "busy@two.test", "gone@two.test"],
                     "backup": ["busy@two.test"]}
    waitRemoved(r, qid)
    dsnID = bounceID(r, qid)
    waitRemoved(r, dsnID)
    (bounce,) = notices.waitTo("alice@sender.test")
    _, _, (block,), _ = parseReport(bounce.content)
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; gone@two.test", "5.1.1")
    waitEmpty(r)


def test_mx_session_limit_stops_the_walk_over_the_mx_hosts(relay, nexthop, dns) -> None:
    """Three MX hosts that each defer the recipient at RCPT: one delivery holds at most
    mx_session_limit sessions (2, Postfix's smtp_mx_session_limit), so the third host is not
    tried in that attempt; the recipient is deferred with the second one's reply."""
    hosts = [nexthop()]
    port = hosts[0][1]
    hosts += [nexthop(port=port, host=f"127.0.0.{n}") for n in (2, 3)]
    for hop, _ in hosts:
        hop.rcptReply = lambda address: "450 4.2.1 busy"
    r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                     routes=[{"domain": "three.test", "backend": "smtp",
                              "nexthop": f"three.test:{port}"}]))
    qid = submit(r, "alice@sender.test", ["busy@three.test"], message("three MX hosts"))
    m = waitResult(r, qid, "busy@three.test")
    assert (m["status"], m["relay"], m["attempts"]) == (
        "deferred", f"mx2.three.test[127.0.0.2]:{port}", "1"), m[0]
    assert re.search(rf"{qid}: MX session limit \(2\) reached", r.log()), r.log()
    assert not re.search(r"127\.0\.0\.3", r.log()), r.log()


def test_a_message_needing_smtputf8_goes_to_the_mx_host_that_offers_it(relay, dns) -> None:
    """The best MX host does not offer SMTPUTF8, the backup does: a message with a UTF-8
    recipient (and an ASCII one) goes to the backup, both recipients in one transaction,
    as Postfix tries the other servers before it returns such a message (smtp_proto.c,
    SMTP_MISC_FAIL_SOFT_NON_FINAL).  The relay returned it with 5.6.7 at the best host."""
    port = freePort()
    best, backup = Recorder(), Recorder()
    controllers = [
        _TCPController(best, hostname="127.0.0.1", port=port, ready_timeout=10,
                       enable_SMTPUTF8=False),
        _TCPController(backup, hostname="127.0.0.2", port=port, ready_timeout=10)]
    for c in controllers:
        c.start()
    try:
        r = relay(config(dns, routes=[{"domain": "two.test", "backend": "smtp",
                                       "nexthop": f"two.test:{port}"}]))
        qid = submit(r, "alice@sender.test", ["dørte@two.test", "bob@two.test"],
                     message("utf-8"), mailOptions=("SMTPUTF8",))
        for rcpt in ("dørte@two.test", "bob@two.test"):
            m = waitResult(r, qid, rcpt)
            assert (m["status"], m["relay"]) == (
                "sent", f"mx2.two.test[127.0.0.2]:{port}"), m[0]
        assert [m.rcptTos for m in backup.accepted] == [["dørte@two.test", "bob@two.test"]]
        assert "SMTPUTF8" in backup.accepted[0].mailOptions
        assert best.attempts == []
        assert "mx1.two.test[127.0.0.1]" in r.log() and "does not offer SMTPUTF8" in r.log()
        waitRemoved(r, qid)
    finally:
        for c in controllers:
            c.stop()


def _oneDeferredOnAReusedConnection(relay: Any, dns: DNSServer, domain: str, port: int,
                                    **delivery: Any) -> tuple[RelayProcess, str, Any, Any]:
    """A relay routing C{domain} by MX to C{port} (with the C{[delivery]} options
    C{delivery}), and a message to C{ok@domain} and C{busy@domain} sent over the connection
    a first message left in the cache: the relay, the message's queue id and the two
    recipients' results."""
    r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                     delivery={"connection_cache_time": 60, **delivery},
                     routes=[{"domain": domain, "backend": "smtp",
                              "nexthop": f"{domain}:{port}"}]))
    warm = submit(r, "alice@sender.test", [f"warm@{domain}"], message("warm"))
    waitRemoved(r, warm)
    qid = submit(r, "alice@sender.test", [f"ok@{domain}", f"busy@{domain}"],
                 message("reused connection"))
    return r, qid, waitResult(r, qid, f"ok@{domain}"), waitResult(r, qid, f"busy@{domain}")


def test_recipients_deferred_on_a_reused_connection_are_tried_at_the_next_mx(
        relay, nexthop, dns) -> None:
    """A reused (cached) connection to the best MX host whose server defers one recipient
    at RCPT and takes the other: the deferred one is tried at the next MX host in the same
    attempt, as on a fresh connection (Postfix's smtp_reuse_session() drops the reused
    address from the list and keeps soft-failed recipients for the next server).  It used
    to wait for the queue's next attempt (only an all-deferred reuse went on)."""
    best, port = nexthop()
    backup, _ = nexthop(port=port, host="127.0.0.2")
    best.rcptReply = lambda address: "450 4.2.1 busy" if address == "busy@two.test" else None
    r, qid, ok, busy = _oneDeferredOnAReusedConnection(relay, dns, "two.test", port)
    assert (ok["status"], ok["relay"]) == ("sent", f"mx1.two.test[127.0.0.1]:{port}"), ok[0]
    assert (busy["status"], busy["relay"], busy["attempts"]) == (
        "sent", f"mx2.two.test[127.0.0.2]:{port}", "1"), busy[0]
    assert [m.rcptTos for m in best.accepted] == [["warm@two.test"], ["ok@two.test"]]
    assert [m.rcptTos for m in backup.accepted] == [["busy@two.test"]]
    assert re.search(rf"{qid}: 1 of 2 recipients deferred on the reused connection to "
                     rf"mx1\.two\.test\[127\.0\.0\.1\]:{port} .*trying the other hosts",
                     r.log()), r.log()
    waitRemoved(r, qid)


def test_a_recipient_deferred_on_a_reused_connection_keeps_its_reply_when_the_next_mx_is_down(
        relay, nexthop, dns) -> None:
    """A recipient the best MX defers on a reused connection, the next MX host down
    (nothing listens at 127.0.0.2): it is deferred with the best MX's reply, "450 4.2.1
    busy", not with the next host's refusal to connect; and the next hop, whose server
    answered, is not suspended (destination_concurrency = 1: the next message to it was
    deferred as "delivery temporarily suspended", never tried)."""
    best, port = nexthop()
    best.rcptReply = lambda address: "450 4.2.1 busy" if address == "busy@two.test" else None
    r, qid, ok, busy = _oneDeferredOnAReusedConnection(relay, dns, "two.test", port,
                                                       destination_concurrency=1)
    assert ok["status"] == "sent", ok[0]
    assert (busy["status"], busy["relay"]) == (
        "deferred", f"mx1.two.test[127.0.0.1]:{port}"), busy[0]
    assert "450 4.2.1 busy" in busy["diagnostic"], busy[0]
    after = submit(r, "alice@sender.test", ["after@two.test"], message("after"))
    m = waitResult(r, after, "after@two.test")
    assert m["status"] == "sent", m[0]
    assert "temporarily suspended" not in r.log()


def test_a_recipient_deferred_on_a_reused_connection_then_lost_at_the_next_mx_does_not_suspend(
        relay, nexthop, dns) -> None:
    """A recipient the best MX defers on a reused connection (taking the other), then the
    next MX host drops the connection in its transaction: the next hop, whose server
    answered in that delivery, is not counted unreachable (Postfix's
    SMTP_MISC_FLAG_COMPLETE_SESSION: no hop status once a session completed).  With
    destination_concurrency = 1 the next message to it was deferred untried, "delivery
    temporarily suspended"."""
    best, port = nexthop()
    backup, _ = nexthop(port=port, host="127.0.0.2")
    best.rcptReply = lambda address: "450 4.2.1 busy" if address == "busy@two.test" else None
    backup.dataReply = lambda received, n: "DROP"
    r, qid, ok, busy = _oneDeferredOnAReusedConnection(relay, dns, "two.test", port,
                                                       destination_concurrency=1)
    assert ok["status"] == "sent", ok[0]
    assert busy["status"] == "deferred", busy[0]
    assert len(backup.attempts) == 1
    after = submit(r, "alice@sender.test", ["after@two.test"], message("after"))
    m = waitResult(r, after, "after@two.test")
    assert m["status"] == "sent", m[0]
    assert "temporarily suspended" not in r.log()


def test_a_recipient_deferred_on_a_reused_connection_when_the_relay_is_the_backup_mx(
        relay, nexthop, tmp_path: Path) -> None:
    """The relay is the backup MX of the next hop: a recipient the primary defers on a
    reused (cached) connection stays deferred, to be retried, not bounced as a mail loop
    (the reused primary's address used to be dropped before the relay itself, which then
    looked like the best MX: 5.4.6 "mail for ... loops back to myself")."""
    best, port = nexthop()
    best.rcptReply = lambda address: "450 4.2.1 busy" if address == "busy@bk.test" else None
    zone = DNSServer(tmp_path / "bk-dns", "test", [
        ["bk.test", "MX", 10, "mx1.bk.test"], ["mx1.bk.test", "A", "127.0.0.1"],
        ["bk.test", "MX", 20, "relay.test"], ["relay.test", "A", "127.0.0.9"],
    ])
    try:
        r, qid, ok, busy = _oneDeferredOnAReusedConnection(relay, zone, "bk.test", port)
        assert ok["status"] == "sent", ok[0]
        assert (busy["status"], busy["relay"]) == (
            "deferred", f"mx1.bk.test[127.0.0.1]:{port}"), busy[0]
        assert "loops back to myself" not in r.log()
        assert r.queued() == [qid]
    finally:
        zone.stop()


@pytest.mark.parametrize("where", ["next MX host", "reused connection"])
def test_a_message_sent_again_in_the_attempt_after_a_lost_end_of_data_is_logged(
        relay, nexthop, dns, where: str) -> None:
    """A transaction lost after the end of data (the next hop may have the message) whose
    recipients are then sent again in the same attempt -- to the next MX host, or afresh
    after a reused connection -- is logged saying it may be sent more than once, as Postfix
    logs the reason before it tries the next server (smtp_bulk_fail's msg_info).  The
    relay logged only "every recipient deferred by ...; trying ...", then status=sent: the
    next hop had the message twice and nothing said it might."""
    if where == "next MX host":
        first, port = nexthop()
        second, _ = nexthop(port=port, host="127.0.0.2")
        first.dataReply = lambda received, n: "DROP"
        route = {"domain": "two.test", "backend": "smtp", "nexthop": f"two.test:{port}"}
        delivery: dict[str, Any] = {}
        rcpt = "bob@two.test"
    else:
        first, port = nexthop()
        second = first
        # The second transaction (the first on the reused connection) is lost.
        first.dataReply = lambda received, n: "DROP" if n == 2 else "250 2.0.0 OK"
        route = smtpRoute("example.org", port)
        delivery = {"connection_cache_time": 60}
        rcpt = "bob@example.org"
    r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600}, delivery=delivery,
                     routes=[route]))
    if where == "reused connection":
        warm = submit(r, "alice@sender.test", ["carol@example.org"], message("warm"))
        waitRemoved(r, warm)
    qid = submit(r, "alice@sender.test", [rcpt], message("lost after the end of data"))
    m = waitResult(r, qid, rcpt)
    assert (m["status"], m["attempts"]) == ("sent", "1"), m[0]
    second.waitTo(rcpt)
    assert [a.rcptTos for a in first.attempts].count([rcpt]) + (
        len(second.attempts) if second is not first else 0) == 2
    said = [line for line in r.log().splitlines()
            if qid in line and "may be sent more than once" in line]
    assert said, r.log()
    waitRemoved(r, qid)


def test_a_recipient_the_best_mx_took_is_not_sent_again_when_the_walk_is_cut_short(
        relay, nexthop, dns) -> None:
    """A recipient the best MX host accepted is recorded as delivered before the recipients
    it deferred go on to the next host: a stop (or reload) cutting that walk short sends it
    no second copy, as Postfix's smtp marks each recipient done in the queue file as the
    server accepts it.  The relay recorded the delivery's recipients only at the end of the
    walk: stopped while the backup MX stalled, it deferred the accepted one too ("the next
    hop may have received the message") and sent it to the best MX again after the
    restart."""
    best, port = nexthop()
    best.rcptReply = lambda address: "450 4.2.1 busy" if address == "busy@two.test" else None
    silent = socket.socket()  # the backup MX: takes the connection, never greets
    silent.bind(("127.0.0.2", port))
    silent.listen(8)
    try:
        r = relay("drain_time = 1\n" + config(
            dns, queue={"min_backoff": 1, "max_backoff": 2}, timeouts={"greeting": 120},
            routes=[{"domain": "two.test", "backend": "smtp", "nexthop": f"two.test:{port}"}]))
        qid = submit(r, "alice@sender.test", ["ok@two.test", "busy@two.test"],
                     message("the walk is cut short"))
        best.waitTo("ok@two.test")
        sent = waitResult(r, qid, "ok@two.test")
        assert (sent["status"], sent["relay"]) == ("sent", f"mx1.two.test[127.0.0.1]:{port}")
        r.stop()
    finally:
        silent.close()
    assert [s for _, s, _ in results(r, qid, "ok@two.test")] == ["sent"]
    envelope = json.loads((r.spool / "queue" / f"{qid}.json").read_text())
    assert {x["address"]: x["state"] for x in envelope["recipients"]} == {
        "ok@two.test": "delivered", "busy@two.test": "pending"}
    best.rcptReply = lambda address: None
    r.start()
    waitResult(r, qid, "busy@two.test", "sent", timeout=30)
    waitRemoved(r, qid)
    assert len(best.to("ok@two.test")) == 1
    assert len(best.to("busy@two.test")) == 1


@pytest.mark.parametrize("answer", ["REFUSED", "SERVFAIL"])
def test_mx_lookup_asks_the_next_name_server(relay, nexthop, dns, tmp_path: Path,
                                             answer: str) -> None:
    """A name server that answers REFUSED or SERVFAIL says nothing about the name: the next
    one of [dns] nameservers is asked, as the C library's resolver (res_send) does for
    Postfix; the mail is not deferred while a working server is listed."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    failing = DNSServer(tmp_path / "failing-dns", "test", [["*", answer]])
    try:
        r = relay(config(dns, routes=_mxRoutes(port, noticePort), before=(failing,)))
        qid = submit(r, "alice@sender.test", ["user@mx.test"], message("next server"))
        m = waitResult(r, qid, "user@mx.test")
        assert m["status"] == "sent", m[0]
        assert m["relay"] == f"mail.mx.test[127.0.0.1]:{port}", m[0]
        assert ("mx.test", "MX") in failing.queries()  # (asked first, in the listed order)
        hop.waitTo("user@mx.test")
        waitEmpty(r)
    finally:
        failing.stop()


def test_a_truncated_answer_is_asked_again_over_tcp_of_the_same_server(
        relay, nexthop, tmp_path: Path) -> None:
    """A truncated answer (TC) is asked again over TCP of the name server that gave it, as
    the C library's resolver does; Twisted's asked the next server of [dns] nameservers in
    its round, and when that one was down (listed as a spare), the lookup failed and the mail
    was deferred."""
    hop, port = nexthop()
    zone = DNSServer(tmp_path / "tc-dns", "test", [
        ["big.test", "TRUNCATE"], ["big.test", "MX", 10, "mx.big.test"],
        ["mx.big.test", "A", "127.0.0.1"],
    ])
    down = DNSServer(tmp_path / "down-dns", "test", [])
    down.stop()  # (its port: nothing answers there now, over UDP or TCP)
    try:
        r = relay(config(zone, routes=[{"domain": "big.test", "backend": "smtp",
                                        "nexthop": f"big.test:{port}"}], after=(down,)))
        qid = submit(r, "alice@sender.test", ["user@big.test"], message("truncated"))
        m = waitResult(r, qid, "user@big.test")
        assert (m["status"], m["relay"]) == ("sent", f"mx.big.test[127.0.0.1]:{port}"), m[0]
        assert "tcp\nquery big.test MX" in zone.log()
        hop.waitTo("user@big.test")
    finally:
        zone.stop()


class UDPEcho:
    """A UDP socket on 127.0.0.1 that sends every datagram back where it came from (a
    "name server" that returns the queries themselves), in a thread, until closed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.echoed = 0
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self) -> None:
        while True:
            try:
                data, address = self.sock.recvfrom(65535)
                self.sock.sendto(data, address)
            except OSError:
                return
            self.echoed += 1

    def close(self) -> None:
        self.sock.close()


def test_a_query_sent_back_is_no_answer(relay, nexthop, dns) -> None:
    """A name server listed first that sends the queries back (an echo, a loop): they are
    no answers (QR clear), the next name server is asked and the mail delivered.  Each
    was taken for an answer without records: no MX, no address, the mail bounced (5.4.4,
    "host mx.test has no address")."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    echo = UDPEcho()
    try:
        r = relay(config(dns, routes=_mxRoutes(port, noticePort), before=(echo,)))
        qid = submit(r, "alice@sender.test", ["user@mx.test"], message("echo"))
        m = waitResult(r, qid, "user@mx.test")
        assert (m["status"], m["relay"]) == ("sent", f"mail.mx.test[127.0.0.1]:{port}"), m[0]
        assert echo.echoed >= 2  # (the MX and address queries: each sent there first)
        assert "dropped: not an answer (a query, sent back?)" in r.log()
        hop.waitTo("user@mx.test")
    finally:
        echo.close()


def test_an_answer_truncated_over_tcp_too_is_taken_as_it_is(relay, nexthop,
                                                            tmp_path: Path) -> None:
    """A name server whose answer says it is truncated over TCP too: what it holds is
    used, as Postfix's resolver does.  The relay asked over TCP again and again until the
    lookup's time-out, and deferred the mail ("DNS time-out") at every attempt."""
    hop, port = nexthop()
    zone = DNSServer(tmp_path / "tc-dns", "test", [
        ["big.test", "TRUNCATEALL"], ["big.test", "MX", 10, "mx.big.test"],
        ["mx.big.test", "A", "127.0.0.1"],
    ])
    try:
        r = relay(config(zone, routes=[{"domain": "big.test", "backend": "smtp",
                                        "nexthop": f"big.test:{port}"}]))
        qid = submit(r, "alice@sender.test", ["user@big.test"], message("truncated"))
        m = waitResult(r, qid, "user@big.test", timeout=45)
        assert (m["status"], m["relay"]) == ("sent", f"mx.big.test[127.0.0.1]:{port}"), m[0]
        assert zone.log().count("tcp\nquery big.test MX") == 1, zone.log()
        hop.waitTo("user@big.test")
    finally:
        zone.stop()


def test_an_answer_to_another_question_is_ignored(relay, nexthop, dns, tmp_path: Path) -> None:
    """A name server answering another question than the one asked (here: that "nx.test"
    does not exist, for the MX query of "mx.test") has its answer dropped, as the C
    library's resolver does (RFC 5452 section 9.1): no answer from it, the next name
    server is asked and the mail delivered.  It was taken as the answer: the mail bounced,
    "domain mx.test does not exist"."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    confused = DNSServer(tmp_path / "confused-dns", "test", [
        ["mx.test", "ANSWERFOR", "nx.test"],
        ["mail.mx.test", "REFUSED"],  # (its address: asked of the next name server)
    ])
    try:
        r = relay(config(dns, routes=_mxRoutes(port, noticePort), before=(confused,)))
        qid = submit(r, "alice@sender.test", ["user@mx.test"], message("other question"))
        m = waitResult(r, qid, "user@mx.test")
        assert (m["status"], m["relay"]) == ("sent", f"mail.mx.test[127.0.0.1]:{port}"), m[0]
        assert ("mx.test", "MX") in confused.queries()
        assert re.search(r"DNS answer from .* dropped: not the question asked \(\[Query\(b'nx"
                         r"\.test', 15, 1\)\] instead of \[Query\(b'mx\.test', 15, 1\)\]\)",
                         r.log()), r.log()
        hop.waitTo("user@mx.test")
        waitEmpty(r)
    finally:
        confused.stop()


def test_an_mx_host_that_is_an_alias_elsewhere_is_followed(relay, nexthop,
                                                            tmp_path: Path) -> None:
    """An MX host whose name is a CNAME to a name of another zone: the name server of the
    domain (which does not recurse) answers the address query with the CNAME alone; the
    relay asks for the target's address, as a resolver would (RFC 1034 section 3.6.2), and
    delivers.  Twisted's answer held no A record: "no MX host has an address", bounced."""
    hop, port = nexthop()
    zone = DNSServer(tmp_path / "alias-dns", "test", [
        ["alias.test", "MX", 10, "mx.alias.test"], ["mx.alias.test", "CNAME", "mail.other"],
        ["mail.other", "REFUSED"],  # (not its zone: the next name server is asked)
    ])
    other = DNSServer(tmp_path / "other-dns", "other", [["mail.other", "A", "127.0.0.1"]])
    try:
        r = relay(config(zone, routes=[{"domain": "alias.test", "backend": "smtp",
                                        "nexthop": f"alias.test:{port}"}], after=(other,)))
        qid = submit(r, "alice@sender.test", ["user@alias.test"], message("alias"))
        m = waitResult(r, qid, "user@alias.test")
        assert (m["status"], m["relay"]) == ("sent", f"mx.alias.test[127.0.0.1]:{port}"), m[0]
        assert ("mx.alias.test", "A") in zone.queries()
        assert ("mail.other", "A") in other.queries()
        hop.waitTo("user@alias.test")
    finally:
        zone.stop()
        other.stop()


def test_the_addresses_of_many_mx_hosts_are_looked_up_as_far_as_needed(
        relay, nexthop, tmp_path: Path) -> None:
    """A domain with 120 MX records: their addresses are asked ten hosts at a time, in
    preference order, until enough are known -- not 240 queries (a UDP socket each) at
    once, which hundreds of MX records, any domain's to publish, turned into descriptors
    running out -- and at most those of the first 100 hosts (Postfix's
    dns_rr_list_limit)."""
    hop, port = nexthop()
    records: list[list] = []
    for n in range(120):
        records.append(["many.test", "MX", n, f"h{n}.many.test"])
        # The first 15 hosts have no address (a TXT record only: no data).
        records.append([f"h{n}.many.test", *(["TXT", "none"] if n < 15 else ["A", "127.0.0.1"])])
    zone = DNSServer(tmp_path / "many-dns", "test", records)
    try:
        r = relay(config(zone, routes=[{"domain": "many.test", "backend": "smtp",
                                        "nexthop": f"many.test:{port}"}]))
        qid = submit(r, "alice@sender.test", ["user@many.test"], message("many"))
        m = waitResult(r, qid, "user@many.test")
        assert (m["status"], m["relay"]) == ("sent", f"h15.many.test[127.0.0.1]:{port}"), m[0]
        asked = {name for name, kind in zone.queries() if kind in ("A", "AAAA")}
        # Five addresses are wanted ([delivery] mx_address_limit), IPv6 ones too (both
        # families kept under the limit: more than half of it of each looked for): none
        # has one, so every round to the 100th host (h0-h99), never beyond.
        assert asked == {f"h{n}.many.test" for n in range(100)}, sorted(asked)
        hop.waitTo("user@many.test")
    finally:
        zone.stop()


def test_the_relay_among_many_mx_hosts_of_its_preference_is_found(relay,
                                                                  tmp_path: Path) -> None:
    """91 MX hosts of one preference, each with an IPv4 and an IPv6 address, one of them at
    the relay's own address: the relay is the best MX wherever the shuffle put it, and the
    mail bounces as a loop (5.4.6) with no connection (RFC 5321 section 5.1; Postfix's
    smtp_find_self() over the whole list, then smtp_truncate_self()).  Before, the
    addresses were looked up only until five were known (ten hosts): the relay, further
    down, was missed, and the mail went to its peers (here refused: deferred)."""
    port = freePort()
    records: list[list] = [["eq.test", "MX", 10, "me.eq.test"], ["me.eq.test", "A", "127.0.0.1"],
                           ["me.eq.test", "AAAA", "::1"]]
    for n in range(90):
        records += [["eq.test", "MX", 10, f"h{n}.eq.test"],
                    [f"h{n}.eq.test", "A", f"127.0.1.{n + 1}"], [f"h{n}.eq.test", "AAAA", "::1"]]
    zone = DNSServer(tmp_path / "eq-dns", "test", records)
    try:
        r = relay(config(zone, routes=[{"domain": "eq.test", "backend": "smtp",
                                        "nexthop": f"eq.test:{port}"}]),
                  "--listen", f"tcp:{port}:interface=127.0.0.1")
        _bouncedWithoutConnectingToItself(r, "eq.test", port)
        assert "cannot use" not in r.log()
        assert {name for name, kind in zone.queries() if kind == "A"} >= {
            f"h{n}.eq.test" for n in range(90)}
    finally:
        zone.stop()


def test_mx_hosts_less_preferred_than_the_relay_itself_are_not_tried(relay, tmp_path: Path) -> None:
    """An MX host whose name and address are not the relay's, but which turns out to be the
    relay (it answers EHLO with the relay's own name: the relay behind a NAT it was not told
    of), ends the list: RFC 5321 section 5.1 -- the client discards itself and every less
    preferred host, which may well send the mail back to it.  The mail waits for the better
    host (deferred), the backup gets nothing."""
    port = freePort()
    backup = Recorder()
    controller = _TCPController(backup, hostname="127.0.0.2", port=port, ready_timeout=10)
    controller.start()
    # (At the relay's own address it is known before any connection: see the next test.)
    me = _TCPController(Recorder(), hostname="127.0.0.4", port=port, ready_timeout=10,
                        server_hostname="relay.test")
    me.start()
    zone = DNSServer(tmp_path / "loop-dns", "test", [
        ["loop.test", "MX", 10, "down.loop.test"], ["down.loop.test", "A", "127.0.0.3"],
        ["loop.test", "MX", 20, "me.loop.test"], ["me.loop.test", "A", "127.0.0.4"],
        ["loop.test", "MX", 30, "backup.loop.test"], ["backup.loop.test", "A", "127.0.0.2"],
    ])
    try:
        r = relay(config(zone, routes=[{"domain": "loop.test", "backend": "smtp",
                                        "nexthop": f"loop.test:{port}"}]),
                  "--listen", f"tcp:{port}:interface=127.0.0.1")
        qid = submit(r, "alice@sender.test", ["user@loop.test"], message("backup"))
        m = waitResult(r, qid, "user@loop.test")
        assert "replied to EHLO with my own hostname relay.test" in r.log()
        assert m["status"] == "deferred", m[0]
        assert m["diagnostic"] == f"X-mailrelay; mail for loop.test:{port} loops back to myself"
        assert "backup.loop.test" not in r.log()
        assert backup.attempts == [] and backup.accepted == []
        assert r.queued() == [qid]
    finally:
        zone.stop()
        controller.stop()
        me.stop()


def test_mx_address_limit_counts_no_address_of_the_relay_itself(relay, nexthop,
                                                                 tmp_path: Path) -> None:
    """mx_address_limit = 2, the MX hosts a dead one, a live one and, least preferred, the
    relay itself (its name) with an IPv6 address: the two addresses tried are the dead and
    the live host's, as Postfix drops itself (smtp_find_self, smtp_truncate_self) before
    the limit (smtp_balance_inet_proto).  Before, the relay's own IPv6 address took the
    IPv6 place under the limit, was dropped, and only the dead host was tried: deferred."""
    hop, port = nexthop(host="127.0.0.2")
    zone = DNSServer(tmp_path / "lim-dns", "test", [
        ["lim.test", "MX", 10, "dead.lim.test"], ["dead.lim.test", "A", "127.0.0.3"],
        ["lim.test", "MX", 20, "live.lim.test"], ["live.lim.test", "A", "127.0.0.2"],
        ["lim.test", "MX", 30, "relay.test"], ["relay.test", "AAAA", "::1"],
    ])
    try:
        r = _sentUnderAddressLimitOf2(relay, zone, "lim.test", port,
                                      f"live.lim.test[127.0.0.2]:{port}")
        assert f"cannot use dead.lim.test[127.0.0.3]:{port}" in r.log()
        hop.waitTo("user@lim.test")
    finally:
        zone.stop()


def _sentUnderAddressLimitOf2(relay, zone: DNSServer, domain: str, port: int,  # noqa: ANN001
                              sentTo: str) -> RelayProcess:
    """A relay with C{mx_address_limit = 2}, resolving with C{zone}, routing C{domain} by MX
    lookup to C{port}: a message to user@C{domain} is sent to C{sentTo} (its log's relay=)."""
    r = relay(config(zone, delivery={"mx_address_limit": 2},
                     routes=[{"domain": domain, "backend": "smtp",
                              "nexthop": f"{domain}:{port}"}]))
    qid = submit(r, "alice@sender.test", [f"user@{domain}"], message(domain))
    m = waitResult(r, qid, f"user@{domain}")
    assert (m["status"], m["relay"]) == ("sent", sentTo), m[0]
    return r


def test_an_mx_host_at_the_relays_own_address_is_the_relay_itself(relay, nexthop,
                                                                   tmp_path: Path) -> None:
    """An MX host whose address and port are the relay's own listener's is the relay itself,
    whatever its name: it and every less preferred host are dropped before any connection
    (RFC 5321 section 5.1; Postfix's smtp_find_self compares the MX addresses with its own,
    own_inet_addr_list).  The relay connected to itself and only its EHLO name told it; the
    best MX at its address: the mail loops (5.4.6), bounced without a connection."""
    backup, port = nexthop(host="127.0.0.2")
    zone = DNSServer(tmp_path / "self-dns", "test", [
        ["self.test", "MX", 10, "down.self.test"], ["down.self.test", "A", "127.0.0.3"],
        ["self.test", "MX", 20, "other-name.self.test"],
        ["other-name.self.test", "A", "127.0.0.1"],
        ["self.test", "MX", 30, "backup.self.test"], ["backup.self.test", "A", "127.0.0.2"],
        ["best.test", "MX", 10, "other-name.self.test"],
        ["best.test", "MX", 20, "backup.self.test"],
    ])
    try:
        r = relay(config(zone, routes=[
            {"domain": "self.test", "backend": "smtp", "nexthop": f"self.test:{port}"},
            {"domain": "best.test", "backend": "smtp", "nexthop": f"best.test:{port}"}]),
            "--listen", f"tcp:{port}:interface=127.0.0.1")
        qid = submit(r, "alice@sender.test", ["user@self.test"], message("backup"))
        m = waitResult(r, qid, "user@self.test")
        assert m["status"] == "deferred", m[0]
        assert m["diagnostic"] == "X-mailrelay; connection refused by down.self.test", m[0]
        best = submit(r, "<>", ["user@best.test"], message("best"))
        m = waitResult(r, best, "user@best.test")
        assert (m["status"], m["diagnostic"]) == (
            "bounced", f"X-mailrelay; mail for best.test:{port} loops back to myself"), m[0]
        log = r.log()
        assert "replied to EHLO with my own hostname" not in log, log
        assert "other-name.self.test[" not in log and "backup.self.test" not in log, log
        assert backup.attempts == [] and backup.accepted == []
    finally:
        zone.stop()


# ---------------------------------------------------------------------------------------------
# 8. LMTP over a UNIX socket, one reply per recipient


def test_lmtp_per_recipient_results(relay, nexthop, dns) -> None:
    store, path = nexthop(lmtp=True)
    store.dataReply = lambda received, n: [
        "550 5.1.1 no such mailbox" if rcpt.startswith("carol@") else "250 2.0.0 delivered"
        for rcpt in received.rcptTos
    ]
    notices, noticePort = nexthop()
    r = relay(config(dns, routes=[
        {"domain": "lmtp.test", "backend": "lmtp", "nexthop": f"unix:{path}"},
        smtpRoute("sender.test", noticePort),
    ]))
    qid = submit(r, "alice@sender.test", ["bob@lmtp.test", "carol@lmtp.test"],
                 message("lmtp", "the body\r\n"), mailOptions=("RET=FULL",))
    bob = waitResult(r, qid, "bob@lmtp.test")
    carol = waitResult(r, qid, "carol@lmtp.test")
    assert (bob["status"], bob["diagnostic"]) == ("sent", "smtp; 250 2.0.0 delivered"), bob[0]
    assert (carol["status"], carol["diagnostic"]) == (
        "bounced", "smtp; 550 5.1.1 no such mailbox (in reply to end of DATA command)"), carol[0]
    (attempt,) = store.attempts  # one LMTP transaction for both
    assert attempt.rcptTos == ["bob@lmtp.test", "carol@lmtp.test"]
    assert b"Subject: lmtp\r\n" in attempt.content
    dsnID = bounceID(r, qid)
    waitRemoved(r, dsnID)
    (bounce,) = notices.waitTo("alice@sender.test")
    assert bounce.mailFrom == "<>"
    _, _, (block,), _ = parseReport(bounce.content)
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; carol@lmtp.test", "failed", "5.1.1")
    assert unfold(block["Diagnostic-Code"]) == "smtp; 550 5.1.1 no such mailbox"
    # RET=FULL: the whole original comes back, as the relay spooled it (what LMTP got).
    returned = parseReport(bounce.content)[3][2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" \
        + attempt.content + b"\r\n--" in bounce.content
    waitEmpty(r)


class _LimitedHop(Recorder):
    """A next hop taking at most 100 recipients per transaction, answering 452 4.5.3 to
    those beyond (as most providers do; RFC 5321 4.5.3.1.8 asks for 100 at least)."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= 100:
            return "452 4.5.3 Error: too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def test_many_recipients_are_sent_in_transactions_of_fifty(relay, dns) -> None:
    """A message to 250 recipients of one next hop that takes 100 per transaction: all are
    delivered at the first attempt, in transactions of at most 50 recipients (Postfix's
    default_destination_recipient_limit).  All 250 went in one transaction: 150 were
    deferred, and a 1000-recipient message took ten attempts, hours of backoff."""
    hop = _LimitedHop()
    controller = _TCPController(hop, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    try:
        r = relay(config(dns, routes=[smtpRoute("example.org", controller.port)])
                  + "[limits]\nrecipients = 1000\n")
        recipients = [f"r{i}@example.org" for i in range(250)]
        qid = submit(r, "alice@sender.test", recipients, message("many"))
        waitRemoved(r, qid, timeout=60)
        assert "status=deferred" not in r.log()
        assert sorted(a for m in hop.accepted for a in m.rcptTos) == sorted(recipients)
        assert max(len(m.rcptTos) for m in hop.accepted) == 50
    finally:
        controller.stop()


# ---------------------------------------------------------------------------------------------
# 9. Maildir


def test_maildir(relay, dns, tmp_path: Path) -> None:
    """Copies land in the users' Maildirs (created in their directories).  A user without a
    directory is refused at RCPT (550 5.1.1, as Postfix's smtpd_reject_unlisted_recipient:
    no bounce to a forged sender); one whose directory went away after the 250 bounces 5.1.1
    and nothing is made for it ([delivery] create_mailboxes = false, the default: remote
    senders do not create directories).  With recipient_delimiter = "+", carol+news@ is
    carol's."""
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    for user in ("maildir.test/bob", "maildir.test/carol", "maildir.test/dave",
                 "sender.test/alice"):
        (tmp_path / "mail" / user).mkdir(parents=True)
    routes = [{"domain": "maildir.test", "backend": "maildir", "nexthop": template},
              {"domain": "sender.test", "backend": "maildir", "nexthop": template}]
    delivery = {"recipient_delimiter": "+"}
    r = relay(config(dns, hold=True, routes=routes, delivery=delivery))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail("alice@sender.test")
        assert s.rcpt("erin@maildir.test") == (550, b"5.1.1 Error: user unknown (no mailbox here)")
        code, text = s.rcpt('"../erin"@maildir.test')
        assert (code, text[:6]) == (550, b"5.1.3 "), text
        assert s.rcpt("bob@maildir.test") == (250, b"2.1.5 Ok")
        assert s.rcpt("bob+lists@maildir.test") == (250, b"2.1.5 Ok")
        assert s.rcpt("erin+lists@maildir.test")[0] == 550
    r.waitForLog(r"NOQUEUE: reject: RCPT from \S+: 550 5\.1\.1 Error: user unknown \(no mailbox "
                 r"here\); from=<alice@sender\.test> to=<erin@maildir\.test>")
    assert not (tmp_path / "mail" / "maildir.test" / "erin").exists()
    qid = submit(r, "alice@sender.test", ["Bob@maildir.test", "carol+news@maildir.test",
                                           "dave@maildir.test"],
                 message("to a maildir", "Line\r\n.dot\r\n"))
    (tmp_path / "mail" / "maildir.test" / "dave").rmdir()  # dave leaves after the 250
    original = spooled(r, qid)
    release(r, config(dns, routes=routes, delivery=delivery))
    for rcpt in ("Bob@maildir.test", "carol+news@maildir.test"):
        assert waitResult(r, qid, rcpt)["status"] == "sent"
    dave = waitResult(r, qid, "dave@maildir.test")
    assert (dave["status"], dave["diagnostic"]) == (
        "bounced", "X-mailrelay; unknown user: no mailbox for dave@maildir.test"), dave[0]
    assert not (tmp_path / "mail" / "maildir.test" / "dave").exists()
    waitRemoved(r, qid)
    bounces = tmp_path / "mail" / "sender.test" / "alice" / "Maildir" / "new"
    deadline = time.monotonic() + 30
    while not (bounces.is_dir() and any(bounces.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    (bounce,) = list(bounces.iterdir())
    assert b"dave@maildir.test" in bounce.read_bytes()
    for local, address in (("bob", "Bob@maildir.test"), ("carol", "carol+news@maildir.test")):
        box = tmp_path / "mail" / "maildir.test" / local / "Maildir"
        (copy,) = list((box / "new").iterdir())
        assert list((box / "tmp").iterdir()) == [] and list((box / "cur").iterdir()) == []
        assert copy.read_bytes() == (
            f"Return-Path: <alice@sender.test>\nDelivered-To: {address}\n".encode()
            + original.replace(b"\r\n", b"\n"))
    waitEmpty(r)


# ---------------------------------------------------------------------------------------------
# 10. kill -9 with messages queued: nothing lost


def test_kill9_with_queued_messages_loses_nothing(relay, nexthop, dns) -> None:
    port = freePort()  # nothing listens there yet: connections are refused
    routes = [smtpRoute("example.org", port)]
    r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 2}, routes=routes))
    ids = [submit(r, "alice@sender.test", ["bob@example.org"], message(f"kill {i}"))
           for i in range(5)]
    for qid in ids:
        m = waitResult(r, qid, "bob@example.org")
        assert m["status"] == "deferred" and "refused" in m["diagnostic"], m[0]
        assert m["relay"] == "none", m[0]  # (no server answered: Postfix's relay=none)
    r.kill9()
    assert r.queued() == sorted(ids)

    hop, _ = nexthop(port=port)
    r.start()
    for qid in ids:
        waitRemoved(r, qid, timeout=20)
    # The next hop records a message before it answers 250, so everything it accepted is
    # recorded by the time the relay has removed the entries: exactly once each.
    got = sorted(re.search(rb"with ESMTP id (\w+)", m.content).group(1).decode()
                 for m in hop.accepted)
    assert got == sorted(ids)
    waitEmpty(r)


# ---------------------------------------------------------------------------------------------
# 11. Dot-stuffing across the client's chunk boundary


DOT_LINES = [b".\r\n", b".x\r\n", b"..\r\n", b"...\r\n"]


def test_dot_lines_at_chunk_boundary(relay, nexthop, dns) -> None:
    """Lines starting with "." at every offset from CHUNK_SIZE - 3 to CHUNK_SIZE + 3 of the
    spooled file (the client reads the file in CHUNK_SIZE pieces), including the boundary
    between CR and LF: each message's body is one dot line repeated, after a first line whose
    length shifts the pattern by one octet per message."""
    hop, port = nexthop()
    routes = [smtpRoute("example.org", port)]
    r = relay(config(dns, hold=True, routes=routes))
    bodies = {}
    for line in DOT_LINES:
        for shift in range(len(line)):
            body = b"s" * shift + b"\r\n" + line * ((CHUNK_SIZE + 2000) // len(line))
            qid = submit(r, "alice@sender.test", ["bob@example.org"],
                         message(f"dots {line!r} {shift}", "") + body)
            bodies[qid] = line
    originals = {qid: spooled(r, qid) for qid in bodies}
    # The test covers what it claims: for each dot line, some message has it starting at each
    # offset around the boundary.
    for line in DOT_LINES:
        covered = {o for qid, text in originals.items() if bodies[qid] == line
                   for o in range(CHUNK_SIZE - 3, CHUNK_SIZE + 4)
                   if text[o - 2:o] == b"\r\n" and text[o:o + len(line)] == line}
        assert covered == set(range(CHUNK_SIZE - 3, CHUNK_SIZE + 4)), (line, covered)
    assert all(CHUNK_SIZE + 1000 < len(t) < 2 * CHUNK_SIZE for t in originals.values())
    release(r, config(dns, routes=routes))
    for qid in originals:
        waitRemoved(r, qid, timeout=30)
    assert all(results(r, qid, "bob@example.org")[0][1] == "sent" for qid in originals)
    byID = {re.search(rb"with ESMTP id (\w+)", m.content).group(1).decode(): m.content
            for m in hop.accepted}
    assert sorted(byID) == sorted(originals)
    for qid, text in originals.items():
        assert byID[qid] == text, qid
    waitEmpty(r)


def test_bcc_and_the_other_dropped_fields_never_leave(relay, nexthop, dns) -> None:
    """A message whose header section carries Bcc:, Resent-Bcc:, Return-Path: and
    Content-Length: (an MUA that leaves its Bcc: in, a message resent as it was delivered):
    they are removed, as Postfix's cleanup removes message_drop_headers from every message,
    the rest byte for byte.  Bcc: went to every recipient, naming the hidden ones.  With
    relay.drop_headers = [] they are kept."""
    hop, port = nexthop()
    fields = (b"From: alice@sender.test\r\nBcc: hidden@example.org\r\n"
              b"Return-Path: <forged@sender.test>\r\nSubject: s\r\n"
              b"Content-Length: 3\r\nresent-bcc: other@example.org,\r\n third@example.org\r\n")
    body = b"\r\nBcc: in the body stays\r\n"
    routes = [smtpRoute("example.org", port)]
    r = relay(config(dns, routes=routes))
    submit(r, "alice@sender.test", ["bob@example.org", "hidden@example.org"], fields + body)
    [got] = hop.waitTo("bob@example.org")
    head, _, rest = got.content.partition(b"\r\n\r\n")
    kept = b"\r\n".join(line for line in head.split(b"\r\n")
                        if not line.startswith((b"Received:", b"\t", b" ", b"Message-Id:",
                                                b"Date:", b"Resent-Message-Id:",
                                                b"Resent-Date:")))
    assert kept == b"From: alice@sender.test\r\nSubject: s", got.content
    # (Resent-Bcc: makes it a resent message, dropped or not: as Postfix's cleanup, which
    # looks at a field before it drops it, the relay adds Resent-Message-Id: and -Date:.)
    assert b"\r\nResent-Message-Id: <" in head and b"\r\nMessage-Id:" not in head
    assert b"\r\n" + rest == body
    r.stop()

    r = relay(config(dns, routes=routes) + "[relay]\ndrop_headers = []\n")
    submit(r, "alice@sender.test", ["carol@example.org"], fields + body)
    [got] = hop.waitTo("carol@example.org")
    assert fields in got.content


def test_an_mx_host_at_the_address_of_a_socket_systemd_passed_is_the_relay(
        relay, tmp_path: Path) -> None:
    """The relay listening only on a socket systemd passed it (socket activation), and an MX
    host of another name at that socket's address and port: the relay itself, known by its
    address before any connection (Postfix's smtp_find_self), as for a tcp: listener -- the
    mail bounces as a loop (5.4.6) and the relay never connects to itself.  Before, such a
    listener gave no address, and only the EHLO check, once connected, found the loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    zone = DNSServer(tmp_path / "self-dns", "test", [
        ["self.test", "MX", 10, "other.self.test"], ["other.self.test", "A", "127.0.0.1"],
    ])
    try:
        r = relay(config(zone, routes=[{"domain": "self.test", "backend": "smtp",
                                        "nexthop": f"self.test:{port}"}]),
                  "--listen", "systemd:domain=INET:index=0", systemdSocket=sock)
        sock.close()  # (the relay has its own)
        assert r.port == port
        _bouncedWithoutConnectingToItself(r, "self.test", port)
    finally:
        sock.close()
        zone.stop()


def test_an_mx_host_at_an_ipv4_mapped_address_of_the_relay_is_the_relay(
        relay, tmp_path: Path) -> None:
    """An MX host of another name whose only address is an AAAA record holding the relay's
    own IPv4 address mapped (C{::ffff:127.0.0.1}: a connection to it goes to 127.0.0.1) is
    the relay itself, known before any connection (Postfix's smtp_find_self compares the
    address as IPv4): the best MX, the mail bounces as a loop (5.4.6).  Before, the relay
    connected to itself and only its EHLO name told it."""
    port = freePort()
    zone = DNSServer(tmp_path / "mapped-dns", "test", [
        ["mapped.test", "MX", 10, "other.mapped.test"],
        ["other.mapped.test", "AAAA", "::ffff:127.0.0.1"],
    ])
    try:
        r = relay(config(zone, routes=[{"domain": "mapped.test", "backend": "smtp",
                                        "nexthop": f"mapped.test:{port}"}]),
                  "--listen", f"tcp:{port}:interface=127.0.0.1")
        _bouncedWithoutConnectingToItself(r, "mapped.test", port)
    finally:
        zone.stop()


def _bouncedWithoutConnectingToItself(r: RelayProcess, domain: str, port: int) -> None:
    """A message to user@C{domain}, routed by MX lookup to C{port}, bounces as a loop (the
    relay is the best MX, 5.4.6) with no connection of the relay to itself: known by its
    address, not by its EHLO name."""
    qid = submit(r, "alice@sender.test", [f"user@{domain}"], message(domain))
    m = waitResult(r, qid, f"user@{domain}")
    assert (m["status"], m["diagnostic"]) == (
        "bounced", f"X-mailrelay; mail for {domain}:{port} loops back to myself"), m[0]
    log = r.log()
    assert "replied to EHLO with my own hostname" not in log, log
    # (One session: the submission's.)
    assert len(re.findall(r"receive\.protocol#info\] connect from", log)) == 1, log


@pytest.mark.skipif(not _hasIPv6Loopback(), reason="no IPv6 loopback address")
def test_the_addresses_kept_under_mx_address_limit_hold_both_families(
        relay, nexthop, tmp_path: Path) -> None:
    """A destination whose best MX hosts have IPv6 addresses only, which do not answer, and
    a backup with an IPv4 one that does, under mx_address_limit = 2: the two addresses
    tried are one of each family (Postfix's smtp_balance_inet_protocols), so the mail goes
    to the IPv4 host.  Before, the two IPv6 addresses were all that was tried: deferred."""
    hop, port = nexthop()  # (on 127.0.0.1 only: [::1] of the same port refuses)
    zone = DNSServer(tmp_path / "six-dns", "test", [
        ["six.test", "MX", 10, "a.six.test"], ["a.six.test", "AAAA", "::1"],
        ["six.test", "MX", 20, "b.six.test"], ["b.six.test", "AAAA", "::1"],
        ["six.test", "MX", 30, "c.six.test"], ["c.six.test", "A", "127.0.0.1"],
    ])
    try:
        r = _sentUnderAddressLimitOf2(relay, zone, "six.test", port,
                                      f"c.six.test[127.0.0.1]:{port}")
        assert f"cannot use a.six.test[::1]:{port}" in r.log()
        assert "b.six.test" not in r.log()
        hop.waitTo("user@six.test")
    finally:
        zone.stop()
