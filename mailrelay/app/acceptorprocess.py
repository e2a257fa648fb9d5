"""An acceptor process's composition root (C{python -m mailrelay.app.acceptorprocess}): the
receiving side of the relay's configuration -- the spool, the plugins, the sessions and the
listeners -- accepting on listening sockets the relay opened and passed down
(C{--listeners}), telling the relay of each message it queued on its standard output.  The
relay's side, and why, are in L{mailrelay.app.acceptors}.

Standard output carries, one line each: C{queued<TAB>ID} for each message made durable
(written before its C{250} is, so that a message the client was told is queued is known to
the relay even if we are killed right after), the log events (L{encodeLogEvent}) and, when
metrics are served, snapshots of our metrics.  The end of standard input (or SIGTERM, which
Linux sends when the relay dies: C{PR_SET_PDEATHSIG}) stops us as the relay stops: the
listeners close, idle sessions get C{421}, a message being received is finished, the spool
closes last.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.app.acceptors import (
    ANSWER_RECORD,
    ASK_RECORD,
    QUEUED_RECORD,
    SESSIONS_RECORD,
    TLS_FILES_OPTION,
    USERS_OPTION,
)
from mailrelay.app.deliveryprocess import (
    RecordReporter,
    StopAtEnd,
    _readConfigText,
    childArguments,
    runChild,
    startChild,
)
from mailrelay.app.services import OrderedMultiService, stopReactor
from mailrelay.interfaces import IRateLimiter
from mailrelay.receive.auth import IAuthThrottle

log = Logger()

_ANSWER = ANSWER_RECORD.encode("ascii")

__all__ = [
    "RETIRE",
    "AcceptorServices",
    "AdoptedListener",
    "RelayAuthThrottle",
    "RelayCounters",
    "RelayRateLimiter",
    "makeAcceptorServices",
]

#: The address families a listening socket passed to an acceptor may have, by name.
FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


class _AdoptedUNIXPort(unix.Port):
    """A UNIX listening socket adopted from the relay: closing ours leaves the socket's file
    in place (the relay, which made it, removes it)."""

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


def adoptPort(reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """Listen with C{factory} on the listening socket C{fd} (our own copy of it is made:
    C{fd} may be closed then)."""
    os.set_blocking(fd, False)
    if family == socket.AF_UNIX:
        port = _AdoptedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
        port.startListening()
        return port
    return reactor.adoptStreamPort(fd, family, factory)


class AdoptedListener(Service):
    """Accepts on a listening socket the relay passed down, from the start until the stop.

    @ivar description: the listener's endpoint, as the configuration gives it.
    """

    def __init__(
        self, reactor: Any, description: str, fd: int, family: int, factory: Any
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self.port = adoptPort(self.reactor, self.fd, self.family, self.factory)
        finally:
            os.close(self.fd)
        log.info(
            "acceptor process {pid}: accepting on {endpoint}",
            pid=os.getpid(),
            endpoint=self.description,
        )

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


class RelayCounters:
    """The relay's AUTH throttle and abuse limits' counters, asked over our standard output
    and answered on our standard input (L{mailrelay.app.acceptors.ASK_RECORD}): a client's
    AUTH failures, connections and rates are counted in one place whichever process takes
    its connections, so that C{max_failures}, C{max_connections_per_client} and the rate
    limits hold as with one process.

    A question not answered within C{timeout} seconds fails: an AUTH attempt is then
    answered 454 (never checked uncounted), a limit is not applied (as when a shared
    store is down).  What such a question may have counted at the relay (a reservation, a
    session) is given back at once, so that the relay does not keep it.

    @ivar throttle: the L{RelayAuthThrottle} (an C{IAuthThrottle}).
    @ivar limiter: the L{RelayRateLimiter} (an C{IRateLimiter}).
    """

    def __init__(
        self, clock: Any, write: Callable[[str], object] | None = None, timeout: float = 10.0
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self._write = write if write is not None else sys.stdout.write
        self._serials = itertools.count(1)
        #: The questions waiting for their answer: C{serial: (op, Deferred)}.
        self._waiting: dict[int, tuple[str, Deferred[int]]] = {}
        #: Whether the relay answers no more (L{close}).
        self.closed = False
        self.throttle = RelayAuthThrottle(self)
        self.limiter = RelayRateLimiter(self)

    def ask(self, op: str, *args: str, undo: tuple[str, ...] = ()) -> Deferred[int]:
        """Ask the relay C{op} with C{args}; C{undo}: the question that gives back what
        C{op} counted, asked when C{op} gets no answer (a timeout, a cancellation)."""
        serial = next(self._serials)
        if self.closed:
            return fail(RelayUnavailable("the relay is stopping"))
        if any("\t" in a or "\n" in a for a in args):
            return fail(RelayUnavailable(f"a value of {op} cannot be sent: {args!r}"))
        try:
            self._write("\t".join((ASK_RECORD + str(serial), op, *args)) + "\n")
        except OSError as e:
            return fail(RelayUnavailable(f"the relay is gone: {e.strerror}"))
        d: Deferred[int] = Deferred()
        self._waiting[serial] = (op, d)
        d.addTimeout(self.timeout, self.clock)
        return d.addErrback(self._unanswered, serial, undo)

    def _unanswered(self, failure: Failure, serial: int, undo: tuple[str, ...]) -> Failure:
        self._waiting.pop(serial, None)
        if undo and not failure.check(RelayUnavailable):  # (else: nothing was counted)
            self.ask(*undo).addErrback(lambda _: None)
        return failure

    def close(self) -> None:
        """The relay will answer no more (our standard input ended: it stops, or is gone):
        the questions waiting fail now, and so will any asked later, rather than after the
        timeout."""
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for op, d in waiting.values():
            if op == "release":
                d.callback(0)  # (the relay gives back all we held when we end)
            else:
                d.errback(RelayUnavailable("the relay is stopping"))

    def answer(self, serial: int, count: str) -> None:
        """The relay's answer to question C{serial}: the count, or C{-} (it could not)."""
        op, d = self._waiting.pop(serial, ("", None))
        if d is None:
            return  # timed out already
        if count.isdigit():
            d.callback(int(count))
        else:
            d.errback(RelayUnavailable("the relay could not count it"))


