"""The C{pipe} backend: hands each message to a command on its standard input, as Postfix's
pipe(8) does (procmail, a mailing-list manager, a script of the site's).

It is a C{[[backends]]} table with C{plugin = "pipe"}; routes name the table's C{name}::

    [[backends]]
    name = "procmail"
    plugin = "pipe"
    command = ["/usr/bin/procmail", "-a", "{domain}", "-d", "{recipient}"]
    user = "mail"                  # required when the relay runs as root; never root
    per = "recipient"              # one run per recipient (default), or "message"
    time_limit = 300               # seconds a run may take, then it is killed (deferred)

  - The command is an argument vector, never a shell line: its first item is an absolute
    path, and each later item may hold C{{sender}}, C{{recipient}}, C{{domain}} (the
    recipient's), C{{queue_id}} and C{{nexthop}}, each expanded into that one item whatever
    it holds (C{{{}} and C{}}} are literal braces).  C{{nexthop}} is the route's next hop,
    or, as routes to a site backend have none (the routing table gives them the backend's
    name), the recipient's domain, as Postfix's C{${nexthop}} for a transport entry
    without one (C{example.org  procmail:}).  With C{per = "message"}, one run takes every
    recipient of the delivery (of one next hop, when the command has C{{nexthop}}, as
    Postfix delivers per next hop): an item holding C{{recipient}} or C{{domain}} is
    repeated once per recipient.  The null sender is C{null_sender}
    (C{"MAILER-DAEMON"}, as Postfix).  An address starting with C{-} (an option to most
    commands) is refused (5.1.3), as Postfix does by default.
  - The message goes to the command's standard input with LF line ends (as Postfix writes
    it), exactly as spooled otherwise; a C{BODY=BINARYMIME} message, whose CRLF need not be
    line ends, is first made 7-bit as for a next hop without BINARYMIME (its binary parts
    base64: L{withTextLineEnds}, deferred when that takes longer than C{time_limit}), or
    returned with 5.6.3 when it cannot be.  Its standard
    output and error are read together; the first L{OUTPUT_LIMIT} characters (made
    printable, on one line) go into the diagnostic of a failure, and so into the bounce and
    the log.
  - A failing command may say what happened by starting its output with an RFC 3463 status
    (C{4.2.2 Mailbox full}): 4.x.x defers, 5.x.x returns, with that status (as Postfix's
    C{D.S.N text}).  Else the exit status says it, by sysexits(3), as Postfix maps it: 0
    delivered;
    C{EX_TEMPFAIL} (75) and C{EX_OSERR} (71) deferred (4.3.0); the others returned (5.x.x:
    C{EX_NOUSER} 5.1.1, C{EX_NOHOST} 5.1.2, C{EX_DATAERR} 5.6.0, C{EX_NOPERM} 5.7.0,
    C{EX_CONFIG} 5.3.5, ...; any other status 5.3.0).  A command killed by a signal, or by
    the time limit, is deferred; one that cannot be started (not found, not executable by
    C{user}, its interpreter missing) is deferred with 4.3.5 and why (the system's
    configuration: fix it, and the mail goes at the next attempt).
  - The command runs in a session of its own (C{setsid}, as Postfix's pipe does): the time
    limit, or the queue giving up, kills it with everything it started, which could
    otherwise hold its output open (and the delivery with it) and outlive the relay.
  - Once the command has exited, its exit status decides: output still open then, held by
    a process it left running (a daemon, in a session of its own that no kill reaches), is
    read for L{_OUTPUT_WAIT} seconds more, then closed.  The time limit and the queue giving
    up close the command's input and output too: a run always ends.
  - The command runs as C{user} (its uid, gid and groups; C{HOME}, C{USER}, C{LOGNAME} and a
    plain C{PATH} in its environment, nothing else of the relay's), in C{/}, at most
    C{concurrency} runs at once, each then taking one of the queue's places of the
    deliveries in flight at once (C{[queue] delivery_limit}).  A delivery the queue gives up
    on (the table's C{timeout}, or the relay stopping) kills its runs.

A success is a delivery, not a relay: a notice the sender asked for says C{delivered}.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGKILL
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay import namedfile
from mailrelay.config.schema import At, Key, Source, Table
from mailrelay.config.values import choice, integer, seconds, string
from mailrelay.delivery.common import removeWhenFired, resultsForAll, withTextLineEnds
from mailrelay.errors import (
    ConfigError,
    DeliveryNotStarted,
    describeValue,
    notStartedDiagnostic,
)
from mailrelay.interfaces import (
    DeliveryStatus,
    IDeliveryBackend,
    PluginContext,
    RecipientResult,
    Route,
    flatSemaphore,
    threadHandOff,
)

log = Logger()

__all__ = ["OUTPUT_LIMIT", "SYSEXITS", "PipeBackend", "PipeSettings", "build"]

#: Characters of the command's output kept for the diagnostic.
OUTPUT_LIMIT = 500
#: Octets of output read at most (the rest is read and dropped).
_READ_LIMIT = 8192
#: Seconds the output of a command that has exited is still read, when a process it left
#: running holds it open; then it is closed and the exit status decides.
_OUTPUT_WAIT = 2.0

#: sysexits(3) -> (status, meaning), as Postfix's sys_exits table.
SYSEXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z_]*)\}|[{}]")
#: Postfix pipe(8)'s macros, ${name} or $name: here they would expand to "$bob@example.org".
_POSTFIX_MACRO = re.compile(
    r"\$(?:\{([a-z_]+)\}|(sender|recipient|user|extension|domain|mailbox|nexthop|size"
    r"|original_recipient|queue_id|client_[a-z_]+|sasl_[a-z_]+))"
)
_PER_MESSAGE = ("sender", "queue_id", "nexthop")
_PER_RECIPIENT = ("recipient", "domain")
_PATH = "/usr/local/bin:/usr/bin:/bin"
#: util-linux's setsid(1): runs the command as the leader of a new session and process
#: group (without forking: the child of the relay's fork is no group leader), so that the
#: group can be killed whole.  Without it (not Linux), the command alone is killed.
_SETSID = next((p for p in ("/usr/bin/setsid", "/bin/setsid") if os.access(p, os.X_OK)), None)
#: What setsid(1) writes when it cannot execute the command (exit status 126 or 127), and
#: what Twisted's child writes when its exec fails (exit status 1).
_CANNOT_EXECUTE = re.compile(
    r"^setsid: failed to execute \S+: (?P<why>.+)$|^Upon execvpe .*?(?P<error>\w+Error: .+)$"
)
#: An RFC 3463 status starting a command's output (Postfix's dsn_valid).
_OUTPUT_STATUS = re.compile(r"^([45])\.([0-9]{1,3})\.([0-9]{1,3})(?= |$)")


@dataclass(frozen=True)
class PipeSettings:
    """The C{pipe} plugin's options, checked (see the module docstring).

    @ivar command: the argument vector, with its placeholders.
    @ivar per: C{"recipient"} or C{"message"}.
    @ivar user: the user to run as, or C{None} (the relay's own, when it is not root).
    @ivar timeLimit: seconds a run may take.
    @ivar concurrency: the most runs at once.
    @ivar nullSender: what C{{sender}} is for the null sender.
    """

    command: tuple[str, ...]
    per: str = "recipient"
    user: str | None = None
    timeLimit: float = 300.0
    concurrency: int = 10
    nullSender: str = "MAILER-DAEMON"


def _command(value: Any, at: At) -> tuple[str, ...]:
    """An argument vector: a non-empty list of strings, the first an absolute path to an
    executable file, the others with known placeholders only."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise at.error(
            "must be a non-empty list of strings (the command and its arguments), not "
            + describeValue(value)
        )
    if any("\0" in v for v in value):
        raise at.error("must not hold a NUL character")
    program = value[0]
    if not os.path.isabs(program) or "{" in program or "}" in program:
        raise at.error(
            f"the command must be an absolute path, without placeholders: {describeValue(program)}"
        )
    if not _executable(program):
        raise at.error(f"{describeValue(program)} is not an executable file")
    for item in value[1:]:
        postfix = _POSTFIX_MACRO.search(item)
        if postfix is not None:
            name = postfix.group(1) or postfix.group(2)
            if name in _PER_MESSAGE + _PER_RECIPIENT:
                written = f'"${{{name}}}"' if postfix.group(1) else f"${name}"
                raise at.error(f"{describeValue(item)}: Postfix's {written} is written "
                               f"{{{name}}} here, not {written}")
            raise at.error(f"{describeValue(item)}: Postfix's ${name} has no equivalent here; "
                           "the placeholders are {sender}, {recipient}, {domain}, {queue_id} "
                           "and {nexthop}")
        for m in _PLACEHOLDER.finditer(item):
            name = m.group(1)
            if m.group(0) in ("{{", "}}"):
                continue
            if name is None or name not in _PER_MESSAGE + _PER_RECIPIENT:
                raise at.error(
                    f"unknown placeholder {describeValue(m.group(0))} in {describeValue(item)}; "
                    "the placeholders are "
                    + ", ".join("{" + n + "}" for n in ("sender", "recipient", "domain",
                                                        "queue_id", "nexthop"))
                    + " (write {{ and }} for literal braces)"
                )
    return tuple(value)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _user(value: Any, at: At) -> str:
    return string(value, at)


