"""STARTTLS, implicit TLS, AUTH and submission: the sans-IO session and the protocol on a
C{StringTransport} with a C{Clock} (TLS simulated), the password file and its checker, the
certificate loader, and real TLS handshakes over loopback with the real reactor (our own
client against our own server)."""

from __future__ import annotations

import base64
import datetime
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.auth import (
    AuthenticatedUser,
    IAuthenticatedUser,
    IAuthThrottle,
    MemoryAuthThrottle,
    PasswordFileChecker,
    PasswordFileError,
    SubmitterRealm,
    parsePasswordLines,
    readPasswordFile,
)
from mailrelay.envelope import ClientInfo
from mailrelay.receive.tls import TLSConfigError, describeTLS, loadServerTLS
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.server import Authenticate, ServerSession, SessionSettings, StartTLS
from mailrelay.testing import MemoryChecker, ServerHarness

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}".encode())


#: tlsHarness's keyword arguments that go to the AUTH policy.
AUTH_SETTINGS = ("throttleAfter", "failureDelay", "maxFailures", "throttle", "senders", "timeout")


def tlsHarness(**kw) -> ServerHarness:
    kw.setdefault("tlsMode", "starttls")
    kw.setdefault("users", {"alice": "secret"})
    kw["auth"] = {name: kw.pop(name) for name in AUTH_SETTINGS if name in kw}
    h = ServerHarness(**kw)
    h.replies()
    return h


def afterTLS(h: ServerHarness) -> None:
    """EHLO, STARTTLS, handshake, EHLO again."""
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"STARTTLS\r\n") == [b"220 2.0.0 Ready to start TLS"]
    assert h.completeHandshake() == []
    h.send(b"EHLO client.example\r\n")


def send(h: ServerHarness, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> bytes:
    lines = h.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + body + b".\r\n")
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as "), lines
    queueID = lines[-1].rsplit(b" ", 1)[1].decode()
    return h.spool.committed[queueID]


# STARTTLS -------------------------------------------------------------------------------------


def test_starttls_advertised_only_with_a_certificate_and_before_tls() -> None:
    assert b"250-STARTTLS" not in ServerHarness().send(b"EHLO x\r\n")
    h = tlsHarness()
    ehlo = h.send(b"EHLO client.example\r\n")
    assert b"250-STARTTLS" in ehlo or b"250 STARTTLS" in ehlo
    assert not any(b"AUTH" in line for line in ehlo), "AUTH must not be offered before TLS"
    h.send(b"STARTTLS\r\n")
    h.completeHandshake()
    ehlo = h.send(b"EHLO client.example\r\n")
    assert not any(b"STARTTLS" in line for line in ehlo)
    assert ehlo[-1] == b"250 AUTH PLAIN LOGIN"


def test_starttls_writes_220_in_plaintext_then_starts_tls() -> None:
    h = tlsHarness()
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"STARTTLS\r\n") == [b"220 2.0.0 Ready to start TLS"]
    assert h.transport.tlsOptions is h.context.settings.tlsOptions
    assert h.transport.writtenBeforeTLS.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert h.protocol.session.client.tls is None


def test_starttls_resets_the_session_and_records_the_cipher() -> None:
    h = tlsHarness()
    h.send(b"EHLO client.example\r\n")
    h.send(b"STARTTLS\r\n")
    assert h.completeHandshake("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384") == []
    client = h.protocol.session.client
    assert client.tls == "TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384"
    assert client.helo is None
    # The client must EHLO again.
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"503 5.5.1 Error: send HELO/EHLO first"]
    h.send(b"EHLO client.example\r\n")
    _, message = send(h)
    assert b"with ESMTPS id" in message
    assert b"\r\n\t(using TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384)\r\n" in message


def test_starttls_injection_is_discarded_and_logged() -> None:
    h = tlsHarness()
    h.send(b"EHLO client.example\r\n")
    with capturedLogs() as events:
        lines = h.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n")
    # Only the 220: the RSET and MAIL are not answered in plaintext...
    assert lines == [b"220 2.0.0 Ready to start TLS"]
    assert h.transport.value().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert any(e.get("count") == len(b"RSET\r\nMAIL FROM:<evil@example.com>\r\n") for e in events)
    # ...nor executed after the handshake.
    assert h.completeHandshake() == []
    assert h.send(b"RCPT TO:<b@example.org>\r\n") == [b"503 5.5.1 Error: need MAIL command"]


def test_data_arriving_before_the_handshake_completes_is_kept_for_after() -> None:
    """What the TLS layer hands on is post-handshake data: it waits for tlsStarted."""
    h = tlsHarness()
    h.send(b"STARTTLS\r\n")
    assert h.send(b"EHLO client.example\r\n") == []
    lines = h.completeHandshake()
    assert lines[0] == b"250-relay.test" and lines[-1] == b"250 AUTH PLAIN LOGIN"


