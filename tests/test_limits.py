"""Abuse limits, protocol synchronization and session deadlines: the limiter, the sans-IO
session, and the protocol on a C{StringTransport} with a C{Clock}."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import IRateLimiter
from mailrelay.limits import LIMITER_TIMEOUT, ListenerLimits, MemoryRateLimiter
from mailrelay.receive.limits import LimitSettings
from mailrelay.receive.listener import ListenerSettings
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.server import SYNC_ERROR, Close, ServerSession, SessionSettings, SyncError
from mailrelay.testing import ServerHarness

SYNC = b"554 5.5.0 Error: SMTP protocol synchronization"


def messages(logs: list[dict]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in logs)


# The in-memory limiter ---------------------------------------------------------------------------


def test_memoryLimiterProvidesTheInterface() -> None:
    verifyObject(IRateLimiter, MemoryRateLimiter(Clock()))


def test_memoryLimiterCountsSessions() -> None:
    limiter = MemoryRateLimiter(Clock())
    assert [limiter.acquire("a") for _ in range(3)] == [1, 2, 3]
    assert limiter.acquire("b") == 1
    limiter.release("a")
    assert limiter.sessions("a") == 2
    limiter.release("a")
    limiter.release("a")
    limiter.release("a")  # one too many: never negative
    assert limiter.sessions("a") == 0
    assert limiter.acquire("a") == 1


def test_memoryLimiterFixedWindows() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    assert [limiter.hit("k", 60) for _ in range(3)] == [1, 2, 3]
    clock.advance(59.9)
    assert limiter.hit("k", 60) == 4
    clock.advance(0.1)  # the window that started at 0 ended at 60
    assert limiter.hit("k", 60) == 1
    assert limiter.hit("other", 60) == 1


def test_memoryLimiterWindowsEndAfterTheirLengthWhenTheClockStepsBack() -> None:
    """A step back of the clock (NTP, date -s) does not stretch a window: counted on the
    clock before the step, it ends its length after now at the latest (it went on until
    the clock reached its end again: a client limited for the size of the step)."""
    clock = Clock()
    clock.advance(1_800_000_000)
    limiter = MemoryRateLimiter(clock)
    assert [limiter.hit("k", 60) for _ in range(3)] == [1, 2, 3]
    clock.rightNow -= 3 * 3600
    clock.advance(30)
    assert limiter.hit("k", 60) == 4  # still counted: the window is not lifted by a step
    clock.advance(59)
    assert limiter.hit("k", 60) == 5
    clock.advance(1)
    assert limiter.hit("k", 60) == 1  # over 60 seconds after that count, not 3 hours


def test_memoryLimiterForgetsOldWindows() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock, maxEntries=3)
    for i in range(10):
        limiter.hit(f"k{i}", 60)
    assert len(limiter._windows) == 3
    assert limiter.hit("k9", 60) == 2  # the most recent are kept
    clock.advance(61)
    limiter.hit("new", 60)
    limiter.hit("new", 60)
    assert len(limiter._windows) < 3  # ended windows are dropped as events come


# Connection limits -------------------------------------------------------------------------------


def harness(peer: str = "192.0.2.1", **limits) -> ServerHarness:
    return ServerHarness(peer=peer, limits=limits)


def test_perClientConcurrencyLimit() -> None:
    h = harness(maxConnectionsPerClient=2)
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    second = h.another("192.0.2.1")
    assert second.replies()[0].startswith(b"220 ")
    with capturedLogs() as logs:
        third = h.another("192.0.2.1")
    assert third.replies() == [b"421 4.7.0 relay.test Error: too many connections from 192.0.2.1"]
    assert third.closed
    assert "connection from 192.0.2.1 on test refused: 3 connections at once is over the limit of 2" in messages(logs)
    # Another address is not affected.
    assert h.another("192.0.2.2").replies()[0].startswith(b"220 ")
    # The refused connection and a closed one free their places.
    third.loseConnection()
    second.send(b"QUIT\r\n")
    second.loseConnection()
    assert h.limiter.sessions("test conn 192.0.2.1") == 1
    fourth = h.another("192.0.2.1")
    assert fourth.replies()[0].startswith(b"220 ")
    assert h.limits.active == 3


def test_totalConcurrencyLimit() -> None:
    h = harness(maxConnections=2, maxConnectionsPerClient=0)
    h.another("192.0.2.2")
    third = h.another("127.0.0.1")  # exceptions do not apply to the listener's total
    assert third.replies() == [b"421 4.7.0 relay.test Error: too many connections"]
    assert third.closed
    third.loseConnection()
    h.loseConnection()
    assert h.another("192.0.2.3").replies()[0].startswith(b"220 ")


def test_exceptionNetworksAreNotLimited() -> None:
    h = harness(
        peer="10.1.2.3",
        maxConnectionsPerClient=1,
        connectionRateLimit=1,
        exceptions=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    others = [h.another("10.1.2.3") for _ in range(3)]
    assert all(o.replies()[0].startswith(b"220 ") for o in others)
    assert h.limiter.sessions("test conn 10.1.2.3") == 0
    # IPv4-mapped IPv6 addresses are their IPv4 address.
    assert h.limits.isExempt("::ffff:10.0.0.1")
    assert not h.limits.isExempt("192.0.2.1")
    assert h.limits.isExempt("not an address")  # a UNIX socket's peer


def test_connectionRateLimit() -> None:
    h = harness(connectionRateLimit=3, rateWindow=60, maxConnectionsPerClient=0)
    h.loseConnection()
    for _ in range(2):
        c = h.another("192.0.2.1")
        assert c.replies()[0].startswith(b"220 ")
        c.loseConnection()
    with capturedLogs() as logs:
        over = h.another("192.0.2.1")
    assert over.replies() == [b"421 4.7.0 relay.test Error: too many connections from 192.0.2.1"]
    assert "connection rate 4 in 60s is over the limit of 3" in messages(logs)
    h.clock.advance(60)
    assert h.another("192.0.2.1").replies()[0].startswith(b"220 ")


@implementer(IRateLimiter)
class OneCounterPerKey:
    """A store-backed limiter as docs/plugins.md describes it for Redis: acquire INCR,
    release DECR, hit INCR (its window's expiry aside): one counter per key."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def release(self, key: str) -> None:
        self.counts[key] -= 1

    def hit(self, key: str, window: float) -> int:
        return self.acquire(key)


def test_the_connection_rate_and_the_sessions_open_are_counted_under_two_keys() -> None:
    """Both counted under one key ("conn"), a limiter keeping one counter per key (Redis,
    as the docs tell) added each connection's hit to the sessions open: ten connections one
    after the other, with at most five at once allowed, and the sixth was refused."""
    h = ServerHarness(peer="192.0.2.1", limiter=OneCounterPerKey(),
                      limits={"maxConnectionsPerClient": 5, "connectionRateLimit": 100})
    h.loseConnection()
    for _ in range(9):
        c = h.another("192.0.2.1")
        assert c.replies()[0].startswith(b"220 ")
        c.loseConnection()
    assert h.limiter.counts == {"test conn 192.0.2.1": 0, "test conn-rate 192.0.2.1": 10}


def test_messageRateLimitPerClient() -> None:
    h = harness(messageRateLimit=2)
    h.replies()
    h.send(b"EHLO client.example\r\n")
    for _ in range(2):
        assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
        h.send(b"RSET\r\n")
    with capturedLogs() as logs:
        assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"450 4.7.1 Error: too much mail from 192.0.2.1"]
    assert "192.0.2.1: MAIL FROM:<a@example.com> refused: message rate 3 in 60s is over the limit of 2" in messages(logs)
    # Counted per address, across connections.
    other = h.another("192.0.2.1")
    other.replies()
    other.send(b"EHLO client.example\r\n")
    assert other.send(b"MAIL FROM:<a@example.com>\r\n")[0].startswith(b"450 4.7.1")
    h.clock.advance(60)
    assert other.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]


