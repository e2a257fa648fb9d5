"""The built-in plugin greylist on the memory store, with a Clock (no sockets); its Redis
store against a real redis-server in tests/test_builtin_greylist_redis.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from mailrelay.builtin.greylist import (
    GREYLISTED,
    STORE_FAILED,
    IGreylistStore,
    MemoryStore,
    normaliseSender,
)
from mailrelay.errors import ConfigError
from mailrelay.interfaces import CONTINUE
from mailrelay.testing import ServerHarness, buildPlugin, makeClient, makeEnvelope
from tests.harness import fired

CLIENT = "192.0.2.7"




class Relay:
    """A greylist plugin on a Clock, and transactions to give it."""

    def __init__(self, tmp_path: Path, kept: dict | None = None, clock: Clock | None = None,
                 monotonic: Clock | None = None, **options: Any) -> None:
        if clock is None:
            clock = Clock()
            clock.advance(1_800_000_000)
        self.clock = clock
        self.plugin = buildPlugin("greylist", options, tmp_path, reactor=self.clock,
                                  kept=kept if kept is not None else {},
                                  monotonic=monotonic.seconds if monotonic else None)

    def data(self, sender: str = "alice@example.com", recipients: Any = ("bob@example.org",),
             address: str = CLIENT, **client: Any) -> tuple[Any, dict]:
        envelope = makeEnvelope(sender, recipients, client=makeClient(address, **client))
        verdict = fired(self.plugin.checkData(envelope.client, envelope))
        return verdict, envelope.notes.get("greylist", {})


def test_a_new_triplet_waits_the_delay_then_passes(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=300)
    assert r.data() == (GREYLISTED, {})
    assert str(GREYLISTED.reply) == "451 4.7.1 Greylisted, try again later"
    r.clock.advance(299)
    assert r.data()[0] == GREYLISTED  # too early: the first sighting stands
    r.clock.advance(6)
    assert r.data() == (CONTINUE, {"result": "passed", "delayed": 305})
    assert r.data() == (CONTINUE, {"result": "known"})


def test_a_first_sighting_after_the_clock_stepped_back_counts_from_now(tmp_path: Path) -> None:
    """A triplet first seen before a step back of the clock it is timed on (a Redis
    server's; here the Clock the memory store runs on) is seen again "before" its first
    sighting: the delay counts from then (it waited until the clock reached the first
    sighting again, an hour for an hour)."""
    r = Relay(tmp_path, delay=300)
    assert r.data()[0] == GREYLISTED
    r.clock.rightNow -= 3600
    r.clock.advance(10)
    assert r.data()[0] == GREYLISTED  # not passed by a step
    r.clock.advance(300)
    assert r.data() == (CONTINUE, {"result": "passed", "delayed": 300})


def test_a_retry_after_the_window_starts_again(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=60, retry_window=3600)
    assert r.data()[0] == GREYLISTED
    r.clock.advance(60 + 3600 + 1)
    assert r.data()[0] == GREYLISTED
    r.clock.advance(60)
    assert r.data()[0] == CONTINUE


def test_a_passed_triplet_lives_its_lifetime_after_its_last_use(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=60, lifetime=86400, auto_whitelist=0)
    r.data()
    r.clock.advance(60)
    assert r.data()[0] == CONTINUE
    r.clock.advance(86000)
    assert r.data()[1] == {"result": "known"}  # used: another lifetime from now
    r.clock.advance(86000)
    assert r.data()[1] == {"result": "known"}
    r.clock.advance(86401)
    assert r.data()[0] == GREYLISTED


def test_the_client_network_not_the_address_makes_the_triplet(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=60)
    r.data(address="192.0.2.7")
    r.data(address="2001:db8:1:2::7")
    r.clock.advance(60)
    assert r.data(address="192.0.2.200")[0] == CONTINUE  # the same /24
    assert r.data(address="192.0.3.7")[0] == GREYLISTED
    assert r.data(address="2001:db8:1:2:ffff::1")[0] == CONTINUE  # the same /64
    assert r.data(address="::ffff:192.0.2.9")[0] == CONTINUE  # IPv4-mapped: the IPv4 /24
    narrow = Relay(tmp_path, delay=60, ipv4_prefix=32)
    narrow.data(address="192.0.2.7")
    narrow.clock.advance(60)
    assert narrow.data(address="192.0.2.8")[0] == GREYLISTED


def test_every_recipient_must_have_passed(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=60)
    r.data(recipients=["bob@example.org"])
    r.clock.advance(60)
    assert r.data(recipients=["bob@example.org", "carol@example.org"])[0] == GREYLISTED
    r.clock.advance(30)
    assert r.data(recipients=["Bob@Example.org", "carol@example.org"])[0] == GREYLISTED
    r.clock.advance(30)
    verdict, notes = r.data(recipients=["bob@example.org", "carol@example.org"])
    assert (verdict, notes) == (CONTINUE, {"result": "passed", "delayed": 60})


def test_senders_are_normalised_as_postgrey_does() -> None:
    assert normaliseSender("") == "<>"
    assert normaliseSender("List-Bounces+bob=example.org@Lists.Example.com") == (
        "list-bounces@lists.example.com")
    assert normaliseSender("bounce-1234-5678@example.com") == "bounce-#-#@example.com"
    assert normaliseSender("prvs=1234abcd=alice@example.com") == "alice@example.com"
    assert normaliseSender("alice2@example.com") == "alice2@example.com"


def test_verp_senders_share_a_triplet(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=60)
    r.data(sender="bounce-1001@lists.example.com")
    r.clock.advance(60)
    assert r.data(sender="bounce-1002@lists.example.com")[0] == CONTINUE
    assert r.data(sender="")[0] == GREYLISTED


def test_a_client_is_whitelisted_after_n_passing_transactions(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=60, auto_whitelist=2, lifetime=86400)
    r.data()
    r.clock.advance(60)
    assert r.data()[0] == CONTINUE  # pass 1
    assert r.data(sender="new@example.net")[0] == GREYLISTED
    assert r.data()[0] == CONTINUE  # pass 2
    assert r.data(sender="new@example.net", address="192.0.2.99") == (
        CONTINUE, {"result": "whitelisted"})
    r.clock.advance(86401)  # unused for a lifetime: forgotten, as its triplets
    assert r.data(sender="new@example.net")[0] == GREYLISTED


def test_relay_clients_and_exempt_networks_pass(tmp_path: Path) -> None:
    r = Relay(tmp_path, exempt_networks=["198.51.100.0/24"])
    assert r.data(relayAllowed=True) == (CONTINUE, {"result": "exempt"})
    assert r.data(authUser="alice") == (CONTINUE, {"result": "exempt"})
    assert r.data(address="198.51.100.5") == (CONTINUE, {"result": "exempt"})
    strict = Relay(tmp_path, exempt_relay_clients=False)
    assert strict.data(relayAllowed=True)[0] == GREYLISTED


class BrokenStore(MemoryStore):
    """A store that fails (or never answers)."""

    description = "broken"

    def __init__(self, clock: Any, hang: bool = False) -> None:
        super().__init__(clock.seconds)
        self.hang = hang

    def read(self, keys: Any) -> Deferred[Any]:
        return Deferred() if self.hang else fail(ConnectionRefusedError("redis is down"))


@pytest.mark.parametrize("hang", [False, True])
def test_a_failing_store_defers_by_default(tmp_path: Path, hang: bool) -> None:
    r = Relay(tmp_path, store_timeout=2)
    r.plugin.store = BrokenStore(r.clock, hang)
    envelope = makeEnvelope(client=makeClient(CLIENT))
    with capturedLogs() as events:
        d = r.plugin.checkData(envelope.client, envelope)
        r.clock.advance(2)
        assert fired(d) == STORE_FAILED
    assert str(STORE_FAILED.reply) == (
        "451 4.3.0 Error: greylisting is unavailable, try again later")
    assert any("greylist: the store (broken) failed, deferring the transaction: "
               + ("timed out after 2 s" if hang else "redis is down") in
               formatEvent(e) for e in events)  # (a time-out read "(2.0, 'Deferred')")


class StoreOfBefore:
    """A site's store written to the interface before C{read}: C{get} of one key, no clock."""

    description = "site store"

    def __init__(self, clock: Any) -> None:
        self.memory = MemoryStore(clock.seconds)

    def get(self, key: str) -> Deferred[Any]:
        return self.memory.read([key]).addCallback(lambda result: result[1][0])

    def put(self, key: str, value: str, ttl: float) -> Any:
        return self.memory.put(key, value, ttl)

    def increment(self, key: str, ttl: float) -> Any:
        return self.memory.increment(key, ttl)


def test_a_store_with_get_and_no_read_still_works_on_the_relays_clock(tmp_path: Path) -> None:
    r = Relay(tmp_path, delay=300)
    r.plugin.store = StoreOfBefore(r.clock)
    assert r.data() == (GREYLISTED, {})
    r.clock.advance(299)
    assert r.data()[0] == GREYLISTED
    r.clock.advance(6)
    assert r.data() == (CONTINUE, {"result": "passed", "delayed": 305})


def test_a_failing_store_may_pass_instead(tmp_path: Path) -> None:
    r = Relay(tmp_path, store_failure="continue")
    r.plugin.store = BrokenStore(r.clock)
    assert r.data() == (CONTINUE, {"result": "store failed"})


def test_the_memory_store_outlives_a_reload_and_forgets_expired_records(tmp_path) -> None:
    kept: dict = {}
    first = Relay(tmp_path, kept=kept, delay=60)
    first.data()
    second = Relay(tmp_path, kept=kept, clock=first.clock, delay=60)
    assert second.plugin.store is first.plugin.store
    verifyObject(IGreylistStore, second.plugin.store)
    second.clock.advance(60)
    assert second.data()[0] == CONTINUE
    store = second.plugin.store
    assert len(store.records) == 2  # the triplet, the client's count
    second.clock.advance(35 * 86400 + 600)
    fired(store.read(["anything"]))
    assert store.records == {}


def test_the_memory_store_keeps_a_record_its_time_to_live_through_a_step_back(
    tmp_path: Path,
) -> None:
    """The memory store times its records on the plugin context's monotonic clock: after a
    step back of the wall clock (NTP, date -s) a record is forgotten its time to live after
    it was written, not that plus the step (a passed triplet, or a client's count, was kept
    a day longer for a day's step)."""
    monotonic = Clock()
    clock = Clock()
    clock.advance(1_800_000_000)
    plugin = buildPlugin("greylist", {"delay": 60}, tmp_path, reactor=clock, kept={},
                         monotonic=monotonic.seconds)
    store = plugin.store
    fired(store.put("key", "value", 600))
    clock.rightNow -= 86400  # stepped back a day
    clock.advance(601)
    monotonic.advance(601)
    assert fired(store.read(["key"])) == (monotonic.seconds(), [None])


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_the_memory_stores_delay_runs_on_the_monotonic_clock(tmp_path: Path,
                                                            step: float) -> None:
    """On the memory store a triplet's delay is timed on the context's monotonic clock, as
    its records' lives are: a step of the wall clock (NTP, date -s) neither lets a sender
    pass before its delay (a step forward of an hour passed it at once) nor makes it wait
    longer (a step back of an hour greylisted its retry again)."""
    monotonic = Clock()
    r = Relay(tmp_path, monotonic=monotonic, delay=300)
    assert r.data()[0] == GREYLISTED
    r.clock.rightNow += step
    r.clock.advance(10)
    monotonic.advance(10)
    assert r.data()[0] == GREYLISTED  # ten seconds of the delay's 300 passed
    r.clock.advance(295)
    monotonic.advance(295)
    assert r.data() == (CONTINUE, {"result": "passed", "delayed": 305})


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"redis": "tcp:127.0.0.1:6379"}, "redis", 'is only for store = "redis"'),
        ({"store": "redis", "redis": "127.0.0.1:6379"}, "redis", '"tcp:HOST:PORT" or'),
        ({"store": "redis", "redis": "tcp:host:70000"}, "redis", '"tcp:HOST:PORT" or'),
        ({"store": "redis", "redis_password_file": "missing"}, "redis_password_file",
         "cannot read the password file"),
        ({"store": "sql"}, "store", 'must be "memory" or "redis"'),
        ({"delay": 0}, "delay", "positive number of seconds"),
        ({"dleay": 5}, "dleay", 'did you mean "delay"'),
    ],
)
def test_bad_options_name_the_key(tmp_path: Path, options: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        buildPlugin("greylist", options, tmp_path)
    assert e.value.key == key and message in str(e.value), str(e.value)


def test_redis_options_are_read(tmp_path: Path) -> None:
    (tmp_path / "redis.pw").write_text("s3cret\n")
    plugin = buildPlugin("greylist", {"store": "redis", "redis": "tcp:[::1]:6380", "redis_db": 2,
                                      "redis_password_file": "redis.pw"}, tmp_path)
    store = plugin.store
    assert (store.address, store.db, store.password) == (("tcp", "::1", 6380), 2, "s3cret")
    assert store.description == "redis tcp:[::1]:6380 db 2"
    verifyObject(IGreylistStore, store)
    unix = buildPlugin("greylist", {"store": "redis", "redis": "unix:/run/redis.sock"}, tmp_path)
    assert unix.store.address == ("unix", "/run/redis.sock")


def test_in_a_session_data_is_greylisted(tmp_path: Path) -> None:
    plugin = Relay(tmp_path).plugin
    h = ServerHarness(plugins=[plugin], peer=CLIENT, relay={"networks": [],
                                                            "acceptDomains": ["example.org"]})
    h.send(b"EHLO client.test\r\n")
    assert h.send(b"MAIL FROM:<alice@example.com>\r\n")[0].startswith(b"250")
    assert h.send(b"RCPT TO:<bob@example.org>\r\n")[0].startswith(b"250")
    assert h.send(b"DATA\r\n") == [b"451 4.7.1 Greylisted, try again later"]
    assert not h.spool.committed


@pytest.mark.parametrize(
    "relay, entry, warned",
    [
        ("processes = 2\n", "", True),
        ("processes = 3\n", 'store = "memory"\n', True),
        ("processes = 1\n", "", False),
        ("processes = 2\n", 'store = "redis"\n', False),
    ],
)
def test_the_memory_store_with_several_processes_is_warned_of(
    tmp_path: Path, relay: str, entry: str, warned: bool
) -> None:
    """With [relay] processes > 1 each acceptor process had its own memory store, so a
    client whose retry reached another process was greylisted again, without a word.
    The load (start, reload, `mailrelay check`) now warns, naming the file, the entry's
    key and the shared store to use; mail still flows (greylisting only takes longer)."""
    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.config import loadConfig
    from mailrelay.config.plugins import buildHooks

    path = tmp_path / "relay.toml"
    path.write_text(f'[relay]\n{relay}[[plugins]]\nplugin = "greylist"\n{entry}')
    config = loadConfig(str(path), {"spool": str(tmp_path / "spool")})
    with capturedLogs() as events:
        buildHooks(config, pluginBuilder(config, Clock(), availablePlugins()), "relay")
    lines = [formatEvent(e) for e in events if "greylist" in formatEvent(e)]
    count = int(relay.split("=")[1])
    assert lines == ([
        f'{path}: plugins[0].store = "memory" keeps the greylisting records in each process, '
        f"and [relay] processes = {count}: a client whose retry reaches another process is "
        'greylisted again; set store = "redis" to share them between the processes'
    ] if warned else [])
