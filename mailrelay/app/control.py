"""The relay's control socket: C{<spool>/control.sock}, a UNIX socket speaking Twisted's
AMP, which the C{mailrelay} command (L{mailrelay.app.cli}) talks to.

The relay answers L{Status}, L{Reload} and L{Stop} itself, and the queue commands
(L{mailrelay.queue.commands}) with the queue manager: its own (C{[queue] process =
"inline"}), or the delivery process's, to which it forwards them.  When no queue manager can
answer (C{[queue] hold = true}, or the delivery process is being restarted), the commands
that only read the queue are answered from the spool by the relay itself, and the others
refused with the reason.

Root, the relay's user and the socket's owner may run every command.  As Postfix lets every
local user run C{mailq} (C{authorized_mailq_users}, default C{static:anyone}) while only
root may delete or hold mail (C{postsuper}), the other users C{[spool] mailq_users} names
(default: anyone) may list the queue and do nothing else: the relay tells the users apart by
the peer's credentials (Linux's C{SO_PEERCRED}), so there the socket is open to all (mode
0666) and the spool directory searchable (not readable) by all, its queue staying private.
Where the system does not say who the peer is, the socket is its owner's only (mode 0600).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailrelay.app.services import stopReactor
from mailrelay.queue.commands import (
    LIST_PAGE,
    QueueList,
    QueueLocator,
    QuietAMP,
    makeCommand,
)
from mailrelay.queue.control import NotPermitted, QueueControl

log = Logger()

__all__ = [
    "CONTROL_SOCKET",
    "ControlService",
    "checkSocketPath",
    "Reload",
    "Status",
    "Stop",
    "controlSocketPath",
    "queueControl",
]

#: The control socket's name in the spool directory.
CONTROL_SOCKET = "control.sock"

#: The longest path a UNIX socket can have (C{sun_path} less its NUL).
_MAX_SOCKET_PATH = 107


def controlSocketPath(spoolDirectory: str | os.PathLike[str]) -> Path:
    """The control socket of the relay whose spool is C{spoolDirectory}."""
    return Path(os.path.abspath(spoolDirectory)) / CONTROL_SOCKET


#: The error of the commands a user of C{[spool] mailq_users} may not run.
_REFUSED: dict[type[Exception], bytes] = {NotPermitted: b"NOT_PERMITTED"}

#: The relay's state (see L{RelayService.status}).
Status = makeCommand(b"status", "The relay's state.", errors=_REFUSED)
#: Reload the configuration, as SIGHUP does; answers whether it took.
Reload = makeCommand(b"reload", "Reload the configuration.", errors=_REFUSED)
#: Stop the relay, as SIGTERM does; answers at once (the relay closes the connection when it
#: has stopped).
Stop = makeCommand(b"stop", "Stop the relay.", errors=_REFUSED)

#: The most connections to the control socket at once of the users other than root and the
#: relay's (the socket is open to all: L{ControlProtocol}); more are closed at once.
MAX_OTHER_CONNECTIONS = 16
#: The most octets of one unfinished request such a user may send (AMP bounds each key and
#: value of a request, not their number); a listing's request takes a hundred.
MAX_OTHER_REQUEST = 65536

#: Whether this system says who the peer of a UNIX socket is (L{peerCredentials}).
PEER_CREDENTIALS = hasattr(socket, "SO_PEERCRED") and sys.platform.startswith("linux")


def queueControl(
    spool: Any, queue: Any, reactor: Any, unavailable: str = "no queue manager runs"
) -> QueueControl:
    """A L{QueueControl} of C{spool} and the queue manager C{queue} (or C{None}), reading
    envelopes in C{reactor}'s thread pool."""
    from twisted.internet.threads import deferToThreadPool

    def deferToThread(f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return QueueControl(
        spool, queue, reactor, deferToThread=deferToThread, unavailable=unavailable
    )


def checkSocketPath(path: Path) -> None:
    """@raise OSError: C{path} is too long for a UNIX socket (the message says so)."""
    length = len(os.fsencode(path))
    if length > _MAX_SOCKET_PATH:
        raise OSError(
            f"the control socket {path} would be {length} octets long, more than the "
            f"{_MAX_SOCKET_PATH} a UNIX socket's path may be: use a shorter spool directory"
        )


class RelayLocator(QueueLocator):
    """The commands of the control socket, answered by the relay (L{RelayService}).

    @ivar peer: C{(pid, uid)} of a peer other than root, the relay's user and the socket's
        owner (C{None}: one of those, or unknown).
    """

    def __init__(self, relay: Any, mayList: Callable[[int], bool] = lambda uid: False) -> None:
        """
        @param mayList: whether a user may list the queue (C{[spool] mailq_users} of the
            running configuration), asked at each request of another user's.
        """
        self.relay = relay
        self.mayList = mayList
        self.peer: tuple[int, int] | None = None
        self._listed = False

    @property
    def may(self) -> str:
        """What the peer may run now: C{"all"}; C{"list"}, only L{QueueList} (a user of
        C{[spool] mailq_users}); C{"none"} (any other user).  Asked at each request, as
        Postfix's showq checks C{authorized_mailq_users} for each: a reload that removes
        a user from C{[spool] mailq_users} refuses the connections it has open."""
        if self.peer is None:
            return "all"
        return "list" if self.mayList(self.peer[1]) else "none"

    def check(self, command: type[amp.Command]) -> str:
        """What the peer may run now (L{may}).

        @raise NotPermitted: the peer may not run C{command}."""
        may = self.may
        if may == "none":
            if self._listed and self.peer is not None:
                self._listed = False
                log.warn(
                    "control socket: request of process {pid} of user {uid} refused: the "
                    "user is not in [spool] mailq_users (any more)",
                    pid=self.peer[0], uid=self.peer[1],
                )  # fmt: skip
            raise NotPermitted(
                "permission denied: the control socket is for root, the relay's user and the "
                "users of [spool] mailq_users"
            )
        self._listed = may == "list"
        if may == "list" and command is not QueueList:
            raise NotPermitted(
                f"permission denied: {command.commandName.decode()} is for root and the "
                "relay's user; other users may only list the queue"
            )
        return may

    def queueCommand(self, command: type[amp.Command], arguments: dict[str, Any]) -> Any:
        may = self.check(command)
        limit = arguments.get("limit", 0)
        if may == "list" and limit > LIST_PAGE:
            # (The whole queue read and answered at once: memory and time of the relay's.)
            raise NotPermitted(f"permission denied: other users list the queue {LIST_PAGE} "
                               f"entries at a time, not {limit}")
        return self.relay.queueCommand(command, arguments)

    @Status.responder
    def status(self) -> Deferred[dict[str, Any]]:
        self.check(Status)
        return self.relay.status().addCallback(lambda result: {"result": result})

    @Reload.responder
    def reload(self) -> dict[str, Any]:
        self.check(Reload)
        reloaded = self.relay.reload()
        return {
            "result": {
                "reloaded": reloaded,
                "error": None if reloaded else self.relay.reloadError,
                "warning": self.relay.reloadWarning,
                "source": self.relay.configPath or "(embedded default)",
            }
        }

    @Stop.responder
    def stop(self) -> dict[str, Any]:
        self.check(Stop)
        reactor = self.relay.reactor
        log.info("stopping: asked to on the control socket")
        reactor.callLater(0, stopReactor, reactor)
        return {"result": {"pid": os.getpid()}}


def peerCredentials(transport: Any) -> tuple[int, int, int] | None:
    """The C{(pid, uid, gid)} of the peer of the UNIX socket C{transport}, or C{None} where
    the system does not say (not Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or not sys.platform.startswith("linux"):
        return None
    handle = transport.getHandle()
    data = handle.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


class ControlProtocol(QuietAMP):
    """One connection to the control socket: every command for a peer running as root, as
    the relay's user or as the socket's owner; the queue's listing only for the users of
    C{[spool] mailq_users}; none for the others (each refused, saying why).  The other
    users' connections are bounded (the socket is open to all): at most
    L{MAX_OTHER_CONNECTIONS} at once, requests of at most L{MAX_OTHER_REQUEST} octets."""

    def __init__(self, service: ControlService) -> None:
        self.locator = RelayLocator(service.relay, service.mayList)
        super().__init__(locator=self.locator)
        self.service = service
        #: The octets received of the request not yet complete (another user's: see
        #: L{MAX_OTHER_REQUEST}).
        self._unfinished = 0
        self._closed = False

    def connectionMade(self) -> None:
        super().connectionMade()
        credentials = peerCredentials(self.transport)
        if credentials is not None and credentials[1] not in self.service.allowedUsers():
            pid, uid, _ = credentials
            others = sum(1 for c in self.service.connections if c.locator.peer is not None)
            self.locator.peer = (pid, uid)  # (its rights: asked at each request)
            if others >= MAX_OTHER_CONNECTIONS:
                self._close(
                    "control socket: connection from process {pid} of user {uid} closed: too "
                    "many connections of users other than root and the relay's ({limit})",
                    pid=pid, uid=uid, limit=MAX_OTHER_CONNECTIONS,
                )  # fmt: skip
                return
            if self.locator.may == "none":
                log.warn(
                    "control socket: connection from process {pid} of user {uid} refused",
                    pid=pid,
                    uid=uid,
                )
        self.service.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self.locator.peer is not None:
            self._unfinished += len(data)
            if self._unfinished > MAX_OTHER_REQUEST:
                self._close(
                    "control socket: connection of a user other than root and the relay's "
                    "closed: a request longer than {limit} octets",
                    limit=MAX_OTHER_REQUEST,
                )  # fmt: skip
                return
        super().dataReceived(data)

    def ampBoxReceived(self, box: Any) -> None:
        self._unfinished = 0
        super().ampBoxReceived(box)

    def _close(self, format: str, **fields: Any) -> None:
        """Close the connection, nothing more read from it, saying why (C{format})."""
        log.warn(format, **fields)
        self._closed = True
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.service.connections.discard(self)
        super().connectionLost(reason)


#: Seconds between two tries to make the control socket on a spool file system that had no
#: room for it.
LISTEN_RETRY = 10.0


def _noRoom(error: OSError) -> bool:
    """Whether C{error}, from L{ControlService.listen}, says the file system has no room for
    the socket (no inode left: ENOSPC; the quota reached: EDQUOT)."""
    cause = error.__cause__
    return isinstance(cause, ierror.CannotListenError) and getattr(
        cause.socketError, "errno", None
    ) in (errno.ENOSPC, errno.EDQUOT)


class ControlService(Service):
    """Listens on the control socket from start-up (before privileges are dropped: the socket
    is then given to the spool's owner) until the relay has stopped.

    @ivar path: the socket's path.
    """

    name = "control"  # type: ignore[assignment]  # (Service declares None)
    #: The clock the relay's time running is measured on: not the wall clock (the
    #: reactor's), which a step (NTP, C{date -s}) moves.
    monotonic: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, relay: Any, spoolDirectory: str | os.PathLike[str]) -> None:
        self.relay = relay
        self.path = controlSocketPath(spoolDirectory)
        self.port: Any = None
        self.connections: set[ControlProtocol] = set()
        self._began: float | None = None
        #: The next try to listen, while the spool's file system has no room for the socket.
        self._retry: Any = None

    @property
    def startedAt(self) -> float | None:
        """When the relay started (seconds since the epoch), on the wall clock as it is
        now: what it said then is off by any step since; C{None} before."""
        if self._began is None:
            return None
        return float(self.relay.reactor.seconds()) - (self.monotonic() - self._began)

    def mailqUsers(self) -> tuple[int, ...] | None:
        """The running configuration's C{[spool] mailq_users} (C{None}: anyone; none without
        a configuration)."""
        return getattr(getattr(self.relay, "config", None), "mailqUsers", ())

    def mayList(self, uid: int) -> bool:
        """Whether the user C{uid} may list the queue (C{[spool] mailq_users})."""
        users = self.mailqUsers()
        return users is None or uid in users

    def allowedUsers(self) -> set[int]:
        """The users that may use the socket: root, the relay's and the socket's owner."""
        allowed = {0, os.geteuid()}
        try:
            allowed.add(os.stat(self.path).st_uid)
        except OSError:
            pass
        return allowed

    def refuseIfAnother(self) -> None:
        """Make sure no other relay runs on our spool (its socket answers), removing the
        socket of one that is gone: done before anything else of the spool is touched.

        @raise SystemExit: another relay answers, or the socket cannot be checked or used
            (the message says why)."""
        try:
            checkSocketPath(self.path)
            self._removeStale(str(self.path))
        except OSError as e:
            raise SystemExit(f"mailrelay: error: {e}") from None

    def privilegedStartService(self) -> None:
        """Listen on the socket; on a spool file system with no room for it (no inode left,
        the quota reached), start without it and try again every L{LISTEN_RETRY} seconds:
        the spool starts on a full disk too, so that its queue is delivered, which frees
        space (see L{mailrelay.spool.store}).

        @raise SystemExit: it cannot be listened on (the message says why)."""
        self._began = self.monotonic()
        try:
            self.listen()
        except OSError as e:
            if not _noRoom(e):
                raise SystemExit(f"mailrelay: error: {e}") from None
            log.error(
                "{error}; the relay runs without it (the mailrelay command cannot reach it) "
                "and tries again every {interval:.0f} seconds",
                error=str(e),
                interval=LISTEN_RETRY,
            )
            self._listenLater()
        super().privilegedStartService()

    def _listenLater(self) -> None:
        self._retry = self.relay.reactor.callLater(LISTEN_RETRY, self._listenAgain)

    def _listenAgain(self) -> None:
        """Try again to listen on the socket the full file system had no room for."""
        self._retry = None
        try:
            self.listen()
        except OSError as e:
            if _noRoom(e):
                self._listenLater()
            else:
                log.error("{error}; the relay runs without its control socket", error=str(e))

    def listen(self) -> None:
        """Listen on the socket (removing one left by a relay that is gone).

        @raise OSError: it cannot be listened on, or another relay answers on it (the
            message says which).
        """
        checkSocketPath(self.path)
        path = str(self.path)
        self._removeStale(path)
        reactor = self.relay.reactor
        try:
            factory = Factory.forProtocol(lambda: ControlProtocol(self))
            factory.noisy = False
            # (Open to all where the relay tells its users apart: ControlProtocol.)
            self.port = reactor.listenUNIX(
                path, factory, mode=0o666 if PEER_CREDENTIALS else 0o600
            )
        except ierror.CannotListenError as e:
            raise OSError(f"cannot listen on the control socket {path}: {e.socketError}") from e
        if os.geteuid() == 0:
            # Give it to the spool's owner, who the relay may run as (twistd --uid).
            owner = os.stat(self.path.parent)
            os.chown(path, owner.st_uid, owner.st_gid)
        if self._began is None:
            self._began = self.monotonic()
        log.info("control socket {path}", path=path)
        self.openToListing()

    def openToListing(self) -> None:
        """Let the users of C{[spool] mailq_users}, if any, reach the socket: make the spool
        directory searchable by all (not readable: its queue and files stay private, mode
        0700 and 0600), as Postfix's queue directory is.  At the start and each reload."""
        if not PEER_CREDENTIALS or self.mailqUsers() == ():
            return
        directory = self.path.parent
        try:
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            if mode & 0o011 != 0o011:
                os.chmod(directory, mode | 0o011)
        except OSError as e:
            log.warn(
                "control socket: cannot make the spool directory {directory} searchable for "
                "the users of [spool] mailq_users: {error}",
                directory=str(directory), error=e.strerror or str(e),
            )  # fmt: skip

    @staticmethod
    def _removeStale(path: str) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{path} exists and is not a socket; remove it or choose another spool")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a relay that is gone
            return
        except OSError as e:
            raise OSError(f"cannot check the control socket {path}: {e.strerror or e}") from e
        finally:
            probe.close()
        raise OSError(
            f"another relay is running on this spool (it answers on {path}); stop it first"
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.loseConnection()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        path = self.path

        def notRemoved(failure: Failure) -> None:
            # The spool's file system gone read-only, or an I/O error: nothing to stop the
            # stop for (the next start removes a socket left behind).
            failure.trap(OSError)
            log.warn(
                "control socket {path}: removing it at the stop failed: {error}; the next "
                "start replaces it",
                path=str(path),
                error=failure.value.strerror or failure.getErrorMessage(),
            )

        d: Deferred[None] = port.stopListening()
        return d.addErrback(notRemoved)
