"""End-to-end: abuse limits, protocol synchronization, session deadlines and the PROXY
protocol with the real C{twistd -n mailrelay}, real clients (smtplib, swaks) and raw sockets."""

from __future__ import annotations

import ipaddress
import json
import re
import select
import smtplib
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import LineClient, RelayProcess, requireTool

SYNC = [b"554 5.5.0 Error: SMTP protocol synchronization"]


@pytest.fixture
def relay(tmp_path: Path):
    started: list[RelayProcess] = []

    def start(listener: str = "", config: str = "") -> RelayProcess:
        text = config + '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n' + listener
        r = RelayProcess(
            tmp_path / f"relay{len(started)}", text, ("--spool", "spool", "--hostname", "relay.test"),
            defaults=False, hold=True,
        )
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()


def greeted(r: RelayProcess) -> LineClient:
    c = r.connect()
    assert c.readReply()[0].startswith(b"220 relay.test ESMTP")
    return c


def queued(r: RelayProcess) -> list[dict]:
    return [json.loads((r.spool / "queue" / f"{i}.json").read_text()) for i in r.queued()]


# Connection and message limits -------------------------------------------------------------------


def listenBacklog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:C{port}: C{ss -ltn}'s Send-Q."""
    ss = requireTool("ss", "iproute2")
    out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True, timeout=10).stdout.split()
    assert out and out[0] == "LISTEN", out
    return int(out[2])


