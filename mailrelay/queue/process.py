"""The queue manager in a process of its own, so that delivery and acceptance use two cores.

Like Postfix's qmgr beside its smtpd processes: the relay's main process accepts mail and
commits it to the spool; a child process (C{python -m mailrelay.app.deliveryprocess}) runs
the queue manager and the delivery backends over the same spool.  The main process tells the
child of each committed entry by writing its queue id, one per line, to the child's standard
input; a notification lost costs a delay, not a message: whatever is in the spool is
delivered when the child (re)starts, and the queue manager looks into the spool for entries
nobody announced every C{[queue] rescan_interval} seconds
(L{mailrelay.queue.manager.QueueManager}).  The child sends its log events, formatted, one
line each, on its standard output (L{encodeLogEvent}); the main process
publishes them to its own log observers, so they go wherever the relay logs (stdout with
C{-n}, C{twistd.log} when daemonised), as if logged there.  When metrics are served, the child
also sends a snapshot of its metrics every second on that channel (L{METRICS_RECORD}), which
the main process keeps for its exposition (L{DeliveryProcessService.metrics}).

The queue commands of the operator (L{mailrelay.queue.commands}), which the relay receives on
its control socket, are forwarded to the child over a connection of their own: one end of a
socket pair, the child's file descriptor 4 (C{--control-fd}), speaking AMP
(L{DeliveryProcessService.queueCommand}); the child answers them with its queue manager.

When the child exits unexpectedly it is started again (after a pause that doubles, up to a
minute).  When the relay stops or reloads, the child's standard input is closed; the child
stops its queue manager -- deliveries in flight run to their end (at most the drain time) and
are recorded -- then closes its backends and the spool, and exits.  The child also stops so
when it gets SIGTERM, which Linux sends it when the relay dies (C{PR_SET_PDEATHSIG}); and only
one queue manager delivers from a spool at a time (L{mailrelay.queue.lock}), so a relay
restarted after C{kill -9} starts a child that waits for the old one to finish.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp

from mailrelay.metrics import ProcessMetrics, declared
from mailrelay.queue.commands import QuietAMP
from mailrelay.queue.control import QueueUnavailable

log = Logger(namespace="mailrelay.queue")

__all__ = [
    "COUNTED_RECORD",
    "METRICS_RECORD",
    "ChildSupervisor",
    "DeliveryProcessService",
    "decodeLogEvent",
    "encodeLogEvent",
]

#: Seconds after its drain time when a delivery process told to stop is killed.
_KILL_MARGIN = 15.0
_RESTART_MIN = 1.0
_RESTART_MAX = 60.0


#: The child's file descriptor of its end of the control connection.
CONTROL_FD = 4

#: Seconds the child may take to answer a queue command.
COMMAND_TIMEOUT = 300.0

#: Why there is no delivery process to answer a queue command, by its state.
_UNAVAILABLE = {
    "off": "no delivery process runs: [queue] hold = true",
    "restarting": "the delivery process exited and is being restarted; try again shortly",
}

#: A log record longer than this is dropped (with a note) rather than buffered without bound.
_MAX_RECORD = 1024 * 1024

#: How a line of the child's standard output carrying a snapshot of its metrics starts
#: (then the snapshot, L{mailrelay.metrics.snapshot}); every other line is a log event.
METRICS_RECORD = "metrics\t"
_METRICS_RECORD = METRICS_RECORD.encode("ascii")
#: How a line telling one count at once starts (then C{[counter name, labels]} in JSON:
#: L{mailrelay.metrics.countNow}), which the relay keeps if the child is killed before its
#: next snapshot.
COUNTED_RECORD = "counted\t"
_COUNTED_RECORD = COUNTED_RECORD.encode("ascii")


def eventText(event: dict[str, Any]) -> str:
    """The text of C{event}, as Twisted's C{formatEvent} gives it, cheaper: C{log_format}
    applied by C{str.format_map} (in C); flattened events, the C{{name()}} call syntax and
    anything that fails to format so go to C{formatEvent}."""
    form = event.get("log_format")
    if type(form) is str and "log_flattened" not in event:
        try:
            return form.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def encodeLogEvent(event: dict[str, Any]) -> str:
    """One line for the relay's process: time, namespace, level, system and the formatted
    text (with its traceback, if any), tab-separated, backslashes, newlines and tabs escaped
    (L{_escape}).  The child formats its events itself: the relay only copies them into its
    log, cheaply.

    The system is empty for an event without one (the relay's log then shows
    C{namespace#level}, as for its own); events logged through C{twisted.python.log} have
    one (C{"-"}, or what the caller gave), shown as the relay shows its own."""
    text = eventText(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    level = event.get("log_level")
    system = event.get("log_system")
    return "{}\t{}\t{}\t{}\t{}\n".format(
        event.get("log_time", 0.0),
        event.get("log_namespace", "-"),
        getattr(level, "name", "info"),
        "" if system is None else _escape(str(system)),
        _escape(text),
    )


def _unescape(text: str) -> str:
    return (
        text.replace("\\\\", "\x00")
        .replace("\\n", "\n")
        .replace("\\r", "\r")
        .replace("\\t", "\t")
        .replace("\x00", "\\")
    )


def decodeLogEvent(line: str) -> dict[str, Any]:
    """The event L{encodeLogEvent} wrote.  @raise ValueError: not such a line."""
    when, namespace, level, system, text = line.split("\t", 4)
    event = {
        "log_time": float(when),
        "log_namespace": namespace,
        "log_level": LogLevel.levelWithName(level),
        "log_format": "{log_text}",
        "log_text": _unescape(text),
    }
    if system:
        event["log_system"] = _unescape(system)
    return event



#: The line that asks the delivery process to rescan the spool (never a queue id).
RESCAN = "rescan"

def endReason(transport: Any, reason: Any) -> str:
    """How a child process ended, for the log: its exit status or signal, or that it is
    unknown -- a child forked by a fork server that is gone is not the relay's to wait for
    (its transport says C{statusUnknown}: L{mailrelay.app.forkserver})."""
    if getattr(transport, "statusUnknown", False):
        return "its status unknown: the fork server that started it is gone"
    code = getattr(reason.value, "exitCode", None)
    return reason.getErrorMessage() if code is None else f"status {code}"

class _Control(QuietAMP):
    """The relay's end of a child's control connection."""

    connected = False

    def connectionMade(self) -> None:
        self.connected = True
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        super().connectionLost(reason)


class _ChildProtocol(ProcessProtocol):
    """The relay's end of a child process that logs (and reports its metrics) on its standard
    output: L{recordReceived} takes each line.

    @ivar what: what the log calls the child (C{"delivery process"}).
    """

    what = "delivery process"

    def __init__(self, service: Any) -> None:
        self.service = service
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""
        #: The process id (kept after the process has ended, for the log).
        self.pid: int | None = None
        #: The AMP connection its queue commands go over, once connected.
        self.control: _Control | None = None
        #: When it was started, on the monotonic clock (L{ChildSupervisor.monotonic}).
        self.began: float | None = None
        #: The counts it told at once (L{COUNTED_RECORD}), by counter name and labels.
        self._told: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    @property
    def process(self) -> IProcessTransport:
        """The child process (once started)."""
        assert self.transport is not None
        return self.transport

    def makeConnection(self, transport: Any) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def outReceived(self, data: bytes) -> None:
        """Log events from the child: publish each to our own observers."""
        self._buffer += data
        *records, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_RECORD:
            log.error(
                "{what}: log record over {limit} bytes dropped", what=self.what, limit=_MAX_RECORD
            )
            self._buffer = b""
        for record in records:
            if record:
                self.recordReceived(record)

    def recordReceived(self, record: bytes) -> None:
        """One line of the child's standard output: a snapshot of its metrics, or a log
        event (published to our own observers)."""
        if record.startswith(_METRICS_RECORD):
            self._metrics(record[len(_METRICS_RECORD) :])
            return
        if record.startswith(_COUNTED_RECORD):
            self._countTold(record[len(_COUNTED_RECORD) :])
            return
        try:
            event = decodeLogEvent(record.decode("utf-8", "replace"))
        except (ValueError, KeyError):
            log.warn("{what}: {line}", what=self.what, line=record.decode("utf-8", "replace"))
            return
        globalLogPublisher(self.received(event))

    def received(self, event: dict[str, Any]) -> dict[str, Any]:
        """C{event} from the child as our observers are to see it: as it is."""
        return event

    def _metrics(self, record: bytes) -> None:
        try:
            self.service.metrics.update(self, record.decode("utf-8"))
        except ValueError as e:  # (UnicodeDecodeError and JSON's errors are ValueErrors)
            log.error(
                "{what}: bad metrics record dropped: {error}", what=self.what, error=str(e)
            )

    def _countTold(self, record: bytes) -> None:
        try:
            name, labels = json.loads(record)
            if declared(name) is None or not isinstance(labels, dict):
                raise ValueError(f"no such counter: {name!r}")
            key = (name, tuple(sorted((str(k), str(v)) for k, v in labels.items())))
        except (ValueError, TypeError) as e:
            log.error("{what}: bad counted record dropped: {error}", what=self.what,
                      error=str(e))
            return
        self._told[key] = self._told.get(key, 0) + 1

    def counted(self) -> list[tuple[Any, dict[str, str], float]]:
        """The counters the relay saw this child reach (C{(metric, labels, count)}), kept
        if its last snapshot said less (L{ProcessMetrics.retire}): those it told at once
        (L{COUNTED_RECORD})."""
        return [(declared(name), dict(labels), count)
                for (name, labels), count in self._told.items()]

    def processEnded(self, reason: Any) -> None:
        self.service.metrics.retire(self, self.counted())
        self.service._childEnded(self, reason)
        self.ended.callback(None)


class ChildSupervisor:
    """What the relay's services running child processes (the delivery process, the
    acceptor processes) share: their command line, telling one to stop, killing one that
    does not.

    @ivar what: what the log calls a child.
    @ivar childModule: the module run as a child (C{python -m}): its composition root.
    """

    what = "child process"
    childModule = ""
    reactor: Any
    configPath: str | None
    configText: bytes | None
    overrides: dict[str, Any]
    drainTime: float
    #: Children told to stop that have not exited yet.
    _retiring: set[Any]
    #: What starts a child, as C{reactor.spawnProcess} does (the relay's fork server), or
    #: C{None}: the reactor.
    spawner: Any = None
    #: The clock a child's life is measured on: not the wall clock (the reactor's), which a
    #: step (NTP, C{date -s}) moves.
    monotonic: Callable[[], float] = staticmethod(time.monotonic)

    def lifeOf(self, child: _ChildProtocol) -> float:
        """How long C{child} has run (0 before it started)."""
        return 0.0 if child.began is None else self.monotonic() - child.began

    def _endedUnexpectedly(self, child: _ChildProtocol) -> None:
        """C{child} exited unexpectedly: the pause before its restart (C{_restartDelay},
        doubled at each restart up to L{_RESTART_MAX}) starts again from L{_RESTART_MIN}
        when it ran that long or more, as a crash loop is over once a child ran well."""
        if self.lifeOf(child) >= _RESTART_MAX:
            self._restartDelay = _RESTART_MIN

    def startOf(self, child: _ChildProtocol) -> float:
        """When C{child} started on the wall clock as it is now (seconds since the epoch),
        for the status: what it said then is off by any step since."""
        return self.reactor.seconds() - self.lifeOf(child)

    def baseCommand(self) -> list[str]:
        """The command line of a child: the configuration (its bytes come on file
        descriptor 3), the command-line overrides and our process id."""
        args = [
            sys.executable,
            "-m",
            self.childModule,
            "--overrides",
            json.dumps(self.overrides),
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.configPath is not None:
            args += ["--config", os.path.abspath(self.configPath)]
        if self.configText is not None:
            args += ["--config-fd", "3"]
        return args

    def _spawnChild(
        self, child: _ChildProtocol, childFDs: dict[int, Any], extra: list[str]
    ) -> None:
        """Start C{child} with L{baseCommand} and C{extra} arguments, and give it the bytes
        of its configuration (file descriptor 3, added to C{childFDs}).

        @raise OSError: it cannot be started (the message names the program)."""
        args = self.baseCommand() + extra
        if self.configText is not None:
            childFDs[3] = "w"
        spawner = self.spawner if self.spawner is not None else self.reactor
        try:
            spawner.spawnProcess(child, args[0], args, env=dict(os.environ), childFDs=childFDs)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot start the {self.what} {args[0]}: {e.strerror or e}"
            ) from None
        child.began = self.monotonic()
        if self.configText is not None:
            child.process.writeToChild(3, self.configText)
            child.process.closeChildFD(3)

    def _retire(self, child: _ChildProtocol) -> None:
        """Tell C{child} to stop (it finishes its work and exits); kill it if it has not
        some time after the drain time."""
        self._retiring.add(child)
        child.process.closeStdin()
        kill = self.reactor.callLater(self.drainTime + _KILL_MARGIN, self._kill, child)

        def ended(_: object) -> None:
            if kill.active():
                kill.cancel()

        child.ended.addCallback(ended)

    def _kill(self, child: _ChildProtocol) -> None:
        log.error(
            "{what} (pid {pid}) did not stop {timeout:g}s after it was told to; killing it",
            what=self.what,
            pid=child.pid,
            timeout=self.drainTime + _KILL_MARGIN,
        )
        try:
            child.process.signalProcess("KILL")
        except ierror.ProcessExitedAlready:
            pass


class DeliveryProcessService(ChildSupervisor, Service):
    """Runs and feeds the delivery process.

    The child gets the configuration the relay runs on: the bytes of its file (on file
    descriptor 3, so that an edit not yet reloaded does not reach a restarted child), its path
    (for messages and relative paths) and the command-line overrides.  It holds the spool's
    queue lock (L{mailrelay.queue.lock}) while it may deliver, so that a child started while a
    previous one finishes (after a reload, or a crash of the relay) waits for it.

    @ivar drainTime: seconds the child may take to finish its deliveries when told to stop;
        it is killed if it has not exited some seconds after that.
    @ivar hold: start no child (C{[queue] hold}); mail stays in the spool.
    @ivar metrics: the children's metrics, as their last snapshots said.
    """

    #: The module run as the child (C{python -m}): the delivery process's composition root.
    childModule = "mailrelay.app.deliveryprocess"

    def __init__(
        self,
        reactor: Any,
        configPath: str | None,
        overrides: dict[str, Any],
        configText: bytes | None = None,
        drainTime: float = 30.0,
        hold: bool = False,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        """
        @param metrics: where the children's metrics are kept (shared with the acceptor
            processes'), or C{None} for a collection of our own.
        """
        self.setName("delivery-process")
        self.reactor = reactor
        self.configPath = configPath
        self.overrides = overrides
        self.configText = configText
        self.drainTime = drainTime
        self.hold = hold
        self._child: _ChildProtocol | None = None
        #: Children told to stop (a reload) that have not exited yet.
        self._retiring: set[_ChildProtocol] = set()
        self._backlog: list[bytes] = []
        self._restartDelay = _RESTART_MIN
        self._restartCall: Any = None
        self._stopping = False
        #: How many times the child exited unexpectedly (and was restarted).
        self.restarts = 0
        self.metrics = ProcessMetrics() if metrics is None else metrics

    what = "delivery process"

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if not self.hold:
            try:
                self._spawn()
            except OSError as e:
                raise SystemExit(f"mailrelay: error: {e.strerror}") from None

    def _spawn(self) -> None:
        """Start a child.  @raise OSError: it cannot be started (the message names the
        program)."""
        self._restartCall = None
        child = _ChildProtocol(self)
        extra = ["--control-fd", str(CONTROL_FD)]
        # The first one, forked by the fork server on the configuration the relay parsed
        # before forking it, takes that (mailrelay.app.forkserver.forkedConfig).
        offer = getattr(self.spawner, "offerForkedConfig", None)
        if offer is not None and offer(self.configText):
            extra.append("--forked-config")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._spawnChild(child, {0: "w", 1: "r", 2: 2, CONTROL_FD: theirs.fileno()}, extra)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            ours.setblocking(False)
            control = _Control()
            self.reactor.adoptStreamConnection(
                ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: control)
            )
            child.control = control
        finally:
            ours.close()
        self._child = child
        log.info("delivery process started (pid {pid})", pid=child.pid)
        backlog, self._backlog = self._backlog, []
        for line in backlog:
            child.process.write(line)

    @property
    def pid(self) -> int | None:
        """The process id of the delivery process running now, or C{None}."""
        return None if self._child is None else self._child.pid

    def state(self) -> str:
        """C{"up"} (the delivery process runs), C{"held"} (C{[queue] hold}: none runs, on
        purpose) or C{"down"} (none runs: before the start, after the stop, or while it is
        being restarted)."""
        if self.hold:
            return "held"
        return "up" if self.running and self._child is not None else "down"

    def rescan(self) -> None:
        """Have the delivery process look in the spool for entries nobody told it of (an
        acceptor process ended between a commit and its report); a delivery process not
        running now scans the spool as it starts."""
        child = self._child
        if not self.hold and child is not None:
            child.process.write(RESCAN.encode("ascii") + b"\n")

    def enqueue(self, queueID: str) -> None:
        """Tell the delivery process of a newly committed entry."""
        if self.hold:
            return
        line = queueID.encode("ascii") + b"\n"
        child = self._child
        if child is None:
            # Between a crash and the restart: the restarted child scans the spool anyway,
            # but keep the order of arrival for it.
            self._backlog.append(line)
            return
        child.process.write(line)

    def queueCommand(self, command: type[amp.Command], arguments: dict[str, Any]) -> Deferred[Any]:
        """Have the delivery process answer the queue command C{command} (with C{arguments},
        as AMP decodes them); the C{result} it answers.

        @raise QueueUnavailable: (through the Deferred) there is no delivery process now, it
            ended before answering, or did not answer within L{COMMAND_TIMEOUT} seconds.
        """
        from twisted.internet.defer import fail

        child = self._child
        control = child.control if child is not None else None
        if control is None or not control.connected:
            why = _UNAVAILABLE.get(self._state(), "the delivery process is not running")
            return fail(QueueUnavailable(why))

        def failed(failure: Any) -> Any:
            if failure.check(ierror.ConnectionDone, ierror.ConnectionLost):
                raise QueueUnavailable("the delivery process ended before it answered")
            if failure.check(ierror.TimeoutError):
                raise QueueUnavailable(
                    f"the delivery process did not answer within {COMMAND_TIMEOUT:g}s"
                )
            return failure

        d = control.callRemote(command, **arguments)
        d.addTimeout(COMMAND_TIMEOUT, self.reactor)
        return d.addCallbacks(lambda response: response["result"], failed)

    def _state(self) -> str:
        if self._child is not None:
            return "running"
        if self.hold:
            return "off"
        if self._restartCall is not None and self._restartCall.active():
            return "restarting"
        return "stopped"

    def describe(self) -> dict[str, Any]:
        """The delivery process as C{mailrelay status} shows it: C{state} (C{running},
        C{restarting}, C{stopped}, C{off}: C{[queue] hold}), C{pid}, C{since} (when it
        started, seconds since the epoch), C{restarts} (unexpected exits so far) and
        C{retiring} (the process ids of previous ones finishing their deliveries)."""
        child = self._child
        return {
            "state": self._state(),
            "pid": child.pid if child is not None else None,
            "since": self.startOf(child) if child is not None else None,
            "restarts": self.restarts,
            "retiring": sorted(c.pid for c in self._retiring if c.pid is not None),
        }

    def reload(
        self, configText: bytes | None, overrides: dict[str, Any], drainTime: float, hold: bool
    ) -> None:
        """Run a new child on a new configuration: the running one is told to stop (it
        finishes its deliveries and records them), the new one starts at once and begins
        delivering when the old one has released the queue lock."""
        self.configText = configText
        self.overrides = overrides
        self.drainTime = drainTime
        self.hold = hold
        old, self._child = self._child, None
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        self._restartCall = None
        self._restartDelay = _RESTART_MIN
        if old is not None:
            self._retire(old)
        if self.running and not self.hold:
            self._spawn()
        elif self.hold:
            self._backlog.clear()
            log.warn("queue.hold is set: the delivery process is stopped, nothing is delivered")

    def _childEnded(self, child: _ChildProtocol, reason: Any) -> None:
        how = endReason(child.transport, reason)
        if child in self._retiring:
            self._retiring.discard(child)
            if not self._stopping:
                log.info(
                    "previous delivery process (pid {pid}) exited ({reason})",
                    pid=child.pid,
                    reason=how,
                )
            return
        if child is self._child:
            self._child = None
        if self._stopping:
            return
        self._endedUnexpectedly(child)
        # What it was delivering is tried again by the next one: a message whose next hop
        # had answered its end of data, but whose removal the process did not live to make,
        # goes twice.  Nothing durable says which (a record per attempt would cost a sync).
        log.error(
            "delivery process exited unexpectedly ({reason}); restarting in {delay:.0f}s; "
            "messages it was delivering will be tried again, and any a next hop had already "
            "accepted will be delivered twice (a maildir finds its copy)",
            reason=how,
            delay=self._restartDelay,
        )
        self.restarts += 1
        self._restartCall = self.reactor.callLater(self._restartDelay, self._restart)
        self._restartDelay = min(_RESTART_MAX, self._restartDelay * 2)

    def _restart(self) -> None:
        try:
            self._spawn()
        except OSError as e:
            delay = self._restartDelay
            log.error("{error}; trying again in {delay:.0f}s", error=e.strerror, delay=delay)
            self._restartCall = self.reactor.callLater(self._restartDelay, self._restart)
            self._restartDelay = min(_RESTART_MAX, self._restartDelay * 2)

    def beginShutdown(self) -> None:
        """The relay is stopping: a child exiting from now on is not restarted (it may have
        been signalled with the relay, as by a terminal's Ctrl-C or systemd)."""
        self._stopping = True

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.beginShutdown()
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        if self._child is not None:
            child, self._child = self._child, None
            self._retire(child)
        ended = [child.ended for child in self._retiring]
        if not ended:
            return succeed(None)
        log.info(
            "waiting for the delivery process to finish its deliveries (at most {drain:g}s)",
            drain=self.drainTime,
        )
        return DeferredList(ended, consumeErrors=True).addCallback(lambda _: None)
