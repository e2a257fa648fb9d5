"""The built-in plugin C{greylist}: greylisting at the DATA command (as postgrey does).

Each recipient of a transaction makes a triplet: the client's network (its /24 for IPv4,
/64 for IPv6, by default), the sender (lower case; as postgrey, without a C{+extension},
numbers in the local part replaced by C{#}, a BATV C{prvs=} tag removed; C{<>} for the null
sender) and the recipient.  A triplet first seen is recorded and the transaction deferred
(C{451 4.7.1 Greylisted, try again later}); once C{delay} seconds have passed, a retry within
C{retry_window} passes the triplet, which then passes at once for C{lifetime} seconds after its
last use.  A transaction passes when each of its triplets has; after C{auto_whitelist} passing
transactions a client's network passes at once (for C{lifetime} after its last one).

The records live in a store (L{IGreylistStore}): in memory (L{MemoryStore}, kept across
reloads, per relay process), or in Redis (L{RedisStore}, C{txredisapi}) so that several
relays share them; every record has a time to live, nothing needs cleaning.  A store that
fails or does not answer within C{store_timeout} defers the transaction (C{451 4.3.0}; with
C{store_failure = "continue"} it passes instead, logged).  See C{docs/plugin-greylist.md}.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailrelay.builtin.clients import EXEMPT_NETWORKS, EXEMPT_RELAY_CLIENTS, clientIP, isExempt
from mailrelay.config.schema import At, Key, Reading, pluginOptions
from mailrelay.config.values import (
    choice,
    fileName,
    integer,
    nonEmpty,
    readSecret,
    seconds,
    string,
)
from mailrelay.errors import describeFailure, describeValue
from mailrelay.interfaces import CONTINUE, IDataPolicy, Verdict

__all__ = [
    "GREYLISTED",
    "Greylist",
    "IGreylistStore",
    "MemoryStore",
    "RedisStore",
    "build",
    "normaliseSender",
]

log = Logger()

#: The answer to a transaction with a triplet not passed yet (postgrey's code and status).
GREYLISTED = Verdict.defer("Greylisted, try again later", 451, "4.7.1")
#: The answer when the store fails (C{store_failure = "defer"}).
STORE_FAILED = Verdict.defer("Error: greylisting is unavailable, try again later", 451, "4.3.0")

#: How often the memory store forgets expired records (seconds).
SWEEP_INTERVAL = 600.0


class IGreylistStore(Interface):
    """Where the greylisting records live: text values under text keys, each with a time to
    live.  Every method returns a Deferred; one that fails (or is slow: the plugin bounds
    each call by C{store_timeout}) is a store failure.  Several relays may share a store: the
    operations need not be atomic together (two relays recording one triplet at once record
    it twice, which is harmless)."""

    description = Attribute("What and where the store is, for the log (C{'redis tcp:...'}).")

    def read(keys: Any) -> Any:
        """A Deferred firing with C{(now, values)}: the store's clock now (seconds), which
        every relay sharing the store reads alike, and the value under each of C{keys} (a
        non-empty sequence), or C{None} (none, or expired), in one operation."""

    def put(key: str, value: str, ttl: float) -> Any:
        """Set C{key} to C{value}, forgotten C{ttl} seconds from now."""

    def increment(key: str, ttl: float) -> Any:
        """Add one to the count under C{key} (0 when absent) and make it live C{ttl}
        seconds from now; a Deferred firing with the new count."""


@implementer(IGreylistStore)
class MemoryStore:
    """The records in this process's memory: lost at a restart, shared by the plugin's
    builds across reloads.  Expired records are forgotten every L{SWEEP_INTERVAL}.  A
    record's time to live runs on C{monotonic}, not on the wall clock, which a step (NTP,
    C{date -s}) moves: a step back of a day kept every record a day longer."""

    description = "memory"

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        """
        @param monotonic: the clock the records' times to live run on
            (L{mailrelay.interfaces.PluginContext.monotonic}).
        """
        self.monotonic = monotonic
        self.records: dict[str, tuple[str, float]] = {}
        self._nextSweep = float("-inf")

    def _now(self) -> float:
        now = self.monotonic()
        if now >= self._nextSweep:
            self.records = {k: v for k, v in self.records.items() if v[1] > now}
            self._nextSweep = now + SWEEP_INTERVAL
        return now

    def _value(self, key: str) -> str | None:
        now = self._now()
        found = self.records.get(key)
        return found[0] if found is not None and found[1] > now else None

    def read(self, keys: Any) -> Deferred[tuple[float, list[str | None]]]:
        return succeed((self._now(), [self._value(key) for key in keys]))

    def put(self, key: str, value: str, ttl: float) -> Deferred[None]:
        self.records[key] = (value, self._now() + ttl)
        return succeed(None)

    def increment(self, key: str, ttl: float) -> Deferred[int]:
        count = int(self._value(key) or 0) + 1
        self.records[key] = (str(count), self._now() + ttl)
        return succeed(count)


#: INCR and PEXPIRE in one step, so that no count outlives its time to live.
_INCREMENT = (
    "local n = redis.call('INCR', KEYS[1]) redis.call('PEXPIRE', KEYS[1], ARGV[1]) return n"
)
#: The server's clock (TIME: seconds, microseconds) and the values of the keys, in one step.
_READ = "local t = redis.call('TIME') return {t[1], t[2], redis.call('MGET', unpack(KEYS))}"


@implementer(IGreylistStore)
class RedisStore:
    """The records in a Redis server, through C{txredisapi} (one connection, reconnecting
    as needed), so that several relays share them.

    @ivar address: C{("tcp", host, port)} or C{("unix", path)}.
    """

    def __init__(self, address: tuple[Any, ...], db: int = 0, password: str | None = None,
                 timeout: float = 5.0) -> None:
        self.address = address
        self.db = db
        self.password = password
        self.timeout = timeout
        self.connection: Any = None
        where = f"[{address[1]}]:{address[2]}" if address[0] == "tcp" and ":" in address[1] \
            else ":".join(str(a) for a in address[1:])
        self.description = f"redis {address[0]}:{where} db {db}"

    def start(self) -> None:
        """Connect (in the background: commands wait for the connection, which is made
        again whenever it breaks)."""
        if self.connection is not None:
            return
        import txredisapi  # type: ignore[import-untyped]  # no type hints of its own

        common = {"dbid": self.db, "reconnect": True, "password": self.password,
                  "connectTimeout": self.timeout, "replyTimeout": self.timeout,
                  "convertNumbers": False}
        if self.address[0] == "unix":
            self.connection = txredisapi.lazyUnixConnection(self.address[1], **common)
        else:
            self.connection = txredisapi.lazyConnection(self.address[1], self.address[2],
                                                        **common)
        # txredisapi fails this Deferred (and stops reconnecting) when AUTH or SELECT is
        # refused; nobody else waits for it.
        connected = getattr(getattr(self.connection, "_factory", None), "deferred", None)
        if connected is not None:
            connected.addErrback(self._refused)

    def _refused(self, failure: Any) -> None:
        log.error("greylist: {store} refused the connection: {error}",
                  store=self.description, error=failure.getErrorMessage())

    def _redis(self) -> Any:
        """The connection: made now when there is none, or made anew when txredisapi gave
        up on the last one (a refused AUTH or SELECT: the server may have been fixed)."""
        factory = getattr(self.connection, "_factory", None)
        if factory is not None and factory.stopped and not factory.size:
            self.connection = None
            factory.disconnect()
        self.start()
        return self.connection

    def stop(self) -> Any:
        """Disconnect; a Deferred firing once disconnected."""
        connection, self.connection = self.connection, None
        if connection is None:
            return succeed(None)
        return connection.disconnect()

    def read(self, keys: Any) -> Deferred[tuple[float, list[str | None]]]:
        d = self._redis().eval(_READ, list(keys))
        return d.addCallback(lambda r: (int(r[0]) + int(r[1]) / 1e6, list(r[2])))

    def put(self, key: str, value: str, ttl: float) -> Deferred[Any]:
        return self._redis().set(key, value, pexpire=max(1, int(ttl * 1000)))

    def increment(self, key: str, ttl: float) -> Deferred[int]:
        d = self._redis().eval(_INCREMENT, [key], [max(1, int(ttl * 1000))])
        return d.addCallback(int)


def normaliseSender(sender: str) -> str:
    """The sender as a triplet holds it: lower case, C{<>} for the null sender; its local
    part without a BATV C{prvs=...=} tag, without a C{+extension}, digit runs as C{#}
    (as postgrey does, so that VERP and BATV senders do not make a new triplet each)."""
    if not sender:
        return "<>"
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        local, domain = domain, ""
    local = re.sub(r"^prvs=[^=]+=", "", local)
    local = local.split("+", 1)[0] if not local.startswith("+") else local
    local = re.sub(r"\b\d+\b", "#", local)
    return f"{local}{at}{domain}"


def redisAddress(value: Any, at: At) -> tuple[Any, ...]:
    """The C{redis} option: C{"tcp:HOST:PORT"} (C{"tcp:[::1]:6379"}; the port defaults to
    6379) or C{"unix:/path/to/redis.sock"}."""
    text = string(value, at)
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return ("unix", rest)
    m = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]+))(?::(\d{1,5}))?", rest)
    if kind == "tcp" and m and (m.group(3) is None or 0 < int(m.group(3)) < 65536):
        return ("tcp", m.group(1) or m.group(2), int(m.group(3) or 6379))
    raise at.error(
        f'must be "tcp:HOST:PORT" or "unix:/path/to/redis.sock", not {describeValue(text)}'
    )


def passwordFile(value: Any, at: At) -> str | None:
    """The C{redis_password_file} option: a file whose first line is the password
    (C{""}: none), read now."""
    return readSecret(fileName(value, at), at) if string(value, at) else None


_REDIS_KEYS = ("redis", "redis_db", "redis_password_file", "key_prefix")


def _checkOptions(reading: Reading) -> None:
    if reading.fields["store"] != "redis":
        for name in _REDIS_KEYS:
            if reading.given(name):
                raise reading.error(name, 'is only for store = "redis"')


SCHEMA = pluginOptions(
    Key("delay", seconds, "Seconds before a new triplet may pass.", default=300),
    Key("retry_window", seconds, "Seconds after the delay in which a retry passes.",
        default=4 * 3600),
    Key("lifetime", seconds, "Seconds a passed triplet (or client) lives after its last use.",
        default=35 * 86400),
    Key("auto_whitelist", integer(0, 1_000_000), "Passing transactions that whitelist a "
        "client's network (0: never).", default=5),
    Key("ipv4_prefix", integer(8, 32, span=True), "The IPv4 client network's prefix length.",
        default=24),
    Key("ipv6_prefix", integer(16, 128, span=True), "The IPv6 client network's prefix length.",
        default=64),
    EXEMPT_RELAY_CLIENTS,
    EXEMPT_NETWORKS,
    Key("store", choice("memory", "redis"), "Where the records live.", default="memory"),
    Key("store_timeout", seconds, "Seconds one store operation may take.", default=5),
    Key("store_failure", choice("defer", "continue"), "What a store failure does.",
        default="defer"),
    Key("redis", redisAddress, "The Redis server.", default="tcp:127.0.0.1:6379"),
    Key("redis_db", integer(0, 1_000_000), "The Redis database number.", default=0),
    Key("redis_password_file", passwordFile, "A file holding the Redis password.", default=""),
    Key("key_prefix", nonEmpty("a key prefix"), "What the Redis keys start with.",
        default="mailrelay:greylist:"),
    check=_checkOptions,
)


@implementer(IDataPolicy)
class Greylist(Service):
    """The C{greylist} plugin (see the module docstring); a service that connects its store
    when the relay starts and disconnects it when the relay stops (or reloads).

    Notes C{envelope.notes["greylist"]}: C{{"result": "passed", "delayed": 305}} for a
    transaction whose triplets passed now, after that many seconds (the longest); C{"known"}
    (every triplet had passed before), C{"whitelisted"} (the client's network), C{"exempt"}.
    """

    def __init__(self, options: Any, store: Any, clock: Any) -> None:
        """
        @param store: the L{IGreylistStore}, whose clock a triplet's first sighting and
            delay are timed on (the memory store's monotonic clock; the Redis server's,
            which the relays sharing it have in common, whatever their own clocks say).
        @param clock: the reactor (its calls time the store's operations out).
        """
        self.options = options
        self.store = store
        self.clock = clock
        self.prefix: str = options.keyPrefix if options.store == "redis" else ""

    def startService(self) -> None:
        super().startService()
        start = getattr(self.store, "start", None)
        if start is not None:
            start()

    def stopService(self) -> Any:
        super().stopService()
        stop = getattr(self.store, "stop", None)
        return stop() if stop is not None else None

    def network(self, ip: Any) -> str:
        """The client network of C{ip} (C{"192.0.2.0/24"})."""
        bits = self.options.ipv4Prefix if ip.version == 4 else self.options.ipv6Prefix
        return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = getattr(self.store, method)(*args)
        return d.addTimeout(self.options.storeTimeout, self.clock)

    def _read(self, keys: list[str]) -> Deferred[Any]:
        """The store's C{read}; for a site's store written before it (C{get} of one key,
        no clock of its own), its C{get}s and the relay's wall clock, as then."""
        if hasattr(self.store, "read") or not hasattr(self.store, "get"):
            return self._call("read", keys)
        now = self.clock.seconds()
        values = gatherResults([self._call("get", key) for key in keys], consumeErrors=True)
        return values.addCallback(lambda found: (now, found))

    def checkData(self, client: Any, envelope: Any) -> Any:
        ip = clientIP(client.address)
        if ip is None or isExempt(client, ip, self.options.exemptRelayClients,
                                  self.options.exemptNetworks):
            envelope.notes["greylist"] = {"result": "exempt"}
            return CONTINUE
        d = self._check(envelope, self.network(ip))
        d.addErrback(self._failed, client, envelope)
        return d

    @inlineCallbacks
    def _check(self, envelope: Any, network: str) -> Any:
        o = self.options
        clientKey = f"{self.prefix}client:{network}"
        sender = normaliseSender(envelope.sender)
        keys = sorted({
            f"{self.prefix}triplet:{network}/{sender}/{r.address.lower()}"
            for r in envelope.recipients
        })
        # (One read, the client's count with the triplets, and the store's clock with them.)
        now, records = yield self._read([clientKey, *keys])
        count, records = records[0], records[1:]
        if o.autoWhitelist and count is not None and int(count) >= o.autoWhitelist:
            yield self._call("increment", clientKey, o.lifetime)
            envelope.notes["greylist"] = {"result": "whitelisted"}
            return CONTINUE
        updates, waiting, delayed = [], False, 0.0
        for key, record in zip(keys, records, strict=True):
            first, passed = self._record(record)
            # (A first sighting after now was made before a step back of the Redis
            # server's clock: it starts again, or it would wait until the clock reached it
            # again.)
            if first is None or (
                not passed and not 0 <= now - first <= o.delay + o.retryWindow
            ):
                updates.append((key, {"first": now, "passed": False}, o.delay + o.retryWindow))
                waiting = True
            elif not passed and now - first < o.delay:
                waiting = True
            else:
                if not passed:
                    delayed = max(delayed, now - first)
                updates.append((key, {"first": first, "passed": True}, o.lifetime))
        yield gatherResults([
            self._call("put", key, json.dumps(value), ttl) for key, value, ttl in updates
        ])
        if waiting:
            log.info(
                "greylist: {sender} from {network}: greylisted ({count} recipients)",
                sender=envelope.sender or "<>", network=network, count=len(keys),
            )
            return GREYLISTED
        if o.autoWhitelist:
            yield self._call("increment", clientKey, o.lifetime)
        if delayed:
            envelope.notes["greylist"] = {"result": "passed", "delayed": round(delayed)}
        else:
            envelope.notes["greylist"] = {"result": "known"}
        return CONTINUE

    @staticmethod
    def _record(text: Any) -> tuple[float | None, bool]:
        """C{(first seen, passed)} of a stored triplet; C{(None, False)} for none, or for a
        value that is no record of ours (counted as new)."""
        if text is None:
            return None, False
        try:
            record = json.loads(text)
            return float(record["first"]), bool(record["passed"])
        except (ValueError, TypeError, KeyError):
            return None, False

    def _failed(self, failure: Any, client: Any, envelope: Any) -> Verdict:
        passing = self.options.storeFailure == "continue"
        log.error(
            "greylist: the store ({store}) failed, {what}: {error}",
            store=self.store.description,
            error=describeFailure(failure, self.options.storeTimeout),
            what="passing the transaction" if passing else "deferring the transaction",
            client=client.address,
        )
        if passing:
            envelope.notes["greylist"] = {"result": "store failed"}
            return CONTINUE
        return STORE_FAILED


def build(options: dict[str, Any], context: Any) -> Greylist:
    """The C{greylist} plugin from its options (see C{docs/plugin-greylist.md})."""
    read = context.readOptions(SCHEMA, options)
    if read.store == "redis":
        context.checkTimeout("store_timeout", read.storeTimeout)
        store = RedisStore(read.redis, read.redisDb, read.redisPasswordFile, read.storeTimeout)
        return Greylist(read, store, context.reactor)
    memory = context.keep("greylist:memory", lambda: MemoryStore(context.monotonic))
    if getattr(context, "processes", 1) > 1:
        context.warn(
            "store",
            '= "memory" keeps the greylisting records in each process, and [relay] '
            f"processes = {context.processes}: a client whose retry reaches another "
            'process is greylisted again; set store = "redis" to share them between '
            "the processes",
        )
    # (The delay is timed on the clock the records live on, which no step moves.)
    return Greylist(read, memory, context.reactor)