class RelayUnavailable(Exception):
    """The relay gave no count."""


@implementer(IAuthThrottle)
class RelayAuthThrottle:
    """The relay's AUTH throttle, through L{RelayCounters}."""

    def __init__(self, counters: RelayCounters) -> None:
        self.counters = counters

    def reserve(self, client: str) -> Deferred[int]:
        return self.counters.ask("reserve", client, undo=("settle", client, "0"))

    def settle(self, client: str, failed: bool) -> Deferred[int]:
        return self.counters.ask("settle", client, "1" if failed else "0")


@implementer(IRateLimiter)
class RelayRateLimiter:
    """The relay's counters of the abuse limits, through L{RelayCounters}."""

    def __init__(self, counters: RelayCounters) -> None:
        self.counters = counters

    def acquire(self, key: str) -> Deferred[int]:
        return self.counters.ask("acquire", key, undo=("release", key))

    def release(self, key: str) -> Deferred[int]:
        if self.counters.closed:
            return succeed(0)  # (the relay gives back all we held when we end)
        return self.counters.ask("release", key)

    def hit(self, key: str, window: float) -> Deferred[int]:
        return self.counters.ask("hit", key, repr(float(window)))


class AcceptorServices(OrderedMultiService):
    """An acceptor's services (L{makeAcceptorServices}).

    @ivar sessions: its SMTP sessions.
    @ivar adopted: its listeners.
    @ivar counters: the L{RelayCounters} its AUTH attempts and limits are counted in.
    """

    def __init__(self, sessions: Any) -> None:
        super().__init__()
        self.sessions = sessions
        self.adopted: list[AdoptedListener] = []
        self.counters: RelayCounters | None = None

    def retire(self, clock: Any, drainTime: float) -> Deferred[None]:
        """A reload replaced us: accept no more connections, let the sessions open go on
        (with their configuration, as the relay's own do) and fire once they have ended,
        or after C{drainTime} seconds (the stop then ends them as a stop does)."""
        for listener in self.adopted:
            if listener.running:
                listener.stopService()
        done: Deferred[None] = Deferred()
        timer = clock.callLater(drainTime, done.callback, None)

        def gone(_: object) -> None:
            if timer.active():
                timer.cancel()
                done.callback(None)

        self.sessions.whenGone().addCallback(gone)
        return done


def makeAcceptorServices(
    config: Any, reactor: Any, sockets: list[tuple[str, int, int]], notify: Any
) -> AcceptorServices:
    """The receiving side of C{config} as one service: the spool (joined, not recovered: the
    relay did that), the plugins that are services, the sessions and a listener on each of
    C{sockets} (C{(endpoint, fd, family)}) of the configuration's listeners, started in that
    order and stopped in the reverse one.

    @param notify: called with the queue id of each message once it is durable.
    @raise mailrelay.errors.ConfigError: a plugin, certificate or password file is refused.
    """
    from mailrelay.app.delivery import makeSpool
    from mailrelay.app.listeners import SessionsService, _Carried, makeListeners
    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.app.services import PluginServices
    from mailrelay.config.plugins import buildHooks, makeContext
    from mailrelay.receive.protocol import Sessions

    sessions = Sessions()
    top = AcceptorServices(sessions)
    # The relay's counters, but a [rate_limiter] plugin's: every process uses its own
    # instance of that (a shared store).
    counters = top.counters = RelayCounters(reactor)
    carried = _Carried(limiter=None if config.rateLimiter is not None else counters.limiter)
    if config.auth is not None:
        carried.throttle, carried.throttleWindow = counters.throttle, config.auth.failureWindow
    spool = makeSpool(config, reactor, top, recover=False)
    # (Quiet: the relay has said what it had to say of this configuration.)
    context = makeContext(config, reactor, quiet=True)
    build = pluginBuilder(config, reactor, availablePlugins(), context)
    hooks = buildHooks(config, build, "relay")
    PluginServices(hooks.services).setServiceParent(top)
    SessionsService(sessions, reactor, config.drainTime).setServiceParent(top)
    factories = {
        name: factory
        for name, factory, _ in makeListeners(
            config, reactor, build, carried, spool, sessions, notify, hooks, quiet=True
        )
    }
    for endpoint, fd, family in sockets:
        if endpoint in factories:
            listener = AdoptedListener(reactor, endpoint, fd, family, factories[endpoint])
            listener.setServiceParent(top)
            top.adopted.append(listener)
        else:  # (the relay passes the sockets of this configuration's listeners only)
            os.close(fd)
    return top


