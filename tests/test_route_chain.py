"""The router chain (L{mailrelay.route.chain}): the site's routers in order, then the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import PermanentFailure, TransientFailure
from mailrelay.interfaces import (
    CONTINUE,
    DeliveryStatus,
    IRouter,
    RecipientResult,
    Route,
    RouteOptions,
    Verdict,
)
from mailrelay.queue.attempt import Calls, Deliverer
from mailrelay.route import ConfiguredRouter, RouterChain, RoutingTable, chainRouters

ENV = Envelope(sender="a@example.com", queueID="01K1AP4J8VGG0000VZ3M7Q")
LMTP = Route("lmtp", "unix:/run/lmtp", RouteOptions(tls="none"))


@implementer(IRouter)
class Answers:
    """A router answering C{answer} (a value, an exception to raise, or a callable of the
    recipient giving either), recording the recipients it was asked about."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def route(self, envelope: Envelope, recipient: Recipient) -> Any:
        self.asked.append(recipient.address)
        answer = self.answer(recipient) if callable(self.answer) else self.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer


def chain(*routers: Any, timeout: float = 5.0, table: Any = None) -> tuple[RouterChain, Clock]:
    clock = Clock()
    configured = [ConfiguredRouter(f"r{i}", r, timeout) for i, r in enumerate(routers)]
    return RouterChain(configured, table or RoutingTable(), clock), clock


def routed(c: RouterChain, address: str) -> Any:
    """The chain's route for C{address}, or its Failure (the Deferred must have fired)."""
    results: list[Any] = []
    c.route(ENV, Recipient(address)).addBoth(results.append)
    assert results, "the chain has not answered"
    return results[0]


def failure(result: Any, kind: type[Exception]) -> Any:
    assert isinstance(result, Failure), result
    assert result.check(kind), result
    return result.value


def test_noRoutersIsTheTableItself() -> None:
    table = RoutingTable()
    assert chainRouters([], table, Clock()) is table
    built = chainRouters([ConfiguredRouter("x", Answers(None), 1)], table, Clock())
    assert isinstance(built, RouterChain) and built.table is table


def test_providesIRouter() -> None:
    c, _ = chain(Answers(None))
    verifyObject(IRouter, c)
    assert repr(c).startswith("<RouterChain [r0] then <mailrelay.route.table.RoutingTable")


def test_firstRouteWins() -> None:
    first, second = Answers(LMTP), Answers(Route("discard", "discard"))
    c, _ = chain(first, second)
    assert routed(c, "bob@example.org") == LMTP
    assert (first.asked, second.asked) == (["bob@example.org"], [])


@pytest.mark.parametrize("fallThrough", [None, CONTINUE, Verdict.continue_()])
def test_noneAndContinueFallThroughToTheTable(fallThrough: Any) -> None:
    first, second = Answers(fallThrough), Answers(fallThrough)
    c, _ = chain(first, second)
    assert routed(c, "bob@example.org") == Route("smtp", "example.org")
    assert first.asked == second.asked == ["bob@example.org"]


def test_routersAreAskedInOrder() -> None:
    """A later router decides for what the earlier ones leave to it."""
    first = Answers(lambda r: LMTP if r.domain == "lmtp.test" else None)
    second = Answers(lambda r: Route("discard", "discard") if r.domain != "mx.test" else None)
    c, _ = chain(first, second, table=RoutingTable(smarthost="[relay.test]:587"))
    assert routed(c, "a@lmtp.test") == LMTP
    assert routed(c, "a@other.test") == Route("discard", "discard")
    assert routed(c, "a@mx.test") == Route("smtp", "[relay.test]:587")
    assert first.asked == ["a@lmtp.test", "a@other.test", "a@mx.test"]
    assert second.asked == ["a@other.test", "a@mx.test"]