OPTIONS = Table(
    (
        Key("command", _command, "The command and its arguments, with placeholders.",
            required="is required: the command to run, as a list of its arguments"),
        Key("per", choice("recipient", "message"), "One run per recipient, or per message."),
        Key("user", _user, "The user the command runs as."),
        Key("time_limit", seconds, "Seconds a run may take before it is killed."),
        Key("concurrency", integer(1, 1000), "The most runs at once."),
        Key("null_sender", string, "What {sender} is for the null sender."),
    ),
    target=PipeSettings,
)


@dataclass(frozen=True)
class _Account:
    uid: int | None
    gid: int | None
    name: str
    home: str


def _account(user: str | None) -> _Account:
    """Whom the command runs as.

    @raise ConfigError: no such user; root; no user while the relay runs as root; another
        user while it does not (it could not switch).
    """
    runUID = namedfile.runUID()  # (as root with twistd --uid: the user we will run as)
    root = runUID == 0
    if user is None:
        if root:
            raise ConfigError(
                "is required when the relay runs as root: the user the command runs as "
                "(never root)", key="user")
        entry = pwd.getpwuid(runUID)
        return _Account(None, None, entry.pw_name, entry.pw_dir)
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise ConfigError(f"no such user {describeValue(user)}", key="user") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"{describeValue(user)} is root; commands never run as root",
                          key="user")
    if not root and entry.pw_uid != runUID:
        raise ConfigError(
            f"{describeValue(user)}: the relay runs as user {pwd.getpwuid(runUID).pw_name} (not "
            "root), so commands run as that user only", key="user")
    return _Account(entry.pw_uid if root else None, entry.pw_gid if root else None,
                    entry.pw_name, entry.pw_dir)


