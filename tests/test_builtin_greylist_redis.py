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

    def plugin(self, **options: Any) -> Any:
        options = {"store": "redis", "redis": f"tcp:127.0.0.1:{self.server.port}",
                   "redis_password_file": "redis.pw", "store_timeout": 2, **options}
        plugin = buildPlugin("greylist", options, self.directory, reactor=reactor)
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
        self.assertIsNone((yield store.get("t1:none")))
        yield store.put("t1:a", "value", 0.3)
        self.assertEqual((yield store.get("t1:a")), "value")
        self.assertEqual((yield store.increment("t1:n", 0.3)), 1)
        self.assertEqual((yield store.increment("t1:n", 0.3)), 2)
        ttl = yield store._redis().execute_command("PTTL", "t1:n")
        self.assertTrue(0 < ttl <= 300, ttl)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertIsNone((yield store.get("t1:a")))
        self.assertIsNone((yield store.get("t1:n")))

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
