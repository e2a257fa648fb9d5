"""The queue manager in a process of its own, so that delivery and acceptance use two cores.

Like Postfix's qmgr beside its smtpd processes: the relay's main process accepts mail and
commits it to the spool; a child process (C{python -m mailrelay.qmgrprocess}) runs the queue
manager and the delivery backends over the same spool.  The main process tells the child of
each committed entry by writing its queue id, one per line, to the child's standard input --
the child never rescans the spool, and a lost notification costs nothing: whatever is in the
spool is delivered when the child (re)starts.  The child sends its log events, formatted, one
line each, on its standard output; the main process publishes them to its own log observers,
so they go wherever the relay logs (stdout with C{-n}, C{twistd.log} when daemonised), as if logged there.

When the child exits unexpectedly it is started again (after a pause that doubles, up to a
minute).  When the relay stops, the child's standard input is closed; the child stops its
queue manager (letting deliveries in flight record their state) and exits.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher

log = Logger()

#: How long the relay waits for the delivery process to stop before killing it.
STOP_TIMEOUT = 40.0
_RESTART_MIN = 1.0
_RESTART_MAX = 60.0


#: A log record longer than this is dropped (with a note) rather than buffered without bound.
_MAX_RECORD = 1024 * 1024


def encodeLogEvent(event: dict[str, Any]) -> str:
    """One line for the relay's process: time, namespace, level and the formatted text
    (with its traceback, if any), tab-separated, backslashes and newlines escaped.  The child
    formats its events itself: the relay only copies them into its log, cheaply."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    level = event.get("log_level")
    return "{}\t{}\t{}\t{}\n".format(
        event.get("log_time", 0.0),
        event.get("log_namespace", "-"),
        getattr(level, "name", "info"),
        text,
    )


def decodeLogEvent(line: str) -> dict[str, Any]:
    """The event L{encodeLogEvent} wrote.  @raise ValueError: not such a line."""
    when, namespace, level, text = line.split("\t", 3)
    text = (
        text.replace("\\\\", "\x00").replace("\\n", "\n").replace("\\r", "\r").replace("\x00", "\\")
    )
    return {
        "log_time": float(when),
        "log_namespace": namespace,
        "log_level": LogLevel.levelWithName(level),
        "log_format": "{log_text}",
        "log_text": text,
    }


class _ChildProtocol(ProcessProtocol):
    def __init__(self, service: "DeliveryProcessService") -> None:
        self.service = service
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        """Log events from the child: publish each to our own observers."""
        self._buffer += data
        *records, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_RECORD:
            log.error("delivery process: log record over {limit} bytes dropped", limit=_MAX_RECORD)
            self._buffer = b""
        for record in records:
            if not record:
                continue
            try:
                event = decodeLogEvent(record.decode("utf-8", "replace"))
            except (ValueError, KeyError):
                log.warn("delivery process: {line}", line=record.decode("utf-8", "replace"))
                continue
            globalLogPublisher(event)

    def processEnded(self, reason: Any) -> None:
        self.service._childEnded(self, reason)
        self.ended.callback(None)


