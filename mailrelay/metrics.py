"""Every metric mailrelay keeps, declared once, in one registry (L{REGISTRY}), and how the
delivery process's metrics reach the relay's (L{snapshot}, L{ProcessMetrics}).

The stages count where things happen: a connection (L{CONNECTIONS}), a session's end
(L{SESSIONS}), a message's result (L{MESSAGES}, L{MESSAGE_BYTES}), a refusal
(L{REFUSALS}), a recipient's delivery result (L{DELIVERIES}), a delivery's duration, its
wait for a place and a message's delay (L{DELIVERY_SECONDS}, L{DELIVERY_WAIT_SECONDS},
L{DELIVERY_DELAY}), a notification queued (L{DSNS}), a plugin's answer (L{PLUGIN_SECONDS},
through L{timePlugin}, which every hook's chain runner uses), a spool batch made durable
(L{SPOOL_SYNC_BATCH}, L{SPOOL_SYNC_SECONDS}).  The queue's size by state is read when
collected, from the running queue managers (L{QUEUE_STATES}).
Each count costs a dictionary look-up (L{child}) and an addition under a lock: a fraction of
a microsecond (a histogram's, a microsecond); about 10 microseconds a message in all (measured: 9).

The delivery process counts in its own L{REGISTRY}.  When metrics are served, it writes a
L{snapshot} of it to the relay's process every second (only when something changed), over
the standard output that carries its log lines; the relay keeps the last one of each child
(L{ProcessMetrics}) and adds them to its own at each scrape: counters and histograms of the
children that have ended are kept (so they only grow across reloads and restarts), their
gauges are dropped.  (Prometheus's multiprocess mode was the other way: it needs an
environment variable before the first import, a directory of memory-mapped files per process
that someone must clean, and makes every count a write to such a file.)

Counts are kept only in a process whose metrics are served (C{[metrics] listen}, which
only a restart changes): it calls L{enable} at start-up, before anything counts, and only
then is C{prometheus_client} imported and are the metrics made, in L{REGISTRY}.  Until then
each metric here is a declaration whose counts go nowhere, at the cost of an attribute test:
a relay without metrics neither loads the Prometheus client (a megabyte in each process)
nor counts what nobody can read.

A value module: it imports nothing of mailrelay's, so that every stage may count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.logger import Logger

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

__all__ = [
    "CONNECTIONS",
    "DELIVERIES",
    "DELIVERY_DELAY",
    "DELIVERY_SECONDS",
    "DELIVERY_WAIT_SECONDS",
    "DSNS",
    "MESSAGES",
    "MESSAGE_BYTES",
    "PLUGIN_SECONDS",
    "QUEUE_STATES",
    "REFUSALS",
    "REGISTRY",
    "SESSIONS",
    "SPOOL_SYNC_BATCH",
    "SPOOL_SYNC_SECONDS",
    "ProcessMetrics",
    "child",
    "enable",
    "exposition",
    "replyClass",
    "snapshot",
    "noteBlocking",
    "timePlugin",
]

#: The registry of every metric of this process, once L{enable}d (C{None} before).
REGISTRY: CollectorRegistry | None = None


class _Nowhere:
    """What a metric's counts go to before L{enable}: nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NOWHERE = _Nowhere()


