"""The delivery process's composition root (C{python -m mailrelay.app.deliveryprocess}): the
spool, the backends and the queue manager of the relay's configuration, fed with queue ids on
standard input, logging to standard output, answering the queue commands the relay forwards
(L{mailrelay.queue.commands}) on the control connection it is given (C{--control-fd}).  The
relay's side, and the whole process model, are in L{mailrelay.queue.process}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, Logger, formatEventAsClassicLogText, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer, provider

from mailrelay.app.clocksteps import followClockSteps
from mailrelay.app.logs import LevelFilter, filtered
from mailrelay.app.services import stopOnSignals, stopReactor
from mailrelay.queue.process import COUNTED_RECORD, METRICS_RECORD, RESCAN, encodeLogEvent

log = Logger()

__all__ = ["makeDeliveryServices"]


# -- the child ----------------------------------------------------------------------------------


def makeDeliveryServices(
    config: Any, reactor: Any, available: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """The spool, the plugins of the delivery side's hooks that are services, the delivery
    backends and the queue manager of C{config} (with the intake its notifications enter the
    spool through: L{makeDelivery}), as one service (started in that order, stopped in the
    reverse order, each after the one before has finished), and the queue manager.

    @param available: the installed plugins by name (by default, looked for:
        L{mailrelay.config.plugins.availablePlugins}).

    @raise mailrelay.errors.ConfigError: a route, a backend or a header stamper plugin is
        refused.
    """
    from mailrelay.app.delivery import makeDelivery, makeSpool
    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.app.services import OrderedMultiService, PluginServices
    from mailrelay.config.plugins import buildHooks, makeContext

    top = OrderedMultiService()
    # The relay's process recovered the spool before starting us.
    spool = makeSpool(config, reactor, top, recover=False)
    # (Quiet: the relay has said what it had to say of this configuration.)
    if available is None:
        available = availablePlugins()
    build = pluginBuilder(config, reactor, available, makeContext(config, reactor, quiet=True))
    hooks = buildHooks(config, build, "delivery")
    PluginServices(hooks.services).setServiceParent(top)
    services, queue = makeDelivery(config, reactor, spool, build, hooks)
    for service in services:
        service.setServiceParent(top)
    return top, queue


def dieWithParent(parentPID: int) -> bool:
    """Ask the kernel to send us SIGTERM when our parent dies (Linux's C{PR_SET_PDEATHSIG}),
    so that a delivery process never runs on after its relay was killed.  Returns C{False}
    when the parent is already gone."""
    from mailrelay.app.forkserver import deathSignal

    if sys.platform.startswith("linux"):
        try:
            deathSignal(signal.SIGTERM)
        except (OSError, AttributeError):
            pass  # the end of our standard input still tells us
    return os.getppid() == parentPID


def _readConfigText(fd: int) -> bytes:
    chunks = []
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def childArguments(module: str) -> argparse.ArgumentParser:
    """The command line every child of the relay takes (what L{startChild} reads: the
    configuration, the overrides, the parent's process id); C{module} is the child's."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--config")
    parser.add_argument("--config-fd", type=int)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--parent-pid", type=int)
    return parser


@functools.cache
def _arguments() -> argparse.ArgumentParser:
    """The delivery process's command line: made once, by L{preload} before the fork when
    the fork server forks us (see L{preload})."""
    parser = childArguments("mailrelay.app.deliveryprocess")
    parser.add_argument("--control-fd", type=int)
    # (Given by the relay to the first one the fork server forks: see childConfig.)
    parser.add_argument("--forked-config", action="store_true")
    return parser


def _parseArguments(argv: list[str]) -> argparse.Namespace:
    return _arguments().parse_args(argv)


def relayObserver(out: Any, err: Any) -> ILogObserver:
    """The observer sending each event to the relay's process as one line on C{out}
    (L{encodeLogEvent}); once C{out} fails (the relay is gone: killed), to C{err} as text.

    It provides C{ILogObserver} itself: L{filtered} would otherwise wrap it as a legacy
    observer, which converted every event to Twisted's legacy form first (a copy of the
    event and a handful of keys added, every event: about 2% of the delivery process's
    samples in a py-spy profile)."""
    relayGone: list[bool] = []

    @provider(ILogObserver)
    def toRelay(event: dict[str, Any]) -> None:
        if not relayGone:
            try:
                out.write(encodeLogEvent(event))
                return
            except OSError:  # the relay is gone (killed): finish logging to our stderr
                relayGone.append(True)
        err.write(formatEventAsClassicLogText(event) or "")
        err.flush()

    return cast(ILogObserver, toRelay)


def _logToRelay(levels: LevelFilter, forked: bool = False) -> None:
    """Send every log event at C{levels} or above to the relay's process, one line each on
    our standard output (L{relayObserver}: the events below are never formatted), each
    flushed as it is written (a pipe would otherwise hold them in a block buffer); once the
    relay is gone, to our standard error.  C{forked} (by the fork server): the events logged
    before are the relay's own, from before it forked the server: not ours to replay."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    globalLogBeginner.beginLoggingTo(
        [filtered(relayObserver(sys.stdout, sys.stderr), levels)], discardBuffer=forked,
        redirectStandardIO=False,
    )


def tellRelay(out: Any) -> Callable[[Any, dict[str, str]], None]:
    """What tells the relay's process of a count at once (L{mailrelay.metrics.countNow}):
    a L{COUNTED_RECORD} line on C{out}, which it keeps should we be killed before our next
    snapshot; nothing once the relay is gone."""

    def tell(metric: Any, labels: dict[str, str]) -> None:
        try:
            out.write(f"{COUNTED_RECORD}{json.dumps([metric.name, labels])}\n")
        except OSError:  # the relay is gone: nobody to tell
            pass

    return tell


#: Seconds between two snapshots of our metrics sent to the relay (when something changed).
METRICS_INTERVAL = 1.0


class RecordReporter:
    """Sends C{prefix + current()} to the relay's process, as a record on our standard output
    beside the log lines (through C{write}, C{sys.stdout.write} by default), every
    L{METRICS_INTERVAL} seconds when it changed since the last one sent (C{last} at first);
    stops once the relay is gone.  Our metrics (L{METRICS_RECORD}), an acceptor's sessions."""

    def __init__(self, clock: Any, prefix: str, current: Any, write: Any = None,
                 last: str = "") -> None:
        from twisted.internet.task import LoopingCall

        self._prefix, self._current, self._write = prefix, current, write
        self._last = last
        self._loop = LoopingCall(self.send)
        self._loop.clock = clock

    def start(self, now: bool = True) -> None:
        self._loop.start(METRICS_INTERVAL, now=now)

    def send(self) -> None:
        text = self._current()
        if text == self._last:
            return
        try:
            (self._write or sys.stdout.write)(self._prefix + text + "\n")
        except OSError:  # the relay is gone: nobody to report to
            self.stop()
            return
        self._last = text

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


@implementer(IHalfCloseableProtocol)
class StopAtEnd(Protocol):
    """A child's standard input from the relay: its end tells us to stop (the relay is
    stopping, reloading, or gone); the shutdown trigger stops the services in order."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def readConnectionLost(self) -> None:
        stopReactor(self.reactor)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.readConnectionLost()


class _Feed(LineReceiver, StopAtEnd):
    """Our standard input: the queue ids the relay committed, one per line; its end tells
    us to stop."""

    delimiter = b"\n"

    def __init__(self, queue: Any, reactor: Any) -> None:
        self.queue = queue
        self.reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        queueID = line.strip().decode("ascii", "replace")
        if queueID == RESCAN:
            self.queue.rescan()
        elif queueID:
            self.queue.enqueue(queueID)


def queueControl(queue: Any, reactor: Any) -> Any:
    """The L{QueueControl} of the queue manager C{queue}, reading envelopes in the reactor's
    thread pool."""
    from twisted.internet.threads import deferToThreadPool

    from mailrelay.queue.control import QueueControl

    def deferToThread(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return QueueControl(queue.spool, queue, reactor, deferToThread=deferToThread)


def answerControl(reactor: Any, fd: int, control: Any) -> None:
    """Answer the queue commands the relay sends on the connected socket C{fd} (one end of
    a socket pair; closed here once the reactor has its own copy)."""
    import socket

    from twisted.internet.protocol import Factory

    from mailrelay.queue.commands import ControlLocator, QuietAMP

    os.set_blocking(fd, False)
    os.set_inheritable(fd, False)
    try:
        factory = Factory.forProtocol(lambda: QuietAMP(locator=ControlLocator(control)))
        reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
    finally:
        os.close(fd)


def _run(
    reactor: Any, services: Any, queue: Any, controlFD: int | None = None,
    reportMetrics: bool = False,
) -> int:
    """Run the reactor with C{services} started, until our input ends (or SIGTERM); the exit
    status.  With C{controlFD}, answer the relay's queue commands on it; with
    C{reportMetrics}, our metrics go to the relay (L{RecordReporter})."""

    def setUp() -> None:
        if controlFD is not None:
            answerControl(reactor, controlFD, queueControl(queue, reactor))

    return runChild(
        reactor, services, _Feed(queue, reactor), setUp=setUp, reportMetrics=reportMetrics,
        what="delivery process",
    )


def runChild(
    reactor: Any,
    services: Any,
    feed: Any,
    *,
    setUp: Any = None,
    reportMetrics: bool = False,
    what: str,
) -> int:
    """Run the reactor of a child of the relay (the delivery process, an acceptor process)
    with C{services} started, until its input ends (or SIGTERM); the exit status.  C{feed}
    reads our standard input (and stops the reactor at its end); C{setUp} runs before the
    services start; with C{reportMetrics}, our metrics go to the relay
    (L{RecordReporter})."""
    from twisted.internet import stdio

    from mailrelay.app.memory import releaseFreeMemory

    exitCode = [0]
    reporter = None
    if reportMetrics:
        from mailrelay.metrics import snapshot, tellCounts

        reporter = RecordReporter(reactor, METRICS_RECORD, snapshot)
        tellCounts(tellRelay(sys.stdout))

    def start() -> None:
        # Our standard output carries the log records; StandardIO gets /dev/null to write to.
        # It comes first, so that the end of our input stops us whatever happens next.
        devnull = os.open(os.devnull, os.O_WRONLY)
        # (typed from the Windows module, which has no stdin/stdout arguments)
        stdio.StandardIO(feed, stdin=0, stdout=devnull)  # type: ignore[call-arg]
        # reactor.stop (end of input, SIGTERM) waits for the services to stop in order (the
        # queue manager's deliveries, the sessions), then for the spool to close.
        reactor.addSystemEventTrigger("before", "shutdown", services.stopService)
        try:
            if setUp is not None:
                setUp()
            services.startService()
        except Exception:
            log.failure("{what}: start-up failed; exiting (the relay restarts it)", what=what)
            exitCode[0] = 1
            stopReactor(reactor)
            return
        if reporter is not None:
            reporter.start()
        releaseFreeMemory()  # (what starting left free)

    stopOnSignals(reactor)
    followClockSteps(reactor)
    reactor.callWhenRunning(start)
    reactor.run()
    if reporter is not None:
        reporter.stop()
        reporter.send()  # the counts of what finished while stopping
    return exitCode[0]


def startChild(
    options: argparse.Namespace, what: str, build: Any, forked: bool = False,
    listenerTLS: bool = True, relayUsers: Any = None, relayFiles: Any = None,
) -> Any:
    """What a child of the relay does first: die with the relay, ignore SIGINT (the relay
    stops us: a Ctrl-C meant for it must not cut our work short; SIGTERM, also sent when the
    relay dies, stops us cleanly), read the configuration the relay passed, send our log to
    the relay at its level, and C{build(config)}, the services to run, privileged start
    done.  Returns C{(config, build's result)}, or the exit status when we must not run (the
    relay is gone: said on standard error; the configuration is refused, or a service
    cannot start: logged, in the relay's log).

    @param options: the child's options: C{config}, C{config_fd}, C{overrides},
        C{parent_pid}.
    @param forked: we were forked by the fork server (L{mailrelay.app.forkserver}), not
        started afresh.
    @param relayUsers: the users the relay serves with, by password file (see
        L{mailrelay.config.loadConfig}), or C{None}.
    @param relayFiles: the bytes of the listeners' certificates and keys the relay
        serves, by path (see L{mailrelay.config.loadConfig}), or C{None}.
    """
    from mailrelay.errors import ConfigError
    from mailrelay.namedfile import explainPermissions

    explainPermissions()  # (one of the relay's processes: see readError)
    if options.parent_pid is not None and not dieWithParent(options.parent_pid):
        print(f"mailrelay {what}: the relay is gone; not starting", file=sys.stderr)
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configText = _readConfigText(options.config_fd) if options.config_fd is not None else None
    levels = LevelFilter()
    _logToRelay(levels, forked)
    try:
        config = childConfig(options, configText, forked, listenerTLS=listenerTLS,
                             relayUsers=relayUsers, relayFiles=relayFiles)
        levels.setLevel(config.logLevel)
        if config.metricsListen is not None:  # we count, and report to the relay
            from mailrelay.metrics import enable

            enable()
        built = build(config)
    except ConfigError as e:
        # Refused here after the relay took it (a site's plugin module edited since the
        # relay imported it, and imported anew by this process): said in the relay's log,
        # as below.
        log.error("{what}: configuration error: {error}", what=what, error=str(e))
        return 1
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        # A service that cannot start (the spool: its tmp/ not writable, its file system
        # out of inodes) says why in the relay's log, before the relay restarts us: on our
        # standard error alone it was lost (a forked child's exit drops it; a daemon's is
        # /dev/null).
        log.error(
            "{what}: start-up failed; exiting (the relay restarts it): {error}",
            what=what,
            error=str(e.code).removeprefix("mailrelay: error: "),
        )
        return 1
    return config, built


def childConfig(
    options: argparse.Namespace, configText: bytes | None, forked: bool, *,
    listenerTLS: bool = True, relayUsers: Any = None, relayFiles: Any = None,
) -> Any:
    """The configuration of a child of the relay (L{startChild}'s arguments): the one the
    relay parsed before it forked the fork server, when we were forked by it, the relay
    said so (C{--forked-config}: the first delivery process on the configuration the relay
    started with) and it was parsed from the same path, overrides and bytes
    (L{mailrelay.app.forkserver.forkedConfig}); else parsed.

    @raise mailrelay.errors.ConfigError: it is refused.
    """
    from mailrelay.config import loadConfig

    overrides = json.loads(options.overrides)
    if forked and getattr(options, "forked_config", False) and not relayUsers and not relayFiles:
        from mailrelay.app.forkserver import forkedConfig

        config = forkedConfig(options.config, overrides, configText)
        if config is not None:
            return config
    return loadConfig(options.config, overrides, text=configText, listenerTLS=listenerTLS,
                      relayUsers=relayUsers, relayFiles=relayFiles)


def preload() -> None:
    """Import what the delivery process imports as it starts and runs (without installing
    a reactor): done by the relay before it forks the fork server
    (L{mailrelay.app.forkserver}), so that the delivery process shares it."""
    import ctypes  # noqa: F401 - dieWithParent's (forkserver.deathSignal)
    import importlib

    # (default: imports the default reactor's module; the reactor is installed by the child)
    from twisted.internet import default, protocol, stdio, task, threads  # noqa: F401

    import mailrelay.app.delivery
    import mailrelay.app.plugins
    import mailrelay.app.services
    import mailrelay.config
    import mailrelay.config.plugins
    import mailrelay.queue.commands
    import mailrelay.queue.control
    import mailrelay.queue.lock  # noqa: F401
    from mailrelay.delivery import BUILTIN_BACKENDS

    for name in BUILTIN_BACKENDS:
        importlib.import_module(f"mailrelay.delivery.{name}")
    mailrelay.app.plugins.availablePlugins()  # imports the dropins
    # Made in the child, the parser (argparse's objects, its gettext lookups) copied 0.3
    # MiB of the pages it shares with the relay and the fork server (issue 11).
    _arguments()


def forkedMain(argv: list[str]) -> int:
    """The delivery process forked by the fork server (L{mailrelay.app.forkserver}): as
    C{python -m mailrelay.app.deliveryprocess ARGV}."""
    return _childMain(argv, forked=True)


def _childMain(argv: list[str], forked: bool = False) -> int:
    from twisted.internet import reactor

    def build(config: Any) -> Any:
        from mailrelay.app.forkserver import forkedPlugins

        services, queue = makeDeliveryServices(config, reactor, forkedPlugins(config))
        services.privilegedStartService()
        return services, queue

    options = _parseArguments(argv)
    # It serves no listener: their keys (perhaps readable by root only, the relay having
    # read them before dropping its privileges) are not read.
    started = startChild(options, "delivery process", build, forked, listenerTLS=False)
    if isinstance(started, int):
        return started
    config, (services, queue) = started
    return _run(
        reactor, services, queue, options.control_fd,
        reportMetrics=config.metricsListen is not None,
    )


if __name__ == "__main__":  # pragma: no cover - run as the child process
    sys.exit(_childMain(sys.argv[1:]))