def _expand(command: Sequence[str], values: dict[str, str],
            recipients: Sequence[dict[str, str]]) -> list[str]:
    """The argument vector for one run: C{values} fill the per-message placeholders, and an
    item holding a per-recipient one is repeated for each of C{recipients}."""
    def fill(item: str, table: dict[str, str]) -> str:
        def one(m: re.Match[str]) -> str:
            text = m.group(0)
            if text in ("{{", "}}"):
                return text[0]
            return table[m.group(1)]

        return _PLACEHOLDER.sub(one, item)

    argv = [command[0]]
    for item in command[1:]:
        names = {m.group(1) for m in _PLACEHOLDER.finditer(item)}
        if names & set(_PER_RECIPIENT):
            argv.extend(fill(item, {**values, **r}) for r in recipients)
        else:
            argv.append(fill(item, values))
    return argv


def _nexthop(route: Route, recipient: Any) -> str:
    """What C{{nexthop}} is for C{recipient}: the route's next hop, or the recipient's
    domain when the route has none of its own (the routing table's is the backend's name)."""
    if route.nexthop and route.nexthop != route.backend:
        return route.nexthop
    return recipient.domain


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= OUTPUT_LIMIT else text[: OUTPUT_LIMIT - 3] + "..."


class _LineEnds:
    """CRLF to LF, across chunks (a chunk may end between CR and LF)."""

    def __init__(self) -> None:
        self.carry = b""

    def __call__(self, chunk: bytes) -> bytes:
        chunk = self.carry + chunk
        self.carry = b""
        if chunk.endswith(b"\r"):
            chunk, self.carry = chunk[:-1], b"\r"
        return chunk.replace(b"\r\n", b"\n")


