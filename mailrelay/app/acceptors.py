"""Acceptor processes: more processes accepting SMTP connections on the relay's listening
sockets, so that acceptance uses every core (C{[relay] processes}).

The relay's process binds every listener (privileged ports too, before twistd's C{--uid}
drops root) and accepts on them itself; it also starts C{processes - 1} children (C{python -m
mailrelay.app.acceptorprocess}) and passes them its listening sockets (inherited file
descriptors, adopted with C{adoptStreamPort}).  All of them accept from the same sockets'
queues: the kernel hands each new connection to one of them.  Each child runs the whole
receiving side -- sessions, policy, plugins, the intake and a spool writer with its own group
commit (several processes may write to one spool: each holds its shared lock, and only the
relay's own process recovers it) -- and writes the queue id of each message it made durable
on its standard output, before that message's C{250}; the relay hands the ids to the one
queue manager (L{RelayService.enqueue}), as it does its own.  The children's log lines and
metrics come on the same channel, as the delivery process's do (L{mailrelay.queue.process}).
So do their questions to the relay's counters: a child reserves and settles each AUTH
attempt in the relay's throttle, and counts its sessions and rates per client in the
relay's limiter (L{ASK_RECORD}; the answer comes on its standard input), so that a client's
failures, connections and rates count in one place whichever process takes them.

Passing the sockets rather than each child binding its own with C{SO_REUSEPORT}: the
children never need root (nor C{CAP_NET_BIND_SERVICE}) for port 25, and a reload loses no
connection: with C{SO_REUSEPORT} each socket has its own queue, and the connections waiting
in the queue of a child's socket are reset when that child closes it; here the queue is the
relay's, which keeps it open across reloads.  (The price: one queue for all, so the kernel
does not spread the connections evenly; the idle process is the quickest to accept.)

A reload starts new children on the new configuration and tells the old ones to stop, as the
relay's stop does: they close their copies of the sockets at once, finish their sessions
(C{421} to idle ones, a message being received is finished) and exit.  A child that exits
unexpectedly is started again after a pause that doubles up to a minute (reset once one has
run for a minute), like the delivery process; children get SIGTERM when the relay dies
(C{PR_SET_PDEATHSIG}).
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.defer import DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.app.logs import eventSystem
from mailrelay.metrics import MESSAGES, ProcessMetrics, replyClass
from mailrelay.queue.process import (
    _KILL_MARGIN,
    _RESTART_MAX,
    _RESTART_MIN,
    ChildSupervisor,
    _ChildProtocol,
    endReason,
)
from mailrelay.spool.ids import isQueueID

log = Logger()

__all__ = ["ANSWER_RECORD", "ASK_RECORD", "QUEUED_RECORD", "SESSIONS_RECORD", "AcceptorPool",
           "sharedSocket"]

#: How a line of an acceptor's standard output telling of a queued message starts (then its
#: queue id).
QUEUED_RECORD = "queued\t"
_QUEUED = QUEUED_RECORD.encode("ascii")

#: How a line of an acceptor's standard output asking the relay's counters starts (its AUTH
#: throttle's, its abuse limits'), then C{SERIAL<TAB>OP<TAB>ARGUMENTS...}: C{reserve CLIENT},
#: C{settle CLIENT 0|1} (1: failed), C{acquire KEY}, C{release KEY}, C{hit KEY WINDOW}.  The
#: relay answers each on the acceptor's standard input: L{ANSWER_RECORD}, the serial and the
#: count (C{-} when it could not count).  See L{mailrelay.app.acceptorprocess.RelayCounters}.
ASK_RECORD = "ask\t"
_ASK = ASK_RECORD.encode("ascii")
#: How a line of an acceptor's standard output saying how many sessions it has open starts
#: (then the number), sent when the number changed (at most once a second).
SESSIONS_RECORD = "sessions\t"
_SESSIONS = SESSIONS_RECORD.encode("ascii")
ANSWER_RECORD = "answer\t"

#: Each question: the counter asked (C{"throttle"} or C{"limiter"}) and how many arguments.
_QUESTIONS = {
    "reserve": ("throttle", 1),
    "settle": ("throttle", 2),
    "acquire": ("limiter", 1),
    "release": ("limiter", 1),
    "hit": ("limiter", 2),
}
#: What a question that counts is undone by, when its child ends without asking that.
_UNDONE_BY = {"reserve": "settle", "acquire": "release"}
_UNDOES = {undo: op for op, undo in _UNDONE_BY.items()}

#: The child's first file descriptor of the listening sockets passed to it.
FIRST_SOCKET_FD = 4

#: The option naming the child's file descriptor (the one after its sockets) on which the
#: relay writes the users it serves with (JSON: C{{password file: {user: hash}}}): a child
#: started after the password file was edited into a state the relay refuses serves with
#: them (L{mailrelay.config.checks.checkAuth}), rather than failing to start again and
#: again while the relay serves on.
USERS_OPTION = "--users-fd"

#: The option naming the child's file descriptor on which the relay writes the bytes of
#: the listeners' certificates and keys it serves (JSON: C{{path: base64}}): the child
#: serves them (L{mailrelay.config.loadConfig}'s C{relayFiles}), as the relay does, rather
#: than read the files, which may have been edited since into a state the relay refuses
#: (a reload keeps the running ones) -- the child then failed to start again and again --
#: or be readable by root only (read by the relay before it dropped its privileges).
TLS_FILES_OPTION = "--tls-files-fd"

_FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}


def sharedSocket(port: Any, factory: Any) -> tuple[int, str] | None:
    """C{(fd, family)} of the listening socket of C{port} (a listener's port, listening with
    C{factory}), for acceptor processes to adopt; C{None} when it cannot be shared: not a
    TCP or UNIX port, or one that wraps the factory (an C{ssl:} endpoint's does not: it
    listens on a plain socket, the TLS layer in the factory)."""
    if not isinstance(port, (tcp.Port, unix.Port)) or getattr(port, "factory", None) is not factory:
        return None
    family = _FAMILY_NAMES.get(getattr(port, "addressFamily", None))  # type: ignore[arg-type]
    if family is None or getattr(port, "socket", None) is None:
        return None
    return port.fileno(), family


class _AcceptorProtocol(_ChildProtocol):
    """The relay's end of an acceptor process: its queued messages, log lines, metrics and
    questions to the relay's counters."""

    what = "acceptor process"

    def __init__(self, service: Any) -> None:
        super().__init__(service)
        #: What it counted and has not given back, by C{(question, key)}: the counters of
        #: the AUTH attempts reserved and not settled, of the sessions acquired and not
        #: released (a client with several has its key several times).
        self.held: dict[tuple[str, str], list[Any]] = {}
        #: the sessions it has open, as it last said (L{SESSIONS_RECORD})
        self.sessions = 0
        #: the messages it said it queued (L{QUEUED_RECORD}), each counted accepted by it
        self.queued = 0

    def recordReceived(self, record: bytes) -> None:
        if record.startswith(_ASK):
            self._asked(record[len(_ASK) :])
            return
        if record.startswith(_SESSIONS):
            count = record[len(_SESSIONS) :]
            if count.isdigit():
                self.sessions = int(count)
            return
        if record.startswith(_QUEUED):
            queueID = record[len(_QUEUED) :].decode("ascii", "replace")
            if isQueueID(queueID):
                self.queued += 1
                self.service.enqueue(queueID)
            else:
                log.error("acceptor process (pid {pid}): bad queue id {queueID!r} ignored",
                          pid=self.pid, queueID=queueID)
            return
        super().recordReceived(record)

    def _asked(self, record: bytes) -> None:
        """Ask the relay's counter what the child asks (see L{ASK_RECORD}), and answer:
        every process counts a client's AUTH failures, sessions and rates in one place."""
        fields = record.decode("utf-8", "replace").split("\t")
        serial, op, args = fields[0], fields[1] if len(fields) > 1 else "", fields[2:]
        counterName, arity = _QUESTIONS.get(op, ("", -1))
        if not serial.isdigit() or len(args) != arity or not _valid(op, args):
            log.error("acceptor process (pid {pid}): bad question record {record!r}",
                      pid=self.pid, record=record)
            return
        key = args[0]
        counter = getattr(self.service, counterName)()
        if op in ("settle", "release"):
            # On the counter it was counted on (a reload may have made another); what was
            # never counted here (the count failed) has nothing to give back.
            counted = self.held.get((_UNDOES[op], key))
            if not counted:
                self._answer(serial, "-")
                return
            counter = counted.pop()
            if not counted:
                del self.held[(_UNDOES[op], key)]
        if counter is None:
            self._answer(serial, "-")
            return
        if op == "settle":
            d = maybeDeferred(counter.settle, key, args[1] == "1")
        elif op == "hit":
            d = maybeDeferred(counter.hit, key, float(args[1]))
        else:
            d = maybeDeferred(getattr(counter, op), key)
        if op in _UNDONE_BY:
            d.addCallback(self._counted, op, counter, key)
        d.addCallbacks(
            lambda count: self._answer(serial, str(int(count or 0))),
            self._failed,
            errbackArgs=(serial, op, key),
        )

    def _counted(self, count: int, op: str, counter: Any, key: str) -> int:
        if self.ended.called:  # (answered after the child ended: nobody will give it back)
            _undo(op, counter, key)
        else:
            self.held.setdefault((op, key), []).append(counter)
        return count

    def _failed(self, failure: Failure, serial: str, op: str, key: str) -> None:
        log.failure("answering {op} {key} of acceptor process (pid {pid})", failure,
                    op=op, key=key, pid=self.pid)
        self._answer(serial, "-")

    def _answer(self, serial: str, answer: str) -> None:
        if self.transport is not None and not self.ended.called:
            self.process.write(f"{ANSWER_RECORD}{serial}\t{answer}\n".encode("ascii"))

    def counted(self) -> list[tuple[Any, dict[str, str], float]]:
        """The messages it said it queued, each counted accepted (L{MESSAGES}, 2xx, smtp)
        before it said so: a child killed before its next snapshot (sent once a second)
        counts them still.  (Its other counters of that second are lost with it.)"""
        if not self.queued:
            return super().counted()
        return [*super().counted(),
                (MESSAGES, {"reply": replyClass(250), "origin": "smtp"}, self.queued)]

    def processEnded(self, reason: Any) -> None:
        # Its AUTH attempts in flight and its sessions are over: their clients must not
        # keep them forever.
        held, self.held = self.held, {}
        for (op, key), counters in held.items():
            for counter in counters:
                _undo(op, counter, key)
        super().processEnded(reason)

    def received(self, event: dict[str, Any]) -> dict[str, Any]:
        """C{event} with C{,acceptor=PID} after its system (as Postfix's lines name the
        C{smtpd[PID]}): the log tells which process said what."""
        event["log_system"] = f"{eventSystem(event)},acceptor={self.pid}"
        return event


