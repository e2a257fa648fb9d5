"""Unit tests of the metrics (L{mailrelay.metrics}): what a snapshot carries, how the relay
adds up its delivery processes' counts, the plugin timer, the sessions' outcomes, and the
health check (L{mailrelay.app.metrics.health})."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred

from mailrelay import metrics
from mailrelay.app.metrics import health
from mailrelay.interfaces import Reply
from mailrelay.metrics import PLUGIN_SECONDS, ProcessMetrics, snapshot, timePlugin
from mailrelay.receive.protocol import _outcome


def childRegistry(sent: float, queued: float, seconds: list[float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("m_sent", "Sent.", ["backend"], registry=registry).labels("smtp").inc(sent)
    Gauge("m_queued", "Queued.", registry=registry).set(queued)
    h = Histogram("m_seconds", "Seconds.", buckets=(1, 10), registry=registry)
    for s in seconds:
        h.observe(s)
    return registry


def samplesOf(families: Any) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


def test_snapshotHasNoCreatedSamples() -> None:
    families = json.loads(snapshot(childRegistry(1, 2, [0.5])))
    names = [sample[0] for family in families for sample in family[3]]
    assert "m_sent_total" in names and "m_queued" in names and "m_seconds_bucket" in names
    assert not [n for n in names if n.endswith("_created")]


def test_childrenAddedUpAndRetired() -> None:
    """Counters and histograms of ended children are kept, their gauges dropped; those of
    the children running are added as they are."""
    children = ProcessMetrics()
    old, new = object(), object()
    children.update(old, snapshot(childRegistry(3, 5, [0.5, 20])))
    children.update(new, snapshot(childRegistry(1, 1, [2])))
    merged = samplesOf(children.merged([]))
    assert merged[("m_sent_total", (("backend", "smtp"),))] == 4
    assert merged[("m_queued", ())] == 6
    children.retire(old)
    children.update(new, snapshot(childRegistry(2, 1, [2, 3])))
    merged = samplesOf(children.merged([]))
    assert merged[("m_sent_total", (("backend", "smtp"),))] == 5  # 3 kept + 2 now
    assert merged[("m_queued", ())] == 1  # the old one's gauge is gone
    assert merged[("m_seconds_count", ())] == 4
    assert merged[("m_seconds_bucket", (("le", "1.0"),))] == 1
    assert merged[("m_seconds_bucket", (("le", "10.0"),))] == 3


def test_mergedExpositionParses() -> None:
    """This process's families with the children's, in the text format, parsed back; the
    buckets of a histogram stay in their order."""
    own = childRegistry(1, 0, [0.5])
    children = ProcessMetrics()
    children.update(object(), snapshot(childRegistry(1, 2, [5])))

    class Collector:
        def collect(self) -> Any:
            return children.merged(metrics._families(own))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    parsed = samplesOf(text_string_to_metric_families(text))
    assert parsed[("m_sent_total", (("backend", "smtp"),))] == 2
    assert parsed[("m_queued", ())] == 2
    buckets = [line.split("{")[1].split("}")[0] for line in text.splitlines()
               if line.startswith("m_seconds_bucket")]
    assert buckets == ['le="1.0"', 'le="10.0"', 'le="+Inf"']


def test_badSnapshotRefused() -> None:
    children = ProcessMetrics()
    for bad in ("not json", "{}", "[[1, 2]]"):
        try:
            children.update(object(), bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def observed(hook: str, plugin: str) -> float:
    return sum(b.get() for b in PLUGIN_SECONDS.labels(hook, plugin)._buckets)


def test_enableMakesEveryMetric() -> None:
    """L{metrics.enable} (a process whose metrics are served) makes every metric declared,
    in the registry a snapshot reads; again, it changes nothing."""
    metrics.enable()
    registry = metrics.REGISTRY
    metrics.enable()
    assert metrics.REGISTRY is registry
    metrics.child(metrics.DELIVERIES, "smtp", "sent").inc()
    metrics.SPOOL_SYNC_BATCH.observe(3)
    names = {family[0] for family in json.loads(snapshot())}
    assert {"mailrelay_connections", "mailrelay_deliveries", "mailrelay_spool_sync_batch_size",
            "mailrelay_plugin_seconds", "mailrelay_queue_messages"} <= names
    samples = samplesOf(metrics._families(registry))
    assert samples[("mailrelay_deliveries_total",
                    (("backend", "smtp"), ("status", "sent")))] >= 1
    assert samples[("mailrelay_spool_sync_batch_size_count", ())] >= 1


def test_timePlugin() -> None:
    """An answer at once is timed at once; a Deferred when it fires, however it fires."""
    metrics.enable()
    before = observed("test_hook", "p")
    assert timePlugin("test_hook", "p", "verdict", 0.0) == "verdict"
    assert observed("test_hook", "p") == before + 1
    d: Deferred[str] = Deferred()
    assert timePlugin("test_hook", "p", d, 0.0) is d
    assert observed("test_hook", "p") == before + 1
    d.errback(RuntimeError("boom"))
    assert observed("test_hook", "p") == before + 2
    d.addErrback(lambda f: None)


def test_sessionOutcomes() -> None:
    assert _outcome(Reply(221, "2.0.0", "Bye"), False) == "quit"
    assert _outcome(Reply(421, "4.4.2", "timeout exceeded"), False) == "timeout"
    assert _outcome(Reply(421, "4.3.2", "shutting down"), False) == "shutdown"
    assert _outcome(Reply(421, "4.7.0", "too many errors"), False) == "refused"
    assert _outcome(Reply(554, "5.5.0", "synchronization"), False) == "refused"
    assert _outcome(Reply(250, "2.0.0", "Ok"), True) == "disconnected"
    assert _outcome(None, False) == "disconnected"


class FakeSpool:
    def __init__(self, directory: Any, running: bool = True, free: bool = True) -> None:
        self.directory = directory
        self.running = running
        self.free = free

    def hasFreeSpace(self, needed: int = 0) -> bool:
        return self.free


class FakeDelivery:
    def __init__(self, state: str, pid: int | None = None) -> None:
        self._state = state
        self.pid = pid

    def state(self) -> str:
        return self._state


def relay(tmp_path: Any, *, port: Any = "port", spool: Any = None, delivery: Any = None) -> Any:
    return SimpleNamespace(
        listeners={"tcp:25": SimpleNamespace(port=port)},
        spool=spool if spool is not None else FakeSpool(tmp_path),
        delivery=delivery if delivery is not None else FakeDelivery("up", 42),
    )


def test_health(tmp_path) -> None:
    assert health(relay(tmp_path)) == (True, {
        "listeners": {"tcp:25": "up"}, "spool": "up", "delivery": "up", "delivery_pid": 42,
    })
    assert health(relay(tmp_path, delivery=FakeDelivery("held")))[0]
    for broken, part, state in [
        (relay(tmp_path, port=None), "listeners", {"tcp:25": "down"}),
        (relay(tmp_path, spool=FakeSpool(tmp_path, running=False)), "spool", "down"),
        (relay(tmp_path, spool=FakeSpool(tmp_path / "gone")), "spool", "down"),
        (relay(tmp_path, spool=FakeSpool(tmp_path, free=False)), "spool", "full"),
        (relay(tmp_path, delivery=FakeDelivery("down")), "delivery", "down"),
    ]:
        healthy, parts = health(broken)
        assert not healthy and parts[part] == state, parts


class FakeAcceptors:
    def __init__(self, count: int, pids: list[int | None]) -> None:
        self.count, self.pids = count, pids

    def describe(self) -> dict[str, Any]:
        running = [{"pid": pid, "since": 1.0} for pid in self.pids]
        return {"count": self.count, "running": running, "restarts": 0, "retiring": []}


def test_health_of_the_acceptor_processes(tmp_path) -> None:
    """With [relay] processes > 1, /healthz says whether every acceptor process runs (their
    pids); one that is down (being restarted) makes the relay unhealthy, as the delivery
    process does.  None configured: nothing said of them."""
    withAcceptors = relay(tmp_path)
    withAcceptors.acceptors = FakeAcceptors(2, [7, 8])
    healthy, parts = health(withAcceptors)
    assert healthy and parts["acceptors"] == "up" and parts["acceptor_pids"] == [7, 8], parts
    withAcceptors.acceptors = FakeAcceptors(2, [7])
    healthy, parts = health(withAcceptors)
    assert not healthy and parts["acceptors"] == "down" and parts["acceptor_pids"] == [7]
    withAcceptors.acceptors = FakeAcceptors(1, [None])  # (no pid: not running)
    healthy, parts = health(withAcceptors)
    assert not healthy and parts["acceptors"] == "down" and parts["acceptor_pids"] == []
    withAcceptors.acceptors = FakeAcceptors(0, [])
    healthy, parts = health(withAcceptors)
    assert healthy and "acceptors" not in parts and "acceptor_pids" not in parts


def test_idle_connections_to_the_metrics_server_are_timed_out_quietly() -> None:
    """A scanner's idle connections to the metrics port: each timed out without a log line
    (Twisted's HTTP channel logged 'Timing out client' for every one)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.logger import capturedLogs

    from mailrelay.app.metrics import makeSite

    site = makeSite(None)
    channel = site.buildProtocol(None)
    channel.callLater = Clock().callLater  # (its timers on a clock, not the global reactor)
    channel.makeConnection(StringTransport())
    with capturedLogs() as events:
        channel.timeoutConnection()
    assert not [e for e in events if "Timing out" in e.get("log_format", "")], events


def test_readmeMetricsTableListsEveryMetricAndEveryDSNAction() -> None:
    """README's metrics table names every metric served, and the DSN counter's row every
    action a notification can have (L{mailrelay.queue.dsn.ACTIONS})."""
    from pathlib import Path

    from mailrelay.queue.dsn import ACTIONS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `mailrelay_")]
    documented = " ".join(rows)
    names = [m.name + ("_total" if m.kind == "counter" else "") for m in metrics._DECLARED]
    names += [f.name for f in metrics.QUEUE_STATES.describe()]
    assert [n for n in names if f"`{n}`" not in documented] == []
    (dsnRow,) = [row for row in rows if row.startswith("| `mailrelay_dsns_total`")]
    assert [a for a in ACTIONS if f"`{a}`" not in dsnRow] == []


def test_a_killed_delivery_process_keeps_the_counts_it_told_at_once() -> None:
    """A delivery process sends its metrics once a second; killed (SIGKILL) before its next
    snapshot, the recipients it delivered or bounced since and the notifications it queued
    were not counted, though the spool says they happened.  It tells each such count at once
    (a counted record); the relay keeps at least those (never one twice: the snapshot that
    counted them too is not added to them)."""
    from mailrelay.queue.process import COUNTED_RECORD, METRICS_RECORD, _ChildProtocol

    def counted(name: str, **labels: str) -> str:
        return COUNTED_RECORD + json.dumps([name, labels]) + "\n"

    def deliveries(value: float) -> str:
        sample = ["mailrelay_deliveries_total", {"backend": "smtp", "status": "sent"}, value]
        return METRICS_RECORD + json.dumps(
            [["mailrelay_deliveries", "counter", "d", [sample]]]) + "\n"

    service = SimpleNamespace(metrics=ProcessMetrics(), _childEnded=lambda child, why: None)
    killed, stopped = _ChildProtocol(service), _ChildProtocol(service)
    sent = counted("mailrelay_deliveries", backend="smtp", status="sent")
    killed.outReceived((deliveries(1) + sent * 3 + counted("mailrelay_dsns", action="failed")
                        ).encode())
    stopped.outReceived((sent * 2 + deliveries(2)).encode())
    killed.processEnded(None)
    stopped.processEnded(None)
    merged = samplesOf(service.metrics.merged([]))
    assert merged[("mailrelay_deliveries_total", (("backend", "smtp"), ("status", "sent")))] == 5
    assert merged[("mailrelay_dsns_total", (("action", "failed"),))] == 1