class _Run(ProcessProtocol):
    """One run of the command: feeds it the message, reads its output, waits for its end.

    Twisted ends a run (L{processEnded}, which fires L{done}) once the command has exited
    and its pipes are closed; they are closed L{_OUTPUT_WAIT} seconds after it exited, at
    the time limit, or when the run is cancelled, whatever holds them open.
    """

    def __init__(self, reactor: Any, file: BinaryIO, timeLimit: float,
                 onExit: Any = None, group: bool = False) -> None:
        """
        @param group: the command leads a process group of its own (L{_SETSID}), killed
            whole.
        """
        self.group = group
        self.reactor = reactor
        self.onExit = onExit
        self.file = file
        self.timeLimit = timeLimit
        self.output = bytearray()
        self.done: Deferred = Deferred(self._cancel)
        self.timedOut = False
        self.timer: Any = None
        #: closes the pipes a while after the command exited
        self.closer: Any = None
        #: how the command exited (C{None} while it runs)
        self.exited: Failure | None = None
        self.lineEnds = _LineEnds()

    def connectionMade(self) -> None:
        self.timer = self.reactor.callLater(self.timeLimit, self._timeUp)
        sending = FileSender().beginFileTransfer(self.file, self.transport, self.lineEnds)

        def sent(_: Any) -> None:
            transport = self.transport
            assert transport is not None
            if self.lineEnds.carry:  # pragma: no cover - the spool has CRLF lines only
                transport.write(self.lineEnds.carry)
            transport.closeStdin()

        def stopped(_: Failure) -> None:
            pass  # the command closed its input early: its exit status decides

        sending.addCallbacks(sent, stopped)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        room = _READ_LIMIT - len(self.output)
        if room > 0:
            self.output += data[:room]

    def processExited(self, reason: Failure) -> None:
        """The command has exited: the time limit no longer applies, and its output, if a
        process it left running holds it open, is read for L{_OUTPUT_WAIT} seconds more."""
        self.exited = reason
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.closer = self.reactor.callLater(_OUTPUT_WAIT, self._closePipes)

    def processEnded(self, reason: Failure) -> None:
        for timer in (self.timer, self.closer):
            if timer is not None and timer.active():
                timer.cancel()
        self.file.close()
        if self.onExit is not None:
            self.onExit(self)
        if not self.done.called:
            self.done.callback(reason.value)

    def _kill(self) -> None:
        transport = self.transport
        if transport is None:  # pragma: no cover - not started
            return
        pid = getattr(transport, "pid", None)
        if self.group and pid is not None:
            # The command's session: it and everything it started (which may hold its
            # output open after it ended).
            try:
                os.killpg(pid, SIGKILL)
            except OSError:
                pass
            return
        try:
            transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass

    def _closePipes(self) -> None:
        """Close the command's input and output now, read or not, so that the run ends once
        the command is dead, whatever else holds them."""
        transport = self.transport
        if transport is None:  # pragma: no cover - not started
            return
        # Twisted closes an input pipe once what it holds is written, which a process that
        # holds it open without reading never lets happen: the rest of the message is
        # dropped (the command has exited or is being killed).
        writer = getattr(transport, "pipes", {}).get(0)
        if writer is not None:
            writer.connectionLost(Failure(ConnectionDone()))
        transport.loseConnection()

    def _timeUp(self) -> None:
        self.timedOut = True
        self._kill()
        self._closePipes()

    def _cancel(self, done: Deferred) -> None:
        """The run is given up.  A command that has exited is not run again: its exit status
        decides at once (with the output read so far), and its pipes are closed.  Else the
        run is cancelled first (closing the pipes may end it at once, with the killed
        command's status), then the command is killed and its pipes closed, so that the run
        ends."""
        if self.exited is not None:
            done.callback(self.exited.value)
        else:
            done.errback(defer.CancelledError())
            self._kill()
        self._closePipes()