def test_asynchronousAnswers() -> None:
    pending: list[Deferred[Any]] = []

    def later(recipient: Recipient) -> Deferred[Any]:
        pending.append(Deferred())
        return pending[-1]

    c, clock = chain(Answers(later), Answers(later))
    results: list[Any] = []
    c.route(ENV, Recipient("bob@example.org")).addBoth(results.append)
    assert results == [] and len(pending) == 1
    pending[0].callback(None)
    assert results == [] and len(pending) == 2
    clock.advance(4)
    pending[1].callback(LMTP)
    assert results == [LMTP]


@pytest.mark.parametrize(
    "error",
    [
        TransientFailure(code="4.4.3", diagnostic="X-mailrelay; directory down"),
        PermanentFailure(code="5.1.1", diagnostic="X-mailrelay; no such mailbox here"),
    ],
)
@pytest.mark.parametrize("asDeferred", [False, True])
def test_routersFailuresAreTheirVerdict(error: Exception, asDeferred: bool) -> None:
    """A router's own Transient or PermanentFailure is the answer: nothing later is asked."""
    answer = defer.fail(error) if asDeferred else error
    later = Answers(LMTP)
    table = Answers(LMTP)
    c, _ = chain(Answers(answer), later, table=table)
    with capturedLogs() as events:
        assert failure(routed(c, "bob@example.org"), type(error)) is error
    assert later.asked == table.asked == []
    (event,) = events
    assert formatEvent(event) == (
        f"01K1AP4J8VGG0000VZ3M7Q: router r0 answered for <bob@example.org>: {error}"
    )


@pytest.mark.parametrize("asDeferred", [False, True])
def test_aFailingRouterDefers(asDeferred: bool) -> None:
    """Any other failure defers (4.4.3) and is logged: the table is not asked instead."""
    error = KeyError("boom")
    table = Answers(LMTP)
    c, _ = chain(Answers(defer.fail(error) if asDeferred else error), table=table)
    with capturedLogs() as events:
        e = failure(routed(c, "bob@example.org"), TransientFailure)
    assert (e.code, e.diagnostic) == ("4.4.3", "X-mailrelay; router r0 failed: KeyError")
    assert table.asked == []
    (event,) = events
    assert event["log_failure"].value is error
    assert formatEvent(event) == (
        "01K1AP4J8VGG0000VZ3M7Q: router r0 failed for <bob@example.org>; deferring"
    )


def test_aSlowRouterDefersAndIsCancelled() -> None:
    cancelled: list[bool] = []
    slow: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
    table = Answers(LMTP)
    c, clock = chain(Answers(slow), timeout=2.5, table=table)
    results: list[Any] = []
    with capturedLogs() as events:
        c.route(ENV, Recipient("bob@example.org")).addBoth(results.append)
        clock.advance(2.4)
        assert results == [] and cancelled == []
        clock.advance(0.1)
    e = failure(results[0], TransientFailure)
    assert (e.code, e.diagnostic) == ("4.4.3", "X-mailrelay; router r0 did not answer within 2.5s")
    assert cancelled == [True] and table.asked == []
    assert [formatEvent(event) for event in events] == [
        "01K1AP4J8VGG0000VZ3M7Q: router r0 did not answer within 2.5s for <bob@example.org>;"
        " deferring"
    ]


@pytest.mark.parametrize(
    "answer", ["lmtp:unix:/run/lmtp", Verdict.reject(), Verdict.accept(), 0, ("lmtp", "x")]
)
def test_anythingElseDefers(answer: Any) -> None:
    table = Answers(LMTP)
    c, _ = chain(Answers(answer), table=table)
    with capturedLogs() as events:
        e = failure(routed(c, "bob@example.org"), TransientFailure)
    assert (e.code, e.diagnostic) == ("4.3.5", "X-mailrelay; router r0 gave no usable answer")
    assert table.asked == []
    (event,) = events
    assert f"router r0 answered {answer!r} for <bob@example.org>" in formatEvent(event)


def test_theTablesFailureToo() -> None:
    """When every router falls through, the table's verdict stands (no domain: bounced)."""
    c, _ = chain(Answers(None))
    e = failure(routed(c, "postmaster"), PermanentFailure)
    assert e.code == "5.1.2"


