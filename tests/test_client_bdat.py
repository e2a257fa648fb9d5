"""Tests for the delivery client's CHUNKING (RFC 3030): the BDAT framing of
L{mailrelay.smtp.wire.BDATFramer} (property tests against a parser of BDAT streams) and the
client session over a C{StringTransport}, the test playing a server that offers CHUNKING
(helpers of L{tests.test_client})."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailrelay.delivery import protocol as clientProtocol
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import BareNewlineError, SizeMismatchError
from mailrelay.smtp.wire import BDATFramer, DotStuffer, LineEndChecker
from tests.test_client import (
    DELIVERED,
    MESSAGE,
    PERMANENT,
    TRANSIENT,
    connected,
    envelope,
    resultOf,
    send,
)


@pytest.fixture
def message(tmp_path):
    path = tmp_path / "message"
    path.write_bytes(MESSAGE)
    return path


CHUNKING = ("PIPELINING", "SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING")
_BDAT = re.compile(rb"BDAT (\d+)( LAST)?\r\n")


def parseBDAT(stream: bytes) -> tuple[list[tuple[int, bool]], bytes]:
    """The C{(size, last)} of each BDAT command in C{stream} and the content they carry;
    asserts the stream is nothing but well-formed commands and their data."""
    chunks, content, at = [], b"", 0
    while at < len(stream):
        m = _BDAT.match(stream, at)
        assert m, f"no BDAT command at {at}: {stream[at:at + 40]!r}"
        size, last = int(m.group(1)), bool(m.group(2))
        data = stream[m.end():m.end() + size]
        assert len(data) == size, "chunk shorter than announced"
        chunks.append((size, last))
        content += data
        at = m.end() + size
    return chunks, content


def frame(content: bytes, pieces: list[int], pipelined: bool) -> tuple[bytes, list[bool]]:
    framer = BDATFramer(len(content), pipelined=pipelined)
    out, done, at = [], [], 0
    for n in pieces:
        data, completed = framer.feed(content[at:at + n])
        out.append(data)
        done += completed
        at += n
    data, completed = framer.feed(content[at:])
    out.append(data)
    done += completed
    data, completed = framer.finish()
    return b"".join(out) + data, done + completed


# Framing units --------------------------------------------------------------------------------

lines = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                 max_size=20)


@hsettings(max_examples=300, deadline=None)
@given(lines=lines, finalCRLF=st.booleans(), pieces=st.lists(st.integers(1, 50), max_size=20),
       pipelined=st.booleans())
def test_framingCarriesTheContentExactly(lines, finalCRLF, pieces, pipelined):
    """Whatever the content and however it is read, the BDAT stream carries it byte for
    byte (dots unstuffed, nothing added), in one chunk per piece (pipelined) or one chunk of
    the whole size, the last one marked LAST and none after it; each chunk completed is
    reported once, in order."""
    content = b"\r\n".join(lines) + (b"\r\n" if finalCRLF and lines else b"")
    stream, done = frame(content, pieces, pipelined)
    chunks, carried = parseBDAT(stream)
    assert carried == content
    assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    assert done == [last for _, last in chunks]
    if not pipelined:
        assert chunks == [(len(content), True)]
    assert all(size > 0 for size, _ in chunks) or chunks == [(0, True)]


def test_emptyContentIsBDAT0LAST():
    for pipelined in (True, False):
        assert frame(b"", [], pipelined) == (b"BDAT 0 LAST\r\n", [True])


def test_unpipelinedCommandPrecedesTheData():
    framer = BDATFramer(8, pipelined=False)
    assert framer.feed(b"ab\r") == (b"BDAT 8 LAST\r\nab\r", [])  # the reply comes at the end
    assert framer.feed(b"\ncd\r\n") == (b"\ncd\r\n", [True])
    assert framer.finish() == (b"", [])


def test_sizeMismatchRefused():
    with pytest.raises(SizeMismatchError):
        BDATFramer(3, pipelined=True).feed(b"abcd")
    framer = BDATFramer(5, pipelined=True)
    framer.feed(b"ab")
    with pytest.raises(SizeMismatchError):
        framer.finish()


@hsettings(max_examples=300, deadline=None)
@given(content=st.binary(max_size=60).map(lambda b: b.replace(b"x", b"\r").replace(b"y", b"\n")),
       pieces=st.lists(st.integers(1, 10), max_size=10))
def test_lineEndCheckAgreesWithTheDotStuffer(content, pieces):
    """BDAT refuses exactly what DATA refuses (a bare CR or LF), wherever chunks split;
    BINARYMIME content is not checked."""
    def stuffs() -> bool:
        stuffer, at = DotStuffer(), 0
        try:
            for n in pieces:
                stuffer.feed(content[at:at + n])
                at += n
            stuffer.feed(content[at:])
            stuffer.finish()
        except BareNewlineError:
            return False
        return True

    def checks() -> bool:
        checker, at = LineEndChecker(), 0
        try:
            for n in pieces:
                checker.feed(content[at:at + n])
                at += n
            checker.feed(content[at:])
            checker.finish()
        except BareNewlineError:
            return False
        return True

    assert checks() == stuffs()
    framer = BDATFramer(len(content), pipelined=True, checkLineEnds=False)
    framer.feed(content)
    framer.finish()  # never refuses


# The session ----------------------------------------------------------------------------------


def test_pipelinedBDATInsteadOfDATA(message):
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    # MAIL and every RCPT in one write; no DATA, no BDAT before the RCPT replies.
    assert peer.heard() == (f"MAIL FROM:<sender@example.org> SIZE={len(MESSAGE)}\r\n"
                            "RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n").encode()
    peer.say(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
    assert peer.heard() == b"" and peer.transport.producer is None
    peer.say(b"550 5.1.1 no such user\r\n")
    peer.pump()
    # The message as it is: no dot-stuffing, no terminator.
    assert peer.heard() == f"BDAT {len(MESSAGE)} LAST\r\n".encode() + MESSAGE
    assert not d.called
    peer.say(b"250 2.0.0 Ok: queued as X\r\n")
    a, b = resultOf(d)
    assert (a.status, a.diagnostic) == (DELIVERED, "smtp; 250 2.0.0 Ok: queued as X")
    assert (b.status, b.code) == (PERMANENT, "5.1.1")
    assert conn.usable
    send(conn, envelope("c@example.org"), message)
    assert peer.heard().startswith(b"MAIL FROM:")  # no RSET needed


def test_chunksFollowEachOtherWithoutWaiting(tmp_path, monkeypatch):
    monkeypatch.setattr(clientProtocol, "CHUNK_SIZE", 10)
    content = b"Subject: x\r\n\r\n.\r\n..two\r\nend\r\n"
    path = tmp_path / "m"
    path.write_bytes(content)
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), path)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n")
    peer.pump()
    chunks, carried = parseBDAT(peer.heard())
    assert carried == content
    assert chunks == [(10, False), (10, False), (9, True)]
    assert not d.called
    # One reply per chunk; the last one's decides.
    peer.say(b"250 2.0.0 10 octets\r\n" * 2)
    assert not d.called
    peer.say(b"250 2.0.0 queued\r\n")
    assert resultOf(d)[0].diagnostic == "smtp; 250 2.0.0 queued"
    assert conn.usable


def test_withoutPipeliningOneChunk(message):
    peer, conn = connected(["CHUNKING", "SIZE 0"])
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    assert peer.heard() == f"MAIL FROM:<sender@example.org> SIZE={len(MESSAGE)}\r\n".encode()
    peer.say(b"250 ok\r\n")
    assert peer.heard() == b"RCPT TO:<a@example.org>\r\n"
    peer.say(b"250 ok\r\n")
    assert peer.heard() == b"RCPT TO:<b@example.org>\r\n"
    peer.say(b"250 ok\r\n")
    peer.pump()
    assert peer.heard() == f"BDAT {len(MESSAGE)} LAST\r\n".encode() + MESSAGE
    peer.say(b"250 ok\r\n")
    assert [r.status for r in resultOf(d)] == [DELIVERED, DELIVERED]


def _sentInChunksOf10(tmp_path, monkeypatch, content: bytes):
    """C{(peer, conn, d)}: C{content} sent to a server offering CHUNKING, in chunks of 10
    octets, MAIL and RCPT accepted: the body's producer is ready to write the first."""
    monkeypatch.setattr(clientProtocol, "CHUNK_SIZE", 10)
    path = tmp_path / "m"
    path.write_bytes(content)
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), path)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n")
    return peer, conn, d


