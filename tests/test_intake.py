"""The intake (L{mailrelay.cleanup.intake}): the one way into the spool, on a L{MemorySpool}
and a C{Clock}, without the SMTP side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.cleanup.intake import FILTER_FAILED, IncomingMessage, Intake
from mailrelay.cleanup.stamping import STAMPING_FAILED, ConfiguredStamper, DefaultStamper
from mailrelay.config.plugins import HookPlugins, PluginEntry
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.errors import SpoolError
from mailrelay.interfaces import (
    FilterResult,
    IHeaderStamper,
    IIncomingMessage,
    IIntake,
    IMessageFilter,
    MessageRefused,
    StampResult,
    Verdict,
)
from mailrelay.smtp import replies as R
from mailrelay.smtp.replies import Reply
from mailrelay.testing import MemorySpool

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


@implementer(IHeaderStamper)
class Stamper:
    """Adds C{X-Stamped:}, at once or (C{later}) when the test fires its Deferred."""

    def __init__(self, later: bool = False) -> None:
        self.later = later
        self.calls: list[Deferred[StampResult]] = []
        self.contexts: list[Any] = []

    def stamp(self, context: Any) -> Any:
        self.contexts.append(context)
        result = StampResult(append=[b"X-Stamped: 1\r\n"])
        if not self.later:
            return result
        d: Deferred[StampResult] = Deferred()
        self.calls.append(d)
        return d


def makeIntake(
    *stampers: Any, filters: Sequence[Any] = (), **kw: Any
) -> tuple[Intake, MemorySpool, list[str]]:
    """An intake on a MemorySpool; C{filters}: IMessageFilter providers, run as the relay
    runs them (one chain of the policy runner), each within 10 seconds."""
    spool = MemorySpool()
    clock = Clock()
    clock.advance(1_800_000_000)
    queued: list[str] = []
    configured = [ConfiguredStamper(f"s{i}", s, 10.0) for i, s in enumerate(stampers)]
    entries = tuple(PluginEntry(f"f{i}", f, 10.0, ("message",)) for i, f in enumerate(filters))
    chain = HookPlugins(entries).filterChain(clock)
    intake = Intake(spool, configured, clock, "relay.test", notify=queued.append, filters=chain, **kw)
    return intake, spool, queued


def envelope(recipients: int = 1) -> Envelope:
    client = ClientInfo("192.0.2.7", helo="client.example")
    return Envelope(
        sender="a@example.com",
        recipients=[Recipient(f"r{i}@example.org") for i in range(recipients)],
        client=client,
    )


def received(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def test_provides_the_interfaces() -> None:
    intake, _, _ = makeIntake()
    verifyObject(IIntake, intake)
    message = intake.open(envelope(), None, {})
    assert isinstance(message, IncomingMessage)
    verifyObject(IIncomingMessage, message)


def test_message_is_stamped_committed_queued_and_logged() -> None:
    stamper = Stamper()
    intake, spool, queued = makeIntake(DefaultStamper(), stamper)
    env = envelope()
    message = intake.open(env, env.client, {"add_date": False})
    assert isinstance(message, IncomingMessage) and env.queueID == message.queueID
    assert message.write(MESSAGE[:5]) is None and message.write(MESSAGE[5:]) is None
    with capturedLogs() as events:
        reply = received(message.finish())
    assert reply == Reply(250, "2.0.0", f"Ok: queued as {env.queueID}")
    assert queued == [env.queueID]
    stored, data = spool.committed[env.queueID]
    assert data.startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n")
    assert b"\tfor <r0@example.org>; " in data
    assert data.endswith(
        b"Subject: hi\r\nMessage-Id: <20270115080000."
        + env.queueID.encode()
        + b"@relay.test>\r\nX-Stamped: 1\r\n\r\nbody\r\n"
    )
    assert stored.messageSize == len(data) and stored.arrival == intake.clock.seconds()
    assert stamper.contexts[0].listenerOptions == {"add_date": False}
    (line,) = [formatEvent(e) for e in events if "nrcpt" in e["log_format"]]
    assert line == (
        f"{env.queueID}: from=<a@example.com> nrcpt=1 size={len(data)} "
        f"client=192.0.2.7 result=250 2.0.0 Ok: queued as {env.queueID}"
    )


def stampedWith(message: bytes, *stampers: Any) -> bytes:
    """What the intake stores of C{message} with C{stampers} (the default one if none)."""
    intake, spool, _ = makeIntake(*(stampers or (DefaultStamper(),)))
    env = envelope()
    opened = intake.open(env, env.client, {})
    assert isinstance(opened, IncomingMessage)
    for i in range(0, len(message), 65536):
        opened.write(message[i : i + 65536])
    assert received(opened.finish()).code == 250
    return spool.committed[env.queueID][1]


def intakeOf(message: bytes, *stampers: Any, **kw: Any) -> tuple[Reply, MemorySpool, list[str]]:
    """The reply to C{message} written in pieces of 64 KiB to an intake of C{kw}."""
    intake, spool, _ = makeIntake(*stampers, **kw)
    env = envelope()
    opened = intake.open(env, env.client, {})
    assert isinstance(opened, IncomingMessage)
    with capturedLogs() as events:
        for i in range(0, len(message), 65536):
            opened.write(message[i : i + 65536])
        reply = received(opened.finish(None, len(message)))
    return reply, spool, [formatEvent(e) for e in events if "nrcpt" in e["log_format"]]


def test_a_header_section_longer_than_header_size_is_refused() -> None:
    """A header section had no size limit: past 100 KiB (what the relay holds before it
    stamps) the rest was streamed unparsed, so a 9 MB section was acknowledged and passed on
    to the recipients' parsers, with fields the relay never saw (a Bcc: not dropped, a
    Message-Id: not seen: a second one added).  Postfix bounds one field
    (header_size_limit, 102400: mime_state.c truncates it, silently, cleanup_message.c);
    the relay refuses the whole message instead (552 5.6.0, as Sendmail's
    MaxHeadersLength and Exim's header_maxsize), as truncating would lose what it
    acknowledged: nothing is stored, no stamper is called."""
    stamper = Stamper()
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 90) for i in range(1100))
    tail = b"Message-Id: <orig@x>\r\nBcc: <hidden@x>\r\n\r\nbody\r\n"
    reply, spool, lines = intakeOf(pad + tail, DefaultStamper(), stamper)
    assert reply == R.HEADER_TOO_LONG == Reply(
        552, "5.6.0", "Error: message header size exceeds fixed limit")
    assert spool.committed == {} and spool.open == {} and stamper.contexts == []
    assert lines[0].endswith(f"size={len(pad + tail)} client=192.0.2.7 result={R.HEADER_TOO_LONG}")
    # One field that long, and a section with no empty line before the message ends.
    field = b"To: " + b",\r\n ".join(b"<r%d@example.org>" % i for i in range(6000)) + b"\r\n"
    assert intakeOf(field + b"\r\nbody\r\n")[0] == R.HEADER_TOO_LONG
    assert intakeOf(pad)[0] == R.HEADER_TOO_LONG
    # Up to the limit (a section ending there, or a body after it of any size) is taken.
    section = pad[: pad.index(b"X-Pad-900:")]  # (92590 octets)
    reply, spool, _ = intakeOf(section + b"\r\n" + pad, stamper)
    assert reply.code == 250 and stamper.contexts[-1].complete
    # [limits] header_size: the limit is the site's.
    small = b"Subject: s\r\n" + b"X-Pad: %s\r\n" % (b"b" * 1000)
    assert intakeOf(small + b"\r\nbody\r\n", maxHeaderSize=1000)[0] == R.HEADER_TOO_LONG
    assert intakeOf(small + b"\r\nbody\r\n", maxHeaderSize=1030)[0].code == 250


def test_fields_added_to_a_message_without_header_section_are_followed_by_an_empty_line() -> None:
    """A message whose first line is no header field (and no empty line) has no header
    section: the fields added on top would make its first line part of theirs (found by a
    bug hunt); an empty line after them keeps it the body it was, as for a message starting
    with white space."""
    data = stampedWith(b"hello world\r\nsecond line\r\n")
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and body == b"hello world\r\nsecond line\r\n"
    assert [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")] == [
        b"Received", b"Message-Id", b"Date"]


@implementer(IHeaderStamper)
class NoFields:
    """A stamper adding nothing."""

    def stamp(self, context: Any) -> StampResult:
        return StampResult()


def test_a_header_section_ended_by_a_line_that_is_no_field_gets_an_empty_line_before_it() -> None:
    """A header section ended by a line that is neither a field nor empty: Postfix's cleanup
    inserts an empty line before that line (non_empty_end_of_header_action = fix_quietly,
    cleanup_message.c), so that it and what follows are the body for every later reader,
    and the fields added go above it.  The relay left the message as the client made it:
    a next hop could take the line, or a field after it, as part of the header section."""
    data = stampedWith(b"Subject: x\r\nnot a field\r\nBcc: y@example.com\r\n\r\nbody\r\n")
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and body == b"not a field\r\nBcc: y@example.com\r\n\r\nbody\r\n"
    assert [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")] == [
        b"Received", b"Subject", b"Message-Id", b"Date"]
    # With no stamper, no field is added: the empty line still goes before it.
    data = stampedWith(b"Subject: x\r\nnot a field\r\n", NoFields())
    assert data == b"Subject: x\r\n\r\nnot a field\r\n"
    # A header section ended by the empty line, or by the end of the message, stays as it is.
    for message in (b"Subject: x\r\n\r\nnot a field\r\n", b"Subject: x\r\n"):
        assert stampedWith(message, NoFields()) == message


def test_stamper_answering_later_holds_the_data_and_says_so() -> None:
    stamper = Stamper(later=True)
    intake, spool, queued = makeIntake(stamper)
    env = envelope()
    message = intake.open(env, env.client, {})
    assert isinstance(message, IncomingMessage)
    assert message.write(b"Subject: hi\r\n") is None  # the header section goes on
    started = message.write(b"\r\nbody\r\n")
    assert isinstance(started, Deferred) and not started.called
    assert message.write(b"more\r\n") is None
    done = message.finish()
    assert not done.called and not spool.committed
    stamper.calls[0].callback(StampResult(prepend=[b"X-First: 1\r\n"]))
    assert started.called and received(done).code == 250
    assert spool.committed[env.queueID][1] == b"X-First: 1\r\nSubject: hi\r\n\r\nbody\r\nmore\r\n"
    assert queued == [env.queueID]


def test_a_failing_stamper_is_451_and_nothing_is_queued() -> None:
    @implementer(IHeaderStamper)
    class Broken:
        def stamp(self, context: Any) -> Any:
            return fail(RuntimeError("no"))

    intake, spool, queued = makeIntake(Broken())
    env = envelope()
    message = intake.open(env, env.client, {})
    with capturedLogs():
        message.write(MESSAGE)
        assert received(message.finish()) == STAMPING_FAILED
    assert spool.committed == {} and spool.open == {} and queued == []


def test_too_many_hops_is_554_before_any_filter() -> None:
    seen: list[Any] = []
    intake, spool, queued = makeIntake(DefaultStamper(), maxHops=2, filters=[Filter(seen.append)])
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(b"Received: a\r\nReceived: b\r\nReceived: c\r\n" + MESSAGE)
    with capturedLogs() as events:
        assert received(message.finish()) == R.TOO_MANY_HOPS
    assert spool.committed == {} and queued == [] and seen == []
    assert any("result=554 5.4.6" in formatEvent(e) for e in events)
    # Two are still fine (ours is not counted).
    message = intake.open(envelope(), None, {})
    message.write(b"Received: a\r\nReceived: b\r\n" + MESSAGE)
    assert received(message.finish()).code == 250


def test_a_commit_failure_is_451_and_logged() -> None:
    intake, spool, queued = makeIntake()
    spool.failCommits = True
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(MESSAGE)
    with capturedLogs() as events:
        assert received(message.finish()) == R.LOCAL_ERROR
    assert queued == []
    texts = [formatEvent(e) for e in events]
    assert f"{env.queueID}: spool commit failed: injected commit failure" in texts
    assert any("result=451 4.3.0" in t for t in texts)


def test_the_spool_refusing_a_new_message_is_451() -> None:
    intake, spool, _ = makeIntake()

    def refuse(queueID: str | None = None) -> Any:
        raise SpoolError("creating tmp/x.eml failed: No space left on device")

    spool.openMessage = refuse  # type: ignore[method-assign]
    with capturedLogs() as events:
        assert intake.open(envelope(), None, {}) == R.LOCAL_ERROR
    assert "cannot create queue file: creating tmp/x.eml failed" in formatEvent(events[0])


def test_the_spool_allocates_the_queue_id() -> None:
    intake, spool, _ = makeIntake()
    asked: list[str | None] = []
    openMessage = spool.openMessage

    def recording(queueID: str | None = None) -> Any:
        asked.append(queueID)
        return openMessage(queueID)

    spool.openMessage = recording  # type: ignore[method-assign]
    env = envelope()
    message = intake.open(env, env.client, {})
    assert asked == [None]
    assert env.queueID == message.queueID and list(spool.open) == [env.queueID]


def test_refused_at_its_end_logs_the_size_received() -> None:
    intake, spool, queued = makeIntake(Stamper(later=True))
    env = envelope()
    message = intake.open(env, env.client, {})
    started = message.write(MESSAGE)
    with capturedLogs() as events:
        assert received(message.finish(R.SIZE_EXCEEDED, 12345)) == R.SIZE_EXCEEDED
    assert started.called  # the stamping is abandoned: the reader may read on
    assert spool.committed == {} and spool.open == {} and queued == []
    assert "size=12345 " in formatEvent(events[-1])
    assert message.write(b"late\r\n") is None


def test_abort_drops_the_message_and_cancels_the_stamping() -> None:
    stamper = Stamper(later=True)
    intake, spool, queued = makeIntake(stamper)
    env = envelope()
    message = intake.open(env, env.client, {})
    started = message.write(MESSAGE)
    with capturedLogs() as events:
        message.abort()
        message.abort()  # once is enough
    assert started.called and stamper.calls[0].called  # cancelled
    assert spool.open == {} and spool.committed == {} and queued == []
    assert [formatEvent(e) for e in events] == [f"{env.queueID}: message not completed, dropped"]
    assert received(message.finish()) == R.LOCAL_ERROR


@implementer(IMessageFilter)
class Filter:
    """A message filter answering C{judge(context)}."""

    def __init__(self, judge: Any) -> None:
        self.judge = judge

    def filterMessage(self, context: Any) -> Any:
        return self.judge(context)


def test_filters_run_in_order_and_may_refuse() -> None:
    calls: list[str] = []

    def passes(context: Any) -> None:
        calls.append(f"pass {context.envelope.queueID} {context.size}")

    later: Deferred[Any] = Deferred()

    def slow(context: Any) -> Deferred[Any]:
        calls.append("slow")
        return later

    refusal = Verdict.reject("Error: spam", 554, "5.7.1")
    refuses = Filter(lambda context: succeed(refusal))
    intake, spool, queued = makeIntake(filters=[Filter(passes), Filter(slow), refuses])
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(MESSAGE)
    done = message.finish()
    box: list[Any] = []
    done.addBoth(box.append)
    assert calls == [f"pass {env.queueID} {len(MESSAGE)}", "slow"] and box == []
    later.callback(None)
    assert box == [refusal.reply] and spool.committed == {} and queued == []


def test_a_filter_changing_the_envelope_is_named() -> None:
    """Found by a bug hunt: a site message filter that sets a recipient's NOTIFY got the
    message refused (the intake's check at commit) with a log line naming no plugin; the
    policy runner checks a filter as it checks every hook's plugin (docs/plugins.md):
    undone, the stage deferred, the plugin named."""

    def silences(context: Any) -> None:
        context.envelope.recipients[0].notify = ("NEVER",)

    intake, spool, queued = makeIntake(filters=[Filter(silences)])
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(MESSAGE)
    with capturedLogs() as events:
        assert received(message.finish()) == FILTER_FAILED.reply
    assert spool.committed == {} and env.recipients[0].notify is None
    assert any("message plugin f0 changed the Recipient's notify" in formatEvent(e)
               for e in events), [formatEvent(e) for e in events]


@pytest.mark.parametrize(
    "answer",
    [
        lambda: fail(RuntimeError("scanner down")),
        lambda: 1 / 0,
        lambda: "yes",
        lambda: Reply(250, "2.0.0", "ok"),
        lambda: FilterResult(prepend=(b"X-Bad: no line end",)),
        lambda: FilterResult(append=("X-Text: not bytes\r\n",)),
    ],
)
def test_a_failing_or_wrong_filter_never_lets_the_message_through(answer: Any) -> None:
    intake, spool, queued = makeIntake(filters=[Filter(lambda context: answer())])
    message = intake.open(envelope(), None, {})
    message.write(MESSAGE)
    with capturedLogs() as events:
        assert received(message.finish()) == FILTER_FAILED.reply
    assert spool.committed == {} and queued == []
    assert any("message plugin f0" in formatEvent(e) for e in events)


def test_filters_pass_and_the_message_is_committed() -> None:
    intake, spool, queued = makeIntake(
        filters=[Filter(lambda c: None), Filter(lambda c: succeed(Verdict.continue_()))]
    )
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(MESSAGE)
    assert received(message.finish()).code == 250 and queued == [env.queueID]
    assert spool.messages() == [MESSAGE]


def test_filters_read_the_message_and_add_fields_before_the_commit() -> None:
    """Each filter reads the message as it stands (stamped, with the fields of the filters
    before it); the message is spooled with every field, its size counts them."""
    seen: list[bytes] = []

    def first(context: Any) -> Deferred[FilterResult]:
        def got(message: bytes) -> FilterResult:
            seen.append(message)
            return FilterResult(prepend=(b"X-First: 1\r\n",), append=(b"X-Tail: 1\r\n",))

        return context.read().addCallback(got)

    def second(context: Any) -> Deferred[FilterResult]:
        def got(message: bytes) -> FilterResult:
            seen.append(message)
            return FilterResult(prepend=(b"X-Second: 2\r\n",))

        return context.read().addCallback(got)

    intake, spool, queued = makeIntake(Stamper(), filters=[Filter(first), Filter(second)])
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(MESSAGE)
    assert received(message.finish()).code == 250
    stamped = b"Subject: hi\r\nX-Stamped: 1\r\n\r\nbody\r\n"
    assert seen == [stamped, b"X-First: 1\r\nSubject: hi\r\nX-Stamped: 1\r\nX-Tail: 1\r\n\r\nbody\r\n"]
    final = b"X-Second: 2\r\n" + seen[1]
    assert spool.messages() == [final]
    assert spool.committed[env.queueID][0].messageSize == len(final)


def test_filters_remove_fields_they_read() -> None:
    """A filter removes fields of the message (RFC 8601 section 5: forged
    Authentication-Results), byte for byte as read; later filters and the spool see the
    message without them, its size counts it."""
    forged = b"Authentication-Results: relay.test;\r\n spf=pass\r\n"
    original = b"Subject: hi\r\n" + forged + b"To: a@example.org\r\n" + forged + b"\r\nbody\r\n"
    seen: list[bytes] = []

    def strips(context: Any) -> Deferred[FilterResult]:
        return context.read().addCallback(
            lambda m: FilterResult(prepend=(b"X-A: 1\r\n",), remove=(forged,))
        )

    def later(context: Any) -> Deferred[None]:
        return context.read().addCallback(seen.append)

    intake, spool, queued = makeIntake(filters=[Filter(strips), Filter(later)])
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(original)
    assert received(message.finish()).code == 250
    final = b"X-A: 1\r\nSubject: hi\r\nTo: a@example.org\r\n\r\nbody\r\n"
    assert seen == [final] and spool.messages() == [final]
    assert spool.committed[env.queueID][0].messageSize == len(final)


def test_a_filter_rewrites_the_envelope_sender_and_fields_in_place() -> None:
    """A filter (the built-in sender-canonical, as Postfix's cleanup applies
    canonical_maps) rewrites the envelope sender and replaces header fields where they
    stand: later filters (a DKIM signer) see both, the spool keeps them, the message's size
    counts them, and the log says the rewrite; the from= of the message's line is the new
    sender, as Postfix's qmgr logs the sender cleanup rewrote."""
    original = b"Subject: hi\r\nFrom: Root <root@web1.internal>\r\nTo: a@example.org\r\n\r\nbody\r\n"
    new = b"From: Root <ops@example.com>\r\n"
    seen: list[tuple[str, bytes]] = []

    def rewrites(context: Any) -> Deferred[FilterResult]:
        return context.read().addCallback(lambda m: FilterResult(
            sender="ops@example.com", replace=((b"From: Root <root@web1.internal>\r\n", new),)))

    def later(context: Any) -> Deferred[None]:
        return context.read().addCallback(lambda m: seen.append((context.envelope.sender, m)))

    intake, spool, queued = makeIntake(filters=[Filter(rewrites), Filter(later)])
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(original)
    with capturedLogs() as events:
        assert received(message.finish()).code == 250
    final = b"Subject: hi\r\n" + new + b"To: a@example.org\r\n\r\nbody\r\n"
    assert seen == [("ops@example.com", final)] and spool.messages() == [final]
    stored = spool.committed[env.queueID][0]
    assert stored.sender == "ops@example.com" and stored.messageSize == len(final)
    lines = [formatEvent(e) for e in events]
    assert f"{env.queueID}: sender=<a@example.com> rewritten to <ops@example.com>" in lines
    assert any(line.startswith(f"{env.queueID}: from=<ops@example.com> nrcpt=1") for line in lines)


@pytest.mark.parametrize(
    "judge",
    [
        lambda c: FilterResult(sender="not an address"),
        lambda c: FilterResult(sender=""),  # (a sender never becomes the null sender)
        lambda c: FilterResult(sender="jos\u00e9@example.com"),  # (not SMTPUTF8)
        lambda c: FilterResult(replace=((b"Subject: hi\r\n", b"Subject: ho\r\n"),)),  # unread
        lambda c: c.read().addCallback(
            lambda m: FilterResult(replace=((b"X-None: 1\r\n", b"X-None: 2\r\n"),))),
        lambda c: c.read().addCallback(
            lambda m: FilterResult(replace=((b"Subject: hi\r\n", b"To: x@example.org\r\n"),))),
        lambda c: c.read().addCallback(
            lambda m: FilterResult(replace=((b"Subject: hi\r\n", b"Subject: ho\n"),))),
    ],
)
def test_a_filter_rewriting_badly_fails(judge: Any) -> None:
    """A sender that is no address (or none, or needs SMTPUTF8 the message lacks), a field
    replaced that is not there, was not read, or by another field or a malformed one: the
    message is refused, never spooled half rewritten."""
    assertFilterFails(judge, envelope())


def test_a_filter_never_rewrites_the_null_sender() -> None:
    env = envelope()
    env.sender = ""
    assertFilterFails(lambda c: FilterResult(sender="a@b.example"), env)


def assertFilterFails(judge: Any, env: Envelope) -> None:
    """The filter answering C{judge(context)} makes the message of C{env} refused (451)."""
    intake, spool, queued = makeIntake(filters=[Filter(judge)])
    message = intake.open(env, None, {})
    message.write(MESSAGE)
    with capturedLogs():
        assert received(message.finish()) == FILTER_FAILED.reply
    assert spool.committed == {}


@pytest.mark.parametrize(
    "judge",
    [
        lambda c: FilterResult(remove=(b"Subject: hi\r\n",)),  # not read
        lambda c: c.read().addCallback(lambda m: FilterResult(remove=(b"X-None: 1\r\n",))),
        lambda c: c.read().addCallback(lambda m: FilterResult(remove=(b"body\r\n",))),
    ],
)
def test_a_filter_removing_fields_not_read_or_not_there_fails(judge: Any) -> None:
    assertFilterFails(judge, envelope())


def test_fields_of_a_refusing_filter_are_not_added() -> None:
    refused = FilterResult(Verdict.defer("Error: later"), prepend=(b"X-No: 1\r\n",))
    intake, spool, _ = makeIntake(filters=[Filter(lambda c: refused)])
    message = intake.open(envelope(), None, {})
    message.write(MESSAGE)
    assert str(received(message.finish())) == "451 4.3.0 Error: later"
    assert spool.committed == {}


def test_a_filter_disconnecting_answers_421() -> None:
    intake, spool, _ = makeIntake(filters=[Filter(lambda c: Verdict.disconnect("Error: bye"))])
    message = intake.open(envelope(), None, {})
    message.write(MESSAGE)
    assert str(received(message.finish())) == "421 4.7.0 Error: bye"


def test_filters_see_the_messages_the_relay_makes() -> None:
    clients: list[Any] = []
    intake, spool, _ = makeIntake(
        DefaultStamper(), filters=[Filter(lambda c: clients.append(c.client))]
    )
    queueID = received(intake.submit(Envelope(sender="", recipients=[Recipient("a@x.test")]), MESSAGE))
    assert clients == [None] and queueID in spool.committed


def test_notify_failing_is_logged_and_the_message_stays_accepted() -> None:
    intake, spool, _ = makeIntake()

    def refuse(queueID: str) -> None:
        raise RuntimeError("queue manager gone")

    intake.notify = refuse
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(MESSAGE)
    with capturedLogs() as events:
        assert received(message.finish()).code == 250
    assert env.queueID in spool.committed
    assert any("queue manager refused the new entry" in formatEvent(e) for e in events)


def test_submit_stamps_as_local_mail_and_queues() -> None:
    stamper = Stamper()
    intake, spool, queued = makeIntake(DefaultStamper(), stamper)
    dsn = Envelope(sender="", recipients=[Recipient("a@example.com")], isBounce=True)
    queueID = received(intake.submit(dsn, b"From: MAILER-DAEMON@relay.test\r\n\r\nsorry\r\n"))
    assert queueID == dsn.queueID and queued == [queueID]
    stored, data = spool.committed[queueID]
    assert stored.isBounce and stored.messageSize == len(data)
    date = data.split(b"; ", 1)[1].split(b"\r\n", 1)[0]
    assert data.startswith(
        b"Received: by relay.test (mailrelay) id "
        + queueID.encode()
        + b"; "
        + date
        + b"\r\nFrom: MAILER-DAEMON@relay.test\r\nMessage-Id: <"
    )
    assert b"\r\nDate: " + date + b"\r\nX-Stamped: 1\r\n\r\nsorry\r\n" in data
    assert stamper.contexts[0].client is None


def test_submit_without_notify_leaves_the_scheduling_to_the_caller() -> None:
    """The queue manager commits a notification and enqueues its id itself: the intake
    tells nobody, and logs the message's one line, with no client (the DSN envelope's
    stand-in client is not a client that sent it)."""
    intake, spool, queued = makeIntake()
    dsn = Envelope(
        sender="",
        recipients=[Recipient("a@example.com")],
        client=ClientInfo("127.0.0.1", helo="relay.test"),
        arrival=12.0,
        messageSize=3,
        isBounce=True,
    )
    with capturedLogs() as events:
        queueID = received(intake.submit(dsn, MESSAGE, notify=False))
    assert queued == [] and queueID == dsn.queueID
    stored, data = spool.committed[queueID]
    assert stored.arrival == intake.clock.seconds() and stored.messageSize == len(data)
    assert stored.client == dsn.client and stored.isBounce
    lines = [formatEvent(e) for e in events]
    assert lines == [
        f"{queueID}: from=<> nrcpt=1 size={len(data)} result=250 2.0.0 Ok: queued as {queueID}"
    ]
    assert events[0]["client"] is None


def test_submit_fails_with_the_reply_when_refused() -> None:
    intake, spool, queued = makeIntake()
    spool.failCommits = True
    with capturedLogs():
        failure = received(intake.submit(envelope(), MESSAGE))
    assert failure.check(MessageRefused) and failure.value.reply == R.LOCAL_ERROR
    assert str(failure.value) == str(R.LOCAL_ERROR) and queued == []


@pytest.mark.parametrize("smtputf8", [False, True])
def test_a_plugin_may_add_utf8_fields_only_to_an_smtputf8_message(smtputf8: bool) -> None:
    """RFC 6532: UTF-8 in a header field needs SMTPUTF8.  A filter or a stamper adding one to
    a message that is not SMTPUTF8 made the relay send 8-bit header octets to next hops that
    never agreed to them: now the plugin's answer is refused (451, logged naming it), as for
    any malformed field.  An SMTPUTF8 message may get them."""
    field = "X-Note: café\r\n".encode()

    class Stamper:
        def stamp(self, context: Any) -> StampResult:
            return StampResult(append=[field])

    for plugins in ({"filters": [Filter(lambda context: FilterResult(prepend=(field,)))]},
                    {"stampers": [Stamper()]}):
        intake, spool, queued = makeIntake(*plugins.get("stampers", ()), filters=plugins.get("filters", ()))
        env = envelope()
        env.smtputf8 = smtputf8
        with capturedLogs() as events:
            message = intake.open(env, env.client, {})
            message.write(MESSAGE)
            answer = received(message.finish())
        if smtputf8:
            assert answer.code == 250 and spool.messages()[0].count(field) == 1
        else:
            assert answer.code == 451 and spool.committed == {} and queued == []
            text = " ".join(formatEvent(e) for e in events)
            assert "not SMTPUTF8" in text and ("f0" in text or "s0" in text), text


def test_fields_filters_add_to_a_message_without_header_section_are_followed_by_an_empty_line() -> None:
    """As the stampers' fields (header_stampers = [] leaves the message as sent): a field
    prepended above a first line starting with white space was continued by it, and one
    above a line that is no field made that line part of the header section."""
    from mailrelay.cleanup.filters import withFields

    field = b"X-Filter: 1\r\n"
    for message in (b" continued\r\n\r\nbody\r\n", b"not a field\r\nbody\r\n"):
        for prepend, append in (([field], []), ([], [field]), ([field], [field])):
            assert withFields(message, prepend, append) == (
                b"".join(prepend) + b"".join(append) + b"\r\n" + message)
    for message in (b"\r\nbody\r\n", b"Subject: s\r\n\r\nbody\r\n"):
        end = message.index(b"\r\n") + 2 if message.startswith(b"S") else 0
        assert withFields(message, [field], [field]) == (
            field + message[:end] + field + message[end:])
    # (A header section ended by a line that is no field: the empty line goes before it.)
    assert withFields(b"Subject: s\r\nnot a field\r\n", [field], [field]) == (
        field + b"Subject: s\r\n" + field + b"\r\nnot a field\r\n")


@pytest.mark.parametrize("withFilter", [False, True])
def test_dropped_fields_are_removed_before_the_filters_and_the_commit(withFilter: bool) -> None:
    """The fields of dropHeaders (Postfix's message_drop_headers), whatever their case and
    folding: gone from the message spooled, and from what the filters read; its size counts
    it; a message without one is not written again."""
    seen: list[bytes] = []

    def reads(context: Any) -> Deferred[None]:
        return context.read().addCallback(lambda m: seen.append(m) and None)

    filters = [Filter(reads)] if withFilter else []
    intake, spool, queued = makeIntake(filters=filters, dropHeaders=("Bcc", "return-path"))
    original = (b"Subject: hi\r\nbcc: a@example.org,\r\n b@example.org\r\n"
                b"Return-Path: <x@example.org>\r\nTo: c@example.org\r\n\r\nBcc: body\r\n")
    env = envelope()
    message = intake.open(env, env.client, {})
    message.write(original)
    assert received(message.finish()).code == 250
    kept = b"Subject: hi\r\nTo: c@example.org\r\n\r\nBcc: body\r\n"
    assert spool.messages() == [kept]
    assert spool.committed[env.queueID][0].messageSize == len(kept)
    assert seen == ([kept] if withFilter else [])


def test_postmaster_at_the_relay_goes_to_the_queue_postmaster() -> None:
    """RFC 5321 4.5.1: mail to postmaster must be accepted, and the relay accepts
    postmaster@<hostname> (and <postmaster>) from anyone; but it had no delivery of its own:
    it went to the smarthost or the host name's MX (the relay itself: a loop, bounced).
    Postfix delivers it locally (postmaster@$myhostname is in mydestination, aliased to a
    person, aliases(5)).  The relay's person is [queue] postmaster (where the bounces
    nobody else takes go): the recipient becomes that address, its ORCPT keeps the one the
    client gave (as Postfix's alias expansion keeps the original recipient), and a second
    copy for the same address is not made."""
    intake, spool, _ = makeIntake(postmaster="admin@example.org")
    env = envelope()
    env.recipients = [Recipient("PostMaster@relay.test"), Recipient("c@d.example"),
                      Recipient("postmaster@relay.test", orcpt="rfc822;postmaster")]
    opened = intake.open(env, env.client, {})
    assert isinstance(opened, IncomingMessage)
    opened.write(MESSAGE)
    assert received(opened.finish()).code == 250
    queued, _ = spool.committed[env.queueID]
    assert [(r.address, r.orcpt) for r in queued.recipients] == [
        ("admin@example.org", "rfc822;PostMaster@relay.test"), ("c@d.example", None)]
    # Without [queue] postmaster, or for another domain's postmaster: as before.
    for postmaster, rcpt in ((None, "postmaster@relay.test"),
                             ("admin@example.org", "postmaster@other.example")):
        intake, spool, _ = makeIntake(postmaster=postmaster)
        env = envelope()
        env.recipients = [Recipient(rcpt)]
        opened = intake.open(env, env.client, {})
        opened.write(MESSAGE)
        assert received(opened.finish()).code == 250
        assert [r.address for r in spool.committed[env.queueID][0].recipients] == [rcpt]


def test_received_for_names_the_recipient_given_not_the_postmaster_it_goes_to() -> None:
    """The C{for} clause of C{Received:} names the recipient as the client gave it at RCPT
    (Postfix's smtpd writes C{state->recipient}, the RCPT address, before cleanup qualifies
    or rewrites it), not C{[queue] postmaster} it is delivered to; and the stampers see the recipients
    accepted at RCPT (two given: no C{for} clause, though one address remains)."""
    intake, spool, _ = makeIntake(DefaultStamper(), postmaster="admin@example.org")
    for given in (["PostMaster"], ["PostMaster", "admin@example.org"]):
        env = envelope()
        env.recipients = [Recipient(address if "@" in address else "postmaster@relay.test",
                                    original=address) for address in given]
        opened = intake.open(env, env.client, {})
        assert isinstance(opened, IncomingMessage)
        opened.write(MESSAGE)
        assert received(opened.finish()).code == 250
        queued, data = spool.committed[env.queueID]
        assert [r.address for r in queued.recipients] == ["admin@example.org"]
        head = data.split(b";", 1)[0]
        if len(given) == 1:
            assert head.endswith(b"\tfor <PostMaster>"), data
        else:
            assert b"for <" not in head, data