class DeliveryProcessService(Service):
    """Runs and feeds the delivery process.

    @param argv: the command-line overrides and configuration file of the relay, passed on to
        the child so that it builds the same configuration.
    """

    name = "delivery-process"

    def __init__(self, reactor: Any, configPath: str | None, overrides: dict[str, Any]) -> None:
        self.reactor = reactor
        self.configPath = configPath
        self.overrides = overrides
        self._child: _ChildProtocol | None = None
        self._backlog: list[bytes] = []
        self._restartDelay = _RESTART_MIN
        self._restartCall: Any = None
        self._stopping = False

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "mailrelay.qmgrprocess", "--overrides", json.dumps(self.overrides)]
        if self.configPath is not None:
            args += ["--config", os.path.abspath(self.configPath)]
        return args

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._spawn()

    def _spawn(self) -> None:
        self._restartCall = None
        child = _ChildProtocol(self)
        args = self.command()
        self.reactor.spawnProcess(
            child,
            args[0],
            args,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: 2},
        )
        self._child = child
        log.info("delivery process started (pid {pid})", pid=child.transport.pid)
        backlog, self._backlog = self._backlog, []
        for line in backlog:
            child.transport.write(line)

    def enqueue(self, queueID: str) -> None:
        """Tell the delivery process of a newly committed entry."""
        line = queueID.encode("ascii") + b"\n"
        child = self._child
        if child is None:
            # Between a crash and the restart: the restarted child scans the spool anyway,
            # but keep the order of arrival for it.
            self._backlog.append(line)
            return
        child.transport.write(line)

    def _childEnded(self, child: _ChildProtocol, reason: Any) -> None:
        if child is self._child:
            self._child = None
        if self._stopping:
            return
        code = getattr(reason.value, "exitCode", None)
        log.error(
            "delivery process exited unexpectedly ({reason}); restarting in {delay:.0f}s",
            reason=reason.getErrorMessage() if code is None else f"status {code}",
            delay=self._restartDelay,
        )
        self._restartCall = self.reactor.callLater(self._restartDelay, self._spawn)
        self._restartDelay = min(_RESTART_MAX, self._restartDelay * 2)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        child = self._child
        if child is None:
            return succeed(None)
        child.transport.closeStdin()  # the child stops its queue manager and exits
        kill = self.reactor.callLater(STOP_TIMEOUT, self._kill, child)

        def ended(_: object) -> None:
            if kill.active():
                kill.cancel()

        return child.ended.addCallback(ended)

    def _kill(self, child: _ChildProtocol) -> None:
        log.error("delivery process did not stop in {timeout}s; killing it", timeout=STOP_TIMEOUT)
        try:
            child.transport.signalProcess("KILL")
        except ierror.ProcessExitedAlready:
            pass


# -- the child ----------------------------------------------------------------------------------


def makeDeliveryServices(config: Any, reactor: Any) -> tuple[Any, Any]:
    """The spool, the delivery backends and the queue manager of C{config}, as one service
    (started in that order), and the queue manager.

    @raise mailrelay.errors.ConfigError: a route or backend plugin is refused.
    """
    from twisted.application.service import MultiService

    from mailrelay.service import makeDelivery, makeSpool, pluginBuilder

    top = MultiService()
    # The relay's process recovered the spool before starting us.
    spool = makeSpool(config, reactor, top, recover=False)
    services, queue = makeDelivery(config, reactor, spool, pluginBuilder(config, reactor))
    for service in services:
        service.setServiceParent(top)
    return top, queue


def _stopReactor(reactor: Any) -> None:
    try:
        reactor.stop()
    except ierror.ReactorNotRunning:  # already stopping (a signal got there first)
        pass


def _childMain(argv: list[str]) -> int:
    import argparse

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner
    from twisted.protocols.basic import LineReceiver

    from zope.interface import implementer
    from twisted.internet.interfaces import IHalfCloseableProtocol

    from mailrelay.config import loadConfig
    from mailrelay.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m mailrelay.qmgrprocess")
    parser.add_argument("--config")
    parser.add_argument("--overrides", default="{}")
    options = parser.parse_args(argv)
    # Log events go to the relay's process as JSON records on our standard output, each
    # flushed as it is written (a pipe would otherwise hold them in a block buffer).
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    def toRelay(event: dict[str, Any]) -> None:
        sys.stdout.write(encodeLogEvent(event))

    globalLogBeginner.beginLoggingTo([toRelay], redirectStandardIO=False)
    try:
        config = loadConfig(options.config, json.loads(options.overrides))
        services, queue = makeDeliveryServices(config, reactor)
        services.privilegedStartService()
    except ConfigError as e:
        print(f"mailrelay delivery process: configuration error: {e}", file=sys.stderr)
        return 1

    @implementer(IHalfCloseableProtocol)
    class Feed(LineReceiver):
        delimiter = b"\n"
        stopping = False

        def lineReceived(self, line: bytes) -> None:
            queueID = line.strip().decode("ascii", "replace")
            if queueID:
                queue.enqueue(queueID)

        def readConnectionLost(self) -> None:
            # The relay closed our input: it is stopping (or gone).  Stop cleanly.
            if not self.stopping:
                self.stopping = True
                d = services.stopService()
                d.addBoth(lambda _: _stopReactor(reactor))

        def writeConnectionLost(self) -> None:
            pass

        def connectionLost(self, reason: Any = None) -> None:
            self.readConnectionLost()

    def start() -> None:
        services.startService()
        # Our standard output carries the log records; StandardIO gets /dev/null to write to.
        stdio.StandardIO(Feed(), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))

    reactor.callWhenRunning(start)
    reactor.run()
    return 0


if __name__ == "__main__":  # pragma: no cover - run as the child process
    sys.exit(_childMain(sys.argv[1:]))