def _valid(op: str, args: list[str]) -> bool:
    """Whether the arguments of a question are what it takes."""
    if op == "settle":
        return args[1] in ("0", "1")
    if op == "hit":
        try:
            return 0 < float(args[1]) < float("inf")
        except ValueError:
            return False
    return True


def _undo(op: str, counter: Any, key: str) -> None:
    """Give back what C{op} counted for an acceptor that can no longer do it."""
    if op == "reserve":
        d = maybeDeferred(counter.settle, key, False)
    else:
        d = maybeDeferred(counter.release, key)
    d.addErrback(lambda f: log.failure("giving back {op} {key}", f, op=op, key=key))


class AcceptorPool(ChildSupervisor, Service):
    """Runs C{count} acceptor processes (none: the relay's process accepts alone).

    @ivar count: how many children should run.
    @ivar restarts: how many times a child exited unexpectedly (and was restarted).
    @ivar metrics: the children's metrics, as their last snapshots said (shared with the
        delivery process's).
    """

    what = "acceptor process"
    childModule = "mailrelay.app.acceptorprocess"

    def __init__(
        self,
        reactor: Any,
        configPath: str | None,
        overrides: dict[str, Any],
        configText: bytes | None,
        count: int,
        drainTime: float,
        sockets: Callable[[], list[tuple[str, int, str]]],
        enqueue: Callable[[str], None],
        metrics: ProcessMetrics | None = None,
        throttle: Callable[[], Any] = lambda: None,
        limiter: Callable[[], Any] = lambda: None,
        users: Callable[[], dict[str, dict[str, str]] | None] = lambda: None,
        tlsFiles: Callable[[], dict[str, bytes]] = dict,
    ) -> None:
        """
        @param sockets: the C{(endpoint, fd, family)} of the listening sockets to pass to a
            child started now.
        @param enqueue: called with the queue id of each message a child queued.
        @param throttle: the relay's current AUTH throttle (an L{IAuthThrottle}), which the
            children's AUTH attempts are counted in, or C{None} (no AUTH).
        @param limiter: the relay's current counter of the abuse limits (an
            L{IRateLimiter}), which the children's are counted in, or C{None} (with a
            C{[rate_limiter]} plugin the children count in their own).
        @param users: the users the relay serves with now, by password file, or C{None}
            (no password file): handed to each child started (see L{USERS_OPTION}).
        @param tlsFiles: the bytes of the listeners' certificates and keys the relay serves
            now, by path: handed to each child started (see L{TLS_FILES_OPTION}).
        """
        self.setName("acceptors")
        self.reactor = reactor
        self.configPath = configPath
        self.overrides = overrides
        self.configText = configText
        self.count = count
        self.drainTime = drainTime
        self.sockets = sockets
        self.enqueue = enqueue
        self.throttle = throttle
        self.limiter = limiter
        self.users = users
        self.tlsFiles = tlsFiles
        #: Called when a child ended unexpectedly: the delivery side rescans the spool.
        self.rescan: Callable[[], object] | None = None
        self.metrics = ProcessMetrics() if metrics is None else metrics
        self._children: list[_AcceptorProtocol] = []
        self._retiring: set[_AcceptorProtocol] = set()
        self._restartDelay = _RESTART_MIN
        self._restartCall: Any = None
        self._stopping = False
        self.restarts = 0

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        try:
            self._fill()
        except OSError as e:
            raise SystemExit(f"mailrelay: error: {e.strerror}") from None

    def _fill(self) -> None:
        """Start children until C{count} run.  @raise OSError: one cannot be started."""
        self._restartCall = None
        while len(self._children) < self.count:
            self._spawn()

    def _spawn(self) -> None:
        child = _AcceptorProtocol(self)
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        passed = []
        for n, (endpoint, fd, family) in enumerate(self.sockets()):
            childFDs[FIRST_SOCKET_FD + n] = fd
            passed.append((endpoint, FIRST_SOCKET_FD + n, family))
        extra = ["--listeners", json.dumps(passed)]
        # What the relay serves with, each on a descriptor of its own after the sockets.
        handed: dict[int, Any] = {}
        files = {path: base64.b64encode(data).decode("ascii")
                 for path, data in self.tlsFiles().items()}
        for option, value in ((USERS_OPTION, self.users()), (TLS_FILES_OPTION, files or None)):
            if value is not None:
                fd = FIRST_SOCKET_FD + len(passed) + len(handed)
                childFDs[fd] = "w"
                extra += [option, str(fd)]
                handed[fd] = value
        self._spawnChild(child, childFDs, extra)
        for fd, value in handed.items():
            child.process.writeToChild(fd, json.dumps(value).encode("utf-8"))
            child.process.closeChildFD(fd)
        self._children.append(child)
        log.info(
            "acceptor process started (pid {pid}), accepting on {endpoints}",
            pid=child.pid,
            endpoints=", ".join(endpoint for endpoint, _, _ in passed) or "nothing",
        )

    def reload(
        self,
        configText: bytes | None,
        overrides: dict[str, Any],
        count: int,
        drainTime: float,
    ) -> None:
        """Run C{count} new children on a new configuration; the running ones are told to
        stop (they finish their sessions)."""
        self.configText, self.overrides = configText, overrides
        self.count, self.drainTime = count, drainTime
        self._cancelRestart()
        self._restartDelay = _RESTART_MIN
        old, self._children = self._children, []
        for child in old:
            self._replace(child)
        if self.running:
            try:
                self._fill()
            except OSError as e:
                self._failedRestart(e)

    def _cancelRestart(self) -> None:
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        self._restartCall = None

    def _replace(self, child: _AcceptorProtocol) -> None:
        """A reload replaced C{child}: it stops accepting and ends once its sessions have
        (or after the drain time, as a stop ends them); it is killed if it has not some
        time after that."""
        from mailrelay.app.acceptorprocess import RETIRE

        self._retiring.add(child)
        child.process.write(RETIRE + b"\n")
        kill = self.reactor.callLater(2 * self.drainTime + _KILL_MARGIN, self._kill, child)
        child.ended.addCallback(lambda _: kill.cancel() if kill.active() else None)

    def _childEnded(self, child: _AcceptorProtocol, reason: Any) -> None:
        why = endReason(child.process, reason)
        if child in self._retiring:
            self._retiring.discard(child)
            if not self._stopping:
                log.info("previous acceptor process (pid {pid}) exited ({reason})",
                         pid=child.pid, reason=why)
            return
        if child in self._children:
            self._children.remove(child)
        if self._stopping:
            return
        self._endedUnexpectedly(child)
        self.restarts += 1
        log.error(
            "acceptor process (pid {pid}) exited unexpectedly ({reason}); restarting in "
            "{delay:.0f}s",
            pid=child.pid,
            reason=why,
            delay=self._restartDelay,
        )
        # It may have committed messages it did not report before it ended.
        if self.rescan is not None:
            self.rescan()
        if self._restartCall is None or not self._restartCall.active():
            self._scheduleRestart()

    def _scheduleRestart(self) -> None:
        self._restartCall = self.reactor.callLater(self._restartDelay, self._restart)
        self._restartDelay = min(_RESTART_MAX, self._restartDelay * 2)

    def _restart(self) -> None:
        try:
            self._fill()
        except OSError as e:
            self._failedRestart(e)

    def _failedRestart(self, e: OSError) -> None:
        log.error("{error}; trying again in {delay:.0f}s", error=e.strerror,
                  delay=self._restartDelay)
        self._scheduleRestart()

    def beginShutdown(self) -> None:
        """The relay is stopping: the children are told to stop now (they close their
        listening sockets at once and end their sessions meanwhile, as the relay's own do),
        and none is restarted."""
        self._stopping = True
        self._cancelRestart()
        old, self._children = self._children, []
        for child in old:
            self._retire(child)
        for child in self._retiring:  # (replaced by a reload: stop them now)
            child.process.closeStdin()

    def stopService(self) -> Any:
        """Wait for the children to have ended their sessions and exited."""
        super().stopService()
        self.beginShutdown()
        ended = [child.ended for child in self._retiring]
        if not ended:
            return succeed(None)
        log.info(
            "waiting for {count} acceptor process(es) to end their sessions (at most {drain:g}s)",
            count=len(ended),
            drain=self.drainTime,
        )
        return DeferredList(ended, consumeErrors=True).addCallback(lambda _: None)

    def describe(self) -> dict[str, Any]:
        """The acceptor processes as C{mailrelay status} shows them: C{count} (how many
        should run), C{running} (C{pid} and C{since} of each), C{restarts} and C{retiring}
        (the process ids of previous ones ending their sessions)."""
        return {
            "count": self.count,
            "running": [{"pid": c.pid, "since": self.startOf(c)} for c in self._children],
            "restarts": self.restarts,
            "retiring": sorted(c.pid for c in self._retiring if c.pid is not None),
            "sessions": sum(c.sessions for c in (*self._children, *self._retiring)
                            if not c.ended.called),
        }