def test_cancellingCancelsTheRouterInFlight() -> None:
    cancelled: list[bool] = []
    c, clock = chain(Answers(Deferred(lambda d: cancelled.append(True))))
    d = c.route(ENV, Recipient("bob@example.org"))
    results: list[Any] = []
    d.addBoth(results.append)
    d.cancel()
    assert cancelled == [True]
    failure(results[0], CancelledError)
    assert clock.getDelayedCalls() == []


def test_checks() -> None:
    with pytest.raises(TypeError, match="router 'x' does not provide IRouter"):
        RouterChain([ConfiguredRouter("x", object(), 1)], RoutingTable(), Clock())
    with pytest.raises(TypeError, match="does not provide IRouter"):
        RouterChain([], object(), Clock())
    for timeout in (0, -1, True, "5"):
        with pytest.raises(ValueError, match="the timeout of router 'x' must be > 0"):
            RouterChain([ConfiguredRouter("x", Answers(None), timeout)], RoutingTable(), Clock())


# ---------------------------------------------------------------------------------------------
# What the queue makes of the chain's answers


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path

    def messagePath(self, queueID: str) -> Path:
        return self.path


class Backend:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Route]] = []

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, path: Path) -> Any:
        self.calls.append(([r.address for r in recipients], route))
        return defer.succeed(
            [
                RecipientResult(r.address, DeliveryStatus.DELIVERED, "2.0.0", "smtp; 250 ok")
                for r in recipients
            ]
        )


def test_theQueueDeliversDefersAndBounces(tmp_path: Path) -> None:
    """Through the queue's delivery attempt: a route is delivered along, a router's
    TransientFailure and a failing router defer, a PermanentFailure bounces."""

    def decide(recipient: Recipient) -> Any:
        return {
            "lmtp": LMTP,
            "later": TransientFailure(code="4.4.3", diagnostic="X-mailrelay; directory down"),
            "gone": PermanentFailure(code="5.1.1", diagnostic="X-mailrelay; mailbox gone"),
            "broken": RuntimeError("bug"),
        }.get(recipient.address.partition("@")[0])

    lmtp, smtp = Backend(), Backend()
    c, clock = chain(Answers(decide))
    deliverer = Deliverer(
        Spool(tmp_path / "m.eml"),
        c,
        {"lmtp": lmtp, "smtp": smtp},
        Calls(clock),
        deliveryTimeout=60,
    )
    pending = [Recipient(f"{name}@example.org") for name in ("lmtp", "later", "gone", "broken")]
    pending.append(Recipient("other@example.org"))
    with capturedLogs():
        outcomes = defer.Deferred.fromCoroutine(deliverer.deliver(ENV.queueID, ENV, pending))
    results: list[Any] = []
    outcomes.addBoth(results.append)
    statuses = [(o.result.status, o.result.code) for o in results[0]]
    assert statuses == [
        (DeliveryStatus.DELIVERED, "2.0.0"),
        (DeliveryStatus.TRANSIENT, "4.4.3"),  # a router's own status and text are kept
        (DeliveryStatus.PERMANENT, "5.1.1"),
        (DeliveryStatus.TRANSIENT, "4.4.3"),
        (DeliveryStatus.DELIVERED, "2.0.0"),
    ]
    assert results[0][2].result.diagnostic == "X-mailrelay; mailbox gone"
    assert results[0][1].result.diagnostic == "X-mailrelay; directory down"
    assert "router r0 failed" in results[0][3].result.diagnostic
    assert lmtp.calls == [(["lmtp@example.org"], LMTP)]
    assert smtp.calls == [(["other@example.org"], Route("smtp", "example.org"))]


