"""End-to-end: message transparency through the real C{twistd -n mailrelay}.

What reaches the next hop is what the client sent, byte for byte, plus the relay's own
fields (C{Received:} on top; C{Message-Id:} and C{Date:} at the end of the header section
when missing), and a client's DKIM signature still verifies there.  The messages come from a
seeded generator (odd folding, lines of 996 to 998 octets, lines starting with C{.}, C{..},
C{From }, a body of only C{.}, no final CRLF, empty bodies, header sections only, 8-bit and
invalid UTF-8 text, SMTPUTF8 header fields, MIME with 8bit parts), sent by DATA in pieces of
random sizes or in BDAT chunks cut inside CRLF and inside C{CRLF.CRLF}, to a next hop that
records the octets it gets (L{RawHop}) and offers a given set of extensions:

  - with 8BITMIME (or SMTPUTF8 alone, which implies it: RFC 6531 section 3.1), everything
    arrives as sent (by DATA, dot-stuffed, or by BDAT when CHUNKING is offered);
  - without 8BITMIME, 8-bit messages arrive converted to 7 bits (the same content once
    decoded), or are returned when they cannot be: DKIM-signed (5.6.3, the signature would
    break), 8-bit header fields (5.6.3), SMTPUTF8 needed and not offered (5.6.7, RFC 6531
    section 3.2).
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import random
import re
import socket
import threading
import time
from dataclasses import dataclass

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.test_e2e_outbound import (
    config,
    dns,  # noqa: F401 - the module's DNS server fixture
    relay,  # noqa: F401 - the relay fixture
    smtpRoute,
)

# ---------------------------------------------------------------------------------------------
# A next hop that records the exact octets


@dataclass
class Got:
    mail: bytes  # the MAIL command, without CRLF
    rcpts: list[bytes]
    content: bytes  # un-stuffed (DATA) or the chunks joined (BDAT)
    how: str  # "DATA" or "BDAT"


class RawHop:
    """An SMTP server on 127.0.0.1 (asyncio, in a thread) offering C{extensions} and keeping
    every message it gets as the octets that came."""

    def __init__(self, extensions: tuple[str, ...]) -> None:
        self.extensions = extensions
        self.got: list[Got] = []
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._session, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "the next hop did not start"

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 hop.test ESMTP\r\n")
        mail, rcpts, chunks = b"", [], []
        try:
            while True:
                line = await r.readuntil(b"\r\n")
                verb = line[:4].upper()
                if verb == b"EHLO":
                    lines = ["hop.test", *self.extensions]
                    w.write(b"".join(f"250{' ' if i == len(lines) - 1 else '-'}{x}\r\n".encode()
                                     for i, x in enumerate(lines)))
                elif verb == b"MAIL":
                    mail, rcpts, chunks = line[:-2], [], []
                    w.write(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line[:-2])
                    w.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    w.write(b"354 go\r\n")
                    lines = []
                    while (data := await r.readuntil(b"\r\n")) != b".\r\n":
                        lines.append(data[1:] if data.startswith(b".") else data)
                    self._keep(Got(mail, rcpts, b"".join(lines), "DATA"))
                    w.write(b"250 2.0.0 ok\r\n")
                elif verb == b"BDAT":
                    m = re.fullmatch(rb"BDAT (\d+)( LAST)?\r\n", line, re.I)
                    assert m, line
                    chunks.append(await r.readexactly(int(m.group(1))))
                    if m.group(2):
                        self._keep(Got(mail, rcpts, b"".join(chunks), "BDAT"))
                    w.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 2.0.0 bye\r\n")
                    await w.drain()
                    break
                else:
                    w.write(b"250 2.0.0 ok\r\n")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    def _keep(self, got: Got) -> None:
        with self.cond:
            self.got.append(got)
            self.cond.notify_all()

    def waitFor(self, count: int, timeout: float = 20.0) -> list[Got]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.got) < count and time.monotonic() < deadline:
                self.cond.wait(0.2)
            return list(self.got)


@pytest.fixture
def rawhop():
    started: list[RawHop] = []

    def start(extensions: tuple[str, ...]) -> RawHop:
        started.append(RawHop(extensions))
        return started[-1]

    yield start
    for hop in started:
        hop.stop()


# ---------------------------------------------------------------------------------------------
# The messages


_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
_PRIVATE = _KEY.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
_RECORD = b"v=DKIM1; k=rsa; p=" + base64.b64encode(_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _dnsTXT(name: bytes, timeout: int = 5) -> bytes:
    assert name == b"s1._domainkey.sender.test.", name
    return _RECORD


KINDS = ("fold", "long", "dots", "from", "onlydot", "nofinal", "empty", "headersonly",
         "8bit", "utf8", "multipart", "soup", "trailing")


@dataclass
class Sample:
    number: int
    kind: str
    content: bytes  # as the client sends it (DATA: before dot-stuffing)
    eightBit: bool  # BODY=8BITMIME
    smtputf8: bool  # SMTPUTF8, with a UTF-8 header field
    signed: bool

    @property
    def rcpt(self) -> str:
        return f"m{self.number}@example.org"


def _line(rng: random.Random, length: int) -> bytes:
    return bytes(rng.choice(b"abcXYZ .=-\t") for _ in range(length)).lstrip(b"\t") or b"x"


def sample(rng: random.Random, number: int) -> Sample:
    """One generated message: its kind decides what is odd in it."""
    kind = KINDS[number % len(KINDS)]
    headers = [b"From: Alice <alice@sender.test>", b"To: m%d@example.org" % number,
               b"Subject: sample %d (%s)" % (number, kind.encode())]
    lines: list[bytes] = [b"Hello."]
    if kind == "fold":
        headers += [b"X-Fold: a\r\n\t b\r\n        c  \r\n d", b"X-Empty:", b"X-Tab:\tvalue",
                    b"X-Spaced : field"]
    elif kind == "long":
        headers += [b"X-Long: " + b"a" * (998 - 8),
                    b"X-Folded: " + b"\r\n ".join(b"w" * rng.randint(50, 990) for _ in range(3))]
        lines += [_line(rng, n)[:n].ljust(n, b"y") for n in (996, 997, 998, rng.randint(1, 998))]
        lines.append(b"." + b"x" * 997)
    elif kind == "dots":
        lines += [b".", b"..", b"...", b". ", b".x", b"", b".", b"x."]
    elif kind == "from":
        lines += [b"From me", b">From you", b"From ", b"from x"]
    elif kind == "onlydot":
        lines = [b"."]
    elif kind == "8bit":
        lines += ["héllo wörld €".encode(), b"\xff\xfe invalid \xc3\x28 UTF-8 \x80"]
    elif kind == "utf8":
        headers.append("X-Utf8: ünïcødé".encode())
        lines.append("ça va".encode())
    elif kind == "multipart":
        headers += [b"MIME-Version: 1.0", b'Content-Type: multipart/mixed; boundary="BB"']
        lines = [b"preamble", b"--BB", b"Content-Type: text/plain; charset=utf-8",
                 b"Content-Transfer-Encoding: 8bit", b"", "ça va".encode(), b"..dot", b"--BB",
                 b"Content-Type: application/octet-stream", b"Content-Transfer-Encoding: base64",
                 b"", b"AAAA", b"--BB--", b"epilogue"]
    elif kind == "soup":
        lines += [_line(rng, rng.randint(1, 200)) for _ in range(20)]
    elif kind == "trailing":
        headers.append(b"X-Spaces:   \t  ")
        lines += [b"  ", b"\t", b"trailing   ", b"", b"", b""]
    content = b"\r\n".join(headers) + b"\r\n"
    if kind == "empty":
        content += b"\r\n"
    elif kind != "headersonly":
        content += b"\r\n" + b"\r\n".join(lines) + b"\r\n"
    if kind == "nofinal" or rng.random() < 0.2 and kind not in ("headersonly", "empty"):
        content += b"last line, no CRLF"
    signed = rng.random() < 0.5 and kind != "fold"  # (dkimpy refuses "X-Spaced :")
    if signed:
        content = dkim.sign(content, b"s1", b"sender.test", _PRIVATE,
                            include_headers=[b"from", b"to", b"subject"]) + content
    return Sample(number, kind, content, not content.isascii(), kind == "utf8", signed)


# ---------------------------------------------------------------------------------------------
# The client


def _reply(f) -> bytes:
    lines = []
    while True:
        line = f.readline()
        assert line, "the relay closed the connection"
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def _cuts(rng: random.Random, content: bytes) -> list[bytes]:
    """C{content} in BDAT chunks, cut at random places, inside a CRLF and inside a
    CRLF.CRLF where there is one."""
    points = {rng.randint(0, len(content)) for _ in range(rng.randint(0, 3))}
    for marker, inside in ((b"\r\n", 1), (b"\r\n.\r\n", 3)):
        found = [m.start() + inside for m in re.finditer(re.escape(marker), content)]
        if found:
            points.add(rng.choice(found))
    points = sorted(p for p in points if 0 < p < len(content))
    return [content[a:b] for a, b in zip([0, *points], [*points, len(content)])]


def submit(port: int, s: Sample, rng: random.Random) -> str:
    """Send C{s} by DATA or BDAT; the queue id."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        f = sock.makefile("rb")
        _reply(f)
        sock.sendall(b"EHLO client.test\r\n")
        assert b"CHUNKING" in _reply(f)
        params = b" BODY=8BITMIME" * s.eightBit + b" SMTPUTF8" * s.smtputf8
        sock.sendall(b"MAIL FROM:<alice@sender.test>%s\r\nRCPT TO:<%s>\r\n"
                     % (params, s.rcpt.encode()))
        assert _reply(f).startswith(b"250") and _reply(f).startswith(b"250")
        if rng.random() < 0.5:
            sock.sendall(b"DATA\r\n")
            assert _reply(f).startswith(b"354")
            text = s.content if s.content.endswith(b"\r\n") else s.content + b"\r\n"
            wire = re.sub(rb"(?m)^\.", b"..", text) + b".\r\n"
            while wire:
                n = rng.randint(1, 2000)
                sock.sendall(wire[:n])
                wire = wire[n:]
            replies = [_reply(f)]
        else:
            chunks = _cuts(rng, s.content)
            sock.sendall(b"".join(b"BDAT %d%s\r\n%s" % (len(c), b" LAST" * (i == len(chunks) - 1), c)
                                  for i, c in enumerate(chunks)))
            replies = [_reply(f) for _ in chunks]
        sock.sendall(b"QUIT\r\n")
    m = re.match(rb"250 2\.0\.0 Ok: queued as (\w+)", replies[-1])
    assert m and all(r.startswith(b"250") for r in replies), (s.kind, replies)
    return m.group(1).decode()