def test_refusedChunkStopsTheBody(tmp_path, monkeypatch):
    """A chunk refused: no further chunk, the replies still due are read (the first refusal
    is the answer), and the next transaction starts with RSET."""
    peer, conn, d = _sentInChunksOf10(tmp_path, monkeypatch, b"x" * 38 + b"\r\n")
    producer = peer.transport.producer
    producer.resumeProducing()
    producer.resumeProducing()
    assert parseBDAT(peer.heard())[0] == [(10, False), (10, False)]
    peer.say(b"552 5.3.4 message too big\r\n")
    assert peer.transport.producer is None  # stopped: no third chunk
    assert peer.heard() == b"" and not d.called
    peer.say(b"503 5.5.1 discarded\r\n")  # the reply to the second chunk
    (a,) = resultOf(d)
    assert (a.status, a.code, a.diagnostic) == (
        PERMANENT, "5.3.4", "smtp; 552 5.3.4 message too big")
    assert conn.usable and not peer.aborted
    send(conn, envelope("b@example.org"), tmp_path / "m")
    assert peer.heard() == b"RSET\r\n"


def test_refusedLastChunk(message):
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), message)
    peer.say(b"250 ok\r\n250 ok\r\n")
    peer.pump()
    peer.say(b"451 4.3.0 try later\r\n")
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.3.0")


def test_noRecipientAcceptedSendsNoChunk(message):
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), message)
    peer.heard()
    peer.say(b"250 ok\r\n550 5.1.1 unknown\r\n")
    (a,) = resultOf(d)
    assert a.status is PERMANENT and peer.heard() == b"" and peer.transport.producer is None
    send(conn, envelope("b@example.org"), message)
    assert peer.heard() == b"RSET\r\n"