def test_aRoutersFailureIsLoggedOnceByTheQueue(tmp_path: Path) -> None:
    """A router's failure, its own verdict or a timeout is logged once, by the chain (which
    names the router; with the traceback of an exception): the queue's attempt adds no
    warning of its own -- the status line it logs next carries the result's status and
    text.  One line per fact, as Postfix logs a failed lookup once and then the status."""

    def decide(recipient: Recipient) -> Any:
        return {
            "later": TransientFailure(code="4.4.3", diagnostic="X-mailrelay; directory down"),
            "gone": PermanentFailure(code="5.1.1", diagnostic="X-mailrelay; mailbox gone"),
            "broken": RuntimeError("bug"),
        }[recipient.address.partition("@")[0]]

    c, clock = chain(Answers(decide))
    deliverer = Deliverer(Spool(tmp_path / "m.eml"), c, {}, Calls(clock), deliveryTimeout=60)
    pending = [Recipient(f"{name}@example.org") for name in ("later", "gone", "broken")]
    with capturedLogs() as events:
        outcomes = defer.Deferred.fromCoroutine(deliverer.deliver(ENV.queueID, ENV, pending))
    results: list[Any] = []
    outcomes.addBoth(results.append)
    assert [o.result.code for o in results[0]] == ["4.4.3", "5.1.1", "4.4.3"]
    for r in pending:
        lines = [formatEvent(e) for e in events if r.address in formatEvent(e)]
        assert len(lines) == 1 and "router r0 " in lines[0], lines


@pytest.mark.parametrize("route,refused", [
    (Route("maildir", "/var/mail/{local}", RouteOptions(tls="required")), "tls"),
    (Route("discard", "discard", RouteOptions(caFile="/ca.pem")), "caFile"),
    (Route("archive", "archive", RouteOptions(username="u", password="p")),
     "username, password"),
    (Route("lmtp", "unix:/run/lmtp", RouteOptions(sourceAddress="127.0.0.1")),
     "sourceAddress"),
])
def test_aRoutersOptionsTheBackendDoesNotTakeDefer(tmp_path: Path, route: Route,
                                                   refused: str) -> None:
    """A router's route to a backend that does not take route options (maildir, discard,
    a site backend; an lmtp route's source address) defers its recipients with 4.3.5,
    logged, rather than delivering without them: [[routes]] refuses such a table, and a
    router's route computed per message is refused where it is used (Postfix's
    transport(5) gives per-transport options only to the transports that take them)."""
    backend = Backend()
    c, clock = chain(Answers(route))
    deliverer = Deliverer(Spool(tmp_path / "m.eml"), c, {route.backend: backend},
                          Calls(clock), deliveryTimeout=60)
    with capturedLogs() as events:
        outcomes = defer.Deferred.fromCoroutine(
            deliverer.deliver(ENV.queueID, ENV, [Recipient("bob@example.org")]))
    results: list[Any] = []
    outcomes.addBoth(results.append)
    ((outcome),) = results[0]
    problem = (f"an lmtp route takes no {refused}" if route.backend == "lmtp"
               else f'only smtp and lmtp routes take {refused}, not a "{route.backend}" route')
    assert (outcome.result.status, outcome.result.code) == (DeliveryStatus.TRANSIENT, "4.3.5")
    assert outcome.result.diagnostic.startswith(
        f"X-mailrelay; unusable options for the route to {route.nexthop}: {problem}")
    assert backend.calls == []
    lines = [formatEvent(e) for e in events if problem in formatEvent(e)]
    assert len(lines) == 1 and lines[0].startswith(f"{ENV.queueID}: "), lines


# ---------------------------------------------------------------------------------------------
# [[routers]] in the configuration


def loadRouters(tmp_path: Path, text: str) -> Any:
    from mailrelay.config import loadConfig

    path = tmp_path / "relay.toml"
    path.write_text('hostname = "relay.test"\n' + text, encoding="utf-8")
    return loadConfig(str(path))


