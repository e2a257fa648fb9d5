"""The greylist plugin's Redis store against a real redis-server (started here, on a free
127.0.0.1 port with a password; skipped with the reason when redis-server is not installed,
a failure under CI), with the real reactor: two plugin objects sharing the server, as two
relays would."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from mailrelay.builtin.greylist import GREYLISTED, STORE_FAILED, RedisStore
from mailrelay.interfaces import CONTINUE
from mailrelay.testing import buildPlugin, makeClient, makeEnvelope
from tests.harness import RedisServer, freePort

PASSWORD = "grey s3cret"


class SkewedReactor:
    """The reactor, but for its wall clock, C{skew} seconds off: a relay's clock that is
    wrong (or steps)."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def seconds(self) -> float:
        return reactor.seconds() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


@pytest.fixture(scope="class")
def redisServer(request: Any, tmp_path_factory: Any) -> Any:
    server = RedisServer(tmp_path_factory.mktemp("redis"), password=PASSWORD)
    directory = tmp_path_factory.mktemp("config")
    (directory / "redis.pw").write_text(PASSWORD + "\n")
    request.cls.server = server
    request.cls.directory = directory
    yield server
    server.stop()


@pytest.mark.usefixtures("redisServer")
class RedisStoreTests(unittest.TestCase):
    server: RedisServer
    directory: Path

    def plugin(self, clock: Any = reactor, **options: Any) -> Any:
        options = {"store": "redis", "redis": f"tcp:127.0.0.1:{self.server.port}",
                   "redis_password_file": "redis.pw", "store_timeout": 2, **options}
        plugin = buildPlugin("greylist", options, self.directory, reactor=clock)
        plugin.startService()
        self.addCleanup(plugin.stopService)
        return plugin

    def store(self) -> RedisStore:
        store = RedisStore(("tcp", "127.0.0.1", self.server.port), 0, PASSWORD, 2)
        self.addCleanup(store.stop)
        return store

    @inlineCallbacks
    def test_values_and_counts_expire(self) -> Any:
        store = self.store()
        yield store.put("t1:a", "value", 0.3)
        now, values = yield store.read(["t1:none", "t1:a"])
        self.assertEqual(values, [None, "value"])
        seconds, micro = yield store._redis().execute_command("TIME")
        self.assertTrue(0 <= int(seconds) + int(micro) / 1e6 - now < 1, now)  # the server's
        self.assertEqual((yield store.increment("t1:n", 0.3)), 1)
        self.assertEqual((yield store.increment("t1:n", 0.3)), 2)
        ttl = yield store._redis().execute_command("PTTL", "t1:n")
        self.assertTrue(0 < ttl <= 300, ttl)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual((yield store.read(["t1:a", "t1:n"]))[1], [None, None])

    @inlineCallbacks
    def test_two_relays_share_the_triplets(self) -> Any:
        relayA = self.plugin(delay=0.5, key_prefix="t2:")
        relayB = self.plugin(delay=0.5, key_prefix="t2:")

        def data(plugin: Any) -> Any:
            envelope = makeEnvelope("alice@example.com", ["bob@example.org"],
                                    client=makeClient("192.0.2.7"))
            return plugin.checkData(envelope.client, envelope)

        self.assertEqual((yield data(relayA)), GREYLISTED)
        self.assertEqual((yield data(relayB)), GREYLISTED)  # too early at B too
        yield deferLater(reactor, 0.6, lambda: None)
        self.assertEqual((yield data(relayB)), CONTINUE)
        self.assertEqual((yield data(relayA)), CONTINUE)
        keys = sorted((yield relayA.store._redis().keys("t2:*")))
        self.assertEqual(keys, ["t2:client:192.0.2.0/24",
                                "t2:triplet:192.0.2.0/24/alice@example.com/bob@example.org"])
        ttl = yield relayA.store._redis().ttl(keys[1])
        self.assertTrue(35 * 86400 - 10 < ttl <= 35 * 86400, ttl)

    @inlineCallbacks
    def test_the_delay_runs_on_the_servers_clock_not_the_relays(self) -> Any:
        """Relays sharing one Redis time a triplet's delay on the server's clock: a relay
        whose wall clock is hours ahead let a triplet another had just greylisted pass at
        once, one hours behind started it again, and a step of a relay's clock did the
        same to its own triplets."""
        ahead, behind = SkewedReactor(3 * 3600), SkewedReactor(-3 * 3600)
        relays = [self.plugin(clock, delay=1, key_prefix="t4:")
                  for clock in (reactor, ahead, behind)]

        def data(plugin: Any, sender: str = "alice@example.com") -> Any:
            envelope = makeEnvelope(sender, ["bob@example.org"], client=makeClient("192.0.2.7"))
            d = plugin.checkData(envelope.client, envelope)
            return d.addCallback(lambda verdict: (verdict, envelope.notes.get("greylist")))

        for plugin in relays:
            self.assertEqual((yield data(plugin)), (GREYLISTED, None))
        yield data(relays[1], "carol@example.com")
        ahead.skew += 3600  # a step forward of its clock
        self.assertEqual((yield data(relays[1], "carol@example.com")), (GREYLISTED, None))
        yield deferLater(reactor, 1.1, lambda: None)
        for plugin in relays:
            verdict, note = yield data(plugin)
            self.assertEqual(verdict, CONTINUE)
            self.assertIn(note["result"], ("passed", "known"))
            self.assertLess(note.get("delayed", 0), 3)

    @inlineCallbacks
    def test_a_wrong_password_or_no_server_defers(self) -> Any:
        (self.directory / "wrong.pw").write_text("wrong\n")
        wrong = self.plugin(redis_password_file="wrong.pw", store_timeout=1)
        nobody = self.plugin(redis=f"tcp:127.0.0.1:{freePort()}", store_timeout=1)
        with capturedLogs() as events:
            for plugin in (wrong, nobody, wrong):  # wrong again: a new connection, refused
                envelope = makeEnvelope(client=makeClient("192.0.2.7"))
                self.assertEqual((yield plugin.checkData(envelope.client, envelope)),
                                 STORE_FAILED)
        refused = [formatEvent(e) for e in events if "refused the connection" in formatEvent(e)]
        self.assertEqual(len(refused), 2, refused)
        self.assertIn("WRONGPASS", refused[0])
        gc.collect()  # no Deferred of txredisapi's was left failing unhandled
        self.assertEqual(self.flushLoggedErrors(), [])