def test_listen_backlog_holds_a_burst_by_default(tmp_path: Path) -> None:
    """A listener whose endpoint sets no backlog listens with 1024 (Twisted's 50 made clients
    of a burst wait for SYN retransmits); one that sets it has its own."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    r = RelayProcess(
        tmp_path / "relay",
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1:backlog=16"\n',
        ("--spool", "spool", "--hostname", "relay.test"), defaults=False, listeners=2, hold=True,
    ).start()
    try:
        shipped, explicit = r.ports
        assert listenBacklog(shipped) == min(1024, somaxconn)
        assert listenBacklog(explicit) == 16
    finally:
        r.stop()


def test_per_address_connection_limit(relay) -> None:
    r = relay("max_connections_per_client = 2\nlimit_exceptions = []\n")
    first, second = greeted(r), greeted(r)
    third = r.connect()
    assert third.readReply() == [b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1"]
    third.expectClosed()
    r.waitForLog(r"connection from 127\.0\.0\.1 on tcp:0:interface=127\.0\.0\.1 refused: "
                 r"3 connections at once is over the limit of 2")
    # A client leaving frees its place.
    first.send(b"QUIT\r\n")
    assert first.readReply() == [b"221 2.0.0 Bye"]
    first.expectClosed()
    deadline = time.monotonic() + 10
    while r.log().count("disconnect from 127.0.0.1") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    fourth = greeted(r)
    fourth.close()
    second.close()


def test_relay_networks_are_exempt_by_default(relay) -> None:
    r = relay("max_connections_per_client = 1\n")
    clients = [greeted(r) for _ in range(3)]
    for c in clients:
        c.close()


def test_listener_connection_limit(relay) -> None:
    r = relay("max_connections = 1\n")
    first = greeted(r)
    second = r.connect()
    assert second.readReply() == [b"421 4.7.0 relay.test Error: too many connections"]
    second.expectClosed()
    first.close()


def test_connection_rate_limit(relay) -> None:
    r = relay("connection_rate_limit = 2\nrate_window = 60\nlimit_exceptions = []\n")
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            assert s.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtplib.SMTP("127.0.0.1", r.port, timeout=10)
    assert e.value.smtp_code == 421
    assert e.value.smtp_error == b"4.7.0 relay.test Error: too many connections from 127.0.0.1"
    r.waitForLog(r"connection rate 3 in 60s is over the limit of 2")


def test_message_rate_limit(relay) -> None:
    r = relay("message_rate_limit = 2\nlimit_exceptions = []\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        for i in range(2):
            s.sendmail("a@example.com", ["b@example.org"], b"Subject: %d\r\n\r\nx\r\n" % i)
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("a@example.com", ["b@example.org"], b"Subject: 3\r\n\r\nx\r\n")
        assert (e.value.smtp_code, e.value.smtp_error) == (450, b"4.7.1 Error: too much mail from 127.0.0.1")
    assert len(r.queued()) == 2
    r.waitForLog(r"127\.0\.0\.1: MAIL FROM:<a@example\.com> refused: message rate 3 in 60s is over the limit of 2")


# Protocol synchronization ------------------------------------------------------------------------


def test_unauthorised_pipelining_is_refused(relay) -> None:
    r = relay("reject_unauth_pipelining = true\n")
    c = greeted(r)
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n")
    assert c.readReply() == SYNC
    c.expectClosed()
    r.waitForLog(r"improper command pipelining after EHLO from 127\.0\.0\.1: b'MAIL FROM:<a@example\.com>\\r\\n', refused with 554")
    # Content sent with DATA, before the 354 (SMTP smuggling tools do this).
    c = greeted(r)
    c.send(b"EHLO client.example\r\n")
    c.readReply()
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n\r\n.\r\n")
    assert [c.readReply() for _ in range(3)] == [[b"250 2.1.0 Ok"], [b"250 2.1.5 Ok"], SYNC]
    c.expectClosed()
    assert r.queued() == []


def test_well_behaved_clients_pass_the_synchronization_checks(relay) -> None:
    """smtplib and swaks wait for each reply (or pipeline only after EHLO), also with a
    greeting pause."""
    r = relay("reject_unauth_pipelining = true\ngreet_pause = 0.3\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("a@example.com", ["b@example.org", "c@example.org"], b"Subject: smtplib\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.helo("legacy.example")
        s.sendmail("a@example.com", ["b@example.org"], b"Subject: HELO\r\n\r\nx\r\n")
    swaks = requireTool("swaks")
    for extra in ([], ["--pipeline"]):
        out = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{r.port}", "--from", "a@example.com", "--to",
             "b@example.org", "--header", "Subject: swaks", *extra],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    assert len(r.queued()) == 4
    # No 554 reply nor synchronization log line (a bare "554" could be part of a queue id).
    assert not re.search(r"\b554 5\.|synchronization|improper command pipelining|before the greeting", r.log())


def test_early_talker_refused_during_greet_pause(relay) -> None:
    r = relay("greet_pause = 1\n")
    c = r.connect()
    c.send(b"EHLO spambot.example\r\n")
    assert c.readReply() == SYNC
    c.expectClosed()
    r.waitForLog(r"127\.0\.0\.1 talked before the greeting: b'EHLO spambot\.example\\r\\n', refused with 554")
    # A client that waits is greeted after the pause.
    started = time.monotonic()
    c = greeted(r)
    assert time.monotonic() - started >= 0.9
    c.close()


# Deadlines ---------------------------------------------------------------------------------------


def test_session_deadline(relay) -> None:
    r = relay("max_session_time = 1.5\n", "[limits]\nidle_timeout = 10\n")
    c = greeted(r)
    started = time.monotonic()
    replies = []
    while True:
        c.send(b"NOOP\r\n")
        reply = c.readReply()
        replies.append(reply)
        if reply != [b"250 2.0.0 Ok"]:
            break
        time.sleep(0.2)
    assert reply == [b"421 4.4.2 relay.test Error: session time limit exceeded"]
    assert 1.3 < time.monotonic() - started < 5
    c.expectClosed()
    r.waitForLog(r"session time limit of 1\.5s exceeded by 127\.0\.0\.1, closing")


def test_slow_drip_in_data_is_cut_off(relay) -> None:
    """20 bytes every 0.2 s (100 bytes/s) never idles for data_timeout, but is far below
    min_data_rate: the deadline is reached."""
    r = relay("min_data_rate = 1000\n", "[limits]\ndata_timeout = 1\n")
    c = greeted(r)
    c.send(b"EHLO x\r\n")
    c.readReply()
    for command in (b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"):
        c.send(command)
        c.readReply()
    started = time.monotonic()
    received = b""
    for _ in range(100):
        c.send(b"x" * 18 + b"\r\n")
        if select.select([c.sock], [], [], 0.2)[0]:
            received = c.sock.recv(4096)
            break
    took = time.monotonic() - started
    assert received == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    assert 1 < took < 5, took
    r.waitForLog(r"timeout in DATA \(less than min_data_rate = 1000 bytes/s\) from 127\.0\.0\.1")
    assert r.queued() == []


# PROXY protocol ----------------------------------------------------------------------------------


def v2Header(source: str, sport: int, destination: str, dport: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    tlv = b"\x04\x00\x03abc"  # a TLV (type 4, NOOP), as load balancers add: skipped
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(body) + len(tlv)) + body + tlv


PROXIED = 'proxy_protocol = true\nproxy_networks = ["127.0.0.0/8"]\n'


def sendThrough(c: LineClient, subject: str) -> bytes:
    assert c.readReply()[0].startswith(b"220 ")
    for command in (b"EHLO lb-client.example", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>", b"DATA"):
        c.send(command + b"\r\n")
        c.readReply()
    c.send(f"Subject: {subject}\r\n\r\nx\r\n.\r\n".encode())
    (reply,) = c.readReply()
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    c.send(b"QUIT\r\n")
    return reply.rsplit(b" ", 1)[1]


def test_proxy_v1_and_v2_from_a_trusted_proxy(relay) -> None:
    # 203.0.113.0/24 is not a relay network: the proxied client may only send to accepted
    # domains; 198.51.100.7 is made one, so its mail is relayed.
    r = relay(PROXIED, '[relay]\nnetworks = ["198.51.100.0/24"]\naccept_domains = ["example.org"]\n')
    c = r.connect()
    c.send(b"PROXY TCP4 203.0.113.9 192.0.2.25 40123 25\r\n")
    queueID = sendThrough(c, "v1").decode()
    c = r.connect()
    c.sock.sendall(v2Header("198.51.100.7", 50000, "192.0.2.25", 25))
    queueID2 = sendThrough(c, "v2").decode()
    envelopes = {e["queueID"]: e for e in queued(r)}
    assert envelopes[queueID]["client"]["address"] == "203.0.113.9"
    assert envelopes[queueID]["client"]["port"] == 40123
    assert envelopes[queueID]["client"]["relayAllowed"] is False
    assert envelopes[queueID2]["client"]["address"] == "198.51.100.7"
    assert envelopes[queueID2]["client"]["relayAllowed"] is True
    eml = (r.spool / "queue" / f"{queueID}.eml").read_bytes()
    assert eml.startswith(b"Received: from lb-client.example (unknown [203.0.113.9])\r\n")
    log = r.log()
    assert "PROXY v1 from 127.0.0.1: client 203.0.113.9:40123" in log
    assert "PROXY v2 from 127.0.0.1: client 198.51.100.7:50000" in log
    assert "connect from 203.0.113.9:40123" in log
    assert f"{queueID}: from=<a@example.com> nrcpt=1" in log and "client=203.0.113.9" in log
    # An IPv6 client over v2, and an unaccepted relay attempt from a proxied outsider.
    c = r.connect()
    c.sock.sendall(v2Header("2001:db8::7", 1234, "2001:db8::25", 25) + b"EHLO x\r\n")
    assert c.readReply()[0].startswith(b"220 ")
    c.readReply()
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
    assert [c.readReply() for _ in range(2)] == [[b"250 2.1.0 Ok"], [b"554 5.7.1 Relay access denied"]]
    c.close()
    # An IPv6 address and its port, told apart as in a URL: [address]:port.
    r.waitForLog(r"PROXY v2 from 127\.0\.0\.1: client \[2001:db8::7\]:1234")
    r.waitForLog(r"connect from \[2001:db8::7\]:1234 on ")
    r.waitForLog(r"disconnect from \[2001:db8::7\]:1234 messages=0")


def test_proxy_local_health_check(relay) -> None:
    r = relay(PROXIED)
    c = r.connect()
    c.sock.sendall(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")  # v2 LOCAL
    assert c.readReply()[0].startswith(b"220 ")
    c.send(b"QUIT\r\n")
    assert c.readReply() == [b"221 2.0.0 Bye"]
    r.waitForLog(r"PROXY v2 from 127\.0\.0\.1: no client address \(LOCAL\)")


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\xd8" + b"\0" * 216,  # v2 PROXY, AF_UNIX
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00",  # v2 PROXY, AF_UNSPEC
        v2Header("0.0.0.0", 0, "0.0.0.0", 0),  # v2 PROXY, TCP4 from the unspecified address
        v2Header("::", 0, "::", 0),
    ],
    ids=["v1-unknown", "v2-unix", "v2-unspec", "v2-tcp4-zero", "v2-tcp6-zero"],
)
def test_proxied_client_without_an_address_never_relays(relay, header) -> None:
    # The proxy (127.0.0.1) is in the default relay networks, but the client it forwards is
    # not the proxy: a header naming no client must not give it the proxy's right to relay
    # (Postfix refuses such headers: they "would sidestep address-based access control").
    r = relay(PROXIED, '[relay]\naccept_domains = ["example.org"]\n')
    c = r.connect()
    c.sock.sendall(header + b"EHLO x\r\n")
    assert c.readReply()[0].startswith(b"220 ")
    c.readReply()
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<b@example.org>\r\n")
    assert [c.readReply() for _ in range(3)] == [
        [b"250 2.1.0 Ok"], [b"554 5.7.1 Relay access denied"], [b"250 2.1.5 Ok"]]
    c.send(b"QUIT\r\n")
    c.readReply()
    r.waitForLog(r"PROXY v\d from 127\.0\.0\.1: no client address \((UNKNOWN|family 0x[03][01]|"
                 r"unspecified address (0\.0\.0\.0|::))\), "
                 r"using the proxy's, without its relay permission")
    # (The client was logged and stamped as 0.0.0.0:0 or [::]:0 for all-zero addresses.)
    r.waitForLog(r"disconnect from 127\.0\.0\.1:\d+ messages=0")
    assert not re.search(r"(client|from) (0\.0\.0\.0|\[::\]):0", r.log())
    # The proxy's own connection (a v2 LOCAL health check) is the proxy's, as in Postfix.
    c = r.connect()
    c.sock.sendall(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00EHLO x\r\n")
    assert c.readReply()[0].startswith(b"220 ")
    c.readReply()
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
    assert [c.readReply() for _ in range(2)] == [[b"250 2.1.0 Ok"], [b"250 2.1.5 Ok"]]
    c.close()


def test_proxy_header_from_an_untrusted_peer_is_refused(relay) -> None:
    r = relay('proxy_protocol = true\nproxy_networks = ["10.0.0.0/8"]\n')
    c = r.connect()
    c.send(b"PROXY TCP4 203.0.113.9 192.0.2.25 40123 25\r\n")
    with pytest.raises((EOFError, ConnectionResetError)):
        c.readReply()
    r.waitForLog(r"connection from 127\.0\.0\.1 on tcp:0:interface=127\.0\.0\.1 refused: not a trusted proxy \(proxy_networks\)")
    assert "203.0.113.9" not in r.log()
    assert re.search(r"listening on 127\.0\.0\.1:\d+ \(tcp:0:interface=127\.0\.0\.1; relay, PROXY from 10\.0\.0\.0/8\)", r.log())


def test_missing_or_bad_proxy_header_is_refused(relay) -> None:
    r = relay(PROXIED)
    c = r.connect()
    c.send(b"EHLO x\r\n")  # a client talking SMTP straight to the proxied port
    with pytest.raises((EOFError, ConnectionResetError)):
        c.readReply()
    r.waitForLog(r"bad PROXY header from 127\.0\.0\.1: no PROXY header: the connection starts with b'EHLO x\\r\\n', closing")
    c = r.connect()
    c.send(b"PROXY TCP4 not-an-address 192.0.2.25 1 25\r\n")
    with pytest.raises((EOFError, ConnectionResetError)):
        c.readReply()
    r.waitForLog(r"bad PROXY header from 127\.0\.0\.1: bad address b'not-an-address'")



# The header section ------------------------------------------------------------------------------


def test_header_section_over_header_size_is_refused(relay) -> None:
    """A 9 MB header section was acknowledged and stored (only 100 KiB of it parsed): it is
    refused at the end of the data now, 552 5.6.0, past [limits] header_size; nothing is
    queued, and a message within the limit on the same connection is taken."""
    r = relay("", "[limits]\nheader_size = 2000\n")
    c = greeted(r)
    c.send(b"EHLO x\r\n")
    c.readReply()
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 90) for i in range(30))
    for header, expected in ((pad, b"552 5.6.0 Error: message header size exceeds fixed limit"),
                             (pad[:1900], b"250 2.0.0 Ok: queued as ")):
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@relay.test>\r\nDATA\r\n")
        assert [c.readReply() for _ in range(3)][2] == [b"354 End data with <CR><LF>.<CR><LF>"]
        c.send(header + b"\r\n" + b"body\r\n" * 100 + b".\r\n")
        (reply,) = c.readReply()
        assert reply.startswith(expected), reply
    assert len(queued(r)) == 1
    r.waitForLog(r"\w+: from=<a@example\.com> nrcpt=1 size=\d+ client=127\.0\.0\.1 "
                 r"result=552 5\.6\.0 Error: message header size exceeds fixed limit")
    # The default, 102400: a 9 MB header section.
    r2 = relay()
    with smtplib.SMTP("127.0.0.1", r2.port, timeout=30) as s:
        big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"q" * 90) for i in range(90_000))
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@example.com", ["b@relay.test"], big + b"\r\nbody\r\n")
        assert (e.value.smtp_code, e.value.smtp_error) == (
            552, b"5.6.0 Error: message header size exceeds fixed limit")
    assert queued(r2) == []