# ---------------------------------------------------------------------------------------------
# The comparison


def withoutOurFields(got: bytes, sent: bytes) -> bytes:
    """C{got} without the relay's C{Received:} field on top and the C{Message-Id:}/C{Date:}
    it added (fields C{sent} does not have)."""
    lines = got.split(b"\r\n")
    assert lines[0].startswith(b"Received: from "), got[:300]
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    kept, skipping = [], False
    end = lines.index(b"", i) if b"" in lines[i:] else len(lines)
    for n, line in enumerate(lines[i:], i):
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = (n < end and line.split(b":")[0] in (b"Message-Id", b"Date")
                    and line not in sent.split(b"\r\n"))
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept)


def decodedParts(content: bytes) -> list[bytes]:
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    return [(p.get_payload(decode=True) or b"").replace(b"\r\n", b"\n")
            for p in msg.walk() if not p.is_multipart()]


# ---------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("extensions", [
    ("PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING"),
    ("PIPELINING", "8BITMIME", "SMTPUTF8"),
    ("SMTPUTF8",),
    ("PIPELINING",),
], ids=["chunking", "data", "smtputf8-only", "7bit"])
def test_generated_messages_arrive_as_sent(rawhop, relay, dns, extensions) -> None:  # noqa: F811
    # (rawhop first: the relay, stopped first, then finds its cached connections answered)
    hop = rawhop(extensions)
    routes = [smtpRoute("example.org", hop.port), smtpRoute("sender.test", hop.port)]
    r = relay(config(dns, routes=routes))
    rng = random.Random(20261202)
    samples = [sample(rng, n) for n in range(26)]
    queued = {submit(r.port, s, rng): s for s in samples}

    eightBitOK = "8BITMIME" in extensions or "SMTPUTF8" in extensions
    bounced = {s.rcpt: ("5.6.7" if s.smtputf8 and "SMTPUTF8" not in extensions else "5.6.3")
               for s in samples
               if s.smtputf8 and "SMTPUTF8" not in extensions
               or s.eightBit and not eightBitOK and (s.signed or s.kind == "utf8")}
    everything = hop.waitFor(len(samples))  # (a report for each message returned)
    arrived = {g.rcpts[0]: g for g in everything if g.mail != b"MAIL FROM:<>"}
    reports = [g for g in everything if g.mail == b"MAIL FROM:<>"]
    for queueID, s in queued.items():
        if s.rcpt in bounced:
            r.waitForLog(rf"{queueID}: to=<{s.rcpt}>, .* status=bounced")
            (report,) = [g for g in reports if b"; " + s.rcpt.encode() in g.content]
            assert f"Status: {bounced[s.rcpt]}".encode() in report.content, report.content
            continue
        got = arrived[f"RCPT TO:<{s.rcpt}>".encode()]
        sent = s.content if s.content.endswith(b"\r\n") else s.content + b"\r\n"
        assert got.how == ("BDAT" if "CHUNKING" in extensions else "DATA")
        assert (b" BODY=8BITMIME" in got.mail) == (s.eightBit and eightBitOK), (s.kind, got.mail)
        if s.eightBit and not eightBitOK:  # converted: the same once decoded, 7-bit
            assert got.content.isascii(), s.kind
            assert decodedParts(withoutOurFields(got.content, sent)) == decodedParts(sent)
            continue
        assert withoutOurFields(got.content, sent) == sent, s.kind
        if s.signed:
            assert dkim.verify(got.content, dnsfunc=_dnsTXT), s.kind