def test_messageRateLimitPerUser() -> None:
    h = ServerHarness(
        peer="192.0.2.1", users={"alice": "pw", "bob": "pw"}, authWithoutTLS=True,
        limits={"userMessageRateLimit": 1, "exceptions": (ipaddress.ip_network("192.0.2.0/24"),)},
    )
    h.replies()
    h.send(b"EHLO client.example\r\n")
    import base64

    assert h.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n")[0].startswith(b"235")
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
    h.send(b"RSET\r\n")
    # Exceptions do not exempt users.
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"450 4.7.1 Error: too much mail from user alice"]
    bob = h.another("192.0.2.1")
    bob.replies()
    bob.send(b"EHLO client.example\r\n")
    bob.send(b"AUTH PLAIN " + base64.b64encode(b"\0bob\0pw") + b"\r\n")
    assert bob.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]


@implementer(IRateLimiter)
class SlowLimiter:
    """Answers when told to; or fails."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing
        self.calls: list[tuple] = []
        self.pending: list[Deferred] = []

    def acquire(self, key):
        return self._call("acquire", key)

    def release(self, key):
        self.calls.append(("release", key))

    def hit(self, key, window):
        return self._call("hit", key)

    def _call(self, *call):
        self.calls.append(call)
        if self.failing:
            return fail(ConnectionError("redis is down"))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


def test_asynchronousLimiterDelaysTheGreeting() -> None:
    limiter = SlowLimiter()
    verifyObject(IRateLimiter, limiter)
    h = ServerHarness(peer="192.0.2.1", limiter=limiter, limits={"maxConnectionsPerClient": 1})
    assert h.replies() == []
    # A client that talks meanwhile is early (with rejectPregreet off its input waits).
    h.send(b"EHLO x\r\n")
    assert h.transport.producerState == "paused"
    limiter.pending.pop().callback(1)
    assert h.replies()[0] == b"220 relay.test ESMTP mailrelay"
    assert h.replies() == [] and h.transport.producerState == "producing"
    h.loseConnection()
    assert limiter.calls[-1] == ("release", "test conn 192.0.2.1")


def test_asynchronousLimiterAnswersAfterTheClientLeft() -> None:
    limiter = SlowLimiter()
    h = ServerHarness(peer="192.0.2.1", limiter=limiter, limits={"maxConnectionsPerClient": 1})
    h.loseConnection()
    assert h.limits.active == 0
    limiter.pending.pop().callback(1)  # counted after all: released at once
    assert limiter.calls == [("acquire", "test conn 192.0.2.1"), ("release", "test conn 192.0.2.1")]
    assert h.transport.value() == b""


def test_failingOrSlowLimiterDoesNotStopMail() -> None:
    limiter = SlowLimiter(failing=True)
    with capturedLogs() as logs:
        h = ServerHarness(peer="192.0.2.1", limiter=limiter, limits={"messageRateLimit": 1, "connectionRateLimit": 1})
        assert h.replies()[0].startswith(b"220 ")
        h.send(b"EHLO x\r\n")
        assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
    assert "rate limiter acquire(test conn 192.0.2.1) failed, limit not applied: redis is down" in messages(logs)
    # A limiter that does not answer is given up after LIMITER_TIMEOUT seconds.
    slow = SlowLimiter()
    h = ServerHarness(peer="192.0.2.1", limiter=slow, limits={})
    assert h.replies() == []
    h.clock.advance(LIMITER_TIMEOUT)
    assert h.replies()[0].startswith(b"220 ")
    h.loseConnection()
    assert ("release", "test conn 192.0.2.1") not in slow.calls  # never counted


@pytest.mark.parametrize("leaveFirst", [True, False])
@pytest.mark.parametrize("canceller", [None, lambda d: None])
def test_a_late_acquire_that_ignored_the_timeout_is_released(leaveFirst: bool,
                                                             canceller: Any) -> None:
    """A rate limiter whose acquire answers after LIMITER_TIMEOUT (its Deferred has no
    canceller, or one that ignores the cancel: a thread or a store that counted anyway)
    has counted the session: it is released, at once when the client already left, else
    when it leaves, as Postfix's smtpd always sends anvil its disconnect.  The timeout's
    cancel dropped the late count, and the session was never released."""
    limiter = SlowLimiter()
    pending: list[Deferred] = []

    def acquire(key: str) -> Deferred:
        limiter.calls.append(("acquire", key))
        pending.append(Deferred(canceller))
        return pending[-1]

    limiter.acquire = acquire  # type: ignore[method-assign]
    with capturedLogs():
        h = ServerHarness(peer="192.0.2.1", limiter=limiter, limits={})
        h.clock.advance(LIMITER_TIMEOUT)  # given up: the session goes on, not limited
    assert h.replies()[0].startswith(b"220 ")
    if leaveFirst:
        h.loseConnection()
    pending.pop().callback(1)  # the limiter counted it after all
    if not leaveFirst:
        assert ("release", "test conn 192.0.2.1") not in limiter.calls
        h.loseConnection()
    assert limiter.calls == [("acquire", "test conn 192.0.2.1"),
                             ("release", "test conn 192.0.2.1")]


@pytest.mark.parametrize("answer", ["OK", None, -1, True, 2.5])
def test_a_limiter_answering_no_count_is_not_applied(answer: Any) -> None:
    """A rate limiter whose acquire or hit answers something that is not a count ('OK',
    None, a negative number, a bool, a float): logged naming the call and the answer, that
    limit not applied, the session goes on.  'OK' raised TypeError out of the limit check
    (critical) and the client was never greeted nor closed; None was taken silently."""
    limiter = SlowLimiter()
    with capturedLogs() as logs:
        h = ServerHarness(peer="192.0.2.1", limiter=limiter,
                          limits={"maxConnectionsPerClient": 5, "connectionRateLimit": 10})
        limiter.pending.pop().callback(answer)  # acquire
        if limiter.pending:
            limiter.pending.pop().callback(answer)  # hit
        assert h.replies()[0] == b"220 relay.test ESMTP mailrelay"
    text = messages(logs)
    assert (f"rate limiter acquire(test conn 192.0.2.1) answered {answer!r}, not a count: "
            "limit not applied") in text, text
    assert "critical" not in text.lower() and "Traceback" not in text


def test_a_limiter_that_does_not_answer_is_said_so() -> None:
    slow = SlowLimiter()
    with capturedLogs() as logs:
        h = ServerHarness(peer="192.0.2.1", limiter=slow, limits={})
        h.clock.advance(LIMITER_TIMEOUT)
    assert (f"rate limiter acquire(test conn 192.0.2.1) did not answer within "
            f"{LIMITER_TIMEOUT:g}s, limit not applied") in messages(logs)
    h.loseConnection()


# Protocol synchronization --------------------------------------------------------------------------


def strict(**kw) -> ServerHarness:
    h = ServerHarness(rejectUnauthPipelining=True, **kw)
    h.replies()
    return h


def test_pipeliningAfterEhloIsAllowed() -> None:
    h = strict()
    h.send(b"EHLO client.example\r\n")
    lines = h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
    assert h.codes(lines) == [250, 250, 250, 354]
    assert h.codes(h.send(b"hi\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n")) == [250, 250, 250, 221]


@pytest.mark.parametrize(
    "data, after",
    [
        (b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n", "EHLO"),  # EHLO must end a group
        (b"HELO x\r\nMAIL FROM:<a@example.com>\r\n", "HELO"),
        (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n", "MAIL"),  # no EHLO yet
        (b"NOOP\r\nNOOP\r\n", "NOOP"),
        (b"RSET\r\nQUIT\r\n", "RSET"),
    ],
)
def test_unauthorisedPipeliningIsRefused(data: bytes, after: str) -> None:
    h = strict()
    with capturedLogs() as logs:
        assert h.send(data) == [SYNC]
    assert h.closed
    text = messages(logs)
    assert f"improper command pipelining after {after} from 127.0.0.1: " in text
    assert "refused with 554" in text


@pytest.mark.parametrize(
    "data, logged",
    [
        # The initial response of a pipelined AUTH is the user's password (base64).
        (b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\n", b"AUTH PLAIN [...]"),
        (b"EHLO x\r\nauth login YWxpY2U=\r\nc2VjcmV0MQ==\r\n", b"auth login [...]"),
        # After HELO every command is the last of its group: what follows AUTH LOGIN is the
        # user name and the password.
        (b"HELO x\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0MQ==\r\n", b"AUTH LOGIN [...]"),
    ],
)
def test_pipelinedCredentialsAreNotLogged(data: bytes, logged: bytes) -> None:
    """The pending input a 554 for pipelining logs stops at an AUTH command's mechanism:
    its initial response and the lines after it are credentials."""
    h = strict()
    with capturedLogs() as logs:
        h.send(data)
    assert h.closed
    text = messages(logs)
    assert repr(logged)[2:-1] in text, text
    assert "c2VjcmV0MQ" not in text and "AGFsaWNlAHNlY3JldDE" not in text, text


def test_credentialsPipelinedAfterAuthAreNotLogged() -> None:
    """After HELO, AUTH is the last of its group too: the lines pipelined after it (the
    user name and password of AUTH LOGIN) are not logged at all."""
    s = ServerSession(SessionSettings("h", rejectUnauthPipelining=True), ClientInfo("192.0.2.1"))
    s.dataReceived(b"HELO x\r\n")
    events = s.dataReceived(b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0MQ==\r\n")
    assert SyncError("AUTH", b"[...]") in events, events


def test_credentialsOfAnEarlyTalkerAreNotLogged() -> None:
    h = ServerHarness(greetPause=2.0)
    h.clock.advance(1)
    with capturedLogs() as logs:
        assert h.send(b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\n") == [SYNC]
    text = messages(logs)
    assert "talked before the greeting: b'EHLO x\\r\\nAUTH PLAIN [...]'" in text, text


def test_pipelinedAfterHeloIsRefused() -> None:
    h = strict()
    assert h.send(b"HELO x\r\n") == [b"250 relay.test"]
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
    assert h.send(b"RCPT TO:<b@example.org>\r\nDATA\r\n") == [SYNC]


def test_dataMustEndAGroup() -> None:
    """Message content sent with DATA, before the 354 (SMTP smuggling tools do this)."""
    h = strict()
    h.send(b"EHLO x\r\n")
    assert h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n\r\n.\r\n") == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", SYNC,
    ]
    assert h.spool.committed == {} and h.spool.open == {}


def test_quitMayFollowAnything() -> None:
    h = strict()
    h.send(b"EHLO x\r\n")
    assert h.send(b"QUIT\r\nwhatever\r\n") == [b"221 2.0.0 Bye"]


def test_pipeliningAllowedWhenSwitchedOff() -> None:
    h = ServerHarness()
    h.replies()
    assert h.codes(h.send(b"HELO x\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\nNOOP\r\n")) == [250, 250, 250, 250]


def test_starttlsInjectionStillDiscarded() -> None:
    """With an EHLO, bytes after STARTTLS are discarded as before (not a 554)."""
    h = ServerHarness(rejectUnauthPipelining=True, tlsMode="starttls")
    h.replies()
    h.send(b"EHLO x\r\n")
    assert h.send(b"STARTTLS\r\nRSET\r\n") == [b"220 2.0.0 Ready to start TLS"]
    assert not h.closed


def test_sessionSyncErrorEvent() -> None:
    s = ServerSession(SessionSettings("h", rejectUnauthPipelining=True), ClientInfo("192.0.2.1"))
    assert s.dataReceived(b"NOOP\r\nNOOP\r\n") == [SyncError("NOOP", b"NOOP\r\n"), SYNC_ERROR, Close()]
    assert s.closed and s.dataReceived(b"NOOP\r\n") == []


# Early talkers and the greeting pause ------------------------------------------------------------


def test_earlyTalkerRefusedDuringGreetPause() -> None:
    h = ServerHarness(greetPause=2.0)
    assert h.replies() == []
    h.clock.advance(1)
    with capturedLogs() as logs:
        assert h.send(b"EHLO spambot\r\n") == [SYNC]
    assert h.closed
    assert "127.0.0.1 talked before the greeting: b'EHLO spambot\\r\\n', refused with 554" in messages(logs)
    h.clock.advance(5)
    assert h.replies() == []  # no greeting after the 554


def test_politeClientAfterGreetPause() -> None:
    h = ServerHarness(greetPause=2.0)
    h.clock.advance(1.9)
    assert h.replies() == []
    h.clock.advance(0.1)
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    assert h.send(b"EHLO x\r\n")[-1] == b"250 SMTPUTF8"


def test_earlyInputKeptWithoutRejection() -> None:
    s = ServerSession(SessionSettings("h"), ClientInfo("192.0.2.1"), awaitingGreeting=True)
    assert s.dataReceived(b"HELO x\r\n") == []
    assert s.greeting() == [Reply(220, "", "h ESMTP mailrelay"), Reply(250, "", "h")]
    s = ServerSession(SessionSettings("h", rejectPregreet=True), ClientInfo("192.0.2.1"), awaitingGreeting=True)
    assert s.dataReceived(b"HELO x\r\n") == [SyncError("", b"HELO x\r\n"), SYNC_ERROR, Close()]
    assert s.greeting() == []


def test_earlyTalkerWhileTheLimiterCounts() -> None:
    limiter = SlowLimiter()
    h = ServerHarness(limiter=limiter, limits={}, peer="192.0.2.1", rejectUnauthPipelining=True)
    assert h.send(b"EHLO x\r\n") == [SYNC]
    limiter.pending.pop().callback(1)
    assert h.replies() == []


# Session deadline and minimum data rate ------------------------------------------------------------


def test_sessionDeadline() -> None:
    h = ServerHarness(maxSessionTime=100, idleTimeout=60)
    h.replies()
    for _ in range(3):
        h.clock.advance(30)
        assert h.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]  # never idle
    with capturedLogs() as logs:
        h.clock.advance(10)
    assert h.replies() == [b"421 4.4.2 relay.test Error: session time limit exceeded"]
    assert h.closed
    assert "session time limit of 100s exceeded by 127.0.0.1, closing" in messages(logs)


def test_sessionDeadlineInDataDropsTheMessage() -> None:
    h = ServerHarness(maxSessionTime=100)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.send(b"Subject: slow\r\n\r\n")
    h.clock.advance(100)
    assert h.replies() == [b"421 4.4.2 relay.test Error: session time limit exceeded"]
    assert h.spool.committed == {} and h.spool.open == {}


def test_sessionDeadlineWaitsForTheSpool() -> None:
    """A message being committed when time runs out gets its 250, then the 421."""
    h = ServerHarness(maxSessionTime=100)
    h.replies()
    h.spool.holdCommits = True
    h.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.replies()
    h.send(b"Subject: x\r\n\r\n.\r\n")
    h.clock.advance(100)
    assert h.replies() == [] and not h.closed
    h.spool.release()
    lines = h.replies()
    assert lines[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert lines[1:] == [b"421 4.4.2 relay.test Error: session time limit exceeded"]
    assert len(h.spool.committed) == 1


def test_minDataRate() -> None:
    h = ServerHarness(minDataRate=100, dataTimeout=10)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.replies()
    # 1000 bytes every 9 s: ~111 bytes/s, fast enough, even though the deadline
    # (10 s at most from now) is never pushed far.
    for _ in range(5):
        h.clock.advance(9)
        h.send(b"x" * 998 + b"\r\n")
        assert not h.closed
    # 50 bytes every 5 s (10 bytes/s) drains the credit.
    with capturedLogs() as logs:
        for _ in range(10):
            h.clock.advance(5)
            if h.closed:
                break
            h.send(b"y" * 48 + b"\r\n")
    assert h.closed
    assert h.replies()[-1] == b"421 4.4.2 relay.test Error: timeout exceeded"
    assert "timeout in DATA (less than min_data_rate = 100 bytes/s) from 127.0.0.1" in messages(logs)
    assert h.spool.committed == {}


def test_minDataRateOffIsTheDataTimeoutOnly() -> None:
    h = ServerHarness(dataTimeout=10)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    for _ in range(10):
        h.clock.advance(9)
        h.send(b"y\r\n")
    assert not h.closed
    assert h.codes(h.send(b".\r\n"))[-1] == 250


def test_limitsDataclassDefaults() -> None:
    limits = ListenerLimits("h", "l", MemoryRateLimiter(Clock()), Clock()).settings
    assert (limits.maxConnections, limits.maxConnectionsPerClient, limits.rateWindow) == (1000, 50, 60.0)
    assert (limits.connectionRateLimit, limits.messageRateLimit, limits.userMessageRateLimit) == (0, 0, 0)
    assert (limits.ipv6PrefixLength, limits.limitExceptions, limits.limiterTimeout) == (84, (), LIMITER_TIMEOUT)
    # The listener's settings carry the same defaults: they are the same fields.
    assert LimitSettings() == LimitSettings(**{
        f.name: getattr(ListenerSettings("h"), f.name) for f in dataclasses.fields(LimitSettings)
    })


# Wiring: the service builds each listener's limits ------------------------------------------------


def test_serviceWiresLimitsProxyAndALimiterPlugin(tmp_path, monkeypatch) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from mailrelay.app import relay
    from mailrelay.app.listeners import ListenerService
    from mailrelay.config import loadConfig
    from mailrelay.plugins import MailRelayPlugin
    from mailrelay.receive.proxy import ProxyProtocolFactory

    shared = MemoryRateLimiter(Clock())
    plugin = MailRelayPlugin("shared-limits", IRateLimiter, "tests", lambda options, context: shared)
    installed = relay.availablePlugins()
    monkeypatch.setattr(relay, "availablePlugins", lambda: {**installed, "shared-limits": plugin})
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nnetworks = ["192.0.2.0/24"]\n[rate_limiter]\nplugin = "shared-limits"\ntimeout = 2\n'
        '[queue]\nhold = true\n[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:5353"]\n'
        '[[listeners]]\nendpoint = "tcp:2525"\nmessage_rate_limit = 7\ngreet_pause = 1\n'
        'max_session_time = 99\nmin_data_rate = 10\nreject_unauth_pipelining = true\n'
        '[[listeners]]\nendpoint = "tcp:2526"\nlimit_exceptions = []\nproxy_protocol = true\n'
        'proxy_networks = ["10.0.0.0/8"]\nreject_unauth_pipelining = false\n'
    )
    config = loadConfig(str(path), {"spool": str(tmp_path / "spool")})
    top = relay.makeRelayService(config, MemoryReactorClock())
    listeners = [s for s in top if isinstance(s, ListenerService)]
    first, second = (s.factory for s in listeners)
    ctx = first.context
    assert ctx.limits.limiter is shared and ctx.limits.settings.limiterTimeout == 2.0
    assert ctx.limits.settings.messageRateLimit == 7 and ctx.hooks.sender.limits is ctx.limits
    assert ctx.limits.settings.limitExceptions == config.relayNetworks
    settings = ctx.settings
    assert (settings.greetPause, settings.maxSessionTime, settings.minDataRate) == (1.0, 99.0, 10)
    assert ctx.session.rejectUnauthPipelining and ctx.session.rejectPregreet
    assert isinstance(second, ProxyProtocolFactory)
    assert second.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    inner = second.wrappedFactory.context
    assert inner.limits.limiter is shared and inner.limits.settings.limitExceptions == ()
    assert not inner.session.rejectUnauthPipelining and not inner.session.rejectPregreet
    assert "PROXY from 10.0.0.0/8" in listeners[1].role
    # Both listeners share one intake, one recipient policy and the relay's sessions.
    assert inner.intake is ctx.intake and inner.policy is ctx.policy
    assert ctx.sessions is top.sessions and ctx.intake.notify == top.enqueue


def test_implicitTLSWithGreetPause() -> None:
    """On an implicit TLS listener the handshake comes first; the greeting still waits."""
    h = ServerHarness(tlsMode="implicit", greetPause=1.0)
    assert h.completeHandshake() == []
    h.clock.advance(1)
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    assert h.send(b"EHLO x\r\n")[-1] == b"250 SMTPUTF8"


def test_refusedDuringImplicitTLSHandshakeIsCutOffSoon() -> None:
    """A client refused before its TLS handshake ended has a few seconds to finish it and
    read its 421 over TLS, then is cut off (a TLS layer waits for the handshake before
    closing: one that never finishes it would hold the connection)."""
    h = ServerHarness(
        tlsMode="implicit", peer="192.0.2.1", limits={"maxConnectionsPerClient": 1}
    )
    other = h.another("192.0.2.1")
    assert other.closed and not other.transport.aborted
    other.clock.advance(5)
    assert other.transport.aborted


def test_ipv6ClientsAreCountedByPrefix() -> None:
    h = harness(peer="2001:db8::1", maxConnectionsPerClient=2)
    assert h.another("2001:db8::2:3").replies()[0].startswith(b"220 ")  # same /84
    over = h.another("2001:db8::fff:ffff:ffff")  # the last address of the /84
    assert over.replies() == [b"421 4.7.0 relay.test Error: too many connections from 2001:db8::fff:ffff:ffff"]
    assert h.another("2001:db8::1000:0:0").replies()[0].startswith(b"220 ")  # the next /84
    over.loseConnection()
    assert h.limiter.sessions("test conn 2001:db8::/84") == 2
    assert h.limits.clientKey("conn", "::ffff:192.0.2.1") == "test conn 192.0.2.1"
    h.limits.settings = dataclasses.replace(h.limits.settings, ipv6PrefixLength=128)
    assert h.limits.clientKey("mail", "2001:db8::1") == "test mail 2001:db8::1"


def test_client_address_decisions_are_made_once_per_address(monkeypatch) -> None:
    """Relay client? Exempt from the limits?  Each address is parsed and decided once for the
    life of a configuration, not at every connection."""
    import ipaddress as ipaddressModule

    from mailrelay.policy.chain import RelayControl

    parsed: list[str] = []
    parse = ipaddressModule.ip_address

    def counting(text: str):
        parsed.append(text)
        return parse(text)

    # (Both parse with mailrelay.address.clientIP, which calls ipaddress.ip_address.)
    monkeypatch.setattr(ipaddressModule, "ip_address", counting)
    relay = RelayControl([ipaddressModule.ip_network("192.0.2.0/24")], [], "mx.test")
    assert [relay.isRelayClient(a) for a in ("192.0.2.7", "198.51.100.1") * 3] == [True, False] * 3
    assert parsed == ["192.0.2.7", "198.51.100.1"]
    parsed.clear()
    settings = LimitSettings(limitExceptions=(ipaddressModule.ip_network("198.51.100.0/24"),))
    limits = ListenerLimits("h", "l", MemoryRateLimiter(Clock()), Clock(), settings)
    assert [limits.isExempt(a) for a in ("192.0.2.7", "198.51.100.1") * 3] == [False, True] * 3
    assert parsed == ["192.0.2.7", "198.51.100.1"]
    # A new configuration decides afresh.
    assert not RelayControl([], [], "mx.test").isRelayClient("192.0.2.7")


def test_a_limiter_that_blocks_past_its_timeout_is_not_believed() -> None:
    """A rate limiter whose call held the reactor longer than its timeout (its timer could
    not fire) and then answered had its count believed -- a client refused on it, only the
    blocking logged -- while a Deferred answering after the same timeout is not: the count
    came too late either way, so that limit is not applied (Postfix does not use a reply
    that comes after its timeout), logged as the timeout with how long the call held the
    reactor.  A session the limiter did count is released at its end all the same (as
    smtpd sends anvil its disconnect whatever connect answered)."""
    import time

    class Sleepy(MemoryRateLimiter):
        blocking = False

        def acquire(self, key: str) -> int:
            if self.blocking:
                time.sleep(0.03)
            return super().acquire(key)

        def hit(self, key: str, window: float) -> int:
            if self.blocking:
                time.sleep(0.03)
            return super().hit(key, window)

    limiter = Sleepy(Clock())
    limits = {"maxConnectionsPerClient": 1, "messageRateLimit": 1, "limiterTimeout": 0.01}
    first = ServerHarness(peer="192.0.2.1", limiter=limiter, limits=limits)
    limiter.clock = first.clock
    assert first.replies()[0].startswith(b"220 ")
    first.send(b"EHLO x\r\n")
    assert first.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
    limiter.blocking = True
    with capturedLogs() as logs:
        second = first.another("192.0.2.1")
        assert second.replies()[0].startswith(b"220 ")  # 2 at once: over, not believed
        second.send(b"EHLO x\r\n")
        assert second.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
    text = messages(logs)
    for call in ("acquire", "hit"):
        assert re.search(rf"rate limiter {call}\(test \w+ 192\.0\.2\.1\) did not answer within "
                         r"0\.01s \(its call held the reactor for 0\.0\d+s\), limit not applied",
                         text), text
    assert limiter.sessions("test conn 192.0.2.1") == 2
    second.loseConnection()
    first.loseConnection()
    assert limiter.sessions("test conn 192.0.2.1") == 0
    assert first.clock.getDelayedCalls() == []