def test_mailRefusedSendsNoChunk(message):
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), message)
    peer.heard()
    peer.say(b"452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n")
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.3.1") and peer.heard() == b""
    send(conn, envelope("b@example.org"), message)
    assert peer.heard().startswith(b"MAIL FROM:")  # nothing to reset


def test_emptyFile(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), path)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n")
    peer.pump()
    assert peer.heard() == b"BDAT 0 LAST\r\n"
    peer.say(b"250 ok\r\n")
    assert resultOf(d)[0].status is DELIVERED


def test_bareNewlineInFileIsNotSent(tmp_path):
    path = tmp_path / "corrupt"
    path.write_bytes(b"Subject: x\r\n\r\nbad\nline\r\n")
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), path)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n")
    peer.pump()
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.3.0") and "bare CR or LF" in a.diagnostic
    assert peer.heard() == b"" and peer.aborted  # the chunk is cut short: the server drops it


def test_lmtpRepliesPerRecipientAfterLast(message):
    peer, conn = connected(CHUNKING, settings=ClientSettings("client.test", tls="none",
                                                             lmtp=True))
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    peer.pump()
    assert peer.heard().startswith(b"BDAT ")
    peer.say(b"250 2.0.0 a done\r\n")
    assert not d.called
    peer.say(b"452 4.2.2 b over quota\r\n")
    a, b = resultOf(d)
    assert (a.status, a.final, b.status) == (DELIVERED, True, TRANSIENT)


def test_binaryMIME(tmp_path):
    """BINARYMIME content goes with BODY=BINARYMIME, in BDAT, bare LFs and all, to a server
    offering CHUNKING and BINARYMIME; to any other it is refused (5.6.3) before MAIL."""
    path = tmp_path / "binary"
    content = b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\n\r\xff"
    path.write_bytes(content)
    peer, conn = connected((*CHUNKING, "BINARYMIME"))
    d = send(conn, envelope("a@example.org", body="BINARYMIME"), path)
    assert peer.heard().startswith(
        f"MAIL FROM:<sender@example.org> SIZE={len(content)} BODY=BINARYMIME\r\n".encode())
    peer.say(b"250 ok\r\n250 ok\r\n")
    peer.pump()
    assert peer.heard() == f"BDAT {len(content)} LAST\r\n".encode() + content
    peer.say(b"250 ok\r\n")
    assert resultOf(d)[0].status is DELIVERED
    for extensions in (CHUNKING, ("PIPELINING", "BINARYMIME")):
        peer, conn = connected(extensions)
        (a,) = resultOf(send(conn, envelope("a@example.org", body="BINARYMIME"), path))
        assert (a.status, a.code) == (PERMANENT, "5.6.3") and "BINARYMIME" in a.diagnostic
        assert peer.heard() == b""


def test_bdatReplyTimeout(tmp_path, monkeypatch):
    monkeypatch.setattr(clientProtocol, "CHUNK_SIZE", 4)
    path = tmp_path / "m"
    path.write_bytes(b"abc\r\nabc\r\n")
    peer, conn = connected(CHUNKING)
    d = send(conn, envelope("a@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n")
    producer = peer.transport.producer
    producer.resumeProducing()
    producer.resumeProducing()
    peer.say(b"554 5.6.0 no\r\n")  # refused: the body stops, one reply still due
    assert not d.called
    peer.clock.advance(conn._protocol.settings.timeouts.dataBlock)
    (a,) = resultOf(d)
    assert (a.status, a.code) == (PERMANENT, "5.6.0")  # the refusal stands
    assert peer.aborted  # the connection is in an unknown state


def test_againstPathologicalEarlyReply(message):
    """A reply to a chunk not sent yet (the server is broken) aborts, delivering nothing."""
    peer, conn = connected(["CHUNKING", "SIZE 0"])
    d = send(conn, envelope("a@example.org"), message)
    peer.say(b"250 ok\r\n")
    peer.say(b"250 ok\r\n")
    peer.say(b"250 2.0.0 too early\r\n")
    (a,) = resultOf(d)
    assert a.status is TRANSIENT and peer.aborted


@pytest.mark.parametrize("how", ["lost", "timeout"])
def test_aBreakOnceTheLastChunkIsSentMaySendTheMessageTwice(tmp_path, monkeypatch, how):
    """Pipelined chunks, the LAST one written, and the connection lost (or timed out) before
    the replies to the earlier ones came: the server may have the whole message, so the
    deferral says that it may be sent more than once, as a break after the end of DATA does
    (it said "while sending BDAT", as if the message was not all sent)."""
    peer, conn, d = _sentInChunksOf10(tmp_path, monkeypatch, b"x" * 18 + b"\r\n")
    peer.pump()
    assert parseBDAT(peer.heard())[0] == [(10, False), (10, True)]
    if how == "lost":
        peer.lose()
    else:
        peer.clock.advance(conn._protocol.settings.timeouts.dataDone)
    (a,) = resultOf(d)
    assert a.status is TRANSIENT
    assert a.diagnostic.endswith(
        "while sending end of data -- message may be sent more than once"), a.diagnostic
