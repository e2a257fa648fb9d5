"""Unit tests: input that must not corrupt a message or the relay's memory (issue 7, point 4).

Through the Twisted protocol on a C{StringTransport} (L{mailrelay.testing.ServerHarness}), and
the sans-IO pieces directly.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import StampResult
from mailrelay.queue.dsn import _readOriginal
from mailrelay.receive.proxy import ProxyHeaderError, parseProxyHeader
from mailrelay.receive.rdns import hostsFileName, reverseLookup
from mailrelay.smtp.server import SessionSettings
from mailrelay.smtp.wire import DotStuffer
from mailrelay.stamping import (
    HEADER_SECTION_LIMIT,
    DefaultStamper,
    HeaderProcessor,
    parseHeaderSection,
)
from mailrelay.testing import ServerHarness, TLSStringTransport
from tests.test_stamping import FakeResolver
from tests.test_stamping import context as stampContext

DATA_START = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"


def sendMessage(h: ServerHarness, wire: bytes, cuts: tuple[int, ...] = ()) -> list[int]:
    """Send a whole transaction whose DATA part is C{wire} (as on the wire, with the final
    dot), cut into reads at C{cuts}; the reply codes."""
    h.replies()
    lines = h.send(DATA_START)
    prev = 0
    for cut in (*cuts, len(wire)):
        lines += h.send(wire[prev:cut])
        prev = cut
    return h.codes(lines)


# ---------------------------------------------------------------------------------------------
# Line length counted after un-stuffing (RFC 5321 4.5.3.1.6)


@pytest.mark.parametrize("cuts", [(), (1,), (2,), (500,), (999,), (1000,)])
@pytest.mark.parametrize("before", [b"", b"Subject: x\r\n\r\n"])
def test_998_octet_line_starting_with_a_dot_is_accepted(
    before: bytes, cuts: tuple[int, ...]
) -> None:
    h = ServerHarness()
    line = b"." + b"x" * 997
    wire = before + b"." + line + b"\r\n.\r\n"
    assert sendMessage(h, wire, tuple(len(before) + c for c in cuts)) == [250, 250, 250, 354, 250]
    (message,) = h.spool.messages()
    assert message.endswith(b"\r\n" + line + b"\r\n")


@pytest.mark.parametrize("before", [b"", b"Subject: x\r\n\r\n"])
def test_999_octet_line_after_unstuffing_is_refused(before: bytes) -> None:
    h = ServerHarness()
    wire = before + b".." + b"x" * 998 + b"\r\n.\r\n"
    assert sendMessage(h, wire)[-1] == 500
    assert h.spool.committed == {}


def test_long_line_starting_with_a_dot_split_over_a_huge_partial_line() -> None:
    # A partial line is processed before its end when it is very long; the count carries over.
    h = ServerHarness()
    wire = b"Subject: x\r\n\r\n.." + b"x" * 70000 + b"\r\n.\r\n"
    assert sendMessage(h, wire, (30, 66000))[-1] == 500


def test_client_sends_the_998_octet_dot_line_stuffed() -> None:
    line = b"." + b"x" * 997 + b"\r\n"
    stuffer = DotStuffer()
    wire = stuffer.feed(b"a\r\n" + line + line[:500]) + stuffer.feed(line[500:]) + stuffer.finish()
    assert wire == b"a\r\n." + line + b"." + line + b".\r\n"


def test_bounce_returns_a_message_with_the_998_octet_dot_line_in_full(tmp_path) -> None:
    message = b"Subject: x\r\n\r\n." + b"x" * 997 + b"\r\n"
    path = tmp_path / "m.eml"
    path.write_bytes(message)
    original = _readOriginal(path, True, 100000, "Q")
    assert original.contentType == "message/rfc822"
    assert (original.content, original.note) == (message, None)


# ---------------------------------------------------------------------------------------------
# Added header fields only at a field boundary, whatever the size of the header section

PREPENDED = b"Received: ours\r\n"
APPENDED = b"Message-Id: <added@relay.test>\r\nDate: now\r\n"


def stampThrough(
    message: bytes, limit: int, cuts: list[int]
) -> tuple[bytes, list[tuple[str, bytes]] | None]:
    """C{message} through a L{HeaderProcessor} in writes cut at C{cuts}: what it stores and the
    fields the stamper saw (C{None}: a header section longer than C{limit}, never stamped,
    nothing stored: the intake refuses it)."""
    out: list[bytes] = []
    seen: list[list[tuple[str, bytes]]] = []

    def stamp(headers: list[tuple[str, bytes]]) -> StampResult:
        seen.append(headers)
        return StampResult(prepend=[PREPENDED], append=[APPENDED])

    proc = HeaderProcessor(out.append, stamp, limit=limit)
    prev = 0
    for cut in sorted(set(cuts)) + [len(message)]:
        if cut > prev:
            proc.write(message[prev:cut])
            prev = cut
    proc.finish()
    if not proc.complete:
        assert seen == [] and out == []
        return b"", None
    assert len(seen) == 1
    return b"".join(out), seen[0]


def assertAddedAtFieldBoundary(message: bytes, stored: bytes) -> None:
    """C{stored} is C{message} with L{PREPENDED} on top and L{APPENDED} inserted where a line
    starts that does not continue the field before."""
    assert stored.startswith(PREPENDED)
    rest = stored[len(PREPENDED):]
    at = rest.find(APPENDED)
    assert at >= 0, rest
    assert at == 0 or rest[at - 2 : at] == b"\r\n", (at, rest[at - 10 : at + 10])
    after = rest[at + len(APPENDED) :]
    assert after[:1] not in (b" ", b"\t"), "inserted between a field and its continuation"
    if at == 0 and message[:1] in (b" ", b"\t"):
        assert after[:2] == b"\r\n", "no empty line before a body starting with white space"
        after = after[2:]
    assert rest[:at] + after == message
    assert stored.count(b"\r") == stored.count(b"\n") == stored.count(b"\r\n")


_headerLine = st.one_of(
    st.integers(min_value=0, max_value=60).map(lambda n: b"X-F: " + b"v" * n + b"\r\n"),
    st.integers(min_value=0, max_value=60).map(lambda n: b"\t" + b"c" * n + b"\r\n"),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(_headerLine, max_size=40),
    st.booleans(),
    st.integers(min_value=8, max_value=400),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
)
def test_added_fields_never_split_a_line_or_a_field(
    lines: list[bytes], ended: bool, limit: int, cuts: list[int]
) -> None:
    message = b"".join(lines) + (b"\r\nbody\r\n" if ended else b"")
    stored, fields = stampThrough(message, limit, cuts)
    if fields is not None:  # (else too long: refused)
        assertAddedAtFieldBoundary(message, stored)


@pytest.mark.parametrize("shift", range(-4, 5))
@pytest.mark.parametrize("continued", [False, True])
def test_header_section_around_the_real_limit(shift: int, continued: bool) -> None:
    # Fields of 100 octets after a first one of 100 + shift: a section of the limit + shift
    # octets, whose end falls at every offset of the line around the limit (mid-line,
    # before CR, between CR and LF, after LF).  Up to the limit it is stamped whole; past
    # it, not at all (the intake refuses the message: [limits] header_size).
    first = b"X-First: " + b"f" * (89 + shift) + b"\r\n"
    field = (b"\tcontinued" + b"c" * 88 if continued else b"X-Filler: " + b"y" * 88) + b"\r\n"
    count = (HEADER_SECTION_LIMIT - 100) // 100
    section = first + field * count
    assert len(section) == HEADER_SECTION_LIMIT + shift
    message = section + b"\r\nbody\r\n"
    everyPage = list(range(0, len(message), 4096))
    for cuts in ([], [HEADER_SECTION_LIMIT - 1], everyPage, [HEADER_SECTION_LIMIT + 1]):
        stored, fields = stampThrough(message, HEADER_SECTION_LIMIT, cuts)
        if shift > 0:
            assert fields is None
            continue
        assert fields is not None and b"".join(raw for _, raw in fields) == section
        assertAddedAtFieldBoundary(message, stored)


def test_parse_header_section_only_takes_complete_lines_and_fields() -> None:
    a, b = ("A", b"A: 1\r\n"), ("B", b"B: 2\r\n")
    assert parseHeaderSection(b"A: 1\r\nB: 2\r") == ([a], 6)
    assert parseHeaderSection(b"A: 1\r\nB: 2") == ([a], 6)
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\n") == ([a, b], 12)
    # A field whose continuation is not complete is not complete either.
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\n\tmore") == ([a], 6)
    # Beyond the limit, only whether the last field goes on is looked at.
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\n\tmore\r\nC: 3\r\n", limit=16) == ([a], 6)
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\nC: 3\r\n", limit=12) == ([a, b], 12)
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\nC: 3\r\n", limit=13) == ([a, b], 12)
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\n", limit=12) == ([a, b], 12)
    assert parseHeaderSection(b"A: 1\r\nB: 2\r\n \r\n\r\n", limit=100) == (
        [a, ("B", b"B: 2\r\n \r\n")], 15)


# ---------------------------------------------------------------------------------------------
# NUL in message data

SMUGGLED = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nforged\r\n"
NUL_REFUSED = b"550 5.6.0 Error: message contains NUL characters"


@pytest.mark.parametrize(
    "wire",
    [
        b"Subject: x\r\n\r\nfirst\r\n\0.\r\n" + SMUGGLED + b".\r\n",
        b"Subject: x\r\n\r\nfirst\r\n.\0\r\n" + SMUGGLED + b".\r\n",
        b"Subject: \0x\r\n\r\nbody\r\n.\r\n",
        b"\0\r\n.\r\n",
        b"Subject: x\r\n\r\nbody\0",
    ],
)
def test_nul_in_message_data_is_refused_by_default(wire: bytes) -> None:
    h = ServerHarness()
    if not wire.endswith(b".\r\n"):
        wire += b"\r\n.\r\n"
    h.replies()
    lines = h.send(DATA_START + wire)
    assert lines[-1] == NUL_REFUSED
    # One message, one final reply: the smuggled commands were message text.
    assert h.codes(lines) == [250, 250, 250, 354, 550]
    assert h.spool.committed == {}
    assert h.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]


def test_nul_refused_whatever_the_chunking() -> None:
    wire = b"Subject: x\r\n\r\n" + b"y" * 100 + b"\r\n\0.\r\n" + SMUGGLED + b".\r\n"
    for cut in range(len(wire)):
        h = ServerHarness()
        assert sendMessage(h, wire, (cut,)) == [250, 250, 250, 354, 550], cut


def test_nul_removed_when_the_listener_normalizes() -> None:
    h = ServerHarness(nulBytes="normalize")
    wire = b"Subject: \0x\r\n\r\nfirst\r\n\0.\r\n\0..two\r\n" + SMUGGLED + b".\r\n"
    assert sendMessage(h, wire) == [250, 250, 250, 354, 250]
    (message,) = h.spool.messages()
    assert b"\0" not in message
    # Removed after un-stuffing (the "." of a line starting with NUL is not stuffing).
    assert message.endswith(b"\r\n\r\nfirst\r\n.\r\n..two\r\n" + SMUGGLED)
    assert b"Subject: x\r\n" in message


# ---------------------------------------------------------------------------------------------
# Backpressure: replies the client does not read stop the reading of its commands


def test_protocol_is_the_streaming_producer_of_its_transport() -> None:
    h = ServerHarness()
    assert h.transport.producer is h.protocol and h.transport.streaming
    verifyObject(IPushProducer, h.protocol)


def test_output_blocked_pauses_reading_until_drained() -> None:
    h = ServerHarness()
    h.replies()
    h.protocol.pauseProducing()  # the transport's write buffer is full
    assert h.transport.producerState == "paused"
    h.protocol.resumeProducing()  # drained
    assert h.transport.producerState == "producing"


@pytest.mark.parametrize("drainedFirst", [False, True])
def test_pending_question_and_blocked_output_are_tracked_apart(drainedFirst: bool) -> None:
    h = ServerHarness()
    h.spool.holdCommits = True
    h.replies()
    h.send(DATA_START + b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert h.transport.producerState == "paused"  # a question is pending: the commit
    h.protocol.pauseProducing()
    if drainedFirst:
        h.protocol.resumeProducing()
        assert h.transport.producerState == "paused"  # the question still is
        h.spool.release()
    else:
        h.spool.release()
        assert h.transport.producerState == "paused"  # the output still is blocked
        h.protocol.resumeProducing()
    assert h.transport.producerState == "producing"
    assert h.replies()[-1].startswith(b"250 2.0.0 Ok: queued as ")


class BlockedTransport(TLSStringTransport):
    """A transport whose peer reads nothing: once more than C{bufferSize} bytes were written
    it pauses its producer, as a TCP transport does when its write buffer is full."""

    bufferSize = 1000

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.bufferSize:
            self.producer.pauseProducing()


def blockedHarness(**kw) -> ServerHarness:
    h = ServerHarness(connect=False, **kw)
    h.transport = BlockedTransport(peerAddress=h.transport.getPeer())
    h.protocol.makeConnection(h.transport)
    return h


def test_session_closed_when_output_stays_blocked_past_the_idle_timeout() -> None:
    h = blockedHarness(idleTimeout=60)
    with capturedLogs() as events:
        h.send(b"EHLO x\r\n" + b"RSET\r\n" * 100)
        assert h.transport.producerState == "paused"
        h.clock.advance(59)
        assert not h.transport.aborted
        h.clock.advance(1)
    assert h.transport.aborted
    assert any("client not reading replies" in formatEvent(e) for e in events)


def test_close_with_unread_replies_aborts_after_the_idle_timeout() -> None:
    h = blockedHarness(idleTimeout=60)
    h.send(b"EHLO x\r\n" + b"RSET\r\n" * 100 + b"QUIT\r\n")
    assert h.transport.value().endswith(b"221 2.0.0 Bye\r\n")
    # Closing once all is sent (the producer unregistered, or the transport would wait for it)
    assert h.transport.disconnecting and h.transport.producer is None
    assert not h.transport.aborted
    h.clock.advance(60)  # ... which never happens: the client reads nothing
    assert h.transport.aborted


def test_close_timer_ends_with_the_connection() -> None:
    h = ServerHarness(idleTimeout=60)
    h.replies()
    h.send(b"QUIT\r\n")
    h.loseConnection()
    assert h.clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------------------------
# Names and addresses from outside in Received: and the logs


@pytest.mark.parametrize(
    "ptr",
    [
        "spoof) (by trusted.example",
        "mail.example [192.0.2.1]",
        "under_score.example",
        "tab\tname.example",
        "-dash.example",
        "x" * 64 + ".example",
        "192.0.2.1",
        "name.123",
    ],
)
def test_reverse_name_of_bad_syntax_is_unknown(ptr: str) -> None:
    resolver = FakeResolver(ptr=ptr, a=["192.0.2.1"])
    results: list = []
    reverseLookup(resolver, "192.0.2.1", 10, Clock()).addCallback(results.append)
    assert results == [None]


def test_hosts_file_name_of_bad_syntax_is_skipped(tmp_path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 bad(name) good-alias\n127.0.0.2 under_score\n")
    assert hostsFileName("127.0.0.1", str(hosts)) == "good-alias"
    assert hostsFileName("127.0.0.2", str(hosts)) is None


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP6 fe80::1%eth0 fe80::2 1234 25\r\n",
        b"PROXY TCP6 fe80::1%(spoof) fe80::2 1234 25\r\n",
        b"PROXY TCP6 2001:db8::1 fe80::2%1 1234 25\r\n",
    ],
)
def test_proxy_v1_address_with_a_zone_id_is_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError, match="zone"):
        parseProxyHeader(header)


@pytest.mark.parametrize(
    "helo,shown",
    [
        ("client.example", "client.example"),
        ("Client.Example.", "Client.Example."),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[IPv6:2001:DB8::1]"),  # (as given, as Postfix writes it)
        ("ev(i)l.example", "unknown"),
        ("evil.example)(by", "unknown"),
        ("under_score.example", "unknown"),
        ("192.0.2.1", "unknown"),
        ("[IPv6:fe80::1%eth0]", "unknown"),
        ("[192.0.2.1", "unknown"),
        ("[tag:general]", "unknown"),
        ("a" * 64 + ".example", "unknown"),
        ("ümlaut.example", "unknown"),
    ],
)
def test_received_shows_a_helo_name_only_of_valid_syntax(helo: str, shown: str) -> None:
    client = ClientInfo(address="192.0.2.1", helo=helo, esmtp=True, rdns="mail.example")
    (received,) = DefaultStamper().stamp(stampContext(client=client)).prepend
    assert received.startswith(f"Received: from {shown} (mail.example [192.0.2.1])\r\n".encode())


def test_received_address_literal_without_zone_id() -> None:
    client = ClientInfo(address="fe80::1%eth0", helo="client.example", esmtp=True)
    (received,) = DefaultStamper().stamp(stampContext(client=client)).prepend
    assert received.startswith(b"Received: from client.example (unknown [IPv6:fe80::1])\r\n")


# ---------------------------------------------------------------------------------------------
# SIZE values: at most 20 digits (RFC 1870)


@pytest.mark.parametrize(
    "size,code",
    [
        ("9" * 12, 250),
        ("9" * 20, 452),  # within the limit, but more than the spool's free space
        ("0" * 20, 250),
        ("1" + "0" * 20, 501),
        ("0" * 21, 501),
        ("١٢", 501),  # digits, but not ASCII ones
    ],
)
def test_mail_size_parameter_of_at_most_20_digits(size: str, code: int) -> None:
    h = ServerHarness(maxMessageSize=10**20 - 1)
    h.replies()
    assert b"250-SIZE 99999999999999999999" in h.send(b"EHLO x\r\n")
    assert h.codes(h.send(f"MAIL FROM:<a@b.example> SIZE={size}\r\n".encode())) == [code]
