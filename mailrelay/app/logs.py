"""The log level (C{[log] level}): events below it are dropped before any observer formats
them, in the relay's process (wrapping the observer twistd would use) and in the delivery
process (before its events are formatted for the relay).

Twisted's own chatter about each DNS query's UDP port (C{Starting protocol
<...DNSDatagramProtocol ...>}, C{DNSDatagramProtocol starting on N}, C{(UDP Port N Closed)},
C{Stopping protocol ...}: four lines a lookup) counts as debug, whatever level it was logged
at.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import syslog
from typing import Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    PredicateResult,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from zope.interface import implementer, provider

from mailrelay.queue.process import eventText

__all__ = [
    "LOG_LEVELS",
    "LevelFilter",
    "appendOnly",
    "checkPidFile",
    "classicLogText",
    "filtered",
    "forSyslog",
    "installTwistdObserver",
]

#: The levels C{[log] level} may name, lowest first (Twisted's).
LOG_LEVELS = tuple(level.name for level in LogLevel.iterconstants())

#: The text of legacy events that are debug whatever their level: the UDP port of each DNS
#: query opening and closing, and the system resolver reading C{resolv.conf} (at start in
#: each process, and at each change: C{twisted.names.client.Resolver.maybeParseConfig}).
_DEBUG_TEXT = re.compile(
    r"(?:DNSDatagramProtocol starting on \d+"
    r"|(?:Starting|Stopping) protocol <twisted\.names\.dns\.DNSDatagramProtocol "
    r"|\(UDP Port \d+ Closed\)"
    r"|(?:b'[^']*'|\S+) changed, reparsing$"
    r"|Resolver added \('[^']*', \d+\) to server list$)"
)


def _isDebugNoise(event: dict[str, Any]) -> bool:
    """Whether C{event} is Twisted's chatter about a DNS query's UDP port or the system's
    C{resolv.conf} (read from the legacy event's message as given, never formatted),
    or the traceback of a dropin that
    failed to import in a plugin scan (L{_isDropinTraceback})."""
    if event.get("log_namespace") != "log_legacy":
        return False
    if _isDropinTraceback(event):
        return True
    message = event.get("message")
    if not message:
        return False
    first = message[0]
    return isinstance(first, str) and _DEBUG_TEXT.match(first) is not None


def _isDropinTraceback(event: dict[str, Any]) -> bool:
    """Whether C{event} is C{twisted.plugin}'s scan logging a dropin that failed to import
    (C{log.err()} in C{getCache}, the failure's first frame): twistd's own scan, for its
    commands, before any of mailrelay's code runs, whose "Unhandled Error" twistd writes
    again in the log once it starts.  The relay's own scan says it in one line, naming the
    file and the error (L{mailrelay.config.plugins}); the traceback is for debugging."""
    failure = event.get("failure")
    frames = getattr(failure, "frames", None)
    if not frames or event.get("why") is not None:
        return False
    function, path = frames[0][0], frames[0][1]
    return function == "getCache" and path.replace(os.sep, "/").endswith("/twisted/plugin.py")


@implementer(ILogFilterPredicate)
class LevelFilter:
    """Lets through the events at L{level} or above (C{PredicateResult.maybe}); the others
    are refused (C{no}) before anything formats them.  The level can be changed at any time
    (a reload).

    @ivar level: the lowest level logged, a L{LogLevel}.
    """

    def __init__(self, level: LogLevel = LogLevel.info) -> None:
        self._allowed: frozenset[Any] = frozenset()
        self.level = level

    @property
    def level(self) -> LogLevel:
        return self._level

    @level.setter
    def level(self, level: LogLevel) -> None:
        self._level = level
        ordered = list(LogLevel.iterconstants())  # lowest first
        self._allowed = frozenset(ordered[ordered.index(level) :])

    def setLevel(self, name: str) -> None:
        """Log from the level named C{name} (one of L{LOG_LEVELS}) on."""
        self.level = LogLevel.levelWithName(name)

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if event.get("log_level") not in self._allowed:
            return PredicateResult.no
        if self._level is not LogLevel.debug and _isDebugNoise(event):
            return PredicateResult.no
        return PredicateResult.maybe


def filtered(observer: Any, levels: LevelFilter) -> ILogObserver:
    """C{observer} (an C{ILogObserver}, or a legacy C{twisted.python.log} observer) behind
    C{levels}."""
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return FilteringLogObserver(observer, [levels])


def eventSystem(event: dict[str, Any]) -> str:
    """The C{[system]} of a classic log line, as Twisted writes it: C{log_system}, else
    C{namespace#level}."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def classicLogText(timeFormat: str | None = timeFormatRFC3339) -> Any:
    """A C{formatEvent} for Twisted's C{FileLogObserver} writing exactly what Twisted's
    C{textFileLogObserver} writes (C{formatEventAsClassicLogText}), cheaper: the time stamp
    is formatted once a second (it has no finer part), and the text by
    L{mailrelay.queue.process.eventText} (C{str.format_map}, in C, instead of Twisted's
    formatter written in Python).  An event with a failure (its traceback) goes to
    Twisted's own code.

    Measured with cProfile on a held relay (one client, 1000 messages): the three lines per
    message cost about a quarter of what they did with Twisted's formatting (Logger.info for
    3,000 events: 0.358 -> 0.103 s)."""
    cache: list[Any] = [None, "-"]

    def stamp(when: float | None) -> str:
        if when is None or timeFormat is None:
            return "-"
        second = int(when // 1)
        if cache[0] != second:
            cache[0], cache[1] = second, formatTime(second, timeFormat)
        return str(cache[1])

    def formatEvent(event: dict[str, Any]) -> str | None:
        if "log_failure" in event:  # (with its traceback)
            return formatEventAsClassicLogText(event, formatTime=stamp)
        text = eventText(event)
        if not text:
            return None
        line = f"{stamp(event.get('log_time'))} [{eventSystem(event)}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    return formatEvent


def installTwistdObserver(application: Any, serverOptions: Any, levels: LevelFilter) -> bool:
    """Make twistd log through C{levels}: give C{application} (before twistd starts logging)
    the observer twistd would make from its options (stdout with C{-n}, C{--logfile} with
    SIGUSR1 rotation, C{--syslog}), behind the filter.  Returns whether it was installed: not
    when twistd was given a C{--logger} of its own, or C{application} already has an
    observer (then events are filtered by that observer only)."""
    getComponent = getattr(application, "getComponent", None)
    if getComponent is None or serverOptions is None or serverOptions.get("logger"):
        return False
    if getComponent(ILogObserver, None) is not None:
        return False
    from twisted.scripts.twistd import _SomeApplicationRunner

    observer = _SomeApplicationRunner.loggerFactory(serverOptions)._getLogObserver()
    if type(observer) is FileLogObserver:  # twistd's textFileLogObserver (its time format)
        observer.formatEvent = classicLogText()
        appendOnly(getattr(observer, "_outFile", None))
    elif serverOptions.get("syslog"):
        observer = forSyslog(observer)
    application.setComponent(ILogObserver, filtered(observer, levels))
    return True


def appendOnly(logFile: Any) -> None:
    """Make twistd's C{--logfile} C{logFile} (a L{twisted.python.logfile.BaseLogFile}; any
    other file is left alone) append, now and after each rotation: Twisted opens it for
    writing at its end, so once truncated under us (logrotate's copytruncate) it would go
    on writing at its old offset, behind a hole of NUL bytes."""
    from twisted.python.logfile import BaseLogFile

    if not isinstance(logFile, BaseLogFile):
        return
    opened = logFile._openFile

    def append() -> None:
        fd = logFile._file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)

    def openFile() -> None:
        opened()
        append()

    logFile._openFile = openFile  # type: ignore[method-assign]
    append()


#: The syslog priority of each level, as Postfix's: its warnings are LOG_WARNING, its errors
#: LOG_ERR, its fatal errors LOG_CRIT.
_SYSLOG_PRIORITIES = {
    LogLevel.debug: syslog.LOG_DEBUG,
    LogLevel.info: syslog.LOG_INFO,
    LogLevel.warn: syslog.LOG_WARNING,
    LogLevel.error: syslog.LOG_ERR,
    LogLevel.critical: syslog.LOG_CRIT,
}


def forSyslog(observer: Any) -> ILogObserver:
    """twistd's C{--syslog} observer C{observer} (a legacy one) given each event with its
    level's syslog priority (L{_SYSLOG_PRIORITIES}), the mail facility (Postfix's
    C{syslog_facility} default; twistd's is user) and its system as the log file has it
    (L{eventSystem}): left to itself it sends every event at LOG_INFO but errors, at
    LOG_ALERT, and names the system of none (C{[-]})."""
    legacy = LegacyLogObserverWrapper(observer)

    @provider(ILogObserver)
    def emit(event: dict[str, Any]) -> None:
        event = dict(event)
        priority = _SYSLOG_PRIORITIES.get(event.get("log_level"))  # type: ignore[arg-type]
        if priority is not None:
            event.setdefault("syslogPriority", priority)
        event.setdefault("syslogFacility", syslog.LOG_MAIL)
        event.setdefault("system", eventSystem(event))
        legacy(event)

    return emit


_log = Logger()


def giveLogFile(path: str, uid: int, gid: int) -> None:
    """twistd's C{--logfile} C{path}, created by root before it drops to C{uid}/C{gid}: give
    it to that user, so that its rotation (at 1 MB, and on SIGUSR1) works -- Twisted's
    LogFile gives up without a word when it cannot write it -- and say so when its
    directory does not let that user rename it (rotation then does not happen)."""
    path = os.path.abspath(path)
    try:
        os.chown(path, uid, gid)
    except OSError as e:
        _log.warn("the log file {path} cannot be given to the relay's user: {error}; it will "
                 "not be rotated", path=path, error=e.strerror or str(e))
        return
    directory = os.path.dirname(path)
    if not _writableBy(directory, uid, gid):
        _log.warn("the log file's directory {directory} is not writable by the relay's user: "
                 "the log will not be rotated (give the directory to that user)",
                 directory=directory)


def checkPidFile(path: str, uid: int, gid: int) -> None:
    """twistd's C{--pidfile} C{path}, written by root before it drops to C{uid}/C{gid}: say
    when that user cannot remove it at the stop (its directory, such as C{/run}, is not
    writable by the user), as twistd then leaves it behind at each stop, saying only 'No
    permission to delete pid file' -- and a pid file naming a process that runs (its pid
    reused) keeps the next start from starting."""
    directory = os.path.dirname(os.path.abspath(path))
    if not _writableBy(directory, uid, gid):
        why = f"its directory {directory} is not writable by the relay's user"
    else:
        why = _stickyProblem(path, uid, "the relay's user") or ""
    if why:
        _log.warn("the pid file {path} will stay after the relay stops: {why} (use a "
                  "directory of that user's, such as /run/mailrelay/)",
                  path=os.path.abspath(path), why=why)


def refuseStalePidFile(path: str, uid: int | None = None) -> None:
    """twistd's C{--pidfile} C{path}, before twistd looks at it (C{checkPID}): when it is
    left by a process that is gone and this user (C{uid}, by default ours) may not remove
    it -- another user's, in a sticky directory such as C{/tmp} -- twistd would try to and
    die of a C{PermissionError} traceback; say why in one line naming the file instead.
    A pid file of a process that runs is left to twistd (it says so), and so is one that
    cannot be read (it says what is wrong with it).

    @raise SystemExit: the file is stale and this user may not remove it."""
    uid = os.geteuid() if uid is None else uid
    try:
        with open(path, "rb") as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return  # running (or another user's: twistd says it cannot check it)
    except ProcessLookupError:
        pass
    except (OSError, ValueError):
        return
    directory = os.path.dirname(os.path.abspath(path))
    why = _stickyProblem(path, uid, "this user")
    if why is None and uid == os.geteuid() and not os.access(directory, os.W_OK | os.X_OK):
        why = f"its directory {directory} is not writable by this user"
    if why is not None:
        raise SystemExit(
            f"mailrelay: error: the pid file {path} is left by a process that is gone (pid "
            f"{pid}), and this user may not remove it: {why}; remove it, or give twistd "
            "another --pidfile"
        )


def _stickyProblem(path: str, uid: int, who: str) -> str | None:
    """Why the user C{uid} may not remove C{path} from its sticky directory (C{/tmp}: only
    the file's owner, the directory's or root may), or C{None}: it may, the directory is
    not sticky, or there is no such file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(directory)
        owner = os.stat(path).st_uid
    except OSError:
        return None
    if not mode.st_mode & stat.S_ISVTX or uid in (-1, 0, mode.st_uid, owner):
        return None
    return (f"its directory {directory} is sticky (mode {stat.S_IMODE(mode.st_mode):o}) and "
            f"the file is not {who}'s: only its owner, the directory's or root may remove it")


def _writableBy(directory: str, uid: int, gid: int) -> bool:
    """Whether C{directory} lets the user C{uid} (group C{gid}; -1: the user's own) create
    and remove files (root, C{uid} 0, or -1: staying root, may).  Asked of the system, as
    that user (L{mailrelay.namedfile.userError}, as for the files the relay reads), so that
    the directories on the way, the user's groups and ACLs count."""
    if uid in (-1, 0) or os.geteuid() != 0:
        return True
    from mailrelay.namedfile import userError

    def mayWrite() -> None:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)

    return userError(uid, None if gid == -1 else gid, mayWrite, directory) is None