@pytest.mark.parametrize(
    "kw,commands,expected",
    [
        ({}, b"STARTTLS\r\n", b"502 5.5.1 Error: command not implemented"),
        ({"tlsMode": "starttls"}, b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS"),
        (
            {"tlsMode": "starttls"},
            b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nSTARTTLS\r\n",
            b"503 5.5.1 Error: MAIL transaction in progress",
        ),
    ],
)
def test_starttls_refusals(kw, commands, expected) -> None:
    h = ServerHarness(**kw)
    h.replies()
    assert h.send(commands)[-1] == expected
    assert h.transport.tlsOptions is None


def test_starttls_twice_is_503() -> None:
    h = tlsHarness()
    h.send(b"STARTTLS\r\n")
    h.completeHandshake()
    assert h.send(b"STARTTLS\r\n") == [b"503 5.5.1 Error: TLS already active"]


def test_timeout_during_the_handshake_aborts() -> None:
    """A client stuck in the handshake: closed at idle_timeout, cut off a few seconds later
    (a TLS layer waits for the handshake to end before it closes)."""
    h = tlsHarness()
    h.send(b"STARTTLS\r\n")
    h.clock.advance(301)
    assert h.closed
    h.clock.advance(5)
    assert h.transport.aborted


def test_handshake_failure_is_logged() -> None:
    h = tlsHarness()
    h.send(b"STARTTLS\r\n")
    with capturedLogs() as events:
        h.protocol.connectionLost(Failure(Exception("no shared cipher")))
    assert any("TLS handshake" in e["log_format"] and e.get("error") == "no shared cipher" for e in events)


def test_implicit_tls_listener() -> None:
    h = ServerHarness(tlsMode="implicit", users={"alice": "secret"})
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    assert h.completeHandshake() == []
    assert h.protocol.session.client.tls == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    ehlo = h.send(b"EHLO client.example\r\n")
    assert not any(b"STARTTLS" in line for line in ehlo)
    assert ehlo[-1] == b"250 AUTH PLAIN LOGIN"
    assert h.send(b"STARTTLS\r\n") == [b"503 5.5.1 Error: TLS already active"]
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_implicit_tls_timeout_before_handshake_aborts() -> None:
    h = ServerHarness(tlsMode="implicit")
    h.clock.advance(301)
    assert h.closed
    h.clock.advance(5)
    assert h.transport.aborted


def test_implicit_tls_refusal_at_connect_goes_over_tls() -> None:
    """A client refused at connect on an implicit-TLS listener (here over max_connections)
    gets its 421 over TLS (RFC 8314: everything is inside TLS): the connection is closed,
    not aborted, so that the TLS layer finishes the handshake and sends the reply; a client
    that never finishes it is cut off after a few seconds.  It was aborted at once: the
    client saw its handshake reset, and the log blamed the handshake."""
    h = ServerHarness(tlsMode="implicit", limits={"maxConnections": 1, "maxConnectionsPerClient": 0})
    over = h.another("192.0.2.2")
    assert over.replies() == [b"421 4.7.0 relay.test Error: too many connections"]
    assert over.closed and not over.transport.aborted
    over.clock.advance(4.9)
    assert not over.transport.aborted
    over.clock.advance(0.1)
    assert over.transport.aborted


@pytest.mark.parametrize("how", ["QUIT", "throttled"])
def test_a_tls_session_the_relay_ends_is_closed_soon(how: str) -> None:
    """After the 221 to QUIT (or the 421 of the AUTH throttle) on a TLS connection, the
    connection is gone within seconds, not when idle_timeout passes: Twisted's TLS waits for
    the client's close_notify, which a client that says nothing more never sends -- holding
    a connection slot, for a throttled client five minutes (Postfix closes at once after its
    one-way TLS shutdown; RFC 5321 3.8, 4.1.1.10)."""
    h = tlsHarness(maxFailures=1, throttleAfter=1, failureDelay=0.0)
    afterTLS(h)
    if how == "QUIT":
        assert h.send(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    else:
        assert h.send(b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n")[0].startswith(b"421")
    assert h.closed and not h.transport.aborted
    h.clock.advance(5)
    assert h.transport.aborted


def test_handshake_log_lines_say_what_happened() -> None:
    """A handshake the client broke: 'TLS handshake ... failed' and a disconnect line that
    says so (it said '(client closed the connection)'); one the relay timed out: 'timeout
    in the TLS handshake', and no 'handshake failed' for the relay's own close (it said
    'timeout waiting for a command', then blamed the handshake)."""
    from twisted.logger import capturedLogs, formatEvent

    h = tlsHarness()
    h.send(b"STARTTLS\r\n")
    with capturedLogs() as events:
        h.protocol.connectionLost(Failure(Exception("wrong version number")))
    texts = [formatEvent(e) for e in events]
    assert "TLS handshake with 127.0.0.1 failed: wrong version number" in texts, texts
    assert any(t.startswith("disconnect from 127.0.0.1:") and t.endswith(
        " (TLS handshake failed)") for t in texts), texts

    h = ServerHarness(tlsMode="implicit")
    with capturedLogs() as events:
        h.clock.advance(301)
        h.clock.advance(5)
        h.protocol.connectionLost(Failure(Exception("Connection lost")))
    texts = [formatEvent(e) for e in events]
    assert "timeout in the TLS handshake with 127.0.0.1" in texts, texts
    assert not any("handshake with 127.0.0.1 failed" in t for t in texts), texts
    assert not any("client closed" in t for t in texts), texts


def test_sans_io_starttls_event() -> None:
    session = ServerSession(SessionSettings("relay.test", starttls=True), ClientInfo("192.0.2.1"))
    events = session.dataReceived(b"STARTTLS\r\nRSET\r\n")
    assert events == [Reply(220, "2.0.0", "Ready to start TLS"), StartTLS(discarded=6)]
    assert session.dataReceived(b"NOOP\r\n") == []
    assert session.tlsStarted("TLSv1.3 TLS_AES_128_GCM_SHA256") == [Reply(250, "2.0.0", "Ok")]


# AUTH -----------------------------------------------------------------------------------------


def test_auth_before_tls_is_538() -> None:
    h = tlsHarness()
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [
        b"538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    assert h.checker.checked == []


def test_auth_without_tls_when_the_listener_allows_it() -> None:
    h = ServerHarness(users={"alice": "secret"}, authWithoutTLS=True)
    assert h.send(b"EHLO client.example\r\n")[-1] == b"250 AUTH PLAIN LOGIN"
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_auth_not_configured_is_502() -> None:
    h = ServerHarness()
    h.send(b"EHLO x\r\n")
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"502 5.5.1 Error: command not implemented"]


def test_plain_with_initial_response_lets_an_outsider_relay() -> None:
    h = tlsHarness(peer="192.0.2.1")
    afterTLS(h)
    h.send(b"MAIL FROM:<alice@example.com>\r\n")
    assert h.send(b"RCPT TO:<bob@example.org>\r\n") == [b"554 5.7.1 Relay access denied"]
    h.send(b"RSET\r\n")
    with capturedLogs() as events:
        assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    assert any(e.get("sasl_username") == "alice" for e in events)
    client = h.protocol.session.client
    assert (client.authUser, client.relayAllowed) == ("alice", True)
    with capturedLogs() as events:
        _, message = send(h)
    assert b" with ESMTPSA id " in message
    # (The user name is not shown to the recipients: Postfix's default too.)
    assert b"\r\n\t(using TLSv1.3 TLS_AES_256_GCM_SHA384)\r\n\tfor <" in message
    assert b"alice" not in message
    assert any("sasl_username=alice result=250" in e["log_format"].format(**e) for e in events if "queueID" in e and "result" in e)


def test_plain_without_initial_response() -> None:
    h = tlsHarness()
    afterTLS(h)
    assert h.send(b"AUTH PLAIN\r\n") == [b"334 "]
    assert h.send(plain("alice", "secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_login_exchange() -> None:
    h = tlsHarness()
    afterTLS(h)
    assert h.send(b"AUTH LOGIN\r\n") == [b"334 VXNlcm5hbWU6"]
    assert h.send(b64(b"alice") + b"\r\n") == [b"334 UGFzc3dvcmQ6"]
    assert h.send(b64(b"secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_login_with_initial_response() -> None:
    h = tlsHarness()
    afterTLS(h)
    assert h.send(b"auth login " + b64(b"alice") + b"\r\n") == [b"334 UGFzc3dvcmQ6"]
    assert h.send(b64(b"secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


@pytest.mark.parametrize(
    "commands,expected",
    [
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication mechanism"),
        (b"AUTH PLAIN !!!notbase64\r\n", b"501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN\r\n!!!\r\n", b"501 5.5.2 Cannot decode response"),
        (b"AUTH PLAIN\r\n*\r\n", b"501 5.0.0 Authentication aborted"),
        (b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n", b"501 5.0.0 Authentication aborted"),
        (b"AUTH PLAIN =\r\n", b"501 5.5.2 Error: malformed PLAIN response"),
        (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        (b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n", b"535 5.7.8 Authentication credentials invalid"),
        (b"AUTH PLAIN " + plain("nobody", "secret") + b"\r\n", b"535 5.7.8 Authentication credentials invalid"),
        (b"AUTH PLAIN " + plain("alice", "secret", "bob") + b"\r\n", b"535 5.7.8 Authentication credentials invalid"),
        (
            b"AUTH PLAIN " + plain("alice", "secret") + b"\r\nAUTH PLAIN " + plain("alice", "secret") + b"\r\n",
            b"503 5.5.1 Error: already authenticated",
        ),
        (
            b"MAIL FROM:<a@example.com>\r\nAUTH PLAIN " + plain("alice", "secret") + b"\r\n",
            b"503 5.5.1 Error: MAIL transaction in progress",
        ),
    ],
)
def test_auth_replies(commands: bytes, expected: bytes) -> None:
    h = tlsHarness()
    afterTLS(h)
    assert h.send(commands)[-1] == expected
    if not expected.startswith(b"503 5.5.1 Error: already"):
        assert h.protocol.session.client.authUser is None


def test_auth_needs_ehlo() -> None:
    h = tlsHarness()
    h.send(b"STARTTLS\r\n")
    h.completeHandshake()
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"503 5.5.1 Error: send EHLO first"]


def test_plain_authzid_equal_to_user_is_fine() -> None:
    h = tlsHarness()
    afterTLS(h)
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret", "alice") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_long_auth_line_within_rfc4954_limit() -> None:
    h = tlsHarness(users={"alice": "x" * 3000})
    afterTLS(h)
    assert h.send(b"AUTH PLAIN " + plain("alice", "x" * 3000) + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_mail_auth_parameter_accepted_when_auth_offered() -> None:
    h = tlsHarness()
    afterTLS(h)
    assert h.send(b"MAIL FROM:<a@example.com> AUTH=<>\r\n") == [b"250 2.1.0 Ok"]
    h2 = ServerHarness()
    h2.send(b"EHLO x\r\n")
    assert h2.send(b"MAIL FROM:<a@example.com> AUTH=<>\r\n")[-1].startswith(b"555 ")


def test_slow_checker_pauses_reading_and_keeps_order() -> None:
    h = tlsHarness()
    afterTLS(h)
    h.checker.hold = True
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\nMAIL FROM:<a@example.com>\r\n") == []
    assert h.transport.producerState == "paused"
    h.checker.release()
    assert h.replies() == [b"235 2.7.0 Authentication successful", b"250 2.1.0 Ok"]


def test_starttls_resets_authentication() -> None:
    h = ServerHarness(
        tlsMode="starttls", users={"alice": "secret"}, authWithoutTLS=True, peer="192.0.2.1"
    )
    h.send(b"EHLO client.example\r\n")
    h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n")
    assert h.protocol.session.client.relayAllowed
    h.send(b"STARTTLS\r\n")
    h.completeHandshake()
    client = h.protocol.session.client
    assert (client.authUser, client.relayAllowed) == (None, False)


def test_failed_attempts_are_throttled_then_421() -> None:
    h = tlsHarness(throttleAfter=3, failureDelay=5.0, maxFailures=6)
    afterTLS(h)
    bad = b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n"
    for _ in range(3):
        assert h.send(bad) == [b"535 5.7.8 Authentication credentials invalid"]
    # The 4th and 5th failures are answered late; reading is paused meanwhile.
    for _ in range(2):
        assert h.send(bad) == []
        assert h.transport.producerState == "paused"
        h.clock.advance(4.9)
        assert h.replies() == []
        h.clock.advance(0.1)
        assert h.replies() == [b"535 5.7.8 Authentication credentials invalid"]
    with capturedLogs() as events:
        assert h.send(bad) == [b"421 4.7.0 Error: too many failed authentications, try again later"]
    assert h.closed
    assert any(e.get("failures") == 6 and e.get("sasl_username") == "alice" for e in events)
    # Another connection from the same address is refused at once, even with the password.
    h2 = tlsHarness(throttle=h.throttle, maxFailures=6)
    afterTLS(h2)
    assert h2.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [
        b"421 4.7.0 Error: too many failed authentications, try again later"
    ]
    assert h2.checker.checked == []
    # Failures are forgotten after the window.
    h.clock.advance(900)
    h2.clock.advance(900)
    h3 = tlsHarness(throttle=MemoryAuthThrottle(h2.clock))
    afterTLS(h3)
    assert h3.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]


def test_the_idle_timeout_does_not_run_while_the_relay_delays_its_answer() -> None:
    """idle_timeout is the client's time to send a command: it does not run while the relay
    itself holds an answer back (the AUTH failure delay, a slow check), and starts again
    once the answer is written.  With failure_delay above idle_timeout the throttled
    client got "421 timeout exceeded" while it waited for its 535."""
    h = tlsHarness(throttleAfter=1, failureDelay=5.0, maxFailures=6, idleTimeout=4.0)
    afterTLS(h)
    bad = b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n"
    assert h.send(bad) == [b"535 5.7.8 Authentication credentials invalid"]
    assert h.send(bad) == []
    h.clock.advance(4.5)
    assert h.replies() == [] and not h.closed
    h.clock.advance(0.5)
    assert h.replies() == [b"535 5.7.8 Authentication credentials invalid"]
    h.clock.advance(3.9)
    assert not h.closed
    h.clock.advance(0.1)
    assert h.replies() == [b"421 4.4.2 relay.test Error: timeout exceeded"] and h.closed


def test_overlong_authentication_lines() -> None:
    """An AUTH command whose initial response is over the limit, or a response line over
    it, gets RFC 4954 4's '500 5.5.6 Authentication Exchange line is too long' (the command
    got '500 5.5.2 Error: line too long'); neither counts as a failed password."""
    from mailrelay.smtp.server import MAX_SASL_LINE

    h = tlsHarness()
    afterTLS(h)
    long = b"A" * (MAX_SASL_LINE + 600)
    assert h.send(b"AUTH PLAIN " + long + b"\r\n") == [
        b"500 5.5.6 Authentication exchange line is too long"]
    assert h.send(b"AUTH LOGIN\r\n") == [b"334 VXNlcm5hbWU6"]
    assert h.send(long + b"\r\n") == [b"500 5.5.6 Authentication exchange line is too long"]
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [
        b"235 2.7.0 Authentication successful"]


def test_memory_throttle_window_and_bound() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    t = MemoryAuthThrottle(clock, window=10, maxEntries=2)
    verifyObject(IAuthThrottle, t)

    def fail(client: str) -> int:
        t.reserve(client)
        return t.settle(client, failed=True)

    assert fail("a") == 1
    clock.advance(5)
    assert fail("a") == 2
    clock.advance(9)
    assert t.failures("a") == 2
    clock.advance(1)
    assert t.failures("a") == 0
    fail("b")
    fail("c")
    fail("d")
    assert (t.failures("b"), t.failures("c"), t.failures("d")) == (0, 1, 1)


def test_memory_throttle_window_after_the_clock_stepped_back() -> None:
    """Failures counted before a step back of the clock are forgotten a window after it at
    the latest (they were kept until the clock reached them again: a client refused AUTH
    for the size of the step)."""
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_800_000_000)
    t = MemoryAuthThrottle(clock, window=10)
    t.reserve("a")
    assert t.settle("a", failed=True) == 1
    clock.rightNow -= 3600
    assert t.failures("a") == 1  # kept: a step does not lift the throttle
    clock.advance(9)
    assert t.failures("a") == 1
    clock.advance(1)
    assert t.failures("a") == 0


def test_memory_throttle_counts_attempts_in_flight() -> None:
    from twisted.internet.task import Clock

    t = MemoryAuthThrottle(Clock())
    assert [t.reserve("a") for _ in range(3)] == [1, 2, 3]
    assert t.reserve("b") == 1
    assert t.settle("a", failed=True) == 1
    assert (t.failures("a"), t.inFlight("a")) == (1, 2)
    assert t.reserve("a") == 4  # one failure and three in flight
    assert t.settle("a", failed=False) == 1  # forgotten: a success, or refused unchecked
    assert [t.settle("a", failed=True) for _ in range(2)] == [2, 3]
    assert (t.failures("a"), t.inFlight("a"), t.inFlight("b")) == (3, 0, 1)


def parallelHarnesses(count: int, **kw: Any) -> list[ServerHarness]:
    """C{count} connections from one client, after TLS, sharing one throttle and one checker
    (which holds its answers)."""
    first = tlsHarness(**kw)
    first.checker.hold = True
    harnesses = [first] + [tlsHarness(throttle=first.throttle, **kw) for _ in range(count - 1)]
    for h in harnesses:
        afterTLS(h)
        h.checker = first.checker
        h.protocol.context.auth.portal = first.protocol.context.auth.portal
    return harnesses


def test_parallel_attempts_are_checked_at_most_max_failures_times() -> None:
    """Guesses on many connections at once: attempts in flight count, so only maxFailures
    passwords are ever checked; the rest wait for those checks, and are then refused with 421
    without a check."""
    harnesses = parallelHarnesses(10, maxFailures=4, failureDelay=0)
    first = harnesses[0]
    bad = b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n"
    with capturedLogs() as events:
        replies = [h.send(bad) for h in harnesses]
        assert len(first.checker.held) == 4
        first.checker.release()
        for h in harnesses:
            h.clock.advance(1)
    replies = [sent or h.replies() for sent, h in zip(replies, harnesses)]
    assert replies.count([b"535 5.7.8 Authentication credentials invalid"]) == 3
    assert replies.count([b"421 4.7.0 Error: too many failed authentications, try again later"]) == 7
    assert len(first.checker.checked) == 4
    assert sum("without checking" in e.get("why", "") for e in events) == 6
    assert (first.throttle.failures("127.0.0.1"), first.throttle.inFlight("127.0.0.1")) == (4, 0)


def test_parallel_good_logins_beyond_max_failures_wait_and_succeed() -> None:
    """An application opening more connections at once than max_failures, all with the
    right password: the attempts beyond the budget wait for the checks in flight, never get
    a 421 for failures nobody made."""
    harnesses = parallelHarnesses(6, maxFailures=2, failureDelay=0)
    first = harnesses[0]
    good = b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n"
    assert [h.send(good) for h in harnesses] == [[]] * 6  # two checks, four waiting
    assert len(first.checker.held) == 2
    for _ in range(3):
        first.checker.release()
        for h in harnesses:
            h.clock.advance(0.5)
    assert [h.replies() for h in harnesses] == [[b"235 2.7.0 Authentication successful"]] * 6
    assert len(first.checker.checked) == 6
    assert (first.throttle.failures("127.0.0.1"), first.throttle.inFlight("127.0.0.1")) == (0, 0)


def test_waiting_for_checks_in_flight_is_bounded() -> None:
    """Checks of other connections that do not end: an attempt waits at most the checker's
    timeout, then gets 454 (try again later), not a check and not a 421."""
    first, second = parallelHarnesses(2, maxFailures=1, timeout=10)
    good = b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n"
    assert first.send(good) == [] and second.send(good) == []
    with capturedLogs() as events:
        second.clock.advance(10)
        assert second.replies() == [b"454 4.7.0 Temporary authentication failure"]
    assert len(first.checker.checked) == 1
    assert any("waited 10s for the checks in flight" in formatEvent(e) for e in events)
    first.checker.release()
    assert first.replies() == [b"235 2.7.0 Authentication successful"]
    assert first.throttle.inFlight("127.0.0.1") == 0


def test_waiting_ends_with_the_connection() -> None:
    first, second = parallelHarnesses(2, maxFailures=1)
    good = b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n"
    first.send(good)
    second.send(good)
    second.loseConnection()
    second.clock.advance(60)
    first.checker.release()
    assert len(first.checker.checked) == 1  # the gone connection's password is never checked
    assert first.throttle.inFlight("127.0.0.1") == 0


@pytest.mark.parametrize(
    "peers, prefix, shared",
    [
        (("2001:db8::1", "2001:db8::ffff:2"), 84, True),  # the next address in the /84
        (("2001:db8::1", "2001:db8:0:0:1::2"), 84, False),  # another /84 of the /64
        (("2001:db8::1", "2001:db8:0:0:1::2"), 64, True),
        (("2001:db8::1", "2001:db8::2"), 128, False),
        (("192.0.2.1", "::ffff:192.0.2.1"), 84, True),  # IPv4-mapped: the same IPv4 client
        (("192.0.2.1", "192.0.2.2"), 84, False),
    ],
)
def test_failures_count_per_client_network(peers: tuple[str, str], prefix: int, shared: bool) -> None:
    limits = {"ipv6PrefixLength": prefix, "exceptions": ()}
    first = tlsHarness(peer=peers[0], maxFailures=2, failureDelay=0, limits=limits)
    afterTLS(first)
    for _ in range(2):
        first.send(b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n")
    assert first.closed
    second = tlsHarness(peer=peers[1], throttle=first.throttle, maxFailures=2, limits=limits)
    afterTLS(second)
    expected = (
        b"421 4.7.0 Error: too many failed authentications, try again later"
        if shared
        else b"235 2.7.0 Authentication successful"
    )
    assert second.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [expected]


def test_success_and_unanswered_checks_release_their_reservation() -> None:
    h = tlsHarness(timeout=10)
    afterTLS(h)
    assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    assert (h.throttle.failures("127.0.0.1"), h.throttle.inFlight("127.0.0.1")) == (0, 0)


def test_throttle_that_fails_is_454_without_a_check() -> None:
    class Broken:
        def reserve(self, client):
            raise ConnectionError("store down")

        def settle(self, client, failed):  # pragma: no cover - never reserved
            raise AssertionError("not reserved")

    h = tlsHarness(throttle=Broken())
    afterTLS(h)
    with capturedLogs() as events:
        assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"454 4.7.0 Temporary authentication failure"]
    assert h.checker.checked == []
    assert any("store down" in str(e.get("log_failure", "")) for e in events)


def test_checker_error_is_454_not_success() -> None:
    h = tlsHarness()
    afterTLS(h)

    def broken(credentials):
        raise RuntimeError("LDAP is down")

    h.checker.requestAvatarId = broken
    with capturedLogs():
        assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [b"454 4.7.0 Temporary authentication failure"]
    assert h.protocol.session.client.authUser is None


@pytest.mark.parametrize(
    "answer",
    [None, 42, "", (), "alice\nX-Forged: yes", b"\xff", ["alice"]],
    ids=["None", "int", "empty", "anonymous", "newline", "not-utf8", "list"],
)
def test_a_checker_answering_no_user_name_is_454_not_success(answer: Any) -> None:
    """docs/plugins.md: requestAvatarId returns the user name (str, or bytes in UTF-8).  A
    site checker answering anything else -- None from a callback that forgot its return,
    Twisted's ANONYMOUS (), an empty or multi-line name -- logged the client in as "None"
    (or "()"...): 235, relaying allowed and [auth.senders] not applied to the real user.  A
    failing checker never authenticates: 454, logged with what it answered."""
    h = tlsHarness()
    afterTLS(h)
    h.checker.requestAvatarId = lambda credentials: answer
    with capturedLogs() as events:
        assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [
            b"454 4.7.0 Temporary authentication failure"]
    assert h.protocol.session.client.authUser is None
    texts = [formatEvent(e) + str(e.get("log_failure", "")) for e in events]
    assert any("the credentials checker failed for 127.0.0.1" in t
               and "not a user name" in t for t in texts), texts


# Submission and sender binding ----------------------------------------------------------------


def test_submission_requires_auth_before_mail() -> None:
    h = tlsHarness(mode="submission")
    afterTLS(h)
    assert h.send(b"MAIL FROM:<alice@example.com>\r\n") == [b"530 5.7.0 Authentication required"]
    h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n")
    assert h.send(b"MAIL FROM:<alice@example.com>\r\n") == [b"250 2.1.0 Ok"]


def test_submission_before_starttls_says_to_start_tls() -> None:
    """Before STARTTLS no AUTH is offered, so 'Authentication required' asked for what the
    client could not do; RFC 3207 (and Postfix) answer 'Must issue a STARTTLS command
    first'."""
    h = tlsHarness(mode="submission")
    h.send(b"EHLO laptop.example\r\n")
    assert h.send(b"MAIL FROM:<alice@example.com>\r\n") == [
        b"530 5.7.0 Must issue a STARTTLS command first"]


def test_submission_requires_auth_even_from_relay_networks() -> None:
    h = ServerHarness(mode="submission", users={"alice": "secret"}, peer="127.0.0.1")
    h.send(b"EHLO x\r\n")
    assert h.send(b"MAIL FROM:<alice@example.com>\r\n") == [b"530 5.7.0 Authentication required"]


def test_sender_binding() -> None:
    h = tlsHarness(senders={"alice": ("alice@example.com", "@example.org")})
    afterTLS(h)
    h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n")
    with capturedLogs():
        assert h.send(b"MAIL FROM:<mallory@example.net>\r\n") == [
            b"553 5.7.1 <mallory@example.net>: Sender address rejected: not owned by user alice"
        ]
    for sender in (b"<alice@example.com>", b"<anyone@Example.ORG>", b"<>"):
        assert h.send(b"MAIL FROM:" + sender + b"\r\n") == [b"250 2.1.0 Ok"], sender
        h.send(b"RSET\r\n")
    assert h.send(b"MAIL FROM:<Alice@example.com>\r\n")[0].startswith(b"553 5.7.1")


def test_sans_io_authenticate_question_and_answers() -> None:
    settings = SessionSettings("relay.test", authMechanisms=("PLAIN", "LOGIN"), authWithoutTLS=True)
    session = ServerSession(settings, ClientInfo("192.0.2.1"))
    session.dataReceived(b"EHLO x\r\n")
    (question,) = session.dataReceived(b"AUTH PLAIN " + plain("bob", "pw", "bob") + b"\r\nNOOP\r\n")
    assert question == Authenticate("PLAIN", "bob", b"pw", "bob")
    assert "pw" not in repr(question)
    assert session.answer(Reply(535, "5.7.8", "no")) == [Reply(535, "5.7.8", "no"), Reply(250, "2.0.0", "Ok")]
    (question,) = session.dataReceived(b"AUTH PLAIN " + plain("bob", "pw") + b"\r\n")
    events = session.answer(Reply(421, "4.7.0", "bye"))
    assert events[0] == Reply(421, "4.7.0", "bye") and session.closed


# Verification of the cred pieces ----------------------------------------------------------------


def test_interfaces_are_provided(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{FAST.hash('pw')}\n")
    verifyObject(ICredentialsChecker, PasswordFileChecker(str(path)))
    verifyObject(ICredentialsChecker, MemoryChecker({}))
    verifyObject(IRealm, SubmitterRealm())
    verifyObject(IAuthenticatedUser, AuthenticatedUser("alice"))
    assert SubmitterRealm().requestAvatar(b"alice", None, IAuthenticatedUser)[1] == AuthenticatedUser("alice")


# The password file -----------------------------------------------------------------------------


def test_password_file_format() -> None:
    h = FAST.hash("pw")
    text = f"# users\r\n\r\n  # indented comment\nalice:{h}\r\nbob@example.com:{h}\n"
    assert parsePasswordLines("users", text) == {"alice": h, "bob@example.com": h}


@pytest.mark.parametrize(
    "line,problem",
    [
        ("alice", 'expected "user:hash"'),
        (":$argon2id$x", "the user name is empty"),
        ("al ice:{h}", "white space"),
        ("alice:$2b$12$abcdefghijklmnopqrstuu0123456789012345678901234567890", "bcrypt hashes are not supported"),
        ("alice:plaintext", "must be an argon2 hash"),
        ("alice:$argon2id$garbage", "malformed"),
    ],
)
def test_password_file_errors_name_path_and_line(line: str, problem: str) -> None:
    text = "# first\n" + line.format(h=FAST.hash("pw")) + "\n"
    with pytest.raises(PasswordFileError) as e:
        parsePasswordLines("/etc/mailrelay/users", text)
    assert str(e.value).startswith("/etc/mailrelay/users:2: ")
    assert problem in str(e.value)
    assert e.value.lineno == 2


def test_a_user_name_cannot_start_with_a_hash_sign() -> None:
    """The password file reads such a line as a comment: mailrelay-passwd added the user
    (twice, if asked twice), who never could log in."""
    from mailrelay.receive.auth import userNameProblem

    assert userNameProblem("#hash") == (
        "a user name cannot start with '#' (the password file would read its line as a "
        "comment)")
    assert userNameProblem("a#b") is None


def test_password_file_duplicate_unreadable_not_utf8(tmp_path: Path) -> None:
    h = FAST.hash("pw")
    with pytest.raises(PasswordFileError, match=r"users:3: user 'a' is listed twice"):
        parsePasswordLines("users", f"a:{h}\nb:{h}\na:{h}\n")
    with pytest.raises(PasswordFileError, match="cannot read the password file: No such file"):
        readPasswordFile(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_bytes(f"a:{h}\n\xff:{h}\n".encode("latin-1"))
    with pytest.raises(PasswordFileError, match=r"bad:2: not UTF-8"):
        readPasswordFile(str(bad))


def syncThread(f, *args) -> Deferred:
    return maybeDeferred(f, *args)


def outcome(d: Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box
    return box[0]


def test_password_file_checker(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{FAST.hash('right')}\n")
    checker = PasswordFileChecker(str(path), deferToThread=syncThread)
    assert outcome(checker.requestAvatarId(UsernamePassword("alice", "right"))) == "alice"
    assert outcome(checker.requestAvatarId(UsernamePassword(b"alice", b"right"))) == "alice"
    for user, password in (("alice", "wrong"), ("nobody", "right"), ("nobody", "mailrelay dummy password")):
        result = outcome(checker.requestAvatarId(UsernamePassword(user, password)))
        assert isinstance(result, Failure) and result.check(UnauthorizedLogin), (user, password)


def heldThreads() -> tuple[list[tuple[Deferred, tuple]], Any]:
    """C{(handedOff, deferToThread)}: a C{deferToThread} for a checker that runs nothing,
    noting each call in C{handedOff} (its Deferred, the function and its arguments)."""
    handedOff: list[tuple[Deferred, tuple]] = []

    def held(f, *args) -> Deferred:
        d: Deferred = Deferred()
        handedOff.append((d, (f, args)))
        return d

    return handedOff, held


def test_password_file_checker_bounds_the_checks_at_once(tmp_path: Path) -> None:
    """Each argon2id check takes 64 MiB (the hashes' m=65536) and half a second of CPU: 40
    clients guessing at once had the relay at 705 MiB, ten checks at a time in the reactor's
    thread pool, which the other blocking work (maildir lookups at RCPT, plugins) shares.
    At most C{concurrency} checks run at once (by default the CPUs, at most 4); the others
    wait their turn, in order."""
    path = tmp_path / "users"
    path.write_text(f"alice:{FAST.hash('right')}\n")
    handedOff, held = heldThreads()
    checker = PasswordFileChecker(str(path), deferToThread=held, concurrency=2)
    results = [checker.requestAvatarId(UsernamePassword("alice", f"guess{i}")) for i in range(5)]
    assert [args[1] for _, args in handedOff] == [("alice", "guess0"), ("alice", "guess1")]
    for i in range(5):
        d, (f, args) = handedOff[i]
        d.callback(f(*args))
        assert len(handedOff) == min(i + 3, 5)
    assert all(outcome(r).check(UnauthorizedLogin) for r in results)
    assert 1 <= PasswordFileChecker(str(path))._checks.limit <= 4


def test_a_check_given_up_holds_its_place_until_its_thread_is_done(tmp_path: Path) -> None:
    """A check the AUTH time-out gave up (its Deferred cancelled: AuthPolicy.timeout, 30 s
    from the attempt, its wait for a place included) goes on hashing in its thread: its place
    is freed when that is done, not at the cancel -- else, under the flood that makes checks
    wait and time out, more than C{concurrency} ran at once (up to the thread pool's ten, the
    700 MiB the bound is for).  One given up while it waits for its place never runs."""
    from twisted.internet.defer import CancelledError

    path = tmp_path / "users"
    path.write_text(f"alice:{FAST.hash('right')}\n")
    handedOff, held = heldThreads()
    checker = PasswordFileChecker(str(path), deferToThread=held, concurrency=1)
    first, second, third = (checker.requestAvatarId(UsernamePassword("alice", f"guess{i}"))
                            for i in range(3))
    assert len(handedOff) == 1
    first.cancel()
    assert outcome(first).check(CancelledError)
    assert len(handedOff) == 1  # (its thread still hashes: no other check starts)
    third.cancel()
    assert outcome(third).check(CancelledError)
    d, (f, args) = handedOff[0]
    d.callback(f(*args))  # (the thread is done: the next check waiting starts)
    assert [args[1] for _, args in handedOff] == [("alice", "guess0"), ("alice", "guess1")]
    d, (f, args) = handedOff[1]
    d.callback(f(*args))
    assert outcome(second).check(UnauthorizedLogin)
    assert len(handedOff) == 2  # (the third, given up while waiting, never ran)
    assert checker._checks.tokens == 1


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_the_bound_on_checks_at_once_is_the_relays_over_its_processes(
    tmp_path: Path, processes: int
) -> None:
    """With [relay] processes = N, N processes check passwords (the relay and its acceptor
    processes), each with its own checker: the bound of checks at once
    (MAX_CONCURRENT_CHECKS, the CPUs up to 4: 64 MiB and a CPU each) is shared among them,
    at least one each -- it was each one's, N times the memory it is for."""
    from twisted.cred.credentials import IUsernamePassword
    from twisted.internet.task import Clock

    from mailrelay.app.listeners import makeAuthPolicy
    from mailrelay.config import loadConfig
    from mailrelay.receive.auth import MAX_CONCURRENT_CHECKS

    users = tmp_path / "users"
    users.write_text(f"alice:{FAST.hash('right')}\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[relay]\nprocesses = {processes}\n[auth]\npassword_file = "{users}"\n')
    config = loadConfig(str(path), {"spool": str(tmp_path / "spool")})
    policy = makeAuthPolicy(config, Clock())
    checker = policy.portal.checkers[IUsernamePassword]  # type: ignore[attr-defined]
    assert checker._checks.limit == max(1, MAX_CONCURRENT_CHECKS // processes)


def test_password_file_checker_rereads_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{FAST.hash('right')}\n")
    checker = PasswordFileChecker(str(path), deferToThread=syncThread)
    new = tmp_path / "users.new"
    new.write_text(f"alice:{FAST.hash('right')}\nbob:{FAST.hash('bobpw')}\n")
    os.replace(new, path)
    assert outcome(checker.requestAvatarId(UsernamePassword("bob", "bobpw"))) == "bob"
    # A broken edit is logged, and the users read before stay.
    path.write_text("garbage\n")
    with capturedLogs() as events:
        assert outcome(checker.requestAvatarId(UsernamePassword("bob", "bobpw"))) == "bob"
    assert any("users:1: expected" in e.get("problem", "") for e in events)


from twisted.trial import unittest as trial  # noqa: E402


class CheckerThreadTests(trial.TestCase):
    """Without an injected deferToThread, hashing runs in the reactor's thread pool."""

    def test_verifiesOffTheReactorThread(self):
        directory = tempfile.mkdtemp(prefix="mailrelay-auth-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = Path(directory) / "users"
        path.write_text(f"alice:{FAST.hash('right')}\n")
        checker = PasswordFileChecker(str(path))
        threads = []
        original = checker._verify

        def recording(*args):
            threads.append(threading.current_thread())
            return original(*args)

        checker._verify = recording
        d = checker.requestAvatarId(UsernamePassword("alice", "right"))

        def check(result):
            self.assertEqual(result, "alice")
            self.assertIsNot(threads[0], threading.main_thread())

        return d.addCallback(check)


# Certificates ----------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path):
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key = tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    return ca, chain, key


def test_load_server_tls(certs, tmp_path: Path) -> None:
    ca, chain, key = certs
    loaded = loadServerTLS(str(chain), str(key), minVersion="TLSv1.3", ciphers="ECDHE+AESGCM")
    assert loaded.warnings == []
    assert loaded.options.getContext() is not None
    combined = tmp_path / "combined.pem"
    combined.write_bytes(chain.read_bytes() + key.read_bytes())
    assert loadServerTLS(str(combined), str(combined)).warnings == []


def test_load_server_tls_errors(certs, tmp_path: Path) -> None:
    ca, chain, key = certs
    other = tmp_path / "other.pem"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(other))
    encrypted = tmp_path / "enc.pem"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n-----END ENCRYPTED PRIVATE KEY-----\n")
    cases = [
        ((str(tmp_path / "none.pem"), str(key)), "cannot read the certificate file"),
        ((str(key), str(key)), "holds no PEM certificate"),
        ((str(chain), str(chain)), "holds no usable PEM private key"),
        ((str(chain), str(other)), "does not belong to the certificate"),
        ((str(chain), str(encrypted)), "is encrypted"),
    ]
    for args, message in cases:
        with pytest.raises(TLSConfigError, match=message):
            loadServerTLS(*args)
    with pytest.raises(TLSConfigError, match="selects no cipher"):
        loadServerTLS(str(chain), str(key), ciphers="NO-SUCH-CIPHER")
    with pytest.raises(TLSConfigError, match="unknown TLS version"):
        loadServerTLS(str(chain), str(key), minVersion="TLSv1.1")


def test_a_key_the_relays_user_may_not_read_says_what_to_do(
    certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After twistd --uid has dropped root, a reload (or an acceptor process) reads the
    certificates as the relay's user: a key only root may read (certbot's privkey.pem) made
    the reload fail with a bare "Permission denied".  The message says which user and what
    to do.  (Root is not refused a file: the refusal is simulated.)"""
    import pwd

    from mailrelay import namedfile
    from mailrelay.receive import tls

    ca, chain, key = certs

    def refused(path: str) -> bytes:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(tls, "readNamedFile", refused)
    monkeypatch.setattr(namedfile.os, "geteuid", lambda: 65534)
    # Not in a command (sendmail, mailrelay): any user may run those (found by a bug hunt).
    monkeypatch.setattr(namedfile, "_relay", False)
    with pytest.raises(TLSConfigError) as e:
        loadServerTLS(str(chain), str(key))
    assert str(e.value) == f"cannot read the certificate file {str(chain)!r}: Permission denied"
    monkeypatch.setattr(namedfile, "_relay", True)  # (what the relay's processes set)
    monkeypatch.setattr(namedfile.pwd, "getpwuid", lambda uid: pwd.struct_passwd(
        ("mailrelay", "x", uid, uid, "", "/", "/bin/false")))
    user = "mailrelay"
    with pytest.raises(TLSConfigError) as e:
        loadServerTLS(str(chain), str(key))
    assert str(e.value) == (
        f"cannot read the certificate file {str(chain)!r}: Permission denied (this process "
        f"runs as user {user}: after start-up -- at a reload, when a file changes, in "
        "acceptor processes -- the relay reads its files as that user, so let it read this "
        "one, e.g. by its group and mode 0640)")
    def noSuchUser(uid: int) -> Any:
        raise KeyError(uid)

    monkeypatch.setattr(namedfile.pwd, "getpwuid", noSuchUser)
    with pytest.raises(TLSConfigError, match=r"runs as user 65534: after start-up"):
        loadServerTLS(str(chain), str(key))
    monkeypatch.setattr(namedfile.os, "geteuid", lambda: 0)
    with pytest.raises(TLSConfigError) as e:
        loadServerTLS(str(chain), str(key))
    assert str(e.value) == f"cannot read the certificate file {str(chain)!r}: Permission denied"


def test_expired_certificate_is_a_warning(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    leaf = ca.issue_cert("relay.test", not_before=past - datetime.timedelta(days=10), not_after=past)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    (warning,) = loadServerTLS(str(cert), str(key)).warnings
    assert "expired on 2020-01-01" in warning
    (warning,) = loadServerTLS(str(cert), str(key), now=past - datetime.timedelta(days=20)).warnings
    assert "is not valid before" in warning


def test_describeTLS() -> None:
    assert describeTLS(object()) is None


# A TLS endpoint (ssl:): Twisted's TLS layer is the session's transport ----------------------------

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.ssl import Certificate, optionsForClientTLS  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols.tls import TLSMemoryBIOFactory  # noqa: E402


class _Reader(Protocol):
    """A client that keeps what it reads."""

    def connectionMade(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@pytest.mark.parametrize("tlsMode", ["none", "starttls"])
def test_a_tls_endpoint_session_is_over_tls_from_the_start(certs, tlsMode: str) -> None:
    """A listener on an ssl: endpoint: its factory is under Twisted's TLS layer, whatever
    the listener's tls_mode.  The greeting is written before the handshake; the TLS layer
    holds it and pauses the session as a producer, which paused reading: the client's
    handshake was never read, and every client hung without a greeting.  Here a real TLS
    client and server in memory, the server reading only while not paused (as the reactor
    reads a socket): the session is over TLS from the start (no STARTTLS, AUTH offered,
    ESMTPSA in Received:)."""
    ca, chain, key = certs
    h = ServerHarness(users={"alice": "secret"}, tlsMode=tlsMode, connect=False)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    server = TLSMemoryBIOFactory(
        loadServerTLS(str(chain), str(key)).options, False, h.factory, h.clock
    ).buildProtocol(peer)
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    client = TLSMemoryBIOFactory(
        optionsForClientTLS("relay.test", trust), True, Factory.forProtocol(_Reader), h.clock
    ).buildProtocol(peer)
    serverWire, clientWire = StringTransport(peerAddress=peer), StringTransport()
    server.makeConnection(serverWire)
    client.makeConnection(clientWire)
    reader = client.wrappedProtocol

    def talk(data: bytes = b"") -> list[bytes]:
        """Send C{data}; move bytes both ways until neither side has more; return the
        reply lines read."""
        reader.data = b""
        if data:
            client.write(data)
        while True:
            h.clock.advance(0)  # (the TLS layer sends small writes at the next iteration)
            toServer = clientWire.value() if serverWire.producerState != "paused" else b""
            toClient = serverWire.value()
            if not toServer and not toClient:
                return reader.data.split(b"\r\n")[:-1]
            if toServer:
                clientWire.clear()
                server.dataReceived(toServer)
            if toClient:
                serverWire.clear()
                client.dataReceived(toClient)

    greeting = talk()
    assert greeting == [b"220 relay.test ESMTP mailrelay"]
    ehlo = talk(b"EHLO client.example\r\n")
    assert not any(b"STARTTLS" in line for line in ehlo), ehlo
    assert ehlo[-1] == b"250 AUTH PLAIN LOGIN"
    assert talk(b"STARTTLS\r\n") == [b"503 5.5.1 Error: TLS already active"]
    assert talk(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == [
        b"235 2.7.0 Authentication successful"
    ]
    lines = talk(
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\nhello\r\n.\r\n"
    )
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as "), lines
    ((envelope, stored),) = h.spool.committed.values()
    assert (envelope.client.protocol, envelope.client.authUser) == ("ESMTPSA", "alice")
    assert b" with ESMTPSA id " in stored
    assert f"(using {envelope.client.tls})".encode() in stored


def test_an_ssl_endpoint_listens_on_a_plain_socket_its_tls_in_the_factory(certs) -> None:
    """Found by a review: an ssl: listener listened through Twisted's SSL port, whose TLS
    context is the port's own: the acceptor processes could not share its socket (the
    port wraps the factory), and a reload could not give it a renewed certificate.  It now
    listens on a plain TCP socket, the TLS layer (the endpoint's own options) in the
    factory of the configuration: shared, and switched by a reload."""
    from twisted.internet.testing import MemoryReactor

    from mailrelay.app.listeners import ListenerService

    ca, chain, key = certs
    reactor = MemoryReactor()
    service = ListenerService(
        reactor, f"ssl:0:interface=127.0.0.1:backlog=7:privateKey={key}:certKey={chain}",
        Factory.forProtocol(Protocol))
    service.listen()
    assert reactor.sslServers == []
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, backlog, interface) == (0, 7, "127.0.0.1")
    assert factory is service._switch


def test_an_ssl_endpoint_s_certificate_is_read_at_each_load(certs, tmp_path: Path) -> None:
    """The ssl: endpoint's certificate and key (privateKey=, certKey=) are read with the
    configuration, at start and at each reload, as tls_certificate is: its factory serves
    TLS from the first byte with the certificate on disk then (renewed by certbot: the new
    one)."""
    from mailrelay.config import loadConfig
    from mailrelay.receive.listener import wrapListenerFactory

    ca, chain, key = certs
    path = tmp_path / "relay.toml"
    path.write_text(f'[[listeners]]\nendpoint = "ssl:465:privateKey={key}:certKey={chain}"\n')

    def served() -> str:
        [listener] = loadConfig(str(path), {"spool": str(tmp_path / "spool")}).listeners
        inner = Factory.forProtocol(Protocol)
        wrapped = wrapListenerFactory(listener.settings, inner, None)
        assert isinstance(wrapped, TLSMemoryBIOFactory) and wrapped.wrappedFactory is inner
        options = listener.settings.endpointTLS  # (Twisted's CertificateOptions)
        assert options.getContext() is not None
        from cryptography import x509

        san = options.certificate.to_cryptography().extensions.get_extension_for_class(
            x509.SubjectAlternativeName)
        return san.value.get_values_for_type(x509.DNSName)[0]  # type: ignore[no-any-return]

    assert served() == "relay.test"
    renewed = ca.issue_cert("renewed.relay.test")
    chain.write_bytes(b"".join(p.bytes() for p in renewed.cert_chain_pems))
    renewed.private_key_pem.write_to_path(str(key))
    assert served() == "renewed.relay.test"


# Real handshakes: our client against our server on loopback -------------------------------------

from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS  # noqa: E402

from mailrelay.auth import AuthPolicy, makePortal  # noqa: E402
from mailrelay.cleanup.intake import Intake  # noqa: E402
from mailrelay.delivery.connection import connectSMTP  # noqa: E402
from mailrelay.delivery.tls import clientTLSOptions  # noqa: E402
from mailrelay.envelope import Envelope, Recipient  # noqa: E402
from mailrelay.policy import RecipientPolicy, RelayControl  # noqa: E402
from mailrelay.receive.listener import (  # noqa: E402
    ListenerSettings,
    buildListenerFactory,
    wrapListenerFactory,
)
from mailrelay.smtp.clientsettings import ClientSettings  # noqa: E402
from mailrelay.stamping import ConfiguredStamper, DefaultStamper  # noqa: E402
from mailrelay.testing import MemorySpool  # noqa: E402


class RealTLSTests(trial.TestCase):
    """The server with a real certificate on 127.0.0.1, the relay's own SMTP client on the
    real reactor: STARTTLS and implicit TLS handshakes, AUTH, and what gets recorded."""

    timeout = 20

    def setUp(self):
        import trustme

        self.directory = Path(tempfile.mkdtemp(prefix="mailrelay-tls-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        ca = trustme.CA()
        leaf = ca.issue_cert("relay.test")
        chain, key, self.caFile = (self.directory / n for n in ("chain.pem", "key.pem", "ca.pem"))
        chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(self.caFile))
        self.tls = loadServerTLS(str(chain), str(key))

    def listen(self, implicit: bool):
        from twisted.internet import reactor

        self.spool = MemorySpool()
        auth = AuthPolicy(makePortal([MemoryChecker({"alice": "secret"})]), MemoryAuthThrottle(reactor))
        settings = ListenerSettings(
            "relay.test",
            mode="submission",
            auth=True,
            tlsMode="implicit" if implicit else "starttls",
            tlsOptions=self.tls.options,
        )
        factory = buildListenerFactory(
            settings,
            policy=RecipientPolicy(RelayControl([], [], "relay.test"), [], reactor),
            intake=Intake(
                self.spool, [ConfiguredStamper("default", DefaultStamper(), 30.0)], reactor,
                "relay.test",
            ),
            clock=reactor,
            auth=auth,
        )
        factory = wrapListenerFactory(settings, factory, reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def deliver(self, implicit: bool):
        from twisted.internet import reactor

        port = self.listen(implicit)
        settings = ClientSettings(
            "client.test", tls="implicit" if implicit else "required", caFile=str(self.caFile),
            username="alice", password="secret",
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        if implicit:
            endpoint = wrapClientTLS(clientTLSOptions(settings, "relay.test"), endpoint)
        conn = await connectSMTP(reactor, endpoint, settings, tlsHostname="relay.test")
        self.assertTrue(conn.tls)
        message = self.directory / "message"
        message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
        env = Envelope(sender="alice@example.com", recipients=[Recipient("bob@example.org")], queueID="Q")
        results = await conn.send(env, env.recipients, message)
        await conn.quit()
        self.assertEqual([r.code for r in results], ["2.0.0"])
        ((envelope, stored),) = self.spool.committed.values()
        self.assertEqual((envelope.client.authUser, envelope.client.protocol), ("alice", "ESMTPSA"))
        self.assertRegex(envelope.client.tls, r"^TLSv1\.[23] \S+$")
        self.assertIn(b" with ESMTPSA id ", stored)
        self.assertIn(f"(using {envelope.client.tls})".encode(), stored)

    def test_starttlsAuthAndDelivery(self):
        return Deferred.fromCoroutine(self.deliver(implicit=False))

    def test_implicitTLSAuthAndDelivery(self):
        return Deferred.fromCoroutine(self.deliver(implicit=True))


def test_service_logs_an_expired_certificate(tmp_path: Path) -> None:
    import trustme

    from mailrelay.app.listeners import logCertificates
    from mailrelay.config import loadConfig

    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    leaf = trustme.CA().issue_cert("relay.test", not_before=past - datetime.timedelta(days=1), not_after=past)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    path = tmp_path / "relay.toml"
    path.write_text(
        '[[listeners]]\nendpoint = "tcp:25"\ntls_certificate = "c.pem"\ntls_key = "k.pem"\n'
        '[[listeners]]\nendpoint = "tcp:26"\n'
    )
    tls, plain = loadConfig(str(path), {"spool": str(tmp_path / "spool")}).listeners

    with capturedLogs() as events:
        logCertificates(tls)
    assert any("expired on 2020-01-01" in e.get("warning", "") for e in events)
    assert any(e.get("notAfter") == "2020-01-01" for e in events)
    with capturedLogs() as events:
        logCertificates(plain)
    assert events == []


def test_service_logs_an_ssl_endpoint_s_certificate(tmp_path: Path) -> None:
    """An ssl: endpoint's certificate (certKey=, or privateKey=) is logged at start and at
    each reload as tls_certificate's is: its subject and end of validity, and a warning when
    it expired.  An expired one was served without a word."""
    import re

    import trustme

    from mailrelay.app.listeners import logCertificates
    from mailrelay.config import loadConfig

    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    ca = trustme.CA()
    old = ca.issue_cert("old.relay.test", not_before=past - datetime.timedelta(days=1),
                        not_after=past)
    cert, key, both = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "both.pem"
    old.cert_chain_pems[0].write_to_path(str(cert))
    old.private_key_pem.write_to_path(str(key))
    fresh = ca.issue_cert("new.relay.test")
    both.write_bytes(fresh.private_key_pem.bytes() + fresh.cert_chain_pems[0].bytes())
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[[listeners]]\nendpoint = "ssl:465:privateKey={key}:certKey={cert}"\n'
        f'[[listeners]]\nendpoint = "ssl:466:privateKey={both}"\n'
    )
    expired, good = loadConfig(str(path), {"spool": str(tmp_path / "spool")}).listeners

    with capturedLogs() as events:
        logCertificates(expired)
    said = [formatEvent(e) for e in events]
    assert len(said) == 2, said
    assert said[0].startswith(f"listener ssl:465:privateKey={key}:certKey={cert}: the "
                              f"certificate {str(cert)!r} ("), said
    assert said[0].endswith(") expired on 2020-01-01 00:00 UTC"), said
    assert said[1].startswith(f"listener ssl:465:privateKey={key}:certKey={cert}: certificate ")
    assert said[1].endswith(", valid until 2020-01-01"), said
    with capturedLogs() as events:
        logCertificates(good)
    [line] = [formatEvent(e) for e in events]
    assert line.startswith(f"listener ssl:466:privateKey={both}: certificate "), line
    assert re.search(r", valid until \d{4}-\d\d-\d\d$", line), line


# SNI: several certificates chosen by server name ----------------------------------------------------


def test_matchServerName() -> None:
    from mailrelay.receive.tls import matchServerName

    names = {"mail.example.org": 1, "*.example.net": 2, "example.net": 3}
    assert matchServerName("MAIL.Example.org.", names) == 1
    assert matchServerName("mx.example.net", names) == 2
    assert matchServerName("example.net", names) == 3
    assert matchServerName("a.mx.example.net", names) is None  # one label only
    assert matchServerName("example.org", names) is None
    assert matchServerName("", names) is None


def sniHandshake(options, serverName: str | None, caFile: str) -> dict:
    """A memory-BIO handshake: Python's ssl as the client (asking for C{serverName}),
    C{options} as the server; the certificate the client verified."""
    import ssl

    from OpenSSL import SSL

    context = ssl.create_default_context(cafile=caFile)
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=serverName)
    server = options.serverConnectionForTLS(None)
    server.set_accept_state()
    for _ in range(20):
        done = 0
        try:
            client.do_handshake()
            done += 1
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            server.bio_write(data)
        try:
            server.do_handshake()
            done += 1
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
        if done == 2:
            break
    return client.getpeercert()


def test_sni_chooses_the_certificate(tmp_path: Path) -> None:
    import trustme

    from mailrelay.receive.tls import SNIServerOptions

    ca = trustme.CA()
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    loaded = {}
    for name in ("relay.test", "mail.example.org", "*.example.net"):
        leaf = ca.issue_cert(name)
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        loaded[name] = loadServerTLS(str(cert), str(key)).options
    sni = SNIServerOptions(loaded.pop("relay.test"), loaded)
    assert sni.getContext() is not None

    def names(peer: dict) -> list[str]:
        return [value for kind, value in peer["subjectAltName"] if kind == "DNS"]

    assert names(sniHandshake(sni, "mail.example.org", str(caFile))) == ["mail.example.org"]
    assert names(sniHandshake(sni, "MX.example.net", str(caFile))) == ["*.example.net"]
    assert names(sniHandshake(sni, "unknown.example", str(caFile))) == ["relay.test"]
    assert names(sniHandshake(sni, None, str(caFile))) == ["relay.test"]
    assert sni.selected == {"mail.example.org": 1, "*.example.net": 1}


# Site checkers: time-out, and the service's checks ---------------------------------------------------


def test_slow_checker_times_out_with_454() -> None:
    h = tlsHarness(timeout=10)
    afterTLS(h)
    h.checker.hold = True
    with capturedLogs() as logs:
        assert h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n") == []
        h.clock.advance(10)
    assert h.replies() == [b"454 4.7.0 Temporary authentication failure"]
    from twisted.logger import formatEvent

    assert any("(sasl_username=alice) by the credentials checker gave no answer in 10s" in formatEvent(e) for e in logs)
    assert h.throttle.failures("127.0.0.1") == 0  # not the client's fault
    assert h.throttle.inFlight("127.0.0.1") == 0
    h.checker.release()  # a late answer is dropped
    assert h.replies() == []


def makeSiteCheckerPolicy(tmp_path: Path, checker) -> object:
    from twisted.internet.task import Clock

    from mailrelay.app.listeners import makeAuthPolicy
    from mailrelay.config import loadConfig

    path = tmp_path / "c.toml"
    path.write_text('[auth.checker]\nplugin = "site"\ntimeout = 7\n')
    config = loadConfig(str(path), {"spool": str(tmp_path / "spool")})
    built = []

    def build(spec, interface):
        built.append((spec.plugin, interface))
        return checker

    policy = makeAuthPolicy(config, Clock(), build)
    assert built == [("site", ICredentialsChecker)]
    return policy


def test_service_builds_the_site_checker(tmp_path: Path) -> None:
    from mailrelay.errors import ConfigError

    checker = MemoryChecker({"erin": "pw"})
    policy = makeSiteCheckerPolicy(tmp_path, checker)
    assert policy.timeout == 7.0
    d = policy.portal.login(UsernamePassword("erin", b"pw"), None, IAuthenticatedUser)
    assert outcome(d)[1].name == "erin"

    @implementer(ICredentialsChecker)
    class KeysOnly:
        from twisted.cred.credentials import ISSHPrivateKey

        credentialInterfaces = (ISSHPrivateKey,)

        def requestAvatarId(self, credentials):  # pragma: no cover
            raise NotImplementedError

    with pytest.raises(ConfigError) as e:
        makeSiteCheckerPolicy(tmp_path, KeysOnly())
    assert e.value.key == "auth.checker.plugin"
    assert "does not check user names and passwords" in str(e.value)


@pytest.mark.parametrize(
    ("response", "shown", "why"),
    [
        (b"AUTH PLAIN " + base64.b64encode(b"\0al\nice\0secret") + b"\r\n", "al\\nice", "unprintable"),
        (b"AUTH PLAIN " + base64.b64encode(b"\0\xffbob\0secret") + b"\r\n", "\\xffbob", "UTF-8"),
        (b"AUTH LOGIN " + base64.b64encode(b"\xe2\x80\xa8x") + b"\r\n" + base64.b64encode(b"pw") + b"\r\n",
         "\\xe2\\x80\\xa8x", "unprintable"),
        # RFC 4616: passwd = 1*SAFE.  An empty password reached the checker, and one that
        # binds to LDAP let it through (an anonymous bind): relay rights for any user name.
        (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0") + b"\r\n", "alice", "password empty"),
        (b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n\r\n", "alice", "password empty"),
        (b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret") + b"\r\n", "alice",
         "authorization identity differs"),
    ],
)
def test_a_user_name_that_cannot_be_checked_is_a_logged_and_counted_failure(
    response: bytes, shown: str, why: str
) -> None:
    """An AUTH whose user name is not valid UTF-8 or holds an unprintable character is
    refused like a wrong password: 535, one log line naming the client and the user name
    (escaped), counted against the client's failures -- it was answered without a word in
    the log (invisible to fail2ban) and never counted.  Nothing is checked."""
    h = tlsHarness(throttleAfter=10, maxFailures=2)
    afterTLS(h)
    with capturedLogs() as events:
        lines = h.send(response)
    assert lines[-1] == b"535 5.7.8 Authentication credentials invalid"
    (failed,) = [e for e in events if e.get("failures") is not None]
    assert failed["sasl_username"] == shown and failed["failures"] == 1
    assert why in formatEvent(failed) and "\n" not in formatEvent(failed)
    assert h.checker.checked == []
    # Counted: the second failure reaches max_failures.
    assert h.send(b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n")[0].startswith(b"421")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (lambda credentials: 1 / 0, "AUTH checker plugin site failed for 192.0.2.9 "
         "(sasl_username=erin); answered 454"),
        (lambda credentials: None, "AUTH checker plugin site failed for 192.0.2.9 "
         "(sasl_username=erin); answered 454"),
        (lambda credentials: Deferred(), "authentication check for 192.0.2.9 "
         "(sasl_username=erin) by AUTH checker plugin site gave no answer in 7s"),
    ],
    ids=["raises", "answers-None", "times-out"],
)
def test_a_failing_site_checker_is_named_in_the_log(tmp_path: Path, answer, expected) -> None:
    """The other hooks' failures name their plugin ("rcpt plugin X failed for ..."); a
    failing or silent site checker ([auth.checker]) was logged as "authentication check
    failed for ADDRESS", naming neither the plugin nor the user name: the log now names
    both, and the event carries the plugin's name (key C{plugin})."""
    checker = MemoryChecker({"erin": "pw"})
    checker.requestAvatarId = answer
    policy = makeSiteCheckerPolicy(tmp_path, checker)
    from twisted.internet.task import Clock

    from mailrelay.receive.auth import AUTH_TEMPORARY_FAILURE

    clock = Clock()
    with capturedLogs() as events:
        d = policy.authenticate(Authenticate("PLAIN", "erin", b"pw"), "192.0.2.9", clock)
        clock.advance(7)
    assert outcome(d) == AUTH_TEMPORARY_FAILURE
    texts = [formatEvent(e) for e in events]
    assert any(expected in t for t in texts), texts
    assert [e["plugin"] for e in events if "sasl_username=erin" in formatEvent(e)] == ["site"]


def test_a_checker_that_blocks_past_its_timeout_is_not_believed(tmp_path: Path) -> None:
    """A site checker whose call holds the reactor longer than the timeout (its timer
    cannot fire) and then accepts logged the client in, while a Deferred answering after
    the timeout is ignored (454): the answer came too late either way, so it is now a
    454 too, not counted against the client, logged as a timeout."""
    import time

    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock

    from mailrelay.receive.auth import AUTH_TEMPORARY_FAILURE

    checker = MemoryChecker({"erin": "pw"})

    def blocks(credentials):
        time.sleep(0.03)
        return succeed("erin")

    checker.requestAvatarId = blocks
    policy = makeSiteCheckerPolicy(tmp_path, checker)
    policy.timeout = 0.01
    clock = Clock()
    with capturedLogs() as events:
        d = policy.authenticate(Authenticate("PLAIN", "erin", b"pw"), "192.0.2.9", clock)
    assert outcome(d) == AUTH_TEMPORARY_FAILURE
    assert clock.getDelayedCalls() == []
    assert policy.throttle.failures("192.0.2.9") == 0 and policy.throttle.inFlight("192.0.2.9") == 0
    texts = [formatEvent(e) for e in events]
    assert any("authentication check for 192.0.2.9 (sasl_username=erin) by AUTH checker plugin "
               "site gave no answer in 0.01s; answered 454 (its call held the reactor for 0.0"
               in t for t in texts), texts
