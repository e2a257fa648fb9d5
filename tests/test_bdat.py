"""CHUNKING and BINARYMIME (RFC 3030), server side: the BDAT framing of the sans-IO session
and its way into the spool, through the Twisted protocol on a StringTransport
(L{ServerHarness}) and, for every cutting of the input, on the session alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import Verdict
from mailrelay.smtp import replies as R
from mailrelay.smtp.data import ChunkReader
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.server import (
    AbortData,
    BodyData,
    CheckMail,
    CheckRecipient,
    EndOfData,
    ServerSession,
    SessionSettings,
    StartData,
)
from mailrelay.testing import ServerHarness

START = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"


def bdat(content: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


def harness(**settings: object) -> ServerHarness:
    """A listener storing messages as received (no stampers)."""
    h = ServerHarness(stampers=[], **settings)
    h.replies()
    return h


def stored(h: ServerHarness) -> bytes:
    ((_, message),) = h.spool.committed.values()
    return message


def chunked(h: ServerHarness, *chunks: bytes) -> list[bytes]:
    """A transaction sending C{chunks} by BDAT, the last with LAST, all pipelined."""
    wire = b"".join(bdat(c, i == len(chunks) - 1) for i, c in enumerate(chunks))
    return h.send(START + wire)


# The framing ---------------------------------------------------------------------------------


def test_ehlo_offers_chunking_not_binarymime_by_default() -> None:
    h = harness()
    ehlo = h.send(b"EHLO x\r\n")
    assert b"250-CHUNKING" in ehlo and not any(b"BINARYMIME" in line for line in ehlo)
    assert b"250-BINARYMIME" in harness(binaryMIME=True).send(b"EHLO x\r\n")
    off = harness(chunking=False, binaryMIME=True).send(b"EHLO x\r\n")
    assert not any(b"CHUNKING" in line or b"BINARYMIME" in line for line in off)


def test_chunks_pipelined_and_their_replies() -> None:
    h = harness()
    lines = chunked(h, b"Subject: s\r\n", b"\r\nbody", b" line\r\n")
    assert lines[-3:-1] == [b"250 2.0.0 Ok: 12 octets received", b"250 2.0.0 Ok: 6 octets received"]
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert h.codes(lines) == [250] * 6
    assert stored(h) == b"Subject: s\r\n\r\nbody line\r\n"
    assert h.send(b"MAIL FROM:<a@b.example>\r\n") == [b"250 2.1.0 Ok"]  # a new transaction


def test_bdat_0_last_ends_the_message() -> None:
    h = harness()
    lines = h.send(START + bdat(b"Subject: s\r\n\r\nx\r\n") + b"BDAT 0 LAST\r\n")
    assert lines[-2:-1] == [b"250 2.0.0 Ok: 17 octets received"]
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert stored(h) == b"Subject: s\r\n\r\nx\r\n"
    h = harness()
    assert h.send(START + b"BDAT 0 LAST\r\n")[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert stored(h) == b""  # as an empty DATA


def test_the_chunk_is_octets_not_commands() -> None:
    """What is in a chunk never runs as a command nor ends the message: smuggling-proof."""
    h = harness()
    inside = (b"Subject: s\r\n\r\n.\r\nRSET\r\nMAIL FROM:<evil@x.example>\r\n"
              b"RCPT TO:<v@x.example>\r\nDATA\r\n\r\n.\r\nBDAT 1 LAST\r\nx")
    lines = chunked(h, inside)
    assert h.codes(lines) == [250] * 4 and len(h.spool.committed) == 1
    assert stored(h) == inside + b"\r\n"


def test_text_without_final_line_end_gets_crlf() -> None:
    h = harness()
    chunked(h, b"Subject: s\r\n\r\nno newline")
    assert stored(h) == b"Subject: s\r\n\r\nno newline\r\n"


def test_crlf_split_between_chunks_is_no_bare_cr() -> None:
    h = harness()
    lines = chunked(h, b"Subject: s\r", b"\n\r\nbody\r", b"\n")
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert stored(h) == b"Subject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize("argument", [b"", b" ", b" x", b" -1", b" 10 LAST x", b" 10 FIRST",
                                      b" 1e3", b" " + b"9" * 21, b" 10LAST"])
def test_malformed_bdat_closes(argument: bytes) -> None:
    """Where the next command would start is unknown: 521 and close (as Postfix)."""
    h = harness()
    lines = h.send(START + b"BDAT" + argument + b"\r\nNOOP\r\n")
    assert lines[-1] == b"521 5.5.4 Syntax: BDAT count [LAST]"
    assert h.closed and h.spool.committed == {} and h.spool.open == {}


def test_bdat_keyword_and_spacing_are_lenient() -> None:
    h = harness()
    lines = h.send(START + b"bdat  5\t last \r\nhello")
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as ")


# Refusals: the chunk is read, then refused --------------------------------------------------


def test_bdat_without_mail_or_recipients() -> None:
    h = harness()
    lines = h.send(b"EHLO x\r\n" + bdat(b"MAIL FROM:<a@b.example>\r\n") + bdat(b"QUIT\r\n", True))
    assert lines[-2:] == [b"503 5.5.1 Error: need MAIL command",
                          b"503 5.5.1 Error: 6 octets discarded after an earlier error"]
    assert not h.closed
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example> FOO=1\r\n")
    assert h.send(bdat(b"x", True)) == [b"554 5.5.1 Error: no valid recipients"]
    h.send(b"MAIL FROM:<a@b.example>\r\n")
    assert h.send(bdat(b"x", True)) == [b"503 5.5.1 Error: need RCPT command"]
    assert h.spool.committed == {}


def test_bdat_after_data() -> None:
    """BDAT after a DATA transaction, after a refused DATA, and DATA after BDAT (503, RFC 3030
    2; the BDAT transaction goes on)."""
    h = harness()
    h.send(START + b"DATA\r\nSubject: d\r\n\r\n.\r\n")
    assert h.send(bdat(b"x", True)) == [b"503 5.5.1 Error: need MAIL command"]
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example> FOO=1\r\n")
    assert h.send(b"DATA\r\n" + bdat(b"x", True)) == [b"554 5.5.1 Error: no valid recipients"] * 2
    h.send(b"RSET\r\n" + START)
    assert h.send(bdat(b"Subject: b\r\n")) == [b"250 2.0.0 Ok: 12 octets received"]
    assert h.send(b"DATA\r\n") == [b"503 5.5.1 Error: DATA after BDAT"]
    assert h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n") == [
        b"503 5.5.1 Error: MAIL after BDAT", b"503 5.5.1 Error: RCPT after BDAT"]
    assert h.send(bdat(b"\r\nbody\r\n", True))[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert [m for m in h.spool.messages()] == [b"Subject: d\r\n\r\n", b"Subject: b\r\n\r\nbody\r\n"]


def test_empty_chunk_without_last_refused() -> None:
    h = harness()
    lines = h.send(START + b"BDAT 0\r\n" + bdat(b"x") + bdat(b"y", True))
    assert lines[-3:] == [b"501 5.5.4 Error: empty BDAT chunk without LAST",
                          b"501 5.5.4 Error: 1 octets discarded after an earlier error"] * 1 + [
                          b"501 5.5.4 Error: 1 octets discarded after an earlier error"]
    assert h.spool.committed == {} and h.spool.open == {}


def test_empty_chunks_count_as_errors_even_after_an_earlier_error() -> None:
    """An empty chunk without LAST carries nothing, so the 1.5-times-the-size-limit bound
    never stops a client repeating it: after the first refusal every "BDAT 0" was discarded
    "after an earlier error", uncounted, without end.  Postfix's bdat_cmd checks for a null
    BDAT request before the earlier error and counts each one (551 5.7.1); so does the relay
    now, and the error limit ends such a session."""
    h = harness(maxErrors=3, errorSleepTime=0)
    lines = h.send(START + b"BDAT 0\r\n" * 10)
    assert lines[-4:] == [b"501 5.5.4 Error: empty BDAT chunk without LAST"] * 3 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    assert h.closed
    h = harness(maxErrors=3, errorSleepTime=0, maxMessageSize=2)
    lines = h.send(START + bdat(b"xxx") + b"BDAT 0\r\n" * 3)
    assert lines[-4:] == [b"552 5.3.4 Error: message size exceeds fixed limit"] + [
        b"501 5.5.4 Error: empty BDAT chunk without LAST"] * 2 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    off = harness(maxErrors=3, errorSleepTime=0, chunking=False)
    assert off.codes(off.send(START + b"BDAT 0\r\n" * 5))[-4:] == [502, 502, 502, 421]


def test_chunks_discarded_after_an_error_count_as_errors() -> None:
    """Each chunk discarded after an earlier error is an error, as Postfix's bdat_cmd counts
    each refused BDAT (skip_bdat returns -1, so smtpd_proto adds one to error_count): a
    client sending them pipelined, after a refused chunk or without a transaction, met no
    bound but 1.5 times the size limit; the session ends at the error limit now."""
    h = harness(maxErrors=3, errorSleepTime=0)
    lines = h.send(START + bdat(b"a\nb\r\n") + bdat(b"xyz") * 10)
    assert lines[-4:] == [R.BARE_NEWLINE.toBytes()[:-2]] + [
        b"550 5.6.0 Error: 3 octets discarded after an earlier error"] * 2 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    assert h.closed and h.spool.committed == {} and h.spool.open == {}
    h = harness(maxErrors=3, errorSleepTime=0)
    lines = h.send(b"EHLO x\r\n" + bdat(b"MAIL FROM:<a@b.example>\r\n") * 10)
    assert lines[-4:] == [b"503 5.5.1 Error: need MAIL command"] + [
        b"503 5.5.1 Error: 25 octets discarded after an earlier error"] * 2 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    assert h.closed


def test_size_over_the_limit_consumed_then_refused() -> None:
    h = harness(maxMessageSize=100)
    lines = h.send(START + bdat(b"x" * 101) + bdat(b"more", True) + b"NOOP\r\n")
    assert lines[-3:] == [b"552 5.3.4 Error: message size exceeds fixed limit",
                          b"552 5.3.4 Error: 4 octets discarded after an earlier error",
                          b"250 2.0.0 Ok"]
    assert h.spool.committed == {} and h.spool.open == {}
    # Over the limit in the second chunk: the message opened is dropped, logged by the intake.
    with capturedLogs() as events:
        lines = h.send(START + bdat(b"Subject: s\r\n\r\n" + b"x" * 60) + bdat(b"y" * 60) +
                       bdat(b"z", True))
    assert lines[-3:] == [b"250 2.0.0 Ok: 74 octets received",
                          b"552 5.3.4 Error: message size exceeds fixed limit",
                          b"552 5.3.4 Error: 1 octets discarded after an earlier error"]
    assert h.spool.committed == {} and h.spool.open == {}
    assert any("result=552 5.3.4" in e["log_format"].format(**e) for e in events
               if "nrcpt" in e["log_format"])


def test_far_over_the_limit_closes() -> None:
    """A chunk taking the message beyond 1.5 times the limit is not read: 552, and close (as
    Postfix's smtpd, which stops reading there)."""
    h = harness(maxMessageSize=100)
    lines = h.send(START + b"BDAT 151 LAST\r\n" + b"x" * 151)
    assert lines[-1] == b"552 5.3.4 Error: message size exceeds fixed limit" and h.closed
    h = harness(maxMessageSize=100)
    assert h.send(START + bdat(b"x" * 150))[-1].startswith(b"552 ")
    assert not h.closed
    assert h.send(b"BDAT 1 LAST\r\n") == [b"552 5.3.4 Error: message size exceeds fixed limit"]
    assert h.closed


def test_bare_newline_nul_and_long_line_refused_at_the_chunk() -> None:
    # (A CR at a chunk's end, judged with the next chunk, is bare there: a space, not
    # refused: test_chunk_reader_makes_a_bare_cr_a_space.)
    for content, reply in [(b"a\nb\r\n", R.BARE_NEWLINE), (b"a\0b\r\n", R.NUL_IN_DATA),
                           (b"a" * 999 + b"\r\n", R.DATA_LINE_TOO_LONG)]:
        h = harness()
        lines = h.send(START + bdat(b"Subject: s\r\n\r\n") + bdat(content) + bdat(b"x\r\n", True))
        refused = Reply(reply.code, reply.enhanced,
                        "Error: 3 octets discarded after an earlier error")
        assert lines[-3:] == [b"250 2.0.0 Ok: 14 octets received", reply.toBytes()[:-2],
                              refused.toBytes()[:-2]]
        assert h.spool.committed == {} and h.spool.open == {}
        assert h.codes(h.send(START + bdat(b"ok\r\n", True)))[-1] == 250


def test_bare_newline_and_nul_normalized_when_listener_says_so() -> None:
    h = harness(bareNewline="normalize", nulBytes="normalize")
    chunked(h, b"Subject: s\n\nbody\0\r", b"more\r")
    assert stored(h) == b"Subject: s\r\n\r\nbody more \r\n"  # (a bare CR is a space)


def test_refused_bdat_logged_postfix_style() -> None:
    h = harness()
    with capturedLogs() as events:
        h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n" + bdat(b"x", True))
    (text,) = [e["log_format"].format(**e) for e in events if "NOQUEUE" in e["log_format"]]
    assert text.startswith("NOQUEUE: reject: BDAT from unknown[127.0.0.1]: 503 5.5.1 Error: "
                           "need RCPT command; from=<a@b.example>")


# Ending a transaction mid-chunking ------------------------------------------------------------


@pytest.mark.parametrize("command", [b"RSET\r\n", b"EHLO again\r\n", b"HELO again\r\n"])
def test_rset_or_ehlo_mid_chunking_drops_the_message(command: bytes) -> None:
    h = harness()
    h.send(START + bdat(b"Subject: s\r\n"))
    (writer,) = h.spool.open.values()
    assert h.codes(h.send(command)) == [250]
    assert writer.aborted and h.spool.committed == {}
    assert h.send(bdat(b"x", True)) == [b"503 5.5.1 Error: need MAIL command"]
    assert h.codes(chunked(h, b"Subject: t\r\n\r\n"))[-1] == 250
    assert stored(h) == b"Subject: t\r\n\r\n"


def test_starttls_and_auth_refused_mid_chunking() -> None:
    h = harness(tlsMode="starttls", users={"u": "p"}, authWithoutTLS=True)
    h.send(START + bdat(b"Subject: s\r\n"))
    assert h.send(b"STARTTLS\r\nAUTH PLAIN AHUAcA==\r\n") == [
        b"503 5.5.1 Error: MAIL transaction in progress"] * 2


def test_connection_lost_or_timeout_mid_chunk_drops_the_message() -> None:
    h = harness()
    h.send(START + b"BDAT 100\r\nSubject: s\r\n")
    (writer,) = h.spool.open.values()
    h.loseConnection()
    assert writer.aborted and h.spool.committed == {}
    h = harness(idleTimeout=300, dataTimeout=60)
    h.send(START + b"BDAT 100\r\nSubject: s\r\n")
    (writer,) = h.spool.open.values()
    h.clock.advance(60)  # in a chunk: the DATA time limit
    assert h.replies() == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert writer.aborted and h.closed
    h = harness(idleTimeout=300, dataTimeout=60)
    h.send(START + bdat(b"Subject: s\r\n"))
    h.clock.advance(299)  # between chunks: waiting for a command
    assert not h.closed
    h.clock.advance(1)
    assert h.closed and h.spool.committed == {} and h.spool.open == {}


def test_a_stopping_relay_lets_a_chunked_message_finish() -> None:
    """Between chunks the client has a message in hand: a graceful stop waits for its BDAT
    LAST (as for DATA), and after the drain time drops it."""
    from mailrelay.receive.protocol import Sessions

    sessions = Sessions()
    h = ServerHarness(sessions=sessions)
    h.replies()
    h.send(START + bdat(b"Subject: s\r\n"))
    sessions.drain(h.clock, 30)
    assert not h.transport.disconnecting
    assert h.send(bdat(b"\r\nbody\r\n"))[-1] == b"250 2.0.0 Ok: 8 octets received"
    assert h.send(bdat(b"", True))[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert h.send(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert len(h.spool.committed) == 1
    h = ServerHarness(sessions=Sessions())
    h.send(START + bdat(b"Subject: s\r\n"))
    (writer,) = h.spool.open.values()
    h.context.sessions.drain(h.clock, 30)
    h.clock.advance(30)
    assert h.replies()[-1] == b"421 4.3.2 relay.test Service shutting down"
    assert writer.aborted and h.spool.committed == {}


def test_stamped_like_data() -> None:
    h = ServerHarness()
    h.replies()
    lines = h.send(START + bdat(b"Subject: s\r\n\r\nbody\r\n", True))
    queueID = lines[-1].rsplit(b" ", 1)[1]
    (message,) = h.spool.messages()
    assert message.startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n"
                              b"\tby relay.test (mailrelay) with ESMTP id " + queueID)
    assert b"\r\nSubject: s\r\nMessage-Id: <" in message and message.endswith(b"\r\n\r\nbody\r\n")


# BINARYMIME -----------------------------------------------------------------------------------


def test_binarymime_only_when_offered() -> None:
    h = harness()
    assert h.send(b"EHLO x\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n")[-1] == (
        b"501 5.5.4 Error: unsupported BODY value 'BINARYMIME'")
    h = harness(binaryMIME=True, chunking=False)
    assert h.codes(h.send(b"EHLO x\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n"))[-1] == 501


def test_binarymime_content_is_any_octets_and_needs_bdat() -> None:
    h = harness(binaryMIME=True, maxMessageSize=2000)
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<c@d.example>\r\n")
    assert h.send(b"DATA\r\n") == [b"503 5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA"]
    binary = b"Content-Type: application/octet-stream\r\n\r\n\0\r\n.\n\r" + b"z" * 999
    lines = h.send(bdat(binary[:50]) + bdat(binary[50:], True))
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as ")
    ((envelope, message),) = h.spool.committed.values()
    assert message == binary and envelope.body == "BINARYMIME"
    h.send(b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<c@d.example>\r\n")
    assert h.send(bdat(b"y" * 2001, True)) == [b"552 5.3.4 Error: message size exceeds fixed limit"]


def test_chunking_off_reads_and_refuses_the_chunk() -> None:
    h = harness(chunking=False)
    lines = h.send(START + bdat(b"QUIT\r\n", True) + b"NOOP\r\n")
    assert lines[-2:] == [b"502 5.5.1 Error: command not implemented", b"250 2.0.0 Ok"]


# Every cutting of the input, on the session alone ----------------------------------------------


def run(wire: bytes, cuts: list[int], **options: object) -> tuple[bytes, list[object]]:
    """Drive a session over C{wire} cut at C{cuts}, answering every question at once; the
    content stored (C{BodyData}) and every event."""
    options.setdefault("maxMessageSize", 10**6)
    s = ServerSession(SessionSettings(hostname="h", **options),  # type: ignore[arg-type]
                      ClientInfo(address="127.0.0.1", relayAllowed=True))
    events: list[object] = []

    def drive(evs: list[object]) -> None:
        for e in evs:
            events.append(e)
            if isinstance(e, StartData):
                drive(s.answer(None))
            elif isinstance(e, EndOfData):
                drive(s.answer(e.error or Reply(250, "2.0.0", "Ok: queued")))
            elif isinstance(e, (CheckMail, CheckRecipient)):
                drive(s.answer(Verdict.accept()))

    prev = 0
    for cut in sorted(set(cuts)) + [len(wire)]:
        drive(s.dataReceived(wire[prev:cut]))
        prev = cut
    return b"".join(e.data for e in events if isinstance(e, BodyData)), events


_text = st.lists(
    st.binary(max_size=60).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
    max_size=12).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@settings(max_examples=300, deadline=None)
@given(_text, st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=8), st.booleans())
def test_content_is_exact_whatever_the_chunks_and_packets(
        content: bytes, sizes: list[int], cuts: list[int], zeroLast: bool) -> None:
    """Whatever the chunk sizes and however the packets cut the input (inside a command line,
    a chunk, a CRLF), the stored content is what was sent and the replies come one per
    command, in order."""
    points = sorted({s % (len(content) + 1) for s in sizes})
    chunks = [content[a:b] for a, b in zip([0, *points], [*points, len(content)], strict=True)]
    chunks = [c for c in chunks if c]  # "BDAT 0" is refused but with LAST
    if not chunks and not zeroLast:
        chunks = [b""]
    wire = START
    for i, c in enumerate(chunks):
        wire += bdat(c, last=i == len(chunks) - 1 and not zeroLast)
    if zeroLast:
        wire += b"BDAT 0 LAST\r\n"
    wire += b"NOOP\r\n"
    body, events = run(wire, [c % (len(wire) + 1) for c in cuts])
    assert body == content
    replies = [e for e in events if isinstance(e, Reply)]
    assert [r.code for r in replies] == [250] * (3 + len(chunks) + zeroLast + 1)
    ends = [e for e in events if isinstance(e, EndOfData)]
    assert len(ends) == 1 and ends[0].error is None and ends[0].size == len(content)
    assert not any(isinstance(e, AbortData) for e in events)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_binary_content_is_exact_whatever_the_packets(payload: bytes, cuts: list[int]) -> None:
    wire = (b"EHLO x\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<c@d.example>\r\n" +
            (bdat(payload[:100]) if payload[:100] else b"") + bdat(payload[100:], True) +
            b"NOOP\r\n")
    body, events = run(wire, [c % (len(wire) + 1) for c in cuts], binaryMIME=True)
    assert body == payload
    assert [e.code for e in events if isinstance(e, Reply)][-2:] == [250, 250]


def test_chunk_reader_holds_a_cr_until_it_knows() -> None:
    r = ChunkReader(100)
    fed = (r.feed(b"a\r"), r.feed(b"\nb\r"), r.feed(b"\r\n"), r.end())
    assert fed == (b"a", b"\r\nb", b" \r\n", None)  # (the first CR of b"\r\r\n" is bare)
    assert r.error is None
    r = ChunkReader(100)
    assert (r.feed(b"a\r"), r.feed(b"b\n"), r.error) == (b"a", None, R.BARE_NEWLINE)
    r = ChunkReader(100)
    assert (r.feed(b"a\r\nb"), r.end(), r.error, r.size) == (b"a\r\nb", b"\r\n", None, 6)


@pytest.mark.parametrize("bareNewline", ["normalize", "reject"])
def test_chunk_reader_makes_a_bare_cr_a_space(bareNewline: str) -> None:
    """As in DATA (test_data): a bare CR is a space, not a line end, wherever the chunks cut,
    with either bare_newline choice (which is about bare LF); one ending the message is
    followed by the CRLF a text message gets."""
    wire = b"Subject: a\rBcc: victim@example.com\r\n\r\nbody\rmore\r\r\nend\r"
    for cut in range(len(wire) + 1):
        r = ChunkReader(100, bareNewline=bareNewline)
        stored = [r.feed(wire[:cut]), r.feed(wire[cut:]), r.end()]
        assert b"".join(p or b"" for p in stored) == (
            b"Subject: a Bcc: victim@example.com\r\n\r\nbody more \r\nend \r\n"), cut
        assert r.error is None