def test_configRouters(tmp_path: Path) -> None:
    from mailrelay.config import PluginSpec

    assert loadRouters(tmp_path, "").routers == ()
    config = loadRouters(
        tmp_path,
        '[[routers]]\nplugin = "lmtp-domains"\nfile = "domains"\ntimeout = 2\n'
        '[[routers]]\nplugin = "acme"\n',
    )
    assert config.routers == (
        PluginSpec("lmtp-domains", {"file": "domains"}, 2.0, "routers[0]"),
        PluginSpec("acme", {}, 30.0, "routers[1]"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[routers]]\nfile = 'x'\n",
            "routers[0].plugin: is required in each [[routers]] table: the name of the plugin",
        ),
        ("[[routers]]\nplugin = 'x'\ntimeout = 0\n", "routers[0].timeout: "),
        ("[routers]\nplugin = 'x'\n", "routers: must be an array of tables ([[routers]])"),
    ],
)
def test_configRoutersRefused(tmp_path: Path, text: str, message: str) -> None:
    from mailrelay.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        loadRouters(tmp_path, text)
    assert f"relay.toml: {message}" in str(e.value)


def test_theRelayBuildsTheChain(tmp_path: Path) -> None:
    """makeDelivery gives the queue the routers, built as IRouter plugins, before the table;
    without routers, the table itself."""
    from mailrelay.app.delivery import makeDelivery
    from mailrelay.delivery.discard import DiscardBackend

    built: list[tuple[str, Any]] = []
    routers: list[Answers] = []

    def build(spec: Any, interface: Any) -> Any:
        built.append((spec.key, interface))
        if interface is IRouter:
            routers.append(Answers(None))
            return routers[-1]
        return DiscardBackend()

    config = loadRouters(
        tmp_path,
        '[dns]\nnameservers = ["127.0.0.1"]\n'
        '[[routers]]\nplugin = "a"\ntimeout = 2\n[[routers]]\nplugin = "b"\n',
    )
    clock = Clock()
    _, queue = makeDelivery(config, clock, None, build)
    chain = queue.deliverer.router
    assert isinstance(chain, RouterChain) and isinstance(chain.table, RoutingTable)
    assert chain.routers == (
        ConfiguredRouter("a", routers[0], 2.0),
        ConfiguredRouter("b", routers[1], 30.0),
    )
    assert chain.clock is clock
    assert [key for key, interface in built if interface is IRouter] == ["routers[0]", "routers[1]"]

    _, queue = makeDelivery(loadRouters(tmp_path, ""), clock, None, build)
    assert isinstance(queue.deliverer.router, RoutingTable)


def test_anUnknownRouterStopsStartUp(tmp_path: Path) -> None:
    from mailrelay.app.delivery import makeDelivery
    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.errors import ConfigError

    config = loadRouters(
        tmp_path,
        # (Name servers of its own: the system's resolver would use the global reactor.)
        '[dns]\nnameservers = ["127.0.0.1"]\n[[routers]]\nplugin = "accepted-domains"\n',
    )
    build = pluginBuilder(config, Clock(), availablePlugins())
    with pytest.raises(ConfigError) as e:
        makeDelivery(config, Clock(), None, build)
    assert str(e.value) == (
        f"{tmp_path / 'relay.toml'}: routers[0].plugin: plugin 'accepted-domains' provides "
        "IRecipientValidator, not IRouter"
    )


def test_aRouterThatBlocksPastItsTimeoutIsNotBelieved() -> None:
    """A router whose call holds the reactor longer than its timeout (its timer cannot
    fire) and then answers a route was believed, while a Deferred answering after the
    timeout is not: it now defers the recipient as a timeout, the log saying how long
    the call held the reactor."""
    import time

    def blocks(recipient: Recipient) -> Route:
        time.sleep(0.03)
        return LMTP

    table = Answers(LMTP)
    c, clock = chain(Answers(blocks), timeout=0.01, table=table)
    with capturedLogs() as events:
        e = failure(routed(c, "bob@example.org"), TransientFailure)
    assert (e.code, e.diagnostic) == ("4.4.3", "X-mailrelay; router r0 did not answer within 0.01s")
    assert table.asked == [] and clock.getDelayedCalls() == []
    (line,) = [formatEvent(event) for event in events]
    assert line.startswith("01K1AP4J8VGG0000VZ3M7Q: router r0 did not answer within 0.01s for "
                           "<bob@example.org>; deferring (its call held the reactor for 0.0"), line