@implementer(IDeliveryBackend)
class PipeBackend:
    """Delivers by running a command (see the module docstring)."""

    def __init__(self, reactor: Any, settings: PipeSettings, account: _Account) -> None:
        self.reactor = reactor
        self.settings = settings
        self.account = account
        self._semaphore = flatSemaphore(settings.concurrency)
        #: The places of every backend's deliveries (L{useDeliveryPlaces}), or C{None}.
        self._places: Any = None
        #: the command has C{{nexthop}}: a run is for one next hop
        self._perNexthop = any(m.group(1) == "nexthop" for item in settings.command[1:]
                               for m in _PLACEHOLDER.finditer(item))
        self._runs: set[Deferred] = set()
        #: the commands running now (until their process ends, also when cancelled)
        self.running: set[_Run] = set()

    def useDeliveryPlaces(self, places: Any) -> None:
        """Have each run take one of C{places} (the queue's, shared by every backend: its
        C{run(f, *args)}) once it has its place among the C{concurrency} runs."""
        self._places = places

    #: L{deliver} takes C{started} (see there): the queue's L{Deliverer
    #: <mailrelay.queue.attempt.Deliverer>} gives it.
    reportsStart = True

    def deliver(self, envelope: Any, recipients: Any, route: Route,
                messagePath: Path, started: Callable[[], None] | None = None) -> Deferred:
        """Run the command for C{recipients} (once each, or once for all); the Deferred never
        fails, and cancelling it kills the runs.

        @param started: called when the first run begins, with its place among the queue's
            (the queue's delivery timeout runs from then)."""
        recipients = list(recipients)
        results: list[RecipientResult | None] = [None] * len(recipients)
        good: list[int] = []
        for index, r in enumerate(recipients):
            bad = next((a for a in (envelope.sender, r.address) if a.startswith("-")), None)
            if bad is not None:
                results[index] = RecipientResult(
                    r.address, DeliveryStatus.PERMANENT, "5.1.3",
                    f"X-mailrelay; the address <{bad}> starts with '-', which commands "
                    "would take for an option")
            else:
                good.append(index)
        if self.settings.per == "recipient":
            groups = [[i] for i in good]
        else:
            byNexthop: dict[str, list[int]] = {}
            for i in good:
                hop = _nexthop(route, recipients[i]) if self._perNexthop else ""
                byNexthop.setdefault(hop, []).append(i)
            groups = list(byNexthop.values())
        runs: list[Deferred] = []

        def start(prepared: Any) -> Any:
            if isinstance(prepared, list):  # a binary message that cannot be converted
                for index, result in zip(good, prepared, strict=True):
                    results[index] = result
                return results
            _, path, converted = prepared
            runs.extend(self._semaphore.run(placed, envelope, [recipients[i] for i in group],
                                            route, path) for group in groups)
            for d in runs:
                self._runs.add(d)
                d.addBoth(self._forget, d)
            everything = defer.gatherResults(runs, consumeErrors=True)
            everything.addErrback(
                lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
            everything.addErrback(whetherStarted)
            everything.addCallback(collect)
            return removeWhenFired(everything, converted)

        ran: list[bool] = []

        def placed(*args: Any) -> Any:
            """One run, once it has its place here and among every delivery's."""

            def run() -> Any:
                ran.append(True)
                if started is not None:
                    started()
                return self._run(*args)

            if self._places is None:
                return run()
            return self._places.run(run).addErrback(notStarted, args[1])

        def notStarted(failure: Failure, group: list) -> Any:
            """A run refused its place by the stop (L{DeliveryPlaces.interrupt
            <mailrelay.queue.attempt.DeliveryPlaces.interrupt>}), not by the delivery's
            cancellation, after another run began: its recipients are deferred, the
            delivery waiting for the runs begun (failing at once, it was recorded as
            deferred whole, and a recipient a command took delivered again at the next
            start).  Before any run began, the delivery was not started at all."""
            if cancelled or not ran or not failure.check(DeliveryNotStarted):
                return failure
            log.info("{queueID}: {backend}: not run for {addresses}: the relay is stopping",
                     queueID=envelope.queueID, backend=route.backend,
                     addresses=", ".join(f"<{r.address}>" for r in group))
            return resultsForAll(group, DeliveryStatus.TRANSIENT, "4.3.0",
                                 notStartedDiagnostic(f"{route.backend}:{route.nexthop}"))

        def whetherStarted(failure: Failure) -> Failure:
            """Cancelled: L{DeliveryNotStarted} when no command ran, else a plain
            cancellation (a command may have taken the message)."""
            if failure.check(defer.CancelledError):
                if ran and failure.check(DeliveryNotStarted):
                    return Failure(defer.CancelledError())
                if not ran and not failure.check(DeliveryNotStarted):
                    return Failure(DeliveryNotStarted())
            return failure

        def collect(perGroup: list[list[RecipientResult]]) -> list[RecipientResult]:
            for group, groupResults in zip(groups, perGroup, strict=True):
                for index, result in zip(group, groupResults, strict=True):
                    results[index] = result
            return results  # type: ignore[return-value]

        prepared = self._prepared(envelope, [recipients[i] for i in good], messagePath,
                                  route.backend)

        cancelled: list[bool] = []

        def cancel(_: Deferred) -> None:
            cancelled.append(True)
            # The last first: those waiting for a place go before the place of a run cut
            # short could start them.
            for d in reversed(runs):
                d.cancel()
            if not runs:  # still converting
                prepared.cancel()

        outer: Deferred = Deferred(cancel)
        prepared.addCallback(start)
        prepared.chainDeferred(outer)
        return outer

    def _prepared(self, envelope: Any, recipients: list, messagePath: Path,
                  name: str) -> Deferred:
        """The message for the runs (L{withTextLineEnds}: a BINARYMIME one converted, in a
        thread, before any run has its place, and so before the queue's delivery timeout
        runs), given up after C{time_limit} seconds as a run is (Postfix's pipe(8) time
        limit covers its whole delivery): C{recipients} are then deferred."""
        prepared = withTextLineEnds(threadHandOff(self.reactor), envelope, recipients,
                                    messagePath, name)
        limit = self.settings.timeLimit

        def givenUp(result: Any, timeout: float) -> list[RecipientResult]:
            log.warn("{queueID}: {backend}: converting the message took more than {limit}s "
                     "(time_limit): given up, deferred", queueID=envelope.queueID,
                     backend=name, limit=f"{limit:g}")
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.0",
                                 f"X-mailrelay; converting the message for {name} timed out "
                                 f"after {limit:g}s")

        return prepared.addTimeout(limit, self.reactor, onTimeoutCancel=givenUp)

    def _forget(self, result: Any, d: Deferred) -> Any:
        self._runs.discard(d)
        return result

    @defer.inlineCallbacks
    def _run(self, envelope: Any, recipients: list, route: Route, messagePath: Path) -> Any:
        settings, account = self.settings, self.account
        values = {
            "sender": envelope.sender or settings.nullSender,
            "queue_id": envelope.queueID or "",
            "nexthop": _nexthop(route, recipients[0]),
        }
        argv = _expand(settings.command, values,
                       [{"recipient": r.address, "domain": r.domain} for r in recipients])
        name = route.backend
        try:
            file = open(messagePath, "rb")
        except OSError as e:
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.0",
                                 f"X-mailrelay; cannot open the message file: {e.strerror or e}")
        if not _executable(argv[0]):
            file.close()
            log.error("{queueID}: the {backend} backend cannot run {command}: not an executable "
                      "file", queueID=envelope.queueID, backend=name, command=argv[0])
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.5",
                                 f"X-mailrelay; cannot run {argv[0]}: not an executable file")
        run = _Run(self.reactor, file, settings.timeLimit, self.running.discard,
                   group=_SETSID is not None)
        env = {"PATH": _PATH, "HOME": account.home, "USER": account.name,
               "LOGNAME": account.name, "LANG": "C"}
        executable, args = (argv[0], argv) if _SETSID is None else (_SETSID, [_SETSID, *argv])
        try:
            self.reactor.spawnProcess(run, executable, args, env=env, path="/",
                                      uid=account.uid, gid=account.gid, usePTY=False,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as e:
            file.close()
            log.error("{queueID}: cannot run {command} for the {backend} backend: {error}",
                      queueID=envelope.queueID, command=argv[0], backend=name, error=str(e))
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.5",
                                 f"X-mailrelay; cannot run {argv[0]}: {e}")
        self.running.add(run)
        ended = yield run.done
        return self._results(envelope, recipients, name, argv[0], run, ended)

    def _results(self, envelope: Any, recipients: list, name: str, program: str, run: _Run,
                 ended: Any) -> list[RecipientResult]:
        output = _printable(bytes(run.output))
        addresses = ", ".join(f"<{r.address}>" for r in recipients)
        if isinstance(ended, ProcessDone):
            log.info("{queueID}: {backend}: {command} took the message for {addresses}",
                     queueID=envelope.queueID, backend=name, command=program,
                     addresses=addresses)
            return [RecipientResult(r.address, DeliveryStatus.DELIVERED, "2.0.0",
                                    f"X-mailrelay; delivered via {name} service", final=True)
                    for r in recipients]
        status: int | None = getattr(ended, "exitCode", None)
        signal: int | None = getattr(ended, "signal", None)
        cannot = _CANNOT_EXECUTE.match(output) if status in (1, 126, 127) else None
        said = _OUTPUT_STATUS.match(output) if status else None
        if cannot is not None and not run.timedOut:
            reason = cannot.group("why") or cannot.group("error")
            log.error("{queueID}: the {backend} backend cannot run {command}: {why}",
                      queueID=envelope.queueID, backend=name, command=program, why=reason)
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.5",
                                 f"X-mailrelay; cannot run {program}: {reason}")
        if run.timedOut:
            code, why = "4.3.0", f"{program} killed: time limit of {run.timeLimit:g}s exceeded"
        elif isinstance(ended, ProcessTerminated) and status is None:
            code, why = "4.3.0", f"{program} died with signal {signal}"
        elif said is not None:  # the command's own status (Postfix's "D.S.N text")
            code, why = said.group(0), f"{program} exited with status {status}"
        else:
            code, meaning = SYSEXITS.get(status or 0, ("5.3.0", "unknown status"))
            why = f"{program} exited with status {status} ({meaning})"
        diagnostic = f"x-unix; {why}" + (f": {output}" if output else "")
        log.warn("{queueID}: {backend}: {why} for {addresses}{output}", queueID=envelope.queueID,
                 backend=name, why=why, addresses=addresses,
                 output=f": {output}" if output else "")
        kind = DeliveryStatus.TRANSIENT if code.startswith("4.") else DeliveryStatus.PERMANENT
        return resultsForAll(recipients, kind, code, diagnostic)

    def close(self) -> Deferred:
        """Nothing stays open between deliveries; runs still going are the queue's to cancel
        (it does, when the relay stops)."""
        return defer.succeed(None)


def build(options: dict[str, Any], context: PluginContext) -> PipeBackend:
    """The C{pipe} plugin's factory (a C{[[backends]]} table's options).

    @raise ConfigError: a missing or bad option (named), an unknown user, root.
    """
    directory = Path(context.configDir)
    at = At(Source(None, directory, directory))
    settings = OPTIONS.read(options, at)
    return PipeBackend(context.reactor, settings, _account(settings.user))