def reportSessions(sessions: Any, clock: Any, write: Any) -> RecordReporter:
    """Say how many sessions we have open (L{SESSIONS_RECORD}, through C{write}) each
    second it changed, for the relay's C{mailrelay status}; the running reporter."""
    reporter = RecordReporter(clock, SESSIONS_RECORD, lambda: str(len(sessions.live)), write,
                              last="0")
    reporter.start(now=False)
    return reporter


def notifyRelay(queueID: str) -> None:
    """Tell the relay of a message made durable, at once (before its C{250} is sent); once
    the relay is gone, the spool keeps it for the next delivery process."""
    try:
        sys.stdout.write(QUEUED_RECORD + queueID + "\n")
    except OSError:
        log.warn("{queueID}: the relay is gone; queued, delivered after its restart",
                 queueID=queueID)


#: What the relay writes on our standard input when a reload replaced us.
RETIRE = b"retire"


class _FromRelay(LineReceiver, StopAtEnd):
    """Our standard input: the answers of the relay's counters (L{RelayCounters}), L{RETIRE}
    when a reload replaced us; its end tells us to stop."""

    delimiter = b"\n"

    def __init__(self, reactor: Any, services: AcceptorServices, drainTime: float) -> None:
        super().__init__(reactor)
        self.services = services
        self.drainTime = drainTime

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(_ANSWER):
            serial, _, count = line[len(_ANSWER) :].decode("ascii", "replace").partition("\t")
            if self.services.counters is not None and serial.isdigit():
                self.services.counters.answer(int(serial), count.strip())
            return
        if line.strip() == RETIRE:
            log.info(
                "acceptor process {pid}: replaced by a reload; ending once its {count} "
                "session(s) have ended",
                pid=os.getpid(),
                count=len(self.services.sessions.live),
            )
            d = self.services.retire(self.reactor, self.drainTime)
            d.addCallback(lambda _: stopReactor(self.reactor))


    def readConnectionLost(self) -> None:
        if self.services.counters is not None:
            self.services.counters.close()
        super().readConnectionLost()

def _parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = childArguments("mailrelay.app.acceptorprocess")
    parser.add_argument(
        USERS_OPTION,
        type=int,
        help="a descriptor to read the users the relay serves with from (JSON: "
        "{password file: {user: hash}})",
    )
    parser.add_argument(
        TLS_FILES_OPTION,
        type=int,
        help="a descriptor to read the listeners' certificates and keys the relay serves "
        "from (JSON: {path: base64})",
    )
    parser.add_argument(
        "--listeners",
        default="[]",
        help='JSON: [[endpoint, fd, family], ...], family one of "inet", "inet6", "unix"',
    )
    return parser.parse_args(argv)


def preload() -> None:
    """Import what an acceptor process imports as it starts (see
    L{mailrelay.app.deliveryprocess.preload})."""
    import mailrelay.app.listeners
    import mailrelay.config.plugins
    import mailrelay.receive.protocol  # noqa: F401


def forkedMain(argv: list[str]) -> int:
    """An acceptor process forked by the fork server (L{mailrelay.app.forkserver}): as
    C{python -m mailrelay.app.acceptorprocess ARGV}."""
    return _childMain(argv, forked=True)


def _childMain(argv: list[str], forked: bool = False) -> int:
    from twisted.internet import reactor

    options = _parseArguments(argv)
    sockets = [(str(e), int(fd), int(FAMILIES[f])) for e, fd, f in json.loads(options.listeners)]

    def build(config: Any) -> Any:
        services = makeAcceptorServices(config, reactor, sockets, notifyRelay)
        services.privilegedStartService()
        return services

    relayUsers = None
    if options.users_fd is not None:
        relayUsers = json.loads(_readConfigText(options.users_fd) or b"{}")
    relayFiles = None
    if options.tls_files_fd is not None:
        encoded = json.loads(_readConfigText(options.tls_files_fd) or b"{}")
        relayFiles = {path: base64.b64decode(data) for path, data in encoded.items()}
    started = startChild(options, "acceptor process", build, forked, relayUsers=relayUsers,
                         relayFiles=relayFiles)
    if isinstance(started, int):
        return started
    config, services = started
    reportSessions(services.sessions, reactor, sys.stdout.write)
    return runChild(
        reactor,
        services,
        _FromRelay(reactor, services, config.drainTime),
        reportMetrics=config.metricsListen is not None,
        what="acceptor process",
    )


if __name__ == "__main__":  # pragma: no cover - run as the child process
    sys.exit(_childMain(sys.argv[1:]))
