"""End-to-end: the built-in plugins dnsbl and greylist in the real C{twistd -n mailrelay}.

dnsbl asks a DNS server of the test's ([dns] nameservers) that lists 127.0.0.1: a client
from there gets the 554 greeting, one from 127.0.0.2 (the loopback network is the test's to
use) is served.  greylist: two relays sharing one redis-server, a first-time triplet deferred
at relay A passes at relay B once the delay is over."""

from __future__ import annotations

import json
import smtplib
import socket
import time
from pathlib import Path

import pytest

from tests.harness import DNSServer, LineClient, RedisServer
from tests.test_e2e_clocksteps import FakeClock

#: Nobody relays (so 127.0.0.1 is exempt from nothing); example.org is accepted.
BASE = ('[relay]\nnetworks = []\naccept_domains = ["example.org"]\n'
        '[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:%d"]\n')
MESSAGE = "Subject: policies\r\n\r\nHello.\r\n"


@pytest.fixture
def blocklist(tmp_path: Path):
    server = DNSServer(tmp_path / "dns", "test", [
        ["1.0.0.127.bl.test", "A", "127.0.0.2"],
        ["1.0.0.127.bl.test", "TXT", "listed for testing"],
    ])
    yield server
    server.stop()


def connectFrom(port: int, source: str) -> LineClient:
    client = LineClient.__new__(LineClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(source, 0))
    client.buffer = b""
    return client


def test_a_listed_client_is_refused_at_connect(relays, blocklist) -> None:
    config = BASE % blocklist.port + '[[plugins]]\nplugin = "dnsbl"\nzones = ["bl.test"]\n'
    r = relays(config, hold=True).start()
    listed = r.connect()
    assert listed.readReply() == [
        b"554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using bl.test; "
        b"listed for testing"]
    listed.send(b"QUIT\r\n")
    assert listed.readReply() == [b"221 2.0.0 Bye"]
    r.waitForLog(r"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 "
                 r"Service unavailable; Client host \[127\.0\.0\.1\] blocked using bl\.test")

    unlisted = connectFrom(r.port, "127.0.0.2")
    assert unlisted.readReply()[0].startswith(b"220 relay.test ")
    for command in (b"EHLO client.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@example.org>"):
        unlisted.send(command + b"\r\n")
        assert unlisted.readReply()[-1].startswith(b"250"), command
    unlisted.close()
    assert ("2.0.0.127.bl.test", "A") in blocklist.queries()


def test_a_listed_client_is_tagged(relays, blocklist) -> None:
    config = BASE % blocklist.port + (
        '[[plugins]]\nplugin = "dnsbl"\nzones = ["bl.test=127.0.0.[2..11]"]\n'
        'action = "tag"\nheader = "X-DNSBL"\n')
    r = relays(config, hold=True).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        assert s.sendmail("a@sender.test", ["b@example.org"], MESSAGE) == {}
    queueID = r.waitForLog(r"(\w+): from=<a@sender\.test>").group(1)
    eml = (r.spool / "queue" / f"{queueID}.eml").read_bytes()
    assert eml.startswith(b"X-DNSBL: bl.test=127.0.0.2 (score 1)\r\n")
    envelope = json.loads((r.spool / "queue" / f"{queueID}.json").read_text())
    assert envelope["client"]["notes"]["dnsbl"] == {
        "score": 1, "listed": [{"zone": "bl.test", "answers": ["127.0.0.2"]}]}


def greylistingConfig(redis: RedisServer, tmp_path: Path, delay: int = 2) -> str:
    """A relay's configuration greylisting (C{delay} seconds) with the store C{redis}."""
    (tmp_path / "redis.pw").write_text("grey\n")
    return ('[relay]\nnetworks = []\naccept_domains = ["example.org"]\n'
            '[dns]\nreverse_lookups = false\n'
            '[[plugins]]\nplugin = "greylist"\nstore = "redis"\n'
            f'delay = {delay}\n'
            f'redis = "tcp:127.0.0.1:{redis.port}"\n'
            f'redis_password_file = "{tmp_path / "redis.pw"}"\n')


def send(port: int) -> tuple[int, bytes]:
    """A message from alice@sender.test to bob@example.org: the reply to its end of data,
    or to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("alice@sender.test")[0] == 250
        assert s.rcpt("bob@example.org")[0] == 250
        code, text = s.docmd("DATA")
        if code != 354:
            return code, text
        s.send(MESSAGE.encode() + b".\r\n")
        return s.getreply()


def test_two_relays_share_greylisting_through_redis(relays, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", password="grey")
    try:
        config = greylistingConfig(redis, tmp_path)
        relayA = relays(config, "a", hold=True).start()
        relayB = relays(config, "b", hold=True).start()
        first = time.monotonic()
        assert send(relayA.port) == (451, b"4.7.1 Greylisted, try again later")
        # B has never seen the triplet: it passes there only because A recorded it in Redis.
        time.sleep(max(0.0, first + 2.2 - time.monotonic()))
        code, text = send(relayB.port)
        assert code == 250, text
        assert send(relayA.port)[0] == 250
        assert len(relayA.queued()) == len(relayB.queued()) == 1
        relayA.waitForLog(r"NOQUEUE: reject: DATA from unknown\[127\.0\.0\.1\]: 451 4\.7\.1 "
                          r"Greylisted, try again later")
    finally:
        redis.stop()


def test_greylisting_through_redis_runs_on_the_servers_clock(relays, tmp_path: Path) -> None:
    """Two relays sharing one Redis, B's wall clock three hours ahead (libfaketime): a
    triplet A has just greylisted is greylisted at B too, and passes at either once the
    delay has passed on the Redis server's clock.  B timed the delay on its own clock, and
    passed it at once (three hours "after" A's first sighting)."""
    redis = RedisServer(tmp_path / "redis", password="grey")
    try:
        config = greylistingConfig(redis, tmp_path, delay=5)
        ahead = FakeClock(tmp_path)
        ahead.step(3 * 3600)
        relayA = relays(config, "a", hold=True).start()
        relayB = relays(config, "b", hold=True, env=ahead.env).start()
        first = time.monotonic()
        replies = [send(relayA.port)[0], send(relayB.port)[0]]
        assert time.monotonic() - first < 5, "too slow to tell: the delay passed"
        assert replies == [451, 451]
        time.sleep(max(0.0, first + 5.2 - time.monotonic()))
        assert send(relayB.port)[0] == 250
        assert send(relayA.port)[0] == 250
    finally:
        redis.stop()