class _Declared:
    """A metric as declared here (a C{prometheus_client} C{Counter} or C{Histogram}), made
    by L{enable}: its counts (C{inc}, C{observe}, C{labels(...)}'s) go to the metric once it
    is made, nowhere before."""

    def __init__(
        self, kind: str, name: str, documentation: str, labelnames: Iterable[str] = (),
        **options: Any,
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.options = options
        #: The C{prometheus_client} metric, once made.
        self.real: Any = None
        _DECLARED.append(self)

    def make(self, registry: CollectorRegistry) -> None:
        """Make the metric, in C{registry}."""
        from prometheus_client import Counter, Histogram

        kind = {"counter": Counter, "histogram": Histogram}[self.kind]
        self.real = kind(
            self.name, self.documentation, self.labelnames, registry=registry, **self.options
        )

    def labels(self, *values: str) -> Any:
        return _NOWHERE if self.real is None else self.real.labels(*values)

    def inc(self, amount: float = 1) -> None:
        if self.real is not None:
            self.real.inc(amount)

    def observe(self, amount: float) -> None:
        if self.real is not None:
            self.real.observe(amount)


#: Every metric declared, in order.
_DECLARED: list[_Declared] = []


def _counter(name: str, documentation: str, labelnames: Iterable[str] = ()) -> _Declared:
    return _Declared("counter", name, documentation, labelnames)


def _histogram(
    name: str, documentation: str, labelnames: Iterable[str] = (), **options: Any
) -> _Declared:
    return _Declared("histogram", name, documentation, labelnames, **options)


def enable() -> None:
    """Keep the counts of this process from now on: import C{prometheus_client}, make every
    metric in L{REGISTRY}.  Called at start-up, before anything counts, by each process whose
    metrics are served (C{[metrics] listen}); once is enough (later calls do nothing)."""
    global REGISTRY
    if REGISTRY is not None:
        return
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    for metric in _DECLARED:
        metric.make(registry)
    registry.register(QUEUE_STATES)
    REGISTRY = registry


_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CONNECTIONS = _counter(
    "mailrelay_connections",
    "SMTP connections accepted, by listener.",
    ["listener"],
)
SESSIONS = _counter(
    "mailrelay_sessions",
    "SMTP sessions ended, by outcome: quit (the client said QUIT), disconnected (it went "
    "away without), timeout, shutdown (the relay was stopping), refused (closed by the relay "
    "with a 4xx or 5xx: a limit, too many errors, a protocol violation).",
    ["outcome"],
)
MESSAGES = _counter(
    "mailrelay_messages",
    "Messages at the end of their data, by the class of the reply (2xx: accepted and "
    "queued, 4xx, 5xx) and origin (smtp, or local: the relay's own notifications).",
    ["reply", "origin"],
)
MESSAGE_BYTES = _counter(
    "mailrelay_message_bytes",
    "Bytes of the messages accepted and queued, by origin.",
    ["origin"],
)
REFUSALS = _counter(
    "mailrelay_refusals",
    "Connections and commands (EHLO, HELO, MAIL, RCPT, DATA, BDAT) refused, by command"
    " (CONNECT for a connection) and reply class (4xx, 5xx).",
    ["command", "reply"],
)
DELIVERIES = _counter(
    "mailrelay_deliveries",
    "Recipients' delivery attempts, by backend and status (sent, deferred, bounced).",
    ["backend", "status"],
)
DELIVERY_SECONDS = _histogram(
    "mailrelay_delivery_seconds",
    "Time one delivery took (a backend's answer for one message's recipients along one "
    "route), from when it had its place of [queue] delivery_limit, by backend.",
    ["backend"],
    buckets=_SECONDS,
)
DELIVERY_WAIT_SECONDS = _histogram(
    "mailrelay_delivery_wait_seconds",
    "Time one delivery waited before it had its place of [queue] delivery_limit (and its "
    "next hop's, for the smtp, lmtp and pipe backends), by backend.",
    ["backend"],
    buckets=_SECONDS,
)
DELIVERY_DELAY = _histogram(
    "mailrelay_delivery_delay_seconds",
    "Time from a message's arrival to a recipient's delivery (Postfix's delay=), by backend.",
    ["backend"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400),
)
DSNS = _counter(
    "mailrelay_dsns",
    "Delivery status notifications queued, by action (failed, delayed, relayed, delivered).",
    ["action"],
)
PLUGIN_SECONDS = _histogram(
    "mailrelay_plugin_seconds",
    "Time plugins took to answer, by hook (recipient_validator, header_stamper, ...) and "
    "plugin.",
    ["hook", "plugin"],
    buckets=_SECONDS,
)
SPOOL_SYNC_BATCH = _histogram(
    "mailrelay_spool_sync_batch_size",
    "Spool operations made durable together by one sync (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
SPOOL_SYNC_SECONDS = _histogram(
    "mailrelay_spool_sync_seconds",
    "Time one spool batch took, its syncs included.",
    buckets=_SECONDS,
)


#: The labelled children made so far, by metric and label values (a few dozen at most).
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """C{metric.labels(*labels)}, made once: the count then costs a dictionary look-up
    instead of C{labels}' checks (a quarter of a microsecond instead of one and a half);
    before L{enable}, what counts nowhere."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        if metric.real is None:
            return _NOWHERE
        found = _children[key] = metric.labels(*labels)
    return found


#: Told of each count made with L{countNow}, C{(metric, labels)}: set by a delivery process
#: whose metrics the relay serves (L{tellCounts}), else C{None}.
_tell: Callable[[_Declared, dict[str, str]], None] | None = None


def tellCounts(tell: Callable[[_Declared, dict[str, str]], None] | None) -> None:
    """Have C{tell} told of each count made with L{countNow} (C{None}: nobody)."""
    global _tell
    _tell = tell


def countNow(metric: _Declared, *labels: str) -> None:
    """C{child(metric, *labels).inc()}, told at once to whom L{tellCounts} named: a count
    the relay must not lose with a delivery process killed before its next snapshot (sent
    once a second), as what the spool says happened (a recipient delivered, bounced, a
    notification queued).  The relay keeps at least what it was told
    (L{ProcessMetrics.retire})."""
    child(metric, *labels).inc()
    if _tell is not None:
        _tell(metric, dict(zip(metric.labelnames, labels, strict=True)))


def declared(name: str) -> _Declared | None:
    """The counter named C{name} (without C{_total}), C{None} when there is none."""
    return next((m for m in _DECLARED if m.name == name and m.kind == "counter"), None)


def replyClass(code: int) -> str:
    """C{"2xx"}, C{"4xx"} or C{"5xx"}: a reply code's class, as the labels say it."""
    return f"{code // 100}xx"


_log = Logger(namespace="mailrelay.plugins")

#: A plugin's call that takes longer than this before it returns (its answer, or the
#: Deferred of one) held the reactor -- every session of the process waited: logged.
BLOCKING_WARN_SECONDS = 0.25
#: Seconds between two such lines about one plugin (the calls in between are counted).
BLOCKING_WARN_INTERVAL = 60.0
#: (hook, plugin) -> when its last line was written, and the calls that held the reactor
#: since.
_lastBlockingWarning: dict[tuple[str, str], list[float]] = {}


def noteBlocking(hook: str, plugin: str, started: float) -> None:
    """Log, naming the plugin, when its call since C{started} (C{time.perf_counter()}) held
    the reactor for more than L{BLOCKING_WARN_SECONDS}: a plugin must not block (a lookup
    without a Deferred, a sleep, a file read of a network mount); at most one line per
    L{BLOCKING_WARN_INTERVAL} seconds per plugin, with the count of the calls since."""
    held = time.perf_counter() - started
    if held <= BLOCKING_WARN_SECONDS:
        return
    now = time.monotonic()
    key = (hook, plugin)
    last = _lastBlockingWarning.get(key)
    if last is not None and now - last[0] < BLOCKING_WARN_INTERVAL:
        last[1] += 1
        return
    since = "" if last is None else f" ({last[1]:g} more since the last line)"
    _lastBlockingWarning[key] = [now, 0]
    _log.warn(
        "{hook} plugin {plugin} held the reactor for {held:.2f}s: every connection of this "
        "process waited{since}; a plugin must not block (do such work with "
        "context.deferToThread or return a Deferred)",
        hook=hook,
        plugin=plugin,
        held=held,
        since=since,
    )


def heldPast(timeout: float | None, started: float) -> float | None:
    """How long a plugin's call since C{started} (C{time.perf_counter()}) held the reactor,
    when that is more than its C{timeout}, else C{None}.  Its timer could not fire while it
    held the reactor: the answer it then gives came after its timeout, and is not believed,
    as a Deferred firing after the timeout is not."""
    if timeout is None:
        return None
    held = time.perf_counter() - started
    return held if held > timeout else None


def heldText(held: float | None) -> str:
    """What a timeout's log line adds for a call that held the reactor past its timeout
    (L{heldPast}): C{" (its call held the reactor for 6.01s)"}, or C{""}."""
    return "" if held is None else f" (its call held the reactor for {held:.2f}s)"


def dropAnswer(answer: object) -> None:
    """Give up a plugin's answer that came too late (L{heldPast}): a Deferred is cancelled,
    what it then fails with ignored."""
    if isinstance(answer, Deferred):
        answer.addErrback(lambda _: None).cancel()


def boundedAnswer(
    d: Deferred[Any], timeout: float | None, clock: Any, started: float
) -> tuple[Deferred[Any], float | None]:
    """A plugin call's answer C{d} bounded by its C{timeout} on C{clock} (none when C{None}),
    and C{None}; or, when the call held the reactor past its timeout (L{heldPast}), a
    Deferred failed with C{TimeoutError} (C{d} dropped, L{dropAnswer}), and how long it held
    it."""
    held = heldPast(timeout, started)
    if held is not None:
        dropAnswer(d)
        return fail(TimeoutError()), held
    if timeout is not None and not d.called:
        d.addTimeout(timeout, clock)
    return d, None


def timePlugin(hook: str, plugin: str, result: Any, started: float) -> Any:
    """Count the time a plugin took to answer, in L{PLUGIN_SECONDS}: C{result} is what its
    call returned, at once (counted now) or as a Deferred (counted when it fires, however
    it fires); C{started} is C{time.perf_counter()} before the call.  Returns C{result}.
    A call that held the reactor too long is logged (L{noteBlocking}).

    The chain runner of each hook calls it around each plugin::

        started = time.perf_counter()
        result = timePlugin("recipient_validator", name, plugin.validateRecipient(...), started)
    """
    noteBlocking(hook, plugin, started)
    if PLUGIN_SECONDS.real is None:  # not counting
        return result
    observe = child(PLUGIN_SECONDS, hook, plugin).observe
    if not isinstance(result, Deferred):
        observe(time.perf_counter() - started)
        return result

    def answered(outcome: object) -> object:
        observe(time.perf_counter() - started)
        return outcome

    return result.addBoth(answered)


class QueueStateSource(Protocol):
    """What L{QUEUE_STATES} reads: a running queue manager."""

    def queueStates(self) -> Mapping[str, int]:
        """The number of messages in each state (C{active}, C{scheduled}, ...)."""

    def deliveryPlaces(self) -> tuple[int, int]:
        """The places of C{[queue] delivery_limit} in use, and the deliveries waiting for
        one."""


class _QueueStates:
    """The collector of C{mailrelay_queue_messages}, C{mailrelay_delivery_places_in_use}
    and C{mailrelay_deliveries_waiting}: the sums over the queue managers running in this
    process (usually one; two for a moment during a reload)."""

    def __init__(self) -> None:
        self.sources: list[QueueStateSource] = []

    def add(self, source: QueueStateSource) -> None:
        if source not in self.sources:
            self.sources.append(source)

    def discard(self, source: QueueStateSource) -> None:
        if source in self.sources:
            self.sources.remove(source)

    def describe(self) -> Iterable[Metric]:
        return [self._family(), *self._placeFamilies()]

    @staticmethod
    def _placeFamilies() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        return (
            GaugeMetricFamily(
                "mailrelay_delivery_places_in_use",
                "Places of [queue] delivery_limit held by deliveries in flight (SMTP and LMTP "
                "connections, pipe commands, maildir and site backend deliveries).",
            ),
            GaugeMetricFamily(
                "mailrelay_deliveries_waiting",
                "Deliveries waiting for a place of [queue] delivery_limit (not those waiting "
                "for their next hop's destination_concurrency).",
            ),
        )

    def _family(self) -> GaugeMetricFamily:
        from prometheus_client.metrics_core import GaugeMetricFamily

        return GaugeMetricFamily(
            "mailrelay_queue_messages",
            "Messages in the queue, by state: active (being delivered), scheduled (waiting "
            "for their next attempt, or for room among the active ones).",
            labels=["state"],
        )

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, int] = {}
        for source in self.sources:
            for state, count in source.queueStates().items():
                totals[state] = totals.get(state, 0) + count
        family = self._family()
        for state, count in sorted(totals.items()):
            family.add_metric([state], count)
        inUse, waiting = self._placeFamilies()
        places = [source.deliveryPlaces() for source in self.sources]
        inUse.add_metric([], sum(used for used, _ in places))
        waiting.add_metric([], sum(waits for _, waits in places))
        return [family, inUse, waiting]


#: The running queue managers of this process, for C{mailrelay_queue_messages} (in
#: L{REGISTRY} once L{enable}d).
QUEUE_STATES = _QueueStates()


# -- from the delivery process to the relay's ------------------------------------------------

#: A family as a snapshot carries it: C{[name, type, documentation, [[sample name, labels,
#: value], ...]]}.
_Family = list[Any]


def _families(registry: CollectorRegistry) -> Iterator[Metric]:
    """The families of C{registry}, without the C{_created} samples (a time, which would
    make no sense added up across processes)."""
    for family in registry.collect():
        family.samples = [s for s in family.samples if not s.name.endswith("_created")]
        yield family


def snapshot(registry: CollectorRegistry | None = None) -> str:
    """Every sample of C{registry} (default: L{REGISTRY}, which must be L{enable}d), as one
    line of JSON (for L{ProcessMetrics.update})."""
    if registry is None:
        assert REGISTRY is not None, "metrics.enable() first"
        registry = REGISTRY
    return json.dumps(
        [
            [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
            for f in _families(registry)
        ],
        separators=(",", ":"),
    )


def _isCumulative(kind: str) -> bool:
    """Whether a family's samples only grow (they are kept once their process has ended)."""
    return kind in ("counter", "histogram", "summary")


#: Samples added up: C{(sample name, sorted labels) -> value}.
_Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _addSamples(values: _Values, samples: Iterable[Any]) -> None:
    """Add C{samples} (C{(sample name, labels, value)} triples) into C{values}."""
    for sampleName, labels, value in samples:
        key = (sampleName, tuple(sorted(labels.items())))
        values[key] = values.get(key, 0.0) + value


class ProcessMetrics:
    """The metrics of the delivery processes, as their last snapshots said, for the relay's
    exposition: L{update} with each snapshot a child sends, L{retire} when it has ended."""

    def __init__(self) -> None:
        #: The families of the children running, by child.
        self._live: dict[object, list[_Family]] = {}
        #: The cumulative samples of the children that have ended, added up, by family
        #: name, with its type and documentation.
        self._ended: dict[str, tuple[str, str, _Values]] = {}

    def update(self, child: object, line: str) -> None:
        """C{child} sent C{line} (a L{snapshot}).  @raise ValueError: not a snapshot."""
        families = json.loads(line)
        if not isinstance(families, list) or not all(
            isinstance(f, list) and len(f) == 4 for f in families
        ):
            raise ValueError("not a metrics snapshot")
        self._live[child] = families

    def retire(
        self, child: object, atLeast: Iterable[tuple[_Declared, dict[str, str], float]] = ()
    ) -> None:
        """C{child} has ended: keep its counters and histograms, drop its gauges.

        @param atLeast: counters (C{(metric, labels, count)}) the relay saw C{child} reach,
            kept at C{count} where its last snapshot says less: a child killed (SIGKILL)
            before its next snapshot did not say what it counted since.
        """
        families = self._live.pop(child, [])
        for metric, labels, count in atLeast:
            _atLeast(families, metric, labels, count)
        for name, kind, documentation, samples in families:
            if _isCumulative(kind):
                _addSamples(self._ended.setdefault(name, (kind, documentation, {}))[2], samples)

    def merged(self, own: Iterable[Metric]) -> list[Metric]:
        """The families C{own} (this process's) with the children's samples added."""
        from prometheus_client.metrics_core import Metric

        totals: dict[str, tuple[str, str, _Values]] = {}
        for family in own:
            _addSamples(
                totals.setdefault(family.name, (family.type, family.documentation, {}))[2],
                ((s.name, s.labels, s.value) for s in family.samples),
            )
        for name, (kind, documentation, values) in self._ended.items():
            _addSamples(
                totals.setdefault(name, (kind, documentation, {}))[2],
                ((n, dict(labels), v) for (n, labels), v in values.items()),
            )
        for families in self._live.values():
            for name, kind, documentation, samples in families:
                _addSamples(totals.setdefault(name, (kind, documentation, {}))[2], samples)
        result = []
        for name, (kind, documentation, values) in totals.items():
            family = Metric(name, documentation, kind)
            for (sampleName, labels), value in values.items():
                family.add_sample(sampleName, dict(labels), value)
            result.append(family)
        return result


def _atLeast(
    families: list[_Family], metric: _Declared, labels: dict[str, str], count: float
) -> None:
    """Raise the sample of the counter C{metric} with C{labels} in C{families} (a
    snapshot's) to C{count} where it is lower or missing."""
    family = next((f for f in families if f[0] == metric.name), None)
    if family is None:
        family = [metric.name, metric.kind, metric.documentation, []]
        families.append(family)
    sampleName = f"{metric.name}_total"
    for sample in family[3]:
        if sample[0] == sampleName and sample[1] == labels:
            sample[2] = max(sample[2], count)
            return
    family[3].append([sampleName, labels, count])


class _Exposition:
    """A collector of this process's metrics with the delivery processes' added."""

    def __init__(self, children: Callable[[], ProcessMetrics | None]) -> None:
        self.children = children

    def collect(self) -> Iterable[Metric]:
        assert REGISTRY is not None, "metrics.enable() first"
        own = _families(REGISTRY)
        children = self.children()
        return list(own) if children is None else children.merged(own)


def exposition(children: Callable[[], ProcessMetrics | None]) -> CollectorRegistry:
    """The registry to serve: this process's metrics, with those of the delivery processes
    that C{children()} holds (C{None}: there are none) added."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Exposition(children))
    return registry