def _sendBinary(port: int, rcpt: str, content: bytes) -> None:
    """C{content} by BDAT with C{BODY=BINARYMIME}, in three chunks."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        f = sock.makefile("rb")
        _reply(f)
        sock.sendall(b"EHLO client.test\r\n")
        assert b"BINARYMIME" in _reply(f)
        third = len(content) // 3
        chunks = [content[:third], content[third:2 * third], content[2 * third:]]
        sock.sendall(b"MAIL FROM:<alice@sender.test> BODY=BINARYMIME\r\nRCPT TO:<%s>\r\n%s"
                     % (rcpt.encode(), b"".join(b"BDAT %d%s\r\n%s" % (len(c), b" LAST" * (i == 2), c)
                                                for i, c in enumerate(chunks))))
        replies = [_reply(f) for _ in range(5)]
        assert all(r.startswith(b"250") for r in replies), replies
        assert b"queued as" in replies[-1], replies


BINARY_TEXT = (b"From: Alice <alice@sender.test>\r\nTo: b@example.org\r\nSubject: binary, as text\r\n"
               b"\r\nNothing binary in it after all.\r\n.\r\n..\r\n")


@pytest.mark.parametrize("extensions", [("PIPELINING", "8BITMIME", "CHUNKING"), ("PIPELINING",)],
                         ids=["chunking", "data"])
def test_a_binary_message_that_is_text_goes_as_it_is(rawhop, relay, dns, extensions) -> None:  # noqa: F811
    """A message taken with C{BODY=BINARYMIME} (RFC 3030) that is 7-bit text (CRLF lines of
    998 octets at most, no NUL) needs no conversion for a next hop without BINARYMIME: it
    goes as it is, without the BODY parameter the hop does not offer.  It used to be
    returned with 5.6.3 ("the message is binary, which ... does not support")."""
    hop = rawhop(extensions)
    routes = [smtpRoute("example.org", hop.port), smtpRoute("sender.test", hop.port)]
    r = relay(config(dns, routes=routes)
              + '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nbinarymime = true\n',
              "--spool", "spool", "--hostname", "relay.test", defaults=False)
    _sendBinary(r.port, "b@example.org", BINARY_TEXT)
    (got,) = hop.waitFor(1)
    assert got.mail == b"MAIL FROM:<alice@sender.test>", r.log()
    assert got.rcpts == [b"RCPT TO:<b@example.org>"]
    assert withoutOurFields(got.content, BINARY_TEXT) == BINARY_TEXT


def test_a_binary_message_with_long_lines_is_encoded_for_a_hop_without_binarymime(
        rawhop, relay, dns) -> None:  # noqa: F811
    """BINARYMIME content may have lines of any length (RFC 3030 section 3); to a next hop
    without BINARYMIME (here by DATA) a part with lines over 998 octets (RFC 5321 section
    4.5.3.1.6) is encoded (base64), though it is ASCII; the other parts go as they are."""
    hop = rawhop(("PIPELINING", "8BITMIME"))
    routes = [smtpRoute("example.org", hop.port), smtpRoute("sender.test", hop.port)]
    r = relay(config(dns, routes=routes)
              + '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nbinarymime = true\n',
              "--spool", "spool", "--hostname", "relay.test", defaults=False)
    part = b"z" * 1500 + b"\r\n" + b"y" * 999
    message = (b"From: Alice <alice@sender.test>\r\nTo: b@example.org\r\nSubject: long\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
               b"--B\r\nContent-Type: text/plain\r\n\r\nshort\r\n"
               b"--B\r\nContent-Type: application/octet-stream\r\n\r\n" + part + b"\r\n"
               b"--B--\r\n")
    _sendBinary(r.port, "b@example.org", message)
    (got,) = hop.waitFor(1)
    assert got.mail == b"MAIL FROM:<alice@sender.test>", r.log()
    assert max(len(line) for line in got.content.split(b"\r\n")) <= 998
    parts = email.message_from_bytes(got.content, policy=email.policy.compat32).get_payload()
    assert [p.get_payload(decode=True) for p in parts] == [b"short", part]
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
